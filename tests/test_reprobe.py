"""benchmarks/reprobe_demo.py: re-measure one probe family on a finished demo's saved checkpoints.

A tiny-model smoke demo with ``--save-models`` is re-probed with another probe length; the re-probed family's
records must carry the new probe (its evaluation schedule ends at the new step count) while the training records
and the other probe families stay exactly as the demo wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .benchmark_module import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def _load_reprobe():
    mod = load_benchmark("reprobe_demo", "_test_reprobe_demo")
    return mod


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from supple.cli import main

    root = tmp_path_factory.mktemp("reprobe")
    out, models = root / "demo", root / "models"
    assert main(["demo", "--model", "tiny", "--preset", "smoke", "--arms", "baseline,l2_anchor", "--seeds", "1",
                 "--out", str(out), "--no-progress", "--save-models", str(models)]) == 0
    return root, out, models, json.loads((out / "results.json").read_text())


def test_reprobe_replaces_one_family_only(demo, capsys):
    root, out, models, before = demo
    probes = before["meta"]["families"]["probes"]
    family, other = probes[0], probes[1:]
    old_steps = before["records"][0]["probes"][family]["eval_steps"][-1]
    new_steps = old_steps + 3
    dest = root / "re"
    rc = _load_reprobe().main(["--demo", str(out), "--models", str(models), "--base", "tiny", "--family", family,
                               "--steps", str(new_steps), "--lr", "1e-3", "--probe-seeds", "3", "--warmup", "2",
                               "--clip", "1.0", "--out", str(dest)])
    assert rc == 0
    after = json.loads((dest / "results.json").read_text())
    meta = after["meta"]["reprobe"]
    assert meta["family"] == family and meta["probe_steps"] == new_steps
    assert meta["probe_warmup"] == 2 and meta["probe_max_grad_norm"] == 1.0
    assert any("re-measured" in n and "3 probe seeds per checkpoint" in n for n in after["meta"]["notes"])
    probed = [(a, b) for a, b in zip(before["records"], after["records"]) if family in (a.get("probes") or {})]
    assert probed and any(a["stage"] == "base" for a, _ in probed) and any(a["stage"] != "base" for a, _ in probed)
    for a, b in zip(before["records"], after["records"]):
        assert (a["seed"], a["arm"], a["stage"]) == (b["seed"], b["arm"], b["stage"])
        assert a["tasks"] == b["tasks"] and a["train"] == b["train"]  # training and evaluation untouched
        if family not in (a.get("probes") or {}):
            assert "probes" not in b or b["probes"] == a.get("probes")
            continue
        assert b["probes"][family]["eval_steps"][-1] == new_steps
        assert len(b["probes"][family]["per_seed"]["final_loss"]) == 3  # --probe-seeds 3
        for fam in other:
            assert b["probes"][fam] == a["probes"][fam]
        if a["probe"].get("family", probes[0]) == family:
            assert b["probe"] == b["probes"][family]
    # the same base model and probe seeds for every arm: the two arms' base records carry one measurement
    bases = [b["probes"][family]["final_loss"] for b in after["records"] if b["stage"] == "base"]
    assert len(set(bases)) == 1
    assert (dest / "summary.md").is_file() and (dest / "table.txt").is_file()
    # the measurement rows carried over as rows (not the demo's whole file nested in the new one)
    rows = json.loads((out / "measure_records.json").read_text())["records"]
    assert rows and json.loads((dest / "measure_records.json").read_text())["records"] == rows
    # the demo's own outputs are not modified
    assert json.loads((out / "results.json").read_text()) == before


def test_reprobe_missing_checkpoints_is_a_clear_error(demo, tmp_path, capsys):
    _, out, _, before = demo
    family = before["meta"]["families"]["probes"][0]
    with pytest.raises(SystemExit) as err:
        _load_reprobe().main(["--demo", str(out), "--models", str(tmp_path / "nowhere"), "--base", "tiny",
                              "--family", family, "--steps", "2", "--lr", "1e-3", "--out", str(tmp_path / "x")])
    assert err.value.code == 2
    assert "--save-models" in capsys.readouterr().err


def test_reprobe_adds_a_family_the_demo_did_not_probe(demo, tmp_path):
    import shutil

    root, out, models, before = demo
    family = "word_codes"
    # a demo run before this family existed: the same results without it
    old = tmp_path / "old"
    shutil.copytree(out, old)
    stripped = json.loads((out / "results.json").read_text())
    stripped["meta"]["families"]["probes"] = [p for p in stripped["meta"]["families"]["probes"] if p != family]
    for rec in stripped["records"]:
        (rec.get("probes") or {}).pop(family, None)
    (old / "results.json").write_text(json.dumps(stripped))
    dest = tmp_path / "re"
    assert _load_reprobe().main(["--demo", str(old), "--models", str(models), "--base", "tiny", "--family", family,
                                 "--steps", "3", "--lr", "1e-3", "--out", str(dest)]) == 0
    after = json.loads((dest / "results.json").read_text())
    assert after["meta"]["families"]["probes"][-1] == family
    assert after["meta"]["budget"]["probe_overrides"][family]["steps"] == 3
    for a, b in zip(stripped["records"], after["records"]):
        if not a.get("probes"):
            assert not b.get("probes")
            continue
        assert b["probes"][family]["eval_steps"][-1] == 3
        assert {k: v for k, v in b["probes"].items() if k != family} == a["probes"]
    assert f"probe {family}" in after["analysis"]["problem"]
    assert f"{family} 3 steps @ lr 0.001" in (dest / "summary.md").read_text()


def test_reanalyze_redoes_the_statistics_and_keeps_the_records(demo, tmp_path, capsys):
    """benchmarks/reanalyze_demo.py: the records are read back untouched; the analysis is this version's."""
    root, out, models, before = demo
    mod = load_benchmark("reanalyze_demo", "_test_reanalyze")
    stale = json.loads((out / "results.json").read_text())
    stale["analysis"] = {"stale": True}
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_text(json.dumps(stale))
    assert mod.main([str(old), "--out", str(tmp_path / "new")]) == 0
    after = json.loads((tmp_path / "new" / "results.json").read_text())
    assert after["records"] == before["records"]
    assert "stale" not in after["analysis"] and set(after["analysis"]["arms"]) == {"baseline", "l2_anchor"}
    assert after["meta"]["reanalysis"]["command"].startswith("python benchmarks/reanalyze_demo.py")
    assert (tmp_path / "new" / "summary.md").exists() and not (tmp_path / "new" / "measure_records.json").exists()
    assert "The problem" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mod.main([str(tmp_path / "nowhere")])
    assert "supple demo --out DIR" in capsys.readouterr().err


