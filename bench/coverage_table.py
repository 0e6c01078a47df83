"""The coverage table: which popular ViT architectures ``robustvit.convert`` takes, and whether each bound holds.

Run: ``python bench/coverage_table.py`` (offline: each model is created with random weights, two blocks, a small image).
A fixed list of timm architecture names (the 20 tried in issue 22) and transformers classes with small configs;
for each it records one of

* ``converts``: the converted model's bound, and an empirical lower bound of its Lipschitz constant found by
  gradient ascent on the ratio ``||f(x) - f(y)|| / ||x - y||`` (:func:`robustvit.lipschitz.estimate.
  estimate_lipschitz_lower_bound`, the tests' attack); the bound must be at least the empirical value;
* ``refused``: the error :func:`robustvit.convert` raises, which names the part and the reason.

Writes ``bench/results/coverage.json``; ``python bench/tables.py --write`` puts the table in docs/coverage.md, and
tests/test_tables.py checks that the page shows what the JSON holds (tests/test_coverage.py: that the JSON lists what
this script tries and, marked slow, still gets the same outcome).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "coverage.json"

TIMM_NAMES = (
    "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "deit_small_patch16_224",
    "deit_base_distilled_patch16_224",
    "deit3_small_patch16_224",
    "vit_small_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2",
    "vit_base_patch16_clip_224.openai",
    "vit_base_patch16_siglip_224",
    "vit_small_patch16_224.dino",
    "vit_base_patch16_224.mae",
    "vit_medium_patch16_gap_256",
    "vit_base_patch16_rope_reg1_gap_256",
    "beit_base_patch16_224",
    "eva02_small_patch14_224",
    "vit_small_patch16_rope_224",
    "flexivit_small",
    "vit_base_patch32_clip_224",
    "vit_so150m_patch16_reg4_gap_256",
    "vit_little_patch16_reg4_gap_256",
)
"""The 20 timm architectures of issue 22, as a user names them (pretrained tags included)."""

_SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
_IMAGE = {"image_size": 32, "patch_size": 8}


def _hf(model_class: str, config_class: str, **config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        return getattr(transformers, model_class)(getattr(transformers, config_class)(**config))

    return build


def _with_head(build_vision: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A CLIPVisionModel with the linear head robustvit converts it with (issue 22: "CLIPVisionModel plus a head")."""

    def build() -> nn.Module:
        from robustvit.families.hf_clip import clip_classifier

        return clip_classifier(build_vision(), num_labels=10)

    return build


_TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}

TRANSFORMERS_MODELS: dict[str, Callable[[], nn.Module]] = {
    "ViTForImageClassification": _hf("ViTForImageClassification", "ViTConfig", **_SMALL, **_IMAGE, num_labels=10),
    "DeiTForImageClassification": _hf("DeiTForImageClassification", "DeiTConfig", **_SMALL, **_IMAGE, num_labels=10),
    "Dinov2ForImageClassification": _hf(
        "Dinov2ForImageClassification",
        "Dinov2Config",
        **{k: v for k, v in _SMALL.items() if k != "intermediate_size"},
        mlp_ratio=2,
        **_IMAGE,
        num_labels=10,
    ),
    "Dinov2WithRegistersForImageClassification": _hf(
        "Dinov2WithRegistersForImageClassification",
        "Dinov2WithRegistersConfig",
        **{k: v for k, v in _SMALL.items() if k != "intermediate_size"},
        mlp_ratio=2,
        num_register_tokens=2,
        **_IMAGE,
        num_labels=10,
    ),
    "BeitForImageClassification": _hf("BeitForImageClassification", "BeitConfig", **_SMALL, **_IMAGE, num_labels=10),
    "CLIPForImageClassification": _hf(
        "CLIPForImageClassification",
        "CLIPConfig",
        vision_config={**_SMALL, **_IMAGE},
        text_config=_TEXT,
        num_labels=10,
    ),
    "CLIPVisionModel + clip_classifier": _with_head(_hf("CLIPVisionModel", "CLIPVisionConfig", **_SMALL, **_IMAGE)),
    "SiglipForImageClassification": _hf(
        "SiglipForImageClassification",
        "SiglipConfig",
        vision_config={**_SMALL, **_IMAGE},
        text_config=_TEXT,
        num_labels=10,
    ),
    "ViTMSNForImageClassification": _hf(
        "ViTMSNForImageClassification", "ViTMSNConfig", **_SMALL, **_IMAGE, num_labels=10
    ),
    "TimmWrapperForImageClassification": _hf(
        "TimmWrapperForImageClassification",
        "TimmWrapperConfig",
        architecture="vit_tiny_patch16_224",
        model_args={"img_size": 32, "patch_size": 8, "depth": 2},
        num_labels=10,
    ),
}
"""The 10 transformers classes of issue 22's acceptance, each with a small random config."""


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        match = re.search(r"patch(\d+)", name)
        patch = int(match.group(1)) if match else 16  # flexivit_small: 16
        return timm.create_model(name, pretrained=False, depth=2, img_size=4 * patch, num_classes=10)

    return build


def entries() -> list[tuple[str, str, Callable[[], nn.Module]]]:
    """``(library, name, build)`` of every architecture the table lists, in its order."""
    timm_entries = [("timm", name, _timm(name)) for name in TIMM_NAMES]
    return timm_entries + [("transformers", name, build) for name, build in TRANSFORMERS_MODELS.items()]


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def outcome(build: Callable[[], nn.Module]) -> tuple[str, nn.Module | None, str]:
    """``("converts", converted, "")`` or ``("refused", None, reason)``: the cheap part, without the attack."""
    import robustvit

    torch.manual_seed(0)
    source = build()
    try:
        return "converts", robustvit.convert(source).eval(), ""
    except (robustvit.UnsupportedModuleError, NotImplementedError, ValueError) as err:
        return "refused", None, _reason(err)


def check(library: str, name: str, build: Callable[[], nn.Module], steps: int) -> dict:
    import robustvit
    from robustvit.families import get_family
    from robustvit.lipschitz.estimate import estimate_lipschitz_lower_bound

    status, model, reason = outcome(build)
    row = {"library": library, "name": name, "status": status, "reason": reason}
    if model is None:
        return row
    spec = get_family(model).input_spec(model)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, spec.channels, *spec.image_size, generator=generator)
    bound = robustvit.lipschitz_bound(model)
    empirical = estimate_lipschitz_lower_bound(model, images, steps=steps, restarts=2, generator=generator)
    return {**row, "bound": bound, "empirical": empirical, "bound_holds": bool(empirical <= bound)}


def table(rows: list[dict]) -> str:
    """The markdown table of docs/coverage.md."""
    lines = [
        "| library | architecture | converts | bound | empirical lower bound | bound >= empirical | refused because |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for row in rows:
        if row["status"] == "converts":
            cells = ["yes", f"{row['bound']:.4g}", f"{row['empirical']:.4g}", "yes" if row["bound_holds"] else "NO", ""]
        else:
            cells = ["no", "", "", "", row["reason"].replace("|", "\\|")]
        lines.append("| " + " | ".join([row["library"], f"`{row['name']}`", *cells]) + " |")
    converted = sum(row["status"] == "converts" for row in rows)
    lines.append("")
    lines.append(f"{converted} of {len(rows)} convert.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="gradient-ascent steps per restart")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for library, name, build in entries():
        rows.append(check(library, name, build, args.steps))
        print(f"{library:13s} {name:45s} {rows[-1]['status']} {rows[-1]['reason']}", flush=True)
    args.out.write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    print(table(rows))


if __name__ == "__main__":
    main()
