"""Checkpoints and output folders of the recipes, on Accelerate's ``ProjectConfiguration``.

Accelerate names the checkpoints (``<project_dir>/checkpoints/checkpoint_<i>``, ``automatic_checkpoint_naming``) and
keeps the newest ``total_limit`` of them. This module adds what Accelerate leaves to the caller:

* a JSON ``training_state.json`` (epoch, step, history...) in each checkpoint, written by the main process once
  every process finished ``save_state``, so that its presence marks a complete checkpoint;
* the checkpoint counter on resume (``load_state`` does not restore ``project_configuration.iteration``, so the next
  ``save_state`` would collide with an existing folder);
* one project folder per training phase (:func:`use_project_dir`), so that a source pretraining and the training
  that follows it resume independently;
* the data order (:class:`SamplerGenerator`) and the refusal to overwrite a run (:func:`prepare_output_dir`).

Example:
    >>> accelerator = Accelerator(cpu=True, project_config=project_configuration("outputs/run", total_limit=2))
    >>> model, optimizer = accelerator.prepare(model, optimizer)
    >>> for epoch in range(3):
    ...     path = save_checkpoint(accelerator, {"epoch": epoch, "history": []})
    >>> sorted(p.name for p in (Path("outputs/run") / "checkpoints").iterdir())  # total_limit=2: the newest two
    ['checkpoint_1', 'checkpoint_2']
    >>> resume_from_checkpoint(accelerator)["epoch"]
    2
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

__all__ = [
    "CHECKPOINTS_DIR",
    "TRAINING_STATE_FILE",
    "SamplerGenerator",
    "RUN_SETTINGS_FILE",
    "check_run_settings",
    "finish",
    "latest_checkpoint",
    "prepare_output_dir",
    "project_configuration",
    "resume_from_checkpoint",
    "save_checkpoint",
    "use_project_dir",
]

CHECKPOINTS_DIR = "checkpoints"  # Accelerate's: save_state() writes <project_dir>/checkpoints/checkpoint_<i>
TRAINING_STATE_FILE = "training_state.json"
RUN_SETTINGS_FILE = "run_settings.json"  # the settings a run started with, compared on --resume
_INDEX = re.compile(r"checkpoint_(\d+)")


def project_configuration(output_dir: str | Path, total_limit: int | None) -> ProjectConfiguration:
    """Accelerate's project configuration of a recipe: numbered checkpoints under ``output_dir``, newest
    ``total_limit`` kept (``None``: all)."""
    return ProjectConfiguration(project_dir=str(output_dir), automatic_checkpoint_naming=True, total_limit=total_limit)


def _index(path: Path) -> int | None:
    match = _INDEX.fullmatch(path.name)
    return int(match.group(1)) if match else None


def _checkpoints(project_dir: str | Path) -> list[Path]:
    folder = Path(project_dir) / CHECKPOINTS_DIR
    paths = [path for path in folder.iterdir() if _index(path) is not None] if folder.is_dir() else []
    return sorted(paths, key=_index)  # type: ignore[arg-type]


def latest_checkpoint(project_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``<project_dir>/checkpoints``, or ``None``.

    Example:
        >>> latest_checkpoint("outputs/nothing_yet") is None
        True
    """
    complete = [path for path in _checkpoints(project_dir) if (path / TRAINING_STATE_FILE).is_file()]
    return complete[-1] if complete else None


def use_project_dir(accelerator: Accelerator, project_dir: str | Path) -> None:
    """Make ``save_state`` number checkpoints under ``<project_dir>/checkpoints``, after any already there.

    Example:
        >>> accelerator = Accelerator(cpu=True, project_config=project_configuration("outputs/run", total_limit=None))
        >>> use_project_dir(accelerator, "outputs/run/pretrain")
        >>> accelerator.project_dir, accelerator.save_iteration
        ('outputs/run/pretrain', 0)
    """
    indices = [_index(path) for path in _checkpoints(project_dir)]
    accelerator.project_configuration.set_directories(str(project_dir))
    accelerator.project_configuration.iteration = max(indices, default=-1) + 1  # type: ignore[type-var]


