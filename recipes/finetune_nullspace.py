# Approximate-nullspace augmented finetuning of a vision transformer (Liu et al., "Approximate Nullspace Augmented
# Finetuning for Robust Vision Transformers", CPAL 2025), with Accelerate, against its controls.
#
# Every method in --methods finetunes the same saved baseline with the same budget (epochs, steps, learning rate,
# data order seed), once per seed in --seeds:
#   nullspace  each epoch synthesizes a universal token-space noise in the eps-approximate nullspace of the current
#              model (robustvit.nullspace.synthesize_noise), then trains on CE(clean) + CE(noisy);
#   random     the paper's control: the same, with Gaussian token noise shrunk x0.8 per step until within eps;
#   ce         a plain cross-entropy finetune.
# All are evaluated on the same test images (clean, agreement under the baseline's nullspace noise, FGSM and PGD
# with restarts in linf and l2, corruptions, and any --eval_sets), and the table reports mean +- std over seeds,
# marking differences within the spread as noise.
#
# With no arguments it runs offline on the embedded default: scikit-learn digits and a small timm ViT
# (robustvit.training.DEFAULT_MODEL), first trained from scratch for --pretrain_epochs as the "pretrained" baseline.
#
#   python recipes/finetune_nullspace.py                                   # default run: 3 methods x 2 seeds
#   python recipes/finetune_nullspace.py --resume                          # after an interruption: skips the
#                                                                          # finished runs, continues the current one
#   python recipes/finetune_nullspace.py --config recipes/configs/nullspace_vit_small_imagenet.yaml \
#       --dataset path/to/imagenet --eval_sets imagenet_r=path/to/imagenet-r   # the paper's ViT-S/16 setting
#   ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --main_process_port 29511 \
#       recipes/finetune_nullspace.py                                      # 2 CPU processes (gloo)
#
# Phases: parse -> build (data, model, optimizers) -> pretrain (the baseline) -> train (each method and seed) ->
# evaluate -> save. Writes to --output_dir: pretrain/checkpoints/ (while the baseline trains), baseline.safetensors,
# baseline_noise.safetensors and baseline.json (the baseline, the noise synthesized against it and its evaluation);
# runs/<method>/seed_<k>/ with model.safetensors (finetuned weights of the plain timm/transformers model),
# result.json and, while it runs, checkpoints/checkpoint_<i>/ (Accelerate's save_state + training_state.json);
# config.json (model description), report.json (the configs as dataclasses.asdict, results) and robustness.png.

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from safetensors.torch import save_model
from torch.utils.data import DataLoader

import robustvit.peft
from robustvit.configs import (
    EvaluationConfig,
    NullspaceFinetuningConfig,
    RunConfig,
    add_arguments,
    build_configs,
    file_defaults,
)
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
    build_accelerator,
    check_run_settings,
    cosine_schedule,
    epoch_batches,
    finish,
    latest_checkpoint,
    load_model,
    prepare_output_dir,
    set_drop_path,
    train_epoch,
    train_phase,
)

logger = get_logger(__name__)

BASELINE_WEIGHTS = "baseline.safetensors"
BASELINE_NOISE = "baseline_noise.safetensors"
BASELINE_STATE = "baseline.json"
PRETRAIN_DIR = "pretrain"  # the baseline pretraining's project folder: pretrain/checkpoints/checkpoint_<i>
RUNS_DIR = "runs"
RUN_RESULT = "result.json"
OUTPUTS = (PRETRAIN_DIR, BASELINE_WEIGHTS, BASELINE_NOISE, BASELINE_STATE, RUNS_DIR, "config.json", "report.json",
           "robustness.png", RUN_SETTINGS_FILE)  # fmt: skip
DEFAULT_PRETRAIN_EPOCHS = 20  # for the embedded default model, which starts from random weights
# What a resumed run must share with the interrupted one (the budget of runs finished before), and may change.
RESUMABLE_CHANGES = frozenset({"methods", "seeds"})
"""Settings a resumed run may change: adding methods or seeds adds runs with the same budget."""


