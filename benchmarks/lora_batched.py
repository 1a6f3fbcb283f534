"""Batched LoRA decorrelation penalty vs a per-module Python loop, for 7B-like LoRA shapes.

Usage::

    python benchmarks/lora_batched.py                    # 224 modules, r=16, d_in 4096 / 11008, k=16
    python benchmarks/lora_batched.py --reps 30 --threads 2

Shapes (Llama-2-7B with LoRA on every linear layer): per layer q, k, v, o, gate, up read d_in = 4096 and
down reads d_in = 11008; 32 layers x 7 = 224 modules, LoRA A of shape (r, d_in), r = 16, fp32 leaves.
So two shape groups: 192 x (16, 4096) and 32 x (16, 11008). Cross-stage bases U: (d_in, k), k = 16,
orthonormal, fixed.

Both variants compute the same scalar, mean intra (+ mean cross) over all modules, and add its gradient
into every A's ``.grad``, as the callback does once per optimizer step:

- batched: ``LoraDecorrelation.add_gradients`` — the callback's own code: copy each shape group into a
  reused (M, r, d_in) buffer, one ``lora_penalties`` forward + backward per group, one finiteness check,
  add into the ``.grad`` of every module;
- loop: one ``lora_penalties`` call per module on a stack of one (M = 1), its backward, add into ``.grad``;
- textbook loop: what one writes without supple — the formula per module with autograd (normalize the
  rows, Gram, off-diagonal; AdaLoRA's orthogonal regularizer is such a loop), backward, add into ``.grad``;
  timed alongside, reported as its own ratio; the target is judged on the like-for-like loop above;
- copy: a yardstick, not a variant — one copy of every A into the group buffers, i.e. one read and one
  write of the adapter's A matrices, the least memory traffic any batched path has.

The variants are timed alternately (order swapped every repetition), ``--reps`` times each, with and
without the cross bases; reported: median time of each, and median and IQR of the per-repetition ratio
loop / batched. The gradients of the two are checked to agree before timing. Writes
``benchmarks/results/lora_batched.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
if importlib.util.find_spec("supple") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def make_modules(layers: int, rank: int, d_model: int, d_ff: int, k: int, seed: int):
    """Groups [(params, bases)] of 7B-like LoRA A matrices: 6 per layer at d_model, 1 at d_ff."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for d_in, per_layer in ((d_model, 6), (d_ff, 1)):
        m = layers * per_layer
        params = [torch.nn.Parameter(torch.randn(rank, d_in, generator=gen) / d_in**0.5) for _ in range(m)]
        bases = torch.linalg.qr(torch.randn(m, d_in, k, generator=gen)).Q.contiguous()
        groups.append((params, bases))
    return groups


def _decorrelation(groups, cross: bool):
    """The callback's own object (``LoraDecorrelation``), wired to these tensors instead of a PEFT model."""
    from supple.callbacks.decorrelation import LoraDecorrelation, _Group

    key = (id(groups), cross)
    if key not in _CACHE:
        dec = LoraDecorrelation(1.0, 1.0 if cross else 0.0)
        dec.groups = [_Group(ps, u if cross else None, torch.ones(len(ps), dtype=torch.bool)) for ps, u in groups]
        dec.num_modules = sum(len(ps) for ps, _ in groups)
        dec.num_with_basis = dec.num_modules if cross else 0
        _CACHE[key] = dec
    return _CACHE[key]


_CACHE: dict = {}


def batched(groups, cross: bool):
    """What the callback does once per optimizer step: ``LoraDecorrelation.add_gradients`` (stack each shape
    group into a reused buffer, one ``lora_penalties`` forward + backward per group, add into every ``.grad``)."""
    _decorrelation(groups, cross).add_gradients()


def loop(groups, cross: bool):
    """The same penalty and gradient, one module at a time: ``lora_penalties`` on a stack of one, backward,
    add into ``.grad``."""
    from supple.regularizers.lora import lora_penalties

    n = sum(len(p) for p, _ in groups)
    for ps, u in groups:
        for i, p in enumerate(ps):
            intra, xs = lora_penalties(p.unsqueeze(0), u[i : i + 1] if cross else None)
            term = intra.sum() + (xs.sum() if cross else 0.0)
            (g,) = torch.autograd.grad(term / n, p)
            p.grad.add_(g)


