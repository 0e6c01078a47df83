"""transformers ``BeitForImageClassification``: BEiT and BEiT v2 (relative position bias, LayerScale ``lambda_1`` /
``lambda_2``, mean pooling with ``pooler.layernorm``), as :mod:`robustvit.families.timm_beit` is in timm.

The relative position bias, per layer (``use_relative_position_bias``) or shared
(``use_shared_relative_position_bias``, ``beit.shared_position_bias``), only feeds the attention and leaves with it:
the converted mixer replaces the attention branch (``ConvertConfig.mixer``). LayerScale folds into the residual
weights. With ``use_mean_pooling`` (the default) the classifier reads the LayerNorm of the mean of the patch tokens
(a head norm, after the pooling); otherwise the class token after ``beit.layernorm``.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import BeitConfig
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD
from transformers.models.beit import modeling_beit as beit

from robustvit.errors import UnsupportedModuleError
from robustvit.families.base import BlockParts, one, register_family, register_tiny_model
from robustvit.families.hf_base import HFFamily, fc_mlp_bound, linear_pair, tiny_classifier
from robustvit.lipschitz.engine import BoundFn, record_methods, register_bound

__all__ = ["HFBeit"]


def _layer_scale(value: nn.Parameter | float) -> Tensor | None:
    """``lambda_1`` / ``lambda_2``: a parameter, or the float 1.0 when ``layer_scale_init_value`` is 0."""
    return value.detach() if isinstance(value, nn.Parameter) else None


@register_family
class HFBeit(HFFamily):
    name = "transformers-beit"
    # BeitImageProcessor's defaults, and the microsoft/beit-* processors': "standard" 0.5.
    normalization = {beit.BeitForImageClassification: (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)}
    layer_types = (beit.BeitLayer,)

    @staticmethod
    def _pooler(model: nn.Module) -> nn.Module:
        if model.beit.pooler is None:
            raise UnsupportedModuleError(
                "a BeitForImageClassification without a pooler (its logits read pooler_output)"
            )
        return model.beit.pooler

    def pooling_of(self, model: nn.Module) -> str:
        # Read off the modules, as the pooler's forward decides (use_mean_pooling built them).
        return "patch_mean" if self._pooler(model).layernorm is not None else "token"

    def _prefix_tokens(self, model: nn.Module) -> list[nn.Parameter]:
        return [self.embeddings(model).cls_token]

    def _norm_owners(self, model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        # Mean pooling (use_mean_pooling): beit.layernorm is an Identity and the pooler normalizes the pooled features.
        owners = {}
        if not isinstance(model.beit.layernorm, nn.Identity):
            owners["final_norm"] = (model.beit, "layernorm")
        if self._pooler(model).layernorm is not None:
            owners["head_norm"] = (model.beit.pooler, "layernorm")
        return owners

    def _check(self, model: nn.Module) -> list[str]:
        act = model.config.hidden_act
        return [] if act == "gelu" else [f"hidden_act={act!r} (supported: 'gelu')"]

    def install(self, model: nn.Module, blocks: list[nn.Module], modules: dict[str, nn.Module]) -> None:
        super().install(model, blocks, modules)
        model.beit.shared_position_bias = None  # the shared relative position bias only fed the attention

    def features_bound(self, model: nn.Module, bound_of: BoundFn) -> Tensor:
        if model.beit.shared_position_bias is not None:
            # The converted blocks take no attention bias: the forward would add it to a mask they refuse.
            raise UnsupportedModuleError(
                "a converted BeitForImageClassification with a shared relative position bias (it left with the "
                "attention)"
            )
        return super().features_bound(model, bound_of)

    def _block_parts(self, layer: nn.Module, num_heads: int) -> BlockParts:
        # Each residual branch ends in dropout, LayerScale, then drop path: the scale folds into the residual's
        # alpha, and dropout and drop path (both the identity at eval) stay on the branch, in that order.
        return BlockParts(
            norm1=layer.layernorm_before,
            q=linear_pair(layer.attention.q_proj),
            k=linear_pair(layer.attention.k_proj),
            v=linear_pair(layer.attention.v_proj),
            out=layer.attention.o_proj,
            num_heads=num_heads,
            ls1=_layer_scale(layer.lambda_1),
            drop1=nn.Sequential(layer.dropout, layer.drop_path),
            norm2=layer.layernorm_after,
            mlp=layer.mlp,
            mlp_activation="activation_fn",
            ls2=_layer_scale(layer.lambda_2),
            drop2=nn.Sequential(layer.dropout, layer.drop_path),
        )


# The rules visit the backbone's and the pooler's children, not them: their forward runs unvisited, so record it.
record_methods(beit.BeitModel, beit.BeitPooler)


@register_bound(beit.BeitForImageClassification)
def _model_bound(model: nn.Module, bound_of: BoundFn) -> Tensor:
    return HFBeit().model_bound(model, bound_of)


@register_bound(beit.BeitEmbeddings)
def _embeddings(module: nn.Module, bound_of: BoundFn) -> Tensor:
    # The class token and the (interpolated) position embedding are constants: concatenation and addition. The mask
    # token replaces the patches a boolean bool_masked_pos selects (x (1 - m) + t m, m in {0, 1}: 1-Lipschitz).
    return bound_of("patch_embeddings", module.patch_embeddings) * bound_of("dropout", module.dropout)


@register_bound(beit.BeitPatchEmbeddings)
def _patch_embeddings(module: nn.Module, bound_of: BoundFn) -> Tensor:
    return bound_of("projection", module.projection)  # then flatten + transpose: a permutation


register_bound(beit.BeitMLP)(fc_mlp_bound)


@register_bound(beit.BeitDropPath)
def _drop_path(module: nn.Module, bound_of: BoundFn) -> Tensor:
    return one()  # identity at eval; never discounted by the keep rate


# ------------------------------------------------------------------------------------------------- tiny models


register_tiny_model(
    "hf_beit",
    HFBeit.name,
    tiny_classifier(
        BeitConfig,
        beit.BeitForImageClassification,
        intermediate_size=96,
        layer_scale_init_value=0.5,
        drop_path_rate=0.0,  # BEiT's default 0.1 makes train-mode passes random (tests compare two of them)
        use_relative_position_bias=True,
    ),
    "transformers BEiT: relative position bias, LayerScale lambda_1/lambda_2, mean pooling with its LayerNorm",
)
