"""Randomized smoothing certificates: Cohen, Rosenfeld & Kolter (2019, CERTIFY) and the Lipschitz-variance-margin
certificate of Delattre, Araujo, Barthelemy & Allauzen (LVM-RS, ICLR 2024) with a multiple-testing correction.

The smoothed classifier ``g(x) = argmax_c P(f(x + noise) = c)`` with ``noise ~ N(0, sigma^2 I)`` is certified to
keep its prediction within an l2 ball of radius ``sigma * Phi^-1(pA_lower)``, where ``pA_lower`` is a
Clopper-Pearson lower confidence bound on the top class probability. The noise is added in the ``[0, 1]`` pixel
space, before the model's own normalisation, and the noisy images are not clipped: clipping would change the noise
distribution the certificate is derived for. The radius is therefore in the same units as the Lipschitz
certificates of this package (l2 over pixels in ``[0, 1]``).

Example:
    >>> result = certify_smoothing(model, images, sigma=0.25, n0=10, n=100, progress=False)
    >>> result.radii.shape, 0.0 <= result.certified_accuracy(36 / 255, labels) <= 1.0
    (torch.Size([8]), True)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from scipy.special import erf
from scipy.stats import beta, norm
from torch import Tensor, nn
from tqdm.auto import tqdm

from robustvit._utils import eval_mode, model_logits, unchecked_pixels
from robustvit.certification.inputs import check_inputs
from robustvit.lipschitz import lipschitz_bound

__all__ = [
    "LVM_TEMPERATURES",
    "SmoothingResult",
    "bernstein_bounds",
    "certify_smoothing",
    "smoothed_difference_lipschitz",
    "smoothing_radius",
    "sparsemax",
]

LVM_TEMPERATURES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 1e6)
"""Temperatures ``tau`` of the simplex maps ``sparsemax(tau * logits)`` that ``method="lvm"`` tries: low ones make
the map smooth (the base model's Lipschitz bound then gives a large radius), high ones make it the argmax."""

_FLOAT64_SLACK = 1e-9  # relative rounding slack of a float64 forward pass (as robustvit.certification.lipschitz)


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


def sparsemax(z: Tensor) -> Tensor:
    """Euclidean projection of each row of ``z`` onto the probability simplex (Martins & Astudillo, 2016).

    A projection onto a convex set, so 1-Lipschitz in l2; it is exactly one-hot when the top entry leads by 1.

    Example:
        >>> sparsemax(torch.tensor([[2.0, 0.5, 0.0], [0.2, 0.1, 0.0]]))
        tensor([[1.0000, 0.0000, 0.0000],
                [0.4333, 0.3333, 0.2333]])
    """
    sorted_z, _ = z.sort(dim=-1, descending=True)
    cumulative = sorted_z.cumsum(dim=-1) - 1
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    support = (sorted_z * k > cumulative).sum(dim=-1, keepdim=True)
    threshold = cumulative.gather(-1, support - 1) / support.to(z.dtype)
    return (z - threshold).clamp_min(0)


def bernstein_bounds(mean: Tensor, variance: Tensor, n: int, delta: float) -> tuple[Tensor, Tensor]:
    """One-sided empirical Bernstein bounds (Maurer & Pontil 2009, Thm 4) on the mean of variables in ``[0, 1]``.

    With ``variance`` the unbiased sample variance of ``n`` samples, each of ``mean - w`` and ``mean + w`` bounds the
    true mean from its side with probability at least ``1 - delta``, where
    ``w = sqrt(2 variance ln(2 / delta) / n) + 7 ln(2 / delta) / (3 (n - 1))``.

    Example:
        >>> low, high = bernstein_bounds(torch.tensor(0.9), torch.tensor(0.01), n=10_000, delta=1e-3)
        >>> 0.88 < float(low) < 0.9 < float(high) < 0.92
        True
    """
    if n < 2:
        raise ValueError(f"the empirical Bernstein bound needs n >= 2 samples, got {n}")
    log_term = math.log(2 / delta)
    width = torch.sqrt(2 * variance.clamp_min(0) * log_term / n) + 7 * log_term / (3 * (n - 1))
    return (mean - width).clamp_min(0), (mean + width).clamp_max(1)


def smoothed_difference_lipschitz(base_lipschitz: float, sigma: float) -> float:
    """Lipschitz bound of ``x -> E[h_a(x + sigma e) - h_b(x + sigma e)]``, ``e ~ N(0, I)``, for a simplex-valued
    ``h`` that is ``base_lipschitz``-Lipschitz in l2 (``math.inf`` when unknown).

    ``d = h_a - h_b`` takes values in ``[-1, 1]`` and is ``l = sqrt(2) base_lipschitz``-Lipschitz. Along a unit
    direction the derivative of its Gaussian smoothing is the integral of ``d``'s slope (at most ``l``, with total
    variation at most 2) against a Gaussian density; it is largest when the slope ``l`` sits on the central window
    of length ``2 / l``: ``l * erf(1 / (sqrt(2) l sigma))``. As ``l -> inf`` this is ``sqrt(2 / pi) / sigma``, the
    bound for any ``h``; a small ``base_lipschitz`` gives a smaller constant, which is where the base model's
    Lipschitz bound enters LVM-RS.

    Example:
        >>> round(smoothed_difference_lipschitz(math.inf, 0.5), 6) == round(math.sqrt(2 / math.pi) / 0.5, 6)
        True
    """
    limit = math.sqrt(2 / math.pi) / sigma
    if not math.isfinite(base_lipschitz):
        return limit
    ell = math.sqrt(2) * base_lipschitz
    if ell == 0:
        return 0.0
    return min(limit, ell * float(erf(1 / (math.sqrt(2) * ell * sigma)))) * (1 + 1e-12)  # rounding of erf


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
        method: ``"cohen"`` or ``"lvm"``.
        temperatures: (``"lvm"``) temperature of the simplex map whose certificate won, ``nan`` where abstained.
    """

    predictions: torch.Tensor
    radii: torch.Tensor
    p_lower: torch.Tensor
    counts: torch.Tensor
    sigma: float
    n: int
    alpha: float
    method: str = "cohen"
    temperatures: torch.Tensor | None = None

    def certified(self, eps: float, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean mask of the images certified at radius ``eps``.

        An image is certified when it is not abstained, its radius is strictly larger than ``eps`` and, when
        ``labels`` are given, its prediction is correct.

        Example:
            >>> f64 = torch.float64
            >>> result = SmoothingResult(
            ...     predictions=torch.tensor([3, -1, 5]), radii=torch.tensor([0.8, 0.0, 0.2], dtype=f64),
            ...     p_lower=torch.tensor([0.99, 0.4, 0.8], dtype=f64), counts=torch.tensor([99, 40, 80]),
            ...     sigma=0.25, n=100, alpha=0.001)
            >>> result.certified(0.5, torch.tensor([3, 1, 5]))
            tensor([ True, False, False])
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the per-image tensors as lists (``-1`` / ``0`` / ``nan`` where abstained) and the settings.

        Example:
            >>> result = certify_smoothing(model, images, sigma=0.25, n0=10, n=100, progress=False)
            >>> record = result.to_dict()
            >>> len(record["radii"]), record["n"], record["method"]
            (8, 100, 'cohen')
        """
        return {
            "predictions": self.predictions.tolist(),
            "radii": self.radii.tolist(),
            "p_lower": self.p_lower.tolist(),
            "counts": self.counts.tolist(),
            "sigma": self.sigma,
            "n": self.n,
            "alpha": self.alpha,
            "method": self.method,
            "temperatures": None if self.temperatures is None else self.temperatures.tolist(),
        }

    def certified_accuracy(self, eps: float, labels: torch.Tensor) -> float:
        """Fraction of images predicted correctly with a certified radius larger than ``eps``.

        Example:
            >>> f64 = torch.float64
            >>> result = SmoothingResult(
            ...     predictions=torch.tensor([3, -1, 5]), radii=torch.tensor([0.8, 0.0, 0.2], dtype=f64),
            ...     p_lower=torch.tensor([0.99, 0.4, 0.8], dtype=f64), counts=torch.tensor([99, 40, 80]),
            ...     sigma=0.25, n=100, alpha=0.001)
            >>> result.certified_accuracy(36 / 255, torch.tensor([3, 1, 5]))
            0.666...
        """
        return float(self.certified(eps, labels).double().mean())


def _noisy_logits(
    model: nn.Module,
    image: torch.Tensor,
    num: int,
    sigma: float,
    batch_size: int,
    num_classes: int | None,
    generator: torch.Generator | None,
):
    """Batches of ``model``'s logits on ``num`` Gaussian perturbations of one image ``(C, H, W)``."""
    noise_device = generator.device if generator is not None else image.device
    for start in range(0, num, batch_size):
        size = min(batch_size, num - start)
        noise = torch.randn((size, *image.shape), generator=generator, device=noise_device, dtype=image.dtype)
        with unchecked_pixels():  # Gaussian samples leave [0, 1]: the smoothed classifier is defined on them
            logits = model_logits(model, image.unsqueeze(0) + sigma * noise.to(image.device))
        if num_classes is not None and logits.shape[-1] > num_classes:
            raise ValueError(f"the model returns {logits.shape[-1]} logits but num_classes={num_classes}")
        yield logits


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
    counts = None
    for logits in _noisy_logits(model, image, num, sigma, batch_size, num_classes, generator):
        hits = torch.bincount(logits.argmax(-1), minlength=num_classes or logits.shape[-1])
        counts = hits if counts is None else counts + hits
    return counts


@dataclass
class _LVMCertificate:
    radius: float
    p_lower: float
    temperature: float
    hits: int


def _lvm_certify(
    model: nn.Module,
    image: Tensor,
    class_a: int,
    sigma: float,
    n: int,
    alpha: float,
    temperatures: Sequence[float],
    lipschitz: float,
    batch_size: int,
    num_classes: int | None,
    generator: torch.Generator | None,
) -> _LVMCertificate:
    """LVM-RS for one image: for every temperature, Bernstein bounds on the smoothed simplex map's class means and
    the larger of its two radii; the best candidate wins. Bonferroni: every one of the ``M * K`` bounds (M maps, K
    classes) is taken at level ``alpha / (M K)``, so with probability at least ``1 - alpha`` all hold together and
    the maximum over candidates is as sound as each."""
    temps = torch.tensor(temperatures, dtype=torch.float64)
    sums = sumsq = None
    max_abs_logit, hits = 0.0, 0
    for logits in _noisy_logits(model, image, n, sigma, batch_size, num_classes, generator):
        logits = logits.to(torch.float64)
        hits += int((logits.argmax(-1) == class_a).sum())
        max_abs_logit = max(max_abs_logit, float(logits.abs().max()))
        maps = sparsemax(temps[:, None, None] * logits[None])  # (M, batch, K)
        batch_sums, batch_sumsq = maps.sum(dim=1), (maps * maps).sum(dim=1)
        sums = batch_sums if sums is None else sums + batch_sums
        sumsq = batch_sumsq if sumsq is None else sumsq + batch_sumsq
    num_maps, num_k = sums.shape
    # float64 rounding of the sums: at most n u relative each (values in [0, 1]); widen mean and variance by it.
    rounding = 4 * n * 2.0**-53
    mean = sums / n
    variance = (sumsq - sums * sums / n) / (n - 1) + rounding * sumsq / (n - 1)
    low, high = bernstein_bounds(mean, variance, n, alpha / (num_maps * num_k))
    low, high = low - rounding, high + rounding
    p_a = low[:, class_a]
    others = high.clone()
    others[:, class_a] = -math.inf
    p_b = torch.minimum(others.amax(dim=1), 1 - p_a)  # the means sum to 1
    # The base map h = sparsemax(tau * f) is tau * L-Lipschitz for the exact f; a float64 forward errs by at most
    # _FLOAT64_SLACK (1 + max |logit|) per logit, moving each difference h_a - h_b by at most twice sqrt(2 K) times
    # tau times that: the Lipschitz radius's margin pays it.
    logit_error = _FLOAT64_SLACK * (1 + max_abs_logit) * math.sqrt(num_k) if math.isfinite(lipschitz) else 0.0
    best = _LVMCertificate(0.0, float(p_a.max()), math.nan, hits)
    for m, tau in enumerate(temperatures):
        phi_radius = sigma / 2 * (float(norm.ppf(float(p_a[m]))) - float(norm.ppf(float(p_b[m]))))
        slack = 2 * math.sqrt(2) * tau * logit_error
        lip = smoothed_difference_lipschitz(tau * lipschitz, sigma)
        lip_radius = (float(p_a[m] - p_b[m]) - slack) / lip if lip > 0 else math.inf * float(p_a[m] - p_b[m] > slack)
        radius = max(phi_radius, lip_radius)
        if radius > best.radius:
            best = _LVMCertificate(radius, float(p_a[m]), float(tau), hits)
    return best


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
    method: str = "cohen",
    temperatures: Sequence[float] = LVM_TEMPERATURES,
    lipschitz: float | None = None,
) -> SmoothingResult:
    """Certify each image with randomized smoothing: CERTIFY of Cohen et al. (2019) or LVM-RS.

    Per image: ``n0`` noisy samples select the class ``cA`` (most frequent prediction); ``n`` fresh samples count
    ``nA`` hits of ``cA``; with ``pA_lower`` the one-sided Clopper-Pearson bound at level ``alpha`` the image is
    certified at radius ``sigma * Phi^-1(pA_lower)`` if ``pA_lower >= 0.5`` and abstains (``-1``, radius ``0``)
    otherwise. With probability at least ``1 - alpha`` per image a non-abstained prediction is the smoothed
    classifier's and it is constant on the l2 ball of that radius.

    ``method="lvm"`` (Delattre et al., ICLR 2024) certifies, for a temperature ``tau`` chosen per image among
    ``temperatures``, the smoothed simplex map ``G(x) = E[sparsemax(tau * f(x + noise))]`` whose argmax is the
    prediction. The same ``n0`` samples select ``cA``; on the ``n`` samples, empirical Bernstein bounds (with the
    empirical variance) give ``pA_lower <= G_cA`` and ``pB_upper >= max_{c != cA} G_c`` (and ``1 - pA_lower``);
    two radii follow, ``sigma / 2 * (Phi^-1(pA_lower) - Phi^-1(pB_upper))`` and the Lipschitz-margin radius
    ``(pA_lower - pB_upper) / Lip(G_a - G_b)`` (see :func:`smoothed_difference_lipschitz`, which uses the base
    model's bound). The largest radius over temperatures and both forms is returned. **Multiple testing**: unlike
    the reference code, every Bernstein bound is taken at level ``alpha / (len(temperatures) * K)`` (Bonferroni
    over all maps and classes), so the maximum over candidates keeps failure probability ``alpha``. When the base
    model's bound is used, samples run on a float64 copy of the model (the bound is the exact function's).

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
        method: ``"cohen"`` (default) or ``"lvm"``.
        temperatures: (``"lvm"``) the temperatures of the candidate simplex maps.
        lipschitz: (``"lvm"``) l2 Lipschitz bound of the model's logits in pixel space. ``None``: computed with
            :func:`robustvit.lipschitz_bound` (an unsupported model raises); ``math.inf``: no bound, only the
            smoothing itself is used.

    Returns:
        A :class:`SmoothingResult` with per-image predictions, radii, bounds and counts.

    Example:
        >>> result = certify_smoothing(model, images, sigma=0.25, n0=10, n=100, alpha=0.001, progress=False)
        >>> result.radii.dtype, bool((result.radii[result.predictions == -1] == 0).all())
        (torch.float64, True)
    """
    check_inputs(model, images)
    sigma, alpha = _check_sigma(sigma), _check_alpha(alpha)
    n0, n, batch_size = _check_count("n0", n0), _check_count("n", n), _check_count("batch_size", batch_size)
    if num_classes is not None:
        num_classes = _check_count("num_classes", num_classes)
    if method not in ("cohen", "lvm"):
        raise ValueError(f"method must be 'cohen' or 'lvm', got {method!r}")
    if method == "lvm":
        return _certify_lvm(
            model, images, sigma, n0, n, alpha, batch_size, num_classes, generator, progress, temperatures, lipschitz
        )

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


