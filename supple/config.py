"""`SuppleConfig`: every knob of supple, one dataclass, validated on construction.

All fields are plain types so that `transformers.HfArgumentParser` / `trl.TrlParser` can parse them
from the command line, and so that a TRL config can mix them in::

    @dataclass
    class MyConfig(SuppleConfig, SFTConfig):
        pass

    args = MyConfig(output_dir="out", diversity_weight=0.05)
    trainer = SFTTrainer(..., args=args, callbacks=[SuppleCallback()])   # reads the fields from args
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from .regularizers.diversity import PENALTIES as DIVERSITY_PENALTIES  # the one list of penalty names

REFRESH_METHODS = ("shrink_perturb", "relora", "redo")
DIVERSITY_REFERENCES = ("none", "pre_stage")
WEIGHT_SCHEDULES = ("fixed", "auto")


@dataclass
class SuppleConfig:
    """Settings of the supple interventions and live metrics.

    A weight of 0 turns its term off; with every weight at 0 the callback changes nothing.
    """

    diversity_weight: float = field(
        default=0.0,
        metadata={"help": "Weight λ of the representation-diversity penalty on hidden states (0 = off)."},
    )
    diversity_penalty: str = field(
        default="ipr",
        metadata={"help": "Diversity penalty: 'ipr' (inverse participation ratio), 'decov' or 'vicreg'."},
    )
    diversity_layers: list[int] = field(
        default_factory=lambda: [-1],
        metadata={"help": "Decoder-block indices whose outputs are regularized; negative counts from the end."},
    )
    diversity_max_tokens: int = field(
        default=1024,
        metadata={"help": "Tokens sampled per micro-batch and layer for the penalty (0 = all non-padding tokens)."},
    )
    diversity_normalize_tokens: bool = field(
        default=True,
        metadata={"help": "Scale each token vector to unit length before the penalty (robust to massive activations)."},
    )
    diversity_reference: str = field(
        default="none",
        metadata={"help": (
            "'none': the term is λ·P. 'pre_stage': the term is λ·relu(P − T) per micro-batch and block, "
            "T = P_ref + diversity_tolerance·|P_ref|, P_ref the penalty of the model at the start of this "
            "training run on the same token selection: only a loss of diversity against the pre-stage model "
            "is penalized (see diversity_reference_batches for how P_ref is measured)."
        )},
    )
    diversity_tolerance: float = field(
        default=0.0,
        metadata={"help": (
            "pre_stage: the term is active once P exceeds P_ref by this fraction of |P_ref| (>= 0; 0 = any "
            "excess). |P_ref| keeps T >= P_ref for a penalty that can be negative."
        )},
    )
    diversity_reference_batches: int = field(
        default=4,
        metadata={"help": (
            "pre_stage: P_ref is measured at train begin by this many no-grad forwards per process of a fixed, "
            "seeded sample of the train dataset, collated as the train dataloader collates it (a one-time cost "
            "of about N/3 training micro-batches). 0 = no extra forward: P_ref is the first optimizer step's "
            "own penalty (its weights are still the pre-stage weights) and the term is off on that step. "
            "Trainers whose batches are not model inputs (GRPO: prompts, generation happens in the step) "
            "always use the first step."
        )},
    )
    diversity_weight_schedule: str = field(
        default="fixed",
        metadata={"help": (
            "'fixed': λ = diversity_weight. 'auto' (needs diversity_reference='pre_stage'): λ starts at "
            "diversity_weight and is adjusted after every optimizer step, λ ← clamp(λ·exp(rate·err), "
            "diversity_weight_min, diversity_weight_max), err = mean over blocks of clamp((P̄ − T)/|P_ref|, −1, 1), "
            "P̄ the step's mean penalty: λ grows while diversity is lost and decays when it is not."
        )},
    )
    diversity_weight_min: float = field(
        default=1e-3, metadata={"help": "auto: lower bound of λ (> 0: a multiplicative λ must not reach 0)."}
    )
    diversity_weight_max: float = field(default=10.0, metadata={"help": "auto: upper bound of λ."})
    diversity_weight_rate: float = field(
        default=0.05,
        metadata={"help": "auto: λ changes by at most a factor exp(±rate) per optimizer step (> 0)."},
    )
    decorrelation_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the intra-adapter LoRA decorrelation penalty (rows of each A made orthogonal)."},
    )
    decorrelation_cross_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the cross-stage penalty: LoRA A rows kept out of earlier stages' subspaces."},
    )
    previous_adapters: list[str] = field(
        default_factory=list,
        metadata={"help": "Paths of earlier stages' PEFT LoRA adapters or saved update subspaces (safetensors)."},
    )
    previous_subspace_rank: int = field(
        default=0,
        metadata={"help": "Keep at most this many directions per module from each earlier stage (0 = all)."},
    )
    replay_data: Optional[str] = field(
        default=None,
        metadata={"help": "Replay corpus: a .txt/.jsonl/.parquet file or 'builtin:pydoc' (None = off)."},
    )
    replay_weight: float = field(default=0.1, metadata={"help": "Weight of the replay LM loss."})
    replay_every: int = field(default=4, metadata={"help": "Add a replay batch every N optimizer steps."})
    replay_batch_size: int = field(default=4, metadata={"help": "Sequences per replay batch."})
    replay_max_length: int = field(
        default=0,
        metadata={"help": "Tokens kept per replay sequence (0 = the trainer's max_length, or 512 without one); "
                          "the replay pass costs about this many tokens' forward/backward per sequence."},
    )
    refresh_method: Optional[str] = field(
        default=None,
        metadata={"help": "Feature refresh: 'shrink_perturb', 'relora', 'redo' or None (off)."},
    )
    refresh_every: int = field(default=200, metadata={"help": "Refresh every N optimizer steps."})
    refresh_shrink: float = field(
        default=0.9, metadata={"help": "shrink_perturb: α in θ ← α·θ + σ·rms(θ)·ε (1 = no shrink)."}
    )
    refresh_noise: float = field(
        default=0.01, metadata={"help": "shrink_perturb: σ in θ ← α·θ + σ·rms(θ)·ε (relative noise scale)."}
    )
    redo_threshold: float = field(
        default=0.1, metadata={"help": "redo: a unit is dormant when its mean |activation| / layer mean ≤ τ."}
    )
    relora_warmup_steps: int = field(
        default=0, metadata={"help": "relora: linear learning-rate re-warm-up over N steps after each refresh."}
    )
    metrics_every: int = field(
        default=0,
        metadata={"help": "Log effective rank / anisotropy of the tapped layers every N steps (0 = off)."},
    )

    def __post_init__(self) -> None:
        validate_supple_fields(self)
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # cooperative with TrainingArguments when mixed in
            parent()


def supple_field_names() -> list[str]:
    return [f.name for f in fields(SuppleConfig)]


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"SuppleConfig.{name}={value!r} is invalid: {allowed}.")


def _check_weight(cfg: Any, name: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _fail(name, v, "expected a number >= 0")
    if not math.isfinite(v) or v < 0:
        _fail(name, v, "expected a finite number >= 0 (0 turns the term off)")


def _check_number(cfg: Any, name: str, positive: bool) -> None:
    v = getattr(cfg, name)
    bound = "> 0" if positive else ">= 0"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        _fail(name, v, f"expected a finite number {bound}")


def _check_int(cfg: Any, name: str, minimum: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(name, v, f"expected an integer >= {minimum}")
    if v < minimum:
        _fail(name, v, f"expected an integer >= {minimum}")


def validate_supple_fields(cfg: Any) -> None:
    """Validate the supple fields of `cfg` (a SuppleConfig or a TRL config that mixes it in)."""
    for name in ("diversity_weight", "decorrelation_weight", "decorrelation_cross_weight", "replay_weight"):
        _check_weight(cfg, name)
    if cfg.diversity_penalty not in DIVERSITY_PENALTIES:
        _fail("diversity_penalty", cfg.diversity_penalty, f"allowed values are {', '.join(DIVERSITY_PENALTIES)}")
    layers = cfg.diversity_layers
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = cfg.diversity_layers = [layers]
    if (
        not isinstance(layers, (list, tuple))
        or not layers
        or any(isinstance(i, bool) or not isinstance(i, int) for i in layers)
    ):
        _fail("diversity_layers", layers, "expected a non-empty list of decoder-block indices, e.g. [-1] or [15, -1]")
    if len(set(layers)) != len(layers):
        _fail("diversity_layers", layers, "indices must be distinct")
    cfg.diversity_layers = list(layers)
    _check_int(cfg, "diversity_max_tokens", 0)
    if cfg.diversity_max_tokens == 1:
        _fail("diversity_max_tokens", 1, "expected 0 (all tokens) or at least 2: a covariance needs two tokens")
    if not isinstance(cfg.diversity_normalize_tokens, bool):
        _fail("diversity_normalize_tokens", cfg.diversity_normalize_tokens, "expected True or False")
    _validate_anchor_fields(cfg)
    prev = cfg.previous_adapters
    if isinstance(prev, str):
        prev = cfg.previous_adapters = [prev]
    if prev is None:
        prev = cfg.previous_adapters = []
    if not isinstance(prev, (list, tuple)) or any(not isinstance(p, str) or not p for p in prev):
        _fail("previous_adapters", prev, "expected a list of paths to saved adapters or subspaces")
    cfg.previous_adapters = list(prev)
    _check_int(cfg, "previous_subspace_rank", 0)
    if cfg.replay_data is not None and (not isinstance(cfg.replay_data, str) or not cfg.replay_data):
        _fail("replay_data", cfg.replay_data, "expected a file path or 'builtin:pydoc'")
    _check_int(cfg, "replay_every", 1)
    _check_int(cfg, "replay_batch_size", 1)
    _check_int(cfg, "replay_max_length", 0)
    if cfg.replay_max_length == 1:
        _fail("replay_max_length", 1, "expected 0 (the trainer's max_length) or at least 2: a language-model loss "
              "needs two tokens")
    if cfg.refresh_method is not None and cfg.refresh_method not in REFRESH_METHODS:
        _fail("refresh_method", cfg.refresh_method, f"allowed values are {', '.join(REFRESH_METHODS)} or None")
    _check_int(cfg, "refresh_every", 1)
    _check_weight(cfg, "refresh_noise")
    _check_weight(cfg, "redo_threshold")
    _check_weight(cfg, "refresh_shrink")
    if cfg.refresh_shrink > 1:
        _fail("refresh_shrink", cfg.refresh_shrink, "expected 0 <= α <= 1")
    if cfg.redo_threshold >= 1:
        _fail("redo_threshold", cfg.redo_threshold, "expected 0 <= τ < 1 (a fraction of the layer's mean activation)")
    _check_int(cfg, "relora_warmup_steps", 0)
    if cfg.relora_warmup_steps >= cfg.refresh_every:
        _fail("relora_warmup_steps", cfg.relora_warmup_steps, "expected fewer steps than refresh_every")
    _check_int(cfg, "metrics_every", 0)


def _validate_anchor_fields(cfg: Any) -> None:
    """The reference-anchored diversity term and its automatic weight (docs/design.md)."""
    if cfg.diversity_reference not in DIVERSITY_REFERENCES:
        _fail("diversity_reference", cfg.diversity_reference,
              f"allowed values are {', '.join(repr(v) for v in DIVERSITY_REFERENCES)}")
    _check_number(cfg, "diversity_tolerance", positive=False)
    _check_int(cfg, "diversity_reference_batches", 0)
    if cfg.diversity_weight_schedule not in WEIGHT_SCHEDULES:
        _fail("diversity_weight_schedule", cfg.diversity_weight_schedule,
              f"allowed values are {', '.join(repr(v) for v in WEIGHT_SCHEDULES)}")
    for name in ("diversity_weight_min", "diversity_weight_max", "diversity_weight_rate"):
        _check_number(cfg, name, positive=True)
    if cfg.diversity_weight_schedule != "auto":
        return
    if cfg.diversity_reference != "pre_stage":
        _fail("diversity_weight_schedule", "auto", "it holds the penalty at the pre-stage reference, so it needs "
              "diversity_reference='pre_stage' (or use diversity_weight_schedule='fixed')")
    lo, hi, w = cfg.diversity_weight_min, cfg.diversity_weight_max, cfg.diversity_weight
    if lo > hi:
        _fail("diversity_weight_min", lo, f"expected diversity_weight_min <= diversity_weight_max (= {hi})")
    if not lo <= w <= hi:
        _fail("diversity_weight", w, f"with diversity_weight_schedule='auto' it is the starting λ: expected "
              f"diversity_weight_min (= {lo}) <= diversity_weight <= diversity_weight_max (= {hi}); change "
              "diversity_weight or the bounds")


def extract_supple_config(obj: Any) -> SuppleConfig:
    """Build a SuppleConfig from any object carrying the supple fields (e.g. a mixed-in TRL config)."""
    if isinstance(obj, SuppleConfig) and type(obj) is SuppleConfig:
        return obj
    names = supple_field_names()
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        raise ValueError(
            "SuppleCallback() without a config reads its settings from the trainer's args, but "
            f"{type(obj).__name__} has no supple fields (missing: {', '.join(missing[:4])}...). Either pass "
            "SuppleCallback(SuppleConfig(...)), or mix the fields into your config: "
            "`@dataclass class MyConfig(SuppleConfig, SFTConfig): pass`."
        )
    return SuppleConfig(**{n: getattr(obj, n) for n in names})
