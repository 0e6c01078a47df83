"""Family contracts: checks adapted from timm's tests/test_models.py and transformers' ModelTesterMixin, run on
every registered family's source and converted copy. What cannot hold is listed in docs/ecosystem.md with the reason."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import (
    ALL_FAMILIES,
    HF_ENCODER_FAMILIES,
    IMG,
    NUM_CLASSES,
    TIMM_FAMILIES,
    build_model,
    logits_of,
)
from timm.layers import create_feature_extractor, get_graph_node_names

import robustvit
from robustvit.families import get_family


def _pair(family: str) -> list[tuple[str, torch.nn.Module]]:
    return [("source", build_model(family)), ("converted", robustvit.convert(build_model(family)))]


def _pixels(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_forward_backward_and_eval_determinism(family):
    """timm test_model_forward / test_model_backward; ModelTesterMixin test_determinism."""
    for kind, model in _pair(family):
        model.train()
        out = logits_of(model(_pixels()))
        assert out.shape == (2, NUM_CLASSES), kind
        out.sum().backward()
        # Mask tokens serve masked pretraining only (bool_masked_pos, which no classifier passes): DINOv2 with
        # registers always carries one. A family's unread modules (CLIP's post_layernorm) never reach the logits.
        unread = (*getattr(get_family(model), "unread", ()), "mask_token")
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not any(u in n for u in unread)]
        no_grad = [n for n, p in trainable if p.grad is None]
        assert not no_grad, f"{kind}: trainable parameters without a gradient: {no_grad}"
        model.eval()
        with torch.no_grad():
            assert torch.equal(logits_of(model(_pixels())), logits_of(model(_pixels()))), kind


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_prefix_tokens_that_cannot_reach_the_head_are_frozen(family):
    source = build_model(family)
    parts = get_family(source).parts(source)
    names = {id(parameter): name for name, parameter in source.named_parameters()}
    tokens = [names[id(token)] for token in parts.prefix_tokens]
    model = robustvit.convert(source)
    parameters = dict(model.named_parameters())
    # A pooling that reads the prefix tokens (EVA's attention pool reads every token) lets them reach the head.
    assert all(parameters[name].requires_grad == parts.pool_reads_prefix for name in tokens)
    if not tokens:  # no prefix tokens (SigLIP, a timm MAP model without a class token): nothing to freeze
        assert all(p.requires_grad for p in model.parameters())
    with_l2 = robustvit.convert(build_model(family), mixer="l2")  # attention mixes them: they stay trainable
    assert all(p.requires_grad for p in with_l2.parameters())


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_timm_forward_intermediates_and_grad_checkpointing(family):
    """timm test_model_forward_intermediates: one intermediate per block, and the final features match."""
    for kind, model in _pair(family):
        model.eval()
        x = _pixels()
        with torch.no_grad():
            final, intermediates = model.forward_intermediates(x)
            assert len(intermediates) == len(model.blocks) == len(build_model(family).blocks), kind
            assert torch.allclose(final, model.forward_features(x), atol=1e-6), kind
            indices = model.prune_intermediate_layers(indices=1, prune_head=False)
            assert indices == [len(model.blocks) - 1], kind
        model.set_grad_checkpointing(True)
        model.train()
        model(x).sum().backward()


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_timm_pretrained_cfg_describes_the_converted_model(family):
    """timm test_model_default_cfgs: the cfg's input size is the model's, and it names existing modules. timm also
    asks for ``<classifier>.weight`` in the state dict; a parametrized weight is stored as
    ``<classifier>.parametrizations.weight.original``, and the cfg's notes say so (docs/ecosystem.md)."""
    model = robustvit.convert(build_model(family))
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, IMG, IMG) and cfg["mean"] == (0.0,) * 3 and cfg["std"] == (1.0,) * 3
    state = model.state_dict()
    classifiers = cfg["classifier"] if isinstance(cfg["classifier"], (tuple, list)) else (cfg["classifier"],)
    for name in (cfg["first_conv"], *classifiers):  # a head the bound never reads (DeiT's head_dist) stays plain
        assert (f"{name}.weight" in state) != (f"{name}.parametrizations.weight.original" in state), name
    assert any("parametrizations.weight.original" in note for note in cfg["notes"])
    timm.models.PretrainedCfg(**cfg)  # timm reads a saved cfg back through its dataclass: no field of our own


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_timm_fx_feature_extraction_forward_and_backward(family):
    """timm test_model_forward_fx / test_model_backward_fx, through timm's own tracer settings (leaf modules,
    autowrapped functions): the eval graph computes the model, and still refuses normalized pixels; in the train graph
    every parameter gets a gradient except the prefix tokens the cfg's notes name as frozen (they cannot change any
    output under the token shift). Only the converted model: timm's own attention does not trace on every torch the
    declared range allows (torch 2.7 hands a traced ``is_causal`` to scaled_dot_product_attention)."""
    model = robustvit.convert(build_model(family))
    train_nodes, eval_nodes = get_graph_node_names(model)
    model.eval()
    graph = create_feature_extractor(model, [eval_nodes[-1]]).eval()
    with torch.no_grad():
        (out,) = graph(_pixels()).values()
        torch.testing.assert_close(out, model(_pixels()))
    with pytest.raises(ValueError, match=r"pixels must lie in \[0, 1\]"):
        graph(_pixels() * 2 - 1)
    model.train()
    graph = create_feature_extractor(model, [train_nodes[-1]]).train()
    (out,) = graph(_pixels()).values()
    out.mean().backward()
    no_grad = {name for name, p in model.named_parameters() if p.grad is None}
    notes = " ".join(model.pretrained_cfg.get("notes") or ())
    assert all(name in notes and "frozen" in notes for name in no_grad), no_grad


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_timm_grad_checkpointing_gives_the_same_gradients(family):
    """ModelTesterMixin test_training_gradient_checkpointing, on timm's set_grad_checkpointing."""
    model = robustvit.convert(build_model(family)).train()
    gradients = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        model(_pixels()).sum().backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, msg=name)


