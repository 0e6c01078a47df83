"""Find the supported model (and the input scaling in front of it) inside wrappers.

The nullspace functions accept the model as it is trained and evaluated: a bare timm / transformers ViT, one
wrapped by Accelerate (``DistributedDataParallel``, ``torch.compile``...), or a *pixel wrapper* such as
:class:`robustvit.training.PixelModel`. A pixel wrapper is any module that exposes the model it feeds as ``.model``
and the per-channel std it divides pixels by as the buffer ``.input_std``; the nullspace is then taken in the
wrapper's input space (pixels), where noise is added.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn

from robustvit.errors import UnsupportedModuleError
from robustvit.families import Family, get_family
from robustvit.layers import NormalizedConv2d
from robustvit.lipschitz import is_patchify

__all__ = ["PatchMap", "patch_map", "resolve", "supported_model"]


def resolve(model: nn.Module) -> tuple[nn.Module, Tensor | None]:
    """The supported model inside ``model`` and the per-channel std ``(C,)`` pixel wrappers divide inputs by.

    Example:
        >>> from robustvit.training import PixelModel
        >>> inner, std = resolve(PixelModel(vit, mean=(0.5,) * 3, std=(0.25,) * 3))
        >>> inner is vit, std
        (True, tensor([0.2500, 0.2500, 0.2500], dtype=torch.float64))
    """
    scale: Tensor | None = None
    model = extract_model_from_parallel(model)
    while _is_pixel_wrapper(model):
        std = model.input_std.detach().flatten().to(torch.float64)
        scale = std if scale is None else scale * std
        model = extract_model_from_parallel(model.model)
    return model, scale


def _is_pixel_wrapper(model: nn.Module) -> bool:
    inner, std = getattr(model, "model", None), getattr(model, "input_std", None)
    return isinstance(inner, nn.Module) and isinstance(std, Tensor)


def supported_model(model: nn.Module) -> tuple[nn.Module, Family]:
    """The supported model inside ``model`` and its family; :class:`UnsupportedModuleError` if there is none."""
    inner, _ = resolve(model)
    return inner, get_family(inner)


@dataclass
class PatchMap:
    """The linear part of the patch embedding as a matrix acting on one flattened input patch.

    Attributes:
        model: The supported model found inside the one given.
        family: Its family adapter.
        conv: The patchify convolution.
        matrix: ``(D, C * kh * kw)`` float64, in the input space of the model given (pixels for a converted model
            or a pixel wrapper); a flattened patch is ordered ``(channel, row, column)`` like ``conv.weight``.
    """

    model: nn.Module
    family: Family
    conv: nn.Conv2d
    matrix: Tensor

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.conv.kernel_size)

    @property
    def channels(self) -> int:
        return self.conv.in_channels


def patch_map(model: nn.Module) -> PatchMap:
    """The patch-embedding matrix of ``model`` in its input space (see :class:`PatchMap`).

    Raises:
        UnsupportedModuleError: ``model`` is not a supported ViT, or its patch embedding is not a plain patchify
            convolution (overlapping or grouped), whose patches could not be treated independently.
    """
    inner, wrapper_std = resolve(model)
    family = get_family(inner)
    conv = family.patch_projection(inner)
    if not isinstance(conv, nn.Conv2d) or not is_patchify(conv) or conv.groups != 1:
        raise UnsupportedModuleError(
            f"the patch embedding of this {type(inner).__name__} is {conv!r}; the patch nullspace needs a "
            "non-overlapping, ungrouped patchify Conv2d (stride == kernel_size, no padding or dilation)"
        )
    weight = conv.weight.detach().to(torch.float64).reshape(conv.out_channels, -1)
    # Every step between the pixels and the convolution divides channel c by a std: the map is W S^{-1}.
    std = torch.ones(conv.in_channels, dtype=torch.float64, device=weight.device)
    if isinstance(conv, NormalizedConv2d):
        std = std * conv.input_std.detach().flatten().to(std)
    if wrapper_std is not None:
        if wrapper_std.numel() != conv.in_channels:
            raise ValueError(
                f"the pixel wrapper has {wrapper_std.numel()} std values but the model {conv.in_channels} channels"
            )
        std = std * wrapper_std.to(std)
    pixels_per_channel = conv.kernel_size[0] * conv.kernel_size[1]
    return PatchMap(inner, family, conv, weight / std.repeat_interleave(pixels_per_channel))
