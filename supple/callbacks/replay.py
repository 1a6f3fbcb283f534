"""Mixed-domain replay (PPO-ptx style): an LM loss on general text added to the optimizer step's objective.

Every ``replay_every`` optimizer steps, at the start of the accumulation window, one batch of
``replay_batch_size`` replay sequences runs forward and backward through the policy (PEFT adapter
enabled), adding ``replay_weight × mean-token LM loss`` (times the fp16 GradScaler scale) to the
gradients, which are then clipped and stepped with the task gradient.

The batch used at optimizer step s is a pure function of (seed, s): replay position and RNG need no
state of their own, so a run resumed from a checkpoint replays exactly what the uninterrupted run did.
Every rank uses the same replay batch, so under DDP the averaged gradient equals the 1-process one.

:class:`ReplayPart` is the callback part (docs/design.md, "Replay"). Items that fail to tokenize are
dropped and counted in ``supple/replay_skipped``; a non-finite replay loss is skipped and counted in
``supple/skipped_nonfinite``.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..data import ReplayItem, pad_token_batch, tokenize_replay_item
from .context import TrainingContext
from .distributed import is_fsdp2_module


@dataclass
class ReplayResult:
    """Outcome of one replay step: the loss (None if nothing was applied), items that failed to tokenize,
    and whether the loss was non-finite (then no gradient was added)."""

    loss: float | None
    failed_items: int
    nonfinite: bool


class ReplayTerm:
    """The replay batches and their forward/backward (no trainer, no hooks)."""

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
        return pad_token_batch(seqs, self.pad_id, device), failed

    def step(self, model: torch.nn.Module, global_step: int, scale: float) -> ReplayResult:
        """Forward/backward of the replay batch at ``global_step``, its gradient scaled by weight × ``scale``."""
        device = next(p for p in model.parameters()).device
        batch, failed = self.make_batch(global_step, device)
        if failed:
            warnings.warn(f"supple: {failed} replay item(s) failed to tokenize at step {global_step}; skipped "
                          "(counted in supple/replay_skipped).", stacklevel=2)
        if not batch:
            return ReplayResult(None, failed, False)
        out = model(**batch, use_cache=False)
        loss = out["loss"] if isinstance(out, dict) else out[0]
        if not bool(torch.isfinite(loss)):
            warnings.warn(f"supple: non-finite replay loss at step {global_step}; skipped.", stacklevel=2)
            return ReplayResult(None, failed, True)
        (loss.float() * (self.weight * scale)).backward()
        return ReplayResult(float(loss.detach()), failed, False)


class ReplayPart:
    """The replay part of SuppleCallback: one replay forward/backward at the start of each replay step.

    Args:
        term: a :class:`ReplayTerm` already set up (tokenizer checked).
        ctx: the run's context; under DDP the trainer is required (its wrapped model and ``no_sync``).
        pause: called with True/False around the replay pass (the diversity taps must not see it).
    """

    def __init__(self, term: ReplayTerm, ctx: TrainingContext, pause: Callable[[bool], None] | None = None) -> None:
        if ctx.world_size > 1:
            ctx.require_trainer("to run replay under DDP (its wrapped model and no_sync)")
        if getattr(ctx.trainer, "is_deepspeed_enabled", False):
            raise ValueError("supple's replay term runs its own backward pass, which DeepSpeed does not allow; "
                             "set replay_data=None.")
        self.term = term
        self.pause = pause or (lambda paused: None)
        self.ctx: TrainingContext | None = None
        self.skipped_items = 0
        self.nonfinite = 0
        self._losses: list[float] = []

    def attach(self, ctx: TrainingContext) -> None:
        self.ctx = ctx

    def detach(self) -> None:
        self.ctx = None

    def on_step_begin(self) -> None:
        ctx = self.ctx
        if not self.term.is_replay_step(ctx.step):
            return
        model = ctx.wrapped_model()
        sync = _no_sync(model, getattr(ctx.trainer, "accelerator", None))
        was_training = model.training
        model.train()
        self.pause(True)
        try:
            with sync:
                res = self.term.step(model, ctx.step, ctx.grad_scale())
        finally:
            self.pause(False)
            model.train(was_training)
        self.skipped_items += res.failed_items
        self.nonfinite += int(res.nonfinite)
        if res.loss is not None:
            self._losses.append(res.loss)

    def logs(self) -> dict[str, float]:
        """``supple/replay_loss`` (mean since the last log) and ``supple/replay_skipped`` (items so far)."""
        out = {"supple/replay_skipped": float(self.skipped_items)}
        if self._losses:
            out["supple/replay_loss"] = sum(self._losses) / len(self._losses)
            self._losses.clear()
        return out


def _no_sync(model: torch.nn.Module, accelerator: Any) -> contextlib.AbstractContextManager:
    """Defer the gradient reduction of the replay backward to the window's last micro-batch.

    DDP: ``accelerator.no_sync``. An FSDP2 root (sharded by accelerate or by hand) keeps its unsharded
    gradients until the next synced backward reduce-scatters their sum. One process: nothing to defer.
    """
    if is_fsdp2_module(model):
        return _fsdp2_no_sync(model)
    if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
        return accelerator.no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp2_no_sync(model: Any):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
