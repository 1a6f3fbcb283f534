"""The demo's per-record bookkeeping: forgetting between stages, the flat metrics the tables and plots read,
their per-(stage, arm) summary and the JSON writer."""

from __future__ import annotations

import json
import math
from typing import Any

from .evaluation import _GEOMETRY_KEYS
from .settings import ARMS
from .stages import Stage

__all__ = ["add_forgetting", "flat_metrics", "save_json", "summarize"]


def add_forgetting(records: list[dict], stages: list[Stage]) -> None:
    """Per record: for every family trained at an earlier stage (and not at this one), the accuracy drop and
    answer-loss rise since the last stage that trained it."""
    by_run: dict[tuple, dict[int, dict]] = {}
    for r in records:
        by_run.setdefault((r["seed"], r["arm"]), {})[r["stage_index"]] = r
    for run in by_run.values():
        for idx, r in run.items():
            forget = {}
            current = stages[idx - 1].family if idx else None
            last: dict[str, int] = {}
            for j, st in enumerate(stages[: max(idx - 1, 0)], start=1):
                last[st.family] = j
            for fam, j in last.items():
                then = run.get(j)
                if fam == current or then is None or fam not in r.get("tasks", {}):
                    continue
                forget[fam] = {
                    "acc_drop": then["tasks"][fam]["acc"] - r["tasks"][fam]["acc"],
                    "ce_rise": r["tasks"][fam]["answer_ce"] - then["tasks"][fam]["answer_ce"],
                    "since": stages[j - 1].name,
                }
            r["forgetting"] = forget


def flat_metrics(r: dict) -> dict[str, float]:
    """The scalar metrics of one record, flattened to ``name: value`` (what the table and plots use)."""
    out: dict[str, float] = {}
    g = r.get("geometry", {})
    for k in (*_GEOMETRY_KEYS, "general_nll"):
        if k in g:
            out[k] = g[k]
    p = r.get("probe", {})
    for k in ("start_loss", "final_loss", "improvement", "area"):
        if k in p:
            out[f"probe_{k}"] = p[k]
    for fam, m in r.get("tasks", {}).items():
        out[f"acc/{fam}"] = m["acc"]
        out[f"answer_ce/{fam}"] = m["answer_ce"]
        out[f"ece/{fam}"] = m["ece"]
    if "ece" in r:
        out["ece"] = r["ece"]
    for fam, f in r.get("forgetting", {}).items():
        out[f"forget_acc/{fam}"] = f["acc_drop"]
        out[f"forget_ce/{fam}"] = f["ce_rise"]
    out["eval_s"] = r.get("eval_s", float("nan"))
    t = r.get("train") or {}
    for k, v in t.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("steps",):
            out[f"train/{k}"] = float(v)
    return out


def summarize(records: list[dict]) -> list[dict]:
    """Mean, standard deviation (over seeds), min, max of every metric per (stage, arm), in stage order."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["stage_index"], r["stage"], r["arm"]), []).append(r)
    out = []
    for (idx, stage, arm), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], ARMS.index(kv[0][2]) if kv[0][2] in ARMS else 99)):
        flats = [flat_metrics(r) for r in rs]
        keys = list(dict.fromkeys(k for f in flats for k in f))
        metrics = {}
        for k in keys:
            vals = [f[k] for f in flats if k in f and f[k] is not None and math.isfinite(f[k])]
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            metrics[k] = {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": len(vals)}
        out.append({"stage_index": idx, "stage": stage, "arm": arm, "seeds": [r["seed"] for r in rs],
                    "metrics": metrics})
    return out


def save_json(obj: Any, path: str) -> None:
    def default(o):
        if hasattr(o, "item"):
            return o.item()
        return str(o)

    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, default=default, allow_nan=True)
