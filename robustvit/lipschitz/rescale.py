"""Spectral rescaling: a ``torch.nn.utils.parametrize`` constraint that makes a layer at most 1-Lipschitz."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from robustvit.errors import UnsupportedModuleError
from robustvit.lipschitz.spectral import conv_operator_bound, gram_spectral_norm

__all__ = ["SpectralRescale", "spectral_rescale", "is_spectrally_rescaled"]


RESCALE_GRAM_STEPS = 6
"""Gram steps of the rescaling divisor. Any number gives a guaranteed bound (the layer is at most 1-Lipschitz);
fewer steps make training cheaper and leave the effective norm slightly below 1, which certificates see exactly
because the bound engine bounds the effective weight itself. Fixed (no early stop), so train and eval agree."""


class SpectralRescale(nn.Module):
    """Parametrization ``W -> W / bound(W)`` with a guaranteed (Gram iteration) upper bound on the operator norm.

    In training mode the bound is recomputed at every access and differentiated through. In eval mode it is
    cached and recomputed only when the raw weight changes (its version counter moves, e.g. after an optimizer
    step or ``load_state_dict``) or the mode is switched, so inference pays one elementwise division. Writes through
    ``.data`` do not move the version counter: switch to train and back to eval after them.

    Certificates never rely on this layer being exactly 1-Lipschitz: the bound engine recomputes the bound of
    the effective weight it produces.
    """

    def __init__(self, bound_fn: Callable[[Tensor], Tensor]):
        super().__init__()
        self.bound_fn = bound_fn
        self._cache_key: tuple[int, int] | None = None
        self._cached_bound: Tensor | None = None

    def forward(self, weight: Tensor) -> Tensor:
        if self.training:
            return weight / self.bound_fn(weight).to(weight.dtype).clamp_min(torch.finfo(weight.dtype).tiny)
        key = (weight.data_ptr(), weight._version)
        if key != self._cache_key:
            with torch.no_grad():
                bound = self.bound_fn(weight).to(weight.dtype)
            self._cached_bound = bound.clamp_min(torch.finfo(weight.dtype).tiny)
            self._cache_key = key
        return weight / self._cached_bound

    def train(self, mode: bool = True) -> SpectralRescale:
        # Writes through ``weight.data`` do not move the version counter; an actual mode switch refreshes.
        if mode != self.training:
            self._cache_key = None
        return super().train(mode)

    def right_inverse(self, weight: Tensor) -> Tensor:
        # Assigning a weight stores it as given: the next forward rescales it.
        return weight


def spectral_rescale(module: nn.Module, *, input_size: tuple[int, int] | None = None) -> nn.Module:
    """Constrain an ``nn.Linear`` or ``nn.Conv2d`` to be at most 1-Lipschitz by dividing its weight by a guaranteed
    bound on its operator norm. Returns the module (parametrized in place).

    Args:
        module: the layer.
        input_size: spatial input size, needed only for convolutions that are not patchify convolutions.

    Example:
        >>> layer = spectral_rescale(nn.Linear(64, 32))
        >>> from robustvit.lipschitz import lipschitz_bound
        >>> lipschitz_bound(layer) <= 1 + 1e-6
        True
    """
    if is_spectrally_rescaled(module):
        raise ValueError(f"{type(module).__name__} is already spectrally rescaled")
    gram = {"n_iter": RESCALE_GRAM_STEPS, "rtol": 0.0}
    if isinstance(module, nn.Linear):
        bound_fn = partial(gram_spectral_norm, **gram)
    elif isinstance(module, nn.Conv2d):
        bound_fn = partial(
            conv_operator_bound,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            padding_mode=module.padding_mode,
            input_size=input_size,
            **gram,
        )
        bound_fn(module.weight.detach())  # fail now, not at the first forward
    else:
        raise UnsupportedModuleError(f"spectral_rescale supports nn.Linear and nn.Conv2d, got {type(module).__name__}")
    parametrize.register_parametrization(module, "weight", SpectralRescale(bound_fn), unsafe=True)
    return module


def is_spectrally_rescaled(module: nn.Module) -> bool:
    """Whether ``module.weight`` carries a :class:`SpectralRescale` parametrization."""
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, SpectralRescale) for p in module.parametrizations.weight
    )
