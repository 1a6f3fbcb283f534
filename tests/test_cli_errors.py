"""The measure, probe and coverage paths: one-line CLI errors, no unpickling, no network."""

from __future__ import annotations

import json
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from supple.cli import main
from supple.measure import lora_factors
from supple.measure.adapters import PickleRefusedError, read_adapter

from ._tiny import make_tiny_llama, make_tokenizer

TEXTS = ["the cat sat on the mat.", "a quick brown fox jumps over the lazy dog!", "1 + 2 = 3", "hello world"] * 2


class _WritesAFile:
    """A pickle payload: unpickling it calls ``Path.write_text(marker, ...)``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def _evil_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps(_WritesAFile(marker)))
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A saved tiny base model (safetensors), a LoRA adapter of it, and text files."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("cli")
    tok = make_tokenizer()
    model = make_tiny_llama(tok)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    pm = get_peft_model(make_tiny_llama(tok), LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0))
    pm.save_pretrained(root / "adapter")
    cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(root / "base")
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    (root / "texts.txt").write_text("\n".join(TEXTS))
    return root


def _run(capsys, argv: list[str]) -> tuple[int, list[str]]:
    """Exit status and stderr lines, without progress bars (transformers draws one while loading weights)."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    return rc, [ln for ln in lines if ln.strip() and "it/s]" not in ln and "%|" not in ln]


def _assert_one_line(rc, err, command: str, *needles: str) -> None:
    assert rc == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(f"supple {command}: error: "), err
    for needle in needles:
        assert needle in err[0], err


def _cases(d: Path, out: Path) -> list[tuple[str, list[str], tuple[str, ...]]]:
    t = str(d / "texts.txt")
    return [
        ("measure", ["measure", "/nonexistent", "--out", str(out)], ("/nonexistent",)),
        ("measure", ["measure", str(d / "base"), "--data", "/no/such.txt", "--out", str(out)], ("/no/such.txt",)),
        ("measure", ["measure", str(d / "base"), "--batch-size", "0", "--out", str(out)], ("--batch-size",)),
        ("measure", ["measure", str(d / "base"), "--max-tokens", "many", "--out", str(out)], ("--max-tokens",)),
        ("measure", ["measure", str(d / "base"), "--data", t, "--layers", "7", "--out", str(out), "--no-progress"],
         ("layer 7",)),
        ("measure", ["measure", str(d / "base")], ("--out",)),
        ("probe", ["probe", "/nonexistent"], ("/nonexistent",)),
        ("probe", ["probe", str(d / "base"), "--task", "/no/task.jsonl"], ("/no/task.jsonl",)),
        ("probe", ["probe", str(d / "base"), "--steps", "0"], ("--steps",)),
        ("probe", ["probe", str(d / "base"), "--lr", "-1"], ("--lr",)),
        ("demo", ["demo", "--model", "tiny", "--steps", "sft=0", "--out", str(out)], ("--steps sft=0",)),
        ("demo", ["demo", "--model", "tiny", "--lr", "sft=2", "--out", str(out)], ("--lr sft=2",)),
        ("demo", ["demo", "--model", "tiny", "--lr", "ppo=1e-4", "--out", str(out)], ("sft, dpo or grpo",)),
        ("demo", ["demo", "--model", "tiny", "--arms", "nope", "--out", str(out)], ("'nope'",)),
        ("demo", ["demo", "--model", "tiny", "--seeds", "0", "--out", str(out)], ("--seeds",)),
        ("demo", ["demo", "--model", "tiny", "--probe-seeds", "0", "--out", str(out)], ("--probe-seeds 0",)),
        ("demo", ["demo", "--model", "tiny", "--base-probe-seeds", "0", "--out", str(out)], ("--base-probe-seeds 0",)),
        ("coverage", ["coverage", "/nonexistent", "a", "b"], ("unrecognized arguments",)),
        ("coverage", ["coverage", "/nonexistent", t, "--model", str(d / "base")], ("/nonexistent",)),
        ("coverage", ["coverage", t, t, "--model", "/nonexistent"], ("/nonexistent",)),
        ("coverage", ["coverage", t, t, "--model", str(d / "base"), "--k", "0"], ("--k",)),
        ("coverage", ["coverage", t, t, "--model", str(d / "base"), "--layer", "5"], ("--layer 5",)),
    ]


