"""The sequential post-training testbed: base → stage 1 → stage 2 → ..., baseline vs supple.

Each run takes one model through a list of post-training stages (default ``sft,dpo,sft2``: SFT on domain A,
DPO on domain-A preferences, SFT on a second narrow domain), as LoRA stages merged before the next stage or as
full fine-tuning, once per *arm* (``baseline``; ``supple``: the same training with :class:`SuppleCallback`) and
training seed. The arms of one seed see the same data, initial adapters and data order.

After the base model and after every stage it measures (``evaluate``):

- geometry of the last decoder block's output on general text (``builtin:pydoc``), through
  :mod:`supple.measure`: effective rank and anisotropy without the attention-sink position (raw and
  unit-normalized token vectors), plus the general-text next-token loss;
- the plasticity probe (:func:`supple.measure.plasticity_probe`): a fresh LoRA trained a fixed number of steps
  on a held-out task family (``number_words``): start loss, final loss, improvement, area;
- held-out accuracy (greedy generation checked by the family's ``check_answer``), answer-token loss and ECE
  (teacher-forced) on every stage's task family (forgetting) and on an out-of-domain family (``knowledge``).

Stage kinds are a registry (``register_stage_kind``): a kind is a function that trains a model on a
``StageContext`` with a TRL trainer and returns a ``StageOutcome``; the pipeline handles LoRA merging, the
supple arm's callback, measurements and reporting. An outcome-reward stage (GRPO) is one more registration.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from . import tasks as T

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
    """DPO on preference pairs: the checked answer is chosen, a plausibly wrong answer rejected."""
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
    return StageOutcome(model, hist, _final_means(hist, ("loss", "rewards/accuracies", "rewards/margins")))


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
def supple_arm_config(
    stage_index: int,
    previous_adapters: Sequence[str],
    lora: bool,
    overrides: dict | None = None,
    previous_subspaces: bool = False,
) -> tuple[Any, list[str]]:
    """The supple arm's :class:`SuppleConfig` for one stage, and notes on what was left out and why.

    ``previous_adapters``: earlier stages' adapter paths; ``previous_subspaces``: True when earlier stages'
    subspaces are handed to the callback as objects instead. With neither, the cross-stage term is off.
    """
    from supple import SuppleConfig

    kw = {**SUPPLE_ARM_DEFAULTS, **(overrides or {})}
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


# ------------------------------------------------------------------------------------------------ models
def load_testbed_model(spec: str):
    """``(model, tokenizer, name)`` for ``embedded``, ``tiny`` or a local Hugging Face model directory."""
    if spec == "tiny":
        from .tiny import make_tiny_model

        model, tok = make_tiny_model()
        return model, tok, "tiny"
    if spec == "embedded":
        from .embedded import load_embedded_model

        model, tok = load_embedded_model()
        return model, tok, "SmolLM2-135M-Instruct"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(spec):
        raise FileNotFoundError(f"--model {spec!r} is neither 'embedded', 'tiny' nor a local model directory")
    tok = AutoTokenizer.from_pretrained(spec)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        from .tiny import CHAT_TEMPLATE

        tok.chat_template = CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
    return model, tok, os.path.basename(os.path.normpath(spec))


# ------------------------------------------------------------------------------------------- evaluation
def probe_texts(family: str, n_train: int, n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """Plain-text items "QUESTION\\nAnswer: ANSWER" of the probe family (held-out eval, seeded train)."""
    fam = T.get_family(family)

    def fmt(ex):
        return f"{ex.question}\nAnswer: {ex.answer}"

    return [fmt(e) for e in fam.train_examples(n_train, seed, split="probe")], [fmt(e) for e in fam.eval_examples(n_eval)]


def _render(tok, msgs, add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def task_metrics(model, tok, family: str, n: int, batch_size: int = 16, max_length: int = 128) -> dict:
    """Held-out accuracy (greedy generation, checked), answer-token loss and ECE (teacher-forced) of a family."""
    import torch
    from transformers import GenerationConfig

    from supple.measure.calibration import expected_calibration_error, next_token_stats

    fam = T.get_family(family)
    examples = fam.eval_examples(n)
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [_render(tok, T.prompt_messages(ex), True) for ex in examples]
    fulls = [
        _render(tok, [*T.prompt_messages(ex), {"role": "assistant", "content": ex.answer}], False) for ex in examples
    ]
    was_training = model.training
    model.eval()
    conf, corr, nll = [], [], []
    outputs: list[str] = []
    try:
        with torch.inference_mode():
            # teacher-forced answer tokens
            seqs = []
            for p, f in zip(prompts, fulls):
                p_ids, f_ids = _encode(tok, p), _encode(tok, f)
                if f_ids[: len(p_ids)] != p_ids:  # template does not extend the prompt: tokenize the answer alone
                    f_ids = p_ids + _encode(tok, f[len(p) :] if f.startswith(p) else "")
                seqs.append((f_ids[:max_length], min(len(p_ids), max_length)))
            for i in range(0, len(seqs), batch_size):
                chunk = seqs[i : i + batch_size]
                width = max(len(s) for s, _ in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                tgt_mask = torch.zeros_like(ids, dtype=torch.bool)
                for j, (s, plen) in enumerate(chunk):
                    ids[j, : len(s)] = torch.tensor(s)
                    mask[j, : len(s)] = 1
                    tgt_mask[j, plen : len(s)] = True
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                pos = tgt_mask[:, 1:].to(device)  # predicting token t+1 from position t
                st = next_token_stats(logits[:, :-1][pos], ids[:, 1:].to(device)[pos])
                conf.append(st["confidence"].cpu())
                corr.append(st["correct"].cpu())
                nll.append(st["nll"].cpu())
            # greedy generation, checked
            gen_cfg = GenerationConfig(
                max_new_tokens=fam.max_new_tokens, do_sample=False, pad_token_id=pad,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
            )
            side = tok.padding_side
            tok.padding_side = "left"
            try:
                for i in range(0, len(prompts), batch_size):
                    enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
                    enc = {k: v.to(device) for k, v in enc.items()}
                    out = model.generate(**enc, generation_config=gen_cfg)
                    new = out[:, enc["input_ids"].shape[1] :]
                    outputs += tok.batch_decode(new, skip_special_tokens=True)
            finally:
                tok.padding_side = side
    finally:
        model.train(was_training)
    correct = [fam.check_answer(ex, o) for ex, o in zip(examples, outputs)]
    conf_t, corr_t, nll_t = torch.cat(conf), torch.cat(corr), torch.cat(nll)
    return {
        "family": family,
        "n": len(examples),
        "acc": sum(correct) / max(len(correct), 1),
        "answer_ce": float(nll_t.double().mean()) if nll_t.numel() else float("nan"),
        "token_acc": float(corr_t.double().mean()) if corr_t.numel() else float("nan"),
        "ece": float(expected_calibration_error(conf_t, corr_t)),
        "examples": [{"q": ex.question, "gold": ex.answer, "out": o} for ex, o in list(zip(examples, outputs))[:3]],
        "_conf": conf_t,
        "_corr": corr_t,
    }


_GEOMETRY_KEYS = {
    # table key: (metric, tokens, space)
    "erank": ("erank", "no_sink", "raw"),
    "anisotropy": ("anisotropy", "no_sink", "raw"),
    "erank_unit": ("erank", "no_sink", "unit"),
    "anisotropy_unit": ("anisotropy", "no_sink", "unit"),
    "participation_ratio": ("participation_ratio", "no_sink", "raw"),
    "participation_ratio_unit": ("participation_ratio", "no_sink", "unit"),
    "erank_all": ("erank", "all", "raw"),
    "top_pc_share": ("top_pc_share", "no_sink", "raw"),
}


def geometry_metrics(model, tok, texts: Sequence[str], max_tokens: int, max_length: int, name: str) -> dict:
    """Last-block geometry (supple.measure) on general text, and the next-token loss there."""
    from supple.measure.core import collect, geometry_records, logits_records

    run = collect(
        model, tok, texts, name=name, max_tokens=max_tokens, max_length=max_length, layers=[-1],
        logit_lens=False, progress=False,
    )
    rows = geometry_records(run) + logits_records(run)
    out: dict[str, Any] = {"layer": run.layers[0], "n_tokens": int(run.first.numel())}
    for key, (metric, tokens, space) in _GEOMETRY_KEYS.items():
        for r in rows:
            if r["group"] == "geometry" and r["metric"] == metric and r["tokens"] == tokens and r["space"] == space:
                out[key] = r["value"]
    for r in rows:
        if r["group"] == "logits" and r["metric"] in ("nll", "ece"):
            out[f"general_{r['metric']}"] = r["value"]
    out["records"] = rows
    return out


@dataclass
class EvalPlan:
    families: list[str]  # in-domain families (every stage's), then the OOD family last
    ood: str
    probe_family: str
    geometry_texts: list[str]


def evaluate(model, tok, plan: EvalPlan, budget: Budget, seed: int, name: str, parts=("geometry", "tasks", "probe"),
             tick: Callable[[int], None] | None = None) -> dict:
    """Measure one model (see the module doc). ``parts`` selects what to run; ``tick(n)`` reports progress."""
    import torch

    from supple.measure.calibration import expected_calibration_error
    from supple.measure.probe import plasticity_probe

    tick = tick or (lambda n: None)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    if "geometry" in parts:
        out["geometry"] = geometry_metrics(model, tok, plan.geometry_texts, budget.geometry_tokens, 256, name)
        tick(1)
    if "tasks" in parts:
        tasks, confs, corrs = {}, [], []
        for fam in plan.families:
            m = task_metrics(model, tok, fam, budget.n_eval, budget.eval_batch, budget.max_length)
            c, k = m.pop("_conf"), m.pop("_corr")
            if fam != plan.ood:
                confs.append(c)
                corrs.append(k)
            tasks[fam] = m
            tick(1)
        out["tasks"] = tasks
        out["ece"] = float(expected_calibration_error(torch.cat(confs), torch.cat(corrs))) if confs else float("nan")
    if "probe" in parts:
        train, held = probe_texts(plan.probe_family, budget.probe_steps * budget.probe_batch, budget.probe_eval, seed)
        res = plasticity_probe(
            model, tok, train, held, steps=budget.probe_steps, lr=budget.probe_lr, rank=budget.probe_rank,
            alpha=2.0 * budget.probe_rank, batch_size=budget.probe_batch, seed=seed,
            eval_every=budget.probe_eval_every, name=name, progress=False,
        )
        out["probe"] = {k: res[k] for k in ("start_loss", "final_loss", "improvement", "relative_improvement",
                                            "area", "train_area", "eval_steps", "eval_loss", "train_loss")}
        tick(budget.probe_steps)
    out["eval_s"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------------- the run
@dataclass
class DemoConfig:
    model: str = "embedded"
    budget: Budget = field(default_factory=Budget)
    stages: str = "sft,dpo,sft2"
    seeds: Sequence[int] = (0, 1)
    arms: Sequence[str] = ARMS
    lora: bool = True
    supple_overrides: dict = field(default_factory=dict)
    out: str | None = "supple-demo"
    progress: bool = True
    keep_workdir: bool = False
    command: str | None = None
    threads: int | None = None  # torch CPU threads; None = auto_threads() (1 for the tiny model)


def auto_threads() -> int:
    """CPU threads for torch: the cores not already busy (1-minute load average), at least 1.

    On a shared machine, more OpenMP threads than idle cores makes every step many times slower (measured
    on 2 shared cores: a SmolLM2 LoRA step took 9-34 s with 2 threads, 1.8 s with 1).
    """
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(torch.get_num_threads(), cores, int(cores - busy + 0.5)))


def _eval_units(budget: Budget, plan: EvalPlan) -> int:
    return 1 + len(plan.families) + budget.probe_steps


def _progress_callback(bar):
    from transformers import TrainerCallback

    class _Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            bar.update(1)
            return control

    return _Tick()


@contextlib.contextmanager
def _quiet():
    """Silence transformers/TRL/datasets chatter during a demo run (restored afterwards)."""
    import datasets
    import transformers

    verb = transformers.logging.get_verbosity()
    bars = datasets.utils.logging.is_progress_bar_enabled()
    tbars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verb)
        if tbars:
            transformers.utils.logging.enable_progress_bar()
        if bars:
            datasets.utils.logging.enable_progress_bar()


def _strip_records(ev: dict) -> dict:
    """An evaluation without the bulky tidy measurement rows (kept separately)."""
    ev = dict(ev)
    if "geometry" in ev:
        ev["geometry"] = {k: v for k, v in ev["geometry"].items() if k != "records"}
    return ev


def run_demo(cfg: DemoConfig) -> dict:
    """Run every (seed, arm) through the stages; returns the results dict (also written to ``cfg.out``)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import set_seed

    from supple.measure.corpus import load_builtin_corpus

    t_start = time.perf_counter()
    budget = cfg.budget
    stages = parse_stages(cfg.stages, budget, cfg.lora)
    arms = list(cfg.arms)
    for a in arms:
        if a not in ARMS:
            raise ValueError(f"unknown arm {a!r}: use {', '.join(ARMS)}")
    notes: list[str] = []
    callback_cls = _supple_callback_class()
    if "supple" in arms and callback_cls is None:
        arms.remove("supple")
        notes.append("supple arm skipped: supple.SuppleCallback is not available in this installation")
    if "supple" in arms:  # fail early on bad overrides
        supple_arm_config(1, ["x"], cfg.lora, cfg.supple_overrides)

    fams = list(dict.fromkeys(s.family for s in stages))
    plan = EvalPlan(
        families=[*fams, T.ROLES["ood"]],
        ood=T.ROLES["ood"],
        probe_family=T.ROLES["probe"],
        geometry_texts=load_builtin_corpus("pydoc", max_chars=1200, limit=budget.geometry_texts),
    )
    threads = torch.get_num_threads()
    run_threads = cfg.threads or (1 if cfg.model == "tiny" else auto_threads())
    torch.set_num_threads(run_threads)
    t_load = time.perf_counter()
    with _quiet():
        base_model, tok, model_name = load_testbed_model(cfg.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base_model.to(device)
    load_s = time.perf_counter() - t_load

    arm_overrides = dict(cfg.supple_overrides)
    replay_note = None
    builtin_replay = "supple" in arms and {**SUPPLE_ARM_DEFAULTS, **arm_overrides}.get("replay_data") == "builtin:pydoc"
    units_eval = _eval_units(budget, plan)
    # base: geometry and tasks once (seed-independent), the probe per seed
    total = (1 + len(plan.families)) + len(cfg.seeds) * (
        budget.probe_steps + len(arms) * sum(s.steps + units_eval for s in stages)
    )
    bar = tqdm(total=total, desc="supple demo", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    workdir = tempfile.mkdtemp(prefix="supple-demo-")
    if builtin_replay:
        # replay builtin:pydoc without the paragraphs the general-text geometry is measured on (no leakage)
        corpus = load_builtin_corpus("pydoc")[len(plan.geometry_texts) :]
        arm_overrides["replay_data"] = os.path.join(workdir, "replay_pydoc.txt")
        with open(arm_overrides["replay_data"], "w", encoding="utf-8") as fh:
            fh.write("\n\n".join(corpus) + "\n")
        replay_note = (f"replay corpus: builtin:pydoc without its first {len(plan.geometry_texts)} paragraphs "
                       f"(the general-text measurement texts), {len(corpus)} paragraphs")
    records: list[dict] = []
    measure_rows: list[dict] = []
    supple_configs: dict[str, dict] = {}
    try:
        with _quiet():
            base_shared: dict | None = None
            for seed in cfg.seeds:
                bar.set_description(f"seed {seed} base")
                if base_shared is None:
                    base_shared = evaluate(base_model, tok, plan, budget, seed, "base", parts=("geometry", "tasks"),
                                           tick=bar.update)
                    measure_rows += [dict(r, model="base", seed=None, arm=None, stage="base")
                                     for r in base_shared["geometry"]["records"]]
                probe_ev = evaluate(base_model, tok, plan, budget, seed, "base", parts=("probe",), tick=bar.update)
                base_ev = {**_strip_records(base_shared), "probe": probe_ev["probe"],
                           "eval_s": base_shared["eval_s"] + probe_ev["eval_s"]}
                for arm in arms:
                    records.append(_record(seed, arm, 0, None, base_ev, None, model_name))
                for arm in arms:
                    model = copy.deepcopy(base_model)
                    subspaces: dict = {}  # earlier LoRA stages' input subspaces (supple arm)
                    for i, stage in enumerate(stages, start=1):
                        bar.set_description(f"seed {seed} {arm} {stage.name}")
                        callbacks = [_progress_callback(bar)]
                        stage_notes: list[str] = []
                        if arm == "supple":
                            scfg, stage_notes = supple_arm_config(i, [], cfg.lora, arm_overrides, bool(subspaces))
                            if replay_note and scfg.replay_data:
                                stage_notes.append(replay_note)
                            objs = {"previous_subspaces": subspaces} if scfg.decorrelation_cross_weight > 0 else {}
                            callbacks.append(callback_cls(scfg, **objs))
                            supple_configs[f"seed{seed}/{stage.name}"] = asdict(scfg)
                        run_seed = 1000 * seed + i  # the same for both arms
                        set_seed(run_seed)
                        ctx = StageContext(
                            model=model, tokenizer=tok, stage=stage, budget=budget, seed=run_seed, lora=cfg.lora,
                            callbacks=callbacks, output_dir=os.path.join(workdir, f"s{seed}-{arm}-{i}"),
                            data_seed=run_seed,
                        )
                        t0 = time.perf_counter()
                        outcome = STAGE_KINDS[stage.kind].run(ctx)
                        train_s = time.perf_counter() - t0
                        model = outcome.model
                        _unpatch_forward(model.get_base_model() if hasattr(model, "get_base_model") else model)
                        if cfg.lora:
                            if arm == "supple":  # this stage's update directions: the next stages' cross term
                                subspaces = lora_input_subspaces(model, subspaces)
                            model = model.merge_and_unload()
                        model.to(device)
                        ev = evaluate(model, tok, plan, budget, seed, f"{arm}/{stage.name}", tick=bar.update)
                        measure_rows += [dict(r, seed=seed, arm=arm, stage=stage.name)
                                         for r in ev["geometry"]["records"]]
                        train_info = {
                            "wall_s": train_s,
                            "steps": stage.steps,
                            "lr": stage.lr,
                            **outcome.metrics,
                            "log_history": outcome.log_history,
                            "notes": stage_notes,
                        }
                        records.append(_record(seed, arm, i, stage, _strip_records(ev), train_info, model_name))
                        for n in stage_notes:
                            if n not in notes:
                                notes.append(n)
                    del model
                    gc.collect()
    finally:
        bar.close()
        torch.set_num_threads(threads)
        if not cfg.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    _add_forgetting(records, stages)
    results = {
        "meta": {
            "model": model_name,
            "model_spec": cfg.model,
            "command": cfg.command,
            "budget": asdict(budget),
            "stages": [asdict(s) for s in stages],
            "seeds": list(cfg.seeds),
            "arms": arms,
            "lora": cfg.lora,
            "families": {"stages": fams, "ood": plan.ood, "probe": plan.probe_family},
            "supple_arm_defaults": SUPPLE_ARM_DEFAULTS,
            "supple_overrides": cfg.supple_overrides,
            "supple_configs": supple_configs,
            "notes": notes,
            "device": device,
            "torch_threads": run_threads,
            "load_s": load_s,
            "total_s": time.perf_counter() - t_start,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "versions": _versions(),
        },
        "records": records,
        "summary": summarize(records),
    }
    if cfg.out:
        from .report import write_outputs

        results["meta"]["files"] = write_outputs(results, measure_rows, cfg.out)
    return results


def _record(seed, arm, index, stage: Stage | None, ev: dict, train: dict | None, model_name: str) -> dict:
    return {
        "seed": seed,
        "arm": arm,
        "stage_index": index,
        "stage": stage.name if stage else "base",
        "kind": stage.kind if stage else None,
        "family": stage.family if stage else None,
        "model": model_name,
        **ev,
        "train": train,
    }


def _add_forgetting(records: list[dict], stages: list[Stage]) -> None:
    """Per record: for every family trained at an earlier stage (and not at this one), the accuracy drop and
    answer-loss rise since the last stage that trained it."""
    by_run: dict[tuple, dict[int, dict]] = {}
    for r in records:
        by_run.setdefault((r["seed"], r["arm"]), {})[r["stage_index"]] = r
    for run in by_run.values():
        for idx, r in run.items():
            forget = {}
            current = stages[idx - 1].family if idx else None
            last: dict[str, int] = {}
            for j, st in enumerate(stages[: max(idx - 1, 0)], start=1):
                last[st.family] = j
            for fam, j in last.items():
                then = run.get(j)
                if fam == current or then is None or fam not in r.get("tasks", {}):
                    continue
                forget[fam] = {
                    "acc_drop": then["tasks"][fam]["acc"] - r["tasks"][fam]["acc"],
                    "ce_rise": r["tasks"][fam]["answer_ce"] - then["tasks"][fam]["answer_ce"],
                    "since": stages[j - 1].name,
                }
            r["forgetting"] = forget


# ------------------------------------------------------------------------------------------------ summary
def flat_metrics(r: dict) -> dict[str, float]:
    """The scalar metrics of one record, flattened to ``name: value`` (what the table and plots use)."""
    out: dict[str, float] = {}
    g = r.get("geometry", {})
    for k in (*_GEOMETRY_KEYS, "general_nll"):
        if k in g:
            out[k] = g[k]
    p = r.get("probe", {})
    for k in ("start_loss", "final_loss", "improvement", "area"):
        if k in p:
            out[f"probe_{k}"] = p[k]
    for fam, m in r.get("tasks", {}).items():
        out[f"acc/{fam}"] = m["acc"]
        out[f"answer_ce/{fam}"] = m["answer_ce"]
        out[f"ece/{fam}"] = m["ece"]
    if "ece" in r:
        out["ece"] = r["ece"]
    for fam, f in r.get("forgetting", {}).items():
        out[f"forget_acc/{fam}"] = f["acc_drop"]
        out[f"forget_ce/{fam}"] = f["ce_rise"]
    out["eval_s"] = r.get("eval_s", float("nan"))
    t = r.get("train") or {}
    for k, v in t.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("steps",):
            out[f"train/{k}"] = float(v)
    return out


def summarize(records: list[dict]) -> list[dict]:
    """Mean, standard deviation (over seeds), min, max of every metric per (stage, arm), in stage order."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["stage_index"], r["stage"], r["arm"]), []).append(r)
    out = []
    for (idx, stage, arm), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], ARMS.index(kv[0][2]))):
        flats = [flat_metrics(r) for r in rs]
        keys = list(dict.fromkeys(k for f in flats for k in f))
        metrics = {}
        for k in keys:
            vals = [f[k] for f in flats if k in f and f[k] is not None and math.isfinite(f[k])]
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            metrics[k] = {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": len(vals)}
        out.append({"stage_index": idx, "stage": stage, "arm": arm, "seeds": [r["seed"] for r in rs],
                    "metrics": metrics})
    return out


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("supple", "torch", "transformers", "trl", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def budget_with(budget: Budget, **changes) -> Budget:
    """A copy of ``budget`` with fields replaced (``steps`` merged key by key)."""
    steps = changes.pop("steps", None)
    b = replace(budget, **changes)
    if steps:
        b = replace(b, steps={**budget.steps, **steps})
    return b


def save_json(obj: Any, path: str) -> None:
    def default(o):
        if hasattr(o, "item"):
            return o.item()
        return str(o)

    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, default=default, allow_nan=True)
