"""What the transformers ViT families share: a classifier model (``*ForImageClassification``) around a pre-norm
encoder whose layers a family adapter reads into :class:`~robustvit.families.BlockParts`, and a head that reads
one of a few poolings of the last hidden state.

A family subclasses :class:`HFFamily` and says where its parts are (the ``_`` methods); the conversion, the bound's
composition and the JSON description of the source are the same for every transformers family.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import transformers
from torch import Tensor, nn
from transformers.utils import output_capturing

from robustvit.errors import UnsupportedModuleError
from robustvit.families.base import (
    BlockParts,
    Family,
    InputSpec,
    TinyModelBuilder,
    ViTParts,
    blocks_bound,
    linear_bias,
    linear_weight,
    one,
    per_channel,
)
from robustvit.lipschitz.engine import BOUND_RULES, BoundFn, mark_lipschitz_neutral

__all__ = [
    "POOLINGS",
    "TINY_ENCODER",
    "HFFamily",
    "HFVisionTowerFamily",
    "fc_mlp_bound",
    "linear_pair",
    "num_prefix_tokens",
    "record_hidden_states",
    "tiny_classifier",
]

POOLINGS = ("token", "token_and_patch_mean", "patch_mean", "mean")
"""What a transformers classifier reads of the last hidden state: token 0 (ViT); token 0 concatenated with the mean
of the patch tokens (DINOv2); the mean of the patch tokens (CLIP, BEiT); the mean of all tokens (SigLIP)."""


TINY_ENCODER = {"patch_size": 8, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3}
"""The encoder size of the transformers tiny models: two layers of width 48 with three heads, on 8-pixel patches."""


def tiny_classifier(config_class: type, model_class: type, **config) -> TinyModelBuilder:
    """A tiny model's builder: ``model_class`` of a ``config_class`` of :data:`TINY_ENCODER`'s size, with ``config``."""

    def build(image_size: int, num_classes: int, channels: int) -> nn.Module:
        return model_class(
            config_class(image_size=image_size, num_labels=num_classes, num_channels=channels, **TINY_ENCODER, **config)
        )

    return build


def fc_mlp_bound(module: nn.Module, bound_of: BoundFn) -> Tensor:
    """The bound rule of transformers' two-layer MLPs, ``fc2(activation_fn(fc1(x)))`` (ViT's, CLIP's, BEiT's...)."""
    return bound_of("fc1", module.fc1) * bound_of("activation_fn", module.activation_fn) * bound_of("fc2", module.fc2)


def linear_pair(linear: nn.Linear) -> tuple[Tensor, Tensor | None]:
    return linear.weight.detach(), (linear.bias.detach() if linear.bias is not None else None)


def record_hidden_states(owner: nn.Module, layers: nn.ModuleList) -> None:
    """``output_hidden_states=True`` for converted blocks. transformers records hidden states with a forward hook on
    each of its own layers, installed once per model by the ``PreTrainedModel`` whose forward captures them
    (``owner``); the converted blocks get the same hook. It only appends the block's input (the first block's) and
    output to the requested record and returns ``None``, so it leaves the output unchanged: marked Lipschitz-neutral
    for the bound engine."""
    for block in layers:
        before = set(block._forward_hooks)
        output_capturing.install_output_capuring_hook(block, "hidden_states", 0)
        for key in set(block._forward_hooks) - before:
            mark_lipschitz_neutral(block._forward_hooks[key])
    owner._output_capturing_hooks_installed = True  # transformers installs no hooks of its own on it any more


def num_prefix_tokens(tokens: list[nn.Parameter]) -> int:
    """Tokens the prefix parameters add: ``(1, k, D)`` adds ``k``, a ``(D,)`` class embedding (CLIP's) one."""
    return sum(token.shape[-2] if token.dim() == 3 else 1 for token in tokens)


class HFFamily(Family):
    """A transformers image classifier around a pre-norm ViT encoder.

    Subclasses set ``normalization`` (classifier class -> the mean and std of the source's image processor),
    ``layer_types``, ``pooling`` (one of :data:`POOLINGS`; a family whose pooling depends on the config overrides
    :meth:`pooling_of`), and implement the abstract ``_`` accessors. The others default to the layout of
    transformers' ViT and the models built on it (DeiT, ViTMSN, BEiT, DINOv2): ``model.base_model`` holds
    ``embeddings`` (with ``patch_embeddings.projection`` and ``position_embeddings``) and the ``layers``.
    """

    library = "transformers"
    unread: tuple[str, ...] = ()
    """Submodules whose output the classifier's logits never read (CLIP's ``post_layernorm``, which only the
    discarded ``pooler_output`` goes through): left as the source has them, outside the bound, and without gradients."""
    normalization: dict[type, tuple[tuple[float, ...], tuple[float, ...]]] = {}
    layer_types: tuple[type, ...] = ()
    pooling: str = "token"

    # ------------------------------------------------------------------------------------------ where the parts are

    def _vision_config(self, model: nn.Module):
        """The config with the vision encoder's fields (``image_size``, ``hidden_act``...)."""
        return model.config

    def embeddings(self, model: nn.Module) -> nn.Module:
        """The embeddings module (patch projection, prefix tokens, position embedding)."""
        return model.base_model.embeddings

    def _layer_list(self, model: nn.Module) -> tuple[nn.Module, str]:
        """``(owner, attribute)`` of the ``nn.ModuleList`` of encoder layers."""
        return model.base_model, "layers"

    def _capturing_model(self, model: nn.Module) -> nn.Module:
        """The ``PreTrainedModel`` whose forward records ``hidden_states`` from the layers."""
        return model.base_model

    @abstractmethod
    def _block_parts(self, layer: nn.Module, num_heads: int) -> BlockParts:
        """One encoder layer's parts."""

    def _projection_owner(self, model: nn.Module) -> tuple[nn.Module, str]:
        """``(owner, attribute)`` of the patch-embedding convolution."""
        return self.embeddings(model).patch_embeddings, "projection"

    @abstractmethod
    def _prefix_tokens(self, model: nn.Module) -> list[nn.Parameter]:
        """Class / register tokens, in token order."""

    def _position_embedding(self, model: nn.Module) -> nn.Parameter | None:
        """The absolute position embedding (added to the tokens), if the model has one."""
        return self.embeddings(model).position_embeddings

    def _norm_owners(self, model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        """``{"pre_norm" | "final_norm" | "head_norm": (owner, attribute)}`` of the norms before the layers, on the
        last hidden state, and on the pooled features (only those the classifier's function goes through)."""
        return {}

    def pooling_of(self, model: nn.Module) -> str:
        """What ``model``'s classifier reads of the last hidden state (one of :data:`POOLINGS`)."""
        return self.pooling

    def _patch_embeddings_module(self, model: nn.Module) -> nn.Module:
        """The module whose output is the ``(B, N, D)`` patch tokens."""
        return self.embeddings(model).patch_embeddings

    def _check(self, model: nn.Module) -> list[str]:
        """Configurations of the source the converter cannot take, as readable reasons."""
        return []

    # ------------------------------------------------------------------------------------------ the Family API

    def matches(self, model: nn.Module) -> bool:
        return type(model) in self.normalization

    def input_spec(self, model: nn.Module) -> InputSpec:
        mean, std = self.normalization[type(model)]
        config = self._vision_config(model)
        size = config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        channels = config.num_channels
        return InputSpec(channels, size, per_channel(mean, channels), per_channel(std, channels))

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The encoder layers (converted: the :class:`~robustvit.layers.LipBlock` s)."""
        return getattr(*self._layer_list(model))

    def _grid(self, model: nn.Module) -> tuple[int, int]:
        conv = getattr(*self._projection_owner(model))
        height, width = self.input_spec(model).image_size
        return height // conv.stride[0], width // conv.stride[1]

    def parts(self, model: nn.Module) -> ViTParts:
        config = self._vision_config(model)
        layers = self.layers(model)
        problems = [
            f"layer {i} is a {type(layer).__name__}"
            for i, layer in enumerate(layers)
            if type(layer) not in self.layer_types
        ]
        problems += self._check(model)
        if problems:
            raise UnsupportedModuleError(f"cannot convert this {type(model).__name__}: " + "; ".join(problems))
        blocks = [self._block_parts(layer, config.num_attention_heads) for layer in layers]
        for i, block in enumerate(blocks):
            activation = getattr(block.mlp, block.mlp_activation)
            if BOUND_RULES.get(type(activation)) is None:
                raise UnsupportedModuleError(
                    f"cannot convert this {type(model).__name__}: layer {i}'s activation {type(activation).__name__} "
                    f"(hidden_act={config.hidden_act!r}) has no registered Lipschitz bound"
                )
        prefix = self._prefix_tokens(model)
        position = self._position_embedding(model)
        norms = {key: getattr(*owner) for key, owner in self._norm_owners(model).items()}
        return ViTParts(
            patch_conv=getattr(*self._projection_owner(model)),
            patch_norm=None,
            embed_params=[*prefix, *([position] if position is not None else [])],
            pre_norm=norms.get("pre_norm"),
            blocks=blocks,
            final_norm=norms.get("final_norm"),
            head_norm=norms.get("head_norm"),
            heads=[head for _, head in self.heads(model)],
            grid_size=self._grid(model),
            num_prefix_tokens=num_prefix_tokens(prefix),
            head_reads_prefix=self.pooling_of(model) in ("token", "token_and_patch_mean"),
            prefix_tokens=prefix,
        )

    def install(self, model: nn.Module, blocks: list[nn.Module], modules: dict[str, nn.Module]) -> None:
        owner, name = self._layer_list(model)
        setattr(owner, name, nn.ModuleList(blocks))
        for key, (norm_owner, attribute) in self._norm_owners(model).items():
            setattr(norm_owner, attribute, modules[key])
        setattr(*self._projection_owner(model), modules["patch_conv"])
        record_hidden_states(self._capturing_model(model), getattr(owner, name))

    def patch_embedding(self, model: nn.Module) -> nn.Module:
        return self._patch_embeddings_module(model)

    def patch_projection(self, model: nn.Module) -> nn.Conv2d:
        return getattr(*self._projection_owner(model))

    def features_bound(self, model: nn.Module, bound_of: BoundFn) -> Tensor:
        bound = one() * bound_of("embeddings", self.embeddings(model))
        norms = self._norm_owners(model)
        if "pre_norm" in norms:
            bound = bound * bound_of(norms["pre_norm"][1], getattr(*norms["pre_norm"]))
        pooling = self.pooling_of(model)
        # Only a head that reads token 0 alone gets the pool's tighter bound of the tokens it reads.
        tokens_read = 1 if pooling == "token" else 0
        bound = bound * blocks_bound(list(self.layers(model)), "layers", bound_of, tokens_read)
        if "final_norm" in norms:  # per token
            bound = bound * bound_of(norms["final_norm"][1], getattr(*norms["final_norm"]))
        height, width = self._grid(model)
        patches = height * width
        tokens = patches + num_prefix_tokens(self._prefix_tokens(model))
        # token: a coordinate selection (1). token_and_patch_mean: [h_0, mean of the patches] is A (x) I_D on the
        # tokens, with A's two rows of disjoint support and norms 1 and 1/sqrt(n): orthogonal rows, so ||A|| = 1.
        # patch_mean / mean: the mean of n tokens is 1/sqrt(n)-Lipschitz on them, and they are part of the tensor.
        pooled = {"token": 1, "token_and_patch_mean": 1, "patch_mean": patches, "mean": tokens}[pooling]
        bound = bound / math.sqrt(pooled)
        if "head_norm" in norms:  # on the pooled features
            bound = bound * bound_of(norms["head_norm"][1], getattr(*norms["head_norm"]))
        return bound

    def heads(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [] if isinstance(model.classifier, nn.Identity) else [("classifier", model.classifier)]

    def head_weight(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        return linear_weight(model.classifier), linear_bias(model.classifier)

    def source_spec(self, model: nn.Module) -> dict:
        return {"library": "transformers", "class": type(model).__name__, "config": model.config.to_dict()}

    def build(self, spec: dict) -> nn.Module:
        model_class = getattr(transformers, spec["class"], None)
        if model_class not in self.normalization:
            raise UnsupportedModuleError(f"unsupported transformers class {spec['class']!r} for family {self.name}")
        return model_class(model_class.config_class.from_dict(spec["config"]))


class HFVisionTowerFamily(HFFamily):
    """A classifier around a CLIP-layout vision tower (CLIP, SigLIP): ``model.vision_model`` holds the embeddings
    and an encoder of pre-norm layers ``layer_norm1``, ``self_attn.{q,k,v,out}_proj``, ``layer_norm2`` and
    ``mlp.activation_fn``, without dropout on the residual branches; the vision fields are ``config.vision_config``.

    Subclasses say what differs: the prefix tokens, the norms the logits go through, and ``unread``.
    """

    def _vision_config(self, model: nn.Module):
        return model.config.vision_config

    def embeddings(self, model: nn.Module) -> nn.Module:
        return model.vision_model.embeddings

    def _layer_list(self, model: nn.Module) -> tuple[nn.Module, str]:
        return model.vision_model.encoder, "layers"

    def _capturing_model(self, model: nn.Module) -> nn.Module:
        return model.vision_model

    def _projection_owner(self, model: nn.Module) -> tuple[nn.Module, str]:
        return self.embeddings(model), "patch_embedding"

    def _position_embedding(self, model: nn.Module) -> nn.Parameter:
        return self.embeddings(model).position_embedding.weight

    def _patch_embeddings_module(self, model: nn.Module) -> nn.Module:
        embeddings = type(self.embeddings(model)).__name__
        raise NotImplementedError(
            f"{type(model).__name__}'s embeddings have no module whose output is the (B, N, D) patch tokens (its "
            f"convolution's output is flattened inside {embeddings}.forward): token noise is not available for this "
            "family"
        )

    def _block_parts(self, layer: nn.Module, num_heads: int) -> BlockParts:
        return BlockParts(
            norm1=layer.layer_norm1,
            q=linear_pair(layer.self_attn.q_proj),
            k=linear_pair(layer.self_attn.k_proj),
            v=linear_pair(layer.self_attn.v_proj),
            out=layer.self_attn.out_proj,
            num_heads=num_heads,
            ls1=None,
            drop1=nn.Identity(),  # the layers have no dropout on the residual branches
            norm2=layer.layer_norm2,
            mlp=layer.mlp,
            mlp_activation="activation_fn",
            ls2=None,
            drop2=nn.Identity(),
        )