def test_timm_feature_extractor_num_classes_0_converts():
    """timm test_model_default_cfgs_non_std / reset_classifier(0): a headless model converts and is bounded."""
    model = robustvit.convert(build_model("timm_token", num_classes=0)).eval()
    with torch.no_grad():
        features = model(_pixels())
    assert features.shape == (2, model.embed_dim)
    bound = robustvit.lipschitz_bound(model)
    from robustvit.lipschitz.estimate import estimate_lipschitz_lower_bound

    assert 0 < estimate_lipschitz_lower_bound(model, _pixels(), steps=10, restarts=1) <= bound


@pytest.mark.parametrize("family", HF_ENCODER_FAMILIES)
def test_transformers_config_agrees_with_the_model(family):
    """ModelTesterMixin test_config / test_hidden_states_output (layer count)."""

    def vision(config):  # composite configs (CLIP, SigLIP) nest the vision encoder's
        return getattr(config, "vision_config", None) or config

    for activation in ("gelu", "minmax"):  # "gelu": the source's activation is kept
        source = build_model(family)
        model = robustvit.convert(source, activation=activation)
        assert vision(model.config).num_hidden_layers == len(get_family(model).layers(model))
        assert vision(model.config).hidden_act == (
            vision(source.config).hidden_act if activation == "gelu" else activation
        )
        assert model.config.robustvit["convert_config"]["activation"] == activation


@pytest.mark.parametrize("family", HF_ENCODER_FAMILIES)
def test_transformers_gradient_checkpointing(family):
    """ModelTesterMixin test_training_gradient_checkpointing: same gradients with and without checkpointing."""
    model = robustvit.convert(build_model(family)).train()
    x = _pixels()
    model(pixel_values=x).logits.sum().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    model(pixel_values=x).logits.sum().backward()
    for name, grad in reference.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-6)
    assert robustvit.lipschitz_bound(model) > 0  # the checkpointing machinery is not a hook the engine refuses


