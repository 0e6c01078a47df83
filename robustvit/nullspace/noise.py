"""A synthesized token-space noise with the statistics it was accepted with, and the same-norm control."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = ["NullspaceNoise", "permuted"]

_METADATA_KEY = "robustvit.nullspace_noise"
_LEGACY_NAMES = {"eps": "tolerance", "reached_eps": "reached_tolerance"}  # the names of files written before


@dataclass
class NullspaceNoise:
    """A universal token-space noise ``(1, N, D)`` and how close to the model's nullspace it is.

    The statistics were measured on the last batch :func:`~robustvit.nullspace.synthesize_noise` looked at,
    with this exact noise.

    Attributes:
        noise: ``(1, N, D)``, added to the patch tokens of every image (see :func:`~robustvit.nullspace.token_noise`).
        l2_norm: l2 norm of ``noise``.
        prob_mse: Mean over images of ``|softmax(noisy logits) - softmax(clean logits)|^2``.
        top1_agreement: Fraction of images whose top-1 prediction the noise did not change.
        steps: Optimisation steps taken.
        reached_tolerance: Whether ``prob_mse < tolerance`` (the noise is inside the approximate nullspace).
        tolerance: The tolerance it was synthesized for (the paper's epsilon: a probability, not a radius).
        kind: How it was searched: ``"nullspace"`` (the method) or ``"random"`` (the paper's shrinking Gaussian
            control); see :data:`robustvit.nullspace.NOISE_KINDS`.
        lr_range: The noise learning rate at the first and the last step (``None`` for ``"random"``): the paper
            keeps it near constant.

    Example:
        >>> from robustvit.nullspace import synthesize_noise
        >>> result = synthesize_noise(model, loader, max_batches=2, progress=False)
        >>> result.save("noise.safetensors")
        PosixPath('noise.safetensors')
        >>> NullspaceNoise.load("noise.safetensors").l2_norm == result.l2_norm
        True
    """

    noise: Tensor
    l2_norm: float
    prob_mse: float
    top1_agreement: float
    steps: int
    reached_tolerance: bool
    tolerance: float
    kind: str = "nullspace"
    lr_range: list[float] | None = None

    def stats(self) -> dict[str, float | int | bool]:
        """Everything but the tensor, JSON-ready."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "noise"}

    @staticmethod
    def read_stats(stats: Mapping[str, Any]) -> dict[str, Any]:
        """A :meth:`stats` record as written now or before the tolerance had its own name (``eps``,
        ``reached_eps``), with today's names.

        Example:
            >>> NullspaceNoise.read_stats({"reached_eps": True, "eps": 0.03})
            {'reached_tolerance': True, 'tolerance': 0.03}
        """
        return {_LEGACY_NAMES.get(key, key): value for key, value in stats.items()}

    def save(self, path: str | Path) -> Path:
        """Write the noise and its statistics (as JSON metadata) to a safetensors file."""
        path = Path(path)
        metadata = {"format": "pt", _METADATA_KEY: json.dumps(self.stats())}
        save_file({"noise": self.noise.detach().cpu().contiguous()}, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> NullspaceNoise:
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: The file is not a saved ``NullspaceNoise``.
        """
        # Read on the CPU, then move: safetensors rejects some torch device spellings (e.g. "cpu:0").
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if _METADATA_KEY not in metadata or "noise" not in f.keys():
                raise ValueError(f"{path} is not a NullspaceNoise file (no 'noise' tensor with {_METADATA_KEY!r})")
            return cls(noise=f.get_tensor("noise").to(device), **cls.read_stats(json.loads(metadata[_METADATA_KEY])))


def permuted(noise: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The entries of ``noise`` in a random order: the same norm (and values), a random direction.

    The paper's control: if the synthesized noise barely changes the outputs but its permutation does, the
    model's input space is not isotropic and the noise found a genuine near-nullspace direction.

    Example:
        >>> from robustvit.nullspace import synthesize_noise
        >>> result = synthesize_noise(model, loader, max_batches=2, progress=False)
        >>> control = permuted(result.noise, torch.Generator().manual_seed(0))
        >>> torch.isclose(control.norm(), result.noise.norm())
        tensor(True)
    """
    flat = noise.reshape(-1)
    device = generator.device if generator is not None else flat.device
    order = torch.randperm(flat.numel(), generator=generator, device=device)
    return flat[order.to(flat.device)].view_as(noise)
