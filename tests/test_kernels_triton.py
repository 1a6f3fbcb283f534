"""Triton kernels vs the torch references, on CPU under Triton's interpreter.

Run this file in its own pytest process, with the interpreter switched on before anything imports
Triton kernels (they are compiled or interpreted when they are decorated, at import time):

    TRITON_INTERPRET=1 python -m pytest -m triton tests/test_kernels_triton.py

The module also sets ``TRITON_INTERPRET=1`` itself before importing triton and the kernels (and puts
the previous value back right after, so test modules collected later see the environment they
expect). When the kernels were already imported without the interpreter in this process (a plain
``pytest tests`` run that imported them earlier), the whole module is skipped. Deselect it from a
plain run with ``-m "not triton"``.

Besides values and gradients, ``test_kernels_compile_for_h100`` compiles each kernel for sm_90 in a
subprocess (no GPU needed; Triton ships ptxas) and checks the shared memory fits an H100.
"""

from __future__ import annotations

import os

_SAVED_ENV = {name: os.environ.get(name) for name in ("TRITON_INTERPRET", "OPENBLAS_NUM_THREADS")}
os.environ["TRITON_INTERPRET"] = "1"
# The interpreter runs tl.dot through numpy; a multi-threaded BLAS on a busy 2-core runner is ~50×
# slower on these small tiles than a single thread.
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

_IMPORT_ERROR: Exception | None = None
try:
    import triton  # noqa: E402, F401

    from supple.kernels import _triton_covariance as tcov  # noqa: E402
    from supple.kernels import _triton_orthogonality as tort  # noqa: E402
except Exception as exc:  # triton missing or broken: skip below
    _IMPORT_ERROR = exc
    tcov = tort = None
finally:
    for _name, _value in _SAVED_ENV.items():
        if _value is None:
            os.environ.pop(_name, None)
        else:
            os.environ[_name] = _value

from supple.kernels.covariance import ipr, ipr_reference, ipr_value_and_grad  # noqa: E402
from supple.kernels.dispatch import use_triton  # noqa: E402
from supple.kernels.orthogonality import lora_orthogonality, orthogonality_reference  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    # n = 1 (and zero rows) make numpy divide by zero inside the interpreter: NaN/inf is the expected result.
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]

if _IMPORT_ERROR is not None:
    pytest.skip(f"Triton kernels unavailable: {_IMPORT_ERROR!r}", allow_module_level=True)
if not (tcov.INTERPRETED and tort.INTERPRETED):
    pytest.skip(
        "the Triton kernels were imported without TRITON_INTERPRET=1 earlier in this process; run "
        "`TRITON_INTERPRET=1 python -m pytest -m triton tests/test_kernels_triton.py` on its own",
        allow_module_level=True,
    )

REPO = Path(__file__).resolve().parents[1]
H100_SMEM = 232448  # bytes of shared memory one block may use on sm_90

# (P relative tolerance, gradient tolerance relative to the largest term of ∂P/∂Z; see _check_ipr).
# 16-bit inputs run tl.dot on bf16-rounded operands (fp32 accumulation), hence ~2^-9-level errors.
IPR_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-3, 3e-2), torch.float16: (2e-3, 3e-2)}
# (value rtol, gradient tolerance relative to the largest gradient entry): gradients come back in
# A's dtype, so bf16/fp16 differ by an ulp of the output.
ORTHO_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-4, 1.6e-2), torch.float16: (1e-4, 2e-3)}


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.delenv("SUPPLE_KERNELS", raising=False)


