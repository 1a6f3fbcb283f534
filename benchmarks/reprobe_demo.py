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


def _probe_one(args: tuple) -> tuple[str, int, dict, float]:
    """One (checkpoint, probe seed) run, in a worker process: the unit of parallel work."""
    spec, family, budget_fields, seed, threads = args
    import torch

    from supple.testbed.evaluation import load_testbed_model, probe_runs
    from supple.testbed.settings import Budget

    torch.set_num_threads(threads)
    model, tok, name = load_testbed_model(spec)
    t0 = time.perf_counter()
    (run,) = probe_runs(model, tok, family, Budget(**budget_fields), name, [seed])
    return spec, seed, run, time.perf_counter() - t0


_SAME_PROBE = ("probe_rank", "probe_batch", "probe_eval", "probe_format", "probe_warmup", "probe_max_grad_norm",
               "probe_cooldown")


def _other_run(ap, flag: str, directory: str, family: str, budget) -> list[dict]:
    """The records of another run's (or re-probe's) results.json in ``directory``, if it probed ``family`` with the
    same settings as ``budget`` (the probe seeds aside); otherwise ``flag``'s one-line error."""
    from supple.testbed.settings import Budget

    path = os.path.join(directory, "results.json")
    if not os.path.isfile(path):
        ap.error(f"{flag}: no {path}")
    with open(path, encoding="utf-8") as fh:
        other = json.load(fh)
    differ = _probe_differences(Budget.from_fields(other["meta"]["budget"]), budget, family)
    if differ:
        ap.error(f"{flag}: {path} probed with other settings ({', '.join(differ)})")
    return other["records"]


def _base_from(ap, directory: str, family: str, budget) -> dict:
    """The base model's ``family`` probe from another run's results.json, if it ran the same probe settings."""
    base = next((r for r in _other_run(ap, "--base-from", directory, family, budget) if r["stage"] == "base"), None)
    if base is None or family not in (base.get("probes") or {}):
        ap.error(f"--base-from: {os.path.join(directory, 'results.json')} has no base-model {family} probe")
    return base["probes"][family]


def _reusable(ap, directory: str, family: str, budget) -> dict[str, dict]:
    """Another re-probe's ``family`` probe records by :func:`_reuse_key`, if it ran the same probe settings."""
    return {_reuse_key(r): r["probes"][family] for r in _other_run(ap, "--reuse", directory, family, budget)
            if family in (r.get("probes") or {}) and "seeds" in r["probes"][family]}


def _reuse_key(rec: dict) -> str:
    """What a probe record measured: the base model (one model, whatever the record's seed and arm) or a
    (training seed, arm, stage) checkpoint."""
    return "base model" if rec["stage"] == "base" else f"seed {rec['seed']} {rec['arm']} {rec['stage']}"


def _seeds_kept(probe: dict | None) -> list[int] | None:
    """The probe seeds 0..k-1 whose per-seed values a probe record keeps, or None if it keeps none or others."""
    from supple.testbed.evaluation import probe_seed_order

    if not probe or "per_seed" not in probe:
        return None
    have = probe_seed_order(probe)
    return have if have == list(range(len(have))) else None


