"""Lipschitz certificates: never broken by strong attacks, equal to a per-image brute force, and their record.

The soundness tests use small converted models trained for a few dozen EMMA steps on the embedded digits (module
fixtures), so that a good fraction of test images is certified at useful radii; a margin PGD (maximise
``max_{j != p} z_j - z_p``, the strongest untargeted objective against the predicted class ``p``) then runs inside
every certified radius on the float64 model that the radii certify.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import ALL_FAMILIES, IMG, NUM_CLASSES, build_model, logits_of
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

import robustvit
from robustvit.certification import attacks
from robustvit.certification.certificate import SCHEMA, SCHEMA_VERSION, Certificate, EpsResult
from robustvit.certification.lipschitz import MARGIN_SLACK, CertifyResult, lipschitz_head
from robustvit.certification.smoothing import certify_smoothing, smoothing_radius
from robustvit.data import load_image_dataset, stack_examples
from robustvit.errors import CertificateError
from robustvit.families import get_family
from robustvit.losses import LOSSES, head_margins

TRAIN_STEPS = 100
TEST_IMAGES = 32
# Non-default normalization for the timm model, so that the certificate's input record is checked for real values.
TIMM_MEAN, TIMM_STD = (0.45, 0.5, 0.55), (0.25, 0.3, 0.35)


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    train_x, train_y = stack_examples(load_image_dataset(split="train", image_size=IMG))
    test_x, test_y = stack_examples(load_image_dataset(split="test", image_size=IMG), TEST_IMAGES)
    return train_x, train_y, test_x, test_y


def _tiny_source(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "timm":
        return timm.create_model(
            "vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=1, embed_dim=48, num_heads=3, num_classes=10
        )
    config = ViTConfig(
        image_size=IMG,
        patch_size=8,
        hidden_size=48,
        num_hidden_layers=1,
        num_attention_heads=3,
        intermediate_size=96,
        num_labels=NUM_CLASSES,
    )
    return ViTForImageClassification(config)


def _train_emma(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int = TRAIN_STEPS) -> nn.Module:
    """A few dozen AdamW steps of EMMA, its radius ramping to 72/255 over the first half."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        index = torch.randint(0, len(images), (64,), generator=generator)
        eps = 72 / 255 * min(1.0, (step + 1) / (steps / 2))
        logits = logits_of(model(images[index]))
        loss = LOSSES["emma"](logits, labels[index], eps=eps, margins=head_margins(model))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module", params=["timm", "hf"])
def trained(request, digits) -> tuple[str, nn.Module, CertifyResult]:
    """(kind, converted model trained with EMMA, its certificates on the test images)."""
    train_x, train_y, test_x, test_y = digits
    overrides = dict(mean=TIMM_MEAN, std=TIMM_STD) if request.param == "timm" else {}
    model = robustvit.convert(
        _tiny_source(request.param), calibration_images=train_x[:64], activation="minmax", **overrides
    )
    model = _train_emma(model, train_x, train_y)
    return request.param, model, robustvit.certify(model, test_x, test_y)


@pytest.fixture(scope="module")
def l2_model(digits) -> tuple[nn.Module, CertifyResult]:
    """An average-pooled timm ViT under the L2-attention mixer (random weights: its predictions still vary)."""
    train_x, _, test_x, test_y = digits
    torch.manual_seed(0)
    source = timm.create_model(
        "vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=1, embed_dim=48, num_heads=3, num_classes=10,
        global_pool="avg",
    )  # fmt: skip
    model = robustvit.convert(source, calibration_images=train_x[:64], mixer="l2", activation="minmax").eval()
    return model, robustvit.certify(model, test_x[:16], test_y[:16])


# --------------------------------------------------------------------------------------------------- attacks


