"""Every ```python block of README.md runs as pasted: in order, in one namespace (one user session), offline, in a
temporary folder. One case per block, named by its line number, so a failure points at the block."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _python_blocks() -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, match.start()) + 1, match.group(1)) for match in _BLOCK.finditer(text)]


BLOCKS = _python_blocks()


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory):
    """The user's session: one namespace and the blocks already run in it, in a temporary working folder."""
    folder = tmp_path_factory.mktemp("readme")
    cwd = os.getcwd()
    offline = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({key: "1" for key in offline})
    os.chdir(folder)
    yield {"namespace": {"__name__": "__readme__"}, "done": set()}
    os.chdir(cwd)
    for key, value in offline.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(index: int, session: dict) -> None:
    # Blocks build on each other (a user pastes them in order): run any earlier block not yet run, e.g. with -k.
    for earlier in range(index + 1):
        if earlier not in session["done"]:
            line, code = BLOCKS[earlier]
            exec(compile(code, f"README.md:{line}", "exec"), session["namespace"])
            session["done"].add(earlier)
