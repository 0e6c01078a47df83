"""LiResNet's linear residual convolution on a token grid: ``x + a * conv3x3(x)``, bounded as one merged convolution."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustvit.lipschitz.engine import BoundFn
from robustvit.lipschitz.spectral import conv_operator_bound

TRAINING_GRAM_STEPS = 6  # Gram steps of the bound inside training losses


class LiResConv(nn.Module):
    """``x + a ⊙ conv(x)`` on patch tokens ``(B, H*W, C)`` laid out row-major on ``grid_size`` (no prefix tokens).

    LipShiFT's block (Menon et al., 2025) puts this linear residual before its MinMax activation; ``a`` is a learnable
    per-channel weight (LipShiFT initialises it at 0.2). The map is one convolution whose kernel is
    ``a ⊙ W`` plus the identity at the centre tap (LiResNet, Hu et al. 2023), so its bound is the *guaranteed*
    operator-norm bound of that merged kernel on the ``H x W`` grid (FFT symbol + Gram iteration, see
    :func:`~robustvit.lipschitz.spectral.conv_operator_bound`), tighter than ``1 + max|a| ||W||`` and never a power
    iteration estimate. The bias shifts outputs only.

    Example:
        >>> layer = LiResConv(16, grid_size=(4, 4))
        >>> layer(torch.randn(2, 16, 16)).shape
        torch.Size([2, 16, 16])
        >>> bool(layer.lipschitz_bound() >= 1 - 0.2 * 10)
        True
    """

    def __init__(self, dim: int, grid_size: tuple[int, int], kernel_size: int = 3, alpha_init: float = 0.2):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (a centred identity tap), got {kernel_size}")
        self.grid_size = tuple(grid_size)
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2)
        nn.init.orthogonal_(self.conv.weight)  # LipShiFT's initialisation
        nn.init.zeros_(self.conv.bias)
        self.alpha = nn.Parameter(torch.full((dim,), float(alpha_init)))

    def forward(self, x: Tensor) -> Tensor:
        height, width = self.grid_size
        batch, tokens, channels = x.shape
        if tokens != height * width:
            raise ValueError(f"LiResConv expects a {height}x{width} grid = {height * width} tokens, got {tokens}")
        grid = x.transpose(1, 2).reshape(batch, channels, height, width)
        out = grid + self.alpha.view(1, -1, 1, 1) * self.conv(grid)
        return out.reshape(batch, channels, tokens).transpose(1, 2)

    def merged_kernel(self) -> Tensor:
        """The kernel of the whole map ``x -> x + a ⊙ conv(x)`` (bias aside)."""
        kernel = self.alpha.view(-1, 1, 1, 1) * self.conv.weight
        centre = self.conv.kernel_size[0] // 2
        eye = torch.eye(kernel.shape[0], dtype=kernel.dtype, device=kernel.device)
        return kernel + nn.functional.pad(eye[:, :, None, None], (centre, centre, centre, centre))

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        # In a loss (grad enabled) a fixed number of Gram steps: still a guaranteed bound, slightly looser and much
        # cheaper per step. Without grad (certificates, reports) it iterates to tolerance.
        steps = {"n_iter": TRAINING_GRAM_STEPS, "rtol": 0.0} if torch.is_grad_enabled() else {}
        return conv_operator_bound(
            self.merged_kernel(),
            stride=(1, 1),
            padding=self.conv.padding,
            dilation=(1, 1),
            groups=1,
            input_size=self.grid_size,
            **steps,
        )

    def extra_repr(self) -> str:
        return f"grid_size={self.grid_size}"
