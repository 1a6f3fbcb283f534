"""Hidden-state taps: inject λ·∂P/∂H into the gradient of selected decoder-block outputs.

A forward hook on each selected block computes the penalty P on the block output (non-padding tokens,
optionally subsampled) and returns the output passed through an identity autograd function ("tap")
whose backward adds ``coeff · ∂P/∂H`` to the incoming gradient. That is exactly the gradient of adding
``coeff · P`` to the loss, without touching the trainer's loss (DPO computes its loss outside the model).

Hooks act only in training forwards with grad enabled (so DPO's reference pass, generation and
evaluation are untouched), and each (micro-batch, block) pair counts once, so the recomputation
forwards of gradient checkpointing do not double the term.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..modeling import attention_token_mask, find_decoder_blocks, resolve_layer_indices
from ..regularizers.diversity import penalty_value_and_grad


def token_generator(seed: int, step: int, micro: int, layer: int) -> torch.Generator:
    """Generator for the token subsample of one (optimizer step, global micro-batch index, block)."""
    digest = hashlib.blake2b(f"supple/{seed}/{step}/{micro}/{layer}".encode(), digest_size=8).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


def real_token_indices(mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
    """Flat CPU indices (into a (batch·seq) view) of the real (non-padding) tokens."""
    if mask is None:
        return torch.arange(batch * seq)
    return mask.reshape(-1).nonzero().flatten().cpu()


def subsample(idx: torch.Tensor, max_tokens: int, generator: torch.Generator | None) -> torch.Tensor:
    """At most ``max_tokens`` of ``idx`` (0 = all), drawn with ``generator`` on the CPU, kept in order."""
    if max_tokens and idx.numel() > max_tokens:
        perm = torch.randperm(idx.numel(), generator=generator)[:max_tokens]
        idx = idx[perm.sort().values]
    return idx


def select_tokens(
    mask: torch.Tensor | None, batch: int, seq: int, max_tokens: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Flat indices (into a (batch·seq) view) of real tokens, subsampled to ``max_tokens`` (0 = all).

    The subsample is drawn with ``generator`` on the CPU, so it is reproducible across devices.
    """
    return subsample(real_token_indices(mask, batch, seq), max_tokens, generator)


