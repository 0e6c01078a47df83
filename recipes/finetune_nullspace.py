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
# Writes to --output_dir: baseline.safetensors, baseline_noise.safetensors and baseline.json (the baseline, the
# noise synthesized against it and its evaluation); runs/<method>/seed_<k>/ with model.safetensors (finetuned
# weights of the plain timm/transformers model), result.json and, while it runs, checkpoints/epoch_<e>/
# (accelerator.save_state + training_state.json); config.json (model description), report.json and robustness.png.

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_model
from torch.utils.data import DataLoader

import robustvit.peft
from robustvit.corruptions import corruption_names
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
from robustvit.training import (
    CHECKPOINTS_DIR,
    PixelModel,
    SamplerGenerator,
    add_recipe_arguments,
    cosine_schedule,
    finish,
    latest_checkpoint,
    load_model,
    resume_from_checkpoint,
    save_checkpoint,
    set_drop_path,
    train_epoch,
)

BASELINE_WEIGHTS = "baseline.safetensors"
BASELINE_NOISE = "baseline_noise.safetensors"
BASELINE_STATE = "baseline.json"
RUNS_DIR = "runs"
RUN_RESULT = "result.json"
DEFAULT_PRETRAIN_EPOCHS = 20  # for the embedded default model, which starts from random weights


class Method(NamedTuple):
    """A finetuning method: the token noise it trains with (``None``: plain cross-entropy)."""

    noise_kind: str | None
    description: str


METHODS: dict[str, Method] = {
    "nullspace": Method("nullspace", "CE(clean) + CE(tokens + eps-approximate nullspace noise), noise per epoch"),
    "ce": Method(None, "plain cross-entropy finetune, same budget"),
    "random": Method("random", "CE(clean) + CE(tokens + Gaussian noise shrunk x0.8 until within eps), per epoch"),
}


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


def save_weights(accelerator: Accelerator, net: torch.nn.Module, path: Path) -> None:
    """The plain timm/transformers model's weights (inside the PixelModel), loadable without robustvit."""
    plain = robustvit.peft.merged(accelerator.unwrap_model(net).model)  # --lora_r: adapters merged in
    save_model(plain, str(path), metadata={"format": "pt"})


def load_eval_set(spec: str, args: argparse.Namespace, train_set: ImageDataset) -> tuple[str, ImageDataset, list[int]]:
    """``NAME=PATH`` -> (name, dataset, the model's class index of each of its classes, matched by class name)."""
    name, _, source = spec.partition("=")
    if not name or not source:
        raise ValueError(f"--eval_sets takes NAME=PATH (an imagefolder directory or HF id), got {spec!r}")
    errors = []
    for split in dict.fromkeys((args.eval_split, "test", "validation", "train")):
        try:
            dataset = load_image_dataset(source, split=split, image_size=args.image_size, channels=args.channels)
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


