"""Checks 1–2 of ``gpu_check.py``: Triton vs torch reference numerics, and fwd+bwd speed with bandwidth.

Needs only torch (and triton for the kernels). The Triton modules are imported lazily, so that
``gpu_check.py --dry-run`` can switch on Triton's interpreter before they are first imported.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
from _gpu_common import DTYPES, dtype_name, load_bench, section, time_ms

from supple.kernels.covariance import NORM_EPS, ipr, ipr_reference
from supple.kernels.orthogonality import orthogonality_reference

# Tolerances, paired with the input dtype. Same values as tests/test_kernels_triton.py (that module cannot be
# imported here: it switches on Triton's interpreter). ipr: (P relative error, gradient error on the ∂P/∂z
# scale relative to the largest term of ∂P/∂Z); orthogonality: (value relative error, gradient error relative
# to the largest gradient entry). A case also passes when Triton is no further from a float64 evaluation than
# 2× the reference is (at n = d = 4096 fp32 rounding of either side can exceed the small-shape tolerances).
IPR_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-3, 3e-2), torch.float16: (2e-3, 3e-2)}
ORTHO_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-4, 1.6e-2), torch.float16: (1e-4, 2e-3)}

# Llama-3-8B: n = 4096 tokens × d = 4096; LoRA r16 on q,k,v,o,gate,up (d_in 4096, 6 × 32 = 192 modules) and
# down (d_in 14336, 32 modules): 224 modules in two shape groups, as the callback stacks them.
LLAMA_STACKS = ((192, 16, 4096), (32, 16, 14336))
GPU_IPR_CASES = [(4096, 4096, True), (4096, 4096, False), (77, 123, True), (77, 123, False), (1000, 123, True),
                 (4096, 14336, True)]
GPU_ORTHO_CASES = [(*LLAMA_STACKS[0], 16), (*LLAMA_STACKS[1], 16), (*LLAMA_STACKS[0], None),
                   (3, 5, 123, 7), (5, 1, 77, 3), (3, 16, 123, None), (3, 33, 123, 40)]
DRY_IPR_CASES = [(77, 123, True), (40, 24, False)]
DRY_ORTHO_CASES = [(3, 5, 123, 7), (2, 4, 40, None)]

# Peak HBM bandwidth (GB/s) and dense bf16 tensor-core rate (TFLOP/s) by device name, most specific first.
# None: the name is ambiguous (GH200 comes with 4.0 or 4.9 TB/s), pass --peak-gbps.
PEAKS: list[tuple[str, float | None, float | None]] = [
    ("GH200", None, 989.0), ("H200", 4800.0, 989.0), ("H100 NVL", 3900.0, 835.0), ("H100 PCIe", 2000.0, 756.0),
    ("H100", 3350.0, 989.0), ("H800", 3350.0, 989.0), ("A100-SXM4-80GB", 2039.0, 312.0),
    ("A100 80GB PCIe", 1935.0, 312.0), ("A100", 1555.0, 312.0), ("L40S", 864.0, 362.0), ("A10G", 600.0, 70.0),
    ("L4", 300.0, 121.0), ("RTX 4090", 1008.0, 165.0),
]


def device_peaks(name: str, peak_gbps: float | None = None, peak_tflops: float | None = None
                 ) -> tuple[float | None, float | None]:
    """(GB/s, bf16 TFLOP/s) for a device name (``torch.cuda.get_device_name``); overrides win; None if unknown."""
    bw = tf = None
    for key, gbps, tflops in PEAKS:
        if key.lower() in name.lower():
            bw, tf = gbps, tflops
            break
    return (peak_gbps if peak_gbps else bw), (peak_tflops if peak_tflops else tf)


def triton_impls(device: torch.device) -> tuple[Callable | None, Callable | None, str]:
    """``(ipr_triton, orthogonality_triton, how)``; None where Triton cannot run on ``device``."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return None, None, "no Triton on CPU without TRITON_INTERPRET=1"
    try:
        from supple.kernels._triton_covariance import ipr_triton
        from supple.kernels._triton_orthogonality import orthogonality_triton
    except Exception as exc:  # triton missing or broken
        return None, None, f"Triton unavailable ({type(exc).__name__}: {exc})"
    return ipr_triton, orthogonality_triton, "interpreter" if device.type != "cuda" else "compiled"


@contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# ------------------------------------------------------------------------------------------------ numerics
def _hidden(n: int, d: int, seed: int) -> torch.Tensor:
    """Anisotropic token states (a rank-8 component on top of noise), one massive row and one zero row."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen) + 2.0 * torch.randn(n, 8, generator=gen) @ torch.randn(8, d, generator=gen) / 8
    if n > 4:
        h[0] *= 30.0  # an attention-sink-like row
        h[1] = 0.0  # under the norm clamp
    return h + 0.3


def ipr_float64(h: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 oracle: P and ∂P/∂H by autograd on the textbook formula (the clamped-norm rule comes with it)."""
    with torch.enable_grad():
        x = h.detach().double().requires_grad_(True)
        z = x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS) if normalize else x
        zc = z - z.mean(dim=0, keepdim=True)
        m = zc @ zc.T if zc.shape[0] <= zc.shape[1] else zc.T @ zc
        p = (m * m).sum() / torch.diagonal(m).sum() ** 2
        (g,) = torch.autograd.grad(p, x)
    return p.detach(), g


def _ipr_grad_scale(h: torch.Tensor, normalize: bool) -> tuple[float, torch.Tensor]:
    """Largest entry of (4/s²)·Zc·ZcᵀZc (the terms ∂P/∂Z is a difference of) and the row denominators."""
    x = h.detach().double()
    den = x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS) if normalize else torch.ones_like(x[:, :1])
    zc = x / den
    zc = zc - zc.mean(dim=0, keepdim=True)
    s = (zc * zc).sum()
    term = zc @ (zc.T @ zc) if zc.shape[0] >= zc.shape[1] else (zc @ zc.T) @ zc
    return float((4.0 / (s * s)) * term.abs().max()), den


def _verdict(err: float, tol: float, err_64: float, ref_64: float) -> bool:
    return bool(err <= tol or (math.isfinite(err_64) and err_64 <= 2.0 * ref_64 + 1e-12))


def ipr_case(n: int, d: int, normalize: bool, dtype: torch.dtype, device: torch.device, fn: Callable,
             tol_scale: float = 1.0) -> dict:
    """``fn`` (Triton) vs ``ipr_reference`` (and both vs float64): value, gradient, and the autograd path."""
    h = _hidden(n, d, seed=n * 7 + d).to(device=device, dtype=dtype)
    p_t, g_t = fn(h, normalize)
    p_r, g_r = ipr_reference(h, normalize)
    p_x, g_x = ipr_float64(h, normalize)
    scale, den = _ipr_grad_scale(h, normalize)

    def v_err(a, b):
        return float((a.double() - b.double()).abs() / b.double().abs())

    def g_err(a, b):
        return float(((a.double() - b.double()) * den).abs().max()) / scale

    hg = h.detach().clone().requires_grad_(True)  # the autograd Function (dispatch: Triton on CUDA)
    (2.0 * ipr(hg, normalize)).backward()
    # Its gradient comes back in h's dtype; rows under the norm clamp (g/ε, ~1e4 here) can exceed fp16's
    # range by design, so the autograd path is compared on the other rows.
    live = (h.detach().double().norm(dim=1) >= NORM_EPS) if normalize else torch.ones(n, dtype=torch.bool)
    live = live.to(device)
    auto_err = float(((hg.grad.double() / 2.0 - g_r.double()) * den)[live].abs().max()) / scale
    v_tol, g_tol = (t * tol_scale for t in IPR_TOL[dtype])
    row = {"op": "ipr", "shape": f"{n}x{d}", "dtype": dtype_name(dtype), "variant": f"normalize={normalize}",
           "value_err": v_err(p_t, p_r), "value_tol": v_tol, "value_err_f64": v_err(p_t, p_x),
           "ref_value_err_f64": v_err(p_r, p_x), "grad_err": g_err(g_t, g_r), "grad_tol": g_tol,
           "grad_err_f64": g_err(g_t, g_x), "ref_grad_err_f64": g_err(g_r, g_x), "autograd_grad_err": auto_err,
           "finite": bool(torch.isfinite(p_t) and torch.isfinite(g_t).all())}
    row["passed"] = bool(row["finite"] and auto_err <= g_tol + 2e-3 * (dtype != torch.float32)
                         and _verdict(row["value_err"], v_tol, row["value_err_f64"], row["ref_value_err_f64"])
                         and _verdict(row["grad_err"], g_tol, row["grad_err_f64"], row["ref_grad_err_f64"]))
    return row


