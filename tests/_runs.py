"""Shared helpers: tiny SFT/DPO runs, and reference trainers that add supple's terms to the loss by hand.

The references are independent oracles: they find the decoder blocks, the real tokens, the token
subsample and the LoRA A matrices from the tiny Llama's structure and the documented spec
(docs/design.md), never through supple's block finder, token selector or LoRA walker.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from ._tiny import make_tiny_llama, make_tokenizer


def sft_dataset(n: int = 8) -> Dataset:
    rows = [{"text": f"{a} plus {b} is {a + b}. " * (1 + (a + b) % 3)} for a in range(4) for b in range(4)]
    return Dataset.from_list(rows[:n])


def dpo_dataset(n: int = 8) -> Dataset:
    rows = [
        {"prompt": f"what is {a}+{b}? ", "chosen": f"{a + b}", "rejected": f"{a + b + 1} or so"}
        for a in range(4)
        for b in range(4)
    ]
    return Dataset.from_list(rows[:n])


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0,
                      init_lora_weights="gaussian")


def hand_ipr(h: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """The ipr formula written directly with autograd ops (independent of supple's implementation)."""
    z = h.float()
    if normalize:
        z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-6)
    zc = z - z.mean(dim=0, keepdim=True)
    cov = zc.T @ zc
    return (cov * cov).sum() / (zc * zc).sum() ** 2


def hand_intra(a: torch.Tensor) -> torch.Tensor:
    ah = a / a.norm(dim=1, keepdim=True)
    g = ah @ ah.T
    r = a.shape[0]
    return ((g * g).sum() - (torch.diagonal(g) ** 2).sum()) / (r * (r - 1))


def hand_cross(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    ah = a / a.norm(dim=1, keepdim=True)
    return ((ah @ u) ** 2).sum() / a.shape[0]


def llama_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of the tiny Llama, plain (``model.model.layers``) or PEFT-wrapped."""
    lm = model.base_model.model if hasattr(model, "peft_config") else model
    return lm.model.layers


def lora_a_matrices(model) -> dict[str, torch.Tensor]:
    """``{base-model module name: A}`` of the default LoRA adapter, read off the PEFT modules directly."""
    out = {}
    for name, mod in model.named_modules():
        la = getattr(mod, "lora_A", None)
        if isinstance(la, torch.nn.ModuleDict) and "default" in la:
            out[name.removeprefix("base_model.model.")] = la["default"].weight
    return out


def spec_token_subsample(real: torch.Tensor, max_tokens: int, seed: int, step: int, micro: int, layer: int):
    """The documented subsample: a CPU generator seeded with blake2b("supple/seed/step/micro/layer"), a
    random permutation of the real-token positions, its first ``max_tokens`` kept in sequence order."""
    flat = real.reshape(-1).nonzero().flatten()
    if flat.numel() <= max_tokens:
        return flat
    digest = hashlib.blake2b(f"supple/{seed}/{step}/{micro}/{layer}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    keep = torch.randperm(flat.numel(), generator=gen)[:max_tokens]
    return flat[keep.sort().values]


def _blake2b_generator(label: str) -> torch.Generator:
    digest = hashlib.blake2b(label.encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@dataclass
class AnchorSpec:
    """The pre-stage reference as documented (docs/design.md): T = P_ref + tolerance·|P_ref| per block;
    ``batches`` > 0 measures P_ref at train begin on the seeded sample, 0 takes the first step's penalties (the term
    off on that step); ``rate`` set = the automatic weight λ ← clamp(λ·exp(rate·err), low, high)."""

    tolerance: float = 0.0
    batches: int = 4
    rate: float | None = None
    low: float = 1e-3
    high: float = 10.0


def spec_reference_batches(trainer, n: int, seed: int) -> list[dict]:
    """The documented reference sample of one process: batch j holds positions j·B … (j+1)·B − 1 of a permutation
    of the train dataset drawn with blake2b("supple/reference/{seed}") (wrapping around), collated by the
    trainer's collator after its unused-column removal."""
    ds = trainer._remove_unused_columns(trainer.train_dataset, description="spec")
    perm = torch.randperm(len(ds), generator=_blake2b_generator(f"supple/reference/{seed}"))
    b = trainer.args.per_device_train_batch_size
    return [trainer.data_collator([ds[int(perm[(j * b + k) % len(ds)])] for k in range(b)]) for j in range(n)]


