"""Certification: deterministic Lipschitz certificates, randomized smoothing, attacks and the certificate record, with
the certification's own settings (:mod:`robustvit.certification.config`).

The names load on first use (PEP 562), for startup time: the command line reads ``CertificationConfig`` for its flags,
and importing it runs this package's ``__init__``, which must not import torch for ``robustvit --help``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "MARGIN_SLACK": "robustvit.certification.lipschitz",
    "Certificate": "robustvit.certification.certificate",
    "CertifyResult": "robustvit.certification.lipschitz",
    "EpsResult": "robustvit.certification.certificate",
    "LipschitzHead": "robustvit.certification.lipschitz",
    "SmoothingResult": "robustvit.certification.smoothing",
    "certified_accuracy_curve": "robustvit.certification.plot",
    "certify": "robustvit.certification.lipschitz",
    "certify_smoothing": "robustvit.certification.smoothing",
    "lipschitz_head": "robustvit.certification.lipschitz",
    "plot_certified_accuracy": "robustvit.certification.plot",
    "smoothing_radius": "robustvit.certification.smoothing",
}

__all__ = sorted([*_EXPORTS, "attacks"])

if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from robustvit.certification import attacks  # noqa: F401
    from robustvit.certification.certificate import Certificate, EpsResult  # noqa: F401
    from robustvit.certification.lipschitz import (  # noqa: F401
        MARGIN_SLACK,
        CertifyResult,
        LipschitzHead,
        certify,
        lipschitz_head,
    )
    from robustvit.certification.plot import certified_accuracy_curve, plot_certified_accuracy  # noqa: F401
    from robustvit.certification.smoothing import SmoothingResult, certify_smoothing, smoothing_radius  # noqa: F401


def __getattr__(name: str) -> Any:
    if name == "attacks":  # a submodule: importing it sets the attribute
        return importlib.import_module("robustvit.certification.attacks")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'robustvit.certification' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
