"""Every generated results table of README.md and docs/*.md, rendered from the JSON in bench/results/.

A generated table sits between ``<!-- table: NAME -->`` and ``<!-- /table -->``; NAME is a key of :data:`TABLES`.

    python bench/tables.py            # print every table
    python bench/tables.py transfer   # print one
    python bench/tables.py --write    # rewrite the tables in README.md and docs/*.md in place, redraw the plots
    python bench/tables.py coverage --write    # only the named tables (and plots)

tests/test_tables.py checks that every marked table reads what this script renders from the committed JSON.
:data:`PLOTS` are the pictures drawn from it (``--write`` redraws them): the transfer curve,
``docs/transfer_curve.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"


def _bench_script(name: str) -> ModuleType:
    """A sibling script of bench/ (a folder of scripts, not a package), loaded by path: importers of this module
    (tests/test_tables.py) need not have bench/ on sys.path."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


transfer_table = _bench_script("bench_transfer").table  # the table the benchmark prints
coverage_table = _bench_script("coverage_table").table
substitutes_table = _bench_script("bench_substitutes").table
headline, noise_summary = (getattr(_bench_script("nullspace_report"), name) for name in ("headline", "noise_summary"))
PERFORMANCE = ("spectral", "startup", "pixel_check", "convert", "certify", "nullspace")
"""The row groups of docs/performance.md's table, in its order: bench/bench_NAME.py writes NAME.json and formats
its rows."""
performance_rows = {name: _bench_script(f"bench_{name}").performance_rows for name in PERFORMANCE}

MARKED = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def _merged(*names: str) -> dict:
    """The reports of one benchmark's sets as one (their summaries in order); they must share their seeds."""
    reports = [_load(name) for name in names]
    seeds = {tuple(report["seeds"]) for report in reports}
    if len(seeds) != 1:
        raise ValueError(f"{', '.join(names)} ran different seeds: {sorted(seeds)}")
    return {"seeds": reports[0]["seeds"], "summaries": [s for report in reports for s in report["summaries"]]}


def _transfer(*names: str) -> Callable[[], str]:
    return lambda: transfer_table(_merged(*names)["summaries"])


def _transfer_summary() -> str:
    """The README's table: the rows of the main set and of the new-family set at the recipe's default budget."""
    main, eva = _load("transfer"), _load("transfer_eva02")
    full = max(summary["epochs"] for summary in main["summaries"])
    return transfer_table([s for report in (main, eva) for s in report["summaries"] if s["epochs"] == full])


def _curve_summary() -> str:
    """The README's table beside the curve (--set curve, --set curve_radius): per start, certified accuracy at 72/255
    after each budget, and at 108/255 after the longest."""
    summaries = _merged("transfer_curve", "transfer_curve_radius")["summaries"]
    epochs = sorted({s["epochs"] for s in summaries})
    cells = {(s["row"], s["epochs"]): s["certified"] for s in summaries}
    pct = lambda c: f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}"  # noqa: E731
    lines = [
        "| start | " + " | ".join(f"72/255, {e} ep." for e in epochs) + f" | 108/255, {epochs[-1]} ep. |",
        "|---|" + "---|" * (len(epochs) + 1),
    ]
    for row in dict.fromkeys(s["row"] for s in summaries):
        values = [pct(cells[row, e]["72/255"]) for e in epochs] + [pct(cells[row, epochs[-1]]["108/255"])]
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _long_ablation() -> str:
    """What was tried against the fading lead, at 27 epochs: the curves' rows (both radii) and --set long_ablation."""
    report = _merged("transfer_curve", "transfer_curve_radius", "transfer_long_ablation")
    return transfer_table([summary for summary in report["summaries"] if summary["epochs"] == 27])


def _nullspace_headline() -> str:
    from robustvit.evaluation import RobustnessResult, SeedSummary, format_methods

    report = _load("finetune_nullspace")
    methods = {name: SeedSummary.from_dict(method) for name, method in report["methods"].items()}
    table = format_methods(RobustnessResult.from_dict(report["baseline"]["evaluation"]), methods, reference="ce")
    return headline(table).rstrip()


def _performance() -> str:
    rows = [row for name, rows_of in performance_rows.items() for row in rows_of(_load(name))]
    return "\n".join(["| benchmark | measured | ratio |", "|---|---|---|", *rows])