def training_function(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    set_seed(config["seed"])
    output_dir = Path(args.output_dir)
    runs_dir = output_dir / RUNS_DIR
    if not args.resume and runs_dir.exists() and any(runs_dir.iterdir()):
        if not args.overwrite:
            raise FileExistsError(
                f"{output_dir} already holds finetuning runs; pass --resume to continue them, --overwrite to "
                "start again, or another --output_dir"
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(runs_dir)
    if args.resume and not (output_dir / BASELINE_STATE).is_file():
        raise FileNotFoundError(
            f"no complete baseline ({output_dir / BASELINE_STATE}) to resume from; run without --resume"
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def dataset(split: str) -> ImageDataset:
        return load_image_dataset(
            args.dataset, split=split, image_size=config["image_size"], channels=config["channels"]
        )

    with accelerator.main_process_first():  # a Hub dataset is downloaded once
        train_set = dataset(args.train_split)
        test_set = dataset(args.eval_split).align_labels(train_set.class_names)  # labels by class name
        eval_sets = [load_eval_set(spec, args, train_set) for spec in args.eval_sets]
    model, description = load_model(
        args.model, num_classes=train_set.num_classes, image_size=config["image_size"], channels=config["channels"]
    )
    if args.require_pretrained and not description.get("pretrained", True):
        raise ValueError(
            f"--require_pretrained: no pretrained weights for {args.model!r} in the local Hugging Face cache. Fetch "
            "them first (e.g. `huggingface-cli download timm/vit_small_patch16_224.augreg_in21k_ft_in1k`) or drop "
            "the flag to start from random weights"
        )
    if config["drop_path"]:
        set_drop_path(model, config["drop_path"])
    model = robustvit.peft.with_lora(model, config["lora_r"])  # --lora_r: LoRA (inside the constraint if converted)
    # --lora_r: every run restarts from the baseline with these adapters (None: the whole model is finetuned)
    fresh_adapters = robustvit.peft.adapter_state(model) if config["lora_r"] else None
    net = PixelModel(model)
    augmentation = Augmentation(
        **{name: config[name] for name in Augmentation.__dataclass_fields__}  # type: ignore[attr-defined]
    )
    train_data = (
        AugmentedDataset(
            train_set, augmentation, mean=net.input_mean.flatten().tolist(), std=net.input_std.flatten().tolist()
        )
        if augmentation.per_image
        else train_set
    )
    loader_options = {"batch_size": config["batch_size"], "shuffle": True, "num_workers": args.num_workers}
    train_loader = DataLoader(train_data, **loader_options)
    # The noise is synthesized on unaugmented images: the eps criterion describes the data, not its augmentation.
    noise_loader = DataLoader(train_set, **loader_options)
    for loader in (train_loader, noise_loader):  # data order survives a resume on several processes too
        accelerator.register_for_checkpointing(SamplerGenerator(loader.sampler))
    # Schedules count steps on the unsharded loader: Accelerate steps them once per process per optimizer step.
    steps_per_epoch = max(1, round(config["train_data_fraction"] * len(train_loader)))
    if args.max_train_batches is not None:  # a cap per process
        steps_per_epoch = min(steps_per_epoch, args.max_train_batches * accelerator.num_processes)
    train_batches = max(1, -(-steps_per_epoch // accelerator.num_processes))  # per process
    # The noise takes as many steps whatever the number of processes (more processes average its gradient over
    # more images): each process sees 1/num_processes of the batches per round, so it makes that many times the
    # rounds. Otherwise two processes would halve the steps and the noise would stop short of the eps-nullspace.
    noise_batches = max(1, round(config["noise_data_fraction"] * len(noise_loader) / accelerator.num_processes))
    noise_rounds = config["noise_rounds"] * accelerator.num_processes
    pretrain_optimizer = torch.optim.AdamW(
        net.parameters(), lr=config["pretrain_lr"], weight_decay=config["weight_decay"]
    )
    pretrain_schedule = cosine_schedule(
        pretrain_optimizer,
        total_steps=max(1, config["pretrain_epochs"] * steps_per_epoch),
        warmup_steps=steps_per_epoch if config["pretrain_epochs"] > 1 else 0,
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    schedule = cosine_schedule(optimizer, total_steps=max(1, config["epochs"] * steps_per_epoch))
    # Everything is prepared, in the same order, on every run, so that resume finds what save_state wrote.
    net, pretrain_optimizer, optimizer, pretrain_schedule, schedule, train_loader, noise_loader = accelerator.prepare(
        net, pretrain_optimizer, optimizer, pretrain_schedule, schedule, train_loader, noise_loader
    )
    # Every method and seed starts from these: the baseline's weights, a fresh optimizer and schedule.
    fresh_optimizer, fresh_schedule = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(schedule.state_dict())
    batch_transform = augmentation.batch_transform(train_set.num_classes)

    def evaluate(noise: torch.Tensor) -> dict[str, Any]:  # the JSON record (RobustnessResult.to_dict())
        result = evaluate_robustness(
            net,
            test_set,
            noise=noise,
            eps_linf=[radius / 255 for radius in args.linf_radii],
            eps_l2=[radius / 255 for radius in args.l2_radii],
            corruptions=args.corruptions,
            severities=args.severities,
            pgd_steps=args.pgd_steps,
            pgd_restarts=args.pgd_restarts,
            batch_size=args.eval_batch_size,
            max_images=args.max_eval_images,
            accelerator=accelerator,
            seed=config["seed"],  # the same images and attack starts for every model
            progress=True,
        )
        if eval_sets:
            result.eval_sets = {
                name: evaluate_accuracy(
                    net,
                    data,
                    class_indices=indices,
                    batch_size=args.eval_batch_size,
                    max_images=args.max_eval_images,
                    accelerator=accelerator,
                    seed=config["seed"],
                )
                for name, data, indices in eval_sets
            }
        return result.to_dict()

    def synthesize(kind: str, init: torch.Tensor | None = None, seed: int | None = None) -> NullspaceNoise:
        return synthesize_noise(
            net,
            noise_loader,
            eps=config["nullspace_tol"],
            kind=kind,
            init_limit=config["init_limit"],
            lr=config["noise_lr"],
            rounds=noise_rounds,
            max_batches=noise_batches,
            init=init,
            accelerator=accelerator,
            progress=False,
            generator=None if seed is None else torch.Generator().manual_seed(seed),
        )

    def training_noise(kind: str, label: str) -> tuple[NullspaceNoise, int]:
        """The epoch's noise; with --unconverged_noise resynthesize, searched on until it reaches eps."""
        noise, attempts = synthesize(kind), 1
        while not noise.reached_eps and config["unconverged_noise"] == "resynthesize":
            if attempts > config["noise_retries"]:
                raise RuntimeError(
                    f"{label}: the {kind} noise did not reach the tolerance {config['nullspace_tol']} after "
                    f"{attempts} searches (mean squared probability change {noise.prob_mse:.4f}). Raise "
                    "--noise_rounds / --noise_retries, or pass --unconverged_noise train to train with it anyway; "
                    "--resume continues from the last finished epoch"
                )
            noise, attempts = synthesize(kind, init=noise.noise), attempts + 1
        if not noise.reached_eps:
            accelerator.print(
                f"{label}: the {kind} noise did NOT reach eps (prob mse {noise.prob_mse:.4f} >= "
                f"{config['nullspace_tol']}); training with it, as --unconverged_noise train asks"
            )
        return noise, attempts

    # ------------------------------------------------------------------------------------------- the baseline
    if args.resume:
        baseline = json.loads((output_dir / BASELINE_STATE).read_text())
        # Runs finished before must have had the same budget as the ones still to come.
        changed = sorted(
            key
            for key in set(config) | set(baseline["config"])
            if key not in RESUMABLE_CHANGES and config.get(key) != baseline["config"].get(key)
        )
        if changed:
            raise ValueError(
                f"--resume with settings that differ from the interrupted run: {changed} (was "
                f"{ {key: baseline['config'].get(key) for key in changed} }); only {sorted(RESUMABLE_CHANGES)} may "
                "change on resume. Use the original flags, or --overwrite / another --output_dir to start again"
            )
        baseline_noise = NullspaceNoise.load(output_dir / BASELINE_NOISE, device=accelerator.device)
        accelerator.print("resumed: baseline read back from " + str(output_dir / BASELINE_STATE))
    else:
        baseline = {"config": config, "pretrain": [], "timings": {}}
        for epoch in range(config["pretrain_epochs"]):
            stats = train_epoch(
                accelerator,
                net,
                train_loader,
                pretrain_optimizer,
                with_batch_transform(cross_entropy, batch_transform),
                scheduler=pretrain_schedule,
                max_batches=train_batches,
                description=f"pretrain {epoch}",
            )
            baseline["pretrain"].append(stats)
            accelerator.print(f"pretrain epoch {epoch}: loss {stats['loss']:.4f} ({stats['seconds']:.1f} s)")
        baseline["timings"]["pretrain_seconds"] = sum(stats["seconds"] for stats in baseline["pretrain"])
        tick = time.perf_counter()
        baseline_noise, _ = training_noise("nullspace", "baseline")
        baseline["timings"]["noise_seconds"] = time.perf_counter() - tick
        baseline["noise"] = baseline_noise.stats()
        baseline["evaluation"] = evaluate(baseline_noise.noise)
        if accelerator.is_main_process:
            save_weights(accelerator, net, output_dir / BASELINE_WEIGHTS)
            baseline_noise.save(output_dir / BASELINE_NOISE)
            (output_dir / BASELINE_STATE).write_text(json.dumps(baseline, indent=2))  # marks the baseline done
        accelerator.wait_for_everyone()
        accelerator.print(
            f"baseline: clean accuracy {baseline['evaluation']['clean_accuracy']:.4f}; nullspace noise "
            f"|v| {baseline_noise.l2_norm:.2f} (prob mse {baseline_noise.prob_mse:.4f}, {baseline_noise.steps} steps)"
        )

    # ------------------------------------------------------------------------------------------- the controls
    def finetune(method_name: str, seed_index: int, run_dir: Path) -> dict[str, Any]:
        method, label = METHODS[method_name], f"{method_name} seed {seed_index}"
        path = latest_checkpoint(run_dir) if args.resume else None
        if path is not None:
            state = resume_from_checkpoint(accelerator, run_dir)
            accelerator.print(f"{label}: resumed from epoch {state['epoch']}")
        else:
            state = {"history": [], "epoch": -1}
            robustvit.peft.load_base_weights(
                accelerator.unwrap_model(net).model, output_dir / BASELINE_WEIGHTS, adapters=fresh_adapters
            )
            optimizer.load_state_dict(copy.deepcopy(fresh_optimizer))
            schedule.load_state_dict(copy.deepcopy(fresh_schedule))
            set_seed(config["seed"] + seed_index)
        tick = time.perf_counter()
        for epoch in range(state["epoch"] + 1, config["epochs"]):
            noise_tick, noise, attempts = time.perf_counter(), None, 0
            loss_fn = cross_entropy
            if method.noise_kind is not None:  # re-synthesized against the current model every epoch (the paper)
                noise, attempts = training_noise(method.noise_kind, f"{label} epoch {epoch}")
                loss_fn = _noisy_loss(noise.noise)
            noise_seconds = time.perf_counter() - noise_tick
            stats = train_epoch(
                accelerator,
                net,
                train_loader,
                optimizer,
                with_batch_transform(loss_fn, batch_transform),
                scheduler=schedule,
                max_batches=train_batches,
                description=f"{label} epoch {epoch}",
            )
            entry = {"epoch": epoch, **stats, "noise_seconds": noise_seconds}
            if noise is not None:
                entry.update(noise=noise.stats(), noise_searches=attempts)
            state["history"].append(entry)
            save_checkpoint(accelerator, run_dir, epoch, state)
            _prune_checkpoints(accelerator, run_dir, keep=epoch)
            accelerator.print(
                f"{label} epoch {epoch}: loss {stats['loss']:.4f}, train {stats['seconds']:.1f} s"
                + (
                    ""
                    if noise is None
                    else f", noise |v| {noise.l2_norm:.2f} (prob mse {noise.prob_mse:.4f}, "
                    f"reached eps {noise.reached_eps}, {noise.steps} steps in {attempts} search(es), "
                    f"{noise_seconds:.1f} s)"
                )
            )
        evaluation = evaluate(baseline_noise.noise)  # one noise for all: agreement compares across methods
        # How large a nullspace noise the finetuned model admits (the paper: it grows with finetuning).
        final_noise = synthesize("nullspace", seed=config["seed"] + seed_index)
        noises = [entry["noise"] for entry in state["history"] if "noise" in entry]
        result = {
            "method": method_name,
            "seed": seed_index,
            "evaluation": evaluation,
            "history": state["history"],
            "noise_reached_eps": f"{sum(n['reached_eps'] for n in noises)} of {len(noises)}",
            "final_nullspace_noise": final_noise.stats(),
            "seconds": time.perf_counter() - tick,
        }
        if accelerator.is_main_process:
            save_weights(accelerator, net, run_dir / "model.safetensors")
            (run_dir / RUN_RESULT).write_text(json.dumps(result, indent=2))  # marks the run done
            shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.print(f"{label}: clean accuracy {evaluation['clean_accuracy']:.4f} ({result['seconds']:.0f} s)")
        return result

    results: dict[str, list[dict[str, Any]]] = {name: [] for name in config["methods"]}
    for seed_index in range(config["seeds"]):  # seed by seed: a complete comparison exists after the first
        for method_name in config["methods"]:
            run_dir = runs_dir / method_name / f"seed_{seed_index}"
            if args.resume and (run_dir / RUN_RESULT).is_file():
                accelerator.print(f"{method_name} seed {seed_index}: finished before, skipped")
                results[method_name].append(json.loads((run_dir / RUN_RESULT).read_text()))
            else:
                results[method_name].append(finetune(method_name, seed_index, run_dir))

    summaries = {
        name: aggregate_seeds([RobustnessResult.from_dict(run["evaluation"]) for run in runs])
        for name, runs in results.items()
    }
    methods = {name: {"seeds": results[name], **summary.to_dict()} for name, summary in summaries.items()}
    table = format_methods(RobustnessResult.from_dict(baseline["evaluation"]), summaries, reference="ce")
    accelerator.print(table)
    for name, summary in methods.items():
        reached = [run["noise_reached_eps"] for run in summary["seeds"] if METHODS[name].noise_kind]
        norms = [run["final_nullspace_noise"]["l2_norm"] for run in summary["seeds"]]
        accelerator.print(
            f"{name}: training noises that reached eps per seed {reached or '-'}; nullspace noise norm after "
            f"finetuning {[round(n, 2) for n in norms]} (baseline {baseline_noise.l2_norm:.2f})"
        )
    num_images = baseline["evaluation"]["num_images"]
    report = {
        "config": config,
        "args": {key: value for key, value in vars(args).items() if key not in config},
        "num_processes": accelerator.num_processes,
        "model": description,
        "baseline": baseline,
        "methods": methods,
        "table": table,
        "one_image_points": 100 / num_images,
        "timings": {**baseline["timings"], "run_seconds": time.perf_counter() - started},
    }
    if accelerator.is_main_process:
        (output_dir / "config.json").write_text(json.dumps(description, indent=2))
        (output_dir / "report.json").write_text(json.dumps(report, indent=2))
        plot_methods(RobustnessResult.from_dict(baseline["evaluation"]), summaries, output_dir / "robustness.png")
    finish(accelerator)
    return report


def _noisy_loss(noise: torch.Tensor) -> Callable:
    def loss(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nullspace_finetuning_loss(model, images, targets, noise)

    return loss


def _prune_checkpoints(accelerator: Accelerator, run_dir: Path, keep: int) -> None:
    """Only the latest complete checkpoint of a run is needed to resume it."""
    if accelerator.is_main_process:
        for path in (run_dir / CHECKPOINTS_DIR).glob("epoch_*"):
            if path.name != f"epoch_{keep}":
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()


# Saved in report.json as "config"; everything else is the environment.
CONFIG_KEYS = (
    "methods",
    "seeds",
    "epochs",
    "lr",
    "weight_decay",
    "batch_size",
    "train_data_fraction",
    "nullspace_tol",
    "init_limit",
    "noise_lr",
    "noise_rounds",
    "noise_data_fraction",
    "unconverged_noise",
    "noise_retries",
    "rand_augment",
    "color_jitter",
    "hflip",
    "crop_scale",
    "random_erasing",
    "mixup",
    "cutmix",
    "label_smoothing",
    "drop_path",
    "lora_r",
    "pretrain_epochs",
    "pretrain_lr",
    "image_size",
    "channels",
    "seed",
)


RESUMABLE_CHANGES = frozenset({"methods", "seeds"})
"""Settings a resumed run may change: adding methods or seeds adds runs with the same budget."""


def _method_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a comma-separated list of distinct methods from {sorted(METHODS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Approximate-nullspace augmented finetuning of a vision transformer (Liu et al., CPAL 2025), "
        "with its controls."
    )
    parser.add_argument(
        "--config", default=None, help="YAML file of flag defaults (e.g. recipes/configs/*.yaml); flags override it"
    )
    hyper = parser.add_argument_group("hyper-parameters (saved in report.json as 'config')")
    hyper.add_argument(
        "--methods",
        type=_method_list,
        default=list(METHODS),
        help=f"comma-separated, from {','.join(METHODS)} (default: all, each from the same baseline and budget)",
    )
    hyper.add_argument("--seeds", type=int, default=2, help="runs of each method, with seeds seed, seed+1, ...")
    hyper.add_argument("--epochs", type=int, default=4, help="finetuning epochs (one noise synthesis each)")
    hyper.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the finetuning")
    hyper.add_argument("--weight_decay", type=float, default=0.05)
    hyper.add_argument("--batch_size", type=int, default=64, help="per process")
    hyper.add_argument(
        "--train_data_fraction",
        type=float,
        default=1.0,
        help="fraction of the training batches per epoch (paper: 0.004)",
    )
    hyper.add_argument(
        "--nullspace_tol",
        type=float,
        default=0.03,
        help="the paper's epsilon: tolerance on the mean squared softmax-probability change under the noise "
        "(not an attack radius)",
    )
    hyper.add_argument("--init_limit", type=float, default=3.0, help="noise init U(-init_limit, init_limit)")
    hyper.add_argument("--noise_lr", type=float, default=0.1, help="AdamW learning rate of the noise (near constant)")
    # The paper: 3 rounds over 10% of ImageNet, thousands of AdamW steps. 10% of digits is 2 batches, and 6 steps
    # leave the U(-3, 3) noise far outside the eps-nullspace; 6 rounds over all of it (~140 steps) reach it.
    hyper.add_argument("--noise_rounds", type=int, default=6, help="passes over the noise data per synthesis")
    hyper.add_argument(
        "--noise_data_fraction", type=float, default=1.0, help="fraction of the training batches per noise round"
    )
    hyper.add_argument(
        "--lora_r",
        type=int,
        default=0,
        help="LoRA rank (robustvit.peft): every method finetunes fresh adapters on the baseline; 0 trains all "
        "parameters",
    )
    hyper.add_argument(
        "--unconverged_noise",
        choices=("resynthesize", "train"),
        default="resynthesize",
        help="a noise that did not reach eps: search on from it (up to --noise_retries more times, then stop with "
        "an error), or train with it as the paper's code does",
    )
    hyper.add_argument("--noise_retries", type=int, default=3)
    augment = parser.add_argument_group("augmentation (timm; all off by default, which suits the 8x8 digits)")
    augment.add_argument("--rand_augment", default=None, help="timm RandAugment spec (paper: rand-m9-mstd0.5-inc1)")
    augment.add_argument("--color_jitter", type=float, default=0.0, help="paper: 0.4 (unused with RandAugment)")
    augment.add_argument("--hflip", type=float, default=0.0, help="paper: 0.5 (timm's default)")
    augment.add_argument("--crop_scale", type=float, default=1.0, help="random-resized-crop min area (paper: 0.08)")
    augment.add_argument("--random_erasing", type=float, default=0.0, help="paper: 0.25")
    augment.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (paper: 0.8)")
    augment.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (paper: 1.0)")
    augment.add_argument("--label_smoothing", type=float, default=0.0, help="paper: 0.1")
    augment.add_argument("--drop_path", type=float, default=0.0, help="stochastic depth, timm ViTs (paper: 0.25)")
    hyper.add_argument(
        "--pretrain_epochs",
        type=int,
        default=None,
        help=f"plain CE training before finetuning (default {DEFAULT_PRETRAIN_EPOCHS} for the embedded model, else 0)",
    )
    run = parser.add_argument_group("environment and evaluation")
    add_recipe_arguments(hyper, run, output_dir="outputs/finetune_nullspace")
    run.add_argument("--overwrite", action="store_true", help="discard the runs already in --output_dir")
    run.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="default: accelerate's")
    run.add_argument(
        "--require_pretrained", action=argparse.BooleanOptionalAction, default=False, help="refuse random weights"
    )
    run.add_argument("--num_workers", type=int, default=0, help="DataLoader workers")
    run.add_argument("--train_split", default="train")
    run.add_argument("--eval_split", default="test", help="e.g. validation for ImageNet")
    run.add_argument(
        "--eval_sets",
        nargs="*",
        default=[],
        metavar="NAME=PATH",
        help="extra test sets (imagefolder dir or HF id, e.g. ImageNet-R/-A/-Sketch/-V2), scored by clean accuracy "
        "over their classes, matched to the training classes by name",
    )
    run.add_argument(
        "--max_eval_images", type=int, default=None, help="evaluate a stratified random subset of N test images"
    )
    run.add_argument("--eval_batch_size", type=int, default=128)
    # One radius per norm by default: PGD with 50 steps x 2 restarts dominates the run time on CPU.
    run.add_argument("--linf_radii", nargs="*", type=float, default=[2.0], help="FGSM/PGD linf radii, in 1/255")
    run.add_argument("--l2_radii", nargs="*", type=float, default=[72.0], help="FGSM/PGD l2 radii, in 1/255")
    run.add_argument("--pgd_steps", type=int, default=50)
    run.add_argument("--pgd_restarts", type=int, default=2)
    run.add_argument("--corruptions", nargs="*", default=None, choices=corruption_names(), help="default: all")
    run.add_argument("--severities", nargs="+", type=int, default=[1, 3, 5])
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[dict[str, Any], argparse.Namespace]:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        defaults = yaml.safe_load(Path(known.config).read_text()) or {}
        flags = {action.dest for action in parser._actions}
        unknown = sorted(set(defaults) - flags)
        if not isinstance(defaults, dict) or unknown:
            parser.error(f"--config {known.config}: unknown settings {unknown}; use the flag names without '--'")
        if "methods" in defaults and isinstance(defaults["methods"], str):
            defaults["methods"] = _method_list(defaults["methods"])
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.pretrain_epochs is None:
        args.pretrain_epochs = DEFAULT_PRETRAIN_EPOCHS if args.model is None else 0
    for name in ("epochs", "pretrain_epochs", "noise_retries", "num_workers", "lora_r"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0")
    if args.lora_r and args.pretrain_epochs:
        parser.error(
            "--lora_r finetunes a pretrained baseline with LoRA; it would pretrain only the adapters. Pass "
            "--pretrain_epochs 0 (the default with --model)"
        )
    for name in ("seeds", "pgd_steps", "pgd_restarts", "noise_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    for name in ("noise_data_fraction", "train_data_fraction"):
        if not 0 < getattr(args, name) <= 1:
            parser.error(f"--{name} must be in (0, 1]")
    if any(not radius > 0 for radius in (*args.linf_radii, *args.l2_radii)):
        parser.error("attack radii must be > 0")
    if not args.nullspace_tol > 0:
        parser.error("--nullspace_tol must be > 0")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other")
    try:
        Augmentation(**{name: getattr(args, name) for name in Augmentation.__dataclass_fields__})
    except ValueError as err:
        parser.error(str(err))
    return {name: getattr(args, name) for name in CONFIG_KEYS}, args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config, args = parse_args(argv)
    return training_function(config, args)


if __name__ == "__main__":
    main()
