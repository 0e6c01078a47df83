"""transformers ``Dinov2ForImageClassification`` and ``Dinov2WithRegistersForImageClassification``.

LayerScale (``layer_scale1/2.lambda1``) folds into the residual weights, register tokens are prefix tokens, and the
classifier reads ``[h_0, mean of the patch tokens]`` of the last hidden state (bounded in
:meth:`~robustvit.families.hf_base.HFFamily.features_bound`). The SwiGLU MLP (``use_swiglu_ffn=True``) is refused:
the product of its two branches has no global bound.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import Dinov2Config, Dinov2WithRegistersConfig
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.dinov2 import modeling_dinov2 as dinov2
from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as registers

from robustvit.families.base import BlockParts, one, register_family, register_tiny_model
from robustvit.families.hf_base import HFFamily, fc_mlp_bound, linear_pair, tiny_classifier
from robustvit.lipschitz.engine import BoundFn, record_methods, register_bound

_CLASSIFIERS = (dinov2.Dinov2ForImageClassification, registers.Dinov2WithRegistersForImageClassification)


@register_family
class HFDinov2(HFFamily):
    name = "transformers-dinov2"
    # The facebook/dinov2-* processors normalize with ImageNet's statistics (their class's defaults are CLIP's).
    normalization = {cls: (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) for cls in _CLASSIFIERS}
    layer_types = (dinov2.Dinov2Layer, registers.Dinov2WithRegistersLayer)
    pooling = "token_and_patch_mean"

    def _backbone(self, model: nn.Module) -> nn.Module:
        return model.base_model  # dinov2 or dinov2_with_registers

    def _layer_list(self, model: nn.Module) -> tuple[nn.Module, str]:
        return self._backbone(model).encoder, "layer"

    def _capturing_model(self, model: nn.Module) -> nn.Module:
        return self._backbone(model).encoder

    def _prefix_tokens(self, model: nn.Module) -> list[nn.Parameter]:
        embeddings = self.embeddings(model)
        return [t for t in (embeddings.cls_token, getattr(embeddings, "register_tokens", None)) if t is not None]

    def _norm_owners(self, model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        return {"final_norm": (self._backbone(model), "layernorm")}

    def _check(self, model: nn.Module) -> list[str]:
        if model.config.use_swiglu_ffn:
            return [
                "its SwiGLU MLP (use_swiglu_ffn=True: the product of two branches has no global Lipschitz bound; "
                "no gated-MLP substitute is registered for transformers' Dinov2SwiGLUFFN)"
            ]
        return []

    def _block_parts(self, layer: nn.Module, num_heads: int) -> BlockParts:
        return BlockParts(
            norm1=layer.norm1,
            q=linear_pair(layer.attention.q_proj),
            k=linear_pair(layer.attention.k_proj),
            v=linear_pair(layer.attention.v_proj),
            out=layer.attention.o_proj,
            num_heads=num_heads,
            ls1=layer.layer_scale1.lambda1.detach(),
            drop1=layer.drop_path,
            norm2=layer.norm2,
            mlp=layer.mlp,
            mlp_activation="activation_fn",
            ls2=layer.layer_scale2.lambda1.detach(),
            drop2=layer.drop_path,
        )


# The rules visit the backbone's children, not the backbone or its encoder: their forward runs unvisited.
record_methods(dinov2.Dinov2Model, dinov2.Dinov2Encoder, registers.Dinov2WithRegistersModel)
record_methods(registers.Dinov2WithRegistersEncoder)


@register_bound(*_CLASSIFIERS)
def _model_bound(model: nn.Module, bound_of: BoundFn) -> Tensor:
    return HFDinov2().model_bound(model, bound_of)


@register_bound(dinov2.Dinov2Embeddings, registers.Dinov2WithRegistersEmbeddings)
def embeddings(module: nn.Module, bound_of: BoundFn) -> Tensor:
    # Class and register tokens and the position embedding are constants (concatenation, addition: 1-Lipschitz),
    # the interpolated position embedding too (it depends on the input's shape only); the mask token is used only
    # with bool_masked_pos, which the classifiers never pass.
    return bound_of("patch_embeddings", module.patch_embeddings) * bound_of("dropout", module.dropout)


@register_bound(dinov2.Dinov2PatchEmbeddings, registers.Dinov2WithRegistersPatchEmbeddings)
def _patch_embeddings(module: nn.Module, bound_of: BoundFn) -> Tensor:
    return bound_of("projection", module.projection)  # then flatten + transpose: a permutation


register_bound(dinov2.Dinov2MLP, registers.Dinov2WithRegistersMLP)(fc_mlp_bound)


@register_bound(dinov2.Dinov2DropPath, registers.Dinov2WithRegistersDropPath)
def _drop_path(module: nn.Module, bound_of: BoundFn) -> Tensor:
    return one()  # identity at eval; never discounted by the keep rate


# ------------------------------------------------------------------------------------------------- tiny models


_TINY_DINOV2 = {"mlp_ratio": 2, "layerscale_value": 0.5}

register_tiny_model(
    "hf_dinov2",
    HFDinov2.name,
    tiny_classifier(Dinov2Config, dinov2.Dinov2ForImageClassification, **_TINY_DINOV2, use_mask_token=False),
    "transformers DINOv2: LayerScale, class token + mean of patches head",
)
register_tiny_model(
    "hf_dinov2_reg",
    HFDinov2.name,
    tiny_classifier(
        Dinov2WithRegistersConfig,
        registers.Dinov2WithRegistersForImageClassification,
        **_TINY_DINOV2,
        num_register_tokens=2,
    ),
    "transformers DINOv2 with 2 register tokens",
)
