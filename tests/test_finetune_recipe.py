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
from accelerate import Accelerator, debug_launcher
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file, load_model
from transformers import ViTConfig, ViTForImageClassification

import robustvit
from robustvit.nullspace import NullspaceNoise, patch_embedding_nullspace
from robustvit.training import PixelModel, cosine_schedule, latest_checkpoint, loop, models
from robustvit.training import load_model as build_model
from robustvit.workflows import nullspace_finetuning, phases

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "finetune_nullspace.py"
# Tiny: 16-pixel digits (4 patches), 2 batches of 16 per epoch, 8 evaluation images, one corruption, PGD 1 step x 2
# restarts, one seed of two methods.
TINY = [
    "--image_size", "16", "--batch_size", "16", "--max_train_batches", "2", "--pretrain_epochs", "1",
    "--noise_rounds", "1", "--noise_data_fraction", "0.05", "--max_eval_images", "8", "--eval_batch_size", "8",
    "--pgd_steps", "1", "--pgd_restarts", "2", "--corruptions", "contrast", "--severities", "1",
    "--unconverged_noise", "train", "--methods", "nullspace", "ce", "--seeds", "1",
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


def _structure(value: object) -> object:
    """The keys of nested dicts (lists by their first element): what two reports must share."""
    if isinstance(value, dict):
        return {key: _structure(item) for key, item in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [_structure(value[0])]
    return type(value).__name__


def test_recipe_runs_every_control_over_seeds_and_reports_the_spread(recipe: ModuleType, tmp_path: Path) -> None:
    argv = [
        *TINY,
        "--methods",
        "nullspace",
        "ce",
        "random",
        "--seeds",
        "2",
        "--epochs",
        "1",
        "--output_dir",
        str(tmp_path),
    ]
    recipe.main(argv)
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["methods"]) == ["nullspace", "ce", "random"]
    for name, summary in report["methods"].items():
        assert [run["seed"] for run in summary["seeds"]] == [0, 1]
        assert set(summary) >= {"seeds", "mean", "std", "num_seeds", "num_images"}
        clean = [run["evaluation"]["clean_accuracy"] for run in summary["seeds"]]
        assert summary["mean"]["clean accuracy"] == pytest.approx(sum(clean) / 2)
        assert summary["std"]["clean accuracy"] == pytest.approx(abs(clean[0] - clean[1]) / 2**0.5)
        for seed in (0, 1):  # per-run weights load strictly into the plain timm model
            model, _ = build_model(None, num_classes=10, image_size=16, channels=3)
            load_model(model, str(tmp_path / "runs" / name / f"seed_{seed}" / "model.safetensors"), strict=True)
        assert not (tmp_path / "runs" / name / "seed_0" / "checkpoints").exists()  # removed once the run is done
    # Every method starts from the same saved baseline and has the same budget.
    images = {
        name: [e["images"] for run in m["seeds"] for e in run["history"]] for name, m in report["methods"].items()
    }
    assert images["nullspace"] == images["ce"] == images["random"] == [32, 32]
    kinds = {run["history"][0]["noise"]["kind"] for run in report["methods"]["random"]["seeds"]}
    assert kinds == {"random"} and "noise" not in report["methods"]["ce"]["seeds"][0]["history"][0]
    assert report["baseline"]["evaluation"]["num_images"] == 8 and report["one_image_points"] == 12.5
    assert "one image is 12.50 points" in report["table"] and "nullspace - ce" in report["table"]
    assert report["baseline"]["evaluation"]["settings"]["pgd_restarts"] == 2
    assert (tmp_path / "robustness.png").read_bytes()[:4] == b"\x89PNG"
    description = json.loads((tmp_path / "config.json").read_text())
    assert description["kwargs"]["embed_dim"] == 64
    noise = NullspaceNoise.load(tmp_path / "baseline_noise.safetensors")
    assert noise.noise.shape == (1, 4, 64)
    # A second run into the same directory must not silently mix with the first.
    with pytest.raises(FileExistsError, match="--resume"):
        recipe.main(argv)


class _Interrupted(Exception):
    pass


def test_resume_in_the_middle_of_the_controls(recipe: ModuleType, tmp_path: Path, monkeypatch) -> None:
    # Calls to train_epoch: pretraining 1, nullspace 2 epochs, ce 2 epochs. Interrupt the 5th (ce's epoch 1).
    argv = [*TINY, "--epochs", "2", "--output_dir", str(tmp_path)]
    calls = []
    train_epoch = phases.train_epoch

    def interrupted(*args, **kwargs):
        calls.append(kwargs["description"])
        if len(calls) == 5:
            raise _Interrupted
        return train_epoch(*args, **kwargs)

    monkeypatch.setattr(phases, "train_epoch", interrupted)
    with pytest.raises(_Interrupted):
        recipe.main(argv)
    assert calls[-1] == "ce seed 0 epoch 1"
    finished = (tmp_path / "runs" / "nullspace" / "seed_0" / "result.json").read_text()
    state_file = tmp_path / "runs" / "ce" / "seed_0" / "checkpoints" / "checkpoint_0" / "training_state.json"
    interrupted_state = json.loads(state_file.read_text())
    assert [path.name for path in state_file.parents[1].iterdir()] == ["checkpoint_0"]
    assert not (tmp_path / "pretrain").exists()  # the baseline pretraining's checkpoints go once it is saved

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match=r"differ from the interrupted run: epochs 3 \(was 2\)"):
        recipe.main([*argv, "--resume", "--epochs", "3"])  # a different budget would not compare

    calls.clear()
    AcceleratorState._reset_state(reset_partial_state=True)
    report = recipe.main([*argv, "--resume"])
    assert calls == ["ce seed 0 epoch 1"]  # no pretraining, the finished run skipped, ce continues at epoch 1
    assert (tmp_path / "runs" / "nullspace" / "seed_0" / "result.json").read_text() == finished
    ce = report["methods"]["ce"]["seeds"][0]
    assert [entry["epoch"] for entry in ce["history"]] == [0, 1]
    assert ce["history"][0] == interrupted_state["history"][0]


