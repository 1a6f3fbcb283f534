"""The demo's journal under ``--resume``: which finished jobs a run with other settings may reuse.

The base model's job evaluates the untrained model, so a run with other stage steps or learning rates reuses it;
every (seed, arm) job depends on them and reruns.
"""

from __future__ import annotations

import json

from supple.cli import main


def _argv(out, *extra):
    return ["demo", "--model", "tiny", "--preset", "smoke", "--stages", "sft", "--arms", "baseline", "--seeds", "1",
            "--out", str(out), "--no-progress", *extra]


def _lines(out):
    return [json.loads(ln) for ln in (out / "jobs.jsonl").read_text().splitlines()]


def _base_record(out):
    return next(r for r in json.loads((out / "results.json").read_text())["records"] if r["stage"] == "base")


def test_other_steps_and_lr_reuse_the_base_model_job_only(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(_argv(out)) == 0
    first, base = _lines(out), _base_record(out)
    assert [ln["arm"] for ln in first] == [None, "baseline"]
    capsys.readouterr()
    assert main(_argv(out, "--resume", "--steps", "sft=3", "--lr", "sft=3e-3")) == 0
    said = capsys.readouterr()
    # the run says, before it starts, what it takes from the journal and what it runs
    assert "resume: 1 finished job(s) taken from" in said.out + said.err
    assert "(base model); 1 to run" in said.out + said.err
    after = _lines(out)
    # one new line, the baseline's: the base model was not evaluated again
    assert after[:2] == first and [(ln["seed"], ln["arm"]) for ln in after[2:]] == [(0, "baseline")]
    assert _base_record(out) == base
    rerun = json.loads((out / "results.json").read_text())
    assert [s["steps"] for s in rerun["meta"]["stages"]] == [3]
    # the baseline trained under the new settings: its stage record differs from the first run's
    assert after[2]["out"]["records"] != first[1]["out"]["records"]


def test_other_probe_settings_rerun_the_base_model_job(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(_argv(out)) == 0
    first = _lines(out)
    assert main(_argv(out, "--resume", "--probe-seeds", "1")) == 0
    assert [ln["arm"] for ln in _lines(out)[len(first):]] == [None, "baseline"]


def test_a_base_model_line_signed_the_older_way_still_resumes(tmp_path, capsys):
    """Journals written before the base-model job had its own signature signed it like every job (with the
    stages' steps and learning rates): under the same settings they resume without rerunning anything."""
    out = tmp_path / "demo"
    assert main(_argv(out)) == 0
    lines = _lines(out)
    # with probe_seeds_base unset, the older base-model signature was the (seed, arm) jobs' own
    lines[0]["signature"] = lines[1]["signature"]
    (out / "jobs.jsonl").write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    assert main(_argv(out, "--resume")) == 0
    assert len(_lines(out)) == 2  # nothing reran
    # ... but not under other steps: an older line carries them, so it cannot tell that they do not matter
    assert main(_argv(out, "--resume", "--steps", "sft=3")) == 0
    assert [ln["arm"] for ln in _lines(out)[2:]] == [None, "baseline"]
