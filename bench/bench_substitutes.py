"""What each sound substitute costs right after conversion: how close the substituted part stays to the source's.

Run: ``python bench/bench_substitutes.py [--seeds 3]``. Offline, so the sources are tiny timm models with random
weights (no pretrained EVA-02 / SigLIP checkpoint is reachable here): read the numbers as a comparison of the choices,
not as an ImageNet cost. For each choice it reports

* ``branch_cosine``: the cosine between the source part's output and its substitute's, on the tokens the source
  feeds that part (the gated MLP of every block, the MAP head, the RMSNorm before the head), so the mixer's change
  does not enter;
* ``top1_agreement``: how often the converted model (shift mixer, every substitute at its choice) predicts the
  source's class, on 64 random images.

The sources have EVA's initialisation (every weight ~N(0, 0.02), biases 0). With random weights a MAP head's query
attends almost uniformly, so its substitute scores near 1 here; a trained head's attention is peaked and costs more.

Writes ``bench/results/substitutes.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
from torch import nn

import robustvit
from robustvit.conversion.choices import GATED_MLPS
from robustvit.families import get_family

TINY = dict(img_size=32, patch_size=4, depth=2, embed_dim=96, num_heads=3, num_classes=10)


def _source(architecture: str, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(architecture, pretrained=False, **TINY, **kwargs).eval()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _inputs(model: nn.Module, modules: list[nn.Module], images: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach())) for m in modules]
    spec = get_family(model).input_spec(model)
    mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
    with torch.no_grad():
        model((images - mean) / std)
    for handle in handles:
        handle.remove()
    return seen


def _agreement(source: nn.Module, images: torch.Tensor, **options) -> float:
    converted = robustvit.convert(source, **options).eval()
    spec = get_family(source).input_spec(source)
    mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
    with torch.no_grad():
        return float((converted(images).argmax(1) == source((images - mean) / std).argmax(1)).float().mean())


def gated_mlp(seed: int, images: torch.Tensor) -> dict:
    source = _source("eva02_tiny_patch14_224", seed, ref_feat_shape=(8, 8))
    parts = get_family(source).parts(source)
    mlps = [block.mlp for block in source.blocks]
    tokens = _inputs(source, mlps, images)
    rows = {}
    for choice in GATED_MLPS.list():
        cosines = []
        for block, x in zip(parts.blocks, tokens, strict=True):
            substitute = GATED_MLPS[choice](block.gated_mlp, lambda norm: norm)
            with torch.no_grad():
                cosines.append(_cosine(substitute(x), block.mlp(x)))
        rows[choice] = {
            "branch_cosine": sum(cosines) / len(cosines),
            "top1_agreement": _agreement(source, images, gated_mlp=choice),
        }
    return rows


def attention_pool(seed: int, images: torch.Tensor) -> dict:
    source = _source("vit_tiny_patch16_224", seed, global_pool="map", class_token=False)
    (tokens,) = _inputs(source, [source.attn_pool], images)
    tokens = tokens[:, source.num_prefix_tokens :]
    with torch.no_grad():
        # The substitute before the conversion's scale moves: uniform attention over the same tokens.
        pool = source.attn_pool
        w, b = pool.kv.weight.chunk(2)[1], pool.kv.bias.chunk(2)[1]
        y = pool.proj(tokens.mean(1) @ w.T + b)
        uniform = y + pool.mlp(pool.norm(y))
        cosine = _cosine(uniform, pool(tokens))
    return {"mean": {"branch_cosine": cosine, "top1_agreement": _agreement(source, images, attention_pool="mean")}}


def rms_norm(seed: int, images: torch.Tensor) -> dict:
    source = _source("eva02_tiny_patch14_224", seed, ref_feat_shape=(8, 8), norm_layer=timm.layers.RmsNorm)
    (tokens,) = _inputs(source, [source.fc_norm], images)
    rms = float(tokens.pow(2).mean(-1).sqrt().mean())
    gamma = source.fc_norm.weight.detach()
    with torch.no_grad():
        exact = source.fc_norm(tokens)
        substitutes = {
            "scale": tokens * gamma / rms,
            "center": (tokens - tokens.mean(-1, keepdim=True)) * gamma / rms,
        }
    return {
        choice: {
            "branch_cosine": _cosine(out, exact),
            "top1_agreement": _agreement(source, images, rms_norm=choice, calibration_images=images),
        }
        for choice, out in substitutes.items()
    }


def table(report: dict) -> str:
    """The markdown table of docs/soundness.md."""
    lines = ["| part | choice | branch cosine | top-1 agreement with the source |", "|---|---|---:|---:|"]
    for part, choices in report["results"].items():
        for choice, row in choices.items():
            lines.append(f"| {part} | `{choice}` | {row['branch_cosine']:.3f} | {row['top1_agreement']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "substitutes.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    runs = {
        "gated_mlp": lambda seed: gated_mlp(seed, images),
        "attention_pool": lambda seed: attention_pool(seed, images),
        "rms_norm": lambda seed: rms_norm(seed, images),
    }
    results = {}
    for part, run in runs.items():
        per_seed = [run(seed) for seed in range(args.seeds)]
        results[part] = {
            choice: {
                metric: sum(seed[choice][metric] for seed in per_seed) / len(per_seed) for metric in per_seed[0][choice]
            }
            for choice in per_seed[0]
        }
    report = {"seeds": args.seeds, "tiny": TINY, "results": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table(report))


if __name__ == "__main__":
    main()
