"""timm's own format of a converted model: the ``robustvit`` entrypoint that ``timm.create_model`` calls for a folder
written by ``timm.models.save_for_hf`` (or a repository pushed with ``timm.models.push_to_hf_hub``)."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
from huggingface_hub import hf_hub_download
from timm.models import register_model
from torch import nn

from robustvit.conversion.metadata import NATIVE_RECORD_KEY
from robustvit.conversion.timm_metadata import TIMM_FAMILIES
from robustvit.persistence.native_format import NATIVE_FORMATS, NativeFormat
from robustvit.persistence.rebuild import rebuild_converted
from robustvit.persistence.weights import load_strictly

__all__ = ["robustvit"]

for _family in TIMM_FAMILIES:  # save_for_hf writes the state_dict names, no config of its own
    NATIVE_FORMATS.register(_family, NativeFormat())


# The entrypoint's name is the architecture that robustvit.conversion.timm_metadata.TIMM_ARCHITECTURE records.
@register_model
def robustvit(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm entrypoint of a converted model saved with ``timm.models.save_for_hf`` (or pushed with
    ``timm.models.push_to_hf_hub``): ``timm.create_model("local-dir:<folder>", pretrained=True)`` or
    ``"hf-hub:<org/name>"``, once robustvit's loaders are registered (``robustvit.convert``,
    ``robustvit.from_pretrained`` or ``import robustvit.persistence``). Rebuilds the converted architecture from the
    ``robustvit`` model argument and, with ``pretrained=True``, loads ``model.safetensors`` strictly. The converted
    architecture is fixed: arguments that would change it (``num_classes``, ``img_size``...) are refused.
    """
    record = kwargs.pop(NATIVE_RECORD_KEY, None)
    if record is None:
        raise ValueError(
            "timm.create_model('robustvit') needs a saved converted model: timm.create_model('local-dir:<folder>', "
            "pretrained=True) on a folder written by timm.models.save_for_hf, or robustvit.from_pretrained"
        )
    pretrained_cfg = kwargs.pop("pretrained_cfg", None) or {}
    cache_dir = kwargs.pop("cache_dir", None)
    for key in ("pretrained_cfg_overlay", "pretrained_model_args", "device"):
        kwargs.pop(key, None)
    model = rebuild_converted(record)
    actual = {
        "num_classes": model.num_classes,
        "in_chans": model.patch_embed.proj.in_channels,
        "img_size": tuple(model.patch_embed.img_size),
        "global_pool": model.global_pool,
    }
    for key, value in kwargs.items():
        current = actual.get(key)
        wanted = (tuple(value) if not isinstance(value, int) else (value, value)) if key == "img_size" else value
        if current is None or current != wanted:
            raise ValueError(
                f"a converted robustvit model cannot be rebuilt with {key}={value!r} (it has {current!r}): load it "
                "as saved, then fine-tune it"
            )
    if pretrained:
        if pretrained_cfg.get("source") == "local-dir":
            weights = Path(pretrained_cfg["file"]) / "model.safetensors"
            if not weights.is_file():
                raise FileNotFoundError(
                    f"{weights.parent} has no model.safetensors (robustvit never unpickles pytorch_model.bin): save "
                    "with timm.models.save_for_hf(model, folder, safe_serialization=True)"
                )
        elif pretrained_cfg.get("hf_hub_id"):
            weights = hf_hub_download(pretrained_cfg["hf_hub_id"], "model.safetensors", cache_dir=cache_dir)
        else:
            raise ValueError("pretrained=True needs a 'local-dir:' or 'hf-hub:' model name")
        tensors = safetensors.torch.load_file(weights)
        load_strictly(model, tensors, f"{weights} does not hold the weights of this converted model")
    return model
