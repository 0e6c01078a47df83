"""Publish a recipe's output folder as a Hugging Face Hub model repository.

Usage::

    python hub/publish.py OUTPUT_DIR --repo-id org/name [--dry-run DIR] [--private] [--license apache-2.0]
                          [--base-model org/base] [--token TOKEN] [--commit-message MSG]

What a recipe output folder must contain (the contract recipes follow):

* ``OUTPUT_DIR/model/``: the certified model, written by the recipe with
  ``robustvit.save_pretrained(model, OUTPUT_DIR / "model", certificate)``, i.e. ``model.safetensors``,
  ``config.json`` and ``certificate.json``. ``OUTPUT_DIR`` may also be that folder itself.
* optionally ``certified_accuracy.png`` (``CertifyResult.plot``), in ``OUTPUT_DIR/model/`` or in ``OUTPUT_DIR``.

Anything else in ``OUTPUT_DIR`` (logs, checkpoints, metrics) is not published. The model is loaded with
``robustvit.from_pretrained(..., verify=True)``, so an uncertified, tampered or pickle-only folder is refused, then
written again with a model card for ``--repo-id``: into ``--dry-run DIR`` (nothing is uploaded), or to the Hub
as one commit (``robustvit.push_to_hub``). Exit status 0 on success, 1 when the folder cannot be published.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import robustvit
from robustvit.errors import CertificateError
from robustvit.hub import CONFIG_NAME, CURVE_NAME, DEFAULT_LICENSE

MODEL_SUBDIR = "model"


def model_folder(output_dir: Path) -> Path:
    """``OUTPUT_DIR/model`` when it exists, else ``OUTPUT_DIR`` itself when it is a saved robustvit folder.

    Example:
        >>> model_folder(Path("runs/cifar10"))  # doctest: +SKIP
        PosixPath('runs/cifar10/model')
    """
    for candidate in (output_dir / MODEL_SUBDIR, output_dir):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"{output_dir} is not a recipe output folder: expected {output_dir / MODEL_SUBDIR} written by "
        "robustvit.save_pretrained(model, OUTPUT_DIR / 'model', certificate)"
    )


def curve_file(output_dir: Path, model_dir: Path) -> Path | None:
    """The certified-accuracy curve of the recipe, if it wrote one (the model folder's copy first)."""
    return next((p for p in (model_dir / CURVE_NAME, output_dir / CURVE_NAME) if p.is_file()), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Publish (or with ``--dry-run``, only write) the certified model of a recipe output folder.

    Example:
        >>> main(["runs/cifar10", "--repo-id", "org/vit-tiny-lipschitz", "--dry-run", "/tmp/repo"])  # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("output_dir", type=Path, help="the recipe's output folder")
    parser.add_argument("--repo-id", required=True, help="Hub repository, org/name")
    parser.add_argument("--dry-run", type=Path, metavar="DIR", help="write the repository folder here; upload nothing")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--license", default=DEFAULT_LICENSE)
    parser.add_argument("--base-model", help="Hub id of the base model for the card (default: from the certificate)")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")
    parser.add_argument("--commit-message", default="Upload certified robustvit model")
    args = parser.parse_args(argv)

    try:
        model_dir = model_folder(args.output_dir)
        model = robustvit.from_pretrained(model_dir, verify=True)
    except (CertificateError, ValueError, OSError) as err:
        print(f"publish: cannot publish {args.output_dir}: {err}", file=sys.stderr)
        return 1
    card = {
        "curve": curve_file(args.output_dir, model_dir),
        "license": args.license,
        "base_model": args.base_model,
    }
    if args.dry_run is not None:
        robustvit.save_pretrained(model, args.dry_run, model.certificate, repo_id=args.repo_id, **card)
        print(f"wrote {args.repo_id} to {args.dry_run} (dry run: nothing uploaded)")
        return 0
    url = robustvit.push_to_hub(
        model,
        args.repo_id,
        model.certificate,
        private=args.private,
        token=args.token,
        commit_message=args.commit_message,
        **card,
    )
    print(f"published {args.repo_id}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
