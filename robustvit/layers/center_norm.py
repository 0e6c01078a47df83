"""CenterNorm (LipsFormer): LayerNorm without the division by the standard deviation, hence globally Lipschitz."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustvit.lipschitz.engine import BoundFn


class CenterNorm(nn.Module):
    """``gamma * D/(D-1) * (x - mean(x)) + beta`` over the last dimension (Qi et al., LipsFormer, 2023).

    The map is affine with Jacobian ``D/(D-1) * diag(gamma) (I - 11^T/D)``; the centering is an orthogonal
    projection, so the l2 Lipschitz constant is at most ``D/(D-1) * max|gamma|``.

    Example:
        >>> norm = CenterNorm(192)
        >>> norm(torch.randn(2, 65, 192)).shape
        torch.Size([2, 65, 192])
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim < 2:
            raise ValueError(f"CenterNorm needs at least 2 channels, got {dim}")
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.dim / (self.dim - 1)
        return (x - x.mean(dim=-1, keepdim=True)) * (self.weight * scale) + self.bias

    def channel_gain(self) -> Tensor:
        """The per-channel factor of the map's linear part, centering aside (what an SLL / CPL layer folds into its
        weight)."""
        return self.weight * (self.dim / (self.dim - 1))

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        return self.dim / (self.dim - 1) * self.weight.abs().max().to(torch.float64)

    def extra_repr(self) -> str:
        return f"{self.dim}"
