"""SuppleCallback's lifecycle: reuse across trainers, a second train begin, validation before attaching,
detaching at the end and on errors, explicit attach(trainer), and errors where the trainer is needed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

import supple.callbacks.diversity as diversity_mod
import supple.callbacks.supple_callback as sc_mod
from supple import SuppleCallback, SuppleConfig
from supple.callbacks import TrainerRequiredError

from ._runs import lora_config, run, sft_dataset, trainable_state
from ._tiny import make_tiny_llama, make_tokenizer

CFG = dict(diversity_weight=1.0, diversity_layers=[0, -1], diversity_max_tokens=0, decorrelation_weight=1.0)


def hook_count(model: torch.nn.Module) -> int:
    """supple's forward hooks and pre-hooks on every module of ``model`` (the Trainer adds its own)."""
    return sum(
        str(getattr(h, "__module__", "")).startswith("supple")
        for m in model.modules()
        for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    )


def make_trainer(tmp_path, callbacks=(), model=None, steps=2, **extra):
    tok = make_tokenizer()
    args = SFTConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, learning_rate=0.5,
                     optim="sgd", lr_scheduler_type="constant", report_to=[], logging_steps=1, use_cpu=True,
                     seed=0, data_seed=0, max_length=48, save_strategy="no", max_grad_norm=1e9, disable_tqdm=True,
                     bf16=False, **extra)
    return SFTTrainer(model=model if model is not None else make_tiny_llama(tok), args=args,
                      train_dataset=sft_dataset(), processing_class=tok, peft_config=lora_config(),
                      callbacks=list(callbacks))


def test_one_callback_serves_two_trainers_in_turn(tmp_path):
    cb = SuppleCallback(SuppleConfig(**CFG))
    first = run("sft", callbacks=[cb], out=tmp_path / "a")
    second = run("sft", callbacks=[cb], out=tmp_path / "b")
    fresh = run("sft", callbacks=[SuppleCallback(SuppleConfig(**CFG))], out=tmp_path / "c")
    for tr in (first, second):
        logs = [h for h in tr.state.log_history if "loss" in h]
        assert len(logs) == 2 and all("supple/diversity" in h and "supple/decorrelation" in h for h in logs)
    a, b = trainable_state(second), trainable_state(fresh)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cb.trainer is None  # per-run state is gone after each run
    assert "log" not in vars(first) and "log" not in vars(second)  # trainer.log is never patched


class _BeginAgain(TrainerCallback):
    """Calls SuppleCallback.on_train_begin a second time, as auto_find_batch_size's retry does."""

    def __init__(self, cb: SuppleCallback) -> None:
        self.cb = cb
        self.hooks: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.cb.on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.hooks.append(hook_count(model))


def test_second_train_begin_replaces_and_never_adds(tmp_path):
    cb = SuppleCallback(SuppleConfig(**CFG))
    again = _BeginAgain(cb)
    twice = run("sft", callbacks=[cb, again], ga=2, out=tmp_path / "twice")
    spy = _BeginAgain(SuppleCallback(SuppleConfig(**CFG)))
    spy.on_train_begin = lambda *a, **k: None  # counts hooks only
    once = run("sft", callbacks=[spy.cb, spy], ga=2, out=tmp_path / "once")
    a, b = trainable_state(twice), trainable_state(once)
    assert all(torch.equal(a[k], b[k]) for k in a), "a second on_train_begin applied the terms twice"
    assert again.hooks == spy.hooks and len(set(again.hooks)) == 1
    order = twice.callback_handler.callbacks
    assert sum(c is cb for c in order) == 1  # the callback list holds us once, as the user gave it


def test_validation_failure_attaches_nothing(tmp_path):
    cfg = SuppleConfig(diversity_weight=1.0, metrics_every=1, refresh_method="redo",
                       decorrelation_cross_weight=0.1, previous_adapters=[str(tmp_path / "missing")])
    tr = make_trainer(tmp_path, [SuppleCallback(cfg)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tr.train()
    assert hook_count(tr.model) == 0


def test_error_inside_a_supple_hook_detaches_everything(tmp_path, monkeypatch):
    def broken(name, h, normalize):
        raise RuntimeError("boom")

    monkeypatch.setattr(diversity_mod, "penalty_value_and_grad", broken)
    cb = SuppleCallback(SuppleConfig(diversity_weight=1.0, refresh_method="redo", refresh_every=1))
    tr = make_trainer(tmp_path, [cb])
    with pytest.raises(RuntimeError, match="boom"):
        tr.train()
    assert hook_count(tr.model) == 0 and cb.trainer is None


class _Crash(TrainerCallback):
    def __init__(self, cb: SuppleCallback) -> None:
        self.cb, self.during = cb, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.during = hook_count(model)
        raise KeyboardInterrupt("stopped by the user")


def test_attach_as_context_manager_detaches_when_train_raises(tmp_path):
    tr = make_trainer(tmp_path)
    cb = SuppleCallback(SuppleConfig(diversity_weight=1.0, refresh_method="redo", refresh_every=1))
    crash = _Crash(cb)
    tr.add_callback(crash)
    with pytest.raises(KeyboardInterrupt):
        with cb.attach(tr):
            tr.train()
    assert crash.during > 0  # the hooks were there during training
    assert hook_count(tr.model) == 0 and tr.callback_handler.callbacks[0] is not cb  # order restored


def test_attach_registers_the_callback_and_works_without_discovery(tmp_path, monkeypatch):
    monkeypatch.setattr(sc_mod, "discover_trainer", lambda cb: None)
    tr = make_trainer(tmp_path)
    cb = SuppleCallback(SuppleConfig(**CFG)).attach(tr)
    assert sum(c is cb for c in tr.callback_handler.callbacks) == 1
    assert cb.attach(tr) is cb and sum(c is cb for c in tr.callback_handler.callbacks) == 1  # idempotent
    tr.train()
    ref = run("sft", callbacks=[SuppleCallback(SuppleConfig(**CFG))], out=tmp_path / "ref")
    a, b = trainable_state(tr), trainable_state(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all("supple/diversity" in h for h in tr.state.log_history if "loss" in h)


def test_attach_to_another_trainer_is_an_error(tmp_path):
    cb = SuppleCallback(SuppleConfig(diversity_weight=1.0))
    other = make_trainer(tmp_path / "other")
    cb.attach(other)
    with pytest.raises(ValueError, match="different trainer"):
        make_trainer(tmp_path / "mine", [cb]).train()


def _begin_without_trainer(cb: SuppleCallback, **args) -> None:
    base = dict(seed=0, fp16=False, world_size=1, process_index=0, gradient_accumulation_steps=1, report_to=[],
                max_length=32)
    cb.on_train_begin(SimpleNamespace(**{**base, **args}), SimpleNamespace(global_step=0), SimpleNamespace(),
                      model=make_tiny_llama(), processing_class=make_tokenizer())


def test_trainer_needed_and_missing_is_a_clear_error():
    with pytest.raises(TrainerRequiredError, match=r"fp16.*attach\(trainer\)"):
        _begin_without_trainer(SuppleCallback(SuppleConfig(diversity_weight=1.0)), fp16=True)
    with pytest.raises(TrainerRequiredError, match=r"replay under DDP.*attach\(trainer\)"):
        _begin_without_trainer(SuppleCallback(SuppleConfig(replay_data="builtin:pydoc")), world_size=2)
    cb = SuppleCallback(SuppleConfig(diversity_weight=1.0))  # neither needs the trainer: fine without one
    _begin_without_trainer(cb)
    assert cb.trainer is None
    cb.detach()