def save_checkpoint(accelerator: Accelerator, state: dict[str, Any]) -> Path:
    """``accelerator.save_state()`` (the next numbered checkpoint of the project folder), plus ``state``.

    ``state`` (JSON-ready: epoch, history, metrics...) goes to ``training_state.json``, written by the main process
    after every process finished ``save_state``: its presence marks a complete checkpoint.
    """
    accelerator.save_state()
    path = Path(accelerator.project_dir) / CHECKPOINTS_DIR / f"checkpoint_{accelerator.save_iteration - 1}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / TRAINING_STATE_FILE).write_text(json.dumps(state, indent=2))
    accelerator.wait_for_everyone()
    return path


def resume_from_checkpoint(accelerator: Accelerator, project_dir: str | Path | None = None) -> dict[str, Any]:
    """Load the newest complete checkpoint of ``project_dir`` (default: the accelerator's) into everything
    ``accelerator`` prepared, and return its saved ``state``.

    Prepare the same objects in the same order as the run that saved it. The random states of every process are
    restored too, and later checkpoints are numbered after it.

    Raises:
        FileNotFoundError: ``project_dir`` holds no complete checkpoint.
    """
    project_dir = Path(accelerator.project_dir if project_dir is None else project_dir)
    path = latest_checkpoint(project_dir)
    if path is None:
        raise FileNotFoundError(
            f"no complete checkpoint under {project_dir / CHECKPOINTS_DIR} to resume from; run without --resume"
        )
    accelerator.load_state(str(path))
    use_project_dir(accelerator, project_dir)
    return json.loads((path / TRAINING_STATE_FILE).read_text())


def prepare_output_dir(
    accelerator: Accelerator,
    output_dir: str | Path,
    *,
    resume: bool,
    overwrite: bool,
    outputs: Iterable[str],
    resumable_from: Iterable[str] = (),
) -> Path:
    """Create ``output_dir``, refusing to write into one that already holds files unless asked to.

    Args:
        resume: continue what the folder holds.
        overwrite: start again: ``outputs`` (the names the recipe writes) are deleted first, other files are kept.
        resumable_from: names in ``output_dir`` any of which a run can resume from (checkpoints, saved phases).

    Raises:
        FileExistsError: the folder holds files and neither ``resume`` nor ``overwrite`` is set.
        FileNotFoundError: ``resume`` is set and the folder holds none of ``resumable_from``.
        ValueError: both are set.

    Example:
        >>> _ = prepare_output_dir(accelerator, "outputs/new", resume=False, overwrite=False, outputs=["model"])
        >>> (Path("outputs/new") / "model").mkdir()
        >>> prepare_output_dir(accelerator, "outputs/new", resume=False, overwrite=False, outputs=["model"])
        Traceback (most recent call last):
        ...
        FileExistsError: outputs/new already holds files (model); pass --resume to continue that run, ...
    """
    output_dir = Path(output_dir)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite_output_dir contradict each other")
    resumable_from = list(resumable_from)
    if resume and resumable_from and not any((output_dir / name).exists() for name in resumable_from):
        raise FileNotFoundError(
            f"nothing to resume from in {output_dir} (no {', '.join(resumable_from)}); run without --resume"
        )
    present = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
    if present and not resume and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds files ({', '.join(present[:5])}{', ...' if len(present) > 5 else ''}); "
            "pass --resume to continue that run, --overwrite_output_dir to start again, or another --output_dir"
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if overwrite:
            for name in outputs:
                path = output_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return output_dir


