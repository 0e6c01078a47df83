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

Every row runs through the functions ``accelerate launch recipes/train_lipschitz.py`` runs
(:mod:`robustvit.workflows.lipschitz_training`), its configs the recipe's defaults with the row's overrides: the source
is pretrained once per seed (``pretrain_source``, the recipe's pretraining phase) and read back by the rows that start
from it, as the recipe's ``--resume`` reads ``source.safetensors`` back; then ``convert_source``, ``train_margin`` and
``certify_and_save`` (the recipe's certificate of the 360 test digits: guaranteed bounds, pairwise head radii, its PGD
column). A random-init row is the recipe with ``--pretrain_epochs 0``. LipShiFT is built by
:func:`robustvit.lipshift.create_lipshift` and trained by the same ``train_margin``; it is no converted timm model
(``save_pretrained`` refuses it), so it is certified by ``robustvit.certify`` alone. Each row reports clean and
certified accuracy at 36/72/108 /255 as mean ± standard deviation over the seeds, the end-to-end bound and the wall
time (training + certification, one worker). Jobs run in ``--workers`` processes with one thread each.
Writes ``bench/results/transfer.json`` and prints the markdown table of the README. ``--set mlp`` runs the rows of
the MLP forms (``ConvertConfig(mlp="sll" | "cpl")``, pretrained and random init) into
``bench/results/transfer_mlp.json``, the README's second table; ``--set ablation`` the recipe defaults' ablations
(the previous residual budget, no gradient clipping) into ``bench/results/transfer_ablation.json``.

Where the source knows more (docs/results.md): ``--set curve`` runs both starts at 3, 9 and 27 Lipschitz epochs
(``transfer_curve.json``, drawn by ``bench/tables.py --write``); ``--set low_data`` pretrains the source on the whole
training split and gives the Lipschitz stage a class-stratified 10 % of it (``RunConfig.max_train_images``, drawn
with the seed), against random init on the same images, at 9, 27 and 81 epochs of those images
(``transfer_low_data.json``); ``--set other_data`` pretrains the source on rotated digits
(``RunConfig.image_transform="rot90"``: images the target never sees) and trains on upright ones, at 3 and 9 epochs
(``transfer_other_data.json``). ``--budget_epochs 1 2`` replaces any set's budgets (a quick check).

A lead that lasts: ``--set curve_radius`` runs both starts at 3, 9 and 27 epochs with the training radius ramping to
108/255 (``--eps_end 3``) instead of the default 72/255 (``transfer_curve_radius.json``, drawn beside the curve);
``--set long_ablation`` what else was tried at 27 epochs, a tightening residual budget and distillation
(``transfer_long_ablation.json``); ``--set low_data_distill`` the low-data row distilled from the source
(``transfer_low_data_distill.json``).

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
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch

import robustvit
from robustvit.data import stack_examples
from robustvit.lipshift import create_lipshift
from robustvit.training import DEFAULT_MODEL, PixelModel, finish, save_model_folder
from robustvit.workflows import lipschitz_training as recipe  # the phases of recipes/train_lipschitz.py
from robustvit.workflows.lipschitz_training import DEFAULT_PRETRAIN_EPOCHS, SOURCE_WEIGHTS, Configs


@dataclass(frozen=True)
class Row:
    """Where Lipschitz training starts: a converted ``"pretrained"`` or ``"random"`` source (with ``convert``
    overrides of the recipe's ConvertConfig), or a fresh ``"lipshift"`` network (``lipshift``:
    :func:`create_lipshift` arguments). ``train`` overrides the recipe's LipschitzTrainingConfig (ablations),
    ``run`` its RunConfig (the data the Lipschitz stage sees), ``source_run`` the RunConfig of a pretrained row's
    source pretraining (the data the source sees; sources are shared by the rows with the same one). ``model``
    (``{"model_name": ..., "kwargs": {...}}``, as :data:`~robustvit.training.DEFAULT_MODEL`) is a timm architecture
    instead of the embedded default: built with random weights per seed and saved as the folder ``--model`` reads,
    the same initial weights for the pretrained and the random-init row of that seed."""

    start: Literal["pretrained", "random", "lipshift"]
    convert: dict[str, Any] = field(default_factory=dict)
    lipshift: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    source_run: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    def source_key(self) -> str:
        """Names the source this row starts from (its architecture and its pretraining's RunConfig overrides)."""
        parts = [self.model_key()] if self.model else []
        parts += [f"{key}-{value}" for key, value in sorted(self.source_run.items())]
        return "_".join(parts) or "digits"

    def model_key(self) -> str:
        return self.model["model_name"] if self.model else "default"


# 10 % of digits' 1437 training images: RunConfig.max_train_images, a class-stratified subset drawn with the seed.
LOW_DATA_IMAGES = 144
NUM_CLASSES = 10  # scikit-learn digits, the benchmark's data
# LipShiFT at the default ViT's patch grid (4x4 tokens of 8x8 pixels), 0.16M parameters (the ViT: 0.21M).
LIPSHIFT = dict(patch_size=8, embed_dim=64, depth=4)
# An EVA-02-style source at the default ViT's sizes (EVA-02 tiny's own SwiGLU width, 8/3 of the embedding): rotary
# position embeddings, which leave with the attention the shift mixer replaces, and a SwiGLU MLP, which becomes
# ConvertConfig.gated_mlp's default substitute.
EVA02 = {"model_name": "eva02_tiny_patch14_224", "kwargs": DEFAULT_MODEL["kwargs"]}

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
    # Low data: the source is pretrained on the whole training split, the Lipschitz stage sees 10 % of it.
    "converted pretrained, 10 % of the images": Row("pretrained", run={"max_train_images": LOW_DATA_IMAGES}),
    "random init, 10 % of the images": Row("random", run={"max_train_images": LOW_DATA_IMAGES}),
    # Other data: the source is pretrained on digits turned a quarter (images the target never sees).
    "converted pretrained on rotated digits": Row("pretrained", source_run={"image_transform": "rot90"}),
    # A family that is new: EVA-02 (rotary embeddings, SwiGLU), pretrained and converted, against random init.
    "EVA-02-style, converted pretrained": Row("pretrained", model=EVA02),
    "EVA-02-style, random init": Row("random", model=EVA02),
    # Long budgets: the training radius ramps to 3x 36/255 (the largest radius the certificate reports), not 2x.
    "converted pretrained, training radius to 108/255": Row("pretrained", train={"eps_end": 3.0}),
    "random init, training radius to 108/255": Row("random", train={"eps_end": 3.0}),
    # What else was tried against the converted model's fading lead at 27 epochs (the curve's 27-epoch rows are the
    # reference): a residual budget that tightens from 12 to 6 during training, distillation from the source.
    "converted pretrained, residual budget tightening to 6": Row("pretrained", train={"residual_budget_end": 6.0}),
    "converted pretrained, distilled from the source": Row("pretrained", train={"distill": 1.0}),
    # Low data, distilled from the source (which saw every image): what the source knows, on the 10 % only.
    "converted pretrained, 10 % of the images, distilled": Row(
        "pretrained", run={"max_train_images": LOW_DATA_IMAGES}, train={"distill": 1.0}
    ),
}