def ortho_float64(a: torch.Tensor, u: torch.Tensor | None, w: torch.Tensor):
    """Float64 oracle of intra/cross and the weighted loss's gradients, by autograd."""
    with torch.enable_grad():
        a64 = a.detach().double().requires_grad_(True)
        u64 = u.detach().double().requires_grad_(True) if u is not None else None
        r = a.shape[1]
        ah = a64 / a64.norm(dim=2, keepdim=True).clamp_min(NORM_EPS)
        g = ah @ ah.transpose(1, 2)
        intra = ((g * g).sum((1, 2)) - (torch.diagonal(g, dim1=1, dim2=2) ** 2).sum(1)) / max(r * (r - 1), 1)
        cross = ((ah @ u64) ** 2).sum((1, 2)) / r if u64 is not None else None
        loss = (w.double() * intra).sum() + ((w.flip(0).double() * cross).sum() if cross is not None else 0.0)
        grads = torch.autograd.grad(loss, [a64] + ([u64] if u64 is not None else []))
    return intra, cross, grads[0], (grads[1] if u is not None else None)


def _run_ortho(op: Callable, a: torch.Tensor, u: torch.Tensor | None, w: torch.Tensor):
    a_ = a.detach().clone().requires_grad_(True)
    u_ = u.detach().clone().requires_grad_(True) if u is not None else None
    intra, cross = op(a_, u_)
    loss = (w * intra).sum() + ((w.flip(0) * cross).sum() if cross is not None else 0.0)
    if loss.requires_grad:  # the reference's intra is a constant when r == 1 and there is no U
        loss.backward()
    ga = a_.grad if a_.grad is not None else torch.zeros_like(a_)
    return intra, cross, ga, (u_.grad if u_ is not None else None)


def ortho_case(m: int, r: int, d_in: int, k: int | None, dtype: torch.dtype, device: torch.device, fn: Callable,
               tol_scale: float = 1.0) -> dict:
    """``fn`` (Triton) vs ``orthogonality_reference`` on a stack (m, r, d_in), bases (m, d_in, k) or none."""
    gen = torch.Generator().manual_seed(m * 31 + r * 7 + d_in)
    a = (torch.randn(m, r, d_in, generator=gen) * 0.02).to(device=device, dtype=dtype)
    u = None
    if k is not None:
        q = torch.linalg.qr(torch.randn(m, d_in, min(k, d_in), generator=gen, dtype=torch.float64))[0]
        u = torch.zeros(m, d_in, k, dtype=torch.float64)
        u[..., : q.shape[-1]] = q
        u = u.to(device=device, dtype=dtype)
    w = torch.linspace(-1.0, 2.0, m, device=device)
    t, ref, x = _run_ortho(fn, a, u, w), _run_ortho(orthogonality_reference, a, u, w), ortho_float64(a, u, w)

    def rel(p, q):
        return float((p.double() - q.double()).abs().max() / q.double().abs().max().clamp_min(1e-30))

    v_tol, g_tol = (tv * tol_scale for tv in ORTHO_TOL[dtype])
    # fp32 rounding floor of ∂L/∂A's terms, |w|·O(1)/‖a_i‖, relative to the largest gradient entry
    floor = 1e-5 * float(w.abs().max()) / float(a.float().norm(dim=2).clamp_min(1e-6).min())
    g_tol_a = g_tol + floor / max(float(ref[2].double().abs().max()), 1e-30)
    vals = [(0, "intra")] + ([(1, "cross")] if u is not None else [])
    v_err = max(rel(t[i], ref[i]) for i, _ in vals)
    v_64 = max(rel(t[i], x[i]) for i, _ in vals)
    v_ref64 = max(rel(ref[i], x[i]) for i, _ in vals)
    g_err, g_64, g_ref64 = rel(t[2], ref[2]), rel(t[2], x[2]), rel(ref[2], x[2])
    row = {"op": "orthogonality", "shape": f"{m}x{r}x{d_in}", "dtype": dtype_name(dtype),
           "variant": f"k={k}" if k is not None else "intra only", "value_err": v_err, "value_tol": v_tol,
           "value_err_f64": v_64, "ref_value_err_f64": v_ref64, "grad_err": g_err, "grad_tol": g_tol_a,
           "grad_err_f64": g_64, "ref_grad_err_f64": g_ref64,
           "finite": bool(torch.isfinite(t[0]).all() and torch.isfinite(t[2]).all())}
    ok = row["finite"] and _verdict(v_err, v_tol, v_64, v_ref64) and _verdict(g_err, g_tol_a, g_64, g_ref64)
    if u is not None:
        row["grad_u_err"] = rel(t[3], ref[3])
        row["grad_u_err_f64"], row["ref_grad_u_err_f64"] = rel(t[3], x[3]), rel(ref[3], x[3])
        ok = ok and _verdict(row["grad_u_err"], g_tol + 1e-6, row["grad_u_err_f64"], row["ref_grad_u_err_f64"])
    row["passed"] = bool(ok)
    return row


