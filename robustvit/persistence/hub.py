"""Certified models on the Hugging Face Hub: save, push, download and verify.

A robustvit repository (or local folder) holds one converted model:

* ``model.safetensors``: the converted model's ``state_dict`` (parametrization keys included), never pickle. Its
  header metadata is ``{"format": "pt", "robustvit_certificate_sha256": <claim digest>}``, plus
  ``"robustvit_shared_tensors"`` (``{"dropped": "kept"}`` as JSON) when tensors share memory.
* ``config.json``: ``robustvit_format_version``, ``family``, ``source`` (rebuilds the unconverted architecture
  without downloading its weights), ``convert_config``, ``num_classes`` and ``input`` (pixels in [0, 1]).
* ``certificate.json``: the :class:`~robustvit.certification.certificate.Certificate`, whose ``weights_sha256`` is the
  sha256 of ``model.safetensors``. Absent for an uncertified model.
* ``README.md``: the model card (template ``robustvit/templates/model_card.md``), certified accuracies as
  ``model-index``.
* ``certified_accuracy.png``: the certified-accuracy curve, when one was given.

The certificate and the weights name each other: ``weights_sha256`` is the hash of the weights file, and the
weights header carries the *claim digest*, the :meth:`Certificate.digest` of the certificate with
``weights_sha256`` cleared (the digest cannot cover the hash of the file that contains the digest).

Verification (``from_pretrained(..., verify=True)``) checks, in order: ``certificate.json`` parses; the weights
file hashes to ``weights_sha256``; its header carries the certificate's claim digest; the certificate describes
the architecture, conversion and input normalization that were loaded; and the Lipschitz bounds recomputed from
the loaded weights, exactly as :func:`robustvit.certify` computes them, do not exceed the certified ones. These
checks catch a certificate that does not belong to the weights and any bound claim the weights do not support.
They cannot authenticate the accuracies (anyone can rewrite all files consistently): ``robustvit verify
--dataset ...`` re-certifies to check those. Whatever ``verify`` is, ``config.json``'s ``num_classes`` and
``input`` must match the loaded model, and weights load strictly.

Example:
    >>> certificate = robustvit.certify(model, images, labels).to_certificate(model, dataset="digits", split="test")
    >>> robustvit.save_pretrained(model, "out/model", certificate)
    PosixPath('out/model')
    >>> robustvit.push_to_hub(model, "org/vit-tiny-lipschitz", certificate)  # doctest: +SKIP
    >>> model = robustvit.from_pretrained("out/model")  # or "org/vit-tiny-lipschitz" from the Hub
    >>> model.certificate.lipschitz == certificate.lipschitz
    True
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import shutil
import tempfile
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    snapshot_download,
)
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import safe_open
from torch import Tensor, nn

from robustvit._utils import refuse_adapters, unwrap
from robustvit.certification.certificate import Certificate, sha256_file
from robustvit.certification.lipschitz import lipschitz_head
from robustvit.constants import CURVE_NAME, DEFAULT_LICENSE
from robustvit.conversion.convert import is_converted
from robustvit.conversion.metadata import NATIVE_RECORD_KEY
from robustvit.errors import CertificateError
from robustvit.families import get_family, registered_families
from robustvit.lipschitz import mark_lipschitz_neutral
from robustvit.lipschitz.rescale import frozen_directions
from robustvit.persistence import timm_native, transformers_native  # noqa: F401  (their formats, read by native_format)
from robustvit.persistence.native_format import native_format
from robustvit.persistence.rebuild import rebuild_converted
from robustvit.persistence.weights import load_strictly
from robustvit.version import __version__

__all__ = [
    "BOUND_RTOL",
    "FORMAT_VERSION",
    "UncertifiedModelWarning",
    "claim_digest",
    "from_pretrained",
    "push_to_hub",
    "save_pretrained",
]

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CERTIFICATE_NAME = "certificate.json"
CARD_NAME = "README.md"
DIGEST_KEY = "robustvit_certificate_sha256"
SHARED_KEY = "robustvit_shared_tensors"
# Package data (pyproject: [tool.setuptools.package-data]), so that a wheel install can write model cards.
MODEL_CARD_TEMPLATE = resources.files("robustvit") / "templates" / "model_card.md"
# Suffixes of pickle-based checkpoints: refused, never opened (unpickling runs arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# A recomputed bound may exceed the certified one by this relative amount. Both are guaranteed float64 upper bounds
# of the same weights (sha256-checked); they can differ only by reduction order across BLAS builds and devices,
# about 1e-15 * depth. 1e-9 covers that with six orders of magnitude to spare and shrinks a radius by at most one
# part in 1e9, which changes a certified accuracy only if a radius lies within 1e-9 (relative) of an eps.
BOUND_RTOL = 1e-9
PROCESSOR_NAME = "preprocessor_config.json"
_REPO_FILES = (WEIGHTS_NAME, CONFIG_NAME, CERTIFICATE_NAME, PROCESSOR_NAME)
_TAGS = ("robustvit", "certified-robustness", "lipschitz", "vision-transformer", "image-classification")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_DATASET_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


class UncertifiedModelWarning(UserWarning):
    """A model was loaded with ``verify=False``: nothing about its robustness is certified."""


def claim_digest(certificate: Certificate) -> str:
    """The digest stored in the weights header: :meth:`Certificate.digest` with ``weights_sha256`` cleared.

    Example:
        >>> certificate = robustvit.certify(model, images, labels).to_certificate(model, dataset="digits", split="test")
        >>> digest = claim_digest(certificate)
        >>> digest == dataclasses.replace(certificate, weights_sha256=None).digest()
        True
    """
    return dataclasses.replace(certificate, weights_sha256=None).digest()


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparisons with stored records."""
    return json.loads(json.dumps(value))


