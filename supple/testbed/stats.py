"""Paired statistics for the demo's tables: bootstrap confidence intervals over training seeds and the share of a
degradation that an arm recovers.

Every arm of one training seed sees the same data, data order and probe (``supple demo`` pairs them), so an arm is
compared with the baseline seed by seed. The base model does not depend on the training seed: it is one number.
Intervals are percentile bootstrap intervals that resample training seeds with replacement (deterministic given
``rng_seed``). With 3 seeds there are only 10 distinct resamples, so the interval is coarse (close to the range of the
per-seed values) — that is the honest reading of 3 seeds, not a defect of the method.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

__all__ = ["bootstrap_ci", "paired_difference", "recovered_share"]


def _percentile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of an ascending list, q in [0, 1]."""
    if not sorted_vals:
        return float("nan")
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def bootstrap_ci(
    samples: Sequence[Sequence[float]],
    statistic: Callable[..., float],
    *,
    n_boot: int = 10_000,
    level: float = 0.95,
    rng_seed: int = 0,
) -> dict[str, float]:
    """``statistic(*columns)`` on the data, with a percentile bootstrap interval over paired rows.

    ``samples`` are equally long columns, one value per training seed each (row i of every column belongs to
    seed i: resampling keeps the rows together, which is what makes it paired). Returns ``estimate`` (on the
    data), ``lo``, ``hi`` and ``n`` (seeds). Resamples whose statistic is not finite (a zero denominator) are
    dropped; ``lo``/``hi`` are NaN when fewer than 2 seeds or no finite resample remain.
    """
    cols = [list(map(float, c)) for c in samples]
    n = len(cols[0]) if cols else 0
    if any(len(c) != n for c in cols):
        raise ValueError(f"paired columns must have one value per seed each, got lengths {[len(c) for c in cols]}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    est = statistic(*cols) if n else float("nan")
    out = {"estimate": est, "lo": float("nan"), "hi": float("nan"), "n": n}
    if n < 2:
        return out
    rng = random.Random(rng_seed)
    vals = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        v = statistic(*[[c[i] for i in idx] for c in cols])
        if math.isfinite(v):
            vals.append(v)
    if vals:
        vals.sort()
        out["lo"], out["hi"] = _percentile(vals, (1 - level) / 2), _percentile(vals, 1 - (1 - level) / 2)
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def paired_difference(a: Sequence[float], b: Sequence[float], **kw) -> dict[str, float]:
    """Mean of ``a − b`` over seeds with its paired bootstrap interval."""
    return bootstrap_ci([a, b], lambda x, y: _mean(x) - _mean(y), **kw)


def recovered_share(
    base: float, baseline: Sequence[float], arm: Sequence[float], *, higher_is_better: bool, **kw
) -> dict[str, float]:
    """The share of the baseline's degradation that an arm recovers, with a paired bootstrap interval.

    share = (baseline − arm) / (baseline − base) for a lower-is-better metric (a probe loss), and
    (arm − baseline) / (base − baseline) for a higher-is-better one (an accuracy); computed on the means over
    seeds of each (bootstrap) sample. 1 = the arm ends where the base model was, 0 = no better than the
    baseline, < 0 = worse. Also returns ``gap`` (the baseline's mean degradation, positive when it degraded).
    """
    if len(baseline) != len(arm):
        raise ValueError(f"baseline and arm need one value per seed each, got {len(baseline)} and {len(arm)}")
    sign = -1.0 if higher_is_better else 1.0

    def share(bl: Sequence[float], ar: Sequence[float]) -> float:
        gap = sign * (_mean(bl) - base)
        if abs(gap) <= 1e-12 * max(1.0, abs(base)):  # no degradation: the share is undefined
            return float("nan")
        return sign * (_mean(bl) - _mean(ar)) / gap

    out = bootstrap_ci([baseline, arm], share, **kw)
    out["gap"] = sign * (_mean(baseline) - base)
    return out
