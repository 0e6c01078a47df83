"""Nullspace of vision transformers: the exact patch-embedding nullspace and approximate-nullspace finetuning.

* :func:`patch_embedding_nullspace`, :func:`approximate_patch_nullspace`, :func:`sample_pixel_noise`: the linear
  nullspace of the patch embedding, and pixel noise that leaves the outputs unchanged.
* :func:`token_noise`: run any supported model with a noise added to its patch tokens.
* :func:`synthesize_noise` -> :class:`NullspaceNoise`: a universal token noise in the eps-approximate nullspace of
  the encoder (Liu et al., "Approximate Nullspace Augmented Finetuning for Robust Vision Transformers", CPAL 2025);
  :func:`permuted` is its same-norm control and ``kind="random"`` the paper's shrinking-Gaussian control;
  :func:`nullspace_finetuning_loss` is the finetuning loss.
"""

from robustvit.nullspace.loss import nullspace_finetuning_loss
from robustvit.nullspace.noise import NullspaceNoise, permuted
from robustvit.nullspace.patch import approximate_patch_nullspace, patch_embedding_nullspace, sample_pixel_noise
from robustvit.nullspace.synthesis import NOISE_KINDS, synthesize_noise
from robustvit.nullspace.token_noise import token_noise

__all__ = [
    "NOISE_KINDS",
    "NullspaceNoise",
    "approximate_patch_nullspace",
    "nullspace_finetuning_loss",
    "patch_embedding_nullspace",
    "permuted",
    "sample_pixel_noise",
    "synthesize_noise",
    "token_noise",
]
