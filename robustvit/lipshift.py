"""LipShiFT (Menon, Franco, Günnemann, 2025) rebuilt from robustvit's layers, with sound bounds.

LipShiFT trains a Lipschitz shift-ViT from scratch. Its block is ``x + a2 ⊙ MinMax(LiResConv(CenterNorm(shift(x))))``
with the residual around everything but the shift; the patch embedding is a patchify convolution followed by a
CenterNorm, the head a last-layer-normalised (LLN: unit-norm rows) linear map on average-pooled tokens, and the
input is raw pixels in [0, 1]. Unlike the published code, every bound here is guaranteed: dropout and drop-path
count as the identity (no keep-rate discount at evaluation) and convolutions are bounded by their FFT symbol with
Gram iteration, never by power iteration. The model is a timm ``VisionTransformer`` (class-free, average pooling,
no position embedding), so certification, margin losses and attacks treat it like a converted ViT.

Deviation, stated: one stage at a single resolution (the published model has four stages with patch merging,
sized for 32x32 inputs with 2x2 patches); :func:`create_lipshift` is for small inputs such as the embedded digits.

Example:
    >>> model = create_lipshift(num_classes=10, img_size=32, patch_size=8, embed_dim=32, depth=2)
    >>> model(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> import robustvit
    >>> robustvit.lipschitz_bound(model) > 0
    True
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.nn.utils import parametrize

from robustvit.layers import CenterNorm, LipBlock, LipResidual, LiResConv, MinMax, NormalizedConv2d, TokenShift

__all__ = ["UnitRows", "create_lipshift"]


class UnitRows(nn.Module):
    """Parametrization: every row of the weight scaled to unit l2 norm (LiResNet / LipShiFT's LLN head)."""

    def forward(self, weight: Tensor) -> Tensor:
        return F.normalize(weight, dim=1)


def create_lipshift(
    num_classes: int,
    *,
    img_size: int = 32,
    in_chans: int = 3,
    patch_size: int = 4,
    embed_dim: int = 64,
    depth: int = 4,
    shift_div: int = 12,
    conv_alpha: float = 0.2,
    residual_alpha: float = 0.2,
) -> VisionTransformer:
    """A LipShiFT network as a timm ``VisionTransformer`` taking pixels in [0, 1] (orthogonal init, CenterNorm
    gammas 1, residual and LiResConv weights ``0.2`` as in the published code)."""
    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        global_pool="avg",
        embed_dim=embed_dim,
        depth=0,
        num_heads=1,
        class_token=False,
        pos_embed="none",
        fc_norm=False,
    )
    grid = tuple(model.patch_embed.grid_size)
    proj = NormalizedConv2d.from_conv(model.patch_embed.proj, mean=(0.0,) * in_chans, std=(1.0,) * in_chans)
    nn.init.orthogonal_(proj.weight)
    nn.init.zeros_(proj.bias)
    model.patch_embed.proj = proj
    model.patch_embed.norm = CenterNorm(embed_dim)

    def block() -> LipBlock:
        branch = nn.Sequential(
            OrderedDict(
                norm=CenterNorm(embed_dim), conv=LiResConv(embed_dim, grid, alpha_init=conv_alpha), act=MinMax()
            )
        )
        return LipBlock(
            TokenShift(grid, shift_div, num_prefix_tokens=0), LipResidual(branch, embed_dim, residual_alpha)
        )

    model.blocks = nn.Sequential(*(block() for _ in range(depth)))
    model.norm = CenterNorm(embed_dim)
    nn.init.orthogonal_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    parametrize.register_parametrization(model.head, "weight", UnitRows())
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "mean": (0.0,) * in_chans, "std": (1.0,) * in_chans}
    return model