def margin_pgd(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    eps: torch.Tensor,
    *,
    steps: int = 100,
    restarts: int = 3,
    seed: int = 0,
) -> torch.Tensor:
    """l2 PGD with a radius per image on ``max_{j != target} z_j - z_target``; True where the prediction flipped.

    Every iterate of every restart counts (the clean images too); the first restart starts at the images, the others
    uniformly in the ball; steps have l2 length ``2.5 eps / steps``; iterates are projected onto the ball and the
    [0, 1] box.
    """
    generator = torch.Generator().manual_seed(seed)
    eps = eps.to(images.dtype).view(-1, 1, 1, 1)
    step = 2.5 * eps / steps
    flipped = torch.zeros(len(images), dtype=torch.bool)

    def norms(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)

    for restart in range(restarts):
        direction = torch.randn(images.shape, generator=generator, dtype=images.dtype)
        radius = eps * torch.rand((len(images), 1, 1, 1), generator=generator, dtype=images.dtype) ** (
            1 / images[0].numel()
        )
        adv = images.clone() if restart == 0 else (images + direction / norms(direction) * radius).clamp(0, 1)
        for _ in range(steps):
            adv.requires_grad_(True)
            logits = logits_of(model(adv))
            flipped |= logits.detach().argmax(1) != target
            top = logits.gather(1, target[:, None])[:, 0]
            other = logits.scatter(1, target[:, None], -math.inf).amax(dim=1)
            (grad,) = torch.autograd.grad((other - top).sum(), adv)
            with torch.no_grad():
                delta = adv + step * grad / norms(grad) - images
                delta = delta * (eps / norms(delta)).clamp(max=1.0)
                adv = (images + delta).clamp(0, 1)
        with torch.no_grad():
            flipped |= logits_of(model(adv)).argmax(1) != target
    return flipped


def _attackable(result: CertifyResult) -> torch.Tensor:
    return result.radii > 1e-4


# --------------------------------------------------------------------------------------------------- soundness


@pytest.mark.slow
def test_trained_models_certify_a_good_fraction(trained) -> None:
    kind, model, result = trained
    assert result.clean_accuracy >= 0.25, kind  # ~40% after 100 steps (10 classes)
    assert result.certified_accuracy(36 / 255) >= 0.15, kind  # ~30%
    assert result.certified_accuracy(72 / 255) >= 0.1, kind  # ~28%
    assert int(_attackable(result).sum()) >= TEST_IMAGES // 2


@pytest.mark.slow
def test_margin_pgd_never_changes_a_prediction_inside_its_radius(trained, digits) -> None:
    kind, model, result = trained
    test_x = digits[2]
    ok = _attackable(result)
    exact = copy.deepcopy(model).double()  # the function the radii certify
    flipped = margin_pgd(exact, test_x[ok].double(), result.predictions[ok], 0.99 * result.radii[ok])
    assert not flipped.any(), f"{kind}: certificates broken at {result.radii[ok][flipped].tolist()}"
    # The float32 model users deploy holds too (it differs by float32 rounding, far below 1% of these radii).
    eps32 = 0.99 * result.radii[ok].float()
    assert not margin_pgd(model, test_x[ok], result.predictions[ok], eps32, steps=50, restarts=1).any()


@pytest.mark.slow
def test_margin_pgd_with_three_times_the_radius_breaks_most_predictions(trained, digits) -> None:
    # The attack has teeth: the bound is within a small factor of the distance PGD needs.
    kind, model, result = trained
    ok = _attackable(result)
    flipped = margin_pgd(
        copy.deepcopy(model).double(), digits[2][ok].double(), result.predictions[ok], 3 * result.radii[ok], steps=50
    )
    assert flipped.double().mean() >= 0.3, kind


