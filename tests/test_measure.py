"""The measurement suite on tiny random models: metrics, comparisons, LoRA spectra, probe and the CLI."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from supple.measure import (
    adapter_overlap,
    brier_score,
    compare_checkpoints,
    expected_calibration_error,
    find_decoder_blocks,
    find_final_norm,
    load_builtin_corpus,
    load_probe_task,
    lora_factors,
    lora_update_spectra,
    measure_model,
    next_token_stats,
    plasticity_probe,
)
from tests._tiny import make_tiny_llama, make_tokenizer

TEXTS = [
    "the cat sat on the mat.",
    "a quick brown fox jumps over the lazy dog!",
    "1 + 2 = 3, and 2 * 3 = 6.",
    "hello world",
    "x",  # a single token: skipped (nothing to predict)
    "python is a programming language; it reads well.",
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    return make_tiny_llama(tok).eval()


def _peft(model, seed=1, r=4, targets=("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return pm


# --------------------------------------------------------------------------------------- calibration
def test_ece_of_perfectly_calibrated_predictions_is_zero():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(200_000, generator=g)
    correct = torch.rand(200_000, generator=g) < conf
    assert expected_calibration_error(conf, correct).item() < 0.01
    # always 90 % sure, right 60 % of the time
    conf = torch.full((1000,), 0.9)
    correct = torch.arange(1000) < 600
    assert expected_calibration_error(conf, correct).item() == pytest.approx(0.3)
    assert expected_calibration_error(torch.ones(5), torch.ones(5)).item() == 0


def test_brier_and_next_token_stats():
    k = 7
    target = torch.tensor([0, 3, 6])
    assert brier_score(torch.nn.functional.one_hot(target, k).float(), target).item() == pytest.approx(0)
    assert brier_score(torch.full((3, k), 1 / k), target).item() == pytest.approx(1 - 1 / k)
    st = next_token_stats(torch.zeros(3, k), target)  # uniform predictions
    torch.testing.assert_close(st["entropy"], torch.full((3,), math.log(k)))
    torch.testing.assert_close(st["confidence"], torch.full((3,), 1 / k))
    torch.testing.assert_close(st["nll"], torch.full((3,), math.log(k)))
    torch.testing.assert_close(st["brier"], torch.full((3,), 1 - 1 / k))
    sharp = torch.full((3, k), -1e4).scatter(1, target[:, None], 0.0)
    st = next_token_stats(sharp, target, chunk=2)
    assert st["correct"].tolist() == [1, 1, 1]
    assert st["nll"].abs().max() < 1e-4


# ---------------------------------------------------------------------------------------- structure
def test_find_decoder_blocks_llama_gpt2_peft(llama, tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    assert find_decoder_blocks(llama) == ("model.layers", llama.model.layers)
    assert len(find_decoder_blocks(llama)[1]) == 2
    assert find_final_norm(llama) is llama.model.norm
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_positions=64))
    assert find_decoder_blocks(gpt2)[1] is gpt2.transformer.h
    assert find_final_norm(gpt2) is gpt2.transformer.ln_f
    pm = _peft(make_tiny_llama(tok))
    assert find_decoder_blocks(pm)[1] is pm.get_base_model().model.layers


# -------------------------------------------------------------------------------------- measurement
def _by(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def test_measure_model_records(llama, tok):
    rows = measure_model(llama, tok, TEXTS, batch_size=4, max_length=32, progress=False)
    lengths = [min(len(tok(t)["input_ids"]), 32) for t in TEXTS]
    n_seq = sum(n >= 2 for n in lengths)
    n_all = sum(n for n in lengths if n >= 2)
    geo = _by(rows, group="geometry")
    assert {r["layer"] for r in geo} == {0, 1}
    assert {(r["tokens"], r["space"]) for r in geo} == {
        ("all", "raw"),
        ("all", "unit"),
        ("no_sink", "raw"),
        ("no_sink", "unit"),
    }
    assert {r["n"] for r in _by(geo, tokens="all")} == {n_all}
    assert {r["n"] for r in _by(geo, tokens="no_sink")} == {n_all - n_seq}
    for r in _by(geo, metric="erank_ratio"):
        assert 0 < r["value"] <= 1
    # the last block's logit lens is the model's own output
    lens = _by(rows, metric="lens_agreement", layer=1)
    assert lens and all(r["value"] == pytest.approx(1.0) for r in lens)
    logits = {r["metric"]: r["value"] for r in _by(rows, group="logits")}
    assert set(logits) == {"nll", "perplexity", "entropy", "top1_prob", "accuracy", "ece", "brier"}
    assert logits["perplexity"] == pytest.approx(math.exp(logits["nll"]))
    assert _by(rows, group="logits")[0]["n"] == n_all - n_seq
    assert all(math.isfinite(r["value"]) for r in rows if r["group"] != "lora")
    traj = _by(rows, metric="trajectory_length", tokens="all", space="raw")[0]["value"]
    steps = sum(r["value"] for r in _by(rows, metric="step_length", tokens="all", space="raw"))
    assert traj == pytest.approx(steps)
    # a layer subset and a token budget
    sub = measure_model(llama, tok, TEXTS, layers=[-1], max_tokens=20, progress=False)
    assert {r["layer"] for r in _by(sub, group="geometry")} == {1}
    assert {r["n"] for r in _by(sub, group="geometry", tokens="all")} == {20}


def test_measure_gpt2_generic(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_positions=64)
    ).eval()
    rows = measure_model(gpt2, tok, TEXTS[:3], progress=False)
    assert {r["layer"] for r in _by(rows, group="geometry")} == {0, 1, 2}
    assert _by(rows, metric="lens_agreement", layer=2, tokens="all")[0]["value"] == pytest.approx(1.0)


def test_identical_checkpoints_have_cka_one(llama, tok):
    rows = compare_checkpoints(llama, llama, tok, TEXTS, names=("a", "b"), progress=False, max_length=32)
    cka = _by(rows, metric="linear_cka")
    assert len(cka) == 2 * 2 * 2  # layers × token sets × spaces
    assert all(r["value"] == pytest.approx(1.0, abs=1e-6) for r in cka)
    deltas = _by(rows, group="delta")
    assert deltas and all(abs(r["value"]) < 1e-9 for r in deltas if math.isfinite(r["value"]))
    other = make_tiny_llama(tok, seed=5).eval()
    cka2 = _by(compare_checkpoints(llama, other, tok, TEXTS, progress=False), metric="linear_cka")
    assert all(r["value"] < 0.999 for r in cka2)


def test_lora_spectra_and_overlap(tok, tmp_path):
    pm = _peft(make_tiny_llama(tok))
    rows = lora_update_spectra(pm, name="ad")
    assert {(r["layer"], r["module"]) for r in rows} == {
        (k, m) for k in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj")
    }
    # against the dense ΔW from PEFT
    mod = pm.get_base_model().model.layers[0].self_attn.q_proj
    dw = mod.get_delta_weight("default").double()
    sv = torch.linalg.svdvals(dw)
    sr = _by(rows, layer=0, module="self_attn.q_proj", metric="stable_rank")[0]["value"]
    assert sr == pytest.approx(((sv**2).sum() / sv[0] ** 2).item(), rel=1e-5)
    # a saved adapter directory gives the same factors without a base model
    pm.save_pretrained(tmp_path / "ad")
    live, saved = lora_factors(pm), lora_factors(tmp_path / "ad")
    assert set(live) == set(saved)
    for k in live:
        torch.testing.assert_close(live[k].a, saved[k].a)
        assert live[k].scaling == pytest.approx(saved[k].scaling)
    same = adapter_overlap(pm, tmp_path / "ad")
    assert same and all(r["value"] == pytest.approx(1.0, abs=1e-6) for r in same)
    other = adapter_overlap(pm, _peft(make_tiny_llama(tok), seed=7))
    assert all(0 <= r["value"] < 0.99 for r in other)
    # input subspaces given directly: ΔW's own right singular space, and its complement
    name = "model.layers.0.self_attn.q_proj"
    u = torch.linalg.svd(live[name].a.double(), full_matrices=True)[2].T  # d_in × d_in
    inside = adapter_overlap(pm, {name: u[:, :4]})
    outside = adapter_overlap(pm, {name: u[:, 4:]})
    assert inside[0]["value"] == pytest.approx(1.0, abs=1e-6) and outside[0]["value"] == pytest.approx(
        0.0, abs=1e-6
    )


def test_lora_factors_name_the_adapter_and_warn_about_unsupported_layers(tok):
    from peft import LoraConfig

    pm = _peft(make_tiny_llama(tok))
    pm.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], lora_dropout=0.0))
    q0 = pm.get_base_model().model.layers[0].self_attn.q_proj
    second = lora_factors(pm, adapter_name="second")
    assert set(second) == {f"model.layers.{k}.self_attn.q_proj" for k in (0, 1)}
    f = second["model.layers.0.self_attn.q_proj"]
    assert torch.equal(f.a, q0.lora_A["second"].weight.detach()) and f.scaling == 3.0
    assert lora_factors(pm)["model.layers.0.self_attn.q_proj"].a.shape[0] == 4  # the active adapter
    emb = _peft(make_tiny_llama(tok), targets=("q_proj", "embed_tokens"))
    with pytest.warns(UserWarning, match="embed_tokens.*embedding"):
        names = set(lora_factors(emb))
    assert names == {f"model.layers.{k}.self_attn.q_proj" for k in (0, 1)}


def test_pad_token_batch_labels_follow_the_mask_and_label_starts():
    from supple.data import pad_token_batch

    b = pad_token_batch([[5, 6, 7], [8, 9]], pad_id=1, label_starts=[2, 0])
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[-100, -100, 7], [8, 9, -100]]
    assert pad_token_batch([[5, 6, 7], [8, 9]], pad_id=1)["labels"].tolist() == [[5, 6, 7], [8, 9, -100]]


# ------------------------------------------------------------------------------------ corpus, probe
def test_builtin_corpus_is_deterministic():
    a, b = load_builtin_corpus(), load_builtin_corpus()
    assert a == b and len(a) > 100
    assert all(len(t) >= 200 for t in a)
    short = load_builtin_corpus(limit=5, max_chars=120)
    assert len(short) == 5 and all(len(t) <= 120 for t in short)


def test_probe_is_deterministic_and_learns(tok):
    train, held = load_probe_task("builtin:reverse", n_train=16, n_eval=8)
    assert not set(train) & set(held)
    model = make_tiny_llama(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(steps=4, lr=1e-2, rank=4, batch_size=8, max_length=48, seed=3, eval_every=2, progress=False)
    r1 = plasticity_probe(model, tok, train, held, **kw)
    r2 = plasticity_probe(model, tok, train, held, **kw)
    assert r1["train_loss"] == r2["train_loss"] and r1["eval_loss"] == r2["eval_loss"]
    assert r1["eval_steps"] == [0, 2, 4]
    assert r1["improvement"] == pytest.approx(r1["start_loss"] - r1["final_loss"])
    assert r1["improvement"] > 0
    assert min(r1["eval_loss"]) <= r1["area"] <= max(r1["eval_loss"])
    assert r1["tail_loss"] == pytest.approx((r1["eval_loss"][1] + r1["eval_loss"][2]) / 2)  # steps 2 and 4 of 4
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_probe_warmup_and_clipping(tok, monkeypatch):
    """``warmup_steps`` gives step k the learning rate lr·min(1, k/W); ``max_grad_norm`` caps the total gradient
    norm the optimizer sees; the defaults leave a constant lr and unclipped gradients; bad values are refused."""
    train, held = load_probe_task("builtin:reverse", n_train=16, n_eval=8)
    seen: list[tuple[float, float]] = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append((self.param_groups[0]["lr"], float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(x) for x in grads])))))
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    kw = dict(steps=6, lr=1e-2, rank=4, batch_size=8, max_length=48, seed=3, eval_every=3, progress=False)
    plain = plasticity_probe(make_tiny_llama(tok), tok, train, held, **kw)
    plain_seen, seen[:] = list(seen), []
    tamed = plasticity_probe(make_tiny_llama(tok), tok, train, held, warmup_steps=4, max_grad_norm=1e-3, **kw)
    assert [lr for lr, _ in plain_seen] == [1e-2] * 6
    assert [lr for lr, _ in seen] == pytest.approx([1e-2 * k / 4 for k in (1, 2, 3, 4)] + [1e-2, 1e-2])
    assert min(n for _, n in plain_seen) > 1e-3  # so the clip below is active
    assert all(n <= 1e-3 * (1 + 1e-4) for _, n in seen)
    assert tamed["warmup_steps"] == 4 and tamed["max_grad_norm"] == 1e-3 and plain["max_grad_norm"] is None
    assert tamed["eval_loss"][0] == plain["eval_loss"][0] and tamed["final_loss"] != plain["final_loss"]
    with pytest.raises(ValueError, match="warmup_steps must be"):
        plasticity_probe(make_tiny_llama(tok), tok, train, held, warmup_steps=-1, **kw)
    with pytest.raises(ValueError, match="max_grad_norm must be"):
        plasticity_probe(make_tiny_llama(tok), tok, train, held, max_grad_norm=0.0, **kw)
    seen[:] = []
    cooled = plasticity_probe(make_tiny_llama(tok), tok, train, held, warmup_steps=2, cooldown_steps=3, **kw)
    # steps 1-2 warm up (k/2), 3 holds, 4-6 decay as (6 - k + 1) / 4: 3/4, 2/4, 1/4
    assert [lr for lr, _ in seen] == pytest.approx([1e-2 * f for f in (0.5, 1.0, 1.0, 0.75, 0.5, 0.25)])
    assert cooled["cooldown_steps"] == 3 and plain["cooldown_steps"] == 0
    for bad in (-1, 5):  # 5 > steps - warmup_steps = 4
        with pytest.raises(ValueError, match="cooldown_steps must be between 0"):
            plasticity_probe(make_tiny_llama(tok), tok, train, held, warmup_steps=2, cooldown_steps=bad, **kw)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_measure_and_probe_write_every_file(tok, tmp_path, capsys):
    from supple.cli import main

    base = tmp_path / "base"
    model = make_tiny_llama(tok)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    from transformers import AutoModelForCausalLM

    pm = _peft(AutoModelForCausalLM.from_pretrained(base))
    pm.save_pretrained(tmp_path / "adapter")
    data = tmp_path / "texts.txt"
    data.write_text("\n\n".join(TEXTS) + "\n")
    out = tmp_path / "out"
    rc = main(
        [
            "measure",
            str(base),
            str(tmp_path / "adapter"),
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-tokens",
            "128",
            "--batch-size",
            "4",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    expected = [
        "measure.json",
        "measure.csv",
        "summary.md",
        "overview.png",
        "norms.png",
        "trajectory.png",
        "cka.png",
        "lora.png",
    ] + [
        f"geometry_{m}.png"
        for m in (
            "erank",
            "erank_ratio",
            "participation_ratio",
            "top_pc_share",
            "anisotropy",
            "anisotropy_centered",
        )
    ]
    for f in expected:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    doc = json.loads((out / "measure.json").read_text())
    models = {r["model"] for r in doc["records"]}
    assert models == {"base", "adapter"}
    groups = {r["group"] for r in doc["records"]}
    assert groups == {"geometry", "logits", "trajectory", "compare", "delta", "lora"}
    with open(out / "measure.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(doc["records"])
    summary = (out / "summary.md").read_text()
    assert "Linear CKA" in summary and "LoRA updates" in summary

    rc = main(
        [
            "measure",
            str(base),
            "--data",
            "builtin:pydoc",
            "--max-texts",
            "4",
            "--max-length",
            "32",
            "--out",
            str(tmp_path / "out2"),
            "--no-progress",
            "--layers",
            "-1",
            "--device",
            "cpu",
            "--no-plots",
        ]
    )
    assert rc == 0 and (tmp_path / "out2" / "summary.md").is_file()

    pout = tmp_path / "probe"
    rc = main(
        [
            "probe",
            str(base),
            "--task",
            "builtin:reverse",
            "--steps",
            "2",
            "--n-train",
            "16",
            "--n-eval",
            "4",
            "--out",
            str(pout),
            "--no-progress",
            "--device",
            "cpu",
            "--warmup",
            "2",
            "--max-grad-norm",
            "1.0",
        ]
    )
    assert rc == 0
    for f in ("probe.json", "probe.csv", "probe.png", "probe.md"):
        assert (pout / f).is_file(), f
    res = json.loads((pout / "probe.json").read_text())["results"][0]
    assert len(res["train_loss"]) == 2 and res["eval_steps"] == [0, 1, 2]
    assert res["warmup_steps"] == 2 and res["max_grad_norm"] == 1.0
    with pytest.raises(SystemExit) as err:  # argparse's one-line error
        main(["probe", str(base), "--warmup", "-1", "--device", "cpu"])
    assert err.value.code == 2
    capsys.readouterr()  # drop what the runs above printed
    rc = main(["probe", str(base), "--steps", "4", "--warmup", "2", "--cooldown", "3", "--device", "cpu"])
    assert rc == 2  # refused before the model loads: one line, no traceback
    assert capsys.readouterr().err.strip().splitlines() == [
        "supple probe: error: --cooldown 3 must be at most --steps minus --warmup (2)"]


@pytest.mark.slow
def test_embedded_model_shows_the_attention_sink():
    """SmolLM2-135M: block 15 reads as collapsed over all raw tokens, not without the sink or on unit vectors."""
    try:
        from supple.measure.embedded import load_embedded_model

        model, tok = load_embedded_model()
    except (ImportError, FileNotFoundError) as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"embedded model unavailable: {exc}")
    texts = load_builtin_corpus(limit=16)
    rows = measure_model(
        model, tok, texts, layers=[15], max_tokens=512, max_length=64, logit_lens=False, progress=False
    )
    pr = {(r["tokens"], r["space"]): r["value"] for r in _by(rows, metric="participation_ratio", layer=15)}
    assert pr[("all", "raw")] < 1.1
    assert pr[("no_sink", "raw")] > 1.2
    assert pr[("all", "unit")] > 10
    ratio = _by(rows, metric="norm_max_over_median", layer=15, tokens="all")[0]["value"]
    assert ratio > 50


def test_probe_task_files(tmp_path):
    pairs = tmp_path / "task.jsonl"
    pairs.write_text(
        "\n".join(json.dumps({"prompt": f"q{i}:", "completion": f" a{i}"}) for i in range(20)) + "\n"
    )
    train, held = load_probe_task(str(pairs))
    assert len(train) == 18 and held == [("q18:", " a18"), ("q19:", " a19")]
    lines = tmp_path / "task.txt"
    lines.write_text("\n".join(f"text {i}" for i in range(10)) + "\n")
    train, held = load_probe_task(str(lines))
    assert held == ["text 9"] and len(train) == 9
    t1, h1 = load_probe_task("builtin:reverse", n_train=8, n_eval=4, data_seed=2)
    t2, h2 = load_probe_task("builtin:reverse", n_train=8, n_eval=4, data_seed=2)
    assert (t1, h1) == (t2, h2) and all(isinstance(x, tuple) for x in t1)


def test_layer_indices_resolve_in_one_place_and_name_what_is_resolved():
    """measure/ uses :func:`supple.modeling.resolve_layer_indices`: a label names the option, not SuppleConfig."""
    from supple.modeling import resolve_layer_indices

    assert resolve_layer_indices([-1, 0, 3, 0], 4, label="layer", dedupe=True) == [0, 3]
    with pytest.raises(ValueError, match=r"^layer 7 is out of range for a model with 4 decoder blocks"):
        resolve_layer_indices([0, 7], 4, label="layer", dedupe=True)
    with pytest.raises(ValueError, match=r"^--layer -5 is out of range"):
        resolve_layer_indices([-5], 4, label="--layer")
    with pytest.raises(ValueError, match=r"^SuppleConfig\.diversity_layers=\[9\]: index 9 is out of range"):
        resolve_layer_indices([9], 4)
    with pytest.raises(ValueError, match=r"^SuppleConfig\.diversity_layers=\[0, -4\] names the same block"):
        resolve_layer_indices([0, -4], 4)


def test_measure_loads_the_embedded_model_from_its_own_package():
    """No measure -> testbed import: the embedded model lives in supple.measure.embedded, re-exported by testbed."""
    import ast
    import pathlib

    import supple.measure as measure
    from supple.measure import embedded as home
    from supple.testbed import embedded as reexport

    assert reexport.EmbeddedModelMissing is home.EmbeddedModelMissing
    assert reexport.load_embedded_model is home.load_embedded_model
    for path in pathlib.Path(measure.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                assert "testbed" not in mod, f"{path.name} imports {mod}"
            elif isinstance(node, ast.Import):
                assert not any("testbed" in a.name for a in node.names), path.name
