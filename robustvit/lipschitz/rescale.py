"""Spectral rescaling: a ``torch.nn.utils.parametrize`` constraint that divides a layer's weight by its operator norm.

The divisor is the operator norm *estimated* along a stored input direction, kept up to date by one warm-started
power-iteration step per training forward (as ``torch.nn.utils.parametrizations.spectral_norm`` does). It costs one
matrix-vector product instead of a guaranteed bound at every step, so constrained training runs at about the speed
of plain training. Certificates never rely on it: the bound engine proves a guaranteed bound of the effective weight
``W / divisor`` that the layer computes with, whatever the divisor is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from robustvit.errors import UnsupportedModuleError
from robustvit.lipschitz.spectral import conv_operator_bound, is_patchify

__all__ = ["SpectralRescale", "spectral_rescale", "is_spectrally_rescaled"]

POWER_STEPS_PER_FORWARD = 1
"""Power-iteration steps per training forward. The divisor's error is quadratic in the direction's error, and the
weights move little per optimizer step, so one warm-started step keeps it within ~1e-6 of the norm in practice."""

EXPLICIT_MATRIX_MAX_INPUTS = 4096
"""Operators with at most this many inputs get an exact starting direction from a dense eigensolver on their explicit
matrix; larger (non-patchify) convolutions start from :data:`INITIAL_POWER_STEPS` power-iteration steps."""

INITIAL_POWER_STEPS = 200

Operator = Callable[[Tensor, Tensor], Tensor]
"""``operator(weight, inputs)``: the layer's linear map (no bias) applied to a batch ``(B, *input_shape)``."""


class SpectralRescale(nn.Module):
    """Parametrization ``W -> W / ||A_W v||``: the weight divided by the layer's gain along a unit input direction ``v``.

    ``v`` (the buffer ``direction``) starts as the top right singular vector of the layer's map ``A_W``, so the first
    divisor is its operator norm. Every training forward (train mode with autograd on) first moves ``v`` by
    :data:`POWER_STEPS_PER_FORWARD` power-iteration steps, ``v <- A^T A v / ||A^T A v||``; the divisor is then
    differentiated in ``W`` with ``v`` constant. Eval-mode forwards (and forwards under ``torch.no_grad``) leave
    ``v`` alone: the layer is a deterministic function of ``(W, v)``, recomputed at every forward (one matrix-vector
    product; nothing is cached, so no write to ``W`` can leave it stale). ``v`` is a buffer: it is saved and loaded
    with the state dict (safetensors), deep-copied and moved by ``.to()``, so copies compute the same function.

    The divisor never exceeds the operator norm (it is the gain along one direction), so the effective weight's norm
    is 1 or slightly above; the bound engine bounds that effective weight with a guaranteed bound.
    """

    def __init__(self, operator: Operator, input_shape: Sequence[int], weight: Tensor):
        super().__init__()
        self.operator = operator
        self.input_shape = tuple(input_shape)
        self.register_buffer("direction", _top_input_direction(operator, self.input_shape, weight.detach()))

    def divisor(self, weight: Tensor, direction: Tensor | None = None) -> Tensor:
        """``||A_W v||``, computed outside autocast so that low-precision contexts do not change the divisor."""
        v = self.direction if direction is None else direction
        with torch.autocast(weight.device.type, enabled=False):
            gain = torch.linalg.vector_norm(self.operator(weight, v[None].to(weight.dtype)))
        return gain.clamp_min(torch.finfo(weight.dtype).tiny)

    def forward(self, weight: Tensor) -> Tensor:
        direction = self.direction
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                for _ in range(POWER_STEPS_PER_FORWARD):
                    self.direction.copy_(_power_step(self.operator, weight.detach(), self.direction))
            # A clone: the next training forward updates the buffer in place while this graph may still need it.
            direction = self.direction.clone()
        return weight / self.divisor(weight, direction)

    def right_inverse(self, weight: Tensor) -> Tensor:
        # Assigning a weight stores it as given: the next forward rescales it.
        return weight


