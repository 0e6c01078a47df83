"""The phases of ``recipes/finetune_nullspace.py``: build (data, model, optimizers) -> pretrain the baseline ->
finetune (each method and seed) -> evaluate -> report.

Every method of ``--methods`` finetunes the same saved baseline with the same budget (epochs, steps, learning rate,
data order seed), once per seed (:data:`~robustvit.nullspace.methods.FINETUNING_METHODS`). Writes to
``run.output_dir``: ``pretrain/checkpoints/`` (while the baseline trains), ``baseline.safetensors``,
``baseline_noise.safetensors`` and ``baseline.json`` (its finished marker); ``runs/<method>/seed_<k>/`` with
``model.safetensors``, ``result.json`` (its finished marker) and, while it runs, ``checkpoints/checkpoint_<i>/``;
``config.json``, ``report.json`` and ``robustness.png``.

Example:
    >>> finetuning = NullspaceFinetuningConfig(methods=["ce"], seeds=1)
    >>> [name for name in finetuning.methods], RESUMABLE_CHANGES == {"methods", "seeds"}
    (['ce'], True)

``recipes/finetune_nullspace.py``'s ``training_function`` calls the phases in order: :func:`start`, :func:`build`,
:func:`pretrain_baseline`, :func:`finetune_methods` and :func:`write_report`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from safetensors.torch import save_model
from torch.utils.data import DataLoader

import robustvit.peft
from robustvit.configs import EvaluationConfig, NullspaceFinetuningConfig, RunConfig
from robustvit.data import Augmentation, AugmentedDataset, ImageDataset, load_image_dataset
from robustvit.evaluation import (
    RobustnessResult,
    aggregate_seeds,
    evaluate_accuracy,
    evaluate_robustness,
    format_methods,
    plot_methods,
)
from robustvit.nullspace import NullspaceNoise, nullspace_finetuning_loss, synthesize_noise
from robustvit.nullspace.methods import FINETUNING_METHODS
from robustvit.training import (
    CHECKPOINTS_DIR,
    RUN_SETTINGS_FILE,
    PixelModel,
    SamplerGenerator,
    cosine_schedule,
    epoch_batches,
    latest_checkpoint,
    set_drop_path,
)
from robustvit.workflows.phases import (
    Trainer,
    cross_entropy,
    done_once,
    load_source_model,
    load_splits,
    pretrain,
    start_run,
    train_epochs,
)

__all__ = [
    "Configs",
    "EpochNoise",
    "EvalSet",
    "FinetuningData",
    "FreshStart",
    "RESUMABLE_CHANGES",
    "Setup",
    "build",
    "evaluate",
    "finetune",
    "finetune_methods",
    "pretrain_baseline",
    "start",
    "synthesize",
    "training_noise",
    "write_report",
]

logger = get_logger(__name__)

RECIPE = "finetune_nullspace"
BASELINE_WEIGHTS = "baseline.safetensors"
BASELINE_NOISE = "baseline_noise.safetensors"
BASELINE_STATE = "baseline.json"
PRETRAIN_DIR = "pretrain"  # the baseline pretraining's project folder: pretrain/checkpoints/checkpoint_<i>
RUNS_DIR = "runs"
RUN_RESULT = "result.json"
OUTPUTS = (PRETRAIN_DIR, BASELINE_WEIGHTS, BASELINE_NOISE, BASELINE_STATE, RUNS_DIR, "config.json", "report.json",
           "robustness.png", RUN_SETTINGS_FILE)  # fmt: skip
DEFAULT_PRETRAIN_EPOCHS = 20  # for the embedded default model, which starts from random weights
RUN_DEFAULTS: dict[str, Any] = {"output_dir": "outputs/finetune_nullspace"}
# What a resumed run must share with the interrupted one (the budget of runs finished before), and may change.
RESUMABLE_CHANGES = frozenset({"methods", "seeds"})
"""Settings a resumed run may change: adding methods or seeds adds runs with the same budget."""


class Configs(NamedTuple):
    """Everything a run is told; saved in report.json as ``{name: dataclasses.asdict(config)}``."""

    run: RunConfig
    finetuning: NullspaceFinetuningConfig
    augmentation: Augmentation
    evaluation: EvaluationConfig


class EvalSet(NamedTuple):
    """An extra test set (``--eval_sets NAME=PATH``)."""

    name: str
    dataset: ImageDataset
    class_indices: list[int]  # the model's class index of each of the set's classes, matched by class name


@dataclasses.dataclass
class FinetuningData:
    """The splits and the loaders (prepared), with how many batches each phase takes of them."""

    train_set: ImageDataset
    test_set: ImageDataset
    eval_sets: list[EvalSet]
    train_loader: DataLoader
    noise_loader: DataLoader  # unaugmented training images: the noise's eps criterion describes the data
    order: SamplerGenerator  # the training loader's shuffling generator
    batch_transform: Callable | None  # mixup / cutmix / label smoothing
    train_batches: int  # per process and epoch
    noise_batches: int  # per process and noise round
    noise_rounds: int  # per process


@dataclasses.dataclass
class FreshStart:
    """What every method and seed starts from, besides the baseline's weights."""

    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    adapters: dict[str, torch.Tensor] | None  # --lora_r: every run restarts with these adapters


