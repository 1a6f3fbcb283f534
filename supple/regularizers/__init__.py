"""Pure tensor functions: the penalty math, one implementation each. No transformers here."""

from .diversity import PENALTIES, decov, get_penalty, ipr, penalty_value_and_grad, vicreg
from .lora import lora_cross_overlap, lora_intra_decorrelation, lora_penalties

__all__ = [
    "PENALTIES",
    "decov",
    "get_penalty",
    "ipr",
    "lora_cross_overlap",
    "lora_intra_decorrelation",
    "lora_penalties",
    "penalty_value_and_grad",
    "vicreg",
]
