"""The bound engine: products, dropout, refusals (nothing silently assumed 1-Lipschitz), rules and reports."""

from __future__ import annotations

import json
import types

import pytest
import timm
import torch
from conftest import build_model
from timm.layers import DropPath
from torch import nn

import robustvit
import robustvit.families  # noqa: F401  (registers the bound rules of timm layers such as DropPath)
from robustvit.errors import UnsupportedModuleError
from robustvit.layers import CenterNorm
from robustvit.lipschitz import (
    GELU_LIPSCHITZ,
    bound_tensor,
    lipschitz_bound,
    lipschitz_report,
    mark_lipschitz_neutral,
    register_bound,
)
from robustvit.lipschitz import engine as engine_module
from robustvit.lipschitz.estimate import estimate_lipschitz_lower_bound
from robustvit.registry import Registry


def svd_norm(linear: nn.Linear) -> float:
    return float(torch.linalg.matrix_norm(linear.weight.detach().double(), ord=2))


def test_sequential_bound_is_the_product():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.GELU()), nn.Tanh(), nn.Linear(16, 3)
    )
    report = lipschitz_report(net)
    by_path = {e.path: e.bound for e in report.entries}
    expected = by_path["0"] * by_path["1"] * by_path["2"] * by_path["3"] * by_path["4"]
    assert report.total == pytest.approx(expected, rel=1e-12)
    assert by_path["2"] == pytest.approx(by_path["2.0"] * GELU_LIPSCHITZ, rel=1e-12)
    for path in ("0", "2.0", "4"):
        linear = net.get_submodule(path)
        exact = svd_norm(linear)
        assert exact <= by_path[path] <= exact * (1 + 1e-4)  # guaranteed and tight
    assert lipschitz_bound(net) == report.total
    x = torch.randn(8, 8)
    assert estimate_lipschitz_lower_bound(net, x, steps=60) <= report.total


def test_bound_is_a_float_and_bound_tensor_float64():
    net = nn.Sequential(nn.Linear(4, 4))
    assert isinstance(lipschitz_bound(net), float)
    t = bound_tensor(net)
    assert t.dtype == torch.float64 and t.shape == ()


