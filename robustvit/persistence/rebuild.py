"""A converted architecture from its record, with placeholder weights: what every loader starts from."""

from __future__ import annotations

from torch import nn

from robustvit.conversion.config import ConvertConfig
from robustvit.conversion.convert import convert
from robustvit.conversion.metadata import LIBRARY_METADATA
from robustvit.families import family_by_name

__all__ = ["rebuild_converted"]


def rebuild_converted(record: dict) -> nn.Module:
    """The converted architecture a :func:`~robustvit.conversion.metadata.native_record` (or robustvit's
    ``config.json``) describes, with placeholder weights (nothing downloaded)."""
    family = family_by_name(record["family"])
    model = convert(family.build(record["source"]), ConvertConfig.from_dict(record["convert_config"]), inplace=True)
    model.robustvit_source = record["source"]  # as stored, so that saving again writes the same record
    LIBRARY_METADATA[family.name](model)
    return model
