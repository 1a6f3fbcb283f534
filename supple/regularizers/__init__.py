"""Pure tensor functions: the penalty math, one implementation each. No transformers here."""

from .diversity import PENALTIES, decov, get_penalty, ipr, penalty_value_and_grad, vicreg

__all__ = ["PENALTIES", "decov", "get_penalty", "ipr", "penalty_value_and_grad", "vicreg"]
