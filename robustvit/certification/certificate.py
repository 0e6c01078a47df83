"""The certificate record (``certificate.json``): what was certified, how, and on which weights.

The schema is versioned; :meth:`Certificate.load` checks it and raises :class:`~robustvit.errors.CertificateError`
on a malformed record. A certificate is a claim until it is verified against the weights it names
(``weights_sha256``) and a recomputed Lipschitz bound (``robustvit.from_pretrained(..., verify=True)``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from robustvit.certification.attacks import robust_accuracy
from robustvit.certification.plot import eps_label
from robustvit.constants import DEFAULT_EPS
from robustvit.errors import CertificateError
from robustvit.families import get_family
from robustvit.version import __version__

__all__ = ["SCHEMA", "SCHEMA_VERSION", "Certificate", "EpsResult", "sha256_file"]

SCHEMA = "robustvit.certificate"
SCHEMA_VERSION = 1


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class EpsResult:
    """Accuracies at one l2 radius."""

    eps: float
    certified_accuracy: float
    pgd_accuracy: float | None = None

    @property
    def label(self) -> str:
        return eps_label(self.eps)


@dataclass
class Certificate:
    """A versioned, JSON-serialisable certificate of a converted model.

    Example:
        >>> result = robustvit.certify(model, images, labels)
        >>> cert = result.to_certificate(model, dataset="digits", split="test")
        >>> Certificate.load(cert.save("certificate.json")).lipschitz == cert.lipschitz
        True
    """

    robustvit_version: str
    base_model: dict[str, Any]  # {"id", "family", "source"} where source rebuilds the architecture
    convert_config: dict[str, Any]
    lipschitz: float  # end-to-end bound, pixels -> logits
    features_lipschitz: float | None  # bound of the features a linear head reads (pairwise certificate)
    lipschitz_report: dict[str, Any]
    input: dict[str, Any]  # {"space": "pixels in [0, 1]", "channels", "image_size", "mean", "std"}
    dataset: str
    split: str
    num_samples: int
    clean_accuracy: float
    results: list[EpsResult]
    norm: str = "l2"
    weights_sha256: str | None = None
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION
    # None: the radii hold for the exact (real-valued) function. Otherwise the model as it runs in a dtype:
    # {"dtype": "bfloat16", "accumulation": "float32", "logit_error": E} (see robustvit.certification.rounding).
    precision: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # Hold the JSON-level values (lists, string keys) so that a loaded record equals the one that was saved.
        for name in ("base_model", "convert_config", "lipschitz_report", "input"):
            setattr(self, name, json.loads(json.dumps(getattr(self, name))))
        self._validate()

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_result(
        cls,
        result,
        model: nn.Module,
        *,
        dataset: str,
        split: str,
        eps: Sequence[float] = DEFAULT_EPS,
        pgd_steps: int = 50,
        pgd_restarts: int = 2,
        model_id: str | None = None,
        progress: bool = False,
    ) -> Certificate:
        """Build the record from a :class:`~robustvit.certification.lipschitz.CertifyResult` of ``model`` (with labels).

        Runs an l2 PGD at each eps on the certified images (when the result kept them) for the empirical column;
        ``progress`` shows a bar over the radii.
        """
        if result.labels is None:
            raise ValueError("a certificate needs labelled results: certify(model, images, labels)")
        family = get_family(model)
        spec = family.input_spec(model)
        conv = family.patch_projection(model)
        config = getattr(model, "robustvit_config", None)
        source = getattr(model, "robustvit_source", None) or family.source_spec(model)
        results = []
        attack = result.images is not None
        for e in tqdm(eps, desc=f"PGD ({pgd_steps} steps)", total=len(eps), disable=not (progress and attack)):
            pgd_acc = None
            if result.images is not None:
                pgd_acc = robust_accuracy(
                    model, result.images, result.labels, e, norm="l2", steps=pgd_steps, restarts=pgd_restarts
                )
            results.append(EpsResult(float(e), result.certified_accuracy(e), pgd_acc))
        return cls(
            robustvit_version=__version__,
            base_model={"id": model_id or _model_id(source), "family": family.name, "source": source},
            convert_config=config.to_dict() if config is not None else {},
            lipschitz=result.lipschitz,
            features_lipschitz=result.features_lipschitz,
            precision=None
            if result.precision is None
            else {"dtype": result.precision, "accumulation": result.accumulation, "logit_error": result.logit_error},
            lipschitz_report=result.report.to_dict() if result.report is not None else {},
            input={
                "space": "pixels in [0, 1]",
                "channels": spec.channels,
                "image_size": list(spec.image_size),
                "mean": conv.input_mean.flatten().tolist() if hasattr(conv, "input_mean") else list(spec.mean),
                "std": conv.input_std.flatten().tolist() if hasattr(conv, "input_std") else list(spec.std),
            },
            dataset=dataset,
            split=split,
            num_samples=len(result.labels),
            clean_accuracy=result.clean_accuracy,
            results=results,
        )

    # --- (de)serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["results"] = [{**dataclasses.asdict(r), "label": r.label} for r in self.results]
        if data["precision"] is None:  # records (and digests) of exact-function certificates stay as they were
            del data["precision"]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Certificate:
        if not isinstance(data, dict):
            raise CertificateError(f"a certificate must be a JSON object, got {type(data).__name__}")
        if data.get("schema") != SCHEMA:
            raise CertificateError(f"not a robustvit certificate (schema {data.get('schema')!r}, expected {SCHEMA!r})")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise CertificateError(
                f"unsupported certificate schema_version {data.get('schema_version')!r} (this robustvit reads "
                f"{SCHEMA_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(
            n
            for n in names
            if n not in data
            and cls.__dataclass_fields__[n].default is dataclasses.MISSING
            and cls.__dataclass_fields__[n].default_factory is dataclasses.MISSING
        )
        if missing:
            raise CertificateError(f"certificate is missing fields {missing}")
        unknown = sorted(set(data) - names)
        if unknown:
            raise CertificateError(f"certificate has unknown fields {unknown}")
        try:
            results = [
                EpsResult(
                    float(r["eps"]),
                    float(r["certified_accuracy"]),
                    None if r.get("pgd_accuracy") is None else float(r["pgd_accuracy"]),
                )
                for r in data["results"]
            ]
            return cls(**{**data, "results": results})
        except CertificateError:
            raise
        except (TypeError, KeyError, ValueError) as err:
            raise CertificateError(f"malformed certificate: {err}") from err

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Certificate:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as err:
            raise CertificateError(f"no certificate at {path}") from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CertificateError(f"certificate {path} is not valid JSON: {err}") from err
        return cls.from_dict(data)

    def digest(self) -> str:
        """sha256 of the canonical JSON (stored in the weights file's header)."""
        # Round-trip first: JSON turns int keys (e.g. id2label) into strings, which would reorder them on reload.
        canonical = json.loads(json.dumps(self.to_dict()))
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()

    # --- checks -------------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        self._validate_precision()
        self._validate_claims()

    def _validate_precision(self) -> None:
        if self.precision is None:
            return
        names = {"float32", "float16", "bfloat16"}
        p = self.precision
        if (
            not isinstance(p, dict)
            or set(p) != {"dtype", "accumulation", "logit_error"}
            or p["dtype"] not in names
            or p["accumulation"] not in names
            or not isinstance(p["logit_error"], (int, float))
            or not p["logit_error"] >= 0
        ):
            raise CertificateError(
                "precision must be null or {'dtype', 'accumulation' (float32 | float16 | bfloat16), "
                f"'logit_error' >= 0}}, got {p!r}"
            )

    def _validate_claims(self) -> None:
        def fail(message: str) -> None:
            raise CertificateError(f"malformed certificate: {message}")

        for name in ("lipschitz", "clean_accuracy"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                fail(f"{name} must be a finite number >= 0, got {value!r}")
        if self.clean_accuracy > 1:
            fail(f"clean_accuracy must lie in [0, 1], got {self.clean_accuracy!r}")
        if self.features_lipschitz is not None and not (
            isinstance(self.features_lipschitz, (int, float))
            and math.isfinite(self.features_lipschitz)
            and self.features_lipschitz >= 0
        ):
            fail(f"features_lipschitz must be a finite number >= 0 or null, got {self.features_lipschitz!r}")
        if self.norm != "l2":
            fail(f"norm must be 'l2', got {self.norm!r}")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            fail(f"num_samples must be a positive integer, got {self.num_samples!r}")
        for r in self.results:
            if not (math.isfinite(r.eps) and r.eps >= 0):
                fail(f"eps must be a finite number >= 0, got {r.eps!r}")
            for value in (r.certified_accuracy, r.pgd_accuracy):
                if value is not None and not 0.0 <= value <= 1.0:
                    fail(f"accuracies must lie in [0, 1], got {value!r}")
            if r.certified_accuracy > self.clean_accuracy + 1e-12:
                fail(f"certified accuracy {r.certified_accuracy} exceeds clean accuracy {self.clean_accuracy}")
            if r.pgd_accuracy is not None and r.certified_accuracy > r.pgd_accuracy + 1e-12:
                # certified images are correct and cannot be attacked within eps: PGD accuracy is at least as high
                fail(f"certified accuracy {r.certified_accuracy} exceeds PGD accuracy {r.pgd_accuracy} at eps {r.eps}")
        if self.weights_sha256 is not None and (
            not isinstance(self.weights_sha256, str)
            or len(self.weights_sha256) != 64
            or any(c not in "0123456789abcdef" for c in self.weights_sha256)
        ):
            fail(f"weights_sha256 must be a 64-character hex digest, got {self.weights_sha256!r}")
        for key in ("channels", "image_size", "mean", "std"):
            if key not in self.input:
                fail(f"input is missing {key!r}")

    def accuracy_table(self) -> str:
        """Markdown table of clean, certified and PGD accuracy at each eps."""
        rows = ["| eps (l2) | certified accuracy | PGD accuracy |", "|---|---|---|"]
        for r in self.results:
            pgd = f"{r.pgd_accuracy:.1%}" if r.pgd_accuracy is not None else "n/a"
            rows.append(f"| {r.label} | {r.certified_accuracy:.1%} | {pgd} |")
        return (
            f"clean accuracy: {self.clean_accuracy:.1%} on {self.num_samples} images ({self.dataset}, {self.split})\n\n"
            + "\n".join(rows)
        )


def _model_id(source: dict[str, Any]) -> str | None:
    if source.get("library") == "timm":
        return source.get("architecture") or source.get("class")
    config = source.get("config", {})
    return config.get("_name_or_path") or source.get("class")
