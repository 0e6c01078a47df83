"""The bound engine: a guaranteed l2 Lipschitz upper bound of a module's (eval-mode) forward map.

The bound is composed from the module tree. A module is bounded by, in order:

1. its own ``lipschitz_bound(bound_of=None)`` method (robustvit's layers, or your own), where ``bound_of(name,
   child)`` bounds a child module and records it in the report;
2. a rule registered for its *exact* type with :func:`register_bound` (subclasses may change ``forward``, so
   they are never matched through their base class).

Anything else raises :class:`~robustvit.errors.UnsupportedModuleError` naming its path and type: nothing is
silently assumed 1-Lipschitz. Forward hooks and instance-level ``forward`` overrides are refused too, because
they change the function the tree describes. Bounds are for the inference (eval-mode) map: dropout and drop-path
are the identity there and count as 1, never discounted by the keep rate.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module
from torch.nn.utils import parametrize

from robustvit.errors import UnsupportedModuleError
from robustvit.lipschitz.rescale import frozen_directions, is_spectrally_rescaled
from robustvit.lipschitz.spectral import batched_spectral_norms, conv_spectral_norm, gram_spectral_norm

__all__ = [
    "BoundFn",
    "BoundEntry",
    "BoundReport",
    "GELU_LIPSCHITZ",
    "bound_tensor",
    "compose_bound",
    "lipschitz_bound",
    "lipschitz_report",
    "mark_lipschitz_neutral",
    "register_bound",
]

BoundFn = Callable[[str, nn.Module], Tensor]
"""``bound_of(child_name, child) -> float64 tensor``: how a composite module bounds its children."""

GELU_LIPSCHITZ = 1.129
"""Max slope of GELU, ``Phi(x) + x phi(x)`` at ``x = sqrt(2)``: 1.128904 (exact) and 1.128993 (tanh form), rounded
up. (Some public code uses 1.12, which is below the true value.)"""

_RULES: dict[type, Callable[[nn.Module, BoundFn], Tensor]] = {}


def register_bound(*module_types: type) -> Callable:
    """Register ``rule(module, bound_of) -> Tensor`` as the bound of modules of exactly these types.

    Example:
        >>> @register_bound(nn.Hardtanh)
        ... def _hardtanh(module, bound_of):
        ...     return torch.ones((), dtype=torch.float64)
    """

    def decorator(rule: Callable[[nn.Module, BoundFn], Tensor]) -> Callable[[nn.Module, BoundFn], Tensor]:
        for module_type in module_types:
            _RULES[module_type] = rule
        return rule

    return decorator


def mark_lipschitz_neutral(hook: Callable) -> Callable:
    """Mark a forward hook as not changing the Lipschitz constant (e.g. adding a constant), so the engine accepts it."""
    hook._robustvit_lipschitz_neutral = True  # type: ignore[attr-defined]
    return hook


def _one(module: nn.Module | None = None) -> Tensor:
    device = None
    if module is not None:
        tensor = next(module.parameters(), None)
        device = tensor.device if tensor is not None else None
    return torch.ones((), dtype=torch.float64, device=device)


@dataclass
class BoundEntry:
    """One row of a :class:`BoundReport`: a module and the bound it contributes."""

    path: str
    type: str
    bound: float
    depth: int


@dataclass
class BoundReport:
    """Where the Lipschitz budget goes: every module visited, with its bound, in forward order.

    ``str(report)`` is a table; ``to_dict()`` is JSON-ready (stored in certificates).
    """

    total: float
    entries: list[BoundEntry] = field(default_factory=list)

    def __str__(self) -> str:
        width = max([len("module")] + [2 * e.depth + len(e.path or "<model>") for e in self.entries])
        lines = [f"{'module':<{width}}  {'type':<24} {'bound':>14}", "-" * (width + 41)]
        for e in self.entries:
            parts = e.path.split(".") if e.path else ["<model>"]
            tail = ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]  # "blocks.3", not "3"
            name = "  " * e.depth + tail
            lines.append(f"{name:<{width}}  {e.type:<24} {e.bound:>14.6g}")
        lines.append(f"end-to-end l2 Lipschitz bound: {self.total:.6g}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "entries": [{"path": e.path, "type": e.type, "bound": e.bound} for e in self.entries],
        }


class _Walker:
    """Visits the module tree once, recording every bound; shares batched matrix bounds across modules."""

    def __init__(self, root: nn.Module):
        self.entries: list[BoundEntry] = []
        self.linear_bounds = _batched_linear_bounds(root)

    def visit(self, path: str, module: nn.Module, depth: int) -> Tensor:
        rule = _rule_for(path, module, self)
        row = len(self.entries)
        self.entries.append(BoundEntry(path, _type_name(module), math.nan, depth))

        def bound_of(name: str, child: nn.Module) -> Tensor:
            return self.visit(f"{path}.{name}" if path else name, child, depth + 1)

        bound = rule(module, bound_of)
        if not isinstance(bound, Tensor) or bound.numel() != 1:
            raise TypeError(f"the bound of '{path or '<model>'}' must be a scalar tensor, got {bound!r}")
        bound = bound.reshape(()).to(torch.float64)
        if not torch.isfinite(bound) or bound < 0:
            raise ValueError(f"the bound of '{path or '<model>'}' ({_type_name(module)}) is {float(bound)}")
        self.entries[row].bound = float(bound.detach())
        return bound


def _type_name(module: nn.Module) -> str:
    return parametrize.type_before_parametrizations(module).__name__


def _rule_for(path: str, module: nn.Module, walker: _Walker) -> Callable[[nn.Module, BoundFn], Tensor]:
    where = f"'{path or '<model>'}' ({_type_name(module)})"
    hooks = [
        *module._forward_hooks.values(),
        *module._forward_pre_hooks.values(),
        *_torch_module._global_forward_hooks.values(),
        *_torch_module._global_forward_pre_hooks.values(),
    ]
    if any(not getattr(h, "_robustvit_lipschitz_neutral", False) for h in hooks):
        raise UnsupportedModuleError(
            f"module {where} has forward hooks that may change its output; the bound engine cannot see them. "
            "Remove them, or mark Lipschitz-neutral hooks with robustvit.lipschitz.mark_lipschitz_neutral."
        )
    if "forward" in module.__dict__:
        raise UnsupportedModuleError(f"module {where} has an instance-level forward override the engine cannot see")
    own = getattr(module, "lipschitz_bound", None)
    module_type = parametrize.type_before_parametrizations(module)
    if callable(own):
        bound_owner = _defining_class(module_type, "lipschitz_bound")
        forward_owner = _defining_class(module_type, "forward")
        if bound_owner is not None and forward_owner is not None and not issubclass(bound_owner, forward_owner):
            raise UnsupportedModuleError(
                f"module {where} overrides forward ({forward_owner.__name__}) but inherits lipschitz_bound "
                f"from {bound_owner.__name__}"
            )
        takes_bound_of = len(inspect.signature(own).parameters) > 0
        return (lambda m, bound_of: own(bound_of)) if takes_bound_of else (lambda m, bound_of: own())
    if module_type is nn.Linear:
        return lambda m, bound_of: walker.linear_bounds[id(m)]
    rule = _RULES.get(module_type)
    if rule is None:
        raise UnsupportedModuleError(
            f"no Lipschitz bound is known for module {where}. Convert the model with robustvit.convert, "
            "give the module a lipschitz_bound() method, or register a rule with "
            "robustvit.lipschitz.register_bound."
        )

    def checked(m: nn.Module, bound_of: BoundFn) -> Tensor:
        try:
            return rule(m, bound_of)
        except ValueError as err:  # e.g. a convolution whose bound needs an input size
            raise UnsupportedModuleError(f"cannot bound module {where}: {err}") from err

    return checked


def _batched_linear_bounds(root: nn.Module) -> dict[int, Tensor]:
    """Bounds of every ``nn.Linear`` weight in ``root``: verified and batched by shape, or Gram iteration with a
    graph for plain weights that require grad (``bound_tensor`` in a loss). A spectrally rescaled weight's bound stays
    about 1 by construction (its divisor tracks its norm), so it enters a loss as a constant, which keeps margin
    training cheap; the value is still the guaranteed bound of the effective weight."""
    with parametrize.cached(), frozen_directions():
        linears = [m for m in root.modules() if parametrize.type_before_parametrizations(m) is nn.Linear]
        differentiable = torch.is_grad_enabled()
        graph = [m for m in linears if differentiable and m.weight.requires_grad and not is_spectrally_rescaled(m)]
        bounds = {id(m): gram_spectral_norm(m.weight) for m in graph}
        constant = [m for m in linears if id(m) not in bounds]
        bounds.update(zip(map(id, constant), batched_spectral_norms([m.weight for m in constant]), strict=True))
    return bounds


def _defining_class(cls: type, name: str) -> type | None:
    return next((c for c in cls.__mro__ if name in c.__dict__), None)


def _check_tree(root: nn.Module) -> None:
    """Refuse hooks and instance-level method overrides anywhere in the tree, visited by a rule or not: a
    family rule may read a submodule's weights (a head) or call methods (forward_head) without visiting them."""
    for path, module in root.named_modules():
        where = f"'{path or '<model>'}' ({_type_name(module)})"
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        if any(not getattr(h, "_robustvit_lipschitz_neutral", False) for h in hooks):
            raise UnsupportedModuleError(
                f"module {where} has forward hooks that may change its output; the bound engine cannot see them. "
                "Remove them, or mark Lipschitz-neutral hooks with robustvit.lipschitz.mark_lipschitz_neutral."
            )
        cls = type(module)
        for name, value in vars(module).items():
            if callable(value) and inspect.isfunction(getattr(cls, name, None)):
                raise UnsupportedModuleError(f"module {where} overrides method {name!r} on the instance")


