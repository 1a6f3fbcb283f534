"""Settings of the testbed: the arms, the supple arm's defaults (chosen by a sweep) and the budgets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

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

# The supple_last arm: the default arm's fields with a heavier replay, applied in the last stage only. Chosen on
# training seeds 0-2 of the 240/60/120 full fine-tuning regime (docs/demo.md, "supple in the last stage only").
SUPPLE_LAST_STAGE: dict[str, Any] = {**SUPPLE_ARM_DEFAULTS, "replay_every": 2, "replay_weight": 1.0}


@dataclass(frozen=True)
class Arm:
    """One arm of the demo: how a stage is trained on top of the plain TRL trainer.

    ``supple``: the SuppleConfig fields of the arm's :class:`supple.SuppleCallback` (None: no callback). The
    testbed-only yardsticks, which supple does not ship: ``anchor_weight`` λ of an L2 pull toward the weights the
    model had when the stage began (Kumar et al. 2023, "regenerative regularization"), and ``boundary_refresh``
    (α, σ) of one Shrink & Perturb of every weight at the start of every stage after the first.
    ``last_stage_only``: no callback in the stages before the last, so they are the baseline's (same seed, same
    data order), and the arm's ``supple`` fields in the last one: supple applied when an already post-trained
    model is fine-tuned again.
    """

    name: str
    help: str
    supple: dict[str, Any] | None = None
    lora_only: bool = False  # meaningful only with LoRA stages (skipped under full fine-tuning)
    anchor_weight: float = 0.0
    boundary_refresh: tuple[float, float] | None = None
    last_stage_only: bool = False  # ``supple`` applies to the last stage only; the stages before it train plainly


_ANCHORED = {"diversity_weight": 1.0, "diversity_penalty": "ipr", "diversity_layers": [-1],
             "diversity_reference": "pre_stage", "diversity_tolerance": 0.0}  # the anchored arms' shared settings
ARM_TABLE: dict[str, Arm] = {a.name: a for a in (
    Arm("baseline", "plain TRL training"),
    Arm("supple", "supple's default arm (SUPPLE_ARM_DEFAULTS)", supple=SUPPLE_ARM_DEFAULTS),
    Arm("supple_last", "supple in the last stage only, none before it: the default arm's diversity term with "
        "replay of 1 builtin:pydoc sequence every 2 steps at weight 1 (docs/demo.md, 'supple in the last stage "
        "only')", supple=SUPPLE_LAST_STAGE, last_stage_only=True),
    Arm("diversity", "diversity penalty alone (normalized ipr, weight 1, last block)",
        supple={"diversity_weight": 1.0, "diversity_penalty": "ipr", "diversity_layers": [-1]}),
    Arm("diversity_anchored", "diversity penalty only where it fell below the pre-stage model's (ipr, weight 1, "
        "last block, reference on 4 batches, tolerance 0)",
        supple=dict(_ANCHORED)),
    Arm("diversity_auto", "anchored diversity with the automatic weight (starts at 1, bounds [0.001, 10], rate 0.05)",
        supple={**_ANCHORED, "diversity_weight_schedule": "auto", "diversity_weight_min": 1e-3,
                "diversity_weight_max": 10.0, "diversity_weight_rate": 0.05}),
    Arm("decorrelation", "LoRA decorrelation alone (intra and cross-stage, weight 1 each)", lora_only=True,
        supple={"decorrelation_weight": 1.0, "decorrelation_cross_weight": 1.0}),
    Arm("replay", "mixed-domain replay alone (builtin:pydoc, 1 sequence every 2 steps, weight 1)",
        supple={"replay_data": "builtin:pydoc", "replay_weight": 1.0, "replay_every": 2, "replay_batch_size": 1}),
    Arm("refresh", "Shrink & Perturb every 20 steps (alpha 0.99, sigma 0.01)",
        supple={"refresh_method": "shrink_perturb", "refresh_every": 20, "refresh_shrink": 0.99,
                "refresh_noise": 0.01}),
    Arm("refresh_boundary", "Shrink & Perturb of every weight at each stage boundary (alpha 0.98, sigma 0.02)",
        boundary_refresh=(0.98, 0.02)),
    Arm("l2_anchor", "yardstick: L2 pull toward the pre-stage weights, lambda 0.1 (Kumar et al. 2023)",
        anchor_weight=0.1),
)}
ARMS = tuple(ARM_TABLE)
MAIN_ARMS = ("baseline", "supple")
ABLATION_ARMS = ("baseline", "supple", "l2_anchor", "diversity", "diversity_anchored", "diversity_auto", "replay",
                 "refresh_boundary", "refresh", "decorrelation")

_REPLAY_FIELDS = ("replay_data", "replay_weight", "replay_every", "replay_batch_size", "replay_max_length")
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
    n_eval: int = 64  # held-out items per task family (16 items carry ± 0.12 of binomial noise)
    eval_batch: int = 16
    # the plasticity probe: a fresh LoRA (rank probe_rank) trained probe_steps AdamW steps on each probe family,
    # once per probe seed; held-out loss on probe_eval items (see docs/demo.md for how these were chosen)
    probe_steps: int = 25
    probe_eval_every: int = 5
    probe_batch: int = 4
    probe_lr: float = 2e-4
    probe_rank: int = 8
    probe_eval: int = 64
    probe_seeds: int = 2
    # probe seeds for the base model, 0 = probe_seeds. The base model is probed once per demo, so more seeds there
    # are cheap, and it is the noisiest checkpoint under the memorization probe; the analysis then resamples its
    # values on their own (docs/demo.md, "How sure is a probe result")
    probe_seeds_base: int = 0
    probe_format: str = "plain"  # "plain" (QUESTION\nAnswer: ANSWER) or "chat" (the stages' chat template)
    probe_warmup: int = 0  # linear learning-rate warm-up steps of the probe (0 = none)
    probe_max_grad_norm: float = 0.0  # gradient-norm clipping of the probe (0 = none)
    probe_cooldown: int = 0  # linear learning-rate decay to zero over the probe's last steps (0 = none)
    probe_every_stage: bool = False  # True: probe after every stage (default: the base model and the last stage)
    # per-family probe settings that replace probe_steps / probe_lr / probe_eval_every for that family: a
    # memorization family (tasks.WordCodes) needs more, faster steps than the transfer families to be mid-curve
    probe_overrides: dict[str, dict[str, float]] = field(default_factory=lambda: {
        "word_codes": {"steps": 100, "lr": 1e-3, "eval_every": 20}})
    geometry_texts: int = 8
    geometry_tokens: int = 384

    def steps_for(self, stage_name: str, kind: str) -> int:
        if stage_name in self.steps:
            return int(self.steps[stage_name])
        if kind in self.steps:
            return int(self.steps[kind])
        raise KeyError(f"budget {self.name!r} has no step count for stage {stage_name!r} (kind {kind!r})")

    @classmethod
    def from_fields(cls, fields: dict) -> Budget:
        """The Budget a run's ``meta.budget`` describes: fields this version does not know are dropped, fields a
        newer version added keep their defaults."""
        return cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})

    def for_base_model(self) -> Budget:
        """This budget as the base model is probed: ``probe_seeds_base`` probe seeds when set."""
        return replace(self, probe_seeds=self.probe_seeds_base) if self.probe_seeds_base else self

    def probe_settings(self, family: str) -> tuple[int, float, int]:
        """``(steps, lr, eval_every)`` of the probe on ``family``: ``probe_overrides[family]`` over the shared ones."""
        o = self.probe_overrides.get(family, {})
        unknown = sorted(set(o) - {"steps", "lr", "eval_every"})
        if unknown:
            raise ValueError(f"probe_overrides[{family!r}]: unknown setting(s) {unknown}; use steps, lr, eval_every")
        return (int(o.get("steps", self.probe_steps)), float(o.get("lr", self.probe_lr)),
                int(o.get("eval_every", self.probe_eval_every)))

    def with_probe(self, family: str, steps: int, lr: float, eval_every: int | None = None) -> Budget:
        """A copy whose probe on ``family`` runs ``steps`` steps at ``lr`` (held-out loss every ``eval_every``
        steps, default steps / 5); the other families keep their settings."""
        o = {"steps": int(steps), "lr": float(lr), "eval_every": int(eval_every or max(1, steps // 5))}
        return replace(self, probe_overrides={**self.probe_overrides, family: o})

    def describe_probes(self, families) -> str:
        """``"word_codes 100 steps @ lr 0.001, reverse_words 25 steps @ lr 0.0002"``: per-family settings, for reports."""
        return ", ".join(f"{f} {s} steps @ lr {lr:g}" for f in families for s, lr, _ in [self.probe_settings(f)])

    def probe_units(self, families) -> int:
        """Probe steps over ``families`` and probe seeds (the progress bar's unit)."""
        return sum(self.probe_settings(f)[0] for f in families) * self.probe_seeds

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
        probe_batch=4,
        probe_seeds=1,
        probe_overrides={"word_codes": {"steps": 12, "lr": 1e-3, "eval_every": 4}},
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
        probe_overrides={"word_codes": {"steps": 2, "lr": 1e-3, "eval_every": 1}},
        probe_every_stage=True,
        geometry_texts=2,
        geometry_tokens=64,
    ),
    # the default: full fine-tuning, 3 training seeds; the baseline loses OOD accuracy and forgets the first task;
    # no probe shows a loss of plasticity once the base model is probed under 16 probe seeds (docs/demo.md)
    "default": Budget(name="default", steps={"sft": 60, "dpo": 16, "sft2": 30, "grpo": 16}, seeds=3),
    # the cheapest budget measured at which the baseline loses plasticity (full fine-tuning, `word_codes` +0.240
    # [+0.052, +0.413] over six training seeds; docs/demo.md, "Pilot, 240 / 60 / 120 steps"); baseline and
    # supple took 96 min on 2 CPU cores there, under 2 probe seeds. The base model is probed under 16 probe seeds (its
    # probe is the noisiest), every trained checkpoint under 4
    "full": Budget(name="full", steps={"sft": 240, "dpo": 60, "sft2": 120, "grpo": 60}, seeds=3, probe_seeds=4,
                   probe_seeds_base=16),
}



def budget_with(budget: Budget, **changes) -> Budget:
    """A copy of ``budget`` with fields replaced (``steps`` merged key by key)."""
    steps = changes.pop("steps", None)
    b = replace(budget, **changes)
    if steps:
        b = replace(b, steps={**budget.steps, **steps})
    return b
