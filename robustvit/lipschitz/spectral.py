"""Guaranteed upper bounds on spectral norms: Gram iteration for matrices and convolutions.

Everything here returns a number that is never below the true value, rounding included. Power iteration
converges from below and is therefore not used for anything that feeds a certificate.

The matrix bound follows Delattre et al. (ICML 2023, "Efficient Bound of Lipschitz Constant for Convolutional
Layers by Gram Iteration"): with ``A_0 = W`` and ``A_{t+1} = A_t^H A_t`` the singular values of ``A_t`` are
``sigma_i(W)^(2^t)``, hence ``sigma_1(W) <= ||A_t||_F^(2^-t)``, and the gap closes like
``(sigma_2 / sigma_1)^(2^(t+1))``. Iterates are renormalised by their Frobenius norm at every step and the
scale is carried in log space, so nothing overflows or underflows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "gram_spectral_norm",
    "verified_spectral_norm",
    "batched_spectral_norms",
    "conv_spectral_norm",
    "conv_operator_bound",
    "is_patchify",
]

_UNIT_ROUNDOFF = 2.0**-53  # float64
DEFAULT_MAX_ITER = 24
DEFAULT_RTOL = 1e-5


def _rounding_slack(m: int, n: int, n_iter: int) -> float:
    """Relative slack that covers float64 rounding in the Gram iteration of an ``m x n`` matrix (``m >= n``).

    A floating-point product with inner dimension ``k`` errs by at most ``gamma_k |A| |B|`` entrywise
    (Higham, Accuracy and Stability of Numerical Algorithms, Thm 3.5), ``gamma_k = k u / (1 - k u)``.
    Each iterate is normalised to unit Frobenius norm, so the error of one Gram step is at most ``gamma_k`` in
    Frobenius norm while its top eigenvalue is at least ``1 / n``: a relative error of at most ``n gamma_k``
    per step, which enters the final bound raised to ``2^-(t+1)``. Summing over steps (at most twice the first
    one), adding the normalisations, the final Frobenius norm and the log/exp steps gives the factor below.
    It is about 1e-9 for ViT-B matrices, five orders of magnitude below the 1e-4 tightness target.
    """
    k = max(m, n)
    gamma = k * _UNIT_ROUNDOFF / (1 - k * _UNIT_ROUNDOFF)
    return 4.0 * n * gamma + (n * n + 64 * (n_iter + 1)) * _UNIT_ROUNDOFF


def _check_finite(weight: Tensor, what: str) -> None:
    if not torch.isfinite(weight).all():
        raise ValueError(f"{what} contains NaN or infinite values; no finite Lipschitz bound exists")


def gram_spectral_norm(weight: Tensor, n_iter: int = DEFAULT_MAX_ITER, *, rtol: float = DEFAULT_RTOL) -> Tensor:
    """Guaranteed upper bound on the largest singular value of a matrix or a batch of matrices.

    Runs at most ``n_iter`` Gram steps in float64 (complex128 for complex input) and stops early, per call,
    once the bound is certified to be within ``rtol`` of a lower estimate (the norm of ``W v`` for the
    strongest column ``v`` of the current iterate). The lower estimate only decides when to stop; the value
    returned is always the Gram bound, inflated by a rounding slack (see ``_rounding_slack``).

    Args:
        weight: tensor of shape ``(..., m, n)``; leading dims are batch dims.
        n_iter: maximum number of Gram steps (each costs one ``min(m, n)``-sized matrix product).
        rtol: stop once ``bound <= lower_estimate * (1 + rtol)`` for every matrix of the batch.

    Returns:
        float64 tensor of shape ``weight.shape[:-2]``, differentiable with respect to ``weight``.

    Example:
        >>> w = torch.randn(384, 1536)
        >>> bound = gram_spectral_norm(w)
        >>> bool(bound >= torch.linalg.matrix_norm(w.double(), ord=2))
        True
    """
    if weight.dim() < 2:
        raise ValueError(f"expected a matrix or a batch of matrices, got shape {tuple(weight.shape)}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be at least 1, got {n_iter}")
    _check_finite(weight, "weight")
    w = weight.to(torch.complex128 if weight.is_complex() else torch.float64)
    if w.shape[-2] < w.shape[-1]:
        w = w.mH  # Gram matrix on the smaller side: sigma(W) = sigma(W^H)
    batch_shape, (m, n) = w.shape[:-2], w.shape[-2:]
    w = w.reshape(-1, m, n)
    if w.numel() == 0:
        return torch.zeros(batch_shape, dtype=torch.float64, device=weight.device)

    # Exact power-of-two prescale: max |entry| in [0.5, 1), so the first Frobenius norm cannot overflow.
    with torch.no_grad():
        _, exponent = torch.frexp(w.abs().amax(dim=(-2, -1)))
    half = torch.div(-exponent, 2, rounding_mode="floor").to(torch.float64)
    w = w * torch.exp2(half)[:, None, None] * torch.exp2(-exponent.to(torch.float64) - half)[:, None, None]
    log_scale = exponent.to(torch.float64) * math.log(2.0)

    zero = (w.abs().amax(dim=(-2, -1)) == 0).detach()
    w = torch.where(zero[:, None, None], torch.ones_like(w), w)  # keeps logs finite; result is zeroed below

    log_s = torch.zeros_like(log_scale)  # A_t = exp(log_s) * g
    g = w
    steps = 0
    for steps in range(1, n_iter + 1):
        c = torch.linalg.matrix_norm(g, ord="fro")
        g = g / c[:, None, None].to(g.dtype)
        log_s = 2.0 * (log_s + torch.log(c))
        g = g.mH @ g
        if steps >= 2 and _converged(w, g, log_s, steps, rtol):
            break
    bound = torch.exp((log_s + torch.log(torch.linalg.matrix_norm(g, ord="fro"))) / 2.0**steps + log_scale)
    bound = bound * (1.0 + _rounding_slack(m, n, steps))
    bound = torch.where(zero, torch.zeros_like(bound), bound)
    return bound.reshape(batch_shape)


def _lanczos_top_eigenvalue(gram: Tensor, steps: int, generator: torch.Generator) -> Tensor:
    """Largest Ritz value of batched symmetric PSD matrices after ``steps`` Lanczos steps.

    Only a *candidate* for the verification in :func:`verified_spectral_norm`, never a bound by itself; the plain
    three-term recurrence suffices for the top value (loss of orthogonality only duplicates converged values).
    """
    batch, n, _ = gram.shape
    v = torch.randn(batch, n, 1, dtype=gram.dtype, generator=generator).to(gram.device)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    v_prev, beta = torch.zeros_like(v), torch.zeros(batch, dtype=gram.dtype, device=gram.device)
    alphas, betas = [], []
    for _ in range(min(steps, n)):
        w = gram @ v
        alpha = (v * w).sum(dim=(1, 2))
        w = w - alpha[:, None, None] * v - beta[:, None, None] * v_prev
        beta = torch.linalg.vector_norm(w, dim=(1, 2))
        alphas.append(alpha)
        betas.append(beta)
        if bool((beta <= 1e-12 * alpha.abs()).all()):  # an invariant subspace: the Ritz values are exact
            break
        v_prev, v = v, w / beta.clamp_min(1e-300)[:, None, None]
    tri = torch.diag_embed(torch.stack(alphas, dim=1))
    if len(alphas) > 1:
        off = torch.stack(betas[:-1], dim=1)
        tri = tri + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
    return torch.linalg.eigvalsh(tri)[:, -1]


@torch.no_grad()
def verified_spectral_norm(weight: Tensor, *, rtol: float = 1e-5, lanczos_steps: int = 40) -> Tensor:
    """Guaranteed upper bound on the largest singular value, by verifying a float64 eigenvalue estimate.

    Fast path for certificates (not differentiable; :func:`gram_spectral_norm` is). With ``A = fl(W^T W)``
    (smaller side) and a Lanczos estimate ``theta`` of ``lambda_max(A)``, it sets ``s = theta (1 + rtol)`` and
    proves ``lambda_max(W^T W) <= s + e`` by a floating-point Cholesky factorization of ``s I - A``: if it runs to
    completion, the computed factor satisfies ``R^T R = s I - A + D + dB`` with ``|dB| <= gamma_{n+1} |R^T||R|``
    (Higham, Thm 10.3), so ``s I - A`` is positive semidefinite up to
    ``e = gamma_m ||W||_F^2`` (forming A, Higham Thm 3.5) ``+ u max|s - a_ii|`` (forming the diagonal, D)
    ``+ gamma_{n+1} tr(s I - A) / (1 - gamma_{n+1})`` (Cholesky, since ``||R||_F^2 <= tr / (1 - gamma)``).
    This is Rump's verification of positive definiteness; ``e`` is below 1e-9 relative for ViT matrices.
    Where the factorization fails (the estimate was too low), the estimate is redone with a dense eigensolver, then
    ``rtol`` grows 16-fold, up to twice, and then the matrix falls back to :func:`gram_spectral_norm`.

    Example:
        >>> w = torch.randn(1536, 384, dtype=torch.float64)
        >>> bool(verified_spectral_norm(w) >= torch.linalg.matrix_norm(w, ord=2))
        True
    """
    if weight.dim() < 2:
        raise ValueError(f"expected a matrix or a batch of matrices, got shape {tuple(weight.shape)}")
    if weight.is_complex():
        return gram_spectral_norm(weight)
    w = weight.to(torch.float64)
    if w.shape[-2] < w.shape[-1]:
        w = w.mT
    batch_shape, (m, n) = w.shape[:-2], w.shape[-2:]
    w = w.reshape(-1, m, n).contiguous()
    if w.numel() == 0:
        return torch.zeros(batch_shape, dtype=torch.float64, device=weight.device)
    amax = torch.linalg.vector_norm(w, ord=math.inf, dim=(-2, -1))
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("weight contains NaN or infinite values; no finite Lipschitz bound exists")
    # Rescale by an exact power of two only where products could overflow or underflow (one pass fewer otherwise).
    exponent = torch.zeros_like(amax, dtype=torch.int32)
    extreme = (amax > 2.0**300) | ((amax < 2.0**-300) & (amax > 0))
    if bool(extreme.any()):
        exponent = torch.where(extreme, torch.frexp(amax)[1], exponent)
        half = torch.div(-exponent, 2, rounding_mode="floor").to(torch.float64)  # 2^1074 alone would overflow
        w = w * torch.exp2(half)[:, None, None] * torch.exp2(-exponent.to(torch.float64) - half)[:, None, None]
    gram = w.mT @ w
    u = _UNIT_ROUNDOFF
    gamma_m, gamma_n = m * u / (1 - m * u), (n + 1) * u / (1 - (n + 1) * u)
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    # ||W||_F^2 from the computed diagonal: each entry is an inner product of nonnegative terms, at most gamma_m low.
    fro2 = diag.sum(dim=-1) * (1 + (n + 1) * u) / (1 - gamma_m)
    if n <= 128:  # small: a dense eigensolver is cheaper than the Lanczos loop
        theta = torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0.0)
    else:
        theta = _lanczos_top_eigenvalue(gram, lanczos_steps, torch.Generator().manual_seed(0)).clamp_min(0.0)
    eye = torch.eye(n, dtype=torch.float64, device=w.device)
    tau = torch.full_like(theta, rtol)
    ok = torch.zeros_like(theta, dtype=torch.bool)
    shift = torch.zeros_like(theta)
    for attempt in range(4):
        s = theta * (1 + tau) + fro2 * gamma_m + torch.finfo(torch.float64).tiny
        _, info = torch.linalg.cholesky_ex(s[:, None, None] * eye - gram)
        passed = (info == 0) & ~ok
        shift = torch.where(passed, s, shift)
        ok |= passed
        if bool(ok.all()):
            break
        if attempt == 0:  # the Lanczos estimate was too low: take the dense eigensolver's for those matrices
            theta[~ok] = torch.linalg.eigvalsh(gram[~ok])[:, -1].clamp_min(0.0)
        else:
            tau = torch.where(ok, tau, tau * 16)
    trace_up = (n * shift - diag.sum(dim=-1)).clamp_min(0) * (1 + (n + 1) * u) + n * u * shift
    e_forming_a = gamma_m * fro2
    e_diagonal = u * (shift[:, None] - diag).abs().amax(dim=-1)
    e_cholesky = gamma_n * trace_up / (1 - gamma_n)
    lam = (shift + e_forming_a + e_diagonal + e_cholesky + n * n * 2.0**-1022) * (1 + 8 * u)
    bound = torch.sqrt(lam) * (1 + 2 * u) * torch.exp2(exponent.to(torch.float64))
    if not bool(ok.all()):
        bound[~ok] = gram_spectral_norm(w[~ok]) * torch.exp2(exponent[~ok].to(torch.float64))
    bound = torch.where(fro2 == 0, torch.zeros_like(bound), bound)
    return bound.reshape(batch_shape)


def batched_spectral_norms(weights: Sequence[Tensor]) -> list[Tensor]:
    """Guaranteed spectral-norm bounds (:func:`verified_spectral_norm`) of many matrices, batched by shape.

    Batching same-shaped matrices (e.g. the 12 ``fc1`` weights of a ViT-B) amortises the per-call overhead and
    lets the matrix products run as one ``bmm``.

    Example:
        >>> bounds = batched_spectral_norms([torch.randn(8, 4), torch.randn(8, 4), torch.randn(3, 5)])
        >>> len(bounds)
        3
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, weight in enumerate(weights):
        groups.setdefault(tuple(weight.shape), []).append(index)
    bounds: list[Tensor] = [torch.empty(0)] * len(weights)
    for members in groups.values():
        stacked = verified_spectral_norm(torch.stack([weights[i].detach() for i in members]))
        for i, bound in zip(members, stacked, strict=True):
            bounds[i] = bound
    return bounds