@pytest.fixture
def tiles(monkeypatch):
    """Set the interpreter's fixed tile sizes for one test: ``tiles(16)`` or ``tiles(128)``."""

    def set_tiles(block: int) -> None:
        configs = {
            "stats": {"BLOCK_N": block, "BLOCK_D": 2 * block},
            "gram": {"BLOCK_M": block, "BLOCK_K": block},
            "grad": {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_K": block, "GROUP_M": 2},
            "fixup": {"BLOCK_N": block, "BLOCK_D": 2 * block},
        }
        monkeypatch.setattr(tcov, "INTERPRETER_CONFIGS", configs)

    return set_tiles


# --------------------------------------------------------------------------------------------------
# ipr
# --------------------------------------------------------------------------------------------------


def _ipr_scale(h: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64: the largest entry of (4/s²)·Zc·ZcᵀZc (the terms ∂P/∂Z is a difference of) and the row
    denominators max(‖h_i‖, ε) (1 without normalization)."""
    x = h.detach().double()
    den = x.norm(dim=1, keepdim=True).clamp_min(1e-6) if normalize else torch.ones_like(x[:, :1])
    z = x / den
    zc = z - z.mean(dim=0, keepdim=True)
    s = (zc * zc).sum()
    term = (4.0 / (s * s)) * (zc @ (zc.T @ zc))
    return term.abs().max(), den


def _check_ipr(h: torch.Tensor, normalize: bool, p: torch.Tensor, g: torch.Tensor) -> None:
    p_ref, g_ref = ipr_reference(h, normalize)
    assert p.shape == () and p.dtype == torch.float32
    assert g.shape == h.shape and g.dtype == torch.float32
    if h.shape[0] < 2:
        assert torch.isnan(p_ref) and torch.isnan(p)
        assert torch.isnan(g_ref).all() and torch.isnan(g).all()
        return
    p_tol, g_tol = IPR_TOL[h.dtype]
    torch.testing.assert_close(p, p_ref, rtol=p_tol, atol=0.0)
    scale, den = _ipr_scale(h, normalize)
    # Compare ∂P/∂h·max(‖h‖, ε) (i.e. on the scale of ∂P/∂z) against the size of the terms: for n = 2,
    # P ≡ 1 and the gradient is zero up to rounding of terms of size `scale`.
    err = ((g.double() - g_ref.double()) * den).abs().max()
    assert torch.isfinite(g).all()
    assert err <= g_tol * scale, f"max error {err:.3e} > {g_tol:.0e} × term scale {scale:.3e}"


# n ∈ {1, 2, 77, 1000} × d ∈ {8, 123, 576}: n < d and n > d, every size a masked tail of the tiles.
# The interpreter's cost grows with programs × ops, so (1000, 576) runs once per dtype family.
FP32_CASES = [(n, d, norm) for n in (1, 2, 77, 1000) for d in (8, 123, 576) for norm in (True, False)
              if (n, d, norm) != (1000, 576, False)]
HALF_CASES = [(n, d, norm) for n in (2, 77, 1000) for d in (8, 123, 576) for norm in (True, False)
              if (n, d) != (1000, 576)] + [(1, 123, True), (1000, 576, True)]


def _big_tiles_if_large(n: int, d: int, tiles) -> None:
    if n * d >= 40_000:
        tiles(128)  # fewer, larger programs (tails stay masked: 123, 576 and 1000 are not multiples)


@pytest.mark.parametrize("n,d,normalize", FP32_CASES)
def test_ipr_fp32(n, d, normalize, tiles):
    _big_tiles_if_large(n, d, tiles)
    h = torch.randn(n, d, generator=torch.Generator().manual_seed(n * 1000 + d)) * 3.0 + 0.5
    p, g = tcov.ipr_triton(h, normalize)
    _check_ipr(h, normalize, p, g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,normalize", HALF_CASES)
def test_ipr_half(n, d, normalize, dtype, tiles):
    if dtype == torch.float16 and (n, d) in ((1, 123), (1000, 576)):
        pytest.skip("covered by the bf16 case (same code path)")
    _big_tiles_if_large(n, d, tiles)
    h = (torch.randn(n, d, generator=torch.Generator().manual_seed(7 * n + d)) + 0.3).to(dtype)
    p, g = tcov.ipr_triton(h, normalize)
    _check_ipr(h, normalize, p, g)


@pytest.mark.parametrize("n,d,normalize", [(40, 70, True), (70, 40, False), (70, 40, True)])
def test_ipr_many_tiles(n, d, normalize, tiles):
    """16-wide tiles: several triangular Gram tiles, mirrored stores, grouped grad ordering, tails."""
    tiles(16)
    h = torch.randn(n, d, generator=torch.Generator().manual_seed(11))
    p, g = tcov.ipr_triton(h, normalize)
    _check_ipr(h, normalize, p, g)


def _noncontiguous(kind: str, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    if kind == "transposed_n_lt_d":  # (77, 123), strides (1, 77)
        h = torch.randn(123, 77, generator=gen).to(dtype).T
    elif kind == "transposed_n_gt_d":  # (300, 8), strides (1, 300)
        h = torch.randn(8, 300, generator=gen).to(dtype).T
    else:  # strided slice (80, 133), strides (800, 3)
        h = torch.randn(160, 400, generator=gen).to(dtype)[::2, 1::3]
    assert not h.is_contiguous()
    return h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["transposed_n_lt_d", "transposed_n_gt_d", "strided_slice"])
def test_ipr_noncontiguous(kind, dtype):
    h = _noncontiguous(kind, dtype)
    p, g = tcov.ipr_triton(h, True)
    _check_ipr(h, True, p, g)


def test_ipr_clamped_and_massive_rows():
    """Rows under the 1e-6 norm clamp keep g/ε (reference rule); a 10⁴× 'attention sink' row is fine."""
    h = torch.randn(77, 123, generator=torch.Generator().manual_seed(2))
    h[5] = 0.0
    h[9] = 1e-8
    h[0] *= 1e4
    for normalize in (True, False):
        p, g = tcov.ipr_triton(h, normalize)
        _check_ipr(h, normalize, p, g)


# --------------------------------------------------------------------------------------------------
# orthogonality
# --------------------------------------------------------------------------------------------------


def _bases(m: int, d_in: int, k: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """(m, d_in, k) with orthonormal columns; columns beyond d_in are zero (padding)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(m, d_in, min(k, d_in), generator=gen, dtype=torch.float64))[0]
    u = torch.zeros(m, d_in, k, dtype=torch.float64)
    u[..., : q.shape[-1]] = q
    return u.to(dtype)


def _check_orthogonality(a: torch.Tensor, u: torch.Tensor | None, fn=None) -> None:
    """Values and gradients (w.r.t. A and U) of ``fn`` (default: the Triton op) vs the reference."""
    fn = fn or tort.orthogonality_triton
    m = a.shape[0]
    w = torch.linspace(-1.0, 2.0, m)
    v_tol, g_tol = ORTHO_TOL[a.dtype]
    results = []
    for op in (fn, orthogonality_reference):
        a_ = a.detach().clone().requires_grad_(True)
        u_ = u.detach().clone().requires_grad_(True) if u is not None else None
        intra, cross = op(a_, u_)
        loss = (w * intra).sum() + ((w.flip(0) * cross).sum() if cross is not None else 0.0)
        if loss.requires_grad:  # the reference's intra is a constant when r == 1 and there is no U
            loss.backward()
        ga = a_.grad if a_.grad is not None else torch.zeros_like(a_)
        gu = u_.grad if u_ is not None else None
        results.append((intra, cross, ga, gu))
    (intra, cross, ga, gu), (intra_r, cross_r, ga_r, gu_r) = results
    # Absolute floor: fp32 rounding of the terms ∂L/∂A is made of, |w|·O(1)/‖a_i‖ (a gradient that is
    # zero in exact arithmetic, e.g. r = 1 against a complete basis, is pure rounding noise).
    floor = 1e-5 * w.abs().max().item() / a.float().norm(dim=2).clamp_min(1e-6).min().item()
    assert intra.dtype == torch.float32 and intra.shape == (m,)
    torch.testing.assert_close(intra, intra_r, rtol=v_tol, atol=1e-7)
    assert (cross is None) == (cross_r is None)
    if cross is not None:
        torch.testing.assert_close(cross, cross_r, rtol=v_tol, atol=1e-7)
        assert gu.dtype == u.dtype and gu.shape == u.shape
        err_u = (gu.double() - gu_r.double()).abs().max()
        assert err_u <= ORTHO_TOL[u.dtype][1] * gu_r.double().abs().max() + 1e-6, f"dU error {err_u:.3e}"
    assert ga.dtype == a.dtype and ga.shape == a.shape
    err = (ga.double() - ga_r.double()).abs().max()
    assert err <= g_tol * ga_r.double().abs().max() + floor, f"dA error {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [None, 4, 16])
@pytest.mark.parametrize("d_in", [8, 123])
@pytest.mark.parametrize("r", [1, 4, 16])
def test_orthogonality(r, d_in, k, dtype):
    gen = torch.Generator().manual_seed(r * 100 + d_in)
    a = (torch.randn(3, r, d_in, generator=gen) * 0.02).to(dtype)
    u = _bases(3, d_in, k, seed=r) if k is not None else None
    _check_orthogonality(a, u)


@pytest.mark.parametrize("u_dtype", [torch.float16, torch.bfloat16])
def test_orthogonality_half(u_dtype):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 16, 123, generator=gen).to(torch.float16)
    _check_orthogonality(a, _bases(3, 123, 16, dtype=u_dtype))


