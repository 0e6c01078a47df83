"""The ``robustvit`` command: convert, certify, verify and push models. Every subcommand only calls the library.

Examples::

    robustvit convert vit_tiny_patch16_224 --img_size 32 --patch_size 4 --num_classes 10 --output out/converted
    robustvit certify out/converted --dataset cifar10 --split test --max_eval_images 1000 --output out/certified
    robustvit verify out/certified                            # integrity + recomputed bounds
    robustvit verify org/vit-tiny-lipschitz --split test      # ... and re-certify on the certificate's data
    robustvit push out/certified --repo_id org/vit-tiny-lipschitz --dry_run out/repo   # write only
    robustvit push out/certified --repo_id org/vit-tiny-lipschitz                     # upload

Exit status: 0 on success, 1 when a check fails or an input is invalid (the reason goes to stderr), 2 for usage
errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robustvit.certification.config import CertificationConfig, EvaluationBudget
from robustvit.constants import CURVE_NAME, DEFAULT_LICENSE, DIGITS
from robustvit.conversion.config import ConvertConfig
from robustvit.errors import CertificateError, UnsupportedModuleError
from robustvit.settings import add_arguments, from_args

# The library (torch, timm, transformers) is imported inside each command, so that `robustvit --help` is fast.
if TYPE_CHECKING:
    from torch import nn

    from robustvit.certification import CertifyResult
    from robustvit.certification.certificate import Certificate

__all__ = ["ACCURACY_TOLERANCE", "main", "model_folder"]

# `robustvit verify --split ...` fails when a re-certified accuracy is below the claimed one by more than this
# (a fraction: 0.01 is one percentage point). Same weights, images and code reproduce the radii up to float64
# rounding; the slack absorbs images whose radius lies within rounding of an eps and image decoding or resizing
# that differs between library versions. The comparison is made only on the certificate's own dataset, split
# and sample count; other data is reported, not compared.
ACCURACY_TOLERANCE = 0.01


def _key_value(text: str) -> tuple[str, Any]:
    """``depth=1`` -> ``("depth", 1)``: values are JSON when they parse as JSON, strings otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _source_model(args: argparse.Namespace) -> nn.Module:
    """The model to convert: a timm name (``timm.create_model``) or a transformers id / folder (safetensors only)."""
    import timm

    library = args.library
    if library == "auto":
        library = "timm" if timm.is_model(args.model) or args.model.startswith(("hf-hub:", "local-dir:")) else "hf"
    geometry = {"img_size": args.img_size, "patch_size": args.patch_size, "num_classes": args.num_classes}
    if library == "timm":
        kwargs = {key: value for key, value in geometry.items() if value is not None}
        return timm.create_model(args.model, pretrained=args.pretrained, **kwargs, **dict(args.model_kwargs))
    from transformers import AutoConfig, AutoModelForImageClassification

    names = {"img_size": "image_size", "patch_size": "patch_size", "num_classes": "num_labels"}
    overrides = {names[key]: value for key, value in geometry.items() if value is not None}
    overrides.update(dict(args.model_kwargs))
    if not args.pretrained:
        return AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(args.model, **overrides))
    # Changed geometry or classes re-initialise the affected weights (position embeddings, classifier).
    return AutoModelForImageClassification.from_pretrained(
        args.model, use_safetensors=True, ignore_mismatched_sizes=bool(overrides), **overrides
    )


def _refuse_existing_output(args: argparse.Namespace) -> None:
    """An ``--output`` folder that already holds files is refused (before any work) unless ``--overwrite``: writing a
    model folder replaces its files (README.md, certificate.json...), which may be the user's or an earlier run's."""
    output = Path(args.output)
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        raise FileExistsError(
            f"--output {output} already holds files ({', '.join(sorted(p.name for p in output.iterdir())[:5])}); "
            "pass --overwrite to replace the model files in it, or choose another --output"
        )


def _convert(args: argparse.Namespace) -> int:
    from robustvit.conversion.convert import convert

    if args.output is not None:
        _refuse_existing_output(args)
    from robustvit.lipschitz import lipschitz_report
    from robustvit.persistence.hub import save_pretrained

    config = from_args(ConvertConfig, args)
    model = convert(_source_model(args), config)
    print(lipschitz_report(model))
    if args.output is not None:
        save_pretrained(model, args.output)
        print(f"saved the uncertified model to {args.output}; next: robustvit certify {args.output} --output DIR")
    return 0


def _load_unverified(model: str, revision: str | None) -> nn.Module:
    """Load a model that is about to be (re-)certified; the no-certificate warning would only be noise here."""
    from robustvit.persistence.hub import UncertifiedModelWarning, from_pretrained

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncertifiedModelWarning)
        return from_pretrained(model, revision, verify=False)


