"""Re-measure a finished demo with another plasticity probe, on the checkpoints it saved, and redo its statistics.

A demo run with ``--save-models DIR`` keeps every (seed, arm, stage) checkpoint. This script runs one probe setting
on the base model and on the probed stages' checkpoints, replaces that probe family's records in a copy of the
demo's results, and writes the demo's usual outputs (verdict, tables, plots) from the same analysis code. The
training is untouched: only the measurement changes, and every checkpoint is probed with the same probe seeds, so
arms stay paired. The other probe families keep their recorded values; ``meta.reprobe`` says which family was
re-measured, and how. A family the demo did not probe (e.g. ``word_codes`` on an older run) is added.

    python benchmarks/reprobe_demo.py --demo docs/demo --models /work/models_ablation \\
        --family reverse_words --steps 50 --lr 1e-3 --workers 2 --out docs/demo/reprobe
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from dataclasses import asdict, replace


def _probe_one(args: tuple) -> tuple[str, dict]:
    spec, family, budget_fields, threads = args
    import torch

    from supple.testbed.evaluation import load_testbed_model, probe_summary
    from supple.testbed.settings import Budget

    torch.set_num_threads(threads)
    model, tok, name = load_testbed_model(spec)
    t0 = time.perf_counter()
    summary = probe_summary(model, tok, family, Budget(**budget_fields), name)
    summary["seconds"] = time.perf_counter() - t0
    return spec, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="the demo's output directory (results.json, measure_records.json)")
    ap.add_argument("--models", required=True, help="its --save-models directory (DIR/seedS/ARM/STAGE)")
    ap.add_argument("--base", default=None, help="the base model spec (default: the demo's, e.g. 'embedded')")
    ap.add_argument("--family", default="reverse_words", help="the probe family to re-measure")
    ap.add_argument("--steps", type=int, required=True, help="probe steps")
    ap.add_argument("--lr", type=float, required=True, help="probe learning rate")
    ap.add_argument("--probe-seeds", type=int, default=None, help="probe seeds per checkpoint (default: the demo's)")
    ap.add_argument("--warmup", type=int, default=0, help="probe learning-rate warm-up steps (default 0)")
    ap.add_argument("--clip", type=float, default=0.0, help="probe gradient-norm clipping (default 0 = none)")
    ap.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every N steps (default steps/5)")
    ap.add_argument("--workers", type=int, default=1, help="processes, one torch thread each")
    ap.add_argument("--arms", default=None, help="comma-separated arms to keep (default: all of the demo's)")
    ap.add_argument("--out", required=True, help="where to write the re-measured demo outputs")
    args = ap.parse_args(argv)
    if args.steps < 1 or not 0 < args.lr < 1 or args.workers < 1 or (args.probe_seeds or 1) < 1:
        ap.error("--steps >= 1, 0 < --lr < 1, --workers >= 1 and --probe-seeds >= 1")
    if args.warmup < 0 or args.clip < 0:
        ap.error("--warmup >= 0 and --clip >= 0 (0 = off)")

    from supple.testbed.analysis import analyze
    from supple.testbed.pipeline import summarize
    from supple.testbed.report import write_outputs
    from supple.testbed.settings import Budget

    with open(os.path.join(args.demo, "results.json"), encoding="utf-8") as fh:
        results = copy.deepcopy(json.load(fh))
    measure_path = os.path.join(args.demo, "measure_records.json")
    measure_rows = json.load(open(measure_path, encoding="utf-8")) if os.path.exists(measure_path) else []
    meta = results["meta"]
    if args.arms:
        keep = [a.strip() for a in args.arms.split(",") if a.strip()]
        unknown = sorted(set(keep) - set(meta["arms"]))
        if unknown:
            ap.error(f"--arms: {unknown} not in the demo's arms {meta['arms']}")
        meta["arms"] = [a for a in meta["arms"] if a in keep]
        results["records"] = [r for r in results["records"] if r["arm"] in keep]
    budget = replace(Budget.from_fields(meta["budget"]), probe_warmup=args.warmup, probe_max_grad_norm=args.clip)
    budget = budget.with_probe(args.family, args.steps, args.lr, args.eval_every)
    if args.probe_seeds:
        budget = replace(budget, probe_seeds=args.probe_seeds)
    base_spec = args.base or meta.get("model_spec") or "embedded"

    # which checkpoint each probed record needs: the base model once, every probed (seed, arm, stage)
    specs: dict[int, str] = {}
    for i, rec in enumerate(results["records"]):
        if not rec.get("probes"):  # not a probed checkpoint
            continue
        if rec["stage"] == "base":
            specs[i] = base_spec
        else:
            path = os.path.join(args.models, f"seed{rec['seed']}", rec["arm"], rec["stage"])
            if not os.path.isdir(path):
                ap.error(f"no checkpoint {path}: was the demo run with --save-models {args.models}?")
            specs[i] = path
    todo = list(dict.fromkeys(specs.values()))
    print(f"reprobe: {len(todo)} checkpoint(s), {args.family} {args.steps} steps @ {args.lr:g}, "
          f"{budget.probe_seeds} probe seeds, {args.workers} worker(s)", flush=True)
    jobs = [(spec, args.family, asdict(budget), 1) for spec in todo]
    t0 = time.perf_counter()
    probed: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        if args.workers == 1:
            done = map(_probe_one, jobs)
        else:
            import multiprocessing as mp

            done = stack.enter_context(mp.get_context("spawn").Pool(args.workers)).imap_unordered(_probe_one, jobs)
        for spec, summary in done:
            probed[spec] = summary
            print(f"  {spec}: final {summary['final_loss']:.3f} (noise {summary['final_loss_spread']:.3f}, "
                  f"{summary['seconds']:.0f} s)", flush=True)

    probes = meta.setdefault("families", {}).setdefault("probes", [])
    if args.family not in probes:  # a family the demo did not probe: added as the last one
        probes.append(args.family)
    for i, spec in specs.items():
        rec = results["records"][i]
        rec["probes"][args.family] = probed[spec]
        if (rec.get("probe") or {}).get("family") == args.family:
            rec["probe"] = probed[spec]
    meta["budget"]["probe_overrides"] = budget.probe_overrides  # the report names the settings each family ran
    meta["reprobe"] = {"family": args.family, "probe_steps": args.steps, "probe_lr": args.lr,
                       "probe_seeds": budget.probe_seeds, "probe_rank": budget.probe_rank,
                       "probe_batch": budget.probe_batch, "probe_format": budget.probe_format,
                       "probe_warmup": budget.probe_warmup, "probe_max_grad_norm": budget.probe_max_grad_norm,
                       "checkpoints": len(todo), "seconds": time.perf_counter() - t0,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "command": "python benchmarks/reprobe_demo.py " + " ".join(argv or sys.argv[1:])}
    meta.setdefault("notes", []).append(
        f"probe {args.family} re-measured on the saved checkpoints: {args.steps} steps @ lr {args.lr:g}"
        + (f", warm-up {args.warmup}" if args.warmup else "") + (f", clip {args.clip:g}" if args.clip else "") + " "
        "(benchmarks/reprobe_demo.py); the other probe families keep the run's own settings")
    results["summary"] = summarize(results["records"])
    results["analysis"] = analyze(results)
    meta["files"] = write_outputs(results, measure_rows, args.out)
    from supple.testbed.verdict import format_verdict

    print(format_verdict(results))
    print(f"wrote {', '.join(sorted(meta['files'].values()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
