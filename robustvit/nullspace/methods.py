"""The finetuning methods ``recipes/finetune_nullspace.py`` compares, by name: the token noise each trains with.

Example:
    >>> FINETUNING_METHODS.list()
    ['nullspace', 'ce', 'random']
    >>> FINETUNING_METHODS["random"].noise_kind
    'random'
"""

from __future__ import annotations

from typing import NamedTuple

from robustvit.registry import Registry

__all__ = ["FINETUNING_METHODS", "FinetuningMethod"]


class FinetuningMethod(NamedTuple):
    """A finetuning method: the kind of token noise it trains with (``None``: plain cross-entropy)."""

    noise_kind: str | None
    description: str


FINETUNING_METHODS: Registry[FinetuningMethod] = Registry("finetuning method")
FINETUNING_METHODS.register(
    "nullspace",
    FinetuningMethod("nullspace", "CE(clean) + CE(tokens + eps-approximate nullspace noise), noise per epoch"),
)
FINETUNING_METHODS.register("ce", FinetuningMethod(None, "plain cross-entropy finetune, same budget"))
FINETUNING_METHODS.register(
    "random",
    FinetuningMethod("random", "CE(clean) + CE(tokens + Gaussian noise shrunk x0.8 until within eps), per epoch"),
)
