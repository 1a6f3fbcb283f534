"""One script that checks supple's GPU path in one go (issue 17): numerics, kernel speed, equivalence, overhead.

Usage::

    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-dry   # on CPU: every path that needs no CUDA (CI)
    python benchmarks/gpu_check.py --out benchmarks/results        # on one CUDA GPU, ≤ 8 minutes

Checks (``--only`` selects some):

1. ``numerics``   Triton vs the torch reference for ipr and LoRA orthogonality (intra and cross): values and
                  gradients (the ipr autograd path too), fp32/bf16/fp16, at Llama-8B shapes (n = d = 4096 and
                  4096 × 14336; 224 LoRA modules r16 in two stacks, d_in 4096 and 14336) and odd shapes, with
                  dtype-paired tolerances, and both sides against a float64 evaluation.
2. ``speed``      fwd+bwd time of Triton, the reference and ``torch.compile(reference)`` (L2 flushed between
                  calls), as ratios; achieved HBM bandwidth and FLOP rate against the device's peak
                  (``--peak-gbps`` / ``--peak-tflops`` override the table in ``_gpu_kernels.PEAKS``).
3. ``equivalence`` the tiny-model equivalence (``tests/_runs.py``: callback vs hand-written loss vs no term) on
                  the device in fp32, bf16 and fp16 (fp16 through the Trainer's real GradScaler).
4. ``overhead``   LoRA SFT step time on SmolLM2-135M (its weights if the embedded GGUF is installed, else its
                  architecture with random weights) for diversity, decorrelation and the demo's supple arm:
                  own time ÷ step and interleaved A/B medians (``benchmarks/overhead.py``'s machinery).

Output: ``gpu_check.json`` and ``gpu_check.md`` under ``--out`` (``gpu_check_dry_run.*`` for a dry run), a
summary line per check. Exit status 1 if a numerics or equivalence case fails, 2 if a check crashed, else 0.

Offline GPU machine: checks 1–2 need only torch and triton. Checks 3–4 need trl and datasets: fetch them here
with ``bash benchmarks/gpu_wheels.sh`` (into the git-ignored ``benchmarks/gpu_wheels/``), take that folder
along, and this script installs them there with ``pip install --no-index --no-deps --target ...`` (or run
that command yourself); without them checks 3–4 are skipped with a message.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WHEELS = HERE / "gpu_wheels"
SITE = Path(os.environ.get("SUPPLE_GPU_SITE", "/tmp/supple-gpu-site"))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
CHECKS = ("numerics", "speed", "equivalence", "overhead")
# Shares of the time budget: each check gets its share of what is left when it starts (so a fast check leaves
# more to the next ones); a check stops starting new cases at its deadline and lists them as not run.
SHARES = {"numerics": 0.35, "speed": 0.25, "equivalence": 0.15, "overhead": 0.25}
# (GPU run, dry run) defaults of the timing options
DEFAULTS = {"repeats": (30, 2), "warmup": (5, 1), "reps": (20, 2), "block": (4, 2), "precision": ("bf16", "fp32")}
VERSIONED = ("torch", "triton", "transformers", "peft", "trl", "datasets", "accelerate", "einops", "safetensors",
             "pyarrow", "numpy")


def install_hint(wheels: Path) -> str:
    return (f"here: bash benchmarks/gpu_wheels.sh  (fills {wheels.relative_to(REPO) if wheels.is_relative_to(REPO) else wheels}); "
            f"there: {sys.executable} -m pip install --no-index --no-deps --target {SITE} {wheels}/*.whl "
            f"&& export PYTHONPATH={SITE}")


def ensure_training_stack(wheels: Path, install: bool, log=print) -> str:
    """Make trl and datasets importable: already there, or installed offline from ``wheels`` into SITE."""
    if SITE.is_dir() and str(SITE) not in sys.path:
        sys.path.insert(0, str(SITE))
    missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    if not missing:
        return "present"
    found = sorted(glob.glob(str(wheels / "*.whl")))
    if not found or not install:
        log(f"{', '.join(missing)} missing: checks 3-4 will be skipped. To install offline: {install_hint(wheels)}")
        return f"missing ({', '.join(missing)})"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--target", str(SITE), *found]
    log(f"installing {len(found)} wheels offline: {' '.join(cmd[:9])} ... -> {SITE}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"offline install failed ({proc.returncode}): {proc.stderr[-1500:]}")
        return "install failed"
    sys.path.insert(0, str(SITE))
    importlib.invalidate_caches()
    return f"installed from {wheels} into {SITE}"


def versions() -> dict:
    """Python, packages, CUDA and device, git commit."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict = {"python": platform.python_version(), "platform": platform.platform()}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    import torch

    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        out["device_name"] = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        out["capability"] = f"sm_{major}{minor}"
        out["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        out["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:
        out["git_commit"] = None
    return out


def plan(args, device) -> dict[str, list[str]]:
    """What each check measures on the GPU (the full plan) — listed by a dry run without running it."""
    import _gpu_kernels as gk
    import _gpu_training as gt

    def gpu(name: str):  # the GPU run's value of an option (a dry run lists the GPU plan, not its own)
        return DEFAULTS[name][0] if args.dry_run else getattr(args, name)

    cases, precisions = gt.equivalence_plan(device, False) if device.type == "cuda" else (
        list(gt.EQUIV_CASES), ["fp32", "bf16", "fp16"])
    return {
        "numerics": gk.numerics_plan(False),
        "speed": [f"{gk._describe(c)}: triton, reference, torch.compile(reference); GB/s vs peak"
                  for c in gk.speed_plan(False)],
        "equivalence": [f"{c} in {p} on cuda" + (" through the Trainer's GradScaler" if p == "fp16" else "")
                        for p in precisions for c in cases],
        "overhead": [f"SmolLM2-135M LoRA r16 q,k,v,o SFT, batch 4 x 256, {gpu('precision')}: "
                     f"{', '.join(gt.OVERHEAD_CONFIGS)}; {gpu('reps')} reps x {gpu('block')} steps interleaved "
                     "(A/B medians); own time of each config's callback work / median baseline step"],
    }


def run_check(name: str, fn, log) -> dict:
    """Run one check; a crash becomes an ``error`` result instead of ending the script."""
    from _gpu_common import Stopwatch, section

    log(f"\n== {name}")
    sw = Stopwatch()
    try:
        result = fn()
    except Exception as exc:
        log(traceback.format_exc())
        result = section(name, "error", f"crashed: {type(exc).__name__}: {str(exc)[:300]}")
    result["seconds"] = round(sw.seconds(), 1)
    log(f"-- {name}: {result['status'].upper()} in {sw}: {result['summary']}")
    return result


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
    return str(v)


def _table(rows: list[dict], cols: list[str]) -> list[str]:
    if not rows:
        return []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return lines + [""]


MD_COLUMNS = {
    "numerics": ["op", "shape", "dtype", "variant", "value_err", "value_tol", "value_err_f64", "ref_value_err_f64",
                 "grad_err", "grad_tol", "grad_err_f64", "ref_grad_err_f64", "passed"],
    "speed": ["case", "impl", "median_ms", "min_ms", "achieved_gbps", "bandwidth_fraction", "achieved_tflops",
              "roofline_fraction"],
    "equivalence": ["case", "precision", "device", "max_abs_diff", "term_effect", "rel_diff", "tol", "grad_scale",
                    "passed", "error"],
    "overhead": ["config", "pairs", "baseline_step_ms", "median_step_ms", "ab_median", "ab_q25", "ab_q75", "own_ms",
                 "own_over_step", "target"],
}


def write_outputs(report: dict, out: Path, stem: str) -> tuple[Path, Path]:
    """``<stem>.json`` (everything) and ``<stem>.md`` (the tables) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"{stem}.json", out / f"{stem}.md"
    jpath.write_text(json.dumps(report, indent=1, default=str) + "\n")
    v = report["versions"]
    lines = [f"# supple GPU check{' (dry run on CPU)' if report['dry_run'] else ''}", "",
             f"{report['date']} · device: {v.get('device_name') or 'CPU'} · torch {v.get('torch')} (CUDA "
             f"{v.get('torch_cuda')}) · triton {v.get('triton')} · transformers {v.get('transformers')} · "
             f"trl {v.get('trl')} · commit {v.get('git_commit')} · `{report['command']}`", "",
             "| check | status | seconds | summary |", "|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['status']} | {c.get('seconds', '')} | {c['summary']} |"
              for c in report["checks"].values()]
    lines.append("")
    if report["goals"]:
        lines += ["## Goals", ""] + _table(report["goals"], ["goal", "value", "target", "met"])
    for name, check in report["checks"].items():
        if check["rows"]:
            lines += [f"## {name}", ""] + _table(check["rows"], MD_COLUMNS[name])
    if report["dry_run"]:
        lines += ["## What the GPU run measures", ""]
        lines += [f"- **{k}**: {item}" for k, items in report["plan"].items() for item in items] + [""]
    mpath.write_text("\n".join(lines))
    return jpath, mpath


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--dry-run", action="store_true", help="CPU: small shapes, Triton interpreter, tiny model")
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON and Markdown")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {CHECKS}")
    p.add_argument("--peak-gbps", type=float, default=None, help="peak HBM bandwidth in GB/s (default: by name)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (default: by name)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile in the speed check")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per kernel (GPU 30, dry run 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (GPU 5, dry run 1)")
    p.add_argument("--reps", type=int, default=None, help="overhead: interleaved repetitions (GPU 20, dry run 2)")
    p.add_argument("--block", type=int, default=None, help="overhead: steps per block (GPU 4, dry run 2)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                   help="overhead: mixed precision of the SFT runs (GPU bf16, dry run fp32)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="time budget in seconds for all checks (default 480: the issue's 8 minutes)")
    p.add_argument("--tol-scale", type=float, default=1.0, help="multiply the numerics tolerances (0: all fail)")
    p.add_argument("--wheels", type=Path, default=WHEELS, help="wheels for trl/datasets (gpu_wheels.sh)")
    p.add_argument("--no-install", action="store_true", help="do not install the wheels, only say how")
    args = p.parse_args(argv)
    args.checks = [c.strip() for c in args.only.split(",") if c.strip()]
    bad = [c for c in args.checks if c not in CHECKS]
    if bad:
        p.error(f"unknown check(s) {bad}; choose from {CHECKS}")
    for name, (gpu, cpu) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, cpu if args.dry_run else gpu)
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.dry_run:  # before anything imports the Triton kernels: they are interpreted from their first import
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the interpreter's small dots; see test_kernels_triton

    def log(msg: str) -> None:
        print(msg, flush=True)

    stack = ensure_training_stack(args.wheels, not args.no_install, log) if {"equivalence", "overhead"} & set(
        args.checks) else "not needed"
    import torch

    info = versions()
    log("versions: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        log("no CUDA device: nothing to check here. Use --dry-run on CPU.")
        return 2
    device = torch.device("cuda" if cuda and not args.dry_run else "cpu")
    import _gpu_kernels as gk
    import _gpu_training as gt

    bw, tf = gk.device_peaks(info.get("device_name") or "", args.peak_gbps, args.peak_tflops)
    if device.type == "cuda" and bw is None:
        log(f"peak bandwidth of {info.get('device_name')!r} unknown: pass --peak-gbps for the roofline fractions")
    full_plan = plan(args, device)
    if args.dry_run:
        log("dry run on CPU; the GPU run would measure:")
        for name in args.checks:
            for item in full_plan[name]:
                log(f"  [{name}] {item}")
    checks: dict[str, dict] = {}
    end = started + args.budget_s
    runners = {
        "numerics": lambda t: gk.check_numerics(device, args.dry_run, args.tol_scale, t, log),
        "speed": lambda t: gk.check_speed(device, args.dry_run, bw, tf, not (args.no_compile or args.dry_run),
                                          args.warmup, args.repeats, t, log),
        "equivalence": lambda t: gt.check_equivalence(device, args.dry_run, t, log),
        "overhead": lambda t: gt.check_overhead(device, args.dry_run, args.reps, args.block,
                                                1 if args.dry_run else 3, args.precision, t, log),
    }
    for i, name in enumerate(args.checks):
        now = time.perf_counter()
        share = SHARES[name] / sum(SHARES[c] for c in args.checks[i:])
        deadline = now + max(end - now, 0.0) * share
        checks[name] = run_check(name, lambda r=runners[name], t=deadline: r(t), log)
    goals = (gk.speed_goals(checks["speed"]) if "speed" in checks else []) + (
        gt.overhead_goals(checks["overhead"]) if "overhead" in checks else [])
    if args.dry_run:  # CPU figures of a tiny model say nothing about the GPU goals
        for g in goals:
            g["met"], g["note"] = None, "dry run: not judged"
    report = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "dry_run": args.dry_run,
              "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "versions": info, "training_stack": stack, "device": device.type, "peak_gbps": bw, "peak_tflops": tf,
              "plan": full_plan, "checks": checks, "goals": goals, "total_seconds": round(time.perf_counter() - started, 1)}
    jpath, mpath = write_outputs(report, args.out, "gpu_check_dry_run" if args.dry_run else "gpu_check")
    log("\nsummary:")
    for c in checks.values():
        log(f"  {c['name']:12s} {c['status'].upper():8s} {c['summary']}")
    for g in goals:
        met = g.get("note") or {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
        log(f"  goal: {g['goal']}: {_fmt(g['value'])} ({met})")
    log(f"wrote {jpath} and {mpath} ({time.perf_counter() - started:.0f} s in all)")
    failed = any(c["status"] == "fail" for c in checks.values())
    crashed = any(c["status"] == "error" for c in checks.values())
    return 1 if failed else 2 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
