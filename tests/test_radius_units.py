"""One unit for radii: pixel units of [0, 1] images in every config, result and file; the help of every radius
field and flag says so, the attack flags keep their 1/255 spelling and convert when parsed, and a report written
before (its evaluation config in 1/255) still reads back."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import json
import pkgutil
import re
from pathlib import Path

import pytest

import robustvit
from robustvit.configs import EvaluationConfig, RobustnessConfig, add_arguments, file_defaults, parse_configs
from robustvit.settings import parse_radius_per_255

ROOT = Path(__file__).resolve().parents[1]
RADIUS = re.compile(r"^(eps|\w*_radii|\w*radius)$")  # an absolute radius
RELATIVE = re.compile(r"^eps_\w+$")  # a factor of --eps (the training radius's ramp)
PIXELS = "pixels in [0, 1]"


def _settings_dataclasses() -> dict[str, type]:
    """Every dataclass of the package whose fields describe their flags (``robustvit.settings.arg``)."""
    found = {}
    modules = [robustvit] + [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(robustvit.__path__, "robustvit.")
        if not any(part.startswith("_") for part in info.name.split("."))
    ]
    for module in modules:
        for _, value in inspect.getmembers(module, inspect.isclass):
            fields = dataclasses.fields(value) if dataclasses.is_dataclass(value) else ()
            if value.__module__.startswith("robustvit") and fields and all("help" in f.metadata for f in fields):
                found[value.__name__] = value
    return found


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from robustvit.cli import _parser

    commands = _parser()._subparsers._group_actions[0].choices
    parsers = {f"robustvit {name}": parser for name, parser in commands.items()}
    for recipe in ("train_lipschitz", "finetune_nullspace"):
        parsers[f"recipes/{recipe}.py"] = _recipe(recipe).build_parser()
    return parsers


def _check_unit(name: str, help_text: str, per_255: bool) -> None:
    if RADIUS.match(name):
        assert PIXELS in help_text, f"{name}: a radius's help must say its unit ({PIXELS!r}): {help_text!r}"
        if per_255:
            assert "1/255" in help_text, f"{name}: a flag spelled in 1/255 must say so: {help_text!r}"
    elif RELATIVE.match(name):
        assert "times --eps" in help_text, f"{name}: a factor of --eps must say so: {help_text!r}"


def test_the_walk_finds_the_radius_fields() -> None:
    configs = _settings_dataclasses()
    radii = {f"{name}.{f.name}" for name, c in configs.items() for f in dataclasses.fields(c) if RADIUS.match(f.name)}
    assert {"CertificationConfig.eps", "LipschitzTrainingConfig.eps", "RobustnessConfig.l2_radii",
            "RobustnessConfig.linf_radii", "EvaluationConfig.l2_radii"} <= radii  # fmt: skip


@pytest.mark.parametrize("config", sorted(_settings_dataclasses()))
def test_every_radius_field_says_its_unit(config: str) -> None:
    for field in dataclasses.fields(_settings_dataclasses()[config]):
        _check_unit(field.name, field.metadata["help"], field.metadata.get("per_255", False))


@pytest.mark.parametrize("command", sorted(_parsers()))
def test_every_radius_flag_says_its_unit(command: str) -> None:
    for action in _parsers()[command]._actions:
        _check_unit(action.dest, action.help or "", action.type is parse_radius_per_255)


def test_attack_flags_are_spelled_in_255ths_and_parsed_into_pixels(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, EvaluationConfig)
    (config,) = parse_configs(parser, ["--l2_radii", "36", "72", "--linf_radii", "2"], EvaluationConfig)
    assert config.l2_radii == [36 / 255, 72 / 255] and config.linf_radii == [2 / 255]
    assert "(default: 72)" in parser._option_string_actions["--l2_radii"].help  # the default, as the flag spells it
    assert file_defaults(parser, {"l2_radii": [72]}) == {"l2_radii": [72 / 255]}  # a YAML --config, like the flag
    (default,) = parse_configs(parser, [], EvaluationConfig)
    assert default == EvaluationConfig() and default.l2_radii == [72 / 255]
    for bad in (["--l2_radii", "72/255"], ["--l2_radii", "0"]):  # 72/255 in a 1/255 flag would mean 72/255**2
        with pytest.raises(SystemExit):
            parse_configs(parser, bad, EvaluationConfig)
    assert RobustnessConfig(l2_radii=[0.5]).l2_radii == [0.5]  # the field itself is in pixel units


def test_a_report_written_before_still_reads_back() -> None:
    """bench/results/finetune_nullspace.json was written before the evaluation config moved to pixel units (its
    ``config.evaluation`` radii are the 1/255 flags); its results were always in pixel units and read back as such."""
    from robustvit.evaluation import RobustnessResult, SeedSummary, format_methods

    report = json.loads((ROOT / "bench" / "results" / "finetune_nullspace.json").read_text())
    assert report["config"]["evaluation"]["l2_radii"] == [72.0]  # the old spelling, kept in the historical record
    baseline = RobustnessResult.from_dict(report["baseline"]["evaluation"])
    assert baseline.settings["eps_l2"] == pytest.approx([72 / 255]) and "pgd_l2@72/255" in baseline.adversarial
    methods = {name: SeedSummary.from_dict(method) for name, method in report["methods"].items()}
    assert "| pgd l2@72/255 |" in format_methods(baseline, methods, reference="ce")
