"""Measurements after every stage: geometry on general text, task accuracy / answer loss / ECE per family,
and the plasticity probe."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import tasks as T
from .settings import (
    Budget,
)


# ------------------------------------------------------------------------------------------------ models
def load_testbed_model(spec: str):
    """``(model, tokenizer, name)`` for ``embedded``, ``tiny`` or a local Hugging Face model directory."""
    if spec == "tiny":
        from .tiny import make_tiny_model

        model, tok = make_tiny_model()
        return model, tok, "tiny"
    if spec == "embedded":
        from .embedded import load_embedded_model

        model, tok = load_embedded_model()
        return model, tok, "SmolLM2-135M-Instruct"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(spec):
        raise FileNotFoundError(f"--model {spec!r} is neither 'embedded', 'tiny' nor a local model directory")
    tok = AutoTokenizer.from_pretrained(spec)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        from .tiny import CHAT_TEMPLATE

        tok.chat_template = CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
    return model, tok, os.path.basename(os.path.normpath(spec))


# ------------------------------------------------------------------------------------------- evaluation
def probe_texts(family: str, n_train: int, n_eval: int, seed: int, fmt: str = "plain",
                tok=None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Probe items of a family as ``(prompt, completion)`` pairs; the probe's loss covers the completion's tokens
    only (the question is unpredictable and would dominate the loss).

    ``fmt="plain"``: ``("QUESTION\\nAnswer:", " ANSWER")``. ``fmt="chat"``: the prompt as the stages see it (the
    tokenizer's chat template with the testbed's system prompt and the generation prompt) and the answer followed
    by the template's end-of-turn text. The held-out items are the family's fixed evaluation stream; the training
    items are drawn with ``seed``. A ``memorize`` family (arbitrary answers, e.g. ``word_codes``) returns the same
    ``n_eval`` distinct items, drawn with ``seed``, as both lists: its probe measures fitting, not transfer."""
    fam = T.get_family(family)
    if fmt not in ("plain", "chat"):
        raise ValueError(f"probe format {fmt!r}: use 'plain' or 'chat'")
    if fmt == "chat":
        if tok is None:
            raise ValueError("the chat probe format needs the tokenizer")
        end = _end_of_turn(tok)

        def pair(ex):
            return _render(tok, T.prompt_messages(ex), True), f"{ex.answer}{end}"
    else:
        def pair(ex):
            return f"{ex.question}\nAnswer:", f" {ex.answer}"

    if fam.memorize:  # arbitrary answers: the probe fits ``n_eval`` distinct items of its seed and is scored on them
        pool = list({e.question: e for e in fam.train_examples(2 * n_eval, seed, split="probe")}.values())[:n_eval]
        items = [pair(e) for e in pool]
        return items, items
    return [pair(e) for e in fam.train_examples(n_train, seed, split="probe")], [pair(e) for e in fam.eval_examples(n_eval)]


def _end_of_turn(tok) -> str:
    """What the chat template writes after an assistant message's content (e.g. ``<|im_end|>``)."""
    probe = "\x00supple\x00"
    text = _render(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}], False)
    tail = text.split(probe, 1)[1] if probe in text else ""
    return tail.rstrip("\n") or (tok.eos_token or "")


