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

from robustvit._utils import holds_values

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
LANCZOS_STEPS = 40


def _rounding_slack(m: int, n: int, n_iter: int) -> float:
    """Relative slack that covers float64 rounding in the Gram iteration of an ``m x n`` matrix (``m >= n``).

    A floating-point product with inner dimension ``k`` errs by at most ``gamma_k |A| |B|`` entrywise
    (Higham, Accuracy and Stability of Numerical Algorithms, Thm 3.5), ``gamma_k = k u / (1 - k u)``, so by at most
    ``gamma_k ||A||_F^2`` in Frobenius norm for ``A^H A``, while its top eigenvalue is at least ``||A||_F^2 / n``: a
    relative error of at most ``n gamma_k`` per step, which enters the final bound raised to ``2^-(t+1)`` (at most
    twice the first step's in total). Dividing an iterate by its trace errs by ``u`` per entry (``n u`` relative,
    inside ``n^2 u``). The log-space scale is a sum of ``O(2^t log(mn))`` terms divided by ``2^T``: its rounding,
    with ``log`` and ``exp`` (a few ulps each), stays below ``16 (T + 1) (log(mn) + 2) u`` of the exponent. The exact
    power-of-two scale ``2^e`` is applied outside the exponential, so entries near 1e300 or 1e-300 cost nothing more.
    The total is about 1e-9 for ViT-B matrices, five orders of magnitude below the 1e-4 tightness target.
    """
    k = max(m, n)
    gamma = k * _UNIT_ROUNDOFF / (1 - k * _UNIT_ROUNDOFF)
    return 4.0 * n * gamma + (n * n + 16 * (n_iter + 1) * (math.log(m * n) + 2)) * _UNIT_ROUNDOFF


def _check_finite(weight: Tensor, what: str) -> None:
    if not torch.isfinite(weight).all():
        raise ValueError(f"{what} contains NaN or infinite values; no finite Lipschitz bound exists")


