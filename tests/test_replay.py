"""Mixed-domain replay: equivalence with a hand-written loss, data sources, errors, faults."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from trl import DPOTrainer, SFTTrainer

from supple import SuppleCallback, SuppleConfig
from supple.callbacks.replay import ReplayTerm
from supple.data import load_replay_items, mix_replay

from ._runs import assert_params_close, max_abs_diff, run, trainable_state
from ._tiny import make_tokenizer

REPLAY_TEXTS = [f"the quick brown fox number {i} jumps over {i + 1} lazy dogs." for i in range(10)]


def spec_replay_batch(texts, tok, max_length, seed, step, every, batch_size, device):
    """The documented replay batch of optimizer step ``step``, built by hand: positions k·B … (k+1)·B − 1
    (k = step // every) of the sequence of epochs, each epoch a random.Random("supple-replay/seed/epoch")
    shuffle of the items; texts tokenized with special tokens, right-padded, labels -100 on padding."""
    import random

    k, n, rows = step // every, len(texts), []
    for j in range(k * batch_size, (k + 1) * batch_size):
        epoch, pos = divmod(j, n)
        order = list(range(n))
        random.Random(f"supple-replay/{seed}/{epoch}").shuffle(order)
        rows.append(tok(texts[order[pos]], add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"])
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def replay_reference(base_cls, items, weight, every, batch_size, seed=0, max_length=None):
    class Reference(base_cls):
        _seen = -1

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            res = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = res[0] if isinstance(res, tuple) else res
            step = self.state.global_step
            if step != self._seen and step % every == 0:  # first micro-batch of a replay step
                self._seen = step
                batch = spec_replay_batch(items, self.processing_class, max_length or self.args.max_length, seed,
                                          step, every, batch_size, loss.device)
                replay = model(**batch, use_cache=False).loss
                scaled = self.loss_is_scaled_for_ga
                if scaled is None:
                    scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                        self.compute_loss_func is not None)
                factor = 1.0 if scaled else float(self.current_gradient_accumulation_steps)
                loss = loss + weight * replay * factor
            return (loss, res[1]) if isinstance(res, tuple) else loss

    return Reference


@pytest.mark.parametrize("kind,ga", [("sft", 1), ("sft", 2), ("dpo", 1), ("dpo", 2)])
def test_replay_matches_hand_written_loss(tmp_path, kind, ga):
    ds = Dataset.from_list([{"text": t} for t in REPLAY_TEXTS])
    cfg = SuppleConfig(replay_weight=0.5, replay_every=1, replay_batch_size=3)
    cb = SuppleCallback(cfg, replay_dataset=ds)
    a = run(kind, callbacks=[cb], ga=ga, steps=3, out=tmp_path / "a")
    base = SFTTrainer if kind == "sft" else DPOTrainer
    b = run(kind, trainer_cls=replay_reference(base, REPLAY_TEXTS, 0.5, 1, 3), ga=ga, steps=3, out=tmp_path / "b")
    c = run(kind, ga=ga, steps=3, out=tmp_path / "c")
    sa, sb, sc = trainable_state(a), trainable_state(b), trainable_state(c)
    assert_params_close(sa, sb, rtol=1e-5, atol=1e-6)
    assert max_abs_diff(sa, sc) > 1e-3
    losses = [h["supple/replay_loss"] for h in a.state.log_history if "supple/replay_loss" in h]
    assert len(losses) == 3 and all(v > 0 for v in losses)


def test_replay_max_length_cuts_the_replayed_sequences(tmp_path):
    """replay_max_length=6 keeps each replay text's first 6 tokens: the same parameters as a hand-written loss whose
    replay batch is tokenized with max_length=6, and not those of the trainer's max_length."""
    ds = Dataset.from_list([{"text": t} for t in REPLAY_TEXTS])
    seen = []
    cfg = SuppleConfig(replay_weight=0.5, replay_every=1, replay_batch_size=2, replay_max_length=6)
    cb = SuppleCallback(cfg, replay_dataset=ds)
    orig = ReplayTerm.make_batch

    def spy(self, step, device):
        batch, failed = orig(self, step, device)
        seen.append(batch["input_ids"].shape[1])
        return batch, failed

    ReplayTerm.make_batch = spy
    try:
        a = run("sft", callbacks=[cb], steps=2, out=tmp_path / "a")
    finally:
        ReplayTerm.make_batch = orig
    assert seen == [6, 6]  # every replay text is longer than 6 tokens
    b = run("sft", trainer_cls=replay_reference(SFTTrainer, REPLAY_TEXTS, 0.5, 1, 2, max_length=6), steps=2,
            out=tmp_path / "b")
    full = run("sft", trainer_cls=replay_reference(SFTTrainer, REPLAY_TEXTS, 0.5, 1, 2), steps=2, out=tmp_path / "c")
    sa, sb, sc = trainable_state(a), trainable_state(b), trainable_state(full)
    assert_params_close(sa, sb, rtol=1e-5, atol=1e-6)
    assert max_abs_diff(sa, sc) > 1e-4


def test_replay_every_k_steps_only(tmp_path):
    cfg = SuppleConfig(replay_data="builtin:pydoc", replay_every=2, replay_batch_size=2)
    tr = run("sft", callbacks=[SuppleCallback(cfg)], steps=4, out=tmp_path)
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert ["supple/replay_loss" in h for h in logs] == [True, False, True, False]


def test_replay_batches_are_deterministic_and_cycle():
    term = ReplayTerm(list(range(5)), 1.0, 2, 3, seed=7)
    again = ReplayTerm(list(range(5)), 1.0, 2, 3, seed=7)
    assert term.batch_indices(0) == again.batch_indices(0) == term.batch_indices(1)
    seen = term.batch_indices(0) + term.batch_indices(2) + term.batch_indices(4)
    assert sorted(seen[:5]) == [0, 1, 2, 3, 4]  # one pass over the data before repeating
    assert [ReplayTerm(list(range(5)), 1.0, 2, 3, seed=s).batch_indices(0) for s in range(4)] != [term.batch_indices(0)] * 4


def test_replay_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    assert load_replay_items(str(tmp_path / "a.txt")) == ["first paragraph\nstill first", "second paragraph"]
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items = load_replay_items(str(tmp_path / "b.jsonl"))
    assert items == [rows[0]["messages"]]
    Dataset.from_list([{"text": "abc def"}, {"text": "ghi"}]).to_parquet(str(tmp_path / "c.parquet"))
    assert load_replay_items(str(tmp_path / "c.parquet")) == ["abc def", "ghi"]
    pydoc = load_replay_items("builtin:pydoc")
    assert len(pydoc) > 100 and all(isinstance(t, str) and len(t) > 50 for t in pydoc[:20])
    term = ReplayTerm(items, 1.0, 1, 1, 0)
    term.setup(make_tokenizer(), 64)
    batch, failed = term.make_batch(0, torch.device("cpu"))
    assert failed == 0 and batch["input_ids"].shape[0] == 1  # chat messages through the template


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda p: SuppleConfig(replay_data=str(p / "missing.txt")), "no such file"),
        (lambda p: (p / "empty.txt").write_text("\n\n") and SuppleConfig(replay_data=str(p / "empty.txt")), "empty"),
        (lambda p: (p / "x.jsonl").write_text('{"body": "x"}\n') and SuppleConfig(replay_data=str(p / "x.jsonl")),
         "no 'text' or 'messages' column"),
    ],
)
def test_bad_replay_data_fails_at_train_begin(tmp_path, setup, match):
    cfg = setup(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run("sft", callbacks=[SuppleCallback(cfg)], out=tmp_path / "run")


def test_replay_item_that_fails_to_tokenize_is_counted_in_replay_skipped(tmp_path, monkeypatch):
    """Tokenization failures are logged as supple/replay_skipped, not as non-finite terms."""
    import supple.callbacks.supple_callback as sc

    items = ["a fine replay text", 12345, 67890, 13579]  # ints cannot be tokenized
    monkeypatch.setattr(sc, "load_replay_items", lambda spec, dataset: items)
    cfg = SuppleConfig(replay_every=1, replay_batch_size=1)
    cb = SuppleCallback(cfg, replay_dataset=Dataset.from_list([{"text": "unused"}]))
    with pytest.warns(UserWarning, match="failed to tokenize"):
        tr = run("sft", callbacks=[cb], steps=4, out=tmp_path)
    logs = [h for h in tr.state.log_history if "loss" in h]
    term = ReplayTerm(items, 1.0, 1, 1, 0)
    expected, total = [], 0
    for step in range(4):
        total += sum(not isinstance(items[i], str) for i in term.batch_indices(step))
        expected.append(float(total))
    assert [h["supple/replay_skipped"] for h in logs] == expected and expected[-1] >= 1
    assert all(h["supple/skipped_nonfinite"] == 0.0 for h in logs)
    assert sum("supple/replay_loss" in h for h in logs) == 4 - sum(
        not isinstance(items[term.batch_indices(s)[0]], str) for s in range(4))
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


def test_mix_replay_ratio_and_columns():
    train = Dataset.from_list([{"text": f"t{i}", "extra": i} for i in range(30)])
    replay = Dataset.from_list([{"text": f"r{i}"} for i in range(4)])
    mixed = mix_replay(train, replay, ratio=0.25, seed=0)
    texts = mixed["text"]
    assert len(texts) == 40 and sum(t.startswith("r") for t in texts) == 10
    assert mixed.column_names == ["text"]
    assert mix_replay(train, replay, 0.25, seed=0)["text"] == texts
    with pytest.raises(ValueError, match="ratio"):
        mix_replay(train, replay, 1.0)
