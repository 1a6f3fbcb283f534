"""supple under TRL's GRPOTrainer: terms act on the policy's training forward only, equal to a hand-written loss."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from supple import SuppleCallback, SuppleConfig

from ._runs import assert_params_close, lora_config, max_abs_diff, reference_class, trainable_state
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


@pytest.mark.parametrize("ga,beta", [(1, 0.0), (2, 0.1)])
def test_grpo_terms_match_hand_written_loss_and_skip_generation(tmp_path, count_penalties, ga, beta):
    calls = count_penalties
    cfg = SuppleConfig(diversity_weight=1.0, diversity_max_tokens=0, decorrelation_weight=1.0)
    a = grpo_run(tmp_path / "a", [SuppleCallback(cfg)], ga=ga, beta=beta)
    # generation, old-policy and reference (beta > 0) passes add no term: one per training micro-batch
    assert len(calls) == 2 * ga
    ref = reference_class(GRPOTrainer, 1.0, intra_weight=1.0)
    b = grpo_run(tmp_path / "b", trainer_cls=ref, ga=ga, beta=beta)
    c = grpo_run(tmp_path / "c", ga=ga, beta=beta)
    sa, sb, sc = trainable_state(a), trainable_state(b), trainable_state(c)
    assert_params_close(sa, sb, rtol=1e-5, atol=1e-6)
    assert max_abs_diff(sa, sc) > 1e-3
    logs = [h for h in a.state.log_history if "loss" in h]
    assert all("supple/diversity" in h and "supple/decorrelation" in h for h in logs)


def test_grpo_replay_and_live_metrics(tmp_path):
    cfg = SuppleConfig(replay_data="builtin:pydoc", replay_every=1, replay_batch_size=2, metrics_every=1)
    tr = grpo_run(tmp_path, [SuppleCallback(cfg)])
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert all(h["supple/replay_loss"] > 0 for h in logs)
    assert all(1 <= h["supple/erank/layer_1"] <= 32 and "supple/anisotropy/layer_1" in h for h in logs)
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