def numerics_plan(dry_run: bool) -> list[str]:
    """What check 1 measures (on the GPU, or here in a dry run)."""
    ipr_cases = DRY_IPR_CASES if dry_run else GPU_IPR_CASES
    ortho_cases = DRY_ORTHO_CASES if dry_run else GPU_ORTHO_CASES
    return [f"ipr {n}x{d} normalize={nm}: value, gradient, autograd path; fp32/bf16/fp16" for n, d, nm in ipr_cases] + [
        f"orthogonality {m}x{r}x{d_in} " + (f"k={k}: intra, cross, dA, dU" if k else "intra only: intra, dA")
        + "; fp32/bf16/fp16"
        for m, r, d_in, k in ortho_cases]


def check_numerics(device: torch.device, dry_run: bool, tol_scale: float = 1.0, deadline: float = math.inf,
                   log=print) -> dict:
    """Check 1. Triton vs reference at Llama-8B and odd shapes (dry run: small shapes, interpreter); cases
    not started by ``deadline`` (``time.perf_counter()``) are listed as not run."""
    ipr_fn, ortho_fn, how = triton_impls(device)
    compared = "Triton" if ipr_fn is not None else "reference (no Triton)"
    ipr_fn = ipr_fn or ipr_reference
    ortho_fn = ortho_fn or orthogonality_reference
    rows, not_run = [], []
    forced = "triton" if (how == "interpreter") else None  # the autograd path through Triton on CPU too
    ipr_cases = DRY_IPR_CASES if dry_run else GPU_IPR_CASES
    ortho_cases = DRY_ORTHO_CASES if dry_run else GPU_ORTHO_CASES
    # case-major, ipr and orthogonality alternating, Llama shapes first: what a cut by the time budget drops
    # is the least important
    jobs = [("ipr", c) for c in ipr_cases] + [("orthogonality", c) for c in ortho_cases]
    jobs.sort(key=lambda j: (ipr_cases if j[0] == "ipr" else ortho_cases).index(j[1]))
    with _env("SUPPLE_KERNELS", forced):
        for op, case in jobs:
            for dtype in DTYPES.values():
                label = f"{op} {'x'.join(str(x) for x in case if not isinstance(x, bool))} {dtype_name(dtype)}"
                if time.perf_counter() > deadline:
                    not_run.append(label)
                    continue
                if op == "ipr":
                    rows.append(ipr_case(*case, dtype, device, ipr_fn, tol_scale))
                else:
                    rows.append(ortho_case(*case, dtype, device, ortho_fn, tol_scale))
                log(_numerics_line(rows[-1]))
    bad = [r for r in rows if not r["passed"]]
    if not rows:
        return section("numerics", "skipped", f"time budget spent before the first case ({len(not_run)} not run)",
                       not_run=not_run)
    summary = (f"{len(rows) - len(bad)}/{len(rows)} cases within tolerance ({compared} vs torch reference, "
               f"{how}, on {device.type})")
    if not_run:
        summary += f"; {len(not_run)} cases not run (time budget)"
    if bad:
        summary += "; FAILED: " + ", ".join(f"{r['op']} {r['shape']} {r['dtype']} {r['variant']}" for r in bad[:6])
    return section("numerics", "fail" if bad else "pass", summary, rows, compared=compared, triton=how,
                   not_run=not_run)


