"""Every results table marked ``<!-- table: NAME -->`` in README.md and docs/*.md is what ``bench/tables.py`` renders
from the committed ``bench/results/*.json`` (``python bench/tables.py --write`` rewrites them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "bench" / "tables.py")
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)

MARKED = [
    (path.relative_to(ROOT).as_posix(), name, body)
    for path in tables.documents()
    for name, body in tables.marked_tables(path.read_text(encoding="utf-8"))
]


def test_the_readme_shows_the_transfer_table_and_every_table_is_shown() -> None:
    assert ("README.md", "transfer") in {(path, name) for path, name, _ in MARKED}
    assert {name for _, name, _ in MARKED} == set(tables.TABLES)


@pytest.mark.parametrize(("path", "name", "body"), MARKED, ids=[f"{p}:{n}" for p, n, _ in MARKED])
def test_table_matches_json(path: str, name: str, body: str) -> None:
    assert name in tables.TABLES, f"{path}: unknown table {name}"
    assert body == tables.TABLES[name](), (
        f"{path}: table {name} differs from bench/results; run bench/tables.py --write"
    )
