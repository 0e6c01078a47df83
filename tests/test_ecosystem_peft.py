"""PEFT LoRA on converted models trains inside the Lipschitz constraint, its bound is attacked, and
merge_and_unload() keeps both the finetune and the bound."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import IMG, build_model, logits_of
from test_certify import margin_pgd
from torch import nn

import robustvit
import robustvit.peft
from robustvit.errors import UnsupportedModuleError
from robustvit.lipschitz.estimate import estimate_lipschitz_lower_bound

FAMILIES = ("timm_token", "hf_vit", "timm_distilled")


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
    for layer in _lora_layers(model):  # about 1: the tracked directions lag the last optimizer step (rescale.py)
        assert float(torch.linalg.matrix_norm(layer.effective_weight().detach().double(), ord=2)) <= 1.1
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


def test_plain_peft_on_a_converted_model_is_refused_by_the_bound():
    lip = robustvit.convert(build_model("timm_token").eval())
    plain = peft.get_peft_model(lip, peft.LoraConfig(r=4, target_modules=["fc1"]))
    with pytest.raises(UnsupportedModuleError, match=r"robustvit\.peft\.get_peft_model"):
        robustvit.lipschitz_bound(plain)


@pytest.mark.parametrize(
    ("config", "error"),
    [
        (dict(lora_dropout=0.1), ValueError),
        (dict(use_dora=True), ValueError),
    ],
)
def test_lora_options_outside_the_constraint_are_refused(config, error):
    lip = robustvit.convert(build_model("timm_token").eval())
    with pytest.raises(error, match="does not support"):
        robustvit.peft.get_peft_model(lip, robustvit.peft.lora_config(lip, r=2, **config))


def test_other_tuners_are_not_implemented():
    lip = robustvit.convert(build_model("timm_token").eval())
    with pytest.raises(NotImplementedError, match="only LoRA"):
        robustvit.peft.get_peft_model(lip, peft.IA3Config(target_modules=["fc1"], feedforward_modules=["fc1"]))


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