def _input_spec(model: nn.Module) -> dict[str, Any]:
    family = get_family(model)
    spec = family.input_spec(model)
    conv = family.patch_projection(model)  # a NormalizedConv2d: the normalization the weights actually apply
    return {
        "space": "pixels in [0, 1]",
        "channels": spec.channels,
        "image_size": list(spec.image_size),
        "mean": conv.input_mean.flatten().tolist(),
        "std": conv.input_std.flatten().tolist(),
    }


@frozen_directions()  # reading the head's weight in train mode must not move the rescaling's directions
def _config(model: nn.Module) -> dict[str, Any]:
    family = get_family(model)
    return _jsonable(
        {
            # The library's own config (transformers': its Auto classes and pipelines read it).
            **native_format(model).library_config(model),
            "robustvit_format_version": FORMAT_VERSION,
            "robustvit_version": __version__,
            "family": family.name,
            "source": model.robustvit_source,
            "convert_config": model.robustvit_config.to_dict(),
            "num_classes": family.head_weight(model)[0].shape[0],
            "input": _input_spec(model),
        }
    )


def _check_description(model: nn.Module, certificate: Certificate) -> None:
    """The certificate must describe this model: family, architecture, conversion and input normalization."""
    claimed_input = {key: certificate.input.get(key) for key in ("channels", "image_size", "mean", "std")}
    actual_input = {key: value for key, value in _input_spec(model).items() if key in claimed_input}
    # Compared as they read back from JSON: an in-memory record may still hold tuples or int dict keys.
    pairs = {
        "family": (certificate.base_model.get("family"), get_family(model).name),
        "source architecture": (_jsonable(certificate.base_model.get("source")), _jsonable(model.robustvit_source)),
        "convert_config": (_jsonable(certificate.convert_config), _jsonable(model.robustvit_config.to_dict())),
        "input": (_jsonable(claimed_input), _jsonable(actual_input)),
    }
    for what, (claimed, actual) in pairs.items():
        if claimed != actual:
            raise CertificateError(f"the certificate describes {what} {claimed!r} but the model has {actual!r}")


