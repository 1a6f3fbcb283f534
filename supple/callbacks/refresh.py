"""Feature refresh: Shrink & Perturb, ReLoRA-style merge-and-reinit, ReDo dormant-unit recycling.

Each refresh at optimizer step s draws its randomness from a generator seeded by (seed, s), so a refresh
is deterministic given the seed, and a resumed run refreshes exactly like an uninterrupted one.
Optimizer moments of re-initialized parameters (or rows/columns) are reset to zero.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from ..modeling import LoraModuleRef, find_decoder_blocks


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
                val.zero_()
            else:
                val.index_fill_(dim, index.to(val.device), 0.0)


@torch.no_grad()
def shrink_perturb_(params: list[nn.Parameter], alpha: float, sigma: float, generator: torch.Generator) -> None:
    """θ ← α·θ + σ·rms(θ)·ε, ε ~ N(0, 1), for each parameter (Ash & Adams 2020)."""
    for p in params:
        rms = p.detach().float().pow(2).mean().sqrt()
        noise = torch.randn(p.shape, generator=generator).to(p.device, torch.float32)
        p.copy_((alpha * p.float() + sigma * rms * noise).to(p.dtype))


@torch.no_grad()
def relora_(modules: list[LoraModuleRef], optimizer, generator: torch.Generator) -> int:
    """Merge each LoRA update into its base weight, re-initialize A (Kaiming-uniform, as PEFT) and B = 0,
    and zero their optimizer moments (Lialin et al. 2023). Returns the number of modules refreshed."""
    for ref in modules:
        base = getattr(ref.module, "base_layer", None)
        weight = getattr(base, "weight", None)
        if weight is None or weight.dim() != 2:
            raise ValueError(f"relora: module {ref.name!r} has no 2-D base weight to merge into.")
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"relora: module {ref.name!r} has a quantized base weight ({weight.dtype}); cannot merge.")
        delta = ref.scaling * (ref.lora_b.float() @ ref.lora_a.float())
        if getattr(ref.module, "fan_in_fan_out", False):
            delta = delta.T
        weight.add_(delta.to(weight.dtype))
        a = torch.empty(ref.lora_a.shape)
        bound = 1.0 / math.sqrt(ref.lora_a.shape[1])  # kaiming_uniform_(a=sqrt(5)) bound for fan_in = d_in
        a.uniform_(-bound, bound, generator=generator)
        ref.lora_a.copy_(a.to(ref.lora_a.device, ref.lora_a.dtype))
        ref.lora_b.zero_()
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
    """Mean |activation| of each MLP hidden unit (input of down_proj), over training forwards."""

    def __init__(self, model: nn.Module) -> None:
        _, blocks = find_decoder_blocks(model)
        self.blocks = list(blocks)
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.active = False
        self._handles = []
        for i, block in enumerate(self.blocks):
            _, down = _mlp_parts(block)
            self._handles.append(down.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(mod, args, out):
            if not self.active or not torch.is_grad_enabled() or not mod.training:
                return
            x = args[0].detach().float().abs()
            s = x.reshape(-1, x.shape[-1]).sum(0)
            self.sums[i] = self.sums.get(i, 0) + s
            self.counts[i] = self.counts.get(i, 0) + x.reshape(-1, x.shape[-1]).shape[0]

        return hook

    def scores(self) -> dict[int, torch.Tensor]:
        """ReDo score per unit: mean |activation| divided by the layer's mean over units."""
        out = {}
        for i, s in self.sums.items():
            mean = s / max(self.counts[i], 1)
            out[i] = mean / mean.mean().clamp_min(1e-12)
        return out

    def reset(self) -> None:
        self.sums, self.counts = {}, {}

    def detach(self) -> None:
        for h in self._handles:
            h.remove()


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
                ref.lora_b[dormant.to(ref.lora_b.device)] = rows.to(ref.lora_b.device, ref.lora_b.dtype)
                _reset_moments(optimizer, ref.lora_b, dormant, 0)
            else:
                w = lin.weight
                bound = 1.0 / math.sqrt(w.shape[1])
                rows = torch.empty(dormant.numel(), w.shape[1]).uniform_(-bound, bound, generator=generator)
                w[dormant.to(w.device)] = rows.to(w.device, w.dtype)
                _reset_moments(optimizer, w, dormant, 0)
                if getattr(lin, "bias", None) is not None:
                    lin.bias[dormant.to(w.device)] = 0
        ref = lora_by_module.get(id(down))
        if ref is not None:
            ref.lora_a[:, dormant.to(ref.lora_a.device)] = 0
            _reset_moments(optimizer, ref.lora_a, dormant, 1)
        else:
            down.weight[:, dormant.to(down.weight.device)] = 0
            _reset_moments(optimizer, down.weight, dormant, 1)
    tracker.reset()
    return total
