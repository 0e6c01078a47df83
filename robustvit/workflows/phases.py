"""What both recipes' workflows share: starting a run, loading its splits and its model, training epochs over one
prepared set of objects, the cross-entropy pretraining, and a phase whose outputs are written once it is complete.

A phase is resumable at two levels: inside it, :func:`~robustvit.training.train_phase` continues from its newest
checkpoint; once it is complete, :func:`done_once` saves what it made behind a *finished marker* (a file written
last), so that a resumed run reads it back instead of running the phase again, and removes the phase's checkpoints.

Example:
    >>> from robustvit.configs import RunConfig
    >>> train_set, test_set = load_splits(accelerator, RunConfig(image_size=16))
    >>> train_set.num_classes, test_set.split, tuple(test_set[0][0].shape)
    (10, 'test', (3, 16, 16))
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch import nn
from torch.utils.data import DataLoader

from robustvit.configs import RunConfig
from robustvit.data import ImageDataset, load_image_dataset
from robustvit.training import (
    SamplerGenerator,
    build_accelerator,
    check_run_settings,
    load_model,
    prepare_output_dir,
    train_epoch,
    train_phase,
)

__all__ = [
    "Trainer",
    "cross_entropy",
    "done_once",
    "load_source_model",
    "load_splits",
    "pretrain",
    "start_run",
    "train_epochs",
]

logger = get_logger(__name__)

T = TypeVar("T")


def cross_entropy(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE with int labels or soft targets (mixup / label smoothing)."""
    return F.cross_entropy(model(images), targets)


def start_run(
    configs: Any,
    recipe: str,
    *,
    settings: dict[str, Any],
    outputs: tuple[str, ...],
    resumable_from: tuple[str, ...] = (),
) -> tuple[Accelerator, Path]:
    """The Accelerator of ``configs.run`` (a NamedTuple of configs, logged to the trackers) and the output folder,
    refused when it holds another run (or, on ``--resume``, a run of another recipe or with other ``settings``).

    Args:
        recipe: the recipe's name, recorded in ``run_settings.json`` with ``settings``.
        outputs: what the recipe writes into the output folder (``--overwrite_output_dir`` deletes these).
        resumable_from: the names any of which a run can resume from.
    """
    run = configs.run
    accelerator = build_accelerator(run, recipe, configs._asdict())
    output_dir = prepare_output_dir(
        accelerator, run.output_dir, resume=run.resume, overwrite=run.overwrite_output_dir, outputs=outputs,
        resumable_from=resumable_from,
    )  # fmt: skip
    check_run_settings(accelerator, output_dir, recipe, settings, resume=run.resume)
    return accelerator, output_dir


def load_splits(accelerator: Accelerator, run: RunConfig) -> tuple[ImageDataset, ImageDataset]:
    """The training and evaluation splits of ``run.dataset``; the evaluation labels follow the training split's
    classes (matched by name). ``run.image_transform`` transforms both; ``run.max_train_images`` keeps a
    class-stratified subset of the training split, drawn with ``run.seed``."""
    with accelerator.main_process_first():  # a Hub dataset is downloaded once
        train_set, test_set = (
            load_image_dataset(run.dataset, split=split, image_size=run.image_size, channels=run.channels)
            for split in (run.train_split, run.eval_split)
        )
    test_set = test_set.align_labels(train_set.class_names)
    if run.image_transform is not None:
        train_set, test_set = train_set.transformed(run.image_transform), test_set.transformed(run.image_transform)
    if run.max_train_images is not None:
        train_set = train_set.stratified(run.max_train_images, seed=run.seed)
    return train_set, test_set


def load_source_model(run: RunConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """``run.model`` with a head of ``num_classes`` and its description; ``--require_pretrained`` refuses random
    weights."""
    model, description = load_model(
        run.model, num_classes=num_classes, image_size=run.image_size, channels=run.channels
    )
    if run.require_pretrained and not description.get("pretrained", True):
        raise ValueError(
            f"--require_pretrained: no pretrained weights for {run.model!r} in the local Hugging Face cache. Fetch "
            "them first (e.g. `huggingface-cli download timm/vit_small_patch16_224.augreg_in21k_ft_in1k`) or drop "
            "the flag to start from random weights"
        )
    return model, description


@dataclasses.dataclass
class Trainer:
    """What one training phase steps, all prepared by its accelerator."""

    accelerator: Accelerator
    model: nn.Module
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    schedule: Any  # the optimizer's LR schedule (robustvit.training.cosine_schedule)
    batches_per_epoch: int  # per process
    data_order: SamplerGenerator  # the loader's shuffling generator, checkpointed with the phase

    def epoch(
        self, loss_fn: Callable, description: str, *, max_grad_norm: float | None = None, **resume_kwargs: Any
    ) -> dict[str, Any]:
        """One epoch of ``loss_fn`` (:func:`~robustvit.training.train_epoch`); ``resume_kwargs`` are
        :func:`train_epochs`'s."""
        return train_epoch(
            self.accelerator, self.model, self.loader, self.optimizer, loss_fn, scheduler=self.schedule,
            max_batches=self.batches_per_epoch, max_grad_norm=max_grad_norm, description=description,
            data_order=self.data_order, **resume_kwargs,
        )  # fmt: skip


def train_epochs(
    accelerator: Accelerator, project_dir: str | Path, run_epoch: Callable, *, epochs: int, run: RunConfig, name: str
) -> dict[str, Any]:
    """:func:`~robustvit.training.train_phase` with the run's resume and checkpointing settings."""
    return train_phase(
        accelerator, project_dir, run_epoch, epochs=epochs, resume=run.resume,
        checkpointing_steps=run.checkpointing_steps, name=name,
    )  # fmt: skip


def pretrain(
    trainer: Trainer, project_dir: str | Path, *, epochs: int, run: RunConfig, label: str, loss_fn: Callable
) -> dict[str, Any]:
    """Plain training of a start model (the source, the baseline) for ``epochs``, checkpointed under
    ``project_dir``; returns the phase's state (``history``)."""

    def run_epoch(epoch: int, **resume_kwargs: Any) -> dict[str, Any]:
        stats = trainer.epoch(loss_fn, f"{label} {epoch}", **resume_kwargs)
        logger.info(f"{label} epoch {epoch}: loss {stats['loss']:.4f} ({stats['seconds']:.1f} s)")
        return stats

    return train_epochs(trainer.accelerator, project_dir, run_epoch, epochs=epochs, run=run, name="pretrain")


def done_once(
    accelerator: Accelerator,
    marker: Path,
    *,
    resume: bool,
    produce: Callable[[], T],
    save: Callable[[T], None],
    read_back: Callable[[], T],
    checkpoints: Path,
    label: str,
) -> T:
    """A phase whose outputs are saved once it is complete, behind a finished marker.

    On ``resume`` with ``marker`` present, ``read_back()`` (every process). Otherwise ``produce()`` (every
    process), then the main process calls ``save(result)``, which writes ``marker`` last (its presence means the
    phase is complete), and removes ``checkpoints`` (the phase's own: the saved outputs hold what they led to).
    """
    if resume and marker.is_file():
        logger.info(f"{label}: finished before, read back from {marker}", main_process_only=True)
        return read_back()
    result = produce()
    if accelerator.is_main_process:
        save(result)
        shutil.rmtree(checkpoints, ignore_errors=True)
    accelerator.wait_for_everyone()
    return result
