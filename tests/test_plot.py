"""Certified accuracy curves and their PNG plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

from robustvit.certification.plot import certified_accuracy_curve, eps_label, plot_certified_accuracy

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_curve_values_on_a_hand_made_example() -> None:
    radii = [0.0, 0.1, 0.3, 0.3, 0.7, 0.9]
    correct = [True, True, True, False, True, False]
    grid, accuracy = certified_accuracy_curve(radii, correct, max_radius=1.0, num=11)
    np.testing.assert_allclose(grid, np.linspace(0.0, 1.0, 11))
    # r = 0: correct with a positive radius (0.1, 0.3, 0.7) -> 3/6; the radius-0 image is not certified.
    # The inequality is strict: at r = 0.3 only the image of radius 0.7 remains.
    expected = np.array([3, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0]) / 6
    np.testing.assert_allclose(accuracy, expected)


def test_curve_accepts_tensors_and_defaults_to_the_largest_radius() -> None:
    radii = torch.tensor([0.2, 0.4, float("inf"), 0.0], dtype=torch.float64)
    correct = torch.tensor([True, True, True, True])
    grid, accuracy = certified_accuracy_curve(radii, correct, num=3)
    np.testing.assert_allclose(grid, [0.0, 0.2, 0.4])  # infinite radii do not stretch the grid
    np.testing.assert_allclose(accuracy, [0.75, 0.5, 0.25])
    # No positive radius at all: the grid still spans [0, 1] and nothing is certified.
    grid, accuracy = certified_accuracy_curve(np.zeros(4), np.ones(4, dtype=bool), num=5)
    np.testing.assert_allclose(grid, np.linspace(0, 1, 5))
    assert (accuracy == 0).all()


def test_curve_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"\(3,\) and \(2,\)"):
        certified_accuracy_curve([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(ValueError, match="NaN at indices \\[1\\]"):
        certified_accuracy_curve([0.1, float("nan")], [True, True])
    with pytest.raises(ValueError, match="num.*1"):
        certified_accuracy_curve([0.1], [True], num=1)
    with pytest.raises(ValueError, match="max_radius.*-1"):
        certified_accuracy_curve([0.1], [True], max_radius=-1.0)
    with pytest.raises(ValueError, match="empty"):
        certified_accuracy_curve([], [])


def test_plot_writes_a_png(tmp_path: Path) -> None:
    backend = matplotlib.get_backend()
    rng = np.random.default_rng(0)
    curves = {
        "Lipschitz": (rng.uniform(0, 0.6, 50), rng.random(50) < 0.8),
        "smoothing σ=0.25": (torch.from_numpy(rng.uniform(0, 0.9, 50)), torch.from_numpy(rng.random(50) < 0.7)),
    }
    target = tmp_path / "nested" / "certified.png"
    written = plot_certified_accuracy(curves, target, title="tiny ViT")
    assert written == target
    data = target.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)
    assert matplotlib.get_backend() == backend  # no global backend switch


def test_plot_rejects_empty_curves_and_bad_marks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        plot_certified_accuracy({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="-0.1"):
        plot_certified_accuracy({"a": ([0.1], [True])}, tmp_path / "x.png", eps_marks=(-0.1,))
    assert not (tmp_path / "x.png").exists()


def test_eps_marks_are_labelled_in_units_of_one_255th() -> None:
    assert [eps_label(eps) for eps in (36 / 255, 72 / 255, 108 / 255, 0.0)] == ["36/255", "72/255", "108/255", "0/255"]
    assert eps_label(0.5) == "0.5"
