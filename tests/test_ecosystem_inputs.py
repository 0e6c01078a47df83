"""certify, certify_smoothing and the attacks refuse inputs outside their contract, with an error that names the fix:
certified radii are in the space of [0, 1] pixels, so uint8 or [0, 255] images would get radii 255x too large."""

from __future__ import annotations

import pytest
import torch
from conftest import IMG, NUM_CLASSES, REPRESENTATIVES, build_model, logits_of, where_the_source_traces

import robustvit
from robustvit._utils import unchecked_pixels
from robustvit.certification import attacks

ENTRY_POINTS = {
    "certify": lambda m, x, y, eps: robustvit.certify(m, x, y),
    "certify_smoothing": lambda m, x, y, eps: robustvit.certify_smoothing(m, x, 0.25, n0=2, n=4, progress=False),
    "pgd": lambda m, x, y, eps: attacks.pgd(m, x, y, eps, norm="l2", steps=1),
    "fgsm": lambda m, x, y, eps: attacks.fgsm(m, x, y, eps),
    "robust_accuracy": lambda m, x, y, eps: attacks.robust_accuracy(m, x, y, eps, steps=1),
}
LABELLED = ("certify", "pgd", "fgsm", "robust_accuracy")
WITH_EPS = ("pgd", "fgsm", "robust_accuracy")


@pytest.fixture(scope="module")
def model():
    return robustvit.convert(build_model("timm_token").eval()).eval()


def _good():
    return torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])


@pytest.mark.parametrize("name", ENTRY_POINTS)
@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (lambda x: (x * 255).to(torch.uint8), TypeError, r"images\.float\(\) / 255"),
        (lambda x: x * 255, ValueError, "divide .* by 255"),
        (lambda x: 2 * x - 1, ValueError, "normaliz"),
        (lambda x: x[:0], ValueError, "empty"),
    ],
    ids=["uint8", "0-255", "minus1-1", "empty"],
)
def test_bad_images_are_refused(model, name, images, error, match):
    x, y = _good()
    bad = images(x)
    with pytest.raises(error, match=match):
        ENTRY_POINTS[name](model, bad, y[: len(bad)], 0.1)


@pytest.mark.parametrize("name", LABELLED)
@pytest.mark.parametrize("labels", [[0, NUM_CLASSES], [-1, 0]], ids=["too-large", "negative"])
def test_labels_out_of_range_are_refused(model, name, labels):
    x, _ = _good()
    with pytest.raises(ValueError, match=rf"labels must be classes in \[0, {NUM_CLASSES}\)"):
        ENTRY_POINTS[name](model, x, torch.tensor(labels), 0.1)


@pytest.mark.parametrize("name", WITH_EPS)
def test_negative_eps_is_refused(model, name):
    x, y = _good()
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        ENTRY_POINTS[name](model, x, y, -0.1)


def test_valid_inputs_pass_and_hf_labels_use_the_config(images):
    hf = robustvit.convert(build_model("hf_vit").eval()).eval()
    robustvit.certify(hf, images, torch.arange(4))
    with pytest.raises(ValueError, match=rf"\[0, {NUM_CLASSES}\)"):
        robustvit.certify(hf, images, torch.tensor([0, 1, 2, NUM_CLASSES]))


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_eval_forward_refuses_normalized_pixels(name):
    """A converted model normalizes inside: the source's processor (ViTImageProcessor: mean = std = 0.5) would
    normalize twice and silently compute another function. In eval mode the forward refuses, naming the fix."""
    model = robustvit.convert(build_model(name).eval()).eval()
    pixels = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"\[0, 1\].*do_normalize=False"):
        model((pixels - 0.5) / 0.5)
    with torch.no_grad():
        model(pixels)  # [0, 1] pixels pass
        with unchecked_pixels():  # smoothing's Gaussian samples, Lipschitz estimates
            model(pixels * 3 - 1)
    model.train()(pixels * 3 - 1)  # training steps (and noise augmentation) are not checked


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_the_pixel_check_steps_aside_while_tracing(name):
    model = robustvit.convert(build_model(name).eval()).eval()
    pixels = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = logits_of(model(pixels))
    batched = torch.func.vmap(lambda x: logits_of(model(x[None]))[0])
    torch.testing.assert_close(batched(pixels), expected, atol=1e-5, rtol=1e-5)
    jacobian = torch.func.jacrev(lambda x: logits_of(model(x)))(pixels[:1])
    assert jacobian.shape == (1, expected.shape[-1], 1, 3, IMG, IMG) and torch.isfinite(jacobian).all()
    if name.startswith("timm"):  # timm models trace whole with torch.fx (with the concrete arguments timm uses)
        traced = torch.fx.symbolic_trace(model, concrete_args={"attn_mask": None, "is_causal": False})
        torch.testing.assert_close(traced(pixels), expected)
    with where_the_source_traces(name):  # dynamo, last: it may refuse the source itself on an older torch
        exported = torch.export.export(model, (pixels,))
        torch.testing.assert_close(logits_of(exported.module()(pixels)), expected)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(logits_of(compiled(pixels)), expected)
