"""Tied L2 self-attention (Kim, Papamakarios, Mnih, ICML 2021): a globally Lipschitz replacement for attention."""

from __future__ import annotations

import math

import torch
from scipy.special import lambertw
from torch import Tensor, nn

from robustvit._utils import is_traced
from robustvit.layers.linear import linear_bias, linear_weight
from robustvit.lipschitz.engine import BoundFn
from robustvit.lipschitz.spectral import gram_spectral_norm


class L2Attention(nn.Module):
    """Multi-head L2 self-attention with tied query/key weights (``W_Q = W_K``).

    Per head ``h`` with ``W_h = W_Q^h`` (``D x d``, ``d = D / H``)::

        P^h_ij = softmax_j(-||x_i W_h - x_j W_h||^2 / sqrt(d))
        f^h(X) = P^h X W_h W_h^T / sqrt(d)
        F(X)   = concat_h(f^h(X) W_V^h) W_O

    Dot-product attention is not Lipschitz; this is. The bound is Kim et al.'s (Thm 3.2) for ``N`` tokens,
    ``sqrt(N / d) * (4 W0(N / e) + 1) * sqrt(sum_h ||W_Q^h||^4 ||W_V^h||^2) * ||W_O||`` (``W0`` the Lambert W
    function; ``phi^{-1}(N - 1) = W0((N - 1) / e)`` rounded up to ``W0(N / e)``), with the query norm entering
    squared: head ``h`` with ``W_Q^h = c U`` computes ``f_c(X) = c f_1(c X)``, so its Lipschitz constant scales
    exactly like ``c^2``. At unit query norms this is the published bound; the square extends it to every scale
    (a form linear in ``||W_Q^h||`` is broken by large query weights, and the tests attack exactly that). The
    prefactor grows like ``sqrt(N) log N``: about 10 at N = 65 and 24 at N = 197 (ViT-B/16), so products over many
    blocks are large. The bound is for exactly ``num_tokens`` tokens, which forward checks.

    Example:
        >>> attn = L2Attention(dim=48, num_heads=3, num_tokens=17)
        >>> attn(torch.randn(2, 17, 48)).shape
        torch.Size([2, 17, 48])
    """

    def __init__(self, dim: int, num_heads: int, num_tokens: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.num_tokens = num_heads, dim // num_heads, num_tokens
        self.q_proj = nn.Linear(dim, dim, bias=False)  # a query bias cancels in the distances
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        message = f"L2Attention was built (and bounded) for {self.num_tokens} tokens"
        if is_traced(x):  # torch.fx: the graph checks the count when it runs
            torch._assert(tokens == self.num_tokens, message)
        elif tokens != self.num_tokens:
            raise ValueError(f"{message}, got {tokens}")
        heads, d = self.num_heads, self.head_dim
        w_q = linear_weight(self.q_proj).view(heads, d, dim)
        q = torch.einsum("bnc,hdc->bhnd", x, w_q)
        sq = (q * q).sum(-1)
        dist2 = sq[..., :, None] + sq[..., None, :] - 2 * q @ q.transpose(-1, -2)
        attn = torch.softmax(-dist2 / math.sqrt(d), dim=-1)
        xa = torch.einsum("bhnd,hdc->bhnc", q, w_q) / math.sqrt(d)  # X W_h W_h^T / sqrt(d)
        w_v = linear_weight(self.v_proj).view(heads, d, dim)
        out = torch.einsum("bhnc,hdc->bhnd", attn @ xa, w_v) + linear_bias(self.v_proj).view(heads, 1, d)
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, dim))

    def lipschitz_bound(self, bound_of: BoundFn | None = None) -> Tensor:
        n, d, heads = self.num_tokens, self.head_dim, self.num_heads
        lambert = float(lambertw(n / math.e).real)
        prefactor = math.sqrt(n / d) * (4 * lambert + 1) * (1 + 1e-12)  # covers rounding of this scalar
        dim = self.q_proj.weight.shape[1]
        q_norms = gram_spectral_norm(linear_weight(self.q_proj).view(heads, d, dim))
        v_norms = gram_spectral_norm(linear_weight(self.v_proj).view(heads, d, dim))
        o_norm = gram_spectral_norm(linear_weight(self.o_proj))
        return prefactor * torch.sqrt((q_norms**4 * v_norms**2).sum()) * o_norm