def _render(tok, msgs, add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def answer_sequence(tok, ex, answer: str, max_length: int) -> tuple[list[int], int]:
    """``(token ids, first answer position)`` of ``ex``'s chat prompt (with the testbed's system prompt) followed by
    the assistant turn ``answer``, cut to ``max_length`` tokens: the tokens from that position on are the answer's."""
    prompt = _render(tok, T.prompt_messages(ex), True)
    full = _render(tok, [*T.prompt_messages(ex), {"role": "assistant", "content": answer}], False)
    p_ids, f_ids = _encode(tok, prompt), _encode(tok, full)
    if f_ids[: len(p_ids)] != p_ids:  # template does not extend the prompt: tokenize the answer alone
        f_ids = p_ids + _encode(tok, full[len(prompt) :] if full.startswith(prompt) else "")
    return f_ids[:max_length], min(len(p_ids), max_length)


def task_metrics(model, tok, family: str, n: int, batch_size: int = 16, max_length: int = 128,
                 keep_examples: int = 3) -> dict:
    """Held-out accuracy (greedy generation, checked), answer-token loss and ECE (teacher-forced) of a family;
    ``examples`` holds the first ``keep_examples`` questions with their gold answer and generated output."""
    import torch
    from transformers import GenerationConfig

    from supple.data import pad_token_batch
    from supple.measure.calibration import expected_calibration_error, next_token_stats

    fam = T.get_family(family)
    examples = fam.eval_examples(n)
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [_render(tok, T.prompt_messages(ex), True) for ex in examples]
    was_training = model.training
    model.eval()
    conf, corr, nll = [], [], []
    outputs: list[str] = []
    try:
        with torch.inference_mode():
            # teacher-forced answer tokens
            seqs = [answer_sequence(tok, ex, ex.answer, max_length) for ex in examples]
            for i in range(0, len(seqs), batch_size):
                chunk = seqs[i : i + batch_size]
                starts = [start for _, start in chunk]
                batch = pad_token_batch([s for s, _ in chunk], pad, device, label_starts=starts)
                ids = batch["input_ids"]
                logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
                pos = batch["labels"][:, 1:] != -100  # predicting token t+1 from position t
                st = next_token_stats(logits[:, :-1][pos], ids[:, 1:][pos])
                conf.append(st["confidence"].cpu())
                corr.append(st["correct"].cpu())
                nll.append(st["nll"].cpu())
            # greedy generation, checked
            gen_cfg = GenerationConfig(
                max_new_tokens=fam.max_new_tokens, do_sample=False, pad_token_id=pad,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
            )
            side = tok.padding_side
            tok.padding_side = "left"
            try:
                for i in range(0, len(prompts), batch_size):
                    enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
                    enc = {k: v.to(device) for k, v in enc.items()}
                    out = model.generate(**enc, generation_config=gen_cfg)
                    new = out[:, enc["input_ids"].shape[1] :]
                    outputs += tok.batch_decode(new, skip_special_tokens=True)
            finally:
                tok.padding_side = side
    finally:
        model.train(was_training)
    correct = [fam.check_answer(ex, o) for ex, o in zip(examples, outputs)]
    conf_t, corr_t, nll_t = torch.cat(conf), torch.cat(corr), torch.cat(nll)
    return {
        "family": family,
        "n": len(examples),
        "acc": sum(correct) / max(len(correct), 1),
        "answer_ce": float(nll_t.double().mean()) if nll_t.numel() else float("nan"),
        "token_acc": float(corr_t.double().mean()) if corr_t.numel() else float("nan"),
        "ece": float(expected_calibration_error(conf_t, corr_t)),
        "examples": [{"q": ex.question, "gold": ex.answer, "out": o, "correct": c}
                     for ex, o, c in list(zip(examples, outputs, correct))[:keep_examples]],
        "_conf": conf_t,
        "_corr": corr_t,
    }


_GEOMETRY_KEYS = {
    # table key: (metric, tokens, space)
    "erank": ("erank", "no_sink", "raw"),
    "anisotropy": ("anisotropy", "no_sink", "raw"),
    "erank_unit": ("erank", "no_sink", "unit"),
    "anisotropy_unit": ("anisotropy", "no_sink", "unit"),
    "participation_ratio": ("participation_ratio", "no_sink", "raw"),
    "participation_ratio_unit": ("participation_ratio", "no_sink", "unit"),
    "erank_all": ("erank", "all", "raw"),
    "top_pc_share": ("top_pc_share", "no_sink", "raw"),
}


def geometry_metrics(model, tok, texts: Sequence[str], max_tokens: int, max_length: int, name: str) -> dict:
    """Last-block geometry (supple.measure) on general text, and the next-token loss there."""
    from supple.measure.core import collect, geometry_records, logits_records

    run = collect(
        model, tok, texts, name=name, max_tokens=max_tokens, max_length=max_length, layers=[-1],
        logit_lens=False, progress=False,
    )
    rows = geometry_records(run) + logits_records(run)
    out: dict[str, Any] = {"layer": run.layers[0], "n_tokens": int(run.first.numel())}
    for key, (metric, tokens, space) in _GEOMETRY_KEYS.items():
        for r in rows:
            if r["group"] == "geometry" and r["metric"] == metric and r["tokens"] == tokens and r["space"] == space:
                out[key] = r["value"]
    for r in rows:
        if r["group"] == "logits" and r["metric"] in ("nll", "ece"):
            out[f"general_{r['metric']}"] = r["value"]
    out["records"] = rows
    return out


_PROBE_KEYS = ("start_loss", "final_loss", "tail_loss", "improvement", "relative_improvement", "area", "train_area")


def probe_runs(model, tok, family: str, budget: Budget, name: str, seeds: Sequence[int]) -> list[dict]:
    """One plasticity probe run on ``family`` per probe seed in ``seeds`` (:func:`supple.measure.probe.plasticity_probe`).

    A probe seed fixes the fresh LoRA's initialization, the batch order and the training items, so two
    checkpoints probed under the same seeds are paired."""
    from supple.measure.probe import plasticity_probe

    runs = []
    steps, lr, eval_every = budget.probe_settings(family)
    for ps in seeds:
        train, held = probe_texts(family, steps * budget.probe_batch, budget.probe_eval, ps, budget.probe_format, tok)
        runs.append(plasticity_probe(
            model, tok, train, held, steps=steps, lr=lr, rank=budget.probe_rank,
            alpha=2.0 * budget.probe_rank, batch_size=budget.probe_batch, seed=ps,
            eval_every=eval_every, name=f"{name} {family}", progress=False,
            warmup_steps=budget.probe_warmup, max_grad_norm=budget.probe_max_grad_norm or None,
            cooldown_steps=budget.probe_cooldown,
        ))
    return runs


def summarize_probe_runs(family: str, seeds: Sequence[int], runs: Sequence[dict]) -> dict:
    """The mean over probe seeds of each scalar (``final_loss``, ...), the per-seed values and held-out curves
    (``per_seed``: lists in the order of ``seeds``), the
    probe's own noise (``final_loss_spread``: max − min over probe seeds) and the mean held-out curve."""
    if len(seeds) != len(runs) or not runs:
        raise ValueError(f"one run per probe seed: {len(seeds)} seeds, {len(runs)} runs")
    out: dict[str, Any] = {"family": family, "seeds": list(seeds)}
    for k in _PROBE_KEYS:
        out[k] = sum(r[k] for r in runs) / len(runs)
    out["per_seed"] = {k: [r[k] for r in runs] for k in ("start_loss", "final_loss", "tail_loss", "area", "eval_loss")}
    out["final_loss_spread"] = max(out["per_seed"]["final_loss"]) - min(out["per_seed"]["final_loss"])
    out["eval_steps"] = runs[0]["eval_steps"]
    out["eval_loss"] = [sum(c) / len(c) for c in zip(*(r["eval_loss"] for r in runs))]
    out["train_loss"] = [sum(c) / len(c) for c in zip(*(r["train_loss"] for r in runs))]
    return out


def _from_per_seed(probe: dict, seeds: Sequence[int], per: dict[str, list]) -> dict:
    """``probe`` with the per-seed values ``per`` under ``seeds``, and every mean :func:`summarize_probe_runs`
    takes recomputed from them, run by run (the relative improvement is a mean of per-run ratios)."""
    out = {**probe, "seeds": list(seeds), "per_seed": per}
    for k in ("start_loss", "final_loss", "tail_loss", "area"):
        if k in per and k in out:
            out[k] = sum(per[k]) / len(per[k])
    if "start_loss" in per:
        runs = list(zip(per["start_loss"], per["final_loss"]))
        out["improvement"] = sum(s - f for s, f in runs) / len(runs)
        out["relative_improvement"] = sum((s - f) / s if s else float("nan") for s, f in runs) / len(runs)
    if "eval_loss" in per and "eval_loss" in out:
        out["eval_loss"] = [sum(c) / len(c) for c in zip(*per["eval_loss"])]
    out["final_loss_spread"] = max(per["final_loss"]) - min(per["final_loss"])
    return out


def probe_seed_order(probe: dict) -> list[int]:
    """The probe seeds of a :func:`summarize_probe_runs` record, in the order of its per-seed values (records written
    before ``seeds`` was kept ran probe seeds 0, 1, ...). Raises KeyError when it kept no per-seed values."""
    return list(probe["seeds"]) if "seeds" in probe else list(range(len(probe["per_seed"]["final_loss"])))


def restrict_probe_seeds(probe: dict, keep: Sequence[int]) -> dict:
    """``probe`` (a :func:`summarize_probe_runs` record) as if only the probe seeds ``keep`` had run: its per-seed
    values, their means (as :func:`summarize_probe_runs` takes them, run by run), its spread and mean held-out
    curve. ``train_area`` and the mean training curve, which are not kept per seed, stay as recorded."""
    order = probe_seed_order(probe)
    idx = [order.index(k) for k in keep]
    return _from_per_seed(probe, keep, {k: [v[i] for i in idx] for k, v in probe["per_seed"].items()})


def merge_probe_records(a: dict, b: dict) -> dict:
    """Two :func:`summarize_probe_runs` records of one model and one probe setting under disjoint probe seeds, as
    one record of all their seeds (sorted): what a single run of every seed would have recorded. ``train_area``,
    the mean training curve and ``seconds``, which are not kept per seed, combine as the mean (sum) over all runs.
    Raises ValueError when the records overlap in probe seeds, differ in family or evaluation steps, or lack
    per-seed values."""
    if a.get("family") != b.get("family"):
        raise ValueError(f"probe records of different families: {a.get('family')} and {b.get('family')}")
    if "per_seed" not in a or "per_seed" not in b:
        raise ValueError("a probe record without per-seed values cannot be merged")
    if a.get("eval_steps") != b.get("eval_steps"):
        raise ValueError(f"probe records evaluated at different steps: {a.get('eval_steps')} and {b.get('eval_steps')}")
    sa, sb = probe_seed_order(a), probe_seed_order(b)
    if set(sa) & set(sb):
        raise ValueError(f"probe records share probe seeds {sorted(set(sa) & set(sb))}: nothing to merge")
    keys = [k for k in a["per_seed"] if k in b["per_seed"]]
    pairs = sorted([(s, a, i) for i, s in enumerate(sa)] + [(s, b, i) for i, s in enumerate(sb)], key=lambda t: t[0])
    per = {k: [rec["per_seed"][k][i] for _, rec, i in pairs] for k in keys}
    na, nb = len(sa), len(sb)
    out = {**a}
    if "train_area" in a and "train_area" in b:
        out["train_area"] = (na * a["train_area"] + nb * b["train_area"]) / (na + nb)
    if a.get("train_loss") and b.get("train_loss"):
        out["train_loss"] = [(na * x + nb * y) / (na + nb) for x, y in zip(a["train_loss"], b["train_loss"])]
    if "seconds" in a or "seconds" in b:
        out["seconds"] = a.get("seconds", 0.0) + b.get("seconds", 0.0)
    return _from_per_seed(out, [s for s, _, _ in pairs], per)


def probe_summary(model, tok, family: str, budget: Budget, name: str) -> dict:
    """The plasticity probe on ``family``, once per probe seed ``0 .. budget.probe_seeds - 1``, summarized
    (:func:`probe_runs`, :func:`summarize_probe_runs`); the same probe seeds for every checkpoint, so probes of
    two arms or stages are paired."""
    seeds = list(range(budget.probe_seeds))
    return summarize_probe_runs(family, seeds, probe_runs(model, tok, family, budget, name, seeds))


@dataclass
class EvalPlan:
    families: list[str]  # in-domain families (every stage's), then the OOD family last
    ood: str
    probe_families: list[str]  # the first is the primary probe (``record["probe"]``)
    geometry_texts: list[str]


def evaluate(model, tok, plan: EvalPlan, budget: Budget, seed: int, name: str, parts=("geometry", "tasks", "probe"),
             tick: Callable[[int], None] | None = None) -> dict:
    """Measure one model (see the module doc). ``parts`` selects what to run; ``tick(n)`` reports progress."""
    import torch

    from supple.measure.calibration import expected_calibration_error

    tick = tick or (lambda n: None)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    if "geometry" in parts:
        out["geometry"] = geometry_metrics(model, tok, plan.geometry_texts, budget.geometry_tokens, 256, name)
        tick(1)
    if "tasks" in parts:
        tasks, confs, corrs = {}, [], []
        for fam in plan.families:
            m = task_metrics(model, tok, fam, budget.n_eval, budget.eval_batch, budget.max_length)
            c, k = m.pop("_conf"), m.pop("_corr")
            if fam != plan.ood:
                confs.append(c)
                corrs.append(k)
            tasks[fam] = m
            tick(1)
        out["tasks"] = tasks
        out["ece"] = float(expected_calibration_error(torch.cat(confs), torch.cat(corrs))) if confs else float("nan")
    if "probe" in parts:
        out["probes"] = {}
        for fam in plan.probe_families:
            out["probes"][fam] = probe_summary(model, tok, fam, budget, name)
            tick(budget.probe_units([fam]))
        out["probe"] = out["probes"][plan.probe_families[0]]
    out["eval_s"] = time.perf_counter() - t0
    return out