def test_greyscale_sources_convert_without_mean_and_std_by_hand():
    grey = build_model("timm_token", channels=1)  # vit_tiny: mean = std = 0.5 on every RGB channel
    model = robustvit.convert(grey).eval()
    assert model.pretrained_cfg["input_size"] == (1, IMG, IMG) and model.pretrained_cfg["mean"] == (0.0,)
    with torch.no_grad():
        assert model(torch.rand(2, 1, IMG, IMG)).shape == (2, NUM_CLASSES)
    hf = robustvit.convert(build_model("hf_vit", channels=1))
    assert robustvit.lipschitz_bound(hf) > 0
    # Different RGB statistics (DeiT: ImageNet's) become their luma, as PIL's "L" mode makes greyscale data; the
    # pixel wrapper of the recipes and the conversion agree on it, and an explicit mean / std still wins.
    from robustvit.families import get_family
    from robustvit.training import PixelModel

    deit = build_model("timm_distilled", channels=1).eval()
    spec = get_family(deit).input_spec(deit)
    luma = (0.299, 0.587, 0.114)
    assert spec.mean == pytest.approx((sum(w * m for w, m in zip(luma, (0.485, 0.456, 0.406), strict=True)),))
    assert spec.std == pytest.approx((sum(w * s for w, s in zip(luma, (0.229, 0.224, 0.225), strict=True)),))
    pixels = torch.rand(2, 1, IMG, IMG)
    with torch.no_grad():
        expected = logits_of(deit((pixels - spec.mean[0]) / spec.std[0]))
        torch.testing.assert_close(PixelModel(deit)(pixels), expected)
    assert robustvit.convert(deit).pretrained_cfg["input_size"] == (1, IMG, IMG)
    robustvit.convert(deit, mean=(0.45,), std=(0.225,))


def test_shift_layers_trace_with_fx_and_keep_their_shape_checks():
    from robustvit.layers import PrefixPool, TokenShift

    x = torch.randn(2, 17, 48)
    for layer in (TokenShift((4, 4), 12, 1), PrefixPool(1, 16)):
        traced = torch.fx.symbolic_trace(layer)
        assert torch.equal(traced(x), layer(x))
        with pytest.raises(RuntimeError):  # the traced graph still refuses a wrong token count
            traced(torch.randn(2, 18, 48))


def test_torch_export_of_the_exported_model():
    """timm test_model_forward_torchscript / export, on the deployment form: robustvit.export folds the
    parametrizations (the parametrized model's eval-mode rescaling cache is not traceable; see docs/ecosystem.md)."""
    model = robustvit.export(robustvit.convert(build_model("timm_token")).eval())
    program = torch.export.export(model, (_pixels(),))
    torch.testing.assert_close(program.module()(_pixels()), model(_pixels()))


def test_every_registered_family_is_covered_by_these_checks():
    from robustvit.families import get_family, registered_families

    covered = {get_family(build_model(family)).name for family in ALL_FAMILIES}
    assert covered == set(registered_families())


@pytest.mark.parametrize("family", HF_ENCODER_FAMILIES)
def test_transformers_output_hidden_states(family):
    """ModelTesterMixin test_hidden_states_output: the embeddings, then one hidden state per layer."""
    for kind, model in _pair(family):
        model.eval()
        layers = get_family(model).layers(model)
        first_call = []
        handle = layers[0].register_forward_pre_hook(
            lambda module, args, kwargs, seen=first_call: seen.append((args, kwargs)), with_kwargs=True
        )
        with torch.no_grad():
            out = model(pixel_values=_pixels(), output_hidden_states=True)
            handle.remove()
            (first_input, *other_args), kwargs = first_call[0]
            states = [first_input]  # the embeddings (CLIP's: after its pre-LayerNorm)
            for layer in layers:  # with what the model passes every layer (BEiT's: the resolution of its bias)
                states.append(layer(states[-1], *other_args, **kwargs))
            selected = model(pixel_values=_pixels(), output_hidden_states=[-1]).hidden_states
        assert len(out.hidden_states) == len(layers) + 1, kind
        for recorded, expected in zip(out.hidden_states, states, strict=True):
            torch.testing.assert_close(recorded, expected, rtol=0, atol=0)
        assert selected[:-1] == (None,) * len(layers) and selected[-1] is not None, kind
        if kind == "converted":  # the recording hooks leave the function, and the bound, as they were
            assert robustvit.lipschitz_bound(model) > 0
            # no attention map (docs/ecosystem.md)
            assert model(pixel_values=_pixels(), output_attentions=True).attentions == ()