def _check_bounds(model: nn.Module, certificate: Certificate) -> None:
    """Recompute the bounds the way :func:`robustvit.certify` does and compare them with the certified ones."""
    # A certificate of a deployed precision bounds the exact function of the weights rounded to that precision.
    rounded = copy.deepcopy(model).to(_certified_dtype(certificate) or torch.float64)
    head = lipschitz_head(rounded.to(torch.float64))
    bounds = {"lipschitz": (certificate.lipschitz, head.lipschitz)}
    if certificate.features_lipschitz is not None:
        if head.features_lipschitz is None:
            raise CertificateError(
                "the certificate claims a features_lipschitz bound but this model has no linear head"
            )
        bounds["features_lipschitz"] = (certificate.features_lipschitz, head.features_lipschitz)
    for name, (claimed, recomputed) in bounds.items():
        if recomputed > claimed * (1 + BOUND_RTOL):
            raise CertificateError(
                f"{name}: the certificate claims {claimed!r} but the bound recomputed from the weights is "
                f"{recomputed!r}; its certified radii do not hold"
            )


def _certified_dtype(certificate: Certificate) -> torch.dtype | None:
    return getattr(torch, certificate.precision["dtype"]) if certificate.precision is not None else None


def _warn_below_certified_precision(model: nn.Module, certificate: Certificate) -> None:
    """Warn once when the model runs in a dtype coarser than the one its radii were proven for (exact-function
    certificates: coarser than float32, whose rounding they leave unproven but negligible above ~1e-5)."""
    certified = _certified_dtype(certificate) or torch.float32
    warned = False

    @mark_lipschitz_neutral
    def check(module: nn.Module, args: tuple) -> None:
        nonlocal warned
        dtype = next(module.parameters()).dtype
        if not warned and dtype.is_floating_point and torch.finfo(dtype).eps > torch.finfo(certified).eps:
            warned = True
            warnings.warn(
                f"this model's certificate holds in {str(certified).removeprefix('torch.')} but it runs in "
                f"{str(dtype).removeprefix('torch.')}: its certified radii are not proven for this precision "
                "(re-certify with robustvit.certify(..., precision=...))",
                UserWarning,
                stacklevel=2,
            )

    model.register_forward_pre_hook(check)


def _saved_model(model: nn.Module) -> nn.Module:
    """The converted model itself: without torch.compile / DDP / Accelerate wrappers, whose state-dict keys would not
    load back, and refused while it holds PEFT adapters (their keys neither), which merging keeps exactly."""
    model = unwrap(model)
    refuse_adapters(model, "saving")
    return model


def _weights_bytes(model: nn.Module, digest: str | None) -> bytes:
    """The ``model.safetensors`` file: every tensor once (aliases recorded in the header), on the CPU."""
    state = model.state_dict()
    kept: dict[tuple, str] = {}
    shared: dict[str, str] = {}
    tensors: dict[str, Tensor] = {}
    for name in sorted(state):
        tensor = state[name]
        # Exact aliases (tied parameters) are stored once; partial overlaps make safetensors raise, as they should.
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in kept:
            shared[name] = kept[key]
            continue
        kept[key] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    metadata = {"format": "pt"}
    if digest is not None:
        metadata[DIGEST_KEY] = digest
    if shared:
        metadata[SHARED_KEY] = json.dumps(shared, sort_keys=True)
    return _sorted_metadata(safetensors.torch.save(tensors, metadata=metadata))


def _sorted_metadata(data: bytes) -> bytes:
    """The same safetensors file with its header metadata in sorted order.

    safetensors writes metadata in hash-map order, which changes from process to process; sorted, equal models
    give byte-identical files, so re-saving a loaded model reproduces the sha256 its certificate names.
    """
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header with spaces to keep tensors 8-byte aligned
    return len(text).to_bytes(8, "little") + text + data[8 + length :]


def _hub_base_model(model: nn.Module, certificate: Certificate | None) -> str | None:
    """The base model's Hub id when one is known (the Hub rejects ``base_model`` values that are not repo ids)."""
    if certificate is not None:
        candidate = certificate.base_model.get("id")
    else:
        candidate = model.robustvit_source.get("config", {}).get("_name_or_path")
    return candidate if isinstance(candidate, str) and _HUB_ID.fullmatch(candidate) else None


