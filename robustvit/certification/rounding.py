"""Floating-point error analysis of a converted model's forward pass, for certificates of the deployed precision.

A model run in ``bfloat16`` / ``float16`` / ``float32`` computes ``F_hat``, not the real-valued map ``F`` (the same
weights, rounded to that precision, in exact arithmetic) whose Lipschitz bound the engine proves. ``F_hat`` is not
Lipschitz (rounding jumps), so a certificate for it needs a bound ``E`` with ``||F_hat(x) - F(x)||_2 <= E`` for
*every* input ``x`` considered (the cube ``[0, 1]^d``, or the ball being certified within it); then for ``x'`` in
the ball, ``F_hat_p(x') - F_hat_j(x') >= F_hat_p(x) - F_hat_j(x) - K_pj ||x' - x|| - 2 sqrt(2) E``: rounding is
paid at ``x`` and at ``x'``.

``E`` is composed layer by layer (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.):

* every elementary operation is exact up to a factor ``1 + d``, ``|d| <= u`` (``u = 2^-p`` of the precision);
* a dot product or sum of length ``n`` accumulated in a precision with unit roundoff ``v`` errs by at most
  ``gamma_n(v) |a| |b|`` (any summation order; ``gamma_n(v) = n v / (1 - n v)``, Thm 3.5) and its result is then
  rounded to the precision (``+u``). ``accumulation`` names ``v``'s precision: by default the precision itself
  (the worst case, e.g. reduced-precision reductions in cuBLAS); ``torch.float32`` when the backend accumulates in
  float32 (CPU oneDNN, and PyTorch reductions of half types). FFT/Winograd convolutions are not covered;
* the error of a layer's input, ``E_in``, is carried through the layer by its Lipschitz bound, and the layer adds
  its own rounding at the computed input, ``E_out = L E_in + local(N_in)``, where ``N_in`` bounds the norm of the
  computed input over all of ``[0, 1]^d`` (from ``||x|| <= sqrt(d)``: ``N_out = ||f(0)|| + L N_in + local``) and,
  for a certificate of an image ``x`` on a ball of radius ``r``, also by ``||a(x)|| + L_prefix r + E_in`` with the
  exact activation ``a(x)`` of a float64 forward pass and ``L_prefix`` the bound of the map from the pixels to it.

Norms are l2 (Frobenius over a whole token tensor of one image). ``|||W|||_2 <= ||W||_F`` bounds entrywise absolute
matrices. A layer type without a rule here is refused (:class:`~robustvit.errors.UnsupportedModuleError`): GELU
(library accuracy unspecified), L2 attention, SLL/CPL and the transformers family are not analysed yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.layers import DropPath, Mlp, PatchEmbed
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn.utils import parametrize

from robustvit._utils import module_type as _module_type
from robustvit.errors import UnsupportedModuleError
from robustvit.layers import CenterNorm, LipBlock, LipResidual, MinMax, NormalizedConv2d, PrefixPool, TokenShift
from robustvit.lipschitz import is_spectrally_rescaled, lipschitz_bound
from robustvit.lipschitz.spectral import conv_spectral_norm
from robustvit.registry import Registry

__all__ = ["PRECISIONS", "Rounding", "forward_error_bound", "unit_roundoff"]

PRECISIONS = (torch.float32, torch.float16, torch.bfloat16)


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2`` of a floating-point dtype (round to nearest)."""
    return torch.finfo(dtype).eps / 2


@dataclass(frozen=True)
class Rounding:
    """Unit roundoffs of the operations (``u``) and of dot-product accumulation (``v``)."""

    u: float
    v: float

    def gamma(self, n: int, unit: float | None = None) -> float:
        """``gamma_n = n u / (1 - n u)``; ``inf`` once ``n u >= 1`` (no bound)."""
        nu = n * (self.u if unit is None else unit)
        return nu / (1 - nu) if nu < 1 else math.inf

    def dot(self, n: int) -> float:
        """Relative error of a length-``n`` dot product or sum (accumulated in ``v``, the result rounded to ``u``)."""
        g = self.gamma(n, self.v)
        return g + self.u * (1 + g)


@dataclass
class State:
    """``norm``: bound on the computed activation's l2 norm over the inputs considered; ``error``: bound on its
    distance to the exact activation; ``lip``: Lipschitz bound of the exact map from the pixels to it."""

    norm: float
    error: float
    lip: float


