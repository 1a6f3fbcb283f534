"""The README's Python blocks run exactly as printed, on CPU, with a tiny random Llama.

The blocks name the objects a user brings (``model``, ``tokenizer``, ``ds``, ``base``, ``task_a``,
``task_b``); this test defines those and nothing else, then executes each block's text unchanged. The
trainer-arguments block parses ``sys.argv``: the test passes the command line printed in the block.
"""

from __future__ import annotations

import math
import re
import shlex
import sys
import types
from pathlib import Path

import pytest

from ._tiny import make_tiny_llama, make_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def _block(marker: str) -> str:
    found = [b for b in _blocks() if marker in b]
    assert len(found) == 1, f"expected one README python block containing {marker!r}, found {len(found)}"
    return found[0]


def _dataset(texts: list[str]):
    from datasets import Dataset

    return Dataset.from_dict({"text": texts})


def _user_objects() -> dict:
    tok = make_tokenizer()
    return {
        "tokenizer": tok,
        "model": make_tiny_llama(tok, seed=0),
        "base": make_tiny_llama(tok, seed=1),
        "ds": _dataset([f"the cat number {i} sat on the mat." for i in range(8)]),
        "task_a": _dataset([f"the dog number {i} ran to the park." for i in range(8)]),
        "task_b": _dataset([f"{i} plus {i} equals {2 * i}." for i in range(8)]),
    }


def _run(code: str, name: str, monkeypatch) -> dict:
    """Execute ``code`` as the body of an importable module (the Trainer pickles its ``args``, whose
    class the trainer-arguments block defines), with the user's objects predefined."""
    mod = types.ModuleType("readme_block")
    mod.__dict__.update(_user_objects())
    monkeypatch.setitem(sys.modules, "readme_block", mod)
    exec(compile(code, f"README.md ({name})", "exec"), mod.__dict__)
    return mod.__dict__


def _supple_logs(trainer) -> list[dict]:
    return [{k: v for k, v in h.items() if k.startswith("supple/")} for h in trainer.state.log_history]


def test_readme_python_blocks_are_the_ones_tested():
    blocks = _blocks()
    assert len(blocks) == 3, "a new README python block: give it a test here"
    for marker in ("cb = SuppleCallback(", "HfArgumentParser(MyConfig)", "previous_adapters="):
        _block(marker)


def test_quick_start_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _run(_block("cb = SuppleCallback("), "Quick start", monkeypatch)
    logs = [h for h in _supple_logs(ns["trainer"]) if h]
    assert logs, "no supple/* key reached trainer.state.log_history"
    for key in ("supple/diversity", "supple/decorrelation"):
        values = [h[key] for h in logs if key in h]
        assert values and all(math.isfinite(v) and v > 0 for v in values), key


def test_trainer_args_example_runs_with_its_printed_command_line(tmp_path, monkeypatch):
    code = _block("HfArgumentParser(MyConfig)")
    (line,) = [ln for ln in code.splitlines() if ln.startswith("# python train.py ")]
    argv = shlex.split(line.removeprefix("# python "))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", argv)
    ns = _run(code, "trainer arguments", monkeypatch)
    trainer = ns["trainer"]
    assert trainer.args.diversity_weight == pytest.approx(0.05)
    assert trainer.args.decorrelation_weight == pytest.approx(0.1)
    keys = {k for h in _supple_logs(trainer) for k in h}
    assert {"supple/diversity", "supple/decorrelation"} <= keys


def test_two_stage_example_runs_and_starts_outside_stage_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _run(_block("previous_adapters="), "two-stage", monkeypatch)
    assert (tmp_path / "stage1-adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "stage1-adapter" / "adapter_model.bin").exists()
    assert any((tmp_path / "stage1-subspace").glob("*.safetensors"))
    overlaps = [h["supple/cross_overlap"] for h in _supple_logs(ns["trainer2"]) if "supple/cross_overlap" in h]
    assert overlaps, "stage 2 logged no supple/cross_overlap"
    # r = 16 of d_in = 32 in the tiny model: a random start overlaps about 16/32; a copied start about 1
    assert overlaps[0] < 0.8
