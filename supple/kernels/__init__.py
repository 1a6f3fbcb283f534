"""Fused Triton kernels, their torch references (the CPU path) and the dispatch between them.

Imports torch (and triton, lazily) only: nothing here knows about transformers.
"""

from .covariance import ipr, ipr_reference, ipr_value_and_grad
from .dispatch import kernel_choice, triton_available, use_triton
from .orthogonality import lora_orthogonality, orthogonality_reference

__all__ = [
    "ipr",
    "ipr_reference",
    "ipr_value_and_grad",
    "kernel_choice",
    "lora_orthogonality",
    "orthogonality_reference",
    "triton_available",
    "use_triton",
]
