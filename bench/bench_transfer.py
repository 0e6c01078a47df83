"""Does a pretrained source pay off? Lipschitz-margin training from a converted pretrained ViT vs from scratch.

Run: ``python bench/bench_transfer.py [--set main|mlp] [--seeds 0 1 2] [--workers 2]``. On the embedded default
(scikit-learn digits, the small timm ViT of ``robustvit.training.DEFAULT_MODEL``), every row gets the *same*
Lipschitz-training budget, the margin phase of ``recipes/train_lipschitz.py`` with its default hyper-parameters (EMMA,
AdamW, gradient norm clipped to 1, cosine schedule with one warm-up epoch, training radius ramping from 0.1x to 2x
36/255), at two budgets: the recipe's default number of epochs and a third of it. Rows differ only in where the
trained model starts:

* the converted pretrained source, with the recipe's default conversion (the source is the recipe's stand-in for a
  pretrained ViT: the default model trained for ``DEFAULT_PRETRAIN_EPOCHS`` epochs of plain cross-entropy, once per
  seed and shared by the rows that need it);
* a random-init source converted the same way (``--pretrain_epochs 0``: from-scratch Lipschitz training);
* alternatives (the exact conversion that keeps the source's scales and spectra, ...);
* LipShiFT's own architecture (:func:`robustvit.lipshift.create_lipshift`) with sound bounds.

Each row certifies the 360 test digits (``robustvit.certify``: guaranteed bounds, pairwise head radii) and reports
clean and certified accuracy at 36/72/108 /255 as mean ± standard deviation over the seeds, the end-to-end bound
and the wall time (training + certification, one worker). Jobs run in ``--workers`` processes with one thread each.
Writes ``bench/results/transfer.json`` and prints the markdown table of the README. ``--set mlp`` runs the rows of
the MLP forms (``ConvertConfig(mlp="sll" | "cpl")``, pretrained and random init) into
``bench/results/transfer_mlp.json``, the README's second table; ``--set ablation`` the recipe defaults' ablations
(the previous residual budget, no gradient clipping) into ``bench/results/transfer_ablation.json``.

A new row is one entry of ``ROWS`` (and of a set in ``ROW_SETS``), e.g.
``"converted, CPL MLP": Row("pretrained", {"mlp": "cpl"})``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_model as load_weights
from safetensors.torch import save_model
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

from train_lipschitz import DEFAULT_PRETRAIN_EPOCHS, parse_args  # noqa: E402
from transformers import get_cosine_schedule_with_warmup  # noqa: E402

import robustvit  # noqa: E402
from robustvit.constants import DEFAULT_EPS  # noqa: E402
from robustvit.data import load_image_dataset, stack_examples  # noqa: E402
from robustvit.lipshift import create_lipshift  # noqa: E402
from robustvit.losses import LOSSES, EpsSchedule, head_margins  # noqa: E402
from robustvit.training import PixelModel, load_model  # noqa: E402


@dataclass(frozen=True)
class Row:
    """Where Lipschitz training starts: a converted ``"pretrained"`` or ``"random"`` source (with ``convert``
    overrides on top of the recipe's conversion defaults), or a fresh ``"lipshift"`` network (``lipshift``:
    :func:`create_lipshift` arguments). ``train`` overrides the recipe's margin-phase hyper-parameters (ablations)."""

    start: Literal["pretrained", "random", "lipshift"]
    convert: dict[str, Any] = field(default_factory=dict)
    lipshift: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


# LipShiFT at the default ViT's patch grid (4x4 tokens of 8x8 pixels), 0.16M parameters (the ViT: 0.21M).
LIPSHIFT = dict(patch_size=8, embed_dim=64, depth=4)

