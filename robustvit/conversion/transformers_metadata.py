"""transformers' metadata of a converted model: its config becomes a converted twin (a ``robustvit_*`` model type)
that records how to rebuild it and saves the image processor of the converted model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    BeitConfig,
    BeitForImageClassification,
    CLIPConfig,
    CLIPForImageClassification,
    DeiTConfig,
    DeiTForImageClassification,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    SiglipConfig,
    SiglipForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTMSNConfig,
    ViTMSNForImageClassification,
)

from robustvit.conversion.metadata import LIBRARY_METADATA, NATIVE_RECORD_KEY, native_record
from robustvit.families import FAMILIES, get_family

__all__ = [
    "CONVERTED_CONFIGS",
    "REMOTE_CODE",
    "REMOTE_CODE_FILE",
    "RobustBeitConfig",
    "RobustCLIPConfig",
    "RobustDeiTConfig",
    "RobustDinov2Config",
    "RobustDinov2WithRegistersConfig",
    "RobustSiglipConfig",
    "RobustTimmWrapperConfig",
    "RobustViTConfig",
    "RobustViTMSNConfig",
    "describe",
    "processor_for",
    "write_remote_code",
]


INPUT_KEY = "input"
"""Key of the rebuild record (``config.robustvit``) that holds the converted model's input channels and size."""

REMOTE_CODE_FILE = "robustvit_loader.py"
REMOTE_CODE = '''"""This folder holds a robustvit-converted model: `pip install robustvit`, then load it with
`robustvit.from_pretrained(folder)`, or with transformers' Auto classes and `pipeline` after
`import robustvit.persistence`.

transformers runs this file only when asked to (`trust_remote_code=True`): it imports robustvit, which registers the
converted model types with the Auto classes, and hands the config back to them.
"""

import robustvit.persistence  # noqa: F401  (registers the robustvit_* model types with the Auto classes)
from transformers import AutoConfig


class RobustViTConfigLoader:
    """What transformers' ``auto_map["AutoConfig"]`` names: the registered robustvit config, through AutoConfig."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        """Nothing to register: ``import robustvit`` registered the config classes."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        return AutoConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
'''
"""The loader a converted folder carries for transformers without robustvit imported. transformers gives custom
model types one way to explain themselves: ``auto_map`` plus code in the folder, which it refuses to run unless
``trust_remote_code=True`` and refuses to import without robustvit installed; both errors say what to do."""
REMOTE_CODE_AUTO_MAP = {"AutoConfig": f"{REMOTE_CODE_FILE.removesuffix('.py')}.RobustViTConfigLoader"}


# A dataclass of its own field only: a PreTrainedConfig base would carry PreTrainedConfig's fields over the family
# config's (dataclasses merge the bases' fields in reverse MRO order). repr and eq stay PreTrainedConfig's.
@dataclass(repr=False, eq=False, kw_only=True)
class _ConvertedConfig:
    """What the configs of converted models add to their family's config (listed first in their bases): the
    ``robustvit`` record (the family, source architecture and :class:`~robustvit.ConvertConfig`), the loader and
    the image processor they save."""

    robustvit: dict | None = None

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)
        processor_for(self).save_pretrained(save_directory)

    def converted_input(self) -> tuple[int, tuple[int, int]]:
        """``(channels, (height, width))`` of the images the converted model takes, as :func:`describe` recorded
        them (a timm model in a ``TimmWrapperConfig`` has no image size in the config)."""
        recorded = self.robustvit[INPUT_KEY]
        return recorded["channels"], tuple(recorded["image_size"])


def write_remote_code(directory: str | Path) -> None:
    """Write :data:`REMOTE_CODE` into a converted model's folder (its config's ``auto_map`` names it)."""
    (Path(directory) / REMOTE_CODE_FILE).write_text(REMOTE_CODE)


@strict
class RobustViTConfig(_ConvertedConfig, ViTConfig):
    """``ViTConfig`` of a robustvit-converted ``ViTForImageClassification`` (``model_type="robustvit_vit"``).

    ``robustvit`` holds the family, source architecture and :class:`~robustvit.ConvertConfig`; saving also writes
    the image processor of the converted model (no normalization: it happens inside the model).
    """

    model_type = "robustvit_vit"


@strict
class RobustDeiTConfig(_ConvertedConfig, DeiTConfig):
    """``DeiTConfig`` of a robustvit-converted ``DeiTForImageClassification`` (``model_type="robustvit_deit"``);
    see :class:`RobustViTConfig`."""

    model_type = "robustvit_deit"