def _probe_differences(theirs, ours, family: str) -> list[str]:
    """The probe settings on ``family`` in which two budgets differ (the probe seeds aside)."""
    differ = [f"{k} {getattr(theirs, k)} vs {getattr(ours, k)}" for k in _SAME_PROBE
              if getattr(theirs, k) != getattr(ours, k)]
    if theirs.probe_settings(family) != ours.probe_settings(family):
        differ.append(f"{family} steps/lr/eval_every {theirs.probe_settings(family)} vs {ours.probe_settings(family)}")
    return differ


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
    ap.add_argument("--cooldown", type=int, default=0,
                    help="probe learning-rate decay to zero over the last N steps (default 0 = none)")
    ap.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every N steps (default steps/5)")
    ap.add_argument("--workers", type=int, default=1, help="processes, one torch thread each")
    ap.add_argument("--base-probe-seeds", type=int, default=None,
                    help="probe seeds for the base model (default: as many as the checkpoints'). The base model is "
                    "probed once per demo, so more seeds there are cheap; the analysis then resamples them on their own")
    ap.add_argument("--base-only", action="store_true",
                    help="re-measure the base model only; the checkpoints keep their recorded values of --family (with "
                    "--base-from: probe nothing, splice the other run's base-model probe in)")
    ap.add_argument("--base-from", default=None, metavar="DIR",
                    help="take the base model's --family probe from another demo's (or re-probe's) results.json in DIR "
                    "instead of probing it again; its probe settings must equal these. With more --base-probe-seeds "
                    "than it ran, only the missing probe seeds are probed and the two are merged")
    ap.add_argument("--reuse", action="append", default=None, metavar="DIR",
                    help="take the --family probe of every checkpoint (and the base model) that another re-probe's "
                    "results.json in DIR measured with these settings and probe seeds, matched by training seed, arm "
                    "and stage; probe only the rest (e.g. after adding an arm to a demo with --resume). May be given "
                    "more than once (a later DIR's record of the same checkpoint wins)")
    ap.add_argument("--extend", action="store_true",
                    help="where a checkpoint's own --family probe (in the demo's records) ran these settings under "
                    "probe seeds 0..k-1, probe only seeds k.. and merge the two records (what one run of every seed "
                    "writes); without it every probe seed is run again, which checks that the recorded ones reproduce")
    ap.add_argument("--arms", default=None, help="comma-separated arms to keep (default: all of the demo's)")
    ap.add_argument("--out", required=True, help="where to write the re-measured demo outputs")
    args = ap.parse_args(argv)
    if args.steps < 1 or not 0 < args.lr < 1 or args.workers < 1 or (args.probe_seeds or 1) < 1:
        ap.error("--steps >= 1, 0 < --lr < 1, --workers >= 1 and --probe-seeds >= 1")
    if args.warmup < 0 or args.clip < 0 or args.cooldown < 0:
        ap.error("--warmup >= 0, --clip >= 0 and --cooldown >= 0 (0 = off)")
    if args.cooldown > args.steps - args.warmup:
        ap.error(f"--cooldown {args.cooldown}: at most --steps minus --warmup ({args.steps - args.warmup})")
    if (args.base_probe_seeds or 1) < 1:
        ap.error("--base-probe-seeds >= 1")

    from supple.testbed.analysis import analyze, shared_probe_seed_difference
    from supple.testbed.evaluation import restrict_probe_seeds
    from supple.testbed.records import summarize
    from supple.testbed.report import read_measure_rows, write_outputs
    from supple.testbed.settings import Budget

    with open(os.path.join(args.demo, "results.json"), encoding="utf-8") as fh:
        results = copy.deepcopy(json.load(fh))
    measure_rows = read_measure_rows(args.demo)
    meta = results["meta"]
    if args.arms:
        keep = [a.strip() for a in args.arms.split(",") if a.strip()]
        unknown = sorted(set(keep) - set(meta["arms"]))
        if unknown:
            ap.error(f"--arms: {unknown} not in the demo's arms {meta['arms']}")
        meta["arms"] = [a for a in meta["arms"] if a in keep]
        results["records"] = [r for r in results["records"] if r["arm"] in keep]
        if measure_rows is not None:  # the base model's rows (arm None) and the kept arms'
            measure_rows = [r for r in measure_rows if r.get("arm") is None or r["arm"] in keep]
    recorded = Budget.from_fields(meta["budget"])
    budget = replace(recorded, probe_warmup=args.warmup, probe_max_grad_norm=args.clip, probe_cooldown=args.cooldown)
    budget = budget.with_probe(args.family, args.steps, args.lr, args.eval_every)
    if args.base_only:  # the base model must be probed as the checkpoints were
        differ = _probe_differences(recorded, budget, args.family)
        if differ:
            ap.error(f"--base-only: the checkpoints' {args.family} probe ran other settings ({', '.join(differ)}); "
                     "pass the demo's own --steps/--lr/--eval-every/--warmup/--clip/--cooldown")
    if args.probe_seeds:
        budget = replace(budget, probe_seeds=args.probe_seeds)
    base_budget = replace(budget, probe_seeds=args.base_probe_seeds) if args.base_probe_seeds else budget.for_base_model()
    base_spec = args.base or meta.get("model_spec") or "embedded"
    from supple.testbed.evaluation import probe_seed_order

    copied = _base_from(ap, args.base_from, args.family, base_budget) if args.base_from else None
    extend: list[int] = []  # base-model probe seeds to add to the copied ones
    if copied is not None and args.base_probe_seeds:
        have = probe_seed_order(copied)
        if have != list(range(len(have))):
            ap.error(f"--base-from: its base-model probe ran probe seeds {have}, not 0..{len(have) - 1}; "
                     "it cannot be extended")
        if args.base_probe_seeds < len(have):
            ap.error(f"--base-probe-seeds {args.base_probe_seeds}: --base-from's base model ran {len(have)} probe "
                     f"seeds; pass at least {len(have)} (or leave it out to copy them)")
        extend = list(range(len(have), args.base_probe_seeds))
    reusable: dict[str, dict] = {}
    for directory in args.reuse or []:  # a later DIR's record of the same checkpoint wins
        reusable.update(_reusable(ap, directory, args.family, budget))
    reused: dict[str, dict] = {}  # spec -> the probe record taken from --reuse
    # a recorded probe extended by the probe seeds it lacks, then merged: spec -> (that record, the seeds to add);
    # the base model's from --base-from with more --base-probe-seeds, and with --extend every checkpoint's own
    own: dict[str, tuple[dict, list[int]]] = {base_spec: (copied, extend)} if extend else {}
    differ = _probe_differences(recorded, budget, args.family) if args.extend else []
    if differ:
        ap.error(f"--extend: the demo's {args.family} probe ran other settings ({', '.join(differ)}); pass its own "
                 "--steps/--lr/--eval-every/--warmup/--clip/--cooldown, or leave --extend out")

    # which checkpoint each probed record needs: the base model once, every probed (seed, arm, stage)
    specs: dict[int, str] = {}
    for i, rec in enumerate(results["records"]):
        if not rec.get("probes"):  # not a probed checkpoint
            continue
        old_probe = reusable.get(_reuse_key(rec))
        wanted = (base_budget if rec["stage"] == "base" else budget).probe_seeds
        if old_probe is not None and old_probe["seeds"] == list(range(wanted)) and not (
                rec["stage"] == "base" and copied is not None):
            specs[i] = f"<reuse> {_reuse_key(rec)}"
            reused[specs[i]] = old_probe
        elif rec["stage"] == "base":
            if copied is None or extend:
                specs[i] = base_spec
        elif args.base_only:
            if args.family not in rec["probes"]:
                ap.error(f"--base-only: the checkpoints have no {args.family} probe to keep; re-measure them too")
        else:
            recorded_probe = (rec.get("probes") or {}).get(args.family)
            have = _seeds_kept(recorded_probe) if args.extend else None
            if have is not None and len(have) >= wanted:
                specs[i] = f"<own> {_reuse_key(rec)}"  # it already ran every wanted seed: kept as recorded
                reused[specs[i]] = restrict_probe_seeds(recorded_probe, list(range(wanted)))
                continue
            path = os.path.join(args.models, f"seed{rec['seed']}", rec["arm"], rec["stage"])
            if not os.path.isdir(path):
                ap.error(f"no checkpoint {path}: was the demo run with --save-models {args.models}?")
            specs[i] = path
            if have:
                own[path] = (recorded_probe, list(range(len(have), wanted)))
    todo = [s for s in dict.fromkeys(specs.values()) if s not in reused]
    n_own = len(own) - bool(extend)  # the checkpoints extended (--extend), the base model aside
    # the base model's probe seeds as it ends up: a copied probe keeps its own count
    n_base = len(probe_seed_order(copied)) if copied is not None and not extend else base_budget.probe_seeds
    print(f"reprobe: {len(todo)} checkpoint(s), {args.family} {args.steps} steps @ {args.lr:g}, "
          + (f"base model only, {n_base} probe seeds" if args.base_only else
             f"{budget.probe_seeds} probe seeds (base model {n_base})")
          + (f"; the base model's probe copied from {args.base_from}" if copied is not None and not extend else "")
          + (f"; the base model's probe from {args.base_from} extended by probe seeds {extend[0]}-{extend[-1]}"
             if extend else "")
          + (f"; {len(reused)} record(s) reused from {', '.join(args.reuse or ['the demo'])}" if reused else "")
          + (f"; {n_own} checkpoint(s) extended from their recorded probe seeds" if n_own else "")
          + f", {args.workers} worker(s)", flush=True)
    from supple.testbed.evaluation import merge_probe_records, summarize_probe_runs

    def budget_of(spec: str):
        return base_budget if spec == base_spec else budget

    def seeds_of(spec: str) -> list[int]:
        return own[spec][1] if spec in own else list(range(budget_of(spec).probe_seeds))

    jobs = [(spec, args.family, asdict(budget_of(spec)), seed, 1) for spec in todo for seed in seeds_of(spec)]
    t0 = time.perf_counter()
    runs: dict[str, dict[int, dict]] = {spec: {} for spec in todo}
    seconds: dict[str, float] = dict.fromkeys(todo, 0.0)
    probed: dict[str, dict] = dict(reused)
    with contextlib.ExitStack() as stack:
        if args.workers == 1:
            done = map(_probe_one, jobs)
        else:
            import multiprocessing as mp

            done = stack.enter_context(mp.get_context("spawn").Pool(args.workers)).imap_unordered(_probe_one, jobs)
        for spec, seed, run, sec in done:
            runs[spec][seed] = run
            seconds[spec] += sec
            if len(runs[spec]) == len(seeds_of(spec)):
                seeds = sorted(runs[spec])
                probed[spec] = {**summarize_probe_runs(args.family, seeds, [runs[spec][k] for k in seeds]),
                                "seconds": seconds[spec]}
                if spec in own:
                    probed[spec] = merge_probe_records(own[spec][0], probed[spec])
                print(f"  {spec}: final {probed[spec]['final_loss']:.3f} (noise {probed[spec]['final_loss_spread']:.3f}, "
                      f"{len(probed[spec]['seeds'])} probe seeds, {seconds[spec]:.0f} s)", flush=True)

    probes = meta.setdefault("families", {}).setdefault("probes", [])
    if args.family not in probes:  # a family the demo did not probe: added as the last one
        probes.append(args.family)
    reproduced = None
    old = next(r for r in results["records"] if r["stage"] == "base")["probes"].get(args.family)
    if base_spec in probed and old and "per_seed" in old and not _probe_differences(recorded, budget, args.family):
        # the probe seeds the base model had before must give the values recorded then
        reproduced = shared_probe_seed_difference(old, probed[base_spec])
        if reproduced is not None:
            print(f"  base model: the shared probe seeds reproduce the recorded values within {reproduced:.2e}")
    if copied is not None and not extend:
        probed["<base-from>"] = copied
        specs.update({i: "<base-from>" for i, rec in enumerate(results["records"]) if rec["stage"] == "base"})
    for i, spec in specs.items():
        rec = results["records"][i]
        rec["probes"][args.family] = probed[spec]
        if (rec.get("probe") or {}).get("family") == args.family:
            rec["probe"] = probed[spec]
    meta["budget"]["probe_overrides"] = budget.probe_overrides  # the report names the settings each family ran
    meta["reprobe"] = {"family": args.family, "probe_steps": args.steps, "probe_lr": args.lr,
                       "probe_seeds": budget.probe_seeds, "base_probe_seeds": base_budget.probe_seeds,
                       "base_only": args.base_only, "base_from": args.base_from, "base_extended_by": extend,
                       "reuse": args.reuse, "reused": len(reused), "extended": n_own,
                       "base_reproduced_within": reproduced, "probe_rank": budget.probe_rank,
                       "probe_batch": budget.probe_batch, "probe_format": budget.probe_format,
                       "probe_warmup": budget.probe_warmup, "probe_max_grad_norm": budget.probe_max_grad_norm,
                       "probe_cooldown": budget.probe_cooldown,
                       "checkpoints": len(todo), "seconds": time.perf_counter() - t0,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "command": "python benchmarks/reprobe_demo.py " + " ".join(argv or sys.argv[1:])}
    meta.setdefault("notes", []).append(
        f"probe {args.family} re-measured on the saved checkpoints: {args.steps} steps @ lr {args.lr:g}"
        + (f", warm-up {args.warmup}" if args.warmup else "") + (f", clip {args.clip:g}" if args.clip else "")
        + (f", cool-down {args.cooldown}" if args.cooldown else "")
        + ("" if args.base_only else f", {budget.probe_seeds} probe seeds per checkpoint") + " "
        "(benchmarks/reprobe_demo.py); the other probe families keep the run's own settings (and the budget line "
        "its probe seeds)")
    results["summary"] = summarize(results["records"])
    results["analysis"] = analyze(results)
    meta["files"] = write_outputs(results, measure_rows, args.out)
    from supple.testbed.verdict import format_verdict

    print(format_verdict(results))
    print(f"wrote {', '.join(sorted(meta['files'].values()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
