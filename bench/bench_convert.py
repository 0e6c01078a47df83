"""Converted (shift mixer) vs source ViT: inference throughput and train-step time, side by side in one run.

Run: ``python bench/bench_convert.py [--repeats 5]``. Each repetition times the source and the converted model
back to back, so machine noise hits both alike; the table reports medians and the converted/source ratio.
The converted model runs in eval mode with its cached rescaling (inference) and in train mode with the rescaling
in the graph (training). Also reports the logit agreement of source and converted model before finetuning.

Writes ``bench/results/convert.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import robustvit
from robustvit.training import PixelModel

CONFIGS = {
    "ViT-S/16 @224 (depth 12)": dict(model_name="vit_small_patch16_224", batch=16),
    "ViT-Ti/4 @32 (depth 12)": dict(model_name="vit_tiny_patch16_224", batch=64, img_size=32, patch_size=4),
}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, spec: dict, repeats: int) -> dict:
    kwargs = {k: v for k, v in spec.items() if k not in ("model_name", "batch")}
    source = PixelModel(timm.create_model(spec["model_name"], num_classes=100, **kwargs))
    size = source.model.patch_embed.img_size
    x = torch.rand(spec["batch"], 3, *size)
    y = torch.randint(0, 100, (spec["batch"],))
    converted = robustvit.convert(source.model, calibration_images=x)
    models = {"source": source, "converted": converted}

    def infer(model):
        model.eval()
        with torch.no_grad():
            model(x)

    def train_step(model):
        model.train()
        F.cross_entropy(model(x), y).backward()

    times = {f"{kind}_{key}": [] for kind in ("infer", "train") for key in models}
    # Inference and training are timed in separate phases: switching modes refreshes the rescaling cache, which a
    # deployed model never does.
    for kind, step in (("infer", infer), ("train", train_step)):
        for model in models.values():  # warm-up (fills the eval-mode caches)
            step(model)
        for _ in range(repeats):
            for key, model in models.items():
                times[f"{kind}_{key}"].append(timed(lambda m=model, s=step: s(m)))
    med = {k: statistics.median(v) for k, v in times.items()}
    with torch.no_grad():
        source.eval()
        converted.eval()
        a, b = source(x), converted(x)
    return {
        "model": name,
        "batch": spec["batch"],
        "infer_images_per_s": {k: spec["batch"] / med[f"infer_{k}"] for k in models},
        "train_step_s": {k: med[f"train_{k}"] for k in models},
        "infer_speedup": med["infer_source"] / med["infer_converted"],
        "train_ratio": med["train_converted"] / med["train_source"],
        "logit_relative_error": float((a - b).norm() / a.norm()),
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).float().mean()),
    }


def _rate(images_per_s: float) -> str:
    """Two significant digits, whole numbers from 100 up (no exponent)."""
    return f"{images_per_s:.2g}" if images_per_s < 100 else f"{images_per_s:.0f}"


def performance_rows(rows: list[dict]) -> list[str]:
    """The rows of docs/performance.md's table that convert.json holds (bench/tables.py renders the table)."""
    inference = "; ".join(
        f"{r['model']}, batch {r['batch']}: {_rate(r['infer_images_per_s']['source'])} -> "
        f"{_rate(r['infer_images_per_s']['converted'])} img/s"
        for r in rows
    )
    training = "; ".join(
        f"{r['model']}: {r['train_step_s']['source']:.2f} -> {r['train_step_s']['converted']:.2f} s" for r in rows
    )
    speedups = " / ".join(f"{r['infer_speedup']:.2f}x" for r in rows)
    ratios = " / ".join(f"{r['train_ratio']:.2f}x" for r in rows)
    return [
        f"| Converted (shift mixer) vs source, inference | {inference} | **{speedups} faster** |",
        f"| Converted vs source, train step (rescaling included) | {training} | {ratios} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [bench(name, spec, args.repeats) for name, spec in CONFIGS.items()]
    print(f"torch threads: {torch.get_num_threads()}\n")
    print("| model | inference img/s source -> converted | speed-up | train step s source -> converted | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        ips, step = r["infer_images_per_s"], r["train_step_s"]
        print(
            f"| {r['model']}, batch {r['batch']} | {ips['source']:.1f} -> {ips['converted']:.1f} | "
            f"{r['infer_speedup']:.2f}x | {step['source']:.3f} -> {step['converted']:.3f} | {r['train_ratio']:.2f}x |"
        )
    print("\nLogit agreement before finetuning (random init, calibrated):")
    for r in rows:
        print(f"- {r['model']}: relative logit error {r['logit_relative_error']:.2f}, top-1 {r['top1_agreement']:.0%}")
    out = Path(__file__).parent / "results" / "convert.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
