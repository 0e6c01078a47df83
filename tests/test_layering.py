"""The package's floors only point down: no import cycle between modules, and the order of the floors
(pyproject.toml's import-linter contract). Imports inside functions and under ``TYPE_CHECKING`` count too, and a
package's ``__init__`` is a module of its own."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _strongly_connected_components(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's algorithm, iterative (a deep package would exceed Python's recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.find_modules_directly_imported_by(successor)))))
                    break
                if successor in on_stack:
                    low[module] = min(low[module], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[module])
                if low[module] == index[module]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == module:
                            break
                    components.append(sorted(component))
    return components


def test_no_import_cycles():
    graph = grimp.build_graph("robustvit", cache_dir=None)
    cycles = [component for component in _strongly_connected_components(graph) if len(component) > 1]
    assert not cycles, f"modules that import each other: {cycles}"


def test_tarjan_finds_a_cycle():
    graph = grimp.ImportGraph()
    for module in ("a", "a.b", "a.c", "a.d"):
        graph.add_module(module)
    graph.add_import(importer="a.b", imported="a.c")
    graph.add_import(importer="a.c", imported="a")
    graph.add_import(importer="a", imported="a.b")
    graph.add_import(importer="a", imported="a.d")
    assert sorted(map(len, _strongly_connected_components(graph))) == [1, 3]


def test_floors_only_point_down():
    """pyproject.toml's import-linter ``layers`` contract (``lint-imports`` runs the same check)."""
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_package_module_is_a_plain_module():
    """``robustvit.convert`` / ``robustvit.certify`` are functions without swapping the package module's class."""
    import robustvit

    assert type(sys.modules["robustvit"]) is types.ModuleType
    assert callable(robustvit.convert) and callable(robustvit.certify)


@pytest.mark.slow
def test_old_module_paths_still_import():
    """The 0.1 paths of moved modules are deprecated aliases of the same module objects (README: layout)."""
    script = (
        "import warnings\n"
        "import robustvit\n"
        "from robustvit.certification.certificate import Certificate\n"
        "from robustvit.persistence import hub\n"
        "warnings.filterwarnings('error', r'robustvit\\..* moved to', DeprecationWarning)\n"
        "try:\n"
        "    from robustvit.certify.certificate import Certificate as Old\n"
        "except DeprecationWarning as warning:\n"
        "    print('WARNED', warning)\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "from robustvit.certify.certificate import Certificate as Old\n"
        "from robustvit.convert import MIXERS, ConvertConfig\n"
        "from robustvit.certify import attacks\n"
        "import robustvit.hub\n"
        "from robustvit.conversion.choices import MIXERS as NEW_MIXERS\n"
        "assert Old is Certificate and MIXERS is NEW_MIXERS and robustvit.hub is hub\n"
        "assert ConvertConfig is robustvit.ConvertConfig and attacks is robustvit.attacks\n"
        "assert callable(robustvit.convert) and callable(robustvit.certify)\n"
        "assert hub.__spec__.name == 'robustvit.persistence.hub'\n"
        "print('OK')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "WARNED robustvit.certify.certificate moved to robustvit.certification.certificate" in result.stdout
    assert result.stdout.rstrip().endswith("OK")