ROWS: dict[str, Row] = {
    "converted pretrained (recipe default)": Row("pretrained"),
    "random init (`--pretrain_epochs 0`)": Row("random"),
    "converted pretrained, exact conversion": Row("pretrained", {"singular_value_power": 1.0, "residual_budget": None}),
    "LipShiFT (sound bounds)": Row("lipshift", lipshift=LIPSHIFT),
    # ConvertConfig(mlp=...): the residual MLP becomes one SLL / CPL layer (bound 1 by construction)
    "converted pretrained, SLL MLP": Row("pretrained", {"mlp": "sll"}),
    "random init, SLL MLP": Row("random", {"mlp": "sll"}),
    "converted pretrained, CPL MLP": Row("pretrained", {"mlp": "cpl"}),
    "random init, CPL MLP": Row("random", {"mlp": "cpl"}),
    # What the recipe's defaults owe to each choice: the previous residual budget, no gradient clipping
    "converted pretrained, residual budget 3": Row("pretrained", {"residual_budget": 3.0}),
    "converted pretrained, no gradient clipping": Row("pretrained", train={"max_grad_norm": 0.0}),
    "random init, no gradient clipping": Row("random", train={"max_grad_norm": 0.0}),
}

# Row sets (``--set``) and where they are written: the README's main table, and the MLP forms of ``ConvertConfig``.
ROW_SETS: dict[str, tuple[list[str], str]] = {
    "main": (list(ROWS)[:4], "bench/results/transfer.json"),
    "mlp": (list(ROWS)[4:8], "bench/results/transfer_mlp.json"),
    "ablation": (list(ROWS)[8:], "bench/results/transfer_ablation.json"),
}


def recipe_defaults() -> dict[str, Any]:
    """The recipe's default run, conversion and training settings, one flat dict (``eps``: the training radius)."""
    configs = parse_args([])
    return {
        k: v
        for config in (configs.run, configs.convert, configs.training)
        for k, v in dataclasses.asdict(config).items()
    }


def _datasets(config: dict[str, Any]):
    size, channels = config["image_size"], config["channels"]
    train = load_image_dataset(None, split="train", image_size=size, channels=channels)
    test = load_image_dataset(None, split="test", image_size=size, channels=channels)
    return train, test


