"""LoRA update decorrelation penalties over a stack of same-shaped LoRA A matrices (pure tensor functions).

For A of shape (M, r, d_in) — M modules of one shape — let Â be A with unit-norm rows. Per module:

- intra decorrelation: ‖offdiag(ÂÂᵀ)‖²_F / (r(r−1)) — 0 when the r update directions are orthogonal;
- cross-stage overlap: ‖ÂU‖²_F / r with U (d_in × k, orthonormal columns) spanning the input subspace of
  earlier stages' updates — the mean squared cosine between A's rows and that subspace, in [0, 1].

B is not normalized or penalized: LoRA starts B at zero, where normalization has unbounded gradients.
All functions return per-module fp32 values (shape (M,)), differentiable in A; the callback averages
them over every module of the model. One batched computation per shape group, via
:func:`supple.kernels.lora_orthogonality` (fused Triton kernel on CUDA, torch reference elsewhere).
"""

from __future__ import annotations

import torch

from ..kernels.orthogonality import lora_orthogonality


def lora_penalties(a: torch.Tensor, u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-module ``(intra (M,), cross (M,) or None)`` for A (M, r, d_in) and optional bases U (M, d_in, k)."""
    return lora_orthogonality(a, u)


def lora_intra_decorrelation(a: torch.Tensor) -> torch.Tensor:
    """Per-module ‖offdiag(ÂÂᵀ)‖²_F / (r(r−1)) for A stacked as (M, r, d_in)."""
    return lora_orthogonality(a, None)[0]


def lora_cross_overlap(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-module ‖ÂU‖²_F / r for A (M, r, d_in) and orthonormal bases U (M, d_in, k)."""
    cross = lora_orthogonality(a, u)[1]
    assert cross is not None
    return cross
