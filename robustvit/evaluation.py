"""Robustness of a classifier on pixels in ``[0, 1]``: clean, token noise, FGSM/PGD (linf, l2) and corruptions.

Every number is an accuracy-like fraction over the same images, so evaluations (a baseline and several finetuning
methods, each over several seeds: :func:`aggregate_seeds`) compare row by row: :func:`format_methods` prints a
table with the spread, :func:`plot_methods` draws one. :func:`evaluate_accuracy` scores extra test sets (e.g.
ImageNet-R) whose classes are a subset of the model's.
Attack accuracies count an image only when it is classified correctly both clean and attacked (an upper bound on
true robustness: the attacks are empirical).

Example:
    >>> baseline = evaluate_robustness(model, test_set, max_eval_images=16, pgd_steps=2, corruptions=["gaussian_noise"])
    >>> finetuned_per_seed = [model, model]  # in practice one finetuned copy per seed
    >>> runs = [evaluate_robustness(m, test_set, max_eval_images=16, pgd_steps=2, corruptions=["gaussian_noise"])
    ...         for m in finetuned_per_seed]
    >>> print(format_methods(baseline, {"nullspace": aggregate_seeds(runs)}, reference=None))
    | metric | baseline | nullspace (2 seeds) |
    |---|---:|---:|
    | clean accuracy | ... | ... +- 0.00 |
    ...
    >>> plot_methods(baseline, {"nullspace": aggregate_seeds(runs)}, "outputs/robustness.png").exists()
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
from robustvit.certification.attacks import ATTACKS
from robustvit.certification.plot import eps_label
from robustvit.configs import RobustnessConfig
from robustvit.corruptions import corrupt, corruption_names
from robustvit.data import stratified_subset
from robustvit.nullspace import token_noise
from robustvit.settings import resolve_config

__all__ = [
    "RobustnessResult",
    "SeedSummary",
    "aggregate_seeds",
    "evaluate_accuracy",
    "evaluate_robustness",
    "format_methods",
    "plot_methods",
    "summary_rows",
    "within_spread",
]


@dataclass
class RobustnessResult:
    """What :func:`evaluate_robustness` measured on one image set; every accuracy is a fraction in ``[0, 1]``.

    Attributes:
        num_images: Images scored (each once, whatever the number of processes).
        clean_accuracy: Top-1 accuracy on the clean images.
        adversarial: Robust accuracy per attack, keyed ``"<attack>_<norm>@<eps>"`` (``"pgd_l2@72/255"``): an image
            counts when it is classified correctly both clean and attacked.
        pgd_weaker_than_fgsm: The radii (``"l2@72/255"``) where PGD did worse than FGSM, a gradient-masking sign.
        corruptions: Accuracy per corruption and severity, ``{name: {"1": ..., "3": ..., "mean": ...}}``.
        seconds: Wall time of the evaluation.
        settings: The arguments it ran with (radii, corruptions, severities, PGD steps and restarts, ``max_images``,
            ``dataset_images``: the size of the set sampled from, ``seed``).
        noise_agreement: With a token noise: fraction of images whose top-1 the noise leaves unchanged.
        noise_accuracy: With a token noise: accuracy under it.
        corruption_accuracy: Mean over every corruption and severity (``None`` without corruptions).
        eval_sets: Accuracy on extra test sets by name (:func:`evaluate_accuracy`), set by the caller.

    Example:
        >>> result = evaluate_robustness(model, test_set, max_eval_images=16, pgd_steps=2,
        ...                              corruptions=["gaussian_noise"])
        >>> import json
        >>> RobustnessResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
        True
    """

    num_images: int
    clean_accuracy: float
    adversarial: dict[str, float]
    pgd_weaker_than_fgsm: list[str]
    corruptions: dict[str, dict[str, float]]
    seconds: float
    settings: dict[str, Any]
    noise_agreement: float | None = None
    noise_accuracy: float | None = None
    corruption_accuracy: float | None = None
    eval_sets: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (reports' ``"evaluation"``): optional numbers appear only when measured."""
        data: dict[str, Any] = {"num_images": self.num_images, "clean_accuracy": self.clean_accuracy}
        if self.noise_agreement is not None:
            data["noise_agreement"] = self.noise_agreement
        if self.noise_accuracy is not None:
            data["noise_accuracy"] = self.noise_accuracy
        data["adversarial"] = dict(self.adversarial)
        data["pgd_weaker_than_fgsm"] = list(self.pgd_weaker_than_fgsm)
        data["corruptions"] = {name: dict(values) for name, values in self.corruptions.items()}
        if self.corruption_accuracy is not None:
            data["corruption_accuracy"] = self.corruption_accuracy
        data["seconds"] = self.seconds
        data["settings"] = dict(self.settings)
        if self.eval_sets:
            data["eval_sets"] = dict(self.eval_sets)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RobustnessResult:
        """Read back what :meth:`to_dict` wrote (e.g. a report's ``"evaluation"``)."""
        return cls(**{key: data[key] for key in data if key in cls.__dataclass_fields__})


