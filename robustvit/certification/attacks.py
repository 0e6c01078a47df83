"""Empirical robustness: PGD and FGSM attacks in the l2 and linf norms.

Attacks give upper bounds on robust accuracy (a certificate gives the lower bound). All images are pixels in
``[0, 1]``; any normalisation must live inside the model. Both timm models (returning a logits tensor) and
transformers models (returning an output with ``.logits``) are supported.

Example:
    >>> adv = pgd(vit, images, labels, eps=36 / 255, norm="l2", steps=5)
    >>> bool(((adv - images).flatten(1).norm(dim=1) <= 36 / 255 + 1e-6).all())
    True
    >>> 0.0 <= robust_accuracy(vit, images, labels, eps=36 / 255, norm="l2", steps=5) <= 1.0
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustvit._utils import eval_mode, model_logits
from robustvit.certification.inputs import check_inputs
from robustvit.registry import Registry

__all__ = ["ATTACKS", "fgsm", "pgd", "robust_accuracy"]

_NORMS = ("l2", "linf")


def _check_norm(norm: str) -> str:
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    return norm


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return eps


def _check_labels(labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"expected labels as a torch.Tensor, got {type(labels).__name__}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"expected labels shaped ({images.shape[0]},) to match the images, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    return labels.to(device=images.device, dtype=torch.long)


def _per_sample_norm(x: torch.Tensor, norm: str) -> torch.Tensor:
    """Norm of each sample of a batch, shaped to broadcast against it."""
    flat = x.flatten(1)
    values = flat.norm(p=2, dim=1) if norm == "l2" else flat.abs().amax(dim=1)
    return values.view(-1, *([1] * (x.dim() - 1)))


def _ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit ``norm``: the normalised gradient (l2) or its sign (linf)."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_sample_norm(grad, "l2").clamp_min(1e-12)


def _project(adv: torch.Tensor, images: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project onto the ``eps``-ball around ``images``, then clip to ``[0, 1]``.

    Clipping after the projection stays inside the ball: each coordinate moves towards ``images``, which lie in
    ``[0, 1]`` themselves, so no coordinate of the perturbation grows.
    """
    delta = adv - images
    if norm == "l2":
        delta = delta * (eps / _per_sample_norm(delta, "l2").clamp_min(1e-12)).clamp(max=1.0)
    else:
        delta = delta.clamp(-eps, eps)
    return (images + delta).clamp(0.0, 1.0)


def _random_start(images: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """A point drawn uniformly from the ``eps``-ball of ``norm`` around each image, clipped to ``[0, 1]``."""
    device = generator.device if generator is not None else images.device
    shape, dtype = images.shape, images.dtype
    if norm == "linf":
        delta = torch.rand(shape, generator=generator, device=device, dtype=dtype) * 2 - 1
        delta = delta * eps
    else:
        direction = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        direction = direction / _per_sample_norm(direction, "l2").clamp_min(1e-12)
        # Radius u^(1/d) makes the point uniform in the ball rather than crowded at its centre.
        u = torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=generator, device=device, dtype=dtype)
        delta = direction * eps * u.pow(1.0 / images[0].numel())
    return _project(images + delta.to(images.device), images, eps, norm)


def pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    *,
    norm: str = "l2",
    steps: int = 20,
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted projected gradient descent (Madry et al., 2018) within an ``eps``-ball of pixels in ``[0, 1]``.

    The attack maximises the cross-entropy of the true label. Its gradient shrinks on confidently classified
    inputs, but each step only uses the gradient's direction (normalised for l2, sign for linf), so that
    saturation does not slow the attack down the way it would plain gradient ascent; and since the best iterate is
    kept (below), cross-entropy pushing an already misclassified point further costs nothing.

    Every iterate (the clean images included) is a candidate: per image the result is the first misclassified
    candidate found in any step of any restart, otherwise the candidate with the highest loss. An image leaves the
    attack as soon as it is misclassified, so the cost falls with the robust accuracy. The model is
    put in eval mode for the attack and every submodule's previous mode is restored; gradients are taken with
    ``torch.autograd.grad`` on the input only, so no ``.grad`` of a parameter is written.

    Args:
        model: Classifier taking pixels in ``[0, 1]``; returns logits or an output with ``.logits``.
        images: Batch ``(B, C, H, W)`` with values in ``[0, 1]``.
        labels: True classes, shape ``(B,)``.
        eps: Radius of the ball in the chosen norm (``0`` returns a copy of ``images``).
        norm: ``"l2"`` or ``"linf"``.
        steps: Gradient steps per restart.
        step_size: Length of each step in the chosen norm; defaults to ``2.5 * eps / steps``.
        restarts: Independent runs; the strongest candidate per image is kept.
        random_start: Start each restart at a uniformly random point of the ball instead of the clean images.
        generator: Random generator for the random starts, for reproducible attacks.

    Returns:
        Detached adversarial images of the same shape, in ``[0, 1]`` and within ``eps`` of ``images``.

    Example:
        >>> adv = pgd(model, images, labels, eps=0.5, norm="l2", steps=50, restarts=2)
        >>> fooled = model(adv).argmax(-1) != labels
    """
    check_inputs(model, images, labels, eps=eps)
    norm = _check_norm(norm)
    eps = _check_eps(eps)
    labels = _check_labels(labels, images)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts!r}")
    if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be a finite number > 0, got {step_size!r}")
    images = images.detach()
    if eps == 0:
        return images.clone()
    step_size = 2.5 * eps / steps if step_size is None else float(step_size)

    with eval_mode(model):
        with torch.no_grad():
            clean_logits = model_logits(model, images)
        best = images.clone()
        best_fooled = clean_logits.argmax(-1) != labels
        best_loss = F.cross_entropy(clean_logits.float(), labels, reduction="none")

        def keep_if_better(index: torch.Tensor, candidate: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            """Record the candidates of images ``index``; return which of them are now misclassified."""
            loss = F.cross_entropy(logits.float(), labels[index], reduction="none")
            fooled = logits.argmax(-1) != labels[index]
            was_fooled = best_fooled[index]
            better = (fooled & ~was_fooled) | ((fooled == was_fooled) & (loss > best_loss[index]))
            best[index[better]] = candidate[better]
            best_loss[index[better]] = loss[better]
            best_fooled[index[fooled]] = True
            return fooled

        for _ in range(restarts):
            # Only images not yet misclassified are attacked: a fooled image cannot become more fooled, so each
            # leaves the batch as soon as one candidate fools the model (the cost falls with robust accuracy).
            index = (~best_fooled).nonzero().flatten()
            if index.numel() == 0:
                break
            origin = images[index]
            adv = _random_start(origin, eps, norm, generator) if random_start else origin.clone()
            for _ in range(steps):
                adv.requires_grad_(True)
                with torch.enable_grad():
                    logits = model_logits(model, adv)
                    loss = F.cross_entropy(logits.float(), labels[index], reduction="sum")
                    (grad,) = torch.autograd.grad(loss, adv)
                adv = adv.detach()
                alive = ~keep_if_better(index, adv, logits.detach())
                if not alive.any():
                    break
                index, origin, adv, grad = index[alive], origin[alive], adv[alive], grad[alive]
                adv = _project(adv + step_size * _ascent_direction(grad, norm), origin, eps, norm)
            else:
                with torch.no_grad():
                    keep_if_better(index, adv, model_logits(model, adv))
    return best


def fgsm(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *, norm: str = "linf"
) -> torch.Tensor:
    """Fast gradient (sign) method: one full-length step of cross-entropy ascent (Goodfellow et al., 2015).

    For ``norm="linf"`` the step is ``eps * sign(grad)``; for ``norm="l2"`` it is ``eps`` along the normalised
    gradient. The result is clipped to ``[0, 1]``. The model runs in eval mode and its modes are restored.

    Args:
        model: Classifier taking pixels in ``[0, 1]``; returns logits or an output with ``.logits``.
        images: Batch ``(B, C, H, W)`` with values in ``[0, 1]``.
        labels: True classes, shape ``(B,)``.
        eps: Step length in the chosen norm (``0`` returns a copy of ``images``).
        norm: ``"linf"`` or ``"l2"``.

    Returns:
        Detached adversarial images of the same shape, in ``[0, 1]`` and within ``eps`` of ``images``.

    Example:
        >>> adv = fgsm(model, images, labels, eps=8 / 255)
    """
    check_inputs(model, images, labels, eps=eps)
    norm = _check_norm(norm)
    eps = _check_eps(eps)
    labels = _check_labels(labels, images)
    images = images.detach()
    if eps == 0:
        return images.clone()
    with eval_mode(model), torch.enable_grad():
        adv = images.clone().requires_grad_(True)
        loss = F.cross_entropy(model_logits(model, adv).float(), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, adv)
    return (images + eps * _ascent_direction(grad, norm)).clamp(0.0, 1.0)


ATTACKS: Registry[Callable[..., torch.Tensor]] = Registry("attack")
"""``attack(model, images, labels, eps, *, norm, **kwargs) -> adversarial images`` by name (weakest first)."""
ATTACKS.register("fgsm", fgsm)
ATTACKS.register("pgd", pgd)


def robust_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    *,
    norm: str = "l2",
    attack: str = "pgd",
    batch_size: int = 256,
    **attack_kwargs: Any,
) -> float:
    """Fraction of images classified correctly both as given and after the attack: an upper bound on robustness.

    Counting the clean prediction too keeps the estimate sound for attacks that do not consider the clean image
    (FGSM): a misclassified image is never counted as robust.

    Args:
        model: Classifier taking pixels in ``[0, 1]``; returns logits or an output with ``.logits``.
        images: Batch ``(N, C, H, W)`` with values in ``[0, 1]``; attacked ``batch_size`` images at a time.
        labels: True classes, shape ``(N,)``.
        eps: Attack radius in ``norm``.
        norm: ``"l2"`` or ``"linf"``.
        attack: A name in :data:`ATTACKS` (``"fgsm"``, ``"pgd"``).
        batch_size: Images per attack call.
        **attack_kwargs: Passed to the attack (e.g. ``steps``, ``restarts``, ``generator`` for PGD).

    Returns:
        Robust accuracy in ``[0, 1]``.

    Example:
        >>> clean = (model(images).argmax(-1) == labels).float().mean().item()
        >>> robust_accuracy(model, images, labels, eps=36 / 255, norm="l2", steps=5, restarts=2) <= clean
        True
    """
    attack_fn = ATTACKS[attack]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    check_inputs(model, images, labels, eps=eps)
    labels = _check_labels(labels, images)
    if images.shape[0] == 0:
        raise ValueError("robust_accuracy needs at least one image, got an empty batch")
    correct = 0
    with eval_mode(model):
        for start in range(0, images.shape[0], batch_size):
            batch, batch_labels = images[start : start + batch_size], labels[start : start + batch_size]
            adv = attack_fn(model, batch, batch_labels, eps, norm=norm, **attack_kwargs)
            with torch.no_grad():
                clean_ok = model_logits(model, batch).argmax(-1) == batch_labels
                adv_ok = model_logits(model, adv).argmax(-1) == batch_labels
            correct += int((clean_ok & adv_ok).sum())
    return correct / images.shape[0]
