"""Weighted residual connection (LipsFormer): ``x + alpha * fn(x)`` with a learnable per-channel ``alpha``, and the
budget that caps a stack of them (:func:`fit_residual_budget`)."""

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


def residual_stack_bound(model: nn.Module) -> float:
    """The product of the bounds of ``model``'s :class:`LipResidual` blocks (1 without any)."""
    return float(_residual_bounds(_residuals(model)).prod())


@torch.no_grad()
def fit_residual_budget(model: nn.Module, budget: float) -> None:
    """Shrink every residual weight by one common factor ``c`` so that ``prod_r (1 + c * t_r) <= budget``, where
    ``t_r = max|alpha_r| * bound(branch_r)`` (each residual's bound is ``1 + t_r``); a stack within it is left as is.

    Example:
        >>> stack = nn.Sequential(*(LipResidual(nn.Identity(), dim=4, alpha_init=1.0) for _ in range(3)))
        >>> fit_residual_budget(stack, 4.0)  # from 2 ** 3 = 8
        >>> round(residual_stack_bound(stack), 3)
        4.0
    """
    residuals = _residuals(model)
    terms = _residual_bounds(residuals) - 1
    if float((1 + terms).prod()) <= budget:
        return
    target = budget * (1 - 1e-5)  # room for the float32 rounding of the scaled alphas
    low, high = 0.0, 1.0
    for _ in range(60):  # bisection on a product that grows with c
        mid = (low + high) / 2
        low, high = (mid, high) if float((1 + mid * terms).prod()) <= target else (low, mid)
    for residual in residuals:
        residual.alpha.mul_(low)


def _residuals(model: nn.Module) -> list[LipResidual]:
    return [m for m in model.modules() if isinstance(m, LipResidual)]


def _residual_bounds(residuals: list[LipResidual]) -> Tensor:
    """Each residual block's bound, as one float64 tensor (empty without any)."""
    if not residuals:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([residual.lipschitz_bound().detach() for residual in residuals])
