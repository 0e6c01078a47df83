"""Randomized smoothing certificates (Cohen, Rosenfeld & Kolter, 2019, algorithm CERTIFY).

The smoothed classifier ``g(x) = argmax_c P(f(x + noise) = c)`` with ``noise ~ N(0, sigma^2 I)`` is certified to
keep its prediction within an l2 ball of radius ``sigma * Phi^-1(pA_lower)``, where ``pA_lower`` is a
Clopper-Pearson lower confidence bound on the top class probability. The noise is added in the ``[0, 1]`` pixel
space, before the model's own normalisation, and the noisy images are not clipped: clipping would change the noise
distribution the certificate is derived for. The radius is therefore in the same units as the Lipschitz
certificates of this package (l2 over pixels in ``[0, 1]``).

Example:
    >>> result = certify_smoothing(model, images, sigma=0.25, n=10_000)
    >>> result.certified_accuracy(36 / 255, labels)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.stats import beta, norm
from torch import nn
from tqdm.auto import tqdm

from robustvit._utils import check_inputs, eval_mode, model_logits

__all__ = ["SmoothingResult", "certify_smoothing", "smoothing_radius"]


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    return alpha


def _check_sigma(sigma: float) -> float:
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    return sigma


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _clopper_pearson_lower(n_a: int, n: int, alpha: float) -> float:
    """One-sided ``(1 - alpha)`` Clopper-Pearson lower bound on a binomial proportion with ``n_a`` of ``n`` hits."""
    if n_a == 0:
        return 0.0
    return float(beta.ppf(alpha, n_a, n - n_a + 1))


def smoothing_radius(n_a: int, n: int, sigma: float, alpha: float) -> float:
    """Certified l2 radius of CERTIFY from ``n_a`` top-class hits out of ``n`` noise samples.

    ``pA_lower`` is the one-sided Clopper-Pearson bound ``beta.ppf(alpha, n_a, n - n_a + 1)`` (``0`` when
    ``n_a == 0``); the radius is ``sigma * Phi^-1(pA_lower)`` when ``pA_lower >= 0.5`` and ``0`` (abstain) below.

    Args:
        n_a: Count of the selected class among the ``n`` samples, ``0 <= n_a <= n``.
        n: Number of noise samples.
        sigma: Standard deviation of the Gaussian noise (pixels in ``[0, 1]``).
        alpha: Failure probability of the certificate.

    Returns:
        The certified radius, ``0.0`` when abstaining.

    Example:
        >>> smoothing_radius(10_000, 10_000, sigma=0.25, alpha=0.001)  # pA_lower = 0.001 ** (1 / 10_000)
        0.7996...
    """
    n = _check_count("n", n)
    if isinstance(n_a, bool) or int(n_a) != n_a or not 0 <= n_a <= n:
        raise ValueError(f"n_a must be an integer in [0, n={n}], got {n_a!r}")
    sigma, alpha = _check_sigma(sigma), _check_alpha(alpha)
    p_lower = _clopper_pearson_lower(int(n_a), n, alpha)
    return sigma * float(norm.ppf(p_lower)) if p_lower >= 0.5 else 0.0


@dataclass(frozen=True)
class SmoothingResult:
    """Per-image outcome of :func:`certify_smoothing`.

    Attributes:
        predictions: Predicted class of the smoothed classifier, ``-1`` where it abstains; long tensor ``(B,)``.
        radii: Certified l2 radius (pixels in ``[0, 1]``), ``0`` where it abstains; float64 ``(B,)``.
        p_lower: Clopper-Pearson lower bound on the top class probability; float64 ``(B,)``.
        counts: Hits of the selected class among the ``n`` certification samples; long ``(B,)``.
        sigma: Noise standard deviation.
        n: Certification samples per image.
        alpha: Failure probability of each certificate.
    """

    predictions: torch.Tensor
    radii: torch.Tensor
    p_lower: torch.Tensor
    counts: torch.Tensor
    sigma: float
    n: int
    alpha: float

    def certified(self, eps: float, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean mask of the images certified at radius ``eps``.

        An image is certified when it is not abstained, its radius is strictly larger than ``eps`` and, when
        ``labels`` are given, its prediction is correct.

        Example:
            >>> result.certified(0.5, labels).sum()
        """
        eps = float(eps)
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        mask = (self.predictions != -1) & (self.radii > eps)
        if labels is not None:
            if labels.shape != self.predictions.shape:
                raise ValueError(f"expected labels shaped {tuple(self.predictions.shape)}, got {tuple(labels.shape)}")
            mask &= self.predictions == labels.to(self.predictions.device)
        return mask

    def certified_accuracy(self, eps: float, labels: torch.Tensor) -> float:
        """Fraction of images predicted correctly with a certified radius larger than ``eps``.

        Example:
            >>> result.certified_accuracy(36 / 255, labels)
            0.61
        """
        return float(self.certified(eps, labels).double().mean())