def loop_textbook(groups, cross: bool):
    """What one writes without supple (e.g. AdaLoRA's orthogonal regularizer is such a loop): the formula
    per module with autograd — normalize rows, Gram, off-diagonal — then backward, add into ``.grad``."""
    n = sum(len(p) for p, _ in groups)
    for ps, u in groups:
        for i, p in enumerate(ps):
            r = p.shape[0]
            ah = p / p.norm(dim=1, keepdim=True).clamp_min(1e-6)
            g = ah @ ah.T
            term = ((g * g).sum() - (g.diagonal() ** 2).sum()) / (r * (r - 1))
            if cross:
                term = term + ((ah @ u[i]) ** 2).sum() / r
            (gr,) = torch.autograd.grad(term / n, p)
            p.grad.add_(gr)


def copy_floor(groups, cross: bool):
    """Memory-traffic yardstick: one copy of every A into the stacks (what any batched path must at least do)."""
    for g in _decorrelation(groups, cross).groups:
        g.stacked()


def grads_of(fn, groups, cross: bool) -> list[torch.Tensor]:
    params = [p for ps, _ in groups for p in ps]
    for p in params:
        p.grad = torch.zeros_like(p)
    fn(groups, cross)
    return [p.grad.clone() for p in params]


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--d-ff", type=int, default=11008)
    p.add_argument("--k", type=int, default=16, help="columns of each cross-stage basis")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (0 = torch's default); 1 is stable on a shared machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="suffix of the CSV name: lora_batched_<tag>.csv")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    groups = make_modules(args.layers, args.rank, args.d_model, args.d_ff, args.k, args.seed)
    n_modules = sum(len(ps) for ps, _ in groups)
    shapes = " + ".join(f"{len(ps)} x ({args.rank}, {ps[0].shape[1]})" for ps, _ in groups)
    date = _dt.date.today().isoformat()
    rows = []
    print(f"LoRA decorrelation penalty, forward + backward: {n_modules} modules [{shapes}], fp32, "
          f"{torch.get_num_threads()} torch threads, {args.reps} reps, {date}")
    print(f"{'variant':<14}{'batched ms':>12}{'loop ms':>10}{'copy ms':>9}{'loop/batched':>14}{'IQR':>18}{'target':>9}"
          f"{'textbook loop ms':>18}{'textbook/batched':>18}")
    for cross in (False, True):
        gb, gl = grads_of(batched, groups, cross), grads_of(loop, groups, cross)
        gt = grads_of(loop_textbook, groups, cross)
        worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                    for other in (gl, gt) for a, b in zip(gb, other))
        if worst > 1e-4:
            raise AssertionError(f"batched and loop gradients differ (max relative {worst:.2e})")
        for _ in range(args.warmup):
            batched(groups, cross)
            loop(groups, cross)
        tb, tl, tc, tt, ratios = [], [], [], [], []
        for rep in range(args.reps):
            tc.append(timed(copy_floor, groups, cross))
            tt.append(timed(loop_textbook, groups, cross))
            if rep % 2 == 0:
                b, lo = timed(batched, groups, cross), timed(loop, groups, cross)
            else:
                lo, b = timed(loop, groups, cross), timed(batched, groups, cross)
            tb.append(b)
            tl.append(lo)
            ratios.append(lo / b)
        name = "intra+cross" if cross else "intra"
        row = dict(
            variant=name,
            modules=n_modules,
            rank=args.rank,
            d_in=f"{args.d_model}/{args.d_ff}",
            k=args.k if cross else 0,
            batched_ms_median=statistics.median(tb) * 1e3,
            loop_ms_median=statistics.median(tl) * 1e3,
            stack_copy_ms_median=statistics.median(tc) * 1e3,
            textbook_loop_ms_median=statistics.median(tt) * 1e3,
            textbook_over_batched=statistics.median(tt) / statistics.median(tb),
            speedup_median=statistics.median(ratios),
            speedup_q25=quantile(ratios, 0.25),
            speedup_q75=quantile(ratios, 0.75),
            speedup_of_medians=statistics.median(tl) / statistics.median(tb),
            max_grad_rel_diff=worst,
            target=5.0,
            reps=args.reps,
            threads=torch.get_num_threads(),
            malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_", "default"),
            date=date,
            torch=torch.__version__,
            machine=f"{platform.machine()} {os.cpu_count()} cpu",
        )
        rows.append(row)
        iqr = "[{:.2f}, {:.2f}]".format(row["speedup_q25"], row["speedup_q75"])
        print(f"{name:<14}{row['batched_ms_median']:>12.1f}{row['loop_ms_median']:>10.1f}{row['stack_copy_ms_median']:>9.1f}"
              f"{row['speedup_median']:>13.2f}x{iqr:>18}{'>=5x':>9}"
              f"{row['textbook_loop_ms_median']:>18.1f}{row['textbook_over_batched']:>17.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / (f"lora_batched_{args.tag}.csv" if args.tag else "lora_batched.csv")
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
