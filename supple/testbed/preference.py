"""The DPO stage's quality on held-out preference pairs: reward accuracy and margin of the trained policy against
its reference, as TRL defines them, on pairs the stage never trained on.

For a pair (prompt x, chosen answer c, rejected answer r) the implicit reward of an answer y is
β · (log π(y | x) − log π_ref(y | x)), the log-probabilities summed over the answer's tokens (the assistant turn
as the chat template renders it, end-of-turn text included). The margin is reward(c) − reward(r); the reward
accuracy is the share of pairs with a margin above 0. TRL logs the same two quantities on the training batches
(``rewards/margins``, ``rewards/accuracies``); here they are means over the family's fixed held-out items, with
one rejected answer per item drawn from a seed that does not depend on the training seed, so every arm and
training seed is scored on the same pairs.
"""

from __future__ import annotations

import random
from typing import Any

from . import tasks as T
from .evaluation import answer_sequence

HELDOUT_PAIR_SEED = 9_999  # the rejected answers of the held-out pairs (training pairs use the training seed)
HELDOUT_KEYS = ("heldout/rewards/accuracies", "heldout/rewards/margins")


def heldout_pairs(family: str, n: int) -> list[tuple[Any, str, str]]:
    """``n`` held-out ``(example, chosen, rejected)`` triples of ``family``: its fixed evaluation items, the checked
    answer chosen, a plausibly wrong one (seeded by :data:`HELDOUT_PAIR_SEED` and the item's index) rejected."""
    fam = T.get_family(family)
    out = []
    for i, ex in enumerate(fam.eval_examples(n)):
        wrong = fam.wrong_answer(ex, random.Random(f"supple:{family}:heldout-wrong:{HELDOUT_PAIR_SEED}:{i}"))
        out.append((ex, ex.answer, wrong))
    return out


def answer_logprobs(model, tok, items: list[tuple[Any, str]], batch_size: int, max_length: int) -> list[float]:
    """Σ log p(answer token) under ``model`` for each ``(example, answer)``: the answer as the assistant turn after
    the example's chat prompt, teacher-forced (fp32, no gradient)."""
    import torch

    from supple.data import pad_token_batch
    from supple.measure.calibration import next_token_stats

    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seqs = [answer_sequence(tok, ex, ans, max_length) for ex, ans in items]
    out: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i : i + batch_size]
            batch = pad_token_batch([s for s, _ in chunk], pad, device, label_starts=[st for _, st in chunk])
            ids = batch["input_ids"]
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
            pos = batch["labels"][:, 1:] != -100  # position t predicts token t + 1
            nll = next_token_stats(logits[:, :-1][pos], ids[:, 1:][pos])["nll"].double()
            rows = pos.nonzero()[:, 0].to(nll.device)
            sums = torch.zeros(len(chunk), dtype=torch.float64, device=nll.device).index_add_(0, rows, nll)
            out += [-float(v) for v in sums]
    return out


def heldout_preference_metrics(policy, tok, family: str, n: int, beta: float, reference=None,
                               batch_size: int = 16, max_length: int = 128) -> dict[str, float]:
    """``{"heldout/rewards/accuracies": ..., "heldout/rewards/margins": ...}`` of ``policy`` against ``reference``
    on ``n`` held-out pairs of ``family`` (module doc). ``reference=None``: ``policy`` is a PEFT model whose
    reference is itself with the adapter disabled (TRL's convention for LoRA DPO)."""
    if n < 1:
        raise ValueError(f"held-out preference pairs: n must be ≥ 1, got {n}")
    pairs = heldout_pairs(family, n)
    items = [(ex, c) for ex, c, _ in pairs] + [(ex, r) for ex, _, r in pairs]
    was_training = policy.training
    policy.eval()
    try:
        logp = answer_logprobs(policy, tok, items, batch_size, max_length)
        if reference is None:
            if not hasattr(policy, "disable_adapter"):
                raise TypeError("held-out preference metrics: reference=None needs a PEFT policy (its adapter off "
                                "is the reference); pass the reference model")
            with policy.disable_adapter():
                logp_ref = answer_logprobs(policy, tok, items, batch_size, max_length)
        else:
            ref_training = reference.training
            reference.eval()
            try:
                logp_ref = answer_logprobs(reference, tok, items, batch_size, max_length)
            finally:
                reference.train(ref_training)
    finally:
        policy.train(was_training)
    k = len(pairs)
    rewards = [beta * (a - b) for a, b in zip(logp, logp_ref)]
    margins = [rewards[i] - rewards[k + i] for i in range(k)]
    return {HELDOUT_KEYS[0]: sum(m > 0 for m in margins) / k, HELDOUT_KEYS[1]: sum(margins) / k}
