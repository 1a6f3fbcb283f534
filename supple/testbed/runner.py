"""One job of a demo run — the base model's measurements, or one (training seed, arm) through every stage — and
the pool that runs jobs in parallel processes (``supple demo --workers N``)."""

from __future__ import annotations

import copy
import gc
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .evaluation import EvalPlan, evaluate, load_testbed_model
from .prefix import branch_records, load_weights, prefix_path
from .settings import ARM_TABLE
from .stages import (
    STAGE_KINDS,
    Stage,
    StageContext,
    _supple_callback_class,
    _unpatch_forward,
    arm_stage_config,
    lora_input_subspaces,
    wants_cross,
)
from .yardsticks import l2_anchor_callback, shrink_perturb_model


@dataclass
class Job:
    """``seed``/``arm`` None: the base model (measured once; it does not depend on the training seed)."""

    seed: int | None
    arm: str | None
    branch: int = 0  # stages taken from the baseline job of the same seed (its checkpoint and records), 0 = none


@dataclass
class JobSetup:
    """What every job needs besides its (seed, arm); picklable, so a worker process can receive it."""

    cfg: Any  # DemoConfig
    stages: list[Stage]
    plan: EvalPlan
    workdir: str
    arm_overrides: dict  # the supple arm's overrides, with the replay corpus file resolved
    replay_note: str | None
    keep_prefix: tuple[int, ...] = ()  # after these stages the baseline job keeps its model for branching arms


def _strip_records(ev: dict) -> dict:
    """An evaluation without the bulky tidy measurement rows (kept separately)."""
    ev = dict(ev)
    if "geometry" in ev:
        ev["geometry"] = {k: v for k, v in ev["geometry"].items() if k != "records"}
    return ev


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


