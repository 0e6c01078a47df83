"""The bound engine: a guaranteed l2 Lipschitz upper bound of a module's (eval-mode) forward map.

The bound is composed from the module tree. A module is bounded by, in order:

1. its own ``lipschitz_bound(bound_of=None)`` method (robustvit's layers, or your own), where ``bound_of(name,
   child)`` bounds a child module and records it in the report;
2. a rule registered for its *exact* type with :func:`register_bound` (subclasses may change ``forward``, so
   they are never matched through their base class).

Anything else raises :class:`~robustvit.errors.UnsupportedModuleError` naming its path and type: nothing is
silently assumed 1-Lipschitz. Bounds are for the inference (eval-mode) map: dropout and drop-path are the identity
there and count as 1, never discounted by the keep rate.

What the tree describes must be what runs, so the engine also refuses, anywhere in the tree:

* forward hooks (unless marked with :func:`mark_lipschitz_neutral`) and instance-level method overrides;
* a call path other than ``nn.Module``'s own (a class overriding ``__call__``, ``_wrapped_call_impl`` or
  ``_call_impl``, or a patched ``nn.Module``);
* class-level patches: the method objects of every type with a rule (and of the types given to
  :func:`record_methods`) are recorded at registration, along the whole MRO, and compared when a bound is
  computed; a type bounded by its own ``lipschitz_bound`` is recorded the first time the engine sees it;
* a subclass that inherits ``lipschitz_bound`` but overrides any method other than ``__init__``/``extra_repr``;
* (in :func:`lipschitz_report` / :func:`lipschitz_bound`) a parametrization whose value depends on the grad mode
  or on train/eval mode, since the engine evaluates it once, under ``no_grad``, and the model runs in any mode.
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

from robustvit._utils import module_type as _module_type
from robustvit._utils import owns_parametrizations, unwrap
from robustvit.errors import UnsupportedModuleError
from robustvit.lipschitz.rescale import frozen_directions, is_spectrally_rescaled
from robustvit.lipschitz.spectral import batched_spectral_norms, conv_spectral_norm, gram_spectral_norm
from robustvit.registry import Registry

__all__ = [
    "BOUND_RULES",
    "BoundFn",
    "BoundEntry",
    "BoundReport",
    "GELU_LIPSCHITZ",
    "QUICK_GELU_LIPSCHITZ",
    "SILU_LIPSCHITZ",
    "bound_tensor",
    "compose_bound",
    "lipschitz_bound",
    "lipschitz_report",
    "mark_lipschitz_neutral",
    "record_methods",
    "register_bound",
]

BoundFn = Callable[[str, nn.Module], Tensor]
"""``bound_of(child_name, child) -> float64 tensor``: how a composite module bounds its children."""

GELU_LIPSCHITZ = 1.129
"""Max slope of GELU, ``Phi(x) + x phi(x)`` at ``x = sqrt(2)``: 1.128904 (exact) and 1.128993 (tanh form), rounded
up. (Some public code uses 1.12, which is below the true value.)"""

SILU_LIPSCHITZ = 1.0999
"""Max |slope| of SiLU (swish) ``x s(x)``, ``s`` the sigmoid: ``g(x) = s(x) (1 + x (1 - s(x)))``, with
``g'(x) = s (1 - s) (2 - x tanh(x / 2))``. ``x tanh(x / 2)`` is even and increasing in ``|x|``, so ``g`` increases on
``(-x*, x*)`` and decreases outside, ``x* tanh(x* / 2) = 2`` (``x* = 2.3993573``): its max is ``g(x*) = 1.0998393``,
rounded up, and its min ``1 - g(x*)`` (``g(-x) = 1 - g(x)``), smaller in magnitude."""

QUICK_GELU_LIPSCHITZ = SILU_LIPSCHITZ
"""Max |slope| of quick-GELU ``x s(1.702 x)`` (CLIP's): its slope is SiLU's at ``1.702 x`` (the 1.702 cancels)."""

BOUND_RULES: Registry[Callable[[nn.Module, BoundFn], Tensor]] = Registry("bound rule", keys=type)
"""``rule(module, bound_of) -> Tensor`` per exact module type; fill it with :func:`register_bound`."""

_CALL_PATH = ("__call__", "_wrapped_call_impl", "_call_impl")
_MODULE_CALL_PATH = {name: getattr(nn.Module, name) for name in _CALL_PATH}
# Parameter containers (PEFT's LoRA layers hold them): their __call__ only raises, so they compute nothing.
_UNCALLABLE_CONTAINERS = (nn.ParameterDict, nn.ParameterList)
_SUBCLASS_MAY_DEFINE = frozenset({"__init__", "extra_repr", "__module__", "__qualname__", "__doc__", "__firstlineno__"})
_SUBCLASS_MAY_DEFINE |= frozenset({"__static_attributes__", "__annotations__", "__dict__", "__weakref__"})
_SUBCLASS_MAY_DEFINE |= frozenset({"__slotnames__"})  # cached by copy / pickle


def _method_table(cls: type) -> dict[str, tuple[type, object]]:
    """Every method-like attribute of ``cls`` (``object``'s excluded) as attribute lookup resolves it:
    ``name -> (defining class, raw class attribute)``."""
    table = {}
    for klass in reversed(cls.__mro__[:-1]):  # subclasses last: they shadow their bases
        for name, value in vars(klass).items():
            if callable(value) or isinstance(value, (staticmethod, classmethod, property)):
                table[name] = (klass, value)
    return table


# Names added later are ignored (transformers adds nn.Module.smart_apply on import): recorded code never calls them.
_METHODS: dict[type, dict[str, tuple[type, object]]] = {t: _method_table(t) for t in (nn.Module, nn.Linear)}


_CONSTRUCTION_METHODS = frozenset({"__init__", "__setstate__"})
"""Methods that build or unpickle a module and never run when it computes: what they leave behind (weights, hooks,
the call path) is checked on the instance itself. ``torch.compile`` patches both on ``nn.Module`` (dynamo's
generation tagging), so comparing them would refuse every model once anything was compiled."""


def record_methods(*module_types: type) -> None:
    """Record the methods of these types (along their MRO) as they are now; the engine then refuses any model
    containing one of them once a method was patched on the class. :func:`register_bound` does this for the types
    it registers; call it for types a family rule relies on without visiting them (e.g. a backbone container).

    Example:
        >>> record_methods(nn.Sequential)
    """
    for module_type in module_types:
        _METHODS.setdefault(module_type, _method_table(module_type))


def register_bound(*module_types: type) -> Callable:
    """Register ``rule(module, bound_of) -> Tensor`` as the bound of modules of exactly these types.

    A type that already has a rule is refused (``ValueError``): which rule bounds a module must not depend on
    import order. The types' methods are recorded now (see :func:`record_methods`): a later class-level patch is
    refused.

    Example:
        >>> class Double(nn.Module):
        ...     def forward(self, x):
        ...         return 2 * x
        >>> @register_bound(Double)
        ... def _double(module, bound_of):
        ...     return torch.full((), 2.0, dtype=torch.float64)
    """

    def decorator(rule: Callable[[nn.Module, BoundFn], Tensor]) -> Callable[[nn.Module, BoundFn], Tensor]:
        for module_type in module_types:
            BOUND_RULES.register(module_type, rule)
            _METHODS[module_type] = _method_table(module_type)
        return rule

    return decorator


def mark_lipschitz_neutral(hook: Callable) -> Callable:
    """Mark a forward hook as not changing the Lipschitz constant (e.g. adding a constant), so the engine accepts it."""
    hook._robustvit_lipschitz_neutral = True  # type: ignore[attr-defined]
    return hook


_LIBRARY_NEUTRAL_HOOKS = {
    # transformers' enable_input_require_grads (gradient checkpointing, PEFT): ``output.requires_grad_(True)``, returns
    # None. A closure made on each call, so it cannot be marked in advance: known by its code's qualified name.
    ("transformers.modeling_utils", "PreTrainedModel.enable_input_require_grads.<locals>.make_inputs_require_grads"),
}


def _is_lipschitz_neutral(hook: Callable) -> bool:
    if getattr(hook, "_robustvit_lipschitz_neutral", False):
        return True
    code = getattr(hook, "__code__", None)
    return code is not None and (getattr(hook, "__module__", None), code.co_qualname) in _LIBRARY_NEUTRAL_HOOKS


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
    return _module_type(module).__name__


def _rule_for(path: str, module: nn.Module, walker: _Walker) -> Callable[[nn.Module, BoundFn], Tensor]:
    where = f"'{path or '<model>'}' ({_type_name(module)})"
    hooks = [
        *module._forward_hooks.values(),
        *module._forward_pre_hooks.values(),
        *_torch_module._global_forward_hooks.values(),
        *_torch_module._global_forward_pre_hooks.values(),
    ]
    if not all(map(_is_lipschitz_neutral, hooks)):
        raise UnsupportedModuleError(
            f"module {where} has forward hooks that may change its output; the bound engine cannot see them. "
            "Remove them, or mark Lipschitz-neutral hooks with robustvit.lipschitz.mark_lipschitz_neutral."
        )
    if "forward" in module.__dict__:
        raise UnsupportedModuleError(f"module {where} has an instance-level forward override the engine cannot see")
    # Looked up statically: a wrapper that forwards unknown attributes to a child (PEFT's ModulesToSaveWrapper) would
    # otherwise pass off its child's bound as its own, whatever child its forward calls.
    own = module.lipschitz_bound if inspect.getattr_static(module, "lipschitz_bound", None) else None
    module_type = _module_type(module)
    if callable(own):
        _check_inherited_bound(module_type, where)
        takes_bound_of = len(inspect.signature(own).parameters) > 0
        return (lambda m, bound_of: own(bound_of)) if takes_bound_of else (lambda m, bound_of: own())
    if module_type is nn.Linear:
        return lambda m, bound_of: walker.linear_bounds[id(m)]
    rule = BOUND_RULES.get(module_type)
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
        linears = [m for m in root.modules() if _module_type(m) is nn.Linear]
        differentiable = torch.is_grad_enabled()
        graph = [m for m in linears if differentiable and m.weight.requires_grad and not is_spectrally_rescaled(m)]
        bounds = {id(m): gram_spectral_norm(m.weight) for m in graph}
        constant = [m for m in linears if id(m) not in bounds]
        bounds.update(zip(map(id, constant), batched_spectral_norms([m.weight for m in constant]), strict=True))
    return bounds


def _defining_class(cls: type, name: str) -> type | None:
    return next((c for c in cls.__mro__ if name in c.__dict__), None)


def _check_inherited_bound(module_type: type, where: str) -> None:
    """A subclass inheriting ``lipschitz_bound`` may not change what the bound describes: it may override no
    method (forward, or anything forward calls) other than ``__init__`` and ``extra_repr``."""
    bound_owner = _defining_class(module_type, "lipschitz_bound")
    if bound_owner is None:
        raise UnsupportedModuleError(f"module {where} has a lipschitz_bound set on the instance, not on its class")
    for klass in module_type.__mro__[: module_type.__mro__.index(bound_owner)]:
        changed = sorted(
            name
            for name, value in vars(klass).items()
            if name not in _SUBCLASS_MAY_DEFINE and (callable(value) or isinstance(value, (staticmethod, property)))
        )
        if changed:
            raise UnsupportedModuleError(
                f"module {where} inherits lipschitz_bound from {bound_owner.__name__} but {klass.__name__} "
                f"overrides {', '.join(changed)}; give it its own lipschitz_bound"
            )


def _check_methods(module: nn.Module, where: str, checked: set[type]) -> None:
    """The call path is ``nn.Module``'s, and no recorded method was patched on the class since it was recorded
    (compared once per type and walk: ``checked``)."""
    cls = type(module)
    for name, original in _MODULE_CALL_PATH.items():
        if getattr(cls, name) is not original and cls not in _UNCALLABLE_CONTAINERS:
            raise UnsupportedModuleError(
                f"module {where} does not run through nn.Module.{name} ({_defining_class(cls, name).__name__} "
                "overrides or patches it): the bound engine cannot see what it computes"
            )
    module_type = _module_type(module)
    if module_type is not cls:  # parametrize's generated class may add only its properties and pickling helpers
        extra = {n for n in vars(cls) if n not in _SUBCLASS_MAY_DEFINE} - {"__getstate__", "__deepcopy__"}
        if extra - set(module.parametrizations.keys()):
            raise UnsupportedModuleError(f"module {where}: the parametrized class defines {sorted(extra)}")
    if module_type not in _METHODS and callable(getattr(module_type, "lipschitz_bound", None)):
        record_methods(module_type)  # first sight of a self-bounding layer
    for recorded_type in (nn.Module, module_type):
        recorded = _METHODS.get(recorded_type)
        if recorded is None or recorded_type in checked:
            continue
        checked.add(recorded_type)
        now = _method_table(recorded_type)
        changed = sorted(
            f"{recorded_type.__name__}.{name}"
            for name, (_, value) in recorded.items()
            if name not in _CONSTRUCTION_METHODS and (name not in now or now[name][1] is not value)
        )
        if changed:
            raise UnsupportedModuleError(
                f"module {where}: {', '.join(changed)} changed on the class after robustvit recorded it "
                "(a monkeypatch?); the bound rule describes the original method"
            )


def _check_parametrizations(module: nn.Module, where: str) -> None:
    """A parametrized tensor must be the same in every mode the model may run in: the engine evaluates it once
    (under ``no_grad``, in the module's current train/eval mode), the model may run with grad or in eval mode."""
    if not owns_parametrizations(module):
        return
    for name, chain in module.parametrizations.items():
        modes = [m.training for m in chain.modules()]
        values = []
        try:
            for grad, training in ((False, chain.training), (True, chain.training), (False, False)):
                chain.train(training)
                with torch.set_grad_enabled(grad):
                    values.append(chain().detach())
        finally:
            for m, mode in zip(chain.modules(), modes, strict=True):
                m.training = mode
        if not all(torch.equal(values[0], v) for v in values[1:]):
            raise UnsupportedModuleError(
                f"module {where}: parametrized {name!r} is not the same tensor with and without grad, or in train "
                "and eval mode; the engine would bound a different weight than the one that runs"
            )


def _check_tree(root: nn.Module, *, parametrizations: bool = False) -> None:
    """Refuse hooks, instance-level method overrides, foreign call paths and patched classes anywhere in the tree,
    visited by a rule or not: a family rule may read a submodule's weights (a head) or call methods
    (forward_head) without visiting them."""
    checked: set[type] = set()
    parametrized: dict[type, str] = {}
    for path, module in root.named_modules():
        where = f"'{path or '<model>'}' ({_type_name(module)})"
        if owns_parametrizations(module) and parametrized.setdefault(type(module), path) != path:
            raise UnsupportedModuleError(
                f"modules '{parametrized[type(module)]}' and '{path}' share one torch parametrized class (one is a "
                "deep copy of the other, e.g. PEFT's modules_to_save copy of the head): torch.nn.utils.parametrize "
                "caches both weights under one key, so a bound could read one's weight for the other's. For a PEFT "
                "model call robustvit.peft.constrain(model), which gives each copy its own class"
            )
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        if not all(map(_is_lipschitz_neutral, hooks)):
            raise UnsupportedModuleError(
                f"module {where} has forward hooks that may change its output; the bound engine cannot see them. "
                "Remove them, or mark Lipschitz-neutral hooks with robustvit.lipschitz.mark_lipschitz_neutral."
            )
        cls = type(module)
        for name, value in vars(module).items():
            if callable(value) and inspect.isfunction(getattr(cls, name, None)):
                raise UnsupportedModuleError(f"module {where} overrides method {name!r} on the instance")
        _check_methods(module, where, checked)
        if parametrizations:
            _check_parametrizations(module, where)


def _walk(module: nn.Module, *, deployed: bool = False) -> tuple[Tensor, list[BoundEntry]]:
    with frozen_directions():  # checking and bounding never move the rescaling's tracked directions
        _check_tree(module, parametrizations=deployed)
        walker = _Walker(module)
        with parametrize.cached():
            total = walker.visit("", module, 0)
    return total, walker.entries


def compose_bound(root: nn.Module, compose: Callable[[BoundFn], Tensor]) -> Tensor:
    """Evaluate a custom composition of ``root``'s submodules with the engine's rules.

    Used for partial maps, e.g. the features a linear head reads:
    ``compose_bound(model, lambda bound_of: bound_of("backbone", model.backbone))``.
    """
    walker = _Walker(unwrap(root))
    with parametrize.cached(), frozen_directions():
        return compose(lambda name, child: walker.visit(name, child, 0))


def bound_tensor(module: nn.Module) -> Tensor:
    """:func:`lipschitz_bound` as a float64 tensor that is differentiable in the parameters (for training losses)."""
    return _walk(unwrap(module))[0]


@torch.no_grad()
def lipschitz_report(module: nn.Module) -> BoundReport:
    """Every module that contributes to :func:`lipschitz_bound`, with its bound; ``print`` it for a table."""
    total, entries = _walk(unwrap(module), deployed=True)
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


@register_bound(nn.SiLU)
def _silu(module: nn.Module, bound_of: BoundFn) -> Tensor:
    return _one(module) * SILU_LIPSCHITZ


@register_bound(nn.LeakyReLU)
def _leaky_relu(module: nn.LeakyReLU, bound_of: BoundFn) -> Tensor:
    return _one(module) * max(1.0, abs(module.negative_slope))


@register_bound(nn.parallel.DistributedDataParallel)
def _ddp(module: nn.parallel.DistributedDataParallel, bound_of: BoundFn) -> Tensor:
    return bound_of("module", module.module)
