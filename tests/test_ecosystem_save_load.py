"""A converted model stays a first-class timm / transformers model: the libraries' own preprocessing feeds it [0, 1]
pixels, and their own save/load paths give back the converted model, or fail loudly; never a different model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from conftest import HF_FAMILIES, IMG, TIMM_FAMILIES, build_model
from PIL import Image
from timm.data import create_transform, resolve_data_config
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

import robustvit
from robustvit.errors import CertificateError
from robustvit.families import TINY_MODELS
from robustvit.persistence.hub import UncertifiedModelWarning


def _converted(family: str) -> torch.nn.Module:
    return robustvit.convert(build_model(family).eval()).eval()


def _image(size: int = IMG, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _pixels(image: Image.Image) -> torch.Tensor:
    """The image as the converted model's contract says: (1, C, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize("family", ["timm_token", "timm_distilled"])
def test_timm_standard_preprocessing_feeds_unnormalized_pixels(family):
    source = build_model(family).eval()
    model = robustvit.convert(source).eval()
    config = resolve_data_config(model=model)
    assert config["mean"] == (0.0,) * 3 and config["std"] == (1.0,) * 3 and config["input_size"] == (3, IMG, IMG)
    transform = create_transform(**config)
    image = _image(48)
    # Everything the transform does except normalizing: resize and crop, then [0, 1] pixels.
    geometric = [t for t in transform.transforms if type(t).__name__ not in ("Normalize", "MaybeToTensor", "ToTensor")]
    cropped = image
    for step in geometric:
        cropped = step(cropped)
    with torch.no_grad():
        standard = model(transform(image)[None])
        expected = model(_pixels(cropped))
    torch.testing.assert_close(standard, expected, atol=1e-5, rtol=0)
    # The source's preprocessing normalizes: in eval mode the converted model refuses those pixels, naming the fix.
    before = {**resolve_data_config(model=source), "input_size": (3, IMG, IMG)}
    with pytest.raises(ValueError, match=r"pixels must lie in \[0, 1\].*resolve_data_config\(model=converted\)"):
        model(create_transform(**before)(image)[None])


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_transformers_processor_and_pipeline_feed_unnormalized_pixels(family, tmp_path):
    model = _converted(family)
    model.save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert processor.do_normalize is False and processor.size == {"height": IMG, "width": IMG}
    image = _image()
    pixel_values = processor(images=image, return_tensors="pt").pixel_values
    torch.testing.assert_close(pixel_values, _pixels(image), atol=1e-6, rtol=0)
    classify = pipeline("image-classification", model=str(tmp_path), device="cpu")
    scores = {row["label"]: row["score"] for row in classify(image, top_k=model.config.num_labels)}
    with torch.no_grad():
        probs = model(pixel_values=_pixels(image)).logits.softmax(-1)[0]
    expected = {model.config.id2label[i]: float(p) for i, p in enumerate(probs)}
    assert scores.keys() == expected.keys()
    assert all(abs(scores[k] - expected[k]) < 1e-5 for k in scores)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_transformers_save_pretrained_round_trips_through_auto(family, tmp_path, images):
    model = _converted(family)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"].startswith("robustvit_") and config["robustvit"]["family"] == TINY_MODELS[family].family
    assert config["robustvit"]["convert_config"] == model.robustvit_config.to_dict()
    # Marked by its registered model type and the robustvit record only: no message in a field transformers validates.
    assert config.get("layer_types") is None and config["architectures"] == [type(model).__name__]
    # Keys on disk are where transformers' checkpoints of the source keep them (ViT's: legacy 4.x names).
    build_model(family).save_pretrained(tmp_path / "source")

    def layer_lists(folder):
        with open(folder / "model.safetensors", "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        prefixes = {key.split(".0.")[0] for key in header if ".0." in key}
        return {prefix for prefix in prefixes if "parametrizations" not in prefix}  # the layer lists

    assert layer_lists(tmp_path) and layer_lists(tmp_path) <= layer_lists(tmp_path / "source")
    with pytest.warns(UncertifiedModelWarning):
        loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and robustvit.is_converted(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, model(images).logits, atol=0, rtol=0)
    assert robustvit.lipschitz_bound(loaded) == robustvit.lipschitz_bound(model)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_a_native_folder_loads_uncertified_only(family, tmp_path):
    model = _converted(family)
    model.save_pretrained(tmp_path)
    with pytest.raises(CertificateError, match="verify=False"):
        robustvit.from_pretrained(tmp_path)  # nothing certified in a native folder


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_auto_classes_and_pipeline_keywords_are_honoured(family, tmp_path, images):
    """Every keyword transformers' Auto classes and pipeline pass reaches robustvit.from_pretrained, which honours
    subfolder, local_files_only, dtype and device_map and refuses what it cannot honour."""
    model = _converted(family)
    model.save_pretrained(tmp_path / "sub")
    with pytest.warns(UncertifiedModelWarning):
        loaded = AutoModelForImageClassification.from_pretrained(
            tmp_path,
            subfolder="sub",
            local_files_only=True,
            force_download=False,
            dtype=torch.float64,
            device_map="cpu",
        )
    assert next(loaded.parameters()).dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(loaded(images.double()).logits.float(), model(images).logits, atol=1e-5, rtol=0)
    with pytest.raises(FileNotFoundError, match="no subfolder 'missing'"):
        robustvit.from_pretrained(tmp_path, verify=False, subfolder="missing")
    with pytest.raises(ValueError, match="loads whole onto one device"):
        robustvit.from_pretrained(tmp_path / "sub", verify=False, device_map={"": "cpu", "classifier": "meta"})
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['output_loading_info'\]"):
        robustvit.from_pretrained(tmp_path / "sub", verify=False, output_loading_info=True)
    with pytest.raises(ValueError, match="HTTPS_PROXY"):
        robustvit.from_pretrained("org/not-a-folder", verify=False, proxies={"https": "http://proxy:3128"})


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_robustvit_folder_loads_through_auto_and_pipeline(family, tmp_path, images):
    model = _converted(family)
    certificate = robustvit.certify(model, images, torch.arange(4)).to_certificate(model, dataset="d", split="s")
    robustvit.save_pretrained(model, tmp_path, certificate)
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["do_normalize"] is False and processor["size"] == {"height": IMG, "width": IMG}
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)  # verified: it has a certificate
    assert loaded.certificate is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, model(images).logits, atol=0, rtol=0)
    pipeline("image-classification", model=str(tmp_path), device="cpu")(_image())


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_timm_save_for_hf_round_trips_through_local_dir(family, tmp_path, images):
    model = _converted(family)
    timm.models.save_for_hf(model, tmp_path / "pickle")
    with pytest.raises(FileNotFoundError, match="safe_serialization=True"):
        timm.create_model(f"local-dir:{tmp_path / 'pickle'}", pretrained=True)
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (
        config["architecture"] == "robustvit"
        and config["model_args"]["robustvit"]["family"] == TINY_MODELS[family].family
    )
    assert config["pretrained_cfg"]["mean"] == [0.0] * 3 and config["pretrained_cfg"]["std"] == [1.0] * 3
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert type(loaded) is type(model) and robustvit.is_converted(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), atol=0, rtol=0)
    assert robustvit.lipschitz_bound(loaded) == robustvit.lipschitz_bound(model)
    with pytest.warns(UncertifiedModelWarning):
        again = robustvit.from_pretrained(tmp_path, verify=False)
    with torch.no_grad():
        torch.testing.assert_close(again(images), model(images), atol=0, rtol=0)
    with pytest.raises(ValueError, match="cannot be rebuilt with num_classes=5"):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True, num_classes=5)