Rule = Callable[[nn.Module, State, "Analysis"], State]
ROUNDING_RULES: Registry[Rule] = Registry("rounding rule", keys=type)
"""The floating-point error analysis of each exact module type; fill it with :func:`register_rounding`."""


def register_rounding(*types: type) -> Callable[[Rule], Rule]:
    """Register ``rule(module, state, analysis) -> State`` for modules of exactly these types (once per type)."""

    def decorator(rule: Rule) -> Rule:
        for module_type in types:
            ROUNDING_RULES.register(module_type, rule)
        return rule

    return decorator


class Analysis:
    """Walks a model in forward order; ``tokens[id(module)]`` is the number of rows a per-token layer maps.

    With ``norms`` (the exact input norm of each layer at an image ``x``) and ``radius``, the inputs considered are
    the ball of that radius around ``x`` (within the cube): a layer's computed input norm is then also at most
    ``||a(x)|| + lip * radius + error``, usually far below the bound over the whole cube.
    """

    def __init__(self, rounding: Rounding, tokens: dict, norms: dict[int, float] | None, radius: float):
        self.r = rounding
        self.tokens = tokens
        self.norms = norms or {}
        self.radius = radius

    def visit(self, module: nn.Module, state: State) -> State:
        module_type = _module_type(module)  # not parametrize's: a PEFT modules_to_save wrapper would pass for its child
        rule = ROUNDING_RULES.get(module_type)
        if rule is None:
            raise UnsupportedModuleError(
                f"no floating-point error analysis for {module_type.__name__}: certify(..., precision=...) cannot "
                "certify this model in that precision (certify the exact function with precision=None)"
            )
        if id(module) in self.norms:
            local = self.norms[id(module)] + state.lip * self.radius + state.error
            state = State(min(state.norm, local), state.error, state.lip)
        return rule(module, state, self)


def _weight_error(module: nn.Module, r: Rounding) -> float:
    """Relative error of the weight the deployed forward uses: a spectral rescaling divides by a bound rounded to the
    precision (2 roundings); other parametrizations are refused."""
    if not parametrize.is_parametrized(module):
        return 0.0
    if set(module.parametrizations) == {"weight"} and is_spectrally_rescaled(module):
        if len(module.parametrizations.weight) == 1:
            return r.gamma(2)
    raise UnsupportedModuleError(f"no floating-point error analysis for the parametrization of {type(module).__name__}")


def _affine(state: State, lip: float, abs_weight: float, bias_norm: float, n: int, weight_error: float, r: Rounding):
    """``y = W x + b`` on the computed input: exact part ``L E_in``, rounding ``c (|||W||| N + ||b||)``."""
    c = r.dot(n + 1) * (1 + weight_error) + weight_error
    local = c * (abs_weight * state.norm + bias_norm)
    return State(lip * state.norm + bias_norm + local, lip * state.error + local, lip * state.lip)


@register_rounding(nn.Linear)
def _linear(module: nn.Linear, state: State, analysis: Analysis) -> State:
    weight = module.weight.detach().to(torch.float64)
    rows = analysis.tokens[id(module)]
    bias = math.sqrt(rows) * float(module.bias.detach().double().norm()) if module.bias is not None else 0.0
    lip = lipschitz_bound(nn.Sequential(module))
    return _affine(
        state, lip, float(weight.norm()), bias, module.in_features, _weight_error(module, analysis.r), analysis.r
    )


@register_rounding(NormalizedConv2d)
def _normalized_conv(module: NormalizedConv2d, state: State, analysis: Analysis) -> State:
    r = analysis.r
    mean, std = module.input_mean.double(), module.input_std.double()
    pixels_per_channel = analysis.tokens[id(module)]
    s_min = float(std.min())
    mean_norm = math.sqrt(pixels_per_channel) * float(mean.norm())
    # z = (x - m) / s: two roundings; its norm and the input error carried through the normalization
    z_norm = (state.norm + mean_norm) / s_min * (1 + r.gamma(2))
    z_error = state.error / s_min + r.gamma(2) * (state.norm + mean_norm) / s_min
    patches = analysis.tokens[("patches", id(module))]
    bias = math.sqrt(patches) * float(module.bias.detach().double().norm()) if module.bias is not None else 0.0
    n = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    kernel = module.weight.detach().double()
    lip = float(conv_spectral_norm(module).detach())
    z = State(z_norm, z_error, state.lip / s_min)
    out = _affine(z, lip, float(kernel.norm()), bias, n, _weight_error(module, r), r)
    return out