class Configs(NamedTuple):
    """Everything a run is told; saved in report.json as ``{name: dataclasses.asdict(config)}``."""

    run: RunConfig
    finetuning: NullspaceFinetuningConfig
    augmentation: Augmentation
    evaluation: EvaluationConfig


class Setup(NamedTuple):
    """What the build phase makes: data, the model and both optimizers, all prepared in a fixed order."""

    accelerator: Accelerator
    train_set: ImageDataset
    test_set: ImageDataset
    eval_sets: list[tuple[str, ImageDataset, list[int]]]
    description: dict[str, Any]
    net: torch.nn.Module
    pretrain_optimizer: torch.optim.Optimizer
    optimizer: torch.optim.Optimizer
    pretrain_schedule: Any
    schedule: Any
    train_loader: DataLoader
    noise_loader: DataLoader
    order: SamplerGenerator  # the training loader's shuffling generator
    epoch_noise: EpochNoise
    batch_transform: Callable | None
    train_batches: int  # per process and epoch
    noise_batches: int
    noise_rounds: int
    fresh_optimizer: dict[str, Any]  # every method and seed starts from these and the baseline's weights
    fresh_schedule: dict[str, Any]
    fresh_adapters: dict[str, torch.Tensor] | None  # --lora_r: every run restarts with these adapters


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


