"""recipes/train_lipschitz.py end to end on tiny settings: outputs, exact resume, two CPU processes (gloo), bad input.

Runs are tiny: 16-pixel digits (a 2x2 grid of patches), a few batches per epoch, 24 certified images, 3 PGD steps.
"""

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
from safetensors.torch import load_file, load_model

import robustvit
from robustvit.certification.certificate import Certificate, sha256_file
from robustvit.constants import DEFAULT_EPS
from robustvit.data import load_image_dataset, stack_examples
from robustvit.layers import residual_stack_bound
from robustvit.losses import LOSSES, EpsSchedule
from robustvit.registry import Registry
from robustvit.training import load_model as build_model
from robustvit.training import loop
from robustvit.workflows import lipschitz_training, phases

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_lipschitz.py"
TINY = [
    "--image_size", "16", "--batch_size", "16", "--pretrain_epochs", "1", "--max_train_batches", "3",
    "--max_eval_images", "24", "--pgd_steps", "3",
]  # fmt: skip
BATCHES = 3


def _recipe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_lipschitz", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reset() -> None:
    # The recipe's Accelerator initialises process-wide singletons; the next run must start clean.
    AcceleratorState._reset_state(reset_partial_state=True)


def _run(module: ModuleType, argv: list[str]) -> dict:
    try:
        return module.main(argv)
    finally:
        _reset()


class Interrupted(Exception):
    """Stands for a crash right after a checkpoint was written."""


def _interrupt_after_epoch(save: Callable, stop_epoch: int, phase: str = "train") -> Callable:
    """``save_checkpoint`` that crashes once the end-of-epoch checkpoint of ``stop_epoch`` of ``phase`` ("pretrain"
    or "train") is complete."""

    def save_then_crash(accelerator, state):
        path = save(accelerator, state)
        in_phase = (Path(accelerator.project_dir).name == "pretrain") == (phase == "pretrain")
        if in_phase and state["epoch"] == stop_epoch and not state.get("epoch_steps"):
            raise Interrupted(stop_epoch)
        return path

    return save_then_crash


