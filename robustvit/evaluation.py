"""Robustness of a classifier on pixels in ``[0, 1]``: clean, token noise, FGSM/PGD (linf, l2) and corruptions.

Every number is an accuracy-like fraction over the same images, so two evaluations (e.g. before and after
finetuning) compare row by row: :func:`format_comparison` prints a table, :func:`plot_comparison` draws one.
Attack accuracies count an image only when it is classified correctly both clean and attacked (an upper bound on
true robustness: the attacks are empirical).

Example:
    >>> before = evaluate_robustness(PixelModel(model), test_set, max_images=500)
    >>> after = evaluate_robustness(PixelModel(finetuned), test_set, max_images=500)
    >>> print(format_comparison(before, after))
    >>> plot_comparison(before, after, "outputs/robustness.png")
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from robustvit._utils import check_images, eval_mode, model_logits
from robustvit.certify.attacks import fgsm, pgd
from robustvit.certify.plot import eps_label
from robustvit.corruptions import MAX_SEVERITY, corrupt, corruption_names
from robustvit.data import stratified_subset
from robustvit.nullspace import token_noise

__all__ = ["evaluate_robustness", "format_comparison", "plot_comparison", "summary_rows"]

_ATTACKS = {"fgsm": fgsm, "pgd": pgd}


def _check_item(dataset: Dataset) -> None:
    item = dataset[0]
    if not (isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], Tensor)):
        raise ValueError(
            f"dataset items must be (image, label) pairs with an image tensor (C, H, W); got {type(item).__name__}"
            + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
            + ". Labelled data is needed to measure accuracy."
        )
    label = item[1]
    if (
        isinstance(label, bool)
        or not isinstance(label, (int, Tensor))
        or (isinstance(label, Tensor) and label.numel() != 1)
    ):
        raise ValueError(f"dataset labels must be ints (class indices), got {label!r}")


def _loader(
    data: Dataset | DataLoader, batch_size: int, max_images: int | None, accelerator: Accelerator | None, seed: int
) -> tuple[DataLoader, int]:
    """A sequential loader over a stratified random subset of ``max_images`` items (sharded over processes),
    and the image count. Never the first N: splits are often sorted by class."""
    if isinstance(data, DataLoader):
        dataset, batch_size = data.dataset, data.batch_size or batch_size
    else:
        dataset = data
    if len(dataset) == 0:
        raise ValueError("the evaluation dataset is empty")
    _check_item(dataset)
    if max_images is not None:
        dataset = stratified_subset(dataset, max_images, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return (accelerator.prepare_data_loader(loader) if accelerator is not None else loader), len(dataset)


def _validate(
    eps_linf: Sequence[float],
    eps_l2: Sequence[float],
    corruptions: Sequence[str],
    severities: Sequence[int],
    pgd_steps: int,
    pgd_restarts: int,
    batch_size: int,
    max_images: int | None,
) -> None:
    for eps in (*eps_linf, *eps_l2):
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"attack radii must be finite and > 0, got {eps!r}")
    unknown = sorted(set(corruptions) - set(corruption_names()))
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; available: {corruption_names()}")
    if corruptions and not severities:
        raise ValueError("corruptions need at least one severity")
    for severity in severities:
        if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= MAX_SEVERITY:
            raise ValueError(f"severities must be ints from 1 to {MAX_SEVERITY}, got {severity!r}")
    for name, value in (
        ("pgd_steps", pgd_steps),
        ("pgd_restarts", pgd_restarts),
        ("batch_size", batch_size),
        ("max_images", max_images),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def evaluate_robustness(
    model: nn.Module,
    dataset_or_loader: Dataset | DataLoader,
    *,
    noise: Tensor | None = None,
    eps_linf: Sequence[float] = (1 / 255, 2 / 255),
    eps_l2: Sequence[float] = (36 / 255, 72 / 255),
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 3, 5),
    pgd_steps: int = 50,
    pgd_restarts: int = 2,
    batch_size: int = 128,
    max_images: int | None = None,
    accelerator: Accelerator | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Clean accuracy, token-noise agreement, FGSM/PGD robust accuracy and corruption accuracy on one image set.

    Args:
        model: Classifier taking pixels in ``[0, 1]`` (a converted model, or a
            :class:`~robustvit.training.PixelModel`); its train/eval modes are restored afterwards.
        dataset_or_loader: ``(image, label)`` items, images ``(C, H, W)`` in ``[0, 1]``. A DataLoader contributes
            its dataset and batch size: the images are always read in order, without shuffling.
        noise: Token noise ``(1, N, D)`` (e.g. ``synthesize_noise(...).noise``); adds ``noise_agreement`` (top-1
            unchanged by the noise) and ``noise_accuracy``. Needs a model with a supported patch embedding.
        eps_linf, eps_l2: Attack radii (FGSM and PGD run at each).
        corruptions: Names from :func:`robustvit.corruptions.corruption_names`; ``None`` for all of them.
        severities: Corruption severities (1 to 5).
        pgd_steps: PGD steps per restart (step size ``2.5 * eps / steps``).
        pgd_restarts: PGD random restarts; the strongest candidate per image counts. FGSM runs alongside as a
            check for gradient masking: PGD should never do worse than FGSM at the same radius, and the radii
            where it does are listed under ``"pgd_weaker_than_fgsm"``.
        batch_size: Images per batch (unless a DataLoader gives its own).
        max_images: Evaluate a stratified random subset of ``max_images`` images (drawn with ``seed``, the same
            for every model evaluated with that seed), never the first ones of a possibly class-sorted split.
        accelerator: Shards the images over processes and gathers the results (``gather_for_metrics``, so each
            image counts once); every process returns the same numbers.
        seed: Seeds PGD's random starts and the random corruptions (offset by the process index).
        progress: Show a progress bar (on the local main process only).

    Returns:
        ``{"num_images", "clean_accuracy", ["noise_agreement", "noise_accuracy",] "adversarial": {"fgsm_linf@1/255":
        ..., "pgd_l2@36/255": ...}, "pgd_weaker_than_fgsm": [radii], "corruptions": {name: {"1": ..., "3": ..., "mean": ...}},
        "corruption_accuracy" (mean over every corruption and severity), "seconds", "settings"}``.

    Raises:
        ValueError: An empty dataset, items without labels, or invalid settings.

    Example:
        >>> result = evaluate_robustness(net, test_set, noise=noise.noise, max_images=256)
        >>> result["clean_accuracy"], result["adversarial"]["pgd_linf@2/255"]
        (0.95, 0.61)
    """
    corruptions = corruption_names() if corruptions is None else list(corruptions)
    _validate(eps_linf, eps_l2, corruptions, severities, pgd_steps, pgd_restarts, batch_size, max_images)
    start = time.perf_counter()
    loader, num_images = _loader(dataset_or_loader, batch_size, max_images, accelerator, seed)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed + (accelerator.process_index if accelerator is not None else 0))
    attacks = [
        (f"{attack}_{norm}@{eps_label(eps)}", attack, norm, eps)
        for norm, radii in (("linf", eps_linf), ("l2", eps_l2))
        for eps in radii
        for attack in _ATTACKS
    ]
    correct: dict[str, list[Tensor]] = {}

    def record(key: str, values: Tensor) -> None:
        gathered = accelerator.gather_for_metrics(values) if accelerator is not None else values
        correct.setdefault(key, []).append(gathered.cpu())

    show = progress and (accelerator is None or accelerator.is_local_main_process)
    with eval_mode(model):
        for images, labels in tqdm(loader, desc="robustness", disable=not show, leave=False):
            images, labels = images.to(device), torch.as_tensor(labels).to(device)
            check_images(images)
            with torch.no_grad():
                predictions = model_logits(model, images).argmax(-1)
            clean_ok = predictions == labels
            record("clean", clean_ok)
            if noise is not None:
                with torch.no_grad(), token_noise(model, noise):
                    noisy = model_logits(model, images).argmax(-1)
                record("noise_agreement", noisy == predictions)
                record("noise_accuracy", noisy == labels)
            for key, attack, norm, eps in attacks:
                kwargs = (
                    {"steps": pgd_steps, "restarts": pgd_restarts, "generator": generator} if attack == "pgd" else {}
                )
                adversarial = _ATTACKS[attack](model, images, labels, eps, norm=norm, **kwargs)
                with torch.no_grad():
                    record(key, clean_ok & (model_logits(model, adversarial).argmax(-1) == labels))
            for name in corruptions:
                for severity in severities:
                    corrupted = corrupt(images, name, severity, generator=generator)
                    with torch.no_grad():
                        record(f"{name}/{severity}", model_logits(model, corrupted).argmax(-1) == labels)

    def accuracy(key: str) -> float:
        return float(torch.cat(correct[key]).float().mean())

    result: dict[str, Any] = {
        "num_images": int(torch.cat(correct["clean"]).numel()),
        "clean_accuracy": accuracy("clean"),
    }
    if noise is not None:
        result["noise_agreement"] = accuracy("noise_agreement")
        result["noise_accuracy"] = accuracy("noise_accuracy")
    result["adversarial"] = {key: accuracy(key) for key, *_ in attacks}
    result["pgd_weaker_than_fgsm"] = [
        key.removeprefix("pgd_")
        for key, attack, *_ in attacks
        if attack == "pgd" and result["adversarial"][key] > result["adversarial"]["fgsm_" + key.removeprefix("pgd_")]
    ]
    per_corruption = {
        name: {str(severity): accuracy(f"{name}/{severity}") for severity in severities} for name in corruptions
    }
    for values in per_corruption.values():
        values["mean"] = sum(values.values()) / len(values)
    result["corruptions"] = per_corruption
    if corruptions:
        result["corruption_accuracy"] = sum(v["mean"] for v in per_corruption.values()) / len(per_corruption)
    result["seconds"] = time.perf_counter() - start
    result["settings"] = {
        "eps_linf": list(eps_linf),
        "eps_l2": list(eps_l2),
        "corruptions": corruptions,
        "severities": list(severities),
        "pgd_steps": pgd_steps,
        "pgd_restarts": pgd_restarts,
        "max_images": max_images,
        "dataset_images": num_images,
        "seed": seed,
    }
    return result


