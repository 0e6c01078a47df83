"""What a converted model tells its own library: the record that rebuilds it, and the library metadata writers.

A converted model stays a first-class timm / transformers model: right after conversion its library's own
preprocessing must feed it [0, 1] pixels, and the library's own ``save_pretrained`` / ``save_for_hf`` must write what
rebuilds it (loading it back is :mod:`robustvit.persistence`'s job). Each family's library registers one writer in
:data:`LIBRARY_METADATA` (:mod:`robustvit.conversion.timm_metadata`, :mod:`robustvit.conversion.transformers_metadata`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from robustvit.families import get_family
from robustvit.registry import Registry

__all__ = ["LIBRARY_METADATA", "NATIVE_RECORD_KEY", "native_record"]

NATIVE_RECORD_KEY = "robustvit"
"""Key under which a natively saved converted model (transformers ``config.json``, timm ``model_args``) records
how robustvit rebuilds it: :func:`native_record`."""

LIBRARY_METADATA: Registry[Callable[[nn.Module], None]] = Registry("library metadata")
"""Family name -> ``describe(model)``: rewrites the library's own metadata of a just-converted model (preprocessing,
config, the :func:`native_record`), so that the library's standard preprocessing and save paths see the converted
model, not its source."""


def native_record(model: nn.Module) -> dict:
    """JSON-ready ``{"family", "source", "convert_config"}`` of a converted model: enough to rebuild its architecture
    (``robustvit.from_pretrained`` then loads the weights strictly)."""
    return {
        "family": get_family(model).name,
        "source": model.robustvit_source,
        "convert_config": model.robustvit_config.to_dict(),
    }
