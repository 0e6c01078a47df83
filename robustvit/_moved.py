"""The module paths of robustvit 0.1 that moved, kept importable (with a ``DeprecationWarning``) through
``sys.modules`` aliases of the modules that replaced them.

``robustvit.convert`` and ``robustvit.certify`` are the public functions; the packages behind them are
``robustvit.conversion`` and ``robustvit.certification``. Their old paths stay importable: ``sys.modules`` holds a
small stand-in module for each (entered before any import could make Python set ``robustvit.convert`` to a module),
which forwards the names it had to their new homes, and a finder maps the old submodule paths to the new modules
(the same module objects: classes stay identical). Nothing is imported until an old path is used, so
``import robustvit`` stays free of torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

__all__ = ["MOVED_MODULES", "MOVED_NAMES", "install"]

MOVED_MODULES = {
    "robustvit.hub": "robustvit.persistence.hub",
    "robustvit.certify.attacks": "robustvit.certification.attacks",
    "robustvit.certify.certificate": "robustvit.certification.certificate",
    "robustvit.certify.dataset": "robustvit.certify_split",
    "robustvit.certify.lipschitz": "robustvit.certification.lipschitz",
    "robustvit.certify.plot": "robustvit.certification.plot",
    "robustvit.certify.rounding": "robustvit.certification.rounding",
    "robustvit.certify.smoothing": "robustvit.certification.smoothing",
}
"""Old module path -> the module now at its place."""

MOVED_NAMES = {
    "robustvit.convert": {
        "ACTIVATIONS": "robustvit.conversion.choices",
        "MIXERS": "robustvit.conversion.choices",
        "MLPS": "robustvit.conversion.choices",
        "ConvertConfig": "robustvit.conversion.config",
        "convert": "robustvit.conversion.convert",
        "export": "robustvit.conversion.convert",
        "is_converted": "robustvit.conversion.convert",
    },
    "robustvit.certify": "robustvit.certification",
}
"""Old path of a module whose name is now a function -> where its names went (one module for all, or per name)."""


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old path will be removed", DeprecationWarning, stacklevel=3)


def _stand_in(old: str, targets: str | dict[str, str]) -> types.ModuleType:
    module = types.ModuleType(old, f"Deprecated path: see {targets if isinstance(targets, str) else 'robustvit'}.")
    module.__path__ = []  # a package, so that its old submodule paths import (through _Finder)

    def forward(name: str) -> Any:
        target = None if name.startswith("__") else targets if isinstance(targets, str) else targets.get(name)
        if target is None:  # dunders (__file__...) are the stand-in's own: inspect and pytest probe them
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        _deprecated(f"{old}.{name}", f"{target}.{name}")
        return getattr(importlib.import_module(target), name)

    module.__getattr__ = forward  # PEP 562: looked up in the module's namespace
    return module


class _Loader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        _deprecated(spec.name, self.target)
        module = importlib.import_module(self.target)
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        # The module ran under its own name; the import system has just set its __spec__ to the alias's: restore it.
        module.__spec__ = self.own_spec


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED_MODULES.get(name)
        return None if new is None else importlib.machinery.ModuleSpec(name, _Loader(new))


def install() -> None:
    """Enter the stand-ins and the finder (``robustvit/__init__.py`` calls it once)."""
    for old, targets in MOVED_NAMES.items():
        sys.modules.setdefault(old, _stand_in(old, targets))
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
