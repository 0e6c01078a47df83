"""timm ``Beit`` family: BEiT and BEiT v2 (relative position bias, LayerScale ``gamma_1`` / ``gamma_2``, mean pooling
with ``fc_norm``).

The relative position bias, per block or shared, lives in the attention and leaves with it: the converted mixer
replaces the attention branch (``ConvertConfig.mixer``).
"""

from __future__ import annotations

import math

import timm
from timm.models.beit import Attention, Beit, Block
from torch import Tensor, nn

from robustvit.errors import UnsupportedModuleError
from robustvit.families import timm_common
from robustvit.families.base import ViTParts, blocks_bound, one, register_family, register_tiny_model
from robustvit.lipschitz.engine import BoundFn, register_bound


@register_family
class TimmBeit(timm_common.TimmFamily):
    name = "timm-beit"
    source_classes = {"Beit": Beit}

    @staticmethod
    def _check(model: Beit, *, source: bool) -> None:
        """Refuse configurations whose forward the converter or the bound rule does not model."""
        problems = []
        if model.global_pool not in ("token", "avg"):
            problems.append(f"global_pool={model.global_pool!r} (supported: 'token', 'avg')")
        if not model.patch_embed.flatten or not model.patch_embed.strict_img_size:
            problems.append("dynamic image size")
        for i, block in enumerate(model.blocks if source else ()):
            if type(block) is not Block or type(block.attn) is not Attention:
                problems.append(f"block {i} ({type(block).__name__}/{type(block.attn).__name__}; supported: Block)")
        if not source and model.rel_pos_bias is not None:
            problems.append("a shared relative position bias on a converted model (it left with the attention)")
        if not source and model.patch_embed.num_patches != timm_common.num_patches(model.patch_embed):
            problems.append("patch_embed.num_patches that disagrees with its convolution")
        if problems:
            raise UnsupportedModuleError("timm Beit with " + "; ".join(problems))

    def parts(self, model: nn.Module) -> ViTParts:
        self._check(model, source=True)
        dim = model.embed_dim
        blocks = [timm_common.gamma_block_parts(b, dim, f"block {i}") for i, b in enumerate(model.blocks)]
        tokens = [t for t in (model.cls_token, model.pos_embed) if t is not None]
        return ViTParts(
            patch_conv=model.patch_embed.proj,
            patch_norm=timm_common.norm_or_none(model.patch_embed.norm),
            embed_params=tokens,
            pre_norm=None,
            blocks=blocks,
            final_norm=timm_common.norm_or_none(model.norm),
            head_norm=timm_common.norm_or_none(model.fc_norm),
            heads=[head for _, head in self.heads(model)],
            grid_size=tuple(model.patch_embed.grid_size),
            num_prefix_tokens=model.num_prefix_tokens,
            head_reads_prefix=model.global_pool == "token",
            prefix_tokens=[model.cls_token],
        )

    def install(self, model: nn.Module, blocks: list[nn.Module], modules: dict[str, nn.Module]) -> None:
        model.blocks = nn.ModuleList(blocks)
        model.rel_pos_bias = None  # the shared relative position bias only fed the attention
        self._install_modules(model, modules)

    def features_bound(self, model: nn.Module, bound_of: BoundFn) -> Tensor:
        self._check(model, source=False)
        bound = one(model.cls_token.device)
        for name in ("patch_embed", "pos_drop"):
            bound = bound * bound_of(name, getattr(model, name))
        tokens_read = 1 if model.global_pool == "token" else 0
        bound = bound * blocks_bound(list(model.blocks), "blocks", bound_of, tokens_read)
        for name in ("norm", "fc_norm", "head_drop"):  # per-token layers
            bound = bound * bound_of(name, getattr(model, name))
        if model.global_pool == "avg":  # the mean of the patch tokens (the class token excluded)
            bound = bound / math.sqrt(timm_common.num_patches(model.patch_embed))
        return bound

    def _architecture_kwargs(self, model: nn.Module) -> dict:
        block = model.blocks[0]
        return {
            "qkv_bias": block.attn.q_bias is not None,
            "mlp_ratio": timm_common.hidden_ratio(timm_common.mlp_hidden(block.mlp), model.embed_dim),
            "swiglu_mlp": type(block.mlp) is not timm.layers.Mlp,
            "scale_mlp": not isinstance(block.mlp.norm, nn.Identity),
            # Any value creates the gamma parameters; their values are replaced by the saved weights.
            "init_values": 1.0 if block.gamma_1 is not None else None,
            "use_abs_pos_emb": model.pos_embed is not None,
            "use_rel_pos_bias": block.attn.relative_position_bias_table is not None,
            "use_shared_rel_pos_bias": model.rel_pos_bias is not None,
            "use_fc_norm": not isinstance(model.fc_norm, nn.Identity),
        }


def _model_bound(model: nn.Module, bound_of: BoundFn) -> Tensor:
    return TimmBeit().model_bound(model, bound_of)


register_bound(Beit)(_model_bound)


def _tiny(**kwargs):
    def build(image_size: int, num_classes: int, channels: int) -> nn.Module:
        return timm.create_model(
            "beit_base_patch16_224",
            pretrained=False,
            img_size=image_size,
            num_classes=num_classes,
            in_chans=channels,
            **kwargs,
        )

    return build


register_tiny_model(
    "timm_beit",
    TimmBeit.name,
    # A head at timm's default scale: BEiT's fine-tuning init (head_init_scale=0.001) hides the head in every test.
    _tiny(patch_size=8, depth=2, embed_dim=48, num_heads=3, head_init_scale=1.0),
    "BEiT: relative position bias, LayerScale gamma_1/gamma_2, mean pooling with fc_norm",
)
