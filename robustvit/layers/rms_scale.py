"""RmsScale: an RMSNorm with the per-token RMS frozen to a constant, hence globally Lipschitz."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustvit.lipschitz.engine import BoundFn


class RmsScale(nn.Module):
    """``weight * x + bias`` over the last dimension: the sound substitute of ``gamma * x / rms(x)`` (RMSNorm).

    RMSNorm has no mean to subtract, so CenterNorm's form (LayerNorm without the division, whose centering is an
    orthogonal projection) does not apply as it is: without the division by the per-token RMS, which has no global
    bound near zero, what is left is the diagonal map ``gamma / r``, ``r`` the RMS calibrated on images (1 without
    them). It changes the function only by that division, not by a centering RMSNorm never did. The bias starts at
    zero (RMSNorm has none) and lets the conversion move the next layer's scale exactly, as into a CenterNorm. The
    Jacobian is ``diag(weight)``: the l2 Lipschitz constant is ``max|weight|``.

    Example:
        >>> norm = RmsScale(192)
        >>> norm(torch.randn(2, 65, 192)).shape
        torch.Size([2, 65, 192])
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight + self.bias

    def channel_gain(self) -> Tensor:
        """The per-channel factor of the map's linear part (what an SLL / CPL layer folds into its weight)."""
        return self.weight

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        return self.weight.abs().max().to(torch.float64)

    def extra_repr(self) -> str:
        return f"{self.dim}"
