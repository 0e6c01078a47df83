"""PEFT tuners (LoRA, DoRA, LoHa, LoKr, (IA)^3, OFT) on converted models train inside the Lipschitz constraint,
their bound is attacked, and merge_and_unload() keeps both the finetune and the bound."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import IMG, REPRESENTATIVES, build_model, logits_of
from peft.tuners.tuners_utils import BaseTunerLayer
from test_certify import margin_pgd
from torch import nn

import robustvit
import robustvit.peft
from robustvit.errors import UnsupportedModuleError
from robustvit.layers.linear import linear_weight
from robustvit.lipschitz.estimate import estimate_lipschitz_lower_bound
from robustvit.lipschitz.rescale import is_spectrally_rescaled

FAMILIES = (*REPRESENTATIVES, "timm_distilled")  # one per family, and two heads


def _lora_layers(model: nn.Module) -> list[robustvit.peft.LipschitzLoraLinear]:
    return [m for m in model.modules() if isinstance(m, robustvit.peft.LipschitzLoraLinear)]


def _adversarial_adapters(model: nn.Module, scale: float, seed: int = 0) -> None:
    """Large random LoRA factors: an unconstrained update would blow every layer's norm far past 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(scale * torch.randn(param.shape, generator=generator))


def _adapted(family: str, scale: float = 3.0) -> tuple[nn.Module, nn.Module]:
    source = robustvit.convert(build_model(family).eval())
    base = copy.deepcopy(source).eval()
    model = robustvit.peft.get_peft_model(source, robustvit.peft.lora_config(source, r=4))
    _adversarial_adapters(model, scale)
    return model.eval(), base


