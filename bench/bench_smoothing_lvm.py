"""LVM-RS vs Cohen: certified radii of randomized smoothing on the same model and the same noise samples budget.

Run: ``python bench/bench_smoothing_lvm.py [--images 16] [--n 2000] [--seeds 3]``. The model is the benchmark's
converted default ViT (see ``bench_certify.build``: 32-pixel digits, EMMA-trained for ``--train_steps`` steps). For
each sigma and noise seed, ``certify_smoothing(method="cohen")`` and ``certify_smoothing(method="lvm")`` (the
model's Lipschitz bound, Bonferroni-corrected Bernstein bounds) certify the same test images with the same ``n0``,
``n`` and ``alpha`` and the same generator seed; LVM also runs with ``lipschitz=math.inf`` (smoothing only, no base
bound). Reports mean radius and certified accuracy at 36/255 and 72/255, mean and spread over seeds. Writes
``bench/results/smoothing_lvm.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
from pathlib import Path

import torch
from bench_certify import build  # bench/ is the script's folder, so first on sys.path

from robustvit.certification import certify_smoothing

VARIANTS = {
    "cohen": {"method": "cohen"},
    "lvm": {"method": "lvm"},
    "lvm (no base bound)": {"method": "lvm", "lipschitz": math.inf},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.12, 0.25])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train_steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "smoothing_lvm.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, test_x, test_y, info = build(args.train_steps)
    images, labels = test_x[: args.images], test_y[: args.images]
    rows = []
    for sigma in args.sigmas:
        for name, kwargs in VARIANTS.items():
            per_seed = []
            for seed in range(args.seeds):
                result = certify_smoothing(
                    model, images, sigma, n0=args.n0, n=args.n, alpha=args.alpha, progress=False,
                    generator=torch.Generator().manual_seed(seed), **kwargs,
                )  # fmt: skip
                per_seed.append(
                    {
                        "mean_radius": float(result.radii.mean()),
                        "certified_36": result.certified_accuracy(36 / 255, labels),
                        "certified_72": result.certified_accuracy(72 / 255, labels),
                    }
                )
            row = {"sigma": sigma, "method": name}
            for key in per_seed[0]:
                values = [s[key] for s in per_seed]
                row[key] = {
                    "mean": statistics.mean(values),
                    "stdev": statistics.stdev(values) if len(values) > 1 else 0,
                }
            rows.append(row)
            print(
                f"sigma {sigma:<5} {name:<20} mean radius {row['mean_radius']['mean']:.4f} "
                f"(+- {row['mean_radius']['stdev']:.4f})  cert@36/255 {row['certified_36']['mean']:.3f}  "
                f"cert@72/255 {row['certified_72']['mean']:.3f}",
                flush=True,
            )
    output = {
        "args": vars(args),
        "model": info,
        "lipschitz": float(__import__("robustvit").lipschitz_bound(model)),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.output).write_text(json.dumps(output, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
