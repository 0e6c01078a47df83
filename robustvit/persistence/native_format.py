"""How a family's library saves a converted model with its own ``save_pretrained`` / ``save_for_hf``: the key names it
writes, the config it reads back, the preprocessing it ships. One :class:`NativeFormat` per family, registered in
:data:`NATIVE_FORMATS` by the library's module (:mod:`~robustvit.persistence.timm_native`,
:mod:`~robustvit.persistence.transformers_native`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from robustvit.families import get_family
from robustvit.registry import Registry

__all__ = ["NATIVE_FORMATS", "NativeFormat", "native_format"]


class NativeFormat:
    """A library that saves ``state_dict`` names as they are, has no config of its own in robustvit's
    ``config.json`` and no preprocessing object to ship (timm's)."""

    def saved_key_names(self, model: nn.Module) -> dict[str, str]:
        """``{name in a natively saved checkpoint: state_dict name}``; the library may rename keys on save."""
        return {name: name for name in model.state_dict()}

    def library_config(self, model: nn.Module) -> dict:
        """The library's own config of a converted model, written into robustvit's ``config.json`` so that the
        library's loaders (e.g. transformers' Auto classes and pipelines) can read a robustvit folder too."""
        return {}

    def image_processor(self, model: nn.Module):
        """The library's preprocessing object to ship next to the weights (``save_pretrained``), or ``None``."""
        return None

    def write_library_files(self, model: nn.Module, directory: Path) -> None:
        """Write the other files the library's own loaders read from a converted model's folder (none for timm)."""


NATIVE_FORMATS: Registry[NativeFormat] = Registry("native format")
"""Family name -> its library's :class:`NativeFormat`."""


def native_format(model: nn.Module) -> NativeFormat:
    """The :class:`NativeFormat` of ``model``'s family."""
    return NATIVE_FORMATS[get_family(model).name]
