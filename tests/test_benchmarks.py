"""benchmarks/overhead.py on the tiny model: the anchored-diversity configuration runs through SFTTrainer, its
pre-stage reference is measured once per trainer (timed inside the callback) and every configuration gets a row.
The numbers themselves are not asserted (speed goals live in benchmarks/, not in timed tests)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_overhead_anchored_config_reports_its_reference(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("_test_overhead", REPO / "benchmarks" / "overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--configs", "baseline,diversity,anchored", "--reps", "2", "--block", "2", "--warmup", "1",
                     "--mem-steps", "0", "--own-reps", "3", "--out", str(tmp_path), "--tag", "t"]) == 0
    rows = {r["config"]: r for r in csv.DictReader((tmp_path / "overhead_tiny_t.csv").open())}
    assert set(rows) == {"baseline", "diversity", "anchored"}
    assert mod.REFERENCE_S.keys() == {"anchored"} and len(mod.REFERENCE_S["anchored"]) == 1
    assert float(rows["anchored"]["reference_once_s"]) > 0 and rows["diversity"]["reference_once_s"] == ""
    # the anchored term's own time is the plain term's plus the hinge
    assert float(rows["anchored"]["own_callback_ms"]) > float(rows["diversity"]["own_callback_ms"])
    assert "pre-stage reference (once, at train begin)" in capsys.readouterr().out