def _model_card(
    model: nn.Module,
    certificate: Certificate | None,
    *,
    model_id: str,
    model_name: str,
    license: str,
    base_model: str | None,
    curve: bool,
) -> ModelCard:
    family = get_family(model)
    eval_results = None
    datasets = None
    if certificate is not None:
        common = {
            "task_type": "image-classification",
            "dataset_type": certificate.dataset,
            "dataset_name": certificate.dataset,
            "dataset_split": certificate.split,
        }
        eval_results = [
            EvalResult(
                **common, metric_type="accuracy", metric_value=certificate.clean_accuracy, metric_name="Clean accuracy"
            )
        ]
        eval_results += [
            EvalResult(
                **common,
                metric_type="certified_accuracy",
                metric_value=r.certified_accuracy,
                metric_name=f"Certified accuracy ({certificate.norm}, eps={r.label})",
                metric_config=f"eps={r.eps:.4f}",
            )
            for r in certificate.results
        ]
        datasets = [certificate.dataset] if _DATASET_ID.fullmatch(certificate.dataset) else None
    card_data = ModelCardData(
        library_name="robustvit",
        license=license,
        tags=[*_TAGS, family.name],
        pipeline_tag="image-classification",
        base_model=base_model or _hub_base_model(model, certificate),
        datasets=datasets,
        model_name=model_name,
        eval_results=eval_results,
    )
    source = model.robustvit_source
    return ModelCard.from_template(
        card_data,
        template_str=MODEL_CARD_TEMPLATE.read_text(encoding="utf-8"),
        model_id=model_id,
        model_name=model_name,
        family=family.name,
        source_name=source.get("architecture") or source.get("class"),
        source_library=source.get("library"),
        convert_config=model.robustvit_config.to_json(),
        certificate=certificate,
        accuracy_table=certificate.accuracy_table() if certificate is not None else None,
        curve=CURVE_NAME if curve else None,
        bound_rtol=BOUND_RTOL,
    )


