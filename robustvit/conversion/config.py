"""The conversion's settings: :class:`ConvertConfig`, free of torch so that the command line's flags come from it.

The choices it names (mixers, activations, MLP forms) are the registries of :mod:`robustvit.conversion.choices`,
read when a config is built (:func:`robustvit.settings.check_choices`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from robustvit.settings import arg, check_choices

__all__ = ["ConvertConfig"]


@dataclass
class ConvertConfig:
    """Conversion choices (``robustvit.convert``); ``to_dict()`` / ``from_dict()`` round-trip through JSON.

    Args:
        mixer: ``"shift"`` (LipShiFT token shift, bound 1) or ``"l2"`` (tied L2 attention, Kim et al. 2021,
            whose bound grows like ``sqrt(N) log N`` with the number of tokens N).
        shift_div: ShiftViT's ``n_div``: four groups of ``dim // shift_div`` channels are shifted.
        activation: the MLP activation when ``mlp="keep"``: ``"gelu"`` (kept; bound 1.129) or ``"minmax"``
            (GroupSort-2; bound 1). Like ``shift_div`` for ``mixer="l2"``, it does not apply otherwise: SLL and CPL
            layers use ReLU (their proofs need slopes in [0, 1]).
        mlp: ``"keep"`` (the source MLP in a weighted residual, bound ``1 + alpha * L(mlp)``), ``"sll"``
            (:class:`~robustvit.layers.SLL`, Araujo et al. 2023) or ``"cpl"`` (:class:`~robustvit.layers.CPL`,
            Meunier et al. 2022): the whole residual MLP sub-block becomes one residual layer of the same hidden
            width with bound 1. Its ``W`` and ``b`` start as the source's ``fc1`` applied after the LayerNorm's affine
            (gamma folded into ``W``, beta into ``b``); its output map is ``W^T`` times a step fixed by ``W``, so it
            cannot copy ``fc2``: the converted function departs from the source's there, and needs finetuning.
        gated_mlp: the substitute of a gated MLP ``fc2(act(gate(x)) * value(x))`` (SwiGLU: EVA-02), whose product of
            two branches has no global bound: ``"value"`` keeps the value branch (the up projection) and ``fc2`` (the
            down projection) around the source's activation, ``fc2(act(value(x)))``; ``"gate"`` keeps the gate branch
            instead, ``fc2(act(gate(x)))``. Either way the dropped branch's weights are lost and the function changes
            (measured in docs/soundness.md); ``mlp="sll"`` / ``"cpl"`` start from the kept branch.
        attention_pool: the substitute of an attention-pooling head (MAP: SigLIP, PE-core), whose softmax over the
            tokens has no global bound: ``"mean"`` fixes the attention to uniform weights, so the head pools
            ``v(mean(tokens))`` and keeps its value and output projections, norm and MLP
            (:class:`~robustvit.layers.MeanPoolLatent`).
        rms_norm: the substitute of an RMSNorm ``gamma * x / rms(x)`` (no mean subtracted, so CenterNorm's argument
            does not carry over): ``"scale"`` keeps ``gamma / r`` as a diagonal map, ``r`` the calibrated mean RMS
            (:class:`~robustvit.layers.RmsScale`, bound ``max|gamma| / r``); ``"center"`` makes it a CenterNorm, which
            adds a centering the source does not have.
        residual_alpha: initial residual weight (multiplied by any LayerScale and the moved scales); 1.0 keeps
            the source's function.
        singular_value_power: ``p`` in ``sigma_i -> sigma_max * (sigma_i / sigma_max) ** p`` for every spectrally
            rescaled weight (singular vectors kept). ``1.0`` keeps the source's weights; ``0.0`` keeps only their
            singular vectors (the polar factor: an orthogonal layer, as LipShiFT / LiResNet initialise), so every
            direction the source learned passes at full gain instead of ``sigma_i / sigma_max``.
        residual_budget: target bound of the residual stack, the product of the residual blocks' bounds
            ``prod_r (1 + max|alpha_r| * bound(branch_r))``. ``None`` keeps the source's scales (for the embedded
            default a stack bound of 41, end-to-end 27, against about 2 for a random init); a number ``> 1`` shrinks
            every residual weight by one common factor until the stack meets it, so the blocks share the budget in
            proportion to their source weights and margin training starts from a tight product bound instead of
            having to unlearn a loose one. The layers outside the stack (patch embedding, norms, head) are left as
            they are. ``robustvit.lipschitz_report`` shows where the budget goes.
        mean, std: the normalization the source expects (per channel). ``None``: timm's ``pretrained_cfg``, or
            the transformers image processor's defaults.

    Example:
        >>> ConvertConfig(mixer="shift", activation="minmax").to_json()
        '{"activation": "minmax", "attention_pool": "mean", "gated_mlp": "value", "mean": null, "mixer": "shift", ...}'
    """

    mixer: str = arg("shift", "token mixer", registry="robustvit.conversion.choices:MIXERS")
    shift_div: int = arg(12, "ShiftViT's n_div: four groups of dim // shift_div channels are shifted")
    activation: str = arg("gelu", "MLP activation (with --mlp keep)",
                          registry="robustvit.conversion.choices:ACTIVATIONS")  # fmt: skip
    mlp: str = arg("keep", "MLP form: the source's in a weighted residual, or a bound-1 residual layer",
                   registry="robustvit.conversion.choices:MLPS")  # fmt: skip
    gated_mlp: str = arg("value", "gated MLP (SwiGLU) substitute: the branch kept around the activation",
                         registry="robustvit.conversion.choices:GATED_MLPS")  # fmt: skip
    attention_pool: str = arg("mean", "attention-pooling head (MAP) substitute",
                              registry="robustvit.conversion.choices:ATTENTION_POOLS")  # fmt: skip
    rms_norm: str = arg("scale", "RMSNorm substitute", registry="robustvit.conversion.choices:RMS_NORMS")
    residual_alpha: float = arg(1.0, "initial residual weight; 1.0 keeps the source's function")
    singular_value_power: float = arg(
        1.0, "flatten every weight's spectrum: 1 keeps the source's weights, 0 keeps their singular vectors only"
    )
    residual_budget: float | None = arg(
        None, "bound of the converted residual stack (> 1; 'none' keeps the source's scales)"
    )
    mean: tuple[float, ...] | None = arg(None, "input normalization mean, per channel (default: the source's)")
    std: tuple[float, ...] | None = arg(None, "input normalization std, per channel (default: the source's)")

    def __post_init__(self) -> None:
        # Their registries: robustvit.conversion.choices.
        check_choices(self, "mixer", "activation", "mlp", "gated_mlp", "attention_pool", "rms_norm")
        if self.shift_div < 4:
            raise ValueError(f"shift_div must be at least 4, got {self.shift_div}")
        if not self.residual_alpha > 0:
            raise ValueError(f"residual_alpha must be positive, got {self.residual_alpha}")
        if not 0 <= self.singular_value_power <= 1:
            raise ValueError(f"singular_value_power must be in [0, 1], got {self.singular_value_power}")
        if self.residual_budget is not None and not self.residual_budget > 1:
            raise ValueError(f"residual_budget must be above 1 or None, got {self.residual_budget}")
        self.mean = tuple(float(v) for v in self.mean) if self.mean is not None else None
        self.std = tuple(float(v) for v in self.std) if self.std is not None else None
        if (self.mean is None) != (self.std is None) or (self.mean is not None and len(self.mean) != len(self.std)):
            raise ValueError(f"mean and std must be given together with one value per channel: {self.mean}, {self.std}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvertConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown ConvertConfig fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
