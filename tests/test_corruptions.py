import colorsys
import itertools

import pytest
import torch

from robustvit import corruptions
from robustvit.corruptions import CORRUPTIONS, MAX_SEVERITY, corrupt, corruption_names, register_corruption
from robustvit.registry import Registry

SEVERITIES = range(1, MAX_SEVERITY + 1)
MONOTONE = ["gaussian_noise", "shot_noise", "impulse_noise", "contrast", "brightness", "gaussian_blur"]


def _images(shape=(4, 3, 32, 32), seed=0, dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_registry_has_the_imagenet_c_corruptions():
    expected = {"gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "contrast", "brightness", "jpeg"}
    assert expected <= set(corruption_names())
    assert corruption_names() == list(CORRUPTIONS)


@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("name", corruption_names())
def test_keeps_shape_dtype_range_and_changes_images(name, severity):
    images = _images()
    out = corrupt(images, name, severity, generator=_gen())
    assert out.shape == images.shape
    assert out.dtype == images.dtype
    assert out.device == images.device
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.equal(out, images)


@pytest.mark.parametrize("name", corruption_names())
def test_float64_and_single_channel(name):
    images = _images((2, 1, 16, 16), dtype=torch.float64)
    out = corrupt(images, name, 3, generator=_gen())
    assert out.dtype == torch.float64 and out.shape == images.shape
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("name", MONOTONE)
def test_higher_severity_moves_images_further(name):
    images = _images()
    diffs = [(corrupt(images, name, s, generator=_gen()) - images).abs().mean().item() for s in SEVERITIES]
    assert diffs[0] > 0
    assert all(a <= b for a, b in itertools.pairwise(diffs)), diffs


@pytest.mark.parametrize("name", corruption_names())
def test_deterministic_given_generator(name):
    images = _images()
    first = corrupt(images, name, 4, generator=_gen(123))
    second = corrupt(images, name, 4, generator=_gen(123))
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise"])
def test_random_corruptions_depend_on_seed(name):
    images = _images()
    assert not torch.equal(corrupt(images, name, 3, generator=_gen(1)), corrupt(images, name, 3, generator=_gen(2)))


def test_gaussian_noise_has_the_tabulated_sigma():
    grey = torch.full((8, 3, 32, 32), 0.5)
    out = corrupt(grey, "gaussian_noise", 1, generator=_gen())
    assert (out - grey).std().item() == pytest.approx(0.08, rel=0.05)
    assert (out - grey).mean().abs().item() < 0.005


def test_shot_noise_quantises_to_photon_counts():
    out = corrupt(_images(), "shot_noise", 5, generator=_gen())  # 3 photons
    counts = out * 3
    assert torch.allclose(counts, counts.round(), atol=1e-5)


def test_impulse_noise_sets_the_tabulated_fraction_to_black_or_white():
    grey = torch.full((8, 3, 32, 32), 0.5)
    out = corrupt(grey, "impulse_noise", 5, generator=_gen())  # amount 0.27
    changed = out != 0.5
    assert changed.float().mean().item() == pytest.approx(0.27, abs=0.02)
    assert set(out[changed].unique().tolist()) == {0.0, 1.0}
    assert (out == 0).sum().item() == pytest.approx((out == 1).sum().item(), rel=0.1)


def test_contrast_keeps_channel_means_and_scales_deviations():
    images = _images()
    out = corrupt(images, "contrast", 2, generator=None)  # factor 0.3
    means = images.mean(dim=(-2, -1), keepdim=True)
    assert torch.allclose(out.mean(dim=(-2, -1), keepdim=True), means, atol=1e-6)
    assert torch.allclose(out - means, 0.3 * (images - means), atol=1e-6)


def test_brightness_matches_hsv_value_shift():
    images = _images((1, 3, 4, 4))
    images[0, :, 0, 0] = 0.0  # black pixel: no hue, must turn grey
    out = corrupt(images, "brightness", 3, generator=None)  # +0.3 value
    for i in range(4):
        for j in range(4):
            h, s, v = colorsys.rgb_to_hsv(*images[0, :, i, j].tolist())
            expected = colorsys.hsv_to_rgb(h, s, min(v + 0.3, 1.0))
            assert out[0, :, i, j].tolist() == pytest.approx(expected, abs=1e-6)


def test_gaussian_blur_keeps_constant_images_and_smooths_noise():
    flat = torch.full((1, 3, 32, 32), 0.3)
    assert torch.allclose(corrupt(flat, "gaussian_blur", 5), flat, atol=1e-6)
    images = _images()
    assert corrupt(images, "gaussian_blur", 3).std() < 0.5 * images.std()


def test_pixelate_makes_constant_blocks():
    out = corrupt(_images(), "pixelate", 5)  # 32 px -> 8 px -> 32 px
    blocks = out.unfold(2, 4, 4).unfold(3, 4, 4)
    assert torch.equal(blocks, blocks[..., :1, :1].expand_as(blocks))


def test_jpeg_is_a_lossy_round_trip_and_rejects_other_channel_counts():
    images = _images((2, 3, 32, 32))
    out = corrupt(images, "jpeg", 5)
    assert (out * 255 - (out * 255).round()).abs().max() < 1e-4  # decoded 8-bit values
    assert (out - images).abs().mean() > 0.05
    with pytest.raises(ValueError, match="1 or 3 channels"):
        corrupt(_images((1, 2, 8, 8)), "jpeg", 1)


def test_unknown_name_lists_available():
    with pytest.raises(KeyError, match=r"unknown corruption 'fog'; known: gaussian_noise, shot_noise"):
        corrupt(_images(), "fog", 1)


@pytest.mark.parametrize("severity", [0, 6, -1, 2.0, True])
def test_bad_severity(severity):
    with pytest.raises(ValueError, match="severity must be an int from 1 to 5"):
        corrupt(_images(), "contrast", severity)


def test_bad_images():
    images = _images()
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        corrupt(images, "gaussian_noise", 1)
    with pytest.raises(ValueError, match="batch, channels, height, width"):
        corrupt(torch.rand(3, 32, 32), "gaussian_noise", 1)
    with pytest.raises(TypeError, match="floating-point"):
        corrupt(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "gaussian_noise", 1)


def test_register_corruption_dispatches_and_rejects_duplicates(monkeypatch):
    monkeypatch.setattr(corruptions, "CORRUPTIONS", Registry("corruption"))

    @register_corruption("invert")
    def invert(images, severity, generator=None):
        return 1 - images

    assert corruptions.corruption_names() == ["invert"]
    images = _images()
    assert torch.equal(corruptions.corrupt(images, "invert", 1), 1 - images)
    with pytest.raises(ValueError, match="already registered"):
        register_corruption("invert")(invert)


def test_the_docs_say_why_each_corruption_is_not_a_torchvision_op():
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "main-job.md").read_text()
    reasons = {line.split("`")[1] for line in page.splitlines() if line.startswith("- `")}
    assert set(corruption_names()) <= reasons
