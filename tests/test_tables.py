"""Every results table marked ``<!-- table: NAME -->`` in README.md and docs/*.md is what ``bench/tables.py`` renders
from the committed ``bench/results/*.json`` (``python bench/tables.py --write`` rewrites them)."""

from __future__ import annotations

import importlib.util
import json
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


def test_the_readme_shows_the_transfer_summary_and_every_table_is_shown() -> None:
    assert ("README.md", "transfer_summary") in {(path, name) for path, name, _ in MARKED}
    assert {name for _, name, _ in MARKED} == set(tables.TABLES)


def test_the_performance_page_has_no_hand_written_table() -> None:
    # Every table line of docs/performance.md lies inside its generated block.
    text = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    assert [name for name, _ in tables.marked_tables(text)] == ["performance"]
    outside = tables.MARKED.sub("", text)
    assert not [line for line in outside.splitlines() if line.startswith("|")]


def test_the_nullspace_rows_read_the_tolerance_under_either_name() -> None:
    # The committed nullspace.json predates the tolerance's own name (reached_eps); a rerun writes reached_tolerance.
    report = json.loads((tables.RESULTS / "nullspace.json").read_text(encoding="utf-8"))
    renamed = {
        **report,
        "synthesis_runs": [
            {("reached_tolerance" if key == "reached_eps" else key): value for key, value in run.items()}
            for run in report["synthesis_runs"]
        ],
    }
    rows = tables.performance_rows["nullspace"]
    assert rows(renamed) == rows(report)
    assert "5 of 5 runs reached the tolerance" in rows(report)[-1]


@pytest.mark.parametrize(("path", "name", "body"), MARKED, ids=[f"{p}:{n}" for p, n, _ in MARKED])
def test_table_matches_json(path: str, name: str, body: str) -> None:
    assert name in tables.TABLES, f"{path}: unknown table {name}"
    assert body == tables.TABLES[name](), (
        f"{path}: table {name} differs from bench/results; run bench/tables.py --write"
    )


def test_the_curve_plot_draws_one_line_per_row_from_a_report(tmp_path: Path) -> None:
    # A bench_transfer report's shape (two rows at three budgets); the picture is a PNG that matplotlib reads back,
    # a panel per radius.
    from matplotlib.image import imread

    def summary(row: str, epochs: int, mean: float) -> dict:
        cell = {"mean": mean, "std": 0.02}
        return {"row": row, "epochs": epochs, "certified": {"72/255": cell, "108/255": cell}}

    report = {
        "seeds": [0, 1, 2],
        "summaries": [summary(row, e, m * e / 27) for row, m in (("a", 0.8), ("b", 0.7)) for e in (3, 9, 27)],
    }
    path = tables.curve_plot(report, tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(path).shape[:2] == (432, 1080)  # two panels
    assert set(tables.PLOTS) == {"transfer_curve"}
