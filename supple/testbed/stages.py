"""Stage kinds of the testbed (a registry of functions that train a model with a TRL trainer), the supple
arm's callback configuration per stage and LoRA input subspaces for cross-stage decorrelation."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import tasks as T
from .preference import heldout_preference_metrics
from .settings import (
    _LORA_FIELDS,
    _REPLAY_FIELDS,
    ARM_TABLE,
    SUPPLE_ARM_DEFAULTS,
    Budget,
)


# -------------------------------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class Stage:
    name: str  # unique label in the table: "sft", "dpo", "sft2", "sft:sorting", ...
    kind: str  # a registered stage kind
    family: str  # task family trained on
    steps: int
    lr: float


@dataclass
class StageContext:
    """What a stage kind gets: the model to train (plain; the runner adds LoRA when ``lora``)."""

    model: Any
    tokenizer: Any
    stage: Stage
    budget: Budget
    seed: int
    lora: bool
    callbacks: list
    output_dir: str
    data_seed: int


@dataclass
class StageOutcome:
    model: Any  # the trained model (a PeftModel when ``lora``); the pipeline merges it
    log_history: list[dict]
    metrics: dict[str, float] = field(default_factory=dict)


StageRunner = Callable[[StageContext], StageOutcome]


@dataclass(frozen=True)
class StageKind:
    name: str
    run: StageRunner
    default_family: str = "domain_a"


STAGE_KINDS: dict[str, StageKind] = {}
# names in the stage list that stand for a kind on another family
STAGE_SHORTHANDS: dict[str, tuple[str, str]] = {"sft2": ("sft", "domain_b")}


def register_stage_kind(name: str, run: StageRunner, default_family: str = "domain_a") -> None:
    """Make ``name`` usable in ``--stages`` (``name`` or ``name:FAMILY``)."""
    STAGE_KINDS[name] = StageKind(name, run, default_family)


def parse_stages(spec: str | Sequence[str], budget: Budget, lora: bool = True) -> list[Stage]:
    """``"sft,dpo,sft2"`` → stages. Items: ``KIND``, ``KIND:FAMILY`` or a shorthand (``sft2``)."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise ValueError("no stages given")
    out: list[Stage] = []
    taken: set[str] = set()
    for item in items:
        head, _, fam = item.partition(":")
        kind, default_family = STAGE_SHORTHANDS.get(head, (head, None))
        if kind not in STAGE_KINDS:
            avail = sorted([*STAGE_KINDS, *STAGE_SHORTHANDS])
            raise ValueError(f"unknown stage {item!r}: available {', '.join(avail)} (or KIND:FAMILY)")
        family = T.get_family(fam or default_family or STAGE_KINDS[kind].default_family)
        if family.finite:
            raise ValueError(f"stage {item!r}: task family {family.name!r} is evaluation-only")
        name = item
        n = 2
        while name in taken:
            name, n = f"{item}#{n}", n + 1
        taken.add(name)
        steps_key = head if head in budget.steps else kind
        out.append(Stage(name, kind, family.name, budget.steps_for(steps_key, kind), budget.lr_for(kind, lora)))
    return out


def _training_args(config_cls, ctx: StageContext, **extra):
    import torch

    b = ctx.budget
    kw = dict(
        output_dir=ctx.output_dir,
        report_to=[],
        max_steps=ctx.stage.steps,
        per_device_train_batch_size=b.batch_size,
        gradient_accumulation_steps=b.grad_accum,
        learning_rate=ctx.stage.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        seed=ctx.seed,
        data_seed=ctx.seed,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_pin_memory=False,
        max_length=b.max_length,
    )
    kw.update(extra)
    import dataclasses

    known = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in kw.items() if k in known})


