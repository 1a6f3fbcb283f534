"""Orthogonality penalties of LoRA A matrices, batched over a stack of same-shaped modules.

For a stack A of shape (M, r, d_in) (M LoRA modules of one shape) let Â be A with unit-norm rows
(norms clamped at 1e-6). Per module m:

    intra_m = ‖offdiag(Â_m Â_mᵀ)‖²_F / (r(r−1))        (0 when r == 1)
    cross_m = ‖Â_m U_m‖²_F / r                          (U_m: d_in × k with orthonormal columns)

cross_m is the mean squared cosine between the rows of A_m and the subspace spanned by U_m, in [0, 1].
Zero columns in U_m (padding, when modules keep fewer than k directions) contribute nothing.

This module holds the torch reference (autograd-differentiable, fp32 accumulation) and the dispatch;
the fused Triton implementation lives in ``_triton_orthogonality`` and is used for CUDA tensors.
"""

from __future__ import annotations

import torch

from .dispatch import use_triton

NORM_EPS = 1e-6


def _check(a: torch.Tensor, u: torch.Tensor | None) -> None:
    if a.dim() != 3:
        raise ValueError(f"expected A stacked as (modules, r, d_in), got shape {tuple(a.shape)}")
    if u is not None:
        if u.dim() != 3 or u.shape[0] != a.shape[0] or u.shape[1] != a.shape[2]:
            raise ValueError(
                f"expected bases U of shape (modules={a.shape[0]}, d_in={a.shape[2]}, k), got {tuple(u.shape)}"
            )


def orthogonality_reference(
    a: torch.Tensor, u: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Torch reference: per-module ``(intra (M,), cross (M,) or None)`` in fp32, differentiable in ``a``."""
    _check(a, u)
    m, r, _ = a.shape
    af = a.float()
    ahat = af / af.norm(dim=2, keepdim=True).clamp_min(NORM_EPS)
    if r > 1:
        gram = ahat @ ahat.transpose(1, 2)  # (M, r, r)
        diag = torch.diagonal(gram, dim1=1, dim2=2)
        off = (gram * gram).sum(dim=(1, 2)) - (diag * diag).sum(dim=1)
        intra = off / (r * (r - 1))
    else:
        intra = af.new_zeros(m)
    cross = None
    if u is not None:
        proj = ahat @ u.float()  # (M, r, k)
        cross = (proj * proj).sum(dim=(1, 2)) / r
    return intra, cross


def lora_orthogonality(
    a: torch.Tensor, u: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch: fused Triton kernel for CUDA tensors (when available), the torch reference otherwise."""
    if use_triton(a):
        from ._triton_orthogonality import orthogonality_triton

        return orthogonality_triton(a, u)
    return orthogonality_reference(a, u)
