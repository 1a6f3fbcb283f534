"""`TrainingContext`: what the parts of :class:`~supple.SuppleCallback` share during one training run.

One context per ``train()`` run (see docs/design.md, "Lifecycle"). It holds the trainer (given with
``SuppleCallback.attach(trainer)`` or discovered), the gradient-accumulation size, the GradScaler scale,
the RNG key of the current micro-batch, the wrapped model and the log sink. Parts never reach for the
trainer themselves: they ask the context, which raises a clear error where the trainer is needed and
missing instead of falling back silently.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


class TrainerRequiredError(RuntimeError):
    """Raised when a setting needs the Trainer object and the callback was given none and found none."""


def discover_trainer(callback: Any) -> Any | None:
    """The Trainer whose callback handler holds ``callback``, found on the call stack; None if there is none.

    A convenience only: callbacks are not handed their trainer, so this walks the frames of the current call
    (the Trainer's ``train()`` is on the stack during ``on_train_begin``). ``SuppleCallback.attach(trainer)``
    is the explicit, documented path.
    """
    try:
        from transformers import Trainer
    except Exception:  # pragma: no cover - transformers is a dependency
        return None
    frame = inspect.currentframe()
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer) and any(cb is callback for cb in obj.callback_handler.callbacks):
                return obj
            frame = frame.f_back
    finally:
        del frame
    return None


@dataclass
class TrainingContext:
    """Shared state of one training run; built at ``on_train_begin``, dropped at ``on_train_end``.

    Attributes:
        args: the trainer's ``TrainingArguments``.
        state: the trainer's ``TrainerState`` (``global_step`` is read from it).
        model: the model the Trainer passes to callbacks (unwrapped from DDP, possibly a PeftModel).
        trainer: the Trainer, or None when it was neither attached nor found.
        optimizer: the optimizer the Trainer passes at train begin (accelerate may wrap it).
        processing_class: the tokenizer or processor the Trainer passes.
        micro: index of the current micro-batch inside the optimizer step (0-based).
        pending: the log sink: values the parts want in the next ``on_log``.
        abort: detaches everything; a part's hook calls it when it raises, before the error propagates.
    """

    args: Any
    state: Any
    model: nn.Module
    trainer: Any | None = None
    optimizer: Any | None = None
    processing_class: Any | None = None
    micro: int = 0
    pending: dict[str, float] = field(default_factory=dict)
    abort: Callable[[], None] | None = None

    # -- run facts ------------------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        return int(getattr(self.args, "seed", 0) or 0)

    @property
    def world_size(self) -> int:
        return max(int(getattr(self.args, "world_size", 1) or 1), 1)

    @property
    def rank(self) -> int:
        return int(getattr(self.args, "process_index", 0) or 0)

    @property
    def step(self) -> int:
        return int(self.state.global_step)

    @property
    def fp16(self) -> bool:
        return bool(getattr(self.args, "fp16", False))

    def require_trainer(self, why: str) -> Any:
        """The trainer, or :class:`TrainerRequiredError` saying ``why`` it is needed and how to give it."""
        if self.trainer is None:
            raise TrainerRequiredError(
                f"SuppleCallback needs its Trainer {why}, and could not find it on the call stack. Give it "
                "explicitly: `SuppleCallback(config).attach(trainer)` before `trainer.train()`."
            )
        return self.trainer

    # -- scaling of injected gradients --------------------------------------------------------------
    def ga_steps(self) -> int:
        """Micro-batches of the current optimizer step (the last window of an epoch may be shorter)."""
        n = getattr(self.trainer, "current_gradient_accumulation_steps", None) if self.trainer is not None else None
        if isinstance(n, int) and n > 0:
            return n
        return max(int(getattr(self.args, "gradient_accumulation_steps", 1) or 1), 1)

    def grad_scale(self) -> float:
        """The fp16 GradScaler's current scale (1 without fp16). Needs the trainer under fp16."""
        if self.trainer is None:
            if self.fp16:
                self.require_trainer("to read the fp16 GradScaler scale (fp16=True)")
            return 1.0
        scaler = getattr(getattr(self.trainer, "accelerator", None), "scaler", None)
        if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
            return float(scaler.get_scale())
        return 1.0

    def micro_coeff(self) -> float:
        """Scale of a per-micro-batch term: GradScaler scale / gradient-accumulation steps (as the loss)."""
        return self.grad_scale() / self.ga_steps()

    # -- identity of the current micro-batch ----------------------------------------------------------
    def step_key(self) -> tuple[int, int]:
        """``(optimizer step, micro-batch)``: statistics count once per key and block."""
        return self.step, self.micro

    def rng_key(self) -> tuple[int, int, int]:
        """``(seed, step, global micro index)``: the same on every call for one micro-batch of one rank."""
        return self.seed, self.step, self.micro * self.world_size + self.rank

    def wrapped_model(self) -> nn.Module:
        """The model as the Trainer runs it (DDP-wrapped under DDP), for extra forward/backward passes."""
        wrapped = getattr(self.trainer, "model_wrapped", None) if self.trainer is not None else None
        return wrapped if isinstance(wrapped, nn.Module) else self.model

    def emit(self, values: dict[str, float]) -> None:
        """Queue values for the next logging step."""
        self.pending.update(values)