def _numerics_line(r: dict) -> str:
    return (f"  {'ok  ' if r['passed'] else 'FAIL'} {r['op']:13s} {r['shape']:>13s} {r['dtype']:4s} {r['variant']:17s} "
            f"value {r['value_err']:.1e} (tol {r['value_tol']:.0e}, vs f64 {r['value_err_f64']:.1e}, ref vs f64 "
            f"{r['ref_value_err_f64']:.1e})  grad {r['grad_err']:.1e} (tol {r['grad_tol']:.1e}, vs f64 "
            f"{r['grad_err_f64']:.1e}, ref {r['ref_grad_err_f64']:.1e})")


# --------------------------------------------------------------------------------------------------- speed
def ipr_cost(n: int, d: int, elem: int, normalize: bool = True) -> tuple[float, float]:
    """(HBM bytes, FLOPs) of the fused ipr as designed (``_triton_covariance`` docstring): H read by every
    kernel, the fp32 m×m matrix written and read, the fp32 gradient written (and re-read by the fixup)."""
    m, big = min(n, d), max(n, d)
    reads_h = 3 + int(normalize)
    byts = reads_h * n * d * elem + 2 * 4 * m * m + 4 * n * d * (1 + 2 * int(normalize))
    return float(byts), float(3 * m * m * big)


def ortho_cost(m: int, r: int, d_in: int, k: int | None, elem: int) -> tuple[float, float]:
    """(HBM bytes, FLOPs) of forward + backward (dA only): read A (+U) twice, write dA."""
    a = m * r * d_in * elem
    u = m * d_in * k * elem if k else 0
    return float(3 * a + 2 * u), float(4 * m * r * d_in * (r + (k or 0)))


def speed_plan(dry_run: bool) -> list[tuple]:
    """Speed cases: ("ipr", n, d, dtype) and ("orthogonality", stacks, k, dtype)."""
    if dry_run:
        return [("ipr", 256, 128, torch.float32), ("orthogonality", ((4, 4, 64), (2, 4, 96)), 4, torch.float32)]
    return [("ipr", 4096, 4096, torch.bfloat16), ("ipr", 4096, 4096, torch.float32), ("ipr", 1024, 576, torch.bfloat16),
            ("orthogonality", LLAMA_STACKS, 16, torch.bfloat16), ("orthogonality", LLAMA_STACKS, 16, torch.float32)]


def _describe(case: tuple) -> str:
    if case[0] == "ipr":
        return f"ipr {case[1]}x{case[2]} {dtype_name(case[3])}"
    stacks = "+".join(f"{m}x{r}x{d}" for m, r, d in case[1])
    return f"orthogonality {stacks} k={case[2]} {dtype_name(case[3])}"


