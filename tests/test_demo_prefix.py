"""Shared stage prefixes (supple/testbed/prefix.py): an arm whose first stages train as the baseline's starts from the
baseline's checkpoint after them. What it must give is what training every stage again gives, to every digit."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from supple.testbed.prefix import load_weights, shared_stages
from supple.testbed.stages import Stage

_RUN = ["demo", "--model", "tiny", "--preset", "smoke", "--seeds", "1", "--no-progress"]


def _setup(arm_overrides=None, lora=False, n=3):
    stages = [Stage(name, kind, "arithmetic", 2, 1e-4) for name, kind in (("sft", "sft"), ("dpo", "dpo"),
                                                                        ("sft2", "sft"))][:n]
    return SimpleNamespace(stages=stages, arm_overrides=arm_overrides or {},
                           cfg=SimpleNamespace(lora=lora, save_models=None), workdir="/tmp/w")


def test_which_stages_an_arm_shares_with_the_baseline():
    off = {"sft:diversity_weight": 0, "sft:replay_data": None, "dpo:diversity_weight": 0, "dpo:replay_data": None}
    assert shared_stages(_setup(), "baseline") == 0
    assert shared_stages(_setup(), "supple_last") == 2  # full fine-tuning: no LoRA subspaces to carry
    # LoRA: its last stage's cross-stage decorrelation needs the earlier stages' update subspaces, which the
    # baseline's job does not keep; without that term it shares again
    assert shared_stages(_setup(lora=True), "supple_last") == 0
    no_cross = {"decorrelation_cross_weight": 0, "sft:decorrelation_weight": 0, "dpo:decorrelation_weight": 0}
    assert shared_stages(_setup({**no_cross, "sft:diversity_weight": 0, "sft:replay_data": None,
                                 "dpo:diversity_weight": 0, "dpo:replay_data": None}, lora=True), "supple") == 2
    assert shared_stages(_setup(), "supple") == 0  # its terms act from the first stage
    assert shared_stages(_setup(off), "supple") == 2  # every term switched off in sft and dpo
    assert shared_stages(_setup({"sft:diversity_weight": 0, "sft:replay_data": None}), "supple") == 1
    assert shared_stages(_setup(off, lora=True), "supple") == 0  # LoRA decorrelation still acts in sft
    assert shared_stages(_setup({**off, "sft:metrics_every": 5}), "supple") == 0  # a metric pass is a forward
    assert shared_stages(_setup(), "l2_anchor") == 0
    assert shared_stages(_setup(), "refresh_boundary") == 1  # Shrink & Perturb from the second stage on
    assert shared_stages(_setup(n=1), "supple_last") == 0  # one stage: nothing before it


def _measured(res: dict, arm: str) -> dict:
    out = {}
    for r in res["records"]:
        if r["arm"] == arm and r["stage"] != "base":
            train = r["train"] or {}
            out[r["stage"]] = (
                {f: (t["acc"], t["answer_ce"]) for f, t in r["tasks"].items()},
                r["ece"],
                (r.get("probe") or {}).get("final_loss"),
                r["geometry"],
                [(h.get("step"), h.get("loss")) for h in train.get("log_history", []) if "loss" in h],
            )
    return out


_LORA_LAST = ["--lora", "--supple", "decorrelation_cross_weight=0"] + [
    f"--supple={st}:{f}" for st in ("sft", "dpo") for f in ("diversity_weight=0", "replay_data=None",
                                                          "decorrelation_weight=0")]


@pytest.mark.parametrize(("workers", "arm", "extra"), [(1, "supple_last", []), (2, "supple_last", []),
                                                       (1, "supple", _LORA_LAST)])
def test_a_branching_arm_equals_training_every_stage_again(tmp_path, workers, arm, extra):
    from supple.cli import main

    runs = {}
    for flag in ([], ["--no-share-prefix"]):
        out = tmp_path / f"demo{len(flag)}"
        assert main([*_RUN, "--arms", f"baseline,{arm}", "--workers", str(workers), "--out", str(out), *extra,
                     *flag]) == 0
        runs[bool(flag)] = json.loads((out / "results.json").read_text())
    shared, full = runs[False], runs[True]
    assert shared["meta"]["shared_prefix"] == {arm: ["sft", "dpo"]}
    assert full["meta"]["shared_prefix"] == {}
    assert _measured(shared, arm) == _measured(full, arm)
    assert _measured(shared, "baseline") == _measured(full, "baseline")
    # the shared stages are marked, the branched stage is trained
    trains = {r["stage"]: r["train"] for r in shared["records"] if r["arm"] == arm and r["train"]}
    assert trains["sft"]["shared_with"] == "baseline" and trains["dpo"]["shared_with"] == "baseline"
    assert "shared_with" not in trains["sft2"]
    assert _measured(shared, arm)["sft2"] != _measured(shared, "baseline")["sft2"]  # supple acts there


def test_a_resumed_run_branches_from_a_saved_baseline(tmp_path):
    """The baseline finished in an earlier run under --save-models: an arm added under --resume with the same
    --save-models branches from its saved checkpoint; without it (no checkpoint) it trains every stage."""
    from supple.cli import main

    ref = tmp_path / "ref"
    assert main([*_RUN, "--arms", "baseline,supple_last", "--no-share-prefix", "--out", str(ref)]) == 0
    expected = _measured(json.loads((ref / "results.json").read_text()), "supple_last")
    for save in (True, False):
        out, models = tmp_path / f"run{save}", tmp_path / f"models{save}"
        extra = ["--save-models", str(models)] if save else []
        assert main([*_RUN, "--arms", "baseline", "--out", str(out), *extra]) == 0
        assert main([*_RUN, "--arms", "baseline,supple_last", "--resume", "--out", str(out), *extra]) == 0
        res = json.loads((out / "results.json").read_text())
        assert res["meta"]["shared_prefix"] == ({"supple_last": ["sft", "dpo"]} if save else {})
        assert _measured(res, "supple_last") == expected


def test_load_weights_copies_exactly_and_says_what_is_missing(tmp_path):
    import torch

    from ._tiny import make_tiny_llama

    torch.manual_seed(0)
    src, dst = make_tiny_llama(), make_tiny_llama()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    src.save_pretrained(tmp_path / "ck", safe_serialization=True)
    load_weights(dst, str(tmp_path / "ck"))
    for (name, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors in .*baseline's checkpoint"):
        load_weights(dst, str(tmp_path / "nothing"))