@register_rounding(CenterNorm)
def _center_norm(module: CenterNorm, state: State, analysis: Analysis) -> State:
    r = analysis.r
    rows = analysis.tokens[id(module)]
    ws = module.dim / (module.dim - 1) * float(module.weight.detach().double().abs().max())
    bias = math.sqrt(rows) * float(module.bias.detach().double().norm())
    mean_error = r.dot(module.dim) + r.u  # the per-token mean: a sum of dim terms, then a division
    local = (2 * mean_error + 3 * r.gamma(4)) * ws * state.norm + 2 * r.u * bias
    lip = float(module.lipschitz_bound().detach())
    return State(lip * state.norm + bias + local, lip * state.error + local, lip * state.lip)


@register_rounding(nn.Identity, nn.Flatten, nn.Dropout, DropPath, MinMax, nn.ReLU, TokenShift)
def _exact_one_lipschitz(module: nn.Module, state: State, analysis: Analysis) -> State:
    return state  # copies, comparisons, zero fills: no rounding; 1-Lipschitz maps with f(0) = 0 and ||f(x)|| <= ||x||


@register_rounding(PrefixPool)
def _prefix_pool(module: PrefixPool, state: State, analysis: Analysis) -> State:
    lip = float(module.lipschitz_bound().detach())
    local = (analysis.r.dot(module.num_patches) + analysis.r.u) * lip * state.norm
    return State(lip * state.norm + local, lip * state.error + local, lip * state.lip)


@register_rounding(nn.Sequential)
def _sequential(module: nn.Sequential, state: State, analysis: Analysis) -> State:
    for child in module.children():
        state = analysis.visit(child, state)
    return state


@register_rounding(Mlp)
def _mlp(module: Mlp, state: State, analysis: Analysis) -> State:
    for name in ("fc1", "act", "drop1", "norm", "fc2", "drop2"):
        state = analysis.visit(getattr(module, name), state)
    return state


@register_rounding(LipBlock)
def _lip_block(module: LipBlock, state: State, analysis: Analysis) -> State:
    return analysis.visit(module.mlp, analysis.visit(module.mixer, state))


@register_rounding(LipResidual)
def _lip_residual(module: LipResidual, state: State, analysis: Analysis) -> State:
    u = analysis.r.u
    alpha = float(module.alpha.detach().double().abs().max())
    branch = analysis.visit(module.fn, state)
    scaled = alpha * branch.norm
    local = u * scaled + analysis.r.gamma(2) * (state.norm + 2 * scaled)  # alpha * f, then x + that
    lip = state.lip + alpha * branch.lip
    return State(state.norm + scaled + local, state.error + alpha * branch.error + local, lip)


@register_rounding(PatchEmbed)
def _patch_embed(module: PatchEmbed, state: State, analysis: Analysis) -> State:
    return analysis.visit(module.norm, analysis.visit(module.proj, state))  # flatten / transpose: exact


def _param_norm(tensor: torch.Tensor | None) -> float:
    return float(tensor.detach().double().norm()) if tensor is not None else 0.0


