"""The phases of ``recipes/train_lipschitz.py``: build (data, source) -> pretrain the source -> convert -> margin
training -> certify and save. ``bench/bench_transfer.py`` runs its rows through the same functions.

The source model is converted with :func:`robustvit.convert`, then trained with a Lipschitz-margin loss (EMMA by
default) whose radius ramps up over training (:class:`~robustvit.losses.EpsSchedule`), with optional distillation
from the unconverted source. Writes to ``run.output_dir``: ``pretrain/checkpoints/`` (while the source trains),
``source/`` (the source as its library's own folder: ``--model <output_dir>/source`` starts another run from it),
``source.safetensors``, ``checkpoints/checkpoint_<i>/``, ``model/`` (:func:`robustvit.save_pretrained`),
``certificate.json``, ``certified_accuracy.png`` and ``metrics.json``.

Example:
    >>> configs = default_configs(output_dir="outputs/demo")
    >>> configs.training.epochs, configs.training.pretrain_epochs, configs.convert.residual_budget
    (9, 15, 12.0)
    >>> [round(eps * 255) for eps in configs.certification.eps]  # what the certificate reports
    [36, 72, 108]

``recipes/train_lipschitz.py``'s ``training_function`` calls the phases in order: :func:`start`,
:func:`build_data`, :func:`build_source`, :func:`pretrain_source`, :func:`convert_source`, :func:`train_margin`
and, on the main process, :func:`certify_and_save`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors.torch import load_model, save_model
from torch.utils.data import DataLoader

import robustvit
import robustvit.peft
from robustvit.certify_split import CERTIFICATE_NAME, METRICS_NAME, certify_split
from robustvit.configs import CertificationConfig, ConvertConfig, LipschitzTrainingConfig, RunConfig
from robustvit.constants import CURVE_NAME
from robustvit.data import ImageDataset, stack_examples
from robustvit.layers import fit_residual_budget, residual_stack_bound
from robustvit.losses import LOSSES, EpsSchedule, distillation_loss, head_margins
from robustvit.training import (
    CHECKPOINTS_DIR,
    RUN_SETTINGS_FILE,
    PixelModel,
    SamplerGenerator,
    cosine_schedule,
    epoch_batches,
    save_model_folder,
)
from robustvit.workflows.phases import (
    Trainer,
    cross_entropy,
    done_once,
    load_source_model,
    load_splits,
    pretrain,
    start_run,
    train_epochs,
)

__all__ = [
    "CONVERT_DEFAULTS",
    "Configs",
    "Data",
    "RUN_DEFAULTS",
    "SOURCE_DIR",
    "SOURCE_WEIGHTS",
    "TRAINING_DEFAULTS",
    "build_data",
    "build_source",
    "certify_and_save",
    "convert_source",
    "default_configs",
    "read_source",
    "recipe_configs",
    "pretrain_source",
    "start",
    "train_margin",
]

logger = get_logger(__name__)

RECIPE = "train_lipschitz"
SOURCE_WEIGHTS = "source.safetensors"  # the source phase's finished marker, written last
SOURCE_DIR = "source"  # the source as a timm / transformers folder (robustvit.training.save_model_folder)
PRETRAIN_DIR = "pretrain"  # the source pretraining's project folder: pretrain/checkpoints/checkpoint_<i>
OUTPUTS = (PRETRAIN_DIR, SOURCE_DIR, SOURCE_WEIGHTS, CHECKPOINTS_DIR, "model", "certificate.json",
           "certified_accuracy.png", "metrics.json", RUN_SETTINGS_FILE)  # fmt: skip
# What a resumed run may change (everything else it must share with the run it continues, or it mixes two settings):
# more --epochs (the documented way to extend a run), how it is run and checkpointed, and what is certified at the end.
RESUMABLE_TRAINING_FIELDS = ("epochs",)  # --epochs 30 --resume extends a run
DEFAULT_PRETRAIN_EPOCHS = 15  # for the embedded default model, which starts from random weights
DEFAULT_EPOCHS = 9  # of margin training (bench/bench_transfer.py runs it and a third of it, 3 seeds, on 2 cores)
# Defaults measured in bench/bench_transfer.py (README: the table, per seed): orthogonal weights (the source's singular
# vectors at full gain), a residual stack bounded by 12 (tighter budgets of 2, 3 and 6 leave less of the source's
# blocks; no budget keeps a bound near 50), and the margin phase's gradient norm clipped to 1
# (LipschitzTrainingConfig.max_grad_norm): without clipping, the first steps from a converted start throw away what it
# brings on some seeds. A random init (--pretrain_epochs 0) gets the same conversion and clipping.
DEFAULT_SINGULAR_VALUE_POWER = 0.0
DEFAULT_RESIDUAL_BUDGET = 12.0
# The recipe's defaults where they differ from the configs' own (its flags and default_configs() share them).
TRAINING_DEFAULTS: dict[str, Any] = {"epochs": DEFAULT_EPOCHS}
CONVERT_DEFAULTS: dict[str, Any] = {
    "activation": "minmax",
    "singular_value_power": DEFAULT_SINGULAR_VALUE_POWER,
    "residual_budget": DEFAULT_RESIDUAL_BUDGET,
}
RUN_DEFAULTS: dict[str, Any] = {"output_dir": "outputs/train_lipschitz"}


class Configs(NamedTuple):
    """Everything a run is told; saved in metrics.json as ``{name: dataclasses.asdict(config)}``."""

    run: RunConfig
    training: LipschitzTrainingConfig
    convert: ConvertConfig
    certification: CertificationConfig


class Data(NamedTuple):
    train_set: ImageDataset
    test_set: ImageDataset
    train_loader: DataLoader
    order: SamplerGenerator  # the shuffling generator, checkpointed with every phase
    batches_per_epoch: int  # per process


def recipe_configs(
    run: RunConfig, training: LipschitzTrainingConfig, convert: ConvertConfig, certification: CertificationConfig
) -> Configs:
    """The run's configs with the recipe's rules applied: ``pretrain_epochs=None`` is DEFAULT_PRETRAIN_EPOCHS for
    the embedded model (random weights) and 0 for a named one; the certificate reports CertificationConfig's default
    radii (``--eps`` is the training radius)."""
    if training.pretrain_epochs is None:
        pretrain_epochs = DEFAULT_PRETRAIN_EPOCHS if run.model is None else 0
        training = dataclasses.replace(training, pretrain_epochs=pretrain_epochs)
    return Configs(run, training, convert, certification)


def default_configs(**run: Any) -> Configs:
    """The recipe's default run (what ``recipes/train_lipschitz.py`` with no flags runs), with ``run`` overrides.

    Example:
        >>> default_configs(output_dir="outputs/x").training.pretrain_epochs
        15
    """
    return recipe_configs(
        RunConfig(**{**RUN_DEFAULTS, **run}), LipschitzTrainingConfig(**TRAINING_DEFAULTS),
        ConvertConfig(**CONVERT_DEFAULTS), CertificationConfig(),
    )  # fmt: skip


def compared_settings(configs: Configs) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues (``check_run_settings``)."""
    training = dataclasses.asdict(configs.training)
    sections = {
        "run": configs.run.result_settings(),
        "training": {key: value for key, value in training.items() if key not in RESUMABLE_TRAINING_FIELDS},
        "convert": dataclasses.asdict(configs.convert),
    }
    return {f"{section}/{key}": value for section, settings in sections.items() for key, value in settings.items()}


