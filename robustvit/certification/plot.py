"""Certified accuracy as a function of the l2 radius, for comparing certificates (Lipschitz, smoothing, ...).

Example:
    >>> from robustvit.certification.smoothing import certify_smoothing
    >>> lip = robustvit.certify(model, images, labels)
    >>> smooth = certify_smoothing(model, images, sigma=0.25, n0=10, n=100, progress=False)
    >>> curves = {"Lipschitz": (lip.radii, lip.predictions == labels),
    ...           "smoothing σ=0.25": (smooth.radii, smooth.predictions == labels)}
    >>> plot_certified_accuracy(curves, "outputs/certified_accuracy.png").exists()
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["certified_accuracy_curve", "plot_certified_accuracy"]

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]


def _as_numpy(values: ArrayLike, name: str, dtype: type) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array.astype(dtype)


def _checked_curve(radii: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    radii_np = _as_numpy(radii, "radii", np.float64)
    correct_np = _as_numpy(correct, "correct", bool)
    if radii_np.shape != correct_np.shape:
        raise ValueError(f"radii and correct must have the same shape, got {radii_np.shape} and {correct_np.shape}")
    if radii_np.size == 0:
        raise ValueError("radii is empty: a certified accuracy curve needs at least one image")
    if np.isnan(radii_np).any():
        raise ValueError(f"radii contain NaN at indices {np.flatnonzero(np.isnan(radii_np)).tolist()[:10]}")
    return radii_np, correct_np


def _default_max_radius(radii: np.ndarray) -> float:
    """Largest finite positive radius (where the curve reaches its last value), or 1 when there is none."""
    finite = radii[np.isfinite(radii) & (radii > 0)]
    return float(finite.max()) if finite.size else 1.0


def certified_accuracy_curve(
    radii: ArrayLike, correct: ArrayLike, *, max_radius: float | None = None, num: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """Certified accuracy on a grid of radii: the fraction of images with ``correct & (radii > r)``.

    The inequality is strict, as a certificate of radius ``R`` covers the open ball. At ``r = 0`` the value is the
    fraction of correct images with a positive radius, which is below the clean accuracy when some correct
    predictions carry no certificate (e.g. a smoothing abstention, radius ``0``).

    Args:
        radii: Certified radius per image (``0`` for abstentions), shape ``(N,)``.
        correct: Whether each (certified) prediction is correct, shape ``(N,)``.
        max_radius: End of the grid; defaults to the largest finite radius (or ``1`` when none is positive).
        num: Number of grid points, from ``0`` to ``max_radius`` inclusive.

    Returns:
        ``(grid, accuracy)``, two float arrays of length ``num``.

    Example:
        >>> grid, acc = certified_accuracy_curve([0.1, 0.5, 0.0], [True, True, True], max_radius=1.0, num=11)
        >>> [round(float(a), 3) for a in (acc[0], acc[2], acc[6])]
        [0.667, 0.333, 0.0]
    """
    radii_np, correct_np = _checked_curve(radii, correct)
    if isinstance(num, bool) or int(num) != num or num < 2:
        raise ValueError(f"num must be an integer >= 2, got {num!r}")
    if max_radius is None:
        max_radius = _default_max_radius(radii_np)
    elif not (math.isfinite(max_radius) and max_radius > 0):
        raise ValueError(f"max_radius must be a finite number > 0, got {max_radius!r}")
    grid = np.linspace(0.0, float(max_radius), int(num))
    certified = correct_np[None, :] & (radii_np[None, :] > grid[:, None])
    return grid, certified.mean(axis=1)


def eps_label(eps: float) -> str:
    """``36/255`` for multiples of 1/255 (the usual pixel budgets), else a short decimal."""
    steps = round(eps * 255)
    if math.isclose(steps, eps * 255, abs_tol=1e-6):
        return f"{steps}/255"
    return f"{eps:.3g}"


def plot_certified_accuracy(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]],
    path: str | Path,
    *,
    eps_marks: Sequence[float] = (36 / 255, 72 / 255, 108 / 255),
    title: str | None = None,
) -> Path:
    """Write a PNG of certified accuracy against the l2 radius, one line per certificate.

    All curves share one grid, up to the largest radius of any curve (and past the last ``eps_marks``). Drawn with
    matplotlib's Agg canvas directly, so no display is needed and pyplot's global state is left alone.

    Args:
        curves: Label (e.g. ``"Lipschitz"``, ``"smoothing σ=0.25"``) to ``(radii, correct)`` as taken by
            :func:`certified_accuracy_curve`.
        path: Output file; parent folders are created. Written as PNG whatever the suffix.
        eps_marks: Radii marked by dotted vertical lines, labelled like ``36/255``.
        title: Optional figure title.

    Returns:
        The path written.

    Example:
        >>> radii, correct = torch.tensor([0.1, 0.5, 0.0]), torch.tensor([True, True, False])
        >>> plot_certified_accuracy({"Lipschitz": (radii, correct)}, "certified.png", title="ViT-Tiny CIFAR-10").name
        'certified.png'
    """
    if not curves:
        raise ValueError("curves is empty: give at least one label -> (radii, correct)")
    checked = {label: _checked_curve(radii, correct) for label, (radii, correct) in curves.items()}
    marks = [float(eps) for eps in eps_marks]
    bad_marks = [eps for eps in marks if not (math.isfinite(eps) and eps >= 0)]
    if bad_marks:
        raise ValueError(f"eps_marks must be finite numbers >= 0, got {bad_marks}")
    max_radius = max(max(_default_max_radius(radii) for radii, _ in checked.values()), *marks, 0.0) * 1.05

    fig = Figure(figsize=(6.4, 4.4), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (radii, correct) in checked.items():
        grid, accuracy = certified_accuracy_curve(radii, correct, max_radius=max_radius, num=400)
        ax.plot(grid, accuracy, label=label, linewidth=1.8)
    for eps in marks:
        ax.axvline(eps, color="0.4", linestyle=":", linewidth=1.0)
        ax.text(eps, 1.0, eps_label(eps), transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
    ax.set_xlim(0.0, max_radius)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("l2 radius (pixels in [0,1])")
    ax.set_ylabel("certified accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    if title is not None:
        # Above the eps labels, which sit on the top edge of the axes.
        ax.set_title(title, pad=16)
    fig.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
