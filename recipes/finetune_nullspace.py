# Approximate-nullspace augmented finetuning of a vision transformer (Liu et al., "Approximate Nullspace Augmented
# Finetuning for Robust Vision Transformers", CPAL 2025), with Accelerate.
#
# Each epoch synthesizes a universal token-space noise in the eps-approximate nullspace of the current model
# (robustvit.nullspace.synthesize_noise), then trains on CE(clean) + CE(noisy) with AdamW. Robustness (clean,
# FGSM/PGD in linf and l2, corruptions, agreement under the first noise) is measured before and after.
#
# With no arguments it runs offline on the embedded default: scikit-learn digits and a small timm ViT
# (robustvit.training.DEFAULT_MODEL), first trained from scratch for --pretrain_epochs as the "pretrained" baseline.
#
#   python recipes/finetune_nullspace.py                                   # default run, a few minutes on CPU
#   python recipes/finetune_nullspace.py --epochs 10 --resume              # continue from the last checkpoint
#   python recipes/finetune_nullspace.py --model vit_small_patch16_224 --dataset path/to/imagefolder --image_size 224
#   ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --main_process_port 29511 \
#       recipes/finetune_nullspace.py                                      # 2 CPU processes (gloo)
#
# Writes to --output_dir: baseline.safetensors and baseline_noise.safetensors (the pretrained baseline and the
# noise synthesized against it), checkpoints/epoch_<e>/ (accelerator.save_state + training_state.json),
# model.safetensors (finetuned weights of the plain timm/transformers model), config.json (model description),
# report.json (settings, before/after metrics, per-epoch history, timings) and robustness.png.

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_model
from torch.utils.data import DataLoader

import robustvit.peft
from robustvit.corruptions import corruption_names
from robustvit.data import load_image_dataset
from robustvit.evaluation import evaluate_robustness, format_comparison, plot_comparison
from robustvit.nullspace import NullspaceNoise, nullspace_finetuning_loss, synthesize_noise
from robustvit.training import (
    PixelModel,
    SamplerGenerator,
    add_recipe_arguments,
    cosine_schedule,
    finish,
    load_model,
    resume_from_checkpoint,
    save_checkpoint,
    train_epoch,
)

BASELINE_WEIGHTS = "baseline.safetensors"
BASELINE_NOISE = "baseline_noise.safetensors"
DEFAULT_PRETRAIN_EPOCHS = 20  # for the embedded default model, which starts from random weights


def cross_entropy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(images), labels)


def save_weights(accelerator: Accelerator, net: torch.nn.Module, path: Path) -> None:
    """The plain timm/transformers model's weights (inside the PixelModel), loadable without robustvit."""
    plain = robustvit.peft.merged(accelerator.unwrap_model(net).model)  # --lora_r: adapters merged in
    save_model(plain, str(path), metadata={"format": "pt"})


