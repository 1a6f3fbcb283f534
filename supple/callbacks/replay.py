"""Mixed-domain replay (PPO-ptx style): an LM loss on general text added to the optimizer step's objective.

Every ``replay_every`` optimizer steps, at the start of the accumulation window, one batch of
``replay_batch_size`` replay sequences runs forward and backward through the policy (PEFT adapter
enabled), adding ``replay_weight × mean-token LM loss`` (times the fp16 GradScaler scale) to the
gradients, which are then clipped and stepped with the task gradient.

The batch used at optimizer step s is a pure function of (seed, s): replay position and RNG need no
state of their own, so a run resumed from a checkpoint replays exactly what the uninterrupted run did.
Every rank uses the same replay batch, so under DDP the averaged gradient equals the 1-process one.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import torch

from ..data import ReplayItem, tokenize_replay_item


class ReplayTerm:
    def __init__(self, items: list[ReplayItem], weight: float, every: int, batch_size: int, seed: int) -> None:
        if not items:
            raise ValueError("replay data is empty.")
        self.items = items
        self.weight = float(weight)
        self.every = int(every)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.tokenizer: Any = None
        self.max_length = 512
        self.pad_id = 0
        self._perm_cache: dict[int, list[int]] = {}

    def setup(self, tokenizer: Any, max_length: int | None) -> None:
        if tokenizer is None:
            raise ValueError("replay needs the trainer's tokenizer (processing_class) to tokenize replay data.")
        tok = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
        self.tokenizer = tok
        self.max_length = int(max_length or 512)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        # tokenize one item now so that a broken tokenizer/template fails before training starts
        tokenize_replay_item(self.items[0], tok, self.max_length)

    def is_replay_step(self, global_step: int) -> bool:
        return self.weight > 0 and global_step % self.every == 0

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            order = list(range(len(self.items)))
            random.Random(f"supple-replay/{self.seed}/{epoch}").shuffle(order)
            self._perm_cache = {epoch: order}
        return self._perm_cache[epoch]

    def batch_indices(self, global_step: int) -> list[int]:
        """Indices of the replay items used at optimizer step ``global_step`` (deterministic)."""
        k = global_step // self.every
        n = len(self.items)
        out = []
        for j in range(k * self.batch_size, (k + 1) * self.batch_size):
            epoch, pos = divmod(j, n)
            out.append(self._perm(epoch)[pos])
        return out

    def make_batch(self, global_step: int, device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
        """Padded batch of the replay step; items that fail to tokenize are dropped and counted."""
        seqs, failed = [], 0
        for i in self.batch_indices(global_step):
            try:
                seqs.append(tokenize_replay_item(self.items[i], self.tokenizer, self.max_length))
            except Exception:
                failed += 1
        if not seqs:
            return {}, failed
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
        return batch, failed

    def step(self, model: torch.nn.Module, global_step: int, scale: float) -> tuple[float | None, int]:
        """Forward/backward of the replay batch; returns (replay loss or None if skipped, skipped count)."""
        device = next(p for p in model.parameters()).device
        batch, failed = self.make_batch(global_step, device)
        if failed:
            warnings.warn(f"supple: {failed} replay item(s) failed to tokenize at step {global_step}; skipped.",
                          stacklevel=2)
        if not batch:
            return None, max(failed, 1)
        out = model(**batch, use_cache=False)
        loss = out["loss"] if isinstance(out, dict) else out[0]
        if not bool(torch.isfinite(loss)):
            warnings.warn(f"supple: non-finite replay loss at step {global_step}; skipped.", stacklevel=2)
            return None, failed + 1
        (loss.float() * (self.weight * scale)).backward()
        return float(loss.detach()), failed