def test_a_run_resumed_inside_an_epoch_trains_with_that_epochs_noise(
    recipe: ModuleType, tmp_path: Path, monkeypatch
) -> None:
    # --checkpointing_steps 1: a checkpoint after each step; crash after step 1 of the nullspace run's only epoch.
    argv = [*TINY, "--methods", "nullspace", "--epochs", "1", "--checkpointing_steps", "1", "--checkpoints_total_limit",
            "none"]  # fmt: skip
    recipe.main([*argv, "--output_dir", str(tmp_path / "A")])
    AcceleratorState._reset_state(reset_partial_state=True)
    save = loop.save_checkpoint

    def crash_inside_the_epoch(accelerator, state):
        path = save(accelerator, state)
        if "runs" in Path(accelerator.project_dir).parts and state.get("epoch_steps") == 1:
            raise _Interrupted
        return path

    monkeypatch.setattr(loop, "save_checkpoint", crash_inside_the_epoch)
    with pytest.raises(_Interrupted):
        recipe.main([*argv, "--output_dir", str(tmp_path / "B")])
    monkeypatch.setattr(loop, "save_checkpoint", save)
    AcceleratorState._reset_state(reset_partial_state=True)
    searches = []
    synthesize = nullspace_finetuning.training_noise
    monkeypatch.setattr(
        nullspace_finetuning, "training_noise", lambda *a, **k: searches.append(a[3]) or synthesize(*a, **k)
    )
    recipe.main([*argv, "--resume", "--output_dir", str(tmp_path / "B")])
    assert searches == []  # the epoch's noise came back with the checkpoint
    run = Path("runs") / "nullspace" / "seed_0"
    expected = load_file(str(tmp_path / "A" / run / "model.safetensors"))
    actual = load_file(str(tmp_path / "B" / run / "model.safetensors"))
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    first, again = (json.loads((tmp_path / d / run / "result.json").read_text()) for d in "AB")
    strip = ("seconds", "noise_seconds")
    assert [{k: v for k, v in e.items() if k not in strip} for e in again["history"]] == [
        {k: v for k, v in e.items() if k not in strip} for e in first["history"]
    ]


