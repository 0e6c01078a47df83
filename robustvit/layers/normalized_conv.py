"""Patch-embedding convolution with the input normalization inside the model (and inside the bound)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from robustvit._utils import check_pixel_range, holds_values, pixels_checked
from robustvit.lipschitz.engine import BoundFn
from robustvit.lipschitz.spectral import conv_spectral_norm


def eval_pixels(x: Tensor) -> Tensor:
    """``x``, once its values are checked to lie in [0, 1] (normalized pixels would silently give another function).
    A call of its own in a ``torch.fx`` graph (``torch.fx.wrap``), so a traced eval-mode model checks at run time."""
    if pixels_checked() and holds_values(x):
        check_pixel_range(x)
    return x


torch.fx.wrap("eval_pixels")


class NormalizedConv2d(nn.Conv2d):
    """``conv((x - mean) / std)``: a ``Conv2d`` that takes pixels in [0, 1] and normalizes them first.

    It stays an ``nn.Conv2d`` (weight, bias, stride...) so code that reads the first convolution keeps working.
    The normalization multiplies distances by at most ``1 / min(std)``, which is part of the bound.

    In eval mode it refuses inputs outside [0, 1] with a ``ValueError`` that names the fix: pixels normalized by the
    source's preprocessing would be normalized twice, another function than the certified one. The check costs a
    min and a max of the batch (``bench/bench_pixel_check.py``); it steps aside while ``torch.export``,
    ``torch.compile`` or ``torch.func`` trace the model, in training, and inside
    :func:`robustvit._utils.unchecked_pixels` (randomized smoothing's noisy samples). A ``torch.fx`` graph of the
    model in eval mode keeps the check as a call of its own (:func:`eval_pixels`).

    Example:
        >>> conv = NormalizedConv2d(3, 192, kernel_size=16, stride=16, mean=(0.5,) * 3, std=(0.5,) * 3)
        >>> conv(torch.rand(1, 3, 224, 224)).shape
        torch.Size([1, 192, 14, 14])
    """

    def __init__(self, *args, mean: Sequence[float], std: Sequence[float], **kwargs):
        super().__init__(*args, **kwargs)
        mean_t = torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.as_tensor(std, dtype=torch.float32)
        if mean_t.shape != (self.in_channels,) or std_t.shape != (self.in_channels,):
            raise ValueError(f"mean and std need {self.in_channels} values, got {list(mean)} and {list(std)}")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.register_buffer("input_mean", mean_t.view(-1, 1, 1))
        self.register_buffer("input_std", std_t.view(-1, 1, 1))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mean: Sequence[float], std: Sequence[float]) -> NormalizedConv2d:
        """A copy of ``conv`` (same geometry and weights) that normalizes its input first."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            mean=mean,
            std=std,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        new.load_state_dict(conv.state_dict(), strict=False)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images shaped (batch, {self.in_channels}, height, width) with pixels in [0, 1], "
                f"got shape {tuple(x.shape)}"
            )
        if not self.training:
            x = eval_pixels(x)
        return super().forward((x - self.input_mean) / self.input_std)

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        return conv_spectral_norm(self) / self.input_std.min().to(torch.float64)

    def extra_repr(self) -> str:
        mean, std = self.input_mean.flatten().tolist(), self.input_std.flatten().tolist()
        return f"{super().extra_repr()}, mean={mean}, std={std}"
