"""Attention pooling with uniform attention: the sound substitute of a MAP head (timm ``AttentionPoolLatent``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustvit._utils import is_traced
from robustvit.lipschitz.engine import BoundFn, bound_tensor


class MeanPoolLatent(nn.Module):
    """``y = proj(v(mean(x)))``, then ``mlp(y)`` (a :class:`~robustvit.layers.LipResidual` around norm and MLP).

    A MAP head lets one learned query attend over the tokens: ``proj(softmax(q k(x)^T) v(x))``. The softmax over
    data-dependent keys has no global bound; with the attention weights fixed to uniform (``1/n`` on each of the
    ``n`` tokens) the pooled value is ``v(mean(x))``, and the head keeps its value projection, output projection,
    norm and MLP. The mean of ``n`` tokens is ``1/sqrt(n)``-Lipschitz on the token tensor, so the bound is
    ``bound(v) * bound(proj) * bound(mlp) / sqrt(n)``; the token count is checked in the forward, as the bound
    depends on it.

    Example:
        >>> from robustvit.layers import LipResidual
        >>> pool = MeanPoolLatent(nn.Linear(8, 8), nn.Linear(8, 8), LipResidual(nn.Linear(8, 8), 8), num_tokens=5)
        >>> pool(torch.randn(2, 5, 8)).shape
        torch.Size([2, 8])
    """

    def __init__(self, v: nn.Linear, proj: nn.Linear, mlp: nn.Module, num_tokens: int):
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"MeanPoolLatent needs at least one token, got {num_tokens}")
        self.v, self.proj, self.mlp = v, proj, mlp
        self.num_tokens = num_tokens

    def forward(self, x: Tensor) -> Tensor:
        if not is_traced(x) and x.shape[1] != self.num_tokens:
            raise ValueError(f"MeanPoolLatent expects {self.num_tokens} tokens, got {x.shape[1]}")
        return self.mlp(self.proj(self.v(x.unflatten(1, (self.num_tokens,)).mean(dim=1))))

    @torch.no_grad()
    def scale_output_(self, scale: Tensor | float) -> None:
        """Multiply the output by ``scale`` exactly: ``proj`` scales ``y``, the norm reads ``y`` at its old scale and
        the residual weight scales the branch (how the head's rescaling moves its scale into the layer it reads)."""
        self.proj.weight.mul_(scale)
        if self.proj.bias is not None:
            self.proj.bias.mul_(scale)
        norm = self.mlp.fn.norm
        if not isinstance(norm, nn.Identity):
            norm.weight.div_(scale)
        else:  # no norm: the MLP reads y directly, so it needs y at the old scale
            self.mlp.fn.mlp.fc1.weight.div_(scale)
        self.mlp.alpha.mul_(scale)

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        if bound_of is None:  # called directly: let the engine walk the children
            return bound_tensor(self)
        bound = bound_of("v", self.v) * bound_of("proj", self.proj) * bound_of("mlp", self.mlp)
        return bound / math.sqrt(self.num_tokens)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}"
