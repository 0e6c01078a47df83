"""MinMax (GroupSort with groups of 2): a 1-Lipschitz, gradient-norm-preserving activation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustvit._utils import is_traced
from robustvit.lipschitz.engine import BoundFn


class MinMax(nn.Module):
    """Sorts each consecutive channel pair ``(x[2i], x[2i+1])`` of the last dimension into ``(min, max)``.

    Every output is a permutation of its input pair, so the map is 1-Lipschitz in l2 (Anil et al. 2019).

    Example:
        >>> MinMax()(torch.tensor([3.0, 1.0, -1.0, 2.0]))
        tensor([ 1.,  3., -1.,  2.])
    """

    def forward(self, x: Tensor) -> Tensor:
        if not is_traced(x) and x.shape[-1] % 2:  # traced (torch.fx): the unflatten below refuses an odd count
            raise ValueError(f"MinMax needs an even number of channels, got {x.shape[-1]}")
        pairs = x.unflatten(-1, (-1, 2))
        low, high = pairs.amin(dim=-1), pairs.amax(dim=-1)
        return torch.stack((low, high), dim=-1).flatten(-2)

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        return torch.ones((), dtype=torch.float64)
