# Lipschitz-margin training of a converted vision transformer, then certification, with Accelerate.
#
# The source model is converted with robustvit.convert (token shift, CenterNorm, spectrally rescaled layers), then
# trained with a Lipschitz-margin loss (EMMA by default) whose radius ramps up over training (EpsSchedule), with
# optional distillation from the unconverted source. At the end the eval split is certified: certificate.json,
# certified_accuracy.png, metrics.json, and a robustvit model folder ready for `robustvit push`.
#
# With no arguments it runs offline on the embedded default: scikit-learn digits and the small timm ViT of
# robustvit.training.DEFAULT_MODEL, first trained from scratch for --pretrain_epochs as the source.
#
#   python recipes/train_lipschitz.py                                      # default run, a few minutes on CPU
#   python recipes/train_lipschitz.py --epochs 30 --resume                 # continue from the last checkpoint
#   accelerate launch recipes/train_lipschitz.py --model vit_small_patch16_224 --dataset path/to/imagefolder \
#       --image_size 224 --distill 1.0 --mixed_precision bf16 --gradient_accumulation_steps 4 --with_tracking
#   ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --main_process_port 29512 \
#       recipes/train_lipschitz.py                                         # 2 CPU processes (gloo)
#
# Phases (robustvit.workflows.lipschitz_training, which bench/bench_transfer.py runs too): parse -> build (data,
# model) -> pretrain (the source) -> convert -> train (margin) -> certify -> save.
# Writes to --output_dir: pretrain/checkpoints/ (while the source trains), source/ (the source model as a timm or
# transformers folder: --model <output_dir>/source --pretrain_epochs 0 starts another run from it), source.safetensors,
# checkpoints/checkpoint_<i>/ (Accelerate's save_state + training_state.json, newest --checkpoints_total_limit kept),
# model/ (robustvit.save_pretrained: weights, config, certificate, card), certificate.json, certified_accuracy.png
# and metrics.json (the configs as dataclasses.asdict, history, results).

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from typing import Any

from robustvit.configs import (
    CertificationConfig,
    ConvertConfig,
    LipschitzTrainingConfig,
    RunConfig,
    add_arguments,
    build_configs,
)
from robustvit.training import finish
from robustvit.workflows.lipschitz_training import (
    CONVERT_DEFAULTS,
    RUN_DEFAULTS,
    TRAINING_DEFAULTS,
    Configs,
    build_data,
    build_source,
    certify_and_save,
    convert_source,
    pretrain_source,
    recipe_configs,
    start,
    train_margin,
)


def training_function(configs: Configs) -> dict[str, Any]:
    accelerator, _ = start(configs)
    started = time.perf_counter()
    data = build_data(accelerator, configs)
    source, description = build_source(configs, data)
    source = pretrain_source(accelerator, configs, source, data)
    model = convert_source(configs, source, data)
    model, history = train_margin(accelerator, configs, model, source, data)
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        metrics = certify_and_save(
            accelerator, configs, model, data, description=description, history=history, started=started
        )
    finish(accelerator)
    return metrics


def build_parser() -> argparse.ArgumentParser:
    """The recipe's flags: one per field of its configs (``--eps`` is the training radius; the certificate reports
    CertificationConfig's default radii)."""
    parser = argparse.ArgumentParser(
        description="Lipschitz-margin training and certification of a converted ViT.", allow_abbrev=False
    )
    add_arguments(
        parser.add_argument_group("training (LipschitzTrainingConfig)"), LipschitzTrainingConfig,
        defaults=TRAINING_DEFAULTS,
    )  # fmt: skip
    add_arguments(
        parser.add_argument_group("conversion (robustvit.ConvertConfig)"), ConvertConfig, defaults=CONVERT_DEFAULTS
    )
    add_arguments(parser.add_argument_group("certification"), CertificationConfig, exclude=("eps",))
    add_arguments(parser.add_argument_group("run"), RunConfig, defaults=RUN_DEFAULTS)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Configs:
    parser = build_parser()
    configs = build_configs(
        parser, parser.parse_args(argv), RunConfig, LipschitzTrainingConfig, ConvertConfig, CertificationConfig,
        exclude={CertificationConfig: ("eps",)},
    )  # fmt: skip
    return recipe_configs(*configs)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    return training_function(parse_args(argv))


if __name__ == "__main__":
    main()
