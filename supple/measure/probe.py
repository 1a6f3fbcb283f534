"""The plasticity probe: how well does a model still learn something new?

A fresh LoRA is trained for a fixed number of steps on a held-out task (plain torch loop, AdamW,
causal-LM loss) and the held-out loss of that task is recorded before, during and after. Report the
start loss and the improvement, not only the final loss: a post-trained model can start further from
the probe task (README.md, "Measure your model" and the demo's probe).

Deterministic given ``seed`` (LoRA initialization and batch order; the global RNG is left untouched)
and ``data_seed`` (the task's texts).

Task items are plain texts (the loss covers every token) or ``(prompt, completion)`` pairs (the loss
covers the completion's tokens only; the two are tokenized separately and concatenated, as TRL does
for prompt-completion data). Tasks: ``builtin:NAME`` for a registered generator
(``builtin:reverse``: reverse a short string of letters, as pairs; ``builtin:codes``: recall arbitrary two-word
codes, a memorization task scored on the items it trains on), a ``.jsonl`` file with
``prompt``/``completion`` (or ``text``) fields, or a text file of training texts (see
:func:`supple.measure.corpus.load_texts`); of a file the last 10 % are held out. Register more with
:func:`register_probe_task`.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Sequence
from typing import Union

import torch

from ..data import pad_token_batch, read_jsonl
from ..modeling import unwrap_model

__all__ = ["CODE_WORDS", "PROBE_TASKS", "code_question", "codes_task", "load_probe_task", "plasticity_probe", "register_probe_task",
           "reverse_task", "word_code"]

ProbeItem = Union[str, tuple[str, str]]  # a text, or (prompt, completion)
ProbeTask = Callable[[int, int], list[ProbeItem]]  # (number of items, seed) -> items
PROBE_TASKS: dict[str, ProbeTask] = {}
MEMORIZE_TASKS: set[str] = set()  # tasks scored on the items they train on (arbitrary answers)

CODE_WORDS: tuple[str, ...] = tuple(
    "apple river stone cloud horse table garden window candle forest bread mirror pencil rabbit silver ocean "
    "ladder pillow basket tiger violin castle carpet meadow rocket button jacket lemon bottle planet kitten "
    "hammer island copper wallet feather saddle dragon tunnel orange pepper marble blanket monkey helmet "
    "engine camera wagon spider parrot butter cotton shovel bucket anchor velvet turkey lizard cherry "
    "thunder puzzle coffee banana".split()
)  # 63 common words, one or two tokens each in most tokenizers


def register_probe_task(name: str, fn: ProbeTask, memorize: bool = False) -> None:
    """Make ``builtin:name`` a probe task; ``fn(n, seed)`` returns n deterministic items (texts or
    ``(prompt, completion)`` pairs). ``memorize=True``: the answers are arbitrary, so there is nothing to
    generalize to; the probe trains on the task's items and is scored on the same items (how fast a model fits)."""
    PROBE_TASKS[name] = fn
    (MEMORIZE_TASKS.add if memorize else MEMORIZE_TASKS.discard)(name)


def word_code(key: int) -> str:
    """The two-word code of ``key``: a fixed pseudo-random pair of distinct :data:`CODE_WORDS`."""
    return " ".join(random.Random(f"supple:word_codes:{key}").sample(CODE_WORDS, 2))


def code_question(key: int) -> str:
    """The question whose answer is :func:`word_code` of ``key``."""
    return f"What is the code for key {key}?"


