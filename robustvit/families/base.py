"""What robustvit needs to know about a ViT family, and the registry that finds the family of a model.

A family adapter is structure only: it says how to find the parts of one family's module tree (a :class:`ViTParts`),
how to put converted parts back, how the family's forward composes them (for the bound), and how to describe the
source architecture as JSON and build it back. The conversion math is shared (:mod:`robustvit.conversion`), so every
family is converted the same way; what the family's library records of a converted model, and how it loads one,
live with the conversion (:mod:`robustvit.conversion.metadata`) and the persistence (:mod:`robustvit.persistence`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from robustvit._utils import unwrap
from robustvit.errors import UnsupportedModuleError
from robustvit.layers.linear import is_linear, linear_bias, linear_weight  # noqa: F401  (the families' API)
from robustvit.lipschitz.engine import BoundFn, compose_bound
from robustvit.lipschitz.spectral import gram_spectral_norm
from robustvit.registry import Registry

__all__ = [
    "FAMILIES",
    "GREYSCALE_WEIGHTS",
    "REFUSAL_HINTS",
    "TINY_MODELS",
    "AttentionPoolParts",
    "BlockParts",
    "Family",
    "GatedMlpParts",
    "InputSpec",
    "RMS_NORM_TYPES",
    "TinyModel",
    "ViTParts",
    "create_tiny_model",
    "family_by_name",
    "get_family",
    "linear_head",
    "per_channel",
    "register_family",
    "register_tiny_model",
    "registered_families",
    "tiny_models",
]


GREYSCALE_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R 601-2 luma weights of R, G, B: PIL's ``"L"`` conversion (and torchvision's ``rgb_to_grayscale``)."""


@dataclass
class InputSpec:
    """The images a model takes: channels, size and the normalization its source expects."""

    channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class GatedMlpParts:
    """A gated MLP, ``fc2(norm(act(gate(x)) * value(x)))`` (timm ``SwiGLU`` / ``GluMlp``): the product of two
    branches has no global Lipschitz bound, so the conversion replaces it (``ConvertConfig.gated_mlp``)."""

    value: tuple[Tensor, Tensor | None]  # (weight (H, D), bias) of the branch that is multiplied
    gate: tuple[Tensor, Tensor | None]  # (weight (H, D), bias) of the branch the activation reads
    activation: nn.Module
    norm: nn.Module | None  # the norm on the hidden features (timm scale_mlp), if any
    fc2: nn.Linear


@dataclass
class AttentionPoolParts:
    """An attention-pooling head (timm ``AttentionPoolLatent``, "MAP"): one learned query attends over the
    ``num_tokens`` tokens it reads, then ``y + mlp(norm(y))``. The softmax over data-dependent keys has no global
    bound, so the conversion replaces it (``ConvertConfig.attention_pool``)."""

    value: tuple[Tensor, Tensor | None]  # (weight (D, D), bias) of the value projection
    proj: nn.Linear
    norm: nn.Module | None
    mlp: nn.Module  # exposes fc1 and fc2 (nn.Linear) and an activation attribute
    mlp_activation: str
    num_tokens: int  # tokens the pool reads (the patches, and the prefix tokens where the forward passes them)


@dataclass
class BlockParts:
    """One pre-norm transformer block: ``x + ls1 * attn(norm1(x))`` then ``x + ls2 * mlp(norm2(x))``."""

    norm1: nn.Module
    q: tuple[Tensor, Tensor | None]  # (weight (D, D), bias)
    k: tuple[Tensor, Tensor | None]
    v: tuple[Tensor, Tensor | None]
    out: nn.Linear
    num_heads: int
    ls1: Tensor | None
    drop1: nn.Module
    norm2: nn.Module
    mlp: nn.Module  # exposes fc1 and fc2 (nn.Linear) and an activation attribute
    mlp_activation: str  # attribute name of the activation inside ``mlp``
    ls2: Tensor | None
    drop2: nn.Module
    gated_mlp: GatedMlpParts | None = None  # set when ``mlp`` is a gated MLP, which the conversion replaces


@dataclass
class ViTParts:
    """The parts of a ViT, in forward order, as the shared converter sees them."""

    patch_conv: nn.Conv2d
    patch_norm: nn.Module | None  # norm right after the patch projection (timm PatchEmbed.norm), if any
    embed_params: list[nn.Parameter]  # class / distillation / register tokens and position embedding
    pre_norm: nn.Module | None  # norm before the blocks (timm norm_pre), if any
    blocks: list[BlockParts]
    final_norm: nn.Module | None
    head_norm: nn.Module | None  # timm fc_norm
    heads: list[nn.Linear]
    grid_size: tuple[int, int]
    num_prefix_tokens: int
    head_reads_prefix: bool  # the head reads prefix tokens (class / distillation) rather than pooled patches
    prefix_tokens: list[nn.Parameter] = field(default_factory=list)  # class / distillation / register tokens
    pool_reads_prefix: bool = False  # the head's pooling includes the prefix tokens
    attention_pool: AttentionPoolParts | None = None  # an attention-pooling head before ``head_norm``, if any
    embed_dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.embed_dim = self.patch_conv.out_channels


