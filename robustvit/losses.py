"""Lipschitz-margin losses: train a converted model so that its certificates grow.

All margin losses use the same pairwise constants as the certificate: ``K_yj = L_f * ||w_y - w_j||`` for a
linear head on ``L_f``-Lipschitz features (``sqrt(2) * L`` without one), so a logit that wins by more than
``eps * K_yj`` against every class is certified at radius ``eps``.

Example:
    >>> margins = head_margins(model)
    >>> loss = LOSSES["emma"](model(images), labels, eps=36 / 255, margins=margins)
    >>> loss.ndim
    0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustvit.errors import UnsupportedModuleError
from robustvit.families import linear_head
from robustvit.lipschitz.engine import bound_tensor
from robustvit.registry import Registry

__all__ = [
    "LOSSES",
    "EpsSchedule",
    "HeadMargins",
    "distillation_loss",
    "emma_loss",
    "head_margins",
    "margin_cross_entropy",
    "register_loss",
]


@dataclass
class HeadMargins:
    """Pairwise Lipschitz constants ``K[i, j]`` between logits (``K[i, i] = 0``), differentiable."""

    pairwise: Tensor  # (num_classes, num_classes)


def head_margins(model: nn.Module) -> HeadMargins:
    """``K_ij = L_features * ||w_i - w_j||`` for a supported family's linear head, else ``sqrt(2) * L``.

    Differentiable in the CenterNorm gammas, residual alphas and head weights; the spectrally rescaled layers enter
    through their (verified, constant) bounds, which stay about 1 by construction.
    """
    head = linear_head(model)
    if head is None:
        bound = bound_tensor(model)
        classes = _num_classes(model)
        return HeadMargins(math.sqrt(2) * bound * (1 - torch.eye(classes, dtype=bound.dtype, device=bound.device)))
    features, weight = head
    return HeadMargins(features * torch.cdist(weight, weight))


def _num_classes(model: nn.Module) -> int:
    classes = getattr(model, "num_classes", None)
    if classes is None:
        raise UnsupportedModuleError(f"cannot tell how many classes {type(model).__name__} predicts")
    return int(classes)


def margin_cross_entropy(logits: Tensor, labels: Tensor, *, eps: float, margins: HeadMargins) -> Tensor:
    """GloRo-style margin cross-entropy (Leino et al. 2021; Hu et al. 2023's ``margin_loss``).

    Every wrong logit is raised by what an eps-perturbation could add, ``eps * K_yj``, then cross-entropy.
    """
    raised = logits + eps * margins.pairwise.to(logits.dtype)[labels]
    return F.cross_entropy(raised, labels)


def emma_loss(logits: Tensor, labels: Tensor, *, eps: float, margins: HeadMargins) -> Tensor:
    """EMMA (Hu et al., "Unlocking Deterministic Robustness Certification on ImageNet", 2023).

    Each wrong class ``j`` is pushed only as far as needed: its logit gap to the label, measured in units of
    ``eps * K_yj``, sets a per-class factor ``clip(-gap_j / (eps K_yj), 0.01, 1)`` (no gradient), and the logit is
    raised by ``factor * eps * K_yj``.
    """
    k = margins.pairwise.to(logits.dtype)[labels]
    shifted = logits - logits.gather(1, labels[:, None])
    factor = (-shifted / (eps * k).clamp_min(1e-12)).clamp(0.01, 1.0).detach()
    return F.cross_entropy(shifted + factor * eps * k, labels)


def _cross_entropy(logits: Tensor, labels: Tensor, *, eps: float, margins: HeadMargins | None) -> Tensor:
    return F.cross_entropy(logits, labels)


LOSSES: Registry[Callable[..., Tensor]] = Registry("loss")
"""Training losses ``fn(logits, labels, *, eps, margins) -> Tensor`` by name."""


def register_loss(name: str, fn: Callable[..., Tensor] | None = None) -> Callable[..., Tensor]:
    """Register ``fn(logits, labels, *, eps, margins) -> Tensor`` under ``name``; without ``fn``, a decorator."""
    return LOSSES.register(name) if fn is None else LOSSES.register(name, fn)


register_loss("ce", _cross_entropy)
register_loss("margin", margin_cross_entropy)
register_loss("emma", emma_loss)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 2.0) -> Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al. 2015).

    Used to recover from the source model what the conversion lost (the shift mixer discards attention).
    """
    t = temperature
    return (
        F.kl_div(
            F.log_softmax(student_logits / t, dim=-1),
            F.log_softmax(teacher_logits.detach() / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        * t
        * t
    )


@dataclass
class EpsSchedule:
    """Training radius as a function of progress in [0, 1]: ramps linearly from ``start * eps`` to ``end * eps``
    over the first ``ramp`` fraction of training, then stays (LiResNet and LipShiFT train above the target eps).

    Example:
        >>> schedule = EpsSchedule(eps=36 / 255, start=0.1, end=2.0, ramp=0.5)
        >>> round(schedule(1.0) * 255, 3)
        72.0
    """

    eps: float
    start: float = 0.1
    end: float = 1.5
    ramp: float = 0.5

    def __post_init__(self) -> None:
        if self.eps < 0 or self.start < 0 or self.end < 0 or not 0 < self.ramp <= 1:
            raise ValueError(f"invalid eps schedule {self}")

    def __call__(self, progress: float) -> float:
        t = min(max(progress / self.ramp, 0.0), 1.0)
        return self.eps * (self.start + (self.end - self.start) * t)
