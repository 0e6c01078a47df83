"""PEFT tuners inside the Lipschitz constraint: parameter-efficient certified finetuning of converted models.

A PEFT tuner layer left as PEFT builds it would add its update *outside* a spectrally rescaled layer's
parametrization, so the layer would no longer be 1-Lipschitz during training, and ``merge_and_unload()`` would write the
update through the parametrization's computed weight, where it is lost. Here the update goes *inside* the constraint,
on PEFT's standard path too: once robustvit has converted a model (``robustvit.convert`` imports this module), a tuner
layer that PEFT puts on a rescaled layer becomes its constrained subclass as PEFT builds it, so plain
``peft.get_peft_model(converted, LoraConfig(...))`` trains inside the constraint and merges exactly, and a tuner
without a rule is refused before training. Every
supported tuner changes a linear layer's weight (and, for (IA)^3, its bias) by a differentiable map of its adapter
parameters; its layers become :class:`ConstrainedTunerLayer` subclasses that compute with

    ``x -> x @ rescale(update(W)).T + b'``

(``W`` the raw weight ``parametrizations.weight.original``, ``rescale`` the layer's own spectral rescaling), so

* the layer stays at most 1-Lipschitz at every step, whatever the adapters learn;
* ``merge`` writes ``update(W)`` into the raw weight, so ``merge_and_unload()`` returns the converted model computing
  exactly what the adapted one computed;
* ``lipschitz_bound`` is a guaranteed bound of the effective weight, so ``robustvit.lipschitz_bound`` and
  ``robustvit.certify`` take the PEFT-wrapped model as it is.

Supported (the :data:`TUNERS` registry, one :class:`TunerRule` per PEFT ``Linear`` class): LoRA (DoRA included:
``W' = m / ||W + sBA||_row * (W + sBA)``), LoHa and LoKr (``W + delta``), (IA)^3 (a row or column scaling) and
OFT (``W R^T``, an input rotation). Options that are not a change of the weight (adapter dropout, LoRA bias...) and
other tuners raise a clear error.

Example:
    >>> import robustvit, robustvit.peft
    >>> lip = robustvit.convert(vit)
    >>> model = robustvit.peft.get_peft_model(lip, robustvit.peft.lora_config(lip, r=8))
    >>> robustvit.lipschitz_bound(model) > 0  # after training too: the adapted weights stay rescaled
    True
    >>> merged = model.merge_and_unload()  # the converted model, finetune included
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import safetensors.torch
import torch
import torch.nn.functional as F
from peft.tuners import ia3, loha, lokr, lora, oft
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import Tensor, nn
from torch.nn.modules.module import register_module_module_registration_hook
from torch.nn.utils import parametrize

from robustvit._utils import called_child, module_type, owns_parametrizations, unwrap
from robustvit.errors import UnsupportedModuleError
from robustvit.lipschitz.engine import BoundFn, register_bound
from robustvit.lipschitz.rescale import frozen_directions, is_spectrally_rescaled
from robustvit.lipschitz.spectral import gram_spectral_norm
from robustvit.registry import Registry

__all__ = [
    "TUNERS",
    "ConstrainedTunerLayer",
    "LipschitzLoraLinear",
    "TunerRule",
    "adapter_state",
    "constrain",
    "get_peft_model",
    "load_base_weights",
    "lora_config",
    "merged",
    "register_tuner",
    "target_modules",
    "with_lora",
]

Update = Callable[[nn.Module, str, Tensor, "Tensor | None"], "tuple[Tensor, Tensor | None]"]


@dataclass(frozen=True)
class TunerRule:
    """How one PEFT tuner's ``Linear`` layer changes its base layer.

    Attributes:
        name: the tuner, for messages and the class name (``"Lora"``: ``LipschitzLoraLinear``).
        config: its PEFT config class.
        adapters: the layer attribute whose keys are the layer's adapters (``"lora_A"``).
        update: ``update(layer, adapter, weight, bias) -> (weight, bias)``, differentiable in the adapter's
            parameters: the weight and bias the layer computes with once ``adapter`` is applied (before rescaling).
        refused: ``refused(layer, adapter) -> [problem, ...]``: the adapter's options that are not a change of the
            weight (dropout on the adapter path...), which the constrained forward could not honour.
    """

    name: str
    config: type[peft.PeftConfig]
    adapters: str
    update: Update
    refused: Callable[[nn.Module, str], list[str]]


class ConstrainedTunerLayer(nn.Module):
    """Base of the constrained layers: put in front of a PEFT tuner ``Linear`` class by :func:`register_tuner`.

    For a base layer with a weight parametrization (robustvit's spectral rescaling) the effective weight is the
    parametrization applied to the raw weight after every active adapter's :attr:`TunerRule.update`; for a plain
    ``nn.Linear`` it is the updated weight itself.
    """

    tuner: TunerRule

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's ``update_layer`` (``add_adapter`` on an adapted layer), refusing options the constrained forward
        could not honour."""
        super().update_layer(adapter_name, *args, **kwargs)
        config = kwargs.get("config", next((arg for arg in args if isinstance(arg, peft.PeftConfig)), None))
        init = kwargs.get("init_lora_weights", getattr(config, "init_lora_weights", None))
        problems = self.tuner.refused(self, adapter_name) + _init_problems(self, init)
        if problems:
            self.delete_adapter(adapter_name)
            raise ValueError(
                f"{self.tuner.name} inside the Lipschitz constraint does not support {'; '.join(problems)}"
            )

    def _adapters(self, names: list[str]) -> list[str]:
        return [name for name in names if name in getattr(self, self.tuner.adapters)]

    def _raw(self) -> tuple[Tensor, Tensor | None]:
        base = self.get_base_layer()
        raw = base.parametrizations.weight.original if parametrize.is_parametrized(base, "weight") else base.weight
        return raw, base.bias

    def _updated(self, adapters: list[str]) -> tuple[Tensor, Tensor | None]:
        weight, bias = self._raw()
        for adapter in adapters:
            new_weight, new_bias = self.tuner.update(self, adapter, weight, bias)
            weight, bias = new_weight.to(weight.dtype), None if new_bias is None else new_bias.to(bias.dtype)
        return weight, bias

    def effective_weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        """The weight and bias this layer computes with (differentiable in the base weight and the adapters)."""
        base = self.get_base_layer()
        adapters = self._adapters(self.active_adapters)
        if self.disable_adapters or self.merged or not adapters:
            return base.weight, base.bias
        weight, bias = self._updated(adapters)
        if parametrize.is_parametrized(base, "weight"):
            # The rescaling applied to the adapted weight, in the layer's own mode: training forwards move its tracked
            # directions toward this weight's top singular subspace, eval forwards leave them (and the function) fixed.
            for parametrization in base.parametrizations.weight:
                weight = parametrization(weight)
        return weight, bias

    def effective_weight(self) -> Tensor:
        return self.effective_weight_and_bias()[0]

    def effective_bias(self) -> Tensor | None:
        return self.effective_weight_and_bias()[1]

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise NotImplementedError("mixed-adapter batches (adapter_names=...) are not supported in the constraint")
        if args or kwargs:
            raise TypeError(f"{type(self).__name__} takes only the input, got {len(args)} more and {sorted(kwargs)}")
        if self.disable_adapters and self.merged:
            self.unmerge()
        weight, bias = self.effective_weight_and_bias()
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the adapters into the base layer's *raw* weight (and bias), so the merged layer computes what this
        one did. The weights before the merge are kept for :meth:`unmerge`, which restores them exactly."""
        adapters = self._adapters(check_adapters_to_merge(self, adapter_names))
        if not adapters:
            return
        raw, bias = self._raw()
        with torch.no_grad():
            weight, new_bias = self._updated(adapters)
        if safe_merge and not (torch.isfinite(weight).all() and (new_bias is None or torch.isfinite(new_bias).all())):
            raise ValueError(f"NaNs detected in the merged weights of adapters {adapters}")
        before = (adapters, raw.detach().clone(), None if bias is None else bias.detach().clone())
        self.__dict__.setdefault("_before_merge", []).append(before)
        with torch.no_grad():
            raw.copy_(weight)
            if bias is not None:
                bias.copy_(new_bias)
        self.merged_adapters.extend(adapters)

    def unmerge(self) -> None:
        raw, bias = self._raw()
        stack = self.__dict__.setdefault("_before_merge", [])
        while stack:
            adapters, old_weight, old_bias = stack.pop()
            with torch.no_grad():
                raw.copy_(old_weight)
                if bias is not None:
                    bias.copy_(old_bias)
            self.merged_adapters = [name for name in self.merged_adapters if name not in adapters]

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        # A guaranteed bound of the exact effective weight (a rescaled one is at most 1 up to the Gram slack), read
        # with the rescaling's directions frozen: bounding a layer in train mode must not move them (its function).
        with frozen_directions():
            return gram_spectral_norm(self.effective_weight())

    def __repr__(self) -> str:
        return "lipschitz_" + super().__repr__()


def adapter_state(model: peft.PeftModel) -> dict[str, Tensor]:
    """A copy of the adapters' weights as they are now (``peft.get_peft_model_state_dict`` returns the live tensors),
    for :func:`load_base_weights`.

    Example:
        >>> fresh = adapter_state(with_lora(lip, r=2))
    """
    return {key: value.detach().clone() for key, value in peft.get_peft_model_state_dict(model).items()}


def load_base_weights(model: nn.Module, path: str | Path, adapters: dict[str, Tensor] | None = None) -> None:
    """Load a plain model's safetensors weights (``path``) into ``model``; for a PEFT model, into the base layers of
    its tuner layers (``fc1.weight`` -> ``fc1.base_layer.weight``), with its adapters set to ``adapters`` (an
    :func:`adapter_state` taken while they were fresh), so that every run restarts from the same point (DoRA
    magnitudes, which PEFT derives from the base weight, are derived again from the loaded one). Every weight of the
    model must be in the file, and nothing else.

    Example:
        >>> adapted = get_peft_model(lip, lora_config(lip, r=2))
        >>> fresh = adapter_state(adapted)
        >>> safetensors.torch.save_model(merged(adapted), "plain.safetensors")  # a baseline, saved plain
        >>> load_base_weights(adapted, "plain.safetensors", adapters=fresh)
    """
    if not isinstance(model, peft.PeftModel):
        if adapters is not None:
            raise ValueError("adapters given for a model without PEFT adapters")
        safetensors.torch.load_model(model, str(path))
        return
    if adapters is None:
        raise ValueError("a PEFT model restarts from fresh adapters: pass adapters=adapter_state(model) taken then")
    inner = model.get_base_model()
    tuners = [name for name, module in inner.named_modules() if isinstance(module, BaseTunerLayer)]
    # A merged layer would later restore (unmerge) the base weights it held before the merge over the loaded ones.
    model.unmerge_adapter()

    def owner(key: str) -> str | None:
        return next((name for name in tuners if key.startswith(name + ".")), None)

    mapped = {}
    for key, value in safetensors.torch.load_file(str(path)).items():
        name = owner(key)
        mapped[key if name is None else f"{name}.base_layer.{key[len(name) + 1 :]}"] = value
    missing, unexpected = inner.load_state_dict(mapped, strict=False)
    missing = [key for key in missing if owner(key) is None or ".base_layer." in key]  # adapters come next
    if missing or unexpected:
        raise KeyError(f"{path} does not fit the model's base weights: missing {missing}, unexpected {unexpected}")
    result = peft.set_peft_model_state_dict(model, adapters)
    if result.unexpected_keys:
        raise KeyError(f"adapters that the model does not have: {result.unexpected_keys}")
    _initialize_dora_magnitudes(inner)


def _initialize_dora_magnitudes(model: nn.Module) -> None:
    """PEFT initializes a DoRA magnitude from the base weight (the row norms of ``W + s B A``), so fresh magnitudes
    taken with other base weights would rescale the loaded model's rows: initialize them again, from the loaded ones."""
    with torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, lora.LoraLayer):
                continue
            for adapter, variant in layer.lora_variant.items():
                if isinstance(variant, lora.variants.DoraLinearVariant):
                    adapted = layer.get_base_layer().weight + layer.get_delta_weight(adapter)
                    layer.lora_magnitude_vector[adapter].weight.copy_(torch.linalg.vector_norm(adapted, dim=1))


