"""LoRA update decorrelation: gradients of the intra- and cross-stage penalties added to LoRA A.

Modules are grouped by the shape of their A matrix; each group is one batched computation
(:func:`supple.regularizers.lora_penalties`), not a Python loop over modules. The gradient
λ·∂D/∂A (times the GradScaler scale) is added to ``A.grad`` at the start of each optimizer step's
accumulation window, so it is clipped and stepped together with the task gradient, exactly once per
optimizer step.

:class:`DecorrelationPart` is the callback part (docs/design.md, "LoRA decorrelation"): it validates the
model and the earlier stages' subspaces when built, and adds the gradients at each ``on_step_begin``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..modeling import LoraModuleRef, LoraScan, find_lora_modules, scan_lora_modules
from ..regularizers.lora import lora_penalties
from .context import TrainingContext
from .distributed import add_to_grad_, gather_stack, placement_key

# A fresh adapter whose A rows already lie this much inside an earlier stage's subspace (mean ‖ÂU‖²/r) did
# not start from a new random direction: random rows in d_in dimensions overlap k/d_in on average.
START_OVERLAP_WARNING = 0.5


@dataclass
class _Group:
    params: list[torch.nn.Parameter]
    bases: torch.Tensor | None  # (M, d_in, k) or None
    has_basis: torch.Tensor  # (M,) bool
    stack: torch.Tensor | None = None  # (M, r, d_in) buffer the A matrices are copied into each step
    sharded: bool = False  # FSDP2: the A matrices are DTensors sharded alike; gathered once per step

    def stacked(self) -> torch.Tensor:
        """The group's A matrices copied into one reused (M, r, d_in) leaf tensor (no autograd link to them).

        Reusing the buffer matters on CPU: a fresh 50 MB tensor per step is a fresh mmap, page-faulted in.
        Sharded A matrices are gathered whole with one all-gather for the group (M · r · d_in values).
        """
        with torch.no_grad():
            if self.sharded:
                return gather_stack(self.params)
            if self.stack is None:
                self.stack = torch.empty((len(self.params), *self.params[0].shape), dtype=self.params[0].dtype,
                                         device=self.params[0].device)
            torch.stack([p.detach() for p in self.params], out=self.stack)
        return self.stack


class LoraDecorrelation:
    """The decorrelation math on one model's LoRA A matrices, grouped by shape (no hooks, no trainer)."""

    def __init__(self, intra_weight: float, cross_weight: float) -> None:
        self.intra_weight = float(intra_weight)
        self.cross_weight = float(cross_weight)
        self.groups: list[_Group] = []
        self.modules: list[LoraModuleRef] = []
        self.num_modules = 0
        self.num_with_basis = 0
        self.values: list[tuple[float, float | None]] = []

    def setup(self, model: torch.nn.Module, bases: dict[str, torch.Tensor] | None,
              refs: list[LoraModuleRef] | None = None) -> None:
        """Group the trainable LoRA A matrices of ``model`` (or ``refs``) and their earlier-stage bases."""
        refs = find_lora_modules(model) if refs is None else refs
        if not refs:
            raise ValueError(
                "SuppleConfig.decorrelation_weight/decorrelation_cross_weight > 0 need a PEFT LoRA model, but "
                "the model has no LoRA modules. Pass `peft_config=LoraConfig(...)` to the trainer (or a "
                "PeftModel), or set both weights to 0."
            )
        refs = [r for r in refs if r.lora_a.requires_grad]
        self.modules = refs
        bases = bases or {}
        if self.cross_weight > 0 and bases:
            for r in refs:
                u = bases.get(r.name)
                if u is not None and u.shape[0] != r.lora_a.shape[1]:
                    raise ValueError(
                        f"SuppleConfig.previous_adapters: module {r.name!r} has input size {r.lora_a.shape[1]} "
                        f"but the previous stage's subspace has {u.shape[0]}: the adapters come from different models."
                    )
            if not any(r.name in bases for r in refs):
                some = ", ".join(sorted(bases)[:3])
                raise ValueError(
                    "SuppleConfig.previous_adapters: none of the current LoRA modules appears in the previous "
                    f"stages' subspaces (e.g. {some}); check that they were trained on the same base model."
                )
        by_shape: dict[tuple[int, ...], list[LoraModuleRef]] = {}
        for r in refs:
            key = (tuple(r.lora_a.shape), r.lora_a.device, r.lora_a.dtype, placement_key(r.lora_a))
            by_shape.setdefault(key, []).append(r)
        self.groups = []
        self.num_with_basis = 0
        for (shape, device, _, placed), members in by_shape.items():
            d_in = shape[1]
            group_bases = None
            has = torch.tensor([m.name in bases for m in members])
            if self.cross_weight > 0 and bool(has.any()):
                k = max(bases[m.name].shape[1] for m in members if m.name in bases)
                group_bases = torch.zeros(len(members), d_in, k)
                for i, m in enumerate(members):
                    if m.name in bases:
                        u = bases[m.name]
                        group_bases[i, :, : u.shape[1]] = u
                group_bases = group_bases.to(device)
                self.num_with_basis += int(has.sum())
            self.groups.append(_Group([m.lora_a for m in members], group_bases, has, sharded=placed is not None))
        self.num_modules = len(refs)

    @torch.no_grad()
    def measure(self) -> tuple[float, float | None]:
        """Current (mean intra, mean cross) without touching gradients."""
        intra_sum, cross_sum = 0.0, 0.0
        for g in self.groups:
            intra, cross = lora_penalties(g.stacked(), g.bases)
            intra_sum += float(intra.sum())
            if cross is not None:
                cross_sum += float(cross[g.has_basis.to(cross.device)].sum())
        cross_mean = cross_sum / self.num_with_basis if self.num_with_basis else None
        return intra_sum / max(self.num_modules, 1), cross_mean

    def add_gradients(self, scale: float = 1.0) -> tuple[float, float | None, bool]:
        """Add ``scale · ∂(λ·intra + λc·cross)/∂A`` into every A's ``.grad``.

        Returns (mean intra, mean cross or None, applied). A non-finite gradient is not applied.
        """
        stacks, total, intra_sums, cross_sums = [], None, [], []
        with torch.enable_grad():
            for g in self.groups:
                stack = g.stacked().requires_grad_(True)
                intra, cross = lora_penalties(stack, g.bases)
                term = self.intra_weight * intra.sum() / self.num_modules
                intra_sums.append(intra.detach().sum())
                if cross is not None and self.cross_weight > 0:
                    masked = cross * g.has_basis.to(cross.device)
                    term = term + self.cross_weight * masked.sum() / max(self.num_with_basis, 1)
                    cross_sums.append(masked.detach().sum())
                total = term if total is None else total + term.to(total.device)
                stacks.append(stack)
            grads = torch.autograd.grad(total, stacks)  # one (M, r, d_in) gradient per group
        # One device-to-host copy for the logged values and the finiteness check of all modules. A sum is
        # non-finite iff some element is (barring overflow of ~1e38 sums): one read of each gradient, where
        # torch.isfinite(x).all() makes four full-size passes.
        dev = total.device
        stats = torch.stack([
            torch.stack([x.to(dev) for x in intra_sums]).sum(),
            torch.stack([x.to(dev) for x in cross_sums]).sum() if cross_sums else torch.zeros((), device=dev),
            torch.stack([gr.sum(dtype=torch.float32).to(dev) for gr in grads]).sum(),
        ]).cpu()
        intra_total, cross_total, grad_total = (float(v) for v in stats)
        finite = math.isfinite(grad_total)
        if finite:
            for g, gr in zip(self.groups, grads):
                rows = list(gr.unbind(0))
                if g.sharded:  # every rank holds the whole gradient: each adds its own chunk
                    for p, row in zip(g.params, rows):
                        add_to_grad_(p, row, scale)
                    continue
                with_grad = [i for i, p in enumerate(g.params) if p.grad is not None]
                if with_grad:
                    torch._foreach_add_([g.params[i].grad for i in with_grad], [rows[i] for i in with_grad],
                                        alpha=scale)
                without = [i for i, p in enumerate(g.params) if p.grad is None]
                if without:  # fresh tensors: a view into the shared gradient would tie the modules' .grad together
                    for i, new in zip(without, torch._foreach_mul([rows[i] for i in without], scale)):
                        g.params[i].grad = new
        intra_mean = intra_total / self.num_modules
        cross_mean = cross_total / self.num_with_basis if self.num_with_basis else None
        return intra_mean, cross_mean, finite


