"""timm ``Eva`` family: EVA-02, the RoPE ViTs (``vit_*_rope_*``) and the Perception Encoder (``vit_pe_core_*``).

Rotary or absolute position embeddings, SwiGLU or plain MLPs, LayerScale, register tokens, average, token or
attention pooling. The rotary embedding only feeds the attention and leaves with it (the converted mixer replaces
the attention branch); a SwiGLU MLP and a MAP head get the sound substitutes ``ConvertConfig.gated_mlp`` and
``ConvertConfig.attention_pool`` choose.
"""

from __future__ import annotations

import math

import timm
from timm.layers import AttentionRope, Mlp, RmsNorm, SwiGLU, get_norm_layer
from timm.models.eva import Eva, EvaAttention, EvaBlock
from torch import Tensor, nn

from robustvit.errors import UnsupportedModuleError
from robustvit.families import timm_common
from robustvit.families.base import ViTParts, blocks_bound, one, register_family, register_tiny_model
from robustvit.layers import MeanPoolLatent
from robustvit.lipschitz.engine import BoundFn, register_bound


@register_family
class TimmEva(timm_common.TimmFamily):
    name = "timm-eva"
    source_classes = {"Eva": Eva}

    @staticmethod
    def _tokens(model: Eva) -> int:
        return model.num_prefix_tokens + timm_common.num_patches(model.patch_embed)

    @staticmethod
    def _check(model: Eva, *, source: bool) -> None:
        """Refuse configurations whose forward the converter or the bound rule does not model."""
        problems = []
        if model.global_pool not in ("token", "avg", "map"):
            problems.append(f"global_pool={model.global_pool!r} (supported: 'token', 'avg', 'map')")
        if model.dynamic_img_size or not model.patch_embed.flatten:
            problems.append("dynamic image size")
        for i, block in enumerate(model.blocks if source else ()):
            if type(block) is not EvaBlock or type(block.attn) not in (EvaAttention, AttentionRope):
                problems.append(
                    f"block {i} ({type(block).__name__}/{type(block.attn).__name__}; supported: EvaBlock with "
                    "EvaAttention or AttentionRope; the post-norm EvaBlockPostNorm is not a pre-norm residual)"
                )
        if not source:
            if model.rope is not None or model.patch_drop is not None:
                problems.append("a rotary embedding or patch dropout on a converted model (they left with attention)")
            expected = model.num_prefix_tokens + timm_common.num_patches(model.patch_embed)
            pool = model.attn_pool
            if (pool is not None) != (model.global_pool == "map") or (
                pool is not None and (type(pool) is not MeanPoolLatent or pool.num_tokens != expected)
            ):
                problems.append(f"attention pool {type(pool).__name__} that does not read all {expected} tokens")
        if problems:
            raise UnsupportedModuleError("timm Eva with " + "; ".join(problems))

    def parts(self, model: nn.Module) -> ViTParts:
        self._check(model, source=True)
        dim = model.embed_dim
        blocks = [timm_common.gamma_block_parts(b, dim, f"block {i}") for i, b in enumerate(model.blocks)]
        prefix = [t for t in (model.cls_token, model.reg_token) if t is not None]
        pool = model.attn_pool
        return ViTParts(
            patch_conv=model.patch_embed.proj,
            patch_norm=timm_common.norm_or_none(model.patch_embed.norm),
            embed_params=[*prefix, *([model.pos_embed] if model.pos_embed is not None else [])],
            pre_norm=timm_common.norm_or_none(model.norm_pre),
            blocks=blocks,
            final_norm=timm_common.norm_or_none(model.norm),
            head_norm=timm_common.norm_or_none(model.fc_norm),
            heads=[head for _, head in self.heads(model)],
            grid_size=tuple(model.patch_embed.grid_size),
            num_prefix_tokens=model.num_prefix_tokens,
            head_reads_prefix=model.global_pool == "token",
            prefix_tokens=prefix,
            pool_reads_prefix=model.global_pool == "map",  # Eva's attention pool reads every token
            attention_pool=timm_common.attention_pool_parts(pool, self._tokens(model)) if pool is not None else None,
        )

    def install(self, model: nn.Module, blocks: list[nn.Module], modules: dict[str, nn.Module]) -> None:
        model.blocks = nn.ModuleList(blocks)
        model.rope = None  # the rotary embedding only fed the attention
        model.patch_drop = None  # drops tokens in training, which the shift grid cannot take; identity at inference
        self._install_modules(model, modules)

    def features_bound(self, model: nn.Module, bound_of: BoundFn) -> Tensor:
        self._check(model, source=False)
        bound = one(model.patch_embed.proj.weight.device)
        for name in ("patch_embed", "pos_drop", "norm_pre"):
            bound = bound * bound_of(name, getattr(model, name))
        tokens_read = 1 if model.global_pool == "token" else 0
        bound = bound * blocks_bound(list(model.blocks), "blocks", bound_of, tokens_read)
        bound = bound * bound_of("norm", model.norm)
        if model.attn_pool is not None:  # its bound counts the tokens it pools
            bound = bound * bound_of("attn_pool", model.attn_pool)
        for name in ("fc_norm", "head_drop"):
            bound = bound * bound_of(name, getattr(model, name))
        if model.global_pool == "avg":  # the mean of the patch tokens (prefix tokens excluded)
            bound = bound / math.sqrt(timm_common.num_patches(model.patch_embed))
        return bound

    def _architecture_kwargs(self, model: nn.Module) -> dict:
        """The arguments that shape the converted model's state dict; the attention's own options (rotary
        embedding, qk-norm, fused qkv) leave with it, so the rebuilt source may differ there."""
        block, dim = model.blocks[0], model.embed_dim
        mlp = block.mlp
        kwargs = {
            "mlp_ratio": timm_common.hidden_ratio(timm_common.mlp_hidden(mlp), dim),
            "swiglu_mlp": type(mlp) is not Mlp,
            "scale_mlp": not isinstance(mlp.norm, nn.Identity),
            # An unfused SwiGLU without a hidden norm: timm builds one for any alignment, and 1 keeps the width.
            "swiglu_align_to": 1 if type(mlp) is SwiGLU and isinstance(mlp.norm, nn.Identity) else 0,
            # Any value creates the gamma parameters; their values are replaced by the saved weights.
            "init_values": 1.0 if block.gamma_1 is not None else None,
            "attn_only_layer_scale": block.gamma_1 is not None and block.gamma_2 is None,
            "class_token": model.cls_token is not None,
            "num_reg_tokens": model.reg_token.shape[1] if model.reg_token is not None else 0,
            "no_embed_class": model.no_embed_class,
            "use_abs_pos_emb": model.pos_embed is not None,
            "use_pre_transformer_norm": not isinstance(model.norm_pre, nn.Identity),
            "use_post_transformer_norm": not isinstance(model.norm, nn.Identity),
            "use_fc_norm": not isinstance(model.fc_norm, nn.Identity),
        }
        if type(block.norm1) is RmsNorm:  # the norm class, by timm's name for it (LayerNorm is the default)
            kwargs["norm_layer"] = "rmsnorm"
        if model.attn_pool is not None:
            kwargs["attn_pool_mlp_ratio"] = timm_common.hidden_ratio(model.attn_pool.mlp.fc1.out_features, dim)
        return kwargs

    def _build_kwargs(self, kwargs: dict) -> dict:
        kwargs = super()._build_kwargs(kwargs)
        if "norm_layer" in kwargs:
            kwargs["norm_layer"] = get_norm_layer(kwargs["norm_layer"])
        return kwargs


