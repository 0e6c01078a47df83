"""transformers ``CLIPForImageClassification``: CLIP's vision encoder with a linear head on the mean of its patch
tokens, and the form a ``CLIPVisionModel`` takes with a linear head (:func:`clip_classifier`).

The pre-LayerNorm (``pre_layrnorm``) becomes a CenterNorm like every other norm. The classifier reads the encoder's
last hidden state without ``post_layernorm`` (which only the pooled class token, ``pooler_output``, goes through:
the logits never see it, so it is left as it is and outside the bound). The activation is CLIP's quick-GELU
(``x sigmoid(1.702 x)``, bound :data:`~robustvit.lipschitz.QUICK_GELU_LIPSCHITZ`).
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import CLIPConfig, CLIPVisionConfig
from transformers.activations import QuickGELUActivation
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.clip import modeling_clip as clip

from robustvit.families.base import REFUSAL_HINTS, one, register_family, register_tiny_model
from robustvit.families.hf_base import TINY_ENCODER, HFVisionTowerFamily, fc_mlp_bound
from robustvit.lipschitz.engine import QUICK_GELU_LIPSCHITZ, BoundFn, record_methods, register_bound

__all__ = ["HFCLIP", "clip_classifier"]


@register_family
class HFCLIP(HFVisionTowerFamily):
    name = "transformers-clip"
    normalization = {clip.CLIPForImageClassification: (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)}  # CLIPImageProcessor's
    layer_types = (clip.CLIPEncoderLayer,)
    pooling = "patch_mean"
    unread = ("vision_model.post_layernorm",)

    def _prefix_tokens(self, model: nn.Module) -> list[nn.Parameter]:
        return [self.embeddings(model).class_embedding]

    def _norm_owners(self, model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        return {"pre_norm": (model.vision_model, "pre_layrnorm")}


def clip_classifier(vision_model: clip.CLIPVisionModel, num_labels: int) -> clip.CLIPForImageClassification:
    """A ``CLIPVisionModel`` with a linear head, as transformers builds it: a ``CLIPForImageClassification`` holding
    a copy of ``vision_model``'s weights and a fresh ``nn.Linear`` on the mean of the patch tokens.

    This is the "CLIPVisionModel plus a linear head" robustvit converts: a transformers class, so that
    ``save_pretrained``, the Auto classes and ``pipeline`` work on the converted model as on any other.

    Example:
        >>> from transformers import CLIPVisionConfig, CLIPVisionModel
        >>> vision = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32,
        ...                                           intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
        >>> model = clip_classifier(vision, num_labels=10)
        >>> robustvit.convert(model)(torch.rand(1, 3, 32, 32)).logits.shape
        torch.Size([1, 10])
    """
    if type(vision_model) is not clip.CLIPVisionModel:
        raise TypeError(f"expected a transformers CLIPVisionModel, got {type(vision_model).__name__}")
    config = CLIPConfig(vision_config=vision_model.config.to_dict(), num_labels=num_labels)
    model = clip.CLIPForImageClassification(config).to(vision_model.dtype)
    model.vision_model.load_state_dict(vision_model.state_dict(), strict=True)
    return model.to(vision_model.device)


REFUSAL_HINTS.register(
    clip.CLIPVisionModel,
    "A CLIPVisionModel has no classifier: robustvit.families.hf_clip.clip_classifier(model, num_labels) gives it "
    "a linear head, and that model converts",
)

# The rules visit the vision model's children, not it or its encoder: their forward runs unvisited.
record_methods(clip.CLIPVisionModel, clip.CLIPEncoder)


@register_bound(clip.CLIPForImageClassification)
def _model_bound(model: nn.Module, bound_of: BoundFn) -> Tensor:
    return HFCLIP().model_bound(model, bound_of)


@register_bound(clip.CLIPVisionEmbeddings)
def _embeddings(module: nn.Module, bound_of: BoundFn) -> Tensor:
    # The class embedding and the (interpolated) position embedding are constants: concatenation and addition.
    return bound_of("patch_embedding", module.patch_embedding)  # then flatten + transpose: a permutation


register_bound(clip.CLIPMLP)(fc_mlp_bound)


@register_bound(QuickGELUActivation)
def _quick_gelu(module: nn.Module, bound_of: BoundFn) -> Tensor:
    return one() * QUICK_GELU_LIPSCHITZ


# ------------------------------------------------------------------------------------------------- tiny models


def _tiny(image_size: int, num_classes: int, channels: int) -> nn.Module:
    vision = CLIPVisionConfig(
        image_size=image_size,
        **TINY_ENCODER,
        intermediate_size=96,
        num_channels=channels,
    )
    return clip.CLIPForImageClassification(CLIPConfig(vision_config=vision.to_dict(), num_labels=num_classes))


register_tiny_model(
    "hf_clip", HFCLIP.name, _tiny, "transformers CLIP vision classifier: pre-LayerNorm, quick-GELU, mean of patches"
)
