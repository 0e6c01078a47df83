"""Spectral rescaling: a ``torch.nn.utils.parametrize`` constraint that divides a layer's weight by its operator norm.

The divisor is a Schatten norm of the layer's map restricted to a stored orthonormal set of top input directions,
kept up to date by one warm-started subspace-iteration step per training forward (the block form of what
``torch.nn.utils.parametrizations.spectral_norm`` does with one vector). It costs a few matrix-vector products instead
of a guaranteed bound at every step, so constrained training runs at about the speed of plain training.
Certificates never rely on it: the bound engine proves a guaranteed bound of the effective weight ``W / divisor``
that the layer computes with, whatever the divisor is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from robustvit.errors import UnsupportedModuleError
from robustvit.lipschitz.spectral import conv_operator_bound, is_patchify

__all__ = ["SpectralRescale", "frozen_directions", "spectral_rescale", "is_spectrally_rescaled"]

_FROZEN = [False]


@contextmanager
def frozen_directions() -> Iterator[None]:
    """Within this context no forward moves the tracked directions: the bound engine reads weights under it, so
    bounding a model (even in train mode with autograd on) never changes the function it bounds."""
    previous, _FROZEN[0] = _FROZEN[0], True
    try:
        yield
    finally:
        _FROZEN[0] = previous


POWER_STEPS_PER_FORWARD = 1
"""Subspace-iteration steps per training forward: the weights move little per optimizer step, so one warm-started
step keeps the directions on the top singular subspace."""

TRACKED_DIRECTIONS = 8
"""Input directions tracked per layer (fewer where the layer has fewer inputs)."""

SCHATTEN_P = 128
"""The divisor is ``(sum_i sigma_i(A V)^p)^(1/p)`` over the tracked directions ``V``: at least the top singular value,
and, like the Gram-iteration bound it replaces (6 steps: ``p = 2^7``), it also weighs singular values within a few
percent of the top one, so training spreads its gradient over the whole top cluster, not one wandering vector."""

EXPLICIT_MATRIX_MAX_INPUTS = 4096
"""Operators with at most this many inputs get exact starting directions from a dense eigensolver on their explicit
matrix; larger (non-patchify) convolutions start from :data:`INITIAL_POWER_STEPS` subspace-iteration steps."""

INITIAL_POWER_STEPS = 200

Operator = Callable[[Tensor, Tensor], Tensor]
"""``operator(weight, inputs)``: the layer's linear map (no bias) applied to a batch ``(B, *input_shape)``."""


class SpectralRescale(nn.Module):
    """Parametrization ``W -> W / ||A_W V||_{S_p}``: the weight divided by a Schatten norm of the layer's map ``A_W``
    restricted to ``k`` orthonormal input directions ``V`` (the buffer ``directions``, shaped ``(k, *input_shape)``).

    ``V`` starts as the top ``k`` right singular vectors of ``A_W``, so the first divisor is
    ``(sum_{i<=k} sigma_i^p)^(1/p)``, at least the operator norm. Every training forward (train mode with autograd on)
    first moves ``V`` by :data:`POWER_STEPS_PER_FORWARD` subspace-iteration steps, ``V <- orth(A^T A V)``; the divisor
    is then differentiated in ``W`` with ``V`` constant. Eval-mode forwards (and forwards under ``torch.no_grad``)
    leave ``V`` alone: the layer is a deterministic function of ``(W, V)``, recomputed at every forward (``k``
    matrix-vector products; nothing is cached, so no write to ``W`` can leave it stale). ``V`` is a buffer: it is
    saved and loaded with the state dict (safetensors), deep-copied and moved by ``.to()``, so copies compute the same
    function.

    The divisor is only an estimate (it can lag the operator norm right after the weight jumps, leaving the effective
    norm slightly above 1); certificates never rely on it: the bound engine bounds the effective weight with a
    guaranteed bound.
    """

    def __init__(self, operator: Operator, input_shape: Sequence[int], weight: Tensor):
        super().__init__()
        self.operator = operator
        self.input_shape = tuple(input_shape)
        self.register_buffer("directions", _top_input_directions(operator, self.input_shape, weight.detach()))
        self._stepped_for: tuple[int, int] | None = None  # the weight (storage, version) the directions last moved for

    def divisor(self, weight: Tensor, directions: Tensor | None = None) -> Tensor:
        """``||A_W V||_{S_p}``, computed outside autocast so that low-precision contexts do not change the divisor."""
        v = self.directions if directions is None else directions
        with torch.autocast(weight.device.type, enabled=False):
            images = self.operator(weight, v.to(weight.dtype)).reshape(len(v), -1)
            # The singular values of A V (V orthonormal), through the full SVD in every grad mode: svdvals takes
            # another LAPACK path without grad, and the weight that runs must be the bounded one, bit for bit.
            # (LAPACK has no half-precision SVD: bf16 / fp16 weights are decomposed in float32.)
            sigma = torch.linalg.svd(images.to(torch.promote_types(images.dtype, torch.float32)), full_matrices=False).S
            sigma = sigma.to(images.dtype)
        top = sigma.amax().clamp_min(torch.finfo(weight.dtype).tiny)
        return top * ((sigma / top) ** SCHATTEN_P).sum() ** (1.0 / SCHATTEN_P)

    def forward(self, weight: Tensor) -> Tensor:
        directions = self.directions
        # One step per new weight (an optimizer step bumps its version): more reads of an unchanged weight in train
        # mode (a second forward, a margin loss, an analysis) leave the directions, and so the function, as they are.
        if self.training and torch.is_grad_enabled() and not _FROZEN[0]:
            # A computed weight (LoRA's W + sBA) is new at every call: it always steps. A stored one steps once per
            # version (an optimizer step bumps it).
            seen = (weight.data_ptr(), weight._version) if weight.is_leaf else None
            if seen is None or seen != self._stepped_for:
                self._stepped_for = seen
                with torch.no_grad():
                    for _ in range(POWER_STEPS_PER_FORWARD):
                        self.directions.copy_(_subspace_step(self.operator, weight.detach(), self.directions))
            # A clone: the next training forward updates the buffer in place while this graph may still need it
            # (and a checkpointed block's recomputation then sees the same values as its first forward).
            directions = self.directions.clone()
        return weight / self.divisor(weight, directions)

    def right_inverse(self, weight: Tensor) -> Tensor:
        # Assigning a weight stores it as given: the next forward rescales it.
        return weight


