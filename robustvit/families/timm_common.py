"""What the timm family adapters share: reading timm's attention, MLP and pooling modules into the converter's parts,
and :class:`TimmFamily`, the base of the adapters of timm's ViT classes (where they keep their patch embedding,
norms and head; how their source is described and built back).

Structure only: each function names the weights of one timm building block, or refuses a form the converter does not
model with :class:`~robustvit.errors.UnsupportedModuleError`.
"""

from __future__ import annotations

from abc import abstractmethod

import timm
from timm.layers import AttentionPoolLatent, GluMlp, Mlp, PatchEmbed, RmsNorm, RmsNormFp32, SwiGLU
from torch import Tensor, nn

from robustvit.errors import UnsupportedModuleError
from robustvit.families.base import (
    RMS_NORM_TYPES,
    AttentionPoolParts,
    BlockParts,
    Family,
    GatedMlpParts,
    InputSpec,
    linear_bias,
    linear_weight,
    per_channel,
)

__all__ = [
    "TimmFamily",
    "attention_pool_parts",
    "attention_projections",
    "gamma_block_parts",
    "hidden_ratio",
    "input_spec",
    "mlp_hidden",
    "mlp_parts",
    "norm_or_none",
    "num_patches",
]


for _rms_norm in (RmsNorm, RmsNormFp32):  # x / sqrt(mean(x^2) + eps) * weight over the last dimension
    RMS_NORM_TYPES.register(_rms_norm, lambda norm: norm.weight)


def norm_or_none(module: nn.Module | None) -> nn.Module | None:
    return None if module is None or isinstance(module, nn.Identity) else module


def input_spec(model: nn.Module) -> InputSpec:
    """Channels and size from ``model.patch_embed``, normalization from ``pretrained_cfg`` (timm's 0.5 default)."""
    cfg = model.pretrained_cfg or {}
    channels = model.patch_embed.proj.in_channels
    return InputSpec(
        channels=channels,
        image_size=tuple(model.patch_embed.img_size),
        mean=per_channel(cfg.get("mean", (0.5,) * channels), channels),
        std=per_channel(cfg.get("std", (0.5,) * channels), channels),
    )


def num_patches(patch_embed: PatchEmbed) -> int:
    """Patches the projection makes of the fixed input size (the converted mixers check the token count)."""
    conv, size = patch_embed.proj, patch_embed.img_size
    count = 1
    for i in range(2):
        span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        count *= (size[i] + 2 * conv.padding[i] - span) // conv.stride[i] + 1
    return count


def _detached(tensor: Tensor | None) -> Tensor | None:
    return tensor.detach() if tensor is not None else None