def test_resume_without_a_baseline_is_a_clear_error(recipe: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing to resume from"):
        recipe.main([*TINY, "--resume", "--output_dir", str(tmp_path)])


def test_unconverged_noise_is_reported_and_the_user_chooses(recipe: ModuleType, tmp_path: Path) -> None:
    strict = [*TINY, "--methods", "nullspace", "--epochs", "1", "--nullspace_tol", "1e-12", "--pretrain_epochs", "0"]
    with pytest.raises(RuntimeError, match="did not reach the tolerance"):
        recipe.main(
            [
                *strict,
                "--unconverged_noise",
                "resynthesize",
                "--noise_retries",
                "1",
                "--output_dir",
                str(tmp_path / "a"),
            ]
        )
    report = recipe.main([*strict, "--unconverged_noise", "train", "--output_dir", str(tmp_path / "b")])
    run = report["methods"]["nullspace"]["seeds"][0]
    assert run["noise_reached_tolerance"] == "0 of 1" and run["history"][0]["noise"]["reached_tolerance"] is False
    assert report["config"]["finetuning"]["nullspace_tol"] == 1e-12 and "eps" not in report["config"]["finetuning"]


def test_augmentation_and_budget_flags(recipe: ModuleType, tmp_path: Path) -> None:
    flags = [
        "--rand_augment", "rand-m9-mstd0.5-inc1", "--color_jitter", "0.4", "--hflip", "0.5", "--crop_scale", "0.5",
        "--random_erasing", "0.25", "--mixup", "0.8", "--cutmix", "1.0", "--label_smoothing", "0.1",
        "--drop_path", "0.1", "--train_data_fraction", "0.5", "--lr", "3e-4", "--weight_decay", "0.01",
        "--noise_lr", "0.05", "--init_limit", "2.0", "--noise_retries", "0", "--pretrain_lr", "1e-3", "--seed", "3",
        "--num_workers", "0", "--mixed_precision", "no", "--overwrite_output_dir",
    ]  # fmt: skip
    report = recipe.main([*TINY, *flags, "--epochs", "1", "--output_dir", str(tmp_path)])
    config = report["config"]
    augmentation, finetuning = config["augmentation"], config["finetuning"]
    assert augmentation["mixup"] == 0.8 and augmentation["rand_augment"] == "rand-m9-mstd0.5-inc1"
    assert finetuning["drop_path"] == 0.1 and config["run"]["seed"] == 3 and finetuning["lr"] == 3e-4
    # min(2 capped batches, half of the 90 batches) of 16 images, even, so mixup keeps them all.
    assert report["methods"]["ce"]["seeds"][0]["history"][0]["images"] == 32
    assert report["methods"]["nullspace"]["seeds"][0]["history"][0]["noise"]["lr_range"][0] == pytest.approx(0.05)


def test_split_radius_and_lora_flags(recipe: ModuleType, tmp_path: Path) -> None:
    flags = [
        "--train_split", "train", "--eval_split", "test", "--linf_radii", "1", "--l2_radii", "36",
        "--methods", "ce", "--seeds", "1", "--epochs", "1",
    ]  # fmt: skip
    report = recipe.main([*TINY, *flags, "--output_dir", str(tmp_path)])
    assert list(report["methods"]) == ["ce"]
    text = json.dumps(report)
    assert "linf@1/255" in text and "l2@36/255" in text and "linf@2/255" not in text and "l2@72/255" not in text


def test_lora_runs_restart_from_the_baseline_with_fresh_adapters(recipe: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):  # LoRA would pretrain only the adapters
        recipe.parse_args(["--lora_r", "2", "--pretrain_epochs", "1"])
    flags = ["--pretrain_epochs", "0", "--lora_r", "2", "--epochs", "1", "--methods", "ce", "nullspace"]
    report = recipe.main([*TINY, *flags, "--output_dir", str(tmp_path)])
    assert report["config"]["finetuning"]["lora_r"] == 2 and list(report["methods"]) == ["ce", "nullspace"]
    baseline = build_model(None, num_classes=10, image_size=16, channels=3)[0]
    load_model(baseline, str(tmp_path / "baseline.safetensors"))  # plain keys: the adapters are merged
    for method in ("ce", "nullspace"):
        finetuned = build_model(None, num_classes=10, image_size=16, channels=3)[0]
        load_model(finetuned, str(tmp_path / "runs" / method / "seed_0" / "model.safetensors"))
        after = finetuned.state_dict()
        changed = {name for name, before in baseline.state_dict().items() if not torch.equal(before, after[name])}
        # Only the LoRA targets (the Linear weights) moved, each by a low-rank update from the baseline.
        assert changed and all(name.endswith(".weight") for name in changed), method
        name = next(iter(sorted(changed)))
        delta = finetuned.state_dict()[name] - baseline.state_dict()[name]
        singular = torch.linalg.svdvals(delta.double())
        assert singular[2] < 1e-2 * singular[0]  # rank 2 up to the float32 rounding of the merge


def test_config_file_sets_defaults_and_flags_override_it(recipe: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("epochs: 7\nmethods: [ce, random]\nmixup: 0.2\npgd_steps: 60\n")
    configs = recipe.parse_args(["--config", str(path), "--epochs", "3"])
    assert configs.finetuning.epochs == 3 and configs.finetuning.methods == ["ce", "random"]
    assert configs.augmentation.mixup == 0.2 and configs.evaluation.pgd_steps == 60
    path.write_text("eps: 0.03\n")  # the old, ambiguous name is refused
    with pytest.raises(SystemExit):
        recipe.parse_args(["--config", str(path)])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("methods: [nullspace, bogus]", "methods: 'bogus' is not one of"),
        ("mixed_precision: fp32", "mixed_precision: 'fp32' is not one of"),
        ("epochs: true", "epochs: expected one value, got True"),
        ("epochs: 2.5", "epochs: invalid value 2.5"),
        ("config: other.yaml", "unknown settings ['config']"),
        ("- epochs", "expected a mapping"),
    ],
)
def test_config_file_values_are_checked_like_flags(
    recipe: ModuleType, tmp_path: Path, capsys, text: str, message: str
) -> None:
    # argparse checks neither the type nor the choices of defaults: a YAML value must not slip past them.
    path = tmp_path / "config.yaml"
    path.write_text(text + "\n")
    with pytest.raises(SystemExit):
        recipe.parse_args(["--config", str(path)])
    assert message in capsys.readouterr().err


