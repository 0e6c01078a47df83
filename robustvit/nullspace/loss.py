"""The nullspace-augmented finetuning loss: cross-entropy on clean and on token-noised images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustvit._utils import model_logits
from robustvit.nullspace.token_noise import token_noise

__all__ = ["nullspace_finetuning_loss"]


def nullspace_finetuning_loss(model: nn.Module, images: Tensor, labels: Tensor, noise: Tensor) -> Tensor:
    """``CE(model(x), y) + CE(model(x) with noise on its patch tokens, y)``, the paper's loss (equal weights).

    Clean and noisy copies go through the model as one batch of ``2B`` (the first half with zero noise), so a
    model wrapped in ``DistributedDataParallel`` sees a single forward per backward. ViTs have no batch
    statistics, so this equals two separate forwards.

    Args:
        model: A supported ViT (or a pixel wrapper, possibly prepared by Accelerate) taking ``images``.
        images: Batch ``(B, C, H, W)``.
        labels: Classes ``(B,)``.
        noise: Token noise ``(1, N, D)``, e.g. ``synthesize_noise(...).noise`` (treated as a constant).

    Returns:
        The scalar loss.

    Example:
        >>> from robustvit.nullspace import synthesize_noise
        >>> result = synthesize_noise(model, loader, max_batches=2, progress=False)
        >>> loss = nullspace_finetuning_loss(model, images, labels, result.noise)
        >>> accelerator.backward(loss)
        >>> loss.ndim, all(p.grad is not None for p in model.parameters() if p.requires_grad)
        (0, True)
    """
    batch = images.shape[0]
    noise = noise.detach()
    per_image = torch.cat([torch.zeros_like(noise).expand(batch, -1, -1), noise.expand(batch, -1, -1)])
    with token_noise(model, per_image):
        logits = model_logits(model, torch.cat([images, images]))
    return F.cross_entropy(logits[:batch], labels) + F.cross_entropy(logits[batch:], labels)
