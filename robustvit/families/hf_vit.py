"""transformers 5.x ``ViTForImageClassification``, ``DeiTForImageClassification`` and ``ViTMSNForImageClassification``
(MSN-pretrained ViTs: the same modules under ViTMSN names).

5.x module names: ``vit.layers[i]`` with ``attention.{q,k,v,o}_proj``, ``mlp.fc1/fc2``,
``layernorm_before/after`` (files on disk keep the legacy 4.x key names; transformers renames them on load).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import DeiTConfig, ViTConfig, ViTMSNConfig
from transformers.activations import GELUActivation
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
)
from transformers.models.deit.modeling_deit import (
    DeiTEmbeddings,
    DeiTForImageClassification,
    DeiTLayer,
    DeiTMLP,
    DeiTModel,
    DeiTPatchEmbeddings,
)
from transformers.models.vit.modeling_vit import (
    ViTEmbeddings,
    ViTForImageClassification,
    ViTLayer,
    ViTMLP,
    ViTModel,
    ViTPatchEmbeddings,
)
from transformers.models.vit_msn.modeling_vit_msn import (
    ViTMSNEmbeddings,
    ViTMSNForImageClassification,
    ViTMSNLayer,
    ViTMSNMLP,
    ViTMSNModel,
    ViTMSNPatchEmbeddings,
)

from robustvit.errors import UnsupportedModuleError
from robustvit.families.base import BlockParts, one, register_family, register_tiny_model
from robustvit.families.hf_base import HFFamily, fc_mlp_bound, linear_pair, tiny_classifier
from robustvit.lipschitz.engine import GELU_LIPSCHITZ, BoundFn, record_methods, register_bound

# The processors' defaults (ViTImageProcessor, also ViTMSN's: "standard" 0.5; DeiTImageProcessor: ImageNet's).
_DEFAULT_NORMALIZATION = {
    ViTForImageClassification: (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD),
    DeiTForImageClassification: (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ViTMSNForImageClassification: (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD),
}
_LAYER_TYPES = (ViTLayer, DeiTLayer, ViTMSNLayer)


@register_family
class HFViT(HFFamily):
    name = "transformers-vit"
    normalization = _DEFAULT_NORMALIZATION
    layer_types = _LAYER_TYPES
    pooling = "token"  # the classifiers read token 0 (DeiT's: the class token)

    def _prefix_tokens(self, model: nn.Module) -> list[nn.Parameter]:
        embeddings = self.embeddings(model)  # vit (ViT, ViTMSN) or deit
        return [t for t in (embeddings.cls_token, getattr(embeddings, "distillation_token", None)) if t is not None]

    def _norm_owners(self, model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        return {"final_norm": (model.base_model, "layernorm")}

    def _check(self, model: nn.Module) -> list[str]:
        act = model.config.hidden_act
        return [] if act == "gelu" else [f"hidden_act={act!r} (supported: 'gelu')"]

    def _block_parts(self, layer: nn.Module, num_heads: int) -> BlockParts:
        return BlockParts(
            norm1=layer.layernorm_before,
            q=linear_pair(layer.attention.q_proj),
            k=linear_pair(layer.attention.k_proj),
            v=linear_pair(layer.attention.v_proj),
            out=layer.attention.o_proj,
            num_heads=num_heads,
            ls1=None,
            drop1=layer.dropout,
            norm2=layer.layernorm_after,
            mlp=layer.mlp,
            mlp_activation="activation_fn",
            ls2=None,
            drop2=layer.dropout,
        )


# The rules visit the backbones' children, not the backbones: their forward runs unvisited, so record it.
record_methods(ViTModel, DeiTModel, ViTMSNModel)


@register_bound(ViTForImageClassification, DeiTForImageClassification, ViTMSNForImageClassification)
def _model_bound(model: nn.Module, bound_of: BoundFn) -> Tensor:
    return HFViT().model_bound(model, bound_of)


@register_bound(ViTEmbeddings, DeiTEmbeddings, ViTMSNEmbeddings)
def _embeddings(module: nn.Module, bound_of: BoundFn) -> Tensor:
    # Prefix tokens and position embeddings are constants (concatenation and addition: 1-Lipschitz). The
    # interpolated position encoding is a constant too; mask tokens are never used by the classifiers.
    return bound_of("patch_embeddings", module.patch_embeddings) * bound_of("dropout", module.dropout)


@register_bound(ViTPatchEmbeddings, DeiTPatchEmbeddings, ViTMSNPatchEmbeddings)
def _patch_embeddings(module: nn.Module, bound_of: BoundFn) -> Tensor:
    return bound_of("projection", module.projection)  # then flatten + transpose: a permutation


register_bound(ViTMLP, DeiTMLP, ViTMSNMLP)(fc_mlp_bound)


@register_bound(GELUActivation)
def _gelu(module: GELUActivation, bound_of: BoundFn) -> Tensor:
    if module.act not in (torch.nn.functional.gelu, module._gelu_python):
        raise UnsupportedModuleError(f"GELUActivation with an unknown function {module.act!r}")
    return one() * GELU_LIPSCHITZ


# ------------------------------------------------------------------------------------------------- tiny models


for _name, _config_class, _model_class, _description in (
    ("hf_vit", ViTConfig, ViTForImageClassification, "transformers ViT"),
    ("hf_deit", DeiTConfig, DeiTForImageClassification, "transformers DeiT"),
    ("hf_vit_msn", ViTMSNConfig, ViTMSNForImageClassification, "transformers ViTMSN"),
):
    _builder = tiny_classifier(_config_class, _model_class, intermediate_size=96)
    register_tiny_model(_name, HFViT.name, _builder, _description)