class EpochNoise:
    """The noise an epoch trains with, checkpointed so that a run resumed inside the epoch trains with it too."""

    def __init__(self) -> None:
        self.noise: NullspaceNoise | None = None
        self.attempts = 0

    def state_dict(self) -> dict[str, Any]:
        if self.noise is None:
            return {}
        return {"noise": self.noise.noise.detach().cpu(), "stats": self.noise.stats(), "attempts": self.attempts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stats = NullspaceNoise.read_stats(state["stats"]) if state else None  # names as written, possibly before
        self.noise = NullspaceNoise(noise=state["noise"], **stats) if state else None
        self.attempts = state.get("attempts", 0)


@dataclasses.dataclass
class Setup:
    """What the build phase makes, all prepared in a fixed order (so that resume finds what save_state wrote)."""

    accelerator: Accelerator
    data: FinetuningData
    description: dict[str, Any]  # the model's (robustvit.training.load_model)
    net: torch.nn.Module  # PixelModel of the model
    pretraining: Trainer  # the baseline's optimizer and schedule
    finetuning: Trainer  # every run's optimizer and schedule, restarted from `fresh`
    epoch_noise: EpochNoise
    fresh: FreshStart


def with_batch_transform(loss_fn: Callable, transform: Callable | None) -> Callable:
    """Mixup / cutmix / label smoothing in front of a loss ``(model, images, labels)``."""
    if transform is None:
        return loss_fn

    def augmented(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_fn(model, *transform(images, labels))

    return augmented


def _noisy_loss(noise: torch.Tensor) -> Callable:
    def loss(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nullspace_finetuning_loss(model, images, targets, noise)

    return loss


def save_weights(accelerator: Accelerator, net: torch.nn.Module, path: Path) -> None:
    """The plain timm/transformers model's weights (inside the PixelModel), loadable without robustvit."""
    plain = robustvit.peft.merged(accelerator.unwrap_model(net).model)  # --lora_r: adapters merged in
    save_model(plain, str(path), metadata={"format": "pt"})


def compared_config(configs: Configs) -> dict[str, Any]:
    """The settings every run of one output folder shares (the budget), compared on resume."""
    return {
        **configs.run.result_settings(),
        **dataclasses.asdict(configs.finetuning),
        **dataclasses.asdict(configs.augmentation),
    }


def start(configs: Configs) -> tuple[Accelerator, Path]:
    """The run's Accelerator and output folder (refused if it holds another run)."""
    settings = {key: value for key, value in compared_config(configs).items() if key not in RESUMABLE_CHANGES}
    return start_run(configs, RECIPE, settings=settings, outputs=OUTPUTS, resumable_from=(BASELINE_STATE, PRETRAIN_DIR))


# --------------------------------------------------------------------------------------------------- build


def load_eval_set(spec: str, run: RunConfig, train_set: ImageDataset) -> EvalSet:
    """``NAME=PATH`` -> the set, with the model's class index of each of its classes (matched by class name)."""
    name, _, source = spec.partition("=")
    errors = []
    for split in dict.fromkeys((run.eval_split, "test", "validation", "train")):
        try:
            dataset = load_image_dataset(source, split=split, image_size=run.image_size, channels=run.channels)
            break
        except ValueError as err:
            errors.append(str(err))
    else:
        raise ValueError(f"could not load evaluation set {name!r} from {source!r}: {errors[-1]}")
    missing = sorted(set(dataset.class_names) - set(train_set.class_names))
    if missing:
        raise ValueError(
            f"evaluation set {name!r} has classes the model was not trained on (matched by class name, e.g. "
            f"ImageNet wnids): {missing[:5]}{'...' if len(missing) > 5 else ''}"
        )
    return EvalSet(name, dataset, [train_set.class_names.index(c) for c in dataset.class_names])


def build(accelerator: Accelerator, configs: Configs) -> Setup:
    run, finetuning, augmentation = configs.run, configs.finetuning, configs.augmentation
    train_set, test_set = load_splits(accelerator, run)
    with accelerator.main_process_first():  # a Hub dataset is downloaded once
        eval_sets = [load_eval_set(spec, run, train_set) for spec in configs.evaluation.eval_sets]
    model, description = load_source_model(run, train_set.num_classes)
    if finetuning.drop_path:
        set_drop_path(model, finetuning.drop_path)
    model = robustvit.peft.with_lora(model, finetuning.lora_r)  # --lora_r: LoRA (inside the constraint if converted)
    fresh_adapters = robustvit.peft.adapter_state(model) if finetuning.lora_r else None
    net = PixelModel(model)
    mean, std = net.input_mean.flatten().tolist(), net.input_std.flatten().tolist()
    train_data = AugmentedDataset(train_set, augmentation, mean=mean, std=std) if augmentation.per_image else train_set
    options = {"batch_size": finetuning.batch_size, "shuffle": True, "num_workers": run.num_workers}
    # The loaders' own generators shuffle: each run reseeds the training order, a checkpoint inside an epoch replays
    # it. The noise is synthesized on unaugmented images: the eps criterion describes the data, not its augmentation.
    train_loader = DataLoader(train_data, generator=torch.Generator().manual_seed(run.seed), **options)
    noise_loader = DataLoader(train_set, generator=torch.Generator().manual_seed(run.seed + 1), **options)
    order, epoch_noise = SamplerGenerator(train_loader.sampler), EpochNoise()
    accelerator.register_for_checkpointing(order, SamplerGenerator(noise_loader.sampler), epoch_noise)
    # Batches per process and epoch: the fraction of the (unsharded) loader, dealt out over the processes, capped.
    local_batches = -(-len(train_loader) // accelerator.num_processes)
    fraction = max(1, round(finetuning.train_data_fraction * len(train_loader)))
    wanted = min(-(-fraction // accelerator.num_processes), run.max_train_batches or local_batches)
    accumulation = accelerator.gradient_accumulation_steps
    if wanted < local_batches:  # whole accumulations
        wanted = max(accumulation, wanted // accumulation * accumulation)
    train_batches = epoch_batches(local_batches, wanted, accumulation)
    # The noise takes as many steps whatever the number of processes (more processes average its gradient over
    # more images): each process sees 1/num_processes of the batches per round, so it makes that many times the
    # rounds. Otherwise two processes would halve the steps and the noise would stop short of the eps-nullspace.
    noise_batches = max(1, round(finetuning.noise_data_fraction * len(noise_loader) / accelerator.num_processes))
    noise_rounds = finetuning.noise_rounds * accelerator.num_processes
    pretrain_optimizer = torch.optim.AdamW(
        net.parameters(), lr=finetuning.pretrain_lr, weight_decay=finetuning.weight_decay
    )
    pretrain_schedule = cosine_schedule(
        pretrain_optimizer, accelerator, epochs=finetuning.pretrain_epochs, batches_per_epoch=train_batches,
        warmup_epochs=1 if finetuning.pretrain_epochs > 1 else 0,
    )  # fmt: skip
    optimizer = torch.optim.AdamW(net.parameters(), lr=finetuning.lr, weight_decay=finetuning.weight_decay)
    schedule = cosine_schedule(optimizer, accelerator, epochs=finetuning.epochs, batches_per_epoch=train_batches)
    # Everything is prepared, in the same order, on every run, so that resume finds what save_state wrote.
    net, pretrain_optimizer, optimizer, pretrain_schedule, schedule, train_loader, noise_loader = accelerator.prepare(
        net, pretrain_optimizer, optimizer, pretrain_schedule, schedule, train_loader, noise_loader
    )
    data = FinetuningData(
        train_set=train_set, test_set=test_set, eval_sets=eval_sets, train_loader=train_loader,
        noise_loader=noise_loader, order=order, batch_transform=augmentation.batch_transform(train_set.num_classes),
        train_batches=train_batches, noise_batches=noise_batches, noise_rounds=noise_rounds,
    )  # fmt: skip
    return Setup(
        accelerator=accelerator,
        data=data,
        description=description,
        net=net,
        pretraining=Trainer(
            accelerator, net, train_loader, pretrain_optimizer, pretrain_schedule, train_batches, order
        ),
        finetuning=Trainer(accelerator, net, train_loader, optimizer, schedule, train_batches, order),
        epoch_noise=epoch_noise,
        fresh=FreshStart(
            optimizer=copy.deepcopy(optimizer.state_dict()),
            schedule=copy.deepcopy(schedule.state_dict()),
            adapters=fresh_adapters,
        ),
    )


# --------------------------------------------------------------------------------------------------- evaluation


def evaluate(setup: Setup, configs: Configs, noise: torch.Tensor) -> dict[str, Any]:
    """The robustness evaluation's JSON record (``RobustnessResult.to_dict()``)."""
    evaluation, seed = configs.evaluation, configs.run.seed
    result = evaluate_robustness(
        setup.net, setup.data.test_set, evaluation, noise=noise, accelerator=setup.accelerator,
        seed=seed,  # the same images and attack starts for every model
        progress=True,
    )  # fmt: skip
    if setup.data.eval_sets:
        result.eval_sets = {
            name: evaluate_accuracy(
                setup.net, data, evaluation, class_indices=indices, accelerator=setup.accelerator, seed=seed
            )
            for name, data, indices in setup.data.eval_sets
        }
    return result.to_dict()


def synthesize(
    setup: Setup, configs: Configs, kind: str, init: torch.Tensor | None = None, seed: int | None = None
) -> NullspaceNoise:
    finetuning = configs.finetuning
    return synthesize_noise(
        setup.net,
        setup.data.noise_loader,
        finetuning.noise_synthesis(kind=kind, rounds=setup.data.noise_rounds, max_batches=setup.data.noise_batches),
        init=init,
        accelerator=setup.accelerator,
        progress=True,
        generator=None if seed is None else torch.Generator().manual_seed(seed),
    )


def training_noise(setup: Setup, configs: Configs, kind: str, label: str) -> tuple[NullspaceNoise, int]:
    """The epoch's noise; with --unconverged_noise resynthesize, searched on until it reaches the tolerance."""
    finetuning = configs.finetuning
    noise, attempts = synthesize(setup, configs, kind), 1
    while not noise.reached_tolerance and finetuning.unconverged_noise == "resynthesize":
        if attempts > finetuning.noise_retries:
            raise RuntimeError(
                f"{label}: the {kind} noise did not reach the tolerance {finetuning.nullspace_tol} after "
                f"{attempts} searches (mean squared probability change {noise.prob_mse:.4f}). Raise "
                "--noise_rounds / --noise_retries, or pass --unconverged_noise train to train with it anyway; "
                "--resume continues from the last finished epoch"
            )
        noise, attempts = synthesize(setup, configs, kind, init=noise.noise), attempts + 1
    if not noise.reached_tolerance:
        logger.warning(
            f"{label}: the {kind} noise did NOT reach the tolerance (prob mse {noise.prob_mse:.4f} >= "
            f"{finetuning.nullspace_tol}); training with it, as --unconverged_noise train asks",
            main_process_only=True,
        )
    return noise, attempts


# --------------------------------------------------------------------------------------------------- phases


def pretrain_baseline(setup: Setup, configs: Configs) -> tuple[dict[str, Any], NullspaceNoise]:
    """The baseline every method starts from: the model, trained for --pretrain_epochs (resumable), its nullspace
    noise and its evaluation; saved once complete, or read back on --resume."""
    accelerator, run = setup.accelerator, configs.run
    output_dir = Path(run.output_dir)

    def train() -> tuple[dict[str, Any], NullspaceNoise]:
        state = pretrain(
            setup.pretraining, output_dir / PRETRAIN_DIR, epochs=configs.finetuning.pretrain_epochs, run=run,
            label="pretrain", loss_fn=with_batch_transform(cross_entropy, setup.data.batch_transform),
        )  # fmt: skip
        baseline: dict[str, Any] = {"config": compared_config(configs), "pretrain": state["history"], "timings": {}}
        baseline["timings"]["pretrain_seconds"] = sum(stats["seconds"] for stats in baseline["pretrain"])
        tick = time.perf_counter()
        noise, _ = training_noise(setup, configs, "nullspace", "baseline")
        baseline["timings"]["noise_seconds"] = time.perf_counter() - tick
        baseline["noise"] = noise.stats()
        baseline["evaluation"] = evaluate(setup, configs, noise.noise)
        return baseline, noise

    def save(made: tuple[dict[str, Any], NullspaceNoise]) -> None:
        baseline, noise = made
        save_weights(accelerator, setup.net, output_dir / BASELINE_WEIGHTS)
        noise.save(output_dir / BASELINE_NOISE)
        (output_dir / BASELINE_STATE).write_text(json.dumps(baseline, indent=2))  # marks the baseline done
        logger.info(
            f"baseline: clean accuracy {baseline['evaluation']['clean_accuracy']:.4f}; nullspace noise |v| "
            f"{noise.l2_norm:.2f} (prob mse {noise.prob_mse:.4f}, {noise.steps} steps); saved to {output_dir}"
        )

    def read_back() -> tuple[dict[str, Any], NullspaceNoise]:
        # start()'s check_run_settings made sure the runs still to come share its budget.
        baseline = json.loads((output_dir / BASELINE_STATE).read_text())
        return baseline, NullspaceNoise.load(output_dir / BASELINE_NOISE, device=accelerator.device)

    return done_once(
        accelerator, output_dir / BASELINE_STATE, resume=run.resume, produce=train, save=save, read_back=read_back,
        checkpoints=output_dir / PRETRAIN_DIR, label="baseline",
    )  # fmt: skip


def finetune(
    setup: Setup, configs: Configs, method_name: str, seed_index: int, baseline_noise: NullspaceNoise
) -> dict[str, Any]:
    """One method, one seed, from the saved baseline with a fresh optimizer and schedule; resumable, and read back
    once finished."""
    accelerator, run, finetuning = setup.accelerator, configs.run, configs.finetuning
    output_dir = Path(run.output_dir)
    run_dir = output_dir / RUNS_DIR / method_name / f"seed_{seed_index}"
    method, label = FINETUNING_METHODS[method_name], f"{method_name} seed {seed_index}"
    trainer, epoch_noise = setup.finetuning, setup.epoch_noise

    def run_epoch(epoch: int, **resume_kwargs: Any) -> dict[str, Any]:
        noise_tick, loss_fn = time.perf_counter(), cross_entropy
        if method.noise_kind is not None:  # re-synthesized against the current model every epoch (the paper)
            if not resume_kwargs.get("skip_steps"):  # a run resumed inside the epoch trains with its noise
                epoch_noise.noise, epoch_noise.attempts = training_noise(
                    setup, configs, method.noise_kind, f"{label} epoch {epoch}"
                )
            loss_fn = _noisy_loss(epoch_noise.noise.noise)
        noise_seconds = time.perf_counter() - noise_tick
        stats = trainer.epoch(
            with_batch_transform(loss_fn, setup.data.batch_transform), f"{label} epoch {epoch}", **resume_kwargs
        )
        entry = {**stats, "noise_seconds": noise_seconds}
        noise = epoch_noise.noise if method.noise_kind is not None else None
        if noise is not None:
            entry.update(noise=noise.stats(), noise_searches=epoch_noise.attempts)
        logger.info(
            f"{label} epoch {epoch}: loss {stats['loss']:.4f}, train {stats['seconds']:.1f} s"
            + (
                ""
                if noise is None
                else f", noise |v| {noise.l2_norm:.2f} (prob mse {noise.prob_mse:.4f}, reached tolerance "
                f"{noise.reached_tolerance}, {noise.steps} steps in {epoch_noise.attempts} search(es), "
                f"{noise_seconds:.1f} s)"
            ),
            main_process_only=True,
        )
        return entry

    def train() -> dict[str, Any]:
        if not (run.resume and latest_checkpoint(run_dir) is not None):
            robustvit.peft.load_base_weights(
                accelerator.unwrap_model(setup.net).model, output_dir / BASELINE_WEIGHTS, adapters=setup.fresh.adapters
            )
            trainer.optimizer.load_state_dict(copy.deepcopy(setup.fresh.optimizer))
            trainer.schedule.load_state_dict(copy.deepcopy(setup.fresh.schedule))
            set_seed(run.seed + seed_index)
            setup.data.order.generator.manual_seed(run.seed + seed_index)  # the same data order for every method
            epoch_noise.noise = None  # nothing carried over from the previous run
        tick = time.perf_counter()
        state = train_epochs(
            accelerator, run_dir, run_epoch, epochs=finetuning.epochs, run=run, name=f"{method_name}/seed_{seed_index}"
        )
        evaluation = evaluate(setup, configs, baseline_noise.noise)  # one noise for all: agreement compares methods
        # How large a nullspace noise the finetuned model admits (the paper: it grows with finetuning).
        final_noise = synthesize(setup, configs, "nullspace", seed=run.seed + seed_index)
        noises = [entry["noise"] for entry in state["history"] if "noise" in entry]
        return {
            "method": method_name,
            "seed": seed_index,
            "evaluation": evaluation,
            "history": state["history"],
            "noise_reached_tolerance": f"{sum(NullspaceNoise.read_stats(n)['reached_tolerance'] for n in noises)} "
            f"of {len(noises)}",
            "final_nullspace_noise": final_noise.stats(),
            "seconds": time.perf_counter() - tick,
        }

    def save(result: dict[str, Any]) -> None:
        save_weights(accelerator, setup.net, run_dir / "model.safetensors")
        (run_dir / RUN_RESULT).write_text(json.dumps(result, indent=2))  # marks the run done
        logger.info(
            f"{label}: clean accuracy {result['evaluation']['clean_accuracy']:.4f} ({result['seconds']:.0f} s); "
            f"saved to {run_dir}"
        )

    return done_once(
        accelerator, run_dir / RUN_RESULT, resume=run.resume, produce=train, save=save,
        read_back=lambda: json.loads((run_dir / RUN_RESULT).read_text()), checkpoints=run_dir / CHECKPOINTS_DIR,
        label=label,
    )  # fmt: skip


def finetune_methods(setup: Setup, configs: Configs, baseline_noise: NullspaceNoise) -> dict[str, list[dict[str, Any]]]:
    """Every method of --methods for every seed of --seeds: ``{method: [result of seed 0, ...]}``."""
    finetuning = configs.finetuning
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in finetuning.methods}
    for seed_index in range(finetuning.seeds):  # seed by seed: a complete comparison exists after the first
        for method_name in finetuning.methods:
            results[method_name].append(finetune(setup, configs, method_name, seed_index, baseline_noise))
    return results


def write_report(
    setup: Setup,
    configs: Configs,
    baseline: dict[str, Any],
    baseline_noise: NullspaceNoise,
    results: dict[str, list[dict[str, Any]]],
    started: float,
) -> dict[str, Any]:
    """report.json (the configs, the baseline, every run, the mean +- std table), robustness.png and config.json."""
    accelerator, output_dir = setup.accelerator, Path(configs.run.output_dir)
    summaries = {
        name: aggregate_seeds([RobustnessResult.from_dict(run["evaluation"]) for run in runs])
        for name, runs in results.items()
    }
    methods = {name: {"seeds": results[name], **summary.to_dict()} for name, summary in summaries.items()}
    baseline_result = RobustnessResult.from_dict(baseline["evaluation"])
    table = format_methods(baseline_result, summaries, reference="ce")
    accelerator.print(table)
    for name, summary in methods.items():
        reached = [  # runs finished before the rename: noise_reached_eps
            run.get("noise_reached_tolerance", run.get("noise_reached_eps"))
            for run in summary["seeds"]
            if FINETUNING_METHODS[name].noise_kind
        ]
        norms = [run["final_nullspace_noise"]["l2_norm"] for run in summary["seeds"]]
        accelerator.print(
            f"{name}: training noises that reached the tolerance per seed {reached or '-'}; nullspace noise norm after "
            f"finetuning {[round(n, 2) for n in norms]} (baseline {baseline_noise.l2_norm:.2f})"
        )
    num_images = baseline["evaluation"]["num_images"]
    report = {
        "config": {name: dataclasses.asdict(config) for name, config in configs._asdict().items()},
        "num_processes": accelerator.num_processes,
        "model": setup.description,
        "baseline": baseline,
        "methods": methods,
        "table": table,
        "one_image_points": 100 / num_images,
        "timings": {**baseline["timings"], "run_seconds": time.perf_counter() - started},
    }
    if accelerator.is_main_process:
        (output_dir / "config.json").write_text(json.dumps(setup.description, indent=2))
        (output_dir / "report.json").write_text(json.dumps(report, indent=2))
        plot_methods(baseline_result, summaries, output_dir / "robustness.png")
    logger.info(
        f"wrote report.json, robustness.png, config.json, the baseline and runs/<method>/seed_<k>/ to {output_dir}",
        main_process_only=True,
    )
    return report
