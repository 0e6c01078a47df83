"""The converted transformer block: token mixer, then a weighted-residual MLP (then, in the last block, a pool)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import GradientCheckpointingLayer

from robustvit.lipschitz.engine import BoundFn, bound_tensor


class LipBlock(GradientCheckpointingLayer):
    """``x -> pool(mlp(mixer(x)))``, the Lipschitz form of a pre-norm ViT block.

    ``mixer`` is a :class:`~robustvit.layers.TokenShift` (LipShiFT/ShiftViT: the shift replaces the attention
    branch and its residual) or a :class:`~robustvit.layers.LipResidual` around ``CenterNorm -> L2Attention``;
    ``mlp`` is a :class:`~robustvit.layers.LipResidual` around ``CenterNorm -> MLP``. The last block of a shift
    model whose head reads prefix tokens carries a :class:`~robustvit.layers.PrefixPool` as ``pool``: inside the
    block, not after it, so the block count stays the source's (``num_hidden_layers``, ``forward_intermediates``,
    ``output_hidden_states`` and ``features_only`` keep their meaning). The bound is the product.

    It accepts and ignores the extra arguments timm and transformers pass to blocks, but refuses an attention
    mask that hides anything, and causal attention, which no converted mixer can honour (a mask that hides nothing
    is what transformers builds when it is traced, for ``torch.export``). It is a transformers
    ``GradientCheckpointingLayer`` (a plain ``nn.Module`` until ``gradient_checkpointing_enable()``), so
    transformers' gradient checkpointing works; timm's ``set_grad_checkpointing`` checkpoints ``blocks`` itself.
    """

    def __init__(self, mixer: nn.Module, mlp: nn.Module, pool: nn.Module | None = None):
        super().__init__()
        self.mixer = mixer
        self.mlp = mlp
        self.pool = pool

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        mask = attention_mask if attention_mask is not None else kwargs.get("attn_mask")
        x = unmasked(x, mask, kwargs.get("is_causal", False))
        x = self.mlp(self.mixer(x))
        return self.pool(x) if self.pool is not None else x

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        if bound_of is None:  # called directly: let the engine walk the children
            return bound_tensor(self)
        bound = bound_of("mixer", self.mixer) * bound_of("mlp", self.mlp)
        return bound * bound_of("pool", self.pool) if self.pool is not None else bound


def unmasked(x: Tensor, mask: object, is_causal: object) -> Tensor:
    """``x``, once the block's attention arguments are checked to ask for nothing a mixer cannot do: no causal
    attention, no mask that hides anything. A call of its own in a ``torch.fx`` graph (``torch.fx.wrap``): timm's
    tracer passes ``attn_mask`` and ``is_causal`` as placeholders, so the graph checks their values at run time."""
    if is_causal:
        raise ValueError("converted robustvit blocks do not support causal attention (is_causal=True)")
    if mask is not None:
        _check_masks_nothing(mask)
    return x


torch.fx.wrap("unmasked")


def _check_masks_nothing(mask: object) -> None:
    """Refuse an attention mask unless it hides nothing (a boolean mask all True, an additive one all 0): in eager
    mode with ``ValueError``; traced (``torch.export`` / ``torch.compile``, where transformers always builds a mask),
    with an assertion that the exported program checks at run time."""
    message = "converted robustvit blocks do not support attention masks"
    if not isinstance(mask, Tensor):
        raise ValueError(f"{message} (got {type(mask).__name__})")
    hides_nothing = mask.all() if mask.dtype == torch.bool else (mask == 0).all()
    if torch.compiler.is_compiling():
        torch._assert_async(hides_nothing, message)
    elif not hides_nothing:
        raise ValueError(message)