@dataclass(frozen=True)
class RowSet:
    """The rows of one ``--set``, where they are written, and their Lipschitz-epoch budgets (``None``: the
    recipe's default and a third of it, ``--epochs`` / ``--budgets``)."""

    rows: list[str]
    output: str
    epochs: tuple[int, ...] | None = None


_PRETRAINED, _RANDOM = "converted pretrained (recipe default)", "random init (`--pretrain_epochs 0`)"
# Row sets (``--set``): the README's main table, the MLP forms of ``ConvertConfig``, the defaults' ablations, the
# transfer curve (both starts at 3x more epochs each), and the settings where the source knows more than the target's
# data (low data: fewer images per epoch, so longer budgets).
ROW_SETS: dict[str, RowSet] = {
    "main": RowSet(list(ROWS)[:4], "bench/results/transfer.json"),
    "mlp": RowSet(list(ROWS)[4:8], "bench/results/transfer_mlp.json"),
    "ablation": RowSet(list(ROWS)[8:11], "bench/results/transfer_ablation.json"),
    "curve": RowSet([_PRETRAINED, _RANDOM], "bench/results/transfer_curve.json", epochs=(3, 9, 27)),
    "low_data": RowSet(list(ROWS)[11:13], "bench/results/transfer_low_data.json", epochs=(9, 27, 81)),
    "other_data": RowSet([list(ROWS)[13], _RANDOM], "bench/results/transfer_other_data.json", epochs=(3, 9)),
    "eva02": RowSet(list(ROWS)[14:16], "bench/results/transfer_eva02.json"),
    "curve_radius": RowSet(list(ROWS)[16:18], "bench/results/transfer_curve_radius.json", epochs=(3, 9, 27)),
    "long_ablation": RowSet(list(ROWS)[18:20], "bench/results/transfer_long_ablation.json", epochs=(27,)),
    "low_data_distill": RowSet(list(ROWS)[20:21], "bench/results/transfer_low_data_distill.json", epochs=(9, 27, 81)),
}


