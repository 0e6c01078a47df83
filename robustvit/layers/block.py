"""The converted transformer block: token mixer, then a weighted-residual MLP."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from robustvit.lipschitz.engine import BoundFn, bound_tensor


class LipBlock(nn.Module):
    """``x -> mlp(mixer(x))``, the Lipschitz form of a pre-norm ViT block.

    ``mixer`` is a :class:`~robustvit.layers.TokenShift` (LipShiFT/ShiftViT: the shift replaces the attention
    branch and its residual) or a :class:`~robustvit.layers.LipResidual` around ``CenterNorm -> L2Attention``;
    ``mlp`` is a :class:`~robustvit.layers.LipResidual` around ``CenterNorm -> MLP``. The bound is the product.

    It accepts and ignores the extra arguments timm and transformers pass to blocks, but refuses an attention
    mask, which no converted mixer can honour.
    """

    def __init__(self, mixer: nn.Module, mlp: nn.Module):
        super().__init__()
        self.mixer = mixer
        self.mlp = mlp

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        mask = attention_mask if attention_mask is not None else kwargs.get("attn_mask")
        if mask is not None:
            raise ValueError("converted robustvit blocks do not support attention masks")
        return self.mlp(self.mixer(x))

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        if bound_of is None:  # called directly: let the engine walk the children
            return bound_tensor(self)
        return bound_of("mixer", self.mixer) * bound_of("mlp", self.mlp)