def codes_task(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct pairs ("What is the code for key 4821?\nAnswer:", " velvet rocket"): arbitrary answers that
    no prior knowledge predicts, so a probe on them measures fitting (plasticity), not transfer."""
    keys = random.Random(seed).sample(range(1000, 10000), min(n, 9000))
    return [(f"{code_question(k)}\nAnswer:", f" {word_code(k)}") for k in keys]


def reverse_task(n: int, seed: int = 0, min_len: int = 3, max_len: int = 8) -> list[tuple[str, str]]:
    """``n`` pairs ("Reverse the letters: abcd\\nAnswer:", " dcba") over random lowercase strings."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_len, max_len)))
        out.append((f"Reverse the letters: {s}\nAnswer:", f" {s[::-1]}"))
    return out


register_probe_task("reverse", reverse_task)
register_probe_task("codes", codes_task, memorize=True)


def load_probe_task(
    spec: str, n_train: int = 256, n_eval: int = 64, data_seed: int = 0
) -> tuple[list[ProbeItem], list[ProbeItem]]:
    """``(train_items, eval_items)`` of a probe task; no eval item occurs among the training items, except for a
    memorization task (``builtin:codes``): it returns the same ``n_eval`` items twice (``n_train`` is not used)."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in PROBE_TASKS:
            raise ValueError(
                f"unknown probe task {spec!r}: available {', '.join('builtin:' + k for k in PROBE_TASKS)}"
            )
        if name in MEMORIZE_TASKS:
            items = list(dict.fromkeys(PROBE_TASKS[name](n_eval, data_seed)))
            return items, items
        texts = list(
            dict.fromkeys(PROBE_TASKS[name](2 * (n_train + n_eval), data_seed))
        )  # distinct, in order
        if len(texts) < 2:
            raise ValueError(f"probe task {spec!r} produced fewer than two distinct texts")
        n_eval_ = min(n_eval, max(1, len(texts) // 5))
        return texts[n_eval_ : n_eval_ + n_train], texts[:n_eval_]
    from pathlib import Path

    from .corpus import load_texts

    if spec.endswith(".jsonl"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"no such probe task file {spec!r} (or use builtin:reverse)")
        texts = []
        for no, r in read_jsonl(path, spec):
            if isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str):
                texts.append((r["prompt"], r["completion"]))
            elif isinstance(r, dict) and isinstance(r.get("text"), str):
                texts.append(r["text"])
            else:
                raise ValueError(f"{spec}, line {no}: expected 'prompt' and 'completion' (or 'text') string fields")
    else:
        texts = load_texts(spec)
    if len(texts) < 2:
        raise ValueError(f"probe task file {spec!r} needs at least two texts")
    n_ev = max(1, len(texts) // 10)
    return texts[:-n_ev], texts[-n_ev:]


def _encode(tokenizer, items: Sequence[ProbeItem], max_length: int) -> list[tuple[list[int], int]]:
    """``(token ids, first scored position)`` per item, truncated at ``max_length``; items with nothing
    to score are dropped."""
    out = []
    for item in items:
        if isinstance(item, str):
            ids, start = list(tokenizer(item)["input_ids"]), 1
        else:
            prompt, completion = item
            p = list(tokenizer(prompt)["input_ids"])
            ids, start = (
                p + list(tokenizer(completion, add_special_tokens=False)["input_ids"]),
                max(len(p), 1),
            )
        ids = ids[:max_length]
        if len(ids) > start:
            out.append((ids, start))
    if not out:
        raise ValueError("no probe item has a token to score (too short, or truncated by max_length)")
    return out


def _batch(
    seqs: Sequence[tuple[list[int], int]], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """The padded batch of ``(token ids, first scored position)`` items: labels -100 before that position."""
    return pad_token_batch([s for s, _ in seqs], pad_id, device, label_starts=[start for _, start in seqs])


def _lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the scored tokens of ``batch``, and their number."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    tgt = batch["labels"][:, 1:]
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total, int((tgt != -100).sum())


@torch.no_grad()
def _eval_loss(model, seqs, pad_id, device, batch_size) -> float:
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        s, c = _lm_loss(model, _batch(seqs[i : i + batch_size], pad_id, device))
        total += float(s)
        count += c
    model.train(was)
    return total / max(count, 1)


def tail_loss(steps: Sequence[int], losses: Sequence[float], total: int) -> float:
    """Mean held-out loss over the evaluations in the second half of training (step ≥ total/2): the final loss
    averaged over a stretch of the trajectory rather than read at its last step."""
    tail = [x for s, x in zip(steps, losses) if 2 * s >= total]
    return sum(tail) / len(tail)


def _area(steps: Sequence[int], losses: Sequence[float]) -> float:
    """Trapezoidal area under the loss curve divided by its step span: the mean loss over training."""
    if len(steps) < 2:
        return float(losses[0]) if losses else float("nan")
    area = sum((steps[i + 1] - steps[i]) * (losses[i + 1] + losses[i]) / 2 for i in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])


def _lr_factor(step: int, steps: int, warmup: int, cooldown: int) -> float:
    """The probe's learning-rate multiplier at ``step`` (1-based): linear warm-up, hold, linear decay."""
    factor = min(1.0, step / warmup) if warmup else 1.0
    if cooldown:
        factor *= min(1.0, (steps - step + 1) / (cooldown + 1))
    return factor


def plasticity_probe(
    model,
    tokenizer,
    train_texts: Sequence[ProbeItem],
    eval_texts: Sequence[ProbeItem],
    *,
    steps: int = 50,
    lr: float = 1e-3,
    rank: int = 8,
    alpha: float = 16.0,
    batch_size: int = 8,
    max_length: int = 128,
    seed: int = 0,
    target_modules: str | list[str] = "all-linear",
    eval_every: int | None = None,
    name: str = "model",
    progress: bool = True,
    warmup_steps: int = 0,
    max_grad_norm: float | None = None,
    cooldown_steps: int = 0,
) -> dict:
    """Train a fresh LoRA on ``train_texts`` for ``steps`` AdamW steps; report the held-out loss curve.

    Returns a dict: ``train_loss`` (per step, on the batch before the step), ``eval_steps`` and
    ``eval_loss`` (held-out token-mean loss at step 0, every ``eval_every`` steps and at the end),
    ``start_loss``, ``final_loss``, ``improvement`` = start − final, ``relative_improvement`` =
    improvement / start, ``area`` (mean held-out loss over training: trapezoidal area under the eval
    curve / steps; lower = learns faster), ``tail_loss`` (mean held-out loss of the evaluations at step ≥ steps/2)
    and ``train_area`` (mean training loss), plus the settings.

    The LoRA is injected into ``model`` and removed again at the end (``unload``), so the base weights
    are unchanged; a PEFT model is first merged (``merge_and_unload``) and comes back merged.

    ``warmup_steps`` ramps the learning rate linearly, ``lr·k/warmup_steps`` at step k ≤ warmup_steps, then
    holds it; ``max_grad_norm`` clips the LoRA parameters' total gradient norm before each step. Both tame a
    fast probe (a high ``lr``) whose first steps can overshoot; the defaults (0, None) leave the optimizer as is.
    ``cooldown_steps`` decays the learning rate linearly over the last steps, ``lr·(steps − k + 1)/(cooldown_steps
    + 1)`` at step k > steps − cooldown_steps, so the final loss is read off a settled LoRA rather than the last
    few batches' updates (a warm-up-stable-decay schedule with both set).
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError("steps must be ≥ 1")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be ≥ 0 (0 = no warm-up), got {warmup_steps}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {max_grad_norm}")
    if cooldown_steps < 0 or (cooldown_steps and cooldown_steps > steps - warmup_steps):
        raise ValueError(
            f"cooldown_steps must be between 0 (no decay) and steps - warmup_steps = {steps - warmup_steps}, "
            f"got {cooldown_steps}"
        )
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model = unwrap_model(model)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train = _encode(tokenizer, train_texts, max_length)
    held = _encode(tokenizer, eval_texts, max_length)
    eval_every = eval_every or max(1, steps // 10)
    was_training = model.training
    requires = {n: p.requires_grad for n, p in model.named_parameters()}

    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        cfg = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules, task_type="CAUSAL_LM"
        )
        peft_model = get_peft_model(model, cfg)
        try:
            params = [p for p in peft_model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            gen = torch.Generator().manual_seed(seed)
            order: list[int] = []
            train_curve, eval_steps, eval_curve = (
                [],
                [0],
                [_eval_loss(peft_model, held, pad_id, device, batch_size)],
            )
            peft_model.train()
            for step in tqdm(range(1, steps + 1), desc=f"probe {name}", disable=not progress, leave=False):
                if len(order) < batch_size:
                    order += torch.randperm(len(train), generator=gen).tolist()
                idx, order = order[:batch_size], order[batch_size:]
                total, count = _lm_loss(peft_model, _batch([train[i] for i in idx], pad_id, device))
                loss = total / max(count, 1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                if warmup_steps or cooldown_steps:
                    for group in opt.param_groups:
                        group["lr"] = lr * _lr_factor(step, steps, warmup_steps, cooldown_steps)
                opt.step()
                train_curve.append(float(loss.detach()))
                if step % eval_every == 0 or step == steps:
                    eval_steps.append(step)
                    eval_curve.append(_eval_loss(peft_model, held, pad_id, device, batch_size))
        finally:
            restored = peft_model.unload()
            restored.train(was_training)
            for n, p in restored.named_parameters():
                p.requires_grad_(requires.get(n, p.requires_grad))

    start, final = eval_curve[0], eval_curve[-1]
    return {
        "model": name,
        "steps": steps,
        "seed": seed,
        "lr": lr,
        "rank": rank,
        "alpha": alpha,
        "batch_size": batch_size,
        "warmup_steps": warmup_steps,
        "max_grad_norm": max_grad_norm,
        "cooldown_steps": cooldown_steps,
        "train_texts": len(train),
        "eval_texts": len(held),
        "train_loss": train_curve,
        "eval_steps": eval_steps,
        "eval_loss": eval_curve,
        "start_loss": start,
        "final_loss": final,
        "improvement": start - final,
        "relative_improvement": (start - final) / start if start and math.isfinite(start) else float("nan"),
        "area": _area(eval_steps, eval_curve),
        "tail_loss": tail_loss(eval_steps, eval_curve, steps),
        "train_area": sum(train_curve) / len(train_curve),
    }