@register_rounding(VisionTransformer, VisionTransformerDistilled)
def _vision_transformer(model: VisionTransformer, state: State, analysis: Analysis) -> State:
    u = analysis.r.u
    state = analysis.visit(model.patch_embed, state)
    prefix = math.sqrt(sum(_param_norm(getattr(model, n, None)) ** 2 for n in ("cls_token", "dist_token", "reg_token")))
    pos = _param_norm(model.pos_embed)
    state = State(state.norm + prefix, state.error, state.lip)  # concatenating exact prefix tokens
    rounding = u * (state.norm + pos)
    state = State(state.norm + pos + rounding, state.error + rounding, state.lip)  # + pos_embed
    for name in ("pos_drop", "patch_drop", "norm_pre", "blocks", "norm"):
        state = analysis.visit(getattr(model, name), state)
    if model.global_pool == "avg":
        n = model.patch_embed.num_patches + (model.num_prefix_tokens if model.pool_include_prefix else 0)
        local = (analysis.r.dot(n) + u) * state.norm / math.sqrt(n)
        root = math.sqrt(n)
        state = State(state.norm / root + local, state.error / root + local, state.lip / root)
    elif model.global_pool != "token":
        raise UnsupportedModuleError(f"no floating-point error analysis for global_pool={model.global_pool!r}")
    for name in ("fc_norm", "head_drop"):
        state = analysis.visit(getattr(model, name), state)
    if isinstance(model, VisionTransformerDistilled):  # (head(x0) + head_dist(x1)) / 2
        a, b = analysis.visit(model.head, state), analysis.visit(model.head_dist, state)
        local = u * (a.norm + b.norm) / 2
        return State((a.norm + b.norm) / 2 + local, (a.error + b.error) / 2 + local, (a.lip + b.lip) / 2)
    return analysis.visit(model.head, state)


def _rows_and_norms(model: nn.Module, image: torch.Tensor) -> tuple[dict, dict[int, float]]:
    """Rows each per-token layer maps for one image, and the exact input norm of every layer with a rounding rule
    (a float64 forward pass of ``image``, shaped ``(1, C, H, W)``)."""
    rows: dict = {}
    norms: dict[int, float] = {}
    calls: dict[int, int] = {}

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        calls[id(module)] = calls.get(id(module), 0) + 1
        norms[id(module)] = float(args[0].double().norm())
        if isinstance(module, NormalizedConv2d):
            rows[id(module)] = args[0].shape[-1] * args[0].shape[-2]
            rows[("patches", id(module))] = output.shape[-1] * output.shape[-2]
        elif isinstance(module, CenterNorm):
            rows[id(module)] = args[0].numel() // module.dim
        elif parametrize.type_before_parametrizations(module) is nn.Linear:
            rows[id(module)] = args[0].numel() // module.in_features

    handles = [m.register_forward_hook(record) for m in model.modules()]
    try:
        with torch.no_grad():
            model(image.to(torch.float64))
    finally:
        for handle in handles:
            handle.remove()
    return rows, {key: norm for key, norm in norms.items() if calls[key] == 1}  # a module run twice: no single norm


def forward_error_bound(
    exact: nn.Module,
    image_shape: tuple[int, ...],
    precision: torch.dtype,
    accumulation: torch.dtype | None = None,
    *,
    image: torch.Tensor | None = None,
    radius: float = math.inf,
) -> float:
    """Bound ``E`` on ``||F_hat(x') - F(x')||_2`` (logits) for every ``x'`` in ``[0, 1]^d`` (within ``radius`` of
    ``image`` when both are given: tighter, and what a certificate of that image needs).

    Args:
        exact: the model's exact function: its weights rounded to ``precision``, held in float64 (eval mode).
        image_shape: ``(C, H, W)`` of one input.
        precision: the dtype the model runs in.
        accumulation: the dtype dot products and sums accumulate in (default: ``precision``, the worst case).
        image: ``(C, H, W)`` pixels in [0, 1]; with ``radius``, the ball the bound has to hold on.
        radius: l2 radius of that ball.

    Example:
        >>> exact = robustvit.convert(vit, activation="minmax")  # GELU has no rounding analysis
        >>> forward_error_bound(exact.double(), (3, 32, 32), torch.bfloat16, torch.float32) > 0
        True
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision}")
    accumulation = accumulation or precision
    if unit_roundoff(accumulation) > unit_roundoff(precision):
        raise ValueError(f"accumulation {accumulation} is coarser than the precision {precision}")
    rounding = Rounding(unit_roundoff(precision), unit_roundoff(accumulation))
    local = image is not None and math.isfinite(radius)
    reference = image[None] if local else torch.zeros((1, *image_shape), dtype=torch.float64)
    rows, norms = _rows_and_norms(exact, reference)
    analysis = Analysis(rounding, rows, norms if local else None, radius if local else math.inf)
    d = math.prod(image_shape)
    start = State(math.sqrt(d) * (1 + rounding.u), rounding.u * math.sqrt(d), 1.0)  # pixels rounded to the precision
    error = analysis.visit(exact, start).error
    return error * (1 + 1e-6) if math.isfinite(error) else math.inf  # the analysis' own float64 arithmetic
