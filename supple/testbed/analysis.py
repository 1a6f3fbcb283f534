"""The demo's verdict per arm, paired by training seed against the baseline (:mod:`supple.testbed.stats`).

For every arm, at the last stage: the share of the baseline's plasticity gap it recovers on each probe family, the
share of the out-of-domain accuracy drop it recovers, forgetting of the first stage's task, each stage's own
quality, OOD accuracy, ECE and training wall time relative to the baseline — each with a paired bootstrap 95 %
interval over training seeds. Also the baseline's own degradation (is there a problem to solve?) and the probe's own
noise (spread over probe seeds on one checkpoint), which must be small next to that degradation.

A probe's intervals resample probe seeds as well as training seeds (:func:`~supple.testbed.stats.crossed_bootstrap_ci`)
when every record involved kept its per-probe-seed values (``probes[family].per_seed.final_loss``) for the same probe
seeds; ``ci`` says which interval an entry holds, and a crossed entry keeps the training-seeds-only interval as
``lo_seeds`` / ``hi_seeds``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .evaluation import probe_seed_order
from .stats import (
    bootstrap_ci,
    difference_from_base_crossed,
    paired_difference,
    paired_difference_crossed,
    recovered_share,
    recovered_share_crossed,
)

__all__ = ["analyze", "probe_seed_values", "shared_probe_seed_difference", "stage_quality_keys"]


def probe_seed_values(probe: dict) -> dict[int, float]:
    """A probe record's final loss per probe seed (``per_seed.final_loss`` under ``seeds``; records written before
    ``seeds`` was kept ran probe seeds 0, 1, ...). Raises KeyError when the record kept no per-seed values."""
    return dict(zip(probe_seed_order(probe), (float(v) for v in probe["per_seed"]["final_loss"])))


def shared_probe_seed_difference(a: dict, b: dict) -> float | None:
    """The largest |difference| between two probe records over the probe seeds both ran (None if they share none):
    two measurements of one model under one probe seed must agree."""
    va, vb = probe_seed_values(a), probe_seed_values(b)
    shared = set(va) & set(vb)
    return max(abs(va[k] - vb[k]) for k in shared) if shared else None


def stage_quality_keys(stage: dict) -> list[tuple[str, Callable[[dict], float]]]:
    """(label, getter on the stage's record) of a stage's own quality: its task's held-out accuracy, and for
    DPO the final reward accuracy and margin (mean over the last quarter of training) and the same two on held-out
    pairs (absent from records of runs before they existed: NaN, left out of the goal), for GRPO the reward."""
    fam = stage["family"]
    out: list[tuple[str, Callable[[dict], float]]] = [
        (f"{stage['name']} acc {fam}", lambda r, f=fam: r["tasks"][f]["acc"])]
    if stage["kind"] == "dpo":
        out += [(f"{stage['name']} reward acc", lambda r: r["train"]["rewards/accuracies_final"]),
                (f"{stage['name']} reward margin", lambda r: r["train"]["rewards/margins_final"]),
                (f"{stage['name']} held-out reward acc", lambda r: r["train"]["heldout/rewards/accuracies"]),
                (f"{stage['name']} held-out reward margin", lambda r: r["train"]["heldout/rewards/margins"])]
    if stage["kind"] == "grpo":
        out.append((f"{stage['name']} reward", lambda r: r["train"]["reward_final"]))
    return out


def _get(r: dict, fn: Callable[[dict], float]) -> float:
    try:
        v = float(fn(r))
    except (KeyError, TypeError):
        return float("nan")
    return v


def analyze(results: dict) -> dict:
    """The per-arm verdict (see the module doc) from a demo's ``results`` (``records`` and ``meta``)."""
    meta, records = results["meta"], results["records"]
    stages = meta["stages"]
    last = len(stages)
    fams = meta["families"]
    probes = fams.get("probes") or [fams["probe"]]
    ood = fams["ood"]
    first_fam = stages[0]["family"]
    base = next((r for r in records if r["stage_index"] == 0), None)
    by = {(r["arm"], r["seed"], r["stage_index"]): r for r in records}
    seeds = sorted({r["seed"] for r in records})
    arms = list(dict.fromkeys(r["arm"] for r in records))
    out: dict = {"last_stage": stages[-1]["name"], "seeds": seeds, "probes": probes, "ood": ood, "arms": {}}
    if base is None or "baseline" not in arms:
        out["error"] = "needs the base model and the baseline arm"
        return out

    def col(arm: str, idx: int, fn: Callable[[dict], float]) -> list[float]:
        return [_get(by[(arm, s, idx)], fn) if (arm, s, idx) in by else float("nan") for s in seeds]

    def probe_fn(fam: str, key: str = "final_loss") -> Callable[[dict], float]:
        return lambda r: (r.get("probes") or {fam: r["probe"]})[fam][key]

    def ood_fn(r: dict) -> float:
        return r["tasks"][ood]["acc"]

    def per_probe_seed(r: dict | None, fam: str) -> tuple[tuple[int, ...], list[float]] | None:
        try:
            vals = probe_seed_values(r["probes"][fam])
        except (KeyError, TypeError):
            return None
        return tuple(vals), list(vals.values())

    def probe_tables(fam: str, *arms_: str) -> tuple[list[float], list[list[list[float]]], bool] | None:
        """The base model's per-probe-seed values, one (training seeds x probe seeds) table per arm, and whether
        the base model was probed under the same probe seeds as the checkpoints (paired) or under its own (e.g.
        more of them). None when a record lacks them or the checkpoints disagree on the probe seeds (then only
        training seeds resample)."""
        b = per_probe_seed(base, fam)
        got = [per_probe_seed(by.get((arm, s, last)), fam) for arm in arms_ for s in seeds]
        if b is None or any(g is None for g in got) or len({g[0] for g in got}) != 1 or len(got[0][1]) < 2:
            return None
        vals = [g[1] for g in got]
        paired = b[0] == got[0][0]
        if not paired and len(b[1]) < 2:
            return None
        return b[1], [vals[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(arms_))], paired

    def crossed(d_crossed: dict, d_seeds: dict, paired: bool, n_base: int) -> dict:
        how = "training and probe seeds" + ("" if paired else f" (base model: its own {n_base} probe seeds)")
        return {**d_crossed, "lo_seeds": d_seeds["lo"], "hi_seeds": d_seeds["hi"], "ci": how}

    # the problem: the baseline's degradation from the base model, and the probe's own noise
    problem = {}
    for fam in probes:
        b = _get(base, probe_fn(fam))
        vals = col("baseline", last, probe_fn(fam))
        d = {**paired_difference(vals, [b] * len(vals)), "ci": "training seeds"}
        tables = probe_tables(fam, "baseline")
        if tables is not None:
            base_ps, (bl,), paired = tables
            d = crossed(paired_difference_crossed(bl, [base_ps] * len(seeds)) if paired
                        else difference_from_base_crossed(bl, base_ps), d, paired, len(base_ps))
        noise_base = _get(base, probe_fn(fam, "final_loss_spread"))
        noise_last = [v for v in col("baseline", last, probe_fn(fam, "final_loss_spread")) if math.isfinite(v)]
        known = [v for v in (noise_base, *noise_last) if math.isfinite(v)]
        worst = max(known) if known else float("nan")
        ps = per_probe_seed(base, fam)
        sd = _sd(ps[1]) if ps is not None else float("nan")
        se_base = sd / math.sqrt(len(ps[1])) if ps is not None else float("nan")
        se = _probe_seed_se(se_base, [per_probe_seed(by.get(("baseline", s, last)), fam) for s in seeds])
        problem[f"probe {fam}"] = {"base": b, **d, "noise": noise_base, "noise_sd": sd, "noise_se_base": se_base,
                                   "n_probe_base": len(ps[1]) if ps is not None else 0,
                                   "noise_last": max(noise_last) if noise_last else float("nan"),
                                   # quiet: the probe's own noise (one run's spread over probe seeds, on the base
                                   # model and on every baseline checkpoint) at most a third of the change
                                   "quiet": bool(math.isfinite(worst) and worst <= abs(d["estimate"]) / 3),
                                   # the standard error the probe seeds add to the change as measured (means over
                                   # probe seeds), and whether that is at most a third of it
                                   "noise_se": se,
                                   "quiet_mean": bool(math.isfinite(se) and se <= abs(d["estimate"]) / 3),
                                   "degraded": d["lo"] > 0}  # the probe loss rose, CI above 0
    b_ood = _get(base, ood_fn)
    vals = col("baseline", last, ood_fn)
    d = {**paired_difference(vals, [b_ood] * len(vals)), "ci": "training seeds"}
    problem[f"OOD acc {ood}"] = {"base": b_ood, **d, "degraded": d["hi"] < 0}  # accuracy fell, CI below 0
    out["problem"] = problem
    noise = [r["probes"][f]["final_loss_spread"] for r in records for f in probes
             if r.get("probes") and f in r["probes"] and "final_loss_spread" in r["probes"][f]]
    out["probe_noise_mean"] = sum(noise) / len(noise) if noise else float("nan")

    bl_wall = [sum(_get(by[("baseline", s, i)], lambda r: r["train"]["wall_s"]) for i in range(1, last + 1))
               for s in seeds if all(("baseline", s, i) in by for i in range(1, last + 1))]
    for arm in arms:
        a: dict = {}
        for fam in probes:
            b = _get(base, probe_fn(fam))
            share = {**recovered_share(b, col("baseline", last, probe_fn(fam)), col(arm, last, probe_fn(fam)),
                                       higher_is_better=False), "ci": "training seeds"}
            tables = probe_tables(fam, "baseline", arm)
            if tables is not None:
                base_ps, (bl, ar), paired = tables
                share = crossed(recovered_share_crossed(base_ps, bl, ar, higher_is_better=False, paired_base=paired),
                                share, paired, len(base_ps))
            a[f"recovered probe {fam}"] = share
            # the arm against the baseline directly (arm − baseline, lower = more plastic): paired in training
            # and probe seeds, and free of the base model, the noisiest checkpoint
            diff = {**paired_difference(col(arm, last, probe_fn(fam)), col("baseline", last, probe_fn(fam))),
                    "ci": "training seeds"}
            if tables is not None:
                diff = crossed(paired_difference_crossed(ar, bl), diff, True, len(base_ps))  # no base model in it
            a[f"probe {fam} vs baseline"] = diff
            a[f"probe {fam}"] = _mean_ci(col(arm, last, probe_fn(fam)))
        a["recovered OOD"] = recovered_share(b_ood, col("baseline", last, ood_fn), col(arm, last, ood_fn),
                                             higher_is_better=True)
        a[f"OOD acc {ood}"] = _mean_ci(col(arm, last, ood_fn))
        a["ECE"] = _mean_ci(col(arm, last, lambda r: r["ece"]))
        a[f"forgetting {first_fam} acc"] = _mean_ci(col(arm, last, lambda r: r["tasks"][first_fam]["acc"]))
        a[f"forgetting {first_fam} CE"] = _mean_ci(col(arm, last, lambda r: r["tasks"][first_fam]["answer_ce"]))
        a[f"forgetting {first_fam} CE vs baseline"] = paired_difference(
            col(arm, last, lambda r: r["tasks"][first_fam]["answer_ce"]),
            col("baseline", last, lambda r: r["tasks"][first_fam]["answer_ce"]))
        quality = {}
        for i, st in enumerate(stages, start=1):
            for label, fn in stage_quality_keys(st):
                arm_v, bl_v = col(arm, i, fn), col("baseline", i, fn)
                rel = bootstrap_ci([arm_v, bl_v], _ratio_of_means)
                quality[label] = {**_mean_ci(arm_v), "relative": rel}
        a["stage quality"] = quality
        wall = [sum(_get(by[(arm, s, i)], lambda r: r["train"]["wall_s"]) for i in range(1, last + 1))
                for s in seeds if all((arm, s, i) in by for i in range(1, last + 1))]
        a["wall time vs baseline"] = (sum(wall) / sum(bl_wall)) if wall and bl_wall and sum(bl_wall) else float("nan")
        out["arms"][arm] = a
    out["goal"] = {arm: _goal(out, arm) for arm in arms if arm != "baseline"}
    return out


def _sd(vals: list[float]) -> float:
    """Sample standard deviation (n − 1); NaN for fewer than 2 values."""
    if len(vals) < 2:
        return float("nan")
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _probe_seed_se(se_base: float, last: list[tuple | None]) -> float:
    """The standard error that the probe seeds add to the baseline's change on a probe, base model vs the mean of
    the baseline's last-stage checkpoints, each a mean over its probe seeds: sqrt(s_b² / n_b + s̄_c² / (n_c · T)),
    with ``se_base`` = s_b / √n_b the base model's standard error over its n_b probe seeds, s̄_c² the mean over the
    T checkpoints of their variance over their probe seeds, n_c the probe seeds per checkpoint. NaN without
    per-seed values (≥ 2 each)."""
    if not math.isfinite(se_base) or not last or any(c is None or len(c[1]) < 2 for c in last):
        return float("nan")
    var_c = sum(_sd(c[1]) ** 2 for c in last) / len(last)
    n_c = sum(len(c[1]) for c in last) / len(last)
    return math.sqrt(se_base ** 2 + var_c / (n_c * len(last)))


def _ratio_of_means(a: list[float], b: list[float]) -> float:
    mb = sum(b) / len(b)
    return (sum(a) / len(a)) / mb if mb else float("nan")


def _mean_ci(vals: list[float]) -> dict:
    vals = [v for v in vals if math.isfinite(v)]
    if not vals:
        return {"estimate": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    return bootstrap_ci([vals], lambda x: sum(x) / len(x))


def _goal(out: dict, arm: str) -> dict:
    """The demo's goal for an arm: ≥ 50 % of the plasticity gap (every probe family) and of the OOD drop
    recovered with CI lower bounds above 0, forgetting no worse than the baseline's (the paired CI of the CE
    difference does not lie above 0), every stage's quality within 5 % of the baseline's."""
    a = out["arms"][arm]
    checks = {}
    for fam in out["probes"]:  # a probe on which the baseline lost no plasticity has no gap to recover
        if out["problem"][f"probe {fam}"]["degraded"]:
            s = a[f"recovered probe {fam}"]
            checks[f"probe {fam}"] = s["estimate"] >= 0.5 and s["lo"] > 0
    if not any(k.startswith("probe") for k in checks):
        checks["plasticity loss to recover"] = False
    s = a["recovered OOD"]
    checks["OOD"] = s["estimate"] >= 0.5 and s["lo"] > 0
    f = next(v for k, v in a.items() if k.endswith("CE vs baseline"))
    checks["forgetting"] = not (f["lo"] > 0)
    checks["stage quality"] = all(
        abs(q["relative"]["estimate"] - 1) <= 0.05 or q["relative"]["estimate"] > 1
        for q in a["stage quality"].values() if math.isfinite(q["relative"]["estimate"]))
    checks["all"] = all(checks.values())
    return checks
