"""Loading a converted model's weights: in the stored precision, strictly. The one place that does it, for every
format (robustvit's, transformers', timm's)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["load_strictly"]


def load_strictly(model: nn.Module, tensors: dict[str, Tensor], mismatch: str) -> None:
    """Load ``tensors`` into ``model`` with every key matched both ways, after casting ``model`` to the stored
    floating dtype when the file holds one: a certificate is about these exact values, which a cast on loading
    would round. Raises ``ValueError(f"{mismatch}: ...")`` when the keys or shapes do not match."""
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{mismatch}: {err}") from err
