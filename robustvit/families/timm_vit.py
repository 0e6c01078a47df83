"""timm ``VisionTransformer`` family: ViT and DeiT, including ``VisionTransformerDistilled``, and attention pooling
(``global_pool='map'``: SigLIP)."""

from __future__ import annotations

import math
from collections.abc import Callable

import timm
import torch
from timm.layers import Attention, DropPath, LayerScale, Mlp, PatchDropout, PatchEmbed, QuickGELU
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from robustvit.errors import UnsupportedModuleError
from robustvit.families import timm_common
from robustvit.families.base import (
    BlockParts,
    ViTParts,
    blocks_bound,
    linear_bias,
    linear_weight,
    one,
    register_family,
    register_tiny_model,
)
from robustvit.layers import MeanPoolLatent
from robustvit.lipschitz.engine import QUICK_GELU_LIPSCHITZ, BoundFn, register_bound


def _layer_scale(module: nn.Module) -> Tensor | None:
    return module.gamma.detach() if isinstance(module, LayerScale) else None


@register_family
class TimmViT(timm_common.TimmFamily):
    name = "timm-vit"
    source_classes = {"VisionTransformer": VisionTransformer, "VisionTransformerDistilled": VisionTransformerDistilled}

    @staticmethod
    def _check(model: VisionTransformer, *, source: bool) -> None:
        """Refuse configurations whose forward the converter or the bound rule does not model."""
        problems = []
        if model.global_pool not in ("token", "avg", "map"):
            problems.append(f"global_pool={model.global_pool!r} (supported: 'token', 'avg', 'map')")
        if model.dynamic_img_size or not model.patch_embed.flatten:
            problems.append("dynamic image size")
        if isinstance(model.patch_drop, PatchDropout) and not source:  # convert replaces it (see install)
            problems.append("patch dropout (it changes the token grid the converted mixers need)")
        for i, block in enumerate(model.blocks if source else ()):
            attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
            if type(block) is not Block or type(attn) is not Attention or type(mlp) is not Mlp:
                problems.append(
                    f"block {i} ({type(block).__name__}/{type(attn).__name__}/"
                    f"{type(mlp).__name__}; supported: Block/Attention/Mlp)"
                )
            elif not isinstance(block.attn.q_norm, nn.Identity) or not isinstance(block.mlp.norm, nn.Identity):
                problems.append(f"block {i} has qk-norm or an MLP norm")
        if not source:
            problems += TimmViT._attribute_problems(model)
        if problems:
            raise UnsupportedModuleError(f"timm {type(model).__name__} with " + "; ".join(problems))

    @staticmethod
    def _attribute_problems(model: VisionTransformer) -> list[str]:
        """Attributes the forward reads (pooling) that must agree with the module tree: the bound counts tokens
        from the tree, the forward from these attributes."""
        prefix = sum(
            t.shape[1] for t in (model.cls_token, getattr(model, "dist_token", None), model.reg_token) if t is not None
        )
        problems = []
        if model.num_prefix_tokens != prefix:
            problems.append(f"num_prefix_tokens={model.num_prefix_tokens} but the model has {prefix} prefix tokens")
        if model.patch_embed.num_patches != TimmViT._num_patches(model):
            problems.append(
                f"patch_embed.num_patches={model.patch_embed.num_patches} but its convolution makes "
                f"{TimmViT._num_patches(model)} patches of a {tuple(model.patch_embed.img_size)} image"
            )
        pool = model.attn_pool
        if (pool is not None) != (model.global_pool == "map") or (
            pool is not None and (type(pool) is not MeanPoolLatent or pool.num_tokens != TimmViT._pooled(model))
        ):
            problems.append(f"attention pool {type(pool).__name__} that does not read the tokens the forward passes")
        return problems

    @staticmethod
    def _num_patches(model: VisionTransformer) -> int:
        return timm_common.num_patches(model.patch_embed)

    @staticmethod
    def _pooled(model: VisionTransformer) -> int:
        """Tokens the average or attention pooling reads: the patches, with the prefix tokens if it includes them."""
        return TimmViT._num_patches(model) + (model.num_prefix_tokens if model.pool_include_prefix else 0)

    def parts(self, model: nn.Module) -> ViTParts:
        self._check(model, source=True)
        blocks = []
        for block in model.blocks:
            w, b = block.attn.qkv.weight.detach(), block.attn.qkv.bias
            b = b.detach() if b is not None else None
            (wq, wk, wv), (bq, bk, bv) = w.chunk(3), (b.chunk(3) if b is not None else (None,) * 3)
            blocks.append(
                BlockParts(
                    norm1=block.norm1,
                    q=(wq, bq),
                    k=(wk, bk),
                    v=(wv, bv),
                    out=block.attn.proj,
                    num_heads=block.attn.num_heads,
                    ls1=_layer_scale(block.ls1),
                    drop1=block.drop_path1,
                    norm2=block.norm2,
                    mlp=block.mlp,
                    mlp_activation="act",
                    ls2=_layer_scale(block.ls2),
                    drop2=block.drop_path2,
                )
            )
        tokens = [model.cls_token, getattr(model, "dist_token", None), model.reg_token, model.pos_embed]
        pool = model.attn_pool
        return ViTParts(
            patch_conv=model.patch_embed.proj,
            patch_norm=timm_common.norm_or_none(model.patch_embed.norm),
            embed_params=[t for t in tokens if t is not None],
            pre_norm=timm_common.norm_or_none(model.norm_pre),
            blocks=blocks,
            final_norm=timm_common.norm_or_none(model.norm),
            head_norm=timm_common.norm_or_none(model.fc_norm),
            heads=[head for _, head in self.heads(model)],  # none for a feature extractor (num_classes=0)
            grid_size=tuple(model.patch_embed.grid_size),
            num_prefix_tokens=model.num_prefix_tokens,
            head_reads_prefix=self._tokens_read(model) > 0,
            prefix_tokens=[t for t in tokens[:3] if t is not None],
            pool_reads_prefix=model.global_pool in ("avg", "map") and model.pool_include_prefix,
            attention_pool=timm_common.attention_pool_parts(pool, self._pooled(model)) if pool is not None else None,
        )

    @staticmethod
    def _tokens_read(model: nn.Module) -> int:
        """How many prefix tokens the head reads: the distilled pair, the class token, or none (avg pooling)."""
        if isinstance(model, VisionTransformerDistilled):
            return 2
        return 1 if model.global_pool == "token" else 0

    def install(self, model: nn.Module, blocks: list[nn.Module], modules: dict[str, nn.Module]) -> None:
        model.blocks = nn.Sequential(*blocks)
        # Patch dropout drops tokens in training, which the shift grid and L2 attention's token count cannot take;
        # at inference it is the identity anyway.
        model.patch_drop = nn.Identity()
        self._install_modules(model, modules)

    def features_bound(self, model: nn.Module, bound_of: BoundFn) -> Tensor:
        self._check(model, source=False)
        bound = one(model.pos_embed.device if model.pos_embed is not None else None)
        for name in ("patch_embed", "pos_drop", "patch_drop", "norm_pre"):
            bound = bound * bound_of(name, getattr(model, name))
        bound = bound * blocks_bound(list(model.blocks), "blocks", bound_of, self._tokens_read(model))
        bound = bound * bound_of("norm", model.norm)
        if model.attn_pool is not None:  # its bound counts the tokens it pools
            bound = bound * bound_of("attn_pool", model.attn_pool)
        for name in ("fc_norm", "head_drop"):  # per-token (per-feature) layers
            bound = bound * bound_of(name, getattr(model, name))
        if model.global_pool == "avg":  # the mean of n tokens is 1/sqrt(n)-Lipschitz
            bound = bound / math.sqrt(self._pooled(model))
        return bound  # token pooling (and the distilled pair of tokens) is a coordinate selection: 1

    def heads(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        names = ("head", "head_dist") if isinstance(model, VisionTransformerDistilled) else ("head",)
        return [(name, getattr(model, name)) for name in names if not isinstance(getattr(model, name), nn.Identity)]

    def head_weight(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        if isinstance(model, VisionTransformerDistilled):  # (head(x0) + head_dist(x1)) / 2 on the pair (x0, x1)
            weight = torch.cat((linear_weight(model.head), linear_weight(model.head_dist)), dim=1) / 2
            return weight, (linear_bias(model.head) + linear_bias(model.head_dist)) / 2
        return linear_weight(model.head), linear_bias(model.head)

    def _architecture_kwargs(self, model: nn.Module) -> dict:
        block = model.blocks[0]
        return {
            "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
            "qkv_bias": block.attn.qkv.bias is not None,
            "class_token": model.cls_token is not None,
            "reg_tokens": model.num_reg_tokens,
            "no_embed_class": model.no_embed_class,
            "fc_norm": not isinstance(model.fc_norm, nn.Identity),
            "pre_norm": not isinstance(model.norm_pre, nn.Identity),
            # Any value creates LayerScale modules; their values are replaced by the saved weights.
            "init_values": 1.0 if isinstance(block.ls1, LayerScale) else None,
        }


@register_bound(PatchEmbed)
def _patch_embed(module: PatchEmbed, bound_of: BoundFn) -> Tensor:
    # Optional zero padding (dynamic_img_pad) embeds isometrically; flatten/transposes are permutations.
    return bound_of("proj", module.proj) * bound_of("norm", module.norm)


@register_bound(DropPath)
def _drop_path(module: nn.Module, bound_of: BoundFn) -> Tensor:
    return one()  # identity at eval; never discounted by the keep rate


@register_bound(Mlp)
def _mlp(module: Mlp, bound_of: BoundFn) -> Tensor:
    bound = one()
    for name in ("fc1", "act", "drop1", "norm", "fc2", "drop2"):  # Mlp.forward order
        bound = bound * bound_of(name, getattr(module, name))
    return bound


@register_bound(QuickGELU)
def _quick_gelu(module: QuickGELU, bound_of: BoundFn) -> Tensor:
    return one() * QUICK_GELU_LIPSCHITZ  # timm's CLIP ViTs (act_layer="quick_gelu")


def _model_bound(model: nn.Module, bound_of: BoundFn) -> Tensor:
    return TimmViT().model_bound(model, bound_of)


register_bound(VisionTransformer, VisionTransformerDistilled)(_model_bound)


# ------------------------------------------------------------------------------------------------- tiny models

_TINY_VIT = {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}


def _tiny(architecture: str, **kwargs) -> Callable[[int, int, int], nn.Module]:
    def build(image_size: int, num_classes: int, channels: int) -> nn.Module:
        return timm.create_model(
            architecture, pretrained=False, img_size=image_size, num_classes=num_classes, in_chans=channels, **kwargs
        )

    return build


for _name, _architecture, _kwargs, _description in (
    ("timm_token", "vit_tiny_patch16_224", _TINY_VIT, "class-token pooling, the plain ViT"),
    (
        "timm_avg_ls_reg",
        "vit_tiny_patch16_224",
        {**_TINY_VIT, "num_heads": 4, "global_pool": "avg", "fc_norm": True, "init_values": 0.3, "reg_tokens": 2},
        "average pooling, fc_norm, LayerScale and register tokens",
    ),
    ("timm_distilled", "deit_tiny_distilled_patch16_224", _TINY_VIT, "DeiT with a distillation token and head"),
    (
        "timm_map",
        "vit_tiny_patch16_224",
        {**_TINY_VIT, "global_pool": "map", "class_token": False},
        "attention pooling (a MAP head) without a class token, as SigLIP",
    ),
    (
        "timm_patch4",
        "vit_tiny_patch16_224",
        {"patch_size": 4, "depth": 1, "embed_dim": 64, "num_heads": 2},
        "more tokens (4-pixel patches), one block",
    ),
):
    register_tiny_model(_name, TimmViT.name, _tiny(_architecture, **_kwargs), _description)
