"""Redo a finished demo's statistics with this version's analysis, from its results.json alone.

Training and measurements are untouched: the records are read back as they are and only the verdict, the tables and
the plots are recomputed (e.g. the probes' intervals that resample probe seeds as well as training seeds, see
docs/demo.md, "How sure is a probe result"). ``meta.reanalysis`` records the command and the date.

    python benchmarks/reanalyze_demo.py docs/demo/main_job            # in place
    python benchmarks/reanalyze_demo.py docs/demo/main_job --out /tmp/main_job_now

``--with DIR`` (repeatable) pools runs of the same settings on disjoint training seeds into one analysis: the
arms all of them ran, every training seed, and for each probe family the base model's probe with the most probe
seeds (the runs must agree on the probe seeds they share). Where the runs probed their checkpoints under different
probe seeds (e.g. 8 in a re-probe, 4 in a run), every checkpoint keeps only the probe seeds all of them ran, so the
probe intervals still resample probe seeds as well as training seeds (the analysis resamples training seeds only
when the checkpoints disagree); the notes say so. The output needs ``--out``.

``--metric tail_loss`` reads each probe's tail loss (the mean held-out loss of its evaluations in the second half of
the probe, ``supple.measure.probe.tail_loss``) where the analysis reads the final loss, for every probe record that
kept it per probe seed; it also needs ``--out``, and the outputs' notes say which value the tables show.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_SAME = ("model", "stages", "families", "lora")


def _primary_from_probes(records: list[dict]) -> None:
    """Each record's primary ``probe`` as its family's entry in ``probes``, after the probes were replaced."""
    for r in records:
        if r.get("probe") and r.get("probes"):
            r["probe"] = r["probes"].get(r["probe"].get("family"), r["probe"])


def _pool(a: dict, b: dict) -> dict:
    """Two runs' records as one run on the union of their training seeds (see the module doc)."""
    differ = [k for k in _SAME if a["meta"].get(k) != b["meta"].get(k)]
    if differ:
        raise ValueError(f"the runs differ in {', '.join(differ)}; only runs of the same settings pool")
    shared = set(a["meta"]["seeds"]) & set(b["meta"]["seeds"])
    if shared:
        raise ValueError(f"both runs trained seed(s) {sorted(shared)}; pool runs on disjoint training seeds")
    arms = [x for x in a["meta"]["arms"] if x in b["meta"]["arms"]]
    records = [r for r in a["records"] + b["records"] if r["arm"] in arms]
    from supple.testbed.analysis import probe_seed_values, shared_probe_seed_difference

    base_probes: dict[str, dict] = {}  # per family: the base model's probe with the most probe seeds
    for r in records:
        if r["stage"] != "base":
            continue
        for fam, p in (r.get("probes") or {}).items():
            best = base_probes.get(fam)
            if best is not None and (shared_probe_seed_difference(p, best) or 0.0) > 1e-9:
                raise ValueError(f"the base model's {fam} probe differs under the same probe seeds")
            if best is None or len(probe_seed_values(p)) > len(probe_seed_values(best)):
                base_probes[fam] = p
    for r in records:
        if r["stage"] == "base" and r.get("probes"):
            r["probes"] = {fam: base_probes[fam] for fam in r["probes"]}
    shared_notes = _shared_probe_seeds(records)
    _primary_from_probes(records)
    meta = {**a["meta"], "seeds": sorted(set(a["meta"]["seeds"]) | set(b["meta"]["seeds"])), "arms": arms}
    meta["pooled"] = [*a["meta"].get("pooled", [a["meta"].get("command")]), b["meta"].get("command")]
    meta["notes"] = [*a["meta"].get("notes", []), f"pooled with the run `{b['meta'].get('command')}` (seeds "
                     f"{b['meta']['seeds']}); the base model's probes are those with the most probe seeds", *shared_notes]
    return {**a, "meta": meta, "records": records}


