"""Model building for the recipes: a registry of model sources, :func:`load_model`, pixel inputs, drop-path.

robustvit evaluates, attacks and corrupts images as pixels in ``[0, 1]``, with any normalization inside the model.
:func:`load_model` builds a timm or transformers classifier and :class:`PixelModel` makes it take pixels.

Example:
    >>> model, description = load_model(None, num_classes=10, image_size=32, channels=3)
    >>> net = PixelModel(model)
    >>> net(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from timm.layers import DropPath
from torch import Tensor, nn
from transformers import AutoModelForImageClassification, PreTrainedModel

from robustvit.families import FAMILIES, get_family
from robustvit.layers import NormalizedConv2d
from robustvit.registry import Registry

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_SOURCES",
    "ModelSource",
    "PixelModel",
    "load_model",
    "save_model_folder",
    "set_drop_path",
]

DEFAULT_MODEL: dict[str, Any] = {
    "model_name": "vit_tiny_patch16_224",
    # 3 * 8 * 8 = 192 inputs per patch > 64 dimensions: a 128-dimensional exact patch nullspace. 0.21M parameters;
    # ~95% test accuracy on digits after 20 epochs (about 20 s on one CPU core).
    "kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4},
}
"""The embedded default: a small timm ViT whose exact patch-embedding nullspace is non-trivial."""


@dataclass(frozen=True)
class ModelSource:
    """A way of building models: ``load(spec, num_classes, image_size, channels)`` for the specs it ``matches``."""

    matches: Callable[[str | None], bool]
    load: Callable[[str | None, int, int, int], tuple[nn.Module, dict[str, Any]]]


MODEL_SOURCES: Registry[ModelSource] = Registry("model source")
"""Model sources by name; :func:`load_model` uses the first registered one whose ``matches(spec)`` holds."""


def _model_source(name: str, matches: Callable[[str | None], bool]) -> Callable:
    """Decorator registering ``load`` as the model source ``name`` for the specs ``matches`` accepts."""

    def decorator(load: Callable) -> Callable:
        MODEL_SOURCES.register(name, ModelSource(matches, load))
        return load

    return decorator


def _timm_weights_cached(model_name: str) -> bool:
    """Whether timm's pretrained safetensors weights for ``model_name`` are in the local Hugging Face cache."""
    hub_id = timm.models.get_pretrained_cfg(model_name).hf_hub_id
    return bool(hub_id) and isinstance(try_to_load_from_cache(hub_id, "model.safetensors"), str)


def _create_timm(model_name: str, kwargs: dict[str, Any], pretrained: bool) -> tuple[nn.Module, dict[str, Any]]:
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    return model, {"library": "timm", "model_name": model_name, "pretrained": pretrained, "kwargs": kwargs}


@_model_source("default", lambda spec: spec is None)
def _load_default(spec: None, num_classes: int, image_size: int, channels: int) -> tuple[nn.Module, dict[str, Any]]:
    kwargs = {**DEFAULT_MODEL["kwargs"], "img_size": image_size, "in_chans": channels, "num_classes": num_classes}
    return _create_timm(DEFAULT_MODEL["model_name"], kwargs, pretrained=False)


@_model_source("timm", lambda spec: timm.is_model(spec))
def _load_timm(spec: str, num_classes: int, image_size: int, channels: int) -> tuple[nn.Module, dict[str, Any]]:
    pretrained = _timm_weights_cached(spec)
    if not pretrained:
        warnings.warn(
            f"pretrained weights for timm model {spec!r} are not in the local cache (offline); "
            "using a random initialization",
            stacklevel=3,
        )
    kwargs = {"img_size": image_size, "in_chans": channels, "num_classes": num_classes}
    return _create_timm(spec, kwargs, pretrained=pretrained)


def _is_timm_folder(spec: str | None) -> bool:
    """A folder written by ``timm.models.save_for_hf``: its config.json names a timm ``architecture``."""
    config = os.path.join(spec, "config.json") if isinstance(spec, str) else ""
    if not os.path.isfile(config):
        return False
    with open(config) as file:
        return "architecture" in json.load(file)