def start(configs: Configs) -> tuple[Accelerator, Path]:
    """The run's Accelerator and output folder (refused if it holds another run)."""
    return start_run(
        configs, RECIPE, settings=compared_settings(configs), outputs=OUTPUTS,
        resumable_from=(CHECKPOINTS_DIR, PRETRAIN_DIR, SOURCE_WEIGHTS),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------- build


def build_data(accelerator: Accelerator, configs: Configs) -> Data:
    run, training = configs.run, configs.training
    train_set, test_set = load_splits(accelerator, run)
    # The loader's own generator shuffles: a checkpoint inside an epoch replays that epoch's order (SamplerGenerator).
    generator = torch.Generator().manual_seed(run.seed)
    train_loader = DataLoader(
        train_set, batch_size=training.batch_size, shuffle=True, num_workers=run.num_workers, generator=generator
    )
    order = SamplerGenerator(train_loader.sampler)
    accelerator.register_for_checkpointing(order)
    # Batches per epoch of one process: Accelerate deals the batches out, padding the shards to equal length.
    local_batches = -(-len(train_loader) // accelerator.num_processes)
    batches = epoch_batches(local_batches, run.max_train_batches, accelerator.gradient_accumulation_steps)
    return Data(train_set, test_set, train_loader, order, batches)


def build_source(configs: Configs, data: Data) -> tuple[torch.nn.Module, dict[str, Any]]:
    return load_source_model(configs.run, data.train_set.num_classes)


# --------------------------------------------------------------------------------------------------- phases


def read_source(source: torch.nn.Module, weights: str | Path) -> torch.nn.Module:
    """The source's weights, as :func:`pretrain_source` saved them."""
    load_model(source, str(weights))
    return source


def pretrain_source(accelerator: Accelerator, configs: Configs, source: torch.nn.Module, data: Data) -> torch.nn.Module:
    """The source: pretrained weights, or (embedded default) a short plain training run, resumable, saved once done
    as ``source/`` (a folder timm or transformers loads, and ``--model`` too) and ``source.safetensors``."""
    run, training = configs.run, configs.training
    output_dir = Path(run.output_dir)
    weights = output_dir / SOURCE_WEIGHTS

    def train() -> torch.nn.Module:
        if not training.pretrain_epochs:
            return source
        net = PixelModel(source)
        optimizer = torch.optim.AdamW(net.parameters(), lr=training.pretrain_lr, weight_decay=0.05)
        schedule = cosine_schedule(
            optimizer, accelerator, epochs=training.pretrain_epochs, batches_per_epoch=data.batches_per_epoch
        )
        net, optimizer, schedule, loader = accelerator.prepare(net, optimizer, schedule, data.train_loader)
        trainer = Trainer(accelerator, net, loader, optimizer, schedule, data.batches_per_epoch, data.order)
        pretrain(
            trainer, output_dir / PRETRAIN_DIR, epochs=training.pretrain_epochs, run=run, label="source",
            loss_fn=cross_entropy,
        )  # fmt: skip
        trained = accelerator.unwrap_model(net).model
        accelerator.free_memory()
        return trained

    def save(model: torch.nn.Module) -> None:
        save_model_folder(model, output_dir / SOURCE_DIR)
        save_model(model, str(weights), metadata={"format": "pt"})
        logger.info(f"source: saved to {output_dir / SOURCE_DIR} and {weights}")

    return done_once(
        accelerator, weights, resume=run.resume, produce=train, save=save,
        read_back=lambda: read_source(source, weights), checkpoints=output_dir / PRETRAIN_DIR, label="source",
    )  # fmt: skip


def convert_source(configs: Configs, source: torch.nn.Module, data: Data) -> torch.nn.Module:
    """Convert, calibrating each CenterNorm on training images; --lora_r puts LoRA inside the constraint."""
    calibration = stack_examples(data.train_set, 64)[0]
    model = robustvit.convert(source, configs.convert, calibration_images=calibration)
    return robustvit.peft.with_lora(model, configs.training.lora_r)


def train_margin(
    accelerator: Accelerator,
    configs: Configs,
    model: torch.nn.Module,
    source: torch.nn.Module | None,
    data: Data,
) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Lipschitz-margin training, resumable; returns the unwrapped model and the per-epoch history.

    ``source`` is the distillation teacher (``--distill``); ``None`` for a model with no source (LipShiFT).
    """
    run, training = configs.run, configs.training
    if training.distill > 0 and source is None:
        raise ValueError("--distill needs the source model to distill from")
    teacher = PixelModel(source).eval().requires_grad_(False) if training.distill > 0 else None
    loss_fn = LOSSES[training.loss]
    eps_schedule = EpsSchedule(training.eps, start=training.eps_start, end=training.eps_end)
    total_batches = max(1, training.epochs * data.batches_per_epoch)  # the eps ramp counts this process's batches
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    schedule = cosine_schedule(
        optimizer, accelerator, epochs=training.epochs, batches_per_epoch=data.batches_per_epoch, warmup_epochs=1
    )
    progress = {"batch": 0}
    budget = _residual_budget(configs, model, ramp=eps_schedule.ramp)
    model, optimizer, schedule, loader = accelerator.prepare(model, optimizer, schedule, data.train_loader)
    if teacher is not None:
        teacher = teacher.to(accelerator.device)
    unwrapped = accelerator.unwrap_model(model)
    trainer = Trainer(accelerator, model, loader, optimizer, schedule, data.batches_per_epoch, data.order)

    def margin_loss(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        eps = eps_schedule(progress["batch"] / total_batches)
        progress["batch"] += 1
        logits = net(images)
        loss = loss_fn(logits, labels, eps=eps, margins=head_margins(unwrapped))
        if teacher is not None:
            loss = loss + training.distill * distillation_loss(logits, teacher(images))
        return loss

    def run_epoch(epoch: int, *, on_step: Callable[[int, torch.Tensor], None], **resume_kwargs: Any) -> dict[str, Any]:
        done = resume_kwargs.get("skip_steps", 0) * accelerator.gradient_accumulation_steps
        progress["batch"] = epoch * data.batches_per_epoch + done

        def after_step(steps: int, totals: torch.Tensor) -> None:
            if budget is not None:  # before a checkpoint is saved: it holds the projected weights
                fit_residual_budget(unwrapped, budget(progress["batch"] / total_batches))
            on_step(steps, totals)

        stats = trainer.epoch(
            margin_loss, f"epoch {epoch}", max_grad_norm=training.max_grad_norm or None, on_step=after_step,
            **resume_kwargs,
        )  # fmt: skip
        stats["lipschitz"] = robustvit.lipschitz_bound(unwrapped)
        logger.info(
            f"epoch {epoch}: loss {stats['loss']:.4f}, Lipschitz bound {stats['lipschitz']:.3f} "
            f"({stats['seconds']:.1f} s)",
            main_process_only=True,
        )
        return stats

    state = train_epochs(accelerator, run.output_dir, run_epoch, epochs=training.epochs, run=run, name="train")
    return unwrapped, state["history"]


def _residual_budget(configs: Configs, model: torch.nn.Module, *, ramp: float) -> EpsSchedule | None:
    """``--residual_budget_end``'s budget on the product of the residual blocks' bounds, as a function of training
    progress: from ``--residual_budget`` (``none``: the converted model's own product) down to the end value over the
    first ``ramp`` of training, the radius ramp's (EpsSchedule's linear ramp, of the budget). Measured against the
    converted model's growing bound: on digits it costs certified accuracy at every radius
    (bench/bench_transfer.py --set long_ablation)."""
    end = configs.training.residual_budget_end
    if end is None:
        return None
    start = configs.convert.residual_budget or residual_stack_bound(model)
    if end >= start:
        raise ValueError(f"--residual_budget_end {end} must be below the budget it tightens from, {start:.4g}")
    return EpsSchedule(start, start=1.0, end=end / start, ramp=ramp)


def certify_and_save(
    accelerator: Accelerator,
    configs: Configs,
    model: torch.nn.Module,
    data: Data,
    *,
    description: dict[str, Any],
    history: list[dict[str, Any]],
    started: float,
) -> dict[str, Any]:
    """Certify the eval split through :func:`robustvit.certify_split.certify_split` (main process: certificates are
    cheap; PGD checks them): the model folder, certificate.json, certified_accuracy.png and metrics.json; returns the
    metrics.

    ``description`` is the source's (``build_source``), ``history`` the margin training's, ``started`` the
    ``time.perf_counter()`` the run started at (``train_seconds``: until certification).
    """
    output_dir = Path(configs.run.output_dir)
    record = {
        "config": {name: dataclasses.asdict(config) for name, config in configs._asdict().items()},
        "model": description,
        "num_processes": accelerator.num_processes,
        "history": history,
        "train_seconds": time.perf_counter() - started,
    }
    folder = output_dir / "model"
    certificate = certify_split(
        robustvit.peft.merged(model),  # LoRA merged: the plain converted model is certified and saved
        data.test_set, configs.certification, output_dir=output_dir, model_dir=folder,
        name=configs.run.model or "the embedded ViT", record=record,
    )  # fmt: skip
    accelerator.print(certificate.accuracy_table())
    logger.info(
        f"end-to-end Lipschitz bound {certificate.lipschitz:.4g}; wrote the certified model to {folder}, and "
        f"{CERTIFICATE_NAME}, {CURVE_NAME} and {METRICS_NAME} to {output_dir}",
        main_process_only=True,
    )
    return json.loads((output_dir / METRICS_NAME).read_text())
