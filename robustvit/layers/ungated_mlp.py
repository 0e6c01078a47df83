"""The ungated MLP: what a gated MLP (SwiGLU / GLU) becomes once its product of two branches is taken out."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustvit.lipschitz.engine import BoundFn, bound_tensor


class UngatedMlp(nn.Module):
    """``fc2(norm(act(fc1(x))))``: a plain MLP built from one branch of a gated MLP and its output projection.

    A gated MLP computes ``fc2(norm(act(g(x)) * v(x)))``; the product of two unbounded branches has no global
    Lipschitz bound. This layer keeps one of the two input projections as ``fc1`` (which one:
    ``ConvertConfig.gated_mlp``), the source's activation, its hidden norm and ``fc2``: a composition, bounded by the
    product of its parts' bounds.

    Example:
        >>> mlp = UngatedMlp(nn.Linear(8, 16), nn.SiLU(), nn.Identity(), nn.Linear(16, 8))
        >>> mlp(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(self, fc1: nn.Linear, act: nn.Module, norm: nn.Module, fc2: nn.Linear):
        super().__init__()
        self.fc1, self.act, self.norm, self.fc2 = fc1, act, norm, fc2

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        if bound_of is None:  # called directly: let the engine walk the children
            return bound_tensor(self)
        bound = torch.ones((), dtype=torch.float64)
        for name in ("fc1", "act", "norm", "fc2"):  # forward order
            bound = bound * bound_of(name, getattr(self, name))
        return bound
