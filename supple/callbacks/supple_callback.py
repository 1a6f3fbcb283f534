"""`SuppleCallback`: wires supple's interventions and live metrics into any transformers/TRL Trainer."""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from typing import Any

import torch
from transformers import TrainerCallback

from ..config import SuppleConfig, extract_supple_config
from ..data import load_replay_items
from ..modeling import find_lora_modules
from .decorrelation import LoraDecorrelation
from .diversity import DiversityTaps
from .refresh import DormantTracker, redo_, refresh_generator, relora_, shrink_perturb_
from .replay import ReplayTerm
from .subspace import load_previous_subspaces

_OBJECT_KWARGS = {
    "previous_subspaces": "dict {module_name: U (d_in × k)} of earlier stages' input subspaces",
    "replay_dataset": "a datasets.Dataset of replay texts (mixed-domain replay)",
}


def _find_trainer() -> Any | None:
    """The Trainer that is calling us (callbacks are not handed the trainer; walk the call stack)."""
    try:
        from transformers import Trainer
    except Exception:  # pragma: no cover
        return None
    frame = inspect.currentframe()
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer):
                return obj
            frame = frame.f_back
    finally:
        del frame
    return None


class SuppleCallback(TrainerCallback):
    """Adds supple's regularizers to a Trainer's objective and logs ``supple/*`` metrics.

    Args:
        config: a :class:`SuppleConfig`. If omitted, the settings are read from the trainer's ``args``
            at train begin (a TRL config that mixes in ``SuppleConfig``), so every knob is a trainer argument.
        **objects: values that are not plain config fields: ``previous_subspaces`` (dict of bases, as
            returned by :func:`supple.capture_update_subspace`), ``replay_dataset`` (a ``datasets.Dataset``).

    Every term is injected as a gradient exactly equal to adding it to the loss (see ARCHITECTURE.md):
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
        self.config: SuppleConfig | None = config
        self.trainer: Any | None = None
        self._taps: DiversityTaps | None = None
        self._decor: LoraDecorrelation | None = None
        self._replay: ReplayTerm | None = None
        self._replay_losses: list[float] = []
        self._tracker: DormantTracker | None = None
        self._model = None
        self._optimizer = None
        self._micro = 0
        self._skipped_total = 0
        self._decor_log: list[tuple[float, float | None]] = []
        self._pending: dict[str, float] = {}
        self._orig_log = None
        self._state = None
        self._args = None

    # ------------------------------------------------------------------------------------------------
    def attach(self, trainer: Any) -> SuppleCallback:
        """Explicitly give the callback its trainer (normally found automatically at train begin)."""
        self.trainer = trainer
        return self

    def _ga_steps(self) -> int:
        t = self.trainer
        n = getattr(t, "current_gradient_accumulation_steps", None) if t is not None else None
        if isinstance(n, int) and n > 0:
            return n
        return max(int(getattr(self._args, "gradient_accumulation_steps", 1) or 1), 1)

    def _grad_scale(self) -> float:
        scaler = getattr(getattr(self.trainer, "accelerator", None), "scaler", None)
        if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
            return float(scaler.get_scale())
        return 1.0

    def _micro_coeff(self) -> float:
        return self._grad_scale() / self._ga_steps()

    def _rng(self) -> tuple[int, int, int]:
        args, state = self._args, self._state
        world = max(int(getattr(args, "world_size", 1) or 1), 1)
        rank = int(getattr(args, "process_index", 0) or 0)
        return int(getattr(args, "seed", 0)), int(state.global_step), self._micro * world + rank

    def _capture_now(self) -> bool:
        cfg = self.config
        return bool(cfg and cfg.metrics_every and self._micro == 0 and self._state.global_step % cfg.metrics_every == 0)

    # ------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._args, self._state = args, state
        self.config = self.user_config if self.user_config is not None else extract_supple_config(args)
        cfg = self.config
        if self.trainer is None:
            self.trainer = _find_trainer()
        trainer = self.trainer
        if trainer is not None:
            mine = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SuppleCallback)]
            if len(mine) > 1:
                raise ValueError(
                    "SuppleCallback was added to the trainer more than once; every term would be applied twice. "
                    "Pass a single SuppleCallback."
                )
        if model is None:
            raise ValueError("SuppleCallback needs the model at train begin (the Trainer passes it).")
        wants_params = cfg.decorrelation_weight > 0 or cfg.decorrelation_cross_weight > 0
        if wants_params and trainer is not None:
            if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
                raise ValueError(
                    "supple's LoRA decorrelation adds gradients to the LoRA parameters, which DeepSpeed and FSDP "
                    "shard or manage themselves; it is not supported there. Use DDP, or set "
                    "decorrelation_weight and decorrelation_cross_weight to 0."
                )
        if cfg.diversity_weight > 0 or cfg.metrics_every > 0:
            self._taps = DiversityTaps(
                cfg.diversity_penalty,
                cfg.diversity_weight,
                cfg.diversity_layers,
                cfg.diversity_max_tokens,
                cfg.diversity_normalize_tokens,
                coeff_fn=self._micro_coeff,
                rng_fn=self._rng,
                capture_fn=self._capture_now,
            )
            self._taps.attach(model)
        if wants_params:
            bases: dict[str, torch.Tensor] = {}
            if cfg.decorrelation_cross_weight > 0:
                if cfg.previous_adapters:
                    bases.update(load_previous_subspaces(cfg.previous_adapters, cfg.previous_subspace_rank))
                if self.objects.get("previous_subspaces"):
                    extra = dict(self.objects["previous_subspaces"])
                    bases.update({k: v.float() for k, v in extra.items()})
                if not bases:
                    raise ValueError(
                        "SuppleConfig.decorrelation_cross_weight > 0 needs earlier stages' subspaces: set "
                        "previous_adapters (paths) or pass SuppleCallback(previous_subspaces=...)."
                    )
            self._decor = LoraDecorrelation(cfg.decorrelation_weight, cfg.decorrelation_cross_weight)
            self._decor.setup(model, bases)
        self._model = model
        self._optimizer = kwargs.get("optimizer")
        replay_ds = self.objects.get("replay_dataset")
        if cfg.replay_data is not None or replay_ds is not None:
            if trainer is not None and getattr(trainer, "is_deepspeed_enabled", False):
                raise ValueError("supple's replay term runs its own backward pass, which DeepSpeed does not allow.")
            items = load_replay_items(cfg.replay_data if replay_ds is None else None, replay_ds)
            self._replay = ReplayTerm(items, cfg.replay_weight, cfg.replay_every, cfg.replay_batch_size,
                                      int(getattr(args, "seed", 0)))
            max_len = getattr(args, "max_length", None) or getattr(args, "max_seq_length", None) or 512
            self._replay.setup(kwargs.get("processing_class"), max_len)
        if cfg.refresh_method == "redo":
            self._tracker = DormantTracker(model)
        elif cfg.refresh_method == "relora" and not find_lora_modules(model):
            raise ValueError("refresh_method='relora' merges and re-initializes LoRA adapters: the model has none. "
                             "Use a PEFT LoRA model, or refresh_method='shrink_perturb'/'redo'.")
        active = any(x is not None for x in (self._taps, self._decor, self._replay)) or cfg.refresh_method
        if trainer is not None and active:
            self._wrap_log(trainer)
        elif active:
            warnings.warn(
                "SuppleCallback could not find its Trainer: supple/* metrics go to state.log_history only.",
                stacklevel=2,
            )
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self._micro = 0
        cfg = self.config
        if self._tracker is not None:
            self._tracker.active = (state.global_step + 1) % cfg.refresh_every == 0
        if cfg.refresh_method == "relora" and cfg.relora_warmup_steps:
            since = state.global_step % cfg.refresh_every
            if state.global_step >= cfg.refresh_every and since < cfg.relora_warmup_steps:
                factor = (since + 1) / (cfg.relora_warmup_steps + 1)
                opt = kwargs.get("optimizer") or self._optimizer
                for group in getattr(opt, "param_groups", []):
                    group["lr"] = group["lr"] * factor
        if self._replay is not None and self._replay.is_replay_step(state.global_step):
            self._run_replay(state.global_step)
        if self._decor is not None:
            intra, cross, ok = self._decor.add_gradients(scale=self._grad_scale())
            if ok:
                self._decor_log.append((intra, cross))
            else:
                self._skipped_total += 1
                warnings.warn("supple: non-finite LoRA decorrelation gradient skipped this step.", stacklevel=2)
        return control

    def on_substep_end(self, args, state, control, **kwargs):
        self._micro += 1
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self._micro = 0
        cfg = self.config
        if cfg.refresh_method and state.global_step % cfg.refresh_every == 0:
            self._refresh(state.global_step, kwargs.get("optimizer") or self._optimizer, kwargs.get("model"))
        if self._taps is not None and self._taps.stats.hidden_samples:
            self._pending.update(self._live_metrics(self._taps.stats.hidden_samples))
            self._taps.stats.hidden_samples = {}
            self._pending.update(self._lora_metrics(kwargs.get("model") or self._model))
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._orig_log is None and logs is not None and "loss" in logs:
            # No trainer wrapper: at least record the values in log_history.
            extra = self._collect_logs()
            logs.update(extra)
            if state.log_history:
                state.log_history[-1].update(extra)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._taps is not None:
            self._taps.detach()
        if self._tracker is not None:
            self._tracker.detach()
        if self._orig_log is not None and self.trainer is not None:
            try:
                del self.trainer.log
            except AttributeError:
                pass
            self._orig_log = None
        return control

    # ------------------------------------------------------------------------------------------------
    def _run_replay(self, global_step: int) -> None:
        trainer = self.trainer
        model = getattr(trainer, "model_wrapped", None) or self._model
        ctx = contextlib.nullcontext()
        accelerator = getattr(trainer, "accelerator", None)
        if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
            ctx = accelerator.no_sync(model)  # reduced together with the window's last micro-batch
        was_training = model.training
        model.train()
        if self._taps is not None:
            self._taps.paused = True
        try:
            with ctx:
                loss, skipped = self._replay.step(model, global_step, self._grad_scale())
        finally:
            if self._taps is not None:
                self._taps.paused = False
            model.train(was_training)
        self._skipped_total += skipped
        if loss is not None:
            self._replay_losses.append(loss)

    @torch.no_grad()
    def _refresh(self, global_step: int, optimizer, model) -> None:
        cfg = self.config
        model = model if model is not None else self._model
        gen = refresh_generator(int(getattr(self._args, "seed", 0)), global_step, cfg.refresh_method)
        if cfg.refresh_method == "shrink_perturb":
            params = [p for p in model.parameters() if p.requires_grad]
            shrink_perturb_(params, cfg.refresh_shrink, cfg.refresh_noise, gen)
        elif cfg.refresh_method == "relora":
            relora_(find_lora_modules(model), optimizer, gen)
        elif cfg.refresh_method == "redo":
            lora = {r.name: r for r in find_lora_modules(model)}
            self._pending["supple/redo_units"] = float(redo_(self._tracker, cfg.redo_threshold, optimizer, gen, lora))
        # if decorrelation bases or stacks reference parameters, they are unchanged objects: nothing to rebuild

    def _live_metrics(self, samples: dict[int, torch.Tensor]) -> dict[str, float]:
        from ..regularizers.geometry import anisotropy, effective_rank

        out = {}
        for layer, h in samples.items():
            if h.shape[0] < 2:
                continue
            out[f"supple/erank/layer_{layer}"] = float(effective_rank(h))
            gen = torch.Generator().manual_seed(int(self._state.global_step))
            out[f"supple/anisotropy/layer_{layer}"] = float(anisotropy(h, generator=gen))
        return out

    def _lora_metrics(self, model) -> dict[str, float]:
        """Mean stable rank ‖ΔW‖²_F/σ₁² of the LoRA updates ΔW = scaling·B·A (0-update modules left out)."""
        from ..regularizers.geometry import lora_delta_svd, singular_value_stats

        ranks = []
        for ref in find_lora_modules(model):
            _, sv, _ = lora_delta_svd(ref.lora_a, ref.lora_b, ref.scaling)
            r = float(singular_value_stats(sv)["stable_rank"])
            if math.isfinite(r):
                ranks.append(r)
        return {"supple/lora_stable_rank": sum(ranks) / len(ranks)} if ranks else {}

    def _collect_logs(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._taps is not None and self.config.diversity_weight > 0:
            mean, skipped = self._taps.collect()
            self._skipped_total += skipped
            if mean is not None:
                out["supple/diversity"] = mean
        if self._decor_log:
            intra = [v[0] for v in self._decor_log]
            out["supple/decorrelation"] = sum(intra) / len(intra)
            cross = [v[1] for v in self._decor_log if v[1] is not None]
            if cross:
                out["supple/cross_overlap"] = sum(cross) / len(cross)
            self._decor_log.clear()
        if self._replay_losses:
            out["supple/replay_loss"] = sum(self._replay_losses) / len(self._replay_losses)
            self._replay_losses.clear()
        if self.config.refresh_method:
            out["supple/refreshes"] = float(self._state.global_step // self.config.refresh_every)
        if any(x is not None for x in (self._taps, self._decor, self._replay)):
            out["supple/skipped_nonfinite"] = float(self._skipped_total)
        out.update(self._pending)
        self._pending = {}
        return {k: v for k, v in out.items() if isinstance(v, float) and math.isfinite(v)}

    def _wrap_log(self, trainer: Any) -> None:
        orig = trainer.log
        self._orig_log = orig

        def log(logs: dict, *a: Any, **kw: Any):
            if isinstance(logs, dict) and "loss" in logs:
                logs.update(self._collect_logs())
            return orig(logs, *a, **kw)

        trainer.log = log
