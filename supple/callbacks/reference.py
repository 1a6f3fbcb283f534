"""The pre-stage reference of the diversity term and its automatic weight (docs/design.md,
"Reference-anchored diversity"): one part, :class:`DiversityAnchor`, which the diversity taps consult.

With ``diversity_reference='pre_stage'`` the term of a (micro-batch, block) is ``λ·relu(P − T_l)``, ``T_l =
P_ref,l + tol·|P_ref,l|``: the taps inject ``∂P/∂H`` where ``P > T_l`` and nothing elsewhere, decided on
device. ``P_ref,l`` is the penalty of the model at the start of this training run, measured one of two ways:

- **train begin** (``diversity_reference_batches = N > 0`` and a trainer whose batches are model inputs:
  SFT, DPO): N no-grad forwards per process, in training mode, of a fixed seeded sample of the train dataset
  collated by the trainer's collator (:func:`reference_batches`), with the live term's token selection and
  normalization; per block the mean of the finite penalties, pooled over ranks. The trainer's own train
  dataloader is not iterated: a second pass over it would advance its seeded sampler's epoch and change the
  training order. The global RNG state is restored afterwards.
- **first step** (``N = 0``, or batches that are not model inputs: GRPO's are prompts, generated inside the
  step): the penalties of the first optimizer step's own micro-batches (its weights are still the pre-stage
  weights), pooled over ranks at that step's end; the term is off on that step (T = +inf).

With ``diversity_weight_schedule='auto'`` λ is a device tensor updated once per optimizer step from the step's
mean penalty per block (:func:`supple.regularizers.anchor.auto_weight_step`, pooled over ranks). P_ref and λ
are saved with every checkpoint (``SuppleCallback.state``) and restored on resume.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping
from itertools import islice
from typing import Any

import torch
from torch import nn

from ..modeling import forward_input_names
from ..regularizers.anchor import anchor_threshold, auto_weight_step
from .context import TrainingContext
from .distributed import sum_over_ranks
from .tokens import seeded_generator

STATE_VERSION = 1


def reference_generator(seed: int) -> torch.Generator:
    """Generator of the reference sample's permutation of the train dataset: ``blake2b("supple/reference/{seed}")``."""
    return seeded_generator(f"supple/reference/{seed}")