def test_reprobe_base_only_with_more_probe_seeds_then_base_from(demo, tmp_path, capsys):
    """--base-only re-probes the base model alone (here under 3 probe seeds, the first reproducing the recorded
    one); --base-from copies that base-model probe into another run; mismatched settings are refused."""
    root, out, models, before = demo
    family = "word_codes"
    steps, lr, every = 2, 1e-3, 1  # the smoke preset's word_codes settings, as the checkpoints ran them
    assert before["meta"]["budget"]["probe_overrides"][family] == {"steps": steps, "lr": lr, "eval_every": every}
    common = ["--models", str(models), "--base", "tiny", "--family", family, "--steps", str(steps), "--lr", str(lr),
              "--eval-every", str(every)]
    dest = tmp_path / "base16"
    assert _load_reprobe().main(["--demo", str(out), *common, "--base-only", "--base-probe-seeds", "3",
                                 "--out", str(dest)]) == 0
    assert "reproduce the recorded values" in capsys.readouterr().out
    after = json.loads((dest / "results.json").read_text())
    assert after["meta"]["reprobe"]["base_reproduced_within"] < 1e-6
    for a, b in zip(before["records"], after["records"]):
        if a["stage"] == "base":
            assert b["probes"][family]["seeds"] == [0, 1, 2]
            assert b["probes"][family]["per_seed"]["final_loss"][0] == pytest.approx(
                a["probes"][family]["per_seed"]["final_loss"][0], abs=1e-6)
        else:
            assert b.get("probes") == a.get("probes")  # the checkpoints keep their recorded values
    # the base model's probe copied from that run into another
    dest2 = tmp_path / "copied"
    assert _load_reprobe().main(["--demo", str(out), *common, "--base-from", str(dest), "--out", str(dest2)]) == 0
    assert "(base model 3)" in capsys.readouterr().out  # the copied probe's own count, not the default
    copied = json.loads((dest2 / "results.json").read_text())
    base_probe = next(r for r in copied["records"] if r["stage"] == "base")["probes"][family]
    assert base_probe["seeds"] == [0, 1, 2]
    # --base-only --base-from: nothing probed, the base model's probe spliced into the demo's own records
    dest3 = tmp_path / "spliced"
    assert _load_reprobe().main(["--demo", str(out), *common, "--base-only", "--base-from", str(dest), "--out",
                                 str(dest3)]) == 0
    printed = capsys.readouterr().out
    assert "0 checkpoint(s)" in printed and "base model only, 3 probe seeds" in printed
    spliced = json.loads((dest3 / "results.json").read_text())
    for a, b in zip(after["records"], spliced["records"]):
        assert a.get("probes") == b.get("probes")
    # --base-from with more --base-probe-seeds: only the missing seeds (3, 4) are probed, and the merged record is
    # the one a single run of all five seeds writes
    dest4 = tmp_path / "extended"
    assert _load_reprobe().main(["--demo", str(out), *common, "--base-only", "--base-from", str(dest),
                                 "--base-probe-seeds", "5", "--out", str(dest4)]) == 0
    assert "extended by probe seeds 3-4" in capsys.readouterr().out
    dest5 = tmp_path / "direct5"
    assert _load_reprobe().main(["--demo", str(out), *common, "--base-only", "--base-probe-seeds", "5",
                                 "--out", str(dest5)]) == 0
    ext, direct = (next(r for r in json.loads((d / "results.json").read_text())["records"]
                        if r["stage"] == "base")["probes"][family] for d in (dest4, dest5))
    assert ext["seeds"] == direct["seeds"] == [0, 1, 2, 3, 4]
    assert ext["per_seed"]["final_loss"] == pytest.approx(direct["per_seed"]["final_loss"], abs=1e-6)
    for key in ("final_loss", "start_loss", "area", "train_area", "relative_improvement", "final_loss_spread"):
        assert ext[key] == pytest.approx(direct[key], abs=1e-6), key
    assert ext["train_loss"] == pytest.approx(direct["train_loss"], abs=1e-6)
    with pytest.raises(SystemExit):  # fewer probe seeds than the copied record ran
        _load_reprobe().main(["--demo", str(out), *common, "--base-only", "--base-from", str(dest),
                              "--base-probe-seeds", "2", "--out", str(tmp_path / "bad")])
    assert "pass at least 3" in capsys.readouterr().err
    # refused: the base model probed other than the checkpoints were, or copied from a run with other settings
    for extra in (["--base-only"], ["--base-from", str(dest)]):
        with pytest.raises(SystemExit):
            _load_reprobe().main(["--demo", str(out), "--models", str(models), "--base", "tiny", "--family", family,
                                  "--steps", "3", "--lr", str(lr), *extra, "--out", str(tmp_path / "bad")])
        assert "other settings" in capsys.readouterr().err