def _write_imagefolder(root: Path, splits: dict[str, list[str]], per_class: int = 4, size: int = 32) -> None:
    generator = torch.Generator().manual_seed(0)
    for split, classes in splits.items():
        for index, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for item in range(per_class):
                pixels = (torch.rand(size, size, 3, generator=generator) * 64 + 96 * index).clamp(0, 255)
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / split / name / f"{item}.png")


@pytest.mark.slow
def test_paper_configuration_smoke_test_offline(recipe: ModuleType, tmp_path: Path, monkeypatch) -> None:
    # The ViT-S/16 ImageNet configuration with a tiny stand-in: an ImageFolder of 3 wnid classes with train/ and
    # val/, an "ImageNet-R"-like set of 2 of those classes, 32-pixel images; the real 22M-parameter ViT-S/16, so
    # only one method, one attack and no corruptions (~15 s on a busy 2-core CPU). The Hub weights are not cached here,
    # so the run must refuse random weights, and runs once --no-require_pretrained allows them.
    data, imagenet_r = tmp_path / "imagenet", tmp_path / "imagenet-r"
    wnids = ["n01440764", "n01443537", "n01484850"]
    _write_imagefolder(data, {"train": wnids, "val": wnids})
    _write_imagefolder(imagenet_r, {"train": wnids[1:]})
    config = str(ROOT / "recipes" / "configs" / "nullspace_vit_small_imagenet.yaml")
    small = [
        "--config", config, "--dataset", str(data), "--eval_sets", f"imagenet_r={imagenet_r}",
        "--image_size", "32", "--batch_size", "4", "--max_train_batches", "1", "--train_data_fraction", "1",
        "--epochs", "1", "--seeds", "1", "--methods", "nullspace", "--noise_rounds", "1", "--num_workers", "0",
        "--max_eval_images", "6", "--pgd_steps", "1", "--pgd_restarts", "1", "--l2_radii", "--corruptions",
        "--cpu", "--mixed_precision", "no",
    ]  # fmt: skip
    # bf16 as configured, but run in float32: CPU bf16 matmuls of this shape are ~100x slower here.
    assert recipe.parse_args(["--config", config]).run.mixed_precision == "bf16"
    monkeypatch.setattr(models, "try_to_load_from_cache", lambda repo_id, filename: None)  # weights not cached
    with pytest.warns(UserWarning, match="not in the local cache"), pytest.raises(ValueError, match="pretrained"):
        recipe.main([*small, "--output_dir", str(tmp_path / "refused")])
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.warns(UserWarning, match="not in the local cache"):
        report = recipe.main([*small, "--no_require_pretrained", "--output_dir", str(tmp_path / "out")])
    assert report["model"]["model_name"] == "vit_small_patch16_224" and report["model"]["num_classes"] == 3
    config = report["config"]
    assert config["run"]["require_pretrained"] is False and config["finetuning"]["drop_path"] == 0.25
    assert config["augmentation"]["mixup"] == 0.8 and config["finetuning"]["nullspace_tol"] == 0.03
    evaluation = report["methods"]["nullspace"]["seeds"][0]["evaluation"]
    assert evaluation["num_images"] == 6 and 0 <= evaluation["eval_sets"]["imagenet_r"] <= 1
    assert "imagenet_r accuracy" in report["methods"]["nullspace"]["mean"]