@pytest.fixture
def recipe():
    yield _recipe()
    _reset()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, Path]:
    """One uninterrupted 2-epoch run (seed 0)."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    return _run(_recipe(), [*TINY, "--epochs", "2", "--output_dir", str(output_dir)]), output_dir


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# --------------------------------------------------------------------------------------------------- one process


@pytest.mark.slow
def test_a_run_writes_its_outputs_and_a_verifiable_model(uninterrupted) -> None:
    metrics, out = uninterrupted
    for name in ("certificate.json", "certified_accuracy.png", "metrics.json", "source.safetensors"):
        assert (out / name).is_file(), name
    for name in ("model.safetensors", "config.json"):  # the source as a timm folder (--model <out>/source)
        assert (out / "source" / name).is_file(), name
    for name in ("model.safetensors", "config.json", "certificate.json", "README.md"):
        assert (out / "model" / name).is_file(), name
    assert (out / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    config = metrics["config"]
    assert metrics["num_processes"] == 1 and config["training"]["epochs"] == 2 and config["training"]["loss"] == "emma"
    assert set(config) == {"run", "training", "convert", "certification"}
    # History: one record per epoch, 3 batches of 16 images each, a finite loss and the bound at that epoch.
    assert [entry["epoch"] for entry in metrics["history"]] == [0, 1]
    for entry in metrics["history"]:
        assert entry["images"] == BATCHES * 16 and torch.isfinite(torch.tensor(entry["loss"]))
        assert entry["lipschitz"] > 0
    for epoch in (0, 1):  # Accelerate's numbered checkpoints, one per epoch
        state = json.loads((out / "checkpoints" / f"checkpoint_{epoch}" / "training_state.json").read_text())
        assert state["epoch"] == epoch and len(state["history"]) == epoch + 1
    assert not (out / "pretrain").exists()  # the source pretraining's checkpoints go once source.safetensors is saved
    # The certificate: written next to the model, with the weights' hash, and matching metrics.json.
    certificate = Certificate.load(out / "certificate.json")
    assert certificate == Certificate.load(out / "model" / "certificate.json")
    assert certificate.weights_sha256 == sha256_file(out / "model" / "model.safetensors")
    assert certificate.num_samples == 24 and certificate.dataset == "digits" and certificate.split == "test"
    assert [r.label for r in certificate.results] == ["36/255", "72/255", "108/255"]
    assert metrics["certified_accuracy"] == {r.label: r.certified_accuracy for r in certificate.results}
    assert metrics["pgd_accuracy"] == {r.label: r.pgd_accuracy for r in certificate.results}
    assert metrics["lipschitz"] == certificate.lipschitz
    # The certificate bounds the float64 copy it certifies; the history, the float32 model (rescaled in float32).
    assert certificate.lipschitz == pytest.approx(metrics["history"][-1]["lipschitz"], rel=1e-6)
    for r in certificate.results:
        assert r.certified_accuracy <= r.pgd_accuracy <= certificate.clean_accuracy
    # from_pretrained rebuilds, loads and verifies the certificate; certifying again reproduces it.
    model = robustvit.from_pretrained(out / "model")
    assert model.certificate.digest() == certificate.digest()
    images, labels = stack_examples(load_image_dataset(split="test", image_size=16), 24)
    again = robustvit.certify(model, images, labels)
    assert again.clean_accuracy == certificate.clean_accuracy and again.lipschitz == certificate.lipschitz
    assert [again.certified_accuracy(r.eps) for r in certificate.results] == [
        r.certified_accuracy for r in certificate.results
    ]
    # The source weights load strictly into the embedded default model at this size.
    source, _ = build_model(None, num_classes=10, image_size=16, channels=3)
    load_model(source, str(out / "source.safetensors"), strict=True)


def test_a_runs_source_folder_is_the_source_of_the_next_run(recipe, tmp_path: Path, monkeypatch) -> None:
    # Run A pretrains a source and saves it as a timm folder; run B starts from it (--model A/source, no
    # pretraining): B converts exactly the weights A pretrained (the same conversion of the same calibration images).
    starts: list[dict[str, torch.Tensor]] = []
    convert = recipe.convert_source

    def recording_convert(configs, source, data):
        model = convert(configs, source, data)
        starts.append({key: value.detach().clone() for key, value in model.state_dict().items()})
        return model

    monkeypatch.setattr(recipe, "convert_source", recording_convert)
    tiny = [*TINY, "--epochs", "1", "--max_train_batches", "2"]
    _run(recipe, [*tiny, "--output_dir", str(tmp_path / "A")])
    folder = tmp_path / "A" / "source"
    assert (folder / "model.safetensors").is_file() and json.loads((folder / "config.json").read_text())["architecture"]
    metrics = _run(
        recipe, [*tiny, "--model", str(folder), "--pretrain_epochs", "0", "--output_dir", str(tmp_path / "B")]
    )
    assert metrics["model"]["library"] == "timm" and metrics["model"]["pretrained"] is True
    assert metrics["config"]["training"]["pretrain_epochs"] == 0
    # B's source is A's pretrained source, weight for weight ...
    expected, actual = _tensors(tmp_path / "A" / "source.safetensors"), _tensors(tmp_path / "B" / "source.safetensors")
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    # ... and its converted start is the conversion of A's source.
    first, second = starts
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_residual_budget_end_tightens_the_stack_after_every_step(recipe, tmp_path: Path, monkeypatch) -> None:
    # --residual_budget_end: after each optimizer step the residual stack is projected under a budget that falls
    # linearly from --residual_budget to the end value over the radius ramp (the first half), then stays.
    budgets: list[float] = []
    stacks: list[float] = []
    fit = lipschitz_training.fit_residual_budget

    def recording_fit(model, budget):
        fit(model, budget)
        budgets.append(budget)
        stacks.append(residual_stack_bound(model))

    monkeypatch.setattr(lipschitz_training, "fit_residual_budget", recording_fit)
    argv = [*TINY, "--epochs", "2", "--residual_budget", "6", "--residual_budget_end", "1.5"]
    metrics = _run(recipe, [*argv, "--output_dir", str(tmp_path)])
    assert len(budgets) == 2 * BATCHES  # one projection per step
    assert budgets == sorted(budgets, reverse=True) and budgets[0] < 6 and budgets[-1] == pytest.approx(1.5)
    assert all(stack <= budget for stack, budget in zip(stacks, budgets, strict=True))
    # The certified model is the projected one: its bound is the engine's, recomputed from the saved weights.
    model = robustvit.from_pretrained(tmp_path / "model")
    assert residual_stack_bound(model) <= 1.5
    assert robustvit.lipschitz_bound(model) == pytest.approx(metrics["lipschitz"], rel=1e-6)
    # A budget that would not tighten is refused, naming the one it starts from.
    with pytest.raises(ValueError, match="must be below the budget it tightens from, 6"):
        _run(recipe, [*argv[:-1], "6", "--output_dir", str(tmp_path / "loose")])


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_weights(recipe, uninterrupted, tmp_path: Path, monkeypatch) -> None:
    metrics, out = uninterrupted
    argv = [*TINY, "--epochs", "2", "--output_dir", str(tmp_path)]
    save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", _interrupt_after_epoch(save, 0))
    with pytest.raises(Interrupted):
        _run(recipe, argv)
    assert not (tmp_path / "model").exists() and (tmp_path / "checkpoints" / "checkpoint_0").is_dir()
    monkeypatch.setattr(loop, "save_checkpoint", save)
    resumed = _run(recipe, [*argv, "--resume"])
    # Same data order, LR and eps schedules after the restart: bit-identical weights.
    expected, actual = _tensors(out / "model" / "model.safetensors"), _tensors(tmp_path / "model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    strip = ("seconds",)
    assert [{k: v for k, v in e.items() if k not in strip} for e in resumed["history"]] == [
        {k: v for k, v in e.items() if k not in strip} for e in metrics["history"]
    ]
    assert resumed["certified_accuracy"] == metrics["certified_accuracy"]


@pytest.mark.slow
def test_resuming_with_more_epochs_continues_from_the_last_checkpoint(recipe, tmp_path: Path) -> None:
    # `--epochs 30 --resume` extends a finished run. (Its weights differ from an uninterrupted run of the longer
    # length, by design: the cosine LR and the eps ramp span --epochs.) Trackers on (every installed one).
    argv = [*TINY, "--checkpoints_total_limit", "1", "--with_tracking", "--output_dir", str(tmp_path)]
    first = _run(recipe, [*argv, "--epochs", "1"])
    extended = _run(recipe, [*argv, "--epochs", "2", "--resume"])
    assert [entry["epoch"] for entry in extended["history"]] == [0, 1]
    assert extended["history"][0] == first["history"][0]  # read back from the checkpoint, not redone
    # --checkpoints_total_limit 1: Accelerate kept the newest only, numbered after the resumed one.
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == ["checkpoint_1"]
    state = json.loads((tmp_path / "checkpoints" / "checkpoint_1" / "training_state.json").read_text())
    assert state["epoch"] == 1 and state["history"] == extended["history"]
    robustvit.from_pretrained(tmp_path / "model")  # the extended model verifies


@pytest.mark.parametrize("steps", [2, 3], ids=["inside", "after-the-last-step"])
def test_a_run_resumed_inside_an_epoch_replays_it(
    recipe, uninterrupted, tmp_path: Path, monkeypatch, steps: int
) -> None:
    # --checkpointing_steps 2 with 3 batches per epoch: a checkpoint after step 2 of each epoch, and one at its end.
    # 3: the step checkpoint comes after the epoch's last step, just before the end-of-epoch one; resuming from it
    # skips the whole epoch, and the next epoch must still draw a new order.
    metrics, out = uninterrupted
    argv = [*TINY, "--epochs", "2", "--checkpointing_steps", str(steps), "--output_dir", str(tmp_path)]
    save = loop.save_checkpoint

    def crash_inside_the_first_epoch(accelerator, state):
        path = save(accelerator, state)
        if Path(accelerator.project_dir).name != "pretrain" and state["epoch"] == -1 and state.get("epoch_steps"):
            raise Interrupted(state["epoch_steps"])
        return path

    monkeypatch.setattr(loop, "save_checkpoint", crash_inside_the_first_epoch)
    with pytest.raises(Interrupted):
        _run(recipe, argv)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    resumed = _run(recipe, [*argv, "--resume"])
    expected, actual = _tensors(out / "model" / "model.safetensors"), _tensors(tmp_path / "model" / "model.safetensors")
    for name in expected:  # the epoch's order, LR, eps ramp and running loss continue where they stopped
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    strip = ("seconds",)
    assert [{k: v for k, v in e.items() if k not in strip} for e in resumed["history"]] == [
        {k: v for k, v in e.items() if k not in strip} for e in metrics["history"]
    ]


def test_an_interrupted_pretraining_resumes_to_the_same_source(recipe, tmp_path: Path, monkeypatch) -> None:
    argv = [*TINY, "--pretrain_epochs", "2", "--epochs", "0", "--max_eval_images", "8"]
    _run(recipe, [*argv, "--output_dir", str(tmp_path / "A")])
    save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", _interrupt_after_epoch(save, 0, phase="pretrain"))
    with pytest.raises(Interrupted):
        _run(recipe, [*argv, "--output_dir", str(tmp_path / "B")])
    assert (tmp_path / "B" / "pretrain" / "checkpoints" / "checkpoint_0").is_dir()
    assert not (tmp_path / "B" / "source.safetensors").exists()
    monkeypatch.setattr(loop, "save_checkpoint", save)
    _run(recipe, [*argv, "--resume", "--output_dir", str(tmp_path / "B")])
    expected, actual = _tensors(tmp_path / "A" / "source.safetensors"), _tensors(tmp_path / "B" / "source.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    assert not (tmp_path / "B" / "pretrain").exists()


def test_resuming_with_other_hyper_parameters_is_refused(recipe, tmp_path: Path) -> None:
    # A resumed run must not silently mix two settings: the finished epochs were trained with the recorded ones.
    argv = [*TINY, "--epochs", "0", "--max_eval_images", "8", "--output_dir", str(tmp_path)]
    _run(recipe, argv)
    before = (tmp_path / "metrics.json").read_text()
    for changed, named in ((["--lr", "0.5"], "training/lr"), (["--seed", "1"], "run/seed"),
                           (["--residual_budget", "6"], "convert/residual_budget")):  # fmt: skip
        with pytest.raises(ValueError, match=f"differ from the interrupted run: {named} "):
            _run(recipe, [*argv, "--resume", *changed])
    assert (tmp_path / "metrics.json").read_text() == before


def test_resume_refuses_a_folder_of_the_other_recipe(recipe, tmp_path: Path, monkeypatch) -> None:
    # Both recipes checkpoint a pretraining under pretrain/: one must not load the other's checkpoints.
    argv = [*TINY, "--pretrain_epochs", "2", "--output_dir", str(tmp_path)]
    save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", _interrupt_after_epoch(save, 0, phase="pretrain"))
    with pytest.raises(Interrupted):
        _run(recipe, argv)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    spec = importlib.util.spec_from_file_location("finetune_nullspace", ROOT / "recipes" / "finetune_nullspace.py")
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)
    with pytest.raises(ValueError, match="holds a run of 'train_lipschitz', not of 'finetune_nullspace'"):
        _run(finetune, [*argv, "--resume"])
    (tmp_path / "run_settings.json").unlink()  # a folder no run of this recipe wrote
    with pytest.raises(FileNotFoundError, match="has no run_settings.json"):
        _run(recipe, [*argv, "--resume"])
    assert (tmp_path / "pretrain" / "checkpoints" / "checkpoint_0").is_dir()


def test_an_existing_output_folder_is_refused_before_any_work(recipe, tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        _run(recipe, [*TINY, "--output_dir", str(tmp_path)])
    assert not (tmp_path / "source.safetensors").exists()


# --------------------------------------------------------------------------------------------------- bad input


def test_resume_without_a_checkpoint_is_a_clear_error(recipe, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing to resume from"):
        _run(recipe, [*TINY, "--resume", "--output_dir", str(tmp_path)])


@pytest.mark.parametrize(
    "argv",
    [
        ["--loss", "hinge"],
        ["--mixer", "attention"],
        ["--activation", "relu"],
        ["--channels", "2"],
        ["--epochs", "-1"],
        ["--pretrain_epochs", "-1"],
        ["--singular_value_power", "1.5"],
        ["--residual_budget", "0.5"],
        ["--residual_budget", "0"],
        ["--residual_budget_end", "1"],
        ["--checkpointing_steps", "0"],
        ["--resume", "--overwrite_output_dir"],
        ["--gradient_accumulation_steps", "2", "--max_train_batches", "3"],
        ["--epochs", "two"],
        ["--no_such_flag"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_bad_flags_are_rejected(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        _recipe().parse_args(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["--batch_size", "0"],
        ["--max_train_batches", "0"],
        ["--max_eval_images", "0"],
        ["--pgd_steps", "0"],
        ["--eps", "-0.1"],
        ["--max_grad_norm", "-1"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_bad_values_are_rejected_before_any_training(argv: list[str]) -> None:
    # Otherwise they fail late (after the source was trained) or, for --max_train_batches 0, mean "no cap".
    with pytest.raises(SystemExit):
        _recipe().parse_args(argv)


def test_every_registered_loss_is_a_choice_and_the_defaults_are_the_embedded_run() -> None:
    configs = _recipe().parse_args([])
    training, convert = configs.training, configs.convert
    assert training.loss == "emma" and training.epochs == 9 and training.pretrain_epochs == 15
    # The conversion that won bench/bench_transfer.py; 1 / none give back the exact conversion.
    assert convert.activation == "minmax" and convert.singular_value_power == 0.0 and convert.residual_budget == 12.0
    assert training.max_grad_norm == 1.0  # clipping of the margin phase; 0 turns it off
    exact = _recipe().parse_args(["--singular_value_power", "1", "--residual_budget", "none"]).convert
    assert exact.singular_value_power == 1.0 and exact.residual_budget is None
    run = configs.run
    assert run.model is None and run.dataset is None and not run.resume and run.output_dir == "outputs/train_lipschitz"
    assert configs.certification.eps == list(DEFAULT_EPS)  # --eps is the training radius
    for name in LOSSES:
        assert _recipe().parse_args(["--loss", name]).training.loss == name
    assert _recipe().parse_args(["--model", "vit_tiny_patch16_224"]).training.pretrain_epochs == 0


def test_train_epoch_clips_the_total_gradient_norm() -> None:
    # With plain SGD at lr 1 the step is the (clipped) gradient: its norm is the clip when the gradient is larger.
    from accelerate import Accelerator

    from robustvit.training import train_epoch

    torch.manual_seed(0)
    batches = [(100 * torch.randn(8, 4), torch.randint(0, 3, (8,)))]

    def step_norm(max_grad_norm: float | None) -> float:
        model = torch.nn.Linear(4, 3)
        torch.nn.init.constant_(model.weight, 0.1)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        loss = lambda net, images, labels: torch.nn.functional.cross_entropy(net(images), labels)  # noqa: E731
        try:
            train_epoch(Accelerator(cpu=True), model, batches, optimizer, loss, max_grad_norm=max_grad_norm)
        finally:
            _reset()  # or the two-process runs below inherit a one-process state
        return float((torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm())

    assert step_norm(0.01) == pytest.approx(0.01, rel=1e-4)
    assert step_norm(None) > 1.0


# --------------------------------------------------------------------------------------------------- two processes

# 1437 training images in batches of 128: 12 batches, 6 per process. --max_train_batches 8 caps nothing, but a
# recipe that counted its steps on the unsharded loader (8 per epoch) would get both schedules wrong.
TWO = [
    "--image_size", "16", "--batch_size", "128", "--max_train_batches", "8", "--pretrain_epochs", "1",
    "--max_eval_images", "8", "--pgd_steps", "1", "--epochs", "2",
]  # fmt: skip
LOCAL_STEPS = 6


def _two_process_runs(root: Path) -> None:
    """In each of two forked processes: an uninterrupted run in root/A, an interrupted and resumed one in root/B.

    Each process logs, per training step, the phase, its LR and the margin loss's eps, and saves its own weights at
    every checkpoint.
    """
    # One thread per worker (see tests/test_finetune_recipe.py).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    module = _recipe()
    current: dict = {}

    def logged_loss(logits, labels, *, eps, margins):
        current["eps"] = eps
        return LOSSES["emma"](logits, labels, eps=eps, margins=margins)

    lipschitz_training.LOSSES = Registry("loss")
    for name, fn in LOSSES.items():
        lipschitz_training.LOSSES.register(name, logged_loss if name == "emma" else fn)
    train_epoch, save_checkpoint = phases.train_epoch, loop.save_checkpoint

    def logged_epoch(accelerator, model, loader, optimizer, loss_fn, **kwargs):
        log = Path(current["dir"]) / f"steps_rank{accelerator.process_index}.jsonl"

        def loss(net, images, labels):
            current["eps"] = None
            lr = optimizer.param_groups[0]["lr"]
            value = loss_fn(net, images, labels)
            with log.open("a") as handle:
                handle.write(json.dumps({"phase": kwargs["description"], "lr": lr, "eps": current["eps"]}) + "\n")
            return value

        return train_epoch(accelerator, model, loader, optimizer, loss, **kwargs)

    def save_with_rank_weights(accelerator, state):
        path = save_checkpoint(accelerator, state)
        weights = accelerator.unwrap_model(accelerator._models[-1]).state_dict()
        torch.save({k: v.detach().clone() for k, v in weights.items()}, path / f"rank{accelerator.process_index}.pt")
        return path

    phases.train_epoch = logged_epoch
    for name, argv, stop in (
        ("A", [], None),
        ("B", [], 0),
        ("B", ["--resume"], None),
    ):
        current["dir"] = root / name
        loop.save_checkpoint = (
            save_with_rank_weights if stop is None else _interrupt_after_epoch(save_with_rank_weights, stop)
        )
        try:
            module.main([*TWO, *argv, "--output_dir", str(root / name)])
        except Interrupted:
            pass
        finally:
            _reset()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two_processes")
    debug_launcher(partial(_two_process_runs, root), num_processes=2)
    return root


def _steps(root: Path, run: str, rank: int) -> list[dict]:
    return [json.loads(line) for line in (root / run / f"steps_rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_two_processes_train_in_sync(two_processes: Path) -> None:
    metrics = json.loads((two_processes / "A" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert [entry["images"] for entry in metrics["history"]] == [2 * LOCAL_STEPS * 128] * 2  # padded even shards
    for run in ("A", "B"):
        for epoch in (0, 1):
            folder = two_processes / run / "checkpoints" / f"checkpoint_{epoch}"
            rank0, rank1 = torch.load(folder / "rank0.pt"), torch.load(folder / "rank1.pt")
            assert rank0.keys() == rank1.keys()
            for name in rank0:  # gradients are all-reduced: both ranks hold the same weights after every epoch
                assert torch.equal(rank0[name], rank1[name]), (run, epoch, name)
        epoch0 = torch.load(two_processes / run / "checkpoints" / "checkpoint_0" / "rank0.pt")
        epoch1 = torch.load(two_processes / run / "checkpoints" / "checkpoint_1" / "rank0.pt")
        assert any(not torch.equal(epoch0[k], epoch1[k]) for k in epoch0)  # and they trained
    final = torch.load(two_processes / "A" / "checkpoints" / "checkpoint_1" / "rank0.pt")
    saved = _tensors(two_processes / "A" / "model" / "model.safetensors")
    for name, value in saved.items():
        assert torch.equal(value, final[name]), name
    robustvit.from_pretrained(two_processes / "A" / "model")
    steps = [_steps(two_processes, "A", rank) for rank in (0, 1)]
    assert steps[0] == steps[1]  # same LR and eps on both ranks


@pytest.mark.distributed
def test_two_processes_ramp_eps_over_each_processs_own_steps(two_processes: Path) -> None:
    config = json.loads((two_processes / "A" / "metrics.json").read_text())["config"]["training"]
    schedule = EpsSchedule(config["eps"], start=config["eps_start"], end=config["eps_end"])
    eps = [s["eps"] for s in _steps(two_processes, "A", 0) if s["phase"].startswith("epoch")]
    assert len(eps) == 2 * LOCAL_STEPS
    assert eps == pytest.approx([schedule(i / len(eps)) for i in range(len(eps))], rel=1e-12)
    assert eps[-1] == pytest.approx(config["eps"] * config["eps_end"])  # the ramp ends within the run


@pytest.mark.distributed
def test_two_processes_follow_the_lr_schedules_to_their_end(two_processes: Path) -> None:
    config = json.loads((two_processes / "A" / "metrics.json").read_text())["config"]["training"]
    steps = _steps(two_processes, "A", 0)
    source = [s["lr"] for s in steps if s["phase"].startswith("source")]
    margin = [s["lr"] for s in steps if s["phase"].startswith("epoch")]
    assert len(source) == LOCAL_STEPS and len(margin) == 2 * LOCAL_STEPS
    # Pretraining: cosine from the peak, every step at a positive LR.
    assert source[0] == pytest.approx(config["pretrain_lr"]) and all(lr > 0 for lr in source)
    assert source == sorted(source, reverse=True)
    # Margin training: one epoch of warmup from 0 (transformers' schedule), so the first step of epoch 1 is at the
    # peak; then it decays, never to 0 within the run.
    assert margin[:LOCAL_STEPS] == sorted(margin[:LOCAL_STEPS]) and margin[0] == 0
    assert margin[LOCAL_STEPS] == pytest.approx(config["lr"])
    assert margin[LOCAL_STEPS:] == sorted(margin[LOCAL_STEPS:], reverse=True) and all(lr > 0 for lr in margin[1:])


@pytest.mark.distributed
def test_two_processes_resume_to_the_same_weights(two_processes: Path) -> None:
    expected = _tensors(two_processes / "A" / "model" / "model.safetensors")
    actual = _tensors(two_processes / "B" / "model" / "model.safetensors")
    mismatched = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not mismatched, f"{len(mismatched)} of {len(expected)} tensors differ, e.g. {mismatched[:3]}"
    # The restarted run continues both schedules where the interrupted one stopped.
    assert _steps(two_processes, "B", 0) == _steps(two_processes, "A", 0)


@pytest.mark.slow
@pytest.mark.parametrize("mlp", ["sll"])
def test_mlp_flag_trains_and_certifies_sll_blocks(recipe, mlp: str, tmp_path: Path) -> None:
    metrics = _run(recipe, [*TINY, "--epochs", "1", "--mlp", mlp, "--output_dir", str(tmp_path)])
    assert metrics["config"]["convert"]["mlp"] == mlp
    certificate = Certificate.load(tmp_path / "certificate.json")
    assert certificate.convert_config["mlp"] == mlp
    rows = [e for e in certificate.lipschitz_report["entries"] if e["type"] == mlp.upper()]
    assert rows and all(e["bound"] <= 1 + 1e-9 for e in rows)
