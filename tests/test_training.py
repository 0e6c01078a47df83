"""robustvit.training: the shared loop (Accelerate's gradient accumulation), checkpoints (numbered, total_limit,
resume) and the output-folder guard, on a tiny model and data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch.utils.data import DataLoader, TensorDataset

from robustvit.configs import RunConfig
from robustvit.training import (
    SamplerGenerator,
    build_accelerator,
    latest_checkpoint,
    prepare_output_dir,
    project_configuration,
    resume_from_checkpoint,
    save_checkpoint,
    train_epoch,
)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _ce(model, images, labels):
    return F.cross_entropy(model(images), labels)


def _train(batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
    """One epoch of a small MLP on 32 fixed samples; the same data order for any batch size."""
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    data = TensorDataset(torch.randn(32, 3, 2, 2), torch.arange(32) % 3)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    stats = train_epoch(accelerator, model, loader, optimizer, _ce)
    assert stats["steps"] == 32 // (batch_size * accumulation) and stats["images"] == 32
    return {name: value.detach().clone() for name, value in accelerator.unwrap_model(model).state_dict().items()}


def test_gradient_accumulation_takes_the_same_steps_as_the_whole_batch() -> None:
    whole, accumulated = _train(batch_size=16, accumulation=1), _train(batch_size=8, accumulation=2)
    single = _train(batch_size=8, accumulation=1)  # 4 steps: a different run
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(single[name], whole[name]) for name in whole)


def test_a_cap_that_cuts_an_accumulation_short_is_refused() -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = torch.nn.Linear(4, 2)
    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.zeros(16, dtype=torch.long)), batch_size=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    with pytest.raises(ValueError, match="multiple of the 2 gradient accumulation steps"):
        train_epoch(accelerator, model, loader, optimizer, _ce, max_batches=3)


def test_checkpoints_are_numbered_limited_and_resumed_with_their_counter(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True, project_config=project_configuration(tmp_path, total_limit=2))
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    for epoch in range(4):
        with torch.no_grad():
            model.weight.fill_(epoch)
        save_checkpoint(accelerator, {"epoch": epoch})
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["checkpoint_2", "checkpoint_3"]
    (tmp_path / "checkpoints" / "checkpoint_4").mkdir()  # a save interrupted before its training_state.json
    assert latest_checkpoint(tmp_path).name == "checkpoint_3"
    with torch.no_grad():
        model.weight.zero_()
    assert resume_from_checkpoint(accelerator)["epoch"] == 3 and bool((model.weight == 3).all())
    # Accelerate does not restore its counter; resume does: the next save is numbered after every folder there.
    assert save_checkpoint(accelerator, {"epoch": 4}).name == "checkpoint_5"


def test_an_output_folder_with_files_needs_resume_or_overwrite(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    out = tmp_path / "out"
    prepare_output_dir(accelerator, out, resume=False, overwrite=False, outputs=["model", "metrics.json"])
    assert out.is_dir()  # a new, or empty, folder is fine
    (out / "model").mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--resume .* --overwrite_output_dir"):
        prepare_output_dir(accelerator, out, resume=False, overwrite=False, outputs=["model", "metrics.json"])
    prepare_output_dir(accelerator, out, resume=True, overwrite=False, outputs=["model", "metrics.json"])
    assert (out / "model").is_dir()  # resume keeps everything
    prepare_output_dir(accelerator, out, resume=False, overwrite=True, outputs=["model", "metrics.json"])
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]  # only the recipe's own outputs go
    with pytest.raises(ValueError, match="contradict"):
        prepare_output_dir(accelerator, out, resume=True, overwrite=True, outputs=[])


def test_sampler_generator_round_trips_the_epoch_start(tmp_path: Path) -> None:
    loader = DataLoader(range(10), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    order = SamplerGenerator(loader.sampler)
    order.start_epoch(rewind=False)
    first = [batch.tolist() for batch in loader]
    state = order.state_dict()
    other = DataLoader(range(10), batch_size=2, shuffle=True, generator=torch.Generator())
    again = SamplerGenerator(other.sampler)
    again.load_state_dict(state)
    again.start_epoch(rewind=True)
    assert [batch.tolist() for batch in other] == first
    with pytest.raises(ValueError, match="own generator"):
        SamplerGenerator(DataLoader(range(4), shuffle=True).sampler).start_epoch(rewind=True)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tracking_writes_tensorboard_logs_offline(tmp_path: Path) -> None:
    run = RunConfig(output_dir=str(tmp_path), cpu=True, with_tracking=True, report_to="tensorboard")
    accelerator = build_accelerator(run, "demo", {"run": run})
    accelerator.log({"train/loss": 1.0}, step=0)
    accelerator.end_training()
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_tracking_config_is_flat_and_scalar() -> None:
    from robustvit.training import flat_config

    flat = flat_config({"run": RunConfig()})
    assert flat["run/seed"] == 0 and flat["run/model"] == "None"
    json.dumps(flat)


def test_a_saved_model_folder_loads_back_as_the_same_model_for_timm_and_transformers(tmp_path) -> None:
    # save_model_folder writes the library's own folder (the recipe's <output_dir>/source/); load_model reads it.
    from transformers import ViTConfig, ViTForImageClassification

    from robustvit.families import create_tiny_model
    from robustvit.training import load_model, save_model_folder

    timm_model, _ = load_model(None, num_classes=10, image_size=16, channels=3)
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=10)  # fmt: skip
    eva = create_tiny_model("timm_eva02", image_size=16)  # every timm family, not only VisionTransformer
    hf_model = ViTForImageClassification(config)
    for name, library, model in (("timm", "timm", timm_model), ("eva", "timm", eva), ("hf", "transformers", hf_model)):
        save_model_folder(model, tmp_path / name)
        again, description = load_model(str(tmp_path / name), num_classes=10, image_size=16, channels=3)
        assert description["library"] == library and (tmp_path / name / "model.safetensors").is_file()
        assert type(again) is type(model)
        expected, actual = model.state_dict(), again.state_dict()
        assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    with pytest.raises(TypeError, match="Linear"):
        save_model_folder(torch.nn.Linear(2, 2), tmp_path / "linear")