def save_pretrained(
    model: nn.Module,
    directory: str | Path,
    certificate: Certificate | None = None,
    *,
    curve: str | Path | None = None,
    repo_id: str | None = None,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = None,
) -> Path:
    """Write a converted model (and its certificate) as a robustvit repository folder.

    Refuses to write a certificate that would not verify: it must describe this model, its bounds must hold for
    these weights, and a certificate that already names weights (``weights_sha256`` set, e.g. from
    :func:`from_pretrained`) must name exactly the weights written now.

    Args:
        model: a model returned by :func:`robustvit.convert` or :func:`from_pretrained`.
        directory: output folder (created; existing repository files are replaced, and a stale
            ``certificate.json`` / curve from an earlier save is removed).
        certificate: the model's certificate (``CertifyResult.to_certificate``); ``None`` saves an uncertified
            model, which only loads with ``verify=False``.
        curve: a certified-accuracy PNG to include as ``certified_accuracy.png`` (needs a certificate).
        repo_id: the Hub id the folder is meant for; used in the model card's loading snippet and its name.
        license: the model card's license.
        base_model: the base model's Hub id for the card; default: the certificate's base model id when it is one.

    Returns:
        The folder.

    Raises:
        ValueError: ``model`` is not converted, or a curve without a certificate.
        CertificateError: the certificate does not match the model or its weights.

    Example:
        >>> result = robustvit.certify(model, images, labels)
        >>> certificate = result.to_certificate(model, dataset="cifar10", split="test")
        >>> curve = result.plot("out/certified_accuracy.png")
        >>> robustvit.save_pretrained(model, "out/model", certificate, curve=curve)
        PosixPath('out/model')
    """
    if not is_converted(model):
        raise ValueError("save_pretrained saves converted models: call robustvit.convert(model) first")
    model = _saved_model(model)
    if curve is not None and certificate is None:
        raise ValueError("a certified-accuracy curve needs the certificate it plots")
    digest = None
    if certificate is not None:
        # As it will read back (JSON turns int keys into strings, which changes key order and so the digest).
        certificate = Certificate.from_dict(_jsonable(certificate.to_dict()))
        _check_description(model, certificate)
        _check_bounds(model, certificate)
        digest = claim_digest(certificate)
    weights = _weights_bytes(model, digest)
    weights_sha256 = hashlib.sha256(weights).hexdigest()
    if certificate is not None:
        if certificate.weights_sha256 not in (None, weights_sha256):
            raise CertificateError(
                f"the certificate names weights with sha256 {certificate.weights_sha256} but this model's weights "
                f"hash to {weights_sha256}: re-certify the model (robustvit.certify) instead of reusing the certificate"
            )
        certificate = dataclasses.replace(certificate, weights_sha256=weights_sha256)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / WEIGHTS_NAME).write_bytes(weights)
    (directory / CONFIG_NAME).write_text(json.dumps(_config(model), indent=2, sort_keys=True) + "\n")
    if certificate is not None:
        certificate.save(directory / CERTIFICATE_NAME)
    else:
        (directory / CERTIFICATE_NAME).unlink(missing_ok=True)
    library = native_format(model)
    library.write_library_files(model, directory)
    processor = library.image_processor(model)
    if processor is not None:  # the library's preprocessing for this model: [0, 1] pixels, no normalization
        processor.save_pretrained(directory)
    else:
        (directory / PROCESSOR_NAME).unlink(missing_ok=True)
    target_curve = directory / CURVE_NAME
    if curve is None:
        target_curve.unlink(missing_ok=True)
    elif not (target_curve.exists() and target_curve.samefile(curve)):
        shutil.copyfile(curve, target_curve)
    _model_card(
        model,
        certificate,
        model_id=repo_id or str(directory),
        model_name=(repo_id or directory.resolve().name).rsplit("/", 1)[-1],
        license=license,
        base_model=base_model,
        curve=curve is not None,
    ).save(directory / CARD_NAME)
    return directory


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    certificate: Certificate | None = None,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload certified robustvit model",
    curve: str | Path | None = None,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = None,
) -> str:
    """Create (or reuse) a Hub model repository and upload the model, its certificate and card in one commit.

    The folder is written by :func:`save_pretrained` (same checks) and uploaded with one ``create_commit``; a
    ``certificate.json`` or curve of an earlier upload that this one does not write is deleted in the same commit.

    Args:
        model, certificate, curve, license, base_model: as for :func:`save_pretrained`.
        repo_id: ``"org/name"``.
        private: create the repository as private (an existing repository keeps its visibility).
        token: Hub token; default: the logged-in one.
        commit_message: message of the upload commit.

    Returns:
        The URL of the commit.

    Example:
        >>> robustvit.push_to_hub(model, "org/vit-tiny-lipschitz", certificate)  # doctest: +SKIP
        'https://huggingface.co/org/vit-tiny-lipschitz/commit/...'
    """
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(
            model, tmp, certificate, curve=curve, repo_id=repo_id, license=license, base_model=base_model
        )
        api.create_repo(repo_id, private=private, exist_ok=True)
        added = sorted(p.name for p in folder.iterdir())
        # create_commit, not upload_folder: upload_folder may split a slow upload into several commits, and weights
        # must never be visible next to a certificate that is not theirs.
        stale = sorted({CERTIFICATE_NAME, CURVE_NAME} & set(api.list_repo_files(repo_id)) - set(added))
        commit = api.create_commit(
            repo_id,
            [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in added]
            + [CommitOperationDelete(path_in_repo=name) for name in stale],
            commit_message=commit_message,
        )
    return commit.commit_url


