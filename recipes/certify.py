# Certify a saved robustvit model on a dataset split.
#
# Loads a folder written by robustvit (recipes/train_lipschitz.py's <output_dir>/model, `robustvit convert
# --output`, or robustvit.save_pretrained) or a Hub repository, certifies the split (deterministic l2 certificates
# from the Lipschitz bound, with an l2 PGD column that tries to break them), and writes to --output_dir a certified
# model folder: weights, config.json, certificate.json, certified_accuracy.png, metrics.json and a model card.
# The `robustvit certify` command (one certification path), with the recipes' --model and --output_dir.
#
#   python recipes/certify.py --model outputs/train_lipschitz/model                  # embedded digits, test split
#   python recipes/certify.py --model org/name --dataset path/to/imagefolder --split test --max_eval_images 1000

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from robustvit.cli import main as robustvit_main


def main(argv: Sequence[str] | None = None) -> int:
    """``robustvit certify`` in the recipes' conventions (``--model``, ``--output_dir``); every other flag is the
    command's (``--dataset``, ``--split``, ``--max_eval_images``, ``--eps``, ``--pgd_steps``, ...)."""
    parser = argparse.ArgumentParser(
        description="Certify a saved robustvit model on a dataset split (robustvit certify --help: the other flags).",
        allow_abbrev=False,
    )
    parser.add_argument("--model", required=True, help="a robustvit model folder or Hub repository")
    parser.add_argument("--output_dir", default="outputs/certify")
    args, command_flags = parser.parse_known_args(argv)
    return robustvit_main(["certify", args.model, "--output", args.output_dir, *command_flags])


if __name__ == "__main__":
    sys.exit(main())
