"""Convex potential layer (CPL, Meunier et al., ICML 2022): a residual layer that is 1-Lipschitz by construction."""

from __future__ import annotations

import torch
from torch import Tensor

from robustvit.layers.gradient_residual import GradientResidual, residual_gradient_bound
from robustvit.lipschitz.engine import BoundFn
from robustvit.lipschitz.spectral import gram_spectral_norm

CPL_GRAM_STEPS = 6
"""Gram steps of the step size's norm bound: any number gives a guaranteed upper bound of ``||W||`` (so a step
that keeps the layer 1-Lipschitz); more steps give a longer step. Fixed, so train and eval agree."""

# torch.fx records the norm as one call (its Gram steps read the weight's shape in Python); eager, exported and
# torch.func-transformed forwards run it as it is (it has no control flow on values, see gram_spectral_norm).
torch.fx.wrap("gram_spectral_norm")

STEP_SAFETY = 1 + 1e-6
"""The step is ``2 / (STEP_SAFETY ||W||^2)``: the margin absorbs the rounding of the step to the weight's dtype
(at most ``2^-11`` relative in float16 would not be covered: CPL is meant for float32/float64 weights)."""


class CPL(GradientResidual):
    """``x - h W^T relu(W x + b)`` with ``h = 2 / ||W||^2``: one explicit Euler step of a convex potential's gradient
    flow, 1-Lipschitz for any ``W`` (Meunier et al., Prop. 3).

    ``||W||`` is a guaranteed Gram-iteration upper bound (the reference code uses power iteration, which
    converges from below: its step can be too long). The engine recomputes the layer's bound from the actual
    ``W`` and ``h`` (:class:`~robustvit.layers.gradient_residual.GradientResidual`) instead of trusting the step.

    Args:
        dim: channels (last dimension) of the input and output.
        inner_dim: rows of ``W``.

    Example:
        >>> layer = CPL(dim=8, inner_dim=32)
        >>> layer(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
        >>> bool(layer.lipschitz_bound() < 1 + 1e-6)
        True
    """

    def row_steps(self) -> Tensor:
        """``h / 2`` on every row (the form ``x - 2 W^T diag(h / 2) relu(.)``; halving is exact in binary floating
        point), in the weight's dtype; 0 for a zero weight."""
        norm = gram_spectral_norm(self.weight, n_iter=CPL_GRAM_STEPS, rtol=0.0)
        half = torch.where(norm > 0, 1 / (STEP_SAFETY * norm.clamp_min(1e-300) ** 2), torch.zeros_like(norm))
        return half.to(self.weight.dtype).expand(self.weight.shape[0])

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        return residual_gradient_bound(self.weight, self.row_steps())
