"""`SuppleCallback`: the one public entry. Validates everything, then attaches its parts; detaches them all.

Lifecycle (docs/design.md, "Lifecycle"): ``on_train_begin`` ends any earlier run of this object, builds a
fresh :class:`TrainingContext`, builds every part (each validates its inputs and touches nothing), and only
then attaches them. ``on_train_end`` — or an error raised by supple at any point — detaches everything and
forgets the trainer, so one callback object can serve several trainers in turn.

Checkpoints: the callback is an ``ExportableState``; :meth:`SuppleCallback.state` puts the pre-stage diversity
reference and the automatic weight into ``trainer_state.json``, and a resumed run reads them back from
``state.stateful_callbacks`` at train begin (docs/design.md, "Reference-anchored diversity").
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..config import SuppleConfig, extract_supple_config
from ..data import load_replay_items
from ..modeling import scan_lora_modules
from .checkpoint import check_not_recreated, saved_state
from .context import TrainingContext, discover_trainer
from .decorrelation import DecorrelationPart
from .distributed import check_backend
from .diversity import DiversityTaps
from .metrics import MetricsPart
from .reference import DiversityAnchor
from .refresh import RefreshPart
from .replay import ReplayPart, ReplayTerm
from .subspace import load_previous_subspaces

_OBJECT_KWARGS = {
    "previous_subspaces": "dict {module_name: U (d_in × k)} of earlier stages' input subspaces",
    "replay_dataset": "a datasets.Dataset of replay texts (mixed-domain replay)",
}


@dataclass
class _Run:
    """The parts of one training run and what must be undone at its end."""

    ctx: TrainingContext
    config: SuppleConfig
    taps: DiversityTaps | None = None
    anchor: DiversityAnchor | None = None
    decor: DecorrelationPart | None = None
    replay: ReplayPart | None = None
    refresh: RefreshPart | None = None
    metrics: MetricsPart | None = None
    attached: list[Any] = field(default_factory=list)
    moved_from: int | None = None  # our index in the trainer's callback list before moving to the front
    skipped: int = 0

    def parts(self) -> list[Any]:
        return [p for p in (self.taps, self.anchor, self.decor, self.replay, self.refresh, self.metrics)
                if p is not None]


class SuppleCallback(TrainerCallback, ExportableState):
    """Adds supple's regularizers to a Trainer's objective and logs ``supple/*`` metrics.

    Args:
        config: a :class:`SuppleConfig`. If omitted, the settings are read from the trainer's ``args``
            at train begin (a TRL config that mixes in ``SuppleConfig``), so every knob is a trainer argument.
        **objects: values that are not plain config fields: ``previous_subspaces`` (dict of bases, as
            returned by :func:`supple.capture_update_subspace`), ``replay_dataset`` (a ``datasets.Dataset``).

    Give it its trainer explicitly with ``SuppleCallback(config).attach(trainer)`` (which also registers
    the callback); used as ``with SuppleCallback(config).attach(trainer): trainer.train()``, everything is
    detached even when ``train()`` raises. Passed in ``callbacks=[...]`` alone, it finds its trainer on
    the call stack at train begin, as a convenience.

    Every term is injected as a gradient exactly equal to adding it to the loss (see docs/design.md):
    hidden-state terms through taps on decoder-block outputs, scaled by 1/gradient-accumulation and the
    fp16 GradScaler scale; LoRA terms added to the gradients once per optimizer step, before clipping.
    """

    def __init__(self, config: SuppleConfig | None = None, **objects: Any) -> None:
        if config is not None and not isinstance(config, SuppleConfig):
            raise TypeError(
                f"SuppleCallback(config=...) expects a SuppleConfig, got {type(config).__name__}. "
                "Build one with SuppleConfig(diversity_weight=..., ...)."
            )
        unknown = sorted(set(objects) - set(_OBJECT_KWARGS))
        if unknown:
            allowed = "; ".join(f"{k}: {v}" for k, v in _OBJECT_KWARGS.items())
            raise TypeError(
                f"SuppleCallback got unexpected keyword argument(s) {unknown}. Plain settings belong in "
                f"SuppleConfig; the accepted objects are {allowed}."
            )
        self.user_config = config
        self.objects = objects
        self._attached_trainer: Any | None = None
        self._run: _Run | None = None

    # -- explicit wiring ------------------------------------------------------------------------------
    @property
    def config(self) -> SuppleConfig | None:
        """The settings of the current run (the user's config before the first run)."""
        return self._run.config if self._run is not None else self.user_config

    @property
    def trainer(self) -> Any | None:
        """The trainer of the current run, or the one given to :meth:`attach` before it starts."""
        return self._run.ctx.trainer if self._run is not None else self._attached_trainer

    def attach(self, trainer: Any) -> SuppleCallback:
        """Bind this callback to ``trainer`` for its next ``train()`` (and register it there if needed)."""
        handler = getattr(trainer, "callback_handler", None)
        if handler is None:
            raise TypeError(f"SuppleCallback.attach expects a transformers Trainer, got {type(trainer).__name__}.")
        if not any(cb is self for cb in handler.callbacks):
            trainer.add_callback(self)
        self._attached_trainer = trainer
        return self

    def detach(self) -> None:
        """Remove everything this callback attached (hooks, callback order) and forget the trainer."""
        self._end_run()
        self._attached_trainer = None

    def __enter__(self) -> SuppleCallback:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # -- events -------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._end_run()  # a second on_train_begin (auto_find_batch_size retry) replaces, never adds
        try:
            self._run = self._start(args, state, model, kwargs)
        except BaseException:
            self._end_run()
            self._attached_trainer = None
            raise
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        run = self._run
        if run is None:
            return control
        with self._guard():
            run.ctx.micro = 0
            optimizer = kwargs.get("optimizer") or run.ctx.optimizer
            if run.refresh is not None:
                run.refresh.on_step_begin(optimizer)
            if run.replay is not None:
                run.replay.on_step_begin()
            if run.decor is not None:
                run.decor.on_step_begin()
        return control

    def on_substep_end(self, args, state, control, **kwargs):
        if self._run is not None:
            self._run.ctx.micro += 1
        return control

    def on_step_end(self, args, state, control, **kwargs):
        run = self._run
        if run is None:
            return control
        with self._guard():
            run.ctx.micro = 0
            model = kwargs.get("model") or run.ctx.model
            if run.anchor is not None:
                run.anchor.on_step_end()
            if run.refresh is not None:
                run.refresh.on_step_end(kwargs.get("optimizer") or run.ctx.optimizer, model)
            if run.metrics is not None:
                run.metrics.on_step_end(model)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        run = self._run
        if run is None or logs is None or "loss" not in logs:
            return control
        with self._guard():
            extra = self._collect_logs(run)
            logs.update(extra)  # seen by the callbacks after us: the report_to integrations (we run first)
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("loss") == logs["loss"]:  # the copy Trainer.log just appended
                last.update(extra)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()
        return control

    # -- checkpoint state -------------------------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint keeps of this callback (``transformers.ExportableState``): under ``"supple"`` the
        diversity reference and weight of the current run (None without one). ``args``/``attributes`` only tell
        a copy re-created by transformers (``restore_callback_states_from_checkpoint=True``) what it lacks."""
        run = self._run
        anchor = run.anchor if run is not None else None
        return {
            "args": {},
            "attributes": {"_recreated_without": {"config": self.user_config is not None,
                                                  "objects": sorted(self.objects)}},
            "supple": anchor.state_dict() if anchor is not None else None,
        }

    # -- run setup ----------------------------------------------------------------------------------
    def _start(self, args, state, model, kwargs: dict) -> _Run:
        if model is None:
            raise ValueError("SuppleCallback needs the model at train begin (the Trainer passes it).")
        check_not_recreated(self)
        cfg = self.user_config if self.user_config is not None else extract_supple_config(args)
        trainer = self._attached_trainer or discover_trainer(self)
        if trainer is not None:
            _check_trainer(self, trainer, model, explicit=self._attached_trainer is not None)
        ctx = TrainingContext(args, state, model, trainer, kwargs.get("optimizer"), kwargs.get("processing_class"))
        ctx.abort = self.detach
        run = _build_parts(cfg, ctx, self.objects)  # validates everything; attaches nothing
        self._run = run  # from here on, an error detaches what was attached
        for part in run.parts():
            part.attach(ctx)
            run.attached.append(part)
        saved = saved_state(state, self)
        if run.anchor is not None:  # after every part is attached, before the first step
            run.anchor.begin(run.taps, saved)
        if run.parts() and trainer is not None:
            run.moved_from = _move_to_front(trainer, self)
        elif run.parts() and getattr(args, "report_to", None):
            warnings.warn(
                "SuppleCallback could not find its Trainer: supple/* metrics reach state.log_history but not "
                "the report_to integrations. Use `SuppleCallback(config).attach(trainer)`.",
                stacklevel=3,
            )
        return run

    def _end_run(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        for part in reversed(run.attached):
            part.detach()
        trainer = run.ctx.trainer
        if run.moved_from is not None and trainer is not None:
            order = [cb for cb in trainer.callback_handler.callbacks if cb is not self]
            if len(order) < len(trainer.callback_handler.callbacks):
                order.insert(min(run.moved_from, len(order)), self)
            trainer.callback_handler.callbacks = order

    def _guard(self):
        return _DetachOnError(self)

    # -- logging ------------------------------------------------------------------------------------
    def _collect_logs(self, run: _Run) -> dict[str, float]:
        out: dict[str, float] = {}
        if run.taps is not None and run.config.diversity_weight > 0:
            summary = run.taps.collect_summary()
            run.skipped += summary.skipped
            if summary.mean is not None:
                out["supple/diversity"] = summary.mean
            if summary.active_share is not None:
                out["supple/diversity_active"] = summary.active_share
        if run.anchor is not None:
            out.update(run.anchor.logs())
        for part in (run.decor, run.replay, run.refresh):
            if part is not None:
                out.update(part.logs())
        if any(p is not None for p in (run.taps, run.decor, run.replay)):
            nonfinite = run.skipped + (run.decor.skipped if run.decor else 0) + (run.replay.nonfinite if run.replay else 0)
            out["supple/skipped_nonfinite"] = float(nonfinite)
        out.update(run.ctx.pending)
        run.ctx.pending.clear()
        return {k: v for k, v in out.items() if isinstance(v, float) and math.isfinite(v)}


class _DetachOnError:
    """Context manager: an exception inside a supple event detaches everything before it propagates."""

    def __init__(self, cb: SuppleCallback) -> None:
        self.cb = cb

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.cb.detach()
        return False


def _check_trainer(cb: SuppleCallback, trainer: Any, model: Any, explicit: bool) -> None:
    if explicit and getattr(trainer, "model", model) is not model:
        raise ValueError(
            "SuppleCallback.attach(trainer) was given a different trainer than the one now training (its model "
            "differs). Call attach() with the trainer you train, or leave it out."
        )
    mine = [c for c in trainer.callback_handler.callbacks if isinstance(c, SuppleCallback)]
    if len(mine) > 1:
        raise ValueError(
            "SuppleCallback was added to the trainer more than once; every term would be applied twice. "
            "Pass a single SuppleCallback."
        )


def _build_parts(cfg: SuppleConfig, ctx: TrainingContext, objects: dict) -> _Run:
    """Every part of the run, each validated; nothing is attached yet (see docs/design.md)."""
    run = _Run(ctx, cfg)
    model = ctx.model
    wants_params = cfg.decorrelation_weight > 0 or cfg.decorrelation_cross_weight > 0
    scan = scan_lora_modules(model)
    check_backend(cfg, ctx, replay=cfg.replay_data is not None or objects.get("replay_dataset") is not None)  # DeepSpeed / FSDP1: refuse what they cannot carry (FSDP2 carries everything)
    if cfg.diversity_weight > 0 or cfg.metrics_every > 0:
        run.taps = DiversityTaps(cfg.diversity_penalty, cfg.diversity_weight, cfg.diversity_layers,
                                 cfg.diversity_max_tokens, cfg.diversity_normalize_tokens, cfg.metrics_every, model)
        if cfg.metrics_every > 0:
            run.metrics = MetricsPart(run.taps)
        if cfg.diversity_reference == "pre_stage" and cfg.diversity_weight > 0:
            run.anchor = run.taps.anchor = DiversityAnchor(cfg, run.taps.layers)
    if wants_params:
        run.decor = DecorrelationPart(cfg.decorrelation_weight, cfg.decorrelation_cross_weight, model,
                                      _previous_bases(cfg, objects), scan)
    replay_ds = objects.get("replay_dataset")
    if cfg.replay_data is not None or replay_ds is not None:
        items = load_replay_items(cfg.replay_data if replay_ds is None else None, replay_ds)
        term = ReplayTerm(items, cfg.replay_weight, cfg.replay_every, cfg.replay_batch_size, ctx.seed)
        args = ctx.args
        term.setup(ctx.processing_class, cfg.replay_max_length or getattr(args, "max_length", None)
                   or getattr(args, "max_seq_length", None))
        taps = run.taps
        run.replay = ReplayPart(term, ctx, pause=(lambda p: setattr(taps, "paused", p)) if taps else None)
    if cfg.refresh_method:
        run.refresh = RefreshPart(cfg, model, ctx, scan)
    injects = cfg.diversity_weight > 0 or wants_params or run.replay is not None
    if injects and ctx.fp16:
        ctx.require_trainer("to scale the injected gradients by the fp16 GradScaler's scale (fp16=True)")
    return run


def _previous_bases(cfg: SuppleConfig, objects: dict) -> dict[str, torch.Tensor]:
    if cfg.decorrelation_cross_weight <= 0:
        return {}
    bases: dict[str, torch.Tensor] = {}
    if cfg.previous_adapters:
        bases.update(load_previous_subspaces(cfg.previous_adapters, cfg.previous_subspace_rank))
    if objects.get("previous_subspaces"):
        bases.update({k: v.float() for k, v in dict(objects["previous_subspaces"]).items()})
    if not bases:
        raise ValueError(
            "SuppleConfig.decorrelation_cross_weight > 0 needs earlier stages' subspaces: set "
            "previous_adapters (paths) or pass SuppleCallback(previous_subspaces=...)."
        )
    return bases


def _move_to_front(trainer: Any, cb: SuppleCallback) -> int | None:
    """Put ``cb`` first in the trainer's callback list, so its ``on_log`` runs before the reporting
    integrations (they are registered before user callbacks). Replaces the list object, so an event being
    dispatched right now finishes on the old order. Returns the old index (None if already first)."""
    handler = trainer.callback_handler
    order = list(handler.callbacks)
    idx = next((i for i, c in enumerate(order) if c is cb), None)
    if idx is None or idx == 0:
        return None
    handler.callbacks = [cb] + order[:idx] + order[idx + 1:]
    return idx
