"""Mixed precision, fp16 loss scaling, faults, a table of bad inputs, and file-safety guarantees."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import DPOTrainer, SFTTrainer

import supple.callbacks.diversity as diversity_mod
from supple import SuppleCallback, SuppleConfig

from ._runs import assert_params_close, bare_taps, reference_class, run, trainable_state
from ._tiny import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_bf16_autocast_equivalence_with_penalties_in_fp32(tmp_path, kind, monkeypatch):
    dtypes = []
    real = diversity_mod.penalty_value_and_grad

    def spy(name, h, normalize):
        p, g = real(name, h, normalize)
        dtypes.append((torch.is_autocast_enabled("cpu"), p.dtype, g.dtype))
        return p, g

    monkeypatch.setattr(diversity_mod, "penalty_value_and_grad", spy)
    cfg = SuppleConfig(diversity_weight=1.0, diversity_max_tokens=0, decorrelation_weight=1.0)
    bf16 = {"bf16": True}
    a = run(kind, callbacks=[SuppleCallback(cfg)], ga=2, out=tmp_path / "a", extra_args=bf16)
    base = SFTTrainer if kind == "sft" else DPOTrainer
    b = run(kind, trainer_cls=reference_class(base, 1.0, intra_weight=1.0), ga=2, out=tmp_path / "b", extra_args=bf16)
    assert dtypes and all(d == (False, torch.float32, torch.float32) for d in dtypes)
    assert_params_close(trainable_state(a), trainable_state(b), rtol=2e-2, atol=2e-3)  # bf16 tolerances


def test_injected_gradients_carry_the_grad_scaler_scale():
    from supple.callbacks import TrainingContext

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    args, state = SimpleNamespace(gradient_accumulation_steps=2, fp16=True), SimpleNamespace(global_step=0)
    trainer = SimpleNamespace(accelerator=SimpleNamespace(scaler=scaler), current_gradient_accumulation_steps=2)
    ctx = TrainingContext(args, state, torch.nn.Linear(2, 2), trainer)
    assert ctx.grad_scale() == 1024.0 and ctx.micro_coeff() == 512.0
    scaler.scale(torch.ones(()))  # as a training step would, then a manual scale change
    scaler.update(512.0)
    assert ctx.grad_scale() == 512.0
    ctx.trainer = SimpleNamespace(accelerator=SimpleNamespace(scaler=None), current_gradient_accumulation_steps=4)
    assert ctx.grad_scale() == 1.0 and ctx.micro_coeff() == 0.25
    # the tap multiplies the hand-derived gradient by exactly that coefficient
    taps = bare_taps(2.0, coeff=1024.0)
    hidden = torch.randn(1, 6, 8, requires_grad=True)
    out = taps._tap(hidden, 0)
    out.backward(torch.zeros_like(out))
    _, g = diversity_mod.penalty_value_and_grad("ipr", hidden.detach().reshape(6, 8), True)
    torch.testing.assert_close(hidden.grad.reshape(6, 8), 2.0 * 1024.0 * g)


def test_fp16_without_a_trainer_is_a_clear_error_not_scale_one():
    from supple.callbacks import TrainerRequiredError, TrainingContext

    ctx = TrainingContext(SimpleNamespace(fp16=True), SimpleNamespace(global_step=0), torch.nn.Linear(2, 2))
    with pytest.raises(TrainerRequiredError, match=r"fp16.*SuppleCallback\(config\)\.attach\(trainer\)"):
        ctx.grad_scale()
    assert TrainingContext(SimpleNamespace(fp16=False), SimpleNamespace(global_step=0),
                           torch.nn.Linear(2, 2)).grad_scale() == 1.0


def test_nan_hidden_states_inject_nothing():
    taps = bare_taps(1.0)
    hidden = torch.randn(2, 5, 8)
    hidden[1, 2, 3] = float("nan")
    hidden.requires_grad_(True)
    out = taps._tap(hidden, 0)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert torch.equal(hidden.grad, upstream)
    with pytest.warns(UserWarning, match="not finite"):
        mean, skipped = taps.collect()
    assert mean is None and skipped == 1


def _make_adapter(tmp_path):
    tr = run("sft", steps=1, out=tmp_path / "s1")
    tr.model.save_pretrained(str(tmp_path / "adapter"))
    return str(tmp_path / "adapter")


BAD_TRAIN_BEGIN = [
    ("layer index", lambda p: SuppleCallback(SuppleConfig(diversity_weight=0.1, diversity_layers=[0, 9])), {},
     ValueError, "out of range"),
    ("missing previous adapter", lambda p: SuppleCallback(SuppleConfig(
        decorrelation_cross_weight=0.1, previous_adapters=[str(p / "nope")])), {}, FileNotFoundError, "does not exist"),
    ("mismatched previous adapter", lambda p: SuppleCallback(SuppleConfig(
        decorrelation_cross_weight=0.1, previous_adapters=[_make_adapter(p)])), {"model_kw": {"hidden_size": 48}},
     ValueError, "input size 48"),
    ("empty replay data", lambda p: SuppleCallback(SuppleConfig(), replay_dataset=Dataset.from_list([])), {},
     ValueError, "empty"),
    ("replay without text", lambda p: SuppleCallback(SuppleConfig(), replay_dataset=Dataset.from_list([{"x": 1}])),
     {}, ValueError, "no 'text' or 'messages'"),
    ("decorrelation without LoRA", lambda p: SuppleCallback(SuppleConfig(decorrelation_weight=0.1)), {"lora": False},
     ValueError, "PEFT LoRA"),
    ("relora without LoRA", lambda p: SuppleCallback(SuppleConfig(refresh_method="relora")), {"lora": False},
     ValueError, "has none"),
    ("cross weight without subspace", lambda p: SuppleCallback(SuppleConfig(decorrelation_cross_weight=0.1)), {},
     ValueError, "previous_adapters"),
]


class _Steps(TrainerCallback):
    steps = 0

    def on_step_begin(self, *args, **kwargs):
        self.steps += 1


@pytest.mark.parametrize("label,make_cb,opts,exc,match", BAD_TRAIN_BEGIN, ids=[c[0] for c in BAD_TRAIN_BEGIN])
def test_bad_input_fails_before_the_first_step(tmp_path, label, make_cb, opts, exc, match):
    cb, steps = make_cb(tmp_path), _Steps()
    model = make_tiny_llama(**opts.get("model_kw", {}))
    with pytest.raises(exc, match=match):
        run("sft", model=model, lora=opts.get("lora", True), callbacks=[cb, steps], out=tmp_path / "run")
    assert steps.steps == 0  # no optimizer step began
    supple_hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
                    if str(getattr(h, "__module__", "")).startswith("supple")]
    assert supple_hooks == []


def test_callback_passed_twice_fails_before_the_first_step(tmp_path):
    cfg = SuppleConfig(diversity_weight=0.1)
    with pytest.raises(ValueError, match="more than once"):
        run("sft", callbacks=[SuppleCallback(cfg), SuppleCallback(cfg)], out=tmp_path)


def test_replay_dataset_of_wrong_type_is_an_error(tmp_path):
    with pytest.raises(TypeError, match="datasets.Dataset"):
        run("sft", callbacks=[SuppleCallback(SuppleConfig(), replay_dataset=["a list"])], out=tmp_path)


def test_no_unpickling_and_no_network_in_the_package():
    """supple reads user files with safetensors only and never opens network connections itself."""
    offenders = []
    for path in (ROOT / "supple").rglob("*.py"):
        text = path.read_text()
        for pattern in (r"\bpickle\.load", r"torch\.load\((?![^)]*weights_only=True)", r"\bimport requests\b",
                        r"urllib\.request", r"\bsocket\b", r"hf_hub_download", r"snapshot_download"):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(ROOT)}: {pattern}")
    assert not offenders, offenders
