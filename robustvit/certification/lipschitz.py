"""Deterministic l2 certificates from a guaranteed Lipschitz bound.

For a prediction ``p`` with logits ``z``, no input within l2 distance ``r`` can change the prediction when

* the head is linear (``z = W f(x) + b`` with ``f`` ``L_f``-Lipschitz):
  ``r = min_{j != p} (z_p - z_j) / (L_f * ||w_p - w_j||)`` (the pairwise / GloRo bound), or otherwise
* ``r = (z_p - max_{j != p} z_j) / (sqrt(2) * L)`` for an ``L``-Lipschitz model.

Margins are computed in float64: the certification forward pass runs on a float64 copy of the model, and each
margin is reduced by ``MARGIN_SLACK * (1 + |z_p| + |z_j|)``, which covers the rounding of that pass (about
``depth * width * 2^-53`` relative: 1e-12 for ViT-B) with three orders of magnitude to spare. The radii certify
the model's exact function.

``certify(..., precision=torch.bfloat16 | torch.float16 | torch.float32)`` certifies instead the model *as it runs*
in that precision: the logits come from the deployed (rounded) model, and every margin pays ``2 sqrt(2) E``, where
``E`` bounds the distance between the deployed and the exact logits on the ball of the exact function's radius
around the image (a layer-by-layer floating-point error analysis, :mod:`robustvit.certification.rounding`): rounding at
``x`` and at every ``x'`` of the ball; the deployed radius is capped at that ball's radius.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from robustvit._utils import eval_mode, model_logits
from robustvit.certification.certificate import Certificate
from robustvit.certification.inputs import check_inputs
from robustvit.certification.plot import plot_certified_accuracy
from robustvit.certification.rounding import PRECISIONS, forward_error_bound
from robustvit.families import linear_head
from robustvit.lipschitz import lipschitz_report
from robustvit.lipschitz.engine import BoundReport
from robustvit.lipschitz.rescale import frozen_directions

__all__ = ["MARGIN_SLACK", "CertifyResult", "LipschitzHead", "certify", "lipschitz_head"]

MARGIN_SLACK = 1e-9


@dataclass
class LipschitzHead:
    """What a certificate needs of a model: its end-to-end bound and, for a linear head, the feature bound and
    the head's weight (``logits = W @ features + b``)."""

    lipschitz: float
    features_lipschitz: float | None
    head_weight: Tensor | None  # float64, (num_classes, num_features)
    report: BoundReport


@torch.no_grad()
def lipschitz_head(model: nn.Module) -> LipschitzHead:
    """Bounds of ``model`` for certification (pairwise head bound for supported families, global otherwise)."""
    report = lipschitz_report(model)
    head = linear_head(model)
    if head is None:
        return LipschitzHead(report.total, None, None, report)
    return LipschitzHead(report.total, float(head[0]), head[1], report)