def _plain_tuner_layer(module: BaseTunerLayer, bound_of: BoundFn) -> Tensor:
    """A PEFT tuner layer left as PEFT built it: bounded only while it computes its base layer."""
    base = module.get_base_layer()
    adapters = getattr(module, TUNERS[type(module)].tuner.adapters)
    if module.disable_adapters or module.merged or not any(a in adapters for a in module.active_adapters):
        return bound_of("base_layer", base)
    if is_spectrally_rescaled(base):
        raise UnsupportedModuleError(
            "peft.get_peft_model put an adapter update outside the spectral rescaling of this layer, so the layer is "
            "no longer constrained; use robustvit.peft.get_peft_model(model, config), or robustvit.peft.constrain("
            "model) for a model PEFT built or loaded, to train it inside the constraint"
        )
    raise UnsupportedModuleError(
        "a plain PEFT tuner layer has no robustvit bound; use robustvit.peft.get_peft_model(model, config) or "
        "robustvit.peft.constrain(model)"
    )


@register_bound(ModulesToSaveWrapper)
def _modules_to_save(module: ModulesToSaveWrapper, bound_of: BoundFn) -> Tensor:
    """A module in ``modules_to_save`` (``["head"]``, trained whole): the bound of the module its forward calls now,
    the active adapter's copy (a deep copy, so a converted head keeps its spectral rescaling) or the original."""
    return bound_of(*called_child(module))


