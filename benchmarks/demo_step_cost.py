"""Training step time of the demo's supple arm against its baseline, in one of the demo's own stages, A/B in one process.

Usage::

    python benchmarks/demo_step_cost.py                              # the sft stage, the supple default arm
    python benchmarks/demo_step_cost.py --arm replay2:replay_every=2,replay_weight=1.0 --reps 12 --block 2
    python benchmarks/demo_step_cost.py --model tiny --reps 2          # a smoke run, seconds

``benchmarks/overhead.py`` times the callback in LoRA SFT on full 256-token text sequences. The demo trains
differently: full fine-tuning, short answers, batch 4, 128-token cap. There
replay's extra forward/backward of a general-text paragraph (up to 128 tokens) weighs more against a step, so this
script times exactly the demo's stage: ``supple.testbed``'s own stage runner (data, TRL config, completion-only
loss) with the demo's callbacks, the supple arm's :class:`SuppleConfig` built as the demo builds it
(``supple_arm_config``: ``SUPPLE_ARM_DEFAULTS``, LoRA-only terms off under full fine-tuning).

Configurations: ``baseline`` (no supple callback), ``control`` with ``--control`` (a second baseline: an A/A test
of the method), ``default`` (the supple arm) and every ``--arm
NAME:FIELD=VALUE[,FIELD=VALUE...]`` (the supple arm with those fields, as ``supple demo --supple``). Each
configuration trains its own copy of the model in its own thread; the trainers take turns in blocks of
``--block`` optimizer steps (benchmarks/_interleave.py), so they share the machine's load block by block.

Reported per configuration: the ratio of mean step times to the baseline's over the timed blocks, with a 95 %
bootstrap interval resampling repetitions. The mean, not the median: replay every N steps makes one step in N
dearer, and a median of per-step ratios would miss it. Writes ``benchmarks/results/demo_step_cost_<model>_<stage>.csv``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import datetime as _dt
import importlib.util
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
if importlib.util.find_spec("supple") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interleave import make_turnstile_class, quantile, run_interleaved, schedule  # noqa: E402


def parse_arm(text: str) -> tuple[str, dict]:
    """``NAME:FIELD=VALUE[,FIELD=VALUE...]`` → (name, overrides); values parsed as ``supple demo --supple`` does."""
    from supple.testbed.cli import _key_value

    name, sep, rest = text.partition(":")
    if not sep or not name or not rest:
        raise ValueError(f"--arm {text!r}: write NAME:FIELD=VALUE[,FIELD=VALUE...], e.g. replay2:replay_every=2")
    if name in ("baseline", "control", "default"):
        raise ValueError(f"--arm {text!r}: {name!r} is taken; name the arm otherwise")
    return name, dict(_key_value(kv) for kv in rest.split(","))


def mean_ratio(times: dict[str, dict[int, list[float]]], name: str, reps: list[int]) -> float:
    """Mean step time of ``name`` over repetitions ``reps`` (with repeats) divided by the baseline's over the same."""
    mine = [s for r in reps for s in times[name].get(r, [])]
    base = [s for r in reps for s in times["baseline"].get(r, [])]
    return statistics.fmean(mine) / statistics.fmean(base) if mine and base else float("nan")


