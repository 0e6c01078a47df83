"""Lipschitz layers, one concept per file; each has ``lipschitz_bound()`` returning a float64 tensor."""

from robustvit.layers.block import LipBlock
from robustvit.layers.center_norm import CenterNorm
from robustvit.layers.cpl import CPL
from robustvit.layers.l2_attention import L2Attention
from robustvit.layers.lires_conv import LiResConv
from robustvit.layers.mean_pool_latent import MeanPoolLatent
from robustvit.layers.minmax import MinMax
from robustvit.layers.normalized_conv import NormalizedConv2d
from robustvit.layers.prefix_pool import PrefixPool
from robustvit.layers.residual import LipResidual, fit_residual_budget, residual_stack_bound
from robustvit.layers.rms_scale import RmsScale
from robustvit.layers.sll import SLL
from robustvit.layers.token_shift import TokenShift
from robustvit.layers.ungated_mlp import UngatedMlp
from robustvit.lipschitz.engine import record_methods

# Recorded at import: a later class-level patch of a robustvit layer is refused by the bound engine.
record_methods(
    CPL,
    CenterNorm,
    L2Attention,
    LipBlock,
    LipResidual,
    MeanPoolLatent,
    MinMax,
    NormalizedConv2d,
    PrefixPool,
    RmsScale,
    SLL,
    TokenShift,
    UngatedMlp,
)

__all__ = [
    "CPL",
    "CenterNorm",
    "L2Attention",
    "LiResConv",
    "LipBlock",
    "LipResidual",
    "MeanPoolLatent",
    "MinMax",
    "NormalizedConv2d",
    "PrefixPool",
    "RmsScale",
    "SLL",
    "TokenShift",
    "UngatedMlp",
    "fit_residual_budget",
    "residual_stack_bound",
]