@pytest.mark.slow
def test_label_pgd_cannot_break_certified_correct_images(trained, digits) -> None:
    # The library's own PGD (cross-entropy on the label), as the certificate's PGD column uses it.
    kind, model, result = trained
    test_x, test_y = digits[2], digits[3]
    for eps in (36 / 255, 72 / 255):
        certified = result.certified(eps)
        assert certified.any(), (kind, eps)
        adv = attacks.pgd(
            model, test_x[certified], test_y[certified], eps, steps=50, restarts=2,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
        assert ((adv - test_x[certified]).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all()
        with torch.no_grad():
            assert torch.equal(logits_of(model(adv)).argmax(1), test_y[certified]), (kind, eps)
    # On all images, robust accuracy is never below certified accuracy.
    for eps in (36 / 255, 72 / 255):
        robust = attacks.robust_accuracy(model, test_x, test_y, eps, steps=10, restarts=1)
        assert robust >= result.certified_accuracy(eps), (kind, eps)


@pytest.mark.slow
def test_l2_attention_certificates_survive_pgd(l2_model, digits) -> None:
    model, result = l2_model
    test_x = digits[2][:16]
    ok = _attackable(result)
    assert ok.sum() >= 8 and len(set(result.predictions[ok].tolist())) > 1
    exact = copy.deepcopy(model).double()
    assert not margin_pgd(exact, test_x[ok].double(), result.predictions[ok], 0.99 * result.radii[ok]).any()
    # The L2 attention bound is looser (it grows like sqrt(N) log N), but 10x the radius flips most predictions.
    flipped = margin_pgd(
        exact, test_x[ok].double(), result.predictions[ok], 10 * result.radii[ok], steps=50, restarts=1
    )
    assert flipped.double().mean() >= 0.5


# --------------------------------------------------------------------------------------------------- brute force


def _head_rows(model: nn.Module) -> torch.Tensor:
    """The rows of the linear map from the features the certificate bounds to the logits, read off the model."""
    model = getattr(model, "timm_model", model)  # transformers' TimmWrapper
    if hasattr(model, "head_dist"):  # timm's distilled ViT in eval mode: (head(x_cls) + head_dist(x_dist)) / 2
        return torch.cat([model.head.weight, model.head_dist.weight], dim=1) / 2
    return model.classifier.weight if hasattr(model, "classifier") else model.head.weight  # transformers / timm


def brute_force(model: nn.Module, images: torch.Tensor) -> tuple[list[int], list[float]]:
    """Predictions and radii, one image at a time in plain Python, from the definition of the pairwise bound."""
    exact = copy.deepcopy(model).double().eval()
    head = lipschitz_head(exact)
    rows = _head_rows(exact).detach() if head.head_weight is not None else None
    predictions, radii = [], []
    with torch.no_grad():
        for image in images:
            z = logits_of(exact(image[None].double()))[0].tolist()
            p = max(range(len(z)), key=lambda j: (z[j], -j))  # first maximum, as argmax
            best = math.inf
            for j in range(len(z)):
                if j == p:
                    continue
                margin = z[p] - z[j] - MARGIN_SLACK * (1 + abs(z[p]) + abs(z[j]))
                if rows is None:
                    denominator = math.sqrt(2) * head.lipschitz
                else:
                    denominator = head.features_lipschitz * float((rows[p] - rows[j]).norm())
                assert denominator > 0
                best = min(best, margin / denominator)
            predictions.append(p)
            radii.append(max(best, 0.0))
    return predictions, radii


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_certify_matches_a_per_image_brute_force_on_every_family(name: str, images: torch.Tensor) -> None:
    model = robustvit.convert(build_model(name, seed=3), activation="minmax" if "timm" in name else "gelu")
    result = robustvit.certify(model, images)
    predictions, radii = brute_force(model, images)
    assert result.predictions.tolist() == predictions
    torch.testing.assert_close(result.radii, torch.tensor(radii, dtype=torch.float64), rtol=1e-9, atol=1e-15)
    # The pairwise bound uses the head's rows; the end-to-end bound is the features bound times ||W||_2.
    weight = _head_rows(model).detach().double()
    spectral = float(torch.linalg.matrix_norm(weight, ord=2))
    assert result.features_lipschitz * spectral <= result.lipschitz <= result.features_lipschitz * spectral * (1 + 1e-5)


def test_certify_matches_the_brute_force_on_trained_models(trained, l2_model, digits) -> None:
    kind, model, result = trained
    for net, res, images in ((model, result, digits[2]), (l2_model[0], l2_model[1], digits[2][:16])):
        predictions, radii = brute_force(net, images)
        assert res.predictions.tolist() == predictions, kind
        torch.testing.assert_close(res.radii, torch.tensor(radii, dtype=torch.float64), rtol=1e-9, atol=1e-15)
        assert (res.radii > 0).float().mean() > 0.5  # the comparison is about real, positive radii


def _mlp() -> nn.Sequential:
    torch.manual_seed(11)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))