def check_run_settings(
    accelerator: Accelerator, output_dir: str | Path, recipe: str, settings: dict[str, Any], *, resume: bool
) -> None:
    """Record which ``recipe`` writes ``output_dir`` and its ``settings`` (JSON-ready: what the results depend on), or,
    on ``resume``, refuse to continue a run of another recipe or one that started with other settings: a resumed run
    must not silently load another recipe's checkpoints, nor mix two sets of hyper-parameters.

    Raises:
        FileNotFoundError: ``resume`` and ``output_dir`` holds no record (not written by a recipe run).
        ValueError: ``resume`` and the record names another recipe, or other settings (the message names them).

    Example:
        >>> _ = prepare_output_dir(accelerator, "outputs/s", resume=False, overwrite=False, outputs=[])
        >>> check_run_settings(accelerator, "outputs/s", "demo", {"lr": 0.1}, resume=False)
        >>> check_run_settings(accelerator, "outputs/s", "demo", {"lr": 0.2}, resume=True)
        Traceback (most recent call last):
        ...
        ValueError: --resume with settings that differ from the interrupted run: lr 0.2 (was 0.1); ...
    """
    path = Path(output_dir) / RUN_SETTINGS_FILE
    settings = json.loads(json.dumps(settings))  # as read back: tuples become lists
    if resume:
        if not path.is_file():
            raise FileNotFoundError(
                f"--resume: {output_dir} has no {RUN_SETTINGS_FILE}, so it was not written by a run of {recipe}; "
                "start again with --overwrite_output_dir or another --output_dir"
            )
        recorded = json.loads(path.read_text())
        if recorded.get("recipe") != recipe:
            raise ValueError(
                f"--resume: {output_dir} holds a run of {recorded.get('recipe')!r}, not of {recipe!r}; use another "
                "--output_dir"
            )
        recorded = recorded.get("settings", {})
        changed = sorted(key for key in set(settings) | set(recorded) if settings.get(key) != recorded.get(key))
        if changed:
            described = ", ".join(f"{key} {settings.get(key)!r} (was {recorded.get(key)!r})" for key in changed)
            raise ValueError(
                f"--resume with settings that differ from the interrupted run: {described}; resume with the original "
                "flags, or start again with --overwrite_output_dir or another --output_dir"
            )
        return
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path.write_text(json.dumps({"recipe": recipe, "settings": settings}, indent=2))
    accelerator.wait_for_everyone()


class SamplerGenerator:
    """Checkpoints the generator that shuffles a DataLoader's sampler, and the state each epoch's order came from.

    Give the DataLoader a ``generator`` (with several processes Accelerate gives the sampler one, seeded at
    ``prepare`` and broadcast from rank 0 at every epoch): Accelerate's ``random_states`` files do not hold it.
    Register this object with ``accelerator.register_for_checkpointing``. :func:`~robustvit.training.train_epoch`
    calls :meth:`start_epoch`, so that a run resumed from a checkpoint saved inside an epoch replays that epoch's
    order while the other random states (augmentation, dropout) continue from the checkpoint.

    Example:
        >>> data = torch.utils.data.DataLoader(range(8), shuffle=True, generator=torch.Generator().manual_seed(0))
        >>> order = SamplerGenerator(data.sampler)
        >>> order.start_epoch(rewind=False)
        >>> first = list(data)
        >>> order.start_epoch(rewind=True)  # as a resume into this epoch does
        >>> list(data) == first
        True
    """

    def __init__(self, sampler: torch.utils.data.Sampler) -> None:
        self.sampler = sampler
        self.epoch_start: torch.Tensor | None = None

    @property
    def generator(self) -> torch.Generator | None:
        return getattr(self.sampler, "generator", None)

    def start_epoch(self, *, rewind: bool) -> None:
        """Note the generator state the epoch's order is drawn from; ``rewind``: go back to the noted one."""
        if self.generator is None:
            if rewind:
                raise ValueError("replaying an epoch's order needs a DataLoader with its own generator")
            return
        if rewind:
            if self.epoch_start is None:
                raise ValueError("no epoch start was checkpointed to replay the epoch's order from")
            self.generator.set_state(self.epoch_start)
        else:
            self.epoch_start = self.generator.get_state()

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.generator is None:
            return {}
        state = {"rng_state": self.generator.get_state()}
        return state if self.epoch_start is None else {**state, "epoch_start": self.epoch_start}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.generator.set_state(state["rng_state"])
            self.epoch_start = state.get("epoch_start")


def finish(accelerator: Accelerator) -> None:
    """Wait for every process, then end the trackers and tear the process group down (gloo runs often crash at exit
    otherwise)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
