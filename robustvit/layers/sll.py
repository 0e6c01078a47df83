"""SDP-based Lipschitz layer (SLL, Araujo et al., ICLR 2023): a residual layer that is 1-Lipschitz by construction."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustvit.lipschitz.engine import BoundFn
from robustvit.lipschitz.spectral import gram_spectral_norm


def residual_gradient_bound(weight: Tensor, step: Tensor) -> Tensor:
    """Guaranteed l2 Lipschitz bound of ``x -> x - 2 W^T diag(step) relu(W x + b)`` for any bias ``b``.

    The Jacobian is ``I - 2 A^T L A`` with ``A = diag(step)^(1/2) W`` and ``L`` diagonal with entries in [0, 1]
    (the slopes of ReLU), a symmetric matrix with eigenvalues in ``[1 - 2 ||A||^2, 1]``: its norm is at most
    ``max(1, 2 ||A||^2 - 1)``. ``||A||`` is a guaranteed Gram bound of ``A`` formed in float64; the entries of
    ``A`` carry at most 4 float64 roundings (reciprocal, square root, product), hence the factor
    ``1 + 4 u sqrt(rank)``. All Gram steps run (no early stop): Schatten norms decrease with their order, so this
    bound is never above a cheaper one a layer used to choose its step. SLL and CPL choose ``step`` so that
    ``||A|| <= 1``: the bound is then 1.
    """
    rank = min(weight.shape)
    a = step.to(torch.float64).clamp_min(0).sqrt()[:, None] * weight.to(torch.float64)
    norm = gram_spectral_norm(a, rtol=0.0) * (1 + 4 * 2.0**-53 * math.sqrt(rank))
    return torch.clamp_min(2 * norm**2 - 1, 1.0)


class SLL(nn.Module):
    """``x - 2 W^T T^-1 relu(W x + b)`` with ``T = diag(t)``, ``t_i = sum_j |W W^T|_ij q_j / q_i``, ``q = exp(log_q)``.

    ``T`` dominates ``W W^T`` (q-weighted Gershgorin / AOL), which is the SLL condition for a 1-Lipschitz layer
    (Araujo et al., Thm 3; their ``W`` is our ``W^T``). ``t_i = 0`` only for a zero row, whose term is dropped.
    The engine does not trust the construction: :meth:`lipschitz_bound` recomputes the bound of the layer as it
    is, from the actual ``W`` and the ``1 / t`` the forward uses (see :func:`residual_gradient_bound`).

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
        super().__init__()
        self.weight = nn.Parameter(torch.empty(inner_dim, dim))
        self.bias = nn.Parameter(torch.zeros(inner_dim))
        self.log_q = nn.Parameter(torch.zeros(inner_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    def step(self) -> Tensor:
        """``1 / t``, the per-row step of the forward (0 for a zero row)."""
        gram = (self.weight @ self.weight.T).abs()
        t = (gram * torch.exp(self.log_q[None, :] - self.log_q[:, None])).sum(dim=1)
        return torch.where(t > 0, 1 / t.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(t))

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.relu(F.linear(x, self.weight, self.bias)) * self.step()
        return x - 2 * F.linear(hidden, self.weight.T)

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        return residual_gradient_bound(self.weight, self.step())

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, inner_dim={self.weight.shape[0]}"
