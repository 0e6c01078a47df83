"""LipShiFT rebuilt from robustvit's layers: LiResConv's merged-kernel bound, the unit-row head, and end-to-end
certificates attacked like the converted models' (tests/test_certify.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import IMG, NUM_CLASSES
from test_certify import margin_pgd
from test_layers import F64, check_bound, gen
from torch import nn

import robustvit
from robustvit.data import load_image_dataset, stack_examples
from robustvit.errors import UnsupportedModuleError
from robustvit.layers import LiResConv
from robustvit.lipschitz.estimate import estimate_lipschitz_lower_bound
from robustvit.lipschitz.spectral import conv_spectral_norm
from robustvit.lipshift import create_lipshift
from robustvit.losses import LOSSES, head_margins


def dense_operator(layer: LiResConv, channels: int) -> torch.Tensor:
    """The matrix of ``x -> layer(x) - layer(0)`` on tokens, column by column."""
    tokens = layer.grid_size[0] * layer.grid_size[1]
    basis = torch.eye(tokens * channels, dtype=F64).reshape(-1, tokens, channels)
    with torch.no_grad():
        return (layer(basis) - layer(torch.zeros_like(basis[:1]))).reshape(len(basis), -1).T


@pytest.mark.parametrize(("channels", "grid", "alpha"), [(4, (3, 3), 0.2), (6, (4, 2), 1.5), (8, (2, 5), -0.7)])
def test_lires_conv_bound_covers_the_exact_operator_norm(channels, grid, alpha):
    torch.manual_seed(0)
    layer = LiResConv(channels, grid, alpha_init=alpha).double()
    with torch.no_grad():
        layer.alpha.mul_(torch.linspace(0.5, 1.5, channels, dtype=F64))
    exact = float(torch.linalg.matrix_norm(dense_operator(layer, channels), ord=2))
    bound = check_bound(layer, torch.randn(6, grid[0] * grid[1], channels, generator=gen(1), dtype=F64))
    assert exact <= bound * (1 + 1e-9)
    # Merging the identity into the kernel beats the triangle inequality LipShiFT's code uses.
    triangle = 1 + layer.alpha.abs().max() * conv_spectral_norm(layer.conv, input_size=grid)
    assert bound <= float(triangle.detach()) * (1 + 1e-9)


def test_lires_conv_bound_is_differentiable_and_refuses_bad_input():
    layer = LiResConv(4, (2, 2))
    layer.lipschitz_bound().backward()
    assert layer.alpha.grad is not None and layer.conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="2x2 grid"):
        layer(torch.randn(1, 5, 4))
    with pytest.raises(ValueError, match="odd"):
        LiResConv(4, (2, 2), kernel_size=2)


@pytest.fixture(scope="module")
def lipshift() -> nn.Module:
    torch.manual_seed(0)
    return create_lipshift(NUM_CLASSES, img_size=IMG, patch_size=8, embed_dim=24, depth=2)


def test_lipshift_head_rows_are_unit_and_model_is_not_convertible(lipshift):
    rows = lipshift.head.weight.norm(dim=1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-6)
    with pytest.raises(UnsupportedModuleError, match="LipBlock"):
        robustvit.convert(lipshift)


def test_lipshift_end_to_end_bound_survives_gradient_ascent(lipshift):
    model = lipshift.double().eval()
    bound = robustvit.lipschitz_bound(model)
    images = torch.rand(4, 3, IMG, IMG, generator=gen(0), dtype=F64)
    estimate = estimate_lipschitz_lower_bound(model, images, steps=60, restarts=2, generator=gen(0))
    assert 0 < estimate <= bound
    lipshift.float()


@pytest.mark.slow
def test_trained_lipshift_certificates_survive_pgd(lipshift):
    train_x, train_y = stack_examples(load_image_dataset(split="train", image_size=IMG), 256)
    test_x, test_y = stack_examples(load_image_dataset(split="test", image_size=IMG), 32)
    model = lipshift.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(12):
        index = torch.arange(step * 64, (step + 1) * 64) % len(train_x)
        loss = LOSSES["emma"](model(train_x[index]), train_y[index], eps=36 / 255, margins=head_margins(model))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    result = robustvit.certify(model, test_x, test_y)
    assert result.features_lipschitz is not None  # pairwise head radii, as for converted ViTs
    ok = result.radii > 1e-4
    assert int(ok.sum()) >= 4
    exact = model.double()
    assert not margin_pgd(exact, test_x[ok].double(), result.predictions[ok], 0.99 * result.radii[ok]).any()
    model.float()
