"""``robustvit.convert`` on every supported family (tiny random-init models, no downloads).

The end-to-end bound is attacked by gradient ascent on the converted model; the conversion's scale moves are
checked against an independent re-implementation of the converted function written from the *source* model.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import (
    ALL_FAMILIES,
    HF_ENCODER_FAMILIES,
    HF_FAMILIES,
    IMG,
    NUM_CLASSES,
    REPRESENTATIVES,
    build_model,
    logits_of,
)
from torch import nn
from torch.nn.utils import parametrize

import robustvit
from robustvit import ConvertConfig, UnsupportedModuleError
from robustvit.families import RMS_NORM_TYPES, get_family
from robustvit.layers import CenterNorm, L2Attention, MinMax, NormalizedConv2d, RmsScale, TokenShift
from robustvit.lipschitz.estimate import estimate_lipschitz_lower_bound

FAMILIES = ALL_FAMILIES


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, IMG, IMG, generator=gen(seed))


_CONVERTED: dict[tuple, nn.Module] = {}


def converted(family: str, **overrides) -> nn.Module:
    """A converted model, cached per (family, options): only for tests that do not modify it."""
    key = (family, tuple(sorted(overrides.items())))
    if key not in _CONVERTED:
        _CONVERTED[key] = robustvit.convert(build_model(family), **overrides).eval()
    return _CONVERTED[key]


# ----------------------------------------------------------------------------------------------------------
# Conversion, forward/backward, interface kept
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_forward_backward_and_interface(family):
    source = build_model(family)
    source_state = {k: v.clone() for k, v in source.state_dict().items()}
    model = robustvit.convert(source)
    assert type(model) is type(source) and model is not source and robustvit.is_converted(model)
    assert not robustvit.is_converted(source)
    assert all(torch.equal(v, source_state[k]) for k, v in source.state_dict().items())  # source untouched
    unread = getattr(get_family(model), "unread", ())  # outside the logits' function, left as they are
    read = [m for name, m in model.named_modules() if not any(name.startswith(u) for u in unread)]
    kinds = {parametrize.type_before_parametrizations(m) for m in read}
    assert NormalizedConv2d in kinds and kinds & {CenterNorm, RmsScale} and TokenShift in kinds
    assert not any(issubclass(kind, nn.LayerNorm) or kind in RMS_NORM_TYPES for kind in kinds)

    x = pixels(3)
    model.train()
    out = model(x)
    logits = out[0] if isinstance(out, tuple) else logits_of(out)  # distilled training may return a pair
    logits.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)

    model.eval()
    with torch.no_grad():
        out = model(x)
    if family in HF_FAMILIES:
        from transformers.modeling_outputs import ImageClassifierOutput

        assert isinstance(out, ImageClassifierOutput) and out.logits.shape == (3, NUM_CLASSES)
        vision = getattr(model.config, "vision_config", None) or model.config  # CLIP / SigLIP nest it
        assert getattr(vision, "hidden_size", 48) == 48 and model.config.num_labels == NUM_CLASSES  # TimmWrapper: none
        labelled = model(x, labels=torch.tensor([0, 1, 2]))
        assert labelled.loss is not None and torch.isfinite(labelled.loss)
    else:
        assert isinstance(out, torch.Tensor) and out.shape == (3, NUM_CLASSES)
        assert model.num_classes == NUM_CLASSES
        # timm's name of converted models (see tests/test_ecosystem_save_load.py); the source's stays on record
        assert model.pretrained_cfg.get("architecture") == "robustvit"
        assert model.robustvit_source["architecture"] == source.pretrained_cfg["architecture"]
        with torch.no_grad():
            features = model.forward_features(x)
            tokens = model.patch_embed.num_patches + model.num_prefix_tokens
            assert features.shape == (3, tokens, model.embed_dim)
            assert torch.allclose(model.forward_head(features), out, atol=1e-6)
        model.reset_classifier(5)
        with torch.no_grad():
            assert model(x).shape == (3, 5)
        assert robustvit.lipschitz_bound(model) > 0  # a fresh plain head is bounded exactly


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_logits_depend_on_the_image(family):
    """A converted classifier must look at its input. With the default shift mixer, TokenShift leaves the prefix
    (class) tokens unchanged and the MLPs are per token, so a model that reads the class token never sees the
    image: its logits are a constant (trivially certified, and useless)."""
    model = converted(family)
    x = pixels(6, seed=3)
    with torch.no_grad():
        logits = logits_of(model(x))
    spread = float((logits - logits.mean(0)).abs().max())
    assert spread > 1e-4 * float(logits.abs().max()), f"{family}: logits do not depend on the image"


@pytest.mark.parametrize("family", FAMILIES)
def test_inplace_conversion_and_converting_twice(family):
    source = build_model(family)
    model = robustvit.convert(source, inplace=True)
    assert model is source and robustvit.is_converted(source)
    with pytest.raises(ValueError, match="already"):
        robustvit.convert(model)
    with pytest.raises(ValueError, match="already"):
        robustvit.convert(robustvit.convert(build_model(family)), mixer="l2")


# ----------------------------------------------------------------------------------------------------------
# The end-to-end bound against gradient ascent
# ----------------------------------------------------------------------------------------------------------

# Every combination on one tiny model per family; the other tiny models each with the combinations listed for them
# (a newly registered one gets the L2 mixer and GELU).
_OTHER_BOUND_CASES = {
    "timm_avg_ls_reg": [("shift", "gelu"), ("l2", "minmax")],
    "timm_distilled": [("l2", "gelu")],
    "timm_patch4": [("shift", "minmax")],
    "hf_deit": [("l2", "gelu")],
}
BOUND_CASES = [(f, m, a) for f in REPRESENTATIVES for m in ("shift", "l2") for a in ("gelu", "minmax")] + [
    (f, m, a) for f in ALL_FAMILIES if f not in REPRESENTATIVES for m, a in _OTHER_BOUND_CASES.get(f, [("l2", "gelu")])
]


@pytest.mark.parametrize(("family", "mixer", "activation"), BOUND_CASES)
def test_end_to_end_bound_holds_against_gradient_ascent(family, mixer, activation):
    model = converted(family, mixer=mixer, activation=activation)
    bound = robustvit.lipschitz_bound(model)
    assert 0 < bound < float("inf")
    estimate = estimate_lipschitz_lower_bound(model, pixels(2, seed=1), steps=30, restarts=4, generator=gen(0))
    assert estimate <= bound, f"{family}/{mixer}/{activation}: empirical {estimate} > certified {bound}"
    assert model.training is False  # the estimator restores the mode


def test_bound_is_not_vacuous_where_the_logits_move():
    """On a model whose logits move with the image, the attack finds a ratio that is a real fraction of the bound
    (so the check above is not comparing against zero)."""
    model = converted("timm_avg_ls_reg", mixer="l2")
    bound = robustvit.lipschitz_bound(model)
    estimate = estimate_lipschitz_lower_bound(model, pixels(2, seed=1), steps=30, restarts=4, generator=gen(0))
    assert 1e-3 * bound < estimate <= bound


@pytest.mark.parametrize("family", ["timm_token", "hf_deit"])
def test_input_normalisation_is_inside_the_bound(family):
    """The converted model takes raw pixels; its bound carries 1 / min(std) (here exactly 10x for std 0.1)."""
    unit = robustvit.convert(build_model(family), mean=(0.5,) * 3, std=(1.0,) * 3)
    tight = robustvit.convert(build_model(family), mean=(0.5,) * 3, std=(0.1, 0.5, 1.0))
    # (1e-6: the std is stored in float32, as the forward uses it)
    assert robustvit.lipschitz_bound(tight) == pytest.approx(10 * robustvit.lipschitz_bound(unit), rel=1e-6)
    report = robustvit.lipschitz_report(tight)
    row = next(e for e in report.entries if e.type == "NormalizedConv2d")
    conv = next(m for m in tight.modules() if isinstance(m, NormalizedConv2d))
    effective = conv.weight.detach().double().reshape(conv.out_channels, -1)
    exact = float(torch.linalg.matrix_norm(effective, ord=2))
    assert exact / 0.1 <= row.bound <= exact / 0.1 * (1 + 1e-4)
    x = pixels(2)
    mean = torch.tensor((0.5,) * 3).view(1, 3, 1, 1)
    std = torch.tensor((0.1, 0.5, 1.0)).view(1, 3, 1, 1)
    source = build_model(family).eval()
    with torch.no_grad():  # the embedding really normalises: same patch tokens as the source on normalised pixels
        ours = conv(x) * scale_of(conv)
        theirs = get_family(source).patch_projection(source)((x - mean) / std)
    assert torch.allclose(ours, theirs, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Export and state-dict round trip
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mixer", ["shift", "l2"])
def test_export_identical_outputs_and_bound(family, mixer):
    model = robustvit.convert(build_model(family), mixer=mixer).eval()
    plain = robustvit.export(model)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert any(parametrize.is_parametrized(m) for m in model.modules())  # the original keeps its constraint
    x = pixels(3, seed=2)
    with torch.no_grad():
        assert torch.equal(logits_of(plain(x)), logits_of(model(x)))
        assert torch.equal(logits_of(model(x)), logits_of(model(x)))  # the original still works
    assert robustvit.lipschitz_bound(plain) == pytest.approx(robustvit.lipschitz_bound(model), rel=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trip(family):
    config = ConvertConfig(mixer="l2", activation="minmax", residual_alpha=0.5)
    model = robustvit.convert(build_model(family, seed=0), config)
    with torch.no_grad():  # move away from the conversion's values so that loading really has to load
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen(9)))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = robustvit.convert(build_model(family, seed=1), ConvertConfig.from_dict(json.loads(config.to_json())))
    fresh.eval()
    x = pixels(3, seed=4)
    with torch.no_grad():
        _ = fresh(x)  # fill the eval caches before loading: they must be invalidated
    fresh.load_state_dict(saved, strict=True)
    model.eval()
    with torch.no_grad():
        assert torch.equal(logits_of(fresh(x)), logits_of(model(x)))
    assert robustvit.lipschitz_bound(fresh) == robustvit.lipschitz_bound(model)


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------


def test_config_round_trip_and_validation():
    config = ConvertConfig(
        mixer="l2", shift_div=8, activation="minmax", residual_alpha=0.25, mean=(0.1, 0.2, 0.3), std=[0.4, 0.5, 0.6]
    )
    assert config.std == (0.4, 0.5, 0.6)
    again = ConvertConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert ConvertConfig.from_dict(ConvertConfig().to_dict()) == ConvertConfig()
    bad = [
        dict(mixer="attention"),
        dict(activation="relu"),
        dict(shift_div=3),
        dict(residual_alpha=0.0),
        dict(residual_alpha=-1.0),
        dict(residual_alpha=float("nan")),
        dict(mean=(0.5,) * 3),
        dict(mean=(0.5,) * 3, std=(0.5,) * 2),
        dict(mean=(0.5,) * 3, std=(0.5, 0.0, 0.5)),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            ConvertConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown"):
        ConvertConfig.from_dict({"mixer": "shift", "colour": "blue"})


def test_overrides_and_bad_options():
    model = converted("timm_token", mixer="l2")
    assert model.robustvit_config.mixer == "l2"
    assert any(isinstance(m, L2Attention) for m in model.modules())
    assert not any(isinstance(m, TokenShift) for m in model.modules())
    minmax = converted("hf_vit", activation="minmax")
    assert any(isinstance(m, MinMax) for m in minmax.modules())
    with pytest.raises(ValueError):
        robustvit.convert(build_model("timm_token"), mixr="l2")
    with pytest.raises(ValueError):
        robustvit.convert(build_model("timm_token"), mixer="dot")
    with pytest.raises(ValueError):
        robustvit.convert(build_model("timm_token"), mean=(0.5,), std=(0.5,))  # 1 value for 3 channels


def test_convert_preserves_dtype_float64():
    """A float64 source converts to a float64 model (new CenterNorms / L2 attention must follow the dtype)."""
    for mixer in ("shift", "l2"):
        model = robustvit.convert(build_model("timm_token").double(), mixer=mixer).eval()
        dtypes = {p.dtype for p in model.parameters()}
        assert dtypes == {torch.float64}, f"{mixer}: parameters in {dtypes}"
        with torch.no_grad():
            assert model(pixels(2).double()).dtype == torch.float64


# ----------------------------------------------------------------------------------------------------------
# Unsupported models and inputs
# ----------------------------------------------------------------------------------------------------------


def _hf_swin():
    from transformers import SwinConfig, SwinForImageClassification

    return SwinForImageClassification(
        SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1], num_heads=[2], window_size=4, num_labels=3)
    )


def _hf_bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )


def _timm_swin():
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1,), num_heads=(2,), num_classes=3
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: timm.create_model("resnet18", num_classes=10),
        _timm_swin,
        _hf_swin,
        _hf_bert,
        lambda: nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten(), nn.Linear(8 * 64, 10)),
        # ViT configurations the converter does not model
        lambda: timm.create_model(
            "beit_base_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=48, global_pool="", num_classes=3
        ),
        lambda: timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, qk_norm=True, num_classes=3
        ),
        lambda: timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, dynamic_img_size=True, num_classes=3
        ),
        lambda: timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, global_pool="max", num_classes=3
        ),
    ],
    ids=[
        "resnet18",
        "timm_swin",
        "hf_swin",
        "hf_bert",
        "sequential",
        "beit_unpooled",
        "vit_qk_norm",
        "vit_dynamic",
        "vit_maxpool",
    ],
)
def test_unsupported_models_are_refused(make):
    with pytest.raises(UnsupportedModuleError):
        robustvit.convert(make())


def test_subclassed_vit_is_refused():
    from timm.models.vision_transformer import VisionTransformer

    class MyViT(VisionTransformer):
        def forward_head(self, x, pre_logits=False):
            return 10 * super().forward_head(x, pre_logits)

    with pytest.raises(UnsupportedModuleError):
        robustvit.convert(MyViT(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=3, num_classes=3))


@pytest.mark.parametrize("family", REPRESENTATIVES)
def test_wrong_input_channels_or_size_give_a_clear_error(family):
    model = converted(family)
    with pytest.raises((ValueError, AssertionError), match="(?i)channel|3"):
        model(torch.rand(1, 1, IMG, IMG))
    # SigLIP's embeddings do not check the size: the converted model fails as its source does, on the position add.
    wrong_size = (ValueError, AssertionError, RuntimeError) if family == "hf_siglip" else (ValueError, AssertionError)
    with pytest.raises(wrong_size, match="(?i)size|match|height|tokens"):
        model(torch.rand(1, 3, 2 * IMG, 2 * IMG))


def test_calibration_images_are_checked():
    with pytest.raises(ValueError):
        robustvit.convert(build_model("timm_token"), calibration_images=torch.rand(2, 1, IMG, IMG))
    with pytest.raises(ValueError):
        robustvit.convert(build_model("timm_token"), calibration_images=torch.rand(2, 3, 16, 16))


# ----------------------------------------------------------------------------------------------------------
# Exactness of the scale moves: an independent re-implementation of the converted function from the source
# ----------------------------------------------------------------------------------------------------------


def center(norm: nn.Module, x: torch.Tensor, input_std: float = 1.0) -> torch.Tensor:
    """What a converted LayerNorm computes: LayerNorm with the token std replaced by a constant (an RMSNorm: with
    the token RMS replaced by a constant, the default ``rms_norm="scale"``)."""
    if isinstance(norm, nn.Identity):
        return x
    if type(norm) in RMS_NORM_TYPES:
        return norm.weight * x / input_std
    return norm.weight * (x - x.mean(-1, keepdim=True)) / input_std + norm.bias


def scale_of(linear: nn.Module) -> float:
    """The factor a spectrally rescaled layer divides its raw weight by (raw / effective, a scalar)."""
    raw = linear.parametrizations.weight.original.detach().double()
    eff = linear.weight.detach().double()
    return float(raw.norm() / eff.norm())


class ReferenceL2(nn.Module):
    """The source attention's weights in tied L2 attention, with W_Q divided by the converted layer's scale."""

    def __init__(self, dim, heads, tokens, q, v, v_bias, o, o_bias, q_scale):
        super().__init__()
        self.attn = L2Attention(dim, heads, tokens)
        with torch.no_grad():
            self.attn.q_proj.weight.copy_(q / q_scale)
            self.attn.v_proj.weight.copy_(v)
            self.attn.v_proj.bias.copy_(v_bias if v_bias is not None else torch.zeros(dim))
            self.attn.o_proj.weight.copy_(o.weight)
            self.attn.o_proj.bias.copy_(o.bias)

    def forward(self, x):
        return self.attn(x)


def prefix_pool(x, prefix):
    """The class-token models' shift conversion: prefix tokens take the mean of the patch tokens."""
    patches = x[:, prefix:]
    return torch.cat((patches.mean(dim=1, keepdim=True).expand(-1, prefix, -1), patches), dim=1)


