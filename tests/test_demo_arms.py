"""The supple_last arm: supple in the last stage only. Its earlier stages are the baseline's, bit for bit, and its
last stage is the supple arm's under the per-stage overrides that switch supple off before the last stage (the
command docs/demo.md's "supple in the last stage only" runs)."""

from __future__ import annotations

import json

from supple.testbed.settings import ARM_TABLE, SUPPLE_ARM_DEFAULTS


def test_supple_last_arm_fields_are_the_documented_ones():
    arm = ARM_TABLE["supple_last"]
    assert arm.last_stage_only and not ARM_TABLE["supple"].last_stage_only
    # written from docs/demo.md: the default arm's fields, replay of 1 sequence every 2 steps at weight 1
    assert arm.supple == {"diversity_weight": 1.0, "diversity_penalty": "ipr", "diversity_layers": [-1],
                          "decorrelation_weight": 1.0, "decorrelation_cross_weight": 1.0,
                          "replay_data": "builtin:pydoc", "replay_weight": 1.0, "replay_every": 2,
                          "replay_batch_size": 1}
    assert SUPPLE_ARM_DEFAULTS["replay_every"] == 8  # the default arm is unchanged


def test_supple_last_equals_baseline_then_the_overridden_supple_arm(tmp_path):
    from supple.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--model", "tiny", "--preset", "smoke", "--stages", "sft,dpo", "--seeds", "1",
                 "--arms", "baseline,supple_last,supple", "--supple", "sft:diversity_weight=0",
                 "--supple", "sft:replay_data=None", "--supple", "dpo:replay_every=2",
                 "--supple", "dpo:replay_weight=1.0", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    rec = {(r["arm"], r["stage_index"]): r for r in res["records"] if r["seed"] == 0}
    used = res["meta"]["supple_configs"]
    assert "supple_last/seed0/sft" not in used or used["supple_last/seed0/sft"] is None  # no callback before
    assert used["supple_last/seed0/dpo"]["replay_every"] == 2 and used["supple_last/seed0/dpo"]["diversity_weight"] == 1

    def measured(r):
        return ({f: t.get("answer_ce") for f, t in r["tasks"].items()}, (r.get("probe") or {}).get("final_loss"))

    assert measured(rec[("supple_last", 1)]) == measured(rec[("baseline", 1)])
    assert measured(rec[("supple_last", 2)]) == measured(rec[("supple", 2)])
    assert measured(rec[("supple_last", 2)]) != measured(rec[("baseline", 2)])  # the last stage's terms act
