"""SuppleCallback behaviour: where hooks fire, logging, errors at train begin, non-finite terms."""

from __future__ import annotations

import glob
from dataclasses import dataclass

import pytest
import torch
from trl import SFTConfig

import supple.callbacks.diversity as diversity_mod
from supple import SuppleCallback, SuppleConfig

from ._runs import bare_taps, dpo_dataset, run, trainable_state


@pytest.mark.parametrize("kind,ckpt", [("dpo", False), ("dpo", True), ("sft", True)])
def test_each_micro_batch_counts_once_and_reference_eval_passes_are_untouched(tmp_path, count_penalties, kind, ckpt):
    """2 steps × GA 2 × 2 blocks = 8 terms: DPO's reference pass, checkpoint recomputation and eval add none."""
    cfg = SuppleConfig(diversity_weight=0.1, diversity_layers=[0, 1], diversity_max_tokens=0)
    extra = {"eval_strategy": "steps", "eval_steps": 1, "per_device_eval_batch_size": 2} if kind == "dpo" else {}
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        from ._runs import lora_config
        from ._tiny import make_tiny_llama, make_tokenizer

        tok = make_tokenizer()
        args = DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, report_to=[], use_cpu=True, bf16=False, logging_steps=1,
                         save_strategy="no", gradient_checkpointing=ckpt, disable_tqdm=True, **extra)
        tr = DPOTrainer(model=make_tiny_llama(tok), args=args, train_dataset=dpo_dataset(),
                        eval_dataset=dpo_dataset(4), processing_class=tok, peft_config=lora_config(),
                        callbacks=[SuppleCallback(cfg)])
        tr.train()
    else:
        tr = run("sft", callbacks=[SuppleCallback(cfg)], ga=2, ckpt=ckpt, out=tmp_path)
    assert len(count_penalties) == 8
    assert any("eval_loss" in h for h in tr.state.log_history) == (kind == "dpo")


def test_settings_from_trainer_args(tmp_path):
    @dataclass
    class MyConfig(SuppleConfig, SFTConfig):
        pass

    from trl import SFTTrainer

    from ._runs import sft_dataset
    from ._tiny import make_tiny_llama, make_tokenizer

    tok = make_tokenizer()
    args = MyConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                    use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", disable_tqdm=True,
                    diversity_weight=0.2, diversity_layers=[0], decorrelation_weight=0.1)
    from ._runs import lora_config

    tr = SFTTrainer(model=make_tiny_llama(tok), args=args, train_dataset=sft_dataset(), processing_class=tok,
                    peft_config=lora_config(), callbacks=[SuppleCallback()])
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert all("supple/diversity" in h and "supple/decorrelation" in h for h in logs)


def test_metrics_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = SuppleConfig(diversity_weight=0.1, decorrelation_weight=0.1, metrics_every=1)
    run("sft", callbacks=[SuppleCallback(cfg)], out=tmp_path,
        extra_args={"report_to": ["tensorboard"]})
    files = glob.glob(str(tmp_path / "**" / "events.out.tfevents*"), recursive=True)
    assert files
    tags = set()
    for f in files:
        acc = EventAccumulator(f)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for key in ("supple/diversity", "supple/decorrelation", "supple/skipped_nonfinite", "supple/erank/layer_1",
                "supple/anisotropy/layer_1"):
        assert any(t.endswith(key) for t in tags), (key, sorted(tags))


def test_live_metrics_in_log_history(tmp_path):
    cfg = SuppleConfig(metrics_every=1, diversity_layers=[0, -1])
    tr = run("sft", callbacks=[SuppleCallback(cfg)], out=tmp_path)
    logs = [h for h in tr.state.log_history if "loss" in h]
    for k in (0, 1):
        vals = [h[f"supple/erank/layer_{k}"] for h in logs]
        assert len(vals) == 2 and all(1 <= v <= 32 for v in vals)
        assert all(-1 <= h[f"supple/anisotropy/layer_{k}"] <= 1 for h in logs)
    # the LoRA updates start at B = 0; after the first step ΔW has a finite stable rank in [1, r]
    ranks = [h["supple/lora_stable_rank"] for h in logs if "supple/lora_stable_rank" in h]
    assert ranks and all(1 <= v <= 4 for v in ranks)


def test_non_finite_penalty_is_skipped_counted_and_not_applied(tmp_path, monkeypatch):
    real = diversity_mod.penalty_value_and_grad

    def poisoned(name, h, normalize):
        p, g = real(name, h, normalize)
        return p * float("inf"), g * float("nan")

    monkeypatch.setattr(diversity_mod, "penalty_value_and_grad", poisoned)
    cfg = SuppleConfig(diversity_weight=1.0)
    with pytest.warns(UserWarning, match="skipped"):
        tr = run("sft", callbacks=[SuppleCallback(cfg)], ga=2, out=tmp_path / "a")
    monkeypatch.setattr(diversity_mod, "penalty_value_and_grad", real)
    plain = run("sft", ga=2, out=tmp_path / "b")
    a, b = trainable_state(tr), trainable_state(plain)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    counts = [h["supple/skipped_nonfinite"] for h in tr.state.log_history if "supple/skipped_nonfinite" in h]
    assert counts == [2.0, 4.0]


def test_single_token_micro_batch_is_skipped():
    taps = bare_taps(1.0, mask=torch.tensor([[0, 0, 1, 0]]))
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    out = taps._tap(hidden, 0)
    assert out is hidden
    mean, skipped = taps.collect()
    assert mean is None and skipped == 1


def test_layer_out_of_range_is_an_error_at_train_begin(tmp_path):
    with pytest.raises(ValueError, match=r"diversity_layers.*out of range.*2 decoder blocks"):
        run("sft", callbacks=[SuppleCallback(SuppleConfig(diversity_weight=0.1, diversity_layers=[5]))], out=tmp_path)


def test_decorrelation_without_lora_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="needs a PEFT LoRA model"):
        run("sft", lora=False, callbacks=[SuppleCallback(SuppleConfig(decorrelation_weight=0.1))], out=tmp_path)


def test_callback_passed_twice_is_an_error(tmp_path):
    cfg = SuppleConfig(diversity_weight=0.1)
    with pytest.raises(ValueError, match="more than once"):
        run("sft", callbacks=[SuppleCallback(cfg), SuppleCallback(cfg)], out=tmp_path)


def test_cross_weight_without_subspaces_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="previous_adapters"):
        run("sft", callbacks=[SuppleCallback(SuppleConfig(decorrelation_cross_weight=0.1))], out=tmp_path)


def test_hooks_are_removed_after_training(tmp_path):
    tr = run("sft", callbacks=[SuppleCallback(SuppleConfig(diversity_weight=0.1))], out=tmp_path)
    from supple.modeling import find_decoder_blocks

    _, blocks = find_decoder_blocks(tr.model)
    assert all(len(b._forward_hooks) == 0 for b in blocks)
