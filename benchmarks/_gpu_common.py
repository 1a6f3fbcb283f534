"""Shared pieces of ``benchmarks/gpu_check.py``: paths, loading the sibling benchmark scripts, timing, results.

Nothing here imports the Triton kernels (``gpu_check.py --dry-run`` sets ``TRITON_INTERPRET=1`` before they
are first imported), transformers or trl.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # supple from the checkout (the GPU machine gets the working tree, not a wheel)
    sys.path.insert(0, str(REPO))

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATUSES = ("pass", "fail", "info", "skipped", "error")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bf16"``."""
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    return str(dtype).replace("torch.", "")


def load_bench(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (``kernel_speed``, ``overhead``) under a private module name.

    The scripts are not a package; loading one by its file path, under a name no installed module has, keeps it
    from standing in for a module of its own name (tests/test_benchmarks.py checks that no script has one).
    """
    key = f"_supple_bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load benchmarks/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod


def sync(device: torch.device) -> None:
    """Wait for the device (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int,
            flush_bytes: int = 256 * 2**20) -> tuple[float, float]:
    """Median and min time of ``fn()`` in ms.

    CUDA: CUDA events around each call, with the L2 cache flushed (a ``flush_bytes`` buffer zeroed) before
    each call outside the timed window, so that a 29 MB LoRA stack is read from HBM and not from the 50+ MB
    L2. CPU: ``benchmarks/kernel_speed.py``'s ``time_call`` (wall time).
    """
    if device.type != "cuda":
        return load_bench("kernel_speed").time_call(lambda: fn(), (), device, warmup, repeats)
    flush = torch.empty(flush_bytes // 4, dtype=torch.float32, device=device)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times)


def section(name: str, status: str, summary: str, rows: list[dict] | None = None, **extra: Any) -> dict:
    """One check's result: ``status`` is one of :data:`STATUSES`, ``summary`` its one-line verdict."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {STATUSES}")
    return {"name": name, "status": status, "summary": summary, "rows": rows or [], **extra}


class Stopwatch:
    """Seconds since creation: ``str(sw)`` → ``"12.3 s"``."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def __str__(self) -> str:
        return f"{self.seconds():.1f} s"
