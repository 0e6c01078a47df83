"""The training loop the recipes share: one epoch of a loss over a prepared dataloader, with Accelerate.

Gradient accumulation is Accelerate's (``Accelerator(gradient_accumulation_steps=k)`` and ``accelerator.accumulate``),
and so is mixed precision (``Accelerator(mixed_precision=...)``); the loop only counts, shows and reports.

Example:
    >>> ce = lambda model, images, labels: F.cross_entropy(model(images), labels)
    >>> model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    >>> stats = train_epoch(accelerator, model, loader, optimizer, ce, max_batches=2)
    >>> stats["images"], stats["steps"]
    (64, 2)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch import Tensor, nn
from tqdm.auto import tqdm

from robustvit.training.checkpoint import (
    SamplerGenerator,
    latest_checkpoint,
    resume_from_checkpoint,
    save_checkpoint,
    use_project_dir,
)

__all__ = ["cosine_schedule", "epoch_batches", "progress_bar", "train_epoch", "train_phase"]

logger = get_logger(__name__)


def progress_bar(iterable: Iterable | None, accelerator: Accelerator, **kwargs: Any) -> tqdm:
    """A tqdm bar shown on the local main process only (one bar per machine, not one per process).

    Example:
        >>> [batch for batch in progress_bar(range(3), accelerator, desc="demo", total=3)]
        [0, 1, 2]
    """
    return tqdm(iterable, disable=not accelerator.is_local_main_process, **kwargs)


def epoch_batches(num_batches: int, max_batches: int | None, accumulation_steps: int = 1) -> int:
    """Batches one process takes in an epoch of ``num_batches`` (its share of the dataloader) capped at
    ``max_batches``.

    Raises:
        ValueError: the cap cuts a gradient accumulation short (it must be a multiple of ``accumulation_steps``:
            Accelerate syncs an incomplete accumulation only at the end of the dataloader).

    Example:
        >>> len(loader), epoch_batches(len(loader), 4), epoch_batches(len(loader), None)
        (45, 4, 45)
    """
    if max_batches is None or max_batches >= num_batches:
        return num_batches
    if max_batches < 1 or max_batches % accumulation_steps:
        raise ValueError(
            f"a cap of {max_batches} batches per epoch must be a positive multiple of the "
            f"{accumulation_steps} gradient accumulation steps"
        )
    return max_batches


def train_epoch(
    accelerator: Accelerator,
    model: nn.Module,
    dataloader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor],
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_batches: int | None = None,
    max_grad_norm: float | None = None,
    description: str = "train",
    on_step: Callable[[int, Tensor], None] | None = None,
    skip_steps: int = 0,
    carried: Sequence[float] = (0.0, 0.0),
    data_order: SamplerGenerator | None = None,
) -> dict[str, float]:
    """One pass of ``loss_fn(model, images, labels)`` minimisation over ``dataloader`` (all prepared).

    Each batch runs inside ``accelerator.accumulate(model)``: with ``gradient_accumulation_steps=k`` the optimizer
    and the scheduler step once every ``k`` batches on the summed (``1/k``-scaled) gradients.

    Args:
        accelerator: The recipe's accelerator (backward, accumulation, cross-process statistics).
        model, dataloader, optimizer, scheduler: Prepared by ``accelerator``.
        loss_fn: Loss of one batch, e.g. cross-entropy or :func:`robustvit.nullspace.nullspace_finetuning_loss`.
        max_batches: Stop after this many batches per process (smoke tests, data fractions); ``None`` for the
            whole epoch. See :func:`epoch_batches`.
        max_grad_norm: Clip the gradients' total l2 norm to this before each optimizer step
            (``accelerator.clip_grad_norm_``, on the accumulated gradients); ``None``: no clipping.
        description: Progress bar label.
        on_step: Called after each optimizer step with the number of steps taken so far in this epoch and this
            process's running ``(loss sum, images)`` (e.g. to save a checkpoint every N steps).
        skip_steps: Optimizer steps of this epoch already taken before a mid-epoch checkpoint: their batches are
            skipped (``accelerator.skip_first_batches``), in the epoch's own order (rewound with ``data_order``);
            ``carried`` is their ``(loss sum, images)`` over all processes, counted once (by the main process).
        data_order: The :class:`~robustvit.training.checkpoint.SamplerGenerator` of ``dataloader``: marks the
            generator state the epoch's order is drawn from, so that a mid-epoch checkpoint can replay it.

    Returns:
        ``{"loss": mean loss over all processes' images, "images": their number, "steps": optimizer steps of this
        process (skipped ones included), "seconds": wall time}``.

    Example:
        >>> ce = lambda model, images, labels: F.cross_entropy(model(images), labels)
        >>> model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        >>> stats = train_epoch(accelerator, model, loader, optimizer, ce, max_batches=2, description="demo")
        >>> stats["images"], stats["loss"] > 0
        (64, True)
    """
    start = time.perf_counter()
    accumulation = accelerator.gradient_accumulation_steps
    total = epoch_batches(len(dataloader), max_batches, accumulation)  # type: ignore[arg-type]
    skipped = min(total, skip_steps * accumulation)
    if data_order is not None:
        # A checkpoint saved after the epoch's last step holds the generator as the epoch left it (its order already
        # drawn): rewinding would leave the order undrawn (no batch is left to draw it) and the next epoch repeat it.
        data_order.start_epoch(rewind=0 < skipped < total)
    elif skip_steps:
        raise ValueError("skipping into an epoch needs its data_order, to replay the epoch's batch order")
    if skipped:
        dataloader = accelerator.skip_first_batches(dataloader, skipped)
    model.train()
    totals = torch.tensor(carried if accelerator.is_main_process else (0.0, 0.0), dtype=torch.float64)
    totals = totals.to(accelerator.device)
    steps = skip_steps
    batches = itertools.islice(dataloader, total - skipped)
    bar = progress_bar(batches, accelerator, desc=description, total=total, initial=skipped, leave=False)
    for images, labels in bar:
        with accelerator.accumulate(model):
            loss = loss_fn(model, images, labels)
            accelerator.backward(loss)
            if max_grad_norm is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad()
        totals += torch.stack([loss.detach().double() * labels.shape[0], torch.tensor(labels.shape[0]).to(totals)])
        if accelerator.sync_gradients:
            steps += 1
            if on_step is not None:
                on_step(steps, totals)
    totals = accelerator.reduce(totals, reduction="sum")
    if totals[1] == 0 and not skipped:
        raise ValueError("the training dataloader yielded no batches")
    return {
        "loss": float(totals[0] / totals[1]) if totals[1] else float("nan"),
        "images": int(totals[1]),
        "steps": steps,
        "seconds": time.perf_counter() - start,
    }


def cosine_schedule(
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    *,
    epochs: int,
    batches_per_epoch: int,
    warmup_epochs: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' ``get_cosine_schedule_with_warmup`` over ``epochs``, counted as Accelerate steps it.

    Prepare it with ``accelerator``: a prepared scheduler steps ``num_processes`` times per optimizer step, and an
    optimizer step is one of every ``gradient_accumulation_steps`` batches (:func:`train_epoch`), so the schedule
    spans ``epochs * ceil(batches_per_epoch / accumulation) * num_processes`` scheduler steps and ends with the run.

    Args:
        batches_per_epoch: batches each process takes per epoch (:func:`epoch_batches`).
        warmup_epochs: linear warmup from 0, in epochs.

    Example:
        >>> schedule = cosine_schedule(optimizer, accelerator, epochs=2, batches_per_epoch=4, warmup_epochs=1)
        >>> [round(schedule.lr_lambdas[0](step), 3) for step in range(8)]
        [0.0, 0.25, 0.5, 0.75, 1.0, 0.854, 0.5, 0.146]
    """
    from transformers import get_cosine_schedule_with_warmup

    steps_per_epoch = -(-batches_per_epoch // accelerator.gradient_accumulation_steps) * accelerator.num_processes
    return get_cosine_schedule_with_warmup(
        optimizer,
        num_warmup_steps=min(warmup_epochs, epochs) * steps_per_epoch,
        num_training_steps=max(1, epochs * steps_per_epoch),
    )


def train_phase(
    accelerator: Accelerator,
    project_dir: str | Path,
    run_epoch: Callable[..., dict[str, Any]],
    *,
    epochs: int,
    resume: bool,
    checkpointing_steps: int | str = "epoch",
    name: str = "train",
) -> dict[str, Any]:
    """Epochs of one training phase, checkpointed under ``<project_dir>/checkpoints`` and resumable.

    ``run_epoch(epoch, skip_steps=..., carried=..., on_step=...)`` trains one epoch with :func:`train_epoch` (passing
    those three on) and returns its statistics. After every epoch (and, with an int ``checkpointing_steps``, every
    that many optimizer steps) the phase is saved with :func:`~robustvit.training.save_checkpoint`; with ``resume``
    it continues from its newest complete checkpoint, inside an epoch if that is where it was saved.

    Returns:
        The phase's state: ``{"epoch": last epoch, "history": [{"epoch": e, **run_epoch's statistics}, ...]}``.

    Example:
        >>> from robustvit.training import latest_checkpoint, project_configuration
        >>> ce = lambda model, images, labels: F.cross_entropy(model(images), labels)
        >>> accelerator = Accelerator(cpu=True, project_config=project_configuration("outputs/run", total_limit=2))
        >>> model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        >>> def run_epoch(epoch, **resume_kwargs):
        ...     return train_epoch(accelerator, model, loader, optimizer, ce, max_batches=2, **resume_kwargs)
        >>> state = train_phase(accelerator, "outputs/run", run_epoch, epochs=2, resume=False)
        >>> [entry["epoch"] for entry in state["history"]], latest_checkpoint("outputs/run").name
        ([0, 1], 'checkpoint_1')
    """
    use_project_dir(accelerator, project_dir)
    state: dict[str, Any] = {"epoch": -1, "history": []}
    if resume and latest_checkpoint(project_dir) is not None:
        state = resume_from_checkpoint(accelerator, project_dir)
        where = (
            f"step {state['epoch_steps']} of epoch {state['epoch'] + 1}"
            if state.get("epoch_steps")
            else (f"the end of epoch {state['epoch']}")
        )
        logger.info(f"{name}: resumed from {where} ({latest_checkpoint(project_dir)})", main_process_only=True)
    for epoch in range(state["epoch"] + 1, epochs):
        skip_steps, carried = state.pop("epoch_steps", 0), state.pop("epoch_totals", (0.0, 0.0))

        def on_step(steps: int, totals: Tensor, epoch: int = epoch) -> None:
            if checkpointing_steps != "epoch" and steps % int(checkpointing_steps) == 0:
                partial = accelerator.reduce(totals.clone(), reduction="sum").tolist()
                inside = {"epoch": epoch - 1, "epoch_steps": steps, "epoch_totals": partial}
                save_checkpoint(accelerator, {**state, **inside})

        stats = run_epoch(epoch, skip_steps=skip_steps, carried=carried, on_step=on_step)
        state["history"].append({"epoch": epoch, **stats})
        state["epoch"] = epoch
        save_checkpoint(accelerator, state)
        accelerator.log({f"{name}/{key}": value for key, value in stats.items()}, step=epoch)
    return state
