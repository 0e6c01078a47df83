"""Per-family adapters: one small file per model family, registered with ``@register_family``, with the tiny
configurations the tests build (``register_tiny_model``)."""

from robustvit.families import (  # noqa: F401  (registration)
    hf_clip,
    hf_dinov2,
    hf_siglip,
    hf_timm_wrapper,
    hf_vit,
    timm_beit,
    timm_eva,
    timm_vit,
)
from robustvit.families.base import (
    FAMILIES,
    RMS_NORM_TYPES,
    TINY_MODELS,
    AttentionPoolParts,
    BlockParts,
    Family,
    GatedMlpParts,
    InputSpec,
    TinyModel,
    ViTParts,
    create_tiny_model,
    family_by_name,
    get_family,
    linear_head,
    register_family,
    register_tiny_model,
    registered_families,
    tiny_models,
)

__all__ = [
    "FAMILIES",
    "TINY_MODELS",
    "AttentionPoolParts",
    "BlockParts",
    "Family",
    "GatedMlpParts",
    "InputSpec",
    "RMS_NORM_TYPES",
    "TinyModel",
    "ViTParts",
    "create_tiny_model",
    "family_by_name",
    "get_family",
    "linear_head",
    "register_family",
    "register_tiny_model",
    "registered_families",
    "tiny_models",
]