def _model_bound(model: nn.Module, bound_of: BoundFn) -> Tensor:
    return TimmEva().model_bound(model, bound_of)


register_bound(Eva)(_model_bound)


def _tiny(architecture: str, **kwargs):
    def build(image_size: int, num_classes: int, channels: int) -> nn.Module:
        return timm.create_model(
            architecture, pretrained=False, img_size=image_size, num_classes=num_classes, in_chans=channels, **kwargs
        )

    return build


# A head at timm's default scale: EVA's fine-tuning init (head_init_scale=0.001) hides the head in every test.
_TINY_EVA = {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3, "head_init_scale": 1.0}

for _name, _architecture, _kwargs, _description in (
    (
        "timm_eva02",
        "eva02_tiny_patch14_224",
        {**_TINY_EVA, "ref_feat_shape": (4, 4)},
        "EVA-02: fused SwiGLU MLP, rotary and absolute position embeddings, mean pooling with fc_norm",
    ),
    (
        "timm_rope_rms",
        "vit_base_patch16_rope_reg1_gap_256",
        {**_TINY_EVA, "ref_feat_shape": (4, 4), "norm_layer": RmsNorm, "swiglu_mlp": True, "scale_mlp": True},
        "RoPE ViT (rotary embeddings only, a register token, LayerScale, mean pooling) with RMSNorm everywhere and a "
        "SwiGLU with a hidden RMSNorm",
    ),
    (
        "timm_pe_core",
        "vit_pe_core_tiny_patch16_384",
        {**_TINY_EVA, "ref_feat_shape": (4, 4), "attn_pool_num_heads": 3},
        "Perception Encoder: a norm before the blocks, rotary embeddings, a MAP head over every token",
    ),
):
    register_tiny_model(_name, TimmEva.name, _tiny(_architecture, **_kwargs), _description)