def _certify_lvm(
    model: nn.Module,
    images: Tensor,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    num_classes: int | None,
    generator: torch.Generator | None,
    progress: bool,
    temperatures: Sequence[float],
    lipschitz: float | None,
) -> SmoothingResult:
    temperatures = tuple(float(t) for t in temperatures)
    if not temperatures or not all(math.isfinite(t) and t > 0 for t in temperatures):
        raise ValueError(f"temperatures must be finite positive numbers, got {temperatures!r}")
    if n < 2:
        raise ValueError(f"method='lvm' needs n >= 2 samples, got {n}")
    if lipschitz is None:
        lipschitz = lipschitz_bound(model)
    lipschitz = float(lipschitz)
    if not lipschitz >= 0:
        raise ValueError(f"lipschitz must be >= 0 (math.inf when unknown), got {lipschitz!r}")
    if math.isfinite(lipschitz):  # the bound is the exact function's: sample a float64 copy
        model = copy.deepcopy(model).to(torch.float64)
        images = images.to(torch.float64)
    num_images = images.shape[0]
    predictions = torch.full((num_images,), -1, dtype=torch.long)
    radii = torch.zeros(num_images, dtype=torch.float64)
    p_lower = torch.zeros(num_images, dtype=torch.float64)
    counts = torch.zeros(num_images, dtype=torch.long)
    chosen = torch.full((num_images,), math.nan, dtype=torch.float64)
    images = images.detach()
    with eval_mode(model), torch.no_grad():
        for i in tqdm(range(num_images), desc="randomized smoothing (LVM)", disable=not progress):
            class_a = int(_sample_counts(model, images[i], n0, sigma, batch_size, num_classes, generator).argmax())
            result = _lvm_certify(
                model, images[i], class_a, sigma, n, alpha, temperatures, lipschitz, batch_size, num_classes, generator
            )
            counts[i], p_lower[i] = result.hits, result.p_lower
            if result.radius > 0:
                predictions[i], radii[i], chosen[i] = class_a, result.radius, result.temperature
    return SmoothingResult(predictions, radii, p_lower, counts, sigma, n, alpha, method="lvm", temperatures=chosen)