def _orthonormal(vectors: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal rows spanning ``vectors`` (``(k, *shape)``) by QR, with signs fixed so the result is deterministic,
    and ``|diag(R)|`` (how much of each new direction was left)."""
    q, r = torch.linalg.qr(vectors.reshape(len(vectors), -1).T)
    diagonal = torch.diagonal(r)
    signs = torch.where(diagonal < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs).T.reshape(vectors.shape), diagonal.abs()


def _as_is(tensor: Tensor) -> Tensor:
    return tensor


def _subspace_step(operator: Operator, weight: Tensor, directions: Tensor) -> Tensor:
    """``orth(A^T A V)`` (the adjoint by autograd). Where ``A^T A V`` loses rank (a weight of low rank, such as a
    large low-rank LoRA update, or ``W = 0``), the directions it does find are kept and completed from ``V``."""
    # A small graph of its own: identity saved-tensor hooks keep it out of a checkpointed block's bookkeeping (the
    # block's recomputation, on an unchanged weight, takes no step).
    with (
        torch.enable_grad(),
        torch.autocast(weight.device.type, enabled=False),
        torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is),
    ):
        x = directions.detach().to(weight.dtype).requires_grad_()
        y = operator(weight, x)
        (gram_v,) = torch.autograd.grad(y, x, grad_outputs=y)
    moved, left = _orthonormal(gram_v.detach())
    found = left > left.amax() * 1e-6
    if bool(found.all()):
        return moved
    if not bool(found.any()):
        return directions
    completed, _ = _orthonormal(torch.cat([moved[found], directions.to(moved.dtype)]))
    return completed[: len(directions)].to(directions.dtype)


@torch.no_grad()
def _top_input_directions(operator: Operator, input_shape: tuple[int, ...], weight: Tensor) -> Tensor:
    """Top ``k`` right singular vectors of ``A_W`` (deterministic): exact from the explicit matrix when it is small."""
    inputs = math.prod(input_shape)
    k = min(TRACKED_DIRECTIONS, inputs)
    w = weight.to(torch.float64)
    if operator is _linear_operator or inputs <= EXPLICIT_MATRIX_MAX_INPUTS:
        if operator is _linear_operator:
            matrix = w
        else:  # the operator applied to every basis input
            basis = torch.eye(inputs, dtype=torch.float64, device=weight.device).reshape(inputs, *input_shape)
            matrix = operator(w, basis).reshape(inputs, -1).T  # (outputs, inputs)
        # Eigenvectors of the Gram matrix on the smaller side, largest first (QR completes a rank-deficient set).
        k = min(k, *matrix.shape)
        if matrix.shape[0] >= matrix.shape[1]:
            directions = torch.linalg.eigh(matrix.T @ matrix).eigenvectors[:, -k:].flip(-1).T
        else:
            left = torch.linalg.eigh(matrix @ matrix.T).eigenvectors[:, -k:].flip(-1)
            directions = (matrix.T @ left).T
        directions = _orthonormal(directions.reshape(k, *input_shape))[0]
    else:
        generator = torch.Generator().manual_seed(0)
        directions = torch.randn((k, *input_shape), dtype=torch.float64, generator=generator).to(weight.device)
        directions = _orthonormal(directions)[0]
        for _ in range(INITIAL_POWER_STEPS):
            directions = _subspace_step(operator, w, directions)
    return directions.to(weight.dtype)


def _linear_operator(weight: Tensor, inputs: Tensor) -> Tensor:
    return F.linear(inputs, weight)


def _conv_operator(weight: Tensor, inputs: Tensor, *, conv: dict) -> Tensor:
    return F.conv2d(inputs, weight, None, **conv)


def spectral_rescale(module: nn.Module, *, input_size: tuple[int, int] | None = None) -> nn.Module:
    """Constrain an ``nn.Linear`` or ``nn.Conv2d`` to an operator norm of about 1 by dividing its weight by a norm of
    its map on tracked top input directions (see :class:`SpectralRescale`). Returns the module (parametrized in place).

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
