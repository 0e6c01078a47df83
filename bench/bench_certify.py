"""Certification throughput: Lipschitz certificates vs randomized smoothing, and the cost of margin training.

Run: ``python bench/bench_certify.py [--repeats 5] [--threads 1]``. One converted model, the embedded default ViT of
``robustvit.training.DEFAULT_MODEL`` (32-pixel digits, minmax activation, CenterNorms calibrated on training
images, then ``--train_steps`` EMMA steps so that the numbers describe a model that certifies something):

* ``robustvit.certify`` (float64 copy, verified bounds, pairwise head radii) on ``--lipschitz_images`` images, vs
  ``certify_smoothing`` (Cohen et al.: ``n0=100`` selection + ``n=1000`` estimation samples per image, sigma 0.25)
  on ``--smoothing_images`` images; both reported in images per second.
* One AdamW training step (forward, backward, step) with the EMMA loss, including ``head_margins`` (the bound of the
  features and the head's pairwise distances, differentiable), vs plain cross-entropy; batch ``--batch_size``.

Methods run side by side in one process, interleaved repetition by repetition (after one warm-up round), so machine
noise hits all alike; the table reports medians and ratios. Writes ``bench/results/certify.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import robustvit
from robustvit.certification import certify_smoothing
from robustvit.data import load_image_dataset, stack_examples
from robustvit.losses import LOSSES, head_margins
from robustvit.training import DEFAULT_MODEL, load_model

IMAGE_SIZE = 32
SIGMA = 0.25
N0, N = 100, 1000


def build(train_steps: int, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, dict]:
    """The converted default model, briefly trained with EMMA, and the digits test images."""
    torch.manual_seed(seed)
    train_x, train_y = stack_examples(load_image_dataset(split="train", image_size=IMAGE_SIZE))
    test_x, test_y = stack_examples(load_image_dataset(split="test", image_size=IMAGE_SIZE))
    source, description = load_model(None, num_classes=10, image_size=IMAGE_SIZE, channels=3)
    model = robustvit.convert(source, calibration_images=train_x[:64], activation="minmax")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(train_steps):
        index = torch.randint(0, len(train_x), (64,), generator=generator)
        eps = 36 / 255 * min(1.0, (step + 1) / max(1, train_steps // 2))
        loss = LOSSES["emma"](model(train_x[index]), train_y[index], eps=eps, margins=head_margins(model))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    info = {
        "model": description,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_steps": train_steps,
        "train_seconds": time.perf_counter() - start,
    }
    return model.eval(), test_x, test_y, info


def interleaved(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each method: one warm-up round, then ``repeats`` rounds, methods alternating."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(repeats + 1):
        for name, run in methods.items():
            start = time.perf_counter()
            run()
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def bench_certification(model, images, labels, args) -> dict:
    lip_x, lip_y = images[: args.lipschitz_images], labels[: args.lipschitz_images]
    smooth_x, smooth_y = images[: args.smoothing_images], labels[: args.smoothing_images]
    results: dict[str, object] = {}

    def lipschitz() -> None:
        results["lipschitz"] = robustvit.certify(model, lip_x, lip_y)

    def smoothing() -> None:
        results["smoothing"] = certify_smoothing(
            model, smooth_x, SIGMA, n0=N0, n=N, alpha=0.001, batch_size=N,
            generator=torch.Generator().manual_seed(0), progress=False,
        )  # fmt: skip

    times = interleaved({"lipschitz": lipschitz, "smoothing": smoothing}, args.repeats)
    lip_s, smooth_s = statistics.median(times["lipschitz"]), statistics.median(times["smoothing"])
    lip_rate, smooth_rate = len(lip_x) / lip_s, len(smooth_x) / smooth_s
    lip, smooth = results["lipschitz"], results["smoothing"]
    return {
        "lipschitz": {
            "images": len(lip_x),
            "median_s": lip_s,
            "images_per_s": lip_rate,
            "times_s": times["lipschitz"],
            "clean_accuracy": lip.clean_accuracy,
            "certified_accuracy_36": lip.certified_accuracy(36 / 255),
            "certified_accuracy_72": lip.certified_accuracy(72 / 255),
            "median_radius": float(lip.radii.median()),
        },
        "smoothing": {
            "images": len(smooth_x),
            "sigma": SIGMA,
            "n0": N0,
            "n": N,
            "median_s": smooth_s,
            "images_per_s": smooth_rate,
            "times_s": times["smoothing"],
            "abstained": int((smooth.predictions == -1).sum()),
            "certified_accuracy_36": smooth.certified_accuracy(36 / 255, smooth_y),
            "certified_accuracy_72": smooth.certified_accuracy(72 / 255, smooth_y),
            "median_radius": float(smooth.radii.median()),
            "lipschitz_certified_accuracy_36_same_images": float(
                lip.certified(36 / 255)[: len(smooth_x)].double().mean()
            ),
        },
        "speedup_lipschitz_vs_smoothing": lip_rate / smooth_rate,
    }


def bench_training(model, images, labels, args) -> dict:
    model = model.train()
    x, y = images[: args.batch_size], labels[: args.batch_size]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)  # tiny steps: the model barely moves between reps

    def step(loss_of: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            loss = loss_of(model(x))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return run

    def head_margins_only() -> None:
        head_margins(model).pairwise.sum().backward()
        optimizer.zero_grad()

    methods = {
        "cross-entropy": step(lambda logits: F.cross_entropy(logits, y)),
        "emma (with head_margins)": step(
            lambda logits: LOSSES["emma"](logits, y, eps=36 / 255, margins=head_margins(model))
        ),
        "margin CE (with head_margins)": step(
            lambda logits: LOSSES["margin"](logits, y, eps=36 / 255, margins=head_margins(model))
        ),
        "head_margins alone (forward + backward)": head_margins_only,
    }
    times = interleaved(methods, args.repeats * 4)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["cross-entropy"]
    model.eval()
    return {
        "batch_size": len(x),
        "steps": {
            name: {"median_s": medians[name], "ratio_vs_ce": medians[name] / base, "times_s": times[name]}
            for name in methods
        },
    }


MARGIN_LOSSES = {"emma (with head_margins)": "EMMA", "margin CE (with head_margins)": "margin CE"}
"""The margin-loss training steps of certify.json that docs/performance.md shows, by their name there."""


def performance_rows(report: dict) -> list[str]:
    """The rows of docs/performance.md's table that certify.json holds (bench/tables.py renders the table)."""
    certification, training = report["certification"], report["training"]
    lip, smooth = certification["lipschitz"], certification["smoothing"]
    steps = {"CE": training["steps"]["cross-entropy"]} | {
        label: training["steps"][name] for name, label in MARGIN_LOSSES.items()
    }
    times = "; ".join(f"{label} {1e3 * step['median_s']:.0f} ms" for label, step in steps.items())
    ratios = " / ".join(f"{steps[label]['ratio_vs_ce']:.2f}x" for label in MARGIN_LOSSES.values())
    return [
        f"| Certification throughput, same converted model | Lipschitz `certify` {lip['images_per_s']:.0f} img/s; "
        f"randomized smoothing (n0={smooth['n0']}, n={smooth['n']}) {smooth['images_per_s']:.1f} img/s | "
        f"**{certification['speedup_lipschitz_vs_smoothing']:.0f}x** |",
        f"| Margin training step vs cross-entropy (batch {training['batch_size']}, `head_margins` included) | "
        f"{times} | {ratios} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    parser.add_argument("--train_steps", type=int, default=150, help="EMMA steps before measuring")
    parser.add_argument("--lipschitz_images", type=int, default=360, help="the whole digits test split")
    parser.add_argument("--smoothing_images", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, images, labels, info = build(args.train_steps)
    certification = bench_certification(model, images, labels, args)
    training = bench_training(model, images, labels, args)

    lip, smooth = certification["lipschitz"], certification["smoothing"]
    print(
        f"default ViT ({info['parameters']} parameters, {IMAGE_SIZE}px, {info['train_steps']} EMMA steps), "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}"
        "\n"
    )
    print("| certificate | images | median time (s) | images/s | certified acc. 36/255 | 72/255 | median radius |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| Lipschitz (`robustvit.certify`, float64) | {lip['images']} | {lip['median_s']:.3f} | "
        f"{lip['images_per_s']:.1f} | {lip['certified_accuracy_36']:.1%} | {lip['certified_accuracy_72']:.1%} | "
        f"{lip['median_radius']:.3f} |"
    )
    print(
        f"| randomized smoothing (sigma {SIGMA}, n0={N0}, n={N}) | {smooth['images']} | {smooth['median_s']:.3f} | "
        f"{smooth['images_per_s']:.2f} | {smooth['certified_accuracy_36']:.1%} | "
        f"{smooth['certified_accuracy_72']:.1%} | {smooth['median_radius']:.3f} |"
    )
    print(f"\nLipschitz certificates are {certification['speedup_lipschitz_vs_smoothing']:.0f}x faster per image.\n")
    print(f"| training step (batch {training['batch_size']}) | median time (s) | vs cross-entropy |")
    print("|---|---|---|")
    for name, row in training["steps"].items():
        print(f"| {name} | {row['median_s']:.4f} | {row['ratio_vs_ce']:.2f}x |")
    out = Path(__file__).parent / "results" / "certify.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "setup": {
                    **info,
                    "default_model": DEFAULT_MODEL,
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "repeats": args.repeats,
                },
                "certification": certification,
                "training": training,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
