"""The ipr (inverse participation ratio) penalty of token representations: value and gradient.

Math (ARCHITECTURE.md). H is (n, d). With ``normalize`` each row is scaled to unit length,
Z = H / max(‖h_i‖, 1e-6); otherwise Z = H. Zc = Z − column mean, s = ‖Zc‖²_F and

    P = ‖ZcᵀZc‖²_F / s²          (= ‖ZcZcᵀ‖²_F / s², computed on the smaller side)

which lies in [1/min(n−1, d), 1] (1 = all variance in one direction: collapse). Its gradient is

    ∂P/∂Z = (4/s²)(Zc·ZcᵀZc − P·s·Zc)
    ∂P/∂h_i = (g_i − (g_i·z_i) z_i) / ‖h_i‖      (through the row normalization; g = ∂P/∂Z)

This module holds the torch reference (the CPU path, fp32 accumulation) and the dispatch; the fused
Triton implementation lives in ``_triton_covariance`` and is used for CUDA tensors.
"""

from __future__ import annotations

import torch

from .dispatch import use_triton

NORM_EPS = 1e-6


def ipr_reference(
    h: torch.Tensor, normalize: bool = True, side: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: returns ``(P, dP/dH)`` with P a 0-d fp32 tensor and dP/dH in fp32, shape of ``h``.

    P is NaN when fewer than two tokens (or all-identical tokens) make the covariance zero.
    ``side``: "auto" (the n×n Gram when n ≤ d, else the d×d covariance), or force "gram" / "cov"
    (benchmarks compare the two routes).
    """
    if side not in ("auto", "gram", "cov"):
        raise ValueError(f"side={side!r}: use 'auto', 'gram' or 'cov'")
    if h.dim() != 2:
        raise ValueError(f"ipr expects a 2-D (tokens × features) tensor, got shape {tuple(h.shape)}")
    x = h.detach().float()
    n, d = x.shape
    if normalize:
        raw_norm = x.norm(dim=1, keepdim=True)
        norm = raw_norm.clamp_min(NORM_EPS)
        z = x / norm
    else:
        z = x
    zc = z - z.mean(dim=0, keepdim=True)
    s = (zc * zc).sum()
    if side == "gram" or (side == "auto" and n <= d):
        gram = zc @ zc.T  # n × n
        num = (gram * gram).sum()
        zzz = gram @ zc  # Zc ZcᵀZc
    else:
        cov = zc.T @ zc  # d × d
        num = (cov * cov).sum()
        zzz = zc @ cov
    p = num / (s * s)
    g = (4.0 / (s * s)) * (zzz - p * s * zc)
    if normalize:
        radial = (g * z).sum(dim=1, keepdim=True)
        clamped = raw_norm < NORM_EPS
        g = torch.where(clamped, g, g - radial * z) / norm
    return p, g


def ipr_value_and_grad(h: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: fused Triton kernels for CUDA tensors (when available), the torch reference otherwise."""
    if use_triton(h):
        from ._triton_covariance import ipr_triton

        return ipr_triton(h, normalize)
    return ipr_reference(h, normalize)


class IPRFunction(torch.autograd.Function):
    """Differentiable ipr whose backward uses the hand-derived gradient (no autograd graph of the math)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, normalize: bool) -> torch.Tensor:  # type: ignore[override]
        p, g = ipr_value_and_grad(h, normalize)
        ctx.save_for_backward(g)
        ctx.in_dtype = h.dtype
        return p

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (g,) = ctx.saved_tensors
        return (grad_out.float() * g).to(ctx.in_dtype), None


def ipr(h: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Differentiable ipr penalty of ``h`` (n × d); see the module docstring for the formula."""
    return IPRFunction.apply(h, normalize)
