"""Building blocks shared by the training recipes (``recipes/*.py``): models, pixel inputs, loops, checkpoints.

robustvit evaluates, attacks and corrupts images as pixels in ``[0, 1]``, with any normalization inside the model.
:func:`load_model` builds a timm or transformers classifier and :class:`PixelModel` makes it take pixels. The
Accelerate helpers hold the recipe conventions: one checkpoint per epoch under ``<output_dir>/checkpoints``,
resume from the latest one, progress bars on the local main process only, and a clean shutdown.

Example:
    >>> model, description = load_model(None, num_classes=10, image_size=32, channels=3)
    >>> net = PixelModel(model)
    >>> net(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from accelerate import Accelerator
from huggingface_hub import try_to_load_from_cache
from timm.layers import DropPath
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoModelForImageClassification

from robustvit.families import get_family
from robustvit.layers import NormalizedConv2d
from robustvit.registry import Registry

__all__ = [
    "CHECKPOINTS_DIR",
    "add_recipe_arguments",
    "DEFAULT_MODEL",
    "MODEL_SOURCES",
    "ModelSource",
    "TRAINING_STATE_FILE",
    "PixelModel",
    "SamplerGenerator",
    "cosine_schedule",
    "finish",
    "latest_checkpoint",
    "load_model",
    "progress_bar",
    "resume_from_checkpoint",
    "save_checkpoint",
    "set_drop_path",
    "train_epoch",
]

DEFAULT_MODEL: dict[str, Any] = {
    "model_name": "vit_tiny_patch16_224",
    # 3 * 8 * 8 = 192 inputs per patch > 64 dimensions: a 128-dimensional exact patch nullspace. 0.21M parameters;
    # ~95% test accuracy on digits after 20 epochs (about 20 s on one CPU core).
    "kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4},
}
"""The embedded default: a small timm ViT whose exact patch-embedding nullspace is non-trivial."""

CHECKPOINTS_DIR = "checkpoints"
TRAINING_STATE_FILE = "training_state.json"


# --------------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSource:
    """A way of building models: ``load(spec, num_classes, image_size, channels)`` for the specs it ``matches``."""

    matches: Callable[[str | None], bool]
    load: Callable[[str | None, int, int, int], tuple[nn.Module, dict[str, Any]]]


MODEL_SOURCES: Registry[ModelSource] = Registry("model source")
"""Model sources by name; :func:`load_model` uses the first registered one whose ``matches(spec)`` holds."""


def _model_source(name: str, matches: Callable[[str | None], bool]) -> Callable:
    """Decorator registering ``load`` as the model source ``name`` for the specs ``matches`` accepts."""

    def decorator(load: Callable) -> Callable:
        MODEL_SOURCES.register(name, ModelSource(matches, load))
        return load

    return decorator


def _timm_weights_cached(model_name: str) -> bool:
    """Whether timm's pretrained safetensors weights for ``model_name`` are in the local Hugging Face cache."""
    hub_id = timm.models.get_pretrained_cfg(model_name).hf_hub_id
    return bool(hub_id) and isinstance(try_to_load_from_cache(hub_id, "model.safetensors"), str)


def _create_timm(model_name: str, kwargs: dict[str, Any], pretrained: bool) -> tuple[nn.Module, dict[str, Any]]:
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    return model, {"library": "timm", "model_name": model_name, "pretrained": pretrained, "kwargs": kwargs}


@_model_source("default", lambda spec: spec is None)
def _load_default(spec: None, num_classes: int, image_size: int, channels: int) -> tuple[nn.Module, dict[str, Any]]:
    kwargs = {**DEFAULT_MODEL["kwargs"], "img_size": image_size, "in_chans": channels, "num_classes": num_classes}
    return _create_timm(DEFAULT_MODEL["model_name"], kwargs, pretrained=False)


@_model_source("timm", lambda spec: timm.is_model(spec))
def _load_timm(spec: str, num_classes: int, image_size: int, channels: int) -> tuple[nn.Module, dict[str, Any]]:
    pretrained = _timm_weights_cached(spec)
    if not pretrained:
        warnings.warn(
            f"pretrained weights for timm model {spec!r} are not in the local cache (offline); "
            "using a random initialization",
            stacklevel=3,
        )
    kwargs = {"img_size": image_size, "in_chans": channels, "num_classes": num_classes}
    return _create_timm(spec, kwargs, pretrained=pretrained)