# Runs in a fresh interpreter: robustvit not imported, or (BLOCK) not installed at all.
_LOAD_WITHOUT_ROBUSTVIT = """
import importlib.abc, sys, timm, torch, transformers
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "robustvit":
            raise ModuleNotFoundError("No module named 'robustvit'")
timm_dir, hf_dir, hub_dir, pixels = sys.argv[1:5]
def report(load):
    try:
        model = load()
    except Exception as err:
        print(chr(10) + "REFUSED", str(err).replace(chr(10), " ")[:600])  # after transformers' unanswered prompt
    else:
        with torch.no_grad():
            same = torch.equal(model.eval()(torch.load(pixels)).logits, torch.load(pixels + ".logits"))
        print(chr(10) + "LOADED", type(model.config).__name__, "same outputs" if same else "OTHER OUTPUTS")
auto = transformers.AutoModelForImageClassification.from_pretrained
report(lambda: timm.create_model("local-dir:" + timm_dir, pretrained=True))
report(lambda: auto(hf_dir))
report(lambda: auto(hub_dir))
sys.meta_path.insert(0, Blocked())
report(lambda: auto(hf_dir, trust_remote_code=True))
sys.meta_path.pop(0)
report(lambda: auto(hf_dir, trust_remote_code=True))
report(lambda: auto(hub_dir, trust_remote_code=True))
"""


@pytest.mark.slow
def test_libraries_without_robustvit_refuse_converted_folders_and_say_how_to_load(tmp_path):
    timm_dir, hf_dir = tmp_path / "timm", tmp_path / "hf"
    timm.models.save_for_hf(_converted("timm_token"), timm_dir, safe_serialization=True)
    hf = _converted("hf_vit")
    hf.save_pretrained(hf_dir)
    robustvit.save_pretrained(hf, tmp_path / "hub")  # robustvit's own format, uncertified
    pixels = torch.rand(2, 3, IMG, IMG)
    torch.save(pixels, tmp_path / "pixels.pt")
    with torch.no_grad():
        torch.save(hf(pixels).logits, tmp_path / "pixels.pt.logits")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    folders = (timm_dir, hf_dir, tmp_path / "hub", tmp_path / "pixels.pt")
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_ROBUSTVIT, *map(str, folders)],
        capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith(("REFUSED", "LOADED"))]
    assert len(lines) == 6, result.stdout + result.stderr
    timm_refusal, auto_refusal, hub_refusal, not_installed, trusted, hub_trusted = lines
    assert timm_refusal.startswith("REFUSED") and "robustvit" in timm_refusal
    # transformers runs a folder's own loader only when asked: its refusal names the switch ...
    assert auto_refusal.startswith("REFUSED") and "trust_remote_code=True" in auto_refusal, auto_refusal
    # ... which imports robustvit and hands over to its registered loader: the converted model, unchanged
    assert trusted == "LOADED RobustViTConfig same outputs", result.stdout + result.stderr
    # and without robustvit installed, transformers says what to install
    assert not_installed.startswith("REFUSED") and "pip install robustvit" in not_installed, not_installed
    assert "robustvit.from_pretrained" in (hf_dir / "robustvit_loader.py").read_text()
    # robustvit's own folders carry the same config record and loader
    assert hub_refusal.startswith("REFUSED") and "trust_remote_code=True" in hub_refusal, hub_refusal
    assert hub_trusted == "LOADED RobustViTConfig same outputs", result.stdout + result.stderr
