"""The demo's statistics on constructed numbers: bootstrap intervals, paired differences, recovered shares, and the
per-arm verdict built from synthetic records."""

import itertools
import math

import pytest

from supple.testbed.analysis import analyze
from supple.testbed.stats import (
    bootstrap_ci,
    crossed_bootstrap_ci,
    paired_difference,
    paired_difference_crossed,
    recovered_share,
    recovered_share_crossed,
)
from supple.testbed.verdict import _problem_lines


def _all_resample_means(values):
    """Every equally likely bootstrap resample's mean (n^n index tuples), the exact bootstrap distribution."""
    n = len(values)
    return sorted(sum(values[i] for i in idx) / n for idx in itertools.product(range(n), repeat=n))


def test_bootstrap_interval_matches_exact_resampling_distribution():
    vals = [1.0, 2.0, 4.0]
    ci = bootstrap_ci([vals], lambda x: sum(x) / len(x), n_boot=20_000, rng_seed=1)
    exact = _all_resample_means(vals)  # 27 equally likely resamples
    assert ci["estimate"] == pytest.approx(7 / 3)
    # the 2.5 % and 97.5 % points of the exact distribution: 1.0 (3 of 27 ≈ 3.7 % of the mass at min 1.0, 1.0+...)
    lo_exact = exact[math.floor(0.025 * (len(exact) - 1))]
    hi_exact = exact[math.ceil(0.975 * (len(exact) - 1))]
    assert lo_exact - 0.2 <= ci["lo"] <= lo_exact + 0.4
    assert hi_exact - 0.4 <= ci["hi"] <= hi_exact + 0.2
    assert ci["lo"] >= min(vals) and ci["hi"] <= max(vals)
    assert bootstrap_ci([vals], lambda x: sum(x) / len(x), rng_seed=1) == bootstrap_ci(
        [vals], lambda x: sum(x) / len(x), rng_seed=1)  # deterministic