class Family(ABC):
    """Adapter for one model family (e.g. timm ``VisionTransformer``). Subclass and decorate with
    :func:`register_family`."""

    name: str = ""
    library: str = ""  # "timm" or "transformers": which library's metadata, save and load paths serve its models

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family (converted or not)."""

    @abstractmethod
    def input_spec(self, model: nn.Module) -> InputSpec:
        """Channels, image size and the source's default normalization."""

    @abstractmethod
    def parts(self, model: nn.Module) -> ViTParts:
        """The model's parts; raises UnsupportedModuleError for configurations the converter cannot handle."""

    @abstractmethod
    def install(self, model: nn.Module, blocks: list[nn.Module], modules: dict[str, nn.Module]) -> None:
        """Put converted blocks and modules back (keys: ``patch_conv``, and the norms ``patch_norm``,
        ``pre_norm``, ``final_norm``, ``head_norm`` that the model has, and ``attention_pool``, the substitute of
        :attr:`ViTParts.attention_pool`)."""

    @abstractmethod
    def patch_embedding(self, model: nn.Module) -> nn.Module:
        """The module whose output is the ``(B, N, D)`` patch tokens, before prefix tokens and position embedding."""

    @abstractmethod
    def patch_projection(self, model: nn.Module) -> nn.Conv2d:
        """The patch-embedding convolution (a :class:`~robustvit.layers.NormalizedConv2d` once converted)."""

    @abstractmethod
    def features_bound(self, model: nn.Module, bound_of: BoundFn) -> Tensor:
        """Bound of the map from pixels to the features the head reads (see :meth:`head_weight`)."""

    @abstractmethod
    def head_weight(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        """``(W, b)`` of the linear map from features to logits, ``logits = features @ W.T + b``."""

    @abstractmethod
    def source_spec(self, model: nn.Module) -> dict:
        """JSON-ready description that :meth:`build` turns back into the (unconverted) architecture."""

    @abstractmethod
    def build(self, spec: dict) -> nn.Module:
        """A freshly initialised source model from :meth:`source_spec`, without downloading weights."""

    def logits(self, output) -> Tensor:
        return output.logits if hasattr(output, "logits") else output

    def model_bound(self, model: nn.Module, bound_of: BoundFn) -> Tensor:
        """End-to-end bound: features bound times the exact spectral bound of the head's linear map."""
        heads = self.heads(model)
        for name, head in heads:
            if not is_linear(head):
                kind = f"{type(head).__module__}.{type(head).__qualname__}"
                peft_fix = " (PEFT: robustvit.peft.get_peft_model, or robustvit.peft.constrain(model))"
                fix = peft_fix if kind.startswith("peft.") else ""
                raise UnsupportedModuleError(f"head '{name}' is a {kind}, expected an nn.Linear{fix}")
        features = self.features_bound(model, bound_of)
        if not heads:  # a feature extractor (timm num_classes=0): the features are the output
            return features
        if len(heads) == 1:  # the head's own row in the report
            return features * bound_of(*heads[0])
        return features * gram_spectral_norm(self.head_weight(model)[0])  # e.g. DeiT's averaged pair of heads

    def heads(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The head modules whose weights :meth:`head_weight` reads."""
        return []


RMS_NORM_TYPES: Registry[Callable[[nn.Module], Tensor | None]] = Registry("RMS norm", keys=type)
"""Norm classes that compute ``gamma * x / rms(x)`` over the last dimension (no mean subtracted), each with
``gamma(module) -> Tensor | None``: the conversion substitutes them as ``ConvertConfig.rms_norm`` says. The family
files register their libraries' classes."""
RMS_NORM_TYPES.register(nn.RMSNorm, lambda norm: norm.weight)


FAMILIES: Registry[Family] = Registry("family")
"""Family adapters by name, in registration order: :func:`get_family` tries them in that order."""

REFUSAL_HINTS: Registry[str] = Registry("refusal hint", keys=type)
"""What to do with an unsupported model class that a family can take in another form (``CLIPVisionModel``: give it
a head); :func:`get_family`'s refusal ends with it."""


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: register a family adapter under ``cls.name`` (first registered match wins)."""
    FAMILIES.register(cls.name, cls())
    return cls


def registered_families() -> list[str]:
    return FAMILIES.list()


TinyModelBuilder = Callable[[int, int, int], nn.Module]
"""``build(image_size, num_classes, channels)`` -> a freshly initialised model."""


@dataclass(frozen=True)
class TinyModel:
    """A tiny, randomly initialised configuration of one family, built in milliseconds without a download.

    Each family file registers a few (timm registers its ``test_vit*`` models the same way); the conversion,
    soundness and ecosystem tests parametrize over them, so a new family is tested once it registers one.
    """

    family: str  # the registered Family.name
    build: TinyModelBuilder
    description: str


TINY_MODELS: Registry[TinyModel] = Registry("tiny model")
"""Tiny test configurations by name (e.g. ``"timm_token"``), in registration order."""


def register_tiny_model(name: str, family: str, build: TinyModelBuilder, description: str) -> TinyModel:
    """Register ``build`` as the tiny model ``name`` of the registered family ``family``."""
    family_by_name(family)  # a tiny model of an unregistered family would test nothing
    return TINY_MODELS.register(name, TinyModel(family, build, description))


def tiny_models(family: str | None = None) -> list[str]:
    """Names of the registered tiny models, of one family or of all of them.

    Example:
        >>> tiny_models("transformers-vit")
        ['hf_vit', 'hf_deit', 'hf_vit_msn']
    """
    if family is not None:
        family_by_name(family)
    return [name for name, tiny in TINY_MODELS.items() if family in (None, tiny.family)]


def create_tiny_model(name: str, *, image_size: int = 32, num_classes: int = 10, channels: int = 3) -> nn.Module:
    """A fresh tiny model (random weights: seed torch first for a reproducible one), in train mode like a new model.

    Example:
        >>> model = create_tiny_model("timm_token", channels=1)
        >>> model(torch.rand(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    return TINY_MODELS[name].build(image_size, num_classes, channels)


def family_by_name(name: str) -> Family:
    """The registered adapter called ``name`` (as stored in saved configs); ``KeyError`` listing them otherwise."""
    return FAMILIES[name]


def get_family(model: nn.Module) -> Family:
    """The adapter of ``model``'s family, or :class:`UnsupportedModuleError` listing the supported families."""
    model = unwrap(model)
    for _, family in FAMILIES.items():
        if family.matches(model):
            return family
    hint = REFUSAL_HINTS.get(type(model))
    raise UnsupportedModuleError(
        f"{type(model).__module__}.{type(model).__name__} is not a supported model; robustvit supports "
        f"{', '.join(FAMILIES.list())}" + (f". {hint}" if hint else "")
    )


def linear_head(model: nn.Module) -> tuple[Tensor, Tensor] | None:
    """``(L_features, W)`` of a supported family's model, where ``logits = W @ features + b`` and ``features`` is
    ``L_features``-Lipschitz; float64, differentiable in the parameters; ``None`` for a model of no family.

    Certificates (pairwise radii) and margin losses (pairwise constants) share it.
    """
    model = unwrap(model)
    try:
        family = get_family(model)
    except UnsupportedModuleError:
        return None
    if not family.heads(model):
        return None
    features = compose_bound(model, lambda bound_of: family.features_bound(model, bound_of))
    return features, family.head_weight(model)[0].to(torch.float64)


def per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """The source's normalization for ``channels`` channels: as given; one value repeated when the library's default
    lists the same value for each RGB channel (a greyscale model built from a 3-channel config); and for a greyscale
    model whose source lists different RGB values (ImageNet's), their ITU-R 601-2 luma, the weights of PIL's ``"L"``
    conversion that greyscale data goes through (the mean of the greyscale images of RGB data with those channel
    means; for the std, the std of perfectly correlated channels, an upper bound of the true one)."""
    values = tuple(float(v) for v in values)
    if len(values) != channels and len(set(values)) == 1:
        return values[:1] * channels
    if channels == 1 and len(values) == len(GREYSCALE_WEIGHTS):
        return (sum(w * v for w, v in zip(GREYSCALE_WEIGHTS, values, strict=True)),)
    return values


def one(device: torch.device | None = None) -> Tensor:
    return torch.ones((), dtype=torch.float64, device=device)


def blocks_bound(blocks: list[nn.Module], prefix: str, bound_of: BoundFn, tokens_read: int) -> Tensor:
    """Bound of the blocks as the head sees them.

    When the last block ends in a :class:`~robustvit.layers.PrefixPool` (``LipBlock.pool``) and the head reads
    ``tokens_read`` prefix tokens through per-token layers only, those tokens are all the mean of the patch tokens:
    the map to them is ``sqrt(tokens_read / num_patches)``-Lipschitz, tighter than the pool's bound on the whole
    tensor.
    """
    bound = one()
    last = blocks[-1] if blocks else None
    pool = getattr(last, "pool", None)
    pooled = pool is not None and tokens_read > 0
    for i, block in enumerate(blocks[:-1] if pooled else blocks):
        bound = bound * bound_of(f"{prefix}.{i}", block)
    if pooled:
        name = f"{prefix}.{len(blocks) - 1}"
        bound = bound * bound_of(f"{name}.mixer", last.mixer) * bound_of(f"{name}.mlp", last.mlp)
        bound = bound * (tokens_read / pool.num_patches) ** 0.5
    return bound