@torch.no_grad()
def _converged(w: Tensor, g: Tensor, log_s: Tensor, steps: int, rtol: float) -> bool:
    """Whether the current Gram bound is within ``rtol`` of a lower estimate for every matrix of the batch."""
    upper = (log_s + torch.log(torch.linalg.matrix_norm(g, ord="fro"))) / 2.0**steps
    idx = torch.linalg.vector_norm(g, dim=-2).argmax(dim=-1)
    v = torch.gather(g, 2, idx[:, None, None].expand(-1, g.shape[-2], 1))
    lower = torch.log(torch.linalg.vector_norm(w @ v, dim=(-2, -1))) - torch.log(
        torch.linalg.vector_norm(v, dim=(-2, -1))
    )
    return bool((upper - lower <= math.log1p(rtol)).all())


def is_patchify(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` cuts its input into non-overlapping patches (stride == kernel, no padding, no dilation)."""
    return (
        tuple(conv.stride) == tuple(conv.kernel_size)
        and conv.padding in ((0, 0), "valid")
        and tuple(conv.dilation) == (1, 1)
    )


def conv_operator_bound(
    weight: Tensor,
    *,
    stride: Sequence[int],
    padding: Sequence[int] | str,
    dilation: Sequence[int],
    groups: int,
    padding_mode: str = "zeros",
    input_size: int | Sequence[int] | None = None,
    **gram_kwargs,
) -> Tensor:
    """Guaranteed bound on the l2 operator norm of a 2D convolution given by its weight and geometry.

    ``gram_kwargs`` (``n_iter``, ``rtol``) go to :func:`gram_spectral_norm`.

    * Patchify convolutions (stride == kernel, no padding, no dilation) are exact: every output pixel reads its
      own patch, so the operator is block diagonal with copies of ``W.reshape(out, in*k*k)`` (per group).
    * Every other zero-padded convolution on an ``H x W`` input is bounded through a circular convolution on a
      larger ``N_h x N_w`` torus: with ``N >= n + pad`` and ``N >= n_out`` no wrap-around ever reaches the
      input's support, so the zero-padded operator equals (output crop) o (circular conv) o (zero embedding),
      and its norm is at most the circular one, ``max_w sigma_1(K_hat(w))`` (Sedghi et al. 2019). A stride
      only keeps a subset of the stride-1 outputs, so the stride-1 bound holds for it too. Each frequency is
      bounded by Gram iteration in complex128; an absolute term covers FFT rounding (Higham Thm 24.2 with a
      factor 10 of margin, through Parseval: the total FFT error is at most ``10 log2(N_h N_w) u sqrt(N_h N_w)
      ||K||_F``).
    """
    if weight.dim() != 4:
        raise ValueError(f"expected a conv weight (out, in/groups, kh, kw), got shape {tuple(weight.shape)}")
    _check_finite(weight, "conv weight")
    out_ch, in_per_group, kh, kw = weight.shape
    stride, dilation = tuple(stride), tuple(dilation)
    if tuple(stride) == (kh, kw) and padding in ((0, 0), "valid") and dilation == (1, 1):
        per_group = weight.reshape(groups, out_ch // groups, in_per_group * kh * kw)
        return gram_spectral_norm(per_group, **gram_kwargs).amax()
    if padding_mode != "zeros":
        raise ValueError(
            f"cannot bound a convolution with padding_mode={padding_mode!r}: only zero padding is supported "
            "(reflect/replicate padding copies pixels and changes the operator norm)"
        )
    if input_size is None:
        raise ValueError(
            "the operator norm of a non-patchify convolution depends on the input size: pass input_size=(H, W)"
        )
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    kernel = _dense_dilated_kernel(weight, groups, dilation)
    eff = kernel.shape[-2:]
    if isinstance(padding, str):  # "same": total padding d*(k-1), split left/right by PyTorch with left <= right
        pads = [e - 1 - (e - 1) // 2 for e in eff]
        pads_sum = [e - 1 for e in eff]
    else:
        pads, pads_sum = list(padding), [2 * p for p in padding]
    torus = [max(n + p, n + ps - e + 1) for n, p, ps, e in zip(size, pads, pads_sum, eff, strict=False)]
    if min(torus) < max(eff):
        torus = [max(t, e) for t, e in zip(torus, eff, strict=False)]
    k = kernel.to(torch.float64)
    symbol = torch.fft.rfft2(k, s=tuple(torus))  # (out, in, Nh, Nw//2+1)
    per_freq = symbol.permute(2, 3, 0, 1).reshape(-1, out_ch, kernel.shape[1])
    n_total = torus[0] * torus[1]
    fft_error = 10.0 * math.log2(max(n_total, 2)) * _UNIT_ROUNDOFF * math.sqrt(n_total)
    return gram_spectral_norm(per_freq, **gram_kwargs).amax() + fft_error * torch.linalg.vector_norm(k)


def _dense_dilated_kernel(weight: Tensor, groups: int, dilation: tuple[int, int]) -> Tensor:
    """The ``(out, in, kh_eff, kw_eff)`` kernel of a grouped, dilated convolution, with explicit zeros."""
    out_ch, in_per_group, kh, kw = weight.shape
    dh, dw = dilation
    kernel = weight.new_zeros(out_ch, in_per_group * groups, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    out_per_group = out_ch // groups
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        cols = slice(g * in_per_group, (g + 1) * in_per_group)
        kernel[rows, cols, ::dh, ::dw] = weight[rows]
    return kernel


def conv_spectral_norm(conv: nn.Conv2d, input_size: int | Sequence[int] | None = None) -> Tensor:
    """Guaranteed upper bound on the l2 operator norm of ``conv`` acting on inputs of spatial size ``input_size``.

    Exact (up to the Gram tolerance) for patchify convolutions, which need no ``input_size``; a proven bound
    for any other zero-padded convolution (see :func:`conv_operator_bound`). Other padding modes are refused.

    Example:
        >>> patchify = nn.Conv2d(3, 192, kernel_size=16, stride=16)
        >>> float(conv_spectral_norm(patchify)) > 0
        True
        >>> conv3x3 = nn.Conv2d(8, 8, 3, padding=1)
        >>> bound = conv_spectral_norm(conv3x3, input_size=(32, 32))
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    return conv_operator_bound(
        conv.weight,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        padding_mode=conv.padding_mode,
        input_size=input_size,
    )
