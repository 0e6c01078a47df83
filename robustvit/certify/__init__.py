"""Certification: deterministic Lipschitz certificates, randomized smoothing, attacks and the certificate record."""

from robustvit.certify import attacks
from robustvit.certify.certificate import Certificate, EpsResult
from robustvit.certify.lipschitz import MARGIN_SLACK, CertifyResult, LipschitzHead, certify, lipschitz_head
from robustvit.certify.plot import certified_accuracy_curve, plot_certified_accuracy
from robustvit.certify.smoothing import SmoothingResult, certify_smoothing, smoothing_radius

__all__ = [
    "MARGIN_SLACK",
    "Certificate",
    "CertifyResult",
    "EpsResult",
    "LipschitzHead",
    "SmoothingResult",
    "attacks",
    "certified_accuracy_curve",
    "certify",
    "certify_smoothing",
    "lipschitz_head",
    "plot_certified_accuracy",
    "smoothing_radius",
]