def _shared_probe_seeds(records: list[dict]) -> list[str]:
    """Restrict every checkpoint's probe of a family to the probe seeds all checkpoints ran (the base model keeps
    its own; ``supple.testbed.evaluation.restrict_probe_seeds``). Returns a note per family that lost probe
    seeds."""
    from supple.testbed.analysis import probe_seed_values
    from supple.testbed.evaluation import restrict_probe_seeds

    notes = []
    families = list(dict.fromkeys(f for r in records if r["stage"] != "base" for f in (r.get("probes") or {})))
    for fam in families:
        probed = [r["probes"][fam] for r in records if r["stage"] != "base" and fam in (r.get("probes") or {})]
        try:
            sets = [set(probe_seed_values(p)) for p in probed]
        except KeyError:  # a record without per-seed values: nothing to align
            continue
        keep = sorted(set.intersection(*sets))
        if all(s == set(keep) for s in sets):
            continue
        if len(keep) < 2:
            raise ValueError(f"the checkpoints share fewer than 2 {fam} probe seeds; re-probe them under the same ones")
        for r in records:
            if r["stage"] != "base" and fam in (r.get("probes") or {}):
                r["probes"][fam] = restrict_probe_seeds(r["probes"][fam], keep)
        notes.append(f"{fam}: every checkpoint keeps the probe seeds all of them ran ({keep}), so the probe "
                     "intervals resample probe seeds too")
    return notes


def _read_metric(results: dict, metric: str) -> str:
    """Each probe's ``metric`` in place of its final loss (mean, per probe seed and spread), for the probe families
    whose every record kept it per probe seed; the others keep the final loss. Returns what was read, in words."""
    probed = [(r, fam, p) for r in results["records"] for fam, p in (r.get("probes") or {}).items()]
    families = list(dict.fromkeys(fam for _, fam, _ in probed))
    lacking = {fam for _, fam, p in probed if metric not in (p.get("per_seed") or {}) or metric not in p}
    chosen = [f for f in families if f not in lacking]
    if not chosen:
        raise ValueError(f"no probe family kept a per-probe-seed {metric} in every record (written before it was "
                         "kept): re-probe one (benchmarks/reprobe_demo.py)")
    for _, fam, p in probed:
        if fam in chosen:
            vals = [float(v) for v in p["per_seed"][metric]]
            p.update(final_loss=float(p[metric]), final_loss_spread=max(vals) - min(vals))
            p["per_seed"]["final_loss"] = vals
    _primary_from_probes(results["records"])
    said = f"probe values are the {metric} for {', '.join(chosen)}" + (
        f"; the final loss for {', '.join(f for f in families if f in lacking)} (no per-probe-seed {metric})"
        if lacking else "")
    results["meta"].setdefault("notes", []).append(
        f"{said} (benchmarks/reanalyze_demo.py --metric), read where the tables say final loss")
    return said


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo", help="the demo's output directory (its results.json)")
    ap.add_argument("--out", default=None, help="where to write the outputs (default: the demo's directory)")
    ap.add_argument("--with", dest="others", action="append", default=[], metavar="DIR",
                    help="pool another run of the same settings on other training seeds (repeatable; needs --out)")
    ap.add_argument("--metric", default="final_loss", choices=("final_loss", "tail_loss"),
                    help="the probe value to analyse (default final_loss; tail_loss needs --out)")
    args = ap.parse_args(argv)
    if args.metric != "final_loss" and not args.out:
        ap.error(f"--metric {args.metric} rewrites the probe values: pass --out DIR for it")
    if args.others and not args.out:
        ap.error("--with writes a pooled analysis: pass --out DIR for it")
    for d in (args.demo, *args.others):
        if not os.path.isfile(os.path.join(d, "results.json")):
            ap.error(f"no {os.path.join(d, 'results.json')}: pass a directory that `supple demo --out DIR` wrote")
    path = os.path.join(args.demo, "results.json")

    from supple.testbed.analysis import analyze
    from supple.testbed.records import summarize
    from supple.testbed.report import write_outputs
    from supple.testbed.verdict import format_verdict

    with open(path, encoding="utf-8") as fh:
        results = json.load(fh)
    for d in args.others:
        with open(os.path.join(d, "results.json"), encoding="utf-8") as fh:
            try:
                results = _pool(results, json.load(fh))
            except ValueError as exc:
                ap.error(f"--with {d}: {exc}")
    if args.metric != "final_loss":
        try:
            print(_read_metric(results, args.metric))
        except ValueError as exc:
            ap.error(f"--metric: {exc}")
    out = args.out or args.demo
    measure_path = os.path.join(args.demo, "measure_records.json")
    measure_rows = None
    if out != args.demo and os.path.exists(measure_path):
        with open(measure_path, encoding="utf-8") as fh:
            measure_rows = json.load(fh).get("records", [])
    results["summary"] = summarize(results["records"])
    results["analysis"] = analyze(results)
    results["meta"]["reanalysis"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                     "command": "python benchmarks/reanalyze_demo.py " + " ".join(argv or sys.argv[1:])}
    files = write_outputs(results, measure_rows, out)
    print(format_verdict(results))
    print(f"wrote {', '.join(sorted(os.path.join(out, f) for f in files.values()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
