"""Lipschitz-margin losses: margin CE and EMMA against CE, differentiable head margins, eps schedule, registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import IMG, NUM_CLASSES, build_model
from torch import nn

import robustvit
from robustvit import losses
from robustvit.certification.lipschitz import lipschitz_head
from robustvit.errors import UnsupportedModuleError
from robustvit.families import get_family
from robustvit.layers import CenterNorm, LipResidual
from robustvit.losses import (
    LOSSES,
    EpsSchedule,
    HeadMargins,
    distillation_loss,
    emma_loss,
    head_margins,
    margin_cross_entropy,
    register_loss,
)
from robustvit.registry import Registry


def _batch(seed: int = 0, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, NUM_CLASSES, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    return logits, labels


def _uniform_margins(value: float) -> HeadMargins:
    return HeadMargins(value * (1 - torch.eye(NUM_CLASSES, dtype=torch.float64)))


def _converted(name: str = "timm_token", seed: int = 0) -> nn.Module:
    return robustvit.convert(build_model(name, seed), activation="minmax")


@pytest.mark.parametrize("name", ["margin", "emma"])
def test_huge_margins_cost_more_than_cross_entropy_and_grow_with_eps(name: str) -> None:
    logits, labels = _batch()
    ce = float(F.cross_entropy(logits, labels))
    margins = _uniform_margins(1e3)
    values = [float(LOSSES[name](logits, labels, eps=eps, margins=margins)) for eps in (0.01, 0.1, 1.0)]
    assert all(v > ce + 0.1 for v in values)
    assert values == sorted(values)  # a larger radius asks for more margin
    # Every wrong logit is raised by at least 1% of eps * K (EMMA's floor); the margin CE raises it by all of it.
    floor = 1.0 if name == "margin" else 0.01
    assert values[-1] >= float(F.cross_entropy(logits + floor * margins.pairwise[labels], labels)) - 1e-9
    if name == "emma":  # with eps * K beyond every gap, each wrong class is lifted at least level with the label
        assert values[-1] >= math.log(NUM_CLASSES) - 1e-9
    else:  # the margin CE is unbounded: 1000 more per wrong logit
        assert values[-1] > 900


@pytest.mark.parametrize("name", ["margin", "emma", "ce"])
def test_zero_eps_is_plain_cross_entropy(name: str) -> None:
    logits, labels = _batch(seed=1)
    value = LOSSES[name](logits, labels, eps=0.0, margins=_uniform_margins(5.0))
    torch.testing.assert_close(value, F.cross_entropy(logits, labels), rtol=1e-12, atol=1e-12)


def test_margin_cross_entropy_raises_each_wrong_logit_by_eps_times_its_pairwise_constant() -> None:
    logits, labels = _batch(seed=2)
    pairwise = torch.rand(NUM_CLASSES, NUM_CLASSES, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    pairwise = pairwise + pairwise.T
    pairwise.fill_diagonal_(0)
    eps = 0.3
    expected = F.cross_entropy(logits + eps * pairwise[labels], labels)
    torch.testing.assert_close(margin_cross_entropy(logits, labels, eps=eps, margins=HeadMargins(pairwise)), expected)


def test_emma_pushes_each_class_only_as_far_as_needed() -> None:
    # Label 0; class 1 trails by 0.5 * eps * K (factor 0.5: lifted level with the label, no further), class 2 by
    # 10 eps K (factor 1: the full eps * K), class 3 leads (factor floor 0.01): hand-computed logits after the shift.
    eps, k = 0.2, 2.0
    logits = torch.tensor([[0.0, -0.5 * eps * k, -10 * eps * k, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0])
    margins = HeadMargins(k * (1 - torch.eye(4, dtype=torch.float64)))
    raised = torch.tensor([[0.0, 0.0, -10 * eps * k + eps * k, 1.0 + 0.01 * eps * k]], dtype=torch.float64)
    torch.testing.assert_close(emma_loss(logits, labels, eps=eps, margins=margins), F.cross_entropy(raised, labels))


def test_emma_factor_takes_no_gradient() -> None:
    logits, labels = _batch(seed=4)
    logits.requires_grad_(True)
    margins = _uniform_margins(2.0)
    emma_loss(logits, labels, eps=0.3, margins=margins).backward()
    # With the factors as constants the loss is CE of (logits - z_y + c): its gradient is softmax - onehot, shifted.
    k = margins.pairwise[labels]
    shifted = (logits - logits.gather(1, labels[:, None])).detach()
    factor = (-shifted / (0.3 * k).clamp_min(1e-12)).clamp(0.01, 1.0)
    probs = F.softmax(shifted + factor * 0.3 * k, dim=1)
    onehot = F.one_hot(labels, NUM_CLASSES).double()
    expected = (probs - onehot) / len(labels)
    expected = expected - onehot * expected.sum(dim=1, keepdim=True)  # d(-z_y)/dz_y through the shift
    torch.testing.assert_close(logits.grad, expected)


@pytest.mark.parametrize("name", ["timm_token", "timm_distilled", "hf_vit"])
def test_head_margins_are_the_certificates_pairwise_constants(name: str) -> None:
    model = _converted(name).eval()
    pairwise = head_margins(model).pairwise.detach()
    assert pairwise.dtype == torch.float64 and pairwise.shape == (NUM_CLASSES, NUM_CLASSES)
    assert torch.all(pairwise.diagonal() == 0) and torch.all(pairwise + torch.eye(NUM_CLASSES) > 0)
    torch.testing.assert_close(pairwise, pairwise.T)
    # K_ij = L_features * ||w_i - w_j|| with the certificate's head. Training differentiates the plain Gram bounds of
    # the rescaled layers, the certificate uses the verified ones (also upper bounds, within 2e-6 of them).
    head = lipschitz_head(model)
    weight = get_family(model).head_weight(model)[0].detach().double()
    torch.testing.assert_close(pairwise, head.features_lipschitz * torch.cdist(weight, weight), rtol=1e-5, atol=0)


def test_head_margins_are_differentiable_in_norm_gammas_residual_alphas_and_head() -> None:
    model = _converted("timm_token").train()
    head_margins(model).pairwise.sum().backward()
    center_norms = [m for m in model.modules() if isinstance(m, CenterNorm)]
    residuals = [m for m in model.modules() if isinstance(m, LipResidual)]
    assert center_norms and residuals
    for module in center_norms:
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    for module in residuals:
        assert module.alpha.grad is not None and module.alpha.grad.abs().sum() > 0
    head = model.head.parametrizations.weight.original
    assert head.grad is not None and head.grad.abs().sum() > 0
    # A margin loss trains them: one SGD step on EMMA changes the gammas and alphas.
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images = torch.rand(8, 3, IMG, IMG, generator=torch.Generator().manual_seed(6))
    labels = torch.arange(8) % NUM_CLASSES
    LOSSES["emma"](model(images), labels, eps=0.5, margins=head_margins(model)).backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert any(name.endswith("alpha") for name in changed)
    assert any("norm.weight" in name for name in changed)


def _mlp() -> nn.Sequential:
    torch.manual_seed(7)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))


def test_head_margins_of_a_non_family_model_use_sqrt2_times_the_global_bound() -> None:
    model = _mlp()
    model.num_classes = NUM_CLASSES  # how head_margins learns the number of classes of an arbitrary module
    pairwise = head_margins(model).pairwise
    bound = robustvit.lipschitz_bound(model)
    expected = math.sqrt(2) * bound * (1 - torch.eye(NUM_CLASSES, dtype=torch.float64))
    torch.testing.assert_close(pairwise.detach(), expected, rtol=1e-5, atol=0)  # Gram vs verified bounds
    pairwise.sum().backward()  # differentiable in the weights too
    assert model[1].weight.grad is not None and model[1].weight.grad.abs().sum() > 0
    # ... and the certificate's global fallback divides by the same constant.
    images = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(8))
    result = robustvit.certify(model, images)
    assert result.features_lipschitz is None and result.lipschitz == pytest.approx(bound, rel=1e-12)


def test_head_margins_without_a_class_count_is_a_clear_error() -> None:
    with pytest.raises(UnsupportedModuleError, match="how many classes"):
        head_margins(_mlp())


def test_eps_schedule_ramps_linearly_then_holds() -> None:
    schedule = EpsSchedule(eps=0.2, start=0.1, end=2.0, ramp=0.5)
    assert schedule(0.0) == pytest.approx(0.02)
    assert schedule(0.25) == pytest.approx(0.2 * (0.1 + 1.9 * 0.5))
    assert schedule(0.5) == pytest.approx(0.4)
    assert schedule(0.9) == schedule(1.0) == pytest.approx(0.4)
    assert schedule(-1.0) == schedule(0.0) and schedule(7.0) == schedule(1.0)  # progress is clamped
    ramp_all = EpsSchedule(eps=36 / 255, start=0.0, end=1.0, ramp=1.0)
    assert [ramp_all(t) for t in (0.0, 0.5, 1.0)] == pytest.approx([0.0, 18 / 255, 36 / 255])
    decreasing = EpsSchedule(eps=1.0, start=2.0, end=1.0, ramp=1.0)
    assert decreasing(0.5) == pytest.approx(1.5)


@pytest.mark.parametrize(
    "kwargs", [dict(eps=-0.1), dict(eps=0.1, start=-1.0), dict(eps=0.1, end=-1.0), dict(eps=0.1, ramp=0.0)]
)
def test_eps_schedule_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="invalid eps schedule"):
        EpsSchedule(**kwargs)


def test_distillation_loss_is_zero_on_identical_logits_and_positive_otherwise() -> None:
    logits, _ = _batch(seed=9)
    assert float(distillation_loss(logits, logits.clone())) == pytest.approx(0.0, abs=1e-12)
    assert float(distillation_loss(logits, logits + 5.0)) == pytest.approx(0.0, abs=1e-12)  # softmax shift
    other, _ = _batch(seed=10)
    for temperature in (1.0, 2.0, 4.0):
        assert float(distillation_loss(logits, other, temperature=temperature)) > 1e-3
    # T^2 KL(teacher || student) at temperature T, per sample.
    t = 2.0
    teacher, student = F.softmax(other / t, dim=1), F.log_softmax(logits / t, dim=1)
    expected = (teacher * (teacher.log() - student)).sum(dim=1).mean() * t * t
    torch.testing.assert_close(distillation_loss(logits, other, temperature=t), expected)
    # The teacher gets no gradient.
    student_logits, teacher_logits = logits.clone().requires_grad_(True), other.clone().requires_grad_(True)
    distillation_loss(student_logits, teacher_logits).backward()
    assert student_logits.grad.abs().sum() > 0 and teacher_logits.grad is None


def test_registry_refuses_duplicate_names_and_registers_new_ones(monkeypatch) -> None:
    assert LOSSES.list() == ["ce", "margin", "emma"]
    with pytest.raises(ValueError, match="loss 'emma' is already registered"):
        register_loss("emma", margin_cross_entropy)
    assert LOSSES["emma"] is emma_loss  # unchanged by the refused registration
    with pytest.raises(KeyError, match="unknown loss 'hinge'; known: ce, margin, emma"):
        LOSSES["hinge"]

    monkeypatch.setattr(losses, "LOSSES", Registry("loss"))  # the real registry stays as it is

    @register_loss("hinge")
    def hinge(logits, labels, *, eps, margins):
        return (logits.amax(dim=1) - logits.gather(1, labels[:, None])[:, 0]).mean()

    assert losses.LOSSES["hinge"] is hinge and register_loss("hinge2", hinge) is hinge
    with pytest.raises(ValueError, match="already registered"):
        register_loss("hinge", hinge)
