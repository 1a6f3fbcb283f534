"""The tidy record every measurement returns: one plain dict per model × layer × metric × tokens × space.

``RECORD_FIELDS`` are the columns every record has (CSV and JSON write them first, in this order); a
record may carry more (``reference`` is set by comparisons, others by the caller). :func:`record` builds
one. Producers: :mod:`supple.measure.core` (geometry, logits, trajectories), :mod:`supple.measure.lora`
(LoRA spectra and overlaps), :mod:`supple.measure.compare`; :mod:`supple.measure.report` writes them.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["RECORD_FIELDS", "record"]

RECORD_FIELDS = (
    "model",
    "group",
    "source",
    "layer",
    "module",
    "metric",
    "tokens",
    "space",
    "value",
    "n",
    "reference",
)


def record(
    model: str,
    group: str,
    source: str,
    metric: str,
    value: float | torch.Tensor | None,
    *,
    layer: int | None = None,
    module: str | None = None,
    tokens: str | None = None,
    space: str | None = None,
    n: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One tidy row; ``value`` becomes a Python float (NaN when undefined)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    row = {
        "model": model,
        "group": group,
        "source": source,
        "layer": layer,
        "module": module,
        "metric": metric,
        "tokens": tokens,
        "space": space,
        "value": float(value) if value is not None else float("nan"),
        "n": n,
        "reference": None,
    }
    row.update(extra)
    return row
