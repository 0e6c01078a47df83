"""Typed settings that describe themselves: the dataclasses behind every recipe flag and the CLI's shared flags.

Each field carries its help text and, where the values are the names of a registry, the registry to draw the
choices from (``metadata={"help": ..., "registry": "module:NAME"}``). :func:`add_arguments` turns dataclasses into
argparse flags, one snake_case flag per field with one meaning, and :func:`parse_configs` gives the dataclasses back;
the recipes save ``dataclasses.asdict`` of each in their metrics. This module imports neither torch nor the
registries: the registries are read when a parser asks for them (``resolve_choices=True``), so that
``robustvit --help`` stays fast. transformers' ``HfArgumentParser`` would read the choices when the dataclass is
defined, which imports torch, timm and transformers for ``--help``; hence this small generator.

Example:
    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser, LipschitzTrainingConfig, defaults={"epochs": 3})
    >>> (training,) = parse_configs(parser, ["--loss", "emma", "--eps", "0.14"], LipschitzTrainingConfig)
    >>> training.epochs, training.loss, training.eps
    (3, 'emma', 0.14)
    >>> "ce" in parser._option_string_actions["--loss"].choices  # drawn from robustvit.losses.LOSSES
    True
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import json
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from robustvit.constants import DEFAULT_EPS

__all__ = [
    "CertificationConfig",
    "ConvertConfig",
    "EvaluationConfig",
    "LipschitzTrainingConfig",
    "NullspaceFinetuningConfig",
    "RunConfig",
    "add_arguments",
    "arg",
    "build_configs",
    "file_defaults",
    "from_args",
    "parse_configs",
]

CHECKPOINT_EVERY_EPOCH = "epoch"


def arg(default: Any = dataclasses.MISSING, help: str = "", *, registry: str | None = None, **metadata: Any) -> Any:
    """A dataclass field that describes its flag: ``help``, and the choices: ``registry`` (``"module:NAME"`` of a
    :class:`~robustvit.registry.Registry`, a mapping or an enum, read only when a parser resolves choices) or a
    fixed ``choices=(...)``. Further keywords: ``parse`` (the flag's ``type``), ``negatable`` (adds ``--no_<name>``).

    Mutable defaults (lists) are copied for each instance.

    Example:
        >>> @dataclass
        ... class Demo:
        ...     loss: str = arg("emma", "margin loss", registry="robustvit.losses:LOSSES")
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser, Demo)
        >>> parse_configs(parser, ["--loss", "ce"], Demo)
        (Demo(loss='ce'),)
    """
    metadata = {"help": help, "registry": registry, **metadata}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _choices(field: dataclasses.Field, resolve: bool) -> list[Any] | None:
    if field.metadata.get("choices") is not None:
        return list(field.metadata["choices"])
    location = field.metadata.get("registry")
    if location is None or not resolve:
        return None
    module, _, name = location.partition(":")
    registry = getattr(importlib.import_module(module), name)
    if isinstance(registry, type) and issubclass(registry, enum.Enum):
        return [member.value for member in registry]
    return list(registry.list() if hasattr(registry, "list") else registry)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _checkpointing_steps(text: str) -> str | int:
    if text == CHECKPOINT_EVERY_EPOCH:
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{CHECKPOINT_EVERY_EPOCH}' or a positive number of steps, got {text!r}")
    return value


def _flag(field: dataclasses.Field, annotation: Any, default: Any, resolve: bool) -> dict[str, Any]:
    """``add_argument`` keywords for one field."""
    kind, optional = _unwrap(annotation)
    help_text = field.metadata.get("help", "")
    choices = _choices(field, resolve)
    if choices is None and field.metadata.get("registry") and not resolve:
        help_text += f" (one of {field.metadata['registry'].replace(':', '.')})"
    if default is not None and default is not dataclasses.MISSING and not isinstance(default, bool):
        help_text += f" (default: {default})"
    kwargs: dict[str, Any] = {"help": help_text, "default": default}
    if kind is bool:
        kwargs["action"] = "store_true"
        return kwargs
    if typing.get_origin(kind) in (list, tuple):
        kind = typing.get_args(kind)[0]
        kwargs["nargs"] = "*"  # an empty list may mean "none" (--l2_radii); the dataclass refuses where it does not
        optional = False
    if "parse" in field.metadata:
        kwargs["type"] = field.metadata["parse"]
    elif kind in (int, float, str):
        kwargs["type"] = _none_or(kind) if optional else kind
    else:
        raise TypeError(f"no flag for field {field.name!r} of type {annotation!r}")
    if choices is not None:
        kwargs["choices"] = choices
        kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}" if len(choices) < 12 else field.name.upper()
    return kwargs


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config: type,
    *,
    defaults: Mapping[str, Any] | None = None,
    only: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    resolve_choices: bool = True,
) -> None:
    """Add one ``--<field>`` flag per field of the dataclass ``config`` to ``parser`` (or an argument group).

    Args:
        defaults: field -> default, overriding the dataclass's (a recipe's own defaults).
        only, exclude: the fields that get a flag (the others keep their defaults in :func:`parse_configs`).
        resolve_choices: read the registries for ``choices`` (imports them); ``False`` names them in the help
            instead, and the dataclass's validation lists the known names for an unknown one.
    """
    hints = typing.get_type_hints(config)
    defaults = dict(defaults or {})
    unknown = set(defaults) - {field.name for field in dataclasses.fields(config)}
    if unknown:
        raise ValueError(f"{config.__name__} has no fields {sorted(unknown)}")
    for field in dataclasses.fields(config):
        if (only is not None and field.name not in only) or field.name in exclude:
            continue
        if field.name in defaults:
            default = defaults[field.name]
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = field.default
        parser.add_argument(f"--{field.name}", **_flag(field, hints[field.name], default, resolve_choices))
        if field.metadata.get("negatable"):  # a YAML config may set it; the command line can unset it
            parser.add_argument(f"--no_{field.name}", dest=field.name, action="store_false", help=argparse.SUPPRESS)


def file_defaults(parser: argparse.ArgumentParser, settings: Any, source: str = "--config") -> dict[str, Any]:
    """``settings`` (a mapping read from a YAML ``--config`` file: flag names without ``--``) checked and converted
    like the same flags on the command line, ready for ``parser.set_defaults``.

    ``argparse`` does neither for defaults: without this, a YAML value outside a flag's choices, or of the wrong type
    (``epochs: true``), would reach the run unchecked.

    Raises:
        ValueError: not a mapping, an unknown name, a value of the wrong type or outside the flag's choices.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser, LipschitzTrainingConfig)
        >>> file_defaults(parser, {"epochs": 3, "loss": "ce", "lr": "1e-3"})
        {'epochs': 3, 'loss': 'ce', 'lr': 0.001}
        >>> file_defaults(parser, {"loss": "hinge"})
        Traceback (most recent call last):
        ...
        ValueError: --config: loss: 'hinge' is not one of [...]
    """
    if not isinstance(settings, dict):
        raise ValueError(f"{source}: expected a mapping of flag names (without '--') to values, got {settings!r}")
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    unknown = sorted(set(settings) - set(actions))
    if unknown:
        raise ValueError(f"{source}: unknown settings {unknown}; use the flag names without '--'")
    converted = {}
    for name, value in settings.items():
        action = actions[name]
        if action.nargs == 0:  # store_true
            if not isinstance(value, bool):
                raise ValueError(f"{source}: {name}: expected true or false, got {value!r}")
            converted[name] = value
            continue
        values = value if action.nargs == "*" and isinstance(value, list) else [value]
        nested = any(isinstance(v, bool | list | dict) for v in values)
        if action.nargs != "*" and isinstance(value, list | dict) or nested:
            raise ValueError(
                f"{source}: {name}: expected {'a list of values' if action.nargs == '*' else 'one value'}"
                f", got {value!r}"
            )
        try:
            values = [v if v is None or action.type is None else action.type(str(v)) for v in values]
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            raise ValueError(f"{source}: {name}: invalid value {value!r} ({error})") from None
        for v in values:
            if action.choices is not None and v not in action.choices:
                raise ValueError(f"{source}: {name}: {v!r} is not one of {list(action.choices)}")
        converted[name] = values if action.nargs == "*" else values[0]
    return converted


def parse_configs(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *configs: type) -> tuple[Any, ...]:
    """Parse ``argv`` and build each dataclass of ``configs`` from the flags of its fields.

    A dataclass's ``ValueError`` (its validation) becomes a usage error (exit status 2), as a bad flag is.
    """
    args = parser.parse_args(argv)
    return build_configs(parser, args, *configs)


def build_configs(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    *configs: type,
    exclude: Mapping[type, Sequence[str]] | None = None,
) -> tuple[Any, ...]:
    """The dataclasses of :func:`parse_configs` from already parsed ``args``; a ``ValueError`` is a usage error.

    ``exclude``: dataclass -> fields that had no flag of their own (another dataclass's flag of the same name).
    """
    try:
        return tuple(from_args(config, args, exclude=(exclude or {}).get(config, ())) for config in configs)
    except ValueError as err:
        parser.error(str(err))


def from_args(config: type, args: argparse.Namespace, *, exclude: Sequence[str] = ()) -> Any:
    """The dataclass ``config`` from the attributes of ``args`` named like its fields (missing or excluded ones:
    the defaults).

    Raises:
        ValueError: the dataclass's validation fails.
    """
    names = [f.name for f in dataclasses.fields(config) if hasattr(args, f.name) and f.name not in exclude]
    return config(**{name: getattr(args, name) for name in names})


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _positive(config: Any, *names: str, allow_none: bool = False, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None and allow_none:
            continue
        low = 0 if allow_zero else 1
        _check(isinstance(value, int) and value >= low, f"--{name} must be an integer >= {low}, got {value!r}")


# --------------------------------------------------------------------------------------------------- conversion


@dataclass
class ConvertConfig:
    """Conversion choices (``robustvit.convert``); ``to_dict()`` / ``from_dict()`` round-trip through JSON.

    Args:
        mixer: ``"shift"`` (LipShiFT token shift, bound 1) or ``"l2"`` (tied L2 attention, Kim et al. 2021,
            whose bound grows like ``sqrt(N) log N`` with the number of tokens N).
        shift_div: ShiftViT's ``n_div``: four groups of ``dim // shift_div`` channels are shifted.
        activation: the MLP activation when ``mlp="keep"``: ``"gelu"`` (kept; bound 1.129) or ``"minmax"``
            (GroupSort-2; bound 1). Like ``shift_div`` for ``mixer="l2"``, it does not apply otherwise: SLL and CPL
            layers use ReLU (their proofs need slopes in [0, 1]).
        mlp: ``"keep"`` (the source MLP in a weighted residual, bound ``1 + alpha * L(mlp)``), ``"sll"``
            (:class:`~robustvit.layers.SLL`, Araujo et al. 2023) or ``"cpl"`` (:class:`~robustvit.layers.CPL`,
            Meunier et al. 2022): the whole residual MLP sub-block becomes one residual layer of the same hidden
            width with bound 1. Its ``W`` and ``b`` start as the source's ``fc1`` applied after the LayerNorm's affine
            (gamma folded into ``W``, beta into ``b``); its output map is ``W^T`` times a step fixed by ``W``, so it
            cannot copy ``fc2``: the converted function departs from the source's there, and needs finetuning.
        residual_alpha: initial residual weight (multiplied by any LayerScale and the moved scales); 1.0 keeps
            the source's function.
        singular_value_power: ``p`` in ``sigma_i -> sigma_max * (sigma_i / sigma_max) ** p`` for every spectrally
            rescaled weight (singular vectors kept). ``1.0`` keeps the source's weights; ``0.0`` keeps only their
            singular vectors (the polar factor: an orthogonal layer, as LipShiFT / LiResNet initialise), so every
            direction the source learned passes at full gain instead of ``sigma_i / sigma_max``.
        residual_budget: target bound of the residual stack, the product of the residual blocks' bounds
            ``prod_r (1 + max|alpha_r| * bound(branch_r))``. ``None`` keeps the source's scales (for the embedded
            default a stack bound of 41, end-to-end 27, against about 2 for a random init); a number ``> 1`` shrinks
            every residual weight by one common factor until the stack meets it, so the blocks share the budget in
            proportion to their source weights and margin training starts from a tight product bound instead of
            having to unlearn a loose one. The layers outside the stack (patch embedding, norms, head) are left as
            they are. ``robustvit.lipschitz_report`` shows where the budget goes.
        mean, std: the normalization the source expects (per channel). ``None``: timm's ``pretrained_cfg``, or
            the transformers image processor's defaults.

    Example:
        >>> ConvertConfig(mixer="shift", activation="minmax").to_json()
        '{"activation": "minmax", "mean": null, "mixer": "shift", "mlp": "keep", "residual_alpha": 1.0, ...}'
    """

    mixer: str = arg("shift", "token mixer", registry="robustvit.convert:MIXERS")
    shift_div: int = arg(12, "ShiftViT's n_div: four groups of dim // shift_div channels are shifted")
    activation: str = arg("gelu", "MLP activation (with --mlp keep)", registry="robustvit.convert:ACTIVATIONS")
    mlp: str = arg("keep", "MLP form: the source's in a weighted residual, or a bound-1 residual layer",
                   registry="robustvit.convert:MLPS")  # fmt: skip
    residual_alpha: float = arg(1.0, "initial residual weight; 1.0 keeps the source's function")
    singular_value_power: float = arg(
        1.0, "flatten every weight's spectrum: 1 keeps the source's weights, 0 keeps their singular vectors only"
    )
    residual_budget: float | None = arg(
        None, "bound of the converted residual stack (> 1; 'none' keeps the source's scales)"
    )
    mean: tuple[float, ...] | None = arg(None, "input normalization mean, per channel (default: the source's)")
    std: tuple[float, ...] | None = arg(None, "input normalization std, per channel (default: the source's)")

    def __post_init__(self) -> None:
        from robustvit.convert import ACTIVATIONS, MIXERS, MLPS  # the registries import torch: only when built

        for field, registry in (("mixer", MIXERS), ("activation", ACTIVATIONS), ("mlp", MLPS)):
            if getattr(self, field) not in registry:
                raise ValueError(f"{field} must be one of {registry.list()}, got {getattr(self, field)!r}")
        if self.shift_div < 4:
            raise ValueError(f"shift_div must be at least 4, got {self.shift_div}")
        if not self.residual_alpha > 0:
            raise ValueError(f"residual_alpha must be positive, got {self.residual_alpha}")
        if not 0 <= self.singular_value_power <= 1:
            raise ValueError(f"singular_value_power must be in [0, 1], got {self.singular_value_power}")
        if self.residual_budget is not None and not self.residual_budget > 1:
            raise ValueError(f"residual_budget must be above 1 or None, got {self.residual_budget}")
        self.mean = tuple(float(v) for v in self.mean) if self.mean is not None else None
        self.std = tuple(float(v) for v in self.std) if self.std is not None else None
        if (self.mean is None) != (self.std is None) or (self.mean is not None and len(self.mean) != len(self.std)):
            raise ValueError(f"mean and std must be given together with one value per channel: {self.mean}, {self.std}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvertConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown ConvertConfig fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# --------------------------------------------------------------------------------------------------- the run


@dataclass
class RunConfig:
    """Where a recipe reads and writes, and how it runs (Accelerate): everything but the hyper-parameters.

    Example:
        >>> RunConfig(output_dir="outputs/run", gradient_accumulation_steps=2).checkpointing_steps
        'epoch'
    """

    model: str | None = arg(None, "timm name, transformers id or directory (default: the embedded ViT)")
    dataset: str | None = arg(None, "imagefolder directory or Hugging Face datasets id (default: the embedded digits)")
    train_split: str = arg("train", "training split")
    eval_split: str = arg("test", "evaluation split, e.g. validation for ImageNet")
    image_size: int = arg(32, "side of the input images")
    channels: int = arg(3, "image channels", choices=(1, 3))
    seed: int = arg(0, "seed of weights, data order and noise (accelerate.utils.set_seed)")
    output_dir: str = arg("outputs/run", "folder of every output; an existing non-empty one needs --resume or "
                          "--overwrite_output_dir")  # fmt: skip
    resume: bool = arg(False, "continue from the latest checkpoints in --output_dir (pretraining included)")
    overwrite_output_dir: bool = arg(False, "delete the outputs of an earlier run in --output_dir and start again")
    checkpointing_steps: str | int = arg(
        CHECKPOINT_EVERY_EPOCH, "save a checkpoint every epoch ('epoch') or every N optimizer steps",
        parse=_checkpointing_steps,
    )  # fmt: skip
    checkpoints_total_limit: int | None = arg(
        2, "keep the newest N checkpoints of each training phase (Accelerate's total_limit; 'none': all)"
    )
    mixed_precision: str | None = arg(None, "Accelerate's mixed precision (default: accelerate config's)",
                                      choices=("no", "fp16", "bf16"))  # fmt: skip
    gradient_accumulation_steps: int = arg(1, "batches per optimizer step (accelerator.accumulate)")
    with_tracking: bool = arg(False, "log metrics to the trackers of --report_to (Accelerate trackers)")
    report_to: str = arg("all", "tracker for --with_tracking ('all': every installed one)",
                         registry="accelerate.utils:LoggerType")  # fmt: skip
    cpu: bool = arg(False, "run on CPU even if an accelerator is available")
    num_workers: int = arg(0, "DataLoader workers")
    max_train_batches: int | None = arg(None, "cap batches per epoch and process (smoke tests)")
    require_pretrained: bool = arg(False, "refuse to start from random weights (--no_require_pretrained: allow)",
                                   negatable=True)  # fmt: skip

    def __post_init__(self) -> None:
        _positive(self, "image_size", "gradient_accumulation_steps")
        _positive(self, "num_workers", allow_zero=True)
        _positive(self, "checkpoints_total_limit", "max_train_batches", allow_none=True)
        _check(self.channels in (1, 3), f"--channels must be 1 or 3, got {self.channels}")
        _check(not (self.resume and self.overwrite_output_dir), "--resume and --overwrite_output_dir contradict")
        steps = self.checkpointing_steps
        _check(
            steps == CHECKPOINT_EVERY_EPOCH or (isinstance(steps, int) and steps >= 1),
            f"--checkpointing_steps must be '{CHECKPOINT_EVERY_EPOCH}' or a positive int, got {steps!r}",
        )
        if self.max_train_batches is not None and self.max_train_batches % self.gradient_accumulation_steps:
            raise ValueError(
                f"--max_train_batches {self.max_train_batches} must be a multiple of --gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps}"
            )

    def result_settings(self) -> dict[str, Any]:
        """The fields a run's results depend on (what a resumed run must share): all but the bookkeeping ones.

        Example:
            >>> sorted(RunConfig(output_dir="elsewhere", resume=True).result_settings()) == sorted(
            ...     RunConfig().result_settings())
            True
        """
        return {key: value for key, value in dataclasses.asdict(self).items() if key not in RUN_BOOKKEEPING_FIELDS}


RUN_BOOKKEEPING_FIELDS = frozenset({
    "output_dir", "resume", "overwrite_output_dir", "checkpointing_steps", "checkpoints_total_limit", "with_tracking",
    "report_to", "cpu", "num_workers",
})  # fmt: skip
"""RunConfig fields that change where and how a run is recorded, never its results (a resume may change them)."""


# --------------------------------------------------------------------------------------------------- training


@dataclass
class TrainingConfig:
    """What every recipe's training shares: the budget, the optimizer (AdamW, cosine schedule) and a source
    pretraining (plain cross-entropy from random weights, for the embedded default model)."""

    epochs: int = arg(9, "training epochs")
    lr: float = arg(2e-3, "AdamW peak learning rate (cosine schedule, transformers' get_cosine_schedule_with_warmup)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    batch_size: int = arg(64, "per process")
    pretrain_epochs: int | None = arg(
        None, "plain cross-entropy training of the source first ('none': a recipe default for the embedded model)"
    )
    pretrain_lr: float = arg(2e-3, "AdamW learning rate of the source pretraining")
    lora_r: int = arg(0, "LoRA rank (robustvit.peft); 0 trains all parameters")

    def __post_init__(self) -> None:
        _positive(self, "epochs", "lora_r", allow_zero=True)
        _positive(self, "pretrain_epochs", allow_none=True, allow_zero=True)
        _positive(self, "batch_size")
        for name in ("lr", "pretrain_lr"):
            _check(getattr(self, name) > 0, f"--{name} must be > 0, got {getattr(self, name)}")
        _check(self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class LipschitzTrainingConfig(TrainingConfig):
    """Lipschitz-margin training of a converted model (``recipes/train_lipschitz.py``).

    Example:
        >>> LipschitzTrainingConfig(loss="emma", eps=36 / 255).eps_start
        0.1
    """

    loss: str = arg("emma", "Lipschitz-margin loss", registry="robustvit.losses:LOSSES")
    eps: float = arg(36 / 255, "target l2 radius of the margin (pixels in [0, 1])")
    eps_start: float = arg(0.1, "training radius at the start of the ramp, times --eps")
    eps_end: float = arg(2.0, "training radius after the ramp, times --eps")
    distill: float = arg(0.0, "weight of the distillation from the source model")
    max_grad_norm: float = arg(1.0, "clip the margin phase's gradient norm to this (0: no clipping)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("eps", "eps_start", "eps_end", "distill", "max_grad_norm"):
            _check(getattr(self, name) >= 0, f"--{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class NullspaceFinetuningConfig(TrainingConfig):
    """Approximate-nullspace finetuning against its controls (``recipes/finetune_nullspace.py``; Liu et al. 2025).

    Example:
        >>> NullspaceFinetuningConfig(methods=["nullspace", "ce"], nullspace_tol=0.03).seeds
        2
    """

    methods: list[str] = arg(
        ["nullspace", "ce", "random"], "finetuning methods, each from the same baseline and budget",
        registry="robustvit.nullspace.methods:FINETUNING_METHODS",
    )  # fmt: skip
    seeds: int = arg(2, "runs of each method, with seeds seed, seed+1, ...")
    epochs: int = arg(4, "finetuning epochs (one noise synthesis each)")
    lr: float = arg(1e-4, "AdamW peak learning rate of the finetuning")
    weight_decay: float = arg(0.05, "AdamW weight decay")
    train_data_fraction: float = arg(1.0, "fraction of the training batches per epoch (paper: 0.004)")
    nullspace_tol: float = arg(
        0.03, "the paper's epsilon: tolerance on the mean squared softmax-probability change under the noise "
        "(not a radius)",
    )  # fmt: skip
    init_limit: float = arg(3.0, "noise init U(-init_limit, init_limit)")
    noise_lr: float = arg(0.1, "AdamW learning rate of the noise")
    # The paper: 3 rounds over 10% of ImageNet, thousands of AdamW steps. 10% of digits is 2 batches, and 6 steps
    # leave the U(-3, 3) noise far outside the eps-nullspace; 6 rounds over all of it (~140 steps) reach it.
    noise_rounds: int = arg(6, "passes over the noise data per synthesis")
    noise_data_fraction: float = arg(1.0, "fraction of the training batches per noise round")
    unconverged_noise: str = arg(
        "resynthesize", "a noise that did not reach the tolerance: search on from it (up to --noise_retries more "
        "times, then stop with an error), or train with it as the paper's code does",
        choices=("resynthesize", "train"),
    )  # fmt: skip
    noise_retries: int = arg(3, "further searches for a noise that did not reach the tolerance")
    drop_path: float = arg(0.0, "stochastic depth of timm ViTs (paper: 0.25)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            bool(self.methods) and len(set(self.methods)) == len(self.methods),
            f"--methods must be distinct names, got {self.methods}",
        )
        _positive(self, "epochs", "seeds", "noise_rounds")  # no epochs: every method would be the baseline
        _positive(self, "noise_retries", allow_zero=True)
        for name in ("noise_data_fraction", "train_data_fraction"):
            _check(0 < getattr(self, name) <= 1, f"--{name} must be in (0, 1], got {getattr(self, name)}")
        _check(self.nullspace_tol > 0, f"--nullspace_tol must be > 0, got {self.nullspace_tol}")
        _check(0 <= self.drop_path < 1, f"--drop_path must be in [0, 1), got {self.drop_path}")


# --------------------------------------------------------------------------------------------------- evaluation


@dataclass
class _EvaluationBudget:
    pgd_steps: int = arg(50, "steps of each PGD attack")
    max_eval_images: int | None = arg(
        None, "evaluate N images of the evaluation split (default: all; robustvit verify: the certificate's N)"
    )
    eval_batch_size: int = arg(256, "evaluation batch size")

    def __post_init__(self) -> None:
        _positive(self, "pgd_steps", "eval_batch_size")
        _positive(self, "max_eval_images", allow_none=True)


@dataclass
class CertificationConfig(_EvaluationBudget):
    """Certification of a split (``robustvit.certify.dataset.certify_split``): the certificate's l2 radii, its PGD
    column (an l2 attack that tries to break the certificates) and the images.

    Example:
        >>> [round(e * 255) for e in CertificationConfig().eps]
        [36, 72, 108]
    """

    eps: list[float] = arg(list(DEFAULT_EPS), "l2 radii to report (pixels in [0, 1]; 36/255 works)",
                           parse=lambda text: _radius(text))  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        self.eps = [float(e) for e in self.eps]
        _check(bool(self.eps) and min(self.eps) >= 0, f"--eps must be radii >= 0, got {self.eps}")


@dataclass
class EvaluationConfig(_EvaluationBudget):
    """Empirical robustness evaluation (``robustvit.evaluation.evaluate_robustness``) of finetuned models: FGSM and
    PGD radii in 1/255 per norm, corruptions and their severities, and extra test sets.

    Example:
        >>> EvaluationConfig(l2_radii=[], corruptions=["contrast"]).linf_radii
        [2.0]
    """

    eval_batch_size: int = arg(128, "evaluation batch size")
    pgd_restarts: int = arg(2, "random restarts of each PGD attack")
    # One radius per norm by default: PGD with 50 steps x 2 restarts dominates the run time on CPU.
    linf_radii: list[float] = arg([2.0], "FGSM / PGD linf radii, in 1/255")
    l2_radii: list[float] = arg([72.0], "FGSM / PGD l2 radii, in 1/255")
    corruptions: list[str] | None = arg(
        None, "corruptions (default: all)", registry="robustvit.corruptions:CORRUPTIONS"
    )
    severities: list[int] = arg([1, 3, 5], "corruption severities")
    eval_sets: list[str] = arg(
        [], "extra test sets NAME=PATH (imagefolder dir or HF id, e.g. ImageNet-R/-A), scored by clean accuracy over "
        "their classes, matched to the training classes by name",
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "pgd_restarts")
        radii = [*self.linf_radii, *self.l2_radii]
        _check(all(math.isfinite(r) and r > 0 for r in radii), f"attack radii must be > 0, got {radii}")
        _check(bool(self.severities) and all(1 <= s <= 5 for s in self.severities), "--severities must be in 1..5")
        for spec in self.eval_sets:
            name, _, source = spec.partition("=")
            _check(bool(name and source), f"--eval_sets takes NAME=PATH, got {spec!r}")


def _radius(text: str) -> float:
    """``36/255`` or ``0.1412``."""
    from fractions import Fraction

    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError) as err:
        raise argparse.ArgumentTypeError(f"expected a radius like 36/255 or 0.14, got {text!r}") from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"a radius must be >= 0, got {text!r}")
    return value