def summary_rows(result: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of an :func:`evaluate_robustness` result, one row each, in table order.

    Example:
        >>> list(summary_rows(result))[:2]
        ['clean accuracy', 'noise agreement']
    """
    rows = {"clean accuracy": result["clean_accuracy"]}
    for key in ("noise_agreement", "noise_accuracy"):
        if key in result:
            rows[key.replace("_", " ")] = result[key]
    rows.update({key.replace("_", " "): value for key, value in result["adversarial"].items()})
    rows.update({f"{name} (mean)": values["mean"] for name, values in result["corruptions"].items()})
    if "corruption_accuracy" in result:
        rows["corruption accuracy (mean)"] = result["corruption_accuracy"]
    return rows


def format_comparison(before: dict[str, Any], after: dict[str, Any]) -> str:
    """A markdown table of the headline numbers (in %) before and after, with the change in points.

    Rows present in only one result show ``-`` for the other.

    Example:
        >>> print(format_comparison(before, after))
        | metric | before | after | change |
        |---|---:|---:|---:|
        | clean accuracy | 95.00 | 95.83 | +0.83 |
    """
    old, new = summary_rows(before), summary_rows(after)
    lines = ["| metric | before | after | change |", "|---|---:|---:|---:|"]
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        change = f"{100 * (b - a):+.2f}" if a is not None and b is not None else "-"
        lines.append(f"| {key} | {_percent(a)} | {_percent(b)} | {change} |")
    lines.append(f"\n{before['num_images']} images before, {after['num_images']} after.")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def plot_comparison(
    before: dict[str, Any], after: dict[str, Any], path: str | Path, *, labels: tuple[str, str] = ("before", "after")
) -> Path:
    """Write a horizontal grouped bar chart (PNG) of the headline numbers before and after.

    Drawn with matplotlib's Agg canvas directly, so no display is needed and pyplot's global state is left alone.

    Example:
        >>> plot_comparison(before, after, "outputs/robustness.png")
        PosixPath('outputs/robustness.png')
    """
    old, new = summary_rows(before), summary_rows(after)
    keys = list(dict.fromkeys([*old, *new]))
    figure = Figure(figsize=(8, 1.0 + 0.32 * len(keys)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    height = 0.4
    for offset, (label, rows) in zip((-height / 2, height / 2), zip(labels, (old, new), strict=True), strict=True):
        positions = [index + offset for index in range(len(keys))]
        axes.barh(positions, [100 * rows.get(key, math.nan) for key in keys], height=height, label=label)
    axes.set_yticks(range(len(keys)), keys)
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel("accuracy / agreement (%)")
    axes.grid(axis="x", alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title(f"Robustness, {after['num_images']} images")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
