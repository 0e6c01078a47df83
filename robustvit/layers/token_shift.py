"""Token shift (ShiftViT): a parameter-free, 1-Lipschitz token mixer that replaces attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustvit._utils import is_traced
from robustvit.lipschitz.engine import BoundFn


class TokenShift(nn.Module):
    """Shifts four groups of ``C // n_div`` channels of the patch tokens by one position left, right, up and down.

    Tokens shaped ``(B, N, C)`` hold ``num_prefix_tokens`` prefix tokens (class, distillation, registers), which
    pass unchanged, followed by ``grid_size[0] * grid_size[1]`` patch tokens in row-major order. Vacated positions
    are filled with zeros, as in ShiftViT (Wang et al., AAAI 2022). Each output coordinate copies at most one
    input coordinate and no input coordinate is copied twice, so the map is 1-Lipschitz.

    Example:
        >>> shift = TokenShift((4, 4), n_div=12, num_prefix_tokens=1)
        >>> shift(torch.randn(2, 17, 48)).shape
        torch.Size([2, 17, 48])
    """

    def __init__(self, grid_size: tuple[int, int], n_div: int = 12, num_prefix_tokens: int = 1):
        super().__init__()
        if n_div < 4:
            raise ValueError(f"n_div must be at least 4 (four shifted groups), got {n_div}")
        self.grid_size = tuple(grid_size)
        self.n_div = n_div
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: Tensor) -> Tensor:
        height, width = self.grid_size
        k = self.num_prefix_tokens
        if not is_traced(x) and x.shape[1] != k + height * width:  # traced: unflatten below enforces the count
            raise ValueError(
                f"TokenShift expects {k} prefix tokens + a {height}x{width} grid = {k + height * width} tokens, "
                f"got {x.shape[1]}"
            )
        prefix, grid = x[:, :k], x[:, k:].unflatten(1, (height, width))
        g = x.shape[-1] // self.n_div
        # F.pad pads from the last dim: (C_left, C_right, W_left, W_right, H_top, H_bottom).
        left = F.pad(grid[:, :, 1:, 0:g], (0, 0, 0, 1))
        right = F.pad(grid[:, :, :-1, g : 2 * g], (0, 0, 1, 0))
        up = F.pad(grid[:, 1:, :, 2 * g : 3 * g], (0, 0, 0, 0, 0, 1))
        down = F.pad(grid[:, :-1, :, 3 * g : 4 * g], (0, 0, 0, 0, 1, 0))
        shifted = torch.cat((left, right, up, down, grid[..., 4 * g :]), dim=-1)
        return torch.cat((prefix, shifted.flatten(1, 2)), dim=1)

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        return torch.ones((), dtype=torch.float64)

    def extra_repr(self) -> str:
        return f"grid_size={self.grid_size}, n_div={self.n_div}, num_prefix_tokens={self.num_prefix_tokens}"