def _layer_scale(blk, i):
    """timm ViT's LayerScale module ``ls{i}`` or BEiT / EVA's bare ``gamma_{i}`` parameter, as a function."""
    if hasattr(blk, f"ls{i}"):
        return getattr(blk, f"ls{i}")
    gamma = getattr(blk, f"gamma_{i}")
    return (lambda h: h) if gamma is None else (lambda h: gamma * h)


def _mlp_reference(mlp, x, activation):
    """A timm MLP with its activation swapped; a gated one (SwiGLU / GluMlp) as the default ``gated_mlp="value"``
    substitute: its value branch, activation, hidden norm and fc2, without the gate."""
    if isinstance(mlp, timm.layers.SwiGLU):
        fc1 = mlp.fc1_x
    elif isinstance(mlp, timm.layers.GluMlp):
        value = mlp.fc1.weight.chunk(2)[0 if mlp.gate_last else 1], mlp.fc1.bias.chunk(2)[0 if mlp.gate_last else 1]
        fc1 = lambda h: h @ value[0].T + value[1]  # noqa: E731
    else:
        fc1 = mlp.fc1
    h = fc1(x)
    h = MinMax()(h) if activation == "minmax" else mlp.act(h)
    return mlp.fc2(center(mlp.norm, h))


def _embed(source, x):
    if hasattr(source, "_pos_embed"):
        x = source._pos_embed(x)
        return x[0] if isinstance(x, tuple) else x  # EVA's also returns the rotary embedding
    x = torch.cat((source.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # BEiT
    return x + source.pos_embed if source.pos_embed is not None else x


def _attention_pool_reference(source, x, activation):
    """A MAP head with uniform attention: ``y = proj(v(mean(tokens)))``, then ``y + mlp(norm(y))``."""
    pool = source.attn_pool
    if isinstance(source, timm.models.vision_transformer.VisionTransformer) and not source.pool_include_prefix:
        x = x[:, source.num_prefix_tokens :]
    w, b = pool.kv.weight.chunk(2)[1], pool.kv.bias.chunk(2)[1]
    y = pool.proj(x.mean(1) @ w.T + b)
    return y + _mlp_reference(pool.mlp, center(pool.norm, y), activation)


def timm_reference(source, model, x_raw, activation, mixer):
    spec = get_family(source).input_spec(source)
    x = (x_raw - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(spec.std).view(1, -1, 1, 1)
    x = source.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = center(source.patch_embed.norm, x)
    x = _embed(source, x)
    x = center(getattr(source, "norm_pre", nn.Identity()), x)
    grid, prefix, dim = tuple(source.patch_embed.grid_size), source.num_prefix_tokens, source.embed_dim
    for i, blk in enumerate(source.blocks):
        if mixer == "shift":
            x = TokenShift(grid, 12, prefix)(x)
        else:
            q, k, v = blk.attn.qkv.weight.chunk(3)
            bv = blk.attn.qkv.bias.chunk(3)[2] if blk.attn.qkv.bias is not None else None
            conv_attn = model.blocks[i].mixer.fn.attn
            ref = ReferenceL2(
                dim, blk.attn.num_heads, x.shape[1], q, v, bv, blk.attn.proj, None, scale_of(conv_attn.q_proj)
            )
            x = x + _layer_scale(blk, 1)(ref(center(blk.norm1, x)))
        x = x + _layer_scale(blk, 2)(_mlp_reference(blk.mlp, center(blk.norm2, x), activation))
    if mixer == "shift" and (source.global_pool == "token" or hasattr(source, "dist_token")):
        x = prefix_pool(x, source.num_prefix_tokens)
    x = center(source.norm, x)
    if type(source).__name__ == "VisionTransformerDistilled":
        return (source.head(x[:, 0]) + source.head_dist(x[:, 1])) / 2, x
    if source.global_pool == "map":
        pooled = _attention_pool_reference(source, x, activation)
    else:
        pooled = x[:, 0] if source.global_pool == "token" else x[:, prefix:].mean(1)
    return source.head(center(source.fc_norm, pooled)), x


def hf_reference(source, model, x_raw, activation, mixer):
    """Written from the source's modules, which the family adapter only points at (its block parts and norms)."""
    adapter = get_family(source)
    spec = adapter.input_spec(source)
    x = (x_raw - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(spec.std).view(1, -1, 1, 1)
    x = adapter.embeddings(source)(x)
    norms = {key: getattr(*owner) for key, owner in adapter._norm_owners(source).items()}
    if "pre_norm" in norms:
        x = center(norms["pre_norm"], x)
    conv = adapter.patch_projection(source)
    grid = (spec.image_size[0] // conv.stride[0], spec.image_size[1] // conv.stride[1])
    prefix = x.shape[1] - grid[0] * grid[1]
    converted_layers = adapter.layers(model)
    for i, layer in enumerate(adapter.layers(source)):
        parts = adapter._block_parts(
            layer, (getattr(source.config, "vision_config", None) or source.config).num_attention_heads
        )
        ls1 = parts.ls1 if parts.ls1 is not None else 1.0
        ls2 = parts.ls2 if parts.ls2 is not None else 1.0
        if mixer == "shift":
            x = TokenShift(grid, 12, prefix)(x)
        else:
            conv_attn = converted_layers[i].mixer.fn.attn
            dim = x.shape[-1]
            q, v = parts.q[0], parts.v
            ref = ReferenceL2(
                dim, parts.num_heads, x.shape[1], q, v[0], v[1], parts.out, None, scale_of(conv_attn.q_proj)
            )
            x = x + ls1 * ref(center(parts.norm1, x))
        h = parts.mlp.fc1(center(parts.norm2, x))
        h = MinMax()(h) if activation == "minmax" else getattr(parts.mlp, parts.mlp_activation)(h)
        x = x + ls2 * parts.mlp.fc2(h)
    pooling = adapter.pooling_of(source)
    if mixer == "shift" and pooling in ("token", "token_and_patch_mean"):
        x = prefix_pool(x, prefix)
    if "final_norm" in norms:
        x = center(norms["final_norm"], x)
    features = {
        "token": lambda: x[:, 0],
        "token_and_patch_mean": lambda: torch.cat((x[:, 0], x[:, prefix:].mean(1)), dim=1),
        "patch_mean": lambda: x[:, prefix:].mean(1),
        "mean": lambda: x.mean(1),
    }[pooling]()
    if "head_norm" in norms:  # on the pooled features (BEiT's pooler)
        features = center(norms["head_norm"], features)
    return source.classifier(features), x


@pytest.mark.parametrize(
    ("family", "mixer", "activation"),
    [(f, "shift", a) for f in FAMILIES for a in ("gelu", "minmax")]
    + [("timm_token", "l2", "gelu"), ("timm_avg_ls_reg", "l2", "gelu"), ("hf_vit", "l2", "minmax")]
    + [("hf_dinov2_reg", "l2", "gelu")],
)
def test_scale_moves_are_exact(family, mixer, activation):
    """Converted model == source with LayerNorm -> CenterNorm (same gamma/beta, no division by the token std),
    attention -> mixer, activation swapped, normalisation inside; every spectral rescaling compensated exactly.

    The reference is written from the source model's own modules; only the L2 mixer's W_Q scale (not movable,
    the map is not homogeneous in W_Q) is read off the converted model.
    """
    source = build_model(family).eval()
    model = robustvit.convert(source, mixer=mixer, activation=activation).eval()
    x = pixels(4, seed=5)
    reference = hf_reference if family in HF_ENCODER_FAMILIES else timm_reference
    if family not in HF_ENCODER_FAMILIES:  # a timm model, maybe in transformers' TimmWrapper
        source, model = getattr(source, "timm_model", source), getattr(model, "timm_model", model)
    with torch.no_grad():
        ref_logits, _ = reference(source, model, x, activation, mixer)
        logits = logits_of(model(x))
    scale = float(ref_logits.abs().max())
    err = float((logits - ref_logits).abs().max())
    assert err <= 1e-4 * scale, f"logits differ from the exact re-implementation by {err} (scale {scale})"
    # The token features must also equal the reference up to one global factor (the moved scales).
    with torch.no_grad():
        if family in HF_ENCODER_FAMILIES:
            feats = getattr(model, "vision_model", model.base_model)(x).last_hidden_state
        else:
            feats = model.forward_features(x)
        _, ref_feats = reference(source, model, x, activation, mixer)
    factor = float((feats * ref_feats).sum() / (ref_feats * ref_feats).sum())
    residual = float((feats - factor * ref_feats).norm() / feats.norm())
    assert residual <= 1e-4, f"features are not a scaled copy of the reference (relative residual {residual})"


# ----------------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------------

# (source LayerNorm path, converted CenterNorm path) for the norms the shift mixer keeps
_NORM_PAIRS = {
    "timm_token": [
        ("blocks.0.norm2", "blocks.0.mlp.fn.norm"),
        ("blocks.1.norm2", "blocks.1.mlp.fn.norm"),
        ("norm", "norm"),
    ],
    "timm_avg_ls_reg": [
        ("blocks.0.norm2", "blocks.0.mlp.fn.norm"),
        ("blocks.1.norm2", "blocks.1.mlp.fn.norm"),
        ("fc_norm", "fc_norm"),
    ],
    "hf_vit": [("vit.layers.0.layernorm_after", "vit.layers.0.mlp.fn.norm"), ("vit.layernorm", "vit.layernorm")],
}


@pytest.mark.parametrize("family", sorted(_NORM_PAIRS))
def test_calibration_gammas_absorb_layernorm_input_std(family):
    calib = pixels(8, seed=6)
    source = build_model(family).eval()
    spec = get_family(source).input_spec(source)
    measured: dict[str, float] = {}

    def hook(name):
        def record(module, args):
            measured[name] = float(args[0].std(dim=-1, unbiased=False).mean())

        return record

    handles = [source.get_submodule(src).register_forward_pre_hook(hook(src)) for src, _ in _NORM_PAIRS[family]]
    with torch.no_grad():
        source((calib - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(spec.std).view(1, -1, 1, 1))
    for h in handles:
        h.remove()
    plain = robustvit.convert(source)
    calibrated = robustvit.convert(source, calibration_images=calib)
    for src, dst in _NORM_PAIRS[family]:
        ratio = calibrated.get_submodule(dst).weight / plain.get_submodule(dst).weight
        assert torch.allclose(ratio, torch.full_like(ratio, 1 / measured[src]), rtol=1e-5), (src, measured[src])
        # biases are not touched by the std (only by the moved scales, the same in both)
        assert torch.allclose(calibrated.get_submodule(dst).bias, plain.get_submodule(dst).bias)


def logit_agreement(source, model, images) -> tuple[float, float]:
    spec = get_family(source).input_spec(source)
    normalised = (images - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(spec.std).view(1, -1, 1, 1)
    with torch.no_grad():
        ref = logits_of(source.eval()(normalised))
        out = logits_of(model.eval()(images))
    rel = float((out - ref).norm() / ref.norm())
    top1 = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    return rel, top1


def test_logit_agreement_with_and_without_calibration(record_property):
    """Relative logit error ||f_conv(x) - f_src(norm(x))|| / ||f_src(norm(x))|| and top-1 agreement, default shift
    mixer, random-init sources (numbers for the docs; printed with ``-s``). Only a robust fact is asserted:
    calibration lowers the error on a model whose logits depend on the image."""
    calib, test = pixels(16, seed=7), pixels(64, seed=8)
    results = {}
    for family in ("timm_avg_ls_reg", "timm_token", "hf_vit"):
        source = build_model(family).eval()
        plain = logit_agreement(source, robustvit.convert(source), test)
        calibrated = logit_agreement(source, robustvit.convert(source, calibration_images=calib), test)
        results[family] = {"no_calibration": plain, "calibration": calibrated}
        print(
            f"{family}: rel logit error / top-1 agreement: without calibration {plain[0]:.3f} / {plain[1]:.2f}, "
            f"with {calibrated[0]:.3f} / {calibrated[1]:.2f}"
        )
    record_property("logit_agreement", json.dumps(results))
    without, with_ = results["timm_avg_ls_reg"]["no_calibration"][0], results["timm_avg_ls_reg"]["calibration"][0]
    assert with_ < without


def test_patch_dropout_becomes_identity_and_drop_path_counts_one():
    """Patch dropout drops tokens in training (the shift grid needs them all): converted to the identity. Drop-path
    stays and counts 1, however high its rate."""
    source = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=48,
        num_heads=3,
        num_classes=5,
        patch_drop_rate=0.5,
        drop_path_rate=0.9,
    )
    model = robustvit.convert(source)
    assert isinstance(model.patch_drop, torch.nn.Identity)
    model.train()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    plain = robustvit.convert(
        timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=5
        )
    )
    plain.load_state_dict(model.state_dict())
    assert robustvit.lipschitz_bound(model) == pytest.approx(robustvit.lipschitz_bound(plain), rel=1e-12)


# ----------------------------------------------------------------------------------------------------------
# mlp="sll" / "cpl": the residual MLP becomes one residual layer with bound 1
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mlp", ["sll", "cpl"])
@pytest.mark.parametrize("name", ["timm_avg_ls_reg", "hf_deit"])
def test_mlp_option_builds_residual_layers_of_the_source_width(name, mlp, images):
    from robustvit.layers import CPL, SLL, LipBlock

    source = build_model(name).eval()
    model = robustvit.convert(source, mlp=mlp, calibration_images=images).eval()
    blocks = [m for m in model.modules() if isinstance(m, LipBlock)]
    layer_type = {"sll": SLL, "cpl": CPL}[mlp]
    assert blocks and all(type(b.mlp) is layer_type for b in blocks)
    width = {m.out_features for n, m in source.named_modules() if n.endswith("fc1")}
    assert {b.mlp.weight.shape[0] for b in blocks} == width
    report = robustvit.lipschitz_report(model)
    rows = [e for e in report.entries if e.type == layer_type.__name__]
    assert len(rows) == len(blocks) and all(1.0 <= e.bound <= 1 + 1e-9 for e in rows)
    assert logits_of(model(images)).shape == (len(images), NUM_CLASSES)
    # the bound of the whole model is the product of its rows: smaller than the kept MLP's 1 + alpha * L(mlp)
    kept = robustvit.lipschitz_bound(robustvit.convert(source, calibration_images=images))
    assert report.total < kept


def test_mlp_layers_start_from_fc1_with_the_norm_affine_folded():
    source = build_model("timm_token").eval()
    model = robustvit.convert(source, mlp="sll")
    scales = []
    for block, lip_block in zip(source.blocks, model.blocks, strict=False):
        fc1, norm, layer = block.mlp.fc1, block.norm2, lip_block.mlp
        torch.testing.assert_close(layer.weight, fc1.weight * norm.weight)
        # the bias is fc1's pre-activation at the norm's shift, divided by the scale the patch embedding's
        # rescaling removed from the residual stream (the layer is positively homogeneous)
        expected = fc1.bias + fc1.weight @ norm.bias
        scales.append(expected / layer.bias)
    ratio = torch.cat(scales)
    assert bool((ratio > 0).all()) and torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)


@pytest.mark.parametrize("mlp", ["sll", "cpl"])
def test_mlp_option_round_trips_through_save_and_load(mlp, tmp_path, images):
    model = robustvit.convert(build_model("timm_token"), mlp=mlp).eval()
    robustvit.save_pretrained(model, tmp_path)
    with pytest.warns(UserWarning, match="verify=False"):
        loaded = robustvit.from_pretrained(tmp_path, verify=False).eval()
    assert loaded.robustvit_config.mlp == mlp
    torch.testing.assert_close(logits_of(loaded(images)), logits_of(model(images)))


def test_mlp_option_validation():
    with pytest.raises(ValueError, match="mlp"):
        robustvit.ConvertConfig(mlp="glu")
    assert robustvit.ConvertConfig.from_dict({"mixer": "shift"}).mlp == "keep"  # old configs load unchanged


# Budget-aware conversion: singular_value_power and residual_budget
# ----------------------------------------------------------------------------------------------------------


def _rescaled(model: nn.Module) -> dict[str, nn.Module]:
    from robustvit.lipschitz import is_spectrally_rescaled

    return {name: m for name, m in model.named_modules() if is_spectrally_rescaled(m)}


@pytest.mark.parametrize("family", REPRESENTATIVES)
def test_singular_value_power_reshapes_spectra_and_keeps_singular_vectors(family):
    exact = converted(family)
    for power in (0.0, 0.5):
        model = converted(family, singular_value_power=power)
        layers, reference = _rescaled(model), _rescaled(exact)
        assert layers.keys() == reference.keys() and layers
        for name, layer in layers.items():
            source = reference[name].weight.detach().double().flatten(1)
            new = layer.weight.detach().double().flatten(1)
            u, sigma, vh = torch.linalg.svd(source, full_matrices=False)
            expected = (u * (sigma / sigma.max()) ** power) @ vh
            # Same singular vectors, reshaped values; the rescaling divides by a guaranteed bound >= the top one.
            scale = float(torch.linalg.matrix_norm(new, ord=2))
            assert 0.9 < scale <= 1 + 1e-6, name
            torch.testing.assert_close(new / scale, expected, atol=1e-4, rtol=0)
    for layer in _rescaled(converted(family, singular_value_power=0.0)).values():  # power 0: orthogonal layers
        singular_values = torch.linalg.svdvals(layer.weight.detach().double().flatten(1))
        assert float(singular_values.min() / singular_values.max()) > 0.999


@pytest.mark.parametrize("family", ["timm_token", "timm_avg_ls_reg", "hf_vit"])
def test_residual_budget_caps_the_stack_with_one_common_factor(family):
    from robustvit.layers import LipResidual

    free = converted(family)
    budget = 1.05
    model = converted(family, residual_budget=budget)
    residuals = [m for m in model.modules() if isinstance(m, LipResidual)]
    stack = float(torch.stack([r.lipschitz_bound().detach() for r in residuals]).prod())
    assert budget * (1 - 1e-4) <= stack <= budget
    originals = [m for m in free.modules() if isinstance(m, LipResidual)]
    ratios = torch.cat([new.alpha.detach() / old.alpha.detach() for new, old in zip(residuals, originals, strict=True)])
    assert float(ratios.max() - ratios.min()) < 1e-6 and 0 < float(ratios[0]) < 1
    # A budget the stack already meets changes nothing.
    loose = converted(family, residual_budget=1e6)
    torch.testing.assert_close(loose(pixels(2)), free(pixels(2)))
    # The bound stays a bound: attacked like the exact conversion's.
    bound = robustvit.lipschitz_bound(model)
    assert bound < robustvit.lipschitz_bound(free)
    estimate = estimate_lipschitz_lower_bound(model, pixels(2, seed=1), steps=30, restarts=2, generator=gen(0))
    assert estimate <= bound


def test_budget_options_validate_and_round_trip():
    config = ConvertConfig(singular_value_power=0.0, residual_budget=3.0)
    assert ConvertConfig.from_dict(json.loads(config.to_json())) == config
    assert ConvertConfig().singular_value_power == 1.0 and ConvertConfig().residual_budget is None  # exact default
    for kwargs in (dict(singular_value_power=-0.1), dict(singular_value_power=1.5), dict(residual_budget=1.0)):
        with pytest.raises(ValueError):
            ConvertConfig(**kwargs)
