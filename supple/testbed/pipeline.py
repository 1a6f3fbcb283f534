"""The sequential post-training testbed: base → stage 1 → stage 2 → ..., baseline vs supple.

Each run takes one model through a list of post-training stages (default ``sft,dpo,sft2``: SFT on domain A,
DPO on domain-A preferences, SFT on a second narrow domain), as LoRA stages merged before the next stage or as
full fine-tuning, once per *arm* (``baseline``; ``supple``: the same training with :class:`SuppleCallback`) and
training seed. The arms of one seed see the same data, initial adapters and data order.

After the base model and after every stage it measures (``evaluate``):

- geometry of the last decoder block's output on general text (``builtin:pydoc``), through
  :mod:`supple.measure`: effective rank and anisotropy without the attention-sink position (raw and
  unit-normalized token vectors), plus the general-text next-token loss;
- the plasticity probe (:func:`supple.measure.plasticity_probe`): a fresh LoRA trained a fixed number of steps
  on a held-out task family (``number_words``): start loss, final loss, improvement, area;
- held-out accuracy (greedy generation checked by the family's ``check_answer``), answer-token loss and ECE
  (teacher-forced) on every stage's task family (forgetting) and on an out-of-domain family (``knowledge``).

Stage kinds are a registry (``register_stage_kind``): a kind is a function that trains a model on a
``StageContext`` with a TRL trainer and returns a ``StageOutcome``; the pipeline handles LoRA merging, the
supple arm's callback, measurements and reporting. An outcome-reward stage (GRPO) is one more registration.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from . import tasks as T
from .evaluation import (
    _GEOMETRY_KEYS,
    EvalPlan,
    evaluate,
    geometry_metrics,
    load_testbed_model,
    probe_texts,
    task_metrics,
)
from .settings import (
    ARMS,
    PRESETS,
    SUPPLE_ARM_DEFAULTS,
    Budget,
    budget_with,
)
from .stages import (
    STAGE_KINDS,
    Stage,
    StageContext,
    StageKind,
    StageOutcome,
    _supple_callback_class,
    _unpatch_forward,
    lora_input_subspaces,
    parse_stages,
    register_stage_kind,
    supple_arm_config,
)

# The testbed's public names, also importable from here (the pipeline was one module before it was split into
# settings, stages, evaluation and this driver).
__all__ = [
    "ARMS",
    "PRESETS",
    "STAGE_KINDS",
    "SUPPLE_ARM_DEFAULTS",
    "Budget",
    "DemoConfig",
    "EvalPlan",
    "Stage",
    "StageContext",
    "StageKind",
    "StageOutcome",
    "auto_threads",
    "budget_with",
    "evaluate",
    "flat_metrics",
    "geometry_metrics",
    "load_testbed_model",
    "lora_input_subspaces",
    "parse_stages",
    "probe_texts",
    "register_stage_kind",
    "run_demo",
    "save_json",
    "summarize",
    "supple_arm_config",
    "task_metrics",
]


# --------------------------------------------------------------------------------------------- the run
@dataclass
class DemoConfig:
    model: str = "embedded"
    budget: Budget = field(default_factory=Budget)
    stages: str = "sft,dpo,sft2"
    seeds: Sequence[int] = (0, 1)
    arms: Sequence[str] = ARMS
    lora: bool = True
    supple_overrides: dict = field(default_factory=dict)
    out: str | None = "supple-demo"
    progress: bool = True
    keep_workdir: bool = False
    command: str | None = None
    threads: int | None = None  # torch CPU threads; None = auto_threads() (1 for the tiny model)


def auto_threads() -> int:
    """CPU threads for torch: the cores not already busy (1-minute load average), at least 1.

    On a shared machine, more OpenMP threads than idle cores makes every step many times slower (measured
    on 2 shared cores: a SmolLM2 LoRA step took 9-34 s with 2 threads, 1.8 s with 1).
    """
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(torch.get_num_threads(), cores, int(cores - busy + 0.5)))


def _eval_units(budget: Budget, plan: EvalPlan) -> int:
    return 1 + len(plan.families) + budget.probe_steps


def _progress_callback(bar):
    from transformers import TrainerCallback

    class _Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            bar.update(1)
            return control

    return _Tick()


@contextlib.contextmanager
def _quiet():
    """Silence transformers/TRL/datasets chatter during a demo run (restored afterwards)."""
    import datasets
    import transformers

    verb = transformers.logging.get_verbosity()
    bars = datasets.utils.logging.is_progress_bar_enabled()
    tbars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verb)
        if tbars:
            transformers.utils.logging.enable_progress_bar()
        if bars:
            datasets.utils.logging.enable_progress_bar()


def _strip_records(ev: dict) -> dict:
    """An evaluation without the bulky tidy measurement rows (kept separately)."""
    ev = dict(ev)
    if "geometry" in ev:
        ev["geometry"] = {k: v for k, v in ev["geometry"].items() if k != "records"}
    return ev


def run_demo(cfg: DemoConfig) -> dict:
    """Run every (seed, arm) through the stages; returns the results dict (also written to ``cfg.out``)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import set_seed

    from supple.measure.corpus import load_builtin_corpus

    t_start = time.perf_counter()
    budget = cfg.budget
    stages = parse_stages(cfg.stages, budget, cfg.lora)
    arms = list(cfg.arms)
    for a in arms:
        if a not in ARMS:
            raise ValueError(f"unknown arm {a!r}: use {', '.join(ARMS)}")
    notes: list[str] = []
    callback_cls = _supple_callback_class()
    if "supple" in arms and callback_cls is None:
        arms.remove("supple")
        notes.append("supple arm skipped: supple.SuppleCallback is not available in this installation")
    if "supple" in arms:  # fail early on bad overrides
        supple_arm_config(1, ["x"], cfg.lora, cfg.supple_overrides)

    fams = list(dict.fromkeys(s.family for s in stages))
    plan = EvalPlan(
        families=[*fams, T.ROLES["ood"]],
        ood=T.ROLES["ood"],
        probe_family=T.ROLES["probe"],
        geometry_texts=load_builtin_corpus("pydoc", max_chars=1200, limit=budget.geometry_texts),
    )
    threads = torch.get_num_threads()
    run_threads = cfg.threads or (1 if cfg.model == "tiny" else auto_threads())
    torch.set_num_threads(run_threads)
    t_load = time.perf_counter()
    with _quiet():
        base_model, tok, model_name = load_testbed_model(cfg.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base_model.to(device)
    load_s = time.perf_counter() - t_load

    arm_overrides = dict(cfg.supple_overrides)
    replay_note = None
    builtin_replay = "supple" in arms and {**SUPPLE_ARM_DEFAULTS, **arm_overrides}.get("replay_data") == "builtin:pydoc"
    units_eval = _eval_units(budget, plan)
    # base: geometry and tasks once (seed-independent), the probe per seed
    total = (1 + len(plan.families)) + len(cfg.seeds) * (
        budget.probe_steps + len(arms) * sum(s.steps + units_eval for s in stages)
    )
    bar = tqdm(total=total, desc="supple demo", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    workdir = tempfile.mkdtemp(prefix="supple-demo-")
    if builtin_replay:
        # replay builtin:pydoc without the paragraphs the general-text geometry is measured on (no leakage)
        corpus = load_builtin_corpus("pydoc")[len(plan.geometry_texts) :]
        arm_overrides["replay_data"] = os.path.join(workdir, "replay_pydoc.txt")
        with open(arm_overrides["replay_data"], "w", encoding="utf-8") as fh:
            fh.write("\n\n".join(corpus) + "\n")
        replay_note = (f"replay corpus: builtin:pydoc without its first {len(plan.geometry_texts)} paragraphs "
                       f"(the general-text measurement texts), {len(corpus)} paragraphs")
    records: list[dict] = []
    measure_rows: list[dict] = []
    supple_configs: dict[str, dict] = {}
    try:
        with _quiet():
            base_shared: dict | None = None
            for seed in cfg.seeds:
                bar.set_description(f"seed {seed} base")
                if base_shared is None:
                    base_shared = evaluate(base_model, tok, plan, budget, seed, "base", parts=("geometry", "tasks"),
                                           tick=bar.update)
                    measure_rows += [dict(r, model="base", seed=None, arm=None, stage="base")
                                     for r in base_shared["geometry"]["records"]]
                probe_ev = evaluate(base_model, tok, plan, budget, seed, "base", parts=("probe",), tick=bar.update)
                base_ev = {**_strip_records(base_shared), "probe": probe_ev["probe"],
                           "eval_s": base_shared["eval_s"] + probe_ev["eval_s"]}
                for arm in arms:
                    records.append(_record(seed, arm, 0, None, base_ev, None, model_name))
                for arm in arms:
                    model = copy.deepcopy(base_model)
                    subspaces: dict = {}  # earlier LoRA stages' input subspaces (supple arm)
                    for i, stage in enumerate(stages, start=1):
                        bar.set_description(f"seed {seed} {arm} {stage.name}")
                        callbacks = [_progress_callback(bar)]
                        stage_notes: list[str] = []
                        if arm == "supple":
                            scfg, stage_notes = supple_arm_config(i, [], cfg.lora, arm_overrides, bool(subspaces))
                            if replay_note and scfg.replay_data:
                                stage_notes.append(replay_note)
                            objs = {"previous_subspaces": subspaces} if scfg.decorrelation_cross_weight > 0 else {}
                            callbacks.append(callback_cls(scfg, **objs))
                            supple_configs[f"seed{seed}/{stage.name}"] = asdict(scfg)
                        run_seed = 1000 * seed + i  # the same for both arms
                        set_seed(run_seed)
                        ctx = StageContext(
                            model=model, tokenizer=tok, stage=stage, budget=budget, seed=run_seed, lora=cfg.lora,
                            callbacks=callbacks, output_dir=os.path.join(workdir, f"s{seed}-{arm}-{i}"),
                            data_seed=run_seed,
                        )
                        t0 = time.perf_counter()
                        outcome = STAGE_KINDS[stage.kind].run(ctx)
                        train_s = time.perf_counter() - t0
                        model = outcome.model
                        _unpatch_forward(model.get_base_model() if hasattr(model, "get_base_model") else model)
                        if cfg.lora:
                            if arm == "supple":  # this stage's update directions: the next stages' cross term
                                subspaces = lora_input_subspaces(model, subspaces)
                            model = model.merge_and_unload()
                        model.to(device)
                        ev = evaluate(model, tok, plan, budget, seed, f"{arm}/{stage.name}", tick=bar.update)
                        measure_rows += [dict(r, seed=seed, arm=arm, stage=stage.name)
                                         for r in ev["geometry"]["records"]]
                        train_info = {
                            "wall_s": train_s,
                            "steps": stage.steps,
                            "lr": stage.lr,
                            **outcome.metrics,
                            "log_history": outcome.log_history,
                            "notes": stage_notes,
                        }
                        records.append(_record(seed, arm, i, stage, _strip_records(ev), train_info, model_name))
                        for n in stage_notes:
                            if n not in notes:
                                notes.append(n)
                    del model
                    gc.collect()
    finally:
        bar.close()
        torch.set_num_threads(threads)
        if not cfg.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    _add_forgetting(records, stages)
    results = {
        "meta": {
            "model": model_name,
            "model_spec": cfg.model,
            "command": cfg.command,
            "budget": asdict(budget),
            "stages": [asdict(s) for s in stages],
            "seeds": list(cfg.seeds),
            "arms": arms,
            "lora": cfg.lora,
            "families": {"stages": fams, "ood": plan.ood, "probe": plan.probe_family},
            "supple_arm_defaults": SUPPLE_ARM_DEFAULTS,
            "supple_overrides": cfg.supple_overrides,
            "supple_configs": supple_configs,
            "notes": notes,
            "device": device,
            "torch_threads": run_threads,
            "load_s": load_s,
            "total_s": time.perf_counter() - t_start,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "versions": _versions(),
        },
        "records": records,
        "summary": summarize(records),
    }
    if cfg.out:
        from .report import write_outputs

        results["meta"]["files"] = write_outputs(results, measure_rows, cfg.out)
    return results


def _record(seed, arm, index, stage: Stage | None, ev: dict, train: dict | None, model_name: str) -> dict:
    return {
        "seed": seed,
        "arm": arm,
        "stage_index": index,
        "stage": stage.name if stage else "base",
        "kind": stage.kind if stage else None,
        "family": stage.family if stage else None,
        "model": model_name,
        **ev,
        "train": train,
    }


def _add_forgetting(records: list[dict], stages: list[Stage]) -> None:
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


# ------------------------------------------------------------------------------------------------ summary
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
    for (idx, stage, arm), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], ARMS.index(kv[0][2]))):
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


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("supple", "torch", "transformers", "trl", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def save_json(obj: Any, path: str) -> None:
    def default(o):
        if hasattr(o, "item"):
            return o.item()
        return str(o)

    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, default=default, allow_nan=True)