@_model_source("transformers", lambda spec: True)
def _load_transformers(spec: str, num_classes: int, image_size: int, channels: int) -> tuple[nn.Module, dict]:
    if os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "config.json")):
        raise ValueError(f"directory {spec!r} has no config.json, so it is not a transformers model directory")
    try:
        model = AutoModelForImageClassification.from_pretrained(
            spec, num_labels=num_classes, ignore_mismatched_sizes=True
        )
    except OSError as err:
        raise ValueError(
            f"{spec!r} is not a timm model name, and loading it as a transformers model (a local directory or a "
            f"Hugging Face id, cached when offline) failed: {err}"
        ) from err
    size, model_channels = model.config.image_size, model.config.num_channels
    size = size if isinstance(size, int) else tuple(size)
    if size not in (image_size, (image_size, image_size)) or model_channels != channels:
        raise ValueError(
            f"{spec!r} takes {model_channels}-channel images of size {size}, but {channels}-channel images of size "
            f"{image_size} were asked for; pass the model's own image size and channels"
        )
    config = model.config.to_dict()
    return model, {"library": "transformers", "name_or_path": spec, "class": type(model).__name__, "config": config}


def load_model(
    spec: str | None, *, num_classes: int, image_size: int, channels: int
) -> tuple[nn.Module, dict[str, Any]]:
    """Build an image classifier from a name, with a JSON-ready description of what was built.

    Args:
        spec: ``None`` for the embedded default (:data:`DEFAULT_MODEL`, a small timm ViT with random weights); a
            timm model name (its pretrained weights are used when ``model.safetensors`` is in the local Hugging
            Face cache, otherwise a warning is issued and the weights are random); anything else is loaded with
            transformers ``AutoModelForImageClassification`` (a local directory with a ``config.json``, or a
            Hugging Face id that must be cached when offline), with a new head of ``num_classes`` outputs.
        num_classes: Number of classes of the head.
        image_size: Side of the input images (timm models are built for it; transformers models must match it).
        channels: Image channels.

    Returns:
        ``(model, description)``; the model takes *normalized* images (wrap it in :class:`PixelModel` to feed
        pixels), the description records the source (``library``, name, arguments, ``pretrained``) and the input
        normalization (``input``).

    Raises:
        ValueError: ``spec`` cannot be loaded, or a transformers model's input size or channels do not match.

    Example:
        >>> model, description = load_model("vit_small_patch16_224", num_classes=10, image_size=224, channels=3)
        >>> description["library"], description["pretrained"]
        ('timm', False)
    """
    for name, value in (("num_classes", num_classes), ("image_size", image_size), ("channels", channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    source = next(source for _, source in MODEL_SOURCES.items() if source.matches(spec))
    model, description = source.load(spec, num_classes, image_size, channels)
    input_spec = get_family(model).input_spec(model)
    description["input"] = {
        "channels": channels,
        "image_size": image_size,
        "mean": list(input_spec.mean),
        "std": list(input_spec.std),
    }
    description["num_classes"] = num_classes
    return model, description


class PixelModel(nn.Module):
    """Feeds pixels in ``[0, 1]`` to a timm or transformers classifier and returns its logits tensor.

    The pixels are normalized with the family's mean and std (timm's ``pretrained_cfg``, or the transformers
    image processor's defaults), so attacks, corruptions and nullspace noise all work in pixel space. A converted
    model (whose patch projection is a :class:`~robustvit.layers.NormalizedConv2d`) already takes pixels: its
    wrapper normalizes with mean 0 and std 1.

    The wrapped model is ``.model`` and the std is the buffer ``.input_std``: the nullspace functions
    (:mod:`robustvit.nullspace`) look through this wrapper and take the nullspace in pixel space. Save
    ``.model``'s weights to get a checkpoint that loads into the plain timm / transformers model.

    Args:
        model: A supported timm or transformers ViT/DeiT.
        mean, std: Override the family's normalization (one value per channel).

    Example:
        >>> net = PixelModel(timm.create_model("vit_tiny_patch16_224", num_classes=10))
        >>> net(torch.rand(1, 3, 224, 224)).shape
        torch.Size([1, 10])
    """

    def __init__(
        self, model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        family = get_family(model)
        spec = family.input_spec(model)
        if isinstance(family.patch_projection(model), NormalizedConv2d):
            spec_mean, spec_std = (0.0,) * spec.channels, (1.0,) * spec.channels
        else:
            spec_mean, spec_std = spec.mean, spec.std
        mean_t = torch.as_tensor(spec_mean if mean is None else mean, dtype=torch.float32)
        std_t = torch.as_tensor(spec_std if std is None else std, dtype=torch.float32)
        if mean_t.shape != (spec.channels,) or std_t.shape != (spec.channels,) or not bool((std_t > 0).all()):
            raise ValueError(f"need {spec.channels} mean values and {spec.channels} positive std values")
        device = next(model.parameters()).device
        self.model = model
        self._family = family
        self.register_buffer("input_mean", mean_t.view(-1, 1, 1).to(device))
        self.register_buffer("input_std", std_t.view(-1, 1, 1).to(device))

    def forward(self, pixels: Tensor) -> Tensor:
        return self._family.logits(self.model((pixels - self.input_mean) / self.input_std))

    def extra_repr(self) -> str:
        return f"mean={self.input_mean.flatten().tolist()}, std={self.input_std.flatten().tolist()}"


def set_drop_path(model: nn.Module, rate: float) -> nn.Module:
    """Give a timm ViT stochastic depth after construction, as ``create_model(..., drop_path_rate=rate)`` does.

    Block ``i`` of ``n`` drops its residual branches with probability ``rate * i / (n - 1)`` (timm's linear rule).
    Drop-path is the identity in eval mode, so certificates and evaluations are unaffected.

    Raises:
        ValueError: ``rate`` outside ``[0, 1)``, or a model without timm's ``blocks[i].drop_path1/2`` (e.g. a
            transformers ViT, which has no drop-path).

    Example:
        >>> model = set_drop_path(timm.create_model("vit_small_patch16_224"), 0.25)
    """
    if not 0 <= rate < 1:
        raise ValueError(f"drop-path rate must be in [0, 1), got {rate!r}")
    blocks = list(getattr(model, "blocks", []))
    if not blocks or not all(hasattr(block, "drop_path1") and hasattr(block, "drop_path2") for block in blocks):
        raise ValueError(
            f"drop-path needs a timm ViT with blocks[i].drop_path1/drop_path2; {type(model).__name__} has none"
        )
    for index, block in enumerate(blocks):
        block_rate = rate * index / max(1, len(blocks) - 1)
        for name in ("drop_path1", "drop_path2"):
            setattr(block, name, DropPath(block_rate) if block_rate > 0 else nn.Identity())
    return model


# --------------------------------------------------------------------------------------------------- recipes


def add_recipe_arguments(hyper: argparse._ArgumentGroup, run: argparse._ArgumentGroup, *, output_dir: str) -> None:
    """The flags every recipe shares: source pretraining, input size and seed (hyper-parameters); model, dataset,
    output directory, resume, device and smoke-test caps (environment).

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_recipe_arguments(parser.add_argument_group("hyper"), parser.add_argument_group("run"),
        ...                      output_dir="outputs/my_recipe")
    """
    hyper.add_argument("--pretrain_lr", type=float, default=2e-3, help="AdamW learning rate of the source training")
    hyper.add_argument("--image_size", type=int, default=32)
    hyper.add_argument("--channels", type=int, default=3, choices=(1, 3))
    hyper.add_argument("--seed", type=int, default=0)
    run.add_argument("--model", default=None, help="timm name, transformers id or directory (default: embedded ViT)")
    run.add_argument("--dataset", default=None, help="imagefolder directory or HF id (default: embedded digits)")
    run.add_argument("--output_dir", default=output_dir)
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output_dir")
    run.add_argument("--cpu", action="store_true", help="run on CPU even if an accelerator is available")
    run.add_argument("--max_train_batches", type=int, default=None, help="cap batches per epoch (smoke tests)")


# --------------------------------------------------------------------------------------------------- loops


def progress_bar(iterable: Iterable, accelerator: Accelerator, **kwargs: Any) -> tqdm:
    """A tqdm bar shown on the local main process only (one bar per machine, not one per process)."""
    return tqdm(iterable, disable=not accelerator.is_local_main_process, **kwargs)


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to 0 over ``total_steps``; the factor stays 0 past the end.

    Unlike ``OneCycleLR`` it never raises when stepped past ``total_steps``, which Accelerate's prepared scheduler
    does when the per-process step count is rounded up (it steps ``num_processes`` times per optimizer step).
    Count ``total_steps`` on the dataloader *before* ``accelerator.prepare``, as Accelerate expects.

    Example:
        >>> epochs = 3
        >>> schedule = cosine_schedule(optimizer, total_steps=epochs * len(loader), warmup_steps=2)
        >>> total = epochs * len(loader)
        >>> [round(schedule.lr_lambdas[0](step), 3) for step in (0, 1, total // 2, total, total + 10)]
        [0.5, 1.0, 0.5..., 0.0, 0.0]
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got {total_steps}, {warmup_steps}"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _limited(iterable: Iterable, max_batches: int | None) -> Iterator:
    for index, item in enumerate(iterable):
        if max_batches is not None and index >= max_batches:
            return
        yield item


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
) -> dict[str, float]:
    """One pass of ``loss_fn(model, images, labels)`` minimisation over ``dataloader`` (all prepared).

    Args:
        accelerator: The recipe's accelerator (backward, cross-process statistics).
        model, dataloader, optimizer, scheduler: Prepared by ``accelerator``.
        loss_fn: Loss of one batch, e.g. cross-entropy or :func:`robustvit.nullspace.nullspace_finetuning_loss`.
        max_batches: Stop after this many batches per process (smoke tests); ``None`` for the whole epoch.
        max_grad_norm: Clip the gradients' total l2 norm to this (``accelerator.clip_grad_norm_``); ``None``: no
            clipping.
        description: Progress bar label.

    Returns:
        ``{"loss": mean loss over all processes' images, "images": their number, "seconds": wall time}``.

    Example:
        >>> ce = lambda model, images, labels: F.cross_entropy(model(images), labels)
        >>> schedule = cosine_schedule(optimizer, total_steps=2)
        >>> model, optimizer, loader, schedule = accelerator.prepare(model, optimizer, loader, schedule)
        >>> stats = train_epoch(accelerator, model, loader, optimizer, ce, scheduler=schedule, max_batches=2)
        >>> stats["images"], stats["loss"] > 0
        (64, True)
    """
    start = time.perf_counter()
    model.train()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for images, labels in progress_bar(_limited(dataloader, max_batches), accelerator, desc=description, leave=False):
        loss = loss_fn(model, images, labels)
        optimizer.zero_grad()
        accelerator.backward(loss)
        if max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        totals += torch.stack([loss.detach().double() * labels.shape[0], torch.tensor(labels.shape[0]).to(totals)])
    totals = accelerator.reduce(totals, reduction="sum")
    if totals[1] == 0:
        raise ValueError("the training dataloader yielded no batches")
    return {"loss": float(totals[0] / totals[1]), "images": int(totals[1]), "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------------- checkpoints


class SamplerGenerator:
    """Checkpoints the generator that shuffles a DataLoader's sampler, once there is one.

    With several processes Accelerate gives the sampler its own generator (seeded at ``prepare``, broadcast from rank
    0 at every epoch), which its ``random_states`` files do not hold; with one process the sampler draws from the
    global RNG, which they do, and there is nothing to add.
    """

    def __init__(self, sampler: torch.utils.data.Sampler) -> None:
        self.sampler = sampler

    def state_dict(self) -> dict[str, torch.Tensor]:
        generator = getattr(self.sampler, "generator", None)
        return {} if generator is None else {"rng_state": generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.sampler.generator.set_state(state["rng_state"])


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, epoch: int, state: dict[str, Any]) -> Path:
    """Save everything ``accelerator`` prepared to ``<output_dir>/checkpoints/epoch_<epoch>``, plus ``state``.

    ``state`` (JSON-ready: history, metrics...) goes to ``training_state.json`` with the epoch counter, written by
    the main process after every process finished ``save_state``, so its presence marks a complete checkpoint.
    Explicit epoch names are used instead of Accelerate's ``automatic_checkpoint_naming``, whose counter is not
    restored by ``load_state`` (the next save then collides with an existing checkpoint).

    Example:
        >>> model, optimizer = accelerator.prepare(model, optimizer)
        >>> epoch, history = 3, [{"epoch": 3, "loss": 0.31}]
        >>> save_checkpoint(accelerator, "outputs/run", epoch, {"history": history})
        PosixPath('outputs/run/checkpoints/epoch_3')
    """
    path = Path(output_dir) / CHECKPOINTS_DIR / f"epoch_{epoch}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / TRAINING_STATE_FILE).write_text(json.dumps({**state, "epoch": epoch}, indent=2))
    accelerator.wait_for_everyone()
    return path


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint of the highest epoch under ``<output_dir>/checkpoints``, or ``None``."""
    complete = [
        path
        for path in (Path(output_dir) / CHECKPOINTS_DIR).glob("epoch_*")
        if path.name.removeprefix("epoch_").isdigit() and (path / TRAINING_STATE_FILE).is_file()
    ]
    return max(complete, key=lambda path: int(path.name.removeprefix("epoch_")), default=None)


def resume_from_checkpoint(accelerator: Accelerator, output_dir: str | Path) -> dict[str, Any]:
    """Load the latest checkpoint into everything ``accelerator`` prepared; return its saved ``state``.

    Prepare the same objects in the same order as the run that saved it. Training continues at
    ``state["epoch"] + 1``; the random states of every process are restored too.

    Raises:
        FileNotFoundError: ``output_dir`` holds no complete checkpoint.

    Example:
        >>> model, optimizer = accelerator.prepare(model, optimizer)
        >>> _ = save_checkpoint(accelerator, "outputs/run", 3, {"history": []})
        >>> state = resume_from_checkpoint(accelerator, "outputs/run")
        >>> start_epoch = state["epoch"] + 1
        >>> start_epoch
        4
    """
    path = latest_checkpoint(output_dir)
    if path is None:
        raise FileNotFoundError(
            f"no complete checkpoint under {Path(output_dir) / CHECKPOINTS_DIR} to resume from; run without --resume"
        )
    accelerator.load_state(str(path))
    return json.loads((path / TRAINING_STATE_FILE).read_text())


def finish(accelerator: Accelerator) -> None:
    """Wait for every process, then tear the process group down (gloo runs often crash at exit otherwise)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
