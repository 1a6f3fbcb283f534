"""Testbed-only arms from the plasticity literature that supple does not ship, so a reader sees where supple
stands: an L2 pull toward the pre-stage weights and a Shrink & Perturb of the whole model at stage boundaries."""

from __future__ import annotations

import hashlib

import torch


def _generator(seed: int, what: str) -> torch.Generator:
    digest = hashlib.blake2b(f"supple-testbed/{what}/{seed}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def l2_anchor_callback(weight: float):
    """A TrainerCallback adding ``weight · (θ − θ₀)`` to every trainable parameter's gradient, θ₀ being the
    parameters when training begins: the gradient of (λ/2)·‖θ − θ₀‖² (Kumar et al. 2023, "Maintaining plasticity
    in continual learning via regenerative regularization", with the stage's starting point as the anchor).

    Added in ``on_pre_optimizer_step`` (after the Trainer's gradient clipping, so the pull itself is not
    clipped). Costs one copy of the trainable parameters."""
    from transformers import TrainerCallback

    class L2Anchor(TrainerCallback):
        def __init__(self) -> None:
            self.anchor: dict[int, torch.Tensor] = {}
            self.params: list[torch.nn.Parameter] = []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.params = [p for p in model.parameters() if p.requires_grad]
            self.anchor = {id(p): p.detach().clone() for p in self.params}
            return control

        @torch.no_grad()
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            for p in self.params:
                if p.grad is not None:
                    p.grad.add_(p.detach() - self.anchor[id(p)], alpha=weight)
            return control

        def on_train_end(self, args, state, control, **kwargs):
            self.anchor, self.params = {}, []
            return control

    return L2Anchor()


@torch.no_grad()
def shrink_perturb_model(model: torch.nn.Module, alpha: float, sigma: float, seed: int) -> None:
    """θ ← α·θ + σ·rms(θ)·ε for every floating-point parameter of ``model`` (Ash & Adams 2020, applied once when
    a new stage's data arrives), ε ~ N(0, 1) from a generator seeded by ``seed`` (drawn on the CPU in full shape,
    so the result does not depend on the device)."""
    gen = _generator(seed, "boundary-refresh")
    for p in model.parameters():
        if not p.is_floating_point():
            continue
        rms = p.float().pow(2).mean().sqrt()
        noise = torch.randn(p.shape, generator=gen).to(p.device, torch.float32)
        p.copy_((alpha * p.float() + sigma * rms * noise).to(p.dtype))
