"""Cost of nullspace finetuning: noise synthesis vs one finetuning epoch, and a nullspace step vs a plain CE step.

Run: ``python bench/bench_nullspace.py [--repeats 5] [--pretrain_epochs 5]``. Uses the recipe's embedded default
(robustvit.training.DEFAULT_MODEL on 32-pixel digits, batch 64) and its synthesis settings (6 rounds over the
training batches, eps 0.03). The model is first trained briefly, since how fast the noise reaches eps depends on
the model. The three measurements run side by side in one process, interleaved repetition by repetition (in a
rotating order), so machine noise hits them alike; the table reports medians and ratios. Synthesis runs against a
frozen copy of the model and the two kinds of step train their own copies, so every repetition does the same work.

Writes ``bench/results/nullspace.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from robustvit.data import load_image_dataset
from robustvit.nullspace import NullspaceNoise, nullspace_finetuning_loss, synthesize_noise
from robustvit.training import PixelModel, load_model

RESULTS = Path(__file__).parent / "results" / "nullspace.json"


def train(model: torch.nn.Module, loader: DataLoader, epochs: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()


def step_timer(model: torch.nn.Module, loss_fn: Callable, batch: tuple[torch.Tensor, torch.Tensor]) -> Callable:
    """A function timing ``steps`` AdamW steps of ``loss_fn`` on one fixed batch (seconds per step)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    images, labels = batch

    def run(steps: int) -> float:
        model.train()
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad()
            loss_fn(model, images, labels).backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps

    return run


def performance_rows(report: dict) -> list[str]:
    """The rows of docs/performance.md's table that nullspace.json holds (bench/tables.py renders the table)."""
    median, epoch = report["median_seconds"], report["epoch_seconds_estimate"]
    runs = [NullspaceNoise.read_stats(run) for run in report["synthesis_runs"]]  # files before: reached_eps
    steps = statistics.median(run["steps"] for run in runs)
    reached = f"{sum(run['reached_tolerance'] for run in runs)} of {len(runs)} runs reached the tolerance"
    return [
        f"| Nullspace finetuning step vs plain finetuning step | {1e3 * median['nullspace_step']:.1f} ms vs "
        f"{1e3 * median['plain_step']:.1f} ms (clean + noisy batch) | "
        f"{report['step_ratio_nullspace_over_plain']:.2f}x |",
        f"| Noise synthesis vs one nullspace finetuning epoch (digits, {report['batches_per_epoch']} batches) | "
        f"{median['synthesis']:.2f} s ({steps:.0f} AdamW steps, {reached}, near-constant noise lr) vs "
        f"{epoch['nullspace']:.2f} s | {report['synthesis_fraction_of_nullspace_epoch']:.2f}x (an ImageNet epoch "
        "dwarfs it) |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="training steps timed per repetition and kind")
    parser.add_argument("--pretrain_epochs", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)

    train_set = load_image_dataset(split="train", image_size=32)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    model, description = load_model(None, num_classes=train_set.num_classes, image_size=32, channels=3)
    net = PixelModel(model)
    train(net, loader, args.pretrain_epochs)
    frozen = copy.deepcopy(net).eval()
    ordered = DataLoader(train_set, batch_size=args.batch_size)  # unshuffled: every synthesis sees the same batches
    batch = next(iter(loader))
    noise = synthesize_noise(frozen, ordered, rounds=6, progress=False, generator=torch.Generator().manual_seed(0))

    def ce(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(images), labels)

    def nullspace(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nullspace_finetuning_loss(model, images, labels, noise.noise)

    synthesis_runs: list[dict] = []

    def synthesize() -> float:
        start = time.perf_counter()
        result = synthesize_noise(frozen, ordered, rounds=6, progress=False, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        reached = result.reached_tolerance
        synthesis_runs.append({"seconds": seconds, "steps": result.steps, "reached_tolerance": reached})
        return seconds

    plain_step = step_timer(copy.deepcopy(net), ce, batch)
    nullspace_step = step_timer(copy.deepcopy(net), nullspace, batch)
    plain_step(2)  # warm-up
    nullspace_step(2)
    measurements: dict[str, Callable[[], float]] = {
        "plain_step": lambda: plain_step(args.steps),
        "nullspace_step": lambda: nullspace_step(args.steps),
        "synthesis": synthesize,
    }
    times: dict[str, list[float]] = {name: [] for name in measurements}
    names = list(measurements)
    for repeat in range(args.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:  # rotate the order
            times[name].append(measurements[name]())

    median = {name: statistics.median(values) for name, values in times.items()}
    batches = len(loader)
    epoch = {"plain": median["plain_step"] * batches, "nullspace": median["nullspace_step"] * batches}
    result = {
        "model": description,
        "batch_size": args.batch_size,
        "batches_per_epoch": batches,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "pretrain_epochs": args.pretrain_epochs,
        "median_seconds": median,
        "samples_seconds": times,
        "synthesis_runs": synthesis_runs,
        "epoch_seconds_estimate": epoch,
        "step_ratio_nullspace_over_plain": median["nullspace_step"] / median["plain_step"],
        "synthesis_fraction_of_nullspace_epoch": median["synthesis"] / epoch["nullspace"],
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))

    steps = statistics.median(run["steps"] for run in synthesis_runs)
    print(f"default model on digits, batch {args.batch_size}, {batches} batches/epoch, {args.repeats} repeats")
    print("| measurement | median | ratio |")
    print("|---|---:|---:|")
    print(f"| plain CE step | {1000 * median['plain_step']:.1f} ms | 1.00 |")
    print(
        f"| nullspace step (CE clean + CE noisy) | {1000 * median['nullspace_step']:.1f} ms | "
        f"{result['step_ratio_nullspace_over_plain']:.2f} x plain step |"
    )
    print(f"| finetuning epoch, nullspace (estimate) | {epoch['nullspace']:.2f} s | |")
    print(
        f"| noise synthesis ({steps:.0f} steps to eps, max {6 * batches}) | {median['synthesis']:.2f} s | "
        f"{result['synthesis_fraction_of_nullspace_epoch']:.2f} x nullspace epoch |"
    )
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