def test_bad_arguments_are_rejected(recipe: ModuleType) -> None:
    for argv in (
        ["--noise_data_fraction", "0"],
        ["--train_data_fraction", "1.5"],
        ["--epochs", "-1"],
        ["--epochs", "0"],  # used to fail only when saving the first finetuned model, after the baseline's work
        ["--seeds", "0"],
        ["--pgd_restarts", "0"],
        ["--methods", "nullspace", "adversarial"],
        ["--methods", "ce", "ce"],
        ["--nullspace_tol", "0"],
        ["--mixup", "-1"],
        ["--resume", "--overwrite_output_dir"],
        ["--overwrite"],  # transformers' name: --overwrite_output_dir
        ["--eps", "0.03"],  # the tolerance has its own name; --eps is an l2 radius in train_lipschitz.py
    ):
        with pytest.raises(SystemExit):
            recipe.parse_args(argv)


def _single_threaded(main: Callable[[list[str]], dict], *argvs: list[str]) -> None:
    # One thread per worker: two processes x all cores oversubscribe the CPU. Accelerate sets torch's thread count
    # when the variable is unset (torchrun, which `accelerate launch` uses, sets it to 1 for the same reason).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    for argv in argvs:
        main(argv)
        AcceleratorState._reset_state(reset_partial_state=True)  # the next run initialises its own process group


@pytest.mark.distributed
def test_recipe_gives_the_same_report_on_two_cpu_processes(recipe: ModuleType, tmp_path: Path) -> None:
    # Two forked gloo processes, as `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` starts
    # (`--cpu --num_processes 2` would start one); forking skips the 2 x ~8 s of imports a launch costs.
    argv = [*TINY, "--epochs", "2", "--max_train_batches", "1"]
    debug_launcher(
        partial(_single_threaded, recipe.main, [*argv, "--output_dir", str(tmp_path / "two")]), num_processes=2
    )
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["num_processes"] == 2
    # Every test image is counted once although the two shards are padded to equal batches.
    assert two["baseline"]["evaluation"]["num_images"] == 8
    assert [entry["images"] for entry in two["methods"]["ce"]["seeds"][0]["history"]] == [2 * 16] * 2
    one = recipe.main([*argv, "--output_dir", str(tmp_path / "one")])
    assert _structure(one["methods"]) == _structure(two["methods"])
    assert _structure(one["baseline"]["evaluation"]) == _structure(two["baseline"]["evaluation"])


def test_default_model_has_a_nontrivial_patch_nullspace() -> None:
    model, description = build_model(None, num_classes=10, image_size=32, channels=3)
    assert patch_embedding_nullspace(model).shape == (3 * 8 * 8, 3 * 8 * 8 - 64)
    assert description["library"] == "timm" and description["pretrained"] is False
    assert description["input"] == {"channels": 3, "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    json.dumps(description)  # JSON-ready


def test_timm_name_without_cached_weights_warns_and_uses_random_weights(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(models, "try_to_load_from_cache", lambda repo_id, filename: None)
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


def test_cosine_schedule_spans_the_run_as_accelerate_steps_it() -> None:
    # transformers' schedule; one process, 2 accumulated batches per optimizer step: 3 epochs of 4 batches are 6 steps.
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = cosine_schedule(optimizer, accelerator, epochs=3, batches_per_epoch=4, warmup_epochs=1)
    factors = [schedule.lr_lambdas[0](step) for step in range(7)]
    assert factors[:3] == pytest.approx([0.0, 0.5, 1.0]) and factors[6] == pytest.approx(0.0)
    assert factors[2:] == sorted(factors[2:], reverse=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_latest_checkpoint_skips_incomplete_ones(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    for index in (2, 10, 11):
        (tmp_path / "checkpoints" / f"checkpoint_{index}").mkdir(parents=True)
    for index in (2, 10):  # checkpoint 11 was interrupted before its training_state.json was written
        (tmp_path / "checkpoints" / f"checkpoint_{index}" / "training_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "checkpoint_10"  # numeric, not lexicographic, order
