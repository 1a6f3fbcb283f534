"""Feature refresh: Shrink & Perturb, ReLoRA-style merge-and-reinit, ReDo dormant-unit recycling.

Each refresh at optimizer step s draws its randomness from a generator seeded by (seed, s), so a refresh
is deterministic given the seed, and a resumed run refreshes exactly like an uninterrupted one.
Optimizer moments of re-initialized parameters (or rows/columns) are reset to zero.

Under DDP and FSDP2 every decision that changes parameters is identical on every rank (docs/design.md,
"Refresh"): the noise and re-initializations come from the same (seed, step) generator, always drawn in
the parameter's full shape (a sharded rank then keeps its own chunk), and ReDo's activation statistics are
all-reduced across ranks before the dormant units are chosen.
:class:`RefreshPart` is the callback part.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from torch import nn

from ..modeling import LoraModuleRef, LoraScan, find_decoder_blocks, find_lora_modules, scan_lora_modules
from .context import TrainingContext
from .distributed import edit_, full_tensor, local, local_shard, write_full_


def refresh_generator(seed: int, step: int, what: str) -> torch.Generator:
    digest = hashlib.blake2b(f"supple-refresh/{what}/{seed}/{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _reset_moments(optimizer, param: nn.Parameter, index=None, dim: int = 0) -> None:
    """Zero the optimizer's per-parameter tensors (Adam moments, momentum) of ``param`` (or a slice)."""
    if optimizer is None:
        return
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    state = opt.state.get(param)
    if not state:
        return
    for val in state.values():
        if isinstance(val, torch.Tensor) and val.shape == param.shape:
            if index is None:
                local(val).zero_()
            else:
                _fill_(val, dim, index)


@torch.no_grad()
def shrink_perturb_(params: list[nn.Parameter], alpha: float, sigma: float, generator: torch.Generator) -> None:
    """θ ← α·θ + σ·rms(θ)·ε, ε ~ N(0, 1), for each parameter (Ash & Adams 2020)."""
    for p in params:
        rms = full_tensor(p.detach().float().pow(2).mean()).sqrt()  # over the whole tensor, also when sharded
        noise = local_shard(torch.randn(p.shape, generator=generator), p).to(p.device, torch.float32)
        mine = local(p)
        mine.copy_((alpha * mine.float() + sigma * rms.to(mine.device) * noise).to(p.dtype))


@torch.no_grad()
def relora_(modules: list[LoraModuleRef], optimizer, generator: torch.Generator) -> int:
    """Merge each LoRA update into its base weight, re-initialize A (Kaiming-uniform, as PEFT) and B = 0,
    and zero their optimizer moments (Lialin et al. 2023). Returns the number of modules refreshed.

    The merge keeps the model's function. For DoRA, W ← m ⊙ (W + ΔW) / ‖W + ΔW‖_row and the magnitude
    vector is reset to the row norms of the merged W (so that with B = 0 the layer computes W·x), and the
    magnitude's optimizer moments are zeroed too. Sharded (FSDP2) weights and adapters are merged on their
    gathered values, and each rank writes back its own chunk."""
    for ref in modules:
        base = getattr(ref.module, "base_layer", None)
        weight = getattr(base, "weight", None)
        if weight is None or weight.dim() != 2:
            raise ValueError(f"relora: module {ref.name!r} has no 2-D base weight to merge into.")
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"relora: module {ref.name!r} has a quantized base weight ({weight.dtype}); cannot merge.")
        fan_in_fan_out = bool(getattr(ref.module, "fan_in_fan_out", False))
        whole = full_tensor(weight).float()
        w = whole.T if fan_in_fan_out else whole  # (out, in)
        merged = w + ref.scaling * (full_tensor(ref.lora_b).float() @ full_tensor(ref.lora_a).float())
        if ref.magnitude is not None:  # DoRA: the layer computes m ⊙ (W + ΔW)/‖W + ΔW‖_row · x
            norm = merged.norm(dim=1)
            merged = merged * (full_tensor(ref.magnitude).float().reshape(-1) / norm).unsqueeze(1)
            write_full_(ref.magnitude, merged.norm(dim=1).reshape(ref.magnitude.shape))
            _reset_moments(optimizer, ref.magnitude)
        write_full_(weight, merged.T if fan_in_fan_out else merged)
        a = torch.empty(ref.lora_a.shape)  # the full shape: the draw does not depend on the sharding
        bound = 1.0 / math.sqrt(ref.lora_a.shape[1])  # kaiming_uniform_(a=sqrt(5)) bound for fan_in = d_in
        a.uniform_(-bound, bound, generator=generator)
        write_full_(ref.lora_a, a)
        local(ref.lora_b).zero_()
        _reset_moments(optimizer, ref.lora_a)
        _reset_moments(optimizer, ref.lora_b)
    return len(modules)