@_model_source("timm folder", _is_timm_folder)
def _load_timm_folder(spec: str, num_classes: int, image_size: int, channels: int) -> tuple[nn.Module, dict]:
    # timm rebuilds the saved architecture from the folder's model_args and loads its weights; a head of another
    # size is new (timm drops the saved classifier), the position embedding is resampled to image_size.
    kwargs = {"img_size": image_size, "in_chans": channels, "num_classes": num_classes}
    model = timm.create_model(f"local-dir:{spec}", pretrained=True, **kwargs)
    return model, {"library": "timm", "model_name": f"local-dir:{spec}", "pretrained": True, "kwargs": kwargs}


@_model_source("transformers", lambda spec: True)
def _load_transformers(spec: str, num_classes: int, image_size: int, channels: int) -> tuple[nn.Module, dict]:
    if os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "config.json")):
        raise ValueError(f"directory {spec!r} has no config.json, so it is not a transformers model directory")
    try:
        model = AutoModelForImageClassification.from_pretrained(
            spec, num_labels=num_classes, ignore_mismatched_sizes=True
        )
    except OSError as err:
        raise ValueError(
            f"{spec!r} is not a timm model name, and loading it as a transformers model (a local directory or a "
            f"Hugging Face id, cached when offline) failed: {err}"
        ) from err
    size, model_channels = model.config.image_size, model.config.num_channels
    size = size if isinstance(size, int) else tuple(size)
    if size not in (image_size, (image_size, image_size)) or model_channels != channels:
        raise ValueError(
            f"{spec!r} takes {model_channels}-channel images of size {size}, but {channels}-channel images of size "
            f"{image_size} were asked for; pass the model's own image size and channels"
        )
    config = model.config.to_dict()
    return model, {"library": "transformers", "name_or_path": spec, "class": type(model).__name__, "config": config}