def _split_power_of_two(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(w', applied, zero)`` per matrix: ``w = 2^applied w'``, exactly, with ``applied`` nonzero only where the
    largest entry is outside ``[2^-300, 2^300]`` (it then puts ``max |w'|`` in ``[0.5, 1)``), so that products neither
    overflow nor come near underflow. ``zero`` marks all-zero matrices. Raises on NaN or infinite entries where the
    values can be read (traced, by ``torch.export`` or a ``torch.func`` transform, they propagate instead).

    Written without control flow on values: ``w' = w`` exactly where ``applied`` is 0 (a product by ``2^0``); the
    Python test only skips that no-op product in eager mode.
    """
    amax = torch.linalg.vector_norm(w.detach(), ord=math.inf, dim=(-2, -1))
    readable = holds_values(amax)
    if readable and not bool(torch.isfinite(amax).all()):
        raise ValueError("weight contains NaN or infinite values; no finite Lipschitz bound exists")
    extreme = (amax > 2.0**300) | ((amax < 2.0**-300) & (amax > 0))
    applied = torch.where(extreme, torch.frexp(amax)[1].to(torch.float64), torch.zeros_like(amax, dtype=torch.float64))
    if not readable or bool(extreme.any()):
        w = _times_power_of_two(w, -applied)
    return w, applied, amax == 0


def _times_power_of_two(x: Tensor, exponent: Tensor) -> Tensor:
    """``x * 2^exponent`` (per leading index), in two exact halves: ``2^1074`` alone would overflow."""
    half = torch.div(exponent, 2, rounding_mode="floor")
    shape = exponent.shape + (1,) * (x.dim() - exponent.dim())
    return x * torch.exp2(half).reshape(shape).to(x.dtype) * torch.exp2(exponent - half).reshape(shape).to(x.dtype)


def _scale_up(value: Tensor, exponent: Tensor) -> Tensor:
    """``value * 2^exponent`` rounded up: exact unless the result is subnormal, where one ulp up covers the rounding."""
    scaled = _times_power_of_two(value, exponent)
    subnormal = scaled < torch.finfo(torch.float64).tiny
    # One ulp up, added to the differentiable value (exact: the gap is one ulp) so that it needs no derivative of
    # nextafter, which torch < 2.9 lacks.
    ulp = torch.nextafter(scaled.detach(), torch.full_like(scaled, math.inf)) - scaled.detach()
    return torch.where(subnormal & (value > 0), scaled + ulp, scaled)


def gram_spectral_norm(weight: Tensor, n_iter: int = DEFAULT_MAX_ITER, *, rtol: float = DEFAULT_RTOL) -> Tensor:
    """Guaranteed upper bound on the largest singular value of a matrix or a batch of matrices.

    Runs at most ``n_iter`` Gram steps in float64 (complex input as real and imaginary parts) and stops early, per call,
    once the bound is certified to be within ``rtol`` of a lower estimate (the norm of ``W v`` for the
    strongest column ``v`` of the current iterate); ``rtol=0`` runs exactly ``n_iter`` steps. The lower estimate
    only decides when to stop; the value returned is always the Gram bound, inflated by a rounding slack (see
    ``_rounding_slack``). Pass a batch of same-shaped matrices in one call: the steps run as one ``bmm``.

    With ``rtol=0`` nothing branches on values, and nothing is written with ``out=``, where ``torch.export``, another
    tracer or a ``torch.func`` transform (``jvp``, ``jacrev``) follows the computation; it gives the same bits there as
    in eager mode (the rare exact rescaling of extreme scales is then applied unconditionally, as the identity where
    it is not needed: see ``_gram_bounds``). NaN or infinite entries raise only where values can be read.

    Each step is one product and one division: ``A_{t+1} = A_t^H A_t / tr(A_t^H A_t)``, the trace being the squared
    Frobenius norm of ``A_t`` (read off the product's diagonal, no extra pass), with the scale kept in log space.
    Only the upper block triangle of each (Hermitian) product is computed, and mirrored (see ``_gram_panels``).

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
    w = _tall_batch(weight, n_iter)
    if w.numel() == 0:
        return torch.zeros(w.shape[:-2], dtype=torch.float64, device=weight.device)
    return _gram_bounds(w.reshape(-1, *w.shape[-2:]), n_iter, rtol, largest_only=False).reshape(w.shape[:-2])


def _tall_batch(weight: Tensor, n_iter: int) -> Tensor:
    """``weight`` in float64 (complex128), transposed (a view) to have at least as many rows as columns."""
    if weight.dim() < 2:
        raise ValueError(f"expected a matrix or a batch of matrices, got shape {tuple(weight.shape)}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be at least 1, got {n_iter}")
    w = weight.to(torch.complex128 if weight.is_complex() else torch.float64)
    return w.mH if w.shape[-2] < w.shape[-1] else w  # Gram matrix on the smaller side: sigma(W) = sigma(W^H)


def _gram_bounds(w: Tensor, n_iter: int, rtol: float, *, largest_only: bool) -> Tensor:
    """Gram bounds of a batch ``(b, m, n)`` of tall float64 or complex128 matrices: one per matrix, or with
    ``largest_only`` their maximum (a 0-d tensor).

    With ``largest_only`` the early stop asks only that the maximum be within ``rtol`` of the largest lower estimate,
    and a matrix leaves the iteration as soon as its bound is at most that estimate (it cannot hold the maximum within
    ``rtol``); its bound at that step, rounding slack included, still enters the maximum, so the result bounds every
    matrix whatever the estimates are worth.

    Scale: ``W = 2^(e + applied) W'`` with ``||W'||_F^2`` in ``[0.5, 2)`` (``e`` read off the first product's trace,
    no pass over ``W``); the log-space scale tracks ``W'`` and the power of two is applied exactly at the end. Only
    where a trace is not finite or below ``2^-600`` does the batch go through :func:`_split_power_of_two` (which refuses
    NaN and inf, rescales ``W`` exactly where its entries leave ``[2^-300, 2^300]``: ``applied != 0``) and the first
    product is formed again; every trace is then at least about ``2^-600``. A product that underflows errs by at most
    ``2^-1075``: next to a top eigenvalue of at least ``trace / n`` (and ``1 / n`` for the later, unit-trace iterates)
    that is below ``n^2 m 2^-475`` relative, far inside the ``u`` terms of ``_rounding_slack``.
    """
    m, n = w.shape[-2:]
    if holds_values(w):
        pair = _parts(w)
        g, trace = _normalized_gram(*pair)
        applied = torch.zeros(len(w), dtype=torch.float64, device=w.device)
        zero = torch.zeros(len(w), dtype=torch.bool, device=w.device)
        rare = not bool(((trace >= 2.0**-600) & torch.isfinite(trace)).all())  # extreme scales, zeros, NaN or inf
    else:  # traced or under a torch.func transform: no branch on values (see _split_power_of_two)
        rare = True
    if rare:
        w, applied, zero = _split_power_of_two(w)
        if not holds_values(zero) or bool(zero.any()):  # keeps logs finite (and gradients NaN-free); zeroed below
            w = torch.where(zero[:, None, None], torch.ones_like(w), w)
        pair = _parts(w)
        g, trace = _normalized_gram(*pair)
    # trace = f 2^k with f in [0.5, 1): e = floor(k / 2) puts trace * 4^-e (exactly scaled) in [0.5, 2).
    exponent = torch.div(torch.frexp(trace.detach())[1], 2, rounding_mode="floor").to(torch.float64)
    log_s = torch.log(_times_power_of_two(trace, -2 * exponent))  # A_t = exp(log_s) * g_t, for W' = 2^-e W
    dims = (2 * m, 2 * n) if w.is_complex() else (m, n)  # complex: bounded as the real embedding [[Re, -Im], [Im, Re]]
    scale = exponent + applied  # log2 of W / W'
    left: list[Tensor] = []  # with largest_only: bounds of the matrices that left the iteration
    steps = 1
    while steps < n_iter:
        if rtol > 0 and steps >= 2:
            log_bound = _log_bound(log_s, g, steps)
            lower = _log_lower_estimate(pair, g) + applied * math.log(2.0)  # of W, not W'
            upper = log_bound + scale * math.log(2.0)
            if not largest_only:
                if bool((upper - lower <= math.log1p(rtol)).all()):
                    break
            else:
                upper, lower = upper.masked_fill(zero, -math.inf), lower.masked_fill(zero, -math.inf)
                top = lower.max()
                if bool(upper.max() - top <= math.log1p(rtol)):
                    break
                out = upper <= top
                if bool(out.any()):
                    left.append(_bound(log_bound[out], scale[out], zero[out], dims, steps))
                    keep = ~out
                    pair = tuple(part[keep] if part is not None else None for part in pair)
                    g = tuple(part[keep] if part is not None else None for part in g)
                    log_s, scale, applied, zero = log_s[keep], scale[keep], applied[keep], zero[keep]
                    if len(log_s) == 0:
                        return torch.cat(left).amax()
        if steps == n_iter - 1:  # the last step needs only ||A_T||_F = exp(2 log_s) ||g^H g||_F: no division, no mirror
            steps = n_iter
            log_bound = (2.0 * log_s + 0.5 * torch.log(_squared_frobenius_of_gram(*g))) / 2.0**steps
            break
        g, trace = _normalized_gram(*g)
        log_s = 2.0 * log_s + torch.log(trace)
        steps += 1
    else:  # no step left (n_iter == 1); the early stops above leave with the current step's log_bound
        log_bound = _log_bound(log_s, g, steps)
    bound = _bound(log_bound, scale, zero, dims, steps)
    return torch.cat([bound, *left]).amax() if largest_only else bound


def _bound(log_bound: Tensor, scale: Tensor, zero: Tensor, dims: tuple[int, int], steps: int) -> Tensor:
    """``2^scale exp(log_bound)``, inflated by the rounding slack and rounded up; zero for all-zero matrices."""
    bound = _scale_up(torch.exp(log_bound) * (1.0 + _rounding_slack(*dims, steps)), scale)
    return torch.where(zero, torch.zeros_like(bound), bound)


def _log_bound(log_s: Tensor, g: tuple[Tensor, Tensor | None], steps: int) -> Tensor:
    """``log ||A_t||_F^(2^-t)`` of ``A_t = exp(log_s) g``: the Gram bound of ``W'`` after ``t`` steps."""
    return (log_s + 0.5 * torch.log(_squared_frobenius(*g))) / 2.0**steps


def _parts(w: Tensor) -> tuple[Tensor, Tensor | None]:
    """Complex iterates as (real, imaginary) parts: real products run on the BLAS, complex batched ones do not."""
    return (w.real.contiguous(), w.imag.contiguous()) if w.is_complex() else (w, None)


def _normalized_gram(real: Tensor, imag: Tensor | None) -> tuple[tuple[Tensor, Tensor | None], Tensor]:
    """``(A^H A / tr(A^H A), tr(A^H A))`` of ``A = real + i imag``, the quotient as (real, imaginary) parts.

    The trace is read off the diagonal blocks of the panels, in the same order on both paths below. Plain tensors
    without gradients (a real ``A``): the quotient is written straight into one buffer, panel by panel (see
    ``_normalized_upper_gram``), no separate pass for the division, no concatenation. Otherwise (gradients, a
    ``torch.func`` transform, ``torch.export``'s fake tensors: none of them accepts ``out=``) the same panels are
    joined out of place and divided by the same trace: each entry is the same IEEE quotient, so both paths give
    bit-identical results."""
    if imag is None and _plain(real):
        return _normalized_upper_gram(real)
    product, trace = _gram_product(real, imag)
    return tuple(part / trace[:, None, None] if part is not None else None for part in product), trace


def _plain(x: Tensor) -> bool:
    """Whether ``x`` is a plain tensor that no autograd graph, ``torch.func`` transform or tracer follows: only then
    may results be written with ``out=`` (a ``torch.func`` transform wraps ``x`` and hides its ``requires_grad``)."""
    return holds_values(x) and not (torch.is_grad_enabled() and x.requires_grad)


def _gram_product(real: Tensor, imag: Tensor | None) -> tuple[tuple[Tensor, Tensor | None], Tensor]:
    """``(A^H A, tr(A^H A))`` of ``A = real + i imag``, the product as (real, imaginary) parts, in two real products:
    the real part is ``[Re; Im]^T [Re; Im]`` and the imaginary part, antisymmetric, is ``C - C^T`` with
    ``C = Re^T Im``. Each entry is one inner product of the real embedding's (length ``2m``), so its rounding is
    bounded as for the embedding."""
    if imag is None:
        product, trace = _upper_gram(real)
        return (product, None), trace
    cross = real.mT @ imag
    product, trace = _upper_gram(torch.cat([real, imag], dim=-2))
    return (product, cross - cross.mT), trace


def _panel_trace(panels: list[Tensor]) -> Tensor:
    """The trace of ``x^T x`` from the diagonal blocks of its panels (:func:`_gram_panels`), summed panel by panel."""
    return sum(torch.diagonal(panel[..., : panel.shape[-2]], dim1=-2, dim2=-1).sum(dim=-1) for panel in panels)


def _upper_gram(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x^T x, tr(x^T x))`` for a batch ``(b, m, n)`` from the panels of :func:`_gram_panels`, joined by ``cat``:
    differentiable like the full product (it is the same function of ``x``)."""
    starts, panels = _gram_panels(x)
    trace = _panel_trace(panels)
    if len(panels) == 1:
        return panels[0], trace
    width = starts[1]
    # Row panel i: the mirror images of block i of each earlier panel j, then panel i itself.
    rows = [
        torch.cat([*(panels[j][..., start - starts[j] :][..., :width].mT for j in range(i)), panels[i]], dim=-1)
        for i, start in enumerate(starts)
    ]
    return torch.cat(rows, dim=-2), trace


def _normalized_upper_gram(x: Tensor) -> tuple[tuple[Tensor, None], Tensor]:
    """:func:`_normalized_gram` of a real batch without gradients: the panels of :func:`_gram_panels`, each divided by
    the trace straight into its place in the result, the blocks below the diagonal copied from their mirror images."""
    starts, panels = _gram_panels(x)
    trace = _panel_trace(panels)
    n = x.shape[-1]
    out = torch.empty(*x.shape[:-2], n, n, dtype=x.dtype, device=x.device)
    for start, panel in zip(starts, panels, strict=True):
        rows = slice(start, start + panel.shape[-2])
        torch.div(panel, trace[:, None, None], out=out[..., rows, start:])
        out[..., rows, :start] = out[..., :start, rows].mT
    return (out, None), trace


def _gram_panels(x: Tensor) -> tuple[list[int], list[Tensor]]:
    """The upper block triangle of ``x^T x`` (batch ``(b, m, n)``): with the columns of ``x`` in up to four panels
    ``x_i`` starting at ``starts[i]``, the products ``x_i^T [x_i ... x_k]`` (5/8 of the full product's work for four);
    one panel (the full product) when ``n <= 64``, where several products cost more than they save. Every block below
    the diagonal is the transpose of its mirror image, and each entry is still one float64 inner product of a column
    pair (Higham's Thm 3.5 bounds it in any summation order), so the rounding analysis is that of a full product."""
    n = x.shape[-1]
    width = max(64, -(-n // 4))
    starts = list(range(0, n, width))
    return starts, [x[..., start : start + width].mT @ x[..., start:] for start in starts]


def _squared_frobenius_of_gram(real: Tensor, imag: Tensor | None) -> Tensor:
    """``||A^H A||_F^2`` of ``A = real + i imag`` from the panels of :func:`_gram_panels` (the real part's blocks off
    the diagonal count twice, an exact factor): the product is never assembled."""
    if imag is not None:
        cross = real.mT @ imag
        imaginary = cross - cross.mT
        real = torch.cat([real, imag], dim=-2)
    _, panels = _gram_panels(real)
    total = sum(
        _squared_frobenius(panel[..., : panel.shape[-2]], None)
        + 2.0 * _squared_frobenius(panel[..., panel.shape[-2] :], None)
        for panel in panels
    )
    return total if imag is None else total + _squared_frobenius(imaginary, None)


def _squared_frobenius(real: Tensor, imag: Tensor | None) -> Tensor:
    total = (real * real).sum(dim=(-2, -1))
    return total if imag is None else total + (imag * imag).sum(dim=(-2, -1))


def _lanczos_top_eigenvalue(gram: Tensor, steps: int, rtol: float, generator: torch.Generator) -> Tensor:
    """Estimate of the largest eigenvalue of batched symmetric PSD matrices (float64 ``gram``).

    Only a *candidate* for the verification in :func:`verified_spectral_norm`, never a bound by itself: whatever
    the recurrence does in floating point (loss of orthogonality, a Krylov space exhausted early), the estimate is the
    float64 Rayleigh quotient of a vector (at most the largest eigenvalue, up to rounding), and a poor one only fails
    the verification. Lanczos runs in float32 (half the memory traffic of its matrix-vector products), checking at steps
    16, 24, ... whether every top Ritz pair's residual is below ``rtol / 8`` of its value; the estimate is the
    Rayleigh quotient of the top Ritz vector, accurate to its squared error. The plain three-term recurrence
    suffices for the top value.
    """
    batch, n, _ = gram.shape
    steps = min(steps, n)
    # Scaled to a unit largest diagonal entry: float64 Gram entries far outside float32's range stay representable.
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).amax(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    a = (gram / scale[:, None, None]).to(torch.float32)
    basis = torch.empty(batch, steps, n, dtype=torch.float32, device=gram.device)
    alphas = torch.zeros(batch, steps, dtype=torch.float32, device=gram.device)
    betas = torch.zeros_like(alphas)
    # Row vectors: ``v^T A`` (= ``(A v)^T``, A symmetric) runs about twice as fast as ``A v`` as a batched product.
    v = torch.randn(batch, 1, n, dtype=torch.float32, generator=generator).to(gram.device)
    v = v / torch.linalg.vector_norm(v, dim=2, keepdim=True)
    v_prev, beta = torch.zeros_like(v), torch.zeros(batch, 1, 1, dtype=torch.float32, device=gram.device)
    k = 0
    for k in range(1, steps + 1):
        basis[:, k - 1 : k] = v
        w = torch.bmm(v, a)
        alpha = torch.bmm(w, v.mT)
        w = torch.addcmul(torch.addcmul(w, alpha, v, value=-1), beta, v_prev, value=-1)
        beta = torch.linalg.vector_norm(w, dim=2, keepdim=True)
        alphas[:, k - 1], betas[:, k - 1] = alpha[:, 0, 0], beta[:, 0, 0]
        if k % 8 == 0 and k >= 16:
            values, vectors = _ritz(alphas[:, :k], betas[:, : k - 1])
            if bool((beta[:, 0, 0] * vectors[:, -1, -1].abs() <= rtol / 8 * values[:, -1]).all()):
                break
        v_prev, v = v, w / beta.clamp_min(1e-30)
    _, vectors = _ritz(alphas[:, :k], betas[:, : k - 1])
    ritz = (vectors[:, None, :, -1] @ basis[:, :k]).to(torch.float64)  # (batch, 1, n)
    return ((ritz * (ritz @ gram)).sum(dim=(1, 2)) / (ritz * ritz).sum(dim=(1, 2))).clamp_min(0.0)


def _ritz(alphas: Tensor, betas: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of the Lanczos tridiagonal matrices with diagonals ``alphas`` and off-diagonals ``betas``."""
    tri = torch.diag_embed(alphas) + torch.diag_embed(betas, offset=1) + torch.diag_embed(betas, offset=-1)
    return torch.linalg.eigh(tri)


@torch.no_grad()
def verified_spectral_norm(weight: Tensor, *, rtol: float = DEFAULT_RTOL, lanczos_steps: int = LANCZOS_STEPS) -> Tensor:
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

    How ``A`` is formed does not change the analysis: only its upper block triangle is computed (5/8 of the
    products) and mirrored, so each entry is still one float64 inner product of length ``m``, whose error bound
    (Thm 3.5) holds in any summation order. Matrices are rescaled by an exact power of two
    only where the diagonal of ``A`` (the squared column norms) shows that products overflowed or came near
    underflow (largest diagonal entry outside ``[2^-600, 2^600]``); those are formed again from the rescaled matrix.
    Below that, products that underflow err by at most ``2^-1075`` each, which the absolute term
    ``n^2 2^-1022`` covers.

    Example:
        >>> w = torch.randn(1536, 384, dtype=torch.float64)
        >>> bool(verified_spectral_norm(w) >= torch.linalg.matrix_norm(w, ord=2))
        True
    """
    if weight.dim() < 2:
        raise ValueError(f"expected a matrix or a batch of matrices, got shape {tuple(weight.shape)}")
    if weight.is_complex():
        return gram_spectral_norm(weight)
    w = _tall_float64(weight)
    if w.numel() == 0:
        return torch.zeros(w.shape[:-2], dtype=torch.float64, device=w.device)
    return _verified_bounds(w.reshape(-1, *w.shape[-2:]).unbind(0), rtol, lanczos_steps).reshape(w.shape[:-2])


def batched_spectral_norms(weights: Sequence[Tensor]) -> list[Tensor]:
    """Guaranteed spectral-norm bounds (:func:`verified_spectral_norm`) of many matrices.

    Matrices with the same number of columns on their smaller side (every weight of a ViT: the width) are verified
    together, a few at a time: one batched Lanczos loop and one batched Cholesky factorization per chunk. No copy of
    the weights is made beyond their conversion to float64.

    Example:
        >>> bounds = batched_spectral_norms([torch.randn(8, 4), torch.randn(8, 4), torch.randn(3, 5)])
        >>> len(bounds)
        3
    """
    bounds: list[Tensor] = [torch.empty(0)] * len(weights)
    by_side: dict[int, list[int]] = {}
    for index, weight in enumerate(weights):
        if weight.dim() == 2 and not weight.is_complex() and weight.numel() > 0:
            by_side.setdefault(min(weight.shape), []).append(index)
        else:  # refused, bounded by the Gram iteration, or empty, as verified_spectral_norm does
            bounds[index] = verified_spectral_norm(weight.detach())
    for members in by_side.values():
        values = _verified_bounds([_tall_float64(weights[i].detach()) for i in members], DEFAULT_RTOL, LANCZOS_STEPS)
        for i, value in zip(members, values, strict=True):
            bounds[i] = value
    return bounds


def _tall_float64(weight: Tensor) -> Tensor:
    """``weight`` in float64, transposed (a view) where it has more columns than rows: the Gram matrix is formed on the
    smaller side, ``sigma(W) = sigma(W^T)``."""
    w = weight.to(torch.float64)
    return w.mT if w.shape[-2] < w.shape[-1] else w


# Matrices are verified a few at a time, so that each chunk's Gram matrices stay in cache from their product through
# the Lanczos loop (one pass over them per step) to the Cholesky factorization.
_CHUNK_BYTES = 2**22


def _verified_bounds(matrices: Sequence[Tensor], rtol: float, lanczos_steps: int) -> Tensor:
    """Bounds (see :func:`verified_spectral_norm`) of tall float64 matrices ``(m_i, n)`` sharing ``n``."""
    n = matrices[0].shape[-1]
    device = matrices[0].device
    bound = torch.zeros(len(matrices), dtype=torch.float64, device=device)
    chunk = max(1, _CHUNK_BYTES // (4 * n * n))
    for start in range(0, len(matrices), chunk):
        part = matrices[start : start + chunk]
        gram = torch.empty(len(part), n, n, dtype=torch.float64, device=device)
        applied = _scaled_grams(part, gram)
        rows = torch.tensor([w.shape[0] for w in part], dtype=torch.float64, device=device)
        lam, ok, zero = _verified_top_eigenvalue(gram, rows, rtol, lanczos_steps)
        values = _scale_up(torch.sqrt(lam) * (1 + 2 * _UNIT_ROUNDOFF), applied)
        for i in (~ok).nonzero().flatten().tolist():  # rare: bounded by the Gram iteration instead
            values[i] = gram_spectral_norm(part[i])
        bound[start : start + chunk] = torch.where(zero, torch.zeros_like(values), values)
    return bound


def _scaled_grams(matrices: Sequence[Tensor], out: Tensor) -> Tensor:
    """Writes ``fl(W_i'^T W_i')`` into ``out[i]`` and returns ``applied`` per matrix, with ``W_i = 2^applied_i W_i'``.

    Only where the Gram diagonal (the squared column norms) left ``[2^-600, 2^600]`` or is not finite is the matrix
    rescaled by :func:`_split_power_of_two` (which refuses NaN and infinite entries; any such entry makes its column's
    diagonal entry non-finite) and its Gram matrix formed again. A zero diagonal is among them: it may have underflowed
    from a nonzero matrix."""
    for w, gram in zip(matrices, out, strict=True):
        _symmetric_gram(w, gram)
    top = torch.diagonal(out, dim1=-2, dim2=-1).amax(dim=-1)
    extreme = ~((top <= 2.0**600) & (top >= 2.0**-600))
    applied = torch.zeros(len(out), dtype=torch.float64, device=out.device)
    for i in extreme.nonzero().flatten().tolist():
        rescaled, exponent, _ = _split_power_of_two(matrices[i][None])
        applied[i] = exponent[0]
        _symmetric_gram(rescaled[0], out[i])
    return applied


def _symmetric_gram(w: Tensor, out: Tensor) -> None:
    """``out = fl(W^T W)`` for an ``m x n`` float64 matrix, from its upper block triangle: with the columns of ``W`` in
    up to four panels ``W_i``, the products ``W_i^T [W_i ... W_k]`` are computed (5/8 of the full product's work for
    four) and every block below the diagonal is copied from its mirror image. Each entry is one float64 inner product of
    a column pair, as in a full product."""
    n = w.shape[-1]
    width = max(64, -(-n // 4))
    if width >= n:  # small: one product is faster than several
        torch.mm(w.mT, w, out=out)
        return
    torch.mm(w[:, :width].mT, w, out=out[:width])  # the first rows of ``out``: contiguous, written in place
    for start in range(width, n, width):
        panel = slice(start, start + width)
        out[panel, start:] = w[:, panel].mT @ w[:, start:]
        out[panel, :start] = out[:start, panel].mT


def _verified_top_eigenvalue(
    gram: Tensor, rows: Tensor, rtol: float, lanczos_steps: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(lam, ok, zero)``: ``lam >= lambda_max(W^T W)`` where ``ok`` (the Cholesky proof of
    :func:`verified_spectral_norm`), for Gram matrices ``gram = fl(W^T W)`` of matrices with ``rows`` rows each;
    ``zero`` marks all-zero matrices. ``gram`` is overwritten (it becomes ``s I - A``)."""
    n = gram.shape[-1]
    u = _UNIT_ROUNDOFF
    gamma_m, gamma_n = rows * u / (1 - rows * u), (n + 1) * u / (1 - (n + 1) * u)
    diag = torch.diagonal(gram, dim1=-2, dim2=-1).clone()
    # ||W||_F^2 from the computed diagonal: each entry is an inner product of nonnegative terms, at most gamma_m low.
    fro2 = diag.sum(dim=-1) * (1 + (n + 1) * u) / (1 - gamma_m)
    if n <= 128:  # small: a dense eigensolver is cheaper than the Lanczos loop
        theta = torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0.0)
    else:
        theta = _lanczos_top_eigenvalue(gram, lanczos_steps, rtol, torch.Generator().manual_seed(0))
    # From here on ``gram`` holds -A off the diagonal (exact) and s - a_ii on it (one rounding each).
    shifted = gram.neg_()
    shifted_diag = torch.diagonal(shifted, dim1=-2, dim2=-1)
    tau = torch.full_like(theta, rtol)
    ok = torch.zeros_like(theta, dtype=torch.bool)
    shift = torch.zeros_like(theta)
    todo = torch.arange(len(gram), device=gram.device)  # matrices not proven yet
    for attempt in range(4):
        s = theta[todo] * (1 + tau[todo]) + fro2[todo] * gamma_m[todo] + torch.finfo(torch.float64).tiny
        shifted_diag[todo] = s[:, None] - diag[todo]
        _, info = torch.linalg.cholesky_ex(shifted if len(todo) == len(gram) else shifted[todo])
        passed = info == 0
        shift[todo[passed]] = s[passed]
        ok[todo[passed]] = True
        todo = todo[~passed]
        if len(todo) == 0:
            break
        if attempt == 0:  # the Lanczos estimate was too low: take the dense eigensolver's for those matrices
            shifted_diag[todo] = -diag[todo]
            theta[todo] = -torch.linalg.eigvalsh(shifted[todo])[:, 0].clamp_max(0.0)
        else:
            tau[todo] *= 16
    trace_up = (n * shift - diag.sum(dim=-1)).clamp_min(0) * (1 + (n + 1) * u) + n * u * shift
    e_forming_a = gamma_m * fro2
    e_diagonal = u * (shift[:, None] - diag).abs().amax(dim=-1)
    e_cholesky = gamma_n * trace_up / (1 - gamma_n)
    lam = (shift + e_forming_a + e_diagonal + e_cholesky + n * n * 2.0**-1022) * (1 + 8 * u)
    return lam, ok, fro2 == 0


@torch.no_grad()
def _log_lower_estimate(w: tuple[Tensor, Tensor | None], g: tuple[Tensor, Tensor | None]) -> Tensor:
    """``log(||W v|| / ||v||)`` for the column ``v`` of the PSD iterate ``g`` with the largest diagonal entry: a lower
    estimate of ``log sigma_1(W)`` (the iterate is dominated by the top singular directions, so its columns point along
    them). It only decides when to stop. Matrices are (real, imaginary) pairs."""
    index = torch.diagonal(g[0], dim1=-2, dim2=-1).argmax(dim=-1)[:, None, None].expand(-1, g[0].shape[-2], 1)
    v_re = torch.gather(g[0], 2, index).mT  # (batch, 1, n): W v by broadcasting (batched matrix-vector is slow)
    w_re, w_im = w
    if w_im is None:
        gain = torch.linalg.vector_norm((w_re * v_re).sum(dim=-1), dim=-1)
        length = torch.linalg.vector_norm(v_re, dim=(-2, -1))
    else:
        v_im = torch.gather(g[1], 2, index).mT
        out_re = (w_re * v_re).sum(dim=-1) - (w_im * v_im).sum(dim=-1)
        out_im = (w_re * v_im).sum(dim=-1) + (w_im * v_re).sum(dim=-1)
        gain = torch.linalg.vector_norm(torch.cat([out_re, out_im], dim=-1), dim=-1)
        length = torch.linalg.vector_norm(torch.cat([v_re, v_im], dim=-1), dim=(-2, -1))
    return torch.log(gain) - torch.log(length)


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

    ``gram_kwargs`` (``n_iter``, ``rtol``) set the Gram iteration of :func:`gram_spectral_norm`, run here for the
    largest bound only: ``rtol`` applies to the result, and frequencies (groups) that cannot hold it stop early.

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
        return _largest_gram_bound(per_group, **gram_kwargs)
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
    return _largest_gram_bound(per_freq, **gram_kwargs) + fft_error * torch.linalg.vector_norm(k)


def _largest_gram_bound(matrices: Tensor, n_iter: int = DEFAULT_MAX_ITER, rtol: float = DEFAULT_RTOL) -> Tensor:
    """Guaranteed bound on the largest spectral norm in a batch ``(b, m, n)``: the Gram iteration run for the maximum
    only (see ``_gram_bounds``), so matrices that cannot hold it stop early and ``rtol`` applies to the maximum."""
    w = _tall_batch(matrices, n_iter)
    if w.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=matrices.device)
    return _gram_bounds(w, n_iter, rtol, largest_only=True)


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