def _resolve(
    repo_id_or_path: str | Path,
    revision: str | None,
    cache_dir: str | Path | None,
    token: str | bool | None,
    subfolder: str,
    local_files_only: bool,
    force_download: bool,
) -> Path:
    path = Path(repo_id_or_path)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repositories, but {path} is a local folder")
        folder = path / subfolder
        if not folder.is_dir():
            raise FileNotFoundError(f"{path} has no subfolder {subfolder!r}")
        return folder
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        # Only the files robustvit reads: a pickle checkpoint in the same repository is never downloaded.
        snapshot = snapshot_download(
            str(repo_id_or_path),
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            force_download=force_download,
            allow_patterns=[prefix + name for name in _REPO_FILES],
        )
    except LocalEntryNotFoundError as err:
        raise LocalEntryNotFoundError(
            f"{str(repo_id_or_path)!r} is neither a local folder nor a Hub repository available here: {err}"
        ) from err
    return Path(snapshot) / subfolder


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: it is not a robustvit repository") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{folder / CONFIG_NAME} is not a JSON object")
    if "robustvit_format_version" not in config and _native_record(config) is not None:
        return config  # saved by transformers' save_pretrained or timm's save_for_hf: see _load_native
    version = config.get("robustvit_format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{folder / CONFIG_NAME} is not a robustvit model config (robustvit_format_version {version!r}; this "
            f"robustvit reads {FORMAT_VERSION}): write the folder with robustvit.save_pretrained"
        )
    if config.get("family") not in registered_families():
        raise ValueError(f"unknown model family {config.get('family')!r}; registered: {registered_families()}")
    return config


def _native_record(config: dict[str, Any]) -> dict[str, Any] | None:
    """The rebuild record of a converted model saved with its library's own ``save_pretrained`` / ``save_for_hf``:
    at the top of a transformers ``config.json``, in the ``model_args`` of a timm one."""
    model_args = config.get("model_args")
    record = config.get(NATIVE_RECORD_KEY) or (
        model_args.get(NATIVE_RECORD_KEY) if isinstance(model_args, dict) else None
    )
    if not isinstance(record, dict):
        return None
    if record.get("family") not in registered_families():
        raise ValueError(f"unknown model family {record.get('family')!r}; registered: {registered_families()}")
    return record


def _load_native(folder: Path, record: dict[str, Any]) -> nn.Module:
    """A converted model saved by its library (``save_pretrained`` / ``save_for_hf``), loaded strictly."""
    model = rebuild_converted(record)
    names = native_format(model).saved_key_names(model)
    weights = _weights_path(folder)
    tensors = safetensors.torch.load_file(weights)
    unexpected = sorted(set(tensors) - set(names))
    missing = sorted(set(names.values()) - {names[key] for key in tensors if key in names})
    if unexpected or missing:
        raise ValueError(
            f"{weights} does not hold this converted model's weights: unexpected keys {unexpected[:5]}, "
            f"missing keys {missing[:5]}"
        )
    load_strictly(model, {names[key]: tensor for key, tensor in tensors.items()}, f"{weights} does not match")
    return model


def _weights_path(folder: Path) -> Path:
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        return weights
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder} has no {WEIGHTS_NAME}, only pickle checkpoints {pickles}; robustvit loads safetensors only and "
            "never unpickles a file (unpickling can run arbitrary code)"
        )
    raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}")


def _load_weights(model: nn.Module, weights: Path, metadata: dict[str, str], config: dict[str, Any]) -> None:
    tensors = safetensors.torch.load_file(weights)
    for dropped, kept in json.loads(metadata.get(SHARED_KEY, "{}")).items():
        tensors[dropped] = tensors[kept]
    load_strictly(model, tensors, f"{weights} does not match the architecture in {CONFIG_NAME}")
    # The descriptive fields of config.json are not hashed anywhere: they must agree with what was loaded.
    described = {"num_classes": config.get("num_classes"), "input": config.get("input")}
    loaded = _config(model)
    actual = {key: loaded[key] for key in described}
    if described != actual:
        raise ValueError(f"{CONFIG_NAME} describes {described} but the loaded model has {actual}")


_IGNORED_LIBRARY_KWARGS = {
    # What transformers' Auto classes and pipeline pass to every from_pretrained, and why none applies here.
    "trust_remote_code": "no code from the repository runs",
    "code_revision": "no code from the repository runs",
    "_commit_hash": "the revision is resolved by snapshot_download",
    "_from_auto": "a marker of the Auto classes",
    "_from_pipeline": "a marker of pipeline",
}