def test_a_model_of_no_family_gets_the_global_bound_radius() -> None:
    model = _mlp()
    images = torch.rand(12, 3, 4, 4, generator=torch.Generator().manual_seed(12))
    result = robustvit.certify(model, images)
    assert result.features_lipschitz is None
    assert result.lipschitz == pytest.approx(robustvit.lipschitz_bound(model), rel=1e-12)
    predictions, radii = brute_force(model, images)  # margin / (sqrt(2) L), per pair
    assert result.predictions.tolist() == predictions
    torch.testing.assert_close(result.radii, torch.tensor(radii, dtype=torch.float64), rtol=1e-9, atol=1e-15)
    assert (result.radii > 0).all()
    # Sound too: the exact Lipschitz constant of a 2-layer ReLU net is below the product bound, so PGD fails.
    flipped = margin_pgd(model.double(), images.double(), result.predictions, 0.99 * result.radii)
    assert not flipped.any()


# --------------------------------------------------------------------------------------------------- the result


def test_certified_and_accuracies_on_a_hand_made_result() -> None:
    result = CertifyResult(
        predictions=torch.tensor([0, 1, 2, 1]),
        radii=torch.tensor([0.5, 0.1, 0.0, 0.3], dtype=torch.float64),
        lipschitz=1.0,
        features_lipschitz=None,
        labels=torch.tensor([0, 1, 1, 2]),
    )
    assert result.certified(0.1).tolist() == [True, False, False, False]  # radius > eps, strictly, and correct
    assert result.certified(0.0).tolist() == [True, True, False, False]
    assert result.certified_accuracy(0.05) == 0.5 and result.certified_accuracy(0.4) == 0.25
    assert result.certified_accuracy(1.0) == 0.0 and result.clean_accuracy == 0.5
    unlabelled = CertifyResult(result.predictions, result.radii, 1.0, None)
    assert unlabelled.certified(0.2).tolist() == [True, False, False, True]  # radius only
    with pytest.raises(ValueError, match="needs labels"):
        unlabelled.certified_accuracy(0.1)
    with pytest.raises(ValueError, match="needs labels"):
        unlabelled.clean_accuracy  # noqa: B018
    record = json.loads(json.dumps(result.to_dict()))
    assert record["radii"] == [0.5, 0.1, 0.0, 0.3] and record["labels"] == [0, 1, 1, 2]
    assert record["predictions"] == [0, 1, 2, 1] and record["report"] is None and record["precision"] is None
    assert "images" not in record and unlabelled.to_dict()["labels"] is None


def test_certified_accuracy_on_a_trained_model_is_a_decreasing_curve(trained, digits) -> None:
    kind, model, result = trained
    grid = [i / 255 for i in range(0, 256, 9)]
    values = [result.certified_accuracy(e) for e in grid]
    assert values == sorted(values, reverse=True) and values[0] <= result.clean_accuracy
    assert result.clean_accuracy == pytest.approx(float((result.predictions == digits[3]).double().mean()))
    assert values[0] == pytest.approx(float(((result.radii > 0) & (result.predictions == digits[3])).double().mean()))


def test_bad_inputs_raise(images: torch.Tensor) -> None:
    model = robustvit.convert(build_model("timm_token"))
    labels = torch.arange(4)
    for bad_labels in (labels[:3], labels[:, None], torch.zeros(4, 2, dtype=torch.long)):
        with pytest.raises(ValueError, match="labels must have shape"):
            robustvit.certify(model, images, bad_labels)
    for value in (math.nan, math.inf):
        broken = images.clone()
        broken[1, 0, 3, 3] = value
        with pytest.raises(ValueError, match="NaN or infinite"):
            robustvit.certify(model, broken, labels)
    with pytest.raises(ValueError, match="shaped"):
        robustvit.certify(model, images[0], labels)
    with pytest.raises(ValueError, match="batch_size"):
        robustvit.certify(model, images, labels, batch_size=0)
    with pytest.raises(TypeError):
        robustvit.certify(model, images.numpy(), labels)


def test_radii_do_not_depend_on_the_batch_size(trained, digits) -> None:
    kind, model, result = trained
    for batch_size in (1, 5, 64):
        other = robustvit.certify(model, digits[2], digits[3], batch_size=batch_size)
        assert torch.equal(other.predictions, result.predictions), (kind, batch_size)
        torch.testing.assert_close(other.radii, result.radii, rtol=1e-12, atol=1e-15)


