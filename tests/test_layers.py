"""Each layer's ``lipschitz_bound()`` against empirical lower bounds: gradient ascent on pairs of inputs
(:func:`estimate_lipschitz_lower_bound`) and, on tiny inputs, the exact Jacobian norm at many points.

All layers run in float64 here, so the empirical numbers carry no float32 rounding and can be compared with the
bounds directly.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from scipy.stats import norm as normal
from torch import nn
from torch.func import functional_call, jacrev
from torch.nn.utils import parametrize

from robustvit.errors import UnsupportedModuleError
from robustvit.layers import CenterNorm, L2Attention, LipResidual, MinMax, NormalizedConv2d, TokenShift
from robustvit.lipschitz import GELU_LIPSCHITZ, lipschitz_bound, spectral_rescale
from robustvit.lipschitz.estimate import estimate_lipschitz_lower_bound
from robustvit.lipschitz.spectral import conv_spectral_norm

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def jacobian_norm(fn, x: torch.Tensor) -> float:
    """Exact spectral norm of the Jacobian of ``fn`` (batch of one) at ``x`` (no batch dim)."""
    jac = torch.autograd.functional.jacobian(lambda z: fn(z.unsqueeze(0)).squeeze(0), x)
    out_numel = jac.numel() // x.numel()
    return float(torch.linalg.matrix_norm(jac.reshape(out_numel, x.numel()).double(), ord=2))


def check_bound(layer: nn.Module, inputs: torch.Tensor, *, steps: int = 150, jac_points: int = 4) -> float:
    """Assert ``layer.lipschitz_bound()`` is a float64 scalar tensor >= every empirical lower bound; return it."""
    bound_t = layer.lipschitz_bound()
    assert isinstance(bound_t, torch.Tensor) and bound_t.dtype == F64 and bound_t.numel() == 1
    bound = float(bound_t.detach())
    estimate = estimate_lipschitz_lower_bound(layer, inputs, steps=steps, restarts=4, generator=gen(0))
    assert estimate <= bound * (1 + 1e-9), f"{type(layer).__name__}: empirical {estimate} > bound {bound}"
    for point in inputs[:jac_points]:
        jac = jacobian_norm(layer, point)
        assert jac <= bound * (1 + 1e-9), f"{type(layer).__name__}: Jacobian norm {jac} > bound {bound}"
    return bound


# ----------------------------------------------------------------------------------------------------------
# CenterNorm
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3, 16])
def test_center_norm_bound(dim):
    layer = CenterNorm(dim).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(dim, generator=gen(dim), dtype=F64) * 2)  # negative entries too
        layer.bias.copy_(torch.randn(dim, generator=gen(dim + 1), dtype=F64))
    bound = check_bound(layer, torch.randn(6, 5, dim, generator=gen(3), dtype=F64) * 3)
    assert bound == pytest.approx(dim / (dim - 1) * float(layer.weight.detach().abs().max()), rel=1e-12)
    # Tight when gamma is constant: the Jacobian is then c * gamma * (I - 11^T / D), of norm exactly the bound.
    with torch.no_grad():
        layer.weight.fill_(-1.7)
    x = torch.randn(dim, dtype=F64, generator=gen(4))
    assert jacobian_norm(layer, x) == pytest.approx(float(layer.lipschitz_bound().detach()), rel=1e-9)


def test_center_norm_refuses_one_channel():
    with pytest.raises(ValueError):
        CenterNorm(1)


# ----------------------------------------------------------------------------------------------------------
# MinMax
# ----------------------------------------------------------------------------------------------------------


def test_minmax_bound_and_odd_dims():
    layer = MinMax()
    x = torch.randn(5, 3, 8, generator=gen(0), dtype=F64)
    assert float(check_bound(layer, x)) == 1.0
    out = layer(x)
    pairs = x.unflatten(-1, (-1, 2))
    assert torch.equal(out.unflatten(-1, (-1, 2)), pairs.sort(dim=-1).values)
    for bad in (torch.randn(2, 3), torch.randn(4, 7)):
        with pytest.raises(ValueError, match="even"):
            layer(bad)


# ----------------------------------------------------------------------------------------------------------
# TokenShift
# ----------------------------------------------------------------------------------------------------------


def shiftvit_reference(grid: torch.Tensor, g: int) -> torch.Tensor:
    """ShiftViT's ``shift_feat`` on a ``(B, H, W, C)`` grid, written index by index: channel group 0 moves left,
    1 right, 2 up, 3 down (content at ``w + 1`` lands at ``w`` for 'left'), vacated positions are zero."""
    batch, height, width, channels = grid.shape
    out = torch.zeros_like(grid)
    out[..., 4 * g :] = grid[..., 4 * g :]
    for h in range(height):
        for w in range(width):
            if w + 1 < width:
                out[:, h, w, 0:g] = grid[:, h, w + 1, 0:g]
            if w - 1 >= 0:
                out[:, h, w, g : 2 * g] = grid[:, h, w - 1, g : 2 * g]
            if h + 1 < height:
                out[:, h, w, 2 * g : 3 * g] = grid[:, h + 1, w, 2 * g : 3 * g]
            if h - 1 >= 0:
                out[:, h, w, 3 * g : 4 * g] = grid[:, h - 1, w, 3 * g : 4 * g]
    return out


@pytest.mark.parametrize(("grid_size", "prefix", "channels", "n_div"), [((3, 4), 1, 12, 12), ((2, 5), 3, 26, 4)])
def test_token_shift_moves_as_documented(grid_size, prefix, channels, n_div):
    height, width = grid_size
    layer = TokenShift(grid_size, n_div=n_div, num_prefix_tokens=prefix)
    tokens = prefix + height * width
    x = torch.arange(2 * tokens * channels, dtype=F64).reshape(2, tokens, channels) + 1  # all distinct, non-zero
    out = layer(x)
    assert torch.equal(out[:, :prefix], x[:, :prefix])  # prefix tokens pass unchanged
    grid = x[:, prefix:].reshape(2, height, width, channels)  # row-major patch tokens
    expected = shiftvit_reference(grid, channels // n_div)
    assert torch.equal(out[:, prefix:].reshape(2, height, width, channels), expected)


def test_token_shift_bound_is_exactly_one():
    layer = TokenShift((3, 3), n_div=4, num_prefix_tokens=2)
    bound = check_bound(layer, torch.randn(4, 11, 8, generator=gen(1), dtype=F64))
    assert bound == 1.0
    # A linear map: its exact norm is 1 (an unshifted channel is copied as is).
    assert jacobian_norm(layer, torch.randn(11, 8, dtype=F64)) == pytest.approx(1.0)


def test_token_shift_refuses_wrong_token_count_and_small_n_div():
    layer = TokenShift((4, 4), n_div=12, num_prefix_tokens=1)
    with pytest.raises(ValueError, match="tokens"):
        layer(torch.randn(2, 16, 24))
    with pytest.raises(ValueError):
        TokenShift((4, 4), n_div=3)


# ----------------------------------------------------------------------------------------------------------
# LipResidual
# ----------------------------------------------------------------------------------------------------------


def test_lip_residual_bound():
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 6)).double()
    alpha = torch.tensor([0.5, -2.0, 0.1, 1.0, 0.0, -0.3])
    layer = LipResidual(branch, dim=6, alpha_init=alpha).double()
    bound = check_bound(layer, torch.randn(6, 6, generator=gen(2), dtype=F64) * 2)
    w1 = torch.linalg.matrix_norm(branch[0].weight.detach(), ord=2)
    w2 = torch.linalg.matrix_norm(branch[2].weight.detach(), ord=2)
    assert bound == pytest.approx(1 + 2.0 * GELU_LIPSCHITZ * float(w1 * w2), rel=1e-4)
    assert bound >= 1 + 2.0 * GELU_LIPSCHITZ * float(w1 * w2)
    with pytest.raises(ValueError):
        LipResidual(nn.Identity(), dim=4, alpha_init=torch.ones(3))


# ----------------------------------------------------------------------------------------------------------
# L2Attention: the published Kim et al. bound, attacked hard
# ----------------------------------------------------------------------------------------------------------


def l2_attention(dim: int, heads: int, tokens: int, seed: int, q_scale: float = 1.0) -> L2Attention:
    torch.manual_seed(seed)
    layer = L2Attention(dim, heads, tokens).double()
    with torch.no_grad():
        layer.q_proj.weight.mul_(q_scale)
    return layer


def jacobian_ascent(layer: L2Attention, x0: torch.Tensor, *, steps: int, learn_weights: bool) -> float:
    """Largest ``||J(X)||_2 / layer.lipschitz_bound()`` found by Adam on the inputs (and the weights).

    The bound is differentiable in the weights, so optimising both looks for the weights where the bound is
    weakest; a sound bound keeps the ratio <= 1 everywhere.
    """
    params = {k: v.detach().clone().requires_grad_(learn_weights) for k, v in layer.named_parameters()}
    x = x0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x, *params.values()] if learn_weights else [x], lr=0.05)

    def single(z, p):
        return functional_call(layer, p, (z.unsqueeze(0),)).squeeze(0)

    jac_fn = torch.vmap(jacrev(single), in_dims=(0, None))
    best = 0.0
    n = x0[0].numel()
    for _ in range(steps):
        jac = jac_fn(x, params).reshape(x.shape[0], n, n)
        bound = _bound_with(layer, params)
        ratio = torch.linalg.matrix_norm(jac, ord=2) / bound
        best = max(best, float(ratio.detach().max()))
        optimizer.zero_grad()
        (-torch.log(ratio).sum()).backward()
        optimizer.step()
    return best


def _bound_with(layer: L2Attention, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """``layer.lipschitz_bound()`` evaluated with ``params`` swapped in (differentiably)."""
    saved = {k: getattr(layer, k.split(".")[0])._parameters[k.split(".")[1]] for k in params}
    try:
        for k, v in params.items():
            mod, attr = k.split(".")
            getattr(layer, mod)._parameters[attr] = v
        return layer.lipschitz_bound()
    finally:
        for k, v in saved.items():
            mod, attr = k.split(".")
            getattr(layer, mod)._parameters[attr] = v


@pytest.mark.parametrize(("dim", "heads", "tokens"), [(4, 1, 2), (6, 2, 3), (8, 2, 5)])
def test_l2_attention_bound_random_weights(dim, heads, tokens):
    layer = l2_attention(dim, heads, tokens, seed=dim)
    x = torch.randn(6, tokens, dim, generator=gen(dim), dtype=F64)
    check_bound(layer, torch.cat((x, 4 * x)), steps=100)
    assert jacobian_ascent(layer, torch.cat((x, 4 * x)), steps=40, learn_weights=False) <= 1.0


@pytest.mark.parametrize("q_scale", [8.0, 40.0])
def test_l2_attention_bound_holds_for_large_query_weights(q_scale):
    """The map is homogeneous of degree 2 in W_Q (f(X; cW) has Jacobian c^2 J(cX; W)), so any valid bound must
    grow like ||W_Q||^2. A bound linear in ||W_Q|| is broken by simply scaling W_Q up."""
    layer = l2_attention(4, 1, 3, seed=1, q_scale=q_scale)
    x = torch.randn(8, 3, 4, generator=gen(5), dtype=F64) / q_scale  # where the softmax is not saturated
    check_bound(layer, x, steps=150)


@pytest.mark.parametrize(("dim", "heads", "tokens"), [(2, 1, 2), (4, 2, 3)])
def test_l2_attention_bound_against_joint_weight_and_input_attack(dim, heads, tokens):
    """Adam on inputs AND weights, maximising ||J|| / bound: for a sound bound the ratio stays <= 1.
    (With a bound quadratic in ||W_Q|| the ratio saturates near 0.4 for two tokens and 0.33 for three.)"""
    layer = l2_attention(dim, heads, tokens, seed=0)
    x = torch.randn(8, tokens, dim, generator=gen(7), dtype=F64) * 2
    ratio = jacobian_ascent(layer, x, steps=120, learn_weights=True)
    assert ratio <= 1.0, f"the L2 attention bound is broken: Jacobian norm / bound = {ratio:.3f}"


def test_l2_attention_refuses_wrong_token_count_and_heads():
    layer = L2Attention(8, 2, 5)
    with pytest.raises(ValueError, match="tokens"):
        layer(torch.randn(1, 4, 8))
    with pytest.raises(ValueError):
        L2Attention(9, 2, 5)


# ----------------------------------------------------------------------------------------------------------
# NormalizedConv2d
# ----------------------------------------------------------------------------------------------------------


def test_normalized_conv_bound_includes_input_std():
    std = (0.1, 0.5, 0.9)
    conv = NormalizedConv2d(3, 5, kernel_size=4, stride=4, mean=(0.3, 0.5, 0.7), std=std).double()
    x = torch.rand(4, 3, 8, 8, generator=gen(0), dtype=F64)
    bound = check_bound(conv, x, jac_points=2)
    plain = nn.Conv2d(3, 5, 4, stride=4).double()
    plain.load_state_dict(conv.state_dict(), strict=False)
    assert bound == pytest.approx(float(conv_spectral_norm(plain).detach()) / 0.1, rel=1e-6)
    # The exact norm: the conv matrix times diag(1 / std) per input channel.
    jac = jacobian_norm(conv, x[0])
    assert jac <= bound * (1 + 1e-9)
    assert jac >= 0.5 * bound  # not vacuous: the 1/min(std) really is there
    # normalisation happens inside: forward on raw pixels == plain conv on normalised pixels
    mean_t = torch.tensor((0.3, 0.5, 0.7), dtype=F64).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=F64).view(1, 3, 1, 1)
    assert torch.allclose(conv(x), plain((x - mean_t) / std_t), atol=1e-6)


def test_normalized_conv_refuses_bad_input_and_stats():
    conv = NormalizedConv2d(3, 4, 4, stride=4, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match="3"):
        conv(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError):
        conv(torch.rand(3, 8, 8))
    with pytest.raises(ValueError):
        NormalizedConv2d(3, 4, 4, stride=4, mean=(0.5,) * 2, std=(0.5,) * 3)
    with pytest.raises(ValueError):
        NormalizedConv2d(3, 4, 4, stride=4, mean=(0.5,) * 3, std=(0.5, 0.0, 0.5))


def test_normalized_conv_non_patchify_needs_input_size():
    conv = NormalizedConv2d(3, 4, 3, padding=1, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises((ValueError, UnsupportedModuleError), match="input"):
        lipschitz_bound(conv)


def test_normalized_conv_from_conv_copies_weights():
    conv = nn.Conv2d(3, 6, 4, stride=4)
    norm_conv = NormalizedConv2d.from_conv(conv, mean=(0.0,) * 3, std=(1.0,) * 3)
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(norm_conv(x), conv(x))


# ----------------------------------------------------------------------------------------------------------
# spectral_rescale
# ----------------------------------------------------------------------------------------------------------


def unrolled_norm(conv: nn.Conv2d, size: tuple[int, int]) -> float:
    n = conv.in_channels * size[0] * size[1]
    basis = torch.eye(n, dtype=F64).reshape(n, conv.in_channels, *size)
    out = nn.functional.conv2d(
        basis, conv.weight.detach().double(), None, conv.stride, conv.padding, conv.dilation, conv.groups
    )
    return float(torch.linalg.matrix_norm(out.reshape(n, -1).T, ord=2))


RESCALE_CASES = {
    "linear": (
        lambda: nn.Linear(12, 7),
        None,
        lambda m: float(torch.linalg.matrix_norm(m.weight.detach().double(), 2)),
    ),
    "patchify": (lambda: nn.Conv2d(3, 6, 4, stride=4), None, lambda m: unrolled_norm(m, (8, 8))),
    "conv3x3": (lambda: nn.Conv2d(3, 4, 3, padding=1), (6, 6), lambda m: unrolled_norm(m, (6, 6))),
}


@pytest.mark.parametrize("case", sorted(RESCALE_CASES))
def test_spectral_rescale_effective_norm_at_most_one(case):
    make, input_size, exact = RESCALE_CASES[case]
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        layer.weight.mul_(25.0)  # far from 1 before rescaling
    spectral_rescale(layer, input_size=input_size)
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        norm = exact(layer)
        assert norm <= 1 + 1e-6, f"{case} ({mode}): effective operator norm {norm}"
        # tight for dense maps; the 3x3 conv's divisor is a torus bound, looser on a 6x6 input
        assert norm >= (0.95 if input_size is None else 0.8), f"{case} ({mode}): rescaling lost too much ({norm})"
    if case != "conv3x3":  # the engine can bound these without an input size (its own bound adds <= 1e-5)
        assert lipschitz_bound(layer) <= 1 + 2e-5


def _effective_norm(layer: nn.Linear) -> float:
    with torch.no_grad():  # a read with autograd on, in train mode, would itself take a subspace step
        return float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2))


def test_spectral_rescale_eval_is_a_function_of_weight_and_directions():
    """Eval forwards recompute ``W / ||W V||_{S_p}`` every time: no cache, so no write to ``W`` (in place, through
    ``.data``, by ``load_state_dict`` or by assignment) can leave the layer computing with a stale divisor."""
    from robustvit.lipschitz.rescale import SCHATTEN_P

    torch.manual_seed(0)
    layer = spectral_rescale(nn.Linear(10, 6)).eval()
    raw = layer.parametrizations.weight.original
    directions = layer.parametrizations.weight[0].directions
    x = torch.randn(5, 10)

    def expected() -> torch.Tensor:
        sigma = torch.linalg.svdvals(raw.detach() @ directions.T)
        divisor = sigma.max() * ((sigma / sigma.max()) ** SCHATTEN_P).sum() ** (1 / SCHATTEN_P)
        return F.linear(x, raw.detach() / divisor, layer.bias)

    assert 0.95 <= _effective_norm(layer) <= 1 + 1e-6  # the initial directions are the top ones
    first = layer(x)
    assert torch.equal(first, layer(x)) and torch.allclose(first, expected(), atol=1e-6)
    with torch.no_grad():
        raw.mul_(7.0)  # same top directions: the function does not change
    assert torch.allclose(layer(x), first, atol=1e-6)
    raw.data.copy_(torch.randn(6, 10) * 3)  # no version bump, and other top directions
    assert torch.allclose(layer(x), expected(), atol=1e-6)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert "parametrizations.weight.0.directions" in state  # saved with the weights
    state["parametrizations.weight.original"] = torch.randn(6, 10) * 13
    layer.load_state_dict(state)
    assert torch.allclose(layer(x), expected(), atol=1e-6)
    with torch.no_grad():
        layer.weight = torch.randn(6, 10) * 50
    assert torch.allclose(layer(x), expected(), atol=1e-6)
    assert torch.equal(directions, layer.parametrizations.weight[0].directions)  # eval never moves them
    # Whatever the divisor is (here the directions are stale, so it may be below the norm), the bound covers the layer.
    assert lipschitz_bound(layer) >= _effective_norm(layer) * (1 - 1e-12)


def test_spectral_rescale_training_forwards_track_the_norm():
    """Each training forward moves the directions one subspace-iteration step: after the weight jumps, the effective
    norm converges back to (just below) 1. Forwards without autograd (and in eval mode) do not move them."""
    torch.manual_seed(0)
    layer = spectral_rescale(nn.Linear(64, 8))  # 8 of 64 input directions tracked
    rescaler = layer.parametrizations.weight[0]
    raw = layer.parametrizations.weight.original
    with torch.no_grad():
        raw.copy_(torch.randn(8, 64) * torch.linspace(0.2, 3.0, 64))  # a clear top singular value
    x = torch.randn(3, 64)
    before = rescaler.directions.clone()
    with torch.no_grad():
        layer(x)
    assert torch.equal(rescaler.directions, before)
    stale_gap = abs(_effective_norm(layer) - 1)  # directions of the old weight
    gaps = []
    for _ in range(30):
        layer(x).sum().backward()
        gaps.append(abs(_effective_norm(layer) - 1))
        with torch.no_grad():
            raw.mul_(1.0)  # what an optimizer step does to the version counter: the next forward steps again
    assert not torch.equal(rescaler.directions, before)
    assert stale_gap > 10 * max(gaps[-5:]) and _effective_norm(layer) <= 1 + 1e-6 and gaps[-1] < 0.03, (stale_gap, gaps)
    # A second forward on an unchanged weight (a margin loss, an analysis) leaves the directions where they are.
    layer(x)
    settled = rescaler.directions.clone()
    layer(x).sum().backward()
    assert torch.equal(rescaler.directions, settled)


def test_spectral_rescale_copies_and_saved_weights_compute_the_same_function(tmp_path):
    from safetensors.torch import load_model, save_model

    torch.manual_seed(0)
    layer = spectral_rescale(nn.Conv2d(3, 4, 3, padding=1), input_size=(6, 6))
    for _ in range(3):  # move the directions away from their initial values
        with torch.no_grad():
            layer.parametrizations.weight.original.add_(0.3 * torch.randn_like(layer.weight))
        layer(torch.rand(2, 3, 6, 6)).sum().backward()
    layer.eval()
    x = torch.rand(2, 3, 6, 6)
    copied = copy.deepcopy(layer)
    save_model(layer, str(tmp_path / "layer.safetensors"))
    loaded = spectral_rescale(nn.Conv2d(3, 4, 3, padding=1), input_size=(6, 6)).eval()
    load_model(loaded, str(tmp_path / "layer.safetensors"))
    assert torch.equal(layer(x), copied(x)) and torch.equal(layer(x), loaded(x))
    assert torch.allclose(copied.to(torch.float64)(x.double()), layer(x).double(), atol=1e-6)


def test_certify_after_a_data_write_describes_the_held_model():
    """A write through ``weight.data`` after an eval forward (old-style optimizers, EMA code) must not split the
    held model from what ``certify`` and ``lipschitz_bound`` describe: no prediction of the held model flips inside
    its certified radius, and its empirical Lipschitz ratio stays under the bound."""
    from conftest import build_model

    import robustvit

    model = robustvit.convert(build_model("timm_avg_ls_reg")).eval()
    images = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model(images)  # an eval forward first: where a cached divisor would have been filled
    rescaled = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]
    generator = torch.Generator().manual_seed(1)
    for module in rescaled[1:3]:  # raw weights with other top directions and 20x the norm, written behind autograd
        raw = module.parametrizations.weight.original
        raw.data.copy_(20 * torch.randn(raw.shape, generator=generator) * raw.detach().norm() / raw.numel() ** 0.5)
    result = robustvit.certify(model, images)
    with torch.no_grad():
        held = model(images)
    assert torch.equal(held.argmax(1), result.predictions)
    ok = result.radii > 1e-6
    assert int(ok.sum()) >= 4
    # PGD on max_{j != p} z_j - z_p within 0.99 of each image's radius, on the float32 model as held.
    x, target, eps = images[ok], result.predictions[ok], 0.99 * result.radii[ok].float().view(-1, 1, 1, 1)
    adv = x.clone()
    for _ in range(40):
        adv.requires_grad_(True)
        logits = model(adv)
        assert not (logits.detach().argmax(1) != target).any(), "a prediction flipped inside its certified radius"
        gap = logits.scatter(1, target[:, None], -math.inf).amax(1) - logits.gather(1, target[:, None])[:, 0]
        (grad,) = torch.autograd.grad(gap.sum(), adv)
        with torch.no_grad():
            delta = adv + 2.5 * eps / 40 * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1) - x
            delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)).clamp(max=1)
            adv = (x + delta).clamp(0, 1)
    lower = estimate_lipschitz_lower_bound(model, images[:4], steps=50, restarts=2)
    assert lower <= robustvit.lipschitz_bound(model)


def test_spectral_rescale_refusals():
    layer = spectral_rescale(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="already"):
        spectral_rescale(layer)
    with pytest.raises(UnsupportedModuleError):
        spectral_rescale(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="input_size"):
        spectral_rescale(nn.Conv2d(3, 4, 3, padding=1))
    with pytest.raises(ValueError, match="padding_mode"):
        spectral_rescale(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), input_size=(8, 8))
    assert parametrize.is_parametrized(layer, "weight")


def test_spectral_rescale_trains():
    torch.manual_seed(0)
    layer = spectral_rescale(nn.Linear(8, 8))
    layer(torch.randn(4, 8)).pow(2).sum().backward()
    assert layer.parametrizations.weight.original.grad is not None


# ----------------------------------------------------------------------------------------------------------
# GELU
# ----------------------------------------------------------------------------------------------------------


def test_gelu_constant_covers_true_max_slope():
    def slope_exact(x):
        return normal.cdf(x) + x * normal.pdf(x)

    def slope_tanh(x):
        c = math.sqrt(2 / math.pi)
        t = math.tanh(c * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)

    for slope in (slope_exact, slope_tanh):
        res = minimize_scalar(lambda x, f=slope: -f(x), bounds=(0.5, 3.0), method="bounded", options={"xatol": 1e-12})
        max_slope = -res.fun
        assert max_slope == pytest.approx(1.1289, abs=2e-4)
        # the most negative slope is at -x*, of magnitude max_slope - 1 < 1
        assert GELU_LIPSCHITZ >= max_slope, (GELU_LIPSCHITZ, max_slope)
    for approximate in ("none", "tanh"):
        gelu = nn.GELU(approximate=approximate)
        est = estimate_lipschitz_lower_bound(gelu, torch.randn(4, 16, dtype=F64, generator=gen(0)), steps=100)
        assert 1.12 < est <= GELU_LIPSCHITZ
        assert lipschitz_bound(gelu) == GELU_LIPSCHITZ


# ----------------------------------------------------------------------------------------------------------
# The empirical estimator itself (a lower bound: below the exact constant, and close to it on easy maps)
# ----------------------------------------------------------------------------------------------------------


def test_estimator_is_a_tight_lower_bound_on_linear_maps():
    torch.manual_seed(0)
    layer = nn.Linear(12, 5).double()
    exact = float(torch.linalg.matrix_norm(layer.weight.detach(), ord=2))
    est = estimate_lipschitz_lower_bound(layer, torch.randn(3, 12, dtype=F64), steps=100, generator=gen(0))
    assert exact * (1 - 1e-3) <= est <= exact * (1 + 1e-9)


def test_estimator_restores_state_and_leaves_no_grads():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.Linear(6, 2)).train()
    net[2].weight.requires_grad_(False)
    flags = [p.requires_grad for p in net.parameters()]
    estimate_lipschitz_lower_bound(net, torch.randn(2, 6), steps=5)
    assert net.training and [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())


def test_estimator_accepts_callables_and_logits_objects():
    class Out:
        def __init__(self, logits):
            self.logits = logits

    w = torch.randn(4, 4, dtype=F64, generator=gen(1))
    exact = float(torch.linalg.matrix_norm(w, ord=2))
    est = estimate_lipschitz_lower_bound(lambda x: Out(x @ w.T), torch.randn(2, 4, dtype=F64), steps=80)
    assert exact * 0.99 <= est <= exact * (1 + 1e-9)
    assert estimate_lipschitz_lower_bound(lambda x: torch.zeros_like(x), torch.randn(2, 3), steps=3) == 0.0
    with pytest.raises(ValueError):
        estimate_lipschitz_lower_bound(nn.Identity(), torch.empty(0, 3))


# ----------------------------------------------------------------------------------------------------------
# SLL and CPL: residual layers, 1-Lipschitz by construction; the bound is recomputed from the weights
# ----------------------------------------------------------------------------------------------------------


def _scaled_layer(layer_type, dim: int, inner: int, seed: int, scale: float):
    torch.manual_seed(seed)
    layer = layer_type(dim, inner).double()
    with torch.no_grad():
        layer.weight.mul_(scale)
        layer.bias.normal_(0, scale)
        if hasattr(layer, "log_q"):
            layer.log_q.normal_(0, 2.0)  # far from AOL's q = 1
    return layer


@pytest.mark.parametrize("layer_type", ["SLL", "CPL"])
@pytest.mark.parametrize(("dim", "inner", "scale"), [(4, 8, 1.0), (6, 3, 30.0), (8, 16, 0.05)])
def test_sll_cpl_bound_is_one_and_attacked(layer_type, dim, inner, scale):
    from robustvit import layers

    layer = _scaled_layer(getattr(layers, layer_type), dim, inner, seed=dim + inner, scale=scale)
    inputs = torch.randn(8, 5, dim, dtype=F64, generator=gen(dim)) * scale
    bound = check_bound(layer, inputs, steps=200)
    assert bound <= 1 + 1e-9
    # the Jacobian reaches 1 (identity where every ReLU is off): the bound is tight
    assert jacobian_norm(layer, -1e3 * torch.ones(1, dim, dtype=F64) * layer.weight.sum(0).sign()) >= 1 - 1e-12


def test_residual_gradient_bound_is_recomputed_not_trusted():
    """With a step longer than the construction allows, the rule reports the larger constant, and it holds."""
    from robustvit.layers.gradient_residual import residual_gradient_bound

    torch.manual_seed(0)
    weight = torch.randn(6, 4, dtype=F64)
    bias = torch.randn(6, dtype=F64)
    for factor in (1.0, 1.5, 4.0):
        step = factor / torch.linalg.matrix_norm(weight, ord=2) ** 2 * torch.ones(6, dtype=F64)

        def fn(x, step=step):
            return x - 2 * torch.relu(x @ weight.T + bias) * step @ weight

        bound = float(residual_gradient_bound(weight, step))
        assert bound == pytest.approx(max(1.0, 2 * factor - 1), rel=1e-6)
        x = torch.randn(16, 4, dtype=F64, generator=gen(1))
        assert estimate_lipschitz_lower_bound(fn, x, steps=150, restarts=4, generator=gen(0)) <= bound * (1 + 1e-9)
        # all ReLUs on: the Jacobian is I - 2 factor W^T W / ||W||^2, of norm 2 factor - 1 when that exceeds 1
        on = jacobian_norm(fn, torch.linalg.pinv(weight) @ (10 - bias)) if factor > 1 else 1.0
        assert on == pytest.approx(max(1.0, 2 * factor - 1), rel=1e-6)


def test_sll_and_cpl_train_and_keep_their_bound():
    from robustvit.layers import CPL, SLL

    torch.manual_seed(0)
    for layer in (SLL(6, 12), CPL(6, 12)):
        opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        x, target = torch.randn(32, 6), torch.randn(32, 6)
        first = None
        for _ in range(20):
            loss = (layer(x) - target).pow(2).mean()
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < first
        assert lipschitz_bound(layer) <= 1 + 1e-6