def from_pretrained(
    repo_id_or_path: str | Path,
    revision: str | None = None,
    verify: bool | None = True,
    *,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    subfolder: str = "",
    local_files_only: bool = False,
    force_download: bool = False,
    proxies: dict[str, str] | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | torch.device | None = None,
    config: Any = None,
    adapter_kwargs: dict | None = None,
    **library_kwargs: Any,
) -> nn.Module:
    """Load a converted model from a local folder or a Hub repository, verifying its certificate.

    The architecture is rebuilt from ``config.json`` (no base weights are downloaded), converted with the stored
    :class:`~robustvit.ConvertConfig`, and loaded strictly from ``model.safetensors``. Hub downloads go through
    ``huggingface_hub.snapshot_download`` (cache, ``HF_HUB_OFFLINE`` and tokens work as usual) and fetch only
    ``model.safetensors``, ``config.json`` and ``certificate.json`` of one revision.

    With ``verify=True`` the checks described in :mod:`robustvit.persistence.hub` run and the verified certificate is
    attached as ``model.certificate``; ``verify=False`` skips the certificate, warns
    (:class:`UncertifiedModelWarning`) and sets ``model.certificate = None``.

    It also loads a converted model saved with its library's own ``save_pretrained`` (transformers) or
    ``timm.models.save_for_hf``: those folders carry no certificate, so they load with ``verify=False`` only.

    ``AutoModelForImageClassification.from_pretrained`` and ``pipeline`` call this function for a converted
    transformers model (its ``robustvit_*`` model type), with the keywords they pass to every ``from_pretrained``:
    all are accepted, and those that mean something here are honoured.

    Args:
        repo_id_or_path: a folder written by :func:`save_pretrained`, or a Hub id ``"org/name"``.
        revision: branch, tag or commit of a Hub repository.
        verify: verify the certificate (required unless you only need the weights); ``None``: verify when the
            folder has a ``certificate.json`` (what ``AutoModelForImageClassification`` uses).
        cache_dir: Hub cache folder; default ``HF_HUB_CACHE``.
        token: Hub token for private repositories.
        subfolder: the model's folder inside the repository or local folder.
        local_files_only: use the Hub cache only (as ``HF_HUB_OFFLINE=1`` does). A local folder is always local.
        force_download: download the files again even if they are cached; it cannot apply to a local folder, where
            it is ignored.
        proxies: ignored for a local folder; refused for a Hub download, since ``huggingface_hub`` >= 1.0 takes
            proxies from the ``HTTP_PROXY`` / ``HTTPS_PROXY`` environment variables only.
        dtype: ``None`` or ``"auto"`` keeps the stored precision (what the certificate is about); another dtype
            (``torch_dtype`` is its old name) casts the model, and a forward warns when it runs coarser than the
            certified precision.
        device_map: a single device (``"cpu"``, ``"cuda:0"``, ``torch.device``) or ``"auto"`` (the first GPU if
            there is one); a converted model loads whole, so a per-module map is refused.
        config: the config transformers' Auto classes pass back (``None`` or a ``robustvit_*`` config); it is
            read again from the folder.
        adapter_kwargs: transformers' options for finding a PEFT adapter next to the model; they do not apply (a
            robustvit folder holds no adapter: :func:`save_pretrained` refuses an adapted model, merge it first).
        library_kwargs: the markers transformers passes (``trust_remote_code``, ``code_revision``, ``_commit_hash``,
            ``_from_auto``, ``_from_pipeline``), none of which applies: no code from the repository ever runs.
            Anything else raises ``TypeError``.

    Returns:
        The converted model in eval mode, with ``robustvit_config``, ``robustvit_source`` and ``certificate``.

    Raises:
        CertificateError: ``verify=True`` and the certificate is missing, malformed or does not hold.
        ValueError: only pickle checkpoints (never opened), or a malformed ``config.json`` / weights file.
        FileNotFoundError: no ``config.json`` / ``model.safetensors``; a repository that is neither cached nor
            reachable (``huggingface_hub.errors.LocalEntryNotFoundError``).

    Example:
        >>> certificate = robustvit.certify(model, images, labels).to_certificate(model, dataset="digits", split="test")
        >>> _ = robustvit.save_pretrained(model, "out/model", certificate)
        >>> model = robustvit.from_pretrained("out/model")  # or a Hub id, e.g. "org/vit-tiny-lipschitz"
        >>> print(model.certificate.accuracy_table())
        clean accuracy: ...% on 8 images (digits, test)
        ...
        >>> unchecked = robustvit.from_pretrained("out/model", verify=False)
    """
    dtype = library_kwargs.pop("torch_dtype", dtype)
    unknown = sorted(set(library_kwargs) - set(_IGNORED_LIBRARY_KWARGS))
    if unknown:
        raise TypeError(f"robustvit.from_pretrained got unexpected keyword arguments {unknown}")
    if config is not None and not str(getattr(config, "model_type", "")).startswith("robustvit_"):
        raise TypeError(f"config must be a robustvit_* config read from the folder, got {type(config).__name__}")
    if proxies and not Path(repo_id_or_path).is_dir():
        raise ValueError(
            "proxies= is not supported: huggingface_hub >= 1.0 reads proxies from the HTTP_PROXY / HTTPS_PROXY "
            "environment variables"
        )
    device = _single_device(device_map)
    folder = _resolve(repo_id_or_path, revision, cache_dir, token, subfolder, local_files_only, force_download)
    model = _load(folder, repo_id_or_path, verify)
    if dtype not in (None, "auto"):
        model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model if device is None else model.to(device)


