"""Every generated results table of README.md and docs/*.md, rendered from the JSON in bench/results/.

A generated table sits between ``<!-- table: NAME -->`` and ``<!-- /table -->``; NAME is a key of :data:`TABLES`.

    python bench/tables.py            # print every table
    python bench/tables.py transfer   # print one
    python bench/tables.py --write    # rewrite the tables in README.md and docs/*.md in place

tests/test_tables.py checks that every marked table reads what this script renders from the committed JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))

from bench_substitutes import table as substitutes_table  # noqa: E402
from bench_transfer import table as transfer_table  # noqa: E402  (the table the benchmark prints)
from coverage_table import table as coverage_table  # noqa: E402
from nullspace_report import headline, noise_summary  # noqa: E402

MARKED = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def _transfer(name: str) -> Callable[[], str]:
    return lambda: transfer_table(_load(name)["summaries"])


def _nullspace_headline() -> str:
    from robustvit.evaluation import RobustnessResult, SeedSummary, format_methods

    report = _load("finetune_nullspace")
    methods = {name: SeedSummary.from_dict(method) for name, method in report["methods"].items()}
    table = format_methods(RobustnessResult.from_dict(report["baseline"]["evaluation"]), methods, reference="ce")
    return headline(table).rstrip()


TABLES: dict[str, Callable[[], str]] = {
    "transfer": _transfer("transfer"),  # bench/bench_transfer.py
    "transfer_ablation": _transfer("transfer_ablation"),  # bench/bench_transfer.py --set ablation
    "transfer_mlp": _transfer("transfer_mlp"),  # bench/bench_transfer.py --set mlp
    "nullspace": _nullspace_headline,  # recipes/finetune_nullspace.py -> finetune_nullspace.json
    "nullspace_noise": lambda: noise_summary(_load("finetune_nullspace")),
    "coverage": lambda: coverage_table(_load("coverage")["rows"]),  # bench/coverage_table.py
    "substitutes": lambda: substitutes_table(_load("substitutes")),  # bench/bench_substitutes.py
}


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def marked_tables(text: str) -> list[tuple[str, str]]:
    """(name, body without its final newline) of every marked table of a document."""
    return [(match["name"], match["body"].rstrip("\n")) for match in MARKED.finditer(text)]


def rewrite(text: str) -> str:
    return MARKED.sub(lambda m: f"{m[1]}{TABLES[m['name']]()}\n{m[4]}", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", choices=[[], *TABLES], default=[])
    parser.add_argument("--write", action="store_true", help="rewrite the marked tables of README.md and docs/*.md")
    args = parser.parse_args()
    if args.write:
        for path in documents():
            text = path.read_text(encoding="utf-8")
            if (new := rewrite(text)) != text:
                path.write_text(new, encoding="utf-8")
                print(f"rewrote {path.relative_to(ROOT)}")
        return
    for name in args.names or TABLES:
        print(f"<!-- table: {name} -->\n{TABLES[name]()}\n<!-- /table -->\n")


if __name__ == "__main__":
    main()
