"""What the eval-mode pixel check costs: a converted model's inference with the [0, 1] check against the same
forward with it stepped aside (``unchecked_pixels``), interleaved repetition by repetition in one process.

Run: ``python bench/bench_pixel_check.py [--repeats 7]``. Writes ``bench/results/pixel_check.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import timm
import torch

import robustvit
from robustvit._utils import unchecked_pixels

CASES = {
    "ViT-Ti/4 @32, depth 12, batch 64": dict(img_size=32, patch_size=4, depth=12, batch=64),
    "ViT-Ti/16 @224, depth 12, batch 16": dict(img_size=224, patch_size=16, depth=12, batch=16),
}


def _seconds(model: torch.nn.Module, images: torch.Tensor, checked: bool) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        if checked:
            model(images)
        else:
            with unchecked_pixels():
                model(images)
    return time.perf_counter() - start


def performance_rows(report: dict) -> list[str]:
    """The row of docs/performance.md's table that pixel_check.json holds (bench/tables.py renders the table)."""
    cases = "; ".join(
        f"{row['case']}: {1e3 * row['checked_s']:.0f} vs {1e3 * row['unchecked_s']:.0f} ms" for row in report["rows"]
    )
    ratios = " / ".join(f"{row['ratio']:.2f}x" for row in report["rows"])
    return [
        f"| Pixel check in eval forwards: converted ViT-Ti with the [0, 1] check vs without it | {cases} | {ratios} |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "pixel_check.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, case in CASES.items():
        vit = timm.create_model(
            "vit_tiny_patch16_224", img_size=case["img_size"], patch_size=case["patch_size"], depth=case["depth"]
        )
        model = robustvit.convert(vit).eval()
        images = torch.rand(case["batch"], 3, case["img_size"], case["img_size"])
        _seconds(model, images, True), _seconds(model, images, False)  # warm-up
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for checked in (True, False):
                times[checked].append(_seconds(model, images, checked))
        checked, unchecked = statistics.median(times[True]), statistics.median(times[False])
        rows.append({"case": name, "checked_s": checked, "unchecked_s": unchecked, "ratio": checked / unchecked})
        print(f"{name}: checked {checked * 1e3:.1f} ms, unchecked {unchecked * 1e3:.1f} ms, {checked / unchecked:.3f}x")
    result = {"rows": rows, "repeats": args.repeats, "torch": torch.__version__, "machine": platform.processor()}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
