"""Tiny random models and a locally built tokenizer for fast tests (nothing is downloaded).

Thin wrappers over :mod:`supple.testbed.tiny`, keeping the global RNG seeded as the tests expect.
"""

from __future__ import annotations

import torch

from supple.testbed.tiny import CHAT_TEMPLATE, make_tiny_model, make_tiny_tokenizer

__all__ = ["CHAT_TEMPLATE", "make_tiny_llama", "make_tokenizer"]


def make_tokenizer():
    """A character-level tokenizer with pad/bos/eos/unk and a simple chat template."""
    return make_tiny_tokenizer()


def make_tiny_llama(tok=None, seed: int = 0, **overrides):
    """A 2-block random Llama (hidden 32) in fp32; also seeds the global RNG with ``seed``."""
    torch.manual_seed(seed)
    model, _ = make_tiny_model(tok, seed=seed, **{"max_position_embeddings": 256, **overrides})
    return model
