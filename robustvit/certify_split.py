"""Certify a model on a dataset split, save it certified and write its metrics: the one path behind
``robustvit certify``, ``recipes/certify.py`` and the end of ``recipes/train_lipschitz.py``."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from robustvit._utils import eval_mode
from robustvit.certification.certificate import Certificate
from robustvit.certification.config import CertificationConfig
from robustvit.certification.lipschitz import certify
from robustvit.constants import CURVE_NAME, DEFAULT_LICENSE, DIGITS
from robustvit.data import ImageDataset, load_image_dataset, stack_examples
from robustvit.families import get_family
from robustvit.persistence.hub import save_pretrained
from robustvit.settings import resolve_config

__all__ = ["CERTIFICATE_NAME", "METRICS_NAME", "certify_split", "model_dataset"]

CERTIFICATE_NAME = "certificate.json"
METRICS_NAME = "metrics.json"


def _check_classes(model: nn.Module, data: ImageDataset) -> None:
    num_classes = get_family(model).head_weight(model)[0].shape[0]
    if data.num_classes != num_classes:
        raise ValueError(f"{data.name} has {data.num_classes} classes but the model predicts {num_classes}")


def model_dataset(model: nn.Module, dataset: str, split: str) -> ImageDataset:
    """``split`` of ``dataset`` (``"digits"``, an imagefolder directory or a Hub id) at the model's input size,
    checked against the model's number of classes."""
    spec = get_family(model).input_spec(model)
    height, width = spec.image_size
    if height != width:
        raise ValueError(f"robustvit.data loads square images; this model takes {height}x{width}")
    data = load_image_dataset(
        None if dataset == DIGITS else dataset, split=split, image_size=height, channels=spec.channels
    )
    _check_classes(model, data)
    return data


def certify_split(
    model: nn.Module,
    data: ImageDataset | str,
    config: CertificationConfig | None = None,
    *,
    output_dir: str | Path,
    split: str | None = None,
    model_dir: str | Path | None = None,
    name: str = "model",
    license: str = DEFAULT_LICENSE,
    record: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Certificate:
    """Certify ``model`` on the first ``max_eval_images`` images of ``data``, save it certified and write its metrics.

    The settings are a :class:`~robustvit.certification.config.CertificationConfig` (``config``, default: its
    defaults) with ``overrides``, any of its fields by name (``eps``: the certificate's l2 radii in pixel units of
    ``[0, 1]`` images, ``pgd_steps``, ``max_eval_images``, ``eval_batch_size``).

    ``model_dir`` (default: ``output_dir``) gets what :func:`robustvit.save_pretrained` writes (weights, config,
    ``certificate.json``, model card, the curve); ``output_dir`` gets ``certificate.json``, the certified-accuracy
    curve and ``metrics.json``: the certificate's numbers (``model``: ``name``, which also titles the curve), the
    seconds certifying and saving took, and ``record``, a caller's own JSON-ready fields (a recipe's configs and
    history; its keys replace those of the same name).

    Args:
        model: A converted model (e.g. :func:`robustvit.from_pretrained`'s, or a recipe's, LoRA merged).
        data: An :class:`~robustvit.data.ImageDataset` at the model's input size, or a dataset name (``"digits"``,
            an imagefolder directory or a Hugging Face id) of which ``split`` (default ``"test"``) is loaded.
        split: The split of a dataset name (a dataset object knows its own).

    Returns:
        The saved certificate, with the hash of the weights written.

    Raises:
        TypeError: An override that is not a field of the config.
        ValueError: Invalid settings, a ``split`` with a dataset object, or data whose classes do not match.

    Example:
        >>> certificate = certify_split(model, "digits", output_dir="out/certified", max_eval_images=100)
        >>> print(certificate.accuracy_table())
        clean accuracy: ...% on 100 images (digits, test)
        ...
    """
    config = resolve_config(CertificationConfig, config, overrides)
    # Eval mode throughout: the deployed model is certified, attacked and saved, and a rescaled weight read in
    # training mode would take a step of its power iteration (robustvit.lipschitz.rescale), changing the model.
    with eval_mode(model):
        if isinstance(data, str):
            data = model_dataset(model, data, split or "test")
        elif split is not None:
            raise ValueError(f"split={split!r} goes with a dataset name; the dataset object holds split {data.split!r}")
        else:
            _check_classes(model, data)
        started = time.perf_counter()
        images, labels = stack_examples(data, config.max_eval_images)
        result = certify(model, images, labels, batch_size=config.eval_batch_size, progress=True)
        certificate = result.to_certificate(
            model, dataset=data.name, split=data.split, eps=config.eps, pgd_steps=config.pgd_steps, progress=True
        )
        output = Path(output_dir)
        folder = Path(model_dir) if model_dir is not None else output
        curve = result.plot(output / CURVE_NAME, title=f"{name} on {data.name} ({data.split})")
        save_pretrained(model, folder, certificate, curve=curve, license=license)
        certificate = Certificate.load(folder / CERTIFICATE_NAME)  # as saved: with the weights' sha256
        if folder.resolve() != output.resolve():
            certificate.save(output / CERTIFICATE_NAME)
        metrics = {
            "model": name,
            "dataset": data.name,
            "split": data.split,
            "num_samples": certificate.num_samples,
            "clean_accuracy": certificate.clean_accuracy,
            "certified_accuracy": {r.label: r.certified_accuracy for r in certificate.results},
            "pgd_accuracy": {r.label: r.pgd_accuracy for r in certificate.results},
            "lipschitz": certificate.lipschitz,
            "features_lipschitz": certificate.features_lipschitz,
            "certify_seconds": time.perf_counter() - started,
            **(record or {}),
        }
    (output / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
    return certificate