class DecorrelationPart:
    """The LoRA-decorrelation part of SuppleCallback: validated when built, applied once per optimizer step.

    Args:
        intra_weight, cross_weight: ``decorrelation_weight`` and ``decorrelation_cross_weight``.
        model: the training model (a PEFT LoRA model).
        bases: earlier stages' input subspaces ``{module name: U (d_in × k)}`` (empty without a cross term).

    Raises ValueError for models without linear LoRA layers and for AdaLoRA; LoRA on embeddings or
    convolutions is left out of the term and reported with a warning.
    """

    def __init__(self, intra_weight: float, cross_weight: float, model: torch.nn.Module,
                 bases: dict[str, torch.Tensor], scan: LoraScan | None = None) -> None:
        scan = scan if scan is not None else scan_lora_modules(model)
        refuse_unsupported_lora(scan, "LoRA decorrelation (decorrelation_weight / decorrelation_cross_weight)",
                                "set decorrelation_weight and decorrelation_cross_weight to 0")
        self.term = LoraDecorrelation(intra_weight, cross_weight)
        self.term.setup(model, bases, scan.linear)
        self.ctx: TrainingContext | None = None
        self.skipped = 0
        self._log: list[tuple[float, float | None]] = []
        if cross_weight > 0 and self.term.num_with_basis:
            _, start = self.term.measure()
            if start is not None and start >= START_OVERLAP_WARNING:
                warnings.warn(
                    f"supple: the new LoRA adapter starts inside an earlier stage's subspace (cross overlap "
                    f"{start:.2f} at step 0, where a random start gives about k/d_in). PEFT initializes LoRA A "
                    "from the random seed, so a stage trained with the same seed as an earlier one starts from "
                    "the same A, and supple/cross_overlap reads ~1 from the start. Use a different seed per "
                    "stage (TrainingArguments(seed=...)).",
                    stacklevel=3,
                )

    def attach(self, ctx: TrainingContext) -> None:
        self.ctx = ctx

    def detach(self) -> None:
        self.ctx = None

    def on_step_begin(self) -> None:
        """Add the term's gradient (times the GradScaler scale) before the first micro-batch's backward."""
        intra, cross, ok = self.term.add_gradients(scale=self.ctx.grad_scale())
        if ok:
            self._log.append((intra, cross))
        else:
            self.skipped += 1
            warnings.warn("supple: non-finite LoRA decorrelation gradient skipped this step.", stacklevel=2)

    def logs(self) -> dict[str, float]:
        """``supple/decorrelation`` and ``supple/cross_overlap``: means over the steps since the last log."""
        if not self._log:
            return {}
        out = {"supple/decorrelation": sum(v[0] for v in self._log) / len(self._log)}
        cross = [v[1] for v in self._log if v[1] is not None]
        if cross:
            out["supple/cross_overlap"] = sum(cross) / len(cross)
        self._log.clear()
        return out


def refuse_unsupported_lora(scan: LoraScan, what: str, instead: str) -> None:
    """ValueError for AdaLoRA adapters; a warning naming LoRA embedding/convolution adapters left out of ``what``."""
    ada = {n: k for n, k in scan.unsupported.items() if k.startswith("AdaLoRA")}
    if ada:
        raise ValueError(
            f"supple's {what} does not support AdaLoRA: its lora_A is a ParameterDict of SVD-style factors "
            f"(found in {len(ada)} module(s), e.g. {sorted(ada)[0]!r}). Use a plain LoraConfig, or {instead}."
        )
    if scan.unsupported:
        warnings.warn(
            f"supple's {what} covers linear LoRA layers only; these LoRA modules are left out: "
            f"{scan.describe_unsupported()}.",
            stacklevel=3,
        )
    if not scan.linear:
        raise ValueError(
            f"supple's {what} needs a PEFT LoRA model with LoRA on linear layers, but the model has none. Pass "
            f"`peft_config=LoraConfig(...)` to the trainer (or a PeftModel), or {instead}."
        )