def _loss_scale(trainer, num_items_in_batch) -> float:
    """Factor making an added term contribute term/GA per micro-batch, whatever the trainer does to the loss."""
    scaled = trainer.loss_is_scaled_for_ga
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            trainer.compute_loss_func is not None
        )
    return 1.0 / trainer.current_gradient_accumulation_steps if scaled else 1.0


def reference_class(base_cls, diversity_weight=0.0, layers=(-1,), intra_weight=0.0, cross_weight=0.0, bases=None,
                    max_tokens=0, anchor: AnchorSpec | None = None):
    """A subclass of ``base_cls`` whose compute_loss adds supple's terms to the loss by hand.

    With ``anchor`` the diversity term of a micro-batch is λ · mean over blocks of relu(P − T) (AnchorSpec); the
    λ used at each step is kept in ``weights``."""

    class Reference(base_cls):
        _micro_step = (-1, 0)

        def _anchor_update(self, model, blocks, idxs, step):
            """At a step's first micro-batch: the reference (train begin or after the first step) and λ."""
            st = self.__dict__.setdefault("_anchor", {"p_ref": None, "weight": diversity_weight, "values": {},
                                                      "first": None, "weights": []})
            if step == 0 and anchor.batches > 0:  # train begin: the weights are still the pre-stage ones
                per_batch, outs = [], {}
                handles = [blocks[k].register_forward_hook(
                    lambda mod, a, out, k=k: outs.__setitem__(k, out[0] if isinstance(out, tuple) else out))
                    for k in idxs]
                try:
                    for batch in spec_reference_batches(self, anchor.batches, self.args.seed):
                        with torch.no_grad():
                            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                        m = batch["attention_mask"].bool()
                        per_batch.append(torch.stack([hand_ipr(outs[k][m]) for k in idxs]))
                finally:
                    for h in handles:
                        h.remove()
                st["p_ref"] = torch.stack(per_batch).mean(0)
            elif step == 0:
                st["first"] = 0
            prev = st["values"].get(step - 1)
            if prev is not None and st["first"] == step - 1:
                st["p_ref"] = torch.stack(prev).mean(0)
            elif prev is not None and anchor.rate is not None:
                p_mean = torch.stack(prev).mean(0).double()
                p_ref = st["p_ref"].double()
                t = p_ref + anchor.tolerance * p_ref.abs()
                err = ((p_mean - t) / p_ref.abs()).clamp(-1, 1).mean()
                st["weight"] = min(max(st["weight"] * math.exp(anchor.rate * float(err)), anchor.low), anchor.high)
            st["weights"].append(st["weight"])
            return st

        @property
        def weights(self):
            return self._anchor["weights"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            step, micro = self._micro_step
            micro = micro + 1 if step == self.state.global_step else 0
            self._micro_step = (self.state.global_step, micro)
            captured = {}
            blocks = llama_layers(model)
            idxs = [k % len(blocks) for k in layers]
            if anchor is not None and micro == 0:
                self._anchor_update(model, blocks, idxs, self.state.global_step)
            handles = []
            for k in idxs:
                def hook(mod, args, out, k=k):
                    if torch.is_grad_enabled() and k not in captured:
                        captured[k] = out[0] if isinstance(out, tuple) else out
                handles.append(blocks[k].register_forward_hook(hook))
            try:
                res = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                for h in handles:
                    h.remove()
            loss = res[0] if isinstance(res, tuple) else res
            c = _loss_scale(self, num_items_in_batch)
            extra = loss.new_zeros(())
            if diversity_weight:
                mask = inputs.get("attention_mask")
                if mask is None and "prompt_mask" in inputs:  # GRPO: prompt + completion
                    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
                pens = []
                for k in idxs:
                    h = captured[k]
                    m = mask.bool() if mask is not None else torch.ones(h.shape[:2], dtype=torch.bool)
                    if max_tokens:
                        idx = spec_token_subsample(m, max_tokens, self.args.seed, self.state.global_step, micro, k)
                        pens.append(hand_ipr(h.reshape(-1, h.shape[-1])[idx]))
                    else:
                        pens.append(hand_ipr(h[m]))
                if anchor is None:
                    extra = extra + diversity_weight * torch.stack(pens).mean()
                else:
                    st = self._anchor
                    st["values"].setdefault(self.state.global_step, []).append(torch.stack(pens).detach())
                    if st["p_ref"] is not None and st["first"] != self.state.global_step:
                        t = st["p_ref"] + anchor.tolerance * st["p_ref"].abs()
                        extra = extra + st["weight"] * torch.relu(torch.stack(pens) - t).mean()
            if intra_weight or cross_weight:
                mods = lora_a_matrices(model)
                if intra_weight:
                    extra = extra + intra_weight * torch.stack([hand_intra(a) for a in mods.values()]).mean()
                if cross_weight:
                    vals = [hand_cross(a, bases[n]) for n, a in mods.items() if n in bases]
                    extra = extra + cross_weight * torch.stack(vals).mean()
            loss = loss + c * extra
            return (loss, res[1]) if isinstance(res, tuple) else loss

    return Reference


def run(kind="sft", trainer_cls=None, callbacks=(), lora=True, ga=1, ckpt=False, steps=2, seed=0, out=None,
        extra_args=None, model=None, resume=None):
    """Train a tiny Llama for ``steps`` optimizer steps with SGD (resuming from the checkpoint ``resume`` if
    given); returns the trainer."""
    tok = make_tokenizer()
    model = model if model is not None else make_tiny_llama(tok, seed=seed)
    common = dict(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, gradient_accumulation_steps=ga,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to=[], logging_steps=1,
        use_cpu=True, seed=seed, data_seed=seed, max_length=48, save_strategy="no", gradient_checkpointing=ckpt,
        max_grad_norm=1e9, disable_tqdm=True, dataloader_num_workers=0, bf16=False,
    )
    common.update(extra_args or {})
    peft_config = lora_config() if lora else None
    if kind == "sft":
        cls = trainer_cls or SFTTrainer
        args = SFTConfig(**common)
        tr = cls(model=model, args=args, train_dataset=sft_dataset(), processing_class=tok,
                 peft_config=peft_config, callbacks=list(callbacks))
    else:
        cls = trainer_cls or DPOTrainer
        args = DPOConfig(**common, beta=0.5)
        ref = None if lora else copy.deepcopy(model)
        tr = cls(model=model, ref_model=ref, args=args, train_dataset=dpo_dataset(), processing_class=tok,
                 peft_config=peft_config, callbacks=list(callbacks))
    tr.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    return tr


def bare_taps(weight: float, coeff: float = 1.0, mask: torch.Tensor | None = None, layers=(0,)):
    """DiversityTaps on a tiny Llama, wired to a stand-in context (step 0, micro 0) instead of a trainer."""
    from types import SimpleNamespace

    from supple.callbacks.diversity import DiversityTaps

    taps = DiversityTaps("ipr", weight, list(layers), 0, True, 0, make_tiny_llama())
    taps.ctx = SimpleNamespace(step_key=lambda: (0, 0), rng_key=lambda: (0, 0, 0), micro_coeff=lambda: coeff,
                               abort=None)
    taps._masks = SimpleNamespace(current=lambda: (mask, True))
    return taps


def trainable_state(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_params_close(a: dict, b: dict, rtol=1e-5, atol=1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
