"""Synthesize a universal noise in the approximate nullspace of a ViT's encoder (Liu et al., CPAL 2025).

The noise ``v`` (shape ``(1, N, D)``) is added to the patch tokens of every image. It starts large,
``U(-init_limit, init_limit)``, and AdamW shrinks it along the directions the model is sensitive to, minimising the
mean squared logit difference between noisy and clean outputs. It stops as soon as the mean squared
softmax-probability difference is below ``tolerance`` (the paper's epsilon, a probability, not a radius): the noise
then sits near the boundary of the approximate nullspace ``{v : E |softmax(f(u + v)) - softmax(f(u))|^2 <
tolerance}``, as large as that set allows along the way. The paper's control (``kind="random"``) starts from Gaussian
noise and only shrinks it, x0.8 per step, until it is within the tolerance: as close to the set's boundary, in a
random direction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast, extract_model_from_parallel
from torch import Tensor, nn
from tqdm.auto import tqdm

from robustvit._utils import eval_mode, model_logits
from robustvit.configs import NoiseSynthesisConfig
from robustvit.nullspace._model import supported_model
from robustvit.nullspace.noise import NullspaceNoise
from robustvit.nullspace.token_noise import token_noise
from robustvit.settings import resolve_config

__all__ = ["NOISE_KINDS", "PAPER_SCHEDULE_FACTOR", "RANDOM_SHRINK", "synthesize_noise"]


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
    config: NoiseSynthesisConfig | None = None,
    *,
    init: Tensor | None = None,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    generator: torch.Generator | None = None,
    **overrides: Any,
) -> NullspaceNoise:
    """Find a large universal token noise that barely changes ``model``'s predictions.

    The settings are a :class:`~robustvit.configs.NoiseSynthesisConfig` (``config``, default: the paper's final
    hyper-parameters) with ``overrides``, any of its fields by name (``tolerance=0.01``, ``kind="random"``...).
    ``kind="nullspace"`` is the paper's procedure: the noise starts at ``U(-init_limit, init_limit)``; AdamW
    (``lr``, torch's default weight decay 0.01) with a cosine schedule minimises the mean squared logit difference;
    before each step the mean squared probability difference is measured on the batch, and the search stops as soon
    as it is below ``tolerance``. The paper's cosine spans the whole loader times the rounds while only 10 % of the
    batches are used, so its rate stays within 2.5 % of ``lr`` over the steps taken; by default the cosine period
    here is likewise ten times the planned steps (``schedule_steps`` overrides it). ``kind="random"`` is the paper's
    control: Gaussian noise ``N(0, 1)`` shrunk by x0.8 per step until within ``tolerance`` (no gradient, no ``lr``).

    The model runs in eval mode (its modes are restored) and only the noise receives gradients: the model's
    parameters and their ``.grad`` are left untouched. With an ``accelerator``, rank 0's initial noise is
    broadcast and the gradient and the stopping statistics are averaged over processes, so every rank ends with
    the same noise. Pass a dataloader prepared by the accelerator, so that every rank sees as many batches.

    Args:
        model: timm or transformers ViT/DeiT (converted or not), possibly in a pixel wrapper such as
            :class:`robustvit.training.PixelModel` or prepared by Accelerate; it is fed the batches' images.
        dataloader: Yields images ``(B, C, H, W)`` or ``(images, labels)`` pairs.
        config: The settings (``tolerance``: the paper's epsilon, a probability tolerance, not a radius; ``kind``,
            ``init_limit``, ``lr``, ``rounds``, ``max_batches``, ``schedule_steps``): see
            :class:`~robustvit.configs.NoiseSynthesisConfig`.
        init: Start from this noise ``(1, N, D)`` instead of a random draw, e.g. to continue a search that did
            not reach the tolerance (the optimiser state starts afresh).
        accelerator: Averages over processes when given.
        progress: Show a progress bar (on the local main process only).
        generator: Random source of the initial noise.
        **overrides: Fields of the config to change.

    Returns:
        The noise ``(1, N, D)`` (detached, on the model's device) with its statistics; ``reached_tolerance``
        says whether it ended inside the approximate nullspace (``prob_mse < tolerance``).

    Raises:
        TypeError: An override that is not a field of the config.
        ValueError: Invalid settings, or a dataloader without batches.
        UnsupportedModuleError: ``model`` has no supported patch embedding.

    Example:
        >>> result = synthesize_noise(model, loader, tolerance=0.03, max_batches=2, progress=False)
        >>> result.reached_tolerance, result.noise.shape  # one row per patch token (4 x 4 patches)
        (True, torch.Size([1, 16, 48]))
        >>> control = synthesize_noise(model, loader, NoiseSynthesisConfig(kind="random"))
        >>> with token_noise(model, result.noise):
        ...     noisy_logits = model(images)
    """
    config = resolve_config(NoiseSynthesisConfig, config, overrides)
    kind, tolerance, rounds, max_batches = config.kind, config.tolerance, config.rounds, config.max_batches
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
    search = NOISE_KINDS[kind](
        init_limit=config.init_limit,
        lr=config.lr,
        schedule_steps=config.schedule_steps or PAPER_SCHEDULE_FACTOR * planned,
    )
    bar = tqdm(total=planned, desc=f"{kind} noise", disable=not progress or not _local_main(accelerator))
    with eval_mode(net), bar:
        images = images.to(device)
        if init is None:
            noise = search.initial(_token_shape(family.patch_embedding(inner), net, images), images, generator)
        else:
            noise = init.detach().clone().to(device=images.device, dtype=images.dtype)
        noise = (broadcast(noise, from_process=0) if distributed else noise).requires_grad_(search.needs_gradient)
        search.start(noise)
        steps, reached = 0, False
        first_lr = last_lr = search.lr
        while True:
            out = outputs(images)
            stats = mean_over_processes(out.stats())
            bar.set_postfix(prob_mse=f"{float(stats[0]):.4f}", norm=f"{float(noise.detach().norm()):.1f}")
            if float(stats[0]) < tolerance:
                reached = True
                break
            grad = None
            if search.needs_gradient:
                (grad,) = torch.autograd.grad(out.loss(), noise)
                grad = mean_over_processes(grad)
            last_lr = search.lr
            noise = search.step(noise, grad)
            steps += 1
            bar.update()
            following = next(batches, None)
            if following is None:
                # Out of batches: the statistics must describe the returned noise, so measure it once more.
                with torch.no_grad():
                    stats = mean_over_processes(outputs(images).stats())
                reached = float(stats[0]) < tolerance
                break
            images = following.to(device)
    noise = noise.detach()
    return NullspaceNoise(
        noise=noise,
        l2_norm=float(noise.norm()),
        prob_mse=float(stats[0]),
        top1_agreement=float(stats[1]),
        steps=steps,
        reached_tolerance=reached,
        tolerance=float(tolerance),
        kind=kind,
        lr_range=[first_lr, last_lr] if first_lr is not None else None,
    )


class _AdamWSearch:
    """The paper's search: ``U(-init_limit, init_limit)``, AdamW on the squared logit distance, cosine on ``lr``."""

    needs_gradient = True

    def __init__(self, *, init_limit: float, lr: float, schedule_steps: int) -> None:
        self.init_limit, self.base_lr, self.schedule_steps = init_limit, lr, schedule_steps

    def initial(self, shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
        uniform = torch.rand(shape, generator=generator, device=_draw_device(generator, like))
        return ((uniform * 2 - 1) * self.init_limit).to(device=like.device, dtype=like.dtype)

    def start(self, noise: Tensor) -> None:
        self.optimizer = torch.optim.AdamW([noise], lr=self.base_lr)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=self.schedule_steps)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self, noise: Tensor, grad: Tensor) -> Tensor:
        noise.grad = grad
        self.optimizer.step()
        self.schedule.step()
        return noise


class _ShrinkSearch:
    """The paper's random control: ``N(0, 1)``, multiplied by :data:`RANDOM_SHRINK` per step."""

    needs_gradient = False
    lr = None

    def __init__(self, **_: object) -> None:
        pass

    def initial(self, shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
        gaussian = torch.randn(shape, generator=generator, device=_draw_device(generator, like))
        return gaussian.to(device=like.device, dtype=like.dtype)

    def start(self, noise: Tensor) -> None:
        pass

    def step(self, noise: Tensor, grad: None) -> Tensor:
        return noise * RANDOM_SHRINK


PAPER_SCHEDULE_FACTOR = 10
"""The paper's noise cosine spans all batches x rounds but uses 10 % of them: its period is 10x the steps used."""
RANDOM_SHRINK = 0.8
"""Per-step factor of the paper's random-noise control."""
NOISE_KINDS: dict[str, type] = {"nullspace": _AdamWSearch, "random": _ShrinkSearch}
"""How each kind of noise is searched: ``"nullspace"`` (the method) and ``"random"`` (the paper's control)."""


def _local_main(accelerator: Accelerator | None) -> bool:
    return accelerator is None or accelerator.is_local_main_process


def _token_shape(embedding: nn.Module, net: nn.Module, images: Tensor) -> torch.Size:
    """The shape ``(1, N, D)`` of one image's patch tokens."""
    shapes: list[torch.Size] = []
    handle = embedding.register_forward_hook(lambda module, args, tokens: shapes.append(tokens.shape))
    try:
        with torch.no_grad():
            net(images[:1])
    finally:
        handle.remove()
    return torch.Size((1, *shapes[0][1:]))


def _draw_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    return generator.device if generator is not None else like.device