def _certify(args: argparse.Namespace) -> int:
    from robustvit.certify_split import certify_split

    _refuse_existing_output(args)
    model = _load_unverified(args.model, args.revision)
    certificate = certify_split(
        model,
        args.dataset,
        from_args(CertificationConfig, args),
        output_dir=args.output,
        split=args.split,
        name=args.model,
        license=args.license,
    )
    print(f"end-to-end l2 Lipschitz bound: {certificate.lipschitz:.6g}")
    print(certificate.accuracy_table())
    print(f"wrote the certified model, certificate.json and {CURVE_NAME} to {args.output}")
    return 0


def _compare(certificate: Certificate, result: CertifyResult, *, same_data: bool, tolerance: float) -> list[str]:
    """Print claimed against re-certified accuracies; return the claims that fail (only for the same data)."""
    from robustvit.certification.plot import eps_label

    rows = [("clean", certificate.clean_accuracy, result.clean_accuracy)]
    rows += [(eps_label(r.eps), r.certified_accuracy, result.certified_accuracy(r.eps)) for r in certificate.results]
    print("| accuracy | claimed | re-certified |\n|---|---|---|")
    failures = []
    for name, claimed, actual in rows:
        print(f"| {name} | {claimed:.2%} | {actual:.2%} |")
        if same_data and actual < claimed - tolerance:
            failures.append(f"{name}: claimed {claimed:.2%}, re-certified {actual:.2%}")
    return failures


def _verify(args: argparse.Namespace) -> int:
    from robustvit.certification import certify
    from robustvit.certify_split import model_dataset
    from robustvit.data import stack_examples
    from robustvit.persistence.hub import from_pretrained

    try:
        model = from_pretrained(args.model, args.revision)
    except CertificateError as err:
        print(f"FAILED: {args.model}: {err}", file=sys.stderr)
        return 1
    certificate = model.certificate
    print(
        f"OK: {args.model}: certificate verified (weights sha256 {certificate.weights_sha256}, "
        f"l2 Lipschitz bound {certificate.lipschitz:.6g})"
    )
    print(certificate.accuracy_table())
    if args.dataset is None and args.split is None:
        return 0

    budget = from_args(EvaluationBudget, args)
    dataset = args.dataset or certificate.dataset
    data = model_dataset(model, dataset, args.split or certificate.split)
    images, labels = stack_examples(data, budget.max_eval_images or certificate.num_samples)
    result = certify(model, images, labels, batch_size=budget.eval_batch_size)
    claimed_data = (certificate.dataset, certificate.split, certificate.num_samples)
    same_data = (data.name, data.split, len(labels)) == claimed_data
    print(f"\nre-certified on {len(labels)} images of {data.name} ({data.split}):")
    failures = _compare(certificate, result, same_data=same_data, tolerance=args.tolerance)
    if not same_data:
        print(
            f"note: the certificate was computed on {certificate.num_samples} images of {certificate.dataset} "
            f"({certificate.split}); accuracies on other data are shown, not compared"
        )
    if failures:
        print(
            f"FAILED: {args.model}: re-certified accuracy below the claim by more than {args.tolerance:.2%}: "
            + "; ".join(failures),
            file=sys.stderr,
        )
        return 1
    return 0


MODEL_SUBDIR = "model"  # recipes save their certified model in OUTPUT_DIR/model


def model_folder(output_dir: Path) -> Path:
    """``OUTPUT_DIR/model`` when it exists, else ``OUTPUT_DIR`` itself when it is a saved robustvit folder.

    Example:
        >>> certificate = robustvit.certify(model, images, labels).to_certificate(model, dataset="digits", split="test")
        >>> _ = robustvit.save_pretrained(model, "runs/cifar10/model", certificate)
        >>> model_folder(Path("runs/cifar10"))
        PosixPath('runs/cifar10/model')
    """
    from robustvit.persistence.hub import CONFIG_NAME

    for candidate in (output_dir / MODEL_SUBDIR, output_dir):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"{output_dir} is neither a saved robustvit model folder nor a recipe output folder with {MODEL_SUBDIR}/ "
        f"(written by robustvit.save_pretrained(model, OUTPUT_DIR / '{MODEL_SUBDIR}', certificate))"
    )


