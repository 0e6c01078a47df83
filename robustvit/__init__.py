"""robustvit: Lipschitz-bounded, certified and nullspace-finetuned vision transformers for timm and transformers."""

from robustvit.certify import Certificate, CertifyResult, attacks, certify, certify_smoothing
from robustvit.convert import ConvertConfig, convert, export, is_converted
from robustvit.errors import CertificateError, UnsupportedModuleError
from robustvit.hub import from_pretrained, push_to_hub, save_pretrained
from robustvit.lipschitz import lipschitz_bound, lipschitz_report

# LoRA inside the constraint; imported here so that the bound engine also recognizes (and refuses, with the fix named)
# plain PEFT LoRA layers on a converted model.
from robustvit import peft  # noqa: E402, F401  isort: skip

__version__ = "0.1.0"

__all__ = [
    "Certificate",
    "CertificateError",
    "CertifyResult",
    "ConvertConfig",
    "UnsupportedModuleError",
    "attacks",
    "certify",
    "certify_smoothing",
    "convert",
    "export",
    "from_pretrained",
    "is_converted",
    "lipschitz_bound",
    "lipschitz_report",
    "push_to_hub",
    "save_pretrained",
]