def _single_device(device_map: str | torch.device | None) -> torch.device | None:
    if device_map is None:
        return None
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, (str, torch.device, int)):
        return torch.device(device_map)
    raise ValueError(f"device_map={device_map!r}: a converted model loads whole onto one device (e.g. 'cuda:0')")


def _load(folder: Path, repo_id_or_path: str | Path, verify: bool | None) -> nn.Module:
    config = _read_config(folder)
    if verify is None:
        verify = (folder / CERTIFICATE_NAME).is_file()
    if "robustvit_format_version" not in config:
        if verify:
            raise CertificateError(
                f"{repo_id_or_path} was saved with its library's save_pretrained / save_for_hf, which carries no "
                "robustvit certificate: load it with verify=False, certify it (robustvit.certify) and save it with "
                "robustvit.save_pretrained"
            )
        model = _load_native(folder, _native_record(config))
        model.eval()
        _warn_uncertified(repo_id_or_path)
        model.certificate = None
        return model
    weights = _weights_path(folder)
    certificate = None
    if verify:
        if not (folder / CERTIFICATE_NAME).is_file():
            raise CertificateError(
                f"{repo_id_or_path} has no {CERTIFICATE_NAME}: the model is not certified "
                "(load it with verify=False to use it anyway)"
            )
        certificate = Certificate.load(folder / CERTIFICATE_NAME)
        # The bytes are checked before anything in them is parsed.
        actual_sha256 = sha256_file(weights)
        if certificate.weights_sha256 != actual_sha256:
            raise CertificateError(
                f"{WEIGHTS_NAME} has sha256 {actual_sha256} but the certificate names weights_sha256 "
                f"{certificate.weights_sha256}: the weights are not the certified ones"
            )
    with safe_open(weights, framework="pt") as handle:
        metadata = handle.metadata() or {}
    if certificate is not None and metadata.get(DIGEST_KEY) != claim_digest(certificate):
        raise CertificateError(
            f"the {WEIGHTS_NAME} header names certificate digest {metadata.get(DIGEST_KEY)!r} but {CERTIFICATE_NAME} "
            f"has digest {claim_digest(certificate)!r}: the certificate was edited or belongs to other weights"
        )

    model = rebuild_converted(config).eval()
    _load_weights(model, weights, metadata, config)
    if certificate is not None:
        _check_description(model, certificate)
        _check_bounds(model, certificate)
        _warn_below_certified_precision(model, certificate)
    else:
        _warn_uncertified(repo_id_or_path)
    model.certificate = certificate
    return model


def _warn_uncertified(repo_id_or_path: str | Path) -> None:
    warnings.warn(
        f"{repo_id_or_path} was loaded with verify=False: nothing about this model's robustness is certified",
        UncertifiedModelWarning,
        stacklevel=4,
    )
