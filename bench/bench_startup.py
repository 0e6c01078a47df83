"""Startup time: ``robustvit --help`` vs ``python -c "import torch"``, side by side in one run.

Run: ``python bench/bench_startup.py [--repeats 7]``. Each repetition starts both commands back to back as fresh
processes (the CLI through the installed console script's entry point, ``robustvit.cli:main``), so machine noise
hits both alike; the table reports medians and the ratio. The package and the CLI import torch, timm
and transformers only when a command runs (``robustvit/__init__.py`` loads names lazily).

Writes ``bench/results/startup.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "robustvit --help": [
        sys.executable,
        "-c",
        "import sys; from robustvit.cli import main; sys.argv[0] = 'robustvit'; main()",
        "--help",
    ],
}


def performance_rows(report: dict) -> list[str]:
    """The row of docs/performance.md's table that startup.json holds (bench/tables.py renders the table)."""
    median = report["median_s"]
    return [
        '| Startup: `robustvit --help` vs `python -c "import torch"` (fresh processes, interleaved) | '
        f"{median['robustvit --help']:.2f} s vs {median['import torch']:.2f} s (the CLI imports torch only inside a "
        f"command) | **{report['ratio_cli_vs_import_torch']:.2f}x** |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "median_s": med,
        "all_s": times,
        "ratio_cli_vs_import_torch": med["robustvit --help"] / med["import torch"],
    }
    print("| command | median (s) |\n|---|---|")
    for name, value in med.items():
        print(f"| `{name}` | {value:.2f} |")
    print(f"\n`robustvit --help` / `import torch`: {result['ratio_cli_vs_import_torch']:.2f}x")
    out = Path(__file__).parent / "results" / "startup.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
