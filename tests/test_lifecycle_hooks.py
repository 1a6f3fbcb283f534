"""Taps that do not depend on library internals: block hooks inside or outside a checkpointed region
(reentrant or not), forwards that bypass ``__call__`` at the model level, statistics counted once."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from trl import SFTTrainer

from supple import SuppleCallback, SuppleConfig
from supple.callbacks import TrainingContext
from supple.callbacks.diversity import DiversityTaps

from ._runs import assert_params_close, hand_ipr, reference_class, run, trainable_state
from ._tiny import make_tiny_llama

WEIGHT = 2.0


def _checkpoint_block_calls(model: torch.nn.Module, reentrant: bool) -> None:
    """Run every decoder block's ``__call__`` — its hooks included — inside torch.utils.checkpoint, as
    transformers did before 5.24 (checkpointing now wraps ``forward`` and leaves the hooks outside)."""
    for layer in model.model.layers:
        base = type(layer)

        def call(self, *args, _base=base, **kwargs):
            if not (self.training and torch.is_grad_enabled()):
                return _base.__call__(self, *args, **kwargs)
            return checkpoint(partial(_base.__call__, self, **kwargs), *args, use_reentrant=reentrant)

        layer.__class__ = type(f"Checkpointed{base.__name__}", (base,), {"__call__": call})


def _batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 60, (2, 10), generator=gen)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0  # right padding: the mask must reach the taps
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _hand_grads(layers: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """loss + λ·mean_k ipr(H_k[real tokens]), written from the model's structure."""
    model = make_tiny_llama()
    model.train()
    ids, mask, labels = _batch()
    captured = {}
    handles = [model.model.layers[k].register_forward_hook(
        lambda m, a, out, k=k: captured.__setitem__(k, out[0] if isinstance(out, tuple) else out)) for k in layers]
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    for h in handles:
        h.remove()
    pens = [hand_ipr(captured[k][mask.bool()]) for k in layers]
    (loss + WEIGHT * torch.stack(pens).mean()).backward()
    return _grads(model)


@pytest.mark.parametrize("reentrant", [False, True, None], ids=["non-reentrant", "reentrant", "no-checkpoint"])
@pytest.mark.parametrize("entry", ["call", "forward"])
def test_tap_applies_inside_checkpoint_and_without_model_call(count_penalties, reentrant, entry):
    layers = (0, 1)
    model = make_tiny_llama()
    model.train()
    if reentrant is not None:
        _checkpoint_block_calls(model, reentrant)
        if reentrant:
            model.model.embed_tokens.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    ctx = TrainingContext(SimpleNamespace(seed=0, gradient_accumulation_steps=1), SimpleNamespace(global_step=0),
                          model)
    taps = DiversityTaps("ipr", WEIGHT, list(layers), 0, True, 0, model)
    taps.attach(ctx)
    ids, mask, labels = _batch()
    try:
        forward = model if entry == "call" else model.forward  # .forward: the model-level pre-hook never fires
        forward(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
    finally:
        taps.detach()
    expected = _hand_grads(layers)
    got = _grads(model)
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert count_penalties == [int(mask.sum())] * len(layers)  # once per (step, micro-batch, block)
    mean, skipped = taps.collect()
    assert skipped == 0 and 0 < mean <= 1


def test_peft_tuner_calling_model_forward_directly_still_taps(tmp_path, monkeypatch):
    """PEFT 0.20's BaseTuner.forward calls ``self.model.forward(...)``, bypassing ``__call__``."""
    from peft.tuners.tuners_utils import BaseTuner

    monkeypatch.setattr(BaseTuner, "forward", lambda self, *a, **kw: self.model.forward(*a, **kw))
    cfg = SuppleConfig(diversity_weight=1.0, diversity_layers=[0, -1], diversity_max_tokens=0)
    a = run("sft", callbacks=[SuppleCallback(cfg)], ga=2, out=tmp_path / "cb")
    b = run("sft", trainer_cls=reference_class(SFTTrainer, 1.0, layers=(0, -1)), ga=2, out=tmp_path / "ref")
    assert_params_close(trainable_state(a), trainable_state(b), rtol=1e-5, atol=1e-6)
    logged = [h["supple/diversity"] for h in a.state.log_history if "supple/diversity" in h]
    assert len(logged) == 2
