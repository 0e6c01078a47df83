"""robustvit: Lipschitz-bounded, certified and nullspace-finetuned vision transformers for timm and transformers.

The public names load on first use (PEP 562), so that ``import robustvit`` and ``robustvit --help`` do not pay for
importing torch, timm and transformers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Certificate": "robustvit.certify",
    "CertifyResult": "robustvit.certify",
    "attacks": "robustvit.certify",
    "certify": "robustvit.certify",
    "certify_smoothing": "robustvit.certify",
    "ConvertConfig": "robustvit.convert",
    "convert": "robustvit.convert",
    "export": "robustvit.convert",
    "is_converted": "robustvit.convert",
    "CertificateError": "robustvit.errors",
    "UnsupportedModuleError": "robustvit.errors",
    "from_pretrained": "robustvit.hub",
    "push_to_hub": "robustvit.hub",
    "save_pretrained": "robustvit.hub",
    "lipschitz_bound": "robustvit.lipschitz",
    "lipschitz_report": "robustvit.lipschitz",
    "Registry": "robustvit.registry",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from robustvit.certify import Certificate, CertifyResult, attacks, certify, certify_smoothing  # noqa: F401
    from robustvit.convert import ConvertConfig, convert, export, is_converted  # noqa: F401
    from robustvit.errors import CertificateError, UnsupportedModuleError  # noqa: F401
    from robustvit.hub import from_pretrained, push_to_hub, save_pretrained  # noqa: F401
    from robustvit.lipschitz import lipschitz_bound, lipschitz_report  # noqa: F401
    from robustvit.registry import Registry  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'robustvit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """``robustvit.convert`` and ``robustvit.certify`` name both a function and a submodule. Importing the
    submodule makes Python set the package attribute to the module; keep the public function there instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
