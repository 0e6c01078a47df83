"""transformers ``TimmWrapperForImageClassification``: a timm model in a transformers shell. The wrapped
``timm_model`` is adapted by its own timm family (:class:`~robustvit.families.timm_vit.TimmViT`); this adapter only
says where it is, and gives the converted model transformers' config, save and load paths."""

from __future__ import annotations

from torch import Tensor, nn
from transformers import TimmWrapperConfig
from transformers.models.timm_wrapper.modeling_timm_wrapper import TimmWrapperForImageClassification

from robustvit.errors import UnsupportedModuleError
from robustvit.families.base import Family, InputSpec, ViTParts, register_family, register_tiny_model
from robustvit.families.timm_vit import TimmViT
from robustvit.lipschitz.engine import BoundFn, register_bound

__all__ = ["HFTimmWrapper"]

_INNER = "timm_model"
_TIMM = TimmViT()


@register_family
class HFTimmWrapper(Family):
    name = "transformers-timm-wrapper"
    library = "transformers"

    def matches(self, model: nn.Module) -> bool:
        return type(model) is TimmWrapperForImageClassification and _TIMM.matches(model.timm_model)

    def input_spec(self, model: nn.Module) -> InputSpec:
        return _TIMM.input_spec(model.timm_model)

    def parts(self, model: nn.Module) -> ViTParts:
        return _TIMM.parts(model.timm_model)

    def install(self, model: nn.Module, blocks: list[nn.Module], modules: dict[str, nn.Module]) -> None:
        _TIMM.install(model.timm_model, blocks, modules)

    def patch_embedding(self, model: nn.Module) -> nn.Module:
        return _TIMM.patch_embedding(model.timm_model)

    def patch_projection(self, model: nn.Module) -> nn.Conv2d:
        return _TIMM.patch_projection(model.timm_model)

    def features_bound(self, model: nn.Module, bound_of: BoundFn) -> Tensor:
        return _TIMM.features_bound(model.timm_model, lambda name, child: bound_of(f"{_INNER}.{name}", child))

    def heads(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{_INNER}.{name}", head) for name, head in _TIMM.heads(model.timm_model)]

    def head_weight(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        return _TIMM.head_weight(model.timm_model)

    def source_spec(self, model: nn.Module) -> dict:
        _TIMM.source_spec(model.timm_model)  # refuses what the timm family cannot rebuild
        return {"library": "transformers", "class": type(model).__name__, "config": model.config.to_dict()}

    def build(self, spec: dict) -> nn.Module:
        if spec["class"] != TimmWrapperForImageClassification.__name__:
            raise UnsupportedModuleError(f"unsupported transformers class {spec['class']!r} for family {self.name}")
        return TimmWrapperForImageClassification(TimmWrapperConfig.from_dict(spec["config"]))


@register_bound(TimmWrapperForImageClassification)
def _model_bound(model: nn.Module, bound_of: BoundFn) -> Tensor:
    return HFTimmWrapper().model_bound(model, bound_of)


# ------------------------------------------------------------------------------------------------- tiny models


def _tiny(image_size: int, num_classes: int, channels: int) -> nn.Module:
    model_args = {"img_size": image_size, "in_chans": channels, "patch_size": 8, "depth": 2, "embed_dim": 48}
    config = TimmWrapperConfig(
        architecture="vit_tiny_patch16_224", model_args={**model_args, "num_heads": 3}, num_labels=num_classes
    )
    return TimmWrapperForImageClassification(config)


register_tiny_model("hf_timm_wrapper", HFTimmWrapper.name, _tiny, "a timm ViT in transformers' TimmWrapper")
