"""One way to pass settings: a public function with a config dataclass takes ``(model, data, config=None,
**overrides)``, never a parameter that repeats one of that config's fields; the overrides are checked against the
fields and build the config through its own validation (robustvit.settings.resolve_config)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import typing
from collections.abc import Callable, Iterator

import pytest
import torch

import robustvit
from robustvit.certification.config import CertificationConfig
from robustvit.configs import NoiseSynthesisConfig, RobustnessConfig
from robustvit.settings import resolve_config


def _public_modules() -> Iterator[object]:
    """robustvit and each of its modules and subpackages whose dotted name has no part starting with ``_``."""
    yield robustvit
    for info in pkgutil.walk_packages(robustvit.__path__, "robustvit."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            yield importlib.import_module(info.name)


def _public_callables() -> dict[str, Callable]:
    """Every function in a public ``__all__``, and the public methods of every class in one, by qualified name."""
    found: dict[str, Callable] = {}
    for module in _public_modules():
        for name in getattr(module, "__all__", []):
            value = getattr(module, name)
            if inspect.isfunction(value):
                found[f"{value.__module__}.{value.__qualname__}"] = value
            elif inspect.isclass(value) and value.__module__.startswith("robustvit"):
                for attribute, member in vars(value).items():
                    member = member.__func__ if isinstance(member, classmethod | staticmethod) else member
                    if inspect.isfunction(member) and not attribute.startswith("_"):
                        found[f"{value.__module__}.{member.__qualname__}"] = member
    return found


def _config_classes(annotation: object) -> list[type]:
    """The settings dataclasses (fields made by ``robustvit.settings.arg``: they carry help) in an annotation."""
    if inspect.isclass(annotation):
        fields = dataclasses.fields(annotation) if dataclasses.is_dataclass(annotation) else ()
        return [annotation] if fields and all("help" in field.metadata for field in fields) else []
    return [config for argument in typing.get_args(annotation) for config in _config_classes(argument)]


def _functions_with_configs() -> dict[str, tuple[Callable, list[type]]]:
    result = {}
    for name, function in _public_callables().items():
        hints = typing.get_type_hints(function)
        configs = [config for key, hint in hints.items() if key != "return" for config in _config_classes(hint)]
        if configs:
            result[name] = (function, configs)
    return result


def test_the_public_api_is_walked() -> None:
    found = _functions_with_configs()
    for name in (
        "robustvit.evaluation.evaluate_robustness",
        "robustvit.evaluation.evaluate_accuracy",
        "robustvit.nullspace.synthesis.synthesize_noise",
        "robustvit.certify_split.certify_split",
        "robustvit.conversion.convert.convert",
    ):
        assert name in found, sorted(found)


@pytest.mark.parametrize("name", sorted(_functions_with_configs()))
def test_no_function_with_a_config_repeats_its_fields(name: str) -> None:
    function, configs = _functions_with_configs()[name]
    parameters = set(inspect.signature(function).parameters)
    for config in configs:
        repeated = parameters & {field.name for field in dataclasses.fields(config)}
        assert not repeated, f"{name} takes {sorted(repeated)} beside its {config.__name__}: pass them as overrides"


@pytest.mark.parametrize(
    ("config_class", "override"),
    [(RobustnessConfig, "pgd_steps"), (NoiseSynthesisConfig, "tolerance"), (CertificationConfig, "pgd_steps")],
)
def test_overrides_build_the_config_through_its_validation(config_class: type, override: str) -> None:
    base = config_class()
    built = resolve_config(config_class, base, {override: 7})
    assert getattr(built, override) == 7 and getattr(base, override) != 7  # a new config; the given one is kept
    assert resolve_config(config_class, None, {override: 7}) == built
    assert resolve_config(config_class, base, {}) is base
    with pytest.raises(ValueError):  # the dataclass's own check
        resolve_config(config_class, base, {override: -1})
    with pytest.raises(TypeError, match=rf"unknown setting\(s\) \['no_such_field'\].*its fields: .*{override}"):
        resolve_config(config_class, base, {"no_such_field": 1})
    with pytest.raises(TypeError, match=f"config must be a {config_class.__name__}"):
        resolve_config(config_class, object(), {})


@pytest.mark.parametrize(
    ("config_class", "old", "new", "value"),
    [
        (RobustnessConfig, "eps_linf", "linf_radii", [2 / 255]),
        (RobustnessConfig, "eps_l2", "l2_radii", [72 / 255]),
        (RobustnessConfig, "batch_size", "eval_batch_size", 8),
        (RobustnessConfig, "max_images", "max_eval_images", 4),
        (CertificationConfig, "batch_size", "eval_batch_size", 8),
        (NoiseSynthesisConfig, "eps", "tolerance", 0.01),
    ],
)
def test_the_keywords_of_the_0_1_api_still_work_with_a_deprecation_warning(config_class, old, new, value) -> None:
    with pytest.warns(DeprecationWarning, match=rf"the keyword {old}= is now {new}="):
        built = resolve_config(config_class, None, {old: value})
    assert built == config_class(**{new: value})
    with pytest.raises(TypeError, match=f"{old} and {new} are the same setting"):
        resolve_config(config_class, None, {old: value, new: value})


def test_a_0_1_call_of_evaluate_accuracy_gives_the_same_result() -> None:
    from robustvit.data import TensorImageDataset
    from robustvit.evaluation import evaluate_accuracy

    images, labels = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1] * 3)
    data = TensorImageDataset(images, labels, class_names=["a", "b"], name="t", split="test")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    with pytest.warns(DeprecationWarning, match="max_images= is now max_eval_images="):
        old = evaluate_accuracy(model, data, batch_size=2, max_images=4)
    assert old == evaluate_accuracy(model, data, eval_batch_size=2, max_eval_images=4)
