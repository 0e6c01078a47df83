# Lipschitz-margin training of a converted vision transformer, then certification, with Accelerate.
#
# The source model is converted with robustvit.convert (token shift, CenterNorm, spectrally rescaled layers), then
# trained with a Lipschitz-margin loss (EMMA by default) whose radius ramps up over training (EpsSchedule), with
# optional distillation from the unconverted source. At the end the eval split is certified: certificate.json,
# certified_accuracy.png, metrics.json, and a robustvit model folder ready for `robustvit push`.
#
# With no arguments it runs offline on the embedded default: scikit-learn digits and the small timm ViT of
# robustvit.training.DEFAULT_MODEL, first trained from scratch for --pretrain_epochs as the source.
#
#   python recipes/train_lipschitz.py                                      # default run, a few minutes on CPU
#   python recipes/train_lipschitz.py --epochs 30 --resume                 # continue from the last checkpoint
#   accelerate launch recipes/train_lipschitz.py --model vit_small_patch16_224 --dataset path/to/imagefolder \
#       --image_size 224 --distill 1.0 --mixed_precision bf16 --gradient_accumulation_steps 4 --with_tracking
#   ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --main_process_port 29512 \
#       recipes/train_lipschitz.py                                         # 2 CPU processes (gloo)
#
# Phases: parse -> build (data, model) -> pretrain (the source) -> convert -> train (margin) -> certify -> save.
# Writes to --output_dir: pretrain/checkpoints/ (while the source trains), source.safetensors (the source model),
# checkpoints/checkpoint_<i>/ (Accelerate's save_state + training_state.json, newest --checkpoints_total_limit kept),
# model/ (robustvit.save_pretrained: weights, config, certificate, card), certificate.json, certified_accuracy.png
# and metrics.json (the configs as dataclasses.asdict, history, results).

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors.torch import load_model, save_model
from torch.utils.data import DataLoader

import robustvit
import robustvit.peft
from robustvit.certify_split import METRICS_NAME, certify_split
from robustvit.configs import (
    CertificationConfig,
    ConvertConfig,
    LipschitzTrainingConfig,
    RunConfig,
    add_arguments,
    build_configs,
)
from robustvit.data import ImageDataset, load_image_dataset, stack_examples
from robustvit.losses import LOSSES, EpsSchedule, distillation_loss, head_margins
from robustvit.training import (
    CHECKPOINTS_DIR,
    RUN_SETTINGS_FILE,
    PixelModel,
    SamplerGenerator,
    build_accelerator,
    check_run_settings,
    cosine_schedule,
    epoch_batches,
    finish,
    prepare_output_dir,
    train_epoch,
    train_phase,
)
from robustvit.training import load_model as load_source_model

logger = get_logger(__name__)

SOURCE_WEIGHTS = "source.safetensors"
PRETRAIN_DIR = "pretrain"  # the source pretraining's project folder: pretrain/checkpoints/checkpoint_<i>
OUTPUTS = (PRETRAIN_DIR, SOURCE_WEIGHTS, CHECKPOINTS_DIR, "model", "certificate.json", "certified_accuracy.png",
           "metrics.json", RUN_SETTINGS_FILE)  # fmt: skip
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


def cross_entropy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(images), labels)


