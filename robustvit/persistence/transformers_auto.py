"""transformers' Auto classes (and so ``pipeline``) for the ``robustvit_*`` model types: they load a converted model
through ``robustvit.from_pretrained``. Registered on import (:mod:`robustvit.persistence` imports this module)."""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification

from robustvit.conversion.transformers_metadata import CONVERTED_CONFIGS, RobustViTConfig
from robustvit.persistence.hub import from_pretrained

__all__ = ["AUTO_LOADERS", "AutoLoader"]


class AutoLoader:
    """What ``AutoModelForImageClassification`` (and so ``pipeline``) calls for a ``robustvit_*`` config:
    ``robustvit.from_pretrained``, with every keyword the Auto classes pass.

    The folder may come from ``converted.save_pretrained`` (transformers' format) or ``robustvit.save_pretrained``;
    either way the architecture is rebuilt and converted, and the weights load strictly. Pass ``verify=True`` /
    ``False`` to choose; by default a folder with a ``certificate.json`` is verified, one without loads uncertified
    (with :class:`robustvit.persistence.hub.UncertifiedModelWarning`).
    """

    config_class = RobustViTConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, verify=None, **kwargs) -> nn.Module:
        if model_args:
            raise TypeError(f"robustvit models take no positional model arguments, got {model_args}")
        return from_pretrained(pretrained_model_name_or_path, verify=verify, **kwargs)


AUTO_LOADERS = {
    config_class: AutoLoader
    if config_class is RobustViTConfig
    else type(config_class.__name__.replace("Config", "AutoLoader"), (AutoLoader,), {"config_class": config_class})
    for config_class in CONVERTED_CONFIGS.values()
}
"""Converted config class -> its loader (the Auto classes want one model class per config class)."""

for _config_class, _loader in AUTO_LOADERS.items():
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForImageClassification.register(_config_class, _loader, exist_ok=True)
