"""Live metrics part: effective rank and anisotropy of the tapped blocks, stable rank of the LoRA updates.

Every ``metrics_every`` optimizer steps the diversity taps keep the tokens of the first micro-batch
(docs/design.md, "Live metrics"); at that step's end this part turns them into ``supple/erank/layer_{k}``,
``supple/anisotropy/layer_{k}`` and ``supple/lora_stable_rank`` for the next log.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..modeling import find_lora_modules
from ..regularizers.geometry import anisotropy, effective_rank, lora_delta_svd, singular_value_stats
from .context import TrainingContext
from .distributed import full_tensor
from .diversity import DiversityTaps


class MetricsPart:
    """Reads the samples the taps captured; ``taps`` is the diversity part (weight 0 = capture only)."""

    def __init__(self, taps: DiversityTaps) -> None:
        self.taps = taps
        self.ctx: TrainingContext | None = None

    def attach(self, ctx: TrainingContext) -> None:
        self.ctx = ctx

    def detach(self) -> None:
        self.ctx = None

    def on_step_end(self, model: nn.Module) -> None:
        samples = self.taps.take_samples()
        if not samples:
            return
        self.ctx.emit(hidden_metrics(samples, self.ctx.step))
        self.ctx.emit(lora_metrics(model))


def hidden_metrics(samples: dict[int, torch.Tensor], step: int) -> dict[str, float]:
    """Effective rank and anisotropy (seeded pair sample) of each captured block output."""
    out = {}
    for layer, h in samples.items():
        if h.shape[0] < 2:
            continue
        out[f"supple/erank/layer_{layer}"] = float(effective_rank(h))
        gen = torch.Generator().manual_seed(int(step))
        out[f"supple/anisotropy/layer_{layer}"] = float(anisotropy(h, generator=gen))
    return out


def lora_metrics(model: nn.Module) -> dict[str, float]:
    """Mean stable rank ‖ΔW‖²_F/σ₁² of the LoRA updates ΔW = scaling·B·A (0-update modules left out).

    Sharded (FSDP2) A and B are gathered whole (a collective: every rank calls this at the same step)."""
    ranks = []
    for ref in find_lora_modules(model):
        _, sv, _ = lora_delta_svd(full_tensor(ref.lora_a.detach()), full_tensor(ref.lora_b.detach()), ref.scaling)
        r = float(singular_value_stats(sv)["stable_rank"])
        if math.isfinite(r):
            ranks.append(r)
    return {"supple/lora_stable_rank": sum(ranks) / len(ranks)} if ranks else {}
