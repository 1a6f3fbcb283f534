"""Step-time and peak-memory overhead of SuppleCallback in LoRA SFT (TRL SFTTrainer), A/B in one process.

Usage::

    python benchmarks/overhead.py                         # tiny random Llama (seconds to minutes)
    python benchmarks/overhead.py --embedded              # SmolLM2-135M-Instruct, batch 4 x 256 tokens
    python benchmarks/overhead.py --configs baseline,diversity --reps 60 --block 8

What runs: one SFTTrainer per configuration, each with its own copy of the model (same LoRA init, same
data), every trainer's ``train()`` in its own thread. A scheduler lets exactly one trainer run at a time
and hands the turn over in blocks of ``--block`` optimizer steps, cycling through the configurations
(order rotated for the first repetitions, then shuffled), ``--reps`` times. So configurations are interleaved in time and share
the machine's state (other users' load, thermal state) block by block; the callback is exercised for
real, through the Trainer's own loop. Step time = wall time between consecutive ``on_step_begin`` events
of the same trainer (data fetch, forward, backward, clipping, optimizer, callbacks and logging).

Two views of the overhead are printed (README, "Benchmarks"):

Configurations: baseline (no callback), diversity (weight 0.05 at the defaults: block -1, 1024 tokens),
anchored (the same term anchored to the pre-stage model, ``diversity_reference="pre_stage"``: its per-step
own time adds the hinge; the one-time reference measurement at train begin is timed inside the callback and
reported in seconds and in baseline steps),
decorrelation (intra and cross weights 0.1, a random orthonormal basis per LoRA module passed as
``previous_subspaces``), metrics (``metrics_every=50``), all (everything together), replay, refresh,
pipeline (the full `supple demo` supple arm, ``SUPPLE_ARM_DEFAULTS``: diversity + intra/cross
decorrelation + replay, target <= 5 %; its own-time view adds one replay forward/backward divided by
``replay_every``) and control (a second trainer without the callback: an A/A test of the method).

1. A/B: per-step ratio config / baseline, pairing step j of a config's block with step j of the
   baseline's block in the same repetition. Reported: median and IQR of those ratios, a 95 % bootstrap
   interval of the median (resampling repetitions), and the ratio of mean step times (which, unlike the
   median, includes rare work such as live metrics every N steps).
2. Own time: the regularizer's own work per step, timed directly on tensors of the shapes of the run
   (ipr on the sampled tokens x hidden size and the tap's token selection and gradient scatter;
   ``lora_penalties`` forward+backward on the model's LoRA A stacks with bases, and the callback's
   ``LoraDecorrelation.add_gradients``; live metrics' effective rank + anisotropy of the tapped block
   and the stable rank of every LoRA update, once per ``metrics_every`` steps), divided by the median
   baseline step time. Stable under load.

Peak memory: for ``--mem-steps`` steps per configuration (after the timed phase, untimed) the step runs
under ``torch.profiler`` with ``profile_memory=True``; the peak is the maximum of the running sum of the
CPU allocator's allocation/free events during the step, i.e. the peak of tensor memory allocated
*during one optimizer step* on top of what was live when it began (activations, gradients, optimizer
temporaries, the callback's temporaries). Memory the callback holds for the whole run (the earlier
stages' bases) is reported separately. ``resource.getrusage`` max RSS is not used: it is per process
and monotonic, so it cannot separate interleaved configurations; tracemalloc does not see torch's
allocator.

Writes ``benchmarks/results/overhead_<model>.csv`` (summary) and ``overhead_<model>_steps.csv`` (every
timed step) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime as _dt
import importlib.util
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

ALL_CONFIGS = ("baseline", "diversity", "anchored", "decorrelation", "metrics", "all", "replay", "refresh", "pipeline",
               "control")
TARGETS = {"diversity": 0.02, "anchored": 0.02, "decorrelation": 0.01, "metrics": 0.01, "pipeline": 0.05}  # step-time overhead targets
DIVERSITY_WEIGHT = 0.05
DECOR_WEIGHT = 0.1
METRICS_EVERY = 50
REFRESH_EVERY_BENCH = 8  # fire within a short benchmark; the default (200) costs 25× less per step
RESULTS = Path(__file__).resolve().parent / "results"
if importlib.util.find_spec("supple") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling _interleave.py, however this file is loaded
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interleave import (  # noqa: E402  (re-exported: benchmarks/_gpu_training.py reads them from this module)
    Finished,
    Turn,
    bootstrap_median_ci,
    make_turnstile_class,
    paired_ratios,
    peak_from_profile,
    quantile,
    run_interleaved,
    schedule,
    time_fn,
)

__all__ = ["Finished", "Turn", "bootstrap_median_ci", "build_trainers", "main", "paired_ratios", "peak_from_profile",
           "quantile", "run_interleaved", "schedule", "time_fn"]


# --------------------------------------------------------------------------------------------- setup
def supple_settings(name: str) -> dict | None:
    """SuppleConfig keyword arguments of a configuration (None: no callback at all).

    ``control`` is a second trainer without the callback (an A/A test): its ratio to the baseline is the
    noise floor and any bias between two otherwise identical trainers of the same process.
    """
    div = dict(diversity_weight=DIVERSITY_WEIGHT)  # defaults: layer -1, 1024 tokens, normalized ipr
    dec = dict(decorrelation_weight=DECOR_WEIGHT, decorrelation_cross_weight=DECOR_WEIGHT)
    met = dict(metrics_every=METRICS_EVERY)
    return {
        "baseline": None,
        "diversity": div,
        # the reference-anchored term: relu(P − T) with P_ref measured at train begin on 4 batches (the defaults)
        "anchored": {**div, "diversity_reference": "pre_stage"},
        "decorrelation": dec,
        "metrics": met,
        "all": {**div, **dec, **met},
        # replay: one extra forward/backward of replay_batch_size sequences every replay_every=4 steps
        "replay": dict(replay_data="builtin:pydoc", replay_every=4),
        # refresh at its defaults (shrink & perturb every 200 steps); REFRESH_EVERY_BENCH makes it fire here
        "refresh": dict(refresh_method="shrink_perturb", refresh_every=REFRESH_EVERY_BENCH),
        # the full pipeline: supple's recommended interventions, exactly the `supple demo` supple arm
        "pipeline": pipeline_settings() if name == "pipeline" else None,
        "control": None,
    }[name]


PIPELINE_OVERRIDES: dict = {}  # --pipeline FIELD=VALUE
REFERENCE_S: dict[str, list[float]] = {}  # config -> seconds of each pre-stage reference measurement


@contextlib.contextmanager
def timed_reference_measurements():
    """While active, time the callback's own pre-stage reference measurement (its train-begin forwards and
    penalties) in every trainer, into ``REFERENCE_S`` keyed by the configuration of the trainer thread that runs
    it. Threads start one at a time, so the measurement runs alone on the machine. The method is restored after."""
    from supple.callbacks.reference import DiversityAnchor

    inner = DiversityAnchor._measure

    def timed(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return inner(self, *a, **kw)
        finally:
            name = threading.current_thread().name.removeprefix("train-")
            REFERENCE_S.setdefault(name, []).append(time.perf_counter() - t0)

    DiversityAnchor._measure = timed
    try:
        yield
    finally:
        DiversityAnchor._measure = inner


def pipeline_settings() -> dict:
    """The `supple demo` supple arm (``SUPPLE_ARM_DEFAULTS``): diversity + intra/cross decorrelation + replay,
    with ``--pipeline FIELD=VALUE`` overrides (as ``supple demo --supple``)."""
    from supple.testbed.pipeline import SUPPLE_ARM_DEFAULTS

    return {**SUPPLE_ARM_DEFAULTS, **PIPELINE_OVERRIDES}


def load_model(embedded: bool, seed: int):
    if embedded:
        from supple.testbed.embedded import load_embedded_model

        return load_embedded_model()
    from supple.testbed.tiny import make_tiny_model

    return make_tiny_model(seed=seed)


def text_dataset(n_rows: int, chunk_chars: int = 2000):
    """``n_rows`` long English texts (the Python docs shipped with Python), each longer than the context."""
    from pydoc_data.topics import topics

    from datasets import Dataset

    text = "\n\n".join(topics[k] for k in sorted(topics))
    chunks = [text[i : i + chunk_chars] for i in range(0, len(text) - chunk_chars, chunk_chars)]
    return Dataset.from_list([{"text": chunks[i % len(chunks)]} for i in range(n_rows)])


def random_bases(model, k: int, seed: int) -> dict[str, torch.Tensor]:
    """A random orthonormal d_in x k basis per LoRA module (stands in for an earlier stage's subspace)."""
    from supple.modeling import find_lora_modules

    gen = torch.Generator().manual_seed(seed + 1)
    bases = {}
    for ref in find_lora_modules(model):
        d_in = ref.lora_a.shape[1]
        q, _ = torch.linalg.qr(torch.randn(d_in, min(k, d_in), generator=gen))
        bases[ref.name] = q.contiguous()
    return bases


def lora_model(base, rank: int, seed: int):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_dropout=0.0,
        init_lora_weights="gaussian",  # A and B both non-zero, so the penalties are not trivially at rest
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(base), cfg)


