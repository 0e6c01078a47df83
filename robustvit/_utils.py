"""Small torch helpers shared across robustvit: image checks, model wrappers, tracing, modes. They know no family,
layer or bound (those floors build on them)."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from robustvit.errors import UnsupportedModuleError


def model_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits of a timm model (a tensor) or a transformers model (an output with ``.logits``)."""
    out = model(images)
    return out.logits if hasattr(out, "logits") else out


def check_images(images: torch.Tensor, *, channels: int | None = None, size: tuple[int, int] | None = None) -> None:
    """Raise a clear ``ValueError`` for tensors that are not finite image batches ``(B, C, H, W)``."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"expected images shaped (batch, channels, height, width), got shape {tuple(images.shape)}")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"expected {channels} channels, got {images.shape[1]} (shape {tuple(images.shape)})")
    if size is not None and tuple(images.shape[-2:]) != tuple(size):
        raise ValueError(f"expected images of size {tuple(size)}, got {tuple(images.shape[-2:])}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")


def check_pixel_range(images: torch.Tensor) -> None:
    """Raise a ``ValueError`` naming the fix unless every value of ``images`` lies in [0, 1].

    Example:
        >>> check_pixel_range(torch.rand(1, 3, 8, 8) * 2 - 1)
        Traceback (most recent call last):
        ...
        ValueError: pixels must lie in [0, 1], got values in [...]: undo the mean/std normalization ...
    """
    # One reduction and one read back (a converted model's eval forward runs this; on a GPU each read is a sync).
    low, high = torch.stack(torch.aminmax(images.detach())).tolist()
    if low < 0 or high > 1:
        hint = (
            "divide [0, 255] pixels by 255"
            if high > 1 and low >= 0
            else "undo the mean/std normalization (the converted model normalizes inside: a transformers image "
            "processor needs do_normalize=False, or use the converted model's own processor, which "
            "save_pretrained writes; timm: create_transform(**resolve_data_config(model=converted))) or map [-1, 1] "
            "to [0, 1]"
        )
        raise ValueError(f"pixels must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]: {hint}")


_PIXELS_UNCHECKED = [False]


@contextmanager
def unchecked_pixels() -> Iterator[None]:
    """Within this context a converted model in eval mode takes inputs outside [0, 1] (its forward refuses them
    otherwise, see :class:`robustvit.layers.NormalizedConv2d`): for randomized smoothing's Gaussian samples and
    empirical Lipschitz estimates, which evaluate the model off the image cube on purpose.

    Example:
        >>> with unchecked_pixels():
        ...     logits = model(torch.randn(2, 3, 32, 32))
    """
    previous, _PIXELS_UNCHECKED[0] = _PIXELS_UNCHECKED[0], True
    try:
        yield
    finally:
        _PIXELS_UNCHECKED[0] = previous


def pixels_checked() -> bool:
    """Whether eval-mode forwards check their pixels now (outside :func:`unchecked_pixels`)."""
    return not _PIXELS_UNCHECKED[0]


def unwrap(model: nn.Module) -> nn.Module:
    """``model`` without the wrappers that do not change its (exact-arithmetic) function: ``DistributedDataParallel``
    / ``DataParallel``, ``torch.compile``, PEFT's ``PeftModel`` / tuner model (whose adapted layers stay in place in
    the wrapped model), and Accelerate's mixed-precision forward (``accelerator.prepare`` with ``--mixed_precision
    bf16|fp16`` replaces ``model.forward`` on the instance by an autocast wrapper of the class's forward; even
    ``accelerator.unwrap_model(model, keep_fp32_wrapper=False)`` leaves the class's forward bound on the instance).

    The model itself is never modified: without its forward wrapper it comes back as a shallow view that shares
    every submodule and parameter.
    """
    while True:
        if _class_forward_on_instance(model):
            view = copy.copy(model)  # shares _modules / _parameters / _buffers with the model
            del view.__dict__["forward"]
            view.__dict__.pop("_original_forward", None)
            model = view
            continue
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif type(model).__module__.startswith("peft."):
            from peft import PeftModel
            from peft.tuners.tuners_utils import BaseTuner

            if isinstance(model, PeftModel):
                model = model.base_model
            elif isinstance(model, BaseTuner):
                model = model.model
            else:
                return model
        else:
            return model


def module_type(module: nn.Module) -> type:
    """``module``'s class before ``torch.nn.utils.parametrize`` subclassed it. Not ``parametrize.
    type_before_parametrizations``: it asks ``getattr(module, "parametrizations")``, which a delegating wrapper (PEFT's
    ``ModulesToSaveWrapper`` forwards unknown attributes to the module it calls) answers with its child's, so the
    wrapper would pass for a parametrized module of its base class."""
    cls = type(module)
    return cls.__bases__[0] if owns_parametrizations(module) else cls


def owns_parametrizations(module: nn.Module) -> bool:
    """Whether ``module`` itself (not a module it delegates attributes to) holds ``torch.nn.utils.parametrize``
    parametrizations."""
    return isinstance(module.__dict__.get("_modules", {}).get("parametrizations"), nn.ModuleDict)


def called_child(module: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, child)`` of the module that a PEFT ``ModulesToSaveWrapper`` (``modules_to_save=["head"]``) calls in its
    current state, exactly as its ``forward`` chooses: the original module while adapters are disabled
    (``disable_adapter()``), no adapter is active or an active adapter did not wrap this module, else the active
    adapter's trained copy. ``None`` for any other module (a subclass of the wrapper included: it may choose
    otherwise)."""
    if "peft" not in sys.modules:  # a model can hold PEFT wrappers only once peft is imported
        return None
    from peft.utils import ModulesToSaveWrapper

    if type(module) is not ModulesToSaveWrapper:
        return None
    active = module.active_adapters
    if module.disable_adapters or not active or any(name not in module._adapters for name in active):
        return "original_module", module.original_module
    if active[0] not in module.modules_to_save:
        raise UnsupportedModuleError(
            f"modules_to_save wrapper: the active adapter {active[0]!r} has no copy of the module (its forward fails); "
            "set an adapter that has one with model.set_adapter(name)"
        )
    return f"modules_to_save.{active[0]}", module.modules_to_save[active[0]]


