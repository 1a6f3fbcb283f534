"""Choose between the fused Triton kernels and the torch reference.

Rule: a CUDA tensor with Triton importable → Triton; anything else → torch reference.
``SUPPLE_KERNELS=torch`` forces the reference; ``SUPPLE_KERNELS=triton`` forces Triton, which on a CPU
tensor is only possible in Triton's interpreter mode (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import os

import torch

_CHOICES = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def kernel_choice() -> str:
    choice = os.environ.get("SUPPLE_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"SUPPLE_KERNELS={choice!r} is invalid: use one of {', '.join(_CHOICES)}.")
    return choice


def use_triton(t: torch.Tensor) -> bool:
    """Whether the op on tensor ``t`` should run the Triton kernels."""
    choice = kernel_choice()
    if choice == "torch":
        return False
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("SUPPLE_KERNELS=triton but Triton cannot be imported: `pip install triton`.")
        if not t.is_cuda and not interpreter_mode():
            raise RuntimeError(
                "SUPPLE_KERNELS=triton was forced on a CPU tensor: Triton runs on CUDA tensors, or on CPU "
                "only in interpreter mode (set TRITON_INTERPRET=1). Unset SUPPLE_KERNELS to use the torch path."
            )
        return True
    return bool(t.is_cuda and triton_available())
