"""robustvit.configs: every setting is a dataclass field with help, its flag is generated once, choices come from
the registries, bad values are usage errors, and the CLI and the recipes share the fields' spellings."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from pathlib import Path

import pytest

from robustvit.configs import (
    CertificationConfig,
    ConvertConfig,
    EvaluationConfig,
    LipschitzTrainingConfig,
    NoiseSynthesisConfig,
    NullspaceFinetuningConfig,
    RobustnessConfig,
    RunConfig,
    add_arguments,
    parse_configs,
)
from robustvit.conversion.choices import ACTIVATIONS, MIXERS, MLPS
from robustvit.corruptions import CORRUPTIONS
from robustvit.losses import LOSSES
from robustvit.nullspace.methods import FINETUNING_METHODS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ConvertConfig, RunConfig, LipschitzTrainingConfig, NullspaceFinetuningConfig, CertificationConfig,
           NoiseSynthesisConfig, RobustnessConfig,
           EvaluationConfig]  # fmt: skip


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings if option not in ("-h", "--help")]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_gets_one_snake_case_flag_with_help(config: type) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser, config)
    fields = [field.name for field in dataclasses.fields(config)]
    flags = [flag for flag in _flags(parser) if not flag.startswith("--no_")]
    assert flags == [f"--{name}" for name in fields]
    for field in dataclasses.fields(config):
        assert field.metadata["help"], field.name
    assert parse_configs(parser, [], config) == (config(),)  # the flags' defaults are the dataclass's


@pytest.mark.parametrize(
    ("config", "field", "registry"),
    [
        (ConvertConfig, "mixer", MIXERS),
        (ConvertConfig, "activation", ACTIVATIONS),
        (ConvertConfig, "mlp", MLPS),
        (LipschitzTrainingConfig, "loss", LOSSES),
        (NullspaceFinetuningConfig, "methods", FINETUNING_METHODS),
        (EvaluationConfig, "corruptions", CORRUPTIONS),
    ],
)
def test_choices_are_the_registrys_names(config: type, field: str, registry) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, config)
    assert parser._option_string_actions[f"--{field}"].choices == registry.list()
    lazy = argparse.ArgumentParser()  # the CLI: named in the help, not read (no torch for --help)
    add_arguments(lazy, config, resolve_choices=False)
    assert lazy._option_string_actions[f"--{field}"].choices is None


def test_values_are_parsed_and_validated() -> None:
    parser = argparse.ArgumentParser()
    for config in (RunConfig, ConvertConfig, CertificationConfig):
        add_arguments(parser, config)
    argv = ["--residual_budget", "none", "--eps", "36/255", "0.5", "--checkpointing_steps", "3", "--mean", "0.5"]
    run, convert, certification = parse_configs(parser, [*argv, "--std", "0.25"], RunConfig, ConvertConfig,
                                                CertificationConfig)  # fmt: skip
    assert convert.residual_budget is None and convert.mean == (0.5,) and convert.std == (0.25,)
    assert certification.eps == pytest.approx([36 / 255, 0.5]) and run.checkpointing_steps == 3
    for bad in (["--residual_budget", "0.5"], ["--checkpointing_steps", "never"], ["--channels", "2"],
                ["--resume", "--overwrite_output_dir"], ["--mixer", "attention"], ["--eps", "-1"]):  # fmt: skip
        with pytest.raises(SystemExit):
            parse_configs(parser, bad, RunConfig, ConvertConfig, CertificationConfig)


def test_saved_configs_are_asdict_and_round_trip() -> None:
    config = LipschitzTrainingConfig(epochs=3, loss="ce")
    assert LipschitzTrainingConfig(**dataclasses.asdict(config)) == config
    assert ConvertConfig.from_dict(ConvertConfig(mixer="l2").to_dict()) == ConvertConfig(mixer="l2")


def test_the_recipes_and_the_cli_share_one_spelling_and_meaning_per_flag() -> None:
    from robustvit.cli import _parser

    cli = _parser()
    commands = cli._subparsers._group_actions[0].choices
    convert_flags = set(_flags(commands["convert"]))
    assert {f"--{field.name}" for field in dataclasses.fields(ConvertConfig)} <= convert_flags
    assert {"--eps", "--pgd_steps", "--max_eval_images", "--eval_batch_size"} <= set(_flags(commands["certify"]))
    for command in commands.values():
        assert all("-" not in flag[2:] for flag in _flags(command)), _flags(command)  # snake_case only
    # --eps is an l2 radius everywhere; the nullspace tolerance has its own name.
    finetune = _recipe("finetune_nullspace")
    with pytest.raises(SystemExit):
        finetune.parse_args(["--eps", "0.03"])
    assert finetune.parse_args(["--nullspace_tol", "0.01"]).finetuning.nullspace_tol == 0.01


@pytest.mark.parametrize(
    ("name", "configs", "extra"),
    [
        ("train_lipschitz", ["run", "training", "convert", "certification"], set()),
        ("finetune_nullspace", ["run", "finetuning", "augmentation", "evaluation"], {"--config"}),
    ],
)
def test_a_recipe_has_one_flag_per_field_of_its_configs(name: str, configs: list[str], extra: set[str]) -> None:
    recipe = _recipe(name)
    flags = [flag for flag in _flags(recipe.build_parser()) if not flag.startswith("--no_")]
    assert len(flags) == len(set(flags))
    parsed = recipe.parse_args([])
    assert list(parsed._fields) == configs
    fields = {f"--{field.name}" for config in parsed for field in dataclasses.fields(config)}
    assert set(flags) == fields | extra  # train_lipschitz: its --eps (the training radius) and the certificate's
