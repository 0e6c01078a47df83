"""timm's metadata of a converted model: ``pretrained_cfg`` for its preprocessing, ``model_args`` for its rebuild."""

from __future__ import annotations

from torch import nn

from robustvit.conversion.metadata import LIBRARY_METADATA, NATIVE_RECORD_KEY, native_record
from robustvit.families import get_family

__all__ = ["TIMM_ARCHITECTURE", "TIMM_FAMILIES", "describe"]

TIMM_ARCHITECTURE = "robustvit"
"""timm model name of converted models (``pretrained_cfg["architecture"]``, and ``save_for_hf``'s ``config.json``):
the entrypoint :func:`robustvit.persistence.timm_native.robustvit`."""


TIMM_FAMILIES = ("timm-vit", "timm-beit", "timm-eva")
"""The registered families of timm models: their converted models share timm's metadata and native format."""


def describe(model: nn.Module) -> None:
    """``pretrained_cfg`` describes the converted model: pixels in [0, 1] (mean 0, std 1) at its real input size,
    so ``timm.data.create_transform(**resolve_data_config(model=m))`` feeds it what it expects. The architecture
    becomes the registered ``robustvit`` entrypoint and ``model_args`` carries the rebuild record, so
    ``timm.models.save_for_hf`` + ``timm.create_model("local-dir:...", pretrained=True)`` (or ``hf-hub:``)
    rebuild the converted model and load its weights strictly (timm without robustvit: "Unknown model")."""
    spec = get_family(model).input_spec(model)
    cfg = dict(model.pretrained_cfg or {})
    kept = [note for note in cfg.get("notes") or () if not note.startswith(_NOTE)]  # a rebuild writes them anew
    cfg["notes"] = (*kept, *_notes(model))
    cfg.update(
        architecture=TIMM_ARCHITECTURE,
        input_size=(spec.channels, *spec.image_size),
        fixed_input_size=True,
        mean=(0.0,) * spec.channels,
        std=(1.0,) * spec.channels,
        num_classes=model.num_classes,
    )
    model.pretrained_cfg = model.default_cfg = cfg
    model._model_args = {NATIVE_RECORD_KEY: native_record(model)}


_NOTE = "robustvit: "
_PREFIX_TOKENS = ("cls_token", "reg_token", "dist_token")  # timm VisionTransformer's (and DeiT's) prefix tokens


def _notes(model: nn.Module) -> tuple[str, ...]:
    """What a converted model does differently from timm's model contracts (``PretrainedCfg.notes``, the one free
    text field timm keeps when it reads a ``pretrained_cfg`` back)."""
    notes = [
        f"{_NOTE}spectrally rescaled weights are torch.nn.utils.parametrize parametrizations: the state dict "
        "holds <module>.parametrizations.weight.original, not <module>.weight (classifier and first_conv included)"
    ]
    tokens = {name: getattr(model, name, None) for name in _PREFIX_TOKENS}
    frozen = [name for name, token in tokens.items() if token is not None and not token.requires_grad]
    if frozen:
        notes.append(
            f"{_NOTE}{', '.join(frozen)} cannot change any output (the token shift never mixes prefix tokens "
            "into the pooled patches), so they are frozen and get no gradient"
        )
    return tuple(notes)


for _family in TIMM_FAMILIES:
    LIBRARY_METADATA.register(_family, describe)
