"""SDP-based Lipschitz layer (SLL, Araujo et al., ICLR 2023): a residual layer that is 1-Lipschitz by construction."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustvit.layers.gradient_residual import GradientResidual, residual_gradient_bound
from robustvit.lipschitz.engine import BoundFn


class SLL(GradientResidual):
    """``x - 2 W^T T^-1 relu(W x + b)`` with ``T = diag(t)``, ``t_i = sum_j |W W^T|_ij q_j / q_i``, ``q = exp(log_q)``.

    ``T`` dominates ``W W^T`` (q-weighted Gershgorin / AOL), which is the SLL condition for a 1-Lipschitz layer
    (Araujo et al., Thm 3; their ``W`` is our ``W^T``). ``t_i = 0`` only for a zero row, whose term is dropped.
    The engine does not trust the construction: the bound is recomputed from the actual ``W`` and ``1 / t``
    (:class:`~robustvit.layers.gradient_residual.GradientResidual`).

    Args:
        dim: channels (last dimension) of the input and output.
        inner_dim: rows of ``W`` (the width of a ViT MLP's hidden layer when it replaces one).

    Example:
        >>> layer = SLL(dim=8, inner_dim=32)
        >>> layer(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
        >>> bool(layer.lipschitz_bound() < 1 + 1e-6)
        True
    """

    def __init__(self, dim: int, inner_dim: int):
        super().__init__(dim, inner_dim)
        self.log_q = nn.Parameter(torch.zeros(inner_dim))

    def row_steps(self) -> Tensor:
        """``1 / t``, the per-row step of the forward (0 for a zero row)."""
        gram = (self.weight @ self.weight.T).abs()
        t = (gram * torch.exp(self.log_q[None, :] - self.log_q[:, None])).sum(dim=1)
        return _reciprocal_or_zero(t)

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        return residual_gradient_bound(self.weight, self.row_steps())


def _reciprocal_or_zero(t: Tensor) -> Tensor:
    """``1 / t`` where ``t > 0``, else 0 (and a finite gradient there)."""
    return torch.where(t > 0, 1 / t.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(t))


torch.fx.wrap("_reciprocal_or_zero")  # torch.fx: one call (torch.finfo needs the dtype, which a Proxy does not hold)