@dataclass
class CertifyResult:
    """Predictions and certified l2 radii (pixels in [0, 1]) of a batch of images.

    ``radii[i]`` is 0 where the prediction is not robust at any radius.
    """

    predictions: Tensor
    radii: Tensor
    lipschitz: float
    features_lipschitz: float | None
    labels: Tensor | None = None
    report: BoundReport | None = None
    images: Tensor | None = field(default=None, repr=False)  # kept for to_certificate's PGD check
    precision: str | None = None  # None: the exact function; else the dtype the certified model runs in
    accumulation: str | None = None  # assumed accumulation dtype of that precision's dot products
    logit_error: float | None = None  # largest bound on |deployed - exact logits| on a certified ball (precision only)

    def certified(self, eps: float) -> Tensor:
        """Bool per image: radius > eps, and correct when labels were given."""
        ok = self.radii > eps
        return ok & (self.predictions == self.labels) if self.labels is not None else ok

    def certified_accuracy(self, eps: float) -> float:
        if self.labels is None:
            raise ValueError("certified accuracy needs labels: certify(model, images, labels)")
        return float(self.certified(eps).double().mean())

    @property
    def clean_accuracy(self) -> float:
        if self.labels is None:
            raise ValueError("clean accuracy needs labels: certify(model, images, labels)")
        return float((self.predictions == self.labels).double().mean())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per-image lists (``radii`` may hold ``inf``: a prediction no input can change), the bounds,
        the bound report and the precision; the images are left out.

        Example:
            >>> record = robustvit.certify(model, images, labels).to_dict()
            >>> len(record["radii"]) == len(record["labels"]) == 8, record["report"]["total"] == record["lipschitz"]
            (True, True)
        """
        return {
            "predictions": self.predictions.tolist(),
            "radii": self.radii.tolist(),
            "labels": None if self.labels is None else self.labels.tolist(),
            "lipschitz": self.lipschitz,
            "features_lipschitz": self.features_lipschitz,
            "report": None if self.report is None else self.report.to_dict(),
            "precision": self.precision,
            "accumulation": self.accumulation,
            "logit_error": self.logit_error,
        }

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """PNG of certified accuracy against the l2 radius."""
        if self.labels is None:
            raise ValueError("the certified-accuracy curve needs labels")
        correct = self.predictions == self.labels
        return plot_certified_accuracy({"Lipschitz certificate": (self.radii, correct)}, path, title=title)

    @frozen_directions()  # its PGD column runs the model: it must not move the tracked directions
    def to_certificate(self, model: nn.Module, *, dataset: str, split: str, **kwargs):
        """A :class:`~robustvit.certification.certificate.Certificate` for ``model`` from this result (see
        :meth:`Certificate.from_result`)."""
        return Certificate.from_result(self, model, dataset=dataset, split=split, **kwargs)


def _radii(logits: Tensor, head: LipschitzHead, logit_error: float | None = None) -> tuple[Tensor, Tensor]:
    """Predictions and certified radii from float64 logits (of the deployed model when ``logit_error`` is given)."""
    pred = logits.argmax(dim=-1)
    top = logits.gather(1, pred[:, None])
    margins = top - logits  # (B, K), z_p - z_j
    if logit_error is None:
        margins = margins - MARGIN_SLACK * (1 + top.abs() + logits.abs())
    else:  # |(F_hat - F)_p - (F_hat - F)_j| <= sqrt(2) E, at x and at x'
        margins = margins - 2 * math.sqrt(2) * logit_error
    if head.head_weight is not None:
        w = head.head_weight.to(logits.device)
        row_dist = torch.linalg.vector_norm(w[pred][:, None, :] - w[None, :, :], dim=-1)  # (B, K)
        denom = head.features_lipschitz * row_dist
    else:
        denom = torch.full_like(margins, math.sqrt(2) * head.lipschitz)
    # A pair whose logit difference cannot move (equal rows, or a constant model) never flips if its margin > 0.
    ratio = torch.where(
        denom > 0, margins / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.where(margins > 0, math.inf, 0.0)
    )
    ratio.scatter_(1, pred[:, None], math.inf)  # j != p
    radii = ratio.amin(dim=1).clamp_min(0.0)
    return pred, radii


@frozen_directions()  # certifying never moves the rescaling's tracked directions (train-mode weight reads)
def certify(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | None = None,
    *,
    batch_size: int = 256,
    progress: bool = False,
    precision: torch.dtype | None = None,
    accumulation: torch.dtype | None = None,
) -> CertifyResult:
    """Certified l2 radii of ``model``'s predictions on ``images`` (pixels in [0, 1]).

    Uses the pairwise head bound when the model's family exposes a linear head, the global bound otherwise.

    Args:
        precision: ``None`` certifies the exact function (float64 forward, tiny slack). ``torch.float32``,
            ``torch.float16`` or ``torch.bfloat16`` certifies the model as it runs in that dtype (weights and
            pixels rounded to it): predictions are the deployed model's and margins pay its worst-case rounding
            error (see :mod:`robustvit.certification.rounding`); layers without a rounding analysis are refused.
        accumulation: the dtype the backend accumulates dot products and sums in, with ``precision`` (default:
            ``precision`` itself, the worst case; ``torch.float32`` for oneDNN CPU kernels and half-precision
            reductions, which accumulate in float32). A stated assumption about the backend, recorded in the result.

    Example:
        >>> result = robustvit.certify(model, images, labels)
        >>> result.radii.shape, 0.0 <= result.certified_accuracy(36 / 255) <= 1.0
        (torch.Size([8]), True)
    """
    model = check_inputs(model, images, labels)  # the exact function: no autocast / DDP / PEFT wrapper

    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be None or one of {PRECISIONS}, got {precision!r}")
    if accumulation is not None and precision is None:
        raise ValueError("accumulation describes a deployed precision: pass precision=... with it")
    if labels is not None and (labels.dim() != 1 or len(labels) != len(images)):
        raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    deployed = copy.deepcopy(model).to(precision) if precision is not None else None
    exact = copy.deepcopy(deployed if deployed is not None else model).to(torch.float64)  # the rounded weights' F
    head = lipschitz_head(exact)
    device = next(exact.parameters()).device
    predictions, radii = [], []
    with eval_mode(exact), torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), desc="certify", disable=not progress):
            batch = images[start : start + batch_size].to(device=device, dtype=torch.float64)
            pred, rad = _radii(model_logits(exact, batch).to(torch.float64), head)
            predictions.append(pred.cpu())
            radii.append(rad.cpu())
    logit_error = None
    if deployed is not None:
        predictions, radii, logit_error = _deployed_radii(
            deployed, exact, head, images, torch.cat(radii), precision, accumulation, batch_size
        )
    else:
        predictions, radii = torch.cat(predictions), torch.cat(radii)
    return CertifyResult(
        predictions=predictions,
        radii=radii,
        lipschitz=head.lipschitz,
        features_lipschitz=head.features_lipschitz,
        labels=labels.cpu() if labels is not None else None,
        report=head.report,
        images=images,
        precision=_dtype_name(precision),
        accumulation=_dtype_name(accumulation or precision),
        logit_error=logit_error,
    )


def _deployed_radii(
    deployed: nn.Module,
    exact: nn.Module,
    head: LipschitzHead,
    images: Tensor,
    exact_radii: Tensor,
    precision: torch.dtype,
    accumulation: torch.dtype | None,
    batch_size: int,
) -> tuple[Tensor, Tensor, float]:
    """Predictions and radii of the model as it runs in ``precision``: per image, the rounding bound ``E`` on the
    ball of the exact function's radius (capped there, so the bound covers every point it certifies); returns the
    largest ``E``."""
    device = next(deployed.parameters()).device
    with eval_mode(deployed), torch.no_grad():
        logits = torch.cat(
            [
                model_logits(deployed, images[i : i + batch_size].to(device=device, dtype=precision)).to(torch.float64)
                for i in range(0, len(images), batch_size)
            ]
        )
    predictions, radii, worst = [], [], 0.0
    with eval_mode(exact):
        for i, image in enumerate(images):
            ball = float(exact_radii[i])
            error = forward_error_bound(
                exact, tuple(image.shape), precision, accumulation, image=image.to(torch.float64), radius=ball
            )
            pred, rad = _radii(logits[i : i + 1], head, error)
            predictions.append(pred.cpu())
            radii.append(rad.clamp_max(ball).cpu())
            worst = max(worst, error)
    return torch.cat(predictions), torch.cat(radii), worst


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype is not None else None
