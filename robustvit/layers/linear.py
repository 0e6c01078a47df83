"""What a linear layer computes with: its weight and bias, PEFT updates included.

Layers that read a linear child's weight instead of calling it (L2 attention's tied query/key weights, the
families' pairwise head bound) read it through these, so an adapter on that child (a
:class:`robustvit.peft.ConstrainedTunerLayer`, whose ``weight`` is its base layer's) enters what they compute and
bound, and merging it keeps the function; a head in PEFT's ``modules_to_save`` is read as the module the wrapper calls
(the active adapter's trained copy, or the original one while adapters are disabled).
"""

from __future__ import annotations

from torch import Tensor, nn

from robustvit._utils import called_module, module_type


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (parametrized or not), or a PEFT-adapted one (:class:`robustvit.peft.ConstrainedTunerLayer`).

    Example:
        >>> is_linear(nn.Linear(4, 2)), is_linear(nn.Conv2d(3, 4, 1))
        (True, False)
    """
    module = called_module(module)
    return module_type(module) is nn.Linear or hasattr(module, "effective_weight")


def linear_weight(module: nn.Module) -> Tensor:
    """The weight a linear layer computes with, PEFT updates included.

    Example:
        >>> layer = nn.Linear(4, 2)
        >>> linear_weight(layer) is layer.weight
        True
    """
    module = called_module(module)
    return module.effective_weight() if hasattr(module, "effective_weight") else module.weight


def linear_bias(module: nn.Module) -> Tensor | None:
    """The bias a linear layer computes with, PEFT updates included ((IA)^3 scales it).

    Example:
        >>> linear_bias(nn.Linear(4, 2, bias=False)) is None
        True
    """
    module = called_module(module)
    return module.effective_bias() if hasattr(module, "effective_bias") else module.bias