def compared_settings(configs: Configs) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues (:func:`check_run_settings`)."""
    training = dataclasses.asdict(configs.training)
    sections = {
        "run": configs.run.result_settings(),
        "training": {key: value for key, value in training.items() if key not in RESUMABLE_TRAINING_FIELDS},
        "convert": dataclasses.asdict(configs.convert),
    }
    return {f"{section}/{key}": value for section, settings in sections.items() for key, value in settings.items()}


# --------------------------------------------------------------------------------------------------- build


def build_data(accelerator: Accelerator, configs: Configs) -> Data:
    run, training = configs.run, configs.training
    with accelerator.main_process_first():  # a Hub dataset is downloaded once
        train_set, test_set = (
            load_image_dataset(run.dataset, split=split, image_size=run.image_size, channels=run.channels)
            for split in (run.train_split, run.eval_split)
        )
    test_set = test_set.align_labels(train_set.class_names)  # labels by class name, from the training split
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
    run = configs.run
    source, description = load_source_model(
        run.model, num_classes=data.train_set.num_classes, image_size=run.image_size, channels=run.channels
    )
    if run.require_pretrained and not description.get("pretrained", True):
        raise ValueError(f"--require_pretrained: no pretrained weights for {run.model!r} in the local cache")
    return source, description


# --------------------------------------------------------------------------------------------------- phases


def pretrain_source(accelerator: Accelerator, configs: Configs, source: torch.nn.Module, data: Data) -> torch.nn.Module:
    """The source: pretrained weights, or (embedded default) a short plain training run, resumable, saved once done."""
    run, training = configs.run, configs.training
    output_dir = Path(run.output_dir)
    weights = output_dir / SOURCE_WEIGHTS
    if run.resume and weights.is_file():
        load_model(source, str(weights))
        logger.info(f"source: read back from {weights}", main_process_only=True)
        return source
    if training.pretrain_epochs:
        net = PixelModel(source)
        optimizer = torch.optim.AdamW(net.parameters(), lr=training.pretrain_lr, weight_decay=0.05)
        schedule = cosine_schedule(
            optimizer, accelerator, epochs=training.pretrain_epochs, batches_per_epoch=data.batches_per_epoch
        )
        net, optimizer, schedule, loader = accelerator.prepare(net, optimizer, schedule, data.train_loader)

        def run_epoch(epoch: int, **resume_kwargs: Any) -> dict[str, Any]:
            stats = train_epoch(
                accelerator, net, loader, optimizer, cross_entropy, scheduler=schedule,
                max_batches=data.batches_per_epoch, description=f"source {epoch}", data_order=data.order,
                **resume_kwargs,
            )  # fmt: skip
            logger.info(f"source epoch {epoch}: loss {stats['loss']:.4f} ({stats['seconds']:.1f} s)")
            return stats

        train_phase(
            accelerator, output_dir / PRETRAIN_DIR, run_epoch, epochs=training.pretrain_epochs, resume=run.resume,
            checkpointing_steps=run.checkpointing_steps, name="pretrain",
        )  # fmt: skip
        source = accelerator.unwrap_model(net).model
        accelerator.free_memory()
    if accelerator.is_main_process:
        save_model(source, str(weights), metadata={"format": "pt"})
        shutil.rmtree(output_dir / PRETRAIN_DIR, ignore_errors=True)  # source.safetensors holds what they led to
    accelerator.wait_for_everyone()
    logger.info(f"source: saved to {weights}", main_process_only=True)
    return source


def convert_source(configs: Configs, source: torch.nn.Module, data: Data) -> torch.nn.Module:
    """Convert, calibrating each CenterNorm on training images; --lora_r puts LoRA inside the constraint."""
    calibration = stack_examples(data.train_set, 64)[0]
    model = robustvit.convert(source, configs.convert, calibration_images=calibration)
    return robustvit.peft.with_lora(model, configs.training.lora_r)


def train_margin(
    accelerator: Accelerator, configs: Configs, model: torch.nn.Module, source: torch.nn.Module, data: Data
) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Lipschitz-margin training, resumable; returns the unwrapped model and the per-epoch history."""
    run, training = configs.run, configs.training
    teacher = PixelModel(source).eval().requires_grad_(False) if training.distill > 0 else None
    loss_fn = LOSSES[training.loss]
    eps_schedule = EpsSchedule(training.eps, start=training.eps_start, end=training.eps_end)
    total_batches = max(1, training.epochs * data.batches_per_epoch)  # the eps ramp counts this process's batches
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    schedule = cosine_schedule(
        optimizer, accelerator, epochs=training.epochs, batches_per_epoch=data.batches_per_epoch, warmup_epochs=1
    )
    model, optimizer, schedule, loader = accelerator.prepare(model, optimizer, schedule, data.train_loader)
    if teacher is not None:
        teacher = teacher.to(accelerator.device)
    unwrapped = accelerator.unwrap_model(model)
    progress = {"batch": 0}

    def margin_loss(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        eps = eps_schedule(progress["batch"] / total_batches)
        progress["batch"] += 1
        logits = net(images)
        loss = loss_fn(logits, labels, eps=eps, margins=head_margins(unwrapped))
        if teacher is not None:
            loss = loss + training.distill * distillation_loss(logits, teacher(images))
        return loss

    def run_epoch(epoch: int, **resume_kwargs: Any) -> dict[str, Any]:
        done = resume_kwargs.get("skip_steps", 0) * accelerator.gradient_accumulation_steps
        progress["batch"] = epoch * data.batches_per_epoch + done
        stats = train_epoch(
            accelerator, model, loader, optimizer, margin_loss, scheduler=schedule, max_batches=data.batches_per_epoch,
            max_grad_norm=training.max_grad_norm or None, description=f"epoch {epoch}", data_order=data.order,
            **resume_kwargs,
        )  # fmt: skip
        stats["lipschitz"] = robustvit.lipschitz_bound(unwrapped)
        logger.info(
            f"epoch {epoch}: loss {stats['loss']:.4f}, Lipschitz bound {stats['lipschitz']:.3f} "
            f"({stats['seconds']:.1f} s)",
            main_process_only=True,
        )
        return stats

    state = train_phase(
        accelerator, run.output_dir, run_epoch, epochs=training.epochs, resume=run.resume,
        checkpointing_steps=run.checkpointing_steps, name="train",
    )  # fmt: skip
    return unwrapped, state["history"]


# --------------------------------------------------------------------------------------------------- the run


def training_function(configs: Configs) -> dict[str, Any]:
    run = configs.run
    accelerator = build_accelerator(run, "train_lipschitz", configs._asdict())
    output_dir = prepare_output_dir(
        accelerator, run.output_dir, resume=run.resume, overwrite=run.overwrite_output_dir, outputs=OUTPUTS,
        resumable_from=(CHECKPOINTS_DIR, PRETRAIN_DIR, SOURCE_WEIGHTS),
    )  # fmt: skip
    check_run_settings(accelerator, output_dir, "train_lipschitz", compared_settings(configs), resume=run.resume)
    started = time.perf_counter()
    data = build_data(accelerator, configs)
    source, description = build_source(configs, data)
    source = pretrain_source(accelerator, configs, source, data)
    model = convert_source(configs, source, data)
    model, history = train_margin(accelerator, configs, model, source, data)

    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:  # certificates are cheap; PGD checks them
        record = {
            "config": {name: dataclasses.asdict(config) for name, config in configs._asdict().items()},
            "model": description,
            "num_processes": accelerator.num_processes,
            "history": history,
            "train_seconds": time.perf_counter() - started,
        }
        # LoRA merged: the plain converted model is certified and saved.
        certificate = certify_split(
            robustvit.peft.merged(model), data.test_set, configs.certification, output_dir=output_dir,
            model_dir=output_dir / "model", name=configs.run.model or "the embedded ViT", record=record,
        )  # fmt: skip
        metrics = json.loads((output_dir / METRICS_NAME).read_text())
        folder = output_dir / "model"
        accelerator.print(certificate.accuracy_table())
        logger.info(
            f"end-to-end Lipschitz bound {certificate.lipschitz:.4g}; wrote the certified model to {folder}, and "
            f"certificate.json, certified_accuracy.png and metrics.json to {output_dir}",
            main_process_only=True,
        )
    finish(accelerator)
    return metrics


def build_parser() -> argparse.ArgumentParser:
    """The recipe's flags: one per field of its configs (``--eps`` is the training radius; the certificate reports
    CertificationConfig's default radii, robustvit.constants.DEFAULT_EPS)."""
    parser = argparse.ArgumentParser(
        description="Lipschitz-margin training and certification of a converted ViT.", allow_abbrev=False
    )
    add_arguments(
        parser.add_argument_group("training (LipschitzTrainingConfig)"),
        LipschitzTrainingConfig,
        defaults={"epochs": DEFAULT_EPOCHS},
    )
    add_arguments(
        parser.add_argument_group("conversion (robustvit.ConvertConfig)"),
        ConvertConfig,
        defaults={
            "activation": "minmax",
            "singular_value_power": DEFAULT_SINGULAR_VALUE_POWER,
            "residual_budget": DEFAULT_RESIDUAL_BUDGET,
        },
    )
    add_arguments(parser.add_argument_group("certification"), CertificationConfig, exclude=("eps",))
    add_arguments(parser.add_argument_group("run"), RunConfig, defaults={"output_dir": "outputs/train_lipschitz"})
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Configs:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pretrain_epochs is None:
        args.pretrain_epochs = DEFAULT_PRETRAIN_EPOCHS if args.model is None else 0
    configs = build_configs(
        parser, args, RunConfig, LipschitzTrainingConfig, ConvertConfig, CertificationConfig,
        exclude={CertificationConfig: ("eps",)},
    )  # fmt: skip
    return Configs(*configs)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    return training_function(parse_args(argv))


if __name__ == "__main__":
    main()
