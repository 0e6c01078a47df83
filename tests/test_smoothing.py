"""Randomized smoothing on a classifier whose class probabilities under Gaussian noise are known exactly."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import beta, binom, norm
from torch import nn

from robustvit.certification.smoothing import SmoothingResult, certify_smoothing, smoothing_radius

SIGMA = 0.25
X0 = 0.5


class Threshold(nn.Module):
    """Class 0 iff ``(x[..., 0, 0, 0] - X0) / SIGMA < 0``.

    An image whose first pixel is ``v`` gets class 0 with probability ``Phi((X0 - v) / SIGMA)`` under
    ``N(0, SIGMA^2)`` noise, whatever happens to the other pixels.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        is_zero = (x[:, 0, 0, 0] - X0) / SIGMA < 0
        return torch.stack([is_zero, ~is_zero], dim=1).float()


def _images_with_p0(p0: list[float]) -> torch.Tensor:
    """Images (B, 1, 2, 2) whose probability of class 0 under the noise is ``p0``; other pixels are 0.5."""
    images = torch.full((len(p0), 1, 2, 2), 0.5, dtype=torch.float64)
    for i, p in enumerate(p0):
        images[i, 0, 0, 0] = X0 - SIGMA * norm.ppf(p)
    return images


def test_certificates_match_cohens_formula_on_known_probabilities() -> None:
    p0 = [0.97, 0.9, 0.1, 0.5]  # class 0, class 0, class 1, a coin flip (abstain); pixels stay in [0, 1]
    n, alpha = 2000, 0.001
    result = certify_smoothing(
        Threshold(),
        _images_with_p0(p0),
        SIGMA,
        n0=100,
        n=n,
        alpha=alpha,
        batch_size=512,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert result.predictions.tolist() == [0, 0, 1, -1]
    assert result.predictions.dtype == torch.long
    assert result.radii.dtype == torch.float64 and result.p_lower.dtype == torch.float64
    assert (result.sigma, result.n, result.alpha) == (SIGMA, n, alpha)

    # The counts are Binomial(n, p_top): within 5 standard deviations of the mean.
    p_top = torch.tensor([0.97, 0.9, 0.9, 0.5], dtype=torch.float64)
    sd = (n * p_top * (1 - p_top)).sqrt()
    assert ((result.counts - n * p_top).abs() < 5 * sd).all()

    for i in range(len(p0)):
        n_a = int(result.counts[i])
        expected_lower = beta.ppf(alpha, n_a, n - n_a + 1)
        assert float(result.p_lower[i]) == expected_lower
        expected_radius = SIGMA * norm.ppf(expected_lower) if expected_lower >= 0.5 else 0.0
        assert float(result.radii[i]) == expected_radius
        assert float(result.radii[i]) == smoothing_radius(n_a, n, SIGMA, alpha)
    # The certified radius never exceeds the true one, sigma * Phi^-1(p_top), for these counts.
    true_radius = SIGMA * norm.ppf(p_top[:3])
    assert (result.radii[:3] < torch.from_numpy(true_radius)).all()
    assert result.radii[3] == 0


def test_radius_approaches_sigma_times_z_with_many_samples() -> None:
    # P(class 0) = Phi(1), so the exact radius is sigma; the Clopper-Pearson bound at n = 100k is within 2%.
    result = certify_smoothing(
        Threshold(),
        _images_with_p0([norm.cdf(1.0)]),
        SIGMA,
        n0=100,
        n=100_000,
        batch_size=20_000,
        generator=torch.Generator().manual_seed(1),
        progress=False,
    )
    assert result.predictions.tolist() == [0]
    assert 0.95 * SIGMA < float(result.radii[0]) < 1.01 * SIGMA


def test_abstains_when_the_top_class_is_near_one_half() -> None:
    result = certify_smoothing(
        Threshold(),
        _images_with_p0([0.5, 0.51, 0.49]),
        SIGMA,
        n0=100,
        n=1000,
        generator=torch.Generator().manual_seed(2),
        progress=False,
    )
    assert result.predictions.tolist() == [-1, -1, -1]
    assert result.radii.tolist() == [0.0, 0.0, 0.0]
    assert (result.p_lower < 0.5).all()
    assert not result.certified(0.0).any()


def test_smoothing_radius_hand_computed_values() -> None:
    # All hits: the Clopper-Pearson bound is beta.ppf(alpha, n, 1) = alpha ** (1 / n).
    for n in (100, 10_000):
        assert smoothing_radius(n, n, 0.5, 0.001) == pytest.approx(0.5 * norm.ppf(0.001 ** (1 / n)), rel=1e-12)
    assert smoothing_radius(100, 100, 1.0, 0.001) == pytest.approx(1.5005, abs=1e-4)  # Phi^-1(0.001 ** 0.01 = 0.93325)
    # Definition of the one-sided bound: P(Binomial(n, p_lower) >= n_a) = alpha.
    for n_a, n in [(990, 1000), (700, 1000), (80, 100)]:
        p_lower = norm.cdf(smoothing_radius(n_a, n, 1.0, 0.01))
        assert binom.sf(n_a - 1, n, p_lower) == pytest.approx(0.01, rel=1e-6)
    # Abstentions.
    assert smoothing_radius(0, 100, 0.25, 0.001) == 0.0
    assert smoothing_radius(50, 100, 0.25, 0.001) == 0.0
    assert smoothing_radius(1, 1, 0.25, 0.4) == 0.0  # alpha ** 1 = 0.4 < 0.5
    # The radius grows with sigma and with confidence (larger alpha).
    assert smoothing_radius(900, 1000, 0.5, 0.001) == pytest.approx(2 * smoothing_radius(900, 1000, 0.25, 0.001))
    assert smoothing_radius(900, 1000, 0.25, 0.05) > smoothing_radius(900, 1000, 0.25, 0.001)


def test_reproducible_with_a_seeded_generator() -> None:
    images = _images_with_p0([0.8, 0.3])

    def run(seed: int) -> SmoothingResult:
        return certify_smoothing(
            Threshold(),
            images,
            SIGMA,
            n0=50,
            n=500,
            batch_size=128,
            generator=torch.Generator().manual_seed(seed),
            progress=False,
        )

    first, second, other = run(3), run(3), run(4)
    assert torch.equal(first.counts, second.counts) and torch.equal(first.radii, second.radii)
    assert not torch.equal(first.counts, other.counts)


def test_certified_masks_and_accuracy() -> None:
    result = SmoothingResult(
        predictions=torch.tensor([0, 1, -1, 2]),
        radii=torch.tensor([0.5, 0.1, 0.0, 1.0], dtype=torch.float64),
        p_lower=torch.tensor([0.9, 0.6, 0.4, 0.99], dtype=torch.float64),
        counts=torch.tensor([90, 60, 40, 99]),
        sigma=0.25,
        n=100,
        alpha=0.001,
    )
    labels = torch.tensor([0, 0, 1, 2])
    assert result.certified(0.05).tolist() == [True, True, False, True]
    assert result.certified(0.05, labels).tolist() == [True, False, False, True]
    assert result.certified(0.5, labels).tolist() == [False, False, False, True]  # radius must exceed eps
    assert result.certified_accuracy(0.2, labels) == 0.5
    assert result.certified_accuracy(1.0, labels) == 0.0
    with pytest.raises(ValueError, match=r"\(3,\)"):
        result.certified(0.1, labels[:3])
    with pytest.raises(ValueError, match="-1"):
        result.certified(-1.0)
    record = json.loads(json.dumps(result.to_dict()))
    assert record["predictions"] == [0, 1, -1, 2] and record["counts"] == [90, 60, 40, 99]
    assert record["p_lower"] == [0.9, 0.6, 0.4, 0.99] and record["temperatures"] is None
    assert (record["sigma"], record["n"], record["alpha"], record["method"]) == (0.25, 100, 0.001, "cohen")


class _HFStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.threshold = Threshold()
        self.dropout = nn.Dropout(0.5)
        self.seen_training: list[bool] = []

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        self.seen_training.append(self.training)
        return SimpleNamespace(logits=self.dropout(self.threshold(pixel_values)))


def test_runs_in_eval_mode_supports_logits_outputs_and_shows_progress(capsys: pytest.CaptureFixture[str]) -> None:
    model = _HFStyle().train()
    result = certify_smoothing(
        model,
        _images_with_p0([0.95]),
        SIGMA,
        n0=10,
        n=200,
        num_classes=5,
        generator=torch.Generator().manual_seed(5),
        progress=True,
    )
    assert result.predictions.tolist() == [0]
    assert not any(model.seen_training) and model.training and model.dropout.training
    assert "randomized smoothing" in capsys.readouterr().err

    certify_smoothing(Threshold(), _images_with_p0([0.95]), SIGMA, n0=10, n=20, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma": 0.0}, "sigma.*0.0"),
        ({"sigma": -0.25}, "sigma.*-0.25"),
        ({"sigma": math.nan}, "sigma.*nan"),
        ({"n0": 0}, "n0.*0"),
        ({"n": 0}, "n must.*0"),
        ({"alpha": 0.0}, "alpha.*0.0"),
        ({"batch_size": 0}, "batch_size.*0"),
        ({"num_classes": 1}, "2 logits.*num_classes=1"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    arguments = {"sigma": SIGMA, "n0": 10, "n": 10, "progress": False} | kwargs
    with pytest.raises(ValueError, match=match):
        certify_smoothing(Threshold(), _images_with_p0([0.9]), **arguments)


def test_smoothing_radius_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="101"):
        smoothing_radius(101, 100, 0.25, 0.001)
    with pytest.raises(ValueError, match="-1"):
        smoothing_radius(-1, 100, 0.25, 0.001)
    with pytest.raises(ValueError, match="sigma"):
        smoothing_radius(10, 100, 0.0, 0.001)


# ----------------------------------------------------------------------------------------------------------
# method="lvm": Lipschitz-variance-margin certificates (Bernstein bounds, simplex maps, the base model's bound)
# ----------------------------------------------------------------------------------------------------------


class Ramp(nn.Module):
    """Logits ``(s, -s)`` with ``s = slope * (X0 - x[..., 0, 0, 0])``: sqrt(2) * slope-Lipschitz in l2.

    Every simplex map of these logits is symmetric about ``x0 = X0``, so every smoothed classifier of it predicts
    class 0 exactly when the first pixel is below ``X0``: the true robust radius of an image is ``|X0 - x0|``.
    """

    def __init__(self, slope: float):
        super().__init__()
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.slope * (X0 - x[:, 0, 0, 0])
        return torch.stack([s, -s], dim=1)


def _lvm(model: nn.Module, images: torch.Tensor, seed: int, **kwargs) -> SmoothingResult:
    kwargs = {"n0": 50, "n": 2000, "alpha": 0.001, "batch_size": 1000, **kwargs}
    return certify_smoothing(
        model, images, SIGMA, method="lvm", generator=torch.Generator().manual_seed(seed), progress=False, **kwargs
    )


def _pixel_images(values: list[float]) -> torch.Tensor:
    images = torch.full((len(values), 1, 2, 2), 0.5, dtype=torch.float64)
    images[:, 0, 0, 0] = torch.tensor(values, dtype=torch.float64)
    return images


@pytest.mark.parametrize("lipschitz", [math.inf, None])
def test_lvm_never_exceeds_the_true_radius_of_a_step_classifier(lipschitz) -> None:
    p0 = [0.97, 0.9, 0.1, 0.5]  # pixels stay in [0, 1]
    images = _images_with_p0(p0)
    kwargs = {"lipschitz": math.inf} if lipschitz is not None else {"lipschitz": 1e9}  # a step: any big bound
    for seed in range(3):
        result = _lvm(Threshold(), images, seed, **kwargs)
        assert result.method == "lvm" and result.predictions.tolist() == [0, 0, 1, -1]
        true_radius = SIGMA * abs(norm.ppf(torch.tensor(p0[:3]).numpy()))
        assert (result.radii[:3] < torch.from_numpy(true_radius)).all() and result.radii[3] == 0
        assert torch.isnan(result.temperatures[3]) and not torch.isnan(result.temperatures[:3]).any()


def test_lvm_failure_rate_on_known_probabilities_is_at_most_alpha() -> None:
    """200 small certifications at alpha = 0.05: the radius exceeds the true one in at most as many runs as a
    Binomial(200, 0.05) exceeds with probability 1e-4 (Bonferroni makes the real rate far smaller)."""
    alpha, trials = 0.05, 200
    images = _pixel_images([X0 - 0.3] * trials)  # true radius 0.3
    result = _lvm(Ramp(slope=2.0), images, seed=0, n0=20, n=400, alpha=alpha, lipschitz=math.sqrt(2) * 2.0)
    failures = int(((result.radii >= 0.3) | (result.predictions == 1)).sum())
    assert failures <= binom.isf(1e-4, trials, alpha)
    assert (result.predictions == 0).sum() > trials / 2  # the certificates are not vacuous


def test_lvm_uses_the_base_lipschitz_bound_soundly_on_a_smooth_base() -> None:
    model, values = Ramp(slope=0.5), [X0 - 0.3, X0 - 0.45, X0 + 0.45]  # pixels stay in [0, 1]
    images = _pixel_images(values)
    with_bound = _lvm(model, images, seed=0, n=4000, lipschitz=math.sqrt(2) * 0.5)
    without = _lvm(model, images, seed=0, n=4000, lipschitz=math.inf)
    cohen = certify_smoothing(
        model, images, SIGMA, n0=50, n=4000, alpha=0.001, generator=torch.Generator().manual_seed(0), progress=False
    )
    truth = torch.tensor([abs(v - X0) for v in values], dtype=torch.float64)
    assert with_bound.predictions.tolist() == [0, 0, 1]
    assert (with_bound.radii < truth).all() and (cohen.radii < truth).all()
    assert (with_bound.radii > without.radii).all()


def test_lvm_reads_the_bound_of_a_supported_model_and_refuses_unknown_ones() -> None:
    linear = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).double()
    result = _lvm(linear, _pixel_images([0.2, 0.8]), seed=0, n=200)
    assert result.method == "lvm" and result.radii.shape == (2,)
    with pytest.raises(Exception, match="Ramp"):
        _lvm(Ramp(1.0), _pixel_images([0.2]), seed=0, n=200)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "bernstein"}, "method"),
        ({"method": "lvm", "temperatures": ()}, "temperatures"),
        ({"method": "lvm", "temperatures": (0.0,)}, "temperatures"),
        ({"method": "lvm", "lipschitz": -1.0}, "lipschitz"),
        ({"method": "lvm", "n": 1, "lipschitz": 1.0}, "n >= 2"),
    ],
)
def test_lvm_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        certify_smoothing(Threshold(), _pixel_images([0.2]), SIGMA, n0=10, progress=False, **kwargs)


def test_sparsemax_is_the_simplex_projection_and_bernstein_covers_the_mean() -> None:
    from robustvit.certification.smoothing import bernstein_bounds, sparsemax

    z = torch.randn(50, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    p = sparsemax(z)
    assert torch.allclose(p.sum(-1), torch.ones(50, dtype=torch.float64)) and (p >= 0).all()
    # the projection: no point of the simplex is closer (checked against random simplex points)
    others = torch.distributions.Dirichlet(torch.ones(6, dtype=torch.float64)).sample((200,))
    assert ((z[:, None] - others[None]).norm(dim=-1) >= (z - p).norm(dim=-1, keepdim=True) - 1e-12).all()
    # Bernstein: Bernoulli(0.3) means, 400 samples, delta 0.01: the bound fails in at most a few of 300 draws
    draws = (torch.rand(300, 400, generator=torch.Generator().manual_seed(1)) < 0.3).double()
    low, high = bernstein_bounds(draws.mean(1), draws.var(1), 400, 0.01)
    assert int((low > 0.3).sum()) <= 10 and int((high < 0.3).sum()) <= 10