class _Tap(torch.autograd.Function):
    """Identity in forward; backward adds ``extra`` at rows ``idx`` of the flattened gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, idx: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(idx, extra)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        idx, extra = ctx.saved_tensors
        d = grad_out.shape[-1]
        flat = grad_out.reshape(-1, d).index_add(0, idx, extra.to(grad_out.dtype))
        return flat.view_as(grad_out), None, None


@dataclass
class TapStats:
    values: list[torch.Tensor] = field(default_factory=list)
    finite: list[torch.Tensor] = field(default_factory=list)
    hidden_samples: dict[int, torch.Tensor] = field(default_factory=dict)


class DiversityTaps:
    """Installs the forward hooks; the owner supplies the per-micro-batch scaling through callbacks.

    Args:
        penalty: penalty name ("ipr", "decov", "vicreg").
        weight: λ. The injected coefficient is λ / num_layers × ``coeff_fn()``.
        layers: block indices (negative from the end).
        max_tokens: tokens sampled per micro-batch and block (0 = all).
        normalize: scale token vectors to unit length first.
        coeff_fn: returns the scale of one micro-batch: 1/grad-accumulation × GradScaler scale.
        rng_fn: returns ``(seed, step, micro)`` for the token subsample of the current micro-batch.
        capture_every_fn: returns True when the block outputs should be kept for live metrics.
    """

    def __init__(
        self,
        penalty: str,
        weight: float,
        layers: list[int],
        max_tokens: int,
        normalize: bool,
        coeff_fn: Callable[[], float],
        rng_fn: Callable[[], tuple[int, int, int]],
        capture_fn: Callable[[], bool] | None = None,
    ) -> None:
        self.penalty = penalty
        self.weight = float(weight)
        self.layer_spec = list(layers)
        self.max_tokens = int(max_tokens)
        self.normalize = bool(normalize)
        self.coeff_fn = coeff_fn
        self.rng_fn = rng_fn
        self.capture_fn = capture_fn or (lambda: False)
        self.stats = TapStats()
        self.layers: list[int] = []
        self._handles: list = []
        self._forward_id = 0
        self._done: set[tuple[int, int]] = set()
        self._mask: torch.Tensor | None = None
        self._real_idx: torch.Tensor | None = None  # real-token indices of the current forward, shared by blocks
        self._real_idx_shape: tuple[int, int] | None = None
        self._warned_nonfinite = False
        self._warned_mask = False
        self.paused = False

    # -- installation -------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        _, blocks = find_decoder_blocks(model)
        self.layers = resolve_layer_indices(self.layer_spec, len(blocks))
        from ..modeling import unwrap_model

        base = unwrap_model(model)
        self._handles.append(base.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        for k in self.layers:
            self._handles.append(blocks[k].register_forward_hook(self._make_block_hook(k)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- hooks --------------------------------------------------------------------------------------
    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if self.paused or not (module.training and torch.is_grad_enabled()):
            return None
        self._forward_id += 1
        self._done = {key for key in self._done if key[0] >= self._forward_id - 1}
        mask = kwargs.get("attention_mask")
        self._mask = mask.detach() if isinstance(mask, torch.Tensor) else None
        self._real_idx = None
        return None

    def _make_block_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output):
            if self.paused or not (module.training and torch.is_grad_enabled()):
                return None
            key = (self._forward_id, layer)
            if key in self._done:  # gradient-checkpointing recomputation: this micro-batch counted already
                return None
            self._done.add(key)
            hidden = output[0] if isinstance(output, tuple) else output
            new_hidden = self._tap(hidden, layer)
            if new_hidden is hidden:
                return None
            if isinstance(output, tuple):
                return (new_hidden, *output[1:])
            return new_hidden

        return hook

    def _tap(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        if hidden.dim() != 3:
            return hidden
        b, t, d = hidden.shape
        mask = attention_token_mask(self._mask, (b, t))
        if self._mask is not None and mask is None and not self._warned_mask:
            warnings.warn(
                "supple: attention_mask does not match the hidden states; using every position.", stacklevel=2
            )
            self._warned_mask = True
        if self._real_idx is None or self._real_idx_shape != (b, t):  # one mask scan per forward, not per block
            self._real_idx = real_token_indices(mask, b, t)
            self._real_idx_shape = (b, t)
        seed, step, micro = self.rng_fn()
        gen = token_generator(seed, step, micro, layer) if self.max_tokens else None
        idx = subsample(self._real_idx, self.max_tokens, gen).to(hidden.device)
        h = hidden.detach().reshape(-1, d).index_select(0, idx)
        if self.capture_fn():
            self.stats.hidden_samples[layer] = h.float().cpu()
        if self.weight == 0:
            return hidden
        if h.shape[0] < 2:  # no covariance from fewer than two tokens
            self.stats.values.append(torch.zeros((), device=hidden.device))
            self.stats.finite.append(torch.zeros((), dtype=torch.bool, device=hidden.device))
            return hidden
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # penalties always in fp32
            p, g = penalty_value_and_grad(self.penalty, h, self.normalize)
        # Decide on device (no host sync): a non-finite term injects nothing and is counted.
        finite = torch.isfinite(p) & torch.isfinite(g).all()
        coeff = self.weight / len(self.layers) * self.coeff_fn()
        extra = torch.where(finite, g * coeff, torch.zeros_like(g))
        self.stats.values.append(torch.where(finite, p, torch.zeros_like(p)))
        self.stats.finite.append(finite)
        return _Tap.apply(hidden, idx, extra)

    def collect(self) -> tuple[float | None, int]:
        """Mean finite penalty since the last call (None if none) and the number of skipped terms."""
        if not self.stats.finite:
            return None, 0
        finite = torch.stack(self.stats.finite).cpu()
        values = torch.stack(self.stats.values).float().cpu()
        self.stats.values.clear()
        self.stats.finite.clear()
        n_ok = int(finite.sum())
        skipped = int((~finite).sum())
        if skipped and not self._warned_nonfinite:
            warnings.warn(
                f"supple: the {self.penalty} diversity penalty was not finite in {skipped} micro-batch/block "
                "term(s) (e.g. a micro-batch with fewer than two real tokens, or NaN hidden states); those "
                "terms were skipped and are counted in supple/skipped_nonfinite.",
                stacklevel=2,
            )
            self._warned_nonfinite = True
        mean = float(values[finite].mean()) if n_ok else None
        return mean, skipped