def attention_projections(attn: nn.Module, dim: int) -> tuple[tuple, tuple, tuple, nn.Linear]:
    """``(q, k, v, proj)`` of a timm attention module, each projection as ``(weight (dim, dim), bias)``: a fused
    ``qkv`` (with its own bias, or BEiT / EVA's separate ``q_bias`` / ``v_bias`` and no key bias) or separate
    ``q_proj`` / ``k_proj`` / ``v_proj``. Only the converted mixer reads them (``mixer="l2"`` keeps q, v and proj):
    rotary embeddings, relative position bias, qk-norm, inner norm and attention gates leave with the attention."""
    if getattr(attn, "qkv", None) is not None:
        weight = attn.qkv.weight.detach()
        if getattr(attn, "q_bias", None) is not None:
            k_bias = getattr(attn, "k_bias", None)
            biases = (attn.q_bias.detach(), _detached(k_bias), attn.v_bias.detach())
        else:
            bias = _detached(attn.qkv.bias)
            biases = bias.chunk(3) if bias is not None else (None,) * 3
        projections = tuple(zip(weight.chunk(3), biases, strict=True))
    else:
        projections = tuple((p.weight.detach(), _detached(p.bias)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    if any(w.shape != (dim, dim) for w, _ in projections) or attn.proj.weight.shape != (dim, dim):
        shapes = [tuple(w.shape) for w, _ in projections]
        raise UnsupportedModuleError(
            f"timm {type(attn).__name__} with projections of shapes {shapes} (grouped-query attention or a head "
            f"dimension other than dim / num_heads); the converter needs ({dim}, {dim})"
        )
    return (*projections, attn.proj)


def mlp_parts(mlp: nn.Module, where: str) -> tuple[nn.Module, GatedMlpParts | None]:
    """``(mlp, gated)``: a plain timm ``Mlp`` (kept, its activation at ``act``), or a gated ``GluMlp`` / ``SwiGLU``
    described by its branches (the conversion replaces it: ``ConvertConfig.gated_mlp``)."""
    kind = type(mlp)
    if kind is Mlp:
        if not isinstance(mlp.norm, nn.Identity):
            raise UnsupportedModuleError(f"{where}: a timm Mlp with a hidden norm (scale_mlp) is not supported")
        return mlp, None
    if kind is SwiGLU:
        value, gate = mlp.fc1_x, mlp.fc1_g
        gated = GatedMlpParts(
            value=(value.weight.detach(), _detached(value.bias)),
            gate=(gate.weight.detach(), _detached(gate.bias)),
            activation=mlp.act,
            norm=norm_or_none(mlp.norm),
            fc2=mlp.fc2,
        )
        return mlp, gated
    if kind is GluMlp and isinstance(mlp.fc1, nn.Linear):  # use_conv=True (1x1 convolutions) is not a token MLP
        weights = mlp.fc1.weight.detach().chunk(2)
        bias = _detached(mlp.fc1.bias)
        biases = bias.chunk(2) if bias is not None else (None, None)
        first, second = zip(weights, biases, strict=True)
        value, gate = (first, second) if mlp.gate_last else (second, first)  # gate_last: x1 * act(x2)
        return mlp, GatedMlpParts(value=value, gate=gate, activation=mlp.act, norm=norm_or_none(mlp.norm), fc2=mlp.fc2)
    raise UnsupportedModuleError(f"{where}: MLP {kind.__name__} (supported: Mlp, SwiGLU, GluMlp)")


def attention_pool_parts(pool: nn.Module, num_tokens: int) -> AttentionPoolParts:
    """The parts of timm's ``AttentionPoolLatent`` (MAP head) reading ``num_tokens`` tokens; the query, keys,
    qk-norm and softmax leave with the attention (``ConvertConfig.attention_pool``)."""
    if type(pool) is not AttentionPoolLatent:
        raise UnsupportedModuleError(f"attention pool {type(pool).__name__} (supported: AttentionPoolLatent)")
    problems = []
    if pool.latent_len != 1:
        problems.append(f"latent_len={pool.latent_len} (supported: 1)")
    if pool.pos_embed is not None:
        problems.append("a position embedding")
    if pool.mlp is None or not isinstance(pool.proj, nn.Linear):
        problems.append("no output projection (out_features=0)")
    elif pool.proj.out_features != pool.kv.in_features:
        problems.append(f"out_features={pool.proj.out_features} other than its input's {pool.kv.in_features}")
    if problems:
        raise UnsupportedModuleError("timm AttentionPoolLatent with " + "; ".join(problems))
    mlp, _ = mlp_parts(pool.mlp, "attention pool")
    dim = pool.kv.in_features
    weight, bias = pool.kv.weight.detach(), _detached(pool.kv.bias)
    value = (weight[dim:], bias[dim:] if bias is not None else None)  # kv = [k; v]
    return AttentionPoolParts(
        value=value,
        proj=pool.proj,
        norm=norm_or_none(pool.norm),
        mlp=mlp,
        mlp_activation="act",
        num_tokens=num_tokens,
    )


def gamma_block_parts(block: nn.Module, dim: int, where: str) -> BlockParts:
    """A BEiT / EVA pre-norm block: ``x + gamma_1 * attn(norm1(x))``, then ``x + gamma_2 * mlp(norm2(x))``, with the
    LayerScale as bare ``gamma_1`` / ``gamma_2`` parameters (``None`` without it)."""
    q, k, v, proj = attention_projections(block.attn, dim)
    mlp, gated = mlp_parts(block.mlp, where)
    gamma_1, gamma_2 = block.gamma_1, block.gamma_2
    return BlockParts(
        norm1=block.norm1,
        q=q,
        k=k,
        v=v,
        out=proj,
        num_heads=block.attn.num_heads,
        ls1=gamma_1.detach() if gamma_1 is not None else None,
        drop1=block.drop_path1,
        norm2=block.norm2,
        mlp=mlp,
        mlp_activation="act",
        ls2=gamma_2.detach() if gamma_2 is not None else None,
        drop2=block.drop_path2,
        gated_mlp=gated,
    )


def hidden_ratio(hidden: int, dim: int) -> float:
    """An ``mlp_ratio`` with ``int(dim * ratio) == hidden`` (timm truncates; ``hidden / dim`` may round below)."""
    return (hidden + 0.5) / dim


def mlp_hidden(mlp: nn.Module) -> int:
    """The hidden width timm's ``mlp_ratio`` sets: fc1's (a fused GLU's fc1 holds both branches, twice as wide)."""
    if type(mlp) is SwiGLU:
        return mlp.fc1_x.out_features
    return mlp.fc1.out_features // (2 if type(mlp) is GluMlp else 1)


class TimmFamily(Family):
    """An adapter of a timm ViT class: ``patch_embed`` (a ``PatchEmbed``), the norms ``norm_pre``, ``norm`` and
    ``fc_norm``, an optional ``attn_pool`` and a linear ``head``, built from constructor arguments.

    Subclasses implement ``matches``, ``parts``, ``install`` (with :meth:`_install_modules`), ``features_bound``
    and ``_check``; they list their classes in ``source_classes`` and the arguments beyond the shared ones in
    :meth:`_architecture_kwargs`.
    """

    library = "timm"
    source_classes: dict[str, type[nn.Module]] = {}
    """The classes :meth:`build` constructs, by name (``source_spec``'s ``"class"``); the family's models are
    exactly these classes (:meth:`matches`)."""

    def matches(self, model: nn.Module) -> bool:
        return type(model) in self.source_classes.values()

    @staticmethod
    @abstractmethod
    def _check(model: nn.Module, *, source: bool) -> None:
        """Refuse configurations whose forward the converter or the bound rule does not model."""

    @abstractmethod
    def _architecture_kwargs(self, model: nn.Module) -> dict:
        """The constructor arguments that shape the state dict, beyond those every timm ViT class takes."""

    def input_spec(self, model: nn.Module) -> InputSpec:
        return input_spec(model)

    @staticmethod
    def _install_modules(model: nn.Module, modules: dict[str, nn.Module]) -> None:
        """Put the converted modules (not the blocks) where timm's ViT classes keep them."""
        targets = {
            "patch_conv": (model.patch_embed, "proj"),
            "patch_norm": (model.patch_embed, "norm"),
            "pre_norm": (model, "norm_pre"),
            "final_norm": (model, "norm"),
            "head_norm": (model, "fc_norm"),
            "attention_pool": (model, "attn_pool"),
        }
        for key, module in modules.items():
            setattr(*targets[key], module)

    def patch_embedding(self, model: nn.Module) -> nn.Module:
        return model.patch_embed

    def patch_projection(self, model: nn.Module) -> nn.Conv2d:
        return model.patch_embed.proj

    def heads(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [] if isinstance(model.head, nn.Identity) else [("head", model.head)]

    def head_weight(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        return linear_weight(model.head), linear_bias(model.head)

    def source_spec(self, model: nn.Module) -> dict:
        self._check(model, source=True)
        kwargs = {
            "img_size": list(model.patch_embed.img_size),
            "patch_size": list(model.patch_embed.patch_size),
            "in_chans": model.patch_embed.proj.in_channels,
            "num_classes": model.num_classes,
            "global_pool": model.global_pool,
            "embed_dim": model.embed_dim,
            "depth": len(model.blocks),
            "num_heads": model.blocks[0].attn.num_heads,
            **self._architecture_kwargs(model),
        }
        architecture = (model.pretrained_cfg or {}).get("architecture")
        return {"library": "timm", "class": type(model).__name__, "architecture": architecture, "kwargs": kwargs}

    def _build_kwargs(self, kwargs: dict) -> dict:
        """The constructor arguments of saved ``source_spec`` kwargs (JSON lists back to tuples)."""
        return dict(kwargs, img_size=tuple(kwargs["img_size"]), patch_size=tuple(kwargs["patch_size"]))

    def build(self, spec: dict) -> nn.Module:
        kwargs = self._build_kwargs(spec["kwargs"])
        if spec.get("architecture"):
            return timm.create_model(spec["architecture"], pretrained=False, **kwargs)
        return self.source_classes[spec["class"]](**kwargs)
