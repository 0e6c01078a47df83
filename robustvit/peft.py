"""PEFT LoRA inside the Lipschitz constraint: parameter-efficient certified finetuning of converted models.

Plain ``peft.get_peft_model`` wraps a spectrally rescaled ``nn.Linear`` and adds ``B A x`` *outside* its
parametrization, so the layer is no longer 1-Lipschitz during training, and ``merge_and_unload()`` writes the update
through the parametrization's computed weight, where it is lost. Here the update goes *inside* the constraint:

* :class:`LipschitzLoraLinear` computes ``x -> x @ rescale(W + s B A).T + b``: the spectral rescaling is applied to
  the adapted raw weight, so the layer stays at most 1-Lipschitz at every step, whatever LoRA learns;
* its ``merge`` writes ``W + s B A`` into the raw weight (``parametrizations.weight.original``), so
  ``merge_and_unload()`` returns the converted model computing exactly what the adapted one computed;
* its ``lipschitz_bound`` is a guaranteed bound of the effective weight, so ``robustvit.lipschitz_bound`` and
  ``robustvit.certify`` take the PEFT-wrapped model as it is.

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
from typing import Any

import peft
import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import Tensor, nn
from torch.nn.utils import parametrize

from robustvit.errors import UnsupportedModuleError
from robustvit.lipschitz.engine import BoundFn, register_bound
from robustvit.lipschitz.rescale import is_spectrally_rescaled
from robustvit.lipschitz.spectral import gram_spectral_norm

__all__ = ["LipschitzLoraLinear", "get_peft_model", "lora_config", "merged", "with_lora"]


class LipschitzLoraLinear(LoraLinear):
    """A PEFT LoRA ``Linear`` whose update lives inside the base layer's weight parametrization.

    For a base layer with a weight parametrization (robustvit's spectral rescaling) the effective weight is the
    parametrization applied to ``original + sum_a s_a B_a A_a`` over the active adapters; for a plain ``nn.Linear``
    it is ``W + sum_a s_a B_a A_a``. LoRA variants whose update is not a weight delta computed from the input alone
    (dropout on the adapter input, DoRA, LoRA biases...) are refused.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: peft.LoraConfig, **kwargs: Any) -> None:
        _check_config(config)
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _raw_weight(self) -> Tensor:
        base = self.get_base_layer()
        raw = base.parametrizations.weight.original if parametrize.is_parametrized(base, "weight") else base.weight
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                raw = raw + self.get_delta_weight(adapter).to(raw.dtype)
        return raw

    def effective_weight(self) -> Tensor:
        """The weight this layer computes with (differentiable in the base weight and the adapters)."""
        base = self.get_base_layer()
        if self.disable_adapters or self.merged or not any(a in self.lora_A for a in self.active_adapters):
            return base.weight
        weight = self._raw_weight()
        if parametrize.is_parametrized(base, "weight"):
            # The rescaling applied to the adapted weight, in the layer's own mode: training forwards move its tracked
            # directions toward this weight's top singular subspace, eval forwards leave them (and the function) fixed.
            for parametrization in base.parametrizations.weight:
                weight = parametrization(weight)
        return weight

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise NotImplementedError(
                "mixed-adapter batches (adapter_names=...) are not supported under the constraint"
            )
        if self.disable_adapters and self.merged:
            self.unmerge()
        base = self.get_base_layer()
        weight = self.effective_weight()
        return F.linear(x, weight.to(x.dtype), base.bias.to(x.dtype) if base.bias is not None else None)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the adapters into the base layer's *raw* weight, so the merged layer computes what this one did."""
        from peft.tuners.tuners_utils import check_adapters_to_merge

        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        raw = base.parametrizations.weight.original if parametrize.is_parametrized(base, "weight") else base.weight
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            merged = raw.detach() + self.get_delta_weight(adapter).detach().to(raw.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights of adapter {adapter!r}")
            with torch.no_grad():
                raw.copy_(merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        raw = base.parametrizations.weight.original if parametrize.is_parametrized(base, "weight") else base.weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                with torch.no_grad():
                    raw.sub_(self.get_delta_weight(adapter).detach().to(raw.dtype))

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        # A guaranteed bound of the exact effective weight (a rescaled one is at most 1 up to the Gram slack).
        return gram_spectral_norm(self.effective_weight())

    def __repr__(self) -> str:
        return "lipschitz_" + super().__repr__()


def _check_config(config: peft.LoraConfig) -> None:
    problems = []
    if config.lora_dropout:
        problems.append(f"lora_dropout={config.lora_dropout} (dropout on the adapter input is not a weight update)")
    for flag in ("use_dora", "lora_bias"):
        if getattr(config, flag, False):
            problems.append(f"{flag}=True")
    if config.fan_in_fan_out:
        problems.append("fan_in_fan_out=True (nn.Linear stores (out, in))")
    if problems:
        raise ValueError("LoRA inside the Lipschitz constraint does not support " + "; ".join(problems))


def lora_config(model: nn.Module, r: int, *, lora_alpha: float | None = None, **kwargs: Any) -> peft.LoraConfig:
    """A ``LoraConfig`` targeting every spectrally rescaled ``nn.Linear`` of a converted model (MLPs, head, L2
    attention projections), or every ``nn.Linear`` of an unconverted one, with ``lora_alpha = r`` (scaling 1) unless
    given. ``kwargs`` go to ``LoraConfig``.

    Example:
        >>> config = lora_config(lip, r=8)
    """
    if r < 1:
        raise ValueError(f"r must be a positive rank, got {r}")
    linears = {
        name: module
        for name, module in model.named_modules()
        if parametrize.type_before_parametrizations(module) is nn.Linear
    }
    rescaled = sorted(name for name, module in linears.items() if is_spectrally_rescaled(module))
    targets = rescaled or sorted(linears)
    if not targets:
        raise ValueError("the model has no nn.Linear to adapt")
    alpha = lora_alpha if lora_alpha is not None else r
    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **kwargs)


def with_lora(model: nn.Module, r: int) -> nn.Module:
    """``get_peft_model(model, lora_config(model, r))``, or ``model`` itself for ``r == 0`` (the recipes' ``--lora_r``).

    Example:
        >>> model = with_lora(lip, r=8)
    """
    return get_peft_model(model, lora_config(model, r)) if r else model


def merged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its LoRA adapters merged (``merge_and_unload``); ``model`` itself when it has none.
    The adapted model is left as it is, so training can go on.

    Example:
        >>> plain = merged(model)
    """
    if not isinstance(model, peft.PeftModel):
        return model
    return copy.deepcopy(model).merge_and_unload()


def get_peft_model(model: nn.Module, config: peft.LoraConfig, **kwargs: Any) -> peft.PeftModel:
    """``peft.get_peft_model`` with every LoRA ``nn.Linear`` a :class:`LipschitzLoraLinear` (inside the constraint).

    Only LoRA is supported; other tuners raise ``NotImplementedError``. ``kwargs`` go to ``peft.get_peft_model``.

    Example:
        >>> model = get_peft_model(lip, lora_config(lip, r=8))
        >>> model.print_trainable_parameters()
        trainable params: ... || all params: ... || trainable%: ...
    """
    if not isinstance(config, peft.LoraConfig):
        raise NotImplementedError(
            f"{type(config).__name__}: only LoRA is implemented inside the Lipschitz constraint (robustvit.peft)"
        )
    _check_config(config)
    config._register_custom_module({nn.Linear: LipschitzLoraLinear})
    return peft.get_peft_model(model, config, **kwargs)


@register_bound(LoraLinear)
def _plain_lora(module: LoraLinear, bound_of: BoundFn) -> Tensor:
    base = module.get_base_layer()
    if not (module.disable_adapters or module.merged) and is_spectrally_rescaled(base):
        raise UnsupportedModuleError(
            "peft.get_peft_model put a LoRA update outside the spectral rescaling of this layer, so the layer is no "
            "longer constrained; use robustvit.peft.get_peft_model(model, config) to train LoRA inside the constraint"
        )
    if module.disable_adapters or module.merged or not any(a in module.lora_A for a in module.active_adapters):
        return bound_of("base_layer", base)
    raise UnsupportedModuleError(
        "a plain peft LoRA layer has no robustvit bound; use robustvit.peft.get_peft_model(model, config)"
    )