def pretrain_source(seed: int, path: str, epochs: int) -> float:
    """The recipe's source: the default model, ``epochs`` epochs of cross-entropy (as the recipe)."""
    torch.set_num_threads(1)
    config = recipe_defaults()
    train, _ = _datasets(config)
    torch.manual_seed(seed)
    source, _ = load_model(None, num_classes=train.num_classes, image_size=config["image_size"], channels=3)
    loader = DataLoader(train, batch_size=config["batch_size"], shuffle=True)
    net = PixelModel(source)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config["pretrain_lr"], weight_decay=0.05)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=epochs * len(loader))
    start = time.perf_counter()
    for _ in range(epochs):
        for images, labels in loader:
            loss = F.cross_entropy(net(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    save_model(source, path, metadata={"format": "pt"})
    return time.perf_counter() - start


def _start_model(row: Row, seed: int, source_path: str, config: dict[str, Any], train) -> torch.nn.Module:
    torch.manual_seed(seed)
    if row.start == "lipshift":
        return create_lipshift(train.num_classes, img_size=config["image_size"], **row.lipshift)
    source, _ = load_model(None, num_classes=train.num_classes, image_size=config["image_size"], channels=3)
    if row.start == "pretrained":
        load_weights(source, source_path)
    overrides = {
        "mixer": config["mixer"],
        "activation": config["activation"],
        "singular_value_power": config["singular_value_power"],
        "residual_budget": config["residual_budget"] or None,
        "mlp": config["mlp"],
        **row.convert,
    }
    return robustvit.convert(source, calibration_images=stack_examples(train, 64)[0], **overrides)


def train_and_certify(name: str, seed: int, epochs: int, source_path: str) -> dict[str, Any]:
    """The recipe's margin phase from ``ROWS[name]``'s start, then certification of the test split."""
    torch.set_num_threads(1)
    config = {**recipe_defaults(), **ROWS[name].train}
    train, test = _datasets(config)
    start = time.perf_counter()
    model = _start_model(ROWS[name], seed, source_path, config, train)
    start_bound = robustvit.lipschitz_bound(model)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=config["batch_size"], shuffle=True, generator=generator)
    total = max(1, epochs * len(loader))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    schedule = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=min(len(loader), total), num_training_steps=total
    )
    schedule_eps = EpsSchedule(config["eps"], start=config["eps_start"], end=config["eps_end"])
    loss_fn = LOSSES[config["loss"]]
    step = 0
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            eps = schedule_eps(step / total)
            step += 1
            loss = loss_fn(model(images), labels, eps=eps, margins=head_margins(model))
            optimizer.zero_grad()
            loss.backward()
            if config["max_grad_norm"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config["max_grad_norm"])
            optimizer.step()
            schedule.step()
    model.eval()
    images, labels = stack_examples(test, None)
    result = robustvit.certify(model, images, labels)
    return {
        "row": name,
        "seed": seed,
        "epochs": epochs,
        "clean": result.certified_accuracy(0.0),
        "certified": {f"{round(eps * 255)}/255": result.certified_accuracy(eps) for eps in DEFAULT_EPS},
        "start_bound": start_bound,
        "bound": result.lipschitz,
        "seconds": time.perf_counter() - start,
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    return {
        "clean": stats([r["clean"] for r in runs]),
        "certified": {key: stats([r["certified"][key] for r in runs]) for key in runs[0]["certified"]},
        "start_bound": stats([r["start_bound"] for r in runs]),
        "bound": stats([r["bound"] for r in runs]),
        "seconds": stats([r["seconds"] for r in runs]),
    }


def table(summaries: list[dict[str, Any]]) -> str:
    def pct(s: dict[str, float]) -> str:
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"

    lines = [
        "| start | epochs | clean | cert. 36/255 | cert. 72/255 | cert. 108/255 | bound (start → end) | time / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        cert = s["certified"]
        lines.append(
            f"| {s['row']} | {s['epochs']} | {pct(s['clean'])} | {pct(cert['36/255'])} | {pct(cert['72/255'])} | "
            f"{pct(cert['108/255'])} | {s['start_bound']['mean']:.3g} → {s['bound']['mean']:.3g} | "
            f"{s['seconds']['mean']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="full budget (default: the recipe's)")
    parser.add_argument(
        "--budgets", nargs="+", default=["full", "short"], choices=["full", "short"], help="short: a third of full"
    )
    parser.add_argument("--pretrain_epochs", type=int, default=DEFAULT_PRETRAIN_EPOCHS, help="of the source")
    parser.add_argument("--set", default="main", choices=list(ROW_SETS), help="rows and output of a README table")
    parser.add_argument("--rows", nargs="+", default=None, choices=list(ROWS), help="instead of the set's rows")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", default=None, help="default: the set's JSON under bench/results/")
    args = parser.parse_args()
    rows, output = ROW_SETS[args.set]
    args.rows = args.rows or rows
    args.output = args.output or output
    full = args.epochs or recipe_defaults()["epochs"]
    budgets = sorted({{"full": full, "short": max(1, round(full / 3))}[budget] for budget in args.budgets})
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, context.Pool(args.workers) as pool:
        sources = {seed: str(Path(tmp) / f"source_{seed}.safetensors") for seed in args.seeds}
        needs_source = any(ROWS[name].start == "pretrained" for name in args.rows)
        pretrain = (
            pool.starmap(pretrain_source, [(s, p, args.pretrain_epochs) for s, p in sources.items()])
            if needs_source
            else []
        )
        jobs = [(name, seed, epochs, sources[seed]) for epochs in budgets for name in args.rows for seed in args.seeds]
        jobs.sort(key=lambda job: -job[2])  # long jobs first: the two workers finish together
        runs = pool.starmap(train_and_certify, jobs)
    summaries = []
    for epochs in sorted(budgets, reverse=True):
        for name in args.rows:
            chosen = [r for r in runs if r["row"] == name and r["epochs"] == epochs]
            summaries.append({"row": name, "epochs": epochs, **_summary(chosen)})
    report = {
        "machine": {"platform": platform.platform(), "cpus": multiprocessing.cpu_count(), "workers": args.workers},
        "recipe_defaults": recipe_defaults(),
        "pretrain_epochs": args.pretrain_epochs,
        "pretrain_seconds": pretrain,
        "seeds": args.seeds,
        "rows": {name: asdict(ROWS[name]) for name in args.rows},
        "summaries": summaries,
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(table(summaries))
    print(f"\n{len(args.seeds)} seeds, {report['wall_seconds'] / 60:.1f} min wall; wrote {output}")


if __name__ == "__main__":
    main()
