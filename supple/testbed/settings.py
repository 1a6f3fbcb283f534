"""Settings of the testbed: the arms, the supple arm's defaults (chosen by a sweep) and the budgets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

ARMS = ("baseline", "supple")

# The supple arm's settings, in one place. Cross-stage decorrelation is switched on from the second LoRA stage
# (it needs the earlier stages' adapters); the LoRA terms are dropped under full fine-tuning. Chosen by the sweep
# in benchmarks/demo_sweep.py (README "Choosing the supple arm's settings"): replay went from 4 sequences every
# 4 steps to 1 every 8 at weight 0.5 (was 0.1) — the frequent replay cost ~6 % of step time on SmolLM2 and
# lowered the plasticity probe in the quick sweep; at the default budget 1-every-8 at weight 0.5 gave the lowest
# probe loss with accuracies unchanged within the seed spread. The penalty weights stayed at 1: 0.1 and 10
# (diversity) / 0.1 and 10 (decorrelation) did not do better on all criteria (diversity 10 helped the probe but
# cost out-of-domain and DPO accuracy).
SUPPLE_ARM_DEFAULTS: dict[str, Any] = {
    "diversity_weight": 1.0,
    "diversity_penalty": "ipr",
    "diversity_layers": [-1],
    "decorrelation_weight": 1.0,
    "decorrelation_cross_weight": 1.0,
    "replay_data": "builtin:pydoc",
    "replay_weight": 0.5,
    "replay_every": 8,
    "replay_batch_size": 1,
}
_REPLAY_FIELDS = ("replay_data", "replay_weight", "replay_every", "replay_batch_size")
_LORA_FIELDS = ("decorrelation_weight", "decorrelation_cross_weight")


# ------------------------------------------------------------------------------------------------- budgets
@dataclass
class Budget:
    """How much work a demo run does. ``steps`` is looked up by stage name, then by stage kind."""

    name: str = "default"
    steps: dict[str, int] = field(default_factory=lambda: {"sft": 24, "dpo": 12, "sft2": 16, "grpo": 12})
    seeds: int = 2
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 128
    lora_r: int = 16
    lora_alpha: int = 32
    lr_lora: dict[str, float] = field(default_factory=lambda: {"sft": 2e-4, "dpo": 2e-4, "grpo": 1e-4})
    lr_full: dict[str, float] = field(default_factory=lambda: {"sft": 5e-5, "dpo": 2e-5, "grpo": 1e-5})
    dpo_beta: float = 0.1
    n_eval: int = 16  # held-out items per task family
    eval_batch: int = 16
    probe_steps: int = 10
    probe_eval_every: int = 5
    probe_batch: int = 8
    probe_lr: float = 1e-3
    probe_rank: int = 8
    probe_eval: int = 16
    geometry_texts: int = 8
    geometry_tokens: int = 384

    def steps_for(self, stage_name: str, kind: str) -> int:
        if stage_name in self.steps:
            return int(self.steps[stage_name])
        if kind in self.steps:
            return int(self.steps[kind])
        raise KeyError(f"budget {self.name!r} has no step count for stage {stage_name!r} (kind {kind!r})")

    def lr_for(self, kind: str, lora: bool) -> float:
        table = self.lr_lora if lora else self.lr_full
        return float(table.get(kind, table.get("sft", 1e-4)))


PRESETS: dict[str, Budget] = {
    # a first look: ≤ 5 minutes for SmolLM2-135M on 2 CPU cores
    "quick": Budget(
        name="quick",
        steps={"sft": 8, "dpo": 4, "sft2": 6, "grpo": 4},
        seeds=1,
        n_eval=8,
        eval_batch=8,
        probe_steps=6,
        probe_eval_every=3,
        probe_eval=8,
        probe_batch=6,
        geometry_texts=4,
        geometry_tokens=160,
    ),
    # the test suite's end-to-end run on the tiny model: every code path, a few seconds
    "smoke": Budget(
        name="smoke",
        steps={"sft": 2, "dpo": 2, "sft2": 2, "grpo": 2},
        seeds=1,
        batch_size=2,
        max_length=96,
        lora_r=4,
        lora_alpha=8,
        n_eval=4,
        eval_batch=4,
        probe_steps=2,
        probe_eval_every=1,
        probe_batch=2,
        probe_eval=4,
        geometry_texts=2,
        geometry_tokens=64,
    ),
    # the default: ≤ 20 minutes on 2 CPU cores
    "default": Budget(name="default"),
    # longer and more meaningful (hours on CPU; minutes on a GPU)
    "full": Budget(
        name="full",
        steps={"sft": 120, "dpo": 40, "sft2": 60, "grpo": 40},
        seeds=3,
        n_eval=64,
        probe_steps=40,
        probe_eval_every=5,
        probe_eval=64,
        geometry_texts=64,
        geometry_tokens=2048,
    ),
}



def budget_with(budget: Budget, **changes) -> Budget:
    """A copy of ``budget`` with fields replaced (``steps`` merged key by key)."""
    steps = changes.pop("steps", None)
    b = replace(budget, **changes)
    if steps:
        b = replace(b, steps={**budget.steps, **steps})
    return b