def test_orthogonality_noncontiguous_and_clamped():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(3, 123, 16, generator=gen).transpose(1, 2)  # (3, 16, 123), strides (1968, 1, 16)
    a[1, 3] = 0.0  # a row under the norm clamp
    u = _bases(3, 123, 32, seed=2)[..., ::2]  # (3, 123, 16), strides (3936, 32, 2)
    assert not a.is_contiguous() and not u.is_contiguous()
    _check_orthogonality(a, u)


def test_orthogonality_wide_rank_falls_back():
    a = torch.randn(2, 65, 40)
    intra, cross = tort.orthogonality_triton(a, None)
    torch.testing.assert_close(intra, orthogonality_reference(a)[0])
    assert cross is None


# --------------------------------------------------------------------------------------------------
# dispatch (SUPPLE_KERNELS=triton on CPU tensors, in interpreter mode)
# --------------------------------------------------------------------------------------------------


def test_dispatch_ipr(monkeypatch):
    monkeypatch.setenv("SUPPLE_KERNELS", "triton")
    h = torch.randn(77, 123, generator=torch.Generator().manual_seed(9))
    assert use_triton(h)
    p, g = ipr_value_and_grad(h, True)
    _check_ipr(h, True, p, g)
    # Through the autograd.Function: the backward hands out the kernel's gradient, in h's dtype.
    hb = h.to(torch.bfloat16).requires_grad_(True)
    out = ipr(hb, True)
    (2.0 * out).backward()
    _, g_ref = ipr_reference(hb.detach(), True)
    assert hb.grad.dtype == torch.bfloat16
    scale, den = _ipr_scale(hb, True)
    err = ((hb.grad.double() - 2.0 * g_ref.double()) * den).abs().max()
    assert err <= 2.0 * IPR_TOL[torch.bfloat16][1] * scale