def _sample_counts(
    model: nn.Module,
    image: torch.Tensor,
    num: int,
    sigma: float,
    batch_size: int,
    num_classes: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Class histogram of ``model`` on ``num`` Gaussian perturbations of one image ``(C, H, W)``."""
    noise_device = generator.device if generator is not None else image.device
    counts = None
    for start in range(0, num, batch_size):
        size = min(batch_size, num - start)
        noise = torch.randn((size, *image.shape), generator=generator, device=noise_device, dtype=image.dtype)
        logits = model_logits(model, image.unsqueeze(0) + sigma * noise.to(image.device))
        if num_classes is not None and logits.shape[-1] > num_classes:
            raise ValueError(f"the model returns {logits.shape[-1]} logits but num_classes={num_classes}")
        hits = torch.bincount(logits.argmax(-1), minlength=num_classes or logits.shape[-1])
        counts = hits if counts is None else counts + hits
    return counts


def certify_smoothing(
    model: nn.Module,
    images: torch.Tensor,
    sigma: float,
    *,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> SmoothingResult:
    """Certify each image with randomized smoothing (CERTIFY of Cohen et al., 2019).

    Per image: ``n0`` noisy samples select the class ``cA`` (most frequent prediction); ``n`` fresh samples count
    ``nA`` hits of ``cA``; with ``pA_lower`` the one-sided Clopper-Pearson bound at level ``alpha`` the image is
    certified at radius ``sigma * Phi^-1(pA_lower)`` if ``pA_lower >= 0.5`` and abstains (``-1``, radius ``0``)
    otherwise. With probability at least ``1 - alpha`` per image a non-abstained prediction is the smoothed
    classifier's and it is constant on the l2 ball of that radius.

    Noise ``N(0, sigma^2)`` is added to the pixels in ``[0, 1]`` (before any normalisation inside the model)
    and is not clipped, as clipping would change the distribution the certificate is derived for. The model runs
    in eval mode without gradients; its modes are restored afterwards.

    Args:
        model: Classifier taking pixels in ``[0, 1]``; returns logits or an output with ``.logits``.
        images: Batch ``(B, C, H, W)`` of pixels in ``[0, 1]``; certified one image at a time.
        sigma: Standard deviation of the Gaussian noise, in pixel units.
        n0: Samples used to select the class.
        n: Samples used to bound its probability.
        alpha: Failure probability of each certificate.
        batch_size: Noisy copies of an image per forward pass.
        num_classes: Number of classes; inferred from the model's logits when ``None``.
        generator: Random generator for the noise, for reproducible certificates.
        progress: Show a tqdm progress bar over the images.

    Returns:
        A :class:`SmoothingResult` with per-image predictions, radii, bounds and counts.

    Example:
        >>> result = certify_smoothing(model, images, sigma=0.25, n0=100, n=10_000, alpha=0.001)
        >>> result.radii, result.certified_accuracy(0.5, labels)
    """
    check_inputs(model, images)
    sigma, alpha = _check_sigma(sigma), _check_alpha(alpha)
    n0, n, batch_size = _check_count("n0", n0), _check_count("n", n), _check_count("batch_size", batch_size)
    if num_classes is not None:
        num_classes = _check_count("num_classes", num_classes)

    num_images = images.shape[0]
    predictions = torch.full((num_images,), -1, dtype=torch.long)
    radii = torch.zeros(num_images, dtype=torch.float64)
    p_lower = torch.zeros(num_images, dtype=torch.float64)
    counts = torch.zeros(num_images, dtype=torch.long)
    images = images.detach()
    with eval_mode(model), torch.no_grad():
        for i in tqdm(range(num_images), desc="randomized smoothing", disable=not progress):
            selection = _sample_counts(model, images[i], n0, sigma, batch_size, num_classes, generator)
            class_a = int(selection.argmax())
            n_a = int(_sample_counts(model, images[i], n, sigma, batch_size, num_classes, generator)[class_a])
            counts[i] = n_a
            p_lower[i] = _clopper_pearson_lower(n_a, n, alpha)
            radii[i] = smoothing_radius(n_a, n, sigma, alpha)
            if p_lower[i] >= 0.5:
                predictions[i] = class_a
    return SmoothingResult(predictions, radii, p_lower, counts, sigma, n, alpha)