def _power_step(operator: Operator, weight: Tensor, direction: Tensor) -> Tensor:
    """``A^T A v / ||A^T A v||`` (the adjoint by autograd); ``v`` is kept where ``A^T A v`` vanishes."""
    with torch.enable_grad(), torch.autocast(weight.device.type, enabled=False):
        x = direction[None].detach().to(weight.dtype).requires_grad_()
        y = operator(weight, x)
        (gram_v,) = torch.autograd.grad(y, x, grad_outputs=y)
    gram_v = gram_v[0].detach()
    norm = torch.linalg.vector_norm(gram_v)
    return torch.where(norm > 0, gram_v / norm.clamp_min(torch.finfo(norm.dtype).tiny), direction)


@torch.no_grad()
def _top_input_direction(operator: Operator, input_shape: tuple[int, ...], weight: Tensor) -> Tensor:
    """Top right singular vector of ``A_W`` (deterministic): exact from the explicit matrix when it is small."""
    inputs = math.prod(input_shape)
    w = weight.to(torch.float64)
    if operator is _linear_operator or inputs <= EXPLICIT_MATRIX_MAX_INPUTS:
        if operator is _linear_operator:
            matrix = w
        else:  # the operator applied to every basis input
            basis = torch.eye(inputs, dtype=torch.float64, device=weight.device).reshape(inputs, *input_shape)
            matrix = operator(w, basis).reshape(inputs, -1).T  # (outputs, inputs)
        if matrix.shape[0] >= matrix.shape[1]:
            direction = torch.linalg.eigh(matrix.T @ matrix).eigenvectors[:, -1]
        else:  # eigenvectors on the smaller side: v = A^T u / ||A^T u||
            direction = matrix.T @ torch.linalg.eigh(matrix @ matrix.T).eigenvectors[:, -1]
        direction = direction.reshape(input_shape)
    else:
        generator = torch.Generator().manual_seed(0)
        direction = torch.randn(input_shape, dtype=torch.float64, generator=generator).to(weight.device)
        for _ in range(INITIAL_POWER_STEPS):
            direction = _power_step(operator, w, direction)
    norm = torch.linalg.vector_norm(direction)
    if norm == 0:  # a zero matrix (eigh of a zero Gram matrix is fine, but A^T u can vanish)
        direction = torch.ones(input_shape, dtype=torch.float64, device=weight.device)
        norm = torch.linalg.vector_norm(direction)
    return (direction / norm).to(weight.dtype)


def _linear_operator(weight: Tensor, inputs: Tensor) -> Tensor:
    return F.linear(inputs, weight)


def _conv_operator(weight: Tensor, inputs: Tensor, *, conv: dict) -> Tensor:
    return F.conv2d(inputs, weight, None, **conv)


def spectral_rescale(module: nn.Module, *, input_size: tuple[int, int] | None = None) -> nn.Module:
    """Constrain an ``nn.Linear`` or ``nn.Conv2d`` to an operator norm of about 1 by dividing its weight by its gain
    along a tracked top input direction (see :class:`SpectralRescale`). Returns the module (parametrized in place).

    Args:
        module: the layer.
        input_size: spatial input size, needed only for convolutions that are not patchify convolutions (their
            operator norm depends on it).

    Example:
        >>> layer = spectral_rescale(nn.Linear(64, 32))
        >>> from robustvit.lipschitz import lipschitz_bound
        >>> lipschitz_bound(layer) <= 1 + 1e-5
        True
    """
    if is_spectrally_rescaled(module):
        raise ValueError(f"{type(module).__name__} is already spectrally rescaled")
    if isinstance(module, nn.Linear):
        operator, input_shape = _linear_operator, (module.in_features,)
    elif isinstance(module, nn.Conv2d):
        conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
        # Refuse what the bound cannot handle (padding modes, a missing input size) now, not at the first forward.
        conv_operator_bound(module.weight.detach(), padding_mode=module.padding_mode, input_size=input_size, **conv)
        if is_patchify(module):  # block diagonal over patches: one patch has the whole operator norm
            size = tuple(module.kernel_size)
        else:
            size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        operator, input_shape = partial(_conv_operator, conv=conv), (module.in_channels, *size)
    else:
        raise UnsupportedModuleError(f"spectral_rescale supports nn.Linear and nn.Conv2d, got {type(module).__name__}")
    rescaler = SpectralRescale(operator, input_shape, module.weight)
    parametrize.register_parametrization(module, "weight", rescaler, unsafe=True)
    return module


def is_spectrally_rescaled(module: nn.Module) -> bool:
    """Whether ``module.weight`` carries a :class:`SpectralRescale` parametrization."""
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, SpectralRescale) for p in module.parametrizations.weight
    )