@dataclass
class SeedSummary:
    """Mean and sample standard deviation over seeds of every headline number (:func:`aggregate_seeds`).

    Attributes:
        mean: Mean per row of :func:`summary_rows`.
        std: Sample standard deviation per row (0 for one seed).
        num_seeds: Number of results aggregated.
        num_images: Images each result scored.
    """

    mean: dict[str, float]
    std: dict[str, float]
    num_seeds: int
    num_images: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": dict(self.mean),
            "std": dict(self.std),
            "num_seeds": self.num_seeds,
            "num_images": self.num_images,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SeedSummary:
        """Read back what :meth:`to_dict` wrote; other keys (a report's ``"seeds"``) are ignored."""
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})


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


def evaluate_robustness(
    model: nn.Module,
    dataset_or_loader: Dataset | DataLoader,
    config: RobustnessConfig | None = None,
    *,
    noise: Tensor | None = None,
    accelerator: Accelerator | None = None,
    seed: int = 0,
    progress: bool = False,
    **overrides: Any,
) -> RobustnessResult:
    """Clean accuracy, token-noise agreement, FGSM/PGD robust accuracy and corruption accuracy on one image set.

    The settings are a :class:`~robustvit.configs.RobustnessConfig` (``config``, default: its defaults) with
    ``overrides``, any of its fields by name (``max_eval_images=16``, ``l2_radii=[36 / 255]``...).

    Args:
        model: Classifier taking pixels in ``[0, 1]`` (a converted model, or a
            :class:`~robustvit.training.PixelModel`); its train/eval modes are restored afterwards.
        dataset_or_loader: ``(image, label)`` items, images ``(C, H, W)`` in ``[0, 1]``. A DataLoader contributes
            its dataset and batch size: the images are always read in order, without shuffling.
        config: The settings: ``linf_radii``, ``l2_radii`` (attack radii in pixel units of ``[0, 1]`` images; FGSM
            and PGD run at each), ``corruptions`` (names from :func:`robustvit.corruptions.corruption_names`;
            ``None`` for all of them), ``severities`` (1 to 5), ``pgd_steps`` (per restart, step size
            ``2.5 * eps / steps``), ``pgd_restarts`` (the strongest candidate per image counts; FGSM runs alongside
            as a check for gradient masking: PGD should never do worse than FGSM at the same radius, and the radii
            where it does are listed in ``pgd_weaker_than_fgsm``), ``eval_batch_size`` (unless a DataLoader gives
            its own) and ``max_eval_images`` (a stratified random subset drawn with ``seed``, the same for every
            model evaluated with that seed, never the first images of a possibly class-sorted split).
        noise: Token noise ``(1, N, D)`` (e.g. ``synthesize_noise(...).noise``); adds ``noise_agreement`` (top-1
            unchanged by the noise) and ``noise_accuracy``. Needs a model with a supported patch embedding.
        accelerator: Shards the images over processes and gathers the results (``gather_for_metrics``, so each
            image counts once); every process returns the same numbers.
        seed: Seeds the image subset, PGD's random starts and the random corruptions (offset by the process index).
        progress: Show a progress bar (on the local main process only).
        **overrides: Fields of the config to change.

    Returns:
        A :class:`RobustnessResult` (``to_dict()`` for JSON).

    Raises:
        TypeError: An override that is not a field of the config.
        ValueError: An empty dataset, items without labels, or invalid settings.

    Example:
        >>> result = evaluate_robustness(model, test_set, max_eval_images=16, pgd_steps=2,
        ...                              corruptions=["gaussian_noise"])
        >>> result.num_images, sorted(result.adversarial)[:2]
        (16, ['fgsm_l2@36/255', 'fgsm_l2@72/255'])
        >>> result.adversarial["pgd_linf@2/255"] <= result.clean_accuracy
        True
    """
    config = resolve_config(RobustnessConfig, config, overrides)
    corruptions = corruption_names() if config.corruptions is None else list(config.corruptions)
    severities, eps_linf, eps_l2 = config.severities, config.linf_radii, config.l2_radii
    pgd_steps, pgd_restarts, max_images = config.pgd_steps, config.pgd_restarts, config.max_eval_images
    start = time.perf_counter()
    loader, num_images = _loader(dataset_or_loader, config.eval_batch_size, max_images, accelerator, seed)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed + (accelerator.process_index if accelerator is not None else 0))
    attacks = [
        (f"{attack}_{norm}@{eps_label(eps)}", attack, norm, eps)
        for norm, radii in (("linf", eps_linf), ("l2", eps_l2))
        for eps in radii
        for attack in ATTACKS
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
                adversarial = ATTACKS[attack](model, images, labels, eps, norm=norm, **kwargs)
                with torch.no_grad():
                    record(key, clean_ok & (model_logits(model, adversarial).argmax(-1) == labels))
            for name in corruptions:
                for severity in severities:
                    corrupted = corrupt(images, name, severity, generator=generator)
                    with torch.no_grad():
                        record(f"{name}/{severity}", model_logits(model, corrupted).argmax(-1) == labels)

    def accuracy(key: str) -> float:
        return float(torch.cat(correct[key]).float().mean())

    adversarial = {key: accuracy(key) for key, *_ in attacks}
    per_corruption = {
        name: {str(severity): accuracy(f"{name}/{severity}") for severity in severities} for name in corruptions
    }
    for values in per_corruption.values():
        values["mean"] = sum(values.values()) / len(values)
    return RobustnessResult(
        num_images=int(torch.cat(correct["clean"]).numel()),
        clean_accuracy=accuracy("clean"),
        adversarial=adversarial,
        pgd_weaker_than_fgsm=[
            key.removeprefix("pgd_")
            for key, attack, *_ in attacks
            if attack == "pgd" and adversarial[key] > adversarial["fgsm_" + key.removeprefix("pgd_")]
        ],
        corruptions=per_corruption,
        seconds=time.perf_counter() - start,
        settings={
            "eps_linf": list(eps_linf),
            "eps_l2": list(eps_l2),
            "corruptions": corruptions,
            "severities": list(severities),
            "pgd_steps": pgd_steps,
            "pgd_restarts": pgd_restarts,
            "max_images": max_images,
            "dataset_images": num_images,
            "seed": seed,
        },
        noise_agreement=None if noise is None else accuracy("noise_agreement"),
        noise_accuracy=None if noise is None else accuracy("noise_accuracy"),
        corruption_accuracy=(
            sum(v["mean"] for v in per_corruption.values()) / len(per_corruption) if corruptions else None
        ),
    )


def evaluate_accuracy(
    model: nn.Module,
    dataset: Dataset,
    config: RobustnessConfig | None = None,
    *,
    class_indices: Sequence[int] | None = None,
    accelerator: Accelerator | None = None,
    seed: int = 0,
    **overrides: Any,
) -> float:
    """Top-1 accuracy on ``dataset``, whose classes may be a subset of the model's (ImageNet-A/R style).

    Args:
        model: Classifier taking pixels in ``[0, 1]``.
        dataset: ``(image, label)`` items.
        config: The evaluation's settings, as for :func:`evaluate_robustness`; only its budget counts here
            (``eval_batch_size``, ``max_eval_images``: a stratified subset drawn with ``seed``).
        class_indices: The model's output index of each of the dataset's labels; the logits are restricted to
            these classes before the argmax (as the paper scores ImageNet-A and -R on their 200 classes).
            ``None`` when the dataset's labels are the model's classes.
        accelerator, seed: As in :func:`evaluate_robustness` (sharding, the subset).
        **overrides: Fields of the config to change.

    Example:
        >>> subset = [(image, label) for image, label in test_set if label in (3, 7)]  # a 2-class test set
        >>> subset = [(image, [3, 7].index(label)) for image, label in subset]  # its own labels 0, 1
        >>> 0.0 <= evaluate_accuracy(model, subset, class_indices=[3, 7], max_eval_images=16) <= 1.0
        True
    """
    config = resolve_config(RobustnessConfig, config, overrides)
    loader, _ = _loader(dataset, config.eval_batch_size, config.max_eval_images, accelerator, seed)
    device = next(model.parameters()).device
    mapping = None if class_indices is None else torch.as_tensor(list(class_indices), dtype=torch.long, device=device)
    correct: list[Tensor] = []
    with eval_mode(model), torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), torch.as_tensor(labels).to(device)
            check_images(images)
            logits = model_logits(model, images)
            hits = (logits if mapping is None else logits[:, mapping]).argmax(-1) == labels
            correct.append((accelerator.gather_for_metrics(hits) if accelerator is not None else hits).cpu())
    return float(torch.cat(correct).float().mean())


