"""Empirical LOWER bounds on the l2 Lipschitz constant, by gradient ascent on pairs of inputs.

Nothing here is a certificate. The functions are named ``estimate_*`` on purpose: they find pairs of inputs
``(x, y)`` whose output distance ratio ``||f(x) - f(y)|| / ||x - y||`` is large, and return the largest ratio
seen. That number is at most the true Lipschitz constant (up to floating-point rounding of the forward pass),
so it is useful to *attack* a claimed upper bound, as the tests do: a guaranteed bound must never be below it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from robustvit._utils import unchecked_pixels

__all__ = ["estimate_lipschitz_lower_bound"]

# Relative sizes of the initial perturbation y - x, cycled over the restarts: tiny gaps probe the local
# Lipschitz constant (the Jacobian norm), large ones probe the global behaviour (saturation, wrap-around).
_GAP_SCALES = (1e-3, 1.0, 3e-2, 10.0, 1e-2, 0.3, 3.0, 0.1)


def _outputs(fn: Callable, batch: Tensor) -> Tensor:
    with unchecked_pixels():  # the ascent leaves the image cube on purpose: the bounds hold everywhere
        out = fn(batch)
    if hasattr(out, "logits"):
        out = out.logits
    if isinstance(out, (tuple, list)):
        raise TypeError("estimate_lipschitz_lower_bound needs fn to return one tensor (or an object with .logits)")
    return out


def estimate_lipschitz_lower_bound(
    fn: Callable[[Tensor], Tensor] | nn.Module,
    inputs: Tensor,
    *,
    steps: int = 200,
    restarts: int = 4,
    lr: float = 0.1,
    generator: torch.Generator | None = None,
) -> float:
    """An empirical LOWER bound on the l2 Lipschitz constant of ``fn``: never a certificate.

    Runs Adam on ``log ||f(x) - f(y)|| - log ||x - y||`` for every sample of ``inputs`` and every restart (all in
    one batch: ``restarts * len(inputs)`` pairs per forward call). Pairs start at ``x = inputs`` and ``y = x + d``
    with a random direction ``d`` whose size, relative to the sample's norm, differs per restart (from 1e-3 to 10:
    local and global behaviour). Nothing is clipped to an input box: the bounds this attacks hold on all inputs.
    ``x`` moves with step ``lr * rms(inputs)`` and the gap ``y - x`` with a step proportional to its own initial
    size, so small gaps stay small while their direction is optimised.

    Each sample's ratio is computed per pair, so a per-sample map (anything that does not mix the batch) is
    attacked sample by sample. The largest finite ratio seen at any step is returned.

    Args:
        fn: a module or callable taking a batch shaped like ``inputs``, returning a tensor or an object with
            ``.logits``. A module is put in eval mode (and restored); its parameters get no gradients.
        inputs: the starting points ``(B, ...)``.
        steps: gradient steps per restart (all restarts run together).
        restarts: number of pair initialisations per sample.
        lr: Adam step size for ``x``, relative to the RMS of ``inputs``.
        generator: seeds the random initial perturbations.

    Returns:
        The largest ratio found, a float (0.0 if every output pair was identical).

    Example:
        >>> layer = torch.nn.Linear(8, 4)
        >>> est = estimate_lipschitz_lower_bound(layer, torch.randn(4, 8), steps=50)
        >>> est <= float(torch.linalg.matrix_norm(layer.weight.double(), ord=2)) * (1 + 1e-5)
        True
    """
    if not isinstance(inputs, Tensor) or inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError("inputs must be a non-empty batch tensor (B, ...)")
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be floating point, got {inputs.dtype}")

    module = fn if isinstance(fn, nn.Module) else None
    was_training = module.training if module is not None else False
    params = list(module.parameters()) if module is not None else []
    grad_flags = [p.requires_grad for p in params]
    try:
        if module is not None:
            module.eval()
            for p in params:
                p.requires_grad_(False)
        return _ascend(fn, inputs.detach(), steps, restarts, lr, generator)
    finally:
        if module is not None:
            for p, flag in zip(params, grad_flags, strict=True):
                p.requires_grad_(flag)
            module.train(was_training)


def _ascend(
    fn: Callable, inputs: Tensor, steps: int, restarts: int, lr: float, generator: torch.Generator | None
) -> float:
    batch = inputs.shape[0]
    dims = tuple(range(1, inputs.dim()))
    x0 = inputs.repeat(restarts, *([1] * (inputs.dim() - 1)))
    sample_norm = torch.linalg.vector_norm(x0.double(), dim=dims).clamp_min(1e-12)
    rms = float(torch.linalg.vector_norm(inputs.double()) / math.sqrt(max(inputs.numel(), 1))) or 1.0
    scales = torch.tensor(
        [_GAP_SCALES[r % len(_GAP_SCALES)] for r in range(restarts) for _ in range(batch)], dtype=torch.float64
    )
    direction = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    direction = direction / torch.linalg.vector_norm(direction, dim=dims, keepdim=True).clamp_min(1e-300)
    gap_size = (scales * sample_norm).clamp_min(1e-6 * max(rms, 1e-12))
    shape = (-1,) + (1,) * (inputs.dim() - 1)
    # Optimise y - x as gap_size * u so one learning rate suits every gap scale.
    x = x0.clone().requires_grad_(True)
    u = (direction * math.sqrt(direction[0].numel())).to(inputs.dtype).requires_grad_(True)
    unit = (gap_size / math.sqrt(direction[0].numel())).to(inputs.dtype).view(shape)
    optimizer = torch.optim.Adam([{"params": [x], "lr": lr * rms}, {"params": [u], "lr": lr}])

    best = 0.0
    for step in range(steps + 1):
        y = x + unit * u
        out = _outputs(fn, torch.cat((x, y)))
        fx, fy = out[: x.shape[0]], out[x.shape[0] :]
        out_dims = tuple(range(1, fx.dim()))
        num = torch.linalg.vector_norm((fx - fy).double(), dim=out_dims) if fx.dim() > 1 else (fx - fy).double().abs()
        den = torch.linalg.vector_norm((x - y).double(), dim=dims)
        ratio = (num / den).detach()
        finite = torch.isfinite(ratio) & (den.detach() > 0)
        if bool(finite.any()):
            best = max(best, float(ratio[finite].max()))
        if step == steps:
            break
        objective = torch.log(num.clamp_min(1e-300)) - torch.log(den.clamp_min(1e-300))
        objective = torch.where(torch.isfinite(objective), objective, torch.zeros_like(objective))
        optimizer.zero_grad(set_to_none=True)
        (-objective.sum()).backward()
        for tensor in (x, u):
            if tensor.grad is not None:
                tensor.grad.nan_to_num_(0.0, 0.0, 0.0)
        optimizer.step()
    return best
