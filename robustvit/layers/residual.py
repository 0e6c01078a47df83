"""Weighted residual connection (LipsFormer): ``x + alpha * fn(x)`` with a learnable per-channel ``alpha``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustvit.lipschitz.engine import BoundFn, bound_tensor


class LipResidual(nn.Module):
    """``x + alpha * fn(x)``; Lipschitz bound ``1 + max|alpha| * bound(fn)`` by the triangle inequality.

    Args:
        fn: the residual branch.
        dim: number of channels (last dimension).
        alpha_init: initial value of ``alpha``, a float or a tensor of shape ``(dim,)``.

    Example:
        >>> block = LipResidual(nn.Linear(8, 8), dim=8, alpha_init=0.1)
        >>> block(torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(self, fn: nn.Module, dim: int, alpha_init: float | Tensor = 1.0):
        super().__init__()
        self.fn = fn
        alpha = torch.as_tensor(alpha_init, dtype=torch.float32).clone()
        self.alpha = nn.Parameter(alpha.expand(dim).clone() if alpha.dim() == 0 else alpha)
        if self.alpha.shape != (dim,):
            raise ValueError(f"alpha_init must be a scalar or have shape ({dim},), got {tuple(self.alpha.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        return x + self.alpha * self.fn(x)

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        if bound_of is None:  # called directly: let the engine walk the branch
            return bound_tensor(self)
        return 1 + self.alpha.abs().max().to(torch.float64) * bound_of("fn", self.fn)