def _peft_config(ctx: StageContext):
    if not ctx.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=ctx.budget.lora_r,
        lora_alpha=ctx.budget.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def prepare_trainer(trainer):
    """Drop the trainer's own console output (the demo shows one progress bar); every stage kind calls this."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer


def _unpatch_forward(model) -> None:
    """Undo TRL's instance-level ``forward`` patch (``add_fused_lm_head``) so patches do not stack across stages."""
    fwd = model.__dict__.get("forward")
    fn = getattr(fwd, "__func__", fwd)
    if fwd is not None and getattr(getattr(fn, "__code__", None), "co_name", "") == "_fused_forward":
        del model.__dict__["forward"]


def _n_train(ctx: StageContext) -> int:
    return ctx.stage.steps * ctx.budget.batch_size * ctx.budget.grad_accum


def run_sft_stage(ctx: StageContext) -> StageOutcome:
    """Supervised fine-tuning on the family's checked answers (completion-only loss)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    fam = T.get_family(ctx.stage.family)
    data = Dataset.from_list(T.sft_records(fam.train_examples(_n_train(ctx), ctx.data_seed, split="sft")))
    args = _training_args(SFTConfig, ctx, completion_only_loss=True)
    trainer = SFTTrainer(
        model=ctx.model, args=args, train_dataset=data, processing_class=ctx.tokenizer,
        peft_config=_peft_config(ctx), callbacks=ctx.callbacks,
    )
    prepare_trainer(trainer).train()
    model, hist = trainer.model, list(trainer.state.log_history)
    del trainer
    return StageOutcome(model, hist, _final_means(hist, ("loss", "mean_token_accuracy")))


def run_dpo_stage(ctx: StageContext) -> StageOutcome:
    """DPO on preference pairs: the checked answer is chosen, a plausibly wrong answer rejected. Its metrics add
    the reward accuracy and margin on held-out pairs (``heldout/rewards/*``, preference.py)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    fam = T.get_family(ctx.stage.family)
    examples = fam.train_examples(_n_train(ctx), ctx.data_seed, split="dpo")
    data = Dataset.from_list(T.dpo_records(examples, ctx.data_seed))
    args = _training_args(DPOConfig, ctx, beta=ctx.budget.dpo_beta)
    # LoRA: the reference is the model with the adapter disabled. Full fine-tuning: a frozen copy of the model as
    # it enters this stage (TRL would otherwise reload the original checkpoint from its path).
    ref = None if ctx.lora else copy.deepcopy(ctx.model).eval().requires_grad_(False)
    trainer = DPOTrainer(
        model=ctx.model, ref_model=ref, args=args, train_dataset=data, processing_class=ctx.tokenizer,
        peft_config=_peft_config(ctx), callbacks=ctx.callbacks,
    )
    prepare_trainer(trainer).train()
    model, hist = trainer.model, list(trainer.state.log_history)
    del trainer
    metrics = _final_means(hist, ("loss", "rewards/accuracies", "rewards/margins"))
    # the same two quantities on held-out pairs (preference.py): the stage's quality on data it did not train on
    b = ctx.budget
    metrics.update(heldout_preference_metrics(model, ctx.tokenizer, ctx.stage.family, b.n_eval, b.dpo_beta,
                                              reference=ref, batch_size=b.eval_batch, max_length=b.max_length))
    del ref
    return StageOutcome(model, hist, metrics)


def run_grpo_stage(ctx: StageContext) -> StageOutcome:
    """Outcome-reward RL (GRPO): reward 1 for a checked-correct answer, else 0; 4 completions per prompt."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    fam = T.get_family(ctx.stage.family)
    examples = fam.train_examples(_n_train(ctx), ctx.data_seed, split="grpo")
    data = Dataset.from_list(T.rl_records(examples))
    gen_batch = ctx.budget.batch_size * ctx.budget.grad_accum
    n_gen = next((k for k in (4, 2) if gen_batch % k == 0), 0)
    if not n_gen:
        raise ValueError(f"grpo stage: batch_size × grad_accum = {gen_batch} must be even (completions per prompt).")
    args = _training_args(
        GRPOConfig, ctx, num_generations=n_gen, max_completion_length=16, beta=0.0, temperature=1.0,
    )
    trainer = GRPOTrainer(
        model=ctx.model, reward_funcs=T.reward_function(fam), args=args, train_dataset=data,
        processing_class=ctx.tokenizer, peft_config=_peft_config(ctx), callbacks=ctx.callbacks,
    )
    prepare_trainer(trainer).train()
    model, hist = trainer.model, list(trainer.state.log_history)
    del trainer
    return StageOutcome(model, hist, _final_means(hist, ("loss", "reward", "reward_std")))


register_stage_kind("sft", run_sft_stage, "domain_a")
register_stage_kind("dpo", run_dpo_stage, "domain_a")
register_stage_kind("grpo", run_grpo_stage, "domain_a")


def _final_means(hist: list[dict], keys: Sequence[str]) -> dict[str, float]:
    """Mean of each key over the last quarter of the logged training steps (and over all of them)."""
    out: dict[str, float] = {}
    rows = [h for h in hist if "loss" in h and "train_runtime" not in h]
    for key in list(keys) + sorted({k for h in rows for k in h if k.startswith("supple/")}):
        vals = [float(h[key]) for h in rows if key in h and isinstance(h[key], (int, float))]
        if not vals:
            continue
        tail = vals[-max(1, len(vals) // 4) :]
        out[f"{key}_final"] = sum(tail) / len(tail)
        out[f"{key}_mean"] = sum(vals) / len(vals)
    return out


# --------------------------------------------------------------------------------------------- supple arm
def overrides_for_stage(overrides: dict, stage: str, stages: Sequence[str] | None = None) -> dict:
    """The ``--supple`` overrides one stage sees: ``FIELD`` keys apply to every stage, ``STAGE:FIELD`` keys (e.g.
    ``dpo:replay_weight``) to that stage only and over the plain key, as each trainer of a pipeline gets its own
    callback. ``stages``: every stage name of the run, to refuse a ``STAGE:`` that names none of them."""
    plain = {k: v for k, v in overrides.items() if ":" not in k}
    scoped = {}
    for k, v in overrides.items():
        if ":" in k:
            name, _, fld = k.rpartition(":")
            if stages is not None and name not in stages:
                raise ValueError(f"--supple {k}: no stage {name!r} in this run (its stages: {', '.join(stages)}); "
                                 "write STAGE:FIELD=VALUE with one of them, or FIELD=VALUE for every stage")
            if name == stage:
                scoped[fld] = v
    return {**plain, **scoped}


def supple_arm_config(
    stage_index: int,
    previous_adapters: Sequence[str],
    lora: bool,
    overrides: dict | None = None,
    previous_subspaces: bool = False,
    base: dict | None = None,
) -> tuple[Any, list[str]]:
    """The supple arm's :class:`SuppleConfig` for one stage, and notes on what was left out and why.

    ``previous_adapters``: earlier stages' adapter paths; ``previous_subspaces``: True when earlier stages'
    subspaces are handed to the callback as objects instead. With neither, the cross-stage term is off.
    ``base``: the arm's fields (default :data:`SUPPLE_ARM_DEFAULTS`, the supple arm), ``overrides`` on top.
    """
    from supple import SuppleConfig

    kw = {**(SUPPLE_ARM_DEFAULTS if base is None else base), **(overrides or {})}
    notes: list[str] = []
    if not lora:
        if any(kw.get(k) for k in _LORA_FIELDS):
            notes.append("LoRA decorrelation terms off: full fine-tuning has no LoRA factors")
        for k in _LORA_FIELDS:
            kw[k] = 0.0
    kw["previous_adapters"] = list(previous_adapters)
    if not previous_adapters and not previous_subspaces and kw.get("decorrelation_cross_weight"):
        kw["decorrelation_cross_weight"] = 0.0  # the first LoRA stage has no earlier subspace
    if not kw.get("decorrelation_cross_weight"):
        kw["previous_adapters"] = []
    try:
        cfg = SuppleConfig(**kw)
    except NotImplementedError as exc:
        if kw.get("replay_data") is None:
            raise
        notes.append(f"replay left out ({exc.__class__.__name__}: not implemented in this version of supple)")
        for k in _REPLAY_FIELDS:
            kw.pop(k, None)
        cfg = SuppleConfig(**kw)
    return cfg, notes


def arm_stage_config(setup, arm_name: str, i: int, previous_subspaces: bool) -> tuple[Any, list[str]]:
    """The SuppleConfig arm ``arm_name`` trains stage ``i`` (1-based) with, and notes; ``(None, [])`` where it adds
    no supple callback there. ``setup``: the run's job setup (its stages, ``cfg.lora`` and the supple arm's
    overrides, whose ``_replay_file`` stands in for ``builtin:pydoc``, without the measurement paragraphs)."""
    arm = ARM_TABLE[arm_name]
    if arm.supple is None or (arm.last_stage_only and i < len(setup.stages)):
        return None, []
    replay_file = setup.arm_overrides.get("_replay_file")
    base = dict(arm.supple)
    overrides = {k: v for k, v in overrides_for_stage(setup.arm_overrides if arm_name == "supple" else {},
                                                      setup.stages[i - 1].name).items() if not k.startswith("_")}
    for fields in (base, overrides):  # the arm's builtin:pydoc and a --supple one alike, without leakage
        if fields.get("replay_data") == "builtin:pydoc" and replay_file:
            fields["replay_data"] = replay_file
    return supple_arm_config(i, [], setup.cfg.lora, overrides, previous_subspaces, base=base)


def wants_cross(setup, arm_name: str) -> bool:
    """Whether the arm uses cross-stage decorrelation (then every LoRA stage's update subspace is kept)."""
    base = ARM_TABLE[arm_name].supple or {}
    if arm_name != "supple":
        return bool(base.get("decorrelation_cross_weight"))
    return any({**base, **overrides_for_stage(setup.arm_overrides, s.name)}.get("decorrelation_cross_weight")
               for s in setup.stages)


def lora_input_subspaces(peft_model, previous: dict | None = None) -> dict:
    """Per LoRA module, an orthonormal basis (d_in × k) of the input directions of this stage's update
    ΔW = s·B·A (its right singular vectors), united with ``previous`` (earlier stages' bases).

    What ``SuppleConfig.previous_adapters`` computes from saved adapters, from the thin SVD of the factors
    (:func:`supple.regularizers.geometry.lora_delta_svd`), never forming ΔW; handed to the callback as
    ``SuppleCallback(previous_subspaces=...)``.
    """
    import torch

    from supple.measure.lora import lora_factors
    from supple.modeling import normalize_module_name
    from supple.regularizers.geometry import lora_delta_svd

    def basis(m: torch.Tensor) -> torch.Tensor:  # orthonormal basis of the columns with non-negligible weight
        u, sv, _ = torch.linalg.svd(m.double(), full_matrices=False)
        if sv.numel() == 0 or float(sv[0]) == 0.0:
            return m.new_zeros(m.shape[0], 0)
        return u[:, sv > 1e-6 * sv[0]].float().contiguous()

    out = {k: v for k, v in (previous or {}).items()}
    for name, f in lora_factors(peft_model).items():
        _, sv, vh = lora_delta_svd(f.a, f.b, f.scaling)
        if sv.numel() == 0 or float(sv[0]) == 0.0:
            continue
        v = vh[sv > 1e-6 * sv[0]].T
        key = normalize_module_name(name)
        out[key] = basis(torch.cat([out[key], v], dim=1)) if key in out else basis(v)
    return {k: v for k, v in out.items() if v.shape[1] > 0}


def _supple_callback_class():
    try:
        from supple import SuppleCallback
    except ImportError:
        return None
    return SuppleCallback
