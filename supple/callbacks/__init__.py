"""TrainerCallback wiring: hidden-state taps, LoRA gradient terms, subspaces, live metrics."""

from .diversity import select_tokens, token_generator
from .subspace import capture_update_subspace, load_previous_subspaces, save_subspace
from .supple_callback import SuppleCallback

__all__ = [
    "SuppleCallback",
    "capture_update_subspace",
    "load_previous_subspaces",
    "save_subspace",
    "select_tokens",
    "token_generator",
]
