"""Pure tensor functions: the penalty math, one implementation each. No transformers here."""

from .anchor import anchor_threshold, auto_weight_step, hinge_value_and_grad
from .diversity import PENALTIES, decov, get_penalty, ipr, penalty_value_and_grad, vicreg
from .geometry import (
    anisotropy,
    effective_rank,
    effective_rank_ratio,
    geometry_summary,
    linear_cka,
    lora_delta_svd,
    norm_stats,
    participation_ratio,
    singular_value_stats,
    stable_rank,
    subspace_overlap,
    top_pc_share,
)
from .lora import lora_cross_overlap, lora_intra_decorrelation, lora_penalties

__all__ = [
    "PENALTIES",
    "anchor_threshold",
    "auto_weight_step",
    "anisotropy",
    "effective_rank",
    "effective_rank_ratio",
    "geometry_summary",
    "linear_cka",
    "lora_delta_svd",
    "norm_stats",
    "participation_ratio",
    "singular_value_stats",
    "stable_rank",
    "subspace_overlap",
    "top_pc_share",
    "decov",
    "get_penalty",
    "hinge_value_and_grad",
    "ipr",
    "lora_cross_overlap",
    "lora_intra_decorrelation",
    "lora_penalties",
    "penalty_value_and_grad",
    "vicreg",
]