def bootstrap_mean_ratio_ci(times, name: str, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of :func:`mean_ratio`, resampling the repetitions both configurations ran."""
    reps = sorted(set(times[name]) & set(times["baseline"]))
    if len(reps) < 2:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    draws = [mean_ratio(times, name, [rng.choice(reps) for _ in reps]) for _ in range(n_boot)]
    return quantile(draws, 0.025), quantile(draws, 0.975)


class _StageRun:
    """What run_interleaved trains: one demo stage (its runner builds and trains the TRL trainer)."""

    def __init__(self, ctx, runner) -> None:
        self.ctx, self.runner = ctx, runner

    def train(self) -> None:
        self.runner(self.ctx)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=["embedded", "tiny"], default="embedded",
                    help="SmolLM2-135M-Instruct (default) or the tiny random Llama (a smoke run)")
    ap.add_argument("--stage", default="sft", help="one stage of the demo's list (sft, dpo, sft2; default sft)")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME:FIELD=VALUE[,...]",
                    help="a supple arm with these fields over the default's (repeatable)")
    ap.add_argument("--no-default", action="store_true", help="leave the supple default arm out")
    ap.add_argument("--control", action="store_true",
                    help="add 'control', a second baseline (an A/A test: its ratio shows the method's bias and noise)")
    ap.add_argument("--reps", type=int, default=12, help="timed blocks per configuration (default 12)")
    ap.add_argument("--block", type=int, default=2, help="optimizer steps per block (default 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the demo's workers)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    try:
        arms = [parse_arm(a) for a in args.arm]
    except ValueError as exc:
        ap.error(str(exc))
    if args.reps < 2 or args.block < 1:
        ap.error("--reps must be at least 2 (for an interval) and --block at least 1")

    import warnings

    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    from supple import SuppleCallback
    from supple.testbed.settings import Budget
    from supple.testbed.stages import STAGE_KINDS, StageContext, parse_stages, supple_arm_config

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    names = ["baseline"] + (["control"] if args.control else []) + ([] if args.no_default else ["default"])
    names += [n for n, _ in arms]
    overrides = {"baseline": None, "control": None, "default": {}, **dict(arms)}
    if len(set(names)) != len(names):
        ap.error(f"--arm: two arms share a name ({names})")
    per_trainer = args.warmup + args.reps * args.block
    budget = Budget()
    try:
        stages = parse_stages(args.stage, budget, lora=False)
        if len(stages) != 1:
            raise ValueError(f"--stage {args.stage!r}: name one stage (sft, dpo or sft2), not a list")
        stage = stages[0]
        configs = {n: supple_arm_config(1, [], False, overrides[n])[0] for n in names if overrides[n] is not None}
    except ValueError as exc:
        ap.error(str(exc))
    stage = dataclasses.replace(stage, steps=per_trainer + 1)  # the trainer must outlast the turns

    started = time.perf_counter()
    if args.model == "tiny":
        from supple.testbed.tiny import make_tiny_model

        base, tok = make_tiny_model(seed=args.seed)
    else:
        from supple.testbed.embedded import load_embedded_model

        base, tok = load_embedded_model()
    Turnstile = make_turnstile_class()
    trainers = []
    for n in names:
        gate = Turnstile(n)
        callbacks = [gate] + ([SuppleCallback(configs[n])] if n in configs else [])
        ctx = StageContext(model=copy.deepcopy(base), tokenizer=tok, stage=stage, budget=budget, seed=args.seed,
                           lora=False, callbacks=callbacks, output_dir=tempfile.mkdtemp(prefix=f"supple-cost-{n}-"),
                           data_seed=args.seed)
        trainers.append((n, _StageRun(ctx, STAGE_KINDS[stage.kind].run), gate, None))
    turns = schedule(names, args.warmup, args.reps, args.block, 0, args.seed)
    print(f"{args.model}: stage {stage.name} ({stage.kind} on {stage.family}, full fine-tuning, batch "
          f"{budget.batch_size}, max_length {budget.max_length}), {len(names)} configurations x {per_trainer} steps "
          f"({args.warmup} warm-up, {args.reps} x {args.block} timed), {args.threads} torch thread(s)", file=sys.stderr)
    run_interleaved(trainers, turns, lambda m: print(m, file=sys.stderr, flush=True))

    times: dict[str, dict[int, list[float]]] = {n: {} for n in names}
    for n, _, gate, _ in trainers:
        for kind, rep, _, sec in gate.records:
            if kind == "timed":
                times[n].setdefault(rep, []).append(sec)
    date = _dt.date.today().isoformat()
    rows = []
    for n in names:
        steps = [s for rs in times[n].values() for s in rs]
        lo, hi = bootstrap_mean_ratio_ci(times, n, seed=args.seed) if n != "baseline" else (1.0, 1.0)
        rows.append(dict(model=args.model, stage=stage.name, config=n, timed_steps=len(steps),
                         mean_step_s=statistics.fmean(steps), median_step_s=statistics.median(steps),
                         mean_ratio=mean_ratio(times, n, sorted(times[n])), ci95_lo=lo, ci95_hi=hi,
                         settings=repr(overrides[n]), reps=args.reps, block=args.block, threads=args.threads,
                         date=date, torch=torch.__version__, machine=f"{platform.machine()} {os.cpu_count()} cpu"))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"demo_step_cost_{args.model}_{stage.name.replace(':', '_')}.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nstep time of the demo's {stage.name} stage against the baseline ({date}, {platform.machine()}, "
          f"{os.cpu_count()} cpu, wall {time.perf_counter() - started:.0f} s)")
    print("command: python " + " ".join(["benchmarks/demo_step_cost.py", *(sys.argv[1:] if argv is None else argv)]))
    print(f"{'config':<12}{'mean step s':>12}{'ratio':>8}{'95% CI':>18}  settings over the default arm")
    for r in rows:
        ci = "" if r["config"] == "baseline" else f"[{r['ci95_lo']:.3f}, {r['ci95_hi']:.3f}]"
        print(f"{r['config']:<12}{r['mean_step_s']:>12.3f}{r['mean_ratio']:>8.3f}{ci:>18}  "
              f"{'' if overrides[r['config']] is None else overrides[r['config']]}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
