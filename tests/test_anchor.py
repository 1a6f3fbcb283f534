"""The pre-stage reference and the automatic weight: the threshold's sign, the controller's rise and bounds, and
checkpoint/resume (λ and P_ref saved in trainer_state.json, a resumed run equal to an uninterrupted one).

That the anchored term equals the hand-written λ·relu(P − T) loss is proven in tests/test_equivalence.py and
tests/test_grpo.py."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from supple import SuppleCallback, SuppleConfig
from supple.callbacks.reference import DiversityAnchor
from supple.regularizers.anchor import anchor_threshold, auto_weight_step, hinge_value_and_grad

from ._runs import assert_params_close, run, trainable_state

AUTO = {"diversity_weight": 1.0, "diversity_max_tokens": 0, "diversity_layers": [0, -1],
        "diversity_reference": "pre_stage", "diversity_weight_schedule": "auto", "diversity_weight_rate": 0.5}


def test_threshold_lies_above_the_reference_for_either_sign():
    p_ref = torch.tensor([-2.0, 0.5, 0.0])
    assert anchor_threshold(p_ref, 0.5).tolist() == [-1.0, 0.75, 0.0]  # T >= P_ref: tol·|P_ref|
    g = torch.ones(3, 2)
    value, grad, active = hinge_value_and_grad(torch.tensor(0.9), g, torch.tensor(0.75))
    assert float(value) == pytest.approx(0.15) and bool(active) and torch.equal(grad, g)
    value, grad, active = hinge_value_and_grad(torch.tensor(0.75), g, torch.tensor(0.75))  # at T: inactive
    assert float(value) == 0 and not bool(active) and not grad.any()


def test_weight_step_leaves_out_blocks_without_data():
    w = auto_weight_step(torch.tensor(1.0), torch.tensor([2.0, float("nan")]), torch.tensor([1.0, 1.0]),
                         torch.tensor([1.0, 1.0]), torch.tensor([True, False]), rate=0.1, low=0.5, high=2.0)
    assert float(w) == pytest.approx(math.exp(0.1))
    none = auto_weight_step(torch.tensor(3.0), torch.zeros(2), torch.ones(2), torch.ones(2),
                            torch.tensor([False, False]), rate=0.1, low=0.5, high=2.0)
    assert float(none) == 2.0  # err 0: only clamped


def _anchor(**fields) -> tuple[DiversityAnchor, SimpleNamespace]:
    cfg = SuppleConfig(**{**AUTO, "diversity_layers": [0], "diversity_reference_batches": 0, **fields})
    anchor = DiversityAnchor(cfg, [0])
    ctx = SimpleNamespace(step=0, model=torch.nn.Linear(2, 2), seed=0, rank=0, world_size=1, trainer=None)
    anchor.attach(ctx)
    anchor.begin(None, None)
    return anchor, ctx


def _step(anchor: DiversityAnchor, ctx: SimpleNamespace, p: float) -> float:
    for _ in range(2):  # two micro-batches
        anchor.record(0, torch.tensor(p), torch.tensor(True))
    ctx.step += 1
    anchor.on_step_end()
    return float(anchor.weight)


def test_auto_weight_rises_while_diversity_is_lost_and_stays_within_bounds():
    anchor, ctx = _anchor(diversity_weight_min=0.25, diversity_weight_max=3.0)
    assert anchor.mode == "first_step" and float(anchor.threshold_at(0, torch.device("cpu"))) == math.inf
    assert _step(anchor, ctx, 0.5) == 1.0  # the reference step: P_ref = 0.5, λ unchanged
    assert float(anchor.p_ref[0]) == 0.5
    rising = [_step(anchor, ctx, 2.0) for _ in range(4)]  # P far above T: err = +1
    assert rising == pytest.approx([math.exp(0.5), math.exp(1.0), 3.0, 3.0], rel=1e-6)
    assert anchor.weight_on(torch.device("cpu")) is anchor.weight
    slight = _step(anchor, ctx, 0.6)  # err = (0.6 − 0.5) / 0.5 = 0.2: still rising, capped at the maximum
    assert slight == 3.0
    falling = [_step(anchor, ctx, 0.0) for _ in range(6)]  # P below T: err = −1
    assert falling == sorted(falling, reverse=True) and falling[-1] == 0.25
    assert all(0.25 <= w <= 3.0 for w in rising + falling)


@pytest.mark.parametrize("batches", [4, 0])
def test_resumed_run_ends_with_the_same_weight_and_parameters(tmp_path, batches):
    cfg = SuppleConfig(**AUTO, diversity_reference_batches=batches)
    save = {"save_strategy": "steps", "save_steps": 2}
    full = run("sft", callbacks=[SuppleCallback(cfg)], ga=2, steps=4, out=tmp_path / "full", extra_args=save)
    saved = json.loads((tmp_path / "full" / "checkpoint-2" / "trainer_state.json").read_text())
    payload = saved["stateful_callbacks"]["SuppleCallback"]["supple"]
    assert len(payload["p_ref"]) == 2 and payload["weight"] > 0
    resumed = run("sft", callbacks=[SuppleCallback(cfg)], ga=2, steps=4, out=tmp_path / "full",
                  extra_args=save, resume=tmp_path / "full" / "checkpoint-2")
    assert_params_close(trainable_state(full), trainable_state(resumed), rtol=0, atol=0)

    def weights(tr):
        return [h["supple/diversity_weight"] for h in tr.state.log_history if "supple/diversity_weight" in h]

    assert weights(resumed) == weights(full) and len(weights(full)) == 4
    assert len(set(weights(full))) > 1 and all(1e-3 <= w <= 10 for w in weights(full)), weights(full)
    ref = {h["supple/diversity_reference"] for h in full.state.log_history + resumed.state.log_history
           if "supple/diversity_reference" in h}
    # the resumed run kept the pre-stage reference instead of measuring the resumed weights (λ, continuous in T,
    # would differ too) and restored λ instead of restarting at diversity_weight
    assert len(ref) == 1


def test_resume_from_a_checkpoint_without_supple_state_warns_and_still_saves(tmp_path):
    save = {"save_strategy": "steps", "save_steps": 2}
    run("sft", steps=2, out=tmp_path / "plain", extra_args=save)
    with pytest.warns(UserWarning, match="without a saved diversity reference"):
        tr = run("sft", callbacks=[SuppleCallback(SuppleConfig(**AUTO))], steps=4, out=tmp_path / "plain",
                 extra_args=save, resume=tmp_path / "plain" / "checkpoint-2")
    saved = json.loads((tmp_path / "plain" / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["SuppleCallback"]["supple"]["p_ref"] is not None
    assert any("supple/diversity_reference" in h for h in tr.state.log_history)


def test_transformers_recreating_an_explicitly_configured_callback_is_refused(tmp_path):
    save = {"save_strategy": "steps", "save_steps": 2}
    cfg = SuppleConfig(**AUTO)
    run("sft", callbacks=[SuppleCallback(cfg)], steps=2, out=tmp_path / "a", extra_args=save)
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint=False"):
        run("sft", callbacks=[SuppleCallback(cfg)], steps=4, out=tmp_path / "a", resume=tmp_path / "a" / "checkpoint-2",
            extra_args={**save, "restore_callback_states_from_checkpoint": True})
