"""The sound substitutes for parts without a global Lipschitz bound (gated MLPs, attention pooling, RMSNorm):
each bounded by rule and attacked by gradient ascent, each a ConvertConfig choice that certifies and round-trips
through save/load, and the forms without a substitute refused with the part named."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import timm
import torch
from conftest import IMG, build_model, logits_of
from torch import nn

import robustvit
from robustvit import ConvertConfig, UnsupportedModuleError
from robustvit.families import get_family
from robustvit.layers import CenterNorm, LipResidual, MeanPoolLatent, RmsScale, UngatedMlp
from robustvit.lipschitz import SILU_LIPSCHITZ
from robustvit.lipschitz.estimate import estimate_lipschitz_lower_bound


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, IMG, IMG, generator=_gen(seed))


# ----------------------------------------------------------------------------------------------------------
# The layers, attacked
# ----------------------------------------------------------------------------------------------------------


def test_silu_rule_is_above_its_steepest_slope():
    x = torch.linspace(-8, 8, 160001, dtype=torch.float64, requires_grad=True)
    nn.functional.silu(x).sum().backward()
    assert float(x.grad.abs().max()) <= SILU_LIPSCHITZ <= float(x.grad.abs().max()) + 1e-4
    assert robustvit.lipschitz_bound(nn.SiLU()) == pytest.approx(SILU_LIPSCHITZ)


def test_ungated_mlp_bound_survives_gradient_ascent():
    torch.manual_seed(0)
    mlp = UngatedMlp(nn.Linear(8, 24), nn.SiLU(), RmsScale(24), nn.Linear(24, 8))
    with torch.no_grad():
        mlp.norm.weight.uniform_(0.5, 2.0)
    bound = robustvit.lipschitz_bound(mlp)
    estimate = estimate_lipschitz_lower_bound(mlp, torch.randn(4, 8), steps=100, restarts=4, generator=_gen(1))
    assert 0.05 * bound < estimate <= bound


def test_mean_pool_latent_bound_survives_gradient_ascent_and_checks_the_token_count():
    torch.manual_seed(0)
    branch = nn.Sequential(CenterNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    pool = MeanPoolLatent(nn.Linear(8, 8), nn.Linear(8, 8), LipResidual(branch, 8, 0.7), num_tokens=6)
    bound = robustvit.lipschitz_bound(pool)
    estimate = estimate_lipschitz_lower_bound(pool, torch.randn(3, 6, 8), steps=100, restarts=4, generator=_gen(2))
    assert 0.05 * bound < estimate <= bound
    with pytest.raises(ValueError, match="expects 6 tokens"):
        pool(torch.randn(1, 5, 8))


def test_mean_pool_latent_scales_its_output_exactly():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    branch = nn.Sequential(OrderedDict(norm=CenterNorm(8), mlp=mlp))
    pool = MeanPoolLatent(nn.Linear(8, 8), nn.Linear(8, 8), LipResidual(branch, 8, 0.7), num_tokens=4)
    x = torch.randn(2, 4, 8)
    before = pool(x)
    pool.scale_output_(3.0)
    torch.testing.assert_close(pool(x), 3.0 * before)


def test_rms_scale_bound_is_its_largest_gain():
    norm = RmsScale(6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, -2.0, 1.0, 0.1, 1.5, 0.3]))
    assert robustvit.lipschitz_bound(norm) == pytest.approx(2.0)
    estimate = estimate_lipschitz_lower_bound(norm, torch.randn(2, 6), steps=50, restarts=2, generator=_gen(3))
    assert estimate == pytest.approx(2.0, rel=1e-3)


# ----------------------------------------------------------------------------------------------------------
# The choices on converted tiny models
# ----------------------------------------------------------------------------------------------------------

CHOICES = [
    ("timm_eva02", {"gated_mlp": "value"}),
    ("timm_eva02", {"gated_mlp": "gate"}),
    ("timm_eva02", {"gated_mlp": "gate", "mlp": "sll"}),
    ("timm_rope_rms", {"rms_norm": "scale"}),
    ("timm_rope_rms", {"rms_norm": "center", "mixer": "l2"}),
    ("timm_map", {"attention_pool": "mean"}),
    ("timm_pe_core", {"attention_pool": "mean", "activation": "minmax"}),
]


@pytest.mark.parametrize(("family", "options"), CHOICES, ids=lambda v: v if isinstance(v, str) else str(v))
def test_substitute_bound_survives_gradient_ascent_and_certifies(family, options):
    model = robustvit.convert(build_model(family), **options).eval()
    bound = robustvit.lipschitz_bound(model)
    estimate = estimate_lipschitz_lower_bound(model, _pixels(2, 1), steps=30, restarts=3, generator=_gen(0))
    assert 0 < estimate <= bound, f"{family} {options}: empirical {estimate} > bound {bound}"
    result = robustvit.certify(model, _pixels(4, 2))
    assert result.lipschitz == pytest.approx(bound, rel=1e-6)
    assert (result.radii >= 0).all()


@pytest.mark.parametrize(("family", "options"), CHOICES[::2], ids=lambda v: v if isinstance(v, str) else str(v))
def test_substitute_choice_round_trips_through_save_and_load(family, options, tmp_path):
    model = robustvit.convert(build_model(family), **options).eval()
    robustvit.save_pretrained(model, tmp_path)
    with pytest.warns(UserWarning, match="verify=False"):
        loaded = robustvit.from_pretrained(tmp_path, verify=False).eval()
    for key, value in options.items():
        assert getattr(loaded.robustvit_config, key) == value
    images = _pixels(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded(images)), logits_of(model(images)))
    assert robustvit.lipschitz_bound(loaded) == pytest.approx(robustvit.lipschitz_bound(model), rel=1e-9)


def test_gated_mlp_choices_keep_the_named_branch():
    source = build_model("timm_eva02")
    fc1 = source.blocks[0].mlp.fc1  # GluMlp, gate first (gate_last=False): act(x1) * x2
    gate, value = fc1.weight.detach().chunk(2)
    for choice, kept in (("value", value), ("gate", gate)):
        model = robustvit.convert(source, gated_mlp=choice, singular_value_power=1.0)
        layer = model.blocks[0].mlp.fn.mlp
        assert isinstance(layer, UngatedMlp) and isinstance(layer.act, nn.SiLU)
        raw = layer.fc1.parametrizations.weight.original.detach()
        torch.testing.assert_close(raw, kept)  # the stored weight is the source branch, the rescaling divides it


def test_rms_norm_calibration_uses_the_token_rms():
    source = build_model("timm_rope_rms").eval()
    images = _pixels(4, 4)
    seen = {}
    hook = source.fc_norm.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    spec = get_family(source).input_spec(source)
    with torch.no_grad():
        mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
        source((images - mean) / std)
    hook.remove()
    rms = float(seen["x"].pow(2).mean(-1).sqrt().mean())
    model = robustvit.convert(source, calibration_images=images, residual_alpha=1.0)
    # The norm before the head also takes the head's scale: compare against an uncalibrated conversion, which differs
    # only by the division.
    plain = robustvit.convert(source)
    torch.testing.assert_close(model.fc_norm.weight * rms, plain.fc_norm.weight, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# Validation and refusals
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["gated_mlp", "attention_pool", "rms_norm"])
def test_unknown_substitute_names_are_refused_with_the_choices(field):
    with pytest.raises(ValueError, match=field):
        ConvertConfig(**{field: "nope"})
    assert ConvertConfig.from_dict({"mixer": "shift"}).to_dict()[field] == getattr(ConvertConfig(), field)


def _eva(**kwargs) -> nn.Module:
    return timm.create_model(
        "eva02_tiny_patch14_224",
        img_size=IMG,
        patch_size=8,
        depth=1,
        embed_dim=48,
        num_heads=3,
        num_classes=4,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _eva(scale_mlp=True, swiglu_mlp=False), "Mlp with a hidden norm"),
        (lambda: _eva(global_pool="avgmax"), "global_pool='avgmax'"),
        (lambda: _eva(use_post_norm=True), "EvaBlockPostNorm"),
        (
            lambda: timm.create_model(
                "vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=1, global_pool="map", class_token=False,
                norm_layer=nn.LayerNorm, num_classes=4,
            ).eval(),
            None,
        ),
    ],
)  # fmt: skip
def test_forms_without_a_substitute_are_refused_naming_the_part(make, message):
    model = make()
    if message is None:  # the control: a supported MAP model converts
        robustvit.convert(model)
        return
    with pytest.raises(UnsupportedModuleError, match=message):
        robustvit.convert(model)


def test_attention_pool_with_several_latents_is_refused():
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=1, global_pool="map", class_token=False
    )
    model.attn_pool.latent_len = 2
    with pytest.raises(UnsupportedModuleError, match="latent_len=2"):
        robustvit.convert(model)


def test_a_norm_without_a_substitute_is_refused_naming_the_registry():
    model = timm.create_model("vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=1, num_classes=4)
    model.norm = timm.layers.SimpleNorm(model.embed_dim)
    with pytest.raises(UnsupportedModuleError, match="RMS_NORM_TYPES"):
        robustvit.convert(model)