def _make_turnstile_class():
    """The turnstile callback class of :func:`build_trainers` (benchmarks/_gpu_training.py wraps this to wait for
    the device at every step boundary)."""
    return make_turnstile_class()



# ------------------------------------------------------------------------------------- trainers
def build_trainers(args, base, tok, names: list[str], total_steps: int):
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from supple import SuppleCallback, SuppleConfig

    Turnstile = _make_turnstile_class()
    data = text_dataset(args.batch * (total_steps + 4))
    out = []
    for name in names:
        model = lora_model(base, args.rank, args.seed)
        gate = Turnstile(name)
        callbacks = [gate]
        settings = supple_settings(name)
        bases = None
        if settings is not None:
            objects = {}
            if settings.get("decorrelation_cross_weight"):
                bases = random_bases(model, args.basis_rank, args.seed)
                objects["previous_subspaces"] = bases
            callbacks.append(SuppleCallback(SuppleConfig(**settings), **objects))
        sft_args = SFTConfig(
            output_dir=tempfile.mkdtemp(prefix=f"supple-overhead-{name}-"),
            max_steps=total_steps + 1,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            learning_rate=2e-4,
            optim="adamw_torch",
            lr_scheduler_type="constant",
            logging_steps=10,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=args.seed,
            data_seed=args.seed,
            max_length=args.seq,
            packing=False,
            dataset_text_field="text",
            disable_tqdm=True,
            dataloader_num_workers=0,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
        )
        trainer = SFTTrainer(model=model, args=sft_args, train_dataset=data, processing_class=tok, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # no per-log prints (logging itself still runs)
        out.append((name, trainer, gate, bases))
    return out



def own_times(args, base, tok, hidden: int, reps: int) -> dict[str, float]:
    """Seconds per call of each piece of the callback's own work, on tensors of the run's shapes."""
    from supple.callbacks import select_tokens, token_generator
    from supple.callbacks.decorrelation import LoraDecorrelation
    from supple.kernels.covariance import ipr_reference
    from supple.modeling import find_lora_modules
    from supple.regularizers.diversity import penalty_value_and_grad
    from supple.regularizers.geometry import anisotropy, effective_rank
    from supple.regularizers.lora import lora_penalties

    b, t, d = args.batch, args.seq, hidden
    max_tokens = 1024
    n = min(max_tokens, b * t)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=gen)
    hidden_bt = torch.randn(b, t, d, generator=gen)
    grad_bt = torch.randn(b, t, d, generator=gen)
    mask = torch.ones(b, t, dtype=torch.long)
    out: dict[str, float] = {}

    out["ipr_reference"] = time_fn(lambda: ipr_reference(h, True), reps)

    def tap_path(step=[0]):  # noqa: B006 - a counter, as the hook draws a new subsample each step
        step[0] += 1
        g = token_generator(args.seed, step[0], 0, -1)
        idx = select_tokens(mask.bool(), b, t, max_tokens, g)
        x = hidden_bt.detach().reshape(-1, d).index_select(0, idx)
        p, gr = penalty_value_and_grad("ipr", x, True)
        finite = torch.isfinite(p) & torch.isfinite(gr).all()
        extra = torch.where(finite, gr * DIVERSITY_WEIGHT, torch.zeros_like(gr))
        return grad_bt.reshape(-1, d).index_add(0, idx, extra)

    out["diversity_tap_path"] = time_fn(tap_path, reps)
    from supple.regularizers.anchor import hinge_value_and_grad

    p0, g0 = penalty_value_and_grad("ipr", h, True)
    thr = p0.detach() * 0.5
    out["anchor_hinge"] = time_fn(lambda: hinge_value_and_grad(p0, g0, thr), reps)

    def select_only(step=[0]):  # noqa: B006 - what the hook does every step when only metrics are on
        step[0] += 1
        g = token_generator(args.seed, step[0], 0, -1)
        idx = select_tokens(mask.bool(), b, t, max_tokens, g)
        return hidden_bt.detach().reshape(-1, d).index_select(0, idx)

    out["metrics_every_step"] = time_fn(select_only, reps)

    def hidden_metrics():
        x = h.float().cpu().clone()
        float(effective_rank(x))
        float(anisotropy(x, generator=torch.Generator().manual_seed(1)))

    model = lora_model(base, args.rank, args.seed)
    refs = [r for r in find_lora_modules(model) if r.lora_a.requires_grad]
    try:  # live LoRA update stable rank (logged with metrics_every in newer versions of the callback)
        from supple.regularizers.geometry import lora_delta_svd, singular_value_stats
    except ImportError:
        lora_delta_svd = None

    def lora_metrics():
        if lora_delta_svd is None:
            return
        with torch.no_grad():
            for ref in find_lora_modules(model):
                _, sv, _ = lora_delta_svd(ref.lora_a, ref.lora_b, ref.scaling)
                float(singular_value_stats(sv)["stable_rank"])

    out["metrics_hidden_per_firing"] = time_fn(hidden_metrics, reps)
    out["metrics_lora_per_firing"] = time_fn(lora_metrics, max(reps // 4, 3))
    out["metrics_per_firing"] = out["metrics_hidden_per_firing"] + out["metrics_lora_per_firing"]
    bases = random_bases(model, args.basis_rank, args.seed)
    groups: dict[tuple, list] = {}
    for r in refs:
        groups.setdefault(tuple(r.lora_a.shape), []).append(r)
    stacks = []
    for members in groups.values():
        u = torch.stack([bases[m.name] for m in members])
        stacks.append(([m.lora_a for m in members], u))

    def penalties_fwd_bwd():
        params, total = [], None
        for ps, u in stacks:
            intra, cross = lora_penalties(torch.stack(ps), u)
            term = DECOR_WEIGHT * intra.mean() + DECOR_WEIGHT * cross.mean()
            total = term if total is None else total + term
            params += ps
        return torch.autograd.grad(total, params)

    out["lora_penalties_fwd_bwd"] = time_fn(penalties_fwd_bwd, reps)
    decor = LoraDecorrelation(DECOR_WEIGHT, DECOR_WEIGHT)
    decor.setup(model, bases)
    out["decorrelation_add_gradients"] = time_fn(decor.add_gradients, reps)
    if "pipeline" in args.config_list:  # one replay forward/backward, as the callback runs it on replay steps
        from supple import SuppleConfig
        from supple.callbacks.replay import ReplayTerm
        from supple.data import load_replay_items

        rc = SuppleConfig(**pipeline_settings())
        replay = ReplayTerm(load_replay_items(rc.replay_data), rc.replay_weight, rc.replay_every,
                            rc.replay_batch_size, args.seed)
        replay.setup(tok, args.seq)
        calls = [0]

        def replay_step():
            calls[0] += 1
            replay.step(model, calls[0] * replay.every, 1.0)
            model.zero_grad(set_to_none=True)

        out["replay_step"] = time_fn(replay_step, max(3, reps // 8))
        out["_replay_every"] = float(replay.every)
    out["_num_lora_modules"] = float(len(refs))
    out["_bases_bytes"] = float(sum(u.numel() * u.element_size() for _, u in stacks))
    return out


# ------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--embedded", action="store_true", help="SmolLM2-135M-Instruct instead of the tiny random Llama")
    p.add_argument("--configs", default=",".join(ALL_CONFIGS), help=f"comma-separated subset of {ALL_CONFIGS}")
    p.add_argument("--reps", type=int, default=None, help="repetitions (blocks per config); tiny 40, embedded 4")
    p.add_argument("--block", type=int, default=None, help="optimizer steps per block; tiny 8, embedded 1")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per config first; tiny 5, embedded 1")
    p.add_argument("--skip-first", type=int, default=None,
                   help="steps at the start of each block left out of the ratios (model switch); tiny 1, embedded 0")
    p.add_argument("--mem-steps", type=int, default=1, help="profiled steps per config for peak memory (0 = skip)")
    p.add_argument("--own-reps", type=int, default=None, help="repetitions of each own-time measurement")
    p.add_argument("--pipeline", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a SuppleConfig field of the `pipeline` config (default: the demo's supple arm)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (every sequence is full)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (targets q,k,v,o)")
    p.add_argument("--basis-rank", type=int, default=16, help="k of the random previous-stage bases")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (0 = torch's default). Default 1: on a loaded machine a 2-thread\n"
                        "OpenMP region stalls whenever a worker is preempted (~100 ms stalls seen on 2 shared cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="suffix of the CSV names: overhead_<model>_<tag>.csv")
    args = p.parse_args(argv)
    tiny = not args.embedded
    for name, tiny_default, emb_default in (
        ("reps", 40, 4), ("block", 8, 1), ("warmup", 5, 1), ("skip_first", 1, 0), ("own_reps", 50, 20)
    ):
        if getattr(args, name) is None:
            setattr(args, name, tiny_default if tiny else emb_default)
    from supple.testbed.cli import _key_value

    PIPELINE_OVERRIDES.update(dict(_key_value(kv) for kv in args.pipeline))
    args.config_list = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in args.config_list if c not in ALL_CONFIGS]
    if bad:
        p.error(f"unknown config(s) {bad}; choose from {ALL_CONFIGS}")
    if "baseline" not in args.config_list:
        args.config_list.insert(0, "baseline")
    if args.skip_first >= args.block:
        p.error("--skip-first must be smaller than --block")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    model_tag = "smollm2-135m" if args.embedded else "tiny"
    file_tag = f"{model_tag}_{args.tag}" if args.tag else model_tag
    started = time.perf_counter()
    base, tok = load_model(args.embedded, args.seed)
    hidden = base.config.hidden_size
    names = args.config_list
    turns = schedule(names, args.warmup, args.reps, args.block, args.mem_steps, args.seed)
    per_trainer = args.warmup + args.reps * args.block + args.mem_steps
    log(f"{model_tag}: {len(names)} configs x {per_trainer} steps "
        f"(warmup {args.warmup}, {args.reps} reps x {args.block}, memory {args.mem_steps}); building trainers")
    with timed_reference_measurements():
        trainers = build_trainers(args, base, tok, names, per_trainer)
        run_interleaved(trainers, turns, log)
    train_s = time.perf_counter() - started

    # step times: times[config][rep][j]
    times: dict[str, dict[int, dict[int, float]]] = {n: {} for n in names}
    peaks: dict[str, int] = {}
    bases_bytes: dict[str, int] = {}
    for name, _, gate, bases in trainers:
        for kind, rep, j, sec in gate.records:
            if kind == "timed":
                times[name].setdefault(rep, {})[j] = sec
        peaks[name] = max(gate.peaks) if gate.peaks else -1
        bases_bytes[name] = sum(u.numel() * u.element_size() for u in bases.values()) if bases else 0
    log("own-time measurements")
    own = own_times(args, base, tok, hidden, args.own_reps)

    def flat(name: str) -> list[float]:
        return [s for rep in times[name].values() for j, s in rep.items() if j >= args.skip_first]

    nan = float("nan")
    base_steps = flat("baseline")
    base_note = ""
    if not base_steps:  # no timed phase (--reps 0): own time relative to the untimed baseline steps
        base_steps = [r[3] for _, _, gate, _ in trainers if gate.name == "baseline" for r in gate.records]
        base_note = " (no timed phase: baseline step from warmup/profiled steps)"
    base_med = statistics.median(base_steps)
    base_mean = statistics.fmean(flat("baseline")) if flat("baseline") else nan
    own_step = {
        "baseline": 0.0,
        "control": 0.0,
        "diversity": own["diversity_tap_path"],
        "anchored": own["diversity_tap_path"] + own["anchor_hinge"],
        "decorrelation": own["decorrelation_add_gradients"],
        "metrics": own["metrics_every_step"] + own["metrics_per_firing"] / METRICS_EVERY,
        "all": own["diversity_tap_path"] + own["decorrelation_add_gradients"]
        + own["metrics_per_firing"] / METRICS_EVERY,
    }
    if "replay_step" in own:  # replay is amortized over replay_every steps
        own_step["pipeline"] = (own["diversity_tap_path"] + own["decorrelation_add_gradients"]
                                + own["replay_step"] / own["_replay_every"])
    own_core = {  # the penalty functions alone, as the brief of the benchmark asks
        "baseline": 0.0,
        "control": 0.0,
        "diversity": own["ipr_reference"],
        "anchored": own["ipr_reference"] + own["anchor_hinge"],
        "decorrelation": own["lora_penalties_fwd_bwd"],
        "metrics": own["metrics_per_firing"] / METRICS_EVERY,
        "all": own["ipr_reference"] + own["lora_penalties_fwd_bwd"] + own["metrics_per_firing"] / METRICS_EVERY,
    }
    if "replay_step" in own:
        own_core["pipeline"] = (own["ipr_reference"] + own["lora_penalties_fwd_bwd"]
                                + own["replay_step"] / own["_replay_every"])
    date = _dt.date.today().isoformat()
    rows = []
    for name in names:
        by_rep = paired_ratios(times, name, args.skip_first)
        ratios = [x for rs in by_rep.values() for x in rs]
        lo, hi = bootstrap_median_ci(by_rep, seed=args.seed)
        steps = flat(name)
        rows.append(dict(
            model=model_tag,
            config=name,
            timed_steps=len(steps),
            median_step_s=statistics.median(steps) if steps else nan,
            ratio_median=statistics.median(ratios) if ratios else nan,
            ratio_q25=quantile(ratios, 0.25),
            ratio_q75=quantile(ratios, 0.75),
            ratio_ci95_lo=lo,
            ratio_ci95_hi=hi,
            ratio_of_means=statistics.fmean(steps) / base_mean if steps else nan,
            own_penalty_ms=own_core.get(name, nan) * 1e3,
            own_penalty_over_step=own_core.get(name, nan) / base_med,
            own_callback_ms=own_step.get(name, nan) * 1e3,
            own_callback_over_step=own_step.get(name, nan) / base_med,
            target=TARGETS.get(name, ""),
            peak_step_mem_mb=peaks[name] / 2**20 if peaks[name] >= 0 else "",
            peak_step_mem_ratio=peaks[name] / peaks["baseline"] if peaks[name] >= 0 and peaks["baseline"] > 0 else "",
            persistent_bases_mb=bases_bytes[name] / 2**20,
            reference_once_s=statistics.fmean(REFERENCE_S[name]) if REFERENCE_S.get(name) else "",
            reference_in_steps=statistics.fmean(REFERENCE_S[name]) / base_med if REFERENCE_S.get(name) else "",
            reps=args.reps,
            block=args.block,
            skip_first=args.skip_first,
            batch=args.batch,
            seq=args.seq,
            lora_rank=args.rank,
            threads=torch.get_num_threads(),
            date=date,
            torch=torch.__version__,
            machine=f"{platform.machine()} {os.cpu_count()} cpu",
        ))

    args.out.mkdir(parents=True, exist_ok=True)
    summary = args.out / f"overhead_{file_tag}.csv"
    with summary.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    steps_csv = args.out / f"overhead_{file_tag}_steps.csv"
    with steps_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "rep", "step_in_block", "seconds"])
        for name in names:
            for rep in sorted(times[name]):
                for j in sorted(times[name][rep]):
                    w.writerow([name, rep, j, f"{times[name][rep][j]:.6f}"])

    print(f"\nsupple callback overhead, LoRA SFT, {model_tag} (hidden {hidden}), batch {args.batch} x {args.seq} tokens, "
          f"LoRA r{args.rank} q,k,v,o, {torch.get_num_threads()} torch threads, {date}")
    phase = f"{args.reps} reps x {args.block} steps per config" if args.reps else "no timed phase (--reps 0)"
    print(f"{phase}, interleaved; first {args.skip_first} step(s) of each block "
          f"left out; baseline median step {base_med * 1e3:.1f} ms{base_note}; wall {time.perf_counter() - started:.0f} s "
          f"(training {train_s:.0f} s)")
    print("command: python " + " ".join(sys.argv if argv is None else ["benchmarks/overhead.py", *argv]))
    print(f"LoRA modules: {int(own['_num_lora_modules'])}; ipr on {min(1024, args.batch * args.seq)} x {hidden}")
    if "pipeline" in names:
        print(f"pipeline = SuppleConfig({', '.join(f'{k}={v!r}' for k, v in pipeline_settings().items())})")
    hdr = (f"{'config':<14}{'A/B ratio':>10}{'IQR':>17}{'95% CI (median)':>19}{'mean ratio':>11}"
           f"{'own/step':>10}{'penalty/step':>13}{'target':>8}{'peak mem':>10}{'mem ratio':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if r["config"] == "baseline":
            continue
        tgt = f"<={r['target'] * 100:.0f}%" if r["target"] != "" else ""
        mem = f"{r['peak_step_mem_mb']:.1f}MB" if r["peak_step_mem_mb"] != "" else "-"
        memr = f"{r['peak_step_mem_ratio']:.3f}" if r["peak_step_mem_ratio"] != "" else "-"
        iqr = "[{:.3f}, {:.3f}]".format(r["ratio_q25"], r["ratio_q75"])
        ci = "[{:.3f}, {:.3f}]".format(r["ratio_ci95_lo"], r["ratio_ci95_hi"])
        print(f"{r['config']:<14}{r['ratio_median']:>10.3f}{iqr:>17}{ci:>19}{r['ratio_of_means']:>11.3f}"
              f"{r['own_callback_over_step'] * 100:>9.2f}%{r['own_penalty_over_step'] * 100:>12.2f}%{tgt:>8}"
              f"{mem:>10}{memr:>10}")
    b = rows[0]
    if b["peak_step_mem_mb"] != "":
        print(f"baseline peak step memory {b['peak_step_mem_mb']:.1f} MB (allocated during one step)")
    for r in rows:
        if r["reference_once_s"] != "":
            print(f"{r['config']}: the pre-stage reference (once, at train begin) took {r['reference_once_s']:.2f} s = "
                  f"{r['reference_in_steps']:.2f} baseline steps; amortized over a 1000-step stage "
                  f"{r['reference_in_steps'] / 10:.3f} % of step time")
    print(f"bases held by the decorrelation configs: {own['_bases_bytes'] / 2**20:.2f} MB")
    print("own time per step (ms): " + ", ".join(f"{k}={v * 1e3:.3f}" for k, v in own.items() if not k.startswith("_")))
    print(f"wrote {summary} and {steps_csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
