"""What the transformers family adapters add beyond the suites parametrized over every tiny model: the activation
bounds they register (against a dense grid of the true slope), the DINOv2 head's pooling bound (attacked), the
refusals, the "CLIPVisionModel with a linear head" form, and BEiT's class-token configuration."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import IMG
from torch import nn

import robustvit
from robustvit.errors import UnsupportedModuleError
from robustvit.families import get_family
from robustvit.lipschitz import GELU_LIPSCHITZ, QUICK_GELU_LIPSCHITZ, lipschitz_bound
from robustvit.lipschitz.estimate import estimate_lipschitz_lower_bound
from robustvit.persistence.hub import UncertifiedModelWarning


def _max_slope(activation: nn.Module) -> float:
    """The largest |derivative| on a dense float64 grid over [-20, 20] (beyond it every slope here is within 1e-6
    of 0 or 1)."""
    x = torch.linspace(-20, 20, 4_000_001, dtype=torch.float64, requires_grad=True)
    activation(x).sum().backward()
    return float(x.grad.abs().max())


def test_quick_gelu_bound_covers_its_slope():
    from timm.layers import QuickGELU
    from transformers.activations import QuickGELUActivation

    for activation in (QuickGELUActivation(), QuickGELU()):
        slope = _max_slope(activation)
        assert 1.09983 < slope <= QUICK_GELU_LIPSCHITZ  # the closed form's 1.0998393, and the bound above it
        assert lipschitz_bound(activation) == QUICK_GELU_LIPSCHITZ


def test_gelu_tanh_bound_covers_its_slope():
    from transformers.activations import GELUTanh

    for activation in (GELUTanh(), GELUTanh(use_gelu_tanh_python=True)):
        slope = _max_slope(activation)
        assert 1.12899 < slope <= GELU_LIPSCHITZ
        assert lipschitz_bound(activation) == GELU_LIPSCHITZ


def test_timm_quick_gelu_vits_convert_and_their_bound_holds():
    """timm's CLIP ViTs built with QuickGELU (``act_layer="quick_gelu"``) go through the bound engine."""
    torch.manual_seed(0)
    source = timm.create_model(
        "vit_base_patch16_clip_quickgelu_224", pretrained=False, img_size=IMG, patch_size=8, depth=2,
        embed_dim=48, num_heads=3, num_classes=10,
    )  # fmt: skip
    model = robustvit.convert(source.eval()).eval()
    x = torch.rand(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    assert 0 < estimate_lipschitz_lower_bound(model, x, steps=30, restarts=2) <= lipschitz_bound(model)


def test_dinov2_head_pooling_is_one_lipschitz_under_attack():
    """The DINOv2 classifier's features ``[h_0, mean of the patch tokens]`` are a 1-Lipschitz map of the token
    tensor (orthogonal rows of norms 1 and 1/sqrt(n)); gradient ascent on the ratio stays below 1 and reaches it
    (a perturbation of token 0 alone)."""
    patches, dim = 16, 8

    def features(tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat((tokens[:, 0], tokens[:, 1 + 2 :].mean(1)), dim=1)  # class, 2 registers, patches

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(8, 3 + patches, dim, generator=generator, requires_grad=True)
    b = torch.randn(8, 3 + patches, dim, generator=generator, requires_grad=True)
    optimizer = torch.optim.Adam([a, b], lr=0.05)
    for _ in range(300):
        ratio = (features(a) - features(b)).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
        optimizer.zero_grad()
        (-ratio.sum()).backward()
        optimizer.step()
    assert float(ratio.max()) <= 1 + 1e-6
    assert float(ratio.max()) > 0.99


def test_dinov2_swiglu_is_refused_naming_the_part():
    from transformers import Dinov2Config, Dinov2ForImageClassification

    config = Dinov2Config(
        image_size=IMG, patch_size=8, hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
        use_swiglu_ffn=True, num_labels=10,
    )  # fmt: skip
    with pytest.raises(UnsupportedModuleError, match="SwiGLU.*use_swiglu_ffn=True"):
        robustvit.convert(Dinov2ForImageClassification(config))


def test_clip_vision_model_with_a_linear_head():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from robustvit.families.hf_clip import clip_classifier

    torch.manual_seed(0)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            image_size=IMG, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=3,
        )
    ).eval()  # fmt: skip
    model = clip_classifier(vision, num_labels=10).eval()
    x = torch.rand(2, 3, IMG, IMG)
    normalized = (x - torch.tensor([0.4815, 0.4578, 0.4082]).view(1, 3, 1, 1)) / 0.27
    with torch.no_grad():  # the same encoder: the head reads the mean of its patch tokens
        hidden = vision(normalized).last_hidden_state[:, 1:].mean(1)
        torch.testing.assert_close(model(normalized).logits, model.classifier(hidden))
    lip = robustvit.convert(model).eval()
    assert 0 < estimate_lipschitz_lower_bound(lip, x, steps=20, restarts=1) <= lipschitz_bound(lip)
    with pytest.raises(TypeError, match="CLIPVisionModel"):
        clip_classifier(model, num_labels=10)
    with pytest.raises(UnsupportedModuleError, match=r"CLIPVisionModel has no classifier: .*clip_classifier"):
        robustvit.convert(vision)  # the bare encoder is refused, with the way to convert it