TUNERS: Registry[type[ConstrainedTunerLayer]] = Registry("PEFT tuner layer", keys=type)
"""PEFT tuner ``Linear`` class -> its constrained subclass; fill it with :func:`register_tuner`."""


def register_tuner(layer_class: type[BaseTunerLayer], rule: TunerRule) -> type[ConstrainedTunerLayer]:
    """Register how ``layer_class`` (a PEFT tuner's ``Linear``) changes its base layer, and return its constrained
    subclass (named ``Lipschitz<Name>Linear``, in this module). The plain ``layer_class`` is then refused by the bound
    engine with the fix named."""
    name = f"Lipschitz{rule.name}Linear"
    constrained = type(name, (ConstrainedTunerLayer, layer_class), {"tuner": rule, "__module__": __name__})
    constrained.__qualname__ = name
    TUNERS.register(layer_class, constrained)
    register_bound(layer_class)(_plain_tuner_layer)
    return constrained


def _dropout_problem(dropouts: nn.ModuleDict, adapter: str, option: str) -> list[str]:
    return [] if isinstance(dropouts[adapter], nn.Identity) else [f"{option}>0 (dropout is not a weight update)"]


_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
"""``init_lora_weights`` values with which PEFT moves part of the base weight into the adapter: it writes the rest to
``base_layer.weight.data``, which on a spectrally rescaled layer is a tensor computed on each read, so the write is lost
and the adapted model no longer computes the converted one."""


