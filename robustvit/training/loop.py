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
from collections.abc import Callable, Iterable
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["epoch_batches", "progress_bar", "train_epoch"]


def progress_bar(iterable: Iterable | None, accelerator: Accelerator, **kwargs: Any) -> tqdm:
    """A tqdm bar shown on the local main process only (one bar per machine, not one per process).

    Example:
        >>> [batch for batch in progress_bar(range(3), accelerator, desc="demo", total=3)]
        [0, 1, 2]
    """
    return tqdm(iterable, disable=not accelerator.is_local_main_process, **kwargs)


def epoch_batches(dataloader: Iterable, max_batches: int | None, accumulation_steps: int = 1) -> int:
    """Batches one process takes from ``dataloader`` in an epoch capped at ``max_batches``.

    Raises:
        ValueError: the cap cuts a gradient accumulation short (it must be a multiple of ``accumulation_steps``:
            Accelerate syncs an incomplete accumulation only at the end of the dataloader).

    Example:
        >>> len(loader), epoch_batches(loader, 4), epoch_batches(loader, None)
        (45, 4, 45)
    """
    total = len(dataloader)  # type: ignore[arg-type]
    if max_batches is None or max_batches >= total:
        return total
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
    description: str = "train",
    on_step: Callable[[int], None] | None = None,
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
        description: Progress bar label.
        on_step: Called with the number of optimizer steps taken so far in this epoch, after each one (e.g. to
            save a checkpoint every N steps).

    Returns:
        ``{"loss": mean loss over all processes' images, "images": their number, "steps": optimizer steps of this
        process, "seconds": wall time}``.

    Example:
        >>> ce = lambda model, images, labels: F.cross_entropy(model(images), labels)
        >>> model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        >>> stats = train_epoch(accelerator, model, loader, optimizer, ce, max_batches=2, description="demo")
        >>> stats["images"], stats["loss"] > 0
        (64, True)
    """
    start = time.perf_counter()
    total = epoch_batches(dataloader, max_batches, accelerator.gradient_accumulation_steps)
    model.train()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    steps = 0
    batches = itertools.islice(dataloader, total)
    for images, labels in progress_bar(batches, accelerator, desc=description, total=total, leave=False):
        with accelerator.accumulate(model):
            loss = loss_fn(model, images, labels)
            accelerator.backward(loss)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad()
        totals += torch.stack([loss.detach().double() * labels.shape[0], torch.tensor(labels.shape[0]).to(totals)])
        if accelerator.sync_gradients:
            steps += 1
            if on_step is not None:
                on_step(steps)
    totals = accelerator.reduce(totals, reduction="sum")
    if totals[1] == 0:
        raise ValueError("the training dataloader yielded no batches")
    return {
        "loss": float(totals[0] / totals[1]),
        "images": int(totals[1]),
        "steps": steps,
        "seconds": time.perf_counter() - start,
    }
