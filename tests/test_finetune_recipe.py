"""recipes/finetune_nullspace.py end to end on tiny settings: outputs, resume, and two CPU processes (gloo)."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType

import pytest
import torch
from accelerate import debug_launcher
from accelerate.state import AcceleratorState
from safetensors.torch import load_model
from transformers import ViTConfig, ViTForImageClassification

import robustvit
from robustvit import training
from robustvit.nullspace import NullspaceNoise, patch_embedding_nullspace
from robustvit.training import PixelModel, cosine_schedule, latest_checkpoint
from robustvit.training import load_model as build_model

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "finetune_nullspace.py"
# Tiny: 16-pixel digits (4 patches), 2 batches of 16 per epoch, 8 evaluation images, one corruption and PGD step.
TINY = [
    "--image_size", "16", "--batch_size", "16", "--max_train_batches", "2", "--pretrain_epochs", "1",
    "--noise_rounds", "1", "--noise_data_fraction", "0.05", "--max_eval_images", "8", "--eval_batch_size", "8",
    "--pgd_steps", "1", "--corruptions", "contrast", "--severities", "1",
]  # fmt: skip


def _recipe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("finetune_nullspace", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def recipe():
    yield _recipe()
    # The recipe's Accelerator initialises process-wide singletons; later forked launches must start clean.
    AcceleratorState._reset_state(reset_partial_state=True)


def _checkpoint_state(output_dir: Path, epoch: int) -> dict:
    return json.loads((output_dir / "checkpoints" / f"epoch_{epoch}" / "training_state.json").read_text())


def test_recipe_runs_and_resumes_from_its_checkpoint(recipe: ModuleType, tmp_path: Path) -> None:
    first = recipe.main([*TINY, "--epochs", "1", "--output_dir", str(tmp_path)])
    for name in ("report.json", "robustness.png", "model.safetensors", "config.json", "baseline.safetensors"):
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "report.json").read_text())
    assert [entry["epoch"] for entry in report["history"]] == [0]
    assert report["before"]["num_images"] == report["after"]["num_images"] == 8
    assert set(report["noise"]) == {"baseline", "final"}
    assert _checkpoint_state(tmp_path, 0)["epoch"] == 0
    # The finetuned weights load strictly into the plain timm model described by config.json.
    description = json.loads((tmp_path / "config.json").read_text())
    model, _ = build_model(None, num_classes=10, image_size=16, channels=3)
    assert description["kwargs"]["embed_dim"] == model.embed_dim
    load_model(model, str(tmp_path / "model.safetensors"), strict=True)
    noise = NullspaceNoise.load(tmp_path / "baseline_noise.safetensors")
    assert noise.noise.shape == (1, 4, model.embed_dim)

    resumed = recipe.main([*TINY, "--epochs", "2", "--resume", "--output_dir", str(tmp_path)])
    # Epoch 0 is not redone: its record, the pretraining and the baseline come from the checkpoint.
    assert [entry["epoch"] for entry in resumed["history"]] == [0, 1]
    assert resumed["history"][0] == first["history"][0]
    assert resumed["pretrain"] == first["pretrain"] and resumed["before"] == first["before"]
    assert _checkpoint_state(tmp_path, 1)["epoch"] == 1
    assert torch.equal(
        NullspaceNoise.load(tmp_path / "baseline_noise.safetensors").noise, noise.noise
    )  # the baseline noise is read back, not re-synthesized


def test_resume_without_a_checkpoint_is_a_clear_error(recipe: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        recipe.main([*TINY, "--resume", "--output_dir", str(tmp_path)])


def test_bad_arguments_are_rejected(recipe: ModuleType) -> None:
    with pytest.raises(SystemExit):
        recipe.parse_args(["--noise_data_fraction", "0"])
    with pytest.raises(SystemExit):
        recipe.parse_args(["--epochs", "-1"])


def _single_threaded(main: Callable[[list[str]], dict], *argvs: list[str]) -> None:
    # One thread per worker: two processes x all cores oversubscribe the CPU. Accelerate sets torch's thread count
    # when the variable is unset (torchrun, which `accelerate launch` uses, sets it to 1 for the same reason).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    for argv in argvs:
        main(argv)
        AcceleratorState._reset_state(reset_partial_state=True)  # the next run initialises its own process group


def test_recipe_runs_and_resumes_on_two_cpu_processes(recipe: ModuleType, tmp_path: Path) -> None:
    # Two forked gloo processes, as `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` starts
    # (`--cpu --num_processes 2` would start one); forking skips the 2 x ~8 s of imports a launch costs.
    argv = [*TINY, "--output_dir", str(tmp_path)]
    debug_launcher(
        partial(_single_threaded, recipe.main, [*argv, "--epochs", "1"], [*argv, "--epochs", "2", "--resume"]),
        num_processes=2,
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_processes"] == 2
    # Every test image is counted once although the two shards are padded to equal batches.
    assert report["before"]["num_images"] == report["after"]["num_images"] == 8
    assert [entry["images"] for entry in report["history"]] == [2 * 2 * 16] * 2  # 2 processes x 2 batches of 16
    assert _checkpoint_state(tmp_path, 1)["epoch"] == 1


def test_default_model_has_a_nontrivial_patch_nullspace() -> None:
    model, description = build_model(None, num_classes=10, image_size=32, channels=3)
    assert patch_embedding_nullspace(model).shape == (3 * 8 * 8, 3 * 8 * 8 - 64)
    assert description["library"] == "timm" and description["pretrained"] is False
    assert description["input"] == {"channels": 3, "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    json.dumps(description)  # JSON-ready


def test_timm_name_without_cached_weights_warns_and_uses_random_weights(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(training, "try_to_load_from_cache", lambda repo_id, filename: None)
    with pytest.warns(UserWarning, match="not in the local cache"):
        model, description = build_model("vit_tiny_patch16_224", num_classes=4, image_size=32, channels=1)
    assert description["pretrained"] is False
    assert model(torch.rand(1, 1, 32, 32)).shape == (1, 4)


def test_transformers_directory_is_loaded_with_a_new_head(tmp_path: Path) -> None:
    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    ViTForImageClassification(config).save_pretrained(tmp_path)
    model, description = build_model(str(tmp_path), num_classes=3, image_size=16, channels=3)
    assert model.classifier.out_features == 3 and description["class"] == "ViTForImageClassification"
    # A pixel wrapper returns the logits tensor and normalizes with the ViT processor's 0.5 / 0.5.
    pixels = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(PixelModel(model.eval())(pixels), model(pixel_values=(pixels - 0.5) / 0.5).logits)
    with pytest.raises(ValueError, match="size 16"):
        build_model(str(tmp_path), num_classes=3, image_size=32, channels=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        build_model(str(tmp_path / "empty"), num_classes=3, image_size=16, channels=3)


def test_pixel_model_of_a_converted_model_does_not_normalize_twice() -> None:
    model, _ = build_model(None, num_classes=10, image_size=32, channels=3)
    converted = robustvit.convert(model, mixer="l2").eval()
    wrapper = PixelModel(converted)
    assert wrapper.input_mean.abs().max() == 0 and torch.all(wrapper.input_std == 1)
    pixels = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(wrapper(pixels), converted(pixels))


def test_cosine_schedule_warms_up_decays_and_never_raises() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = cosine_schedule(optimizer, total_steps=10, warmup_steps=2)
    rates = []
    for _ in range(14):  # past the end, as a prepared scheduler on uneven shards does
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:3] == pytest.approx([0.5, 1.0, 1.0]) and rates[-1] == 0.0
    assert all(a >= b for a, b in zip(rates[2:], rates[3:], strict=False))


def test_latest_checkpoint_skips_incomplete_ones(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    for epoch in (2, 10, 11):
        (tmp_path / "checkpoints" / f"epoch_{epoch}").mkdir(parents=True)
    for epoch in (2, 10):  # epoch 11 was interrupted before its training_state.json was written
        (tmp_path / "checkpoints" / f"epoch_{epoch}" / "training_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "epoch_10"  # numeric, not lexicographic, order
