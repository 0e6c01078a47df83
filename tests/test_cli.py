"""The ``robustvit`` command line and ``hub/publish.py``, run in-process on tiny models (offline)."""

from __future__ import annotations

import dataclasses
import json
import runpy
import shutil
from pathlib import Path

import pytest
import safetensors.torch
from conftest import forge_certificate
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import ViTConfig, ViTForImageClassification

import robustvit
from robustvit.certification.certificate import Certificate
from robustvit.cli import main
from robustvit.persistence import hub

PUBLISH = Path(__file__).resolve().parents[1] / "hub" / "publish.py"
TINY_TIMM = [
    "vit_tiny_patch16_224",
    "--no_pretrained",
    "--img_size", "32",
    "--patch_size", "8",
    "--num_classes", "10",  # the embedded digits have 10 classes
    "--model_kwargs", "depth=1", "embed_dim=48", "num_heads=3",
]  # fmt: skip


@pytest.fixture(scope="module")
def certified_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``robustvit convert`` then ``robustvit certify`` on 24 digits: a certified model folder."""
    root = tmp_path_factory.mktemp("cli")
    assert main(["convert", *TINY_TIMM, "--mixer", "l2", "--activation", "minmax", "--output", str(root / "conv")]) == 0
    args = [
        "certify",
        str(root / "conv"),
        "--max_eval_images",
        "24",
        "--pgd_steps",
        "2",
        "--output",
        str(root / "cert"),
    ]
    assert main(args) == 0
    return root / "cert"


def test_convert_saves_an_uncertified_model_and_prints_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["convert", *TINY_TIMM, "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "end-to-end l2 Lipschitz bound" in out
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"model.safetensors", "config.json", "README.md"}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["convert_config"]["mixer"] == "shift"
    assert config["source"]["kwargs"]["depth"] == 1
    assert config["num_classes"] == 10


def test_convert_a_transformers_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=48,
        num_hidden_layers=1,
        num_attention_heads=3,
        intermediate_size=96,
        num_labels=5,
    )
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    assert main(["convert", str(tmp_path / "vit"), "--mixer", "l2", "--output", str(tmp_path / "out")]) == 0
    assert "end-to-end l2 Lipschitz bound" in capsys.readouterr().out
    with pytest.warns(hub.UncertifiedModelWarning):
        model = robustvit.from_pretrained(tmp_path / "out", verify=False)
    assert type(model) is ViTForImageClassification
    assert model.robustvit_config.mixer == "l2"


def test_convert_rejects_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["convert", *TINY_TIMM, "--mean", "0.5", "--std", "0.5", "0.5"]) == 1
    assert "mean and std" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", *TINY_TIMM, "--model_kwargs", "depth"])
    assert exit_info.value.code == 2


def test_certify_writes_a_certified_folder_and_verify_accepts_it(
    certified_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    names = {p.name for p in certified_dir.iterdir()}
    assert names == {
        "model.safetensors",
        "config.json",
        "certificate.json",
        "README.md",
        "certified_accuracy.png",
        "metrics.json",
    }
    certificate = Certificate.load(certified_dir / "certificate.json")
    assert (certificate.dataset, certificate.split, certificate.num_samples) == ("digits", "test", 24)
    assert certificate.convert_config["activation"] == "minmax"

    assert main(["verify", str(certified_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {certified_dir}")
    assert certificate.accuracy_table() in out


def test_verify_recertifies_on_the_certificates_data(certified_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(certified_dir), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "re-certified on 24 images of digits (test)" in out
    assert "not compared" not in out


def test_verify_fails_on_tampered_weights(certified_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = Path(shutil.copytree(certified_dir, tmp_path / "tampered"))
    weights = folder / "model.safetensors"
    with safe_open(weights, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = safetensors.torch.load_file(weights)
    tensors["head.bias"][0] += 0.5
    safetensors.torch.save_file(tensors, weights, metadata=metadata)
    assert main(["verify", str(folder)]) == 1
    assert "FAILED" in capsys.readouterr().err


def test_verify_fails_when_recertification_falls_short_of_the_claims(
    certified_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = Path(shutil.copytree(certified_dir, tmp_path / "overclaimed"))
    certificate = Certificate.load(folder / "certificate.json")
    inflated = [dataclasses.replace(r, certified_accuracy=0.9, pgd_accuracy=0.9) for r in certificate.results]
    forge_certificate(
        folder, dataclasses.replace(certificate, clean_accuracy=0.95, results=inflated)
    )  # passes every integrity check
    assert main(["verify", str(folder)]) == 0
    capsys.readouterr()
    assert main(["verify", str(folder), "--dataset", "digits", "--split", "test"]) == 1
    assert "re-certified accuracy below the claim" in capsys.readouterr().err
    # On other data the accuracies are only reported.
    assert main(["verify", str(folder), "--split", "test", "--max_eval_images", "8"]) == 0
    assert "not compared" in capsys.readouterr().out


@pytest.mark.hub
def test_publish_dry_run_writes_a_verified_repository(
    certified_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe_output = tmp_path / "run"
    shutil.copytree(certified_dir, recipe_output / "model")
    (recipe_output / "train.log").write_text("not published\n")
    publish = runpy.run_path(str(PUBLISH))["main"]

    repo = tmp_path / "repo"
    args = [str(recipe_output), "--repo_id", "org/digits-vit", "--dry_run", str(repo), "--license", "mit"]
    assert publish(args) == 0
    assert {p.name for p in repo.iterdir()} == {p.name for p in certified_dir.iterdir()} - {"metrics.json"}
    assert (repo / "model.safetensors").read_bytes() == (certified_dir / "model.safetensors").read_bytes()
    card = ModelCard.load(repo / "README.md")
    assert card.data.license == "mit"
    assert 'robustvit.from_pretrained("org/digits-vit")' in card.text
    assert robustvit.from_pretrained(repo).certificate == Certificate.load(certified_dir / "certificate.json")

    uncertified = tmp_path / "uncertified"
    shutil.copytree(certified_dir, uncertified)
    (uncertified / "certificate.json").unlink()
    assert publish([str(uncertified), "--repo_id", "org/x", "--dry_run", str(tmp_path / "never")]) == 1
    assert "no certificate.json" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.hub
def test_push_refuses_a_folder_that_does_not_verify(
    certified_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = Path(shutil.copytree(certified_dir, tmp_path / "edited"))
    certificate = Certificate.load(folder / "certificate.json")
    forge_certificate(folder, dataclasses.replace(certificate, lipschitz=certificate.lipschitz / 2))
    assert main(["push", str(folder), "--repo_id", "org/x"]) == 1  # fails before any network access
    assert "lipschitz: the certificate claims" in capsys.readouterr().err


def test_help_imports_no_heavy_library():
    """`robustvit --help` and `robustvit <cmd> --help` must not import torch / timm / transformers (startup time)."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from robustvit.cli import main\n"
        "for argv in (['--help'], ['convert', '--help'], ['certify', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "heavy = sorted({'torch', 'timm', 'transformers', 'accelerate'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_certify_recipe_calls_the_library_and_matches_the_command(certified_dir: Path, tmp_path: Path) -> None:
    recipe = runpy.run_path(str(Path(__file__).resolve().parents[1] / "recipes" / "certify.py"))["main"]
    output = tmp_path / "recipe"
    assert (
        recipe(
            ["--model", str(certified_dir), "--max_eval_images", "24", "--pgd_steps", "2", "--output_dir", str(output)]
        )
        == 0
    )
    recipe_certificate = Certificate.load(output / "certificate.json")
    command_certificate = Certificate.load(certified_dir / "certificate.json")
    assert recipe_certificate.results == command_certificate.results
    assert recipe_certificate.lipschitz == command_certificate.lipschitz
    assert json.loads((output / "metrics.json").read_text())["num_samples"] == 24
    assert robustvit.from_pretrained(output).certificate == recipe_certificate


def test_an_existing_output_folder_is_refused_unless_overwrite(
    certified_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Writing a model folder replaces README.md, certificate.json...: the user's files there must not be lost.
    output = tmp_path / "mine"
    output.mkdir()
    (output / "README.md").write_text("my notes")
    certify = ["certify", str(certified_dir), "--max_eval_images", "8", "--pgd_steps", "1", "--output", str(output)]
    for argv in (["convert", *TINY_TIMM, "--output", str(output)], certify):
        assert main(argv) != 0
        assert "already holds files (README.md); pass --overwrite" in capsys.readouterr().err
        assert (output / "README.md").read_text() == "my notes"
    assert main([*certify, "--overwrite"]) == 0
    assert Certificate.load(output / "certificate.json").num_samples == 8


def test_certify_split_certifies_a_dataset_object_and_leaves_a_training_model_as_it_was(tmp_path: Path) -> None:
    import timm
    import torch

    from robustvit.certify_split import certify_split
    from robustvit.data import load_image_dataset

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=3, num_classes=10
    )
    model = robustvit.convert(vit).train()  # as a recipe's training leaves it
    before = {key: value.clone() for key, value in model.state_dict().items()}
    data = load_image_dataset(split="test", image_size=32)
    certificate = certify_split(
        model, data, output_dir=tmp_path, model_dir=tmp_path / "model", max_eval_images=8, pgd_steps=1,
        record={"history": [{"epoch": 0}]},
    )  # fmt: skip
    assert model.training  # modes restored, and no rescaled weight took a power-iteration step on the way
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert Certificate.load(tmp_path / "certificate.json") == certificate
    assert robustvit.from_pretrained(tmp_path / "model").certificate == certificate
    assert certificate.weights_sha256 is not None
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["history"] == [{"epoch": 0}] and metrics["num_samples"] == 8 and metrics["dataset"] == "digits"
    assert metrics["certified_accuracy"] == {r.label: r.certified_accuracy for r in certificate.results}
    with pytest.raises(ValueError, match="split='train' goes with a dataset name"):
        certify_split(model, data, output_dir=tmp_path / "again", split="train")
    with pytest.raises(TypeError, match="unknown setting"):
        certify_split(model, data, output_dir=tmp_path / "again", pgd_step=8)  # a typo of pgd_steps