TABLES: dict[str, Callable[[], str]] = {
    "transfer_summary": _transfer_summary,  # the README's: --set main and --set eva02 at the default budget
    "transfer": _transfer("transfer"),  # bench/bench_transfer.py
    "transfer_eva02": _transfer("transfer_eva02"),  # bench/bench_transfer.py --set eva02
    "transfer_ablation": _transfer("transfer_ablation"),  # bench/bench_transfer.py --set ablation
    "transfer_mlp": _transfer("transfer_mlp"),  # bench/bench_transfer.py --set mlp
    "transfer_curve_summary": _curve_summary,  # the README's, beside the picture
    "transfer_curve": _transfer("transfer_curve", "transfer_curve_radius"),  # --set curve and --set curve_radius
    "transfer_long_ablation": _long_ablation,  # --set long_ablation beside the curves' 27-epoch rows
    "transfer_low_data": _transfer("transfer_low_data", "transfer_low_data_distill"),  # --set low_data(_distill)
    "transfer_other_data": _transfer("transfer_other_data"),  # bench/bench_transfer.py --set other_data
    "nullspace": _nullspace_headline,  # recipes/finetune_nullspace.py -> finetune_nullspace.json
    "nullspace_noise": lambda: noise_summary(_load("finetune_nullspace")),
    "coverage": lambda: coverage_table(_load("coverage")["rows"]),  # bench/coverage_table.py
    "substitutes": lambda: substitutes_table(_load("substitutes")),  # bench/bench_substitutes.py
    "performance": _performance,  # bench/bench_{spectral,startup,pixel_check,convert,certify,nullspace}.py
}


def curve_plot(report: dict, path: str | Path, *, radii: tuple[str, ...] = ("72/255", "108/255")) -> Path:
    """Certified accuracy against Lipschitz epochs, one panel per radius and one line per row of a bench_transfer
    report (mean ± standard deviation over its seeds), saved as a PNG (matplotlib's Agg canvas: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5 * len(radii), 3.6), dpi=120)
    FigureCanvasAgg(figure)
    budgets = sorted({s["epochs"] for s in report["summaries"]})
    for index, radius in enumerate(radii):
        axes = figure.add_subplot(1, len(radii), index + 1)
        for row in dict.fromkeys(summary["row"] for summary in report["summaries"]):
            points = sorted((s["epochs"], s["certified"][radius]) for s in report["summaries"] if s["row"] == row)
            epochs = [epoch for epoch, _ in points]
            means, stds = [100 * c["mean"] for _, c in points], [100 * c["std"] for _, c in points]
            axes.errorbar(epochs, means, yerr=stds, marker="o", capsize=3, label=row)
        axes.set_xscale("log", base=3)
        axes.set_xticks(budgets, labels=None)
        axes.get_xaxis().set_major_formatter("{x:.0f}")
        axes.set_xlabel("Lipschitz-training epochs")
        axes.set_ylabel(f"certified accuracy at {radius} (%)")
        axes.grid(alpha=0.3)
        if index == 0:
            axes.legend(fontsize=7)
    figure.suptitle(f"digits, {len(report['seeds'])} seeds (mean ± std)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


PLOTS: dict[str, tuple[tuple[str, ...], Path]] = {
    # bench_transfer.py --set curve and --set curve_radius
    "transfer_curve": (("transfer_curve", "transfer_curve_radius"), ROOT / "docs" / "transfer_curve.png"),
}
"""Picture name -> (the bench/results JSONs it is drawn from, where it is saved)."""


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def marked_tables(text: str) -> list[tuple[str, str]]:
    """(name, body without its final newline) of every marked table of a document."""
    return [(match["name"], match["body"].rstrip("\n")) for match in MARKED.finditer(text)]


def rewrite(text: str, names: Collection[str] = TABLES) -> str:
    """``text`` with its marked tables among ``names`` rendered anew."""
    return MARKED.sub(lambda m: f"{m[1]}{TABLES[m['name']]()}\n{m[4]}" if m["name"] in names else m[0], text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", choices=[[], *TABLES], default=[], help="default: every table")
    parser.add_argument("--write", action="store_true", help="rewrite the marked tables of README.md and docs/*.md")
    args = parser.parse_args()
    names = args.names or list(TABLES)
    if args.write:
        for path in documents():
            text = path.read_text(encoding="utf-8")
            if (new := rewrite(text, names)) != text:
                path.write_text(new, encoding="utf-8")
                print(f"rewrote {path.relative_to(ROOT)}")
        for name in PLOTS.keys() & set(names):
            results, picture = PLOTS[name]
            print(f"drew {curve_plot(_merged(*results), picture).relative_to(ROOT)}")
        return
    for name in names:
        print(f"<!-- table: {name} -->\n{TABLES[name]()}\n<!-- /table -->\n")


if __name__ == "__main__":
    main()