def test_bound_tensor_is_differentiable():
    """Documented: 'differentiable in the parameters (for training losses)'."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    bound = bound_tensor(net)
    assert bound.requires_grad, "bound_tensor lost its graph: the Linear bounds are computed without autograd"
    bound.backward()
    assert net[0].weight.grad is not None and bool(net[0].weight.grad.abs().sum() > 0)


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9])
def test_dropout_and_drop_path_count_one(p):
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(6, 6), nn.Linear(6, 6)
    plain = lipschitz_bound(nn.Sequential(lin1, lin2))
    for drop in (nn.Dropout(p), DropPath(p), nn.Dropout2d(p)):
        net = nn.Sequential(lin1, drop, lin2)
        for mode in (True, False):  # the bound is the eval map's, whatever mode the model is in
            net.train(mode)
            assert lipschitz_bound(net) == pytest.approx(plain, rel=1e-12)
        assert lipschitz_report(nn.Sequential(drop)).total == 1.0


def test_leaky_relu_and_one_lipschitz_activations():
    assert lipschitz_bound(nn.LeakyReLU(2.5)) == 2.5
    assert lipschitz_bound(nn.LeakyReLU(0.1)) == 1.0
    for act in (nn.ReLU(), nn.Tanh(), nn.Hardtanh(), nn.Identity(), nn.Flatten()):
        assert lipschitz_bound(act) == 1.0


class Custom(nn.Module):
    def forward(self, x):
        return 3 * x


class DoublingLinear(nn.Linear):
    factor = 2.0

    def forward(self, x):
        return self.factor * super().forward(x)


def _unconverted_vit():
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=3, num_classes=10
    )


@pytest.mark.parametrize(
    ("make", "path", "type_name"),
    [
        (lambda: nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.LayerNorm(4))), "1.1", "LayerNorm"),
        (lambda: nn.Sequential(nn.Linear(4, 4), Custom()), "1", "Custom"),
        (lambda: nn.Sequential(DoublingLinear(4, 4)), "0", "DoublingLinear"),
        (lambda: nn.Sequential(nn.ReLU6()), "0", "ReLU6"),  # a subclass of Hardtanh: exact types only
        (lambda: nn.Sequential(nn.Linear(4, 4), nn.Softplus(beta=0.1)), "1", "Softplus"),
        (_unconverted_vit, "blocks.0", "Block"),
    ],
)
def test_unknown_modules_are_refused_naming_path_and_type(make, path, type_name):
    with pytest.raises(UnsupportedModuleError) as info:
        lipschitz_bound(make())
    message = str(info.value)
    assert f"'{path}'" in message and type_name in message, message


def test_hooks_and_instance_forward_are_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    handle = net[0].register_forward_hook(lambda m, i, o: 100 * o)
    with pytest.raises(UnsupportedModuleError, match="'0'.*hook"):
        lipschitz_bound(net)
    handle.remove()
    handle = net[1].register_forward_pre_hook(lambda m, args: (100 * args[0],))
    with pytest.raises(UnsupportedModuleError, match="'1'"):
        lipschitz_bound(net)
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        with pytest.raises(UnsupportedModuleError, match="hook"):
            lipschitz_bound(net)
    finally:
        handle.remove()
    net[1].forward = lambda x: 100 * x
    with pytest.raises(UnsupportedModuleError, match="'1'.*forward"):
        lipschitz_bound(net)
    del net[1].forward
    # a Lipschitz-neutral hook, marked as such, is accepted
    handle = net[0].register_forward_hook(mark_lipschitz_neutral(lambda m, i, o: o + 1.0))
    assert lipschitz_bound(net) == pytest.approx(svd_norm(net[0]), rel=1e-4)
    handle.remove()


def test_subclass_overriding_forward_does_not_inherit_the_bound():
    """The engine never matches a registered rule through a base class because a subclass may change forward;
    the same must hold for bounds given by a ``lipschitz_bound()`` method."""

    class LoudCenterNorm(CenterNorm):
        def forward(self, x):
            return 1000 * super().forward(x)

    layer = LoudCenterNorm(8)
    try:
        bound = lipschitz_bound(layer)
    except UnsupportedModuleError:
        return
    estimate = estimate_lipschitz_lower_bound(layer, torch.randn(4, 8), steps=30)
    assert estimate <= bound, f"inherited bound {bound} < empirical {estimate}"


def test_non_patchify_conv_in_a_tree_is_refused_clearly():
    net = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    with pytest.raises(UnsupportedModuleError) as info:
        lipschitz_bound(net)
    message = str(info.value)
    assert "'2'" in message and "Conv2d" in message and "input" in message, message
    # the patchify conv alone is fine, and exact
    conv = net[0]
    exact = float(torch.linalg.matrix_norm(conv.weight.detach().double().reshape(4, -1), ord=2))
    assert exact <= lipschitz_bound(nn.Sequential(conv)) <= exact * (1 + 1e-4)


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return self.factor * x


@pytest.fixture
def scale_rule(monkeypatch):
    """Registers a rule for Scale in a copy of the bound rules, so that the test leaves the real ones as they were."""
    rules = Registry("bound rule", keys=type)
    for module_type, rule in engine_module.BOUND_RULES.items():
        rules.register(module_type, rule)
    monkeypatch.setattr(engine_module, "BOUND_RULES", rules)

    @register_bound(Scale)
    def _scale(module, bound_of):
        return torch.tensor(abs(module.factor), dtype=torch.float64)

    return _scale


def test_registered_rule_is_used(scale_rule):
    net = nn.Sequential(nn.Linear(4, 4), Scale(-3.0))
    report = lipschitz_report(net)
    assert report.entries[-1].type == "Scale" and report.entries[-1].bound == 3.0
    assert report.total == pytest.approx(3.0 * report.entries[1].bound)

    class SubScale(Scale):  # a subclass may change forward: the rule must not match it
        pass

    with pytest.raises(UnsupportedModuleError, match="SubScale"):
        lipschitz_bound(nn.Sequential(SubScale(2.0)))


def test_rule_must_return_a_finite_nonnegative_scalar():
    class Bad(nn.Module):
        def forward(self, x):
            return x

    for value in (torch.tensor(float("nan")), torch.tensor(-1.0), torch.ones(2), 3.0):
        Bad.lipschitz_bound = lambda self, v=value: v
        with pytest.raises((TypeError, ValueError)):
            lipschitz_bound(nn.Sequential(Bad()))


def test_report_rows_table_and_dict():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 2)))
    report = lipschitz_report(net)
    assert [(e.path, e.type, e.depth) for e in report.entries] == [
        ("", "Sequential", 0),
        ("0", "Linear", 1),
        ("1", "Sequential", 1),
        ("1.0", "ReLU", 2),
        ("1.1", "Linear", 2),
    ]
    assert all(isinstance(e.bound, float) for e in report.entries)
    table = str(report)
    assert "module" in table and "bound" in table and "end-to-end l2 Lipschitz bound" in table
    assert "Sequential" in table and "Linear" in table
    data = json.loads(json.dumps(report.to_dict()))
    assert data["total"] == report.total and len(data["entries"]) == 5


def test_parametrized_linear_reports_its_plain_type():
    layer = robustvit.lipschitz.spectral_rescale(nn.Linear(5, 5))
    report = lipschitz_report(nn.Sequential(layer))
    assert report.entries[1].type == "Linear"
    assert report.total <= 1 + 2e-5


# ----------------------------------------------------------------------------------------------------------
# Converted models: whatever changes the function must be seen by the bound (or refused)
# ----------------------------------------------------------------------------------------------------------


# Models whose logits do depend on the image (see test_convert: with the shift mixer, class-token models don't),
# so that scaling their output is visible to the empirical attack.
@pytest.fixture(scope="module")
def converted_timm():
    return robustvit.convert(build_model("timm_avg_ls_reg"))


@pytest.fixture(scope="module")
def converted_hf():
    return robustvit.convert(build_model("hf_vit"), mixer="l2")


SCALE = 1e6  # far beyond any slack between the bound and the true constant of these random models


def _refused_or_sound(model, x):
    """Either the engine refuses the modified model, or its bound still covers the modified function."""
    try:
        bound = robustvit.lipschitz_bound(model)
    except UnsupportedModuleError:
        return
    estimate = estimate_lipschitz_lower_bound(
        model, x, steps=40, restarts=2, generator=torch.Generator().manual_seed(0)
    )
    assert estimate <= bound, f"bound {bound} ignores the modification: empirical {estimate}"


def test_hook_on_converted_head_is_seen(converted_timm, images):
    handle = converted_timm.head.register_forward_hook(lambda m, i, o: SCALE * o)
    try:
        _refused_or_sound(converted_timm, images[:2])
    finally:
        handle.remove()


def test_linear_subclass_as_converted_head_is_seen(converted_timm, images):
    old = converted_timm.head
    new = DoublingLinear(old.in_features, old.out_features)
    new.factor = SCALE
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.copy_(old.bias)
    converted_timm.head = new
    try:
        _refused_or_sound(converted_timm, images[:2])
    finally:
        converted_timm.head = old


def test_instance_override_of_forward_head_is_seen(converted_timm, images):
    vit_cls = type(converted_timm)
    converted_timm.forward_head = types.MethodType(
        lambda self, x, pre_logits=False: SCALE * vit_cls.forward_head(self, x, pre_logits), converted_timm
    )
    try:
        _refused_or_sound(converted_timm, images[:2])
    finally:
        del converted_timm.forward_head


def test_hook_on_hf_backbone_is_seen(converted_hf, images):
    def scale(module, args, output):
        output.last_hidden_state = SCALE * output.last_hidden_state
        return output

    handle = converted_hf.vit.register_forward_hook(scale)
    try:
        _refused_or_sound(converted_hf, images[:2])
    finally:
        handle.remove()


def test_unmodified_converted_models_still_bound(converted_timm, converted_hf):
    assert robustvit.lipschitz_bound(converted_timm) > 0
    assert robustvit.lipschitz_bound(converted_hf) > 0


# ----------------------------------------------------------------------------------------------------------
# Bypasses of the module tree: foreign call paths, class-level patches, grad-mode parametrizations, attributes
# ----------------------------------------------------------------------------------------------------------


class OwnBound(nn.Module):
    """A self-bounded layer: the identity, bound 1."""

    def forward(self, x):
        return x

    def lipschitz_bound(self, bound_of=None):
        return torch.ones((), dtype=torch.float64)


class LoudCall(OwnBound):
    def __call__(self, *args, **kwargs):
        return SCALE * super().__call__(*args, **kwargs)


class LoudCallImpl(OwnBound):
    def _call_impl(self, *args, **kwargs):
        return SCALE * super()._call_impl(*args, **kwargs)


class LoudOwnCall(nn.Module):
    """Its own lipschitz_bound, but __call__ is not nn.Module's."""

    def forward(self, x):
        return x

    def __call__(self, x):
        return SCALE * x

    def lipschitz_bound(self, bound_of=None):
        return torch.ones((), dtype=torch.float64)


