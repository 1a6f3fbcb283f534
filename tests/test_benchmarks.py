"""benchmarks/overhead.py on the tiny model: the anchored-diversity configuration runs through SFTTrainer, its
pre-stage reference is measured once per trainer (timed inside the callback) and every configuration gets a row.
The numbers themselves are not asserted (speed goals live in benchmarks/, not in timed tests). Also
benchmarks/probe_noise.py's fixed-pool mode, and benchmarks/demo_step_cost.py (the demo stage's step time)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from .benchmark_module import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def test_overhead_anchored_config_reports_its_reference(tmp_path, capsys):
    mod = load_benchmark("overhead", "_test_overhead")
    assert mod.main(["--configs", "baseline,diversity,anchored", "--reps", "2", "--block", "2", "--warmup", "1",
                     "--mem-steps", "0", "--own-reps", "3", "--out", str(tmp_path), "--tag", "t"]) == 0
    rows = {r["config"]: r for r in csv.DictReader((tmp_path / "overhead_tiny_t.csv").open())}
    assert set(rows) == {"baseline", "diversity", "anchored"}
    assert mod.REFERENCE_S.keys() == {"anchored"} and len(mod.REFERENCE_S["anchored"]) == 1
    assert float(rows["anchored"]["reference_once_s"]) > 0 and rows["diversity"]["reference_once_s"] == ""
    # the anchored term's own time is the plain term's plus the hinge
    assert float(rows["anchored"]["own_callback_ms"]) > float(rows["diversity"]["own_callback_ms"])
    assert "pre-stage reference (once, at train begin)" in capsys.readouterr().out


def test_probe_noise_fixed_pool_keeps_the_items_and_varies_the_trajectory(tmp_path):
    mod = load_benchmark("probe_noise", "_probe_noise")
    out = tmp_path / "rows.jsonl"
    common = ["--model", "tiny", "--n", "4", "--steps", "2", "--seeds", "0", "1", "--out", str(out)]
    assert mod.main([*common, "--fixed-pool", "0", "--tag", "fixed"]) == 0
    assert mod.main([*common, "--tag", "own"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["tag"], r["seed"], r["pool_seed"]) for r in rows] == [
        ("fixed", 0, 0), ("fixed", 1, 0), ("own", 0, 0), ("own", 1, 1)]
    assert rows[0]["final"] == rows[2]["final"]  # same items, same seed: the same run
    assert rows[1]["final"] != rows[0]["final"] and len(rows[0]["eval"]) == 2  # step 0 and the last step
    with pytest.raises(SystemExit):
        mod.main([*common, "--n", "0"])


def test_probe_noise_summary_reads_final_and_tail_loss_per_tag(tmp_path, capsys):
    """--summary: per (tag, model) the mean and sd of the final loss and of the tail loss, the mean of the
    evaluations at step >= steps/2 (the script evaluates every 20 steps and at the end)."""
    mod = load_benchmark("probe_noise", "_probe_noise_s")
    rows = tmp_path / "rows.jsonl"
    # 50 steps: evaluations at 0, 20, 40, 50; the tail is steps 40 and 50
    rows.write_text("\n".join(json.dumps(dict(tag="a", model="m", steps=50, final=f, eval=[9.0, 5.0, t, f]))
                              for f, t in ((1.0, 3.0), (3.0, 5.0))) + "\n")
    assert mod.main(["--summary", str(rows)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == "| a | m | 2 | 2.000 (1.414) | 3.000 (1.414) |"
    with pytest.raises(SystemExit):  # neither --out nor --summary
        mod.main(["--model", "tiny"])


def test_probe_noise_by_step_reads_each_horizon_of_longer_runs(tmp_path, capsys):
    """--by-step: at every evaluation step (not 0), the base model's mean and sd over its runs, the other models'
    pooled, their gap and the gap over the base model's sd; a cooled-down run is left out (its curve is not a
    shorter run's), and a tag without both kinds of model is refused in one line."""
    mod = load_benchmark("probe_noise", "_probe_noise_b")
    rows = tmp_path / "rows.jsonl"
    # 40 steps: evaluations at 0, 20, 40
    runs = [("embedded", [9.0, 3.0, 1.0], 0), ("embedded", [9.0, 5.0, 2.0], 0), ("ck/a", [9.0, 4.0, 3.0], 0),
            ("ck/b", [9.0, 6.0, 4.0], 0), ("ck/b", [9.0, 0.0, 0.0], 8)]
    rows.write_text("\n".join(json.dumps(dict(tag="h", model=m, steps=40, cooldown=c, final=e[-1], eval=e))
                              for m, e, c in runs) + "\n")
    assert mod.main(["--summary", str(rows), "--by-step", "h"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # step 20: base 3, 5 -> mean 4, sd sqrt(2); checkpoints 4, 6 -> mean 5, sd sqrt(2); gap +1 = 0.71 base sd
    assert lines[2] == "| 20 | 4.000 (1.414, 2) | 5.000 (1.414, 2, 2) | +1.000 | +0.71 |"
    # step 40: base 1, 2 -> 1.5 (0.707); checkpoints 3, 4 -> 3.5 (0.707); gap +2 = 2.83 base sd
    assert lines[3] == "| 40 | 1.500 (0.707, 2) | 3.500 (0.707, 2, 2) | +2.000 | +2.83 |"
    assert len(lines) == 4
    with pytest.raises(SystemExit):
        mod.main(["--summary", str(rows), "--by-step", "other"])
    assert "needs constant-rate runs of the base model" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --by-step alone
        mod.main(["--by-step", "h"])


def _load_step_cost():
    mod = load_benchmark("demo_step_cost", "_demo_step_cost")
    return mod


def test_demo_step_cost_mean_ratio_sees_a_step_in_two_that_costs_double():
    """Replay every 2 steps makes every other step dearer: the ratio of means says 1.5 where the median of per-step
    ratios would say 1 or 2; identical repetitions give a zero-width interval."""
    mod = _load_step_cost()
    times = {"baseline": {r: [1.0, 1.0] for r in range(4)}, "replay": {r: [1.0, 2.0] for r in range(4)}}
    assert mod.mean_ratio(times, "replay", [0, 1, 2, 3]) == pytest.approx(1.5)
    assert mod.bootstrap_mean_ratio_ci(times, "replay") == pytest.approx((1.5, 1.5))
    times["replay"][3] = [3.0, 3.0]  # one slow repetition widens the interval upwards only
    lo, hi = mod.bootstrap_mean_ratio_ci(times, "replay")
    assert lo == pytest.approx(1.5) and hi > 2.0
    with pytest.raises(ValueError, match="NAME:FIELD=VALUE"):
        mod.parse_arm("replay_every=2")
    assert mod.parse_arm("r2:replay_every=2,replay_weight=1.0") == ("r2", {"replay_every": 2, "replay_weight": 1.0})


def test_demo_step_cost_times_the_demo_stage_with_the_arm_it_names(tmp_path, monkeypatch, capsys):
    """On the tiny model: every configuration gets a row of timed steps, and replay runs in the arm that asks for it
    (every 2 steps) and in no other trainer."""
    import threading
    from collections import Counter

    from supple.callbacks.replay import ReplayTerm

    calls: Counter = Counter()
    inner = ReplayTerm.step

    def counted(self, *a, **kw):
        calls[threading.current_thread().name] += 1
        return inner(self, *a, **kw)

    monkeypatch.setattr(ReplayTerm, "step", counted)
    mod = _load_step_cost()
    assert mod.main(["--model", "tiny", "--reps", "2", "--block", "2", "--warmup", "1", "--no-default", "--control",
                     "--arm", "r2:replay_every=2,replay_data=builtin:pydoc", "--out", str(tmp_path)]) == 0
    rows = {r["config"]: r for r in csv.DictReader((tmp_path / "demo_step_cost_tiny_sft.csv").open())}
    assert set(rows) == {"baseline", "control", "r2"} and all(int(r["timed_steps"]) == 4 for r in rows.values())
    assert calls["train-baseline"] == calls["train-control"] == 0
    assert 2 <= calls["train-r2"] <= 3  # steps 2 and 4 of 5 trained
    assert "replay_every" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mod.main(["--model", "tiny", "--arm", "default:replay_every=2"])


def _rec(seed, stage, idx, losses, acc, margin=None, probe=None, third_probe_seed=True):
    train = {"loss_final": losses[-1], "log_history": [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]}
    if margin is not None:
        train["rewards/margins_final"] = margin
    r = {"arm": "baseline", "seed": seed, "stage": stage, "stage_index": idx, "train": train,
         "tasks": {"arithmetic": {"acc": acc, "answer_ce": 1.0, "ece": 0.1}}}
    if probe is not None:  # per probe seed: seeds 0 and 1 at `probe`, a third one (a re-probe's) far off
        seeds, vals = ([0, 1, 2], [probe, probe, probe + 9.0]) if third_probe_seed else ([0, 1], [probe, probe])
        r["probes"] = {"word_codes": {"final_loss": sum(vals) / len(vals), "seeds": seeds,
                                      "per_seed": {"final_loss": vals}}}
    return r


def test_compare_reruns_finds_the_first_divergent_step_and_the_last_stage_spread(tmp_path, capsys):
    """Two constructed runs: stage sft equal at every step, stage dpo apart from step 3 on; the report names the
    step, each metric's values and the largest |B - A| at the last stage over seeds."""
    mod = load_benchmark("compare_reruns", "_test_compare_reruns")
    a = {"records": [_rec(0, "sft", 1, [3.0, 2.0, 1.0], 0.5), _rec(0, "dpo", 2, [0.7, 0.6, 0.5], 0.5, 0.9, 2.0),
                     _rec(1, "dpo", 2, [0.7, 0.6, 0.5], 0.25, 0.8, 2.2)]}
    b = {"records": [_rec(0, "sft", 1, [3.0, 2.0, 1.0], 0.5), _rec(0, "dpo", 2, [0.7, 0.6, 0.5 + 1e-6], 0.25, 0.6, 2.5,
                          third_probe_seed=False),
                     _rec(1, "dpo", 2, [0.7, 0.6, 0.5], 0.375, 0.8, 2.1, third_probe_seed=False),
                     {**_rec(0, "sft", 1, [9.0], 0.0), "arm": "supple"}]}
    for name, res in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    assert mod.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "aa.md")]) == 0
    res = mod.compare(a, b, "baseline")
    by = {(r["seed"], r["stage"]): r for r in res["rows"]}
    assert set(by) == {(0, "sft"), (0, "dpo"), (1, "dpo")}  # seed 1 has no sft in A; the supple arm is ignored
    assert by[0, "sft"]["diverges_at"] is None and by[0, "dpo"]["diverges_at"] == 3
    assert by[1, "dpo"]["diverges_at"] is None
    assert by[0, "dpo"]["metrics"]["acc/arithmetic"] == (0.5, 0.25)
    spread = res["last_stage_max_abs_diff"]
    assert spread["acc/arithmetic"] == pytest.approx(0.25)  # max(|0.25-0.5|, |0.375-0.25|)
    assert spread["train/rewards/margins_final"] == pytest.approx(0.3)
    assert spread["probe/word_codes (probe seeds 0,1)"] == pytest.approx(0.5)  # A's third probe seed is left out
    text = (tmp_path / "aa.md").read_text()
    assert "training losses first differ at step 3" in text and "no step (every logged step is equal)" in text
    assert text == capsys.readouterr().out
    with pytest.raises(SystemExit, match="share no"):
        mod.compare(a, b, "supple")
    other = mod.compare(a, b, "baseline", arm_b="supple", stages=["sft"])
    assert [(r["seed"], r["stage"], r["diverges_at"]) for r in other["rows"]] == [(0, "sft", 1)]


def test_no_benchmark_script_shadows_an_importable_module():
    """A script run as ``python benchmarks/x.py`` puts benchmarks/ first on sys.path, and spawned worker
    processes inherit that path: a script named like an installed distribution's module (``kernels``, which
    transformers >= 5.25 imports when it is installed) or a standard-library module replaces it there."""
    import importlib.metadata
    import sys

    taken = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names) | {"kernels"}
    clashes = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if p.stem in taken)
    assert not clashes, f"rename these benchmark scripts, their names shadow importable modules: {clashes}"