def load_model(
    spec: str | None, *, num_classes: int, image_size: int, channels: int
) -> tuple[nn.Module, dict[str, Any]]:
    """Build an image classifier from a name, with a JSON-ready description of what was built.

    Args:
        spec: ``None`` for the embedded default (:data:`DEFAULT_MODEL`, a small timm ViT with random weights); a
            timm model name (its pretrained weights are used when ``model.safetensors`` is in the local Hugging
            Face cache, otherwise a warning is issued and the weights are random); a timm folder (written by
            :func:`save_model_folder` or ``timm.models.save_for_hf``: ``local-dir:<folder>``); anything else is
            loaded with transformers ``AutoModelForImageClassification`` (a local directory with a ``config.json``, or a
            Hugging Face id that must be cached when offline), with a new head of ``num_classes`` outputs.
        num_classes: Number of classes of the head.
        image_size: Side of the input images (timm models are built for it; transformers models must match it).
        channels: Image channels.

    Returns:
        ``(model, description)``; the model takes *normalized* images (wrap it in :class:`PixelModel` to feed
        pixels), the description records the source (``library``, name, arguments, ``pretrained``) and the input
        normalization (``input``).

    Raises:
        ValueError: ``spec`` cannot be loaded, or a transformers model's input size or channels do not match.

    Example:
        >>> model, description = load_model("vit_small_patch16_224", num_classes=10, image_size=224, channels=3)
        >>> description["library"], description["pretrained"]
        ('timm', False)
    """
    for name, value in (("num_classes", num_classes), ("image_size", image_size), ("channels", channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    source = next(source for _, source in MODEL_SOURCES.items() if source.matches(spec))
    model, description = source.load(spec, num_classes, image_size, channels)
    input_spec = get_family(model).input_spec(model)
    description["input"] = {
        "channels": channels,
        "image_size": image_size,
        "mean": list(input_spec.mean),
        "std": list(input_spec.std),
    }
    description["num_classes"] = num_classes
    return model, description


def save_model_folder(model: nn.Module, folder: str | os.PathLike) -> None:
    """Save a (plain, unconverted) timm or transformers classifier as the folder its own library loads, in
    safetensors: ``save_pretrained`` for transformers, ``timm.models.save_for_hf`` for timm. :func:`load_model`
    loads it back (``--model <folder>``)."""
    library = next((family.library for _, family in FAMILIES.items() if family.matches(model)), None)
    if isinstance(model, PreTrainedModel):
        model.save_pretrained(folder)
    elif library == "timm":  # every timm family robustvit converts (VisionTransformer, Eva, Beit)
        timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    else:
        raise TypeError(
            f"save_model_folder saves the timm and transformers models robustvit converts, not {type(model).__name__}"
        )


class PixelModel(nn.Module):
    """Feeds pixels in ``[0, 1]`` to a timm or transformers classifier and returns its logits tensor.

    The pixels are normalized with the family's mean and std (timm's ``pretrained_cfg``, or the transformers
    image processor's defaults), so attacks, corruptions and nullspace noise all work in pixel space. A converted
    model (whose patch projection is a :class:`~robustvit.layers.NormalizedConv2d`) already takes pixels: its
    wrapper normalizes with mean 0 and std 1.

    The wrapped model is ``.model`` and the std is the buffer ``.input_std``: the nullspace functions
    (:mod:`robustvit.nullspace`) look through this wrapper and take the nullspace in pixel space. Save
    ``.model``'s weights to get a checkpoint that loads into the plain timm / transformers model.

    Args:
        model: A supported timm or transformers ViT/DeiT.
        mean, std: Override the family's normalization (one value per channel).

    Example:
        >>> net = PixelModel(timm.create_model("vit_tiny_patch16_224", num_classes=10))
        >>> net(torch.rand(1, 3, 224, 224)).shape
        torch.Size([1, 10])
    """

    def __init__(
        self, model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        family = get_family(model)
        spec = family.input_spec(model)
        if isinstance(family.patch_projection(model), NormalizedConv2d):
            spec_mean, spec_std = (0.0,) * spec.channels, (1.0,) * spec.channels
        else:
            spec_mean, spec_std = spec.mean, spec.std
        mean_t = torch.as_tensor(spec_mean if mean is None else mean, dtype=torch.float32)
        std_t = torch.as_tensor(spec_std if std is None else std, dtype=torch.float32)
        if mean_t.shape != (spec.channels,) or std_t.shape != (spec.channels,) or not bool((std_t > 0).all()):
            raise ValueError(f"need {spec.channels} mean values and {spec.channels} positive std values")
        device = next(model.parameters()).device
        self.model = model
        self._family = family
        self.register_buffer("input_mean", mean_t.view(-1, 1, 1).to(device))
        self.register_buffer("input_std", std_t.view(-1, 1, 1).to(device))

    def forward(self, pixels: Tensor) -> Tensor:
        return self._family.logits(self.model((pixels - self.input_mean) / self.input_std))

    def extra_repr(self) -> str:
        return f"mean={self.input_mean.flatten().tolist()}, std={self.input_std.flatten().tolist()}"


def set_drop_path(model: nn.Module, rate: float) -> nn.Module:
    """Give a timm ViT stochastic depth after construction, as ``create_model(..., drop_path_rate=rate)`` does.

    Block ``i`` of ``n`` drops its residual branches with probability ``rate * i / (n - 1)`` (timm's linear rule).
    Drop-path is the identity in eval mode, so certificates and evaluations are unaffected.

    Raises:
        ValueError: ``rate`` outside ``[0, 1)``, or a model without timm's ``blocks[i].drop_path1/2`` (e.g. a
            transformers ViT, which has no drop-path).

    Example:
        >>> model = set_drop_path(timm.create_model("vit_small_patch16_224"), 0.25)
    """
    if not 0 <= rate < 1:
        raise ValueError(f"drop-path rate must be in [0, 1), got {rate!r}")
    blocks = list(getattr(model, "blocks", []))
    if not blocks or not all(hasattr(block, "drop_path1") and hasattr(block, "drop_path2") for block in blocks):
        raise ValueError(
            f"drop-path needs a timm ViT with blocks[i].drop_path1/drop_path2; {type(model).__name__} has none"
        )
    for index, block in enumerate(blocks):
        block_rate = rate * index / max(1, len(blocks) - 1)
        for name in ("drop_path1", "drop_path2"):
            setattr(block, name, DropPath(block_rate) if block_rate > 0 else nn.Identity())
    return model
