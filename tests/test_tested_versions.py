"""The README's tested-versions table is what pyproject.toml declares (lowest) and what the lock of the last green
run holds (newest), so it cannot drift from either."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / ".ci" / "requirements-tested.txt"


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(spec) for spec in (*project["dependencies"], *project["optional-dependencies"]["dev"])]


def _locked() -> dict[str, Version]:
    pins = (line.split("==") for line in LOCK.read_text().splitlines() if line and not line.startswith("#"))
    return {_name(name): Version(version) for name, version in pins}


def _lowest(requirement: Requirement) -> str:
    lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
    assert len(lower) == 1, f"{requirement}: every direct dependency needs one tested lower bound (>=)"
    return lower[0]


def expected_versions_table() -> str:
    locked = _locked()
    rows = ["| package | lowest tested | newest tested |", "|---|---|---|"]
    rows += [f"| {r.name} | {_lowest(r)} | {locked[_name(r.name)]} |" for r in _declared()]
    return "\n".join(rows)


def test_every_direct_dependency_has_a_tested_lower_bound_and_a_locked_newest_release():
    locked = _locked()
    for requirement in _declared():
        _lowest(requirement)
        assert _name(requirement.name) in locked, f"{requirement.name} is not in {LOCK.name}"
        assert locked[_name(requirement.name)] in requirement.specifier, f"{requirement.name}: locked outside its range"


def test_the_readme_table_is_the_declared_and_locked_versions():
    assert expected_versions_table() in (ROOT / "README.md").read_text(), (
        "README.md's tested-versions table differs from pyproject.toml / .ci/requirements-tested.txt; it should read:\n"
        + expected_versions_table()
    )