@strict
class RobustViTMSNConfig(_ConvertedConfig, ViTMSNConfig):
    """``ViTMSNConfig`` of a converted ``ViTMSNForImageClassification`` (``model_type="robustvit_vit_msn"``)."""

    model_type = "robustvit_vit_msn"


@strict
class RobustDinov2Config(_ConvertedConfig, Dinov2Config):
    """``Dinov2Config`` of a converted ``Dinov2ForImageClassification`` (``model_type="robustvit_dinov2"``)."""

    model_type = "robustvit_dinov2"


@strict
class RobustDinov2WithRegistersConfig(_ConvertedConfig, Dinov2WithRegistersConfig):
    """``Dinov2WithRegistersConfig`` of a converted ``Dinov2WithRegistersForImageClassification``
    (``model_type="robustvit_dinov2_with_registers"``)."""

    model_type = "robustvit_dinov2_with_registers"


@strict
class RobustBeitConfig(_ConvertedConfig, BeitConfig):
    """``BeitConfig`` of a converted ``BeitForImageClassification`` (``model_type="robustvit_beit"``)."""

    model_type = "robustvit_beit"


@strict
class RobustCLIPConfig(_ConvertedConfig, CLIPConfig):
    """``CLIPConfig`` of a converted ``CLIPForImageClassification`` (``model_type="robustvit_clip"``)."""

    model_type = "robustvit_clip"


@strict
class RobustSiglipConfig(_ConvertedConfig, SiglipConfig):
    """``SiglipConfig`` of a converted ``SiglipForImageClassification`` (``model_type="robustvit_siglip"``)."""

    model_type = "robustvit_siglip"


@strict
class RobustTimmWrapperConfig(_ConvertedConfig, TimmWrapperConfig):
    """``TimmWrapperConfig`` of a converted ``TimmWrapperForImageClassification``
    (``model_type="robustvit_timm_wrapper"``)."""

    model_type = "robustvit_timm_wrapper"


CONVERTED_CONFIGS = {
    ViTForImageClassification: RobustViTConfig,
    DeiTForImageClassification: RobustDeiTConfig,
    ViTMSNForImageClassification: RobustViTMSNConfig,
    Dinov2ForImageClassification: RobustDinov2Config,
    Dinov2WithRegistersForImageClassification: RobustDinov2WithRegistersConfig,
    BeitForImageClassification: RobustBeitConfig,
    CLIPForImageClassification: RobustCLIPConfig,
    SiglipForImageClassification: RobustSiglipConfig,
    TimmWrapperForImageClassification: RobustTimmWrapperConfig,
}
"""Source model class -> the config class of its converted models."""


def processor_for(config):
    """A ``ViTImageProcessor`` that resizes to the model's size and rescales to [0, 1], without normalizing: the
    converted model normalizes inside."""
    from transformers import ViTImageProcessor  # late, for startup time: the image-processing stack is slow to import

    channels, (height, width) = config.converted_input()
    return ViTImageProcessor(
        size={"height": height, "width": width},
        do_normalize=False,
        image_mean=[0.0] * channels,
        image_std=[1.0] * channels,
    )


def describe(model: nn.Module) -> None:
    """Swap ``model.config`` for its converted twin (a registered ``robustvit_*`` model type).

    ``save_pretrained`` then writes a ``config.json`` whose ``model_type`` says the model was converted and whose
    ``robustvit`` record says how to rebuild it, the loader its ``auto_map`` names (:data:`REMOTE_CODE`), and an
    image processor that does not normalize (the model does).
    ``AutoModelForImageClassification`` loads it back once robustvit's loaders are registered
    (:mod:`robustvit.persistence.transformers_native`); without them, transformers refuses to run the folder's loader
    unless ``trust_remote_code=True``, and to import it without robustvit installed.
    """
    convert_config = model.robustvit_config
    values = model.config.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        values.pop(key, None)
    spec = get_family(model).input_spec(model)
    recorded_input = {"channels": spec.channels, "image_size": list(spec.image_size)}
    values[NATIVE_RECORD_KEY] = {**native_record(model), INPUT_KEY: recorded_input}
    values["auto_map"] = dict(REMOTE_CODE_AUTO_MAP)
    if convert_config.activation != "gelu":  # the vision encoder's, nested in a composite config
        (values.get("vision_config") or values)["hidden_act"] = convert_config.activation
    config = CONVERTED_CONFIGS[type(model)].from_dict(values)  # as from config.json (TimmWrapper's labels)
    config._attn_implementation = model.config._attn_implementation
    old = model.config
    for module in model.modules():  # the backbone shares the config object with the classifier model
        if getattr(module, "config", None) is old:
            module.config = config


for _name, _family in FAMILIES.items():
    if _family.library == "transformers":
        LIBRARY_METADATA.register(_name, describe)
