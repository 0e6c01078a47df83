"""PGD / FGSM against a linear classifier, whose exact distance to the decision boundary is known."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import timm
import torch
from torch import nn

from robustvit.certification.attacks import fgsm, pgd, robust_accuracy

SHAPE = (3, 4, 4)
DIM = 3 * 4 * 4


def _linear_problem(seed: int = 0, num: int = 64) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 2-class linear model, images in [0.3, 0.7] (away from the box edges), labels = clean predictions.

    Returns the model, the images, the labels and the signed logit margins ``w.x + b`` with ``w = W[1] - W[0]``.
    """
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(DIM, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, DIM, generator=g))
        # Boundary through the centre of the data, so points lie on both sides at varied distances.
        w = model[1].weight[1] - model[1].weight[0]
        model[1].bias.copy_(torch.tensor([0.0, -0.5 * float(w.sum())]))
    images = 0.3 + 0.4 * torch.rand(num, *SHAPE, generator=g)
    with torch.no_grad():
        logits = model(images)
    margins = logits[:, 1] - logits[:, 0]
    return model, images, logits.argmax(-1), margins


def _distances(model: nn.Module, margins: torch.Tensor, norm: str) -> torch.Tensor:
    """Exact distance to the boundary: |w.x + b| / ||w||_dual (dual of l2 is l2, dual of linf is l1)."""
    w = (model[1].weight[1] - model[1].weight[0]).detach()
    dual = w.norm(p=2) if norm == "l2" else w.norm(p=1)
    return margins.abs() / dual


def _ball_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)


def _eps_between_points(distances: torch.Tensor) -> float:
    """Median distance: about half the points are closer than eps and half farther."""
    return float(distances.median())


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_flips_exactly_the_points_closer_than_eps(norm: str) -> None:
    model, images, labels, margins = _linear_problem()
    dist = _distances(model, margins, norm)
    eps = _eps_between_points(dist)
    # Points within 2% of eps are ties up to the attack's convergence; the claim is about the others.
    decided = (dist - eps).abs() > 0.02 * eps
    close, far = decided & (dist < eps), decided & (dist > eps)
    assert close.sum() >= 10 and far.sum() >= 10

    adv = pgd(
        model, images, labels, eps, norm=norm, steps=100, step_size=eps / 4, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        flipped = model(adv).argmax(-1) != labels
    assert flipped[close].all()
    assert not flipped[far].any()

    assert adv.min() >= 0 and adv.max() <= 1
    assert (_ball_norm(adv - images, norm) <= eps + 1e-6).all()
    assert not adv.requires_grad


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_fgsm_is_optimal_on_a_linear_model(norm: str) -> None:
    # One full step along the dual direction is the exact worst case of a linear model.
    model, images, labels, margins = _linear_problem(seed=2)
    dist = _distances(model, margins, norm)
    eps = _eps_between_points(dist)
    decided = (dist - eps).abs() > 1e-3 * eps

    adv = fgsm(model, images, labels, eps, norm=norm)
    with torch.no_grad():
        flipped = model(adv).argmax(-1) != labels
    assert torch.equal(flipped[decided], (dist < eps)[decided])
    assert (_ball_norm(adv - images, norm) <= eps + 1e-6).all()
    assert adv.min() >= 0 and adv.max() <= 1


@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_robust_accuracy_matches_exact_distances(attack: str, norm: str) -> None:
    model, images, labels, margins = _linear_problem(seed=3)
    dist = _distances(model, margins, norm)
    eps = _eps_between_points(dist)
    decided = (dist - eps).abs() > 0.02 * eps
    kwargs = {"steps": 100, "step_size": eps / 4} if attack == "pgd" else {}

    acc = robust_accuracy(
        model, images[decided], labels[decided], eps, norm=norm, attack=attack, batch_size=7, **kwargs
    )
    assert acc == pytest.approx(float((dist[decided] > eps).double().mean()))


def test_misclassified_images_are_never_robust_and_pgd_keeps_them() -> None:
    model, images, labels, _ = _linear_problem(seed=4, num=16)
    wrong = 1 - labels
    # Already misclassified: the clean images are the best adversarial examples and are returned unchanged.
    assert torch.equal(pgd(model, images, wrong, 0.1), images)
    assert robust_accuracy(model, images, wrong, 0.1, attack="fgsm") == 0.0
    assert robust_accuracy(model, images, labels, 0.0) == 1.0


def test_pgd_outputs_stay_in_box_and_ball_near_the_edges() -> None:
    model, _, _, _ = _linear_problem(seed=5, num=8)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, *SHAPE, generator=g).round()  # pixels exactly at 0 or 1
    labels = torch.randint(0, 2, (8,), generator=g)
    for norm, eps in [("l2", 2.0), ("linf", 0.3)]:
        adv = pgd(model, images, labels, eps, norm=norm, steps=5, restarts=2, generator=g)
        assert adv.shape == images.shape
        assert adv.min() >= 0 and adv.max() <= 1
        assert (_ball_norm(adv - images, norm) <= eps + 1e-6).all()


