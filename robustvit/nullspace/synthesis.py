"""Synthesize a universal noise in the eps-approximate nullspace of a ViT's encoder (Liu et al., CPAL 2025).

The noise ``v`` (shape ``(1, N, D)``) is added to the patch tokens of every image. It starts large,
``U(-init_limit, init_limit)``, and AdamW shrinks it along the directions the model is sensitive to, minimising the
mean squared logit difference between noisy and clean outputs. It stops as soon as the mean squared
softmax-probability difference is below ``eps``: the noise then sits near the boundary of the eps-approximate
nullspace ``{v : E |softmax(f(u + v)) - softmax(f(u))|^2 < eps}``, as large as that set allows along the way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast, extract_model_from_parallel
from torch import Tensor, nn
from tqdm.auto import tqdm

from robustvit._utils import eval_mode, model_logits
from robustvit.nullspace._model import supported_model
from robustvit.nullspace.noise import NullspaceNoise
from robustvit.nullspace.token_noise import token_noise

__all__ = ["synthesize_noise"]


def _images(batch: object) -> Tensor:
    """The images of a batch: the batch itself, or the first element of an ``(images, labels, ...)`` sequence."""
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(
            "expected batches of images (B, C, H, W) or (images, labels) pairs, got "
            f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}"
        )
    return images


def _batches(dataloader: Iterable, per_round: int, rounds: int) -> Iterator[Tensor]:
    for _ in range(rounds):
        for index, batch in enumerate(dataloader):
            if index >= per_round:
                break
            yield _images(batch)


class _Outputs:
    """Clean and noisy logits of one batch, and the statistics the paper reads from them."""

    def __init__(self, clean: Tensor, noisy: Tensor) -> None:
        self.clean, self.noisy = clean.float(), noisy.float()

    def loss(self) -> Tensor:
        """Mean over images of the squared l2 distance between logits (what the noise minimises)."""
        return (self.noisy - self.clean).pow(2).sum(-1).mean()

    def stats(self) -> Tensor:
        """``[prob_mse, top1_agreement]`` (detached)."""
        prob_mse = (F.softmax(self.noisy, -1) - F.softmax(self.clean, -1)).pow(2).sum(-1).mean()
        agreement = (self.noisy.argmax(-1) == self.clean.argmax(-1)).float().mean()
        return torch.stack([prob_mse, agreement]).detach()


def synthesize_noise(
    model: nn.Module,
    dataloader: Iterable,
    *,
    eps: float = 0.03,
    init_limit: float = 3.0,
    lr: float = 0.1,
    rounds: int = 3,
    max_batches: int | None = None,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    generator: torch.Generator | None = None,
) -> NullspaceNoise:
    """Find a large universal token noise that barely changes ``model``'s predictions.

    The paper's procedure (defaults: its final hyper-parameters): the noise starts at
    ``U(-init_limit, init_limit)``; AdamW (``lr``, torch's default weight decay 0.01) with a cosine schedule over
    the planned ``rounds * batches`` steps minimises the mean squared logit difference; before each step the mean
    squared probability difference is measured on the batch, and the search stops as soon as it is below
    ``eps``. The model runs in eval mode (its modes are restored) and only the noise receives gradients: the
    model's parameters and their ``.grad`` are left untouched.

    With an ``accelerator``, rank 0's initial noise is broadcast and the gradient and the stopping statistics
    are averaged over processes, so every rank ends with the same noise. Pass a dataloader prepared by the
    accelerator, so that every rank sees as many batches.

    Args:
        model: timm or transformers ViT/DeiT (converted or not), possibly in a pixel wrapper such as
            :class:`robustvit.training.PixelModel` or prepared by Accelerate; it is fed the batches' images.
        dataloader: Yields images ``(B, C, H, W)`` or ``(images, labels)`` pairs.
        eps: Tolerance on the mean squared softmax-probability difference (the paper: 0.03).
        init_limit: Half-width of the uniform initialisation.
        lr: AdamW learning rate of the noise.
        rounds: Passes over (at most ``max_batches`` of) the dataloader.
        max_batches: Batches per round; ``None`` for the whole dataloader (the paper uses 10% of it).
        accelerator: Averages over processes when given.
        progress: Show a progress bar (on the local main process only).
        generator: Random source of the initial noise.

    Returns:
        The noise ``(1, N, D)`` (detached, on the model's device) with its statistics.

    Raises:
        ValueError: Invalid hyper-parameters, or a dataloader without batches.
        UnsupportedModuleError: ``model`` has no supported patch embedding.

    Example:
        >>> result = synthesize_noise(model, loader, eps=0.03, max_batches=10)
        >>> result.reached_eps, result.l2_norm
        (True, 412.3)
        >>> with token_noise(model, result.noise):
        ...     noisy_logits = model(images)
    """
    for name, value in (("eps", eps), ("init_limit", init_limit), ("lr", lr)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    for name, value in (("rounds", rounds), ("max_batches", max_batches)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    inner, family = supported_model(model)
    net = extract_model_from_parallel(model)  # DDP syncs parameter gradients; only the noise gets any here
    device = family.patch_projection(inner).weight.device
    try:
        per_round = len(dataloader) if max_batches is None else min(max_batches, len(dataloader))
    except TypeError:  # an unsized iterable: only max_batches can plan the schedule
        if max_batches is None:
            raise ValueError("pass max_batches for a dataloader without a length") from None
        per_round = max_batches
    if per_round == 0:
        raise ValueError("the dataloader is empty: noise synthesis needs at least one batch")
    distributed = accelerator is not None and accelerator.num_processes > 1

    def mean_over_processes(tensor: Tensor) -> Tensor:
        return accelerator.reduce(tensor, reduction="mean") if distributed else tensor

    def outputs(images: Tensor) -> _Outputs:
        with torch.no_grad():
            clean = model_logits(net, images)
        with token_noise(inner, noise):
            return _Outputs(clean, model_logits(net, images))

    batches = _batches(dataloader, per_round, rounds)
    images = next(batches, None)
    if images is None:
        raise ValueError("the dataloader is empty: noise synthesis needs at least one batch")
    planned = rounds * per_round
    bar = tqdm(total=planned, desc="nullspace noise", disable=not progress or not _local_main(accelerator))
    with eval_mode(net), bar:
        images = images.to(device)
        noise = _initial_noise(family.patch_embedding(inner), net, images, init_limit, generator)
        noise = (broadcast(noise, from_process=0) if distributed else noise).requires_grad_(True)
        optimizer = torch.optim.AdamW([noise], lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=planned)
        steps, reached = 0, False
        while True:
            out = outputs(images)
            stats = mean_over_processes(out.stats())
            bar.set_postfix(prob_mse=f"{float(stats[0]):.4f}", norm=f"{float(noise.detach().norm()):.1f}")
            if float(stats[0]) < eps:
                reached = True
                break
            (grad,) = torch.autograd.grad(out.loss(), noise)
            noise.grad = mean_over_processes(grad)
            optimizer.step()
            schedule.step()
            steps += 1
            bar.update()
            following = next(batches, None)
            if following is None:
                # Out of batches: the statistics must describe the returned noise, so measure it once more.
                with torch.no_grad():
                    stats = mean_over_processes(outputs(images).stats())
                reached = float(stats[0]) < eps
                break
            images = following.to(device)
    noise = noise.detach()
    return NullspaceNoise(
        noise=noise,
        l2_norm=float(noise.norm()),
        prob_mse=float(stats[0]),
        top1_agreement=float(stats[1]),
        steps=steps,
        reached_eps=reached,
        eps=float(eps),
    )


def _local_main(accelerator: Accelerator | None) -> bool:
    return accelerator is None or accelerator.is_local_main_process


def _initial_noise(
    embedding: nn.Module, net: nn.Module, images: Tensor, init_limit: float, generator: torch.Generator | None
) -> Tensor:
    """``U(-init_limit, init_limit)`` shaped like one image's patch tokens ``(1, N, D)``."""
    shapes: list[torch.Size] = []
    handle = embedding.register_forward_hook(lambda module, args, tokens: shapes.append(tokens.shape))
    try:
        with torch.no_grad():
            net(images[:1])
    finally:
        handle.remove()
    draw_device = generator.device if generator is not None else images.device
    uniform = torch.rand((1, *shapes[0][1:]), generator=generator, device=draw_device)
    return ((uniform * 2 - 1) * init_limit).to(device=images.device, dtype=images.dtype)