def training_function(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    accelerator = Accelerator(cpu=args.cpu)
    set_seed(config["seed"])
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    with accelerator.main_process_first():  # a Hub dataset is downloaded once
        train_set = load_image_dataset(
            args.dataset, split="train", image_size=config["image_size"], channels=config["channels"]
        )
        test_set = load_image_dataset(
            args.dataset, split="test", image_size=config["image_size"], channels=config["channels"]
        )
    model, description = load_model(
        args.model, num_classes=train_set.num_classes, image_size=config["image_size"], channels=config["channels"]
    )
    model = robustvit.peft.with_lora(model, config["lora_r"])  # --lora_r: LoRA (inside the constraint if converted)
    net = PixelModel(model)

    train_loader = DataLoader(train_set, batch_size=config["batch_size"], shuffle=True)
    noise_loader = DataLoader(train_set, batch_size=config["batch_size"], shuffle=True)
    for loader in (train_loader, noise_loader):  # data order survives a resume on several processes too
        accelerator.register_for_checkpointing(SamplerGenerator(loader.sampler))
    # Schedules count steps on the unsharded loader: Accelerate steps them once per process per optimizer step.
    steps_per_epoch = len(train_loader)
    if args.max_train_batches is not None:  # a cap per process
        steps_per_epoch = min(steps_per_epoch, args.max_train_batches * accelerator.num_processes)
    # The noise takes as many AdamW steps whatever the number of processes (more processes average its gradient
    # over more images): each process sees 1/num_processes of the batches per round, so it makes that many times
    # the rounds. Otherwise two processes would halve the steps and the noise would stop short of the eps-nullspace.
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

    def evaluate(noise: torch.Tensor) -> dict[str, Any]:
        return evaluate_robustness(
            net,
            test_set,
            noise=noise,
            corruptions=args.corruptions,
            severities=args.severities,
            pgd_steps=args.pgd_steps,
            batch_size=args.eval_batch_size,
            max_images=args.max_eval_images,
            accelerator=accelerator,
            seed=config["seed"],
            progress=True,
        )

    def synthesize() -> NullspaceNoise:
        return synthesize_noise(
            net,
            noise_loader,
            eps=config["eps"],
            init_limit=config["init_limit"],
            lr=config["noise_lr"],
            rounds=noise_rounds,
            max_batches=noise_batches,
            accelerator=accelerator,
            progress=False,
        )

    if args.resume:
        state = resume_from_checkpoint(accelerator, output_dir)
        start_epoch = state["epoch"] + 1
        accelerator.print(f"resumed from epoch {state['epoch']}; continuing at epoch {start_epoch}")
        baseline_noise = NullspaceNoise.load(output_dir / BASELINE_NOISE, device=accelerator.device)
    else:
        state = {"history": [], "pretrain": [], "timings": {}}
        start_epoch = 0
        for epoch in range(config["pretrain_epochs"]):
            stats = train_epoch(
                accelerator,
                net,
                train_loader,
                pretrain_optimizer,
                cross_entropy,
                scheduler=pretrain_schedule,
                max_batches=args.max_train_batches,
                description=f"pretrain {epoch}",
            )
            state["pretrain"].append(stats)
            accelerator.print(f"pretrain epoch {epoch}: loss {stats['loss']:.4f} ({stats['seconds']:.1f} s)")
        state["timings"]["pretrain_seconds"] = sum(stats["seconds"] for stats in state["pretrain"])
        tick = time.perf_counter()
        baseline_noise = synthesize()
        state["timings"]["baseline_noise_seconds"] = time.perf_counter() - tick
        state["baseline"] = evaluate(baseline_noise.noise)
        if accelerator.is_main_process:
            save_weights(accelerator, net, output_dir / BASELINE_WEIGHTS)
            baseline_noise.save(output_dir / BASELINE_NOISE)
        state["baseline_noise"] = baseline_noise.stats()
        accelerator.print(
            f"baseline: clean accuracy {state['baseline']['clean_accuracy']:.4f}; "
            f"noise |v| {baseline_noise.l2_norm:.2f} (prob mse {baseline_noise.prob_mse:.4f}, "
            f"{baseline_noise.steps} steps)"
        )

    for epoch in range(start_epoch, config["epochs"]):
        tick = time.perf_counter()
        # The paper re-synthesizes the noise against the current model every epoch; at epoch 0 that is the
        # baseline, whose noise was just synthesized.
        noise = baseline_noise if epoch == 0 else synthesize()
        noise_seconds = time.perf_counter() - tick
        stats = train_epoch(
            accelerator,
            net,
            train_loader,
            optimizer,
            partial(nullspace_finetuning_loss, noise=noise.noise),
            scheduler=schedule,
            max_batches=args.max_train_batches,
            description=f"finetune {epoch}",
        )
        entry = {"epoch": epoch, "noise": noise.stats(), "noise_seconds": noise_seconds, **stats}
        state["history"].append(entry)
        save_checkpoint(accelerator, output_dir, epoch, state)
        accelerator.print(
            f"epoch {epoch}: loss {stats['loss']:.4f}, noise |v| {noise.l2_norm:.2f} "
            f"(prob mse {noise.prob_mse:.4f}, reached eps {noise.reached_eps}, {noise.steps} steps, "
            f"{noise_seconds:.1f} s), train {stats['seconds']:.1f} s"
        )

    tick = time.perf_counter()
    final_noise = synthesize()
    state["timings"]["final_noise_seconds"] = time.perf_counter() - tick
    after = evaluate(baseline_noise.noise)
    before = state["baseline"]
    accelerator.print(format_comparison(before, after))
    accelerator.print(
        f"eps-approximate nullspace noise norm (eps={config['eps']}): baseline {baseline_noise.l2_norm:.2f} -> "
        f"finetuned {final_noise.l2_norm:.2f} (reached eps: {baseline_noise.reached_eps} -> {final_noise.reached_eps})"
    )
    report = {
        "config": config,
        "args": {key: value for key, value in vars(args).items() if key not in config},
        "num_processes": accelerator.num_processes,
        "model": description,
        "before": before,
        "after": after,
        "noise": {"baseline": state["baseline_noise"], "final": final_noise.stats()},
        "pretrain": state["pretrain"],
        "history": state["history"],
        "timings": {**state["timings"], "run_seconds": time.perf_counter() - started},
    }
    if accelerator.is_main_process:
        save_weights(accelerator, net, output_dir / "model.safetensors")
        (output_dir / "config.json").write_text(json.dumps(description, indent=2))
        (output_dir / "report.json").write_text(json.dumps(report, indent=2))
        plot_comparison(before, after, output_dir / "robustness.png", labels=("baseline", "nullspace-finetuned"))
    finish(accelerator)
    return report


def parse_args(argv: Sequence[str] | None = None) -> tuple[dict[str, Any], argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description="Approximate-nullspace augmented finetuning of a vision transformer (Liu et al., CPAL 2025)."
    )
    hyper = parser.add_argument_group("hyper-parameters (saved in report.json as 'config')")
    hyper.add_argument("--epochs", type=int, default=8, help="finetuning epochs (one noise synthesis each)")
    hyper.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the finetuning")
    hyper.add_argument("--weight_decay", type=float, default=0.05)
    hyper.add_argument("--batch_size", type=int, default=64, help="per process")
    hyper.add_argument("--eps", type=float, default=0.03, help="tolerance on the mean squared probability change")
    hyper.add_argument("--init_limit", type=float, default=3.0, help="noise init U(-init_limit, init_limit)")
    hyper.add_argument("--noise_lr", type=float, default=0.1, help="AdamW learning rate of the noise")
    # The paper: 3 rounds over 10% of ImageNet, thousands of AdamW steps. 10% of digits is 2 batches, and 6 steps
    # leave the U(-3, 3) noise far outside the eps-nullspace; 6 rounds over all of it (~140 steps) reach it.
    hyper.add_argument("--noise_rounds", type=int, default=6, help="passes over the noise data per synthesis")
    hyper.add_argument(
        "--noise_data_fraction", type=float, default=1.0, help="fraction of the training batches per noise round"
    )
    hyper.add_argument("--lora_r", type=int, default=0, help="LoRA rank (robustvit.peft); 0 trains all parameters")
    hyper.add_argument(
        "--pretrain_epochs",
        type=int,
        default=None,
        help=f"plain CE training before finetuning (default {DEFAULT_PRETRAIN_EPOCHS} for the embedded model, else 0)",
    )
    run = parser.add_argument_group("environment and evaluation")
    add_recipe_arguments(hyper, run, output_dir="outputs/finetune_nullspace")
    run.add_argument("--max_eval_images", type=int, default=None, help="evaluate the first N test images")
    run.add_argument("--eval_batch_size", type=int, default=128)
    run.add_argument("--pgd_steps", type=int, default=10)
    run.add_argument("--corruptions", nargs="+", default=None, choices=corruption_names(), help="default: all")
    run.add_argument("--severities", nargs="+", type=int, default=[1, 3, 5])
    args = parser.parse_args(argv)
    if args.pretrain_epochs is None:
        args.pretrain_epochs = DEFAULT_PRETRAIN_EPOCHS if args.model is None else 0
    for name in ("epochs", "pretrain_epochs", "lora_r"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0")
    if not 0 < args.noise_data_fraction <= 1:
        parser.error("--noise_data_fraction must be in (0, 1]")
    config = {
        name: getattr(args, name)
        for name in (
            "epochs",
            "lr",
            "weight_decay",
            "batch_size",
            "eps",
            "init_limit",
            "noise_lr",
            "noise_rounds",
            "noise_data_fraction",
            "lora_r",
            "pretrain_epochs",
            "pretrain_lr",
            "image_size",
            "channels",
            "seed",
        )
    }
    return config, args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config, args = parse_args(argv)
    return training_function(config, args)


if __name__ == "__main__":
    main()