def test_siglip_with_its_attention_pooling_head_converts_and_the_head_stays_unread():
    """SigLIP's vision model builds a MAP head (vision_use_head=True) whose output the classifier discards: the
    converted logits never read it, and the bound holds without it."""
    from transformers import SiglipConfig, SiglipForImageClassification, SiglipVisionConfig

    torch.manual_seed(0)
    vision = SiglipVisionConfig(
        image_size=IMG, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=3, vision_use_head=True,
    )  # fmt: skip
    source = SiglipForImageClassification(SiglipConfig(vision_config=vision.to_dict(), num_labels=10)).eval()
    model = robustvit.convert(source).eval()
    assert get_family(model).unread == ("vision_model.head",)
    x = torch.rand(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x).logits
        model.vision_model.head.probe.mul_(-3)  # the unread head changes: the logits do not
        torch.testing.assert_close(model(x).logits, logits, rtol=0, atol=0)
    assert 0 < estimate_lipschitz_lower_bound(model, x, steps=20, restarts=1) <= lipschitz_bound(model)


def _beit(**config):
    from transformers import BeitConfig, BeitForImageClassification

    defaults = dict(
        image_size=IMG, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=96, num_labels=10,
    )  # fmt: skip
    return BeitForImageClassification(BeitConfig(**{**defaults, **config}))


def test_beit_class_token_variant_with_a_shared_bias_converts_and_round_trips(tmp_path):
    """BEiT's other configuration (use_mean_pooling=False: the class token after beit.layernorm), with a shared
    relative position bias that is not zero, absolute position embeddings, a mask token, no LayerScale and drop path:
    the bias leaves with the attention, the bound holds under attack, and save_pretrained / from_pretrained give the
    same function."""
    from robustvit.layers import PrefixPool

    torch.manual_seed(0)
    source = _beit(
        use_mean_pooling=False, use_shared_relative_position_bias=True, use_absolute_position_embeddings=True,
        use_mask_token=True, layer_scale_init_value=0.0, drop_path_rate=0.2,
    ).eval()  # fmt: skip
    with torch.no_grad():
        source.beit.shared_position_bias.relative_position_bias_table.normal_()
    model = robustvit.convert(source).eval()
    assert model.beit.shared_position_bias is None and isinstance(model.beit.layers[-1].pool, PrefixPool)
    x = torch.rand(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    assert 0 < estimate_lipschitz_lower_bound(model, x, steps=20, restarts=1) <= lipschitz_bound(model)
    model.save_pretrained(tmp_path)
    with pytest.warns(UncertifiedModelWarning):
        loaded = robustvit.from_pretrained(tmp_path, verify=False)
    assert loaded.beit.shared_position_bias is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)


def test_beit_refusals_name_the_part():
    from transformers.models.beit.modeling_beit import BeitRelativePositionBias

    with pytest.raises(UnsupportedModuleError, match="hidden_act='relu'"):
        robustvit.convert(_beit(hidden_act="relu"))
    model = robustvit.convert(_beit(use_shared_relative_position_bias=True))
    model.beit.shared_position_bias = BeitRelativePositionBias(model.config)  # put back on the converted model
    with pytest.raises(UnsupportedModuleError, match="shared relative position bias"):
        lipschitz_bound(model)
