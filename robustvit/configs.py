"""Typed settings of the recipes and the command line: the run, training, evaluation; one import for all of them.

:class:`RunConfig` (where a recipe reads and writes, how it runs), :class:`LipschitzTrainingConfig` and
:class:`NullspaceFinetuningConfig` (the two recipes' training), :class:`EvaluationConfig` (the finetuning recipe's
evaluation) and the library's own settings of :func:`robustvit.evaluation.evaluate_robustness`
(:class:`RobustnessConfig`) and :func:`robustvit.nullspace.synthesize_noise` (:class:`NoiseSynthesisConfig`) live
here; the conversion's and the certification's own settings live with them
(:class:`robustvit.conversion.config.ConvertConfig`, :class:`robustvit.certification.config.CertificationConfig`)
and, like the flag generator of :mod:`robustvit.settings`, are named here too. The recipes save
``dataclasses.asdict`` of each in their metrics. This module imports no torch (``robustvit --help`` stays fast).

Example:
    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser, LipschitzTrainingConfig, defaults={"epochs": 3})
    >>> (training,) = parse_configs(parser, ["--loss", "emma", "--eps", "0.14"], LipschitzTrainingConfig)
    >>> training.epochs, training.loss, training.eps
    (3, 'emma', 0.14)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from robustvit.certification.config import CertificationConfig, EvaluationBudget
from robustvit.conversion.config import ConvertConfig
from robustvit.settings import (
    add_arguments,
    arg,
    build_configs,
    check,
    check_choices,
    check_positive,
    file_defaults,
    from_args,
    parse_configs,
    parse_radius,
    resolve_config,
)

__all__ = [
    "CertificationConfig",
    "ConvertConfig",
    "EvaluationConfig",
    "LipschitzTrainingConfig",
    "NoiseSynthesisConfig",
    "NullspaceFinetuningConfig",
    "RobustnessConfig",
    "RunConfig",
    "add_arguments",
    "arg",
    "build_configs",
    "file_defaults",
    "from_args",
    "parse_configs",
    "resolve_config",
]

CHECKPOINT_EVERY_EPOCH = "epoch"


def _checkpointing_steps(text: str) -> str | int:
    if text == CHECKPOINT_EVERY_EPOCH:
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{CHECKPOINT_EVERY_EPOCH}' or a positive number of steps, got {text!r}")
    return value


# --------------------------------------------------------------------------------------------------- the run


@dataclass
class RunConfig:
    """Where a recipe reads and writes, and how it runs (Accelerate): everything but the hyper-parameters.

    Example:
        >>> RunConfig(output_dir="outputs/run", gradient_accumulation_steps=2).checkpointing_steps
        'epoch'
    """

    model: str | None = arg(None, "timm name, transformers id or directory (default: the embedded ViT)")
    dataset: str | None = arg(None, "imagefolder directory or Hugging Face datasets id (default: the embedded digits)")
    train_split: str = arg("train", "training split")
    eval_split: str = arg("test", "evaluation split, e.g. validation for ImageNet")
    image_size: int = arg(32, "side of the input images")
    channels: int = arg(3, "image channels", choices=(1, 3))
    seed: int = arg(0, "seed of weights, data order and noise (accelerate.utils.set_seed)")
    output_dir: str = arg("outputs/run", "folder of every output; an existing non-empty one needs --resume or "
                          "--overwrite_output_dir")  # fmt: skip
    resume: bool = arg(False, "continue from the latest checkpoints in --output_dir (pretraining included)")
    overwrite_output_dir: bool = arg(False, "delete the outputs of an earlier run in --output_dir and start again")
    checkpointing_steps: str | int = arg(
        CHECKPOINT_EVERY_EPOCH, "save a checkpoint every epoch ('epoch') or every N optimizer steps",
        parse=_checkpointing_steps,
    )  # fmt: skip
    checkpoints_total_limit: int | None = arg(
        2, "keep the newest N checkpoints of each training phase (Accelerate's total_limit; 'none': all)"
    )
    mixed_precision: str | None = arg(None, "Accelerate's mixed precision (default: accelerate config's)",
                                      choices=("no", "fp16", "bf16"))  # fmt: skip
    gradient_accumulation_steps: int = arg(1, "batches per optimizer step (accelerator.accumulate)")
    with_tracking: bool = arg(False, "log metrics to the trackers of --report_to (Accelerate trackers)")
    report_to: str = arg("all", "tracker for --with_tracking ('all': every installed one)",
                         registry="accelerate.utils:LoggerType")  # fmt: skip
    cpu: bool = arg(False, "run on CPU even if an accelerator is available")
    num_workers: int = arg(0, "DataLoader workers")
    max_train_batches: int | None = arg(None, "cap batches per epoch and process (smoke tests)")
    max_train_images: int | None = arg(None, "train on a class-stratified subset of this many training images, "
                                       "drawn with --seed (a low-data setting)")  # fmt: skip
    image_transform: str | None = arg(None, "transform every image of both splits (labels kept): a shifted copy of "
                                      "the data, e.g. to pretrain a source on images the target never sees",
                                      registry="robustvit.data:IMAGE_TRANSFORMS")  # fmt: skip
    require_pretrained: bool = arg(False, "refuse to start from random weights (--no_require_pretrained: allow)",
                                   negatable=True)  # fmt: skip

    def __post_init__(self) -> None:
        check_positive(self, "image_size", "gradient_accumulation_steps")
        check_positive(self, "num_workers", allow_zero=True)
        check_positive(self, "checkpoints_total_limit", "max_train_batches", "max_train_images", allow_none=True)
        check(self.channels in (1, 3), f"--channels must be 1 or 3, got {self.channels}")
        check(not (self.resume and self.overwrite_output_dir), "--resume and --overwrite_output_dir contradict")
        steps = self.checkpointing_steps
        check(
            steps == CHECKPOINT_EVERY_EPOCH or (isinstance(steps, int) and steps >= 1),
            f"--checkpointing_steps must be '{CHECKPOINT_EVERY_EPOCH}' or a positive int, got {steps!r}",
        )
        if self.max_train_batches is not None and self.max_train_batches % self.gradient_accumulation_steps:
            raise ValueError(
                f"--max_train_batches {self.max_train_batches} must be a multiple of --gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps}"
            )

    def result_settings(self) -> dict[str, Any]:
        """The fields a run's results depend on (what a resumed run must share): all but the bookkeeping ones.

        Example:
            >>> sorted(RunConfig(output_dir="elsewhere", resume=True).result_settings()) == sorted(
            ...     RunConfig().result_settings())
            True
        """
        return {key: value for key, value in dataclasses.asdict(self).items() if key not in RUN_BOOKKEEPING_FIELDS}


RUN_BOOKKEEPING_FIELDS = frozenset({
    "output_dir", "resume", "overwrite_output_dir", "checkpointing_steps", "checkpoints_total_limit", "with_tracking",
    "report_to", "cpu", "num_workers",
})  # fmt: skip
"""RunConfig fields that change where and how a run is recorded, never its results (a resume may change them)."""


# --------------------------------------------------------------------------------------------------- training


@dataclass
class TrainingConfig:
    """What every recipe's training shares: the budget, the optimizer (AdamW, cosine schedule) and a source
    pretraining (plain cross-entropy from random weights, for the embedded default model)."""

    epochs: int = arg(9, "training epochs")
    lr: float = arg(2e-3, "AdamW peak learning rate (cosine schedule, transformers' get_cosine_schedule_with_warmup)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    batch_size: int = arg(64, "per process")
    pretrain_epochs: int | None = arg(
        None, "plain cross-entropy training of the source first ('none': a recipe default for the embedded model)"
    )
    pretrain_lr: float = arg(2e-3, "AdamW learning rate of the source pretraining")
    lora_r: int = arg(0, "LoRA rank (robustvit.peft); 0 trains all parameters")

    def __post_init__(self) -> None:
        check_positive(self, "epochs", "lora_r", allow_zero=True)
        check_positive(self, "pretrain_epochs", allow_none=True, allow_zero=True)
        check_positive(self, "batch_size")
        for name in ("lr", "pretrain_lr"):
            check(getattr(self, name) > 0, f"--{name} must be > 0, got {getattr(self, name)}")
        check(self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class LipschitzTrainingConfig(TrainingConfig):
    """Lipschitz-margin training of a converted model (``recipes/train_lipschitz.py``).

    Example:
        >>> LipschitzTrainingConfig(loss="emma", eps=36 / 255).eps_start
        0.1
    """

    loss: str = arg("emma", "Lipschitz-margin loss", registry="robustvit.losses:LOSSES")
    eps: float = arg(36 / 255, "target l2 radius of the margin (pixels in [0, 1]; 36/255 works)", parse=parse_radius)
    eps_start: float = arg(0.1, "training radius at the start of the ramp, times --eps")
    eps_end: float = arg(2.0, "training radius after the ramp, times --eps")
    distill: float = arg(0.0, "weight of the distillation from the source model")
    max_grad_norm: float = arg(1.0, "clip the margin phase's gradient norm to this (0: no clipping)")
    residual_budget_end: float | None = arg(
        None, "after every optimizer step, hold the product of the residual blocks' bounds under a budget that falls "
        "linearly over the radius ramp (the first half of training), from --residual_budget (with --residual_budget "
        "none: the converted model's own product) to this, then stays ('none': no budget in training)",
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("eps", "eps_start", "eps_end", "distill", "max_grad_norm"):
            check(getattr(self, name) >= 0, f"--{name} must be >= 0, got {getattr(self, name)}")
        end = self.residual_budget_end
        check(end is None or end > 1, f"--residual_budget_end must be above 1 or 'none', got {end}")


@dataclass
class NoiseSynthesisConfig:
    """The settings of :func:`robustvit.nullspace.synthesize_noise` (defaults: the paper's final ones).

    Example:
        >>> NoiseSynthesisConfig(tolerance=0.01, kind="random").rounds
        3
    """

    RENAMED: ClassVar[dict[str, str]] = {"eps": "tolerance"}  # the 0.1 keyword: a tolerance, not a radius
    kind: str = arg("nullspace", "'nullspace': the paper's AdamW search; 'random': its shrinking-Gaussian control",
                    registry="robustvit.nullspace.synthesis:NOISE_KINDS")  # fmt: skip
    tolerance: float = arg(
        0.03, "the paper's epsilon: tolerance on the mean squared softmax-probability change under the noise "
        "(a probability, not a radius)",
    )  # fmt: skip
    init_limit: float = arg(3.0, "noise init U(-init_limit, init_limit) ('nullspace')")
    lr: float = arg(0.1, "AdamW learning rate of the noise ('nullspace')")
    rounds: int = arg(3, "passes over (at most max_batches of) the dataloader")
    max_batches: int | None = arg(None, "batches per round ('none': the whole dataloader; the paper: 10% of it)")
    schedule_steps: int | None = arg(
        None, "period of the cosine on lr ('none': ten times the planned steps, as the paper's)"
    )

    def __post_init__(self) -> None:
        check_choices(self, "kind")
        for name in ("tolerance", "init_limit", "lr"):
            value = getattr(self, name)
            check(
                isinstance(value, int | float) and math.isfinite(value) and value > 0,
                f"{name} must be a finite number > 0, got {value!r}",
            )
        check_positive(self, "rounds")
        check_positive(self, "max_batches", "schedule_steps", allow_none=True)


@dataclass
class NullspaceFinetuningConfig(TrainingConfig):
    """Approximate-nullspace finetuning against its controls (``recipes/finetune_nullspace.py``; Liu et al. 2025).

    Example:
        >>> NullspaceFinetuningConfig(methods=["nullspace", "ce"], nullspace_tol=0.03).seeds
        2
    """

    methods: list[str] = arg(
        ["nullspace", "ce", "random"], "finetuning methods, each from the same baseline and budget",
        registry="robustvit.nullspace.methods:FINETUNING_METHODS",
    )  # fmt: skip
    seeds: int = arg(2, "runs of each method, with seeds seed, seed+1, ...")
    epochs: int = arg(4, "finetuning epochs (one noise synthesis each)")
    lr: float = arg(1e-4, "AdamW peak learning rate of the finetuning")
    weight_decay: float = arg(0.05, "AdamW weight decay")
    train_data_fraction: float = arg(1.0, "fraction of the training batches per epoch (paper: 0.004)")
    nullspace_tol: float = arg(
        0.03, "the paper's epsilon: tolerance on the mean squared softmax-probability change under the noise "
        "(not a radius)",
    )  # fmt: skip
    init_limit: float = arg(3.0, "noise init U(-init_limit, init_limit)")
    noise_lr: float = arg(0.1, "AdamW learning rate of the noise")
    # The paper: 3 rounds over 10% of ImageNet, thousands of AdamW steps. 10% of digits is 2 batches, and 6 steps
    # leave the U(-3, 3) noise far outside the eps-nullspace; 6 rounds over all of it (~140 steps) reach it.
    noise_rounds: int = arg(6, "passes over the noise data per synthesis")
    noise_data_fraction: float = arg(1.0, "fraction of the training batches per noise round")
    unconverged_noise: str = arg(
        "resynthesize", "a noise that did not reach the tolerance: search on from it (up to --noise_retries more "
        "times, then stop with an error), or train with it as the paper's code does",
        choices=("resynthesize", "train"),
    )  # fmt: skip
    noise_retries: int = arg(3, "further searches for a noise that did not reach the tolerance")
    drop_path: float = arg(0.0, "stochastic depth of timm ViTs (paper: 0.25)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            bool(self.methods) and len(set(self.methods)) == len(self.methods),
            f"--methods must be distinct names, got {self.methods}",
        )
        check_positive(self, "epochs", "seeds", "noise_rounds")  # no epochs: every method would be the baseline
        check_positive(self, "noise_retries", allow_zero=True)
        for name in ("noise_data_fraction", "train_data_fraction"):
            check(0 < getattr(self, name) <= 1, f"--{name} must be in (0, 1], got {getattr(self, name)}")
        check(self.nullspace_tol > 0, f"--nullspace_tol must be > 0, got {self.nullspace_tol}")
        check(0 <= self.drop_path < 1, f"--drop_path must be in [0, 1), got {self.drop_path}")

    def noise_synthesis(self, **overrides: Any) -> NoiseSynthesisConfig:
        """The :class:`NoiseSynthesisConfig` of these flags (``--nullspace_tol``, ``--init_limit``, ``--noise_lr``,
        ``--noise_rounds``), with ``overrides`` (the ``kind`` and ``max_batches`` of a run).

        Example:
            >>> NullspaceFinetuningConfig(nullspace_tol=0.01).noise_synthesis(kind="random").tolerance
            0.01
        """
        settings = {"tolerance": self.nullspace_tol, "init_limit": self.init_limit, "lr": self.noise_lr,
                    "rounds": self.noise_rounds}  # fmt: skip
        return resolve_config(NoiseSynthesisConfig, None, {**settings, **overrides})


# --------------------------------------------------------------------------------------------------- evaluation

LINF_RADII_HELP = "FGSM / PGD linf radii (pixels in [0, 1]; the flag is in 1/255: 2 means 2/255)"
L2_RADII_HELP = "FGSM / PGD l2 radii (pixels in [0, 1]; the flag is in 1/255: 72 means 72/255)"


@dataclass
class RobustnessConfig(EvaluationBudget):
    """The settings of :func:`robustvit.evaluation.evaluate_robustness`: FGSM and PGD radii per norm (pixel units of
    ``[0, 1]`` images; their flags are spelled in 1/255), corruptions and their severities, and the budget.

    Example:
        >>> [round(r * 255) for r in RobustnessConfig().l2_radii]
        [36, 72]
    """

    RENAMED: ClassVar[dict[str, str]] = {
        **EvaluationBudget.RENAMED,
        "eps_linf": "linf_radii",
        "eps_l2": "l2_radii",
    }  # fmt: skip  (the 0.1 keywords, in the same pixel units)
    eval_batch_size: int = arg(128, "evaluation batch size")
    pgd_restarts: int = arg(2, "random restarts of each PGD attack")
    linf_radii: list[float] = arg([1 / 255, 2 / 255], LINF_RADII_HELP, per_255=True)
    l2_radii: list[float] = arg([36 / 255, 72 / 255], L2_RADII_HELP, per_255=True)
    corruptions: list[str] | None = arg(
        None, "corruptions (default: all)", registry="robustvit.corruptions:CORRUPTIONS"
    )
    severities: list[int] = arg([1, 3, 5], "corruption severities (1 to 5)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "pgd_restarts")
        self.linf_radii, self.l2_radii = [float(r) for r in self.linf_radii], [float(r) for r in self.l2_radii]
        radii = [*self.linf_radii, *self.l2_radii]
        check(all(math.isfinite(r) and r > 0 for r in radii), f"attack radii must be finite and > 0, got {radii}")
        if self.corruptions is not None:
            self.corruptions = list(self.corruptions)
            check_choices(self, "corruptions")
        self.severities = list(self.severities)
        check(
            bool(self.severities) and all(type(s) is int and 1 <= s <= 5 for s in self.severities),
            f"--severities must be ints from 1 to 5, got {self.severities}",
        )


@dataclass
class EvaluationConfig(RobustnessConfig):
    """The robustness evaluation of ``recipes/finetune_nullspace.py``: :class:`RobustnessConfig` with one radius per
    norm, and extra test sets.

    Example:
        >>> [round(r * 255) for r in EvaluationConfig(l2_radii=[], corruptions=["contrast"]).linf_radii]
        [2]
    """

    # One radius per norm by default: PGD with 50 steps x 2 restarts dominates the run time on CPU.
    linf_radii: list[float] = arg([2 / 255], LINF_RADII_HELP, per_255=True)
    l2_radii: list[float] = arg([72 / 255], L2_RADII_HELP, per_255=True)
    eval_sets: list[str] = arg(
        [], "extra test sets NAME=PATH (imagefolder dir or HF id, e.g. ImageNet-R/-A), scored by clean accuracy over "
        "their classes, matched to the training classes by name",
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        for spec in self.eval_sets:
            name, _, source = spec.partition("=")
            check(bool(name and source), f"--eval_sets takes NAME=PATH, got {spec!r}")