def test_certify_leaves_the_model_alone(images: torch.Tensor) -> None:
    model = robustvit.convert(build_model("hf_vit")).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    robustvit.certify(model, images)
    assert model.training and all(m.training for m in model.modules())
    state = model.state_dict()
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in before.items())


def test_plot_writes_a_png(trained, tmp_path: Path) -> None:
    kind, model, result = trained
    path = result.plot(tmp_path / "curves" / "certified.png", title=kind)
    assert Path(path).is_file() and Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="labels"):
        CertifyResult(result.predictions, result.radii, result.lipschitz, None).plot(tmp_path / "x.png")


# --------------------------------------------------------------------------------------------------- the record


@pytest.fixture(scope="module")
def certificates(trained, digits) -> tuple[str, nn.Module, CertifyResult, Certificate]:
    kind, model, result = trained
    eps = (36 / 255, 72 / 255, 108 / 255, 1.0)
    certificate = result.to_certificate(model, dataset="digits", split="test", eps=eps, pgd_steps=10, pgd_restarts=1)
    return kind, model, result, certificate


def test_to_certificate_records_the_model_and_its_results(certificates) -> None:
    kind, model, result, certificate = certificates
    assert certificate.schema == SCHEMA and certificate.schema_version == SCHEMA_VERSION
    assert certificate.input["space"] == "pixels in [0, 1]"
    assert certificate.input["channels"] == 3 and certificate.input["image_size"] == [IMG, IMG]
    mean, std = (TIMM_MEAN, TIMM_STD) if kind == "timm" else ((0.5,) * 3, (0.5,) * 3)
    assert certificate.input["mean"] == pytest.approx(mean) and certificate.input["std"] == pytest.approx(std)
    conv = get_family(model).patch_projection(model)
    assert certificate.input["mean"] == conv.input_mean.flatten().tolist()
    assert json.loads(json.dumps(certificate.convert_config)) == json.loads(model.robustvit_config.to_json())
    assert certificate.convert_config["activation"] == "minmax" and certificate.convert_config["mixer"] == "shift"
    assert certificate.base_model["family"] == get_family(model).name
    assert certificate.lipschitz == result.lipschitz == pytest.approx(robustvit.lipschitz_bound(model), rel=1e-6)
    assert certificate.features_lipschitz == result.features_lipschitz
    assert certificate.lipschitz_report == result.report.to_dict()
    assert certificate.lipschitz_report["total"] == certificate.lipschitz
    assert certificate.num_samples == TEST_IMAGES and certificate.clean_accuracy == result.clean_accuracy
    assert [r.label for r in certificate.results] == ["36/255", "72/255", "108/255", "255/255"]
    for r in certificate.results:
        assert r.certified_accuracy == result.certified_accuracy(r.eps)
        assert r.certified_accuracy <= r.pgd_accuracy <= certificate.clean_accuracy
    assert certificate.results[0].certified_accuracy > 0
    assert certificate.weights_sha256 is None  # filled in by save_pretrained
    assert "| 36/255 |" in certificate.accuracy_table()


def test_certificate_digest_is_stable_across_save_and_load(certificates, tmp_path: Path) -> None:
    certificate = certificates[3]
    path = certificate.save(tmp_path / "a" / "certificate.json")
    loaded = Certificate.load(path)
    assert loaded.digest() == certificate.digest()
    assert loaded.to_dict() == json.loads(path.read_text())
    # Saving what was loaded writes the same bytes.
    assert loaded.save(tmp_path / "b.json").read_bytes() == path.read_bytes()
    assert Certificate.load(tmp_path / "b.json").digest() == certificate.digest()
    # Any change of content changes the digest.
    assert _replaced(loaded, dataset="other").digest() != certificate.digest()
    assert _replaced(loaded, lipschitz=loaded.lipschitz * (1 + 1e-15)).digest() != certificate.digest()


def test_certificate_save_load_round_trip_is_equal(certificates, tmp_path: Path) -> None:
    # The timm certificate records a conversion config with tuples (mean/std), the transformers one a source config
    # with int keys (id2label): JSON turns them into lists and string keys.
    certificate = certificates[3]
    loaded = Certificate.load(certificate.save(tmp_path / "certificate.json"))
    assert loaded == certificate
    assert loaded.to_dict() == certificate.to_dict()


