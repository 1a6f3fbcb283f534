"""supple under TRL's GRPOTrainer: terms act on the policy's training forward only, equal to a hand-written loss."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from supple import SuppleCallback, SuppleConfig

from ._runs import (
    AnchorSpec,
    assert_params_close,
    lora_config,
    max_abs_diff,
    reference_class,
    trainable_state,
)
from ._tiny import make_tiny_llama, make_tokenizer


def length_reward(completions, **kwargs):
    """Deterministic reward: longer completions with more digits score higher."""
    return [sum(ch.isdigit() for ch in c) / 4 + len(c) / 10 for c in completions]


def grpo_run(tmp_path, callbacks=(), trainer_cls=GRPOTrainer, ga=1, steps=2, beta=0.0):
    tok = make_tokenizer()
    tok.padding_side = "left"
    ds = Dataset.from_list([{"prompt": f"{a}+{b}="} for a in range(4) for b in range(4)])
    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, num_generations=4,
        gradient_accumulation_steps=ga, max_completion_length=6, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", report_to=[], use_cpu=True, bf16=False, logging_steps=1, save_strategy="no",
        seed=0, disable_tqdm=True, max_grad_norm=1e9, beta=beta,
    )
    tr = trainer_cls(model=make_tiny_llama(tok), reward_funcs=length_reward, args=args, train_dataset=ds,
                     processing_class=tok, peft_config=lora_config(), callbacks=list(callbacks))
    tr.train()
    return tr


# anchored: GRPO's batches are prompts, so the reference is the first step's penalty (the term off on that step)
# even with diversity_reference_batches = 4; with the automatic λ
ANCHOR = {"diversity_reference": "pre_stage", "diversity_reference_batches": 4, "diversity_weight_schedule": "auto",
          "diversity_weight_rate": 0.5}


@pytest.mark.parametrize("ga,beta,anchored", [(1, 0.0, False), (2, 0.1, False), (1, 0.0, True), (2, 0.0, True)])
def test_grpo_terms_match_hand_written_loss_and_skip_generation(tmp_path, count_penalties, ga, beta, anchored):
    calls = count_penalties
    steps = 3 if anchored else 2
    cfg = SuppleConfig(diversity_weight=1.0, diversity_max_tokens=0, decorrelation_weight=1.0,
                       **(ANCHOR if anchored else {}))
    a = grpo_run(tmp_path / "a", [SuppleCallback(cfg)], ga=ga, beta=beta, steps=steps)
    # generation, old-policy and reference (beta > 0) passes add no term: one per training micro-batch
    assert len(calls) == steps * ga
    spec = AnchorSpec(batches=0, rate=0.5) if anchored else None
    ref = reference_class(GRPOTrainer, 1.0, intra_weight=1.0, anchor=spec)
    b = grpo_run(tmp_path / "b", trainer_cls=ref, ga=ga, beta=beta, steps=steps)
    c = grpo_run(tmp_path / "c", ga=ga, beta=beta, steps=steps)
    sa, sb, sc = trainable_state(a), trainable_state(b), trainable_state(c)
    assert_params_close(sa, sb, rtol=1e-5, atol=1e-6)
    assert max_abs_diff(sa, sc) > 1e-3
    logs = [h for h in a.state.log_history if "loss" in h]
    assert all("supple/diversity" in h and "supple/decorrelation" in h for h in logs)
    if anchored:
        active = [h["supple/diversity_active"] for h in logs]
        assert active[0] == 0 and sum(active) > 0, active  # off on the reference step, then on for some terms
        assert logs[0]["supple/diversity_reference"] == pytest.approx(logs[0]["supple/diversity"], rel=1e-6)
        weights = [h["supple/diversity_weight"] for h in logs]
        assert weights[:-1] == pytest.approx(b.weights[1:], rel=1e-5)


def test_grpo_replay_and_live_metrics(tmp_path):
    cfg = SuppleConfig(replay_data="builtin:pydoc", replay_every=1, replay_batch_size=2, metrics_every=1)
    tr = grpo_run(tmp_path, [SuppleCallback(cfg)])
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert all(h["supple/replay_loss"] > 0 for h in logs)
    assert all(1 <= h["supple/erank/layer_1"] <= 32 and "supple/anisotropy/layer_1" in h for h in logs)
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