def cross_entropy(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE with int labels or soft targets (mixup / label smoothing)."""
    return F.cross_entropy(model(images), targets)


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


# --------------------------------------------------------------------------------------------------- build


def load_eval_set(spec: str, run: RunConfig, train_set: ImageDataset) -> tuple[str, ImageDataset, list[int]]:
    """``NAME=PATH`` -> (name, dataset, the model's class index of each of its classes, matched by class name)."""
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
    return name, dataset, [train_set.class_names.index(c) for c in dataset.class_names]


def build(accelerator: Accelerator, configs: Configs) -> Setup:
    run, finetuning, augmentation = configs.run, configs.finetuning, configs.augmentation
    with accelerator.main_process_first():  # a Hub dataset is downloaded once
        train_set, test_set = (
            load_image_dataset(run.dataset, split=split, image_size=run.image_size, channels=run.channels)
            for split in (run.train_split, run.eval_split)
        )
        test_set = test_set.align_labels(train_set.class_names)  # labels by class name, from the training split
        eval_sets = [load_eval_set(spec, run, train_set) for spec in configs.evaluation.eval_sets]
    model, description = load_model(
        run.model, num_classes=train_set.num_classes, image_size=run.image_size, channels=run.channels
    )
    if run.require_pretrained and not description.get("pretrained", True):
        raise ValueError(
            f"--require_pretrained: no pretrained weights for {run.model!r} in the local Hugging Face cache. Fetch "
            "them first (e.g. `huggingface-cli download timm/vit_small_patch16_224.augreg_in21k_ft_in1k`) or drop "
            "the flag to start from random weights"
        )
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
    return Setup(
        accelerator, train_set, test_set, eval_sets, description, net, pretrain_optimizer, optimizer,
        pretrain_schedule, schedule, train_loader, noise_loader, order, epoch_noise,
        augmentation.batch_transform(train_set.num_classes), train_batches, noise_batches, noise_rounds,
        copy.deepcopy(optimizer.state_dict()), copy.deepcopy(schedule.state_dict()), fresh_adapters,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------- evaluation


def evaluate(setup: Setup, configs: Configs, noise: torch.Tensor) -> dict[str, Any]:
    """The robustness evaluation's JSON record (``RobustnessResult.to_dict()``)."""
    evaluation, seed = configs.evaluation, configs.run.seed
    result = evaluate_robustness(
        setup.net, setup.test_set, evaluation, noise=noise, accelerator=setup.accelerator,
        seed=seed,  # the same images and attack starts for every model
        progress=True,
    )  # fmt: skip
    if setup.eval_sets:
        result.eval_sets = {
            name: evaluate_accuracy(
                setup.net, data, evaluation, class_indices=indices, accelerator=setup.accelerator, seed=seed
            )
            for name, data, indices in setup.eval_sets
        }
    return result.to_dict()


def synthesize(
    setup: Setup, configs: Configs, kind: str, init: torch.Tensor | None = None, seed: int | None = None
) -> NullspaceNoise:
    finetuning = configs.finetuning
    return synthesize_noise(
        setup.net,
        setup.noise_loader,
        finetuning.noise_synthesis(kind=kind, rounds=setup.noise_rounds, max_batches=setup.noise_batches),
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
    if run.resume and (output_dir / BASELINE_STATE).is_file():
        baseline = json.loads((output_dir / BASELINE_STATE).read_text())
        # training_function's check_run_settings made sure the runs still to come share its budget.
        logger.info(f"baseline: read back from {output_dir / BASELINE_STATE}", main_process_only=True)
        return baseline, NullspaceNoise.load(output_dir / BASELINE_NOISE, device=accelerator.device)

    loss_fn = with_batch_transform(cross_entropy, setup.batch_transform)

    def run_epoch(epoch: int, **resume_kwargs: Any) -> dict[str, Any]:
        stats = train_epoch(
            accelerator, setup.net, setup.train_loader, setup.pretrain_optimizer, loss_fn,
            scheduler=setup.pretrain_schedule, max_batches=setup.train_batches, description=f"pretrain {epoch}",
            data_order=setup.order, **resume_kwargs,
        )  # fmt: skip
        logger.info(f"pretrain epoch {epoch}: loss {stats['loss']:.4f} ({stats['seconds']:.1f} s)")
        return stats

    state = train_phase(
        accelerator, output_dir / PRETRAIN_DIR, run_epoch, epochs=configs.finetuning.pretrain_epochs,
        resume=run.resume, checkpointing_steps=run.checkpointing_steps, name="pretrain",
    )  # fmt: skip
    baseline: dict[str, Any] = {"config": compared_config(configs), "pretrain": state["history"], "timings": {}}
    baseline["timings"]["pretrain_seconds"] = sum(stats["seconds"] for stats in baseline["pretrain"])
    tick = time.perf_counter()
    noise, _ = training_noise(setup, configs, "nullspace", "baseline")
    baseline["timings"]["noise_seconds"] = time.perf_counter() - tick
    baseline["noise"] = noise.stats()
    baseline["evaluation"] = evaluate(setup, configs, noise.noise)
    if accelerator.is_main_process:
        save_weights(accelerator, setup.net, output_dir / BASELINE_WEIGHTS)
        noise.save(output_dir / BASELINE_NOISE)
        (output_dir / BASELINE_STATE).write_text(json.dumps(baseline, indent=2))  # marks the baseline done
        shutil.rmtree(output_dir / PRETRAIN_DIR, ignore_errors=True)  # the baseline holds what they led to
    accelerator.wait_for_everyone()
    logger.info(
        f"baseline: clean accuracy {baseline['evaluation']['clean_accuracy']:.4f}; nullspace noise |v| "
        f"{noise.l2_norm:.2f} (prob mse {noise.prob_mse:.4f}, {noise.steps} steps); saved to {output_dir}",
        main_process_only=True,
    )
    return baseline, noise


def finetune(
    setup: Setup, configs: Configs, method_name: str, seed_index: int, baseline_noise: NullspaceNoise
) -> dict[str, Any]:
    """One method, one seed, from the saved baseline with a fresh optimizer and schedule; resumable."""
    accelerator, run, finetuning = setup.accelerator, configs.run, configs.finetuning
    output_dir = Path(run.output_dir)
    run_dir = output_dir / RUNS_DIR / method_name / f"seed_{seed_index}"
    method, label = FINETUNING_METHODS[method_name], f"{method_name} seed {seed_index}"
    if not (run.resume and latest_checkpoint(run_dir) is not None):
        robustvit.peft.load_base_weights(
            accelerator.unwrap_model(setup.net).model, output_dir / BASELINE_WEIGHTS, adapters=setup.fresh_adapters
        )
        setup.optimizer.load_state_dict(copy.deepcopy(setup.fresh_optimizer))
        setup.schedule.load_state_dict(copy.deepcopy(setup.fresh_schedule))
        set_seed(run.seed + seed_index)
        setup.order.generator.manual_seed(run.seed + seed_index)  # the same data order for every method
        setup.epoch_noise.noise = None  # nothing carried over from the previous run

    def run_epoch(epoch: int, **resume_kwargs: Any) -> dict[str, Any]:
        noise_tick, loss_fn = time.perf_counter(), cross_entropy
        if method.noise_kind is not None:  # re-synthesized against the current model every epoch (the paper)
            if not resume_kwargs.get("skip_steps"):  # a run resumed inside the epoch trains with its noise
                setup.epoch_noise.noise, setup.epoch_noise.attempts = training_noise(
                    setup, configs, method.noise_kind, f"{label} epoch {epoch}"
                )
            loss_fn = _noisy_loss(setup.epoch_noise.noise.noise)
        noise_seconds = time.perf_counter() - noise_tick
        stats = train_epoch(
            accelerator, setup.net, setup.train_loader, setup.optimizer,
            with_batch_transform(loss_fn, setup.batch_transform), scheduler=setup.schedule,
            max_batches=setup.train_batches, description=f"{label} epoch {epoch}", data_order=setup.order,
            **resume_kwargs,
        )  # fmt: skip
        entry = {**stats, "noise_seconds": noise_seconds}
        noise = setup.epoch_noise.noise if method.noise_kind is not None else None
        if noise is not None:
            entry.update(noise=noise.stats(), noise_searches=setup.epoch_noise.attempts)
        logger.info(
            f"{label} epoch {epoch}: loss {stats['loss']:.4f}, train {stats['seconds']:.1f} s"
            + (
                ""
                if noise is None
                else f", noise |v| {noise.l2_norm:.2f} (prob mse {noise.prob_mse:.4f}, reached eps "
                f"{noise.reached_tolerance}, {noise.steps} steps in {setup.epoch_noise.attempts} search(es), "
                f"{noise_seconds:.1f} s)"
            ),
            main_process_only=True,
        )
        return entry

    tick = time.perf_counter()
    state = train_phase(
        accelerator, run_dir, run_epoch, epochs=finetuning.epochs, resume=run.resume,
        checkpointing_steps=run.checkpointing_steps, name=f"{method_name}/seed_{seed_index}",
    )  # fmt: skip
    evaluation = evaluate(setup, configs, baseline_noise.noise)  # one noise for all: agreement compares methods
    # How large a nullspace noise the finetuned model admits (the paper: it grows with finetuning).
    final_noise = synthesize(setup, configs, "nullspace", seed=run.seed + seed_index)
    noises = [entry["noise"] for entry in state["history"] if "noise" in entry]
    result = {
        "method": method_name,
        "seed": seed_index,
        "evaluation": evaluation,
        "history": state["history"],
        "noise_reached_tolerance": f"{sum(NullspaceNoise.read_stats(n)['reached_tolerance'] for n in noises)} of "
        f"{len(noises)}",
        "final_nullspace_noise": final_noise.stats(),
        "seconds": time.perf_counter() - tick,
    }
    if accelerator.is_main_process:
        save_weights(accelerator, setup.net, run_dir / "model.safetensors")
        (run_dir / RUN_RESULT).write_text(json.dumps(result, indent=2))  # marks the run done
        shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
    accelerator.wait_for_everyone()
    logger.info(
        f"{label}: clean accuracy {evaluation['clean_accuracy']:.4f} ({result['seconds']:.0f} s); saved to {run_dir}",
        main_process_only=True,
    )
    return result


# --------------------------------------------------------------------------------------------------- the run


def training_function(configs: Configs) -> dict[str, Any]:
    run, finetuning = configs.run, configs.finetuning
    accelerator = build_accelerator(run, "finetune_nullspace", configs._asdict())
    output_dir = prepare_output_dir(
        accelerator, run.output_dir, resume=run.resume, overwrite=run.overwrite_output_dir, outputs=OUTPUTS,
        resumable_from=(BASELINE_STATE, PRETRAIN_DIR),
    )  # fmt: skip
    settings = {key: value for key, value in compared_config(configs).items() if key not in RESUMABLE_CHANGES}
    check_run_settings(accelerator, output_dir, "finetune_nullspace", settings, resume=run.resume)
    started = time.perf_counter()
    setup = build(accelerator, configs)
    baseline, baseline_noise = pretrain_baseline(setup, configs)

    results: dict[str, list[dict[str, Any]]] = {name: [] for name in finetuning.methods}
    for seed_index in range(finetuning.seeds):  # seed by seed: a complete comparison exists after the first
        for method_name in finetuning.methods:
            run_dir = output_dir / RUNS_DIR / method_name / f"seed_{seed_index}"
            if run.resume and (run_dir / RUN_RESULT).is_file():
                logger.info(f"{method_name} seed {seed_index}: finished before, skipped", main_process_only=True)
                results[method_name].append(json.loads((run_dir / RUN_RESULT).read_text()))
            else:
                results[method_name].append(finetune(setup, configs, method_name, seed_index, baseline_noise))
    report = write_report(setup, configs, baseline, baseline_noise, results, started)
    finish(accelerator)
    return report


def write_report(
    setup: Setup,
    configs: Configs,
    baseline: dict[str, Any],
    baseline_noise: NullspaceNoise,
    results: dict[str, list[dict[str, Any]]],
    started: float,
) -> dict[str, Any]:
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


def build_parser() -> argparse.ArgumentParser:
    """The recipe's flags: ``--config`` and one per field of its configs."""
    parser = argparse.ArgumentParser(
        description="Approximate-nullspace augmented finetuning of a vision transformer (Liu et al., CPAL 2025), "
        "with its controls.",
        allow_abbrev=False,  # one spelling per flag
    )
    parser.add_argument(
        "--config", default=None, help="YAML file of flag defaults (e.g. recipes/configs/*.yaml); flags override it"
    )
    add_arguments(parser.add_argument_group("finetuning (NullspaceFinetuningConfig)"), NullspaceFinetuningConfig)
    add_arguments(
        parser.add_argument_group("augmentation (robustvit.data.Augmentation; all off by default, for 8x8 digits)"),
        Augmentation,
    )
    add_arguments(parser.add_argument_group("evaluation (EvaluationConfig)"), EvaluationConfig)
    add_arguments(parser.add_argument_group("run"), RunConfig, defaults={"output_dir": "outputs/finetune_nullspace"})
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Configs:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        try:
            defaults = file_defaults(parser, yaml.safe_load(Path(known.config).read_text()) or {}, known.config)
        except ValueError as error:
            parser.error(str(error))
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.pretrain_epochs is None:
        args.pretrain_epochs = DEFAULT_PRETRAIN_EPOCHS if args.model is None else 0
    if args.lora_r and args.pretrain_epochs:
        parser.error(
            "--lora_r finetunes a pretrained baseline with LoRA; it would pretrain only the adapters. Pass "
            "--pretrain_epochs 0 (the default with --model)"
        )
    return Configs(*build_configs(parser, args, RunConfig, NullspaceFinetuningConfig, Augmentation, EvaluationConfig))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    return training_function(parse_args(argv))


if __name__ == "__main__":
    main()