def _replaced(certificate: Certificate, **changes) -> Certificate:
    return Certificate.from_dict({**certificate.to_dict(), **changes})


def _valid_record(certificates) -> dict:
    return json.loads(json.dumps(certificates[3].to_dict()))


def _set(path: str, value):
    def edit(record: dict) -> None:
        *parents, last = path.split(".")
        target = record
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[int(last) if isinstance(target, list) else last] = value

    return edit


def _drop(key: str):
    return lambda record: record.pop(key)


MALFORMED = {
    "wrong schema": (_set("schema", "something.else"), "not a robustvit certificate"),
    "wrong version": (_set("schema_version", SCHEMA_VERSION + 1), "schema_version"),
    "missing field": (_drop("lipschitz"), "missing fields \\['lipschitz'\\]"),
    "missing results": (_drop("results"), "missing fields"),
    "unknown field": (_set("extra", 1), "unknown fields \\['extra'\\]"),
    "negative bound": (_set("lipschitz", -1.0), "lipschitz must be"),
    "infinite bound": (_set("lipschitz", math.inf), "lipschitz must be"),
    "negative features bound": (_set("features_lipschitz", -0.5), "features_lipschitz"),
    "accuracy above 1": (_set("results.0.pgd_accuracy", 1.5), "\\[0, 1\\]"),
    "negative accuracy": (_set("results.1.certified_accuracy", -0.1), "\\[0, 1\\]"),
    "certified above clean": (_set("results.0.certified_accuracy", 1.0), "exceeds clean accuracy"),
    "bad sha length": (_set("weights_sha256", "ab" * 31), "64-character"),
    "sha not a string": (_set("weights_sha256", 12), "64-character"),
    "linf norm": (_set("norm", "linf"), "norm must be 'l2'"),
    "no samples": (_set("num_samples", 0), "num_samples"),
    "input without mean": (lambda r: r["input"].pop("mean"), "input is missing 'mean'"),
    "result without eps": (lambda r: r["results"][0].pop("eps"), "malformed certificate"),
    "results not a list": (_set("results", 3), "malformed certificate"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_records_raise_certificate_error(certificates, case: str, tmp_path: Path) -> None:
    edit, match = MALFORMED[case]
    record = _valid_record(certificates)
    Certificate.from_dict(record)  # the unedited record is valid
    edit(record)
    with pytest.raises(CertificateError, match=match):
        Certificate.from_dict(record)
    path = tmp_path / "certificate.json"
    path.write_text(json.dumps(record))
    with pytest.raises(CertificateError, match=match):
        Certificate.load(path)


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe"])
def test_files_that_are_not_json_raise_certificate_error(text: str, tmp_path: Path) -> None:
    path = tmp_path / "certificate.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(CertificateError, match="not valid JSON"):
        Certificate.load(path)
    with pytest.raises(CertificateError, match="no certificate"):
        Certificate.load(tmp_path / "missing.json")
    for value in ([], "text", 3, None):
        with pytest.raises(CertificateError, match="JSON object"):
            Certificate.from_dict(value)


def test_validation_messages_name_the_problem_once(certificates) -> None:
    record = _valid_record(certificates)
    record["lipschitz"] = -1.0
    with pytest.raises(CertificateError) as caught:
        Certificate.from_dict(record)
    assert str(caught.value).count("malformed certificate") == 1, str(caught.value)


# Claims a sound pipeline can never produce, which the schema check lets through today.
INCONSISTENT = {
    "clean accuracy above 1": _set("clean_accuracy", 1.5),
    "certified above PGD": _set("results.0.pgd_accuracy", 0.0),
    "negative eps": _set("results.0.eps", -0.1),
    "NaN eps": _set("results.0.eps", math.nan),
    "sha not hex": _set("weights_sha256", "z" * 64),
}


@pytest.mark.parametrize("case", INCONSISTENT)
def test_inconsistent_claims_raise_certificate_error(certificates, case: str) -> None:
    record = _valid_record(certificates)
    assert record["results"][0]["certified_accuracy"] > 0  # so that PGD accuracy 0 contradicts it
    INCONSISTENT[case](record)
    with pytest.raises(CertificateError):
        Certificate.from_dict(record)


def test_eps_results_label_in_255ths() -> None:
    assert EpsResult(36 / 255, 0.5, 0.6).label == "36/255"


# --------------------------------------------------------------------------------------------------- smoothing


def test_randomized_smoothing_and_lipschitz_certificates_on_the_same_model(trained, digits) -> None:
    kind, model, result = trained
    images, labels = digits[2][:12], digits[3][:12]
    lipschitz = result.radii[:12]
    # Tiny noise: every sample stays inside the Lipschitz radius of the images certified beyond the noise's reach
    # (||noise|| <= sigma (sqrt(d) + 6) except with probability < 1e-8), so all n samples vote for the prediction.
    sigma = 0.002
    reach = sigma * (math.sqrt(images[0].numel()) + 6)
    smoothed = certify_smoothing(
        model, images, sigma, n0=16, n=64, alpha=0.001, generator=torch.Generator().manual_seed(0), progress=False
    )
    safe = lipschitz > reach
    assert safe.sum() >= 4
    assert torch.equal(smoothed.predictions[safe], result.predictions[:12][safe])
    assert torch.all(smoothed.counts[safe] == 64)
    expected = smoothing_radius(64, 64, sigma, 0.001)
    torch.testing.assert_close(smoothed.radii[safe], torch.full((int(safe.sum()),), expected, dtype=torch.float64))
    # Large noise: the smoothed classifier abstains (-1, radius 0) exactly where its lower bound is below 1/2.
    noisy = certify_smoothing(
        model, images, 0.5, n0=16, n=64, alpha=0.001, generator=torch.Generator().manual_seed(1), progress=False
    )
    abstain = noisy.p_lower < 0.5
    assert torch.all((noisy.predictions == -1) == abstain) and torch.all(noisy.radii[abstain] == 0)
    assert torch.all(noisy.radii[~abstain] > 0) and torch.all(noisy.predictions[~abstain] < NUM_CLASSES)
    # Both records compare on the same curve (the plot accepts both).
    for eps in (0.0, 36 / 255):
        assert 0.0 <= noisy.certified_accuracy(eps, labels) <= 1.0
        assert smoothed.certified_accuracy(eps, labels) <= float((smoothed.predictions == labels).double().mean())


def test_margin_pgd_helper_finds_the_exact_boundary_of_a_linear_model() -> None:
    # Two classes, logits (x . w, 0): the prediction flips at distance |x . w| / ||w|| (in the box's interior).
    weight = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    weight[0, 0, 1, 1], weight[0, 1, 2, 2] = 3.0, -4.0
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 2, bias=False)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.cat([weight.flatten(1), torch.zeros(1, 32, dtype=torch.float64)]))
    images = torch.full((3, 2, 4, 4), 0.5, dtype=torch.float64)
    images[:, 0, 1, 1] = torch.tensor([0.6, 0.7, 0.4])
    logits = model(images)
    target = logits.argmax(1)
    distance = (logits[:, 0] - logits[:, 1]).abs() / 5.0
    assert not margin_pgd(model, images, target, 0.99 * distance).any()
    assert margin_pgd(model, images, target, 1.01 * distance).all()
    assert F.relu(distance).min() > 0


# --------------------------------------------------------------------------------------------------- SLL / CPL


@pytest.mark.slow
@pytest.mark.parametrize("mlp", ["sll", "cpl"])
def test_sll_and_cpl_models_certify_and_survive_pgd(mlp: str, digits) -> None:
    train_x, train_y, test_x, _ = digits
    model = robustvit.convert(_tiny_source("timm"), calibration_images=train_x[:64], mlp=mlp)
    report = robustvit.lipschitz_report(model)
    layer_rows = [e for e in report.entries if e.type == mlp.upper()]
    assert len(layer_rows) == 1 and layer_rows[0].bound <= 1 + 1e-9  # checked by its rule, not assumed
    model = _train_emma(model, train_x, train_y, steps=40)
    result = robustvit.certify(model, test_x[:16])
    ok = _attackable(result)
    assert ok.sum() >= 4
    exact = copy.deepcopy(model).double()
    assert not margin_pgd(exact, test_x[:16][ok].double(), result.predictions[ok], 0.99 * result.radii[ok]).any()
