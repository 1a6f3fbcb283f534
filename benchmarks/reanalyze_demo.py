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

``--join DIR`` (repeatable) adds the arms another run of the same settings trained on the same training seeds,
e.g. a supple setting run alone (``supple demo --arms supple --supple ...``) beside the baseline an earlier run
trained: the analysis keeps the training seeds both runs trained, the first run's arms and the arms only DIR ran
(``--arms`` drops some of the first run's arms first, e.g. its own supple arm). Both runs must have probed the base
model alike under the probe seeds they share, the check that the two runs are the same setup. ``--join`` applies
before ``--with``; the output needs ``--out``.

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
# Two runs' probes of the base model under one probe seed agree within this (absolute, loss units): runs of one
# session reproduce each other exactly, runs on other machines of the same kind in another session within 1e-4
# (word_codes, 2026-12-02); other probe settings differ by tenths. The base model's probe sd is 0.47.
_SAME_PROBE_ATOL = 1e-3


def _check_same(a: dict, b: dict, verb: str) -> None:
    """Refuse two runs whose settings (:data:`_SAME`) differ."""
    differ = [k for k in _SAME if a["meta"].get(k) != b["meta"].get(k)]
    if differ:
        raise ValueError(f"the runs differ in {', '.join(differ)}; only runs of the same settings {verb}")


def _primary_from_probes(records: list[dict]) -> None:
    """Each record's primary ``probe`` as its family's entry in ``probes``, after the probes were replaced."""
    for r in records:
        if r.get("probe") and r.get("probes"):
            r["probe"] = r["probes"].get(r["probe"].get("family"), r["probe"])


def _pool(a: dict, b: dict) -> dict:
    """Two runs' records as one run on the union of their training seeds (see the module doc)."""
    _check_same(a, b, "pool")
    shared = set(a["meta"]["seeds"]) & set(b["meta"]["seeds"])
    if shared:
        raise ValueError(f"both runs trained seed(s) {sorted(shared)}; pool runs on disjoint training seeds")
    arms = [x for x in a["meta"]["arms"] if x in b["meta"]["arms"]]
    if "supple" in arms and a["meta"].get("supple_overrides", {}) != b["meta"].get("supple_overrides", {}):
        raise ValueError(f"the runs' supple arms differ (--supple {a['meta'].get('supple_overrides', {})} vs "
                         f"{b['meta'].get('supple_overrides', {})}); pool runs of the same supple setting")
    records = [r for r in a["records"] + b["records"] if r["arm"] in arms]
    shared_notes = _align_probes(records)
    meta = {**a["meta"], "seeds": sorted(set(a["meta"]["seeds"]) | set(b["meta"]["seeds"])), "arms": arms}
    meta["pooled"] = [*a["meta"].get("pooled", [a["meta"].get("command")]), b["meta"].get("command")]
    meta["notes"] = [*a["meta"].get("notes", []), f"pooled with the run `{b['meta'].get('command')}` (seeds "
                     f"{b['meta']['seeds']}); the base model's probes are those with the most probe seeds", *shared_notes]
    return {**a, "meta": meta, "records": records}


def _align_probes(records: list[dict]) -> list[str]:
    """Records from two runs made comparable: every base-model record carries, per probe family, the base model's
    probe with the most probe seeds (the runs must agree under the probe seeds they share), every other checkpoint
    the probe seeds all of them ran (:func:`_shared_probe_seeds`, whose notes are returned), and each record's
    primary probe follows."""
    from supple.testbed.analysis import probe_seed_values, shared_probe_seed_difference

    base_probes: dict[str, dict] = {}
    apart: dict[str, float] = {}  # per family: the largest difference seen under a shared probe seed
    for r in records:
        if r["stage"] != "base":
            continue
        for fam, p in (r.get("probes") or {}).items():
            best = base_probes.get(fam)
            diff = shared_probe_seed_difference(p, best) if best is not None else None
            if diff is not None and diff > _SAME_PROBE_ATOL:
                raise ValueError(f"the base model's {fam} probe differs by {diff:.3g} under the same probe seeds "
                                 f"(more than {_SAME_PROBE_ATOL:g}): the runs probed it with other settings")
            if diff:
                apart[fam] = max(apart.get(fam, 0.0), diff)
            if best is None or len(probe_seed_values(p)) > len(probe_seed_values(best)):
                base_probes[fam] = p
    for r in records:
        if r["stage"] == "base" and r.get("probes"):
            r["probes"] = {fam: base_probes[fam] for fam in r["probes"]}
    notes = [f"the runs' base-model {fam} probes agree within {d:.1e} under the probe seeds they share (not exactly: "
             "floating-point differences between sessions)" for fam, d in apart.items()]
    notes += _shared_probe_seeds(records)
    _primary_from_probes(records)
    return notes


def _keep_arms(results: dict, arms: list[str]) -> dict:
    """The run with only ``arms`` (in its own order); the supple arm's settings go with the supple arm."""
    meta = results["meta"]
    unknown = [x for x in arms if x not in meta["arms"]]
    if unknown:
        raise ValueError(f"the run has no arm {', '.join(unknown)} (it ran {', '.join(meta['arms'])})")
    meta = {**meta, "arms": [x for x in meta["arms"] if x in arms]}
    if "supple" not in meta["arms"]:
        meta.update(supple_overrides={}, supple_configs={})
    meta["notes"] = [*meta.get("notes", []), f"arms kept: {', '.join(meta['arms'])} (--arms)"]
    return {**results, "meta": meta, "records": [r for r in results["records"] if r["arm"] in arms]}


def _join(a: dict, b: dict) -> dict:
    """Run ``a`` with the arms only run ``b`` trained, on the training seeds both trained (see the module doc)."""
    _check_same(a, b, "join")
    seeds = sorted(set(a["meta"]["seeds"]) & set(b["meta"]["seeds"]))
    if not seeds:
        raise ValueError(f"the runs share no training seed ({a['meta']['seeds']} vs {b['meta']['seeds']}): "
                         "join runs on the same seeds, pool runs on other seeds with --with")
    new = [x for x in b["meta"]["arms"] if x not in a["meta"]["arms"]]
    if not new:
        raise ValueError(f"it ran no arm the first run lacks (both ran {', '.join(b['meta']['arms'])}); drop the "
                         "first run's with --arms")
    records = [r for r in a["records"] if r["seed"] in seeds]
    records += [r for r in b["records"] if r["seed"] in seeds and r["arm"] in new]
    notes = _align_probes(records)
    meta = {**a["meta"], "seeds": seeds, "arms": [*a["meta"]["arms"], *new]}
    meta["arm_help"] = {**a["meta"].get("arm_help", {}), **{x: h for x, h in b["meta"].get("arm_help", {}).items()
                                                           if x in new}}
    if "supple" in new:
        meta["supple_overrides"] = b["meta"].get("supple_overrides", {})
    meta["supple_configs"] = {**a["meta"].get("supple_configs", {}), **{
        k: v for k, v in b["meta"].get("supple_configs", {}).items() if k.split("/")[0] in new}}
    meta["joined"] = [*a["meta"].get("joined", [a["meta"].get("command")]), b["meta"].get("command")]
    meta["notes"] = [*a["meta"].get("notes", []), *[n for n in b["meta"].get("notes", []) if n not in
                                                     a["meta"].get("notes", [])],
                     f"arm(s) {', '.join(new)} from the run `{b['meta'].get('command')}` on training seeds {seeds}; "
                     "the base model's probes are those with the most probe seeds", *notes]
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


def _measure_rows(inputs: list[tuple[str, list[dict]]], records: list[dict]) -> list[dict] | None:
    """The measurement rows (measure_records.json) of what the analysis kept: the base model's from the first run,
    each (arm, seed)'s from the first run whose records brought it. None when a run kept no measure_records.json."""
    from supple.testbed.report import read_measure_rows

    kept = {(r["arm"], r["seed"]) for r in records}
    claimed: set = set()
    rows: list[dict] = []
    for i, (d, recs) in enumerate(inputs):
        theirs = read_measure_rows(d)
        if theirs is None:
            return None
        mine = {(r["arm"], r["seed"]) for r in recs} & kept - claimed
        claimed |= mine
        for row in theirs:
            if row.get("arm") is None:
                if i == 0:
                    rows.append(row)
            elif (row["arm"], int(row["seed"])) in mine:
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo", help="the demo's output directory (its results.json)")
    ap.add_argument("--out", default=None, help="where to write the outputs (default: the demo's directory)")
    ap.add_argument("--with", dest="others", action="append", default=[], metavar="DIR",
                    help="pool another run of the same settings on other training seeds (repeatable; needs --out)")
    ap.add_argument("--arms", default=None, metavar="A,B",
                    help="keep only these of the first run's arms (comma-separated; needs --out)")
    ap.add_argument("--join", dest="joins", action="append", default=[], metavar="DIR",
                    help="add the arms another run of the same settings trained on the same training seeds "
                    "(repeatable; needs --out)")
    ap.add_argument("--metric", default="final_loss", choices=("final_loss", "tail_loss"),
                    help="the probe value to analyse (default final_loss; tail_loss needs --out)")
    args = ap.parse_args(argv)
    if args.metric != "final_loss" and not args.out:
        ap.error(f"--metric {args.metric} rewrites the probe values: pass --out DIR for it")
    for flag, used in (("--with", args.others), ("--join", args.joins), ("--arms", args.arms)):
        if used and not args.out:
            ap.error(f"{flag} writes another analysis than the run's: pass --out DIR for it")
    for d in (args.demo, *args.joins, *args.others):
        if not os.path.isfile(os.path.join(d, "results.json")):
            ap.error(f"no {os.path.join(d, 'results.json')}: pass a directory that `supple demo --out DIR` wrote")
    path = os.path.join(args.demo, "results.json")

    from supple.testbed.analysis import analyze
    from supple.testbed.records import summarize
    from supple.testbed.report import write_outputs
    from supple.testbed.verdict import format_verdict

    with open(path, encoding="utf-8") as fh:
        results = json.load(fh)
    if args.arms:
        try:
            results = _keep_arms(results, [x.strip() for x in args.arms.split(",") if x.strip()])
        except ValueError as exc:
            ap.error(f"--arms: {exc}")
    inputs = [(args.demo, results["records"])]  # each run and the records it brought, for its measure rows
    for flag, combine, dirs in (("--join", _join, args.joins), ("--with", _pool, args.others)):
        for d in dirs:
            with open(os.path.join(d, "results.json"), encoding="utf-8") as fh:
                other = json.load(fh)
            try:
                results = combine(results, other)
            except ValueError as exc:
                ap.error(f"{flag} {d}: {exc}")
            inputs.append((d, other["records"]))
    if args.metric != "final_loss":
        try:
            print(_read_metric(results, args.metric))
        except ValueError as exc:
            ap.error(f"--metric: {exc}")
    out = args.out or args.demo
    measure_rows = _measure_rows(inputs, results["records"]) if out != args.demo else None
    results["summary"] = summarize(results["records"])
    results["analysis"] = analyze(results)
    results["meta"]["reanalysis"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                     "command": "python benchmarks/reanalyze_demo.py " + " ".join(argv or sys.argv[1:])}
    files = write_outputs(results, measure_rows, out)
    print(format_verdict(results))
    print(f"wrote {', '.join(sorted(files.values()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