def _save_model(model, tok, path: str) -> None:
    """A merged checkpoint as safetensors (``supple probe PATH`` and ``from_pretrained`` read it)."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def _progress_callback(tick: Callable[[int], None]):
    from transformers import TrainerCallback

    class _Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            tick(1)
            return control

    return _Tick()


def _arm_callbacks(setup: JobSetup, arm_name: str, i: int, subspaces: dict) -> tuple[list, list[str], dict | None]:
    """The callbacks one arm adds at stage ``i`` (1-based), notes, and the SuppleConfig used (as a dict)."""
    arm = ARM_TABLE[arm_name]
    callbacks: list = []
    used = None
    scfg, notes = arm_stage_config(setup, arm_name, i, bool(subspaces))
    if scfg is not None:
        if setup.replay_note and scfg.replay_data:
            notes.append(setup.replay_note)
        objs = {"previous_subspaces": subspaces} if scfg.decorrelation_cross_weight > 0 else {}
        callbacks.append(_supple_callback_class()(scfg, **objs))
        used = asdict(scfg)
        if scfg.replay_data and scfg.replay_data == setup.arm_overrides.get("_replay_file"):
            used["replay_data"] = "builtin:pydoc (without the general-text measurement paragraphs)"
    if arm.anchor_weight:
        callbacks.append(l2_anchor_callback(arm.anchor_weight))
    return callbacks, notes, used


def run_job(setup: JobSetup, job: Job, tick: Callable[[int], None], base_model=None, tok=None,
            prefix_out: dict | None = None) -> dict:
    """Run one job; returns ``records``, ``measure_rows``, ``supple_configs`` and ``notes``. A job with
    ``branch = k`` needs ``prefix_out``, the baseline job of its seed, and starts from that job's checkpoint after
    stage ``k`` (:mod:`supple.testbed.prefix`)."""
    import torch
    from transformers import set_seed

    cfg, plan, budget = setup.cfg, setup.plan, setup.cfg.budget
    if base_model is None:
        base_model, tok, _ = _load(cfg.model)
    model_name = _load.name  # type: ignore[attr-defined]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out: dict[str, Any] = {"records": [], "measure_rows": [], "supple_configs": {}, "notes": []}
    if job.seed is None:
        ev = evaluate(base_model, tok, plan, budget.for_base_model(), 0, "base", tick=tick)
        out["measure_rows"] = [dict(r, model="base", seed=None, arm=None, stage="base")
                               for r in ev["geometry"]["records"]]
        out["base"] = _strip_records(ev)
        return out
    seed, arm_name = job.seed, job.arm
    arm = ARM_TABLE[arm_name]
    model = copy.deepcopy(base_model)
    subspaces: dict = {}  # earlier LoRA stages' input subspaces (cross-stage decorrelation)
    if job.branch:
        if prefix_out is None:
            raise ValueError(f"seed {seed} {arm_name}: branching after stage {job.branch} needs the baseline's job")
        load_weights(model, prefix_path(setup, seed, job.branch))
        out.update(branch_records(prefix_out, arm_name, job.branch))
    for i, stage in enumerate(setup.stages, start=1):
        if i <= job.branch:
            continue
        callbacks, stage_notes, used = _arm_callbacks(setup, arm_name, i, subspaces)
        callbacks.insert(0, _progress_callback(tick))
        if used is not None:
            out["supple_configs"][f"{arm_name}/seed{seed}/{stage.name}"] = used
        run_seed = 1000 * seed + i  # the same for every arm
        if arm.boundary_refresh and i > 1:
            shrink_perturb_model(model, *arm.boundary_refresh, seed=run_seed)
        set_seed(run_seed)
        ctx = StageContext(
            model=model, tokenizer=tok, stage=stage, budget=budget, seed=run_seed, lora=cfg.lora,
            callbacks=callbacks, output_dir=os.path.join(setup.workdir, f"s{seed}-{arm_name}-{i}"), data_seed=run_seed,
        )
        t0 = time.perf_counter()
        outcome = STAGE_KINDS[stage.kind].run(ctx)
        train_s = time.perf_counter() - t0
        model = outcome.model
        _unpatch_forward(model.get_base_model() if hasattr(model, "get_base_model") else model)
        if cfg.lora:
            if wants_cross(setup, arm_name):
                subspaces = lora_input_subspaces(model, subspaces)  # this stage's update directions
            model = model.merge_and_unload()
        model.to(device)
        if cfg.save_models:
            _save_model(model, tok, os.path.join(cfg.save_models, f"seed{seed}", arm_name, stage.name))
        elif arm_name == "baseline" and i in setup.keep_prefix:
            _save_model(model, tok, prefix_path(setup, seed, i))
        last = i == len(setup.stages)
        parts = ("geometry", "tasks", "probe") if (last or budget.probe_every_stage) else ("geometry", "tasks")
        ev = evaluate(model, tok, plan, budget, seed, f"{arm_name}/{stage.name}", parts=parts, tick=tick)
        if "probe" not in parts:
            tick(budget.probe_units(plan.probe_families))
        out["measure_rows"] += [dict(r, seed=seed, arm=arm_name, stage=stage.name) for r in ev["geometry"]["records"]]
        train_info = {"wall_s": train_s, "steps": stage.steps, "lr": stage.lr, **outcome.metrics,
                      "log_history": outcome.log_history, "notes": stage_notes}
        out["records"].append(_record(seed, arm_name, i, stage, _strip_records(ev), train_info, model_name))
        out["notes"] += [n for n in stage_notes if n not in out["notes"]]
    del model
    gc.collect()
    return out


def _load(spec: str):
    """The testbed model, loaded once per process."""
    cache = getattr(_load, "cache", {})
    if spec not in cache:
        model, tok, name = load_testbed_model(spec)
        import torch

        model.to("cuda" if torch.cuda.is_available() else "cpu")
        cache[spec] = (model, tok, name)
        _load.cache = cache  # type: ignore[attr-defined]
    _load.name = cache[spec][2]  # type: ignore[attr-defined]
    return cache[spec]


# ------------------------------------------------------------------------------------------- worker pool
_QUEUE = None


def _worker_init(queue, threads: int) -> None:
    import torch

    global _QUEUE
    _QUEUE = queue
    torch.set_num_threads(threads)


def _worker_run(setup: JobSetup, job: Job, prefix_out: dict | None) -> dict:
    from .pipeline import _quiet

    with _quiet():
        return run_job(setup, job, lambda n: _QUEUE.put(n), prefix_out=prefix_out)


def run_jobs(setup: JobSetup, jobs: list[Job], workers: int, threads: int, tick: Callable[[int], None],
             describe: Callable[[str], None], on_done: Callable[[Job, dict], None] = lambda job, out: None,
             finished: dict | None = None) -> list[dict]:
    """Run ``jobs`` (in order of the list) on ``workers`` spawned processes of ``threads`` torch threads each, or
    in this process when ``workers`` is 1. ``on_done(job, result)`` is called as each job finishes (the demo keeps
    finished jobs on disk with it). A job that branches from its seed's baseline starts once that baseline has
    finished, here or before (``finished``: results of earlier runs by (seed, arm)). Results come back in the
    order of ``jobs``."""
    if not jobs:
        return []
    known = dict(finished or {})

    def prefix_of(job: Job) -> dict | None:
        return known.get((job.seed, "baseline")) if job.branch else None

    def ready(job: Job) -> bool:  # branches from nothing, or from a baseline that has finished
        return not job.branch or (job.seed, "baseline") in known

    if workers <= 1:
        base_model, tok, _ = _load(setup.cfg.model)
        queue = list(jobs)
        while queue:  # in the order of the list; a job whose baseline comes later waits for it
            job = next((j for j in queue if ready(j)), None)
            if job is None:
                raise RuntimeError(f"jobs branch from baselines that no job runs (seeds {sorted({j.seed for j in queue})})")
            queue.remove(job)
            describe("base model" if job.seed is None else f"seed {job.seed} {job.arm}")
            out = run_job(setup, job, tick, base_model, tok, prefix_out=prefix_of(job))
            known[(job.seed, job.arm)] = out
            on_done(job, out)
        return [known[(j.seed, j.arm)] for j in jobs]
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")
    q = ctx.Manager().Queue()
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(q, threads)) as pool:
        waiting = list(jobs)
        job_of: dict = {}
        pending: set = set()
        errors: list[BaseException] = []
        describe(f"{len(jobs)} jobs on {workers} workers")
        while waiting or pending:
            # at most `workers` jobs in flight, so a branching job never waits in the pool's queue ahead of a
            # baseline it does not need
            for job in [j for j in waiting if ready(j)]:
                if len(pending) >= workers:
                    break
                waiting.remove(job)
                f = pool.submit(_worker_run, setup, job, prefix_of(job))
                job_of[f] = job
                pending.add(f)
            if not pending:
                if errors:  # what is still waiting branches from a baseline that failed
                    break
                missing = sorted({j.seed for j in waiting})
                raise RuntimeError(f"jobs branch from baselines that no job runs (seeds {missing})")
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in done:  # a failed job stops nothing else: what finishes is journaled, then the error is raised
                job = job_of[f]
                if f.exception() is not None:
                    errors.append(f.exception())
                    waiting = [j for j in waiting if not (j.branch and j.seed == job.seed and job.arm == "baseline")]
                    continue
                known[(job.seed, job.arm)] = f.result()
                on_done(job, f.result())
            while True:
                try:
                    tick(q.get_nowait())
                except queue_mod.Empty:
                    break
        if errors:
            raise errors[0]
        return [known[(j.seed, j.arm)] for j in jobs]