def test_paired_difference_is_paired():
    # large between-seed spread, constant within-seed difference: a paired interval is a point
    a, b = [10.0, 20.0, 30.0], [9.0, 19.0, 29.0]
    d = paired_difference(a, b)
    assert d["estimate"] == pytest.approx(1.0) and d["lo"] == pytest.approx(1.0) and d["hi"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([1.0, 2.0], [1.0])


def test_recovered_share_lower_and_higher_is_better():
    # probe loss: base 0.2, baseline 0.4 (gap 0.2), arm 0.3 → half recovered
    s = recovered_share(0.2, [0.4, 0.4, 0.4], [0.3, 0.3, 0.3], higher_is_better=False)
    assert s["estimate"] == pytest.approx(0.5) and s["gap"] == pytest.approx(0.2)
    assert s["lo"] == pytest.approx(0.5) and s["hi"] == pytest.approx(0.5)
    # accuracy: base 0.7, baseline 0.3 (drop 0.4), arm 0.6 → 75 % recovered; arm worse than baseline → negative
    assert recovered_share(0.7, [0.3] * 3, [0.6] * 3, higher_is_better=True)["estimate"] == pytest.approx(0.75)
    assert recovered_share(0.7, [0.3] * 3, [0.2] * 3, higher_is_better=True)["estimate"] == pytest.approx(-0.25)
    # the share is a ratio of means: (mean(bl) − mean(arm)) / (mean(bl) − base)
    bl, arm = [0.5, 0.3, 0.4], [0.25, 0.35, 0.3]
    want = ((0.5 + 0.3 + 0.4) / 3 - (0.25 + 0.35 + 0.3) / 3) / ((0.5 + 0.3 + 0.4) / 3 - 0.2)
    s = recovered_share(0.2, bl, arm, higher_is_better=False)
    assert s["estimate"] == pytest.approx(want) and s["lo"] <= want <= s["hi"]
    # no gap: undefined, not a division error
    assert math.isnan(recovered_share(0.4, [0.4] * 3, [0.3] * 3, higher_is_better=False)["estimate"])


def _rec(arm, seed, idx, probe, ood, a_acc=0.5, a_ce=1.0, wall=10.0, heldout_margin=0.2):
    stages = ["base", "sft", "dpo", "sft2"]
    probes = {f: {"final_loss": probe + (0.01 if f == "number_words" else 0.0), "final_loss_spread": 0.02}
              for f in ("reverse_words", "number_words")}
    r = {"arm": arm, "seed": seed, "stage_index": idx, "stage": stages[idx], "probes": probes,
         "probe": probes["reverse_words"], "ece": 0.05,
         "tasks": {"arithmetic": {"acc": a_acc, "answer_ce": a_ce}, "sorting": {"acc": 0.9, "answer_ce": 0.5},
                   "knowledge": {"acc": ood, "answer_ce": 2.0}},
         "train": None if idx == 0 else {"wall_s": wall, "rewards/accuracies_final": 0.8,
                                         "rewards/margins_final": 0.3, "heldout/rewards/accuracies": 0.7,
                                         "heldout/rewards/margins": heldout_margin}}
    return r


def _results(records):
    stages = [{"name": "sft", "kind": "sft", "family": "arithmetic"}, {"name": "dpo", "kind": "dpo", "family": "arithmetic"},
              {"name": "sft2", "kind": "sft", "family": "sorting"}]
    meta = {"stages": stages, "families": {"stages": ["arithmetic", "sorting"], "ood": "knowledge",
                                           "probe": "reverse_words", "probes": ["reverse_words", "number_words"]}}
    return {"meta": meta, "records": records}


def test_analyze_constructed_arms():
    recs = []
    for arm, seed in itertools.product(("baseline", "good", "bad"), (0, 1, 2)):
        recs.append(_rec(arm, seed, 0, 0.2, 0.7))
        for idx in (1, 2):
            recs.append(_rec(arm, seed, idx, 0.3, 0.5))
        last = {"baseline": (0.4 + 0.01 * seed, 0.3), "good": (0.25 + 0.01 * seed, 0.6), "bad": (0.45, 0.2)}[arm]
        recs.append(_rec(arm, seed, 3, *last, a_ce=1.2 if arm == "bad" else 1.0, wall=12.0 if arm == "good" else 10.0))
    an = analyze(_results(recs))
    prob = an["problem"]["probe reverse_words"]
    assert prob["base"] == pytest.approx(0.2) and prob["estimate"] == pytest.approx(0.21) and prob["lo"] > 0
    assert prob["noise"] == pytest.approx(0.02) and prob["noise_last"] == pytest.approx(0.02)
    assert prob["quiet"]  # 0.02 <= 0.21 / 3
    good, bad = an["arms"]["good"], an["arms"]["bad"]
    # (0.41 − 0.26) / (0.41 − 0.2) on reverse_words; OOD (0.6 − 0.3) / (0.7 − 0.3)
    assert good["recovered probe reverse_words"]["estimate"] == pytest.approx(0.15 / 0.21)
    assert good["recovered OOD"]["estimate"] == pytest.approx(0.75)
    assert good["wall time vs baseline"] == pytest.approx(32 / 30)  # stages 10 + 10 + 12 s vs 3 × 10 s
    assert bad["recovered OOD"]["estimate"] == pytest.approx(-0.25)
    assert an["goal"]["good"]["all"] and not an["goal"]["bad"]["all"]
    assert not an["goal"]["bad"]["forgetting"]  # its first-task CE is higher on every seed
    assert good["stage quality"]["dpo reward acc"]["relative"]["estimate"] == pytest.approx(1.0)
    from supple.testbed.verdict import _quality_lines

    quality = _quality_lines(an)  # one line per arm but the baseline, every stage metric with its interval
    assert [ln.split()[0] for ln in quality] == ["good", "bad"]
    assert "dpo reward acc 1.00 [1.00, 1.00]" in quality[0] and "sft2 acc sorting 1.00" in quality[0]
    assert good["stage quality"]["dpo held-out reward margin"]["relative"]["estimate"] == pytest.approx(1.0)
    # the held-out margin is a stage-quality criterion: 10 % below the baseline's fails the goal
    low = [{**r, "train": {**r["train"], "heldout/rewards/margins": 0.18}}
           if r["arm"] == "good" and r["stage"] == "dpo" else r for r in recs]
    an_low = analyze(_results(low))
    assert an_low["arms"]["good"]["stage quality"]["dpo held-out reward margin"]["relative"]["estimate"] == \
        pytest.approx(0.9)
    assert not an_low["goal"]["good"]["stage quality"] and not an_low["goal"]["good"]["all"]
    # records of runs before held-out pairs existed: the criterion is absent (NaN), not a failure
    old = [{**r, "train": {k: v for k, v in r["train"].items() if not k.startswith("heldout/")}}
           if r["train"] else r for r in recs]
    an_old = analyze(_results(old))
    assert math.isnan(an_old["arms"]["good"]["stage quality"]["dpo held-out reward margin"]["estimate"])
    assert an_old["goal"]["good"]["all"]
    # a probe whose own noise on one baseline checkpoint exceeds a third of the change is not quiet
    recs[[i for i, r in enumerate(recs) if (r["arm"], r["seed"], r["stage_index"]) == ("baseline", 1, 3)][0]][
        "probes"]["reverse_words"]["final_loss_spread"] = 0.08
    prob = analyze(_results(recs))["problem"]["probe reverse_words"]
    assert prob["noise_last"] == pytest.approx(0.08) and not prob["quiet"]  # 0.08 > 0.21 / 3
    assert "noisy" in "\n".join(_problem_lines(analyze(_results(recs))))


def test_recovered_plot_shows_no_share_where_the_baseline_did_not_degrade(tmp_path, monkeypatch):
    """A share of a gap of the wrong sign reads backwards (an arm worse than the baseline looks like a
    recovery): the panel of a measure that did not degrade plots no share, the degraded one plots every arm."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from supple.testbed.verdict import plot_recovered

    share = {"estimate": 0.4, "lo": 0.2, "hi": 0.6, "n": 3}
    an = {"probes": ["reverse_words"], "ood": "knowledge", "last_stage": "sft2", "seeds": [0, 1, 2],
          "problem": {"probe reverse_words": {"estimate": -0.17, "lo": -0.19, "hi": -0.13, "degraded": False},
                      "OOD acc knowledge": {"estimate": -0.16, "lo": -0.19, "hi": -0.12, "degraded": True}},
          "arms": {"baseline": {}, **{a: {"recovered probe reverse_words": share, "recovered OOD": share}
                                      for a in ("supple", "replay")}}}
    calls = []
    real = Axes.errorbar
    monkeypatch.setattr(Axes, "errorbar", lambda ax, *a, **k: calls.append(ax.get_title()) or real(ax, *a, **k))
    texts = []
    real_text = Axes.text
    monkeypatch.setattr(Axes, "text", lambda ax, *a, **k: texts.append(a[2]) or real_text(ax, *a, **k))
    path = plot_recovered({"analysis": an, "meta": {"model": "m"}}, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 0 and path.endswith("r.png")
    assert calls == ["", ""]  # two arms, both on the OOD panel (errorbar is drawn before the title is set)
    assert len(texts) == 1 and "no loss to recover" in texts[0] and "-0.170" in texts[0]


def _exact_crossed_means(table):
    """Every equally likely crossed resample's grand mean: rows and columns drawn with replacement, independently."""
    n, m = len(table), len(table[0])
    return sorted(sum(table[i][j] for i in rows for j in cols) / (n * m)
                  for rows in itertools.product(range(n), repeat=n) for cols in itertools.product(range(m), repeat=m))


def test_crossed_bootstrap_matches_exact_two_way_resampling():
    table = [[1.0, 3.0], [2.0, 6.0], [0.0, 4.0]]  # 3 training seeds x 2 probe seeds
    ci = crossed_bootstrap_ci([table], lambda rows: sum(rows) / len(rows), n_boot=20_000, rng_seed=3)
    exact = _exact_crossed_means(table)  # 27 row draws x 4 column draws
    assert ci["estimate"] == pytest.approx(16 / 6) and ci["n"] == 3 and ci["n_probe"] == 2
    q = lambda p: exact[round(p * (len(exact) - 1))]  # noqa: E731
    assert q(0.025) - 0.15 <= ci["lo"] <= q(0.025) + 0.3 and q(0.975) - 0.3 <= ci["hi"] <= q(0.975) + 0.15
    # resampling the columns too widens the interval: rows alone see only the row means 2, 4, 2
    rows_only = bootstrap_ci([[sum(r) / 2 for r in table]], lambda x: sum(x) / len(x), rng_seed=3)
    assert ci["lo"] < rows_only["lo"] and ci["hi"] > rows_only["hi"]
    with pytest.raises(ValueError, match="one shape"):
        crossed_bootstrap_ci([table, [[1.0, 2.0]] * 2], lambda a, b: 0.0)
    one_col = crossed_bootstrap_ci([[[1.0], [2.0]]], lambda rows: sum(rows) / len(rows))
    assert one_col["estimate"] == pytest.approx(1.5) and math.isnan(one_col["lo"])  # one probe seed: no interval


def test_crossed_difference_is_paired_in_both_seeds():
    # huge spread over training seeds and over probe seeds, constant difference cell by cell: a point interval
    a = [[10.0, 50.0], [20.0, 90.0], [30.0, 0.0]]
    b = [[v - 1.0 for v in row] for row in a]
    d = paired_difference_crossed(a, b)
    assert d["estimate"] == pytest.approx(1.0) and d["lo"] == pytest.approx(1.0) and d["hi"] == pytest.approx(1.0)


def test_recovered_share_crossed_pairs_the_base_model_by_probe_seed():
    # the probe seed shifts every model alike (+0 / +5): paired by probe seed, the share is exactly 0.5 always
    base = [0.2, 5.2]
    baseline = [[0.4, 5.4]] * 3
    arm = [[0.3, 5.3]] * 3
    s = recovered_share_crossed(base, baseline, arm, higher_is_better=False)
    assert s["estimate"] == pytest.approx(0.5) and s["gap"] == pytest.approx(0.2)
    assert s["lo"] == pytest.approx(0.5) and s["hi"] == pytest.approx(0.5)
    # the gap changes sign between probe seeds: the crossed interval is wide, the training-seeds one is not
    base = [0.2, 0.6]
    baseline = [[0.5 + 0.01 * i, 0.4 + 0.01 * i] for i in range(3)]
    arm = [[0.35 + 0.01 * i, 0.45 + 0.01 * i] for i in range(3)]
    s = recovered_share_crossed(base, baseline, arm, higher_is_better=False)
    want = (sum(map(sum, baseline)) - sum(map(sum, arm))) / 6 / (sum(map(sum, baseline)) / 6 - 0.4)
    assert s["estimate"] == pytest.approx(want)
    flat = recovered_share(0.4, [sum(r) / 2 for r in baseline], [sum(r) / 2 for r in arm], higher_is_better=False)
    assert flat["estimate"] == pytest.approx(want)
    # under probe seed 1 alone the share is (0.41 − 0.46) / (0.41 − 0.6) ≈ 0.26: the crossed interval reaches it,
    # the interval over training seeds alone (which treats the probe seeds' draw as fixed) does not
    only_ps1 = (0.41 - 0.46) / (0.41 - 0.6)
    assert s["lo"] <= only_ps1 + 1e-9 < flat["lo"]


def test_analyze_resamples_probe_seeds_when_records_keep_them():
    recs = []
    for arm, seed in itertools.product(("baseline", "good"), (0, 1, 2)):
        recs.append(_rec(arm, seed, 0, 0.2, 0.7))
        for idx in (1, 2):
            recs.append(_rec(arm, seed, idx, 0.3, 0.5))
        recs.append(_rec(arm, seed, 3, 0.4 + 0.01 * seed if arm == "baseline" else 0.3, 0.4))
    # per probe seed, the baseline's gap is +0.6 under one probe seed and -0.2 under the other: mean +0.2
    for r in recs:
        p = r["probes"]["reverse_words"]
        p["seeds"] = [0, 1]
        p["per_seed"] = {"final_loss": [p["final_loss"] - 0.4, p["final_loss"] + 0.4] if r["stage_index"] == 0
                         else [p["final_loss"], p["final_loss"]]}
    an = analyze(_results(recs))
    prob = an["problem"]["probe reverse_words"]
    assert prob["ci"] == "training and probe seeds" and prob["estimate"] == pytest.approx(0.21)
    # the base model's values 0.2 ∓ 0.4: sample sd sqrt(2 · 0.4² / 1)
    assert prob["noise_sd"] == pytest.approx(math.sqrt(2 * 0.4**2)) and prob["n_probe_base"] == 2
    assert "(sd 0.566 over 2 probe seeds: standard error of their mean 0.400)" in "\n".join(_problem_lines(an))
    assert prob["lo_seeds"] > 0 and prob["lo"] < 0 and not prob["degraded"]  # probe noise: not shown to degrade
    # the arm against the baseline directly: 0.3 vs 0.4 + 0.01·seed under every probe seed
    vs = an["arms"]["good"]["probe reverse_words vs baseline"]
    assert vs["ci"] == "training and probe seeds" and vs["estimate"] == pytest.approx(-0.11) and vs["hi"] < 0
    from supple.testbed.verdict import format_verdict

    assert "good - baseline on the probes (lower = more plastic): reverse_words -0.110 [" in format_verdict(
        {"analysis": an})
    share = an["arms"]["good"]["recovered probe reverse_words"]
    assert share["ci"] == "training and probe seeds" and share["lo"] < share["lo_seeds"]
    assert "over training and probe seeds" in "\n".join(_problem_lines(an))
    # number_words kept no per-probe-seed values: its intervals resample training seeds only
    assert an["problem"]["probe number_words"]["ci"] == "training seeds"
    # the base model probed under its own probe seeds: resampled on its own, not paired by probe seed
    recs[0]["probes"]["reverse_words"]["seeds"] = [0, 2]
    assert recs[0]["stage_index"] == 0
    prob = analyze(_results(recs))["problem"]["probe reverse_words"]
    assert prob["ci"] == "training and probe seeds (base model: its own 2 probe seeds)"
    assert prob["estimate"] == pytest.approx(0.21)
    # checkpoints that disagree on the probe seeds are not crossed
    last = next(r for r in recs if r["stage_index"] == 3)
    last["probes"]["reverse_words"]["seeds"] = [5, 6]
    assert analyze(_results(recs))["problem"]["probe reverse_words"]["ci"] == "training seeds"


def test_difference_from_an_unpaired_base_model():
    from supple.testbed.stats import difference_from_base_crossed

    table = [[2.0, 2.2], [2.1, 2.3], [1.9, 2.1]]  # 3 training seeds x 2 probe seeds, mean 2.1
    base = [1.0, 1.4, 1.2, 1.6, 0.8, 1.2]  # the base model under 6 probe seeds of its own, mean 1.2
    d = difference_from_base_crossed(table, base, rng_seed=2)
    assert d["estimate"] == pytest.approx(0.9) and d["lo"] < 0.9 < d["hi"]
    # the base model's own spread enters the interval: a constant base gives a narrower one
    flat = difference_from_base_crossed(table, [1.2] * 6, rng_seed=2)
    assert flat["hi"] - flat["lo"] < d["hi"] - d["lo"]
    # every resample lies between the extremes a resample can reach
    assert 1.9 - 1.6 - 1e-9 <= d["lo"] and d["hi"] <= 2.3 - 0.8 + 1e-9
    # an unpaired share: (mean(bl) − mean(arm)) / (mean(bl) − mean(base))
    arm = [[v - 0.45 for v in row] for row in table]
    s = recovered_share_crossed(base, table, arm, higher_is_better=False, paired_base=False)
    assert s["estimate"] == pytest.approx(0.5) and s["gap"] == pytest.approx(0.9) and s["lo"] < 0.5 < s["hi"]


def test_probe_noise_as_measured_is_the_standard_error_of_the_means():
    """Besides one run's spread, the problem reports the standard error the probe seeds add to the change as it is
    measured (means over probe seeds): sqrt(var_base / n_base + mean var_checkpoint / (n_checkpoint · T)), written
    out here from the constructed per-seed values; 'quiet as measured' compares it with a third of the change."""
    recs = []
    for seed in (0, 1, 2):
        recs.append(_rec("baseline", seed, 0, 2.5, 0.7))
        for idx in (1, 2):
            recs.append(_rec("baseline", seed, idx, 3.0, 0.5))
        recs.append(_rec("baseline", seed, 3, 4.0 + 0.1 * seed, 0.4))
    for r in recs:
        p = r["probes"]["reverse_words"]
        if r["stage_index"] == 0:  # the base model: 4 probe seeds (mean 2.5, variance 0.52 / 3)
            p.update(seeds=[0, 1, 2, 3], per_seed={"final_loss": [2.0, 2.4, 2.6, 3.0]}, final_loss_spread=1.0)
        else:  # each checkpoint: 2 probe seeds at its mean ∓ 0.1 (variance 0.02)
            v = p["final_loss"]
            p.update(seeds=[0, 1], per_seed={"final_loss": [v - 0.1, v + 0.1]}, final_loss_spread=0.2)
    prob = analyze(_results(recs))["problem"]["probe reverse_words"]
    expect = math.sqrt((0.52 / 3) / 4 + 0.02 / (2 * 3))
    assert prob["estimate"] == pytest.approx(1.6) and prob["noise_se"] == pytest.approx(expect)
    assert prob["quiet_mean"]  # 0.216 <= 1.6 / 3
    assert not prob["quiet"]  # one run's spread on the base model, 1.0, is over a third of 1.6
    lines = "\n".join(_problem_lines(analyze(_results(recs))))
    assert f"their standard error in the change {expect:.3f} (at most a third of it)" in lines
