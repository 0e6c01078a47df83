"""bench/ measures the code users run: it imports the workflows from the package, never recipes/ (nor bends
sys.path to reach them), and bench_transfer.py's jobs are the recipe's own phases, giving the recipe's results."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {path.stem for path in (ROOT / "recipes").glob("*.py")} | {"recipes"}
TINY = [
    "--image_size", "16", "--batch_size", "16", "--max_train_batches", "2", "--max_eval_images", "24",
    "--pgd_steps", "2", "--cpu",
]  # fmt: skip


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = sys.modules[path.stem] = importlib.util.module_from_spec(spec)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _bends_sys_path(node: ast.AST) -> bool:
    """``sys.path.insert(...)``, ``sys.path.append(...)``, ``sys.path = ...``, ``site.addsitedir(...)``."""
    if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name):
        return node.value.id == "sys"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr == "addsitedir"
    return False


def _recipe_imports(tree: ast.AST) -> list[str]:
    """Modules named like a recipe, and recipe files loaded by path (importlib, runpy)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] in RECIPES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module] if node.module.split(".")[0] in RECIPES else []
        elif isinstance(node, ast.Call):
            for argument in ast.walk(node):
                if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                    found += [argument.value] if "recipes" in argument.value.split("/") else []
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("*.py")), ids=lambda path: path.name)
def test_bench_neither_bends_sys_path_nor_imports_recipes(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bent = [node.lineno for node in ast.walk(tree) if _bends_sys_path(node)]
    assert not bent, f"{path.name} changes sys.path at lines {bent}"
    assert not _recipe_imports(tree), f"{path.name} imports recipes: {_recipe_imports(tree)}"


def test_the_scan_sees_what_it_forbids() -> None:
    tree = ast.parse(
        "import sys\nsys.path.insert(0, 'recipes')\nfrom train_lipschitz import main\n"
        "runpy.run_path('recipes/certify.py')\n"
    )
    assert any(_bends_sys_path(node) for node in ast.walk(tree))
    assert sorted(_recipe_imports(tree)) == ["recipes", "recipes/certify.py", "train_lipschitz"]


def _reset() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def bench() -> ModuleType:
    yield _load(ROOT / "bench" / "bench_transfer.py")
    _reset()


def test_bench_rows_run_the_recipes_phases_with_the_recipes_results(bench: ModuleType, tmp_path: Path) -> None:
    recipe = _load(ROOT / "recipes" / "train_lipschitz.py")
    # The bench's configs are the recipe's: its defaults are what the recipe parses from no flags.
    assert bench.recipe.default_configs() == recipe.parse_args([])
    # A pretrained row's source: the bench's pretraining job gives the recipe's source.safetensors.
    pretrained = [*TINY, "--pretrain_epochs", "1", "--epochs", "0", "--seed", "1"]
    recipe.main([*pretrained, "--output_dir", str(tmp_path / "recipe_source")])
    _reset()
    bench.pretrain_source(recipe.parse_args(pretrained), 1, str(tmp_path / "bench_source"))
    _reset()
    expected, actual = (load_file(str(tmp_path / d / "source.safetensors")) for d in ("recipe_source", "bench_source"))
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    # A random-init row is the recipe with --pretrain_epochs 0: the same weights, certificate and metrics.
    row = "random init (`--pretrain_epochs 0`)"
    metrics = recipe.main([*TINY, "--pretrain_epochs", "0", "--epochs", "1", "--output_dir", str(tmp_path / "recipe")])
    _reset()
    base = recipe.parse_args([*TINY, "--pretrain_epochs", "1"])  # the row sets pretrain_epochs 0 itself
    result = bench.train_and_certify(base, row, 0, 1, str(tmp_path / "bench"), None)
    assert result["clean"] == metrics["clean_accuracy"] and result["certified"] == metrics["certified_accuracy"]
    assert result["bound"] == metrics["lipschitz"] and list(result["certified"]) == ["36/255", "72/255", "108/255"]
    expected, actual = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("recipe", "bench"))
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    written = json.loads((tmp_path / "bench" / "metrics.json").read_text())
    untimed = lambda history: [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]  # noqa: E731
    assert untimed(written["history"]) == untimed(metrics["history"])


def test_a_row_of_another_architecture_is_the_recipe_on_its_folder(bench: ModuleType, tmp_path: Path) -> None:
    # The EVA-02-style rows: a random-weight folder per seed, read by the recipe's --model; random init is the recipe
    # with --model <folder> --pretrain_epochs 0, and a converted row reports what conversion cost.
    recipe = _load(ROOT / "recipes" / "train_lipschitz.py")
    base = recipe.parse_args([*TINY, "--pretrain_epochs", "1"])
    name = "EVA-02-style, random init"
    folder = bench.write_model_folder(bench.ROWS[name], base, 0, tmp_path / "eva")
    assert json.loads((tmp_path / "eva" / "config.json").read_text())["architecture"] == "eva02_tiny_patch14_224"
    metrics = recipe.main(
        [*TINY, "--model", folder, "--pretrain_epochs", "0", "--epochs", "1", "--output_dir", str(tmp_path / "recipe")]
    )
    _reset()
    result = bench.train_and_certify(base, name, 0, 1, str(tmp_path / "bench"), None, folder)
    assert result["clean"] == metrics["clean_accuracy"] and result["bound"] == metrics["lipschitz"]
    assert metrics["model"]["model_name"] == f"local-dir:{folder}"
    assert 0 <= result["converted_clean"] <= 1 and 0 <= result["source_clean"] <= 1
    header, _, line = bench.table([{"row": name, "epochs": 1, **bench._summary([result])}]).splitlines()
    assert header.endswith("| clean: source → converted |")
    cost = f"{100 * result['source_clean']:.1f} ± 0.0 → {100 * result['converted_clean']:.1f} ± 0.0"
    assert line.endswith(f"| {cost} |")


def test_every_row_of_every_set_is_the_recipe_with_its_flags(bench: ModuleType) -> None:
    # A row's overrides are recipe flags: the long-budget rows are the recipe with --eps_end 3 (both starts),
    # --residual_budget_end 6 and --distill 1; the low-data distilled row adds --max_train_images 144.
    recipe = _load(ROOT / "recipes" / "train_lipschitz.py")
    base = recipe.parse_args([])
    assert all(name in bench.ROWS for row_set in bench.ROW_SETS.values() for name in row_set.rows)
    flags = {
        "converted pretrained, training radius to 108/255": ["--eps_end", "3"],
        "random init, training radius to 108/255": ["--eps_end", "3", "--pretrain_epochs", "0"],
        "converted pretrained, residual budget tightening to 6": ["--residual_budget_end", "6"],
        "converted pretrained, distilled from the source": ["--distill", "1"],
        "converted pretrained, 10 % of the images, distilled": ["--distill", "1", "--max_train_images", "144"],
    }
    for name, argv in flags.items():
        configs = bench.row_configs(base, name, seed=2, epochs=27, output_dir="out")
        assert configs == recipe.parse_args([*argv, "--seed", "2", "--epochs", "27", "--output_dir", "out"]), name