def _init_problems(layer: nn.Module, init: bool | str | None) -> list[str]:
    base = layer.get_base_layer()
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS) and parametrize.is_parametrized(base):
        return [f"init_lora_weights={init!r} on a rescaled layer (it rewrites the base weight; use the default init)"]
    return []


def _lora_update(layer: nn.Module, adapter: str, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    adapted = weight + layer.get_delta_weight(adapter)
    if adapter in layer.lora_variant:  # DoRA (the only variant let through): row magnitudes over detached row norms
        magnitude = layer.lora_magnitude_vector[adapter].weight
        adapted = (magnitude / torch.linalg.vector_norm(adapted, dim=1).detach()).unsqueeze(1) * adapted
    return adapted, bias


def _lora_refused(layer: nn.Module, adapter: str) -> list[str]:
    problems = _dropout_problem(layer.lora_dropout, adapter, "lora_dropout")
    variant = layer.lora_variant.get(adapter)
    if variant is not None and not isinstance(variant, lora.variants.DoraLinearVariant):
        problems.append(f"the LoRA variant {type(variant).__name__}")
    if layer.lora_bias[adapter]:
        problems.append("lora_bias=True")
    if layer.fan_in_fan_out:
        problems.append("fan_in_fan_out=True (nn.Linear stores (out, in))")
    return problems


def _lycoris_update(layer: nn.Module, adapter: str, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    return weight + layer.get_delta_weight(adapter), bias


def _lycoris_refused(layer: nn.Module, adapter: str) -> list[str]:
    options = ("rank_dropout", "module_dropout")
    return [f"{option}={getattr(layer, option)[adapter]}" for option in options if getattr(layer, option)[adapter]]


def _ia3_update(layer: nn.Module, adapter: str, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    # (IA)^3 scales the input features of a feedforward layer, else the output features (bias included).
    scale = layer.ia3_l[adapter]  # (1, in) or (out, 1)
    if layer.is_feedforward or bias is None:
        return weight * scale, bias
    return weight * scale, bias * scale.flatten()


def _ia3_refused(layer: nn.Module, adapter: str) -> list[str]:
    return ["fan_in_fan_out=True (nn.Linear stores (out, in))"] if layer.fan_in_fan_out else []


def _oft_update(layer: nn.Module, adapter: str, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    return weight @ layer.get_delta_weight(adapter).T, bias  # PEFT's forward rotates the input: x R^T... = (W R^T) x


def _oft_refused(layer: nn.Module, adapter: str) -> list[str]:
    return _dropout_problem(layer.oft_dropout, adapter, "module_dropout")


LipschitzLoraLinear = register_tuner(
    lora.Linear, TunerRule("Lora", peft.LoraConfig, "lora_A", _lora_update, _lora_refused)
)
LipschitzLoHaLinear = register_tuner(
    loha.Linear, TunerRule("LoHa", peft.LoHaConfig, "_available_adapters", _lycoris_update, _lycoris_refused)
)
LipschitzLoKrLinear = register_tuner(
    lokr.Linear, TunerRule("LoKr", peft.LoKrConfig, "_available_adapters", _lycoris_update, _lycoris_refused)
)
LipschitzIA3Linear = register_tuner(ia3.Linear, TunerRule("IA3", peft.IA3Config, "ia3_l", _ia3_update, _ia3_refused))
LipschitzOFTLinear = register_tuner(oft.Linear, TunerRule("OFT", peft.OFTConfig, "oft_R", _oft_update, _oft_refused))


_PLAIN_LAYERS_ALLOWED = [False]


@contextmanager
def _plain_layers_allowed() -> Iterator[None]:
    """Within this context PEFT builds its plain tuner layers (for :func:`get_peft_model`, which checks every layer
    before constraining it and can then take them all out again)."""
    previous, _PLAIN_LAYERS_ALLOWED[0] = _PLAIN_LAYERS_ALLOWED[0], True
    try:
        yield
    finally:
        _PLAIN_LAYERS_ALLOWED[0] = previous


def _constrain_on_wrap(module: nn.Module, name: str, submodule: nn.Module) -> None:
    """torch's module-registration hook: the standard ``peft.get_peft_model`` (or ``PeftModel.from_pretrained``,
    ``add_adapter``) on a converted model trains inside the constraint.

    A PEFT tuner layer sets its ``base_layer`` first thing in its ``__init__``; when that base layer is spectrally
    rescaled, the tuner layer becomes its constrained subclass right there, before PEFT adds its adapter (so the
    options the constraint cannot honour are refused by :meth:`ConstrainedTunerLayer.update_layer`, before any
    training). Left plain, its update would run outside the rescaling and ``merge_and_unload`` would write it into a
    weight that is recomputed on every read: the finetune would be lost. A tuner without a rule is refused.
    """
    if name != "base_layer" or _PLAIN_LAYERS_ALLOWED[0] or not isinstance(module, BaseTunerLayer):
        return
    if isinstance(module, ConstrainedTunerLayer) or not is_spectrally_rescaled(submodule):
        return
    constrained = TUNERS.get(type(module))
    if constrained is None:
        layer_type = type(module)
        raise UnsupportedModuleError(
            f"{layer_type.__module__}.{layer_type.__qualname__} on a spectrally rescaled layer: this PEFT tuner has no "
            f"rule inside the Lipschitz constraint, so its update would be lost at merge; supported: {_supported()} "
            "on nn.Linear (robustvit.peft.get_peft_model, robustvit.peft.register_tuner)"
        )
    module.__class__ = constrained


register_module_module_registration_hook(_constrain_on_wrap)


def _supported() -> str:
    return ", ".join(sorted({constrained.tuner.config.__name__ for _, constrained in TUNERS.items()}))


def constrain(model: nn.Module) -> nn.Module:
    """Put every PEFT tuner layer of ``model`` inside the Lipschitz constraint, in place, and return ``model``: for
    a model PEFT built or loaded itself (``peft.PeftModel.from_pretrained(converted, adapter_dir)``).

    Raises ``NotImplementedError`` for a tuner layer without a :class:`TunerRule` (another tuner, or a tuner on a
    layer other than ``nn.Linear``) or stacked on another (a PEFT mixed model), and ``ValueError`` for adapter
    options that are not a change of the weight (or an init that rewrites a rescaled base weight); nothing is changed
    then. After ``model.add_adapter(...)`` call it again: layers PEFT adds are plain PEFT layers
    (the bound engine refuses them until then), adapters added to constrained layers are checked as they are added.
    Modules in ``modules_to_save`` (a head trained whole) are PEFT's deep copies; each copy of a rescaled layer gets
    its own parametrized class here (see :func:`_own_parametrized_classes`; the engine refuses the copies until then).

    Example:
        >>> adapted = constrain(peft.get_peft_model(copy.deepcopy(lip), lora_config(lip, r=2)))
    """
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer) and not isinstance(module, ConstrainedTunerLayer)
    ]
    configs = getattr(model, "peft_config", {})  # a PeftModel's or tuner model's, by adapter
    stacked = [
        name
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer) and isinstance(module.base_layer, BaseTunerLayer)
    ]
    if stacked:
        raise NotImplementedError(
            f"{stacked[0]}: tuner layers stacked on one another (a PEFT mixed model) are not supported inside the "
            "Lipschitz constraint (the outer layer would rescale the innermost weight and drop the inner adapters)"
        )
    for name, layer in layers:
        layer_type = type(layer)
        if layer_type not in TUNERS:
            raise NotImplementedError(
                f"{name} ({layer_type.__module__}.{layer_type.__qualname__}): this PEFT tuner layer has no rule inside "
                f"the Lipschitz constraint; supported: {_supported()} on nn.Linear (robustvit.peft.register_tuner)"
            )
        rule = TUNERS[layer_type].tuner
        adapters = getattr(layer, rule.adapters)
        problems = [p for adapter in adapters for p in rule.refused(layer, adapter)]
        inits = {adapter: getattr(configs.get(adapter), "init_lora_weights", None) for adapter in adapters}
        problems += [p for adapter in adapters for p in _init_problems(layer, inits[adapter])]
        if problems:
            problems = "; ".join(problems)
            raise ValueError(f"{name}: {rule.name} inside the Lipschitz constraint does not support {problems}")
    for _, layer in layers:
        layer.__class__ = TUNERS[type(layer)]
    _own_parametrized_classes(model)
    return model


def _own_parametrized_classes(model: nn.Module) -> None:
    """Give every deep copy of a parametrized module in ``model`` (PEFT's ``modules_to_save`` copies of a rescaled head)
    its own parametrized class.

    ``torch.nn.utils.parametrize`` makes one class per parametrized module, whose property caches the computed weight
    under the id of the module it was made for; a deep copy keeps the class, so under ``parametrize.cached()`` (the
    bound engine) the copy and its original read one cached weight: the bound of the trained head would be the
    original's. Registering the copy's parametrizations again (the same parametrization modules, tracked directions
    and parameter objects, so optimizers and state-dict keys are unchanged) makes its class, and its cache key, its own.
    """
    first: dict[type, nn.Module] = {}
    for module in model.modules():  # pre-order: an original comes before the copies its wrapper holds
        if owns_parametrizations(module) and first.setdefault(type(module), module) is not module:
            _register_parametrizations_again(module)


def _register_parametrizations_again(module: nn.Module) -> None:
    chains = dict(module.parametrizations.items())
    if not all(chain.is_tensor for chain in chains.values()):
        raise NotImplementedError(f"{type(module).__name__}: a parametrization with several original tensors")
    module.__class__ = module_type(module)
    del module._modules["parametrizations"]
    with torch.no_grad(), frozen_directions():
        for name, chain in chains.items():
            if isinstance(chain.original, nn.Parameter):
                module.register_parameter(name, chain.original)
            else:
                module.register_buffer(name, chain.original)
            for parametrization in chain:
                parametrize.register_parametrization(module, name, parametrization, unsafe=chain.unsafe)
            module.parametrizations[name].training = chain.training  # the parametrizations keep their own modes


def get_peft_model(model: nn.Module, config: peft.PeftConfig, **kwargs: Any) -> peft.PeftModel:
    """``peft.get_peft_model`` with every tuner layer inside the Lipschitz constraint (:func:`constrain`).

    Supported configs: LoRA (DoRA included), LoHa, LoKr, (IA)^3 and OFT on ``nn.Linear``; others raise
    ``NotImplementedError``, options that are not a weight update ``ValueError``, and ``model`` is then left as it
    was. ``kwargs`` go to ``peft.get_peft_model``.

    Example:
        >>> model = get_peft_model(lip, lora_config(lip, r=8))
        >>> model.print_trainable_parameters()
        trainable params: ... || all params: ... || trainable%: ...
    """
    if type(config) not in {constrained.tuner.config for _, constrained in TUNERS.items()}:
        raise NotImplementedError(
            f"{type(config).__name__}: not implemented inside the Lipschitz constraint (robustvit.peft); supported: "
            f"{_supported()}"
        )
    with _plain_layers_allowed():
        adapted = peft.get_peft_model(model, config, **kwargs)
    try:
        return constrain(adapted)
    except (NotImplementedError, ValueError):
        adapted.unload()  # peft injected its layers into model in place: take them out again
        raise


def target_modules(model: nn.Module) -> list[str]:
    """Every spectrally rescaled ``nn.Linear`` of a converted model (MLPs, head, L2 attention projections), or every
    ``nn.Linear`` of an unconverted one: ``target_modules`` for any PEFT config. On a model that already holds adapters
    (for ``add_adapter``) an adapted layer is named as PEFT targets it (``fc1``, not ``fc1.base_layer``), the adapters'
    own layers are left out, and so are the modules in ``modules_to_save`` (trained whole already; PEFT puts no tuner
    on them).

    Example:
        >>> config = peft.LoHaConfig(r=2, target_modules=target_modules(lip))
    """
    inner = unwrap(model)  # PEFT matches targets against the names in the model it wraps
    tuners = {name for name, module in inner.named_modules() if isinstance(module, BaseTunerLayer)}
    saved = {name for name, module in inner.named_modules() if isinstance(module, AuxiliaryTrainingWrapper)}
    linears = {}
    for name, module in inner.named_modules():
        if parametrize.type_before_parametrizations(module) is not nn.Linear:
            continue
        if any(name.startswith(wrapper + ".") for wrapper in saved):
            continue
        owner = next((tuner for tuner in tuners if name.startswith(tuner + ".")), None)
        if owner is not None:
            if name != owner + ".base_layer":  # lora_A.default...: the adapter's own layers
                continue
            name = owner
        linears[name] = module
    rescaled = sorted(name for name, module in linears.items() if is_spectrally_rescaled(module))
    targets = rescaled or sorted(linears)
    if not targets:
        raise ValueError("the model has no nn.Linear to adapt")
    return targets


def lora_config(model: nn.Module, r: int, *, lora_alpha: float | None = None, **kwargs: Any) -> peft.LoraConfig:
    """A ``LoraConfig`` on :func:`target_modules` with ``lora_alpha = r`` (scaling 1) unless given. ``kwargs`` go to
    ``LoraConfig``.

    Example:
        >>> config = lora_config(lip, r=8)
    """
    if r < 1:
        raise ValueError(f"r must be a positive rank, got {r}")
    alpha = lora_alpha if lora_alpha is not None else r
    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules(model), **kwargs)


def with_lora(model: nn.Module, r: int) -> nn.Module:
    """``get_peft_model(model, lora_config(model, r))``, or ``model`` itself for ``r == 0`` (the recipes' ``--lora_r``).

    Example:
        >>> model = with_lora(lip, r=8)
    """
    return get_peft_model(model, lora_config(model, r)) if r else model


def merged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its adapters merged (``merge_and_unload``); ``model`` itself when it has none.
    The adapted model is left as it is, so training can go on.

    Example:
        >>> plain = merged(model)
    """
    if not isinstance(model, peft.PeftModel):
        return model
    return copy.deepcopy(model).merge_and_unload()
