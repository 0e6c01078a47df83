"""Run any supported model with a noise added to its patch tokens (before class token and position embedding).

One mechanism for every family: a forward hook on the family's patch-embedding module
(``get_family(model).patch_embedding(model)``), whose output is the ``(B, N, D)`` patch tokens. This is where
the approximate-nullspace paper adds its noise (Liu et al., CPAL 2025).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from robustvit.lipschitz import mark_lipschitz_neutral
from robustvit.nullspace._model import supported_model

__all__ = ["token_noise"]


@contextmanager
def token_noise(model: nn.Module, noise: Tensor) -> Iterator[None]:
    """Within the block, every forward of ``model`` adds ``noise`` to the patch tokens.

    The hook is removed when the block exits, also on exceptions. Gradients flow to ``noise`` (it is added as
    is, converted to the tokens' dtype and device), so it can be optimised. The hook only adds a constant, so it
    is marked Lipschitz-neutral: :func:`robustvit.lipschitz_bound` still works on a converted model inside the
    block.

    Args:
        model: timm or transformers ViT/DeiT (converted or not), possibly inside a pixel wrapper or Accelerate's
            wrappers; call the model you passed (or its wrapper) inside the block.
        noise: ``(1, N, D)`` (the same noise for every image) or ``(B, N, D)`` (one per image of a batch of
            ``B``), with ``N`` patches and embedding dimension ``D``.

    Raises:
        ValueError: ``noise`` is not a floating ``(1 or B, N, D)`` tensor; the number of patches and the batch size
            are checked at each forward.

    Example:
        >>> noise = torch.randn(1, vit.patch_embed.num_patches, vit.embed_dim)
        >>> with token_noise(vit, noise):
        ...     noisy = vit(images)
    """
    inner, family = supported_model(model)
    dim = family.patch_projection(inner).out_channels
    if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.dim() != 3 or noise.shape[-1] != dim:
        shape = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a floating tensor (1 or batch, patches, {dim}), got {shape}")

    @mark_lipschitz_neutral
    def add_noise(module: nn.Module, args: tuple, tokens: Tensor) -> Tensor:
        if tokens.shape[1:] != noise.shape[1:] or noise.shape[0] not in (1, tokens.shape[0]):
            raise ValueError(
                f"token noise of shape {tuple(noise.shape)} does not fit the patch tokens {tuple(tokens.shape)}"
            )
        return tokens + noise.to(dtype=tokens.dtype, device=tokens.device)

    handle = family.patch_embedding(inner).register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()
