"""Fused Triton kernels for the LoRA orthogonality penalties (see :mod:`supple.kernels.orthogonality`).

For a stack A (M, r, d_in) of same-shaped LoRA A matrices and optional bases U (M, d_in, k), with
Â_m = A_m with unit-norm rows (norms ν_i = max(‖a_i‖, ε)):

    intra_m = ‖offdiag(Ĝ_m)‖²_F / (r(r−1)),  Ĝ_m = Â_m Â_mᵀ       (0 when r = 1)
    cross_m = ‖Q_m‖²_F / r,                  Q_m = Â_m U_m

Gradient (per module; c_i = ∂L/∂intra_m · 4/(r(r−1)), c_c = ∂L/∂cross_m · 2/r):

    ∂L/∂Â = c_i·offdiag(Ĝ)·Â + c_c·Q·Uᵀ
    ∂L/∂a_i = (∂L/∂â_i − ρ_i â_i) / ν_i,  ρ_i = ∂L/∂â_i · â_i = c_i Σ_{j≠i} Ĝ_ij² + c_c ‖Q_i‖²
    ∂L/∂U = c_c·Âᵀ·Q                                                 (only when U requires grad)

ρ_i comes from the small r×r and r×k matrices, so the backward needs a single pass over d_in.
Rows with ‖a_i‖ < ε get ∂L/∂â_i / ε (a clamped norm carries no gradient), as in the reference.

Kernels (one launch each, grid = M modules, one program per module, looping over d_in):

- ``_ortho_fwd_kernel``: one pass over A_m (and U_m) accumulating the raw Gram A Aᵀ, the projection
  A U (both with ``tl.dot`` on r_pad × BLOCK_D × r_pad / k_pad tiles) and the row sums of squares;
  then Ĝ = G/(ν νᵀ), Q = diag(1/ν)·AU, intra and cross. Ĝ (r_pad²), Q (r_pad·k_pad) and ν are saved
  for the backward (M·(r_pad² + r_pad·k_pad + r_pad) fp32: 0.5 MB for 224 modules at r = k = 16).
- ``_ortho_bwd_kernel``: one pass over A_m (and U_m) writing ∂L/∂A_m in A's dtype (and ∂L/∂U_m).

All arithmetic is fp32; ``tl.dot`` uses fp32 operands with ``input_precision="tf32x3"`` (≈ fp32
accuracy; the kernels are memory-bound, so the 3 MMAs cost nothing visible). r and k are padded to
powers of two ≥ 16 (``tl.dot`` tiles); r or k above 64 fall back to the torch reference (at
r_pad = 128 the backward's loop-invariant r×r and r×k operands alone need > 227 KB of shared
memory; a row-split backward would lift this).

Cost for 224 modules, r = 16, d_in = 4096, k = 16, A and U in bf16 (H100 SXM: 989 TFLOP/s dense bf16,
3.35 TB/s). A is 224·16·4096·2 B = 29.4 MB, U the same:

    forward   FLOPs 2·M·r·d_in·(r + k) = 0.94 GFLOP;  bytes: read A + U = 58.7 MB        → 17.5 µs
    backward  FLOPs 2·M·r·d_in·(r + k) = 0.94 GFLOP (+0.47 for ∂U);
              bytes: read A + U, write ∂A (bf16) = 88.1 MB                               → 26.3 µs
    no U      forward 29.4 MB → 8.8 µs; backward 58.7 MB → 17.5 µs; 0.47 GFLOP each

Compute is ~1 µs at the bf16 rate (≈6 µs even as 3×TF32), so both kernels sit on the memory roof:
≈ 44 µs for forward + backward with U. With fp32 U (the usual case for an SVD basis) add 29.4 MB
per pass (≈ 9 µs each). The torch reference (same Gram-form math) reads A four times in
four batched matmuls (an fp32 copy first when A is bf16) and launches ~25 small kernels for the r×r work.
Parallelism is M programs (224 on 132 SMs); a stack of few modules with a very long d_in uses few SMs.

Under ``TRITON_INTERPRET=1`` the autotuner is bypassed and ``INTERPRETER_CONFIGS`` is used.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .orthogonality import NORM_EPS, orthogonality_reference

_EPS = tl.constexpr(NORM_EPS)
_MAX_TILE = 64


def _is_interpreted(kernel) -> bool:
    return not isinstance(kernel, triton.runtime.JITFunction)


@triton.jit
def _ortho_fwd_kernel(
    a_ptr,
    sa_m,
    sa_r,
    sa_d,
    u_ptr,
    su_m,
    su_d,
    su_k,
    r,
    d_in,
    k,
    intra_ptr,
    cross_ptr,
    ghat_ptr,
    q_ptr,
    norm_ptr,
    inv_pairs,
    inv_r,
    HAS_U: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_KU: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Module ``program_id``: intra, cross, and the saved Ĝ, Q, ν."""
    mod = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_R).to(tl.int64)
    kk = tl.arange(0, BLOCK_KU).to(tl.int64)
    rmask = rows < r
    kmask = kk < k
    a_base = a_ptr + mod * sa_m + rows[:, None] * sa_r
    u_base = u_ptr + mod * su_m + kk[None, :] * su_k
    gram = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    proj = tl.zeros((BLOCK_R, BLOCK_KU), dtype=tl.float32)
    ss = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, d_in, BLOCK_D):
        ds = tl.arange(0, BLOCK_D).to(tl.int64) + d0
        dmask = ds < d_in
        a = tl.load(a_base + ds[None, :] * sa_d, mask=rmask[:, None] & dmask[None, :], other=0.0)
        a = a.to(tl.float32)
        ss += tl.sum(a * a, axis=1)
        gram = tl.dot(a, tl.trans(a), gram, input_precision="tf32x3")
        if HAS_U:
            ut = tl.load(u_base + ds[:, None] * su_d, mask=dmask[:, None] & kmask[None, :], other=0.0)
            proj = tl.dot(a, ut.to(tl.float32), proj, input_precision="tf32x3")
    nrm = tl.sqrt_rn(ss)
    inv = 1.0 / tl.maximum(nrm, _EPS)
    ghat = gram * inv[:, None] * inv[None, :]
    off = rows[:, None] != rows[None, :]
    intra = tl.sum(tl.where(off, ghat * ghat, 0.0)) * inv_pairs
    tl.store(intra_ptr + mod, intra)
    tl.store(ghat_ptr + mod * BLOCK_R * BLOCK_R + rows[:, None] * BLOCK_R + rows[None, :], ghat)
    tl.store(norm_ptr + mod * BLOCK_R + rows, nrm)
    if HAS_U:
        q = proj * inv[:, None]
        tl.store(cross_ptr + mod, tl.sum(q * q) * inv_r)
        tl.store(q_ptr + mod * BLOCK_R * BLOCK_KU + rows[:, None] * BLOCK_KU + kk[None, :], q)


