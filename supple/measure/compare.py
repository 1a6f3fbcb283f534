"""Comparing two checkpoints: linear CKA of their block outputs per layer, and every metric's change."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..regularizers.geometry import linear_cka
from .core import SPACES, TOKEN_SETS, MeasureRun, collect, run_records
from .records import record

__all__ = ["cka_records", "compare_checkpoints", "compare_records"]

_KEY = ("group", "source", "layer", "module", "metric", "tokens", "space")


def cka_records(run_a: MeasureRun, run_b: MeasureRun, dtype: torch.dtype = torch.float64) -> list[dict]:
    """Linear CKA between the two runs' block outputs at each layer both kept (all / no_sink × raw / unit).

    Needs the same tokens in both runs (same tokenizer, texts and token budget); raises otherwise.
    Records: group "compare", metric "linear_cka", model = run_b.name, reference = run_a.name.
    """
    if run_a.token_ids.shape != run_b.token_ids.shape or not torch.equal(run_a.token_ids, run_b.token_ids):
        raise ValueError(
            f"{run_a.name} and {run_b.name} saw different tokens: CKA needs the same tokenizer and texts"
        )
    rows = []
    for k in sorted(set(run_a.layers) & set(run_b.layers)):
        for tokens in TOKEN_SETS:
            keep = slice(None) if tokens == "all" else ~run_a.first
            x, y = run_a.states[k][keep], run_b.states[k][keep]
            for space in SPACES:
                v = linear_cka(x, y, normalize_tokens=space == "unit", dtype=dtype)
                rows.append(
                    record(
                        run_b.name,
                        "compare",
                        "block_output",
                        "linear_cka",
                        v,
                        layer=k,
                        tokens=tokens,
                        space=space,
                        n=int(x.shape[0]),
                        reference=run_a.name,
                    )
                )
    return rows


def compare_records(records_a: Sequence[dict], records_b: Sequence[dict]) -> list[dict]:
    """The change of every metric present in both record sets (matched on group, source, layer, module,
    metric, tokens, space): rows with group "delta", ``value`` = b − a, plus ``value_a``, ``value_b`` and
    ``relative`` = (b − a) / |a| (NaN when a = 0); model = b's model, reference = a's model."""
    index = {tuple(r.get(f) for f in _KEY): r for r in records_a if r.get("group") not in ("delta",)}
    rows = []
    for rb in records_b:
        if rb.get("group") == "delta":
            continue
        ra = index.get(tuple(rb.get(f) for f in _KEY))
        if ra is None:
            continue
        a, b = float(ra["value"]), float(rb["value"])
        rel = (b - a) / abs(a) if a != 0 and math.isfinite(a) else float("nan")
        row = dict(rb)
        row.update(
            group="delta",
            value=b - a,
            value_a=a,
            value_b=b,
            relative=rel,
            reference=ra["model"],
            delta_of=rb["group"],
        )
        rows.append(row)
    return rows


def compare_checkpoints(
    model_a,
    model_b,
    tokenizer,
    texts: Sequence[str],
    *,
    names: tuple[str, str] = ("a", "b"),
    tokenizer_b=None,
    progress: bool = True,
    dtype: torch.dtype = torch.float64,
    **collect_kwargs,
) -> list[dict]:
    """Measure two checkpoints on the same tokens: linear CKA per layer plus the change of every metric.

    Returns the CKA records followed by the delta records (see :func:`compare_records`); the two
    measurements themselves are the ``value_a`` / ``value_b`` fields. ``collect_kwargs`` go to
    :func:`supple.measure.core.collect` (batch_size, max_length, max_tokens, layers, ...).
    """
    run_a = collect(model_a, tokenizer, texts, name=names[0], progress=progress, **collect_kwargs)
    run_b = collect(
        model_b, tokenizer_b or tokenizer, texts, name=names[1], progress=progress, **collect_kwargs
    )
    return cka_records(run_a, run_b, dtype) + compare_records(
        run_records(run_a, dtype), run_records(run_b, dtype)
    )
