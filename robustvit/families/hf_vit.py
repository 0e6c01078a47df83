"""transformers 5.x ``ViTForImageClassification`` and ``DeiTForImageClassification``.

5.x module names: ``vit.layers[i]`` with ``attention.{q,k,v,o}_proj``, ``mlp.fc1/fc2``,
``layernorm_before/after`` (files on disk keep the legacy 4.x key names; transformers renames them on load).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from torch import Tensor, nn
from transformers import DeiTConfig, ViTConfig
from transformers.activations import GELUActivation
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
)
from transformers.models.deit.modeling_deit import (
    DeiTEmbeddings,
    DeiTForImageClassification,
    DeiTLayer,
    DeiTMLP,
    DeiTModel,
    DeiTPatchEmbeddings,
)
from transformers.models.vit.modeling_vit import (
    ViTEmbeddings,
    ViTForImageClassification,
    ViTLayer,
    ViTMLP,
    ViTModel,
    ViTPatchEmbeddings,
)
from transformers.utils import output_capturing

from robustvit.errors import UnsupportedModuleError
from robustvit.families.base import (
    BlockParts,
    Family,
    InputSpec,
    ViTParts,
    blocks_bound,
    linear_bias,
    linear_weight,
    one,
    per_channel,
    register_family,
    register_tiny_model,
)
from robustvit.lipschitz.engine import GELU_LIPSCHITZ, BoundFn, mark_lipschitz_neutral, record_methods, register_bound

# The processors' defaults (ViTImageProcessor: "standard" 0.5; DeiTImageProcessor: ImageNet statistics).
_DEFAULT_NORMALIZATION = {
    ViTForImageClassification: (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD),
    DeiTForImageClassification: (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
}
_LAYER_TYPES = (ViTLayer, DeiTLayer)


def _pair(linear: nn.Linear) -> tuple[Tensor, Tensor | None]:
    return linear.weight.detach(), (linear.bias.detach() if linear.bias is not None else None)


@register_family
class HFViT(Family):
    name = "transformers-vit"

    def matches(self, model: nn.Module) -> bool:
        return type(model) in _DEFAULT_NORMALIZATION

    @staticmethod
    def _backbone(model: nn.Module) -> nn.Module:
        return model.vit if isinstance(model, ViTForImageClassification) else model.deit

    def input_spec(self, model: nn.Module) -> InputSpec:
        mean, std = _DEFAULT_NORMALIZATION[type(model)]
        size = model.config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        channels = model.config.num_channels
        return InputSpec(channels, size, per_channel(mean, channels), per_channel(std, channels))

    def parts(self, model: nn.Module) -> ViTParts:
        backbone = self._backbone(model)
        problems = [
            f"layer {i} is a {type(layer).__name__}"
            for i, layer in enumerate(backbone.layers)
            if type(layer) not in _LAYER_TYPES
        ]
        if model.config.hidden_act != "gelu":
            problems.append(f"hidden_act={model.config.hidden_act!r} (supported: 'gelu')")
        if problems:
            raise UnsupportedModuleError(f"cannot convert this {type(model).__name__}: " + "; ".join(problems))
        embeddings = backbone.embeddings
        blocks = [
            BlockParts(
                norm1=layer.layernorm_before,
                q=_pair(layer.attention.q_proj),
                k=_pair(layer.attention.k_proj),
                v=_pair(layer.attention.v_proj),
                out=layer.attention.o_proj,
                num_heads=model.config.num_attention_heads,
                ls1=None,
                drop1=layer.dropout,
                norm2=layer.layernorm_after,
                mlp=layer.mlp,
                mlp_activation="activation_fn",
                ls2=None,
                drop2=layer.dropout,
            )
            for layer in backbone.layers
        ]
        prefix = [t for t in (embeddings.cls_token, getattr(embeddings, "distillation_token", None)) if t is not None]
        patches = embeddings.patch_embeddings
        grid = (patches.image_size[0] // patches.patch_size[0], patches.image_size[1] // patches.patch_size[1])
        return ViTParts(
            patch_conv=patches.projection,
            patch_norm=None,
            embed_params=[*prefix, embeddings.position_embeddings],
            pre_norm=None,
            blocks=blocks,
            final_norm=backbone.layernorm,
            head_norm=None,
            heads=[model.classifier],
            grid_size=grid,
            num_prefix_tokens=len(prefix),
            head_reads_prefix=True,  # the classifiers read token 0
            prefix_tokens=prefix,
        )

    def install(self, model: nn.Module, blocks: list[nn.Module], modules: dict[str, nn.Module]) -> None:
        backbone = self._backbone(model)
        backbone.layers = nn.ModuleList(blocks)
        backbone.layernorm = modules["final_norm"]
        backbone.embeddings.patch_embeddings.projection = modules["patch_conv"]
        _record_hidden_states(backbone)

    def patch_embedding(self, model: nn.Module) -> nn.Module:
        return self._backbone(model).embeddings.patch_embeddings

    def patch_projection(self, model: nn.Module) -> nn.Conv2d:
        return self._backbone(model).embeddings.patch_embeddings.projection

    def features_bound(self, model: nn.Module, bound_of: BoundFn) -> Tensor:
        backbone = self._backbone(model)
        bound = bound_of("embeddings", backbone.embeddings)
        bound = bound * blocks_bound(list(backbone.layers), "layers", bound_of, tokens_read=1)
        return bound * bound_of("layernorm", backbone.layernorm)  # per token; then token 0 is selected: 1

    def heads(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [("classifier", model.classifier)]

    def head_weight(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        return linear_weight(model.classifier), linear_bias(model.classifier)

    def source_spec(self, model: nn.Module) -> dict:
        return {"library": "transformers", "class": type(model).__name__, "config": model.config.to_dict()}

    def build(self, spec: dict) -> nn.Module:
        model_class = getattr(transformers, spec["class"])
        if model_class not in _DEFAULT_NORMALIZATION:
            raise UnsupportedModuleError(f"unsupported transformers class {spec['class']!r}")
        config = model_class.config_class.from_dict(spec["config"])
        return model_class(config)


def _record_hidden_states(backbone: nn.Module) -> None:
    """``output_hidden_states=True`` for the converted blocks. transformers records hidden states with a forward hook
    on each of its own layers (``ViTLayer``), installed once per model; the converted blocks get the same hook. It only
    appends the block's input (the first block's: the embeddings) and output to the requested record and returns
    ``None``, so it leaves the output unchanged: marked Lipschitz-neutral for the bound engine."""
    for block in backbone.layers:
        before = set(block._forward_hooks)
        output_capturing.install_output_capuring_hook(block, "hidden_states", 0)
        for key in set(block._forward_hooks) - before:
            mark_lipschitz_neutral(block._forward_hooks[key])
    backbone._output_capturing_hooks_installed = True  # transformers installs no hooks of its own on it any more


# The rules visit the backbones' children, not the backbones: their forward runs unvisited, so record it.
record_methods(ViTModel, DeiTModel)


@register_bound(ViTForImageClassification, DeiTForImageClassification)
def _model_bound(model: nn.Module, bound_of: BoundFn) -> Tensor:
    return HFViT().model_bound(model, bound_of)


@register_bound(ViTEmbeddings, DeiTEmbeddings)
def _embeddings(module: nn.Module, bound_of: BoundFn) -> Tensor:
    # Prefix tokens and position embeddings are constants (concatenation and addition: 1-Lipschitz). The
    # interpolated position encoding is a constant too; mask tokens are never used by the classifiers.
    return bound_of("patch_embeddings", module.patch_embeddings) * bound_of("dropout", module.dropout)


@register_bound(ViTPatchEmbeddings, DeiTPatchEmbeddings)
def _patch_embeddings(module: nn.Module, bound_of: BoundFn) -> Tensor:
    return bound_of("projection", module.projection)  # then flatten + transpose: a permutation


@register_bound(ViTMLP, DeiTMLP)
def _mlp(module: nn.Module, bound_of: BoundFn) -> Tensor:
    return bound_of("fc1", module.fc1) * bound_of("activation_fn", module.activation_fn) * bound_of("fc2", module.fc2)


@register_bound(GELUActivation)
def _gelu(module: GELUActivation, bound_of: BoundFn) -> Tensor:
    if module.act not in (torch.nn.functional.gelu, module._gelu_python):
        raise UnsupportedModuleError(f"GELUActivation with an unknown function {module.act!r}")
    return one() * GELU_LIPSCHITZ


# ------------------------------------------------------------------------------------------------- tiny models


def _tiny(config_class: type, model_class: type) -> Callable[[int, int, int], nn.Module]:
    def build(image_size: int, num_classes: int, channels: int) -> nn.Module:
        config = config_class(
            image_size=image_size,
            patch_size=8,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=3,
            intermediate_size=96,
            num_labels=num_classes,
            num_channels=channels,
        )
        return model_class(config)

    return build


register_tiny_model("hf_vit", HFViT.name, _tiny(ViTConfig, ViTForImageClassification), "transformers ViT")
register_tiny_model("hf_deit", HFViT.name, _tiny(DeiTConfig, DeiTForImageClassification), "transformers DeiT")