def test_every_user_error_is_one_line_and_exit_2(dirs, tmp_path, capsys):
    for command, argv, needles in _cases(dirs, tmp_path / "out"):
        rc, err = _run(capsys, argv)
        _assert_one_line(rc, err, command, *needles)


def test_debug_shows_the_traceback(dirs, tmp_path, capsys):
    with pytest.raises(FileNotFoundError):
        main(["measure", "/nonexistent", "--out", str(tmp_path), "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["--debug", "probe", "/nonexistent"])


def test_the_installed_command_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "supple.cli", "measure", "/nonexistent", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("supple measure: error: ") and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ no pickle
def test_a_pickled_adapter_is_refused_and_never_unpickled(dirs, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "marker.txt"
    # the payload is live: unpickling it really writes the marker
    pickle.loads(pickle.dumps(_WritesAFile(tmp_path / "live.txt")))
    assert (tmp_path / "live.txt").exists()

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    bad = tmp_path / "bin-adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((dirs / "adapter" / "adapter_config.json").read_text())
    _evil_pickle(bad / "adapter_model.bin", marker)
    bad_model = tmp_path / "bin-model"
    bad_model.mkdir()
    (bad_model / "config.json").write_text((dirs / "base" / "config.json").read_text())
    _evil_pickle(bad_model / "pytorch_model.bin", marker)
    texts = str(dirs / "texts.txt")
    hint = "safe_serialization=True"
    for spec in (bad, bad_model):
        rc, err = _run(capsys, ["measure", str(dirs / "base"), str(spec), "--data", texts, "--out",
                                str(tmp_path / "o"), "--no-progress", "--no-plots", "--max-texts", "2"])
        _assert_one_line(rc, err, "measure", str(spec), hint)
        _assert_one_line(*_run(capsys, ["probe", str(spec), "--steps", "1"]), "probe", hint)
        _assert_one_line(*_run(capsys, ["coverage", texts, texts, "--model", str(spec)]), "coverage", hint)
    with pytest.raises(PickleRefusedError, match=hint):
        lora_factors(bad)
    with pytest.raises(PickleRefusedError, match=hint):
        read_adapter(bad)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------- no network
@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a connection is recorded and fails."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_HUB_OFFLINE")  # absent, as for a user; restored afterwards
    return attempts


def test_a_hub_base_model_is_refused_without_a_connection(dirs, tmp_path, capsys, no_network):
    hub = tmp_path / "hub-adapter"
    hub.mkdir()
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (hub / f).write_bytes((dirs / "adapter" / f).read_bytes())
    cfg = json.loads((hub / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M"
    (hub / "adapter_config.json").write_text(json.dumps(cfg))
    rc, err = _run(capsys, ["measure", str(hub), "--out", str(tmp_path / "o")])
    _assert_one_line(rc, err, "measure", "HuggingFaceTB/SmolLM2-135M", "not a local directory")
    rc, err = _run(capsys, ["probe", str(hub), "--steps", "1"])
    _assert_one_line(rc, err, "probe", "not a local directory")
    rc, err = _run(capsys, ["coverage", "/x", "/y", "--model", "HuggingFaceTB/SmolLM2-135M"])
    _assert_one_line(rc, err, "coverage")
    assert no_network == []


def test_measure_probe_and_coverage_run_without_a_connection(dirs, tmp_path, capsys, no_network):
    texts = str(dirs / "texts.txt")
    base, adapter = str(dirs / "base"), str(dirs / "adapter")
    common = ["--no-progress", "--device", "cpu"]
    assert main(["measure", base, adapter, "--data", texts, "--out", str(tmp_path / "m"), "--no-plots",
                 "--max-length", "16", *common]) == 0
    assert main(["probe", adapter, "--steps", "1", "--n-train", "4", "--n-eval", "2", *common]) == 0
    assert main(["coverage", texts, texts, "--model", adapter, "--k", "2"]) == 0
    assert no_network == []
    doc = json.loads((tmp_path / "m" / "measure.json").read_text())
    assert {r["model"] for r in doc["records"]} == {"base", "adapter"}


def test_the_safetensors_reader_attaches_the_adapter_as_peft_does(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from supple.measure.adapters import load_peft_adapter

    tok = make_tokenizer()
    pm = get_peft_model(make_tiny_llama(tok), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "ad")
    ids = torch.tensor([tok("hello world")["input_ids"]])
    ours = load_peft_adapter(make_tiny_llama(tok), tmp_path / "ad")
    theirs = PeftModel.from_pretrained(make_tiny_llama(tok), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        plain = make_tiny_llama(tok).eval()(ids).logits
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits)
    assert not torch.allclose(ours(ids).logits, plain)  # the adapter is attached and acts
    wrong = make_tiny_llama(tok, hidden_size=16, intermediate_size=32)
    with pytest.raises(ValueError, match="does not fit its base model"):
        load_peft_adapter(wrong, tmp_path / "ad")


def test_demo_lr_overrides_the_chosen_regime_only(monkeypatch, tmp_path):
    import supple.testbed.pipeline as pipeline

    seen = {}

    def fake_run_demo(cfg):
        seen["cfg"] = cfg
        raise ValueError("stop here")

    monkeypatch.setattr(pipeline, "run_demo", fake_run_demo)
    default = pipeline.PRESETS["default"]
    assert main(["demo", "--model", "tiny", "--lr", "sft=1e-4", "--lr", "dpo=3e-5", "--out", str(tmp_path)]) == 2
    b = seen["cfg"].budget
    assert b.lr_full == {**default.lr_full, "sft": 1e-4, "dpo": 3e-5}
    assert b.lr_lora == default.lr_lora
    assert main(["demo", "--model", "tiny", "--lora", "--lr", "sft=1e-3", "--out", str(tmp_path)]) == 2
    b = seen["cfg"].budget
    assert b.lr_lora["sft"] == 1e-3 and b.lr_full == default.lr_full
    assert main(["demo", "--model", "tiny", "--probe-seeds", "5", "--out", str(tmp_path)]) == 2
    b = seen["cfg"].budget
    assert b.probe_seeds == 5 and default.probe_seeds == 2 and b.probe_overrides == default.probe_overrides
    assert b.for_base_model().probe_seeds == 5  # the base model as the checkpoints, unless told otherwise
    assert main(["demo", "--model", "tiny", "--base-probe-seeds", "8", "--out", str(tmp_path)]) == 2
    b = seen["cfg"].budget
    assert (b.probe_seeds, b.probe_seeds_base, b.for_base_model().probe_seeds) == (2, 8, 8)


def test_full_preset_is_the_documented_regime_that_loses_plasticity(monkeypatch, tmp_path):
    """--full runs the stages and probes of the 240 / 60 / 120 pilot (docs/demo.md): the default budget's fields
    with those steps, 4 probe seeds per checkpoint and 16 for the base model, and nothing else changed."""
    import supple.testbed.pipeline as pipeline

    seen = {}

    def fake_run_demo(cfg):
        seen["cfg"] = cfg
        raise ValueError("stop here")

    monkeypatch.setattr(pipeline, "run_demo", fake_run_demo)
    assert main(["demo", "--model", "tiny", "--full", "--out", str(tmp_path)]) == 2
    full, default = seen["cfg"].budget, pipeline.PRESETS["default"]
    assert {k: full.steps[k] for k in ("sft", "dpo", "sft2")} == {"sft": 240, "dpo": 60, "sft2": 120}
    assert (full.probe_seeds, full.probe_seeds_base, len(seen["cfg"].seeds)) == (4, 16, 3)
    same = [f for f in default.__dataclass_fields__ if f not in ("name", "steps", "probe_seeds", "probe_seeds_base")]
    assert {f: getattr(full, f) for f in same} == {f: getattr(default, f) for f in same}
    assert full.for_base_model().probe_seeds == 16


def test_demo_says_on_screen_what_its_budget_can_show(monkeypatch, tmp_path, capsys):
    """The default budget says before it starts that it shows no loss of plasticity and which stages do; --quick
    says it is too short; a run with its own --steps, --lr or --lora gets neither line."""
    import supple.testbed.pipeline as pipeline

    def fake_run_demo(cfg):
        raise ValueError("stop here")

    monkeypatch.setattr(pipeline, "run_demo", fake_run_demo)
    said = {}
    for name, extra in (("default", []), ("quick", ["--quick"]), ("steps", ["--steps", "sft=240"]),
                        ("lora", ["--lora"]), ("lr", ["--lr", "sft=2e-4"])):
        assert main(["demo", "--model", "tiny", *extra, "--out", str(tmp_path)]) == 2
        said[name] = capsys.readouterr().out
    assert "no probe shows a loss of plasticity" in said["default"] and "--steps sft=240" in said["default"]
    assert "too short for the baseline" in said["quick"] and "no probe shows" not in said["quick"]
    assert all("no probe shows" not in said[k] for k in ("steps", "lora", "lr"))
