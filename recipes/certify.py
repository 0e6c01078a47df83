# Certify a saved robustvit model on a dataset split.
#
# Loads a folder written by robustvit (recipes/train_lipschitz.py's <output_dir>/model, `robustvit convert
# --output`, or robustvit.save_pretrained) or a Hub repository, certifies the split (deterministic l2 certificates
# from the Lipschitz bound, with an l2 PGD column that tries to break them), and writes to --output_dir a certified
# model folder: weights, config.json, certificate.json, certified_accuracy.png, metrics.json and a model card.
# The same library call as `robustvit certify` (robustvit.certify.dataset.certify_split).
#
#   python recipes/certify.py --model outputs/train_lipschitz/model                  # embedded digits, test split
#   python recipes/certify.py --model org/name --dataset path/to/imagefolder --split test --max_eval_images 1000

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence

from robustvit.certify.dataset import certify_split
from robustvit.configs import CertificationConfig, add_arguments, build_configs
from robustvit.constants import DIGITS
from robustvit.hub import UncertifiedModelWarning, from_pretrained


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Certify a saved robustvit model on a dataset split.", allow_abbrev=False
    )
    parser.add_argument("--model", required=True, help="a robustvit model folder or Hub repository")
    parser.add_argument("--dataset", default=DIGITS, help=f"'{DIGITS}' (embedded), an imagefolder dir or a HF id")
    parser.add_argument("--split", default="test")
    parser.add_argument("--output_dir", default="outputs/certify")
    add_arguments(parser.add_argument_group("certification (CertificationConfig)"), CertificationConfig)
    args = parser.parse_args(argv)
    (certification,) = build_configs(parser, args, CertificationConfig)

    with warnings.catch_warnings():  # the model is about to be (re-)certified
        warnings.simplefilter("ignore", UncertifiedModelWarning)
        model = from_pretrained(args.model, verify=False)
    certificate = certify_split(
        model,
        args.output_dir,
        dataset=args.dataset,
        split=args.split,
        max_images=certification.max_eval_images,
        batch_size=certification.eval_batch_size,
        eps=certification.eps,
        pgd_steps=certification.pgd_steps,
        name=args.model,
    )
    print(certificate.accuracy_table())
    print(f"wrote the certified model to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
