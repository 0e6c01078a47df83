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
_DECORATE = object()  # register(name) without an object returns a decorator (None is a valid entry)


class Registry(Generic[T]):
    """Name -> object, in registration order.

    Args:
        kind: what the entries are, for error messages (``"mixer"``, ``"loss"``, ...).
        keys: ``str`` (the default: entries are named) or ``type``: entries are keyed by a class (a rule per module
            type), matched by identity, never by name, so two classes that share a name never share a rule. Messages
            and :meth:`list` then show each class by its qualified name ``module.QualName``.

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

    def __init__(self, kind: str, keys: type = str):
        if keys not in (str, type):
            raise ValueError(f"a registry is keyed by str or type, got {keys!r}")
        self.kind = kind
        self.keys = keys
        self._entries: dict[str | type, T] = {}

    def _label(self, key: str | type) -> str:
        return key if isinstance(key, str) else f"{key.__module__}.{key.__qualname__}"

    def register(self, name: str | type, obj: T | object = _DECORATE) -> T | Callable[[T], T]:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator that registers what it decorates."""
        if obj is _DECORATE:
            return lambda decorated: self.register(name, decorated)
        if self.keys is str and (not isinstance(name, str) or not name):
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if self.keys is type and not isinstance(name, type):
            raise ValueError(f"a {self.kind} is registered for a class, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {self._label(name)!r} is already registered ({self._entries[name]!r})")
        self._entries[name] = obj
        return obj

    def __getitem__(self, name: str | type) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            known = ", ".join(self.list()) or "none"
            label = self._label(name) if isinstance(name, (str, type)) else repr(name)
            raise KeyError(f"unknown {self.kind} {label!r}; known: {known}") from None

    def get(self, name: str | type, default: T | None = None) -> T | None:
        return self._entries.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str | type]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str | type, T]]:
        return list(self._entries.items())

    def list(self, pattern: str = "*") -> list[str]:
        """Registered names (qualified class names for ``keys=type``) matching the shell-style ``pattern``
        (``fnmatch``), in registration order."""
        labels = (self._label(key) for key in self._entries)
        return [label for label in labels if fnmatch.fnmatchcase(label, pattern)]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"
