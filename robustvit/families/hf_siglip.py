"""transformers ``SiglipForImageClassification``: SigLIP's vision encoder with a linear head on the mean of all its
tokens (it has no class token), after ``post_layernorm``.

The vision model's attention-pooling head (``vision_use_head=True``, ``SiglipMultiheadAttentionPoolingHead``) only
makes ``pooler_output``, which the classifier discards: it is listed as unread (outside the bound). The activation is
the tanh form of GELU (``gelu_pytorch_tanh``, max slope 1.128993, within
:data:`~robustvit.lipschitz.GELU_LIPSCHITZ`).
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import SiglipConfig, SiglipVisionConfig
from transformers.activations import GELUTanh
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD
from transformers.models.siglip import modeling_siglip as siglip

from robustvit.errors import UnsupportedModuleError
from robustvit.families.base import one, register_family, register_tiny_model
from robustvit.families.hf_base import TINY_ENCODER, HFVisionTowerFamily, fc_mlp_bound
from robustvit.lipschitz.engine import GELU_LIPSCHITZ, BoundFn, record_methods, register_bound

__all__ = ["HFSiglip"]


@register_family
class HFSiglip(HFVisionTowerFamily):
    name = "transformers-siglip"
    normalization = {siglip.SiglipForImageClassification: (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)}
    layer_types = (siglip.SiglipEncoderLayer,)
    pooling = "mean"
    unread = ("vision_model.head",)

    def _prefix_tokens(self, model: nn.Module) -> list[nn.Parameter]:
        return []

    def _norm_owners(self, model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        return {"final_norm": (model.vision_model, "post_layernorm")}


# The rules visit the vision model's children, not it or its encoder: their forward runs unvisited.
record_methods(siglip.SiglipVisionModel, siglip.SiglipEncoder)


@register_bound(siglip.SiglipForImageClassification)
def _model_bound(model: nn.Module, bound_of: BoundFn) -> Tensor:
    return HFSiglip().model_bound(model, bound_of)


@register_bound(siglip.SiglipVisionEmbeddings)
def _embeddings(module: nn.Module, bound_of: BoundFn) -> Tensor:
    # The (interpolated) position embedding is a constant: addition.
    return bound_of("patch_embedding", module.patch_embedding)  # then flatten + transpose: a permutation


register_bound(siglip.SiglipMLP)(fc_mlp_bound)


@register_bound(GELUTanh)
def _gelu_tanh(module: GELUTanh, bound_of: BoundFn) -> Tensor:
    if module.act != module._gelu_tanh_python and getattr(module.act, "keywords", None) != {"approximate": "tanh"}:
        raise UnsupportedModuleError(f"GELUTanh with an unknown function {module.act!r}")
    return one() * GELU_LIPSCHITZ  # the tanh form's max slope, 1.128993, is within it


# ------------------------------------------------------------------------------------------------- tiny models


def _tiny(image_size: int, num_classes: int, channels: int) -> nn.Module:
    vision = SiglipVisionConfig(
        image_size=image_size,
        **TINY_ENCODER,
        intermediate_size=96,
        num_channels=channels,
        vision_use_head=False,  # the classifier never reads it (see HFSiglip.unread)
    )
    return siglip.SiglipForImageClassification(SiglipConfig(vision_config=vision.to_dict(), num_labels=num_classes))


register_tiny_model(
    "hf_siglip", HFSiglip.name, _tiny, "transformers SigLIP vision classifier: no class token, mean of all tokens"
)
