"""The conversion's choices: the registries that ``ConvertConfig.mixer`` / ``activation`` / ``mlp`` / ``gated_mlp`` /
``attention_pool`` name, and how one source block (and an attention-pooling head) becomes Lipschitz from them.

Each entry of :data:`MIXERS` and :data:`MLPS` is ``build(block, parts, config, norm) -> nn.Module`` (a family's
:class:`~robustvit.families.BlockParts` and :class:`~robustvit.families.ViTParts`, the
:class:`~robustvit.conversion.config.ConvertConfig`, and ``norm``: LayerNorm -> matching CenterNorm); register more
with ``MIXERS.register(name)``. :data:`GATED_MLPS` entries are ``build(gated, norm) -> nn.Module`` (a
:class:`~robustvit.families.GatedMlpParts`, replaced by a plain MLP before the ``mlp`` choice applies);
:data:`ATTENTION_POOLS` entries are ``build(pool, config, norm) -> nn.Module`` (an
:class:`~robustvit.families.AttentionPoolParts`) whose module has ``scale_output_(s)``, multiplying its output by ``s``
exactly (the head's rescaling moves its scale there).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

from robustvit.conversion.config import ConvertConfig
from robustvit.families import AttentionPoolParts, BlockParts, GatedMlpParts, ViTParts
from robustvit.layers import (
    CPL,
    SLL,
    CenterNorm,
    L2Attention,
    LipBlock,
    LipResidual,
    MeanPoolLatent,
    MinMax,
    RmsScale,
    TokenShift,
    UngatedMlp,
)
from robustvit.registry import Registry

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_POOLS",
    "GATED_MLPS",
    "MIXERS",
    "MLPS",
    "RMS_NORMS",
    "build_attention_pool",
    "build_block",
]


def _copy_linear(weight: Tensor, bias: Tensor | None, target: nn.Linear) -> None:
    with torch.no_grad():
        target.weight.copy_(weight)
        if target.bias is not None:
            target.bias.copy_(bias if bias is not None else torch.zeros_like(target.bias))


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A new ``nn.Linear`` holding ``(weight, bias)`` (a slice of a fused source projection)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer = layer.to(weight.device, weight.dtype)
    _copy_linear(weight.detach(), bias.detach() if bias is not None else None, layer)
    return layer


def _norm_or_identity(module: nn.Module | None, norm: Callable) -> nn.Module:
    return nn.Identity() if module is None else norm(module)


# Conversion choices: ConvertConfig.mixer / activation / mlp name an entry of these registries.
MIXERS: Registry[Callable[..., nn.Module]] = Registry("mixer")
ACTIVATIONS: Registry[Callable[[], nn.Module] | None] = Registry("activation")
MLPS: Registry[Callable[..., nn.Module]] = Registry("mlp")
GATED_MLPS: Registry[Callable[[GatedMlpParts, Callable], nn.Module]] = Registry("gated mlp")
ATTENTION_POOLS: Registry[Callable[..., nn.Module]] = Registry("attention pool")
RMS_NORMS: Registry[Callable[[int, Tensor, float], nn.Module]] = Registry("rms norm")


@RMS_NORMS.register("scale")
def _rms_scale(dim: int, gamma: Tensor, input_rms: float) -> nn.Module:
    # RMSNorm without its division: gamma / rms, the calibrated mean RMS (1 without images). No centering is added.
    norm = RmsScale(dim)
    with torch.no_grad():
        norm.weight.copy_(gamma / input_rms)
    return norm


@RMS_NORMS.register("center")
def _rms_center(dim: int, gamma: Tensor, input_rms: float) -> nn.Module:
    # A CenterNorm with the RMS frozen: adds the centering RMSNorm does not have (for inputs of mean ~0, the same map).
    norm = CenterNorm(dim)
    with torch.no_grad():
        norm.weight.copy_(gamma * (dim - 1) / dim / input_rms)
    return norm


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
        center = norm(block.norm2)  # the norm's substitute: its per-channel gain and shift
        with torch.no_grad():
            layer.weight.copy_(fc1.weight * center.channel_gain())
            bias = fc1.bias if fc1.bias is not None else torch.zeros_like(layer.bias)
            layer.bias.copy_(bias + fc1.weight @ center.bias)
        return layer

    return build


MLPS.register("sll", _residual_layer(SLL))
MLPS.register("cpl", _residual_layer(CPL))


def _ungated(branch: str) -> Callable[[GatedMlpParts, Callable], nn.Module]:
    """``fc2(norm(act(branch(x))))``: the gated MLP without its product, keeping ``branch`` ("value" or "gate"), the
    source's activation, hidden norm and ``fc2``; the other branch's weights are dropped."""

    def build(gated: GatedMlpParts, norm: Callable) -> nn.Module:
        fc1 = _linear(*getattr(gated, branch))
        return UngatedMlp(fc1, gated.activation, _norm_or_identity(gated.norm, norm), gated.fc2)

    return build


GATED_MLPS.register("value", _ungated("value"))
GATED_MLPS.register("gate", _ungated("gate"))


@ATTENTION_POOLS.register("mean")
def _mean_pool(pool: AttentionPoolParts, config: ConvertConfig, norm: Callable) -> nn.Module:
    make_activation = ACTIVATIONS[config.activation]  # the head's MLP takes the activation the blocks' MLPs take
    if make_activation is not None:
        setattr(pool.mlp, pool.mlp_activation, make_activation())
    dim = pool.proj.out_features
    branch = nn.Sequential(OrderedDict(norm=_norm_or_identity(pool.norm, norm), mlp=pool.mlp))
    return MeanPoolLatent(_linear(*pool.value), pool.proj, LipResidual(branch, dim), pool.num_tokens)


def build_attention_pool(pool: AttentionPoolParts, config: ConvertConfig, norm: Callable) -> nn.Module:
    return ATTENTION_POOLS[config.attention_pool](pool, config, norm).to(pool.proj.weight.dtype)


def build_block(block: BlockParts, parts: ViTParts, config: ConvertConfig, norm: Callable) -> LipBlock:
    if block.gated_mlp is not None:  # the gated MLP becomes a plain one, which the mlp choice then takes
        mlp = GATED_MLPS[config.gated_mlp](block.gated_mlp, norm)
        block = dataclasses.replace(block, mlp=mlp, mlp_activation="act", gated_mlp=None)
    mixer = MIXERS[config.mixer](block, parts, config, norm)
    mlp = MLPS[config.mlp](block, parts, config, norm)
    return LipBlock(mixer, mlp).to(parts.patch_conv.weight.dtype)