def test_dispatch_orthogonality(monkeypatch):
    monkeypatch.setenv("SUPPLE_KERNELS", "triton")
    a = torch.randn(3, 4, 123, generator=torch.Generator().manual_seed(8))
    assert use_triton(a)
    _check_orthogonality(a, _bases(3, 123, 16), fn=lora_orthogonality)
    _check_orthogonality(a, None, fn=lora_orthogonality)


def test_forced_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("SUPPLE_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ipr_value_and_grad(torch.randn(4, 8), True)


# --------------------------------------------------------------------------------------------------
# ahead-of-time compilation for an H100 (sm_90), in a process without the interpreter
# --------------------------------------------------------------------------------------------------

_COMPILE_TEST = "test_kernels_compile_for_h100"
_COMPILE_SCRIPT = """
import json
from supple.kernels import _triton_covariance as c, _triton_orthogonality as o
rows = [list(r) for r in c.compile_report(arch=90, quick=True, h_types=("bf16",))]
rows += [list(r) for r in o.compile_report(arch=90, quick=True, a_types=("bf16",))]
print("ROWS" + json.dumps(rows))
"""


@pytest.fixture(scope="module", autouse=True)
def _sm90_compile(request):
    """Start the sm_90 compilation in a subprocess when the module's first test runs, so it overlaps
    the (single-threaded) interpreter tests; only when the compile test is selected."""
    if not any(item.name == _COMPILE_TEST for item in request.session.items):
        yield None
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.Popen([sys.executable, "-c", _COMPILE_SCRIPT], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_kernels_compile_for_h100(_sm90_compile):
    """Every kernel compiles to an sm_90 cubin with its first (largest) autotune config, within H100
    shared memory. `python benchmarks/kernel_speed.py --compile-check` sweeps all configs and dtypes."""
    proc = _sm90_compile
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.skip("sm_90 compilation timed out on this runner")
    if proc.returncode != 0 and "ptxas" in stderr and "not found" in stderr:
        pytest.skip("ptxas unavailable")
    assert proc.returncode == 0, stderr[-4000:]
    rows = json.loads(stdout.split("ROWS", 1)[1])
    names = {row[0] for row in rows}
    assert names == {"_ipr_stats_kernel", "_ipr_gram_kernel", "_ipr_grad_kernel", "_ipr_fixup_kernel",
                     "_ortho_fwd_kernel", "_ortho_bwd_kernel"}
    for name, variant, meta, _warps, _stages, shared in rows:
        assert shared <= H100_SMEM, f"{name} [{variant}] {meta}: {shared} B shared memory"