def _walk(module: nn.Module) -> tuple[Tensor, list[BoundEntry]]:
    _check_tree(module)
    walker = _Walker(module)
    with parametrize.cached(), frozen_directions():
        total = walker.visit("", module, 0)
    return total, walker.entries


def compose_bound(root: nn.Module, compose: Callable[[BoundFn], Tensor]) -> Tensor:
    """Evaluate a custom composition of ``root``'s submodules with the engine's rules.

    Used for partial maps, e.g. the features a linear head reads:
    ``compose_bound(model, lambda bound_of: bound_of("backbone", model.backbone))``.
    """
    walker = _Walker(root)
    with parametrize.cached(), frozen_directions():
        return compose(lambda name, child: walker.visit(name, child, 0))


def bound_tensor(module: nn.Module) -> Tensor:
    """:func:`lipschitz_bound` as a float64 tensor that is differentiable in the parameters (for training losses)."""
    return _walk(module)[0]


@torch.no_grad()
def lipschitz_report(module: nn.Module) -> BoundReport:
    """Every module that contributes to :func:`lipschitz_bound`, with its bound; ``print`` it for a table."""
    total, entries = _walk(module)
    return BoundReport(float(total), entries)


def lipschitz_bound(module: nn.Module) -> float:
    """Guaranteed l2 Lipschitz upper bound of ``module``'s eval-mode forward map.

    For a converted model this is the end-to-end bound from pixels in [0, 1] to logits.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> lipschitz_bound(net) >= 0
        True
    """
    return lipschitz_report(module).total


@register_bound(nn.Sequential)
def _sequential(module: nn.Sequential, bound_of: BoundFn) -> Tensor:
    bound = _one(module)
    for name, child in module.named_children():
        bound = bound * bound_of(name, child)
    return bound


@register_bound(nn.Conv2d)
def _conv2d(module: nn.Conv2d, bound_of: BoundFn) -> Tensor:
    return conv_spectral_norm(module)


@register_bound(
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Flatten, nn.ReLU, nn.Tanh, nn.Hardtanh
)
def _one_lipschitz(module: nn.Module, bound_of: BoundFn) -> Tensor:
    return _one(module)


@register_bound(nn.GELU)
def _gelu(module: nn.Module, bound_of: BoundFn) -> Tensor:
    return _one(module) * GELU_LIPSCHITZ


@register_bound(nn.LeakyReLU)
def _leaky_relu(module: nn.LeakyReLU, bound_of: BoundFn) -> Tensor:
    return _one(module) * max(1.0, abs(module.negative_slope))


@register_bound(nn.parallel.DistributedDataParallel)
def _ddp(module: nn.parallel.DistributedDataParallel, bound_of: BoundFn) -> Tensor:
    return bound_of("module", module.module)