def reference_rows(dataset: Any, count: int, seed: int) -> list[Any]:
    """``count`` items of ``dataset``: positions 0 … count−1 of a seeded permutation, wrapping around a smaller
    dataset; an iterable dataset without ``len`` gives its first items in order (wrapping likewise)."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        n = len(dataset)
        if n == 0:
            return []
        perm = torch.randperm(n, generator=reference_generator(seed))
        return [dataset[int(perm[m % n])] for m in range(count)]
    items = list(islice(iter(dataset), count))
    return [items[m % len(items)] for m in range(count)] if items else []


def reference_batches(trainer: Any, n: int, seed: int, rank: int, world: int) -> list[tuple[int, dict]] | None:
    """The reference sample of this rank: ``n`` collated batches ``(global index j, batch)``.

    Batch ``j`` holds positions ``j·B … (j+1)·B − 1`` of :func:`reference_rows` (B the per-device train batch
    size); rank ``r``'s i-th batch is ``j = i·world + r``, so the pooled sample of W ranks is that of one process
    with ``W·n`` batches. Columns are removed and batches collated as the Trainer's train dataloader does.
    None when the trainer's batches are not model inputs (no 2-D ``input_ids``: GRPO's batches are prompts).
    """
    dataset = getattr(trainer, "train_dataset", None)
    collate = getattr(trainer, "data_collator", None)
    if dataset is None or collate is None:
        return None
    bs = int(getattr(trainer, "_train_batch_size", 0) or trainer.args.per_device_train_batch_size)
    try:
        import datasets

        map_style = isinstance(dataset, datasets.Dataset)
    except ImportError:  # pragma: no cover - datasets is a dependency of TRL
        map_style = False
    if map_style and hasattr(trainer, "_remove_unused_columns"):
        dataset = trainer._remove_unused_columns(dataset, description="supple reference")
    elif hasattr(trainer, "_get_collator_with_removed_columns"):
        collate = trainer._get_collator_with_removed_columns(collate, description="supple reference")
    rows = reference_rows(dataset, n * world * bs, seed)
    if not rows:
        return None
    out = []
    for i in range(n):
        j = i * world + rank
        batch = collate(rows[j * bs:(j + 1) * bs])
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return None
        out.append((j, dict(batch)))
    return out


def model_inputs(batch: dict, names: frozenset[str], device: torch.device) -> dict:
    """The keys of ``batch`` the model's forward accepts (``labels`` left out: no loss is needed), on ``device``,
    with ``use_cache=False`` and ``logits_to_keep=1`` where accepted (the head's output is not used)."""
    out = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
           if k in names and k != "labels"}
    if "use_cache" in names:
        out["use_cache"] = False
    if "logits_to_keep" in names:
        out["logits_to_keep"] = 1
    return out


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _rng_guard(device: torch.device):
    """Restore the global RNG state (CPU, and ``device``'s) after the block: the reference forwards must not
    change the training run's randomness."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device.index or 0], device_type=device.type)


class DiversityAnchor:
    """The pre-stage reference P_ref per tapped block, its threshold T and the weight λ (fixed or automatic).

    Args:
        cfg: the run's SuppleConfig (``diversity_reference='pre_stage'``, ``diversity_weight > 0``).
        layers: the taps' resolved block indices (their order is the order of P_ref and T).

    ``attach(ctx)`` creates the device state; ``begin(taps, saved)`` (at train begin, after every part is
    attached) restores P_ref and λ from a checkpoint or measures P_ref. The taps read :meth:`threshold_at`
    and :meth:`weight_on` and call :meth:`record` once per (step, micro-batch, block).
    """

    def __init__(self, cfg: Any, layers: list[int]) -> None:
        self.tolerance = float(cfg.diversity_tolerance)
        self.batches = int(cfg.diversity_reference_batches)
        self.auto = cfg.diversity_weight_schedule == "auto"
        self.rate = float(cfg.diversity_weight_rate)
        self.low, self.high = float(cfg.diversity_weight_min), float(cfg.diversity_weight_max)
        self.initial_weight = float(cfg.diversity_weight)
        self.layers = list(layers)
        # what P_ref depends on: a checkpoint measured under other settings is not restored
        self.settings = {"penalty": cfg.diversity_penalty, "layers": self.layers,
                         "normalize": bool(cfg.diversity_normalize_tokens), "max_tokens": int(cfg.diversity_max_tokens)}
        self.mode: str | None = None  # "train_begin", "first_step" or "checkpoint"
        self.ctx: TrainingContext | None = None
        self.p_ref: torch.Tensor | None = None
        self.threshold: torch.Tensor | None = None
        self.weight: float | torch.Tensor = self.initial_weight
        self._record_step: int | None = None
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        self._reference_log: float | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    def attach(self, ctx: TrainingContext) -> None:
        """Create the device state: T = +inf (no term) until P_ref is known, λ, the per-step sums."""
        self.ctx = ctx
        device = _model_device(ctx.model)
        n = len(self.layers)
        self.threshold = torch.full((n,), math.inf, device=device)
        self.weight = torch.tensor(self.initial_weight, device=device) if self.auto else self.initial_weight
        self._sums = torch.zeros(n, device=device)
        self._counts = torch.zeros(n, device=device)

    def detach(self) -> None:
        self.ctx = None

    def begin(self, taps: Any, saved: dict | None) -> None:
        """Restore P_ref and λ from a resumed checkpoint, else measure P_ref (or arm the first-step record)."""
        ctx = self.ctx
        if ctx.step > 0:
            if self._restore(saved):
                self.mode = "checkpoint"
                return
            warnings.warn(
                f"supple: resuming at step {ctx.step} without a saved diversity reference for these settings (the "
                "checkpoint was written without diversity_reference='pre_stage', or with another penalty, layers, "
                "normalization or max_tokens): P_ref is measured on the resumed weights, not the pre-stage model.",
                stacklevel=3,
            )
        batches = None
        if self.batches > 0:
            trainer = ctx.require_trainer(
                "to draw the diversity reference sample from its train dataset (diversity_reference_batches > 0; "
                "diversity_reference_batches=0 takes the reference from the first optimizer step instead)")
            batches = reference_batches(trainer, self.batches, ctx.seed, ctx.rank, ctx.world_size)
        if batches is None:
            self.mode, self._record_step = "first_step", ctx.step
            return
        self.mode = "train_begin"
        self._set_reference(*self._measure(taps, batches))

    # -- what the taps read -----------------------------------------------------------------------------
    def threshold_at(self, pos: int, device: torch.device) -> torch.Tensor:
        """T of the ``pos``-th tapped block (0-d, on ``device``); +inf while P_ref is unknown."""
        return self.threshold[pos].to(device)

    def weight_on(self, device: torch.device) -> float | torch.Tensor:
        """λ: a float (fixed) or a 0-d tensor on ``device`` (automatic)."""
        return self.weight.to(device) if isinstance(self.weight, torch.Tensor) else self.weight

    def record(self, pos: int, p: torch.Tensor, finite: torch.Tensor) -> None:
        """Add one term's penalty to the step's sums (only while they are needed: the first-step reference or
        the automatic weight). Device ops, no host sync."""
        if not (self.auto or self._record_step == self.ctx.step):
            return
        self._sums[pos] += torch.where(finite, p, torch.zeros_like(p)).to(self._sums.device)
        self._counts[pos] += finite.to(self._counts.device, self._counts.dtype)

    # -- events ---------------------------------------------------------------------------------------
    def on_step_end(self) -> None:
        """After the optimizer step: finish the first-step reference, or update λ (auto); reset the sums."""
        finished = self.ctx.step - 1
        if self._record_step is not None and finished == self._record_step:
            self._record_step = None
            self._set_reference(self._sums, self._counts)
        elif self.auto and self.p_ref is not None:
            pooled = sum_over_ranks(torch.stack([self._sums, self._counts]))
            p_mean = pooled[0] / pooled[1].clamp_min(1)
            self.weight = auto_weight_step(self.weight, p_mean, self.threshold, self.p_ref, pooled[1] > 0,
                                           self.rate, self.low, self.high)
        self._sums.zero_()
        self._counts.zero_()

    def logs(self) -> dict[str, float]:
        """``supple/diversity_reference`` (mean P_ref over blocks, once known) and ``supple/diversity_weight`` (auto)."""
        out = {}
        if self._reference_log is not None:
            out["supple/diversity_reference"] = self._reference_log
        if self.auto and isinstance(self.weight, torch.Tensor):
            out["supple/diversity_weight"] = float(self.weight)
        return out

    # -- checkpoint -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-able state for the checkpoint (a host copy of P_ref and λ; called only when a checkpoint is saved)."""
        return {
            "version": STATE_VERSION,
            "settings": dict(self.settings),
            "p_ref": [float(v) for v in self.p_ref.cpu()] if self.p_ref is not None else None,
            "weight": float(self.weight) if isinstance(self.weight, torch.Tensor) else None,
        }

    def _restore(self, saved: dict | None) -> bool:
        if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION or saved.get("p_ref") is None:
            return False
        if saved.get("settings") != self.settings or len(saved["p_ref"]) != len(self.layers):
            return False
        device = self.threshold.device
        self._set_reference_values(torch.tensor(saved["p_ref"], dtype=torch.float32, device=device))
        if self.auto and saved.get("weight") is not None:
            self.weight = torch.tensor(float(saved["weight"]), device=device).clamp(self.low, self.high)
        return True

    # -- the reference --------------------------------------------------------------------------------
    def _measure(self, taps: Any, batches: list[tuple[int, dict]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block sums and counts of the finite penalties of the reference forwards (this rank)."""
        ctx, model = self.ctx, self.ctx.model
        trainer = ctx.trainer
        device = getattr(getattr(trainer, "args", None), "device", None) or _model_device(model)
        names = forward_input_names(model)
        pos = taps.positions
        sums, counts = torch.zeros_like(self._sums), torch.zeros_like(self._counts)
        current: dict[str, Any] = {}

        def probe(hidden: torch.Tensor, layer: int) -> None:
            p, finite = taps.probe_penalty(hidden, layer, current["mask"], current["micro"])
            sums[pos[layer]] += p.to(sums.device)
            counts[pos[layer]] += finite.to(counts.device, counts.dtype)

        autocast = getattr(trainer, "compute_loss_context_manager", None)
        modes = [(m, m.training) for m in model.modules()]
        taps.probe = probe
        try:
            with torch.no_grad(), _rng_guard(torch.device(device)), (autocast() if autocast else contextlib.nullcontext()):
                model.train()  # as the training forwards run (dropout included); restored below
                for micro, batch in batches:
                    inputs = model_inputs(batch, names, torch.device(device))
                    current.update(mask=inputs.get("attention_mask"), micro=micro)
                    model(**inputs)
        finally:
            taps.probe = None
            for m, training in modes:
                m.training = training
        return sums, counts

    def _set_reference(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """P_ref = pooled sums / pooled counts per block (a collective under DDP/FSDP: one threshold on every rank)."""
        pooled = sum_over_ranks(torch.stack([sums, counts]))
        self._set_reference_values(pooled[0] / pooled[1])  # 0/0 = NaN: a block without a finite penalty
        missing = [self.layers[i] for i, ok in enumerate(torch.isfinite(self.p_ref).tolist()) if not ok]
        if missing:
            warnings.warn(
                f"supple: the pre-stage diversity reference has no finite penalty at block(s) {missing} (too few real "
                "tokens in the reference micro-batches, or non-finite hidden states); their term stays off.",
                stacklevel=3,
            )

    def _set_reference_values(self, p_ref: torch.Tensor) -> None:
        self.p_ref = p_ref
        self.threshold = anchor_threshold(p_ref, self.tolerance)
        finite = p_ref[torch.isfinite(p_ref)]
        self._reference_log = float(finite.mean()) if finite.numel() else None  # one host sync, once