def summary_rows(result: RobustnessResult) -> dict[str, float]:
    """The headline numbers of an :func:`evaluate_robustness` result, one row each, in table order.

    Example:
        >>> result = evaluate_robustness(model, test_set, max_eval_images=16, pgd_steps=2,
        ...                              corruptions=["gaussian_noise"])
        >>> list(summary_rows(result))[:2]
        ['clean accuracy', 'fgsm linf@1/255']
    """
    rows = {"clean accuracy": result.clean_accuracy}
    if result.noise_agreement is not None:
        rows["noise agreement"] = result.noise_agreement
    if result.noise_accuracy is not None:
        rows["noise accuracy"] = result.noise_accuracy
    rows.update({key.replace("_", " "): value for key, value in result.adversarial.items()})
    rows.update({f"{name} (mean)": values["mean"] for name, values in result.corruptions.items()})
    if result.corruption_accuracy is not None:
        rows["corruption accuracy (mean)"] = result.corruption_accuracy
    rows.update({f"{name} accuracy": value for name, value in result.eval_sets.items()})
    return rows


def aggregate_seeds(results: Sequence[RobustnessResult]) -> SeedSummary:
    """Mean and sample standard deviation over seeds of every headline number (:func:`summary_rows`).

    Args:
        results: One :func:`evaluate_robustness` result per seed (all over the same images).

    Example:
        >>> run_a, run_b = (evaluate_robustness(model, test_set, max_eval_images=16, pgd_steps=2, corruptions=[])
        ...                 for _ in range(2))
        >>> summary = aggregate_seeds([run_a, run_b])
        >>> summary.num_seeds, summary.std["clean accuracy"]
        (2, 0.0)
    """
    if not results:
        raise ValueError("aggregate_seeds needs at least one result")
    rows = [summary_rows(result) for result in results]
    keys = list(dict.fromkeys(key for row in rows for key in row))
    values = {key: torch.tensor([row[key] for row in rows if key in row], dtype=torch.float64) for key in keys}
    return SeedSummary(
        mean={key: float(v.mean()) for key, v in values.items()},
        std={key: float(v.std()) if v.numel() > 1 else 0.0 for key, v in values.items()},
        num_seeds=len(results),
        num_images=results[0].num_images,
    )


