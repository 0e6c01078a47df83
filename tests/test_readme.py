"""Every ```python block of README.md and docs/*.md runs as pasted: in order, in one namespace per document (one user
session), offline, in a temporary folder. A docs page continues the README's session (its quick start defines
``vit``, ``lip``, ``images``, ``labels``...). One case per block, named by its file and line, so a failure points at
the block. The README's layout section is checked against the package tree."""

from __future__ import annotations

import os
import pkgutil
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _python_blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, match.start()) + 1, match.group(1)) for match in _BLOCK.finditer(text)]


BLOCKS = {path.relative_to(ROOT).as_posix(): _python_blocks(path) for path in DOCUMENTS}
CASES = [(name, index) for name, blocks in BLOCKS.items() for index in range(len(blocks))]


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory):
    """The user's session: one namespace per document and the blocks already run, in a temporary working folder."""
    folder = tmp_path_factory.mktemp("readme")
    cwd = os.getcwd()
    offline = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({key: "1" for key in offline})
    os.chdir(folder)
    yield {"namespaces": {}, "done": set()}
    os.chdir(cwd)
    for key, value in offline.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _run(name: str, upto: int, session: dict) -> None:
    # Blocks build on each other (a user pastes them in order): run any earlier block not yet run, e.g. with -k.
    if name != "README.md":
        _run("README.md", len(BLOCKS["README.md"]) - 1, session)
    namespaces = session["namespaces"]
    if name not in namespaces:
        namespaces[name] = {"__name__": "__readme__"} if name == "README.md" else dict(namespaces["README.md"])
    for earlier in range(upto + 1):
        if (name, earlier) not in session["done"]:
            line, code = BLOCKS[name][earlier]
            exec(compile(code, f"{name}:{line}", "exec"), namespaces[name])
            session["done"].add((name, earlier))


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS["README.md"]) >= 3
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


@pytest.mark.parametrize(("name", "index"), CASES, ids=[f"{n}:{BLOCKS[n][i][0]}" for n, i in CASES])
def test_block_runs(name: str, index: int, session: dict) -> None:
    _run(name, index, session)


# Layout: the ```text block of the README's "## Layout" section.
def _layout() -> list[str]:
    section = README.read_text(encoding="utf-8").split("\n## Layout\n", 1)[1]
    return section.split("```text\n", 1)[1].split("```", 1)[0].splitlines()


def _entries(lines: list[str], indent: str) -> dict[str, str]:
    """name -> description of every entry line at exactly this indent (names, then 1+ spaces, then the role)."""
    entries = {}
    for line in lines:
        if line.startswith(indent) and not line[len(indent)].isspace():
            name, _, role = line[len(indent) :].partition(" ")
            entries[name] = role.strip()
    return entries


def _package_entries() -> set[str]:
    package = ROOT / "robustvit"
    names = {f"{m.name}/" if m.ispkg else f"{m.name}.py" for m in pkgutil.iter_modules([str(package)])}
    folders = {f"{p.name}/" for p in package.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    return {name for name in names | folders if not name.startswith("_")}


def test_layout_names_every_package_and_module_and_nothing_else() -> None:
    lines = _layout()
    assert lines[0] == "robustvit/"
    assert len(lines) <= 40, "the layout is one screen"
    named = _entries(lines, "  ")
    assert set(named) == _package_entries(), (
        f"README layout vs robustvit/: missing {sorted(_package_entries() - set(named))}, "
        f"not in the tree {sorted(set(named) - _package_entries())}"
    )
    for name, role in named.items():
        assert role, f"{name} has no role in the layout"
        if name.endswith("/"):  # files a package's role names are in that package
            for module in re.findall(r"\b(\w+\.py)\b", role):
                assert (ROOT / "robustvit" / name / module).exists(), f"robustvit/{name}{module} does not exist"


def test_layout_top_level_folders_exist() -> None:
    top = _entries(_layout(), "")
    for name, role in top.items():
        assert (ROOT / name).exists(), name
        if name.endswith("/") and name != "robustvit/":
            for module in re.findall(r"\b(\w+\.py)\b", role):
                assert (ROOT / name / module).exists() or (ROOT / name / "results").exists(), f"{name}{module}"