def recipe_defaults() -> dict[str, Any]:
    """The recipe's default run, conversion and training settings, one flat dict (``eps``: the training radius)."""
    configs = recipe.default_configs()
    return {
        k: v
        for config in (configs.run, configs.convert, configs.training)
        for k, v in dataclasses.asdict(config).items()
    }


def write_model_folder(row: Row, base: Configs, seed: int, folder: str | Path) -> str:
    """The row's timm architecture with random weights drawn with ``seed``, saved as the folder ``--model`` loads."""
    torch.manual_seed(seed)
    kwargs = {**row.model["kwargs"], "img_size": base.run.image_size, "num_classes": NUM_CLASSES}
    save_model_folder(timm.create_model(row.model["model_name"], pretrained=False, **kwargs), folder)
    return str(folder)


def row_configs(
    base: Configs, name: str, *, seed: int, epochs: int, output_dir: str | Path, model_dir: str | None = None
) -> Configs:
    """``base`` (the recipe's configs) with the row's overrides, its seed, budget and output folder (``model_dir``:
    the folder of a row's own architecture, :func:`write_model_folder`)."""
    row = ROWS[name]
    pretrain_epochs = base.training.pretrain_epochs if row.start == "pretrained" else 0
    model = {"model": model_dir} if row.model else {}
    return base._replace(
        run=dataclasses.replace(base.run, seed=seed, output_dir=str(output_dir), **row.run, **model),
        training=dataclasses.replace(base.training, epochs=epochs, pretrain_epochs=pretrain_epochs, **row.train),
        convert=dataclasses.replace(base.convert, **row.convert),
    )


def pretrain_source(
    base: Configs, seed: int, output_dir: str, source_run: dict[str, Any] | None = None, model_dir: str | None = None
) -> float:
    """The recipe's source for ``seed``: its pretraining phase (``base.training.pretrain_epochs`` of
    cross-entropy, on the data of ``base.run`` with the ``source_run`` overrides; ``model_dir``: the architecture's
    folder), saved to ``<output_dir>/source.safetensors``; returns its wall time."""
    torch.set_num_threads(1)
    model = {"model": model_dir} if model_dir else {}
    run = dataclasses.replace(base.run, seed=seed, output_dir=output_dir, **(source_run or {}), **model)
    configs = base._replace(run=run)
    accelerator, _ = recipe.start(configs)
    data = recipe.build_data(accelerator, configs)
    source, _ = recipe.build_source(configs, data)
    start = time.perf_counter()
    recipe.pretrain_source(accelerator, configs, source, data)
    finish(accelerator)
    return time.perf_counter() - start


