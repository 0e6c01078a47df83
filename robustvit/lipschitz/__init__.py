"""The Lipschitz core: guaranteed spectral bounds, spectral rescaling and the bound engine."""

from robustvit.lipschitz.engine import (
    BOUND_RULES,
    GELU_LIPSCHITZ,
    QUICK_GELU_LIPSCHITZ,
    SILU_LIPSCHITZ,
    BoundEntry,
    BoundFn,
    BoundReport,
    bound_tensor,
    compose_bound,
    lipschitz_bound,
    lipschitz_report,
    mark_lipschitz_neutral,
    record_methods,
    register_bound,
)
from robustvit.lipschitz.rescale import SpectralRescale, is_spectrally_rescaled, spectral_rescale
from robustvit.lipschitz.spectral import (
    batched_spectral_norms,
    conv_operator_bound,
    conv_spectral_norm,
    gram_spectral_norm,
    is_patchify,
    verified_spectral_norm,
)

__all__ = [
    "BOUND_RULES",
    "GELU_LIPSCHITZ",
    "QUICK_GELU_LIPSCHITZ",
    "SILU_LIPSCHITZ",
    "BoundEntry",
    "BoundFn",
    "BoundReport",
    "SpectralRescale",
    "batched_spectral_norms",
    "bound_tensor",
    "compose_bound",
    "conv_operator_bound",
    "conv_spectral_norm",
    "gram_spectral_norm",
    "is_patchify",
    "is_spectrally_rescaled",
    "lipschitz_bound",
    "lipschitz_report",
    "mark_lipschitz_neutral",
    "record_methods",
    "register_bound",
    "spectral_rescale",
    "verified_spectral_norm",
]
