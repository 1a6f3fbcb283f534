"""Fused Triton kernels for the ipr penalty and its gradient (see :mod:`supple.kernels.covariance`).

Math (README.md, "How it works → The penalties"). H is (n, d); with ``normalize`` z_i = h_i / max(‖h_i‖, ε),
Zc = Z − column mean, s = ‖Zc‖²_F, P = ‖ZcᵀZc‖²_F / s² and

    ∂P/∂Z = (4/s²)(Zc·ZcᵀZc − P·s·Zc),     ∂P/∂h_i = (g_i − (g_i·z_i) z_i) / ‖h_i‖.

Side trick. Let m = min(n, d) and V the m × L "small-side" view of Zc (L = max(n, d)):
V = Zc when n ≤ d (rows are tokens) and V = Zcᵀ when n > d (rows are features). In both cases

    M = V Vᵀ  (m × m: the n×n Gram matrix ZcZcᵀ, or the d×d covariance ZcᵀZc),
    ‖ZcᵀZc‖²_F = ‖M‖²_F,   s = trace(M),
    (∂P/∂Z) viewed like V  =  (4/s²) (M − P·s·I) V,

so one code path serves both sides; only the strides of the view change. Subtracting P·s on the
diagonal of M in fp32 *before* the product keeps the cancellation in Zc·ZcᵀZc − P·s·Zc (large when
the spectrum is nearly flat, i.e. exactly when the penalty is small) out of the low-precision
operands.

Kernels (four launches, no host synchronisation; P, s and ‖M‖² stay on the device):

1. ``_ipr_stats_kernel``  grid n/BLOCK_N. Row norms ‖h_i‖ (one pass over each row block), then the
   column sums of Z, atomically added into a (d,) fp32 buffer (a second pass over the same rows,
   mostly L2 hits). Zc is never stored: every later kernel recomputes z_ij − μ_j on the fly.
2. ``_ipr_gram_kernel``   one program per upper-triangular BLOCK_M × BLOCK_M tile of M (M is
   symmetric). Accumulates V_I V_Jᵀ with ``tl.dot`` over L, reduces the tile straight into ‖M‖²_F
   (weight 2 off the diagonal) and the trace into s with ``atomic_add``, and stores the tile and its
   mirror into the fp32 m × m buffer M (needed by the gradient; see "Memory").
3. ``_ipr_grad_kernel``   a GEMM (M − P·s·I)·V over (m/BLOCK_M) × (L/BLOCK_N) output tiles (grouped
   ordering for L2 reuse). Epilogue: scale by 4/s², store into the fp32 (n, d) output, and with
   ``normalize`` atomically add the partial row dots g_i·z_i into an (n,) buffer.
4. ``_ipr_fixup_kernel``  (``normalize`` only) elementwise ∂P/∂h = (g − (g·z) z)/max(‖h‖, ε), in place;
   rows with ‖h_i‖ < ε keep g/ε (the clamp rule of the reference: a clamped norm has no gradient).

Precision. Every load is converted to fp32 and all accumulation is fp32. ``tl.dot`` operands: for
bf16/fp16 input, the fp32 values (centred Zc, shifted M) are rounded to bf16 (fp32 range: raw
unnormalized Grams overflow fp16) and run at full tensor-core rate; for fp32 input they stay fp32
with ``input_precision="tf32x3"`` (about fp32 accuracy at a third of the TF32 rate). In interpreter
mode the bf16 rounding is emulated (round to bf16, then an fp32 dot), because Triton's interpreter
cannot multiply bf16 tiles (triton-lang/triton#11584); the numbers are the same as a bf16 MMA with
fp32 accumulation up to summation order. Atomic reductions make P and the gradient
bitwise-nondeterministic at the level of fp32 rounding.

Memory (beyond the fp32 (n, d) gradient that the contract returns): M, m² fp32 — never larger than
the gradient itself since m = min(n, d) (64 MiB at n = d = 4096; 1.3 MiB for d = 576) — plus (n,)
row norms and radial dots, the (d,) column sums and three scalars. Neither Zc nor Z is materialized,
and no d × d matrix when n ≤ d. Not storing M would save its 4·m² bytes but make the gradient GEMM
recompute every M tile once per output column block, (L/BLOCK_N)× the Gram FLOPs.

Cost for n = d = 4096, bf16 input, ``normalize=True`` (m = L = 4096, BLOCK_M = 128); H100 SXM roofline
at 989 TFLOP/s dense bf16 and 3.35 TB/s:

    kernel   FLOPs                        HBM bytes (ideal)                          roofline
    stats    2nd + nd      ≈ 0.05 G       read H 33.6 MB (+ an L2 re-read)           10 µs  (memory)
    gram     n²d·(1+1/nb)  ≈ 70.9 G       read H 33.6 MB, write M 67.1 MB            72 µs  (compute)
    grad     2n²d          ≈ 137.4 G      read M 67.1 + H 33.6, write g 67.1 MB      139 µs (compute)
    fixup    ≈ 5nd         ≈ 0.08 G       read g 67.1 + H 33.6, write g 67.1 MB      50 µs  (memory)
    total                  ≈ 208 GFLOP    ≈ 0.47 GB                                  ≈ 0.27 ms

(nb = 32 tiles per side: the triangular grid computes 528 of 1024 tiles.) fp32 input moves 33.6 MB
more per read of H and runs its dots as 3xTF32: ≈ 3 × 208 GFLOP at 494 TFLOP/s ≈ 1.3 ms. The torch
reference at this size materializes Zc (67 MB), the n×n Gram and the gradient in fp32 and runs
≈ 0.8 × 2 × 137 GFLOP of fp32 GEMMs (the Gram product by upper blocks): ≥ 3.3 ms at the 67 TFLOP/s
fp32 peak (≥ 0.45 ms with TF32 allowed). Expect the fused path to reach perhaps 50–70 % of its roofline: operands are computed in
registers (normalize, centre, shift, round) before each MMA instead of being streamed by TMA. For
n > d the roles swap (m = d): cost ≈ 3·n·d² FLOPs, and the gram kernel's parallelism is
(d/BLOCK_M)²/2 tiles each looping over n (no split-K: for d = 576 that kernel runs ~45 programs on
132 SMs, whatever n is).

Autotuning keys on power-of-two buckets of the sizes (n changes every micro-batch with the number of
non-padding tokens, and re-tuning per exact n would stall training); under ``TRITON_INTERPRET=1`` a
single fixed configuration from ``INTERPRETER_CONFIGS`` is used instead.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .covariance import NORM_EPS

_EPS = tl.constexpr(NORM_EPS)
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def _is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (an interpreter function)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


# --------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_view(
    h_ptr,
    rows,
    cols,
    stride_r,
    stride_c,
    R,
    C,
    norm_ptr,
    colsum_ptr,
    inv_n,
    TOK_AXIS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    CENTER: tl.constexpr,
):
    """fp32 tile [rows, cols] of the R × C view of Z (or Zc with CENTER); zero outside the view.

    TOK_AXIS = 0: tokens run along the tile rows (view = Z); 1: along the columns (view = Zᵀ).
    """
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(h_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if NORMALIZE:
        if TOK_AXIS == 0:
            # one reciprocal per row, then multiplies (cheaper than dividing the whole tile)
            inv = 1.0 / tl.maximum(tl.load(norm_ptr + rows, mask=rows < R, other=1.0), _EPS)
            x = x * inv[:, None]
        else:
            inv = 1.0 / tl.maximum(tl.load(norm_ptr + cols, mask=cols < C, other=1.0), _EPS)
            x = x * inv[None, :]
    if CENTER:
        if TOK_AXIS == 0:
            mu = tl.load(colsum_ptr + cols, mask=cols < C, other=0.0) * inv_n
            x = x - mu[None, :]
        else:
            mu = tl.load(colsum_ptr + rows, mask=rows < R, other=0.0) * inv_n
            x = x - mu[:, None]
        x = tl.where(mask, x, 0.0)
    return x


@triton.jit
def _mma(acc, a, b, DOT_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """acc += a @ b for fp32 tiles; bf16 operands (DOT_BF16) or fp32 operands with 3xTF32."""
    if DOT_BF16:
        if EMULATE_BF16:
            acc = tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc)
        else:
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        acc = tl.dot(a, b, acc, input_precision="tf32x3")
    return acc


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _ipr_stats_kernel(
    h_ptr,
    stride_n,
    stride_d,
    n,
    d,
    norm_ptr,
    colsum_ptr,
    N_BUCKET,
    D_BUCKET,
    NORMALIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Row norms (NORMALIZE) and column sums of Z for BLOCK_N rows; column sums are atomically added."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows < n
    row_off = rows[:, None] * stride_n
    if NORMALIZE:
        ss = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = tl.arange(0, BLOCK_D).to(tl.int64) + d0
            mask = rmask[:, None] & (cols[None, :] < d)
            x = tl.load(h_ptr + row_off + cols[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
            ss += tl.sum(x * x, axis=1)
        nrm = tl.sqrt_rn(ss)
        tl.store(norm_ptr + rows, nrm, mask=rmask)
        inv = 1.0 / tl.maximum(nrm, _EPS)
    for d0 in range(0, d, BLOCK_D):
        cols = tl.arange(0, BLOCK_D).to(tl.int64) + d0
        cmask = cols < d
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(h_ptr + row_off + cols[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
        if NORMALIZE:
            x = x * inv[:, None]
        tl.atomic_add(colsum_ptr + cols, tl.sum(x, axis=0), mask=cmask, sem="relaxed")


@triton.jit
def _ipr_gram_kernel(
    h_ptr,
    vs_r,
    vs_c,
    m,
    L,
    norm_ptr,
    colsum_ptr,
    inv_n,
    gram_ptr,
    num_ptr,
    s_ptr,
    M_BUCKET,
    L_BUCKET,
    TOK_AXIS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    DOT_BF16: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One upper-triangular tile (I ≤ J) of M = V Vᵀ; ‖M‖²_F and trace(M) go straight into scalars."""
    t = tl.program_id(0)
    # Triangular index t -> (bi, bj), bi ≤ bj, t = bj(bj+1)/2 + bi; the float estimate is corrected.
    bj = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    bj = tl.where((bj + 1) * (bj + 2) // 2 <= t, bj + 1, bj)
    bj = tl.where(bj * (bj + 1) // 2 > t, bj - 1, bj)
    bi = t - bj * (bj + 1) // 2
    rows_i = bi.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rows_j = bj.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, L, BLOCK_K):
        ks = tl.arange(0, BLOCK_K).to(tl.int64) + k0
        # V[I, k]: BLOCK_M × BLOCK_K; V[J, k]ᵀ loaded directly as BLOCK_K × BLOCK_M (the transposed view).
        vi = _load_view(h_ptr, rows_i, ks, vs_r, vs_c, m, L, norm_ptr, colsum_ptr, inv_n,
                        TOK_AXIS, NORMALIZE, True)
        vj_t = _load_view(h_ptr, ks, rows_j, vs_c, vs_r, L, m, norm_ptr, colsum_ptr, inv_n,
                          1 - TOK_AXIS, NORMALIZE, True)
        acc = _mma(acc, vi, vj_t, DOT_BF16, EMULATE_BF16)
    weight = tl.where(bi == bj, 1.0, 2.0)
    tl.atomic_add(num_ptr, weight * tl.sum(acc * acc), sem="relaxed")
    mask = (rows_i[:, None] < m) & (rows_j[None, :] < m)
    tl.store(gram_ptr + rows_i[:, None] * m + rows_j[None, :], acc, mask=mask)
    if bi == bj:
        diag = rows_i[:, None] == rows_j[None, :]
        tl.atomic_add(s_ptr, tl.sum(tl.where(diag, acc, 0.0)), sem="relaxed")
    else:
        tl.store(gram_ptr + rows_j[None, :] * m + rows_i[:, None], acc, mask=mask)


@triton.jit
def _ipr_grad_kernel(
    h_ptr,
    vs_r,
    vs_c,
    m,
    L,
    norm_ptr,
    colsum_ptr,
    inv_n,
    gram_ptr,
    num_ptr,
    s_ptr,
    p_ptr,
    out_ptr,
    os_r,
    os_c,
    radial_ptr,
    M_BUCKET,
    L_BUCKET,
    TOK_AXIS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    DOT_BF16: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Tile of (4/s²)(M − P·s·I)·V = ∂P/∂Z (in the view's layout), plus partial row dots g_i·z_i."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(m, BLOCK_M)
    num_pid_n = tl.cdiv(L, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    num = tl.load(num_ptr)
    s = tl.load(s_ptr)
    p = num / (s * s)
    ps = p * s
    if pid == 0:
        tl.store(p_ptr, p)

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows < m
    cmask = cols < L
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, m, BLOCK_K):
        ks = tl.arange(0, BLOCK_K).to(tl.int64) + k0
        kmask = ks < m
        a = tl.load(gram_ptr + rows[:, None] * m + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        a = tl.where((rows[:, None] == ks[None, :]) & kmask[None, :], a - ps, a)
        b = _load_view(h_ptr, ks, cols, vs_r, vs_c, m, L, norm_ptr, colsum_ptr, inv_n,
                       TOK_AXIS, NORMALIZE, True)
        acc = _mma(acc, a, b, DOT_BF16, EMULATE_BF16)
    mask = rmask[:, None] & cmask[None, :]
    g = tl.where(mask, acc * (4.0 / (s * s)), 0.0)
    if NORMALIZE:
        z = _load_view(h_ptr, rows, cols, vs_r, vs_c, m, L, norm_ptr, colsum_ptr, inv_n,
                       TOK_AXIS, NORMALIZE, False)
        if TOK_AXIS == 0:
            tl.atomic_add(radial_ptr + rows, tl.sum(g * z, axis=1), mask=rmask, sem="relaxed")
        else:
            tl.atomic_add(radial_ptr + cols, tl.sum(g * z, axis=0), mask=cmask, sem="relaxed")
    tl.store(out_ptr + rows[:, None] * os_r + cols[None, :] * os_c, g, mask=mask)


@triton.jit
def _ipr_fixup_kernel(
    h_ptr,
    stride_n,
    stride_d,
    n,
    d,
    norm_ptr,
    radial_ptr,
    out_ptr,
    N_BUCKET,
    D_BUCKET,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """In place on the contiguous (n, d) gradient: (g − (g·z) z) / max(‖h‖, ε), g/ε for clamped rows."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    rmask = rows < n
    mask = rmask[:, None] & (cols[None, :] < d)
    nrm = tl.load(norm_ptr + rows, mask=rmask, other=1.0)
    radial = tl.load(radial_ptr + rows, mask=rmask, other=0.0)
    inv = 1.0 / tl.maximum(nrm, _EPS)
    x = tl.load(h_ptr + rows[:, None] * stride_n + cols[None, :] * stride_d, mask=mask, other=0.0)
    z = x.to(tl.float32) * inv[:, None]
    optr = out_ptr + rows[:, None] * d + cols[None, :]
    g = tl.load(optr, mask=mask, other=0.0)
    g = tl.where((nrm < _EPS)[:, None], g, g - radial[:, None] * z) * inv[:, None]
    tl.store(optr, g, mask=mask)


# --------------------------------------------------------------------------------------------------
# Autotuning (GPU) and the fixed interpreter configuration
# --------------------------------------------------------------------------------------------------


def _prune(size_keys: dict[str, str]):
    """Drop configs whose block is more than one power of two above the (bucketed) problem size."""

    def prune(configs, named_args, **kwargs):
        kept = []
        for cfg in configs:
            ok = True
            for block, size_arg in size_keys.items():
                size = named_args.get(size_arg) or kwargs.get(size_arg) or 1
                if cfg.kwargs[block] > max(16, 2 * triton.next_power_of_2(int(size))):
                    ok = False
            if ok:
                kept.append(cfg)
        # None fits (tiny problem): the config with the smallest blocks, the first block first.
        return kept or [min(configs, key=lambda c: tuple(c.kwargs[b] for b in size_keys))]

    return prune


def _cfg(num_warps=4, num_stages=3, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


_STATS_CONFIGS = [
    _cfg(BLOCK_N=16, BLOCK_D=256, num_warps=4, num_stages=2),
    _cfg(BLOCK_N=32, BLOCK_D=128, num_warps=4, num_stages=2),
    _cfg(BLOCK_N=32, BLOCK_D=256, num_warps=8, num_stages=2),
    _cfg(BLOCK_N=64, BLOCK_D=128, num_warps=8, num_stages=2),
]
# bf16 operands (16-bit input). Shared memory at num_stages (sm_90, from compiling each config):
# gram 128/64 ≈ 100 KB, grad 128×128×64 ≈ 99 KB, 128×64×64 ≈ 124 KB — all under the 227 KB limit.
_GRAM_CONFIGS_BF16 = [
    _cfg(BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_K=32, num_warps=8, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_K=32, num_warps=4, num_stages=4),
    _cfg(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=16, BLOCK_K=128, num_warps=4, num_stages=3),
]
_GRAD_CONFIGS_BF16 = [
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
]
# fp32 operands (3xTF32) need twice the shared memory per stage: BLOCK_K = 32 keeps them in budget
# (128×128×64 at 3 stages would need 263 KB).
_GRAM_CONFIGS_FP32 = [
    _cfg(BLOCK_M=128, BLOCK_K=32, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_K=32, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=16, BLOCK_K=128, num_warps=4, num_stages=2),
]
_GRAD_CONFIGS_FP32 = [
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
]
_FIXUP_CONFIGS = [
    _cfg(BLOCK_N=16, BLOCK_D=256, num_warps=4, num_stages=2),
    _cfg(BLOCK_N=32, BLOCK_D=128, num_warps=4, num_stages=2),
    _cfg(BLOCK_N=64, BLOCK_D=128, num_warps=8, num_stages=2),
]

#: Fixed meta-parameters used under ``TRITON_INTERPRET=1`` (autotuning is skipped there; big tiles
#: keep the Python interpreter fast). Tests may shrink them to exercise many tiles on small shapes.
INTERPRETER_CONFIGS: dict[str, dict[str, int]] = {
    "stats": {"BLOCK_N": 64, "BLOCK_D": 128},
    "gram": {"BLOCK_M": 64, "BLOCK_K": 64},
    "grad": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4},
    "fixup": {"BLOCK_N": 64, "BLOCK_D": 128},
}

_stats_tuned = triton.autotune(
    _STATS_CONFIGS, key=["N_BUCKET", "D_BUCKET", "NORMALIZE"], reset_to_zero=["colsum_ptr"],
    prune_configs_by={"early_config_prune": _prune({"BLOCK_N": "N_BUCKET", "BLOCK_D": "D_BUCKET"})},
)(_ipr_stats_kernel)
_GRAM_PRUNE = _prune({"BLOCK_M": "M_BUCKET", "BLOCK_K": "L_BUCKET"})
_GRAD_PRUNE = _prune({"BLOCK_M": "M_BUCKET", "BLOCK_N": "L_BUCKET", "BLOCK_K": "M_BUCKET"})
# One autotuner per operand precision (keyed by DOT_BF16), each with configs that fit shared memory.
_gram_tuned = {
    dot_bf16: triton.autotune(
        configs, key=["M_BUCKET", "L_BUCKET", "TOK_AXIS", "NORMALIZE"], reset_to_zero=["num_ptr", "s_ptr"],
        prune_configs_by={"early_config_prune": _GRAM_PRUNE},
    )(_ipr_gram_kernel)
    for dot_bf16, configs in ((True, _GRAM_CONFIGS_BF16), (False, _GRAM_CONFIGS_FP32))
}
_grad_tuned = {
    dot_bf16: triton.autotune(
        configs, key=["M_BUCKET", "L_BUCKET", "TOK_AXIS", "NORMALIZE"], reset_to_zero=["radial_ptr"],
        prune_configs_by={"early_config_prune": _GRAD_PRUNE},
    )(_ipr_grad_kernel)
    for dot_bf16, configs in ((True, _GRAD_CONFIGS_BF16), (False, _GRAD_CONFIGS_FP32))
}
_fixup_tuned = triton.autotune(
    _FIXUP_CONFIGS, key=["N_BUCKET", "D_BUCKET"],
    prune_configs_by={"early_config_prune": _prune({"BLOCK_N": "N_BUCKET", "BLOCK_D": "D_BUCKET"})},
)(_ipr_fixup_kernel)

INTERPRETED = _is_interpreted(_ipr_gram_kernel)


def _launch(raw, tuned, name: str, grid, *args, **constexprs) -> None:
    """Launch with the autotuner on a GPU, or with the fixed interpreter config under TRITON_INTERPRET."""
    if INTERPRETED:
        meta = dict(INTERPRETER_CONFIGS[name])
        raw[grid(meta)](*args, **constexprs, **meta)
    else:
        tuned[grid](*args, **constexprs)


def _bucket(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def ipr_triton(h: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ipr: ``(P, dP/dH)`` with P a 0-d fp32 tensor and dP/dH fp32 of h's shape (contiguous).

    Same contract as :func:`supple.kernels.covariance.ipr_reference`. ``h`` may be fp32, bf16 or fp16
    (other floating dtypes are converted to fp32) and non-contiguous (its strides are used as they
    are). No host synchronisation: P stays on the device.
    """
    if h.dim() != 2:
        raise ValueError(f"ipr expects a 2-D (tokens × features) tensor, got shape {tuple(h.shape)}")
    h = h.detach()
    if h.dtype not in _SUPPORTED:
        h = h.float()
    n, d = h.shape
    if n == 0 or d == 0:
        from .covariance import ipr_reference

        return ipr_reference(h, normalize)
    dev = h.device
    normalize = bool(normalize)
    rows_are_tokens = n <= d
    m, L = (n, d) if rows_are_tokens else (d, n)
    tok_axis = 0 if rows_are_tokens else 1
    s_n, s_d = h.stride()
    vs_r, vs_c = (s_n, s_d) if rows_are_tokens else (s_d, s_n)
    os_r, os_c = (d, 1) if rows_are_tokens else (1, d)

    # One zeroed fp32 buffer for everything accumulated atomically: [num, s, P | colsum (d) | radial (n)].
    # (radial is allocated even when unused: the autotuner zeroes it between trials, so it must not
    # alias a live buffer.)
    zeroed = torch.zeros(3 + d + n, dtype=torch.float32, device=dev)
    num, s, p = zeroed[0:1], zeroed[1:2], zeroed[2:3]
    colsum = zeroed[3 : 3 + d]
    radial = zeroed[3 + d :]
    norm = torch.empty(n, dtype=torch.float32, device=dev) if normalize else colsum
    gram = torch.empty((m, m), dtype=torch.float32, device=dev)
    out = torch.empty((n, d), dtype=torch.float32, device=dev)
    inv_n = 1.0 / n
    dot_bf16 = h.dtype != torch.float32
    nb, db, mb, lb = _bucket(n), _bucket(d), _bucket(m), _bucket(L)
    common = {"NORMALIZE": normalize}
    mm = {"TOK_AXIS": tok_axis, "NORMALIZE": normalize, "DOT_BF16": dot_bf16, "EMULATE_BF16": INTERPRETED}

    guard = torch.cuda.device(dev) if h.is_cuda else contextlib.nullcontext()
    with guard:
        _launch(_ipr_stats_kernel, _stats_tuned, "stats",
                lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),),
                h, s_n, s_d, n, d, norm, colsum, nb, db, **common)

        def gram_grid(meta):
            t = triton.cdiv(m, meta["BLOCK_M"])
            return (t * (t + 1) // 2,)

        _launch(_ipr_gram_kernel, _gram_tuned[dot_bf16], "gram", gram_grid,
                h, vs_r, vs_c, m, L, norm, colsum, inv_n, gram, num, s, mb, lb, **mm)
        _launch(_ipr_grad_kernel, _grad_tuned[dot_bf16], "grad",
                lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(L, meta["BLOCK_N"]),),
                h, vs_r, vs_c, m, L, norm, colsum, inv_n, gram, num, s, p, out, os_r, os_c, radial,
                mb, lb, **mm)
        if normalize:
            _launch(_ipr_fixup_kernel, _fixup_tuned, "fixup",
                    lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_D"])),
                    h, s_n, s_d, n, d, norm, radial, out, nb, db)
    return p.reshape(()), out


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile check (no GPU needed): every autotune config, for a given CUDA architecture
# --------------------------------------------------------------------------------------------------


def compile_for_arch(fn, types: dict[str, str], constexprs: dict, config: triton.Config, arch: int = 90):
    """Compile ``fn`` to a cubin for ``sm_<arch>`` without a GPU; returns Triton's compiled kernel.

    ``types`` maps every non-constexpr argument to a Triton signature type (``*bf16``, ``i32``, ...).
    Needs a process where Triton is *not* in interpreter mode (the interpreter patches triton.language).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _is_interpreted(fn):
        raise RuntimeError("compile_for_arch needs TRITON_INTERPRET unset (run it in a separate process)")
    meta = {**constexprs, **config.kwargs}
    signature = {name: ("constexpr" if name in meta else types[name]) for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in meta.items()})
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _ipr_types(fn, h_type: str) -> dict[str, str]:
    types = {}
    for name in fn.arg_names:
        if name == "h_ptr":
            types[name] = "*" + h_type
        elif name.endswith("_ptr"):
            types[name] = "*fp32"
        elif name == "inv_n":
            types[name] = "fp32"
        else:
            types[name] = "i64" if name.startswith(("stride", "vs_", "os_")) else "i32"
    return types


def compile_report(arch: int = 90, quick: bool = False, h_types: tuple[str, ...] = ("bf16", "fp32")):
    """Yield ``(kernel, variant, config kwargs, num_warps, num_stages, shared bytes)`` per compiled config.

    ``quick`` compiles only the first (largest) config of each kernel and variant; ``h_types`` are the
    input types (``bf16`` stands for both 16-bit types: fp16 shares the bf16-operand code path).
    """
    variants = []
    for h_type in h_types:
        dot_bf16 = h_type != "fp32"
        gram_cfgs = _GRAM_CONFIGS_BF16 if dot_bf16 else _GRAM_CONFIGS_FP32
        grad_cfgs = _GRAD_CONFIGS_BF16 if dot_bf16 else _GRAD_CONFIGS_FP32
        for tok in (0, 1):
            mm = {"TOK_AXIS": tok, "NORMALIZE": True, "DOT_BF16": dot_bf16, "EMULATE_BF16": False}
            variants.append((_ipr_gram_kernel, f"{h_type} tok_axis={tok}", h_type, mm, gram_cfgs))
            variants.append((_ipr_grad_kernel, f"{h_type} tok_axis={tok}", h_type, mm, grad_cfgs))
        variants.append((_ipr_stats_kernel, h_type, h_type, {"NORMALIZE": True}, _STATS_CONFIGS))
        variants.append((_ipr_fixup_kernel, h_type, h_type, {}, _FIXUP_CONFIGS))
    for fn, variant, h_type, constexprs, configs in variants:
        for cfg in configs[:1] if quick else configs:
            compiled = compile_for_arch(fn, _ipr_types(fn, h_type), constexprs, cfg, arch)
            yield fn.__name__, variant, dict(cfg.kwargs), cfg.num_warps, cfg.num_stages, compiled.metadata.shared