def test_reanalyze_pools_runs_on_disjoint_seeds(demo, tmp_path, capsys):
    """--with: two runs of the same settings on other training seeds become one analysis over both."""
    from supple.cli import main

    root, out, models, before = demo
    other = tmp_path / "seed1"
    assert main(["demo", "--model", "tiny", "--preset", "smoke", "--arms", "baseline,l2_anchor", "--seeds", "1",
                 "--seed-offset", "1", "--out", str(other), "--no-progress"]) == 0
    mod = load_benchmark("reanalyze_demo", "_test_reanalyze_pool")
    pooled = tmp_path / "pooled"
    assert mod.main([str(out), "--with", str(other), "--out", str(pooled)]) == 0
    res = json.loads((pooled / "results.json").read_text())
    second = json.loads((other / "results.json").read_text())
    assert res["meta"]["seeds"] == [0, 1] and res["analysis"]["seeds"] == [0, 1]
    assert len(res["records"]) == len(before["records"]) + len(second["records"])
    assert {r["seed"] for r in res["records"] if r["stage"] != "base"} == {0, 1}
    assert any("pooled with the run" in n for n in res["meta"]["notes"])
    # the same training seed twice, a run of other settings, and no --out are refused
    for extra, msg in (([str(out), "--with", str(out), "--out", str(tmp_path / "x")], "disjoint training seeds"),
                       ([str(out), "--with", str(other)], "--out")):
        with pytest.raises(SystemExit):
            mod.main(extra)
        assert msg in capsys.readouterr().err
    changed = json.loads((other / "results.json").read_text())
    changed["meta"]["lora"] = not changed["meta"]["lora"]
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "results.json").write_text(json.dumps(changed))
    with pytest.raises(SystemExit):
        mod.main([str(out), "--with", str(odd), "--out", str(tmp_path / "y")])
    assert "differ in lora" in capsys.readouterr().err


