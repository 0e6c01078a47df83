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

So apart from LayerNorm -> CenterNorm and the mixer, the converted function equals the source's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from robustvit.errors import UnsupportedModuleError
from robustvit.families import BlockParts, ViTParts, get_family
from robustvit.layers import (
    CenterNorm,
    L2Attention,
    LipBlock,
    LipResidual,
    MinMax,
    NormalizedConv2d,
    PrefixPool,
    TokenShift,
)
from robustvit.lipschitz.rescale import spectral_rescale

__all__ = ["ConvertConfig", "convert", "export", "is_converted"]


@dataclass
class ConvertConfig:
    """Conversion choices; ``to_dict()`` / ``from_dict()`` round-trip through JSON.

    Args:
        mixer: ``"shift"`` (LipShiFT token shift, bound 1) or ``"l2"`` (tied L2 attention, Kim et al. 2021,
            whose bound grows like ``sqrt(N) log N`` with the number of tokens N).
        shift_div: ShiftViT's ``n_div``: four groups of ``dim // shift_div`` channels are shifted.
        activation: ``"gelu"`` (kept; bound 1.129) or ``"minmax"`` (GroupSort-2; bound 1).
        residual_alpha: initial residual weight (multiplied by any LayerScale and the moved scales); 1.0 keeps
            the source's function.
        mean, std: the normalization the source expects (per channel). ``None``: timm's ``pretrained_cfg``, or
            the transformers image processor's defaults.
    """

    mixer: Literal["shift", "l2"] = "shift"
    shift_div: int = 12
    activation: Literal["gelu", "minmax"] = "gelu"
    residual_alpha: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.mixer not in _MIXERS:
            raise ValueError(f"mixer must be one of {sorted(_MIXERS)}, got {self.mixer!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        if self.shift_div < 4:
            raise ValueError(f"shift_div must be at least 4, got {self.shift_div}")
        if not self.residual_alpha > 0:
            raise ValueError(f"residual_alpha must be positive, got {self.residual_alpha}")
        self.mean = tuple(float(v) for v in self.mean) if self.mean is not None else None
        self.std = tuple(float(v) for v in self.std) if self.std is not None else None
        if (self.mean is None) != (self.std is None) or (self.mean is not None and len(self.mean) != len(self.std)):
            raise ValueError(f"mean and std must be given together with one value per channel: {self.mean}, {self.std}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvertConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown ConvertConfig fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _center_norm(norm: nn.Module, input_std: float) -> CenterNorm:
    """A CenterNorm matching LayerNorm ``norm`` on inputs whose per-token std is ``input_std``."""
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise UnsupportedModuleError(f"expected a LayerNorm over the last dimension, got {norm!r}")
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


def _copy_linear(weight: Tensor, bias: Tensor | None, target: nn.Linear) -> None:
    with torch.no_grad():
        target.weight.copy_(weight)
        if target.bias is not None:
            target.bias.copy_(bias if bias is not None else torch.zeros_like(target.bias))


def _shift_mixer(block: BlockParts, parts: ViTParts, config: ConvertConfig, norm: Callable) -> nn.Module:
    # ShiftViT/LipShiFT: the shift replaces the whole attention sub-block, residual included.
    return TokenShift(parts.grid_size, config.shift_div, parts.num_prefix_tokens)


def _l2_mixer(block: BlockParts, parts: ViTParts, config: ConvertConfig, norm: Callable) -> nn.Module:
    tokens = parts.num_prefix_tokens + parts.grid_size[0] * parts.grid_size[1]
    attn = L2Attention(parts.embed_dim, block.num_heads, tokens).to(block.out.weight.device, block.out.weight.dtype)
    _copy_linear(block.q[0], None, attn.q_proj)  # W_K = W_Q: keys reuse the query projection
    _copy_linear(*block.v, attn.v_proj)
    _copy_linear(
        block.out.weight.detach(), block.out.bias.detach() if block.out.bias is not None else None, attn.o_proj
    )
    branch = nn.Sequential(OrderedDict(norm=norm(block.norm1), attn=attn, drop=block.drop1))
    alpha = config.residual_alpha * (block.ls1 if block.ls1 is not None else 1.0)
    return LipResidual(branch, parts.embed_dim, alpha)


_MIXERS: dict[str, Callable[..., nn.Module]] = {"shift": _shift_mixer, "l2": _l2_mixer}
_ACTIVATIONS: dict[str, Callable[[], nn.Module] | None] = {"gelu": None, "minmax": MinMax}


def _build_block(block: BlockParts, parts: ViTParts, config: ConvertConfig, norm: Callable) -> LipBlock:
    mixer = _MIXERS[config.mixer](block, parts, config, norm)
    make_activation = _ACTIVATIONS[config.activation]
    if make_activation is not None:
        setattr(block.mlp, block.mlp_activation, make_activation())
    branch = nn.Sequential(OrderedDict(norm=norm(block.norm2), mlp=block.mlp, drop=block.drop2))
    alpha = config.residual_alpha * (block.ls2 if block.ls2 is not None else 1.0)
    return LipBlock(mixer, LipResidual(branch, parts.embed_dim, alpha)).to(parts.patch_conv.weight.dtype)


@torch.no_grad()
def _calibrate(model: nn.Module, parts: ViTParts, images: Tensor, mean: Tensor, std: Tensor) -> dict[int, float]:
    """Mean per-token std at the input of every LayerNorm of the source model, keyed by ``id(norm)``."""
    norms = [n for n in (parts.patch_norm, parts.pre_norm, parts.final_norm, parts.head_norm) if n is not None]
    norms += [n for b in parts.blocks for n in (b.norm1, b.norm2)]
    stats: dict[int, float] = {}

    def record(module: nn.Module, args: tuple) -> None:
        stats[id(module)] = float(args[0].float().std(dim=-1, unbiased=False).mean())

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
    s_head = _rescale(heads[0])
    for head in heads[1:]:
        # A distillation head reads the same norm, now scaled by s_head: undo it in its (plain) weight. It stays
        # unparametrized; the engine bounds the pair of heads exactly anyway.
        head.weight /= s_head
    head_reader = norms.get("head_norm") or norms.get("final_norm")
    if head_reader is not None:
        head_reader.weight.mul_(s_head)
        head_reader.bias.mul_(s_head)
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
    for residual in residuals:
        residual.fn.norm.weight.mul_(s_patch)
        residual.alpha.div_(s_patch)
    stream_reader = norms.get("final_norm") or norms.get("head_norm")
    if stream_reader is not None:
        stream_reader.weight.mul_(s_patch)


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
    family = get_family(model)
    source_spec = family.source_spec(model)
    spec = family.input_spec(model)
    mean = config.mean if config.mean is not None else spec.mean
    std = config.std if config.std is not None else spec.std
    if len(mean) != spec.channels:
        raise ValueError(f"the model takes {spec.channels} channels but mean/std have {len(mean)} values")
    model = model if inplace else copy.deepcopy(model)
    parts = family.parts(model)

    stats: dict[int, float] = {}
    if calibration_images is not None:
        from robustvit._utils import check_images

        check_images(calibration_images, channels=spec.channels, size=spec.image_size)
        device = parts.patch_conv.weight.device
        stats = _calibrate(
            model,
            parts,
            calibration_images.to(device),
            torch.tensor(mean, device=device),
            torch.tensor(std, device=device),
        )

    def norm(layer_norm: nn.Module) -> CenterNorm:
        return _center_norm(layer_norm, stats.get(id(layer_norm), 1.0))

    blocks: list[nn.Module] = [_build_block(block, parts, config, norm) for block in parts.blocks]
    if config.mixer == "shift" and parts.head_reads_prefix:
        # The shift never moves patch information into prefix tokens: let the head read pooled patches instead.
        blocks.append(PrefixPool(parts.num_prefix_tokens, parts.grid_size[0] * parts.grid_size[1]))
    norms = {
        key: norm(getattr(parts, key))
        for key in ("patch_norm", "pre_norm", "final_norm", "head_norm")
        if getattr(parts, key) is not None
    }
    conv = NormalizedConv2d.from_conv(parts.patch_conv, mean, std)
    family.install(model, blocks, {**norms, "patch_conv": conv})
    _rescale_and_absorb(conv, norms, blocks, parts.heads, parts.embed_params)

    model.robustvit_config = config
    model.robustvit_source = source_spec
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
    exported = copy.deepcopy(model)
    for module in [m for m in exported.modules() if parametrize.is_parametrized(m)]:  # listed before mutating
        # A deep copy shares torch's injected Parametrized* class with the original, and removing a
        # parametrization edits that class: give the copy its own, or the original loses its weight property.
        cls = type(module)
        module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        for name in list(module.parametrizations):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return exported