@pytest.mark.parametrize("family", ["timm_avg_ls_reg", "timm_distilled", "hf_deit"])  # each family's widest form
def test_torch_export_of_the_converted_model(family):
    """timm / transformers export tests, on the parametrized model itself (transformers builds an attention mask
    that hides nothing when traced: the blocks accept it and the program asserts it at run time)."""
    model = robustvit.convert(build_model(family)).eval()
    program = torch.export.export(model, (_pixels(),))
    with torch.no_grad():
        torch.testing.assert_close(logits_of(program.module()(_pixels())), logits_of(model(_pixels())))


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_timm_fx_symbolic_trace_of_the_converted_model(family):
    """timm test_model_forward_fx: the whole model traces with the concrete arguments its source needs too."""
    concrete = {"attn_mask": None, "is_causal": False}
    for kind, model in _pair(family):
        model.eval()
        traced = torch.fx.symbolic_trace(model, concrete_args=concrete)
        with torch.no_grad():
            torch.testing.assert_close(traced(_pixels()), model(_pixels()), msg=kind)
    # The rescaled layers stay modules of the graph: it computes with the current weights, rescaling included.
    linear = traced.get_submodule("head")
    with torch.no_grad():
        linear.parametrizations.weight.original.mul_(3)
        torch.testing.assert_close(traced(_pixels()), model(_pixels()))


def test_attention_masks_that_hide_something_and_causal_attention_are_refused():
    model = robustvit.convert(build_model("timm_token")).eval()
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    visible = torch.ones(2, 1, tokens, tokens, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(_pixels(), attn_mask=visible), model.forward_features(_pixels())
        )
        additive = torch.zeros(2, 1, tokens, tokens)
        torch.testing.assert_close(
            model.forward_features(_pixels(), attn_mask=additive), model.forward_features(_pixels())
        )
        hiding = visible.clone()
        hiding[..., -1] = False
        for kwargs in (dict(attn_mask=hiding), dict(attn_mask=additive - 1e9 * ~hiding), dict(is_causal=True)):
            with pytest.raises(ValueError, match="do not support"):
                model.forward_features(_pixels(), **kwargs)


def test_every_family_registers_tiny_models_of_its_own_family():
    """What the parametrized tests rely on: a family without a tiny model would go untested."""
    from robustvit.families import TINY_MODELS, create_tiny_model, get_family, register_tiny_model, tiny_models

    assert all(tiny_models(family) for family in robustvit.families.registered_families())
    for name in ALL_FAMILIES:
        model = create_tiny_model(name, image_size=16, num_classes=3, channels=1)
        assert get_family(model).name == TINY_MODELS[name].family
        assert logits_of(model(torch.rand(1, 1, 16, 16))).shape == (1, 3)
    with pytest.raises(KeyError, match="unknown family 'no-such-family'"):
        register_tiny_model("nothing", "no-such-family", lambda *_: None, "")
    with pytest.raises(ValueError, match="already registered"):
        register_tiny_model("timm_token", "timm-vit", lambda *_: None, "")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_names_the_library_its_models_come_from(family):
    """``Family.library`` picks the metadata, native save/load and source folders a family's models get."""
    model = build_model(family)
    assert get_family(model).library == type(model).__module__.split(".")[0]