def _pixels(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_layers_stay_inside_the_constraint(family):
    model, _ = _adapted(family)
    layers = _lora_layers(model)
    assert layers and all(layer.base_layer.parametrizations.weight.original.requires_grad is False for layer in layers)
    # Training forwards move each rescaling's tracked directions to the adapted weight's top singular subspace (the
    # adversarial update is far from the base weight's); the certificate never relies on it: see the bound below.
    model.train()
    for seed in range(3):
        model(_pixels(2, seed))
    model.eval()
    for layer in layers:
        weight = layer.effective_weight().detach().double()
        exact = float(torch.linalg.matrix_norm(weight, ord=2))
        assert exact <= 1 + 1e-5
        assert float(layer.lipschitz_bound()) >= exact * (1 - 1e-9)
        # The same adapters outside the constraint (what plain PEFT computes) leave the unit ball far behind.
        outside = layer.base_layer.weight.detach().double() + layer.get_delta_weight("default").detach().double()
        assert float(torch.linalg.matrix_norm(outside, ord=2)) > 2


@pytest.mark.parametrize("family", ["timm_distilled", "hf_vit"])
def test_bound_of_the_peft_model_holds_against_attacks(family):
    model, _ = _adapted(family)
    bound = robustvit.lipschitz_bound(model)
    assert bound == robustvit.lipschitz_bound(model.base_model.model)
    estimate = estimate_lipschitz_lower_bound(
        model, _pixels(2, 1), steps=20, restarts=2, generator=torch.Generator().manual_seed(0)
    )
    assert 0 < estimate <= bound
    images = _pixels(6, 2)
    result = robustvit.certify(model, images)
    assert result.lipschitz == pytest.approx(bound, rel=1e-6)  # certify bounds a float64 copy
    assert result.features_lipschitz is not None  # the pairwise head bound, with a LoRA head
    certified = result.radii > 1e-5
    assert certified.any()
    exact = copy.deepcopy(model).double()
    radii = 0.99 * result.radii[certified]
    flipped = margin_pgd(exact, images[certified].double(), result.predictions[certified], radii, steps=25, restarts=1)
    assert not flipped.any()


@pytest.mark.parametrize("family", FAMILIES)
def test_training_changes_the_function_and_merge_keeps_it(family):
    model, base = _adapted(family, scale=0.0)
    for layer in _lora_layers(model):  # standard LoRA init: A random, B zero -> starts at the base model
        nn.init.kaiming_uniform_(layer.lora_A["default"].weight)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    images, labels = _pixels(8, 3), torch.arange(8) % 10
    model.train()
    for _ in range(5):
        loss = nn.functional.cross_entropy(logits_of(model(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    # About 1: the tracked directions lag the last optimizer step (rescale.py); the bound is computed exactly
    # whatever the lag (SigLIP's tiny model, whose gradients are the largest here, lags by 16%).
    for layer in _lora_layers(model):
        assert float(torch.linalg.matrix_norm(layer.effective_weight().detach().double(), ord=2)) <= 1.2
    with torch.no_grad():
        adapted = logits_of(model(images))
        before = logits_of(base(images))
    assert (adapted - before).abs().max() > 1e-3  # LoRA learned something
    bound = robustvit.lipschitz_bound(model)
    merged = model.merge_and_unload()
    assert type(merged) is type(base) and robustvit.is_converted(merged) and not _lora_layers(merged)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(merged(images)), adapted, atol=1e-5, rtol=1e-5)
    assert robustvit.lipschitz_bound(merged) == pytest.approx(bound, rel=1e-4)


@pytest.mark.parametrize("targets", [["fc1", "fc2"], ["head"]])
def test_plain_peft_trains_inside_the_constraint_and_merge_keeps_the_finetune(targets):
    """The standard path, peft.get_peft_model with a user's own LoraConfig, is robustvit.peft's path: the layers
    PEFT builds on rescaled layers are constrained as PEFT builds them, and merge_and_unload keeps the finetune."""
    torch.manual_seed(0)
    lip = robustvit.convert(build_model("timm_token").eval())
    images, labels = _pixels(4, 0), torch.arange(4)
    with torch.no_grad():
        before = lip.eval()(images)
    model = peft.get_peft_model(lip, peft.LoraConfig(r=4, target_modules=targets))
    assert _lora_layers(model) and all(isinstance(m, robustvit.peft.ConstrainedTunerLayer) for m in _tuner(model))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        tuned = model(images)
    assert (tuned - before).abs().max() > 1e-3  # the finetune changed the function
    bound = robustvit.lipschitz_bound(model)
    assert estimate_lipschitz_lower_bound(model, _pixels(4, 1), steps=10) <= bound
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(images), tuned, atol=1e-5, rtol=1e-5)
    assert robustvit.lipschitz_bound(merged) == pytest.approx(bound, rel=1e-4)


def _tuner(model: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def test_plain_peft_refuses_before_training_what_the_constraint_cannot_keep():
    lip = robustvit.convert(build_model("timm_token").eval())
    with pytest.raises(UnsupportedModuleError, match=r"vera.*robustvit\.peft\.get_peft_model"):
        peft.get_peft_model(copy.deepcopy(lip), peft.VeraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ValueError, match="does not support lora_dropout>0"):
        peft.get_peft_model(copy.deepcopy(lip), peft.LoraConfig(r=2, target_modules=["fc1"], lora_dropout=0.1))


def _tuner_configs(targets: list[str]) -> dict[str, peft.PeftConfig]:
    """One config per supported tuner; IA3 scales fc2's input (feedforward) and the other layers' outputs."""
    return {
        "lora": peft.LoraConfig(r=2, target_modules=targets),
        "dora": peft.LoraConfig(r=2, target_modules=targets, use_dora=True),
        "loha": peft.LoHaConfig(r=2, target_modules=targets),
        "lokr": peft.LoKrConfig(r=2, target_modules=targets),
        "ia3": peft.IA3Config(target_modules=targets, feedforward_modules=[t for t in targets if t.endswith("fc2")]),
        "oft": peft.OFTConfig(r=0, oft_block_size=4, target_modules=targets),
    }


TUNER_NAMES = tuple(_tuner_configs(["x"]))


def _perturb_adapters(model: nn.Module, scale: float, seed: int = 0) -> None:
    """Move every trainable (adapter) parameter off PEFT's identity initialization."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def _constrained_layers(model: nn.Module) -> list[robustvit.peft.ConstrainedTunerLayer]:
    return [m for m in model.modules() if isinstance(m, robustvit.peft.ConstrainedTunerLayer)]


@pytest.mark.parametrize("tuner", TUNER_NAMES)
def test_each_tuner_computes_what_peft_computes(tuner):
    """On a plain nn.Linear stack (no rescaling) the constrained layer is the tuner's own function, and so is the
    merged layer: the weight update is the tuner's, not an approximation of it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    model = peft.get_peft_model(net, _tuner_configs(["0", "2"])[tuner])
    _perturb_adapters(model, 0.3)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        reference = model(x)
        assert robustvit.peft.constrain(model) is model and len(_constrained_layers(model)) == 2
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)
        layer = _constrained_layers(model)[0]
        layer.merge()
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)
        layer.unmerge()  # restores the weights before the merge exactly
        assert not layer.merged
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.merge_and_unload()(x), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tuner", TUNER_NAMES)
def test_every_tuner_trains_inside_the_constraint_and_merges(tuner):
    source = robustvit.convert(build_model("timm_token").eval())
    base = copy.deepcopy(source).eval()
    model = robustvit.peft.get_peft_model(source, _tuner_configs(robustvit.peft.target_modules(source))[tuner])
    layers = _constrained_layers(model)
    assert layers and all(is_spectrally_rescaled(layer.get_base_layer()) for layer in layers)
    _perturb_adapters(model, 0.05)  # off the identity init (LoRA's B = 0 ...), so every adapter gets a gradient
    before = [layer.effective_weight().detach().clone() for layer in layers]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    images, labels = _pixels(8, 3), torch.arange(8) % 10
    model.train()
    for _ in range(3):
        loss = nn.functional.cross_entropy(logits_of(model(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for _ in range(3):  # the rescalings' tracked directions catch up with the last optimizer step (rescale.py)
        model(images)
    model.eval()
    for layer, old in zip(layers, before, strict=True):
        weight = layer.effective_weight().detach()
        assert (weight - old).abs().max() > 1e-4  # training moved the effective weight
        exact = float(torch.linalg.matrix_norm(weight.double(), ord=2))
        assert exact <= 1.05  # about 1 (the directions converge over training forwards); certified: the exact bound
        assert float(layer.lipschitz_bound()) >= exact * (1 - 1e-9)
    bound = robustvit.lipschitz_bound(model)
    estimate = estimate_lipschitz_lower_bound(
        model, _pixels(2, 1), steps=15, restarts=1, generator=torch.Generator().manual_seed(0)
    )
    assert 0 < estimate <= bound
    with torch.no_grad():
        adapted = logits_of(model(images))
        assert (adapted - logits_of(base(images))).abs().max() > 1e-3
    merged = model.merge_and_unload()
    assert type(merged) is type(base) and robustvit.is_converted(merged) and not _constrained_layers(merged)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(merged(images)), adapted, atol=1e-5, rtol=1e-5)
    assert robustvit.lipschitz_bound(merged) == pytest.approx(bound, rel=1e-4)


def test_adapters_saved_by_peft_load_inside_the_constraint(tmp_path):
    lip = robustvit.convert(build_model("timm_token").eval())
    fresh = copy.deepcopy(lip)
    model = robustvit.peft.get_peft_model(lip, peft.LoHaConfig(r=2, target_modules=robustvit.peft.target_modules(lip)))
    _perturb_adapters(model, 0.3)
    model.eval().save_pretrained(tmp_path)
    loaded = robustvit.peft.constrain(peft.PeftModel.from_pretrained(fresh, tmp_path).eval())
    with torch.no_grad():
        torch.testing.assert_close(loaded(_pixels(2, 0)), model(_pixels(2, 0)))
    assert robustvit.lipschitz_bound(loaded) == pytest.approx(robustvit.lipschitz_bound(model), rel=1e-9)


@pytest.mark.parametrize(
    "config",
    [
        dict(kind=peft.LoraConfig, lora_dropout=0.1),
        dict(kind=peft.LoraConfig, lora_bias=True),
        dict(kind=peft.LoHaConfig, rank_dropout=0.1),
        dict(kind=peft.LoKrConfig, module_dropout=0.1),
        dict(kind=peft.OFTConfig, r=0, oft_block_size=4, module_dropout=0.1),
    ],
    ids=lambda config: "-".join(f"{k}" for k in config if k != "kind") + "-" + config["kind"].__name__,
)
def test_options_outside_the_constraint_are_refused_and_the_model_is_left_alone(config):
    lip = robustvit.convert(build_model("timm_token").eval())
    reference = copy.deepcopy(lip.state_dict())
    kind = config.pop("kind")
    with pytest.raises(ValueError, match="inside the Lipschitz constraint does not support"):
        robustvit.peft.get_peft_model(lip, kind(target_modules=robustvit.peft.target_modules(lip), **config))
    assert not any(isinstance(m, BaseTunerLayer) for m in lip.modules())
    assert lip.state_dict().keys() == reference.keys()


def test_adapters_added_later_are_checked_or_constrained_again():
    lip = robustvit.convert(build_model("timm_token").eval())
    model = robustvit.peft.get_peft_model(lip, peft.LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ValueError, match="does not support lora_dropout"):
        model.add_adapter("dropped", peft.LoraConfig(r=2, target_modules=["fc1"], lora_dropout=0.1))
    assert all("dropped" not in layer.lora_A for layer in _constrained_layers(model))
    model.add_adapter("wider", peft.LoraConfig(r=2, target_modules=["fc1", "fc2"]))  # fc2: a new PEFT layer
    model.set_adapter("wider")
    _perturb_adapters(model, 0.1)
    assert len(_constrained_layers(model)) == 4 and robustvit.lipschitz_bound(model) > 0  # constrained as built
    robustvit.peft.constrain(model)  # nothing left to do
    assert len(_constrained_layers(model)) == 4


def test_other_tuners_and_layers_are_not_implemented():
    lip = robustvit.convert(build_model("timm_token").eval())
    for config in (peft.BOFTConfig(boft_block_size=4, target_modules=["fc1"]), peft.VeraConfig(target_modules=["fc1"])):
        with pytest.raises(NotImplementedError, match=r"Config: .*supported: IA3Config, LoHaConfig, LoKrConfig"):
            robustvit.peft.get_peft_model(lip, config)
    for config in (peft.BOFTConfig(boft_block_size=4, target_modules=["fc1"]), peft.VeraConfig(target_modules=["fc1"])):
        with pytest.raises(UnsupportedModuleError, match=r"no rule inside the Lipschitz constraint"):
            peft.get_peft_model(copy.deepcopy(lip), config)  # the standard path: refused as PEFT builds the layer
    plain = peft.get_peft_model(lip, peft.LoHaConfig(r=2, target_modules=["fc1"]))
    _perturb_adapters(plain, 0.1)
    assert _constrained_layers(plain) and robustvit.lipschitz_bound(plain) > 0
    # A supported tuner on another layer type: refused once PEFT built it, and its layers are taken out again.
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(NotImplementedError, match=r"0 \(peft\.tuners\.lora\.layer\.Conv2d\)"):
        robustvit.peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    assert type(net[0]) is nn.Conv2d and type(net[2]) is nn.Linear


def test_load_base_weights_restarts_from_a_plain_baseline_with_fresh_adapters(tmp_path):
    from safetensors.torch import save_model

    lip = robustvit.convert(build_model("timm_token").eval())
    model = robustvit.peft.with_lora(lip, 2)
    fresh = robustvit.peft.adapter_state(model)
    save_model(robustvit.peft.merged(model), str(tmp_path / "baseline.safetensors"))
    model.eval()
    with torch.no_grad():
        start = model(_pixels(2, 0))
    _perturb_adapters(model, 0.5)  # a run trains the adapters (and could have written to the base)
    with torch.no_grad():
        for layer in _constrained_layers(model):
            layer.base_layer.parametrizations.weight.original.mul_(2)
        assert not torch.allclose(model(_pixels(2, 0)), start)
    robustvit.peft.load_base_weights(model, tmp_path / "baseline.safetensors", adapters=fresh)
    with torch.no_grad():
        assert torch.equal(model(_pixels(2, 0)), start)
    other = robustvit.peft.with_lora(robustvit.convert(build_model("hf_vit").eval()), 2)
    with pytest.raises(KeyError, match="does not fit the model's base weights"):
        robustvit.peft.load_base_weights(other, tmp_path / "baseline.safetensors", adapters=fresh)
    with pytest.raises(ValueError, match="fresh adapters"):
        robustvit.peft.load_base_weights(model, tmp_path / "baseline.safetensors")


@pytest.mark.slow
def test_train_lipschitz_recipe_takes_lora_r(tmp_path):
    from test_train_recipe import TINY, _recipe, _run

    recipe = _recipe()
    with pytest.raises(SystemExit):
        recipe.parse_args(["--lora_r", "-1"])
    metrics = _run(recipe, [*TINY, "--epochs", "1", "--lora_r", "2", "--output_dir", str(tmp_path)])
    assert metrics["config"]["training"]["lora_r"] == 2 and metrics["history"][0]["lipschitz"] > 0
    model = robustvit.from_pretrained(tmp_path / "model")  # merged, certified, verified on load
    assert not any("lora" in key for key in model.state_dict())
    assert robustvit.lipschitz_bound(model) == pytest.approx(model.certificate.lipschitz, rel=1e-6)


def test_with_lora_and_merged_leave_models_without_adapters_alone():
    lip = robustvit.convert(build_model("timm_token").eval())
    assert robustvit.peft.with_lora(lip, 0) is lip and robustvit.peft.merged(lip) is lip
    adapted = robustvit.peft.with_lora(lip, 2)
    copy_ = robustvit.peft.merged(adapted)
    assert isinstance(adapted, peft.PeftModel) and _lora_layers(adapted) and not _lora_layers(copy_)


@pytest.mark.parametrize("tuner", ["lora", "ia3"])
def test_adapters_on_l2_attention_projections_enter_its_forward_and_bound(tuner):
    """L2 attention reads its projections' weights (query, value; output in the bound) instead of calling them: adapters
    on them (target_modules returns them) must change what it computes and bounds, and the merged attention, bounded by
    the plain code path, must compute and bound exactly that."""
    lip = robustvit.convert(build_model("timm_token").eval(), mixer="l2")
    attn = lip.blocks[0].mixer.fn.attn
    targets = [name for name in robustvit.peft.target_modules(lip) if name.endswith(("q_proj", "v_proj", "o_proj"))]
    model = robustvit.peft.get_peft_model(lip, _tuner_configs(targets)[tuner]).eval()
    tokens = torch.randn(2, attn.num_tokens, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, bound_before = attn(tokens), attn.lipschitz_bound()
    _perturb_adapters(model, 0.5)
    with torch.no_grad():
        adapted, bound = attn(tokens), attn.lipschitz_bound()
    assert (adapted - before).abs().max() > 1e-2 * before.abs().max()
    assert float(bound) != pytest.approx(float(bound_before), rel=1e-3)
    for layer in (attn.q_proj, attn.v_proj, attn.o_proj):
        layer.merge()
    with torch.no_grad():
        torch.testing.assert_close(attn(tokens), adapted, atol=1e-6, rtol=1e-5)
    assert float(attn.lipschitz_bound()) == pytest.approx(float(bound), rel=1e-6)


def test_bounding_an_adapted_layer_in_train_mode_leaves_its_function_alone():
    model, _ = _adapted("timm_token")
    layer = _lora_layers(model)[0]
    model.train()
    directions = layer.base_layer.parametrizations.weight[0].directions.clone()
    assert float(layer.lipschitz_bound()) > 0
    torch.testing.assert_close(layer.base_layer.parametrizations.weight[0].directions, directions, atol=0, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_inits_that_rewrite_the_base_weight_are_refused_on_rescaled_layers(init):
    """PiSSA / OLoRA move the top of the base weight into the adapter and write the rest to base_layer.weight.data: a
    computed tensor on a rescaled layer, so the adapted model silently stopped computing the converted one."""
    lip = robustvit.convert(build_model("timm_token").eval())
    with torch.no_grad():
        reference = lip(_pixels(2, 0))
    match = f"init_lora_weights='{init}' on a rescaled layer"
    with pytest.raises(ValueError, match=match):
        robustvit.peft.get_peft_model(lip, robustvit.peft.lora_config(lip, r=2, init_lora_weights=init))
    with torch.no_grad():
        assert not _constrained_layers(lip) and torch.equal(lip(_pixels(2, 0)), reference)
    with pytest.raises(ValueError, match=match):  # built by PEFT itself (or loaded with that config), then constrained
        robustvit.peft.constrain(
            peft.get_peft_model(
                copy.deepcopy(lip), peft.LoraConfig(r=2, init_lora_weights=init, target_modules=["fc1"])
            )
        )
    model = robustvit.peft.get_peft_model(lip, peft.LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ValueError, match=match):
        model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=init))
    assert all("other" not in layer.lora_A for layer in _constrained_layers(model))
    # On a plain nn.Linear the write lands in the weight: the init keeps the function, inside the constraint too.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = net(x)
        adapted = robustvit.peft.get_peft_model(net, peft.LoraConfig(r=2, init_lora_weights=init, target_modules=["0"]))
        torch.testing.assert_close(adapted(x), before, atol=1e-5, rtol=1e-5)


def test_load_base_weights_restarts_dora_from_the_loaded_baseline(tmp_path):
    """Fresh DoRA magnitudes are the base weight's row norms: restarting from another baseline must compute it."""
    from safetensors.torch import save_model

    baseline = robustvit.convert(build_model("timm_token", seed=5).eval())
    save_model(baseline, str(tmp_path / "baseline.safetensors"))
    lip = robustvit.convert(build_model("timm_token").eval())
    model = robustvit.peft.get_peft_model(lip, robustvit.peft.lora_config(lip, r=2, use_dora=True)).eval()
    robustvit.peft.load_base_weights(
        model, tmp_path / "baseline.safetensors", adapters=robustvit.peft.adapter_state(model)
    )
    with torch.no_grad():
        torch.testing.assert_close(model(_pixels(2, 0)), baseline(_pixels(2, 0)), atol=1e-6, rtol=1e-5)


def test_load_base_weights_into_a_merged_model_is_not_undone_by_a_later_unmerge(tmp_path):
    from safetensors.torch import save_model

    baseline = robustvit.convert(build_model("timm_token", seed=5).eval())
    save_model(baseline, str(tmp_path / "baseline.safetensors"))
    lip = robustvit.convert(build_model("timm_token").eval())
    model = robustvit.peft.with_lora(lip, 2).eval()
    fresh = robustvit.peft.adapter_state(model)
    model.merge_adapter()
    robustvit.peft.load_base_weights(model, tmp_path / "baseline.safetensors", adapters=fresh)
    with torch.no_grad(), model.disable_adapter():  # disabling unmerges a merged layer
        torch.testing.assert_close(model(_pixels(2, 0)), baseline(_pixels(2, 0)), atol=1e-6, rtol=1e-5)


def test_save_pretrained_refuses_adapters_and_saves_the_merged_model(tmp_path):
    """A robustvit repository stores the converted model's own keys: adapters are refused (not written to a folder
    that cannot load; not folded by export either), wrappers are taken off, and the merged model saves, exports and
    loads as the adapted one."""
    model, _ = _adapted("timm_token", scale=0.5)
    with pytest.raises(ValueError, match=r"robustvit\.peft\.merged\(model\)"):
        robustvit.save_pretrained(model, tmp_path / "adapted")
    assert not (tmp_path / "adapted").exists()
    with pytest.raises(ValueError, match=r"exporting .*robustvit\.peft\.merged\(model\)"):
        robustvit.export(model)  # folding the base layers' rescaling would leave the updates unrescaled
    with torch.no_grad():
        torch.testing.assert_close(robustvit.export(robustvit.peft.merged(model))(_pixels(2, 0)), model(_pixels(2, 0)))
    # Saved through a torch.compile wrapper too (its state-dict keys carry "_orig_mod.", which would not load).
    robustvit.save_pretrained(torch.compile(robustvit.peft.merged(model)), tmp_path / "merged")
    loaded = robustvit.from_pretrained(tmp_path / "merged", verify=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_pixels(2, 0)), model(_pixels(2, 0)))


def test_stacked_tuners_of_a_mixed_model_are_not_implemented():
    """PEFT mixed models stack one tuner's layer on another's: the constrained outer layer would compute with the
    innermost weight and silently drop the inner adapter."""
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0"]), mixed=True)
    model.add_adapter("hadamard", peft.LoHaConfig(r=2, target_modules=["0"]))
    with pytest.raises(NotImplementedError, match="stacked on one another"):
        robustvit.peft.constrain(model)
    assert not _constrained_layers(model)


def test_gradient_checkpointing_input_grads_hook_is_bounded_through():
    """transformers' gradient checkpointing with adapters hooks the input embeddings to require grad (PEFT does it
    too): a Lipschitz-neutral hook, so the adapted model is still bounded, to the same value."""
    lip = robustvit.convert(build_model("hf_vit").eval())
    model = robustvit.peft.get_peft_model(lip, robustvit.peft.lora_config(lip, r=2)).eval()
    bound = robustvit.lipschitz_bound(model)
    model.base_model.model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    assert model.base_model.model.vit.embeddings.patch_embeddings._forward_hooks
    assert robustvit.lipschitz_bound(model) == bound


@pytest.mark.parametrize("wrapped", [True, False])
def test_converting_a_source_with_adapters_is_refused(wrapped):
    """The converter reads the source's weights (L2 attention's query from qkv): a LoRA update there was dropped."""
    adapted = peft.get_peft_model(build_model("timm_token").eval(), peft.LoraConfig(r=2, target_modules=["qkv"]))
    with pytest.raises(ValueError, match=r"converting .*robustvit\.peft\.merged"):
        robustvit.convert(adapted if wrapped else adapted.base_model.model, mixer="l2")
    assert robustvit.is_converted(robustvit.convert(robustvit.peft.merged(adapted), mixer="l2"))


def _with_saved_head(family: str) -> tuple[nn.Module, nn.Module, list[str]]:
    """PEFT's image-classification setup: LoRA on the blocks, the head trained whole (``modules_to_save``)."""
    lip = robustvit.convert(build_model(family).eval())
    base = copy.deepcopy(lip).eval()
    heads = [name for name, _ in robustvit.families.get_family(lip).heads(lip)]
    targets = [name for name in robustvit.peft.target_modules(lip) if name not in heads]
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=targets, modules_to_save=heads)
    return robustvit.peft.get_peft_model(lip, config), base, heads


def _saved_copies(model: nn.Module, adapter: str = "default") -> list[tuple[nn.Module, nn.Module]]:
    wrappers = [m for m in model.modules() if isinstance(m, peft.utils.other.ModulesToSaveWrapper)]
    return [(wrapper.original_module, wrapper.modules_to_save[adapter]) for wrapper in wrappers]


def _train(model: nn.Module, steps: int, seed: int = 3) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    images, labels = _pixels(8, seed), torch.arange(8) % 10
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(logits_of(model(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_head_in_modules_to_save_trains_inside_the_constraint_and_its_bound_holds(family):
    model, base, heads = _with_saved_head(family)
    copies = _saved_copies(model)
    assert len(copies) == len(heads)
    for original, saved in copies:  # a deep copy keeps the rescaling (if any), with its own tracked directions
        assert is_spectrally_rescaled(saved) == is_spectrally_rescaled(original)
        if is_spectrally_rescaled(saved):
            ours, theirs = saved.parametrizations.weight[0].directions, original.parametrizations.weight[0].directions
            assert torch.equal(ours, theirs) and ours.data_ptr() != theirs.data_ptr()
            assert type(saved) is not type(original)  # its own parametrized class: see the cache in robustvit.peft
    assert any(is_spectrally_rescaled(saved) for _, saved in copies)
    _train(model, steps=4)
    images = _pixels(6, 2)
    with torch.no_grad():
        adapted, before = logits_of(model(images)), logits_of(base(images))
    assert (adapted - before).abs().max() > 1e-3
    for (original, saved), name in zip(copies, heads, strict=True):
        # The trained copy moved, stays about 1-Lipschitz; the original (what disable_adapter() runs) did not move.
        assert not torch.equal(saved.weight, original.weight)
        torch.testing.assert_close(original.weight, base.get_submodule(name).weight, atol=0, rtol=0)
        if is_spectrally_rescaled(saved):  # DeiT's pair of heads is plain, bounded together with its exact norm
            assert float(torch.linalg.matrix_norm(saved.weight.detach().double(), ord=2)) <= 1.1
    bound = robustvit.lipschitz_bound(model)
    estimate = estimate_lipschitz_lower_bound(
        model, _pixels(2, 1), steps=20, restarts=2, generator=torch.Generator().manual_seed(0)
    )
    assert 0 < estimate <= bound
    # Margin losses and certificates read the trained head, not the original: the same as the merged model's.
    merged = robustvit.peft.merged(model)
    torch.testing.assert_close(
        robustvit.losses.head_margins(model).pairwise, robustvit.losses.head_margins(merged).pairwise, rtol=1e-4, atol=0
    )
    assert not torch.allclose(
        robustvit.losses.head_margins(model).pairwise, robustvit.losses.head_margins(base).pairwise
    )
    result = robustvit.certify(model, images)
    assert result.lipschitz == pytest.approx(bound, rel=1e-6)
    certified = result.radii > 1e-5
    assert certified.any()
    radii = 0.99 * result.radii[certified]
    exact = copy.deepcopy(model).double()
    flipped = margin_pgd(exact, images[certified].double(), result.predictions[certified], radii, steps=25, restarts=1)
    assert not flipped.any()
    # merge_and_unload keeps the trained head (and the LoRA updates): same logits, same bound.
    assert not _saved_copies(merged) and robustvit.is_converted(merged)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(merged(images)), adapted, atol=1e-5, rtol=1e-5)
    assert robustvit.lipschitz_bound(merged) == pytest.approx(bound, rel=1e-4)
    # Disabled, the original head runs, and is the one bounded. (Not exactly the base model any more: training forwards
    # moved the base layers' tracked directions toward the adapted weights; the bound describes what runs.)
    with model.disable_adapter(), torch.no_grad():
        assert (logits_of(model(images)) - adapted).abs().max() > 1e-3
        for (original, _), name in zip(copies, heads, strict=True):  # what head margins and DeiT's pair bound read
            assert torch.equal(linear_weight(model.get_base_model().get_submodule(name)), original.weight)
        if len(heads) == 1:
            assert _head_path(model, heads[0]) == f"{heads[0]}.original_module"


def _head_path(model: nn.Module, head: str = "head") -> str:
    return next(e.path for e in robustvit.lipschitz_report(model).entries if e.path.startswith(f"{head}."))


def test_modules_to_save_bound_follows_the_adapter_the_forward_runs(tmp_path):
    model, base, _ = _with_saved_head("timm_token")
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"]))
    model.add_adapter("blocks_only", peft.LoraConfig(r=2, target_modules=["fc2"]))  # no copy of the head
    robustvit.peft.constrain(model)
    with torch.no_grad():
        for scale, (_, saved) in zip(
            (3.0, 0.2), [_saved_copies(model, a)[0] for a in ("default", "other")], strict=True
        ):
            saved.parametrizations.weight.original.mul_(scale)  # rescaled away: only the direction changes
            saved.bias.add_(scale)
    images = _pixels(4, 0)
    bounds = {}
    for adapter, path in (
        ("default", "modules_to_save.default"),
        ("other", "modules_to_save.other"),
        ("blocks_only", "original_module"),
    ):
        model.set_adapter(adapter)
        assert _head_path(model) == f"head.{path}"
        bounds[adapter] = robustvit.lipschitz_bound(model)
        merged = robustvit.peft.merged(model)
        assert robustvit.lipschitz_bound(merged) == pytest.approx(bounds[adapter], rel=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(merged(images), model(images), atol=1e-5, rtol=1e-5)
    model.set_adapter("default")
    with model.disable_adapter():  # untrained, so the base layers' tracked directions are the base model's
        assert _head_path(model) == "head.original_module"
        # (equal up to the verified bounds' tolerance: they are batched with the other weights of the same width)
        assert robustvit.lipschitz_bound(model) == pytest.approx(robustvit.lipschitz_bound(base), rel=1e-5)
    # PEFT's own save / load round-trips the trained head, its rescaling's directions included.
    model.eval().save_pretrained(tmp_path, selected_adapters=["default"])
    fresh = robustvit.convert(build_model("timm_token").eval())
    loaded = robustvit.peft.constrain(peft.PeftModel.from_pretrained(fresh, tmp_path).eval())
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
    assert robustvit.lipschitz_bound(loaded) == pytest.approx(robustvit.lipschitz_bound(model), rel=1e-9)
    # robustvit's own repository holds the merged model, trained head included.
    robustvit.save_pretrained(robustvit.peft.merged(model), tmp_path / "merged")
    reloaded = robustvit.from_pretrained(tmp_path / "merged", verify=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), model(images), atol=1e-5, rtol=1e-5)
    assert robustvit.lipschitz_bound(reloaded) == pytest.approx(robustvit.lipschitz_bound(model), rel=1e-4)


def test_target_modules_of_an_adapted_model_names_what_peft_can_target():
    model, _, heads = _with_saved_head("hf_vit")
    targets = robustvit.peft.target_modules(model)
    assert targets and not [t for t in targets if "base_layer" in t or "lora_" in t or t.startswith(tuple(heads))]
    assert targets == [t for t in robustvit.peft.target_modules(robustvit.peft.merged(model)) if t not in heads]
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=targets))
    robustvit.peft.constrain(model)
    model.set_adapter("second")
    assert robustvit.lipschitz_bound(model) > 0


def test_copies_peft_made_itself_are_refused_until_constrained():
    """A deep copy shares torch's parametrized class, whose cache key is the original's id: under parametrize.cached()
    (the bound engine) both read one weight, so the trained head would be bounded with the original's weight."""
    lip = robustvit.convert(build_model("timm_token").eval())
    plain = peft.get_peft_model(lip, peft.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"]))
    ((original, saved),) = _saved_copies(plain)
    with torch.no_grad():
        saved.parametrizations.weight.original.add_(
            torch.randn(saved.weight.shape, generator=torch.Generator().manual_seed(0))
        )
        with torch.nn.utils.parametrize.cached():
            assert torch.equal(original.weight, saved.weight)  # torch's pitfall, not ours
    with pytest.raises(UnsupportedModuleError, match=r"share one torch parametrized class.*robustvit\.peft\.constrain"):
        robustvit.lipschitz_bound(plain)
    robustvit.peft.constrain(plain).eval()
    with torch.no_grad(), torch.nn.utils.parametrize.cached():
        assert not torch.equal(original.weight, saved.weight)
    report = robustvit.lipschitz_report(plain)
    head = next(e.bound for e in report.entries if e.path == "head.modules_to_save.default")
    exact = float(torch.linalg.matrix_norm(saved.weight.detach().double(), ord=2))
    assert head >= exact * (1 - 1e-9) and head == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize(
    "family, saved", [("timm_token", ["blocks.1", "norm"]), ("hf_vit", ["layers.1", "embeddings"])]
)
def test_modules_to_save_inside_the_backbone_are_bounded_as_they_run(family, saved):
    lip = robustvit.convert(build_model(family).eval())
    model = robustvit.peft.get_peft_model(lip, peft.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=saved))
    _perturb_adapters(model, 0.3)  # the saved copies and LoRA factors move off the base model
    model.eval()
    bound = robustvit.lipschitz_bound(model)
    estimate = estimate_lipschitz_lower_bound(
        model, _pixels(2, 1), steps=20, restarts=2, generator=torch.Generator().manual_seed(0)
    )
    assert 0 < estimate <= bound
    merged = robustvit.peft.merged(model)
    images = _pixels(4, 0)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(merged(images)), logits_of(model(images)), atol=1e-5, rtol=1e-5)
    assert robustvit.lipschitz_bound(merged) == pytest.approx(bound, rel=1e-4)
