"""DDP on CPU (gloo, 2 processes): every rank ends with the same parameters, and where a 1-process run at
the same global batch does, for each refresh method (ReDo's dormant units are decided on pooled statistics), with
the diversity term anchored to a pre-stage reference pooled over the ranks and its automatic weight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
PORTS = {"shrink_perturb": 29533, "relora": 29534, "redo": 29535}


def _run(cmd) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]


def _close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{what}: {k}: {m}")


@pytest.mark.parametrize("method", sorted(PORTS))
def test_ddp_ranks_agree_and_equal_one_process(tmp_path, method):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _run([sys.executable, "tests/ddp_worker.py", str(single), "2", method])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
          str(PORTS[method]), "tests/ddp_worker.py", str(ddp), "1", method])
    one = load_file(str(single / "params_rank0.safetensors"))
    r0, r1 = (load_file(str(ddp / f"params_rank{r}.safetensors")) for r in (0, 1))
    _close(r0, r1, "rank 1 vs rank 0")
    _close(one, r0, "DDP vs one process")
    logs = json.loads((ddp / "log.json").read_text())
    assert logs[-1]["supple/refreshes"] >= 1
    logs_one = json.loads((single / "log.json").read_text())
    for key in ("supple/diversity_reference", "supple/diversity_weight"):  # one threshold and λ on every rank
        assert [h[key] for h in logs] == pytest.approx([h[key] for h in logs_one], rel=1e-4), key
    if method == "redo":
        assert sum(h.get("supple/redo_units", 0) for h in logs) > 0, "no unit was recycled: the test has no teeth"
