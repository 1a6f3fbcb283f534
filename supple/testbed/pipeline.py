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
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from . import tasks as T
from .evaluation import (
    EvalPlan,
    evaluate,
    geometry_metrics,
    load_testbed_model,
    probe_texts,
    task_metrics,
)
from .journal import Journal
from .records import add_forgetting, flat_metrics, save_json, summarize
from .runner import _record
from .settings import (
    ARM_TABLE,
    ARMS,
    MAIN_ARMS,
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
    lora_input_subspaces,
    overrides_for_stage,
    parse_stages,
    register_stage_kind,
    supple_arm_config,
)

# The testbed's public names, also importable from here (the pipeline was one module before it was split into
# settings, stages, evaluation, journal, records and this driver).
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
    arms: Sequence[str] = MAIN_ARMS
    lora: bool = False  # full fine-tuning (the default regime, docs/demo.md); True: LoRA stages
    supple_overrides: dict = field(default_factory=dict)
    out: str | None = "supple-demo"
    progress: bool = True
    keep_workdir: bool = False
    command: str | None = None
    threads: int | None = None  # torch threads per process; None = auto_threads() (1 for the tiny model or workers)
    workers: int = 1  # processes running (seed, arm) jobs in parallel
    report_only: bool = False  # with resume: run nothing, report the arms whose every seed finished
    resume: bool = False  # reuse the jobs a previous run with the same settings finished (``out``/jobs.jsonl)
    announce: Any = None  # a function printing one line: the plan, before the run starts
    save_models: str | None = None  # keep every arm's merged checkpoint after every stage (safetensors) here
    share_prefix: bool = True  # an arm whose first stages train as the baseline's branches from its checkpoint


def _busy_cores(cores: int, window_s: float = 0.5, stat: str = "/proc/stat") -> float:
    """How many cores are busy now: CPU time not idle over ``window_s`` seconds (``/proc/stat``), or, where that
    cannot be read, the 1-minute load average (which lags: it still counts a job that ended a minute ago)."""
    def sample() -> tuple[int, int]:
        with open(stat, encoding="ascii") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        return sum(vals), vals[3] + (vals[4] if len(vals) > 4 else 0)  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(window_s)
        t1, i1 = sample()
        return max(0.0, 1.0 - (i1 - i0) / max(1, t1 - t0)) * cores  # the machine's busy share, on our cores
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0


def auto_threads() -> int:
    """CPU threads for torch: the cores not already busy (measured over half a second), at least 1.

    On a shared machine, more OpenMP threads than idle cores makes every step many times slower (measured
    on 2 shared cores: a SmolLM2 LoRA step took 9-34 s with 2 threads, 1.8 s with 1).
    """
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores, int(cores - _busy_cores(cores) + 0.5)))


def _eval_units(budget: Budget, plan: EvalPlan) -> int:
    return 1 + len(plan.families) + budget.probe_units(plan.probe_families)


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


