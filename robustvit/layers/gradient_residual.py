"""Residual gradient layers ``x - 2 W^T diag(s) relu(W x + b)``: the common form of SLL and CPL, and its bound."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


class GradientResidual(nn.Module):
    """``x - 2 W^T diag(s) relu(W x + b)`` with the per-row step ``s = row_steps()`` a subclass chooses.

    The engine does not trust the subclass's choice: each subclass's ``lipschitz_bound`` is
    ``residual_gradient_bound(self.weight, self.row_steps())``, the bound of the layer as it is, from the actual ``W``
    and the ``s`` the forward uses. (It is written in each subclass: the bound engine refuses a ``lipschitz_bound``
    inherited by a class that overrides a method, here ``row_steps``.)

    Args:
        dim: channels (last dimension) of the input and output.
        inner_dim: rows of ``W`` (the width of a ViT MLP's hidden layer when it replaces one).
    """

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(inner_dim, dim))
        self.bias = nn.Parameter(torch.zeros(inner_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    def row_steps(self) -> Tensor:
        """The per-row step ``s`` of the forward (shape ``(inner_dim,)``)."""
        raise NotImplementedError(f"{type(self).__name__} must define row_steps()")

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.relu(F.linear(x, self.weight, self.bias)) * self.row_steps()
        return x - 2 * F.linear(hidden, self.weight.T)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, inner_dim={self.weight.shape[0]}"
