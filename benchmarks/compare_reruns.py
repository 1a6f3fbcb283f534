"""An A/A check of the demo: the same arm, seeds and stages trained twice, metric by metric.

Two demo runs of one setting should give the same records. Within one session on one machine they do, bit for bit;
across sessions (another machine of the same kind) the first training step's loss already differs in the sixth
digit, and over hundreds of full fine-tuning steps that rounding grows into a different model. This script shows how
far apart the two runs end, per training seed and stage, so that a difference between two arms that ran in different
sessions can be read against the difference between two runs of one arm:

    python benchmarks/compare_reruns.py docs/demo/pilot_240/with_supple_base48 docs/demo/pilot_240/baseline_rerun_seeds_0_1 \\
        --arm baseline --out docs/demo/pilot_240/baseline_rerun_seeds_0_1/aa.md

For each (seed, stage) both runs trained it prints the step at which their training losses first differ (relative
difference above ``--tol``) and, for the metrics the demo judges arms on, both values and their difference; then,
per metric, the largest absolute difference over seeds at the last stage compared. ``--arm-b`` names the arm of the
second run when it differs (``--arm baseline --arm-b supple --stages sft,dpo``: a supple setting that is off in
those stages).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from supple.testbed.analysis import probe_seed_values  # noqa: E402
from supple.testbed.records import flat_metrics  # noqa: E402

# the metrics the demo's verdict and stage-quality check read, by how flat_metrics names them
_PREFIXES = ("acc/", "answer_ce/", "forget_ce/", "forget_acc/")
_TRAIN = ("train/loss_final", "train/rewards/margins_final", "train/rewards/accuracies_final",
          "train/heldout/rewards/margins", "train/heldout/rewards/accuracies")


def _load(path: str) -> dict:
    f = os.path.join(path, "results.json") if os.path.isdir(path) else path
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


def record_metrics(r: dict) -> dict[str, float]:
    """The judged metrics of one stage record: task accuracies and answer CEs, forgetting, and the stage's own
    training and preference numbers (the probes are compared per probe seed, :func:`probe_means`)."""
    return {k: v for k, v in flat_metrics(r).items() if k.startswith(_PREFIXES) or k in _TRAIN}


def probe_means(a: dict, b: dict) -> dict[str, tuple[float, float]]:
    """``probe/FAMILY: (mean in a, mean in b)`` of each probe family's final loss over the probe seeds both records
    ran (a re-probe may have run more of them than the demo); the records' own means where either kept no per-seed
    values."""
    out = {}
    pa, pb = a.get("probes") or {}, b.get("probes") or {}
    for fam in sorted(set(pa) & set(pb)):
        try:
            va, vb = probe_seed_values(pa[fam]), probe_seed_values(pb[fam])
        except KeyError:
            if "final_loss" in pa[fam] and "final_loss" in pb[fam]:
                out[f"probe/{fam}"] = (float(pa[fam]["final_loss"]), float(pb[fam]["final_loss"]))
            continue
        shared = sorted(set(va) & set(vb))
        if shared:
            out[f"probe/{fam} (probe seeds {','.join(map(str, shared))})"] = (
                sum(va[k] for k in shared) / len(shared), sum(vb[k] for k in shared) / len(shared))
    return out


def first_divergent_step(a: dict, b: dict, tol: float) -> int | None:
    """The first logged step whose training loss differs between the records by more than ``tol`` (relative);
    None when every step both logged agrees."""
    la = {e["step"]: e["loss"] for e in (a.get("train") or {}).get("log_history", []) if "loss" in e}
    lb = {e["step"]: e["loss"] for e in (b.get("train") or {}).get("log_history", []) if "loss" in e}
    for step in sorted(set(la) & set(lb)):
        x, y = float(la[step]), float(lb[step])
        if abs(x - y) > tol * max(abs(x), abs(y), 1e-12):
            return int(step)
    return None


def compare(a: dict, b: dict, arm: str, tol: float = 1e-9, arm_b: str | None = None,
            stages: list[str] | None = None) -> dict:
    """Per (seed, stage) both runs hold (``arm`` in A, ``arm_b``, default ``arm``, in B; only ``stages`` when
    given): the first divergent step and every shared judged metric."""
    arm_b = arm_b or arm
    ra = {(r["seed"], r["stage"]): r for r in a["records"] if r.get("arm") == arm}
    rb = {(r["seed"], r["stage"]): r for r in b["records"] if r.get("arm") == arm_b}
    shared = sorted((k for k in set(ra) & set(rb) if stages is None or k[1] in stages),
                    key=lambda k: (k[0], ra[k].get("stage_index", 0)))
    if not shared:
        raise SystemExit(f"compare_reruns: the two runs share no (seed, stage) record of arm {arm!r}"
                         + (f" / {arm_b!r}" if arm_b != arm else "") + (f" in stages {stages}" if stages else ""))
    rows = []
    for key in shared:
        ma, mb = record_metrics(ra[key]), record_metrics(rb[key])
        metrics = {m: (ma[m], mb[m]) for m in sorted(set(ma) & set(mb))}
        metrics.update(probe_means(ra[key], rb[key]))
        metrics = {m: (x, y) for m, (x, y) in metrics.items()
                   if all(isinstance(v, float) and math.isfinite(v) for v in (x, y))}
        rows.append({"seed": key[0], "stage": key[1], "stage_index": ra[key].get("stage_index", 0),
                     "diverges_at": first_divergent_step(ra[key], rb[key], tol), "metrics": metrics})
    last = max(r["stage_index"] for r in rows)
    spread: dict[str, float] = {}
    for r in rows:
        if r["stage_index"] == last:
            for m, (x, y) in r["metrics"].items():
                spread[m] = max(spread.get(m, 0.0), abs(y - x))
    return {"arm": arm if arm_b == arm else f"{arm} (A) / {arm_b} (B)", "rows": rows,
            "last_stage_max_abs_diff": spread}


def format_markdown(res: dict, name_a: str, name_b: str) -> str:
    lines = [f"# A/A: arm {res['arm']}, {name_a} (A) against {name_b} (B)", ""]
    for r in res["rows"]:
        div = "no step (every logged step is equal)" if r["diverges_at"] is None else f"step {r['diverges_at']}"
        lines += [f"## seed {r['seed']}, stage {r['stage']}: training losses first differ at {div}", "",
                  "| metric | A | B | B − A |", "|---|---:|---:|---:|"]
        lines += [f"| {m} | {x:.4f} | {y:.4f} | {y - x:+.4f} |" for m, (x, y) in r["metrics"].items()]
        lines.append("")
    lines += ["## Largest |B − A| over training seeds, last stage compared", "", "| metric | max abs diff |", "|---|---:|"]
    lines += [f"| {m} | {v:.4f} |" for m, v in sorted(res["last_stage_max_abs_diff"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="the first run's output directory (or its results.json)")
    ap.add_argument("b", help="the second run's output directory (or its results.json)")
    ap.add_argument("--arm", default="baseline", help="the arm both runs trained (default baseline)")
    ap.add_argument("--arm-b", default=None, help="the arm in the second run, when it has another name (e.g. a "
                    "supple setting that leaves the first stages as the baseline's)")
    ap.add_argument("--stages", default=None, help="comma-separated stages to compare (default: every stage both hold)")
    ap.add_argument("--tol", type=float, default=1e-9, help="relative difference of a step's loss counted as "
                    "divergence (default 1e-9)")
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    args = ap.parse_args(argv)
    stages = [x.strip() for x in args.stages.split(",") if x.strip()] if args.stages else None
    res = compare(_load(args.a), _load(args.b), args.arm, args.tol, args.arm_b, stages)
    text = format_markdown(res, args.a, args.b)
    print(text, end="")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
