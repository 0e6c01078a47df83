"""Per-family adapters: one small file per model family, registered with ``@register_family``."""

from robustvit.families import hf_vit, timm_vit  # noqa: F401  (registration)
from robustvit.families.base import (
    FAMILIES,
    NATIVE_RECORD_KEY,
    BlockParts,
    Family,
    InputSpec,
    ViTParts,
    family_by_name,
    get_family,
    linear_head,
    native_record,
    rebuild_converted,
    register_family,
    registered_families,
)

__all__ = [
    "FAMILIES",
    "NATIVE_RECORD_KEY",
    "BlockParts",
    "Family",
    "InputSpec",
    "ViTParts",
    "family_by_name",
    "get_family",
    "linear_head",
    "native_record",
    "rebuild_converted",
    "register_family",
    "registered_families",
]