def _mlp_parts(block: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
    mlp = getattr(block, "mlp", None)
    if mlp is None:
        raise ValueError(f"redo: decoder block {type(block).__name__} has no `mlp`.")
    incoming = [getattr(mlp, n) for n in ("gate_proj", "up_proj") if hasattr(mlp, n)]
    down = getattr(mlp, "down_proj", None)
    if not incoming or down is None:
        raise ValueError(
            f"redo supports gated MLPs with up_proj/gate_proj/down_proj (Llama, Qwen2, Mistral); "
            f"{type(mlp).__name__} is not one."
        )
    return incoming, down


class DormantTracker:
    """Mean |activation| of each MLP hidden unit (input of down_proj), over training forwards.

    Args:
        model: the training model (its decoder blocks must have gated MLPs).
        step_key: returns the ``(step, micro-batch)`` key; each (key, block) is counted once, so a block
            recomputed under gradient checkpointing does not count twice. None counts every call.
        attach: install the hooks now (else call :meth:`attach`).
    """

    def __init__(self, model: nn.Module, step_key: Callable[[], tuple[int, int]] | None = None,
                 attach: bool = True) -> None:
        _, blocks = find_decoder_blocks(model)
        self.blocks = list(blocks)
        self.downs = [_mlp_parts(block)[1] for block in self.blocks]  # validates every block first
        self.step_key = step_key
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.active = False
        self._seen: set[tuple] = set()
        self._handles: list = []
        if attach:
            self.attach()

    def attach(self) -> None:
        for i, down in enumerate(self.downs):
            self._handles.append(down.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(mod, args, out):
            if not self.active or not torch.is_grad_enabled() or not mod.training:
                return
            if self.step_key is not None:
                key = (*self.step_key(), i)
                if key in self._seen:  # recomputation of a checkpointed block
                    return
                self._seen.add(key)
            x = args[0].detach().float().abs()
            s = x.reshape(-1, x.shape[-1]).sum(0)
            self.sums[i] = self.sums.get(i, 0) + s
            self.counts[i] = self.counts.get(i, 0) + x.reshape(-1, x.shape[-1]).shape[0]

        return hook

    def _all_reduce(self) -> None:
        """Sum the statistics over DDP ranks, so every rank picks the same dormant units."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        for i, down in enumerate(self.downs):
            w = down.weight
            total = self.sums.get(i)
            total = torch.zeros(w.shape[1], device=w.device) if not isinstance(total, torch.Tensor) else total.to(w.device)
            count = torch.tensor([float(self.counts.get(i, 0))], device=w.device, dtype=torch.float64)
            dist.all_reduce(total)
            dist.all_reduce(count)
            if float(count) > 0:
                self.sums[i], self.counts[i] = total, int(count)

    def scores(self) -> dict[int, torch.Tensor]:
        """ReDo score per unit: mean |activation| divided by the layer's mean over units (all ranks pooled)."""
        self._all_reduce()
        out = {}
        for i, s in self.sums.items():
            mean = s / max(self.counts[i], 1)
            out[i] = mean / mean.mean().clamp_min(1e-12)
        return out

    def reset(self) -> None:
        self.sums, self.counts = {}, {}
        self._seen = set()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@torch.no_grad()
def redo_(tracker: DormantTracker, tau: float, optimizer, generator: torch.Generator,
          lora_modules: dict[str, LoraModuleRef] | None = None) -> int:
    """Recycle dormant units (score ≤ τ): re-initialize their incoming weights, zero outgoing ones and reset
    those rows/columns' optimizer moments (Sokar et al. 2023). With LoRA (frozen base), the adapter rows
    that feed the units (B rows of gate/up) are re-initialized and the down adapter's A columns zeroed.
    Returns the number of recycled units."""
    total = 0
    lora_by_module = {id(r.module): r for r in (lora_modules or {}).values()}
    for i, score in tracker.scores().items():
        dormant = (score <= tau).nonzero().flatten()
        if dormant.numel() == 0:
            continue
        total += int(dormant.numel())
        incoming, down = _mlp_parts(tracker.blocks[i])
        for lin in incoming:
            ref = lora_by_module.get(id(lin))
            if ref is not None:  # LoRA: refresh the adapter rows that feed the dormant units
                bound = 1.0 / math.sqrt(ref.lora_b.shape[1])
                rows = torch.empty(dormant.numel(), ref.lora_b.shape[1]).uniform_(-bound, bound, generator=generator)
                _set_rows_(ref.lora_b, dormant, rows)
                _reset_moments(optimizer, ref.lora_b, dormant, 0)
            else:
                w = lin.weight
                bound = 1.0 / math.sqrt(w.shape[1])
                rows = torch.empty(dormant.numel(), w.shape[1]).uniform_(-bound, bound, generator=generator)
                _set_rows_(w, dormant, rows)
                _reset_moments(optimizer, w, dormant, 0)
                if getattr(lin, "bias", None) is not None:
                    _fill_(lin.bias, 0, dormant)
        ref = lora_by_module.get(id(down))
        target = ref.lora_a if ref is not None else down.weight
        _fill_(target, 1, dormant)
        _reset_moments(optimizer, target, dormant, 1)
    tracker.reset()
    return total


def _fill_(param: torch.Tensor, dim: int, index: torch.Tensor) -> None:
    """Zero ``param`` at whole-tensor ``index`` along ``dim`` (a sharded ``param`` zeroes what it holds)."""
    edit_(param, lambda t: t.index_fill_(dim, index.to(t.device), 0.0))


def _set_rows_(param: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``param[index] = rows`` (whole-tensor row indices; a sharded ``param`` writes the rows it holds)."""
    edit_(param, lambda t: t.index_copy_(0, index.to(t.device), rows.to(t.device, t.dtype)))


class RefreshPart:
    """The feature-refresh part of SuppleCallback (``refresh_method`` every ``refresh_every`` steps).

    Validated when built: ``relora`` needs linear LoRA layers and refuses AdaLoRA and LoRA on embeddings
    or convolutions (it could not merge them); ``redo`` needs gated MLPs; under DDP ``redo`` needs an
    initialized process group for its all-reduce.
    """

    def __init__(self, cfg, model: nn.Module, ctx: TrainingContext, scan: LoraScan | None = None) -> None:
        self.method = cfg.refresh_method
        self.every = int(cfg.refresh_every)
        self.shrink, self.noise = float(cfg.refresh_shrink), float(cfg.refresh_noise)
        self.tau, self.warmup = float(cfg.redo_threshold), int(cfg.relora_warmup_steps)
        scan = scan if scan is not None else scan_lora_modules(model)
        if self.method == "relora":
            if scan.unsupported:
                raise ValueError(
                    "refresh_method='relora' merges every LoRA adapter into its base weight; it cannot merge "
                    f"{scan.describe_unsupported()}. Use LoRA on linear layers only, or refresh_method="
                    "'shrink_perturb'/'redo'.")
            if not scan.linear:
                raise ValueError("refresh_method='relora' merges and re-initializes LoRA adapters: the model has "
                                 "none. Use a PEFT LoRA model, or refresh_method='shrink_perturb'/'redo'.")
        self.tracker: DormantTracker | None = None
        if self.method == "redo":
            if any(k.startswith("AdaLoRA") for k in scan.unsupported.values()):
                raise ValueError("refresh_method='redo' re-initializes LoRA B rows, which AdaLoRA does not have; "
                                 "use a plain LoraConfig or refresh_method='shrink_perturb'.")
            if ctx.world_size > 1:
                import torch.distributed as dist

                if not (dist.is_available() and dist.is_initialized()):
                    raise ValueError("refresh_method='redo' under DDP all-reduces its activation statistics, but "
                                     "torch.distributed is not initialized; launch with torchrun.")
            self.tracker = DormantTracker(model, ctx.step_key, attach=False)
        self.ctx: TrainingContext | None = None
        self._pending: dict[str, float] = {}

    def attach(self, ctx: TrainingContext) -> None:
        self.ctx = ctx
        if self.tracker is not None:
            self.tracker.attach()

    def detach(self) -> None:
        if self.tracker is not None:
            self.tracker.detach()
            self.tracker.reset()
        self.ctx = None

    def on_step_begin(self, optimizer) -> None:
        step = self.ctx.step
        if self.tracker is not None:
            self.tracker.active = (step + 1) % self.every == 0
        if self.method == "relora" and self.warmup:
            since = step % self.every
            if step >= self.every and since < self.warmup:
                factor = (since + 1) / (self.warmup + 1)
                for group in getattr(optimizer, "param_groups", []):
                    group["lr"] = group["lr"] * factor

    @torch.no_grad()
    def on_step_end(self, optimizer, model: nn.Module) -> None:
        step = self.ctx.step
        if step % self.every != 0:
            return
        gen = refresh_generator(self.ctx.seed, step, self.method)
        if self.method == "shrink_perturb":
            shrink_perturb_([p for p in model.parameters() if p.requires_grad], self.shrink, self.noise, gen)
        elif self.method == "relora":
            relora_(find_lora_modules(model), optimizer, gen)
        elif self.method == "redo":
            lora = {r.name: r for r in find_lora_modules(model)}
            self._pending["supple/redo_units"] = float(redo_(self.tracker, self.tau, optimizer, gen, lora))

    def logs(self) -> dict[str, float]:
        """``supple/refreshes`` (refreshes so far) and ``supple/redo_units`` after a ReDo refresh."""
        out = {"supple/refreshes": float(self.ctx.step // self.every), **self._pending}
        self._pending = {}
        return out
