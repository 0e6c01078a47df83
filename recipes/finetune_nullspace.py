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
# Phases (robustvit.workflows.nullspace_finetuning): parse -> build (data, model, optimizers) -> pretrain (the
# baseline) -> train (each method and seed) -> evaluate -> save.
# Writes to --output_dir: pretrain/checkpoints/ (while the baseline trains), baseline.safetensors,
# baseline_noise.safetensors and baseline.json (the baseline, the noise synthesized against it and its evaluation);
# runs/<method>/seed_<k>/ with model.safetensors (finetuned weights of the plain timm/transformers model),
# result.json and, while it runs, checkpoints/checkpoint_<i>/ (Accelerate's save_state + training_state.json);
# config.json (model description), report.json (the configs as dataclasses.asdict, results) and robustness.png.

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from robustvit.configs import (
    EvaluationConfig,
    NullspaceFinetuningConfig,
    RunConfig,
    add_arguments,
    build_configs,
    file_defaults,
)
from robustvit.data import Augmentation
from robustvit.training import finish
from robustvit.workflows.nullspace_finetuning import (
    DEFAULT_PRETRAIN_EPOCHS,
    RUN_DEFAULTS,
    Configs,
    build,
    finetune_methods,
    pretrain_baseline,
    start,
    write_report,
)


def training_function(configs: Configs) -> dict[str, Any]:
    accelerator, _ = start(configs)
    started = time.perf_counter()
    setup = build(accelerator, configs)
    baseline, baseline_noise = pretrain_baseline(setup, configs)
    results = finetune_methods(setup, configs, baseline_noise)
    report = write_report(setup, configs, baseline, baseline_noise, results, started)
    finish(accelerator)
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
    add_arguments(parser.add_argument_group("run"), RunConfig, defaults=RUN_DEFAULTS)
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