@pytest.mark.parametrize("layer_type", [LoudCall, LoudCallImpl, LoudOwnCall])
def test_call_path_overrides_are_refused(layer_type):
    net = nn.Sequential(nn.Linear(4, 4), layer_type())
    assert float(net(torch.ones(1, 4)).detach().abs().max()) > 1e3  # the override does run
    with pytest.raises(UnsupportedModuleError, match="'1'"):
        lipschitz_bound(net)


def test_instance_call_impl_override_is_refused():
    net = nn.Sequential(nn.Linear(4, 4), OwnBound())
    net[1]._call_impl = lambda x: SCALE * x
    with pytest.raises(UnsupportedModuleError, match="'1'.*_call_impl"):
        lipschitz_bound(net)


def test_patched_nn_module_call_is_refused(monkeypatch):
    original = nn.Module._call_impl
    monkeypatch.setattr(nn.Module, "_call_impl", lambda self, *a, **k: SCALE * original(self, *a, **k))
    with pytest.raises(UnsupportedModuleError, match="_call_impl"):
        lipschitz_bound(nn.Sequential(nn.Linear(4, 4)))


def test_subclass_inheriting_the_bound_may_not_override_methods():
    class SneakyConv(robustvit.layers.NormalizedConv2d):  # forward untouched, the convolution it calls changed
        def _conv_forward(self, x, weight, bias):
            return SCALE * super()._conv_forward(x, weight, bias)

    layer = SneakyConv(3, 4, 4, stride=4, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(UnsupportedModuleError, match="_conv_forward"):
        lipschitz_bound(layer)


def test_instance_level_lipschitz_bound_is_refused():
    relu = nn.ReLU()
    relu.lipschitz_bound = lambda: torch.zeros((), dtype=torch.float64)
    with pytest.raises(UnsupportedModuleError, match="instance"):
        lipschitz_bound(nn.Sequential(relu))


@pytest.mark.parametrize(
    ("owner", "name"),
    [(nn.Linear, "forward"), (nn.Sequential, "forward"), (nn.GELU, "forward"), (CenterNorm, "forward")],
)
def test_class_level_patch_of_a_recorded_type_is_refused(monkeypatch, owner, name):
    original = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda self, *a, **k: SCALE * original(self, *a, **k))
    net = nn.Sequential(nn.Linear(4, 4), nn.GELU(), CenterNorm(4))
    with pytest.raises(UnsupportedModuleError, match=f"{owner.__name__}.{name}"):
        lipschitz_bound(net)