def test_reprobe_reuse_probes_only_what_another_reprobe_lacks(demo, tmp_path, capsys):
    """--reuse DIR: the base model and the checkpoints another re-probe measured with the same settings and probe
    seeds are copied; only the rest is probed, and it equals what a full re-probe measures. Other settings are
    refused."""
    root, out, models, before = demo
    family = "word_codes"
    common = ["--demo", str(out), "--models", str(models), "--base", "tiny", "--family", family, "--steps", "3",
              "--lr", "1e-3", "--probe-seeds", "2"]
    part, full, both = tmp_path / "part", tmp_path / "full", tmp_path / "both"
    assert _load_reprobe().main([*common, "--arms", "baseline", "--out", str(part)]) == 0
    rows = json.loads((part / "measure_records.json").read_text())["records"]  # the kept arm's and the base model's
    assert {r["arm"] for r in rows} == {None, "baseline"} and any(r["arm"] is None for r in rows)
    assert _load_reprobe().main([*common, "--out", str(full)]) == 0
    capsys.readouterr()
    assert _load_reprobe().main([*common, "--reuse", str(part), "--out", str(both)]) == 0
    probed = [r for r in before["records"] if r.get("probes") and r["stage"] != "base"]
    n_anchor = sum(r["arm"] == "l2_anchor" for r in probed)
    assert n_anchor >= 1 and f"reprobe: {n_anchor} checkpoint(s)" in capsys.readouterr().out  # l2_anchor's only
    got = json.loads((both / "results.json").read_text())
    ref = json.loads((full / "results.json").read_text())
    old = {(r["seed"], r["arm"], r["stage"]): r for r in json.loads((part / "results.json").read_text())["records"]}
    assert got["meta"]["reprobe"]["reused"] == 1 + len(probed) - n_anchor  # the base model and baseline's
    for g, f in zip(got["records"], ref["records"]):
        if family not in (g.get("probes") or {}):
            continue
        mine, theirs = g["probes"][family], f["probes"][family]
        assert mine["per_seed"]["final_loss"] == pytest.approx(theirs["per_seed"]["final_loss"])
        if g["arm"] == "baseline" or g["stage"] == "base":
            key = (g["seed"], "baseline", g["stage"])
            assert mine == old[key]["probes"][family]  # copied, not re-measured
    # --reuse twice: the baseline's records from one re-probe, l2_anchor's from another; nothing left to probe
    other = tmp_path / "other"
    assert _load_reprobe().main([*common, "--arms", "l2_anchor", "--out", str(other)]) == 0
    capsys.readouterr()
    assert _load_reprobe().main([*common, "--reuse", str(part), "--reuse", str(other), "--out",
                                 str(tmp_path / "two")]) == 0
    assert "reprobe: 0 checkpoint(s)" in capsys.readouterr().out
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    for t, f in zip(two["records"], ref["records"]):
        if family in (t.get("probes") or {}):
            assert t["probes"][family]["per_seed"]["final_loss"] == pytest.approx(
                f["probes"][family]["per_seed"]["final_loss"])
    with pytest.raises(SystemExit):  # argparse keeps the last --lr
        _load_reprobe().main([*common, "--lr", "2e-3", "--reuse", str(part), "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert "--reuse" in err and "other settings" in err


def test_reanalyze_metric_tail_loss_reads_the_tail_where_the_final_loss_was(demo, tmp_path, capsys):
    """--metric tail_loss: every probe's mean, per-probe-seed values and spread are its tail loss's, the analysis
    is computed from them, and a note says so; without --out, or on a record that did not keep the tail per probe
    seed, it is refused."""
    _, out, _, before = demo
    mod = load_benchmark("reanalyze_demo", "_test_reanalyze_m")
    assert mod.main([str(out), "--metric", "tail_loss", "--out", str(tmp_path / "tail")]) == 0
    after = json.loads((tmp_path / "tail" / "results.json").read_text())
    for a, b in zip(before["records"], after["records"]):
        for fam, p in (a.get("probes") or {}).items():
            q = b["probes"][fam]
            assert q["final_loss"] == p["tail_loss"] and q["per_seed"]["final_loss"] == p["per_seed"]["tail_loss"]
            assert q["final_loss_spread"] == max(p["per_seed"]["tail_loss"]) - min(p["per_seed"]["tail_loss"])
    fam = before["meta"]["families"]["probes"][0]
    base = next(r for r in before["records"] if r["stage"] == "base")["probes"][fam]["tail_loss"]
    last = [r["probes"][fam]["tail_loss"] for r in before["records"]
            if r["arm"] == "baseline" and r["stage"] == before["meta"]["stages"][-1]["name"]]
    change = after["analysis"]["problem"][f"probe {fam}"]
    assert change["base"] == pytest.approx(base) and change["estimate"] == pytest.approx(sum(last) / len(last) - base)
    assert any("tail_loss" in n for n in after["meta"]["notes"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        mod.main([str(out), "--metric", "tail_loss"])
    assert "--out" in capsys.readouterr().err
    # a family one record kept no tail for keeps the final loss, and the note names it
    old = json.loads((out / "results.json").read_text())
    del old["records"][-1]["probes"][fam]["per_seed"]["tail_loss"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps(old))
    assert mod.main([str(tmp_path / "old"), "--metric", "tail_loss", "--out", str(tmp_path / "x")]) == 0
    mixed = json.loads((tmp_path / "x" / "results.json").read_text())
    assert [r["probes"][fam]["final_loss"] for r in mixed["records"] if r.get("probes")] == [
        r["probes"][fam]["final_loss"] for r in before["records"] if r.get("probes")]
    assert any(f"the final loss for {fam}" in n for n in mixed["meta"]["notes"])
    # no family with a tail in every record: refused
    for r in old["records"]:
        for p in (r.get("probes") or {}).values():
            p["per_seed"].pop("tail_loss", None)
    (tmp_path / "old" / "results.json").write_text(json.dumps(old))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        mod.main([str(tmp_path / "old"), "--metric", "tail_loss", "--out", str(tmp_path / "y")])
    assert "re-probe one" in capsys.readouterr().err


def test_reanalyze_pool_keeps_the_probe_seeds_every_checkpoint_ran():
    """Pooling a re-probe (probe seeds 0-3) with a run (0-1): each checkpoint keeps seeds 0-1, its means, spread
    and curve recomputed from them; the base model keeps its own; one seed in common is refused."""
    mod = load_benchmark("reanalyze_demo", "_test_reanalyze_shared")

    def probe(seeds, finals):
        return {"family": "f", "seeds": seeds, "final_loss": sum(finals) / len(finals), "start_loss": 9.0,
                "final_loss_spread": max(finals) - min(finals), "eval_loss": [0.0, 0.0],
                "per_seed": {"final_loss": finals, "start_loss": [9.0] * len(finals),
                             "eval_loss": [[9.0, v] for v in finals]}}

    records = [{"stage": "base", "probes": {"f": probe([0, 1, 2], [1.0, 2.0, 6.0])}},
               {"stage": "s", "probes": {"f": probe([0, 1, 2, 3], [2.0, 4.0, 8.0, 10.0])}},
               {"stage": "s", "probes": {"f": probe([0, 1], [3.0, 5.0])}}]
    notes = mod._shared_probe_seeds(records)
    first = records[1]["probes"]["f"]
    assert first["seeds"] == [0, 1] and first["per_seed"]["final_loss"] == [2.0, 4.0]
    assert first["final_loss"] == 3.0 and first["final_loss_spread"] == 2.0 and first["improvement"] == 6.0
    assert first["eval_loss"] == [9.0, 3.0]
    assert records[2]["probes"]["f"]["final_loss"] == 4.0  # already on the shared seeds: unchanged
    assert records[0]["probes"]["f"]["seeds"] == [0, 1, 2]  # the base model keeps its own
    assert len(notes) == 1 and "[0, 1]" in notes[0]
    records[2]["probes"]["f"] = probe([1, 5], [3.0, 5.0])
    with pytest.raises(ValueError, match="fewer than 2"):
        mod._shared_probe_seeds(records)


def test_reanalyze_joins_an_arm_run_alone_on_the_same_seeds(demo, tmp_path, capsys):
    """--join: a supple setting run alone on seeds 0-1 joins the first run's arms on seed 0, the seed both ran; the
    supple arm keeps its own settings and measure rows; --arms drops a first-run arm; mismatches are refused."""
    from supple.cli import main

    root, out, models, before = demo
    other = tmp_path / "supple_alone"
    assert main(["demo", "--model", "tiny", "--preset", "smoke", "--arms", "supple", "--seeds", "2",
                 "--supple", "replay_every=2", "--out", str(other), "--no-progress"]) == 0
    mod = load_benchmark("reanalyze_demo", "_test_reanalyze_join")
    joined = tmp_path / "joined"
    assert mod.main([str(out), "--arms", "baseline", "--join", str(other), "--out", str(joined)]) == 0
    res = json.loads((joined / "results.json").read_text())
    second = json.loads((other / "results.json").read_text())
    assert res["meta"]["arms"] == ["baseline", "supple"] and res["meta"]["seeds"] == [0]
    assert res["meta"]["supple_overrides"] == {"replay_every": 2}
    expect = [r for r in before["records"] if r["arm"] == "baseline"]
    expect += [r for r in second["records"] if r["seed"] == 0]
    assert len(res["records"]) == len(expect)
    assert {(r["arm"], r["seed"]) for r in res["records"]} == {("baseline", 0), ("supple", 0)}
    mine = {(r["stage"], r["arm"]): r for r in res["records"]}
    for r in expect:  # training records as their runs wrote them
        assert mine[(r["stage"], r["arm"])]["tasks"] == r["tasks"]
    rows = json.loads((joined / "measure_records.json").read_text())["records"]
    assert {(row["arm"], row["seed"]) for row in rows} == {(None, None), ("baseline", 0), ("supple", 0)}
    assert res["analysis"]["seeds"] == [0]
    # the same arms twice, no seed in common, a base model probed otherwise and pooled supple settings that differ
    late = json.loads((other / "results.json").read_text())
    late["meta"]["seeds"] = [7]
    for r in late["records"]:
        r["seed"] = 7
    moved = json.loads((other / "results.json").read_text())
    for r in moved["records"]:
        if r["stage"] == "base":
            for p in r["probes"].values():
                p["per_seed"]["final_loss"] = [v + 1.0 for v in p["per_seed"]["final_loss"]]
    for name, data in (("late", late), ("moved", moved)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(data))
    for extra, msg in (([str(out), "--join", str(out)], "no arm the first run lacks"),
                       ([str(out), "--join", str(tmp_path / "late")], "share no training seed"),
                       ([str(out), "--join", str(tmp_path / "moved")], "probe differs"),
                       ([str(joined), "--with", str(tmp_path / "late")], "supple arms differ"),
                       ([str(out), "--arms", "nope"], "no arm nope"),
                       ([str(out), "--join", str(other)], "--out")):
        late["meta"]["supple_overrides"] = {}
        (tmp_path / "late" / "results.json").write_text(json.dumps(late))
        with pytest.raises(SystemExit):
            mod.main(extra + (["--out", str(tmp_path / "x")] if msg != "--out" else []))
        assert msg in capsys.readouterr().err


def test_align_probes_tolerates_floating_point_noise_not_other_settings():
    """Base-model probes of two runs under one probe seed: 1e-4 apart (another session) is the same setup and is
    noted; 0.01 apart is refused. The probe with more probe seeds is kept for every base record."""
    mod = load_benchmark("reanalyze_demo", "_test_reanalyze_align")

    def base(finals):
        return {"stage": "base", "probes": {"f": {"family": "f", "seeds": list(range(len(finals))),
                                                   "final_loss": sum(finals) / len(finals),
                                                   "per_seed": {"final_loss": finals}}}}

    records = [base([1.0, 2.0]), base([1.0001, 2.0, 3.0])]
    notes = mod._align_probes(records)
    assert records[0]["probes"]["f"]["per_seed"]["final_loss"] == [1.0001, 2.0, 3.0]
    assert any("agree within 1.0e-04" in n for n in notes)
    with pytest.raises(ValueError, match="differs by 0.01"):
        mod._align_probes([base([1.0, 2.0]), base([1.01, 2.0])])


def test_reprobe_extend_probes_only_the_missing_seeds_of_each_checkpoint(demo, tmp_path, capsys):
    """--extend: a checkpoint whose own probe ran these settings under probe seeds 0..k-1 is probed under seeds k..
    only, and the merged record is the one a re-probe of every seed writes; a checkpoint that already ran every
    wanted seed is not probed at all. Other settings are refused."""
    root, out, models, before = demo
    family = "word_codes"
    steps, lr, every = 2, 1e-3, 1  # the smoke preset's word_codes settings, as the checkpoints ran them
    assert before["meta"]["budget"]["probe_overrides"][family] == {"steps": steps, "lr": lr, "eval_every": every}
    common = ["--demo", str(out), "--models", str(models), "--base", "tiny", "--family", family, "--steps", str(steps),
              "--lr", str(lr), "--eval-every", str(every)]
    probed = [r for r in before["records"] if r.get("probes") and r["stage"] != "base"]
    k = len(probed[0]["probes"][family]["per_seed"]["final_loss"])
    want = k + 2
    ext, full = tmp_path / "ext", tmp_path / "full"
    capsys.readouterr()
    assert _load_reprobe().main([*common, "--probe-seeds", str(want), "--extend", "--out", str(ext)]) == 0
    said = capsys.readouterr().out
    assert f"{len(probed)} checkpoint(s) extended from their recorded probe seeds" in said
    assert _load_reprobe().main([*common, "--probe-seeds", str(want), "--out", str(full)]) == 0
    got, ref = (json.loads((d / "results.json").read_text()) for d in (ext, full))
    assert got["meta"]["reprobe"]["extended"] == len(probed)
    for g, f, b in zip(got["records"], ref["records"], before["records"]):
        if g["stage"] == "base" or family not in (g.get("probes") or {}):
            continue
        mine, theirs = g["probes"][family], f["probes"][family]
        assert mine["seeds"] == theirs["seeds"] == list(range(want))
        assert mine["per_seed"]["final_loss"] == pytest.approx(theirs["per_seed"]["final_loss"], abs=1e-6)
        # the recorded seeds are kept as the demo measured them, not probed again
        assert mine["per_seed"]["final_loss"][:k] == b["probes"][family]["per_seed"]["final_loss"]
        for key in ("final_loss", "start_loss", "area", "final_loss_spread"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-6), key
    # as many probe seeds as recorded: nothing to probe but the base model
    capsys.readouterr()
    assert _load_reprobe().main([*common, "--probe-seeds", str(k), "--extend", "--out", str(tmp_path / "same")]) == 0
    assert "reprobe: 1 checkpoint(s)" in capsys.readouterr().out
    same = json.loads((tmp_path / "same" / "results.json").read_text())
    for s, b in zip(same["records"], before["records"]):
        if s["stage"] != "base" and family in (b.get("probes") or {}):
            assert s["probes"][family]["per_seed"] == b["probes"][family]["per_seed"]
    with pytest.raises(SystemExit):
        _load_reprobe().main([*common, "--steps", str(steps + 1), "--extend", "--out", str(tmp_path / "bad")])
    assert "--extend" in capsys.readouterr().err
