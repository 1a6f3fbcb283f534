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


class _OrthogonalityTorch(torch.autograd.Function):
    """Gram form of the penalties: A is read by two batched matmuls forward and two backward.

    With G = A Aᵀ (M, r, r), ν = max(sqrt(diag G), ε), Ĝ = G / ννᵀ and Q = diag(1/ν)·A·U (M, r, k):
    intra = ‖offdiag Ĝ‖²_F / (r(r−1)), cross = ‖Q‖²_F / r. With c_i = ḡ_intra·4/(r(r−1)) and
    c_c = ḡ_cross·2/r, ρ_i = c_i Σ_{j≠i} Ĝ_ij² + c_c ‖Q_i‖² (0 for a clamped row):

        ∂L/∂A = diag(1/ν)·(c_i·offdiag Ĝ − diag ρ)·diag(1/ν)·A + diag(c_c/ν)·Q·Uᵀ
        ∂L/∂U = Aᵀ·diag(c_c/ν)·Q

    (the chain rule through the row normalization, done in r×r space). The normalized copy Â is never
    materialized: every elementwise operation is on r×r or r×k matrices.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, u: torch.Tensor | None):  # type: ignore[override]
        m, r, _ = a.shape
        af = a.float()
        uf = u.float() if u is not None else None
        gram = torch.bmm(af, af.transpose(1, 2))  # (M, r, r)
        raw = torch.diagonal(gram, dim1=1, dim2=2).clamp_min(0).sqrt()  # (M, r) row norms
        inv = raw.clamp_min(NORM_EPS).reciprocal()
        ghat = gram * inv.unsqueeze(2) * inv.unsqueeze(1)
        if r > 1:
            off = ghat.clone()
            off.diagonal(dim1=1, dim2=2).zero_()
            intra = (off * off).sum(dim=(1, 2)) / (r * (r - 1))
        else:
            off = None
            intra = af.new_zeros(m)
        q = cross = None
        if uf is not None:
            q = torch.bmm(af, uf) * inv.unsqueeze(2)  # (M, r, k)
            cross = (q * q).sum(dim=(1, 2)) / r
        ctx.save_for_backward(a, u, off, q, inv, raw >= NORM_EPS)
        ctx.r = r
        return intra, cross

    @staticmethod
    def backward(ctx, g_intra, g_cross):  # type: ignore[override]
        a, u, off, q, inv, live = ctx.saved_tensors
        r = ctx.r
        af = a.float()
        w = af.new_zeros(a.shape[0], r, r)
        rho = af.new_zeros(a.shape[0], r)
        if off is not None and g_intra is not None:
            c_i = (g_intra.float() * (4.0 / (r * (r - 1)))).view(-1, 1, 1)
            w = w + c_i * off
            rho = rho + c_i.view(-1, 1) * (off * off).sum(dim=2)
        vq = None
        if q is not None and g_cross is not None:
            c_c = (g_cross.float() * (2.0 / r)).view(-1, 1, 1)
            rho = rho + c_c.view(-1, 1) * (q * q).sum(dim=2)
            vq = c_c * q * inv.unsqueeze(2)  # diag(c_c/ν)·Q
        w.diagonal(dim1=1, dim2=2).sub_(rho * live)
        w = w * inv.unsqueeze(2) * inv.unsqueeze(1)
        grad_a = torch.bmm(w, af)
        if vq is not None:
            grad_a.baddbmm_(vq, u.float().transpose(1, 2))
        grad_u = None
        if u is not None and ctx.needs_input_grad[1] and vq is not None:
            grad_u = torch.bmm(af.transpose(1, 2), vq).to(u.dtype)
        return grad_a.to(a.dtype), grad_u


def orthogonality_reference(
    a: torch.Tensor, u: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Torch reference: per-module ``(intra (M,), cross (M,) or None)`` in fp32, differentiable in ``a`` and ``u``.

    Computed in Gram form (:class:`_OrthogonalityTorch`) with a hand-derived backward, so a stack of
    224 modules × 16 × 4096 moves A through memory four times (two matmuls each way) instead of building
    the normalized copy and its autograd graph.
    """
    _check(a, u)
    return _OrthogonalityTorch.apply(a, u)


def lora_orthogonality(
    a: torch.Tensor, u: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch: fused Triton kernel for CUDA tensors (when available), the torch reference otherwise."""
    if use_triton(a):
        from ._triton_orthogonality import orthogonality_triton

        return orthogonality_triton(a, u)
    return orthogonality_reference(a, u)
