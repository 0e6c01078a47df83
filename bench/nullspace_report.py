"""The README's nullspace-finetuning tables, from a report.json written by recipes/finetune_nullspace.py.

Run the recipe, keep its report, and print the tables:

    python recipes/finetune_nullspace.py --output_dir outputs/finetune_nullspace
    cp outputs/finetune_nullspace/report.json bench/results/finetune_nullspace.json
    python bench/nullspace_report.py [bench/results/finetune_nullspace.json]

Prints the headline rows (mean +- std over seeds, the difference to the plain CE finetune labelled "noise" when
within the spread) and, per method, how the noise searches went.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from robustvit.evaluation import RobustnessResult, SeedSummary, format_methods
from robustvit.nullspace.noise import NullspaceNoise

DEFAULT_REPORT = Path(__file__).parent / "results" / "finetune_nullspace.json"
HEADLINE = ("clean accuracy", "noise agreement", "fgsm", "pgd", "corruption accuracy (mean)")


def headline(table: str) -> str:
    """The header, the headline rows and the footnote of a :func:`format_methods` table."""
    lines = table.splitlines()
    rows = [line for line in lines[2:] if line.startswith("| ") and line[2:].startswith(HEADLINE)]
    footnote = [line for line in lines if line and not line.startswith("|")]
    return "\n".join([*lines[:2], *rows, "", *footnote])


def noise_summary(report: dict) -> str:
    lines = [
        "| method | training noises within eps | search steps (median) | noise norm in training (mean) | "
        "nullspace noise norm after finetuning |",
        "|---|---:|---:|---:|---:|",
    ]
    baseline = report["baseline"]["noise"]
    lines.append(f"| baseline | - | {baseline['steps']} | - | {baseline['l2_norm']:.1f} |")
    for name, method in report["methods"].items():
        noises = [entry["noise"] for run in method["seeds"] for entry in run["history"] if "noise" in entry]
        final = [run["final_nullspace_noise"]["l2_norm"] for run in method["seeds"]]
        reached = sum(NullspaceNoise.read_stats(n)["reached_tolerance"] for n in noises)
        within = f"{reached} of {len(noises)}" if noises else "-"
        steps = f"{statistics.median(n['steps'] for n in noises):.0f}" if noises else "-"
        norm = f"{statistics.mean(n['l2_norm'] for n in noises):.1f}" if noises else "-"
        finals = " / ".join(f"{value:.1f}" for value in final)
        lines.append(f"| {name} | {within} | {steps} | {norm} | {finals} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", nargs="?", type=Path, default=DEFAULT_REPORT)
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    methods = {name: SeedSummary.from_dict(method) for name, method in report["methods"].items()}
    table = format_methods(RobustnessResult.from_dict(report["baseline"]["evaluation"]), methods, reference="ce")
    config, timings = report["config"], report["timings"]
    config = config.get("finetuning", config)  # reports before the typed configs were flat
    print(
        f"{len(report['methods'])} methods x {config['seeds']} seeds, {config['epochs']} epochs each, "
        f"{report['num_processes']} process(es), {timings['run_seconds'] / 60:.1f} min wall\n"
    )
    print(headline(table))
    print()
    print(noise_summary(report))


if __name__ == "__main__":
    main()
