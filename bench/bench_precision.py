"""Certificates of the deployed precision: the worst-case rounding bound E against observed errors, and radii.

Run: ``python bench/bench_precision.py [--images 64] [--train_steps 100]``. The model is the benchmark's converted
default ViT (``bench_certify.build``: 32-pixel digits, minmax, EMMA-trained). For each precision and accumulation
assumption: ``E`` over the whole input cube and the largest per-image ``E`` on the certified balls (what
``certify`` uses), from ``robustvit.certification.rounding.forward_error_bound``, the largest observed
``||F_hat(x) - F(x)||`` on the test images, and ``certify(..., precision=...)``'s mean radius and certified accuracy
at 36/255 next to the exact-function certificate's. Writes ``bench/results/precision.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch
from bench_certify import build  # bench/ is the script's folder, so first on sys.path

import robustvit
from robustvit.certification.rounding import forward_error_bound

CASES = [
    (None, None),
    (torch.float32, None),
    (torch.float16, None),
    (torch.float16, torch.float32),
    (torch.bfloat16, None),
    (torch.bfloat16, torch.float32),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--train_steps", type=int, default=100)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "precision.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, test_x, test_y, info = build(args.train_steps)
    images, labels = test_x[: args.images], test_y[: args.images]
    rows = []
    for precision, accumulation in CASES:
        row = {"precision": str(precision), "accumulation": str(accumulation)}
        if precision is not None:
            deployed = copy.deepcopy(model).to(precision).eval()
            exact = copy.deepcopy(deployed).to(torch.float64)
            row["E"] = forward_error_bound(exact, tuple(images.shape[1:]), precision, accumulation)
            with torch.no_grad():
                row["observed"] = float(
                    (deployed(images.to(precision)).double() - exact(images.double())).norm(dim=1).max()
                )
        result = robustvit.certify(model, images, labels, precision=precision, accumulation=accumulation)
        row["E_on_certified_balls_max"] = result.logit_error  # the per-image bound certify used (largest)
        row["mean_radius"] = float(result.radii.mean())
        row["certified_36"] = result.certified_accuracy(36 / 255)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"args": vars(args), "model": info, "platform": platform.platform(), "torch": torch.__version__, "rows": rows}
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
