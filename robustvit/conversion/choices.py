"""The conversion's choices: the registries that ``ConvertConfig.mixer`` / ``activation`` / ``mlp`` name, and how one
source block becomes a :class:`~robustvit.layers.LipBlock` from them.

Each entry of :data:`MIXERS` and :data:`MLPS` is ``build(block, parts, config, norm) -> nn.Module`` (a family's
:class:`~robustvit.families.BlockParts` and :class:`~robustvit.families.ViTParts`, the
:class:`~robustvit.conversion.config.ConvertConfig`, and ``norm``: LayerNorm -> matching CenterNorm); register more
with ``MIXERS.register(name)``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

from robustvit.conversion.config import ConvertConfig
from robustvit.families import BlockParts, ViTParts
from robustvit.layers import CPL, SLL, L2Attention, LipBlock, LipResidual, MinMax, TokenShift
from robustvit.registry import Registry

__all__ = ["ACTIVATIONS", "MIXERS", "MLPS", "build_block"]


def _copy_linear(weight: Tensor, bias: Tensor | None, target: nn.Linear) -> None:
    with torch.no_grad():
        target.weight.copy_(weight)
        if target.bias is not None:
            target.bias.copy_(bias if bias is not None else torch.zeros_like(target.bias))


# Conversion choices: ConvertConfig.mixer / activation / mlp name an entry of these registries.
MIXERS: Registry[Callable[..., nn.Module]] = Registry("mixer")
ACTIVATIONS: Registry[Callable[[], nn.Module] | None] = Registry("activation")
MLPS: Registry[Callable[..., nn.Module]] = Registry("mlp")
ACTIVATIONS.register("gelu", None)  # kept as the source has it (bound 1.129)
ACTIVATIONS.register("minmax", MinMax)


@MIXERS.register("shift")
def _shift_mixer(block: BlockParts, parts: ViTParts, config: ConvertConfig, norm: Callable) -> nn.Module:
    # ShiftViT/LipShiFT: the shift replaces the whole attention sub-block, residual included.
    return TokenShift(parts.grid_size, config.shift_div, parts.num_prefix_tokens)


@MIXERS.register("l2")
def _l2_mixer(block: BlockParts, parts: ViTParts, config: ConvertConfig, norm: Callable) -> nn.Module:
    tokens = parts.num_prefix_tokens + parts.grid_size[0] * parts.grid_size[1]
    attn = L2Attention(parts.embed_dim, block.num_heads, tokens).to(block.out.weight.device, block.out.weight.dtype)
    _copy_linear(block.q[0], None, attn.q_proj)  # W_K = W_Q: keys reuse the query projection
    _copy_linear(*block.v, attn.v_proj)
    _copy_linear(
        block.out.weight.detach(), block.out.bias.detach() if block.out.bias is not None else None, attn.o_proj
    )
    branch = nn.Sequential(OrderedDict(norm=norm(block.norm1), attn=attn, drop=block.drop1))
    alpha = config.residual_alpha * (block.ls1 if block.ls1 is not None else 1.0)
    return LipResidual(branch, parts.embed_dim, alpha)


@MLPS.register("keep")
def _kept_mlp(block: BlockParts, parts: ViTParts, config: ConvertConfig, norm: Callable) -> nn.Module:
    make_activation = ACTIVATIONS[config.activation]
    if make_activation is not None:
        setattr(block.mlp, block.mlp_activation, make_activation())
    branch = nn.Sequential(OrderedDict(norm=norm(block.norm2), mlp=block.mlp, drop=block.drop2))
    alpha = config.residual_alpha * (block.ls2 if block.ls2 is not None else 1.0)
    return LipResidual(branch, parts.embed_dim, alpha)


def _residual_layer(layer_type: type[nn.Module]) -> Callable[..., nn.Module]:
    """Builds an SLL / CPL layer from the source's LayerNorm and fc1: ``fc1(gamma * x / std + beta)`` before the
    activation, ``std`` the calibrated token std (1 without calibration images). The LayerNorm's centering and
    per-token division have no place in these layers; the output map is tied to ``W``."""

    def build(block: BlockParts, parts: ViTParts, config: ConvertConfig, norm: Callable) -> nn.Module:
        fc1 = block.mlp.fc1
        layer = layer_type(parts.embed_dim, fc1.out_features).to(fc1.weight.device, fc1.weight.dtype)
        center = norm(block.norm2)  # gamma (D - 1) / (D std) and beta, as CenterNorm would take them
        with torch.no_grad():
            layer.weight.copy_(fc1.weight * center.weight * center.dim / (center.dim - 1))
            bias = fc1.bias if fc1.bias is not None else torch.zeros_like(layer.bias)
            layer.bias.copy_(bias + fc1.weight @ center.bias)
        return layer

    return build


MLPS.register("sll", _residual_layer(SLL))
MLPS.register("cpl", _residual_layer(CPL))


def build_block(block: BlockParts, parts: ViTParts, config: ConvertConfig, norm: Callable) -> LipBlock:
    mixer = MIXERS[config.mixer](block, parts, config, norm)
    mlp = MLPS[config.mlp](block, parts, config, norm)
    return LipBlock(mixer, mlp).to(parts.patch_conv.weight.dtype)