def within_spread(a: float, a_std: float, b: float, b_std: float, num_images: int) -> bool:
    """Whether two means are indistinguishable here: their mean +- std intervals overlap, or they differ by less
    than one image (``1 / num_images``).

    Example:
        >>> within_spread(0.931, 0.004, 0.934, 0.003, num_images=360)
        True
    """
    return abs(a - b) <= a_std + b_std or abs(a - b) < 1 / num_images


def format_methods(
    baseline: RobustnessResult, methods: Mapping[str, SeedSummary], *, reference: str | None = "ce"
) -> str:
    """A markdown table (in %) of the baseline and every method's mean +- std over seeds, with each method's
    difference to ``reference`` labelled ``noise`` when it is within the spread (:func:`within_spread`).

    Args:
        baseline: The :func:`evaluate_robustness` result of the model every method started from.
        methods: ``{name: aggregate_seeds(...)}`` (``SeedSummary.from_dict`` reads one back from a report).
        reference: The method the others are compared with (the plain finetune); ``None`` or absent for no
            comparison column.

    Example:
        >>> baseline = evaluate_robustness(model, test_set, max_eval_images=16, pgd_steps=2,
        ...                                corruptions=["gaussian_noise"])
        >>> ce = ns = [baseline, baseline]  # in practice one result per finetuning seed
        >>> print(format_methods(baseline, {"ce": aggregate_seeds(ce), "nullspace": aggregate_seeds(ns)}))
        | metric | baseline | ce (2 seeds) | nullspace (2 seeds) | nullspace - ce |
        |---|---:|---:|---:|---:|
        | clean accuracy | ... | ... +- 0.00 | ... +- 0.00 | +0.00 (noise) |
        ...
    """
    base = summary_rows(baseline)
    num_images = baseline.num_images
    compared = [name for name in methods if reference in methods and name != reference]
    header = ["metric", "baseline", *(f"{name} ({methods[name].num_seeds} seeds)" for name in methods)]
    header += [f"{name} - {reference}" for name in compared]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    keys = list(dict.fromkeys([*base, *(key for m in methods.values() for key in m.mean)]))
    for key in keys:
        cells = [key, _percent(base.get(key))]
        for method in methods.values():
            mean, std = method.mean.get(key), method.std.get(key)
            cells.append("-" if mean is None else f"{100 * mean:.2f} +- {100 * std:.2f}")
        for name in compared:
            a, b = methods[name], methods[reference]
            if key not in a.mean or key not in b.mean:
                cells.append("-")
                continue
            difference = round(100 * (a.mean[key] - b.mean[key]), 2) + 0.0  # no "-0.00"
            noise = within_spread(a.mean[key], a.std[key], b.mean[key], b.std[key], num_images)
            cells.append(f"{difference:+.2f}" + (" (noise)" if noise else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"\n{num_images} test images: one image is {100 / num_images:.2f} points. Mean +- sample std over seeds; "
        f"a difference is labelled (noise) when the mean +- std intervals overlap or it is under one image."
    )
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def plot_methods(baseline: RobustnessResult, methods: Mapping[str, SeedSummary], path: str | Path) -> Path:
    """Write a horizontal grouped bar chart (PNG): the baseline and every method's mean, with +- std error bars.

    Drawn with matplotlib's Agg canvas directly, so no display is needed and pyplot's global state is left alone.

    Example:
        >>> baseline = evaluate_robustness(model, test_set, max_eval_images=16, pgd_steps=2,
        ...                                corruptions=["gaussian_noise"])
        >>> ce = ns = [baseline, baseline]  # in practice one result per finetuning seed
        >>> plot_methods(baseline, {"ce": aggregate_seeds(ce), "nullspace": aggregate_seeds(ns)}, "robustness.png")
        PosixPath('robustness.png')
    """
    base = summary_rows(baseline)
    series = [("baseline", base, {})] + [
        (f"{name} ({m.num_seeds} seeds)", m.mean, m.std) for name, m in methods.items()
    ]
    keys = list(dict.fromkeys(key for _, rows, _ in series for key in rows))
    figure = Figure(figsize=(8, 1.2 + 0.18 * len(keys) * len(series)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    height = 0.8 / len(series)
    for index, (label, rows, spread) in enumerate(series):
        positions = [key_index - 0.4 + (index + 0.5) * height for key_index in range(len(keys))]
        values = [100 * rows.get(key, math.nan) for key in keys]
        errors = [100 * spread.get(key, 0.0) for key in keys]
        axes.barh(positions, values, height=height, xerr=errors if spread else None, capsize=2, label=label)
    axes.set_yticks(range(len(keys)), keys)
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel("accuracy / agreement (%), mean +- std over seeds")
    axes.grid(axis="x", alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    num_images = baseline.num_images
    axes.set_title(f"Robustness, {num_images} test images (one image = {100 / num_images:.2f} points)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
