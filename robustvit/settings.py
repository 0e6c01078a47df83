"""Settings that describe themselves: the field helper and flag generator behind every config dataclass.

Each field carries its help text and, where the values are the names of a registry, the registry to draw the
choices from (``metadata={"help": ..., "registry": "module:NAME"}``). :func:`add_arguments` turns dataclasses into
argparse flags, one snake_case flag per field with one meaning, and :func:`parse_configs` gives the dataclasses back.
This module imports neither torch nor the registries: a registry is read when a parser asks for its names
(``resolve_choices=True``) or a dataclass checks a value against it (:func:`check_choices`), so that
``robustvit --help`` stays fast. transformers' ``HfArgumentParser`` would read the choices when the dataclass is
defined, which imports torch, timm and transformers for ``--help``; hence this small generator. It sits on the
ground floor: the conversion's, the certification's and the recipes' configs (``robustvit.configs``) all use it.

Example:
    >>> from robustvit.configs import LipschitzTrainingConfig
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
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")

__all__ = [
    "add_arguments",
    "arg",
    "build_configs",
    "check",
    "check_choices",
    "check_positive",
    "file_defaults",
    "from_args",
    "parse_configs",
    "parse_radius",
    "parse_radius_per_255",
    "resolve_config",
]


def arg(default: Any = dataclasses.MISSING, help: str = "", *, registry: str | None = None, **metadata: Any) -> Any:
    """A dataclass field that describes its flag: ``help``, and the choices: ``registry`` (``"module:NAME"`` of a
    :class:`~robustvit.registry.Registry`, a mapping or an enum, read only when a parser resolves choices) or a
    fixed ``choices=(...)``. Further keywords: ``parse`` (the flag's ``type``), ``negatable`` (adds ``--no_<name>``),
    ``per_255`` (a radius in pixel units whose flag is spelled in 1/255: ``--l2_radii 72`` is 72/255).

    Mutable defaults (lists) are copied for each instance.

    Example:
        >>> @dataclasses.dataclass
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
    registry = _registry(location)
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


def _flag(field: dataclasses.Field, annotation: Any, default: Any, resolve: bool) -> dict[str, Any]:
    """``add_argument`` keywords for one field."""
    kind, optional = _unwrap(annotation)
    help_text = field.metadata.get("help", "")
    choices = _choices(field, resolve)
    if choices is None and field.metadata.get("registry") and not resolve:
        help_text += f" (one of {field.metadata['registry'].replace(':', '.')})"
    per_255 = field.metadata.get("per_255", False)
    if default is not None and default is not dataclasses.MISSING and not isinstance(default, bool):
        shown = [_in_255ths(r) for r in default] if per_255 else default  # the flag's spelling
        help_text += f" (default: {' '.join(shown) if per_255 else shown})"
    kwargs: dict[str, Any] = {"help": help_text, "default": default}
    if kind is bool:
        kwargs["action"] = "store_true"
        return kwargs
    if typing.get_origin(kind) in (list, tuple):
        kind = typing.get_args(kind)[0]
        kwargs["nargs"] = "*"  # an empty list may mean "none" (--l2_radii); the dataclass refuses where it does not
        optional = False
    if per_255:
        kwargs["type"] = parse_radius_per_255
    elif "parse" in field.metadata:
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
        >>> from robustvit.configs import LipschitzTrainingConfig
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


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_positive(config: Any, *names: str, allow_none: bool = False, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None and allow_none:
            continue
        low = 0 if allow_zero else 1
        check(isinstance(value, int) and value >= low, f"--{name} must be an integer >= {low}, got {value!r}")


def _registry(location: str) -> Any:
    """The registry a field names as ``"module:NAME"``, imported now: registries import torch, flags must not."""
    module, _, name = location.partition(":")
    return getattr(importlib.import_module(module), name)


def check_choices(config: Any, *names: str) -> None:
    """Raise a ``ValueError`` listing the known names unless each field ``names`` of the dataclass ``config`` holds a
    name (a list field: names) of the registry its ``arg(registry=...)`` names (registered entries included)."""
    fields = {field.name: field for field in dataclasses.fields(config)}
    for name in names:
        registry = _registry(fields[name].metadata["registry"])
        value = getattr(config, name)
        for item in value if isinstance(value, list) else [value]:  # a list field: each of its names
            if item not in registry:
                known = registry.list() if hasattr(registry, "list") else sorted(registry)
                raise ValueError(f"{name} must be one of {known}, got {item!r}")


def resolve_config(config_class: type[ConfigT], config: ConfigT | None, overrides: Mapping[str, Any]) -> ConfigT:
    """The settings a library function ``f(model, data, config=None, **overrides)`` runs with: ``config`` (default:
    ``config_class()``) with the ``overrides`` applied, built through the dataclass so that its validation runs.

    Raises:
        TypeError: ``config`` is not a ``config_class``, or an override is not one of its fields (the error lists
            them).
        ValueError: the dataclass's validation refuses a value.

    Example:
        >>> from robustvit.certification.config import CertificationConfig
        >>> resolve_config(CertificationConfig, None, {"pgd_steps": 5}).pgd_steps
        5
        >>> resolve_config(CertificationConfig, CertificationConfig(eps=[0.5]), {"pgd_step": 5})
        Traceback (most recent call last):
        ...
        TypeError: unknown setting(s) ['pgd_step'] of CertificationConfig; its fields: eps, eval_batch_size, ...
    """
    if config is not None and not isinstance(config, config_class):
        raise TypeError(f"config must be a {config_class.__name__}, got {type(config).__name__}")
    overrides = _renamed(config_class, overrides)
    names = [field.name for field in dataclasses.fields(config_class) if field.init]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(
            f"unknown setting(s) {unknown} of {config_class.__name__}; its fields: {', '.join(sorted(names))}"
        )
    if config is None:
        return config_class(**overrides)
    return dataclasses.replace(config, **overrides) if overrides else config


def _renamed(config_class: type, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` with the keywords of the 0.1 API (a config's ``RENAMED``: old name -> field, same meaning and
    units) under their field names, each with a DeprecationWarning."""
    renamed = getattr(config_class, "RENAMED", {})
    overrides = dict(overrides)
    for old in sorted(overrides.keys() & renamed.keys()):
        new = renamed[old]
        if new in overrides:
            raise TypeError(f"{old} and {new} are the same setting of {config_class.__name__}: pass one (the new name)")
        warnings.warn(
            f"the keyword {old}= is now {new}= (a field of {config_class.__name__}, same meaning and units); the old "
            "name will be removed",
            DeprecationWarning,
            stacklevel=4,  # the caller of the library function that resolves its config
        )
        overrides[new] = overrides.pop(old)
    return overrides


def _in_255ths(radius: float) -> str:
    return f"{radius * 255:.6g}"


def parse_radius_per_255(text: str) -> float:
    """A radius flag spelled in 1/255 (``72``) as pixel units of ``[0, 1]`` images (``72 / 255``).

    Example:
        >>> parse_radius_per_255("72") == 72 / 255
        True
    """
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a radius in 1/255 like 72 (meaning 72/255), got {text!r}") from err
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"a radius must be a finite number > 0, got {text!r}")
    return value / 255


def parse_radius(text: str) -> float:
    """``36/255`` or ``0.1412``."""
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError) as err:
        raise argparse.ArgumentTypeError(f"expected a radius like 36/255 or 0.14, got {text!r}") from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"a radius must be >= 0, got {text!r}")
    return value
