"""Diversity taps: inject λ·∂P/∂H into the gradient of selected decoder-block outputs (one part).

A forward hook on each selected block computes the penalty P on the block output (non-padding tokens,
optionally subsampled) and returns the output passed through an identity autograd function ("tap")
whose backward adds ``coeff · ∂P/∂H`` to the incoming gradient. That is exactly the gradient of adding
``coeff · P`` to the loss, without touching the trainer's loss (DPO computes its loss outside the model).

Invariants (docs/design.md, "Diversity taps"):
- hooks act only in training forwards with grad enabled (DPO's reference pass, generation and
  evaluation are untouched);
- the tap applies on *every* grad-enabled call of a block, whether the block hooks run outside a
  checkpointed region or inside it (reentrant or not): a call that repeats the (step, micro-batch,
  block) key of an earlier call — a recomputation — re-applies the very same tap (same token indices,
  same injected gradient), so recomputation saves the same tensors and the gradient counts once;
- the penalty is evaluated, and its statistics counted, once per (step, micro-batch, block).

With a pre-stage reference (``anchor``, :mod:`supple.callbacks.reference`) the injected gradient is that of
``λ·relu(P − T_l)``: ``∂P/∂H`` where ``P > T_l``, 0 elsewhere, decided on device like the finite check; λ is the
anchor's (a device tensor under the automatic weight). ``probe`` lets the reference measurement read the
penalty of a no-grad forward's block outputs without tapping them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..modeling import attention_token_mask, find_decoder_blocks, resolve_layer_indices, unwrap_model
from ..regularizers.anchor import hinge_value_and_grad
from ..regularizers.diversity import penalty_value_and_grad
from .context import TrainingContext
from .distributed import sum_over_ranks, world_size
from .tokens import BatchMasks, real_token_indices, select_tokens, subsample, token_generator

__all__ = ["REFERENCE_STEP", "DiversityTaps", "TapSummary", "select_tokens", "token_generator"]

REFERENCE_STEP = -1  # the step of the token-subsample key of the train-begin reference forwards


class _Tap(torch.autograd.Function):
    """Identity in forward; backward adds ``extra`` at rows ``idx`` of the flattened gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, idx: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(idx, extra)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        idx, extra = ctx.saved_tensors
        d = grad_out.shape[-1]
        flat = grad_out.reshape(-1, d).index_add(0, idx, extra.to(grad_out.dtype))
        return flat.view_as(grad_out), None, None


@dataclass
class TapStats:
    """Per-logging-window penalty values (device tensors, no host sync) and captured samples for metrics."""

    values: list[torch.Tensor] = field(default_factory=list)
    finite: list[torch.Tensor] = field(default_factory=list)
    active: list[torch.Tensor] = field(default_factory=list)  # with an anchor: finite and above the threshold
    hidden_samples: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class TapSummary:
    """What one logging window of the taps amounts to (pooled over ranks under DDP/FSDP).

    Attributes:
        mean: mean finite penalty (None if there was none).
        skipped: terms skipped because they were not finite.
        active_share: with a pre-stage reference, the share of finite terms above their threshold (None
            without a reference or without a finite term).
    """

    mean: float | None
    skipped: int
    active_share: float | None = None


