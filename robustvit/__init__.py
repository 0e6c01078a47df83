"""robustvit: Lipschitz-bounded, certified and nullspace-finetuned vision transformers for timm and transformers.

The public names load on first use (PEP 562), so that ``import robustvit`` and ``robustvit --help`` do not pay for
importing torch, timm and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from robustvit import _moved
from robustvit.version import __version__  # noqa: F401  (robustvit.__version__)

# public name -> the module that defines it
_EXPORTS = {
    "Certificate": "robustvit.certification",
    "CertifyResult": "robustvit.certification",
    "attacks": "robustvit.certification",
    "certify": "robustvit.certification",
    "certify_smoothing": "robustvit.certification",
    "ConvertConfig": "robustvit.conversion.config",
    "convert": "robustvit.conversion.convert",
    "export": "robustvit.conversion.convert",
    "is_converted": "robustvit.conversion.convert",
    "CertificateError": "robustvit.errors",
    "UnsupportedModuleError": "robustvit.errors",
    "from_pretrained": "robustvit.persistence.hub",
    "push_to_hub": "robustvit.persistence.hub",
    "save_pretrained": "robustvit.persistence.hub",
    "lipschitz_bound": "robustvit.lipschitz",
    "lipschitz_report": "robustvit.lipschitz",
    "Registry": "robustvit.registry",
}

# A model converted through robustvit.convert loads back through timm's and transformers' own loaders in the same
# process: their registration (robustvit.persistence) comes with the function.
_WITH_LOADERS = {"convert"}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from robustvit.certification import Certificate, CertifyResult, attacks, certify, certify_smoothing  # noqa: F401
    from robustvit.conversion.config import ConvertConfig  # noqa: F401
    from robustvit.conversion.convert import convert, export, is_converted  # noqa: F401
    from robustvit.errors import CertificateError, UnsupportedModuleError  # noqa: F401
    from robustvit.lipschitz import lipschitz_bound, lipschitz_report  # noqa: F401
    from robustvit.persistence.hub import from_pretrained, push_to_hub, save_pretrained  # noqa: F401
    from robustvit.registry import Registry  # noqa: F401

_moved.install()  # the 0.1 module paths (robustvit.hub, robustvit.certify.certificate...): deprecated aliases


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'robustvit' has no attribute {name!r}")
    if name in _WITH_LOADERS:
        importlib.import_module("robustvit.persistence")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
