"""Every generated results table of README.md and docs/*.md, rendered from the JSON in bench/results/.

A generated table sits between ``<!-- table: NAME -->`` and ``<!-- /table -->``; NAME is a key of :data:`TABLES`.

    python bench/tables.py            # print every table
    python bench/tables.py transfer   # print one
    python bench/tables.py --write    # rewrite the tables in README.md and docs/*.md in place

tests/test_tables.py checks that every marked table reads what this script renders from the committed JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections.abc import Callable
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
headline, noise_summary = (getattr(_bench_script("nullspace_report"), name) for name in ("headline", "noise_summary"))

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
