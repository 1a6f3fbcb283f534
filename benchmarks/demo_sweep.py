"""A small sweep of the supple arm's settings on the demo testbed (``supple demo``), one setting at a time.

Usage::

    python benchmarks/demo_sweep.py                         # quick budget, 2 seeds, the settings below
    python benchmarks/demo_sweep.py --only defaults,no-replay --seeds 1
    python benchmarks/demo_sweep.py --budget default        # the 20-minute budget per setting and arm

Each setting is one ``supple demo --arms supple --supple FIELD=VALUE ...`` run (plus one ``--arms baseline``
run), all with the same stages, budget and training seeds, in a subprocess each. Varied one at a time around
the demo's supple-arm defaults (``supple.testbed.pipeline.SUPPLE_ARM_DEFAULTS``, moved with ``--base``): the
diversity weight, the LoRA decorrelation weights, replay on/off, its rate and weight. Collected after the last stage (mean ± std over
seeds): plasticity probe (final loss, improvement), first-task accuracy (forgetting), last-task accuracy, the
out-of-domain family, ECE, last-block effective rank, training seconds of all stages (cost; wall time on a
shared machine, so only a rough ratio) and the DPO stage's arithmetic accuracy.

Writes ``benchmarks/results/demo_sweep[_<tag>].csv`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]

# name -> --supple overrides (on top of SUPPLE_ARM_DEFAULTS and --base); None = the baseline arm
SETTINGS: dict[str, list[str] | None] = {
    "baseline": None,
    "defaults": [],
    "diversity-0.1": ["diversity_weight=0.1"],
    "diversity-10": ["diversity_weight=10"],
    "decorrelation-0.1": ["decorrelation_weight=0.1", "decorrelation_cross_weight=0.1"],
    "decorrelation-10": ["decorrelation_weight=10", "decorrelation_cross_weight=10"],
    "no-replay": ["replay_data=None"],
    # replay rates: RxB = B sequences every R steps (the demo's default is 1 every 8; it was 4 every 4)
    "replay-4x4": ["replay_every=4", "replay_batch_size=4"],
    "replay-16x4": ["replay_every=16", "replay_batch_size=4"],
    "replay-8x1": ["replay_every=8", "replay_batch_size=1"],
    "replay-8x1-w0.5": ["replay_every=8", "replay_batch_size=1", "replay_weight=0.5"],
}

# (column, metric key in the demo summary, stage index from the end)
COLUMNS = [
    ("probe_final", "probe_final_loss", -1),
    ("probe_impr", "probe_improvement", -1),
    ("acc_first_task", "acc/arithmetic", -1),
    ("acc_last_task", "acc/sorting", -1),
    ("acc_ood", "acc/knowledge", -1),
    ("ece", "ece", -1),
    ("erank", "erank", -1),
    ("acc_after_dpo", "acc/arithmetic", -2),
]


def collect_row(name: str, given: list[str] | None, results_json: Path, seeds: int) -> dict:
    """One CSV row from a demo run's results.json (``given``: the supple overrides, None for the baseline)."""
    res = json.loads(Path(results_json).read_text())
    arm = "baseline" if given is None else "supple"
    summary = [s for s in res["summary"] if s["arm"] == arm]
    row: dict = {"setting": name, "overrides": " ".join(given or []) or ("-" if given is None else "(defaults)")}
    for col, key, idx in COLUMNS:
        m = summary[idx]["metrics"].get(key)
        row[col] = m["mean"] if m else float("nan")
        row[col + "_std"] = m["std"] if m else float("nan")
    train = [r["train"]["wall_s"] for r in res["records"] if r.get("train") and r["arm"] == arm and "wall_s" in r["train"]]
    row["train_s_per_seed"] = sum(train) / max(1, seeds)
    return row


def run_setting(name: str, overrides: list[str] | None, args, workdir: Path) -> dict:
    out = workdir / name
    cmd = [sys.executable, "-m", "supple.cli", "demo", "--model", args.model, "--arms",
           "baseline" if overrides is None else "supple", "--seeds", str(args.seeds), "--out", str(out),
           "--threads", str(args.threads), "--no-progress", "--full-ft" if args.full_ft else "--lora"]
    if args.budget == "quick":
        cmd.append("--quick")
    elif args.budget == "full":
        cmd.append("--full")
    for o in ([*args.base, *overrides] if overrides is not None else []):
        cmd += ["--supple", o]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"setting {name!r} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    given = [*args.base, *overrides] if overrides is not None else None
    row = collect_row(name, given, out / "results.json", args.seeds)
    row["wall_s"] = time.perf_counter() - t0
    row["command"] = "supple demo " + " ".join(cmd[4:])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument("--budget", choices=("quick", "default", "full"), default="quick")
    p.add_argument("--full-ft", action="store_true",
                   help="full fine-tuning stages (the demo's default since 2026-12-01); default: LoRA, as in the "
                   "sweep recorded in the README")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="")
    p.add_argument("--base", action="append", default=[], metavar="FIELD=VALUE",
                   help="centre of the sweep: overrides applied to every supple setting before its own "
                        "(--base replay_every=4 --base replay_batch_size=4 --base replay_weight=0.1 reproduces the "
                        "README's sweep, whose centre was the earlier defaults)")
    p.add_argument("--keep", type=Path, default=None,
                   help="keep every setting's demo output (results.json, plots) under this directory")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    date = _dt.date.today().isoformat()
    rows = []
    with tempfile.TemporaryDirectory(prefix="supple-sweep-") as tmp:
        work = Path(tmp) if args.keep is None else args.keep
        for i, name in enumerate(names):
            print(f"[{i + 1}/{len(names)}] {name} ...", flush=True)
            row = run_setting(name, SETTINGS[name], args, work)
            row.update(budget=args.budget, seeds=args.seeds, date=date)
            rows.append(row)
            print(f"    done in {row['wall_s']:.0f} s", flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / (f"demo_sweep_{args.tag}.csv" if args.tag else "demo_sweep.csv")
            with path.open("w", newline="") as f:  # rewritten after every setting: a partial sweep is kept
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    heads = ["setting"] + [c for c, _, _ in COLUMNS] + ["train s / seed"]
    print("\n| " + " | ".join(heads) + " |\n|" + "---|" * len(heads))
    for r in rows:
        cells = [r["setting"]] + [f"{r[c]:.3f}±{r[c + '_std']:.3f}" for c, _, _ in COLUMNS] + [f"{r['train_s_per_seed']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"\nwrote {path}; {args.budget} budget, {args.seeds} seeds, {date}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
