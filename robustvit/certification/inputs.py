"""The input contract of certification and attacks: float pixel batches in [0, 1], labels of the model's classes."""

from __future__ import annotations

import torch
from torch import nn

from robustvit._utils import check_images, check_pixel_range, unwrap
from robustvit.errors import UnsupportedModuleError
from robustvit.families import get_family

__all__ = ["check_inputs", "num_classes"]


def check_inputs(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    eps: float | None = None,
) -> nn.Module:
    """The input contract of certification and attacks, checked before any work; raises a ``ValueError`` /
    ``TypeError`` that names the fix. Returns ``unwrap(model)``: what a certificate describes (the exact function,
    without Accelerate's autocast wrapper, DDP, PEFT or compile wrappers).

    ``images``: a non-empty float batch ``(B, C, H, W)`` of pixels in [0, 1] (radii are in that pixel space, so
    uint8 or [0, 255] images would give radii 255x too large, and mean/std-normalized ones radii of another space).
    ``labels``: ``B`` integer classes in ``[0, num_classes)`` when the model's number of classes is known.
    ``eps``: finite and ``>= 0``.

    Example:
        >>> check_inputs(model, torch.rand(2, 3, 32, 32), torch.tensor([0, 1]), eps=36 / 255) is model
        True
    """
    if isinstance(images, torch.Tensor) and not (images.is_floating_point() or images.is_complex()):
        raise TypeError(
            f"images have integer dtype {images.dtype}; robustvit takes float pixels in [0, 1]: pass "
            "images.float() / 255"
        )
    check_images(images)
    if images.shape[0] == 0:
        raise ValueError("the batch of images is empty")
    check_pixel_range(images)
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"expected labels as a torch.Tensor, got {type(labels).__name__}")
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},) (one class per image), got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
        count = num_classes(model)
        bad = (labels < 0) | (labels >= count if count is not None else False)
        if bool(bad.any()):
            where = f"[0, {count})" if count is not None else ">= 0"
            raise ValueError(f"labels must be classes in {where}, got {labels[bad][:5].tolist()}")
    if eps is not None:
        values = torch.as_tensor(eps, dtype=torch.float64).flatten()
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return unwrap(model)


def num_classes(model: nn.Module) -> int | None:
    """The model's number of classes when its family (or the library's own attribute) says so."""
    model = unwrap(model)
    try:
        return int(get_family(model).head_weight(model)[0].shape[0])
    except UnsupportedModuleError:
        pass
    config = getattr(model, "config", None)
    count = getattr(model, "num_classes", None) or getattr(config, "num_labels", None)
    return count if isinstance(count, int) and count > 0 else None
