"""Certify a model on a dataset split and write the certified model folder: the one path behind
``robustvit certify`` and ``recipes/certify.py``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from robustvit.certification.certificate import Certificate
from robustvit.certification.lipschitz import certify
from robustvit.constants import CURVE_NAME, DEFAULT_EPS, DEFAULT_LICENSE, DIGITS
from robustvit.data import ImageDataset, load_image_dataset, stack_examples
from robustvit.families import get_family
from robustvit.persistence.hub import save_pretrained

__all__ = ["certify_split", "model_dataset"]


def model_dataset(model: nn.Module, dataset: str, split: str) -> ImageDataset:
    """``split`` of ``dataset`` (``"digits"``, an imagefolder directory or a Hub id) at the model's input size,
    checked against the model's number of classes."""
    family = get_family(model)
    spec = family.input_spec(model)
    height, width = spec.image_size
    if height != width:
        raise ValueError(f"robustvit.data loads square images; this model takes {height}x{width}")
    data = load_image_dataset(
        None if dataset == DIGITS else dataset, split=split, image_size=height, channels=spec.channels
    )
    num_classes = family.head_weight(model)[0].shape[0]
    if data.num_classes != num_classes:
        raise ValueError(f"{data.name} has {data.num_classes} classes but the model predicts {num_classes}")
    return data


def certify_split(
    model: nn.Module,
    output_dir: str | Path,
    *,
    dataset: str = DIGITS,
    split: str = "test",
    max_images: int | None = None,
    batch_size: int = 256,
    eps: Sequence[float] = DEFAULT_EPS,
    pgd_steps: int = 50,
    license: str = DEFAULT_LICENSE,
    name: str = "model",
) -> Certificate:
    """Certify ``model`` on the first ``max_images`` images of ``split`` and save it, certified, to ``output_dir``.

    The folder gets what :func:`robustvit.save_pretrained` writes (weights, config, ``certificate.json``, model
    card), the certified-accuracy curve and ``metrics.json``. ``name`` labels the curve and the metrics.

    Example:
        >>> certificate = certify_split(model, "out/certified", split="test", max_images=100)
        >>> print(certificate.accuracy_table())
        clean accuracy: ...% on 100 images (digits, test)
        ...
    """
    data = model_dataset(model, dataset, split)
    images, labels = stack_examples(data, max_images)
    result = certify(model, images, labels, batch_size=batch_size, progress=True)
    certificate = result.to_certificate(
        model, dataset=data.name, split=data.split, eps=eps, pgd_steps=pgd_steps, progress=True
    )
    output = Path(output_dir)
    curve = result.plot(output / CURVE_NAME, title=f"{name} on {data.name} ({data.split})")
    save_pretrained(model, output, certificate, curve=curve, license=license)
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
    }
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return certificate