@triton.jit
def _ortho_bwd_kernel(
    a_ptr,
    sa_m,
    sa_r,
    sa_d,
    u_ptr,
    su_m,
    su_d,
    su_k,
    r,
    d_in,
    k,
    g_intra_ptr,
    g_cross_ptr,
    ghat_ptr,
    q_ptr,
    norm_ptr,
    da_ptr,
    du_ptr,
    coef_intra,
    coef_cross,
    HAS_U: tl.constexpr,
    NEED_DU: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_KU: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Module ``program_id``: ∂L/∂A (contiguous, A's dtype) and, with NEED_DU, ∂L/∂U (contiguous)."""
    mod = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_R).to(tl.int64)
    kk = tl.arange(0, BLOCK_KU).to(tl.int64)
    rmask = rows < r
    kmask = kk < k
    ci = tl.load(g_intra_ptr + mod) * coef_intra
    ghat = tl.load(ghat_ptr + mod * BLOCK_R * BLOCK_R + rows[:, None] * BLOCK_R + rows[None, :])
    off = tl.where(rows[:, None] != rows[None, :], ghat, 0.0)
    radial = ci * tl.sum(off * off, axis=1)
    w_intra = off * ci
    if HAS_U:
        cc = tl.load(g_cross_ptr + mod) * coef_cross
        q = tl.load(q_ptr + mod * BLOCK_R * BLOCK_KU + rows[:, None] * BLOCK_KU + kk[None, :])
        radial += cc * tl.sum(q * q, axis=1)
        w_cross = q * cc
    nrm = tl.load(norm_ptr + mod * BLOCK_R + rows)
    inv = 1.0 / tl.maximum(nrm, _EPS)
    clamped = nrm < _EPS
    a_base = a_ptr + mod * sa_m + rows[:, None] * sa_r
    da_base = da_ptr + mod * r * d_in + rows[:, None] * d_in
    for d0 in range(0, d_in, BLOCK_D):
        ds = tl.arange(0, BLOCK_D).to(tl.int64) + d0
        dmask = ds < d_in
        amask = rmask[:, None] & dmask[None, :]
        a = tl.load(a_base + ds[None, :] * sa_d, mask=amask, other=0.0).to(tl.float32)
        ahat = a * inv[:, None]
        dahat = tl.dot(w_intra, ahat, input_precision="tf32x3")
        if HAS_U:
            # Uᵀ tile (k_pad × BLOCK_D), loaded transposed.
            u_t = tl.load(u_ptr + mod * su_m + kk[:, None] * su_k + ds[None, :] * su_d,
                          mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            dahat = tl.dot(w_cross, u_t, dahat, input_precision="tf32x3")
            if NEED_DU:
                du = tl.dot(tl.trans(ahat), w_cross, input_precision="tf32x3")
                du_ptrs = du_ptr + mod * d_in * k + ds[:, None] * k + kk[None, :]
                tl.store(du_ptrs, du.to(du_ptr.dtype.element_ty), mask=dmask[:, None] & kmask[None, :])
        da = tl.where(clamped[:, None], dahat, dahat - radial[:, None] * ahat) * inv[:, None]
        tl.store(da_base + ds[None, :], da.to(da_ptr.dtype.element_ty), mask=amask)


def _cfg(block_d: int, num_warps: int, num_stages: int = 3) -> triton.Config:
    return triton.Config({"BLOCK_D": block_d}, num_warps=num_warps, num_stages=num_stages)


_CONFIGS = [
    _cfg(32, 4), _cfg(64, 4), _cfg(64, 8), _cfg(128, 4), _cfg(128, 8), _cfg(256, 8), _cfg(512, 8, 2),
    _cfg(32, 8, 2),
]
_SMEM_BUDGET = 200 * 1024  # bytes; H100 allows 227 KB per block


def _make_prune(backward: bool):
    """Keep configs whose shared memory fits and that suit the problem size.

    Estimate: (r_pad + k_pad)·BLOCK_D·4 B per pipeline stage, plus, in the backward, the loop-invariant
    dot operands offdiag(Ĝ) and Q (used twice), (r_pad² + 2·r_pad·k_pad)·4 B, against a 200 KB budget.
    It is only an estimate (compiled sm_90 kernels use between 0.5× and 1.3× of it); what counts is
    that every config it keeps for r_pad, k_pad ∈ {16, 32, 64} compiles within the 227 KB of an H100
    (``python benchmarks/kernel_speed.py --compile-check``). Large r tiles (an r_pad² accumulator) get 8 warps.
    """

    def prune(configs, named_args, **kwargs):
        d_in = int(named_args.get("d_in") or kwargs.get("d_in") or 1)
        block_r = int(kwargs.get("BLOCK_R") or 16)
        block_k = int(kwargs.get("BLOCK_KU") or 16) if kwargs.get("HAS_U", True) else 0
        fixed = (block_r * block_r + 2 * block_r * block_k) * 4 if backward else 0
        kept = [
            c for c in configs
            if c.kwargs["BLOCK_D"] <= max(32, 2 * triton.next_power_of_2(d_in))
            and fixed + (block_r + block_k) * c.kwargs["BLOCK_D"] * 4 * c.num_stages <= _SMEM_BUDGET
            and (block_r < 64 or c.num_warps >= 8)
        ]
        return kept or [configs[-1]]

    return prune


#: Fixed meta-parameters under ``TRITON_INTERPRET=1`` (no autotuning there).
INTERPRETER_CONFIGS: dict[str, dict[str, int]] = {"fwd": {"BLOCK_D": 64}, "bwd": {"BLOCK_D": 64}}

_fwd_tuned = triton.autotune(_CONFIGS, key=["r", "d_in", "k", "HAS_U"],
                             prune_configs_by={"early_config_prune": _make_prune(False)})(_ortho_fwd_kernel)
_bwd_tuned = triton.autotune(_CONFIGS, key=["r", "d_in", "k", "HAS_U", "NEED_DU"],
                             prune_configs_by={"early_config_prune": _make_prune(True)})(_ortho_bwd_kernel)

INTERPRETED = _is_interpreted(_ortho_fwd_kernel)


def _launch(raw, tuned, name: str, grid, *args, **constexprs) -> None:
    if INTERPRETED:
        raw[grid](*args, **constexprs, **INTERPRETER_CONFIGS[name])
    else:
        tuned[grid](*args, **constexprs)


def _pad(x: int) -> int:
    return max(16, triton.next_power_of_2(max(int(x), 1)))


class _OrthogonalityTriton(torch.autograd.Function):
    """Triton forward and backward for a stack of LoRA A matrices (and optional bases U)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, u: torch.Tensor | None):  # type: ignore[override]
        nmod, r, d_in = a.shape
        k = u.shape[2] if u is not None else 1
        block_r, block_k = _pad(r), _pad(k)
        dev = a.device
        f32 = {"dtype": torch.float32, "device": dev}
        intra = torch.empty(nmod, **f32)
        cross = torch.zeros(nmod, **f32)
        ghat = torch.empty((nmod, block_r, block_r), **f32)
        q = torch.empty((nmod, block_r, block_k), **f32) if u is not None else ghat
        norms = torch.empty((nmod, block_r), **f32)
        u_arg = u if u is not None else a
        su = u.stride() if u is not None else (0, 0, 0)
        inv_pairs = 1.0 / (r * (r - 1)) if r > 1 else 0.0
        guard = torch.cuda.device(dev) if a.is_cuda else contextlib.nullcontext()
        with guard:
            _launch(_ortho_fwd_kernel, _fwd_tuned, "fwd", (nmod,),
                    a, *a.stride(), u_arg, *su, r, d_in, k, intra, cross, ghat, q, norms,
                    inv_pairs, 1.0 / r, HAS_U=u is not None, BLOCK_R=block_r, BLOCK_KU=block_k)
        ctx.save_for_backward(a, u, ghat, q, norms)
        ctx.shape = (nmod, r, d_in, k, block_r, block_k)
        return intra, cross

    @staticmethod
    def backward(ctx, g_intra: torch.Tensor, g_cross: torch.Tensor):  # type: ignore[override]
        a, u, ghat, q, norms = ctx.saved_tensors
        nmod, r, d_in, k, block_r, block_k = ctx.shape
        need_da = ctx.needs_input_grad[0]
        need_du = u is not None and ctx.needs_input_grad[1]
        if not (need_da or need_du):
            return None, None
        dev = a.device
        g_intra = (g_intra if g_intra is not None else torch.zeros(nmod, device=dev)).float().contiguous()
        g_cross = (g_cross if g_cross is not None else torch.zeros(nmod, device=dev)).float().contiguous()
        da = torch.empty((nmod, r, d_in), dtype=a.dtype, device=dev)
        du = torch.empty((nmod, d_in, k), dtype=u.dtype, device=dev) if need_du else da
        u_arg = u if u is not None else a
        su = u.stride() if u is not None else (0, 0, 0)
        coef_intra = 4.0 / (r * (r - 1)) if r > 1 else 0.0
        guard = torch.cuda.device(dev) if a.is_cuda else contextlib.nullcontext()
        with guard:
            _launch(_ortho_bwd_kernel, _bwd_tuned, "bwd", (nmod,),
                    a, *a.stride(), u_arg, *su, r, d_in, k, g_intra, g_cross, ghat, q, norms, da, du,
                    coef_intra, 2.0 / r, HAS_U=u is not None, NEED_DU=need_du,
                    BLOCK_R=block_r, BLOCK_KU=block_k)
        return (da if need_da else None), (du if need_du else None)


def orthogonality_triton(
    a: torch.Tensor, u: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-module ``(intra (M,), cross (M,) or None)`` in fp32, differentiable in ``a`` (and ``u``).

    Same contract as :func:`supple.kernels.orthogonality.orthogonality_reference`; one forward launch
    (and one backward launch) covers all M modules. ``a``/``u`` may be fp32, bf16 or fp16 and
    non-contiguous. Shapes with r or k above 64, or an empty stack, use the torch reference.
    """
    if a.dim() != 3:
        raise ValueError(f"expected A stacked as (modules, r, d_in), got shape {tuple(a.shape)}")
    if u is not None and (u.dim() != 3 or u.shape[0] != a.shape[0] or u.shape[1] != a.shape[2]):
        raise ValueError(
            f"expected bases U of shape (modules={a.shape[0]}, d_in={a.shape[2]}, k), got {tuple(u.shape)}"
        )
    nmod, r, d_in = a.shape
    k = u.shape[2] if u is not None else 1
    if a.numel() == 0 or r > _MAX_TILE or k > _MAX_TILE or k == 0:
        return orthogonality_reference(a, u)
    if a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        a = a.float()
    if u is not None and u.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        u = u.float()
    intra, cross = _OrthogonalityTriton.apply(a, u)
    return intra, (cross if u is not None else None)


def _ortho_types(fn, a_type: str, u_type: str) -> dict[str, str]:
    types = {}
    for name in fn.arg_names:
        if name == "a_ptr" or name == "da_ptr":
            types[name] = "*" + a_type
        elif name == "u_ptr" or name == "du_ptr":
            types[name] = "*" + u_type
        elif name.endswith("_ptr"):
            types[name] = "*fp32"
        elif name in ("inv_pairs", "inv_r", "coef_intra", "coef_cross"):
            types[name] = "fp32"
        else:
            types[name] = "i64" if name.startswith(("sa_", "su_")) else "i32"
    return types


def compile_report(
    arch: int = 90,
    quick: bool = False,
    block_r: int = 16,
    block_k: int = 16,
    a_types: tuple[str, ...] = ("bf16", "fp32"),
):
    """Yield ``(kernel, variant, config kwargs, num_warps, num_stages, shared bytes)`` per compiled config
    (ahead of time, no GPU; see :func:`supple.kernels._triton_covariance.compile_for_arch`)."""
    from ._triton_covariance import compile_for_arch

    for a_type in a_types:
        tiles = {"BLOCK_R": block_r, "BLOCK_KU": block_k}
        variants = [
            (_ortho_fwd_kernel, {"HAS_U": True, **tiles}),
            (_ortho_bwd_kernel, {"HAS_U": True, "NEED_DU": True, **tiles}),
        ]
        for fn, constexprs in variants:
            configs = _make_prune(fn is _ortho_bwd_kernel)(_CONFIGS, {"d_in": 1 << 20}, **constexprs)
            for cfg in configs[:1] if quick else configs:
                compiled = compile_for_arch(fn, _ortho_types(fn, a_type, "fp32"), constexprs, cfg, arch)
                yield (fn.__name__, f"A {a_type}, U fp32, r_pad={block_r}, k_pad={block_k}", dict(cfg.kwargs),
                       cfg.num_warps, cfg.num_stages, compiled.metadata.shared)