def called_module(module: nn.Module) -> nn.Module:
    """``module``, or what it calls if it is a PEFT ``ModulesToSaveWrapper`` (see :func:`called_child`)."""
    while (child := called_child(module)) is not None:
        module = child[1]
    return module


def refuse_adapters(model: nn.Module, action: str) -> None:
    """Raise a ``ValueError`` naming the fix when ``model`` holds PEFT adapters, for an ``action`` that handles only the
    converted model's own modules (saving its keys, folding its parametrizations)."""
    if "peft" not in sys.modules:  # a model can hold PEFT layers only once peft is imported
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    adapted = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer | AuxiliaryTrainingWrapper)]
    if adapted:
        raise ValueError(
            f"{action} a model with PEFT adapters ({', '.join(adapted[:3])}...) is not supported: merge them first, "
            "robustvit.peft.merged(model) (a merged copy; PEFT's merge_and_unload() in place), which computes exactly "
            "what the adapted model computes"
        )


def _class_forward_on_instance(model: nn.Module) -> bool:
    """Whether ``model.forward`` is set on the instance and only wraps the class's own ``forward`` (Accelerate's
    autocast / fp32-output wrappers are ``functools.wraps`` chains, each ``__wrapped__`` pointing inwards)."""
    forward = model.__dict__.get("forward")
    if forward is None:
        return False
    target = type(model).forward
    seen = 0
    function = getattr(forward, "__func__", forward)
    while function is not target and seen < 16:
        inner = getattr(function, "__wrapped__", None) or getattr(function, "model_forward", None)
        if inner is None:
            return False
        function, seen = getattr(inner, "__func__", inner), seen + 1
    return function is target and getattr(forward, "__self__", model) is model


def is_traced(x: torch.Tensor) -> bool:
    """Whether ``x`` is a placeholder of ``torch.fx`` (a ``Proxy``) or TorchScript is compiling: shape checks that
    need Python values of traced shapes are skipped then (the layers' reshapes enforce the same shapes in the graph)."""
    return isinstance(x, torch.fx.Proxy) or torch.jit.is_scripting()


def holds_values(x: torch.Tensor) -> bool:
    """Whether ``x`` holds values Python may read: not a tracer's placeholder (``torch.fx``, TorchScript,
    ``torch.compile`` and ``torch.export``, whose fake tensors are a ``Tensor`` subclass) nor wrapped by a
    ``torch.func`` transform (``vmap`` refuses data-dependent control flow). Checks of values step aside for those.

    Example:
        >>> holds_values(torch.rand(2)), torch.func.vmap(lambda t: torch.tensor(holds_values(t)))(torch.rand(2, 1))
        (True, tensor([False, False]))
    """
    if is_traced(x) or torch.jit.is_tracing() or torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return False
    # No public API says whether a torch.func transform wraps a tensor; tests/test_host_library_details.py pins this.
    return not torch._C._functorch.is_functorch_wrapped_tensor(x)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore every submodule's own mode afterwards (mixed modes included)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        # modules() is pre-order, so a parent's recursive train() is overridden by its children's own entries.
        for module, training in modes:
            module.train(training)
