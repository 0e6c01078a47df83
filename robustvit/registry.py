"""One registry type for every pluggable piece: families, bound rules, mixers, losses, corruptions, attacks, ...

Modelled on timm's model registry and PEFT's ``register_peft_method``: a name maps to one object, registering a
taken name is an error (a silent overwrite would change behaviour depending on import order), and an unknown name
raises an error that lists the known ones.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, in registration order.

    Args:
        kind: what the entries are, for error messages (``"mixer"``, ``"loss"``, ...).

    Example:
        >>> activations = Registry("activation")
        >>> @activations.register("double")
        ... def double(x):
        ...     return 2 * x
        >>> activations.register("triple", lambda x: 3 * x)  # doctest: +ELLIPSIS
        <function <lambda> at ...>
        >>> activations["double"](4)
        8
        >>> activations.list("t*")
        ['triple']
        >>> activations["half"]
        Traceback (most recent call last):
        ...
        KeyError: "unknown activation 'half'; known: double, triple"
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> T | Callable[[T], T]:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator that registers what it decorates."""
        if obj is None:
            return lambda decorated: self.register(name, decorated)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r})")
        self._entries[name] = obj
        return obj

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self._entries) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def get(self, name: str, default: T | None = None) -> T | None:
        return self._entries.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def list(self, pattern: str = "*") -> list[str]:
        """Registered names matching the shell-style ``pattern`` (``fnmatch``), in registration order."""
        return [name for name in self._entries if fnmatch.fnmatchcase(name, pattern)]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"
