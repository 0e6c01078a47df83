"""The certification's settings: the evaluation budget every split evaluation shares, and what a certificate of a
split reports (:class:`CertificationConfig`); free of torch so that the command line's flags come from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from robustvit.constants import DEFAULT_EPS
from robustvit.settings import arg, check, check_positive, parse_radius

__all__ = ["CertificationConfig", "EvaluationBudget"]


@dataclass
class EvaluationBudget:
    """What every evaluation of a split shares: the attack's steps, how many images, in which batches."""

    RENAMED: ClassVar[dict[str, str]] = {"batch_size": "eval_batch_size", "max_images": "max_eval_images"}
    """Keywords of the 0.1 API, still accepted with a DeprecationWarning (``robustvit.settings.resolve_config``)."""

    pgd_steps: int = arg(50, "steps of each PGD attack")
    max_eval_images: int | None = arg(
        None, "evaluate N images of the evaluation split (default: all; robustvit verify: the certificate's N)"
    )
    eval_batch_size: int = arg(256, "evaluation batch size")

    def __post_init__(self) -> None:
        check_positive(self, "pgd_steps", "eval_batch_size")
        check_positive(self, "max_eval_images", allow_none=True)


@dataclass
class CertificationConfig(EvaluationBudget):
    """Certification of a split (``robustvit.certify_split.certify_split``): the certificate's l2 radii, its PGD
    column (an l2 attack that tries to break the certificates) and the images.

    Example:
        >>> [round(e * 255) for e in CertificationConfig().eps]
        [36, 72, 108]
    """

    eps: list[float] = arg(list(DEFAULT_EPS), "l2 radii to report (pixels in [0, 1]; 36/255 works)",
                           parse=parse_radius)  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        self.eps = [float(e) for e in self.eps]
        check(bool(self.eps) and min(self.eps) >= 0, f"--eps must be radii >= 0, got {self.eps}")