def _certify_lipshift(configs: Configs, model: torch.nn.Module, data: recipe.Data) -> dict[str, Any]:
    """LipShiFT has no certificate record (it is no converted timm / transformers model): robustvit.certify's
    radii on the images the recipe certifies, at its radii."""
    certification = configs.certification
    images, labels = stack_examples(data.test_set, certification.max_eval_images)
    result = robustvit.certify(model.eval(), images, labels, batch_size=certification.eval_batch_size)
    certified = {f"{round(eps * 255)}/255": result.certified_accuracy(eps) for eps in certification.eps}
    return {"clean_accuracy": result.clean_accuracy, "certified_accuracy": certified, "lipschitz": result.lipschitz}


def _clean_accuracy(model: torch.nn.Module, configs: Configs, data: recipe.Data) -> float:
    """Accuracy of a source (normalized inputs) or converted model (pixels) on the images the recipe certifies, in
    eval mode (the model's mode is restored)."""
    images, labels = stack_examples(data.test_set, configs.certification.max_eval_images)
    training = model.training
    with torch.no_grad():
        accuracy = (PixelModel(model).eval()(images).argmax(1) == labels).float().mean().item()
    model.train(training)
    return accuracy


def train_and_certify(
    base: Configs,
    name: str,
    seed: int,
    epochs: int,
    output_dir: str,
    source_dir: str | None,
    model_dir: str | None = None,
) -> dict[str, Any]:
    """One row, one seed, one budget: the recipe's phases from ``ROWS[name]``'s start (a pretrained one read back
    from ``source_dir``, where :func:`pretrain_source` saved it; ``model_dir``: the row's architecture), into
    ``output_dir``. A converted row also reports the clean accuracy of its source and of the converted model before
    Lipschitz training (what conversion costs)."""
    torch.set_num_threads(1)
    row = ROWS[name]
    configs = row_configs(base, name, seed=seed, epochs=epochs, output_dir=output_dir, model_dir=model_dir)
    accelerator, _ = recipe.start(configs)
    started = time.perf_counter()
    data = recipe.build_data(accelerator, configs)
    if row.start == "lipshift":
        source = None
        model = create_lipshift(data.train_set.num_classes, img_size=configs.run.image_size, **row.lipshift)
    else:
        source, description = recipe.build_source(configs, data)
        if row.start == "pretrained":  # the seed's pretraining, read back as the recipe's --resume does
            source = recipe.read_source(source, Path(source_dir) / SOURCE_WEIGHTS)
        else:  # --pretrain_epochs 0: the source is saved as built
            source = recipe.pretrain_source(accelerator, configs, source, data)
        model = recipe.convert_source(configs, source, data)
        conversion = {
            "source_clean": _clean_accuracy(source, configs, data),
            "converted_clean": _clean_accuracy(model, configs, data),
        }
    start_bound = robustvit.lipschitz_bound(model)
    model, history = recipe.train_margin(accelerator, configs, model, source, data)
    if row.start == "lipshift":
        metrics = _certify_lipshift(configs, model, data)
    else:
        metrics = recipe.certify_and_save(
            accelerator, configs, model, data, description=description, history=history, started=started
        )
    finish(accelerator)
    return {
        "row": name,
        "seed": seed,
        "epochs": epochs,
        "clean": metrics["clean_accuracy"],
        "certified": metrics["certified_accuracy"],
        "start_bound": start_bound,
        "bound": metrics["lipschitz"],
        "seconds": time.perf_counter() - started,
        **({} if row.start == "lipshift" else conversion),
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
        **{key: stats([r[key] for r in runs]) for key in ("source_clean", "converted_clean") if key in runs[0]},
    }


