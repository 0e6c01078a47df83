"""Certificates of the deployed precision: the rounding bound holds, and attacks in each dtype never flip a
certified prediction; refusals and the recorded precision."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import IMG, build_model, logits_of

import robustvit
from robustvit.certification.rounding import forward_error_bound
from robustvit.data import load_image_dataset, stack_examples
from robustvit.errors import UnsupportedModuleError
from robustvit.losses import LOSSES, head_margins

PRECISIONS = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def digits():
    train_x, train_y = stack_examples(load_image_dataset(split="train", image_size=IMG))
    test_x, test_y = stack_examples(load_image_dataset(split="test", image_size=IMG), 24)
    return train_x, train_y, test_x, test_y


@pytest.fixture(scope="module")
def trained(digits):
    """A converted avg-pool timm ViT (minmax), 60 EMMA steps on the digits: it certifies at useful radii."""
    train_x, train_y, _, _ = digits
    model = robustvit.convert(build_model("timm_avg_ls_reg"), calibration_images=train_x[:64], activation="minmax")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(60):
        index = torch.randint(0, len(train_x), (64,), generator=generator)
        eps = 72 / 255 * min(1.0, (step + 1) / 30)
        loss = LOSSES["emma"](logits_of(model(train_x[index])), train_y[index], eps=eps, margins=head_margins(model))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _rounded_pair(model, precision):
    deployed = copy.deepcopy(model).to(precision).eval()
    return deployed, copy.deepcopy(deployed).to(torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("accumulation", [None, torch.float32])
def test_forward_error_bound_covers_the_deployed_error(trained, digits, precision, accumulation):
    deployed, exact = _rounded_pair(trained, precision)
    bound = forward_error_bound(exact, (3, IMG, IMG), precision, accumulation)
    images = torch.cat([digits[2], torch.rand(8, 3, IMG, IMG), torch.zeros(1, 3, IMG, IMG), torch.ones(1, 3, IMG, IMG)])
    with torch.no_grad():
        error = (logits_of(deployed(images.to(precision))).double() - logits_of(exact(images.double()))).norm(dim=1)
    assert float(error.max()) <= bound and float(error.max()) > 0
    if accumulation is None:  # the worst case never beats the float32-accumulation assumption
        assert bound >= forward_error_bound(exact, (3, IMG, IMG), precision, torch.float32)
    # on a ball around one image: tighter than over the whole cube, and it still covers the points of the ball
    image = digits[2][0].double()
    local = forward_error_bound(exact, (3, IMG, IMG), precision, accumulation, image=image, radius=0.5)
    assert local <= bound
    noise = torch.randn(16, 3, IMG, IMG, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    points = (image + noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * 0.5).clamp(0, 1)
    with torch.no_grad():
        error = (logits_of(deployed(points.to(precision))).double() - logits_of(exact(points))).norm(dim=1)
    assert float(error.max()) <= local


def _margin_pgd(model, images, target, eps, dtype, steps=40, restarts=2):
    """l2 PGD on max_{j != target} z_j - z_target, computed in ``dtype``; True where a prediction flipped."""
    generator = torch.Generator().manual_seed(0)
    eps = eps.view(-1, 1, 1, 1).to(images.dtype)
    flipped = torch.zeros(len(images), dtype=torch.bool)
    for restart in range(restarts):
        start = torch.randn(images.shape, generator=generator) if restart else torch.zeros_like(images)
        norms = start.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        adv = (images + start / norms * eps * 0.99).clamp(0, 1)
        for _ in range(steps):
            adv.requires_grad_(True)
            logits = logits_of(model(adv.to(dtype))).float()
            flipped |= logits.detach().argmax(1) != target
            top = logits.gather(1, target[:, None])[:, 0]
            other = logits.scatter(1, target[:, None], -math.inf).amax(1)
            (grad,) = torch.autograd.grad((other - top).sum(), adv)
            with torch.no_grad():
                delta = adv + 2.5 * eps / steps * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                delta = delta - images
                delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)).clamp(max=1)
                adv = (images + delta).clamp(0, 1)
        with torch.no_grad():
            flipped |= logits_of(model(adv.to(dtype))).float().argmax(1) != target
    return flipped


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
def test_attacks_in_each_precision_never_flip_a_certified_prediction(trained, digits, precision):
    images = digits[2]
    accumulation = torch.float32 if precision is not torch.float32 else None
    result = robustvit.certify(trained, images, precision=precision, accumulation=accumulation)
    assert result.precision == str(precision).removeprefix("torch.") and result.logit_error > 0
    exact = robustvit.certify(trained, images)
    assert (result.radii <= exact.radii + 1e-12).all()  # the deployed certificate pays the rounding
    deployed = copy.deepcopy(trained).to(precision).eval()
    with torch.no_grad():
        assert torch.equal(result.predictions, logits_of(deployed(images.to(precision))).argmax(1))
    ok = result.radii > 0
    if precision is torch.float32:
        assert ok.sum() >= len(images) // 4  # float32 keeps most certificates
    if ok.any():
        # at the boundary of the radius, and with rounding-level noise on top
        for scale in (0.999, 1.0):
            assert not _margin_pgd(
                deployed, images[ok], result.predictions[ok], scale * result.radii[ok], precision
            ).any()
        noise = torch.randn(16, *images.shape[1:], generator=torch.Generator().manual_seed(1))
        for i in torch.nonzero(ok).flatten().tolist():
            r = float(result.radii[i])
            points = (images[i] + noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * r).clamp(0, 1)
            with torch.no_grad():
                assert (logits_of(deployed(points.to(precision))).argmax(1) == result.predictions[i]).all()


def test_layers_without_a_rounding_analysis_are_refused():
    gelu = robustvit.convert(build_model("timm_token"))  # GELU kept
    with pytest.raises(UnsupportedModuleError, match="GELU"):
        robustvit.certify(gelu, torch.rand(1, 3, IMG, IMG), precision=torch.bfloat16)
    l2 = robustvit.convert(build_model("timm_token"), mixer="l2", activation="minmax")
    with pytest.raises(UnsupportedModuleError, match="L2Attention"):
        robustvit.certify(l2, torch.rand(1, 3, IMG, IMG), precision=torch.float32)
    hf = robustvit.convert(build_model("hf_vit"), activation="minmax")
    with pytest.raises(UnsupportedModuleError, match="ViTForImageClassification"):
        robustvit.certify(hf, torch.rand(1, 3, IMG, IMG), precision=torch.float32)


def test_bad_precision_arguments_raise(trained):
    image = torch.rand(1, 3, IMG, IMG)
    with pytest.raises(ValueError, match="precision"):
        robustvit.certify(trained, image, precision=torch.int8)
    with pytest.raises(ValueError, match="accumulation"):
        robustvit.certify(trained, image, accumulation=torch.float32)
    with pytest.raises(ValueError, match="coarser"):
        robustvit.certify(trained, image, precision=torch.float32, accumulation=torch.bfloat16)


def test_certificate_records_the_precision_and_loading_warns_below_it(trained, digits, tmp_path):
    images, labels = digits[2][:8], digits[3][:8]
    result = robustvit.certify(trained, images, labels, precision=torch.float32)
    certificate = result.to_certificate(trained, dataset="digits", split="test", pgd_steps=2, pgd_restarts=1)
    assert certificate.precision == {"dtype": "float32", "accumulation": "float32", "logit_error": result.logit_error}
    folder = robustvit.save_pretrained(trained, tmp_path / "model", certificate)
    loaded = robustvit.from_pretrained(folder)
    assert loaded.certificate.precision == certificate.precision
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded(images)  # float32: as certified
    with pytest.warns(UserWarning, match="holds in float32 but it runs in bfloat16"):
        loaded.to(torch.bfloat16)(images.to(torch.bfloat16))
    # an exact-function certificate keeps its old record (and digest): no precision key
    exact = robustvit.certify(trained, images, labels).to_certificate(
        trained, dataset="digits", split="test", pgd_steps=2, pgd_restarts=1
    )
    assert exact.precision is None and "precision" not in exact.to_dict()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_half_precision_certificates_of_a_small_network_survive_attacks_in_that_precision(precision):
    """A network small enough for the worst-case analysis to leave positive radii in every precision: attacks run
    in the deployed dtype, at the boundary of each radius, and never flip a certified prediction."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    images = torch.rand(64, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    result = robustvit.certify(net, images, precision=precision, accumulation=torch.float32)
    exact = robustvit.certify(net, images)
    ok = result.radii > 0
    assert ok.sum() >= 8 and (result.radii <= exact.radii + 1e-12).all()
    deployed = copy.deepcopy(net).to(precision)
    assert not _margin_pgd(deployed, images[ok], result.predictions[ok], result.radii[ok], precision, steps=60).any()
    # random points on the sphere of each radius, evaluated in the deployed precision
    noise = torch.randn(256, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    noise = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    for i in torch.nonzero(ok).flatten().tolist():
        points = (images[i] + noise * float(result.radii[i])).clamp(0, 1)
        with torch.no_grad():
            assert (deployed(points.to(precision)).argmax(1) == result.predictions[i]).all()
