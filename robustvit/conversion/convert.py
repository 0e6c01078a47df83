"""``robustvit.convert``: a pretrained ViT into a Lipschitz-bounded model with a sound end-to-end bound.

What changes (LipShiFT / ShiftViT / LipsFormer recipe):

* the input normalization moves inside the model (:class:`~robustvit.layers.NormalizedConv2d`): the converted
  model takes pixels in [0, 1];
* attention becomes a parameter-free :class:`~robustvit.layers.TokenShift` (``mixer="shift"``) or tied L2
  attention (``mixer="l2"``);
* every LayerNorm becomes a :class:`~robustvit.layers.CenterNorm`; residual branches become
  :class:`~robustvit.layers.LipResidual` with a learnable per-channel ``alpha`` (LayerScale folds into it);
* every Linear/Conv2d is spectrally rescaled (:func:`~robustvit.lipschitz.spectral_rescale`), and the scale each
  rescaling removes is moved, exactly, where the function allows: the first MLP layer's into the CenterNorm before
  it, the second's into the residual ``alpha``, the head's into the norm before the head, and the patch
  embedding's out of the residual stream (embeddings divided, norms and alphas compensated).

So apart from LayerNorm -> CenterNorm and the mixer, the converted function equals the source's. Two options trade
that exactness for a start that margin training can use (measured in ``bench/bench_transfer.py``):
``singular_value_power`` flattens the weights' spectra (keeping their singular vectors) and ``residual_budget`` caps
the residual stack's bound by shrinking the residual weights.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import robustvit.peft  # noqa: F401  (PEFT tuner layers put on converted models train inside the constraint)
from robustvit._utils import check_images, refuse_adapters
from robustvit.conversion import timm_metadata, transformers_metadata  # noqa: F401  (their LIBRARY_METADATA entries)
from robustvit.conversion.choices import RMS_NORMS, build_attention_pool, build_block
from robustvit.conversion.config import ConvertConfig
from robustvit.conversion.metadata import LIBRARY_METADATA
from robustvit.errors import UnsupportedModuleError
from robustvit.families import RMS_NORM_TYPES, ViTParts, get_family
from robustvit.layers import (
    CPL,
    SLL,
    CenterNorm,
    L2Attention,
    LipBlock,
    LipResidual,
    NormalizedConv2d,
    PrefixPool,
    fit_residual_budget,
)
from robustvit.lipschitz.rescale import is_spectrally_rescaled, spectral_rescale

__all__ = ["convert", "export", "is_converted"]


def _substitute_norm(norm: nn.Module, input_scale: float, config: ConvertConfig) -> nn.Module:
    """The Lipschitz substitute of ``norm`` on inputs whose per-token std (RMS for an RMSNorm) is ``input_scale``."""
    gamma = RMS_NORM_TYPES.get(type(norm))
    if gamma is None:
        return _center_norm(norm, input_scale)
    if len(norm.normalized_shape) != 1:
        raise UnsupportedModuleError(f"expected an RMSNorm over the last dimension, got {norm!r}")
    dim = norm.normalized_shape[0]
    weight = gamma(norm)
    weight = weight.detach() if weight is not None else torch.ones(dim)
    return RMS_NORMS[config.rms_norm](dim, weight, input_scale).to(device=weight.device, dtype=weight.dtype)


def _center_norm(norm: nn.Module, input_std: float) -> CenterNorm:
    """A CenterNorm matching LayerNorm ``norm`` on inputs whose per-token std is ``input_std``."""
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise UnsupportedModuleError(
            f"expected a LayerNorm or an RMSNorm over the last dimension, got {norm!r}"
            " (register an RMSNorm class in robustvit.families.RMS_NORM_TYPES)"
        )
    dim = norm.normalized_shape[0]
    ref = norm.weight if norm.weight is not None else torch.ones(dim)
    center = CenterNorm(dim).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        gamma = norm.weight.detach() if norm.weight is not None else torch.ones(dim)
        # CenterNorm multiplies by D/(D-1); LayerNorm divides by the token std.
        center.weight.copy_(gamma * (dim - 1) / dim / input_std)
        if norm.bias is not None:
            center.bias.copy_(norm.bias.detach())
    return center


@torch.no_grad()
def _calibrate(model: nn.Module, parts: ViTParts, images: Tensor, mean: Tensor, std: Tensor) -> dict[int, float]:
    """Mean per-token std (RMS for an RMSNorm) at the input of every norm of the source model, keyed by ``id(norm)``."""
    norms = [n for n in (parts.patch_norm, parts.pre_norm, parts.final_norm, parts.head_norm) if n is not None]
    norms += [n for b in parts.blocks for n in (b.norm1, b.norm2)]
    stats: dict[int, float] = {}

    def record(module: nn.Module, args: tuple) -> None:
        x = args[0].float()
        scale = x.pow(2).mean(dim=-1).sqrt() if type(module) in RMS_NORM_TYPES else x.std(dim=-1, unbiased=False)
        stats[id(module)] = float(scale.mean())

    handles = [n.register_forward_pre_hook(record) for n in norms]
    was_training = model.training
    try:
        model.eval()
        model((images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {key: max(value, 1e-6) for key, value in stats.items()}


def _rescale(module: nn.Module) -> Tensor:
    """Spectrally rescale ``module`` and return the scale that was removed."""
    spectral_rescale(module)
    rescaler = module.parametrizations.weight[0]
    with torch.no_grad():
        return rescaler.divisor(module.parametrizations.weight.original)


@torch.no_grad()
def _rescale_and_absorb(
    conv: nn.Conv2d,
    norms: dict[str, CenterNorm],
    blocks: list[nn.Module],
    heads: list[nn.Linear],
    embed_params: list[nn.Parameter],
    attention_pool: nn.Module | None,
) -> None:
    residuals = [r for b in blocks if isinstance(b, LipBlock) for r in (b.mixer, b.mlp) if isinstance(r, LipResidual)]
    for residual in residuals:
        norm, core = residual.fn.norm, residual.fn[1]
        if isinstance(core, L2Attention):
            _rescale(core.q_proj)  # L2 attention is not homogeneous in W_Q: nothing to move
            s_v = _rescale(core.v_proj)
            core.v_proj.bias /= s_v
            core.o_proj.weight.mul_(s_v)  # o reads v: carry v's scale into o before rescaling o
            s_o = _rescale(core.o_proj)
            core.o_proj.bias /= s_o
            residual.alpha.mul_(s_o)
        else:
            s_1 = _rescale(core.fc1)
            norm.weight.mul_(s_1)
            norm.bias.mul_(s_1)
            s_2 = _rescale(core.fc2)
            core.fc2.bias /= s_2
            residual.alpha.mul_(s_2)
    s_head = _rescale(heads[0]) if heads else 1.0  # no head: a feature extractor (timm num_classes=0)
    for head in heads[1:]:
        # A distillation head reads the same norm, now scaled by s_head: undo it in its (plain) weight. It stays
        # unparametrized; the engine bounds the pair of heads exactly anyway.
        head.weight /= s_head
    head_reader = norms.get("head_norm") or norms.get("final_norm")
    if attention_pool is not None and "head_norm" not in norms:  # the head reads the pool: it takes the scale
        attention_pool.scale_output_(s_head)
    elif head_reader is not None:
        head_reader.weight.mul_(s_head)
        head_reader.bias.mul_(s_head)
    elif heads:
        # The head reads the residual stream itself (CLIP: the mean of its patch tokens): the stream carries the
        # head's scale from the norm that starts it, and every reader of the stream takes it back out.
        if "pre_norm" not in norms:
            raise UnsupportedModuleError(
                "the head reads the residual stream with no norm before it or before the blocks: nothing can carry "
                "the head's spectral scale"
            )
        norms["pre_norm"].weight.mul_(s_head)
        norms["pre_norm"].bias.mul_(s_head)
        _stream_divided_by(1 / s_head, residuals, blocks)
    s_patch = _rescale(conv)
    if conv.bias is not None:
        conv.bias /= s_patch
    if "patch_norm" in norms:
        norms["patch_norm"].weight.mul_(s_patch)
        return
    for param in embed_params:
        param /= s_patch
    if "pre_norm" in norms:
        norms["pre_norm"].weight.mul_(s_patch)
        return
    # The residual stream is now divided by s_patch: every reader of the stream scales it back.
    _stream_divided_by(s_patch, residuals, blocks)
    stream_reader = norms.get("final_norm") or norms.get("head_norm")
    if stream_reader is not None:
        stream_reader.weight.mul_(s_patch)


@torch.no_grad()
def _stream_divided_by(scale: Tensor, residuals: list[LipResidual], blocks: list[nn.Module]) -> None:
    """Keep the blocks' function when their input, the residual stream, is divided by ``scale``: each residual's norm
    reads it ``scale`` times stronger and its branch writes ``1 / scale`` times weaker (the shift mixer and the
    prefix pool are linear)."""
    for residual in residuals:
        residual.fn.norm.weight.mul_(scale)
        residual.alpha.div_(scale)
    for block in blocks:
        if isinstance(block, LipBlock) and isinstance(block.mlp, (SLL, CPL)):
            block.mlp.bias /= scale  # ReLU is positively homogeneous: the layer commutes with the scaling


# Raw weights are stored at the scale of a fresh timm ViT layer (std 0.02 per entry) after reshaping their spectrum:
# the rescaling divides the scale out, so only AdamW's step size relative to the weight depends on it.
_INIT_STD = 0.02


@torch.no_grad()
def _reshape_spectra(model: nn.Module, power: float) -> None:
    """``sigma_i -> sigma_max (sigma_i / sigma_max) ** power`` for every spectrally rescaled weight of ``model``."""
    for module in model.modules():
        if not is_spectrally_rescaled(module):
            continue
        weight = module.parametrizations.weight.original
        matrix = weight.reshape(weight.shape[0], -1).to(torch.float64)
        u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
        sigma_max = sigma.max().clamp_min(torch.finfo(torch.float64).tiny)
        reshaped = (u * (sigma / sigma_max) ** power) @ vh
        reshaped *= _INIT_STD * matrix.numel() ** 0.5 / torch.linalg.matrix_norm(reshaped).clamp_min(1e-30)
        weight.copy_(reshaped.reshape(weight.shape).to(weight.dtype))


def convert(
    model: nn.Module,
    config: ConvertConfig | None = None,
    *,
    calibration_images: Tensor | None = None,
    inplace: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Convert a timm or transformers ViT into a Lipschitz-bounded model that takes pixels in [0, 1].

    The result is the same class as ``model`` (its timm / transformers interface keeps working) and
    ``robustvit.lipschitz_bound(result)`` is a guaranteed end-to-end l2 bound from pixels to logits.

    Args:
        model: timm ``VisionTransformer`` / ``VisionTransformerDistilled``, or transformers
            ``ViTForImageClassification`` / ``DeiTForImageClassification``.
        config: conversion choices (defaults: :class:`ConvertConfig`).
        calibration_images: optional pixels in [0, 1], ``(B, C, H, W)``; each CenterNorm then absorbs the mean
            token std the source LayerNorm divided by, so activations start close to the source's.
        inplace: modify ``model`` instead of a copy.
        **overrides: config fields, e.g. ``convert(model, mixer="l2")``.

    Example:
        >>> import timm, robustvit
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=10)
        >>> lip = robustvit.convert(vit)
        >>> lip(torch.rand(1, 3, 32, 32)).shape
        torch.Size([1, 10])
        >>> robustvit.lipschitz_bound(lip) > 0
        True
    """
    try:
        config = dataclasses.replace(config or ConvertConfig(), **overrides)
    except TypeError as err:
        raise ValueError(f"unknown conversion option in {sorted(overrides)}: {err}") from err
    if is_converted(model):
        raise ValueError("this model is already converted")
    refuse_adapters(model, "converting")  # the converter reads weights (a tuner's base weight, without its update)
    family = get_family(model)
    spec = family.input_spec(model)
    mean = config.mean if config.mean is not None else spec.mean
    std = config.std if config.std is not None else spec.std
    if len(mean) != spec.channels:
        raise ValueError(
            f"the model takes {spec.channels} channels but its source's mean/std {mean} / {std} have {len(mean)} "
            f"values: pass convert(model, mean=..., std=...) with {spec.channels} value(s) each"
        )
    model = model if inplace else copy.deepcopy(model)
    parts = family.parts(model)  # refuses unsupported configurations with a clear error
    source_spec = family.source_spec(model)

    stats: dict[int, float] = {}
    if calibration_images is not None:
        check_images(calibration_images, channels=spec.channels, size=spec.image_size)
        device = parts.patch_conv.weight.device
        stats = _calibrate(
            model,
            parts,
            calibration_images.to(device),
            torch.tensor(mean, device=device),
            torch.tensor(std, device=device),
        )

    def norm(layer_norm: nn.Module) -> nn.Module:
        return _substitute_norm(layer_norm, stats.get(id(layer_norm), 1.0), config)

    blocks: list[nn.Module] = [build_block(block, parts, config, norm) for block in parts.blocks]
    if config.mixer == "shift" and parts.head_reads_prefix:
        # The shift never moves patch information into prefix tokens: let the head read pooled patches instead.
        # The pool ends the last block, so the model keeps the source's number of blocks.
        pool = PrefixPool(parts.num_prefix_tokens, parts.grid_size[0] * parts.grid_size[1])
        if not blocks:
            raise UnsupportedModuleError("a model without blocks cannot be converted with mixer='shift'")
        blocks[-1].pool = pool
    norms = {
        key: norm(getattr(parts, key))
        for key in ("patch_norm", "pre_norm", "final_norm", "head_norm")
        if getattr(parts, key) is not None
    }
    substitutes = {}
    if parts.attention_pool is not None:
        if not norms.keys() & {"final_norm", "patch_norm", "pre_norm"}:
            # The patch embedding's scale leaves the residual stream and comes back in a norm the pool reads.
            raise UnsupportedModuleError("an attention-pooling head needs a norm before it (or before the blocks)")
        substitutes["attention_pool"] = build_attention_pool(parts.attention_pool, config, norm)
    conv = NormalizedConv2d.from_conv(parts.patch_conv, mean, std)
    family.install(model, blocks, {**norms, **substitutes, "patch_conv": conv})
    _rescale_and_absorb(conv, norms, blocks, parts.heads, parts.embed_params, substitutes.get("attention_pool"))
    if config.singular_value_power != 1.0:
        _reshape_spectra(model, config.singular_value_power)
    if config.residual_budget is not None:
        fit_residual_budget(model, config.residual_budget)

    if config.mixer == "shift" and not parts.pool_reads_prefix:
        # The shift never mixes prefix tokens into patches, and the head reads pooled patches: the class,
        # distillation and register tokens cannot change any output, so they never get a gradient.
        for token in parts.prefix_tokens:
            token.requires_grad_(False)

    model.robustvit_config = config
    model.robustvit_source = source_spec
    LIBRARY_METADATA[family.name](model)
    return model


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` came out of :func:`convert` (or was rebuilt by ``robustvit.from_pretrained``)."""
    return isinstance(getattr(model, "robustvit_config", None), ConvertConfig)


def export(model: nn.Module) -> nn.Module:
    """A copy of a converted model with every parametrization folded into plain weights, for deployment.

    Outputs are identical; the bound engine bounds the plain weights the same way.

    Example:
        >>> plain = robustvit.export(lip)  # doctest: +SKIP
    """
    refuse_adapters(model, "exporting")  # folding a tuner's base layer would take the rescaling off its update
    exported = copy.deepcopy(model)
    for module in [m for m in exported.modules() if parametrize.is_parametrized(m)]:  # listed before mutating
        # A deep copy shares torch's injected Parametrized* class with the original, and removing a
        # parametrization edits that class: give the copy its own, or the original loses its weight property.
        cls = type(module)
        module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        for name in list(module.parametrizations):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return exported
