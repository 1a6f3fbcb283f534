"""Which tokens a hidden-state term sees: the real-token mask of the current batch and the seeded subsample.

The mask comes from forward pre-hooks on every module between the model root and the decoder-block list
(e.g. PeftModel → LoraModel → LlamaForCausalLM → LlamaModel). Whichever of them is entered through
``__call__`` records the ``attention_mask`` it receives, so the taps do not depend on how a library calls
the next level down (PEFT's ``BaseTuner.forward`` calls ``self.model.forward`` directly in some
versions). Masks are recorded only in grad-enabled training forwards and are keyed by the
(step, micro-batch) of the context, so a later no-grad pass (DPO's reference model) never replaces the
policy's mask, and a block recomputed during backward finds its micro-batch's mask. See docs/design.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

from ..modeling import module_path


def seeded_generator(label: str) -> torch.Generator:
    """A CPU generator seeded with the first 63 bits of ``blake2b(label)`` (8-byte digest, little-endian)."""
    digest = hashlib.blake2b(label.encode(), digest_size=8).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


def token_generator(seed: int, step: int, micro: int, layer: int) -> torch.Generator:
    """Generator for the token subsample of one (optimizer step, global micro-batch index, block)."""
    return seeded_generator(f"supple/{seed}/{step}/{micro}/{layer}")


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


class BatchMasks:
    """Records the ``attention_mask`` of the current micro-batch from pre-hooks on the blocks' ancestors.

    Args:
        step_key: returns the ``(step, micro)`` key of the current micro-batch.
    """

    def __init__(self, step_key: Callable[[], tuple[int, int]]) -> None:
        self.step_key = step_key
        self._key: tuple[int, int] | None = None
        self._mask: torch.Tensor | None = None
        self._handles: list = []

    def attach(self, root: nn.Module, blocks: nn.Module) -> None:
        """Pre-hooks on every module from ``root`` down to the parent of ``blocks``."""
        path = module_path(root, blocks)
        if not path:
            raise ValueError("supple: the decoder blocks are not inside the training model; cannot read its masks.")
        for mod in path:
            self._handles.append(mod.register_forward_pre_hook(self._pre_hook, with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._key, self._mask = None, None

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if not (module.training and torch.is_grad_enabled()):
            return None
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self._key, self._mask = self.step_key(), mask.detach()
        elif self._key != self.step_key():
            self._key, self._mask = self.step_key(), None
        return None

    def current(self) -> tuple[torch.Tensor | None, bool]:
        """``(mask, seen)``: the 2-D mask of the current micro-batch (None = every position counts), and
        whether any ancestor forward of this micro-batch was seen at all."""
        if self._key != self.step_key():
            return None, False
        return self._mask, True
