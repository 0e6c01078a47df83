"""Per-family adapters: one small file per model family, registered with ``@register_family``."""

from robustvit.families import hf_vit, timm_vit  # noqa: F401  (registration)
from robustvit.families.base import (
    BlockParts,
    Family,
    InputSpec,
    ViTParts,
    family_by_name,
    get_family,
    linear_head,
    register_family,
    registered_families,
)

__all__ = [
    "BlockParts",
    "Family",
    "InputSpec",
    "ViTParts",
    "family_by_name",
    "get_family",
    "linear_head",
    "register_family",
    "registered_families",
]