def run_demo(cfg: DemoConfig) -> dict:
    """Run the base model's measurements and every (seed, arm) through the stages (in ``cfg.workers`` processes);
    returns the results dict (also written to ``cfg.out``)."""
    import torch
    from tqdm.auto import tqdm

    from supple.measure.corpus import load_builtin_corpus

    from .prefix import prefix_path, shared_stages
    from .runner import Job, JobSetup, run_jobs

    t_start = time.perf_counter()
    budget = cfg.budget
    stages = parse_stages(cfg.stages, budget, cfg.lora)
    arms = list(dict.fromkeys(cfg.arms))
    for a in arms:
        if a not in ARM_TABLE:
            raise ValueError(f"unknown arm {a!r}: use {', '.join(ARM_TABLE)}")
    notes: list[str] = []
    if not cfg.lora:
        for a in [a for a in arms if ARM_TABLE[a].lora_only]:
            arms.remove(a)
            notes.append(f"arm {a!r} skipped: it needs LoRA stages (run with --lora)")
    if any(ARM_TABLE[a].supple is not None for a in arms) and _supple_callback_class() is None:
        raise ValueError("supple.SuppleCallback is not available in this installation")
    names = [s.name for s in stages]
    per_stage = {n: overrides_for_stage(cfg.supple_overrides, n, names) for n in names}
    if "supple" in arms:  # fail early on bad overrides, for every stage's
        for n in names:
            supple_arm_config(1, ["x"], cfg.lora, per_stage[n])

    fams = list(dict.fromkeys(s.family for s in stages))
    plan = EvalPlan(
        families=[*fams, T.ROLES["ood"]],
        ood=T.ROLES["ood"],
        probe_families=list(T.PROBE_FAMILIES),
        geometry_texts=load_builtin_corpus("pydoc", max_chars=1200, limit=budget.geometry_texts),
    )
    threads = torch.get_num_threads()
    workers = max(1, min(cfg.workers or 1, len(cfg.seeds) * len(arms) + 1))
    run_threads = cfg.threads or (1 if cfg.model == "tiny" or workers > 1 else auto_threads())
    torch.set_num_threads(run_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    workdir = tempfile.mkdtemp(prefix="supple-demo-")
    arm_overrides = dict(cfg.supple_overrides)
    replay_note = None
    if any({**(ARM_TABLE[a].supple or {}), **(per_stage[n] if a == "supple" else {})}.get("replay_data")
           == "builtin:pydoc" for a in arms for n in names):
        # replay builtin:pydoc without the paragraphs the general-text geometry is measured on (no leakage)
        corpus = load_builtin_corpus("pydoc")[len(plan.geometry_texts) :]
        arm_overrides["_replay_file"] = os.path.join(workdir, "replay_pydoc.txt")
        with open(arm_overrides["_replay_file"], "w", encoding="utf-8") as fh:
            fh.write("\n\n".join(corpus) + "\n")
        replay_note = (f"replay corpus: builtin:pydoc without its first {len(plan.geometry_texts)} paragraphs "
                       f"(the general-text measurement texts), {len(corpus)} paragraphs")
    units_eval, units_base = _eval_units(budget, plan), _eval_units(budget.for_base_model(), plan)
    # the base model is measured once (seed-independent); every (seed, arm) trains and measures each stage
    total = units_base + len(cfg.seeds) * len(arms) * sum(s.steps + units_eval for s in stages)
    # the baseline of every seed first: it says early whether there is a problem to solve
    jobs = [Job(None, None)] + [Job(seed, "baseline") for seed in cfg.seeds if "baseline" in arms]
    jobs += [Job(seed, arm) for arm in arms if arm != "baseline" for seed in cfg.seeds]
    setup = JobSetup(cfg=replace(cfg, announce=None), stages=stages, plan=plan, workdir=workdir, arm_overrides=arm_overrides,
                     replay_note=replay_note)
    journal = Journal(cfg, stages)
    done = journal.load() if cfg.resume else {}
    todo = [j for j in jobs if (j.seed, j.arm) not in done]
    shared = {a: shared_stages(setup, a) for a in arms} if cfg.share_prefix and "baseline" in arms else {}
    for j in todo:
        k = shared.get(j.arm, 0)
        if k and ((j.seed, "baseline") not in done or os.path.isdir(prefix_path(setup, j.seed, k))):
            j.branch = k  # a baseline finished before keeps its checkpoint only under the same --save-models
    setup = replace(setup, keep_prefix=tuple(sorted({j.branch for j in todo if j.branch})))
    shared = {a: k for a, k in shared.items() if any(j.arm == a and j.branch for j in todo)}
    if cfg.report_only:  # tables from what a run finished: arms missing a seed are left out
        missing = {j.arm for j in todo}
        if None in missing:
            raise ValueError(f"--report-only: {journal.path} has no finished base-model job for these settings")
        for a in sorted(missing, key=arms.index):
            arms.remove(a)
            notes.append(f"arm {a!r} left out: not every seed finished (--report-only)")
        if not arms:
            raise ValueError("--report-only: no arm finished every seed")
        jobs = [j for j in jobs if j.arm is None or j.arm in arms]
        todo = []
    total -= sum(units_base if j.seed is None else sum(s.steps + units_eval for s in stages)
                 for j in jobs if (j.seed, j.arm) in done)
    total -= sum(sum(s.steps + units_eval for s in stages[: j.branch]) for j in todo)
    if cfg.announce:
        cfg.announce(f"plan: {len(arms)} arm(s) [{', '.join(arms)}] x {len(cfg.seeds)} training seed(s) "
                     f"{list(cfg.seeds)} x stages {' -> '.join(f'{s.name} ({s.steps} steps @ lr {s.lr:g})' for s in stages)}, "
                     f"{'LoRA' if cfg.lora else 'full fine-tuning'}; probes "
                     f"{budget.describe_probes(plan.probe_families)} x {budget.probe_seeds} probe seeds"
                     f"{f' (base model {budget.probe_seeds_base})' if budget.probe_seeds_base else ''}; {budget.n_eval} held-out "
                     f"items per family; device {device}, {workers} worker process(es) x {run_threads} torch "
                     f"thread(s)")
        if cfg.resume:
            reused = [j for j in jobs if (j.seed, j.arm) in done]
            names = ", ".join("base model" if j.seed is None else f"{j.arm} seed {j.seed}" for j in reused)
            cfg.announce(f"resume: {len(reused)} finished job(s) taken from {journal.path}"
                         f"{f' ({names})' if names else ''}; {len(todo)} to run")
        for a, k in shared.items():
            cfg.announce(f"arm {a} trains stage(s) {', '.join(s.name for s in stages[:k])} as the baseline does: it "
                         f"starts from the baseline's checkpoint after {stages[k - 1].name} (trained once; "
                         f"--no-share-prefix trains them again)")
    bar = tqdm(total=total, desc="supple demo", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    try:
        with _quiet():
            fresh = run_jobs(setup, todo, workers, run_threads, bar.update, bar.set_description, journal.add,
                             finished=done)
    finally:
        bar.close()
        torch.set_num_threads(threads)
        if not cfg.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    done.update({(j.seed, j.arm): o for j, o in zip(todo, fresh)})
    outs = [done[(j.seed, j.arm)] for j in jobs]
    base_ev = outs[0]["base"]
    model_name = _model_name(cfg.model)
    records: list[dict] = []
    measure_rows: list[dict] = list(outs[0]["measure_rows"])
    supple_configs: dict[str, dict] = {}
    for job, out in zip(jobs[1:], outs[1:]):
        records.append(_record(job.seed, job.arm, 0, None, base_ev, None, model_name))
        records += out["records"]
        measure_rows += out["measure_rows"]
        supple_configs.update(out["supple_configs"])
        notes += [n for n in out["notes"] if n not in notes]

    add_forgetting(records, stages)
    results = {
        "meta": {
            "model": model_name,
            "model_spec": cfg.model,
            "command": cfg.command,
            "budget": asdict(budget),
            "stages": [asdict(s) for s in stages],
            "seeds": list(cfg.seeds),
            "arms": arms,
            "arm_help": {a: ARM_TABLE[a].help for a in arms},
            "lora": cfg.lora,
            "families": {"stages": fams, "ood": plan.ood, "probe": plan.probe_families[0],
                         "probes": plan.probe_families},
            "supple_arm_defaults": SUPPLE_ARM_DEFAULTS,
            "supple_overrides": cfg.supple_overrides,
            "supple_configs": supple_configs,
            "shared_prefix": {a: [s.name for s in stages[:k]] for a, k in shared.items()},
            "notes": notes,
            "device": device,
            "torch_threads": run_threads,
            "workers": workers,
            "total_s": time.perf_counter() - t_start,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": _machine(),
            "versions": _versions(),
        },
        "records": records,
        "summary": summarize(records),
    }
    from .analysis import analyze

    results["analysis"] = analyze(results)
    if cfg.out:
        from .report import write_outputs

        results["meta"]["files"] = write_outputs(results, measure_rows, cfg.out)
    return results


def _model_name(spec: str) -> str:
    return {"tiny": "tiny", "embedded": "SmolLM2-135M-Instruct"}.get(spec, os.path.basename(os.path.normpath(spec)))


def _machine() -> str:
    """``"x86_64, AMD EPYC, 2 CPU cores, Linux, torch CPU kernels AVX512"``. The CPU model and the vector kernels torch
    picked are kept because full fine-tuning is reproducible bit for bit only on the same kind of machine: on
    another, the first step's loss differs in the sixth digit and hundreds of steps later the model is another draw
    (docs/demo.md, "An A/A rerun of the baseline")."""
    import platform

    import torch

    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    model = model or platform.processor()
    try:
        kernels = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # older torch
        kernels = ""
    parts = [platform.machine(), model, f"{os.cpu_count()} CPU cores", platform.system(),
             f"torch CPU kernels {kernels}" if kernels else ""]
    return ", ".join(p for p in parts if p)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("supple", "torch", "transformers", "trl", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