def check_speed(device: torch.device, dry_run: bool, peak_gbps: float | None, peak_tflops: float | None,
                compile_ref: bool, warmup: int, repeats: int, deadline: float = math.inf, log=print) -> dict:
    """Check 2. Forward+backward time of Triton, the reference and ``torch.compile(reference)``; bandwidth.
    Cases not started by ``deadline`` are listed as not run."""
    kb = load_bench("kernel_speed")
    ipr_fn, ortho_fn, how = triton_impls(device)
    timed_triton = device.type == "cuda" and ipr_fn is not None  # interpreter timings mean nothing
    rows, not_run = [], []
    for case in speed_plan(dry_run):
        if time.perf_counter() > deadline:
            not_run.append(_describe(case))
            continue
        op, dtype = case[0], case[-1]
        elem = torch.finfo(dtype).bits // 8
        gen = torch.Generator().manual_seed(3)
        if op == "ipr":
            _, n, d, _ = case
            h = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
            byts, flops = ipr_cost(n, d, elem)
            impls = {"reference": ipr_reference}
            if compile_ref:
                impls["compile"] = kb._compiled(ipr_reference)
            if timed_triton:
                impls["triton"] = ipr_fn
            calls = {name: (lambda f=f, h=h: f(h, True)) for name, f in impls.items()}
        else:
            _, stacks, k, _ = case
            data = []
            byts = flops = 0.0
            for m, r, d_in in stacks:
                a = (torch.randn(m, r, d_in, generator=gen) * 0.02).to(device=device, dtype=dtype)
                u = torch.linalg.qr(torch.randn(m, d_in, k, generator=gen))[0].to(device=device, dtype=dtype)
                data.append((a, u))
                b, f = ortho_cost(m, r, d_in, k, elem)
                byts, flops = byts + b, flops + f
            impls = {"reference": orthogonality_reference}
            if compile_ref:
                impls["compile"] = kb._compiled(orthogonality_reference)
            if timed_triton:
                impls["triton"] = ortho_fn
            steps = {name: kb._ortho_step(f) for name, f in impls.items()}
            calls = {name: (lambda s=s, data=data: [s(a, u) for a, u in data]) for name, s in steps.items()}
        roof_ms = None
        if peak_gbps:
            mult = 1.0 if dtype != torch.float32 else 6.0  # fp32: 3×TF32 MMAs at half the bf16 rate
            t_mem = byts / (peak_gbps * 1e9)
            t_cmp = flops * mult / (peak_tflops * 1e12) if peak_tflops else 0.0
            roof_ms = max(t_mem, t_cmp) * 1e3
        times = {}
        for name, call in calls.items():
            try:
                med, best = time_ms(call, device, warmup, repeats)
            except Exception as exc:  # e.g. torch.compile without a working compiler
                log(f"  {_describe(case)} {name}: failed ({type(exc).__name__}: {str(exc)[:160]})")
                continue
            times[name] = med
            gbps = byts / (med * 1e-3) / 1e9
            rows.append({"case": _describe(case), "impl": name, "median_ms": med, "min_ms": best, "bytes": byts,
                         "flops": flops, "achieved_gbps": gbps, "achieved_tflops": flops / (med * 1e-3) / 1e12,
                         "bandwidth_fraction": gbps / peak_gbps if peak_gbps else None,
                         "roofline_ms": roof_ms, "roofline_fraction": roof_ms / med if roof_ms else None})
            log(f"  {_describe(case):48s} {name:9s} {med:9.3f} ms (min {best:.3f}); {gbps:8.1f} GB/s"
                + (f" = {gbps / peak_gbps:.0%} of peak" if peak_gbps else ""))
        for r in rows:
            if r["case"] == _describe(case) and "triton" in times:
                r["speedup_vs"] = {k2: v / times["triton"] for k2, v in times.items() if k2 != "triton"}
    skipped = [] if timed_triton else [f"Triton not timed ({how if device.type == 'cuda' else 'no CUDA'})"]
    if not compile_ref:
        skipped.append("torch.compile not timed")
    if not_run:
        skipped.append(f"{len(not_run)} cases not run (time budget)")
    summary = f"{len(rows)} timings over {len(speed_plan(dry_run))} cases on {device.type}"
    if skipped:
        summary += " (" + "; ".join(skipped) + ")"
    return section("speed", "info" if rows else "skipped", summary, rows, peak_gbps=peak_gbps,
                   peak_tflops=peak_tflops, not_run=not_run)


def speed_goals(speed: dict) -> list[dict]:
    """Goals 1–2 of the issue from the speed rows (None where not measured)."""
    rows = speed.get("rows", [])

    def find(case: str, impl: str) -> dict | None:
        return next((r for r in rows if r["case"] == case and r["impl"] == impl), None)

    tri, comp = find("ipr 4096x4096 bf16", "triton"), find("ipr 4096x4096 bf16", "compile")
    ratio = comp["median_ms"] / tri["median_ms"] if tri and comp else None
    orth = find(_describe(("orthogonality", LLAMA_STACKS, 16, torch.bfloat16)), "triton")
    frac = orth["bandwidth_fraction"] if orth else None
    return [
        {"goal": "ipr fwd+bwd at n=d=4096 (bf16): Triton >= 1.5x torch.compile(reference)", "value": ratio,
         "target": 1.5, "met": None if ratio is None else ratio >= 1.5},
        {"goal": "orthogonality fwd+bwd, 224 modules (bf16, k=16): >= 60% of HBM peak", "value": frac,
         "target": 0.6, "met": None if frac is None else frac >= 0.6},
    ]
