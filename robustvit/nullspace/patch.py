"""The exact nullspace of the patch embedding, and pixel noise drawn from it.

A ViT cuts an image into non-overlapping ``P x P`` patches and maps each flattened patch ``x`` (``C * P * P``
values) to a token ``W x + b``. Any ``v`` with ``W v = 0`` added to every patch leaves every token, hence the
whole output, unchanged. By rank-nullity the nullspace is non-trivial as soon as ``C * P * P > D``
(ViT-Ti/16: 768 > 192, so 576 dimensions per patch).

The basis is computed on the full ``D x (C * P * P)`` matrix, not per colour channel (per channel only finds a
subspace of it). For a model that normalizes pixels itself (a converted model's
:class:`~robustvit.layers.NormalizedConv2d`, or a pixel wrapper such as :class:`robustvit.training.PixelModel`)
the matrix is ``W S^{-1}`` with ``S`` the per-pixel std, so the nullspace is in pixel space.

Example:
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2)
    >>> patch_embedding_nullspace(vit).shape  # 3 * 8 * 8 = 192 inputs, rank 64
    torch.Size([192, 128])
    >>> images = torch.rand(2, 3, 32, 32)
    >>> noise = sample_pixel_noise(vit, images, scale=1.0)
    >>> torch.allclose(vit(images + noise), vit(images), atol=1e-4)
    True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustvit._utils import check_images
from robustvit.nullspace._model import PatchMap, patch_map

__all__ = ["approximate_patch_nullspace", "patch_embedding_nullspace", "sample_pixel_noise"]


def _right_singular(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """All right-singular vectors (columns, strongest first) and their singular values, zeros included."""
    _, singular, vh = torch.linalg.svd(matrix, full_matrices=True)
    padded = torch.zeros(matrix.shape[1], dtype=matrix.dtype, device=matrix.device)
    padded[: singular.numel()] = singular
    return vh.T, padded


def _nullspace_basis(embedding: PatchMap, rtol: float | None) -> Tensor:
    if rtol is not None and not (math.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol must be a finite number >= 0, got {rtol!r}")
    matrix = embedding.matrix
    if rtol is None:
        rtol = max(matrix.shape) * torch.finfo(embedding.conv.weight.dtype).eps
    vectors, singular = _right_singular(matrix)
    rank = int((singular > rtol * singular.max()).sum())
    return vectors[:, rank:]


def patch_embedding_nullspace(model: nn.Module, rtol: float | None = None) -> Tensor:
    """Orthonormal basis of the exact nullspace of ``model``'s patch embedding, in ``model``'s input space.

    Args:
        model: timm or transformers ViT/DeiT (converted or not), possibly inside a pixel wrapper or Accelerate's
            wrappers.
        rtol: Singular values up to ``rtol * sigma_max`` count as zero. The default is numpy's ``matrix_rank``
            tolerance for the weight's dtype, ``max(D, C * P * P) * finfo(weight.dtype).eps``: the weight is only
            known to its own precision, so float32 weights get float32's epsilon even though the SVD runs in
            float64.

    Returns:
        float64 tensor ``(C * P * P, C * P * P - rank)`` whose columns are orthonormal; a flattened patch is
        ordered ``(channel, row, column)`` like the convolution weight. It has zero columns when the nullspace is
        trivial.

    Raises:
        UnsupportedModuleError: ``model`` has no supported patch embedding (e.g. a ResNet or a plain
            ``nn.Sequential``).
        ValueError: ``rtol`` is negative or not finite.

    Example:
        >>> basis = patch_embedding_nullspace(vit)
        >>> conv = vit.patch_embed.proj
        >>> (conv.weight.double().flatten(1) @ basis).abs().max() < 1e-6
        tensor(True)
    """
    return _nullspace_basis(patch_map(model), rtol)


def approximate_patch_nullspace(model: nn.Module, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` weakest right-singular directions of the patch embedding and their singular values.

    For models whose exact nullspace is trivial (ViT-B/16: ``D = C * P * P = 768``) these are the directions the
    patch embedding attenuates most: noise along them changes the tokens by at most ``singular * |noise|``.

    Args:
        model: As for :func:`patch_embedding_nullspace`.
        k: Number of directions, ``1 <= k <= C * P * P``.

    Returns:
        ``(basis, singular_values)``: float64 ``(C * P * P, k)`` with orthonormal columns, and ``(k,)`` in
        ascending order (exact nullspace directions first, with singular value 0).

    Example:
        >>> basis, sigma = approximate_patch_nullspace(vit, k=16)  # 3 * 8 * 8 = 192 inputs, rank 48
        >>> orthonormal = torch.allclose(basis.T @ basis, torch.eye(16, dtype=basis.dtype))
        >>> basis.shape, bool(sigma[0] <= sigma[-1]), orthonormal
        (torch.Size([192, 16]), True, True)
    """
    matrix = patch_map(model).matrix
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= matrix.shape[1]:
        raise ValueError(f"k must be an int from 1 to {matrix.shape[1]} (the patch dimension), got {k!r}")
    vectors, singular = _right_singular(matrix)
    return vectors[:, -k:].flip(1), singular[-k:].flip(0)


