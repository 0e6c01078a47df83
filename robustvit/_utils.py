"""Small helpers shared across robustvit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def model_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits of a timm model (a tensor) or a transformers model (an output with ``.logits``)."""
    out = model(images)
    return out.logits if hasattr(out, "logits") else out


def check_images(images: torch.Tensor, *, channels: int | None = None, size: tuple[int, int] | None = None) -> None:
    """Raise a clear ``ValueError`` for tensors that are not finite image batches ``(B, C, H, W)``."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"expected images shaped (batch, channels, height, width), got shape {tuple(images.shape)}")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"expected {channels} channels, got {images.shape[1]} (shape {tuple(images.shape)})")
    if size is not None and tuple(images.shape[-2:]) != tuple(size):
        raise ValueError(f"expected images of size {tuple(size)}, got {tuple(images.shape[-2:])}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore every submodule's own mode afterwards (mixed modes included)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        # modules() is pre-order, so a parent's recursive train() is overridden by its children's own entries.
        for module, training in modes:
            module.train(training)
