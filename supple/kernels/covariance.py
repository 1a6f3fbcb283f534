"""The ipr (inverse participation ratio) penalty of token representations: value and gradient.

Math (README.md, "How it works → The penalties"; how the callback applies it: docs/design.md,
"Diversity taps"). H is (n, d). With ``normalize`` each row is scaled to unit length,
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


def _xxt(x: torch.Tensor, blocks: int = 4, min_rows: int = 512) -> torch.Tensor:
    """x·xᵀ computing only the upper block triangle (row strip i against rows ≥ its start), mirrored: ~5/8 of the
    matmul FLOPs at 4 blocks.

    torch exposes no symmetric rank-k product (BLAS syrk); this is the cheap substitute, used for both the
    n×n Gram and the d×d covariance so the two routes stay comparable. Small inputs take the plain product.
    """
    n = x.shape[0]
    if n < min_rows:
        return x @ x.T
    cuts = [n * i // blocks for i in range(blocks + 1)]
    out = x.new_empty(n, n)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        out[lo:hi, lo:] = x[lo:hi] @ x[lo:].T
        out[hi:, lo:hi] = out[lo:hi, hi:].T
    return out


def ipr_reference(
    h: torch.Tensor, normalize: bool = True, side: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: returns ``(P, dP/dH)`` with P a 0-d fp32 tensor and dP/dH in fp32, shape of ``h``.

    P is NaN when fewer than two tokens (or all-identical tokens) make the covariance zero.
    ``side``: "auto" (the n×n Gram when n ≤ d, else the d×d covariance), or force "gram" / "cov"
    (benchmarks compare the two routes).

    Gram route (n ≤ d): with ν_i = max(‖h_i‖, ε), μ the mean of the rows z_i = h_i/ν_i, Zc = Z − 1μᵀ,
    G = ZcZcᵀ, s = tr G and W = (4/s²)(G − P·s·I) (so ∂P/∂Z = W·Zc), the row-normalization chain's radial
    term is ρ_i = (W·Zc)_i·z_i = (W∘G)·1 + W·(Zc·μ) (0 for a clamped row), and

        ∂P/∂H = diag(1/ν)·(W − diag ρ)·Zc − (ρ/ν)·μᵀ

    i.e. one n×n matmul for G and one for the gradient; everything elementwise is on n×n matrices or
    vectors, apart from forming Zc.
    """
    if side not in ("auto", "gram", "cov"):
        raise ValueError(f"side={side!r}: use 'auto', 'gram' or 'cov'")
    if h.dim() != 2:
        raise ValueError(f"ipr expects a 2-D (tokens × features) tensor, got shape {tuple(h.shape)}")
    x = h.detach().float()
    n, d = x.shape
    if side == "gram" or (side == "auto" and n <= d):
        if normalize:
            raw = torch.linalg.vector_norm(x, dim=1)
            inv = raw.clamp_min(NORM_EPS).reciprocal()
            live = (raw >= NORM_EPS).float()
        else:
            inv = x.new_ones(n)
            live = x.new_zeros(n)
        zc = x * inv.unsqueeze(1)
        mu = zc.mean(dim=0)
        zc.sub_(mu)  # Zc = diag(1/ν)·H − 1μᵀ, exactly 0 for one token or identical tokens (P is then NaN)
        gram = _xxt(zc)  # n × n
        s = gram.diagonal().sum()
        p = (gram * gram).sum() / (s * s)
        w = gram * (4.0 / (s * s))
        w.diagonal().sub_(4.0 * p / s)
        rho = ((w * gram).sum(dim=1) + torch.mv(w, torch.mv(zc, mu))) * live
        w.diagonal().sub_(rho)
        w.mul_(inv.unsqueeze(1))
        g = torch.mm(w, zc)
        g.addr_(rho * inv, mu, alpha=-1.0)
        return p, g
    if normalize:
        raw_norm = x.norm(dim=1, keepdim=True)
        norm = raw_norm.clamp_min(NORM_EPS)
        z = x / norm
    else:
        z = x
    zc = z - z.mean(dim=0, keepdim=True)
    s = (zc * zc).sum()
    cov = _xxt(zc.T)  # d × d
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