def sample_pixel_noise(
    model: nn.Module, images: Tensor, scale: float, generator: torch.Generator | None = None
) -> Tensor:
    """Random noise shaped like ``images`` whose every patch lies in the patch-embedding nullspace.

    Each patch gets independent Gaussian coefficients on the orthonormal nullspace basis (dimension ``k``), with
    standard deviation ``scale / sqrt(k)``: the per-patch squared l2 norm is ``scale**2`` in expectation, so
    ``scale`` is the root-mean-square per-patch norm (for large ``k`` every patch's norm is close to it). The
    direction within the nullspace is uniformly random.

    ``model(images + noise)`` equals ``model(images)`` up to float rounding. Clipping ``images + noise`` to
    ``[0, 1]`` breaks this: the clipped noise is no longer in the nullspace.

    Args:
        model: As for :func:`patch_embedding_nullspace`; the noise is in its input space (pixels for a
            converted model or a pixel wrapper).
        images: Batch ``(B, C, H, W)``; ``H`` and ``W`` must be multiples of the patch size.
        scale: Root-mean-square l2 norm of the noise on one patch, ``>= 0``.
        generator: Random source, for reproducible noise (drawn on the generator's device).

    Returns:
        Noise with the shape, dtype and device of ``images``.

    Raises:
        ValueError: The nullspace is trivial (``D >= C * P * P`` and full rank; see
            :func:`approximate_patch_nullspace`), or the images do not tile into patches.

    Example:
        >>> noise = sample_pixel_noise(vit, images, scale=2.0, generator=torch.Generator().manual_seed(0))
        >>> noise.shape == images.shape
        True
    """
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    embedding = patch_map(model)
    check_images(images, channels=embedding.channels)
    basis = _nullspace_basis(embedding, None)
    dim = basis.shape[1]
    if dim == 0:
        raise ValueError(
            f"the patch embedding of this {type(embedding.model).__name__} has a trivial nullspace "
            f"(rank {basis.shape[0]} = C * P * P): no exact nullspace noise exists. Use "
            "approximate_patch_nullspace for the weakest directions instead."
        )
    (kh, kw), (batch, channels, height, width) = embedding.patch_size, images.shape
    if height % kh or width % kw:
        raise ValueError(f"images of size {(height, width)} do not tile into {kh}x{kw} patches")
    rows, cols = height // kh, width // kw
    device = generator.device if generator is not None else basis.device
    coefficients = torch.randn(batch, rows * cols, dim, generator=generator, dtype=torch.float64, device=device)
    patches = (coefficients.to(basis.device) * (scale / math.sqrt(dim))) @ basis.T
    # (batch, rows, cols, C, kh, kw) -> (batch, C, rows, kh, cols, kw): the inverse of cutting into patches.
    noise = patches.view(batch, rows, cols, channels, kh, kw).permute(0, 3, 1, 4, 2, 5)
    return noise.reshape(images.shape).to(images)