class _ModeRecorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(DIM, 2)
        self.dropout = nn.Dropout(0.5)
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training or self.dropout.training)
        return self.dropout(self.linear(x.flatten(1)))


@pytest.mark.parametrize("attack", [pgd, fgsm])
def test_attacks_run_in_eval_mode_restore_modes_and_leave_parameters_alone(attack) -> None:
    model = _ModeRecorder()
    model.train()
    model.dropout.eval()  # mixed modes must come back exactly
    model.linear.bias.requires_grad_(False)
    images = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1])

    attack(model, images, labels, 0.1, norm="l2")

    assert model.seen_training and not any(model.seen_training)
    assert model.training and model.linear.training and not model.dropout.training
    assert model.linear.weight.requires_grad and not model.linear.bias.requires_grad
    assert model.linear.weight.grad is None and model.linear.bias.grad is None


def test_eps_zero_returns_the_images() -> None:
    model, images, labels, _ = _linear_problem(num=4)
    for adv in (pgd(model, images, labels, 0.0), fgsm(model, images, labels, 0.0)):
        assert torch.equal(adv, images)
        assert adv.data_ptr() != images.data_ptr()


def test_pgd_is_reproducible_with_a_seeded_generator() -> None:
    model, images, labels, _ = _linear_problem(num=8)
    first = pgd(model, images, labels, 0.05, steps=3, generator=torch.Generator().manual_seed(7))
    second = pgd(model, images, labels, 0.05, steps=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)


def test_bad_arguments_raise() -> None:
    model, images, labels, _ = _linear_problem(num=4)
    with pytest.raises(ValueError, match="'l1'"):
        pgd(model, images, labels, 0.1, norm="l1")
    with pytest.raises(ValueError, match="'l1'"):
        fgsm(model, images, labels, 0.1, norm="l1")
    with pytest.raises(ValueError, match="-0.1"):
        pgd(model, images, labels, -0.1)
    with pytest.raises(ValueError, match="nan"):
        fgsm(model, images, labels, float("nan"))
    with pytest.raises(ValueError, match="steps"):
        pgd(model, images, labels, 0.1, steps=0)
    with pytest.raises(ValueError, match="restarts"):
        pgd(model, images, labels, 0.1, restarts=0)
    with pytest.raises(ValueError, match="step_size"):
        pgd(model, images, labels, 0.1, step_size=-1.0)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        pgd(model, images, labels[:3], 0.1)
    with pytest.raises(KeyError, match="unknown attack 'cw'; known: fgsm, pgd"):
        robust_accuracy(model, images, labels, 0.1, attack="cw")


def test_models_returning_an_output_with_logits_are_supported() -> None:
    linear, images, labels, margins = _linear_problem(seed=6, num=16)

    class HFStyle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = linear

        def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(logits=self.inner(pixel_values))

    dist = _distances(linear, margins, "linf")
    eps = _eps_between_points(dist)
    decided = (dist - eps).abs() > 1e-3 * eps
    acc = robust_accuracy(HFStyle(), images[decided], labels[decided], eps, norm="linf", attack="fgsm")
    assert acc == pytest.approx(float((dist[decided] > eps).double().mean()))


def test_timm_tiny_vit_smoke() -> None:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=1, num_classes=10
    )
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 7])
    for norm, eps in [("l2", 0.5), ("linf", 4 / 255)]:
        adv = pgd(model, images, labels, eps, norm=norm, steps=2, generator=torch.Generator().manual_seed(0))
        assert adv.shape == images.shape and adv.dtype == images.dtype
        assert adv.min() >= 0 and adv.max() <= 1
        assert (_ball_norm(adv - images, norm) <= eps + 1e-6).all()
    assert model.training  # timm models are created in train mode; the attack must not change that
    assert all(p.grad is None for p in model.parameters())
    acc = robust_accuracy(model, images, labels, 0.5, steps=2)
    assert 0.0 <= acc <= 1.0