def _push(args: argparse.Namespace) -> int:
    from robustvit.persistence.hub import from_pretrained, push_to_hub, save_pretrained

    output_dir = Path(args.directory)
    directory = model_folder(output_dir)
    model = from_pretrained(directory, verify=not args.uncertified)
    # The model folder's curve first, then one a recipe wrote beside it; only a certified model carries one.
    curves = [path for path in (directory / CURVE_NAME, output_dir / CURVE_NAME) if path.is_file()]
    card = {
        "curve": curves[0] if curves and model.certificate is not None else None,
        "license": args.license,
        "base_model": args.base_model,
    }
    if args.dry_run is not None:
        save_pretrained(model, args.dry_run, model.certificate, repo_id=args.repo_id, **card)
        print(f"wrote {args.repo_id} to {args.dry_run} (dry run: nothing uploaded)")
        return 0
    url = push_to_hub(
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustvit", description="Convert, certify, verify and publish Lipschitz-certified vision transformers."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("convert", help="convert a timm / transformers ViT into a Lipschitz-bounded model")
    p.add_argument("model", help="timm model name, or transformers Hub id / local folder")
    p.add_argument("--library", choices=("auto", "timm", "hf"), default="auto", help="default: timm for timm names")
    p.add_argument(
        "--no_pretrained",
        dest="pretrained",
        action="store_false",
        help="random init instead of the source's pretrained weights (for tests and from-scratch runs)",
    )
    p.add_argument("--img_size", type=int)
    p.add_argument("--patch_size", type=int)
    p.add_argument("--num_classes", type=int)
    p.add_argument(
        "--model_kwargs",
        nargs="+",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="extra constructor / config arguments, e.g. depth=6 embed_dim=192 (values parsed as JSON)",
    )
    # The conversion flags are ConvertConfig's fields; their choices are named, not read: reading the registries
    # would import torch for --help (ConvertConfig lists the known names when a name is unknown).
    add_arguments(p.add_argument_group("conversion (robustvit.ConvertConfig)"), ConvertConfig, resolve_choices=False)
    p.add_argument("--output", help="save the converted model here (robustvit.save_pretrained, no certificate)")
    p.add_argument("--overwrite", action="store_true", help="replace the model files of an existing --output folder")
    p.set_defaults(run=_convert)

    def add_data(p: argparse.ArgumentParser, *, dataset_default: str | None, split_default: str | None) -> None:
        p.add_argument(
            "--dataset",
            default=dataset_default,
            help=f"'{DIGITS}' (embedded, offline), an imagefolder directory or a Hugging Face datasets id",
        )
        split_help = f"default: {split_default}" if split_default else "default: the certificate's split"
        p.add_argument("--split", default=split_default, help=split_help)
        # The budget: EvaluationBudget's fields; certify adds CertificationConfig's own (eps and PGD).
        add_arguments(p, EvaluationBudget, only=("max_eval_images", "eval_batch_size"))

    p = commands.add_parser("certify", help="certify a saved model on a dataset; write a certified model folder")
    p.add_argument("model", help="a folder written by robustvit (convert --output) or a Hub repository")
    p.add_argument("--revision")
    add_data(p, dataset_default=DIGITS, split_default="test")
    add_arguments(p, CertificationConfig, only=("eps", "pgd_steps"))
    p.add_argument("--license", default=DEFAULT_LICENSE, help="model card license")
    p.add_argument("--output", required=True, help="folder for the certified model, certificate.json and the curve")
    p.add_argument("--overwrite", action="store_true", help="replace the model files of an existing --output folder")
    p.set_defaults(run=_certify)

    p = commands.add_parser("verify", help="verify a model's certificate; with --dataset/--split also re-certify")
    p.add_argument("model", help="a certified robustvit folder or Hub repository")
    p.add_argument("--revision")
    add_data(p, dataset_default=None, split_default=None)
    p.add_argument(
        "--tolerance",
        type=float,
        default=ACCURACY_TOLERANCE,
        help="allowed shortfall of a re-certified accuracy (fraction; default one percentage point)",
    )
    p.set_defaults(run=_verify)

    p = commands.add_parser(
        "push", help="verify a saved model folder (or a recipe's output folder) and upload it to the Hub in one commit"
    )
    p.add_argument("directory", help=f"a saved robustvit model folder, or a recipe output folder with {MODEL_SUBDIR}/")
    p.add_argument("--repo_id", required=True, help="Hub repository, org/name")
    p.add_argument("--dry_run", type=Path, metavar="DIR", help="write the repository folder here; upload nothing")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", help="Hub token (default: the logged-in one)")
    p.add_argument("--license", default=DEFAULT_LICENSE)
    p.add_argument("--base_model", help="Hub id of the base model for the card (default: from the certificate)")
    p.add_argument("--commit_message", default="Upload certified robustvit model")
    p.add_argument("--uncertified", action="store_true", help="push without verifying and without a certificate")
    p.set_defaults(run=_push)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``robustvit`` command line; returns the exit status.

    Example:
        >>> certificate = robustvit.certify(model, images, labels).to_certificate(model, dataset="digits", split="test")
        >>> _ = robustvit.save_pretrained(model, "out/certified", certificate)
        >>> main(["verify", "out/certified"])
        OK: out/certified: certificate verified (weights sha256 ..., l2 Lipschitz bound ...)
        ...
        0
    """
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (CertificateError, UnsupportedModuleError, ValueError, OSError) as err:
        print(f"robustvit {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
