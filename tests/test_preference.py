"""The DPO stage's held-out reward accuracy and margin (supple/testbed/preference.py), against a hand-written
computation from the definition: β · (Σ log π(answer) − Σ log π_ref(answer)), chosen minus rejected."""

from __future__ import annotations

import copy

import pytest
import torch

from supple.testbed import tasks as T
from supple.testbed.preference import HELDOUT_KEYS, heldout_pairs, heldout_preference_metrics
from tests._tiny import make_tiny_llama, make_tokenizer

FAMILY = "arithmetic"


def _answer_logprob(model, tok, ex, answer: str) -> float:
    """One sequence at a time, no padding: the chat render of prompt + answer, scored from the prompt's end."""
    msgs = [{"role": "system", "content": T.SYSTEM_PROMPT}, {"role": "user", "content": ex.question}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([*msgs, {"role": "assistant", "content": answer}], tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    f_ids = tok(full, add_special_tokens=False)["input_ids"]
    assert f_ids[: len(p_ids)] == p_ids
    ids = torch.tensor([f_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[t - 1, f_ids[t]]) for t in range(len(p_ids), len(f_ids)))


def _by_hand(policy, ref, tok, n: int, beta: float) -> tuple[float, float]:
    margins = []
    for ex, c, r in heldout_pairs(FAMILY, n):
        rc = beta * (_answer_logprob(policy, tok, ex, c) - _answer_logprob(ref, tok, ex, c))
        rr = beta * (_answer_logprob(policy, tok, ex, r) - _answer_logprob(ref, tok, ex, r))
        margins.append(rc - rr)
    return sum(m > 0 for m in margins) / n, sum(margins) / n


def _perturbed(model, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def test_heldout_pairs_are_fixed_wrong_and_independent_of_training_seed():
    fam = T.get_family(FAMILY)
    a, b = heldout_pairs(FAMILY, 12), heldout_pairs(FAMILY, 12)
    assert [(e.question, c, r) for e, c, r in a] == [(e.question, c, r) for e, c, r in b]
    assert [e.question for e, _, _ in a] == [e.question for e in fam.eval_examples(12)]  # the held-out items
    assert all(fam.check_answer(e, c) and not fam.check_answer(e, r) for e, c, r in a)
    train_q = {e.question for e in fam.train_examples(200, 0, split="dpo")}
    assert not train_q & {e.question for e, _, _ in a}


def test_margin_and_accuracy_equal_the_definition():
    tok = make_tokenizer()
    ref = make_tiny_llama(tok, seed=0).eval()
    policy = _perturbed(ref, 0.02, seed=1)
    got = heldout_preference_metrics(policy, tok, FAMILY, 10, beta=0.1, reference=ref, batch_size=4)
    acc, margin = _by_hand(policy, ref, tok, 10, beta=0.1)
    assert got[HELDOUT_KEYS[1]] == pytest.approx(margin, rel=1e-4, abs=1e-6)
    assert got[HELDOUT_KEYS[0]] == pytest.approx(acc)
    assert margin != 0  # the check is not vacuous
    # policy == reference: every reward and margin is 0, so no pair is ranked right
    same = heldout_preference_metrics(ref, tok, FAMILY, 6, beta=0.1, reference=copy.deepcopy(ref))
    assert same[HELDOUT_KEYS[1]] == pytest.approx(0.0, abs=1e-9) and same[HELDOUT_KEYS[0]] == 0.0
    assert policy.training is False and ref.training is False  # modes restored


def test_lora_reference_is_the_adapter_off():
    from peft import LoraConfig, get_peft_model

    tok = make_tokenizer()
    base = make_tiny_llama(tok, seed=0)
    frozen = copy.deepcopy(base).eval()
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():  # a trained adapter: B ≠ 0
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    peft.train()
    got = heldout_preference_metrics(peft, tok, FAMILY, 8, beta=0.5)
    assert peft.training  # mode restored
    acc, margin = _by_hand(peft.eval(), frozen, tok, 8, beta=0.5)
    assert got[HELDOUT_KEYS[1]] == pytest.approx(margin, rel=1e-4, abs=1e-6) and margin != 0
    assert got[HELDOUT_KEYS[0]] == pytest.approx(acc)


def test_errors_say_what_to_change():
    tok = make_tokenizer()
    model = make_tiny_llama(tok, seed=0)
    with pytest.raises(TypeError, match="pass the reference model"):
        heldout_preference_metrics(model, tok, FAMILY, 4, beta=0.1)
    with pytest.raises(ValueError, match="n must be"):
        heldout_preference_metrics(model, tok, FAMILY, 0, beta=0.1, reference=model)