def test_class_patch_of_forward_head_is_refused(converted_timm, images, monkeypatch):
    vit_cls = type(converted_timm)
    original = vit_cls.forward_head
    monkeypatch.setattr(vit_cls, "forward_head", lambda self, x, pre_logits=False: SCALE * original(self, x))
    with pytest.raises(UnsupportedModuleError, match="forward_head"):
        robustvit.lipschitz_bound(converted_timm)
    with pytest.raises(UnsupportedModuleError, match="forward_head"):
        robustvit.certify(converted_timm, images[:1])


def test_class_patch_of_an_unvisited_hf_backbone_is_refused(converted_hf, monkeypatch):
    from transformers.models.vit.modeling_vit import ViTModel

    original = ViTModel.forward

    def loud(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        output.last_hidden_state = SCALE * output.last_hidden_state
        return output

    monkeypatch.setattr(ViTModel, "forward", loud)
    with pytest.raises(UnsupportedModuleError, match="ViTModel.forward"):
        robustvit.lipschitz_bound(converted_hf)


def test_registering_a_type_twice_is_refused_and_keeps_the_first_rule(scale_rule, monkeypatch):
    with pytest.raises(ValueError, match=r"bound rule '[\w.]*\.Scale' is already registered"):
        register_bound(Scale)(lambda module, bound_of: torch.tensor(0.0, dtype=torch.float64))
    assert lipschitz_bound(nn.Sequential(Scale(-2.0))) == 2.0
    monkeypatch.setattr(Scale, "forward", lambda self, x: 5 * x)
    with pytest.raises(UnsupportedModuleError, match="Scale.forward"):  # and a patched class stays refused
        lipschitz_bound(nn.Sequential(Scale(2.0)))


def test_every_robustvit_module_imports_without_registering_a_name_twice():
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(robustvit.__path__, "robustvit."):  # a duplicate raises on import
        importlib.import_module(module.name)
    assert "torch.nn.modules.container.Sequential" in engine_module.BOUND_RULES.list("torch.*")


class GradModeScale(nn.Module):
    """A parametrization that is 1000x larger when autograd records: training sees another weight than no_grad."""

    def forward(self, weight):
        return weight * (1000.0 if torch.is_grad_enabled() else 1.0)


class TrainModeScale(nn.Module):
    def forward(self, weight):
        return weight * (1000.0 if self.training else 1.0)


@pytest.mark.parametrize("parametrization", [GradModeScale, TrainModeScale])
def test_mode_dependent_parametrizations_are_refused(parametrization):
    from torch.nn.utils import parametrize as torch_parametrize

    linear = nn.Linear(4, 4)
    torch_parametrize.register_parametrization(linear, "weight", parametrization())
    net = nn.Sequential(linear).train()
    with pytest.raises(UnsupportedModuleError, match="'0'.*'weight'"):
        lipschitz_bound(net)
    assert net[0].parametrizations.weight[0].training  # the check restores the modes it switched


def test_spectral_rescale_passes_the_mode_check_in_both_modes():
    layer = robustvit.lipschitz.spectral_rescale(nn.Linear(6, 5))
    for mode in (True, False):
        layer.train(mode)
        assert lipschitz_bound(nn.Sequential(layer)) <= 1 + 2e-5
        assert layer.training == mode


@pytest.mark.parametrize(
    ("path", "value"), [("num_prefix_tokens", 15), ("num_prefix_tokens", 0), ("patch_embed.num_patches", 4)]
)
def test_family_attributes_that_disagree_with_the_tree_are_refused(path, value, images):
    """Found by an attack: num_prefix_tokens=15 on an avg-pool model makes the forward average 4 tokens while the
    rule counted 16 patches, a bound 2x too small (the forward still runs: the mixers keep their own count)."""
    model = robustvit.convert(build_model("timm_avg_ls_reg"))
    owner_path, _, name = path.rpartition(".")
    owner = model.get_submodule(owner_path)
    original = getattr(owner, name)
    assert robustvit.lipschitz_bound(model) > 0
    setattr(owner, name, value)
    model.eval()(images[:1])  # the edited model still runs
    with pytest.raises(UnsupportedModuleError, match=name):
        robustvit.lipschitz_bound(model)
    setattr(owner, name, original)
    assert robustvit.lipschitz_bound(model) > 0
