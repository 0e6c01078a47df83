"""The ecosystem contracts (forward and reverse AD through ``torch.func``, ``vmap``, ``torch.export``, and
``torch.fx`` where the family traces with it) for every conversion choice: each registered mixer with each
registered MLP form, and each registered activation substitute of the kept MLP, on one tiny model; every family's
tiny model with each mixer (the layers are the same modules in every family; what a family changes is the structure
around them: its tokens, norms and heads).

The parameters are read off the registries (``robustvit.convert.MIXERS`` / ``MLPS`` / ``ACTIVATIONS``) and the
family registry (``REPRESENTATIVES``): a new entry is checked here without editing this file."""

from __future__ import annotations

import pytest
import torch
from conftest import IMG, REPRESENTATIVES, TIMM_FAMILIES, build_model, logits_of, where_the_source_traces
from robustvit.convert import ACTIVATIONS, MIXERS, MLPS

import robustvit
from robustvit.configs import ConvertConfig

_DEFAULT_ACTIVATION = ConvertConfig().activation
# Every mixer with every MLP form (the activation only applies to the kept MLP), then every other activation.
OPTIONS = [dict(mixer=mixer, mlp=mlp) for mixer in MIXERS.list() for mlp in MLPS.list()] + [
    dict(mlp="keep", activation=activation) for activation in ACTIVATIONS.list() if activation != _DEFAULT_ACTIVATION
]
_EVERY_FAMILY = [dict(mixer=mixer, mlp="keep") for mixer in MIXERS.list()]
CASES = [
    pytest.param(family, options, id=f"{family}-" + "-".join(f"{k}={v}" for k, v in options.items()))
    for family, options in [(family, options) for family in REPRESENTATIVES for options in _EVERY_FAMILY]
    + [(REPRESENTATIVES[0], options) for options in OPTIONS if options not in _EVERY_FAMILY]
]


def _pixels(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


def _converted(family: str, options: dict) -> torch.nn.Module:
    return robustvit.convert(build_model(family), **options).eval()


def test_the_cases_cover_every_registered_choice():
    assert {o.get("mixer") for o in OPTIONS} - {None} == set(MIXERS.list())
    assert {o["mlp"] for o in OPTIONS} == set(MLPS.list())
    assert {o.get("activation", _DEFAULT_ACTIVATION) for o in OPTIONS} == set(ACTIVATIONS.list())


@pytest.mark.parametrize(("family", "options"), CASES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torch_func_forward_and_reverse_ad_and_vmap(family, options, mode):
    """``jvp`` and ``jacrev`` agree with plain autograd's Jacobian, and ``vmap`` with the batched forward, in both
    modes (training-time steps such as CPL's and SLL's normalization run inside the forward)."""
    model = _converted(family, options).train(mode == "train")
    pixels = _pixels()
    x = pixels[:1]

    def f(inputs: torch.Tensor) -> torch.Tensor:
        return logits_of(model(inputs))

    reference = torch.autograd.functional.jacobian(f, x)  # (1, classes, 1, 3, IMG, IMG)
    jacobian = torch.func.jacrev(f)(x)
    torch.testing.assert_close(jacobian, reference, rtol=1e-5, atol=1e-6)
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    value, derivative = torch.func.jvp(f, (x,), (tangent,))
    with torch.no_grad():
        torch.testing.assert_close(value, f(x), rtol=0, atol=0)
        expected = (reference.flatten(2) @ tangent.flatten()).reshape(value.shape)
        torch.testing.assert_close(derivative, expected, rtol=1e-4, atol=1e-5)
        batched = torch.func.vmap(lambda one: f(one[None])[0])(pixels)
        torch.testing.assert_close(batched, f(pixels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("family", "options"), CASES)
def test_torch_export_computes_the_eager_function(family, options):
    model = _converted(family, options)
    with where_the_source_traces(family):
        program = torch.export.export(model, (_pixels(),))
    other = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for pixels in (_pixels(), other):
            torch.testing.assert_close(logits_of(program.module()(pixels)), logits_of(model(pixels)))


@pytest.mark.parametrize(("family", "options"), [case for case in CASES if case.values[0] in TIMM_FAMILIES])
def test_timm_fx_symbolic_trace_computes_the_eager_function(family, options):
    """The whole model traces with the concrete arguments timm's own models need; the graph reads the current
    weights (a weight changed after tracing changes the traced output as it does the model's)."""
    model = _converted(family, options)
    traced = torch.fx.symbolic_trace(model, concrete_args={"attn_mask": None, "is_causal": False})
    with torch.no_grad():
        torch.testing.assert_close(traced(_pixels()), model(_pixels()))
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.mul_(0.9)
        torch.testing.assert_close(traced(_pixels()), model(_pixels()))


@pytest.mark.parametrize("layer_type", ["CPL", "SLL"])
def test_gradient_residual_layers_trace_to_the_same_bits(layer_type):
    """The layers' own normalization (CPL's Gram bound of ``||W||``, SLL's ``1 / t``) computes the eager step
    exactly under ``torch.export``, ``torch.func`` and ``torch.fx``: the traced forwards equal the eager one bit for
    bit."""
    import robustvit.layers

    torch.manual_seed(0)
    layer = getattr(robustvit.layers, layer_type)(dim=48, inner_dim=192)  # 48 columns: one Gram panel
    wide = getattr(robustvit.layers, layer_type)(dim=80, inner_dim=100)  # 80 columns: two panels
    for module in (layer, wide):
        x = torch.randn(2, 5, module.weight.shape[1])
        with torch.no_grad():
            expected = module(x)
        assert torch.equal(module(x).detach(), expected)  # with gradients
        assert torch.equal(torch.export.export(module, (x,)).module()(x), expected)
        assert torch.equal(torch.fx.symbolic_trace(module)(x), expected)
        value, _ = torch.func.jvp(module, (x,), (torch.ones_like(x),))
        assert torch.equal(value, expected)
        if module is wide:
            continue
        # Reverse AD through the normalization itself (the weight's derivative), as plain autograd computes it.
        params = {name: p.detach() for name, p in module.named_parameters()}

        def of_weight(w: torch.Tensor, module=module, x=x, params=params) -> torch.Tensor:
            return torch.func.functional_call(module, {**params, "weight": w}, (x[:1, :1],))

        reference = torch.autograd.functional.jacobian(of_weight, params["weight"])
        torch.testing.assert_close(torch.func.jacrev(of_weight)(params["weight"]), reference, rtol=1e-5, atol=1e-7)