def table(summaries: list[dict[str, Any]]) -> str:
    """The markdown table of a set; with a column for what conversion costs (clean accuracy of the source, then of the
    converted model before Lipschitz training) where the runs measured it."""

    def pct(s: dict[str, float]) -> str:
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"

    conversion = any("source_clean" in s for s in summaries)
    lines = [
        "| start | epochs | clean | cert. 36/255 | cert. 72/255 | cert. 108/255 | bound (start → end) | time / run |"
        + (" clean: source → converted |" if conversion else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if conversion else ""),
    ]
    for s in summaries:
        cert = s["certified"]
        line = (
            f"| {s['row']} | {s['epochs']} | {pct(s['clean'])} | {pct(cert['36/255'])} | {pct(cert['72/255'])} | "
            f"{pct(cert['108/255'])} | {s['start_bound']['mean']:.3g} → {s['bound']['mean']:.3g} | "
            f"{s['seconds']['mean']:.0f} s |"
        )
        if conversion:
            cost = f" {pct(s['source_clean'])} → {pct(s['converted_clean'])} |" if "source_clean" in s else " |"
            line += cost
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="full budget (default: the recipe's)")
    parser.add_argument(
        "--budgets", nargs="+", default=["full", "short"], choices=["full", "short"], help="short: a third of full"
    )
    parser.add_argument("--budget_epochs", type=int, nargs="+", default=None, help="instead of the set's budgets")
    parser.add_argument("--pretrain_epochs", type=int, default=DEFAULT_PRETRAIN_EPOCHS, help="of the source")
    parser.add_argument("--set", default="main", choices=list(ROW_SETS), help="rows and output of a README table")
    parser.add_argument("--rows", nargs="+", default=None, choices=list(ROWS), help="instead of the set's rows")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", default=None, help="default: the set's JSON under bench/results/")
    args = parser.parse_args()
    row_set = ROW_SETS[args.set]
    args.rows = args.rows or row_set.rows
    args.output = args.output or row_set.output
    base = recipe.default_configs()
    base = base._replace(training=dataclasses.replace(base.training, pretrain_epochs=args.pretrain_epochs))
    full = args.epochs or base.training.epochs
    budgets = sorted(
        args.budget_epochs
        or row_set.epochs
        or {{"full": full, "short": max(1, round(full / 3))}[budget] for budget in args.budgets}
    )
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, context.Pool(args.workers) as pool:
        # One source per seed and source setting, shared by the pretrained rows that start from it.
        source_runs = {
            ROWS[name].source_key(): ROWS[name].source_run for name in args.rows if ROWS[name].start == "pretrained"
        }
        models = {  # a row's own architecture: one random-weight folder per seed, written here, read by the workers
            (seed, ROWS[name].model_key()): write_model_folder(
                ROWS[name], base, seed, Path(tmp) / f"model_{ROWS[name].model_key()}_{seed}"
            )
            for name in args.rows
            if ROWS[name].model
            for seed in args.seeds
        }
        sources = {(seed, key): str(Path(tmp) / f"source_{key}_{seed}") for key in source_runs for seed in args.seeds}
        source_models = {key: ROWS[name].model_key() for name in args.rows for key in [ROWS[name].source_key()]}
        pretrain = pool.starmap(
            pretrain_source,
            [
                (base, seed, folder, source_runs[key], models.get((seed, source_models[key])))
                for (seed, key), folder in sources.items()
            ],
        )
        jobs = [
            (
                base,
                name,
                seed,
                epochs,
                str(Path(tmp) / f"row{list(ROWS).index(name)}_seed{seed}_{epochs}"),
                sources.get((seed, ROWS[name].source_key())),
                models.get((seed, ROWS[name].model_key())),
            )
            for epochs in budgets
            for name in args.rows
            for seed in args.seeds
        ]
        jobs.sort(key=lambda job: -job[3])  # long jobs first: the two workers finish together
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
        "pretrain_seconds": pretrain,  # one per seed and source setting
        "budgets": budgets,
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
