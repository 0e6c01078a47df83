"""Certified models on the Hub: save, load through a real (offline) Hub cache, and catch every kind of tampering."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import torch
from conftest import REPRESENTATIVES, build_model, forge_certificate
from huggingface_hub import ModelCard
from safetensors import safe_open

import robustvit
from robustvit.certification.certificate import Certificate, sha256_file
from robustvit.errors import CertificateError
from robustvit.families import TINY_MODELS
from robustvit.persistence import hub

pytestmark = pytest.mark.hub

REPO_ID = "org/tiny-lipschitz"
REPO_FILES = {"model.safetensors", "config.json", "certificate.json", "README.md"}


def _logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    return out.logits if hasattr(out, "logits") else out


@dataclasses.dataclass
class Certified:
    model: torch.nn.Module
    certificate: Certificate
    folder: Path  # written by save_pretrained, with a curve
    images: torch.Tensor


# Both mixers go through saving, loading and verification: the token shift on timm, L2 attention on transformers.
_MIXERS = {"timm-vit": "shift", "transformers-vit": "l2"}


def _certified(name: str, tmp_path_factory: pytest.TempPathFactory) -> Certified:
    mixer = _MIXERS.get(TINY_MODELS[name].family, "shift")
    model = robustvit.convert(build_model(name, num_classes=5), mixer=mixer).eval()
    torch.manual_seed(0)
    images, labels = torch.rand(8, 3, 32, 32), torch.randint(0, 5, (8,))
    result = robustvit.certify(model, images, labels)
    certificate = result.to_certificate(model, dataset="digits", split="test", pgd_steps=2, pgd_restarts=1)
    folder = tmp_path_factory.mktemp("saved")
    curve = result.plot(folder / "curve.png")
    robustvit.save_pretrained(model, folder / "repo", certificate, curve=curve, repo_id=REPO_ID)
    return Certified(model, certificate, folder / "repo", images)


@pytest.fixture(scope="module")
def certified_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Certified]:
    """One certified and saved model per tiny model asked for, built once per module."""
    return _CertifiedCache(tmp_path_factory)


class _CertifiedCache(dict):
    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.tmp_path_factory = tmp_path_factory

    def __missing__(self, name: str) -> Certified:
        self[name] = _certified(name, self.tmp_path_factory)
        return self[name]


@pytest.fixture
def timm_certified(certified_models: dict[str, Certified]) -> Certified:
    return certified_models["timm_token"]


@pytest.fixture
def hf_certified(certified_models: dict[str, Certified]) -> Certified:
    return certified_models["hf_vit"]


@pytest.fixture(params=REPRESENTATIVES)
def certified(request: pytest.FixtureRequest, certified_models: dict[str, Certified]) -> Certified:
    """Each registered family's first tiny model, certified and saved."""
    return certified_models[request.param]


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache, offline: the environment variables are read at import, so patch the constants."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _publish_to_cache(folder: Path, cache: Path, repo_id: str = REPO_ID) -> None:
    """Lay ``folder`` out as the Hub cache does after a download: refs/main -> snapshots/<sha>/<files>."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)  # no newline: huggingface_hub reads the file verbatim


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


# --- round trip ---------------------------------------------------------------------------------------------------
def test_loads_from_the_hub_cache_with_identical_outputs_and_a_verified_certificate(
    certified: Certified, hub_cache: Path
) -> None:
    _publish_to_cache(certified.folder, hub_cache)
    loaded = robustvit.from_pretrained(REPO_ID)

    assert not loaded.training
    assert robustvit.is_converted(loaded)
    assert type(loaded) is type(certified.model)
    with torch.no_grad():
        assert torch.equal(_logits(loaded, certified.images), _logits(certified.model, certified.images))
    weights = certified.folder / "model.safetensors"
    expected = dataclasses.replace(certified.certificate, weights_sha256=sha256_file(weights))
    assert loaded.certificate.to_dict() == json.loads(json.dumps(expected.to_dict()))
    assert loaded.robustvit_config == certified.model.robustvit_config
    assert json.loads(json.dumps(loaded.robustvit_source)) == json.loads(json.dumps(certified.model.robustvit_source))


def test_repository_layout_config_and_weights_header(timm_certified: Certified) -> None:
    folder = timm_certified.folder
    assert {p.name for p in folder.iterdir()} == REPO_FILES | {"certified_accuracy.png"}
    config = json.loads((folder / "config.json").read_text())
    assert config["robustvit_format_version"] == hub.FORMAT_VERSION
    assert config["family"] == "timm-vit"
    assert config["num_classes"] == 5
    assert config["convert_config"] == json.loads(json.dumps(timm_certified.model.robustvit_config.to_dict()))
    assert config["input"] == {
        "space": "pixels in [0, 1]",
        "channels": 3,
        "image_size": [32, 32],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }
    certificate = Certificate.load(folder / "certificate.json")
    assert certificate.weights_sha256 == sha256_file(folder / "model.safetensors")
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", hub.DIGEST_KEY: hub.claim_digest(certificate)}
        # Parametrization keys are stored as such: strict loading into the converted architecture.
        assert set(handle.keys()) == set(timm_certified.model.state_dict())


def test_loads_a_local_folder_and_saving_again_reproduces_the_repository(
    timm_certified: Certified, tmp_path: Path
) -> None:
    loaded = robustvit.from_pretrained(timm_certified.folder)
    again = robustvit.save_pretrained(loaded, tmp_path / "again", loaded.certificate, repo_id=REPO_ID)
    for name in ("model.safetensors", "config.json", "certificate.json"):
        assert (again / name).read_bytes() == (timm_certified.folder / name).read_bytes(), name


def test_shared_tensors_are_stored_once_and_restored(timm_certified: Certified, tmp_path: Path) -> None:
    model = copy.deepcopy(timm_certified.model)
    model.blocks[0].mlp.fn.norm.bias = model.blocks[0].mlp.alpha  # both (48,): one tensor under two names
    folder = robustvit.save_pretrained(model, tmp_path / "tied")
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        assert "blocks.0.mlp.fn.norm.bias" not in handle.keys()
        assert json.loads(handle.metadata()[hub.SHARED_KEY]) == {"blocks.0.mlp.fn.norm.bias": "blocks.0.mlp.alpha"}
    with pytest.warns(hub.UncertifiedModelWarning):
        loaded = robustvit.from_pretrained(folder, verify=False)
    with torch.no_grad():
        assert torch.equal(_logits(loaded, timm_certified.images), _logits(model, timm_certified.images))


# --- tampering ----------------------------------------------------------------------------------------------------
def test_one_changed_weight_is_caught(certified: Certified, tmp_path: Path) -> None:
    folder = _copy(certified.folder, tmp_path)
    weights = folder / "model.safetensors"
    with safe_open(weights, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = safetensors.torch.load_file(weights)
    name = next(k for k in sorted(tensors) if k.endswith("weight.original"))
    tensors[name].view(-1)[0] += 1e-3
    safetensors.torch.save_file(tensors, weights, metadata=metadata)  # same header, old certificate
    with pytest.raises(CertificateError, match="sha256"):
        robustvit.from_pretrained(folder)


def test_a_certificate_edited_after_saving_is_caught_by_the_header_digest(
    timm_certified: Certified, tmp_path: Path
) -> None:
    folder = _copy(timm_certified.folder, tmp_path)
    data = json.loads((folder / "certificate.json").read_text())
    data["clean_accuracy"] = 1.0  # weights_sha256 still matches: only the header digest can tell
    (folder / "certificate.json").write_text(json.dumps(data))
    with pytest.raises(CertificateError, match="digest"):
        robustvit.from_pretrained(folder)


@pytest.mark.parametrize("field", ["lipschitz", "features_lipschitz"])
def test_a_lowered_bound_fails_the_recomputation_even_with_consistent_hashes(
    certified: Certified, field: str, tmp_path: Path
) -> None:
    folder = _copy(certified.folder, tmp_path)
    certificate = Certificate.load(folder / "certificate.json")
    forged = dataclasses.replace(certificate, **{field: getattr(certificate, field) * 0.9})
    forge_certificate(folder, forged)
    with pytest.raises(CertificateError, match=f"^{field}: the certificate claims"):
        robustvit.from_pretrained(folder)


def test_the_bound_tolerance_is_relative_1e_9(timm_certified: Certified, tmp_path: Path) -> None:
    certificate = Certificate.load(timm_certified.folder / "certificate.json")
    for factor, ok in ((1 - 1e-10, True), (1 - 1e-8, False)):
        folder = tmp_path / str(factor)
        shutil.copytree(timm_certified.folder, folder)
        forge_certificate(folder, dataclasses.replace(certificate, lipschitz=certificate.lipschitz * factor))
        if ok:
            assert robustvit.from_pretrained(folder).certificate.lipschitz < certificate.lipschitz
        else:
            with pytest.raises(CertificateError, match="lipschitz"):
                robustvit.from_pretrained(folder)


def test_a_certificate_of_another_architecture_is_caught(timm_certified: Certified, tmp_path: Path) -> None:
    folder = _copy(timm_certified.folder, tmp_path)
    certificate = Certificate.load(folder / "certificate.json")
    source = json.loads(json.dumps(certificate.base_model["source"]))
    source["kwargs"]["depth"] = 12
    forge_certificate(folder, dataclasses.replace(certificate, base_model={**certificate.base_model, "source": source}))
    with pytest.raises(CertificateError, match="describes source architecture"):
        robustvit.from_pretrained(folder)


def test_config_json_must_describe_the_loaded_weights(timm_certified: Certified, tmp_path: Path) -> None:
    folder = _copy(timm_certified.folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["input"]["std"] = [1.0, 1.0, 1.0]  # the weights normalize by 0.5: a card reader would be misled
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json describes"):
        robustvit.from_pretrained(folder)
    config["source"]["kwargs"]["depth"] += 1  # another architecture: strict loading fails
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match the architecture"):
        robustvit.from_pretrained(folder)


def test_a_missing_certificate_needs_verify_false(timm_certified: Certified, tmp_path: Path) -> None:
    folder = _copy(timm_certified.folder, tmp_path)
    (folder / "certificate.json").unlink()
    with pytest.raises(CertificateError, match="no certificate.json"):
        robustvit.from_pretrained(folder)
    with pytest.warns(hub.UncertifiedModelWarning, match="nothing .* is certified"):
        loaded = robustvit.from_pretrained(folder, verify=False)
    assert loaded.certificate is None
    with torch.no_grad():
        assert torch.equal(loaded(timm_certified.images), timm_certified.model(timm_certified.images))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ('["a", "list"]', "JSON object"),
        ('{"schema": "something.else", "schema_version": 1}', "not a robustvit certificate"),
        ('{"schema": "robustvit.certificate", "schema_version": 1, "lipschitz": 1.0}', "missing fields"),
    ],
)
def test_a_malformed_certificate_is_refused(
    timm_certified: Certified, tmp_path: Path, content: str, match: str
) -> None:
    folder = _copy(timm_certified.folder, tmp_path)
    (folder / "certificate.json").write_text(content)
    with pytest.raises(CertificateError, match=match):
        robustvit.from_pretrained(folder)


def test_a_pickle_checkpoint_is_refused_without_being_unpickled(
    timm_certified: Certified, tmp_path: Path, hub_cache: Path
) -> None:
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))  # runs on unpickling

    folder = _copy(timm_certified.folder, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    _publish_to_cache(folder, hub_cache)
    for verify in (True, False):
        with pytest.raises(ValueError, match="safetensors only"):
            robustvit.from_pretrained(REPO_ID, verify=verify)
    assert not marker.exists()


def test_an_uncached_repository_offline_is_a_clear_error(hub_cache: Path) -> None:
    with pytest.raises(huggingface_hub.errors.LocalEntryNotFoundError, match="neither a local folder"):
        robustvit.from_pretrained("org/not-downloaded")


# --- saving -------------------------------------------------------------------------------------------------------
def test_save_refuses_a_certificate_that_would_not_verify(timm_certified: Certified, tmp_path: Path) -> None:
    certificate = timm_certified.certificate
    with pytest.raises(CertificateError, match="lipschitz"):
        robustvit.save_pretrained(
            timm_certified.model, tmp_path / "a", dataclasses.replace(certificate, lipschitz=certificate.lipschitz / 2)
        )
    with pytest.raises(CertificateError, match="names weights"):
        robustvit.save_pretrained(
            timm_certified.model, tmp_path / "b", dataclasses.replace(certificate, weights_sha256="0" * 64)
        )
    source = build_model("timm_token", num_classes=5)
    with pytest.raises(CertificateError, match="describes"):
        robustvit.save_pretrained(robustvit.convert(source, mixer="l2"), tmp_path / "c", certificate)
    with pytest.raises(ValueError, match="convert"):
        robustvit.save_pretrained(source, tmp_path / "d")
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_uncertified_save_removes_a_stale_certificate(timm_certified: Certified, tmp_path: Path) -> None:
    folder = _copy(timm_certified.folder, tmp_path)
    robustvit.save_pretrained(timm_certified.model, folder)
    assert {p.name for p in folder.iterdir()} == REPO_FILES - {"certificate.json"}
    with pytest.raises(CertificateError, match="no certificate.json"):
        robustvit.from_pretrained(folder)
    assert "no certificate" in ModelCard.load(folder / "README.md").text


# --- model card ---------------------------------------------------------------------------------------------------
def test_model_card_metadata_and_model_index(timm_certified: Certified) -> None:
    card = ModelCard.load(timm_certified.folder / "README.md")
    data = card.data
    assert data.library_name == "robustvit"
    assert data.license == "apache-2.0"
    assert {"certified-robustness", "lipschitz", "vision-transformer", "image-classification", "timm-vit"} <= set(
        data.tags
    )
    assert data.datasets == ["digits"]
    certificate = timm_certified.certificate
    certified = [r for r in data.eval_results if r.metric_type == "certified_accuracy"]
    assert [(r.metric_value, r.metric_config) for r in certified] == [
        (e.certified_accuracy, f"eps={e.eps:.4f}") for e in certificate.results
    ]
    assert certified[0].metric_name == "Certified accuracy (l2, eps=36/255)"
    assert {(r.task_type, r.dataset_name, r.dataset_split) for r in data.eval_results} == {
        ("image-classification", "digits", "test")
    }
    (clean,) = [r for r in data.eval_results if r.metric_type == "accuracy"]
    assert clean.metric_value == certificate.clean_accuracy
    assert f'robustvit.from_pretrained("{REPO_ID}")' in card.text
    assert certificate.accuracy_table() in card.text
    assert "![Certified accuracy against the l2 radius](certified_accuracy.png)" in card.text


def test_model_card_license_and_base_model_are_overridable(hf_certified: Certified, tmp_path: Path) -> None:
    folder = robustvit.save_pretrained(
        hf_certified.model, tmp_path / "m", hf_certified.certificate, license="mit", base_model="google/vit-base"
    )
    data = ModelCard.load(folder / "README.md").data
    assert (data.license, data.base_model) == ("mit", "google/vit-base")
    assert "transformers-vit" in data.tags


# --- push ---------------------------------------------------------------------------------------------------------
def test_push_to_hub_uploads_everything_in_one_commit_and_drops_a_stale_certificate(
    timm_certified: Certified, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Hub cannot be reached offline: record what the thin wrapper sends to it.
    calls = []
    remote = ["README.md", "certificate.json", "config.json", "model.safetensors"]  # an earlier certified upload

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id, operations, *, commit_message):
        added = {
            op.path_in_repo: Path(op.path_or_fileobj).read_bytes()
            for op in operations
            if isinstance(op, huggingface_hub.CommitOperationAdd)
        }
        deleted = [op.path_in_repo for op in operations if isinstance(op, huggingface_hub.CommitOperationDelete)]
        calls.append(("create_commit", repo_id, added, deleted))
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
            commit_message=commit_message,
            commit_description="",
            oid="abc",
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id: remote)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    url = robustvit.push_to_hub(timm_certified.model, REPO_ID, timm_certified.certificate, private=True)

    assert url == f"https://huggingface.co/{REPO_ID}/commit/abc"
    (create, commit) = calls
    assert create == ("create_repo", REPO_ID, {"private": True, "exist_ok": True})
    assert set(commit[2]) == REPO_FILES and commit[3] == []
    assert commit[2]["model.safetensors"] == (timm_certified.folder / "model.safetensors").read_bytes()

    calls.clear()
    robustvit.push_to_hub(timm_certified.model, REPO_ID)  # uncertified now: the old certificate must go
    assert set(calls[1][2]) == REPO_FILES - {"certificate.json"}
    assert calls[1][3] == ["certificate.json"]
