"""Paired statistics for the demo's tables: bootstrap confidence intervals over training seeds and the share of a
degradation that an arm recovers.

Every arm of one training seed sees the same data, data order and probe (``supple demo`` pairs them), so an arm is
compared with the baseline seed by seed. The base model does not depend on the training seed: it is one number.
Intervals are percentile bootstrap intervals that resample training seeds with replacement (deterministic given
``rng_seed``). With 3 seeds there are only 10 distinct resamples, so the interval is coarse (close to the range of the
per-seed values) — that is the honest reading of 3 seeds, not a defect of the method.

A probe value is itself a mean over probe seeds (each draws its own probe items, LoRA initialization and batch
order), and those are a second source of noise. :func:`crossed_bootstrap_ci` resamples both: training seeds (rows)
and probe seeds (columns), independently, the same rows and columns for every compared table — paired in both. Its
interval is the one to read for a probe: an interval over training seeds alone treats the probe seeds' draw as fixed
and is too narrow when the probe is noisy (docs/demo.md, "How sure is a probe result").
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

__all__ = ["bootstrap_ci", "crossed_bootstrap_ci", "difference_from_base_crossed", "paired_difference",
           "paired_difference_crossed",
           "recovered_share", "recovered_share_crossed"]


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
    def draw(rng: random.Random) -> float:
        idx = [rng.randrange(n) for _ in range(n)]
        return statistic(*[[c[i] for i in idx] for c in cols])

    return _with_interval(out, draw, n_boot, level, rng_seed)


def _with_interval(out: dict, draw: Callable[[random.Random], float], n_boot: int, level: float,
                   rng_seed: int) -> dict:
    """``out`` with ``lo``/``hi``: the percentile interval of ``n_boot`` resampled statistics ``draw(rng)``
    (non-finite ones dropped; ``lo``/``hi`` stay NaN when none is finite)."""
    rng = random.Random(rng_seed)
    vals = [v for v in (draw(rng) for _ in range(n_boot)) if math.isfinite(v)]
    if vals:
        vals.sort()
        out["lo"], out["hi"] = _percentile(vals, (1 - level) / 2), _percentile(vals, 1 - (1 - level) / 2)
    return out


def crossed_bootstrap_ci(
    tables: Sequence[Sequence[Sequence[float]]],
    statistic: Callable[..., float],
    *,
    independent: Sequence[Sequence[float]] = (),
    n_boot: int = 10_000,
    level: float = 0.95,
    rng_seed: int = 0,
) -> dict[str, float]:
    """``statistic(*row_means, *independent_means)`` with a percentile bootstrap interval that resamples rows and
    columns.

    ``tables`` are equally shaped matrices, ``tables[k][i][j]`` the value of training seed ``i`` under probe seed
    ``j``. A resample draws rows and columns with replacement, independently of each other and the same for every
    table; each table is then reduced to its row means over the drawn columns, and ``statistic`` gets one list of
    row means per table (as :func:`bootstrap_ci` gets columns). Each of the ``independent`` samples (e.g. the base
    model probed under other probe seeds than the tables) is resampled on its own, and ``statistic`` gets its
    mean after the tables' row means. Returns ``estimate`` (on all the data), ``lo``, ``hi``, ``n`` (rows) and
    ``n_probe`` (columns); ``lo``/``hi`` are NaN with fewer than 2 rows and 2 columns or no finite resample.
    """
    mats = [[list(map(float, row)) for row in t] for t in tables]
    n = len(mats[0]) if mats else 0
    m = len(mats[0][0]) if n else 0
    if any(len(t) != n or any(len(row) != m for row in t) for t in mats):
        raise ValueError("crossed tables must all be (training seeds x probe seeds) of one shape, got "
                         f"{[[len(row) for row in t] for t in mats]}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")

    extra = [list(map(float, x)) for x in independent]
    if any(not x for x in extra):
        raise ValueError("an independent sample needs at least one value")

    def reduce(rows: Sequence[int], cols: Sequence[int], picks: Sequence[Sequence[int]]) -> float:
        return statistic(*[[sum(t[i][j] for j in cols) / len(cols) for i in rows] for t in mats],
                         *[sum(x[k] for k in ks) / len(ks) for x, ks in zip(extra, picks)])

    everything = [range(len(x)) for x in extra]
    est = reduce(range(n), range(m), everything) if n and m else float("nan")
    out = {"estimate": est, "lo": float("nan"), "hi": float("nan"), "n": n, "n_probe": m}
    if n < 2 or m < 2:
        return out
    return _with_interval(out, lambda rng: reduce([rng.randrange(n) for _ in range(n)],
                                                  [rng.randrange(m) for _ in range(m)],
                                                  [[rng.randrange(len(x)) for _ in x] for x in extra]),
                          n_boot, level, rng_seed)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _mean_difference(x: Sequence[float], y: Sequence[float]) -> float:
    return _mean(x) - _mean(y)


def paired_difference(a: Sequence[float], b: Sequence[float], **kw) -> dict[str, float]:
    """Mean of ``a − b`` over seeds with its paired bootstrap interval."""
    return bootstrap_ci([a, b], _mean_difference, **kw)


def paired_difference_crossed(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], **kw) -> dict[str, float]:
    """Mean of ``a − b`` (training seeds x probe seeds tables) with the crossed bootstrap interval."""
    return crossed_bootstrap_ci([a, b], _mean_difference, **kw)


def difference_from_base_crossed(a: Sequence[Sequence[float]], base: Sequence[float], **kw) -> dict[str, float]:
    """Mean of table ``a`` minus the mean of ``base``, the base model probed under its own probe seeds (other or
    more than the table's): the table is resampled crossed, ``base`` on its own."""
    return crossed_bootstrap_ci([a], lambda rows, b: _mean(rows) - b, independent=[base], **kw)


def _share_fn(base_mean: Callable[..., float], higher_is_better: bool) -> Callable[..., float]:
    """The recovered share on (bootstrap) samples: ``sign·(mean(baseline) − mean(arm)) / (sign·(mean(baseline) −
    base))``, sign −1 for a higher-is-better metric; NaN where the baseline did not move (undefined)."""
    sign = -1.0 if higher_is_better else 1.0

    def share(bl: Sequence[float], ar: Sequence[float], *base_rows: Sequence[float]) -> float:
        b = base_mean(*base_rows)
        gap = sign * (_mean(bl) - b)
        if abs(gap) <= 1e-12 * max(1.0, abs(b)):  # no degradation: the share is undefined
            return float("nan")
        return sign * (_mean(bl) - _mean(ar)) / gap

    return share


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
    out = bootstrap_ci([baseline, arm], _share_fn(lambda: float(base), higher_is_better), **kw)
    out["gap"] = (-1.0 if higher_is_better else 1.0) * (_mean(baseline) - base)
    return out


def recovered_share_crossed(
    base: Sequence[float], baseline: Sequence[Sequence[float]], arm: Sequence[Sequence[float]], *,
    higher_is_better: bool, paired_base: bool = True, **kw
) -> dict[str, float]:
    """:func:`recovered_share` of a probe measured under several probe seeds, with the crossed interval.

    ``base`` holds the base model's value per probe seed; ``baseline`` and ``arm`` are (training seeds x probe
    seeds) tables. With ``paired_base`` (the base model probed under the tables' probe seeds) a resample draws
    training seeds and probe seeds, and the base model's value is the mean over the drawn probe seeds, so the gap
    stays paired by probe seed too. Without it (the base model probed under more or other probe seeds) the base
    model's values are resampled on their own."""
    if len(baseline) != len(arm):
        raise ValueError(f"baseline and arm need one row per training seed each, got {len(baseline)} and {len(arm)}")
    if not paired_base:
        out = crossed_bootstrap_ci([baseline, arm], _share_fn(lambda b: b, higher_is_better), independent=[base],
                                   **kw)
    else:
        base_table = [list(base) for _ in baseline]  # the base model: one row, the same for every training seed
        out = crossed_bootstrap_ci([baseline, arm, base_table], _share_fn(_mean, higher_is_better), **kw)
    sign = -1.0 if higher_is_better else 1.0
    out["gap"] = sign * (_mean([_mean(r) for r in baseline]) - _mean(base))
    return out