class DiversityTaps:
    """The diversity part: block hooks that tap the selected decoder-block outputs.

    Args:
        penalty: penalty name ("ipr", "decov", "vicreg").
        weight: λ; the injected coefficient is λ / number of layers × ``ctx.micro_coeff()``. With 0 the
            hooks only capture samples for live metrics.
        layers: block indices (negative from the end).
        max_tokens: tokens sampled per micro-batch and block (0 = all).
        normalize: scale token vectors to unit length first.
        capture_every: keep the tapped tokens of the first micro-batch every N steps for live metrics (0 = never).
        model: the training model; validated here (blocks found, indices in range), nothing is attached.

    Attributes set by the callback after construction:
        anchor: the pre-stage reference (:class:`supple.callbacks.reference.DiversityAnchor`) or None.
        probe: while the reference is measured, ``probe(hidden, layer)`` is called with every tapped block's
            output instead of tapping it; None otherwise.
    """

    def __init__(self, penalty: str, weight: float, layers: list[int], max_tokens: int, normalize: bool,
                 capture_every: int, model: nn.Module) -> None:
        self.penalty = penalty
        self.weight = float(weight)
        self.max_tokens = int(max_tokens)
        self.normalize = bool(normalize)
        self.capture_every = int(capture_every)
        _, self.blocks = find_decoder_blocks(model)
        self.layers = resolve_layer_indices(list(layers), len(self.blocks))
        self.stats = TapStats()
        self.paused = False
        self.ctx: TrainingContext | None = None
        self._masks: BatchMasks | None = None
        self._handles: list = []
        self._key: tuple[int, int] | None = None
        self._taps: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._real_idx: tuple[tuple[int, int], torch.Tensor] | None = None
        self._warned: set[str] = set()
        self.positions = {layer: i for i, layer in enumerate(self.layers)}  # block index -> position in layers
        self.anchor: Any | None = None
        self.probe: Callable[[torch.Tensor, int], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    def attach(self, ctx: TrainingContext) -> None:
        """Install the block hooks and the mask pre-hooks on ``ctx.model``."""
        self.ctx = ctx
        self._masks = BatchMasks(ctx.step_key)
        self._masks.attach(unwrap_model(ctx.model) if _is_ddp(ctx.model) else ctx.model, self.blocks)
        for k in self.layers:
            self._handles.append(self.blocks[k].register_forward_hook(self._make_block_hook(k)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._masks is not None:
            self._masks.detach()
        self._taps.clear()
        self._real_idx = None
        self._key = None

    # -- hooks --------------------------------------------------------------------------------------
    def _make_block_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output):
            probing = self.probe is not None
            if self.ctx is None or not (probing or (not self.paused and module.training and torch.is_grad_enabled())):
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
                return None
            try:
                if probing:  # a reference forward: read the penalty, change nothing
                    self.probe(hidden, layer)
                    return None
                new_hidden = self._tap(hidden, layer)
            except BaseException:
                if self.ctx.abort is not None:  # nothing of supple stays on the model after an error
                    self.ctx.abort()
                raise
            if new_hidden is hidden:
                return None
            if isinstance(output, tuple):
                return (new_hidden, *output[1:])
            return new_hidden

        return hook

    def _tap(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        key = self.ctx.step_key()
        if key != self._key:  # a new micro-batch: forget the previous one's taps
            self._key, self._taps, self._real_idx = key, {}, None
        slot = (layer, tuple(hidden.shape))
        if slot in self._taps:  # recomputation of this (step, micro-batch, block): the same tap again
            saved = self._taps[slot]
            return hidden if saved is None else _Tap.apply(hidden, *saved)
        idx = self._token_indices(hidden, layer)
        h = hidden.detach().reshape(-1, hidden.shape[-1]).index_select(0, idx)
        if self.capture_every and key[1] == 0 and key[0] % self.capture_every == 0:
            self.stats.hidden_samples[layer] = h.float().cpu()
        if self.weight == 0:
            self._taps[slot] = None
            return hidden
        if h.shape[0] < 2:  # no covariance from fewer than two tokens
            self.stats.values.append(torch.zeros((), device=hidden.device))
            self.stats.finite.append(torch.zeros((), dtype=torch.bool, device=hidden.device))
            self._taps[slot] = None
            return hidden
        p, g, finite = self._penalty(h)
        weight = self.weight
        if self.anchor is not None:  # λ·relu(P − T): g where P > T, else 0 (decided on device)
            pos = self.positions[layer]
            _, g, above = hinge_value_and_grad(p, g, self.anchor.threshold_at(pos, p.device))
            weight = self.anchor.weight_on(g.device)
            self.anchor.record(pos, p, finite)
            self.stats.active.append(finite & above)
        coeff = weight / len(self.layers) * self.ctx.micro_coeff()
        extra = torch.where(finite, g * coeff, torch.zeros_like(g))
        self.stats.values.append(torch.where(finite, p, torch.zeros_like(p)))
        self.stats.finite.append(finite)
        self._taps[slot] = (idx, extra)
        return _Tap.apply(hidden, idx, extra)

    def _penalty(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(P, ∂P/∂h, finite)`` in fp32 with autocast off; ``finite`` is decided on device (no host sync):
        a non-finite term injects nothing and is counted."""
        with torch.autocast(device_type=h.device.type, enabled=False):  # penalties always in fp32
            p, g = penalty_value_and_grad(self.penalty, h, self.normalize)
        return p, g, torch.isfinite(p) & torch.isfinite(g).all()

    def probe_penalty(self, hidden: torch.Tensor, layer: int, mask: torch.Tensor | None,
                      micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, finite)`` of a reference forward's block output, on the same token selection as the live term.

        The tokens are the real tokens of ``mask`` (the batch's ``attention_mask``; None = every position),
        subsampled to ``max_tokens`` with the key ``(seed, REFERENCE_STEP, micro, layer)``, ``micro`` the global
        index of the reference batch; normalization and penalty as in :meth:`_tap`. ``P`` is 0 where not finite.
        """
        b, t, d = hidden.shape
        seed = self.ctx.seed
        gen = token_generator(seed, REFERENCE_STEP, micro, layer) if self.max_tokens else None
        idx = select_tokens(attention_token_mask(mask, (b, t)), b, t, self.max_tokens, gen).to(hidden.device)
        h = hidden.detach().reshape(-1, d).index_select(0, idx)
        if h.shape[0] < 2:
            zero = torch.zeros((), device=hidden.device)
            return zero, zero.bool()
        p, _, finite = self._penalty(h)
        return torch.where(finite, p, torch.zeros_like(p)), finite

    def _token_indices(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        b, t, _ = hidden.shape
        if self._real_idx is None or self._real_idx[0] != (b, t):  # one mask scan per micro-batch, not per block
            raw, seen = self._masks.current()
            mask = attention_token_mask(raw, (b, t))
            if not seen:
                self._warn_once("unseen", "supple: no forward of the model was seen before a tapped block in this "
                                "micro-batch, so its attention_mask is unknown; every position counts as a token.")
            elif raw is not None and mask is None:
                self._warn_once("shape", "supple: attention_mask does not match the hidden states; using every "
                                "position.")
            self._real_idx = ((b, t), real_token_indices(mask, b, t))
        seed, step, micro = self.ctx.rng_key()
        gen = token_generator(seed, step, micro, layer) if self.max_tokens else None
        return subsample(self._real_idx[1], self.max_tokens, gen).to(hidden.device)

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(message, stacklevel=3)

    # -- logging ------------------------------------------------------------------------------------
    def collect(self) -> tuple[float | None, int]:
        """Mean finite penalty since the last call (None if none) and the number of skipped terms
        (:meth:`collect_summary` without the active share)."""
        summary = self.collect_summary()
        return summary.mean, summary.skipped

    def collect_summary(self) -> TapSummary:
        """The penalty values since the last call: mean, skipped terms and, with a reference, the active share.

        Under DDP/FSDP they are pooled over the ranks (a collective at each log, as the Trainer's loss), so the
        logged value is the one a single process at the same global batch logs.
        """
        distributed = world_size() > 1
        if not self.stats.finite and not distributed:
            return TapSummary(None, 0)
        finite = torch.stack(self.stats.finite).cpu() if self.stats.finite else torch.zeros(0, dtype=torch.bool)
        values = torch.stack(self.stats.values).float().cpu() if self.stats.values else torch.zeros(0)
        active = torch.stack(self.stats.active).cpu() if self.stats.active else torch.zeros(0, dtype=torch.bool)
        self.stats.values.clear()
        self.stats.finite.clear()
        self.stats.active.clear()
        local_skipped = int((~finite).sum())
        totals = torch.stack([values[finite].double().sum(), finite.sum().double(),
                              torch.tensor(float(local_skipped), dtype=torch.float64), active.sum().double()])
        if distributed:
            totals = sum_over_ranks(totals)
        total, n_ok, skipped, n_active = float(totals[0]), int(totals[1]), int(totals[2]), int(totals[3])
        if local_skipped:
            where = " on this rank" if distributed else ""
            self._warn_once("nonfinite", (
                f"supple: the {self.penalty} diversity penalty was not finite in {local_skipped} micro-batch/block "
                f"term(s){where} (e.g. a micro-batch with fewer than two real tokens, or NaN hidden states); those "
                "terms were skipped and are counted in supple/skipped_nonfinite."))
        share = n_active / n_ok if self.anchor is not None and n_ok else None
        return TapSummary(total / n_ok if n_ok else None, skipped, share)

    def take_samples(self) -> dict[int, torch.Tensor]:
        """The captured block outputs since the last call (for live metrics), emptied."""
        out, self.stats.hidden_samples = self.stats.hidden_samples, {}
        return out


def _is_ddp(model: nn.Module) -> bool:
    return type(model).__name__ in ("DistributedDataParallel", "DataParallel")
