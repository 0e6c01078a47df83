"""Prefix pooling: the class (and distillation / register) tokens take the mean of the patch tokens."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustvit._utils import is_traced
from robustvit.lipschitz.engine import BoundFn


class PrefixPool(nn.Module):
    """Replaces each of the ``num_prefix_tokens`` prefix tokens with the mean of the ``num_patches`` patch tokens.

    The shift mixer leaves prefix tokens alone and the MLPs act per token, so after conversion a class token never
    sees the image. Placed after the last block, this layer makes a head that reads the class token read the
    average-pooled patch tokens instead, as LipShiFT pools. On the whole token tensor the map is
    ``sqrt(1 + k / n)``-Lipschitz (``k`` copies of a ``1/sqrt(n)``-Lipschitz mean); families whose head reads only
    prefix tokens use the tighter ``sqrt(tokens read / n)`` (see the family adapters).

    Example:
        >>> pool = PrefixPool(num_prefix_tokens=1, num_patches=16)
        >>> out = pool(torch.randn(2, 17, 8))
        >>> torch.allclose(out[:, 0], out[:, 1:].mean(dim=1))
        True
    """

    def __init__(self, num_prefix_tokens: int, num_patches: int):
        super().__init__()
        if num_prefix_tokens < 1 or num_patches < 1:
            raise ValueError(f"need prefix tokens and patches, got {num_prefix_tokens} and {num_patches}")
        self.num_prefix_tokens, self.num_patches = num_prefix_tokens, num_patches

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        k = self.num_prefix_tokens
        if not is_traced(x) and x.shape[1] != k + self.num_patches:
            raise ValueError(f"PrefixPool expects {k + self.num_patches} tokens, got {x.shape[1]}")
        patches = x[:, k:].unflatten(1, (self.num_patches,))  # a no-op view that enforces the count when traced
        return torch.cat((patches.mean(dim=1, keepdim=True).expand(-1, k, -1), patches), dim=1)

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        return torch.tensor(math.sqrt(1 + self.num_prefix_tokens / self.num_patches), dtype=torch.float64)

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}, num_patches={self.num_patches}"
