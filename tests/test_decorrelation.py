"""LoRA decorrelation across stages: previous adapters, captured subspaces, errors, and the effect."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from supple import SuppleCallback, SuppleConfig, capture_update_subspace
from supple.callbacks import load_previous_subspaces
from supple.modeling import find_lora_modules

from ._runs import run
from ._tiny import make_tiny_llama


def _projector(u: torch.Tensor) -> torch.Tensor:
    return u @ u.T


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    tr = run("sft", steps=6, out=out / "run", extra_args={"learning_rate": 1e-2, "optim": "adamw_torch"})
    tr.model.save_pretrained(str(out / "adapter"))
    return tr, out / "adapter"


def test_previous_adapter_subspace_is_row_space_of_update(stage1):
    tr, adapter = stage1
    bases = load_previous_subspaces([str(adapter)])
    mods = {r.name: r for r in find_lora_modules(tr.model)}
    assert set(bases) == set(mods)
    for name, u in bases.items():
        r = mods[name]
        assert u.shape == (r.lora_a.shape[1], r.lora_a.shape[0])
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), atol=1e-5, rtol=0)
        delta = (r.lora_b @ r.lora_a).detach().float()
        torch.testing.assert_close(delta @ _projector(u), delta, atol=1e-5, rtol=1e-4)  # ΔW lives in span(U)


def test_capture_update_subspace_of_merged_stage_matches_adapter(stage1, tmp_path):
    tr, adapter = stage1
    before = make_tiny_llama()
    import copy

    after = copy.deepcopy(tr.model).merge_and_unload()
    bases = capture_update_subspace(before, after, k=4, path=tmp_path / "sub")
    from_adapter = load_previous_subspaces([str(adapter)])
    assert set(bases) == set(from_adapter)
    for name in bases:
        torch.testing.assert_close(_projector(bases[name]), _projector(from_adapter[name]), atol=1e-4, rtol=0)
    loaded = load_previous_subspaces([str(tmp_path / "sub")])
    for name in bases:
        torch.testing.assert_close(_projector(loaded[name]), _projector(bases[name]), atol=1e-5, rtol=0)
    k2 = load_previous_subspaces([str(tmp_path / "sub" / "supple_subspace.safetensors")], max_rank=2)
    assert all(u.shape[1] == 2 for u in k2.values())


def test_previous_adapter_errors(stage1, tmp_path):
    _, adapter = stage1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_previous_subspaces([str(tmp_path / "missing")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_previous_subspaces([str(empty)])
    # an adapter of a wider model: clear error naming a module
    wide = make_tiny_llama(hidden_size=48)
    cfg = SuppleConfig(decorrelation_cross_weight=1.0, previous_adapters=[str(adapter)])
    with pytest.raises(ValueError, match=r"module 'model\.layers\.\d\.[\w.]+' has input size 48"):
        run("sft", model=wide, callbacks=[SuppleCallback(cfg)], out=tmp_path / "run")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('SUPPLE_TEST_PWNED', '/tmp/supple_pwned')}",))


def test_pickled_previous_adapter_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SUPPLE_TEST_PWNED", str(marker))
    d = tmp_path / "evil_adapter"
    d.mkdir()
    with open(d / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(ValueError, match="safetensors only"):
        load_previous_subspaces([str(d)])
    with pytest.raises(ValueError, match="never unpickles"):
        load_previous_subspaces([str(d / "adapter_model.bin")])
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes((d / "adapter_model.bin").read_bytes())
    with pytest.raises(ValueError, match="could not read"):
        load_previous_subspaces([str(disguised)])
    assert not marker.exists()


def test_cross_stage_term_keeps_new_adapter_out_of_old_subspace(stage1, tmp_path):
    """Stage 2 with a strong cross weight ends with far lower overlap, at a similar task loss."""
    _, adapter = stage1
    common = {"learning_rate": 1e-2, "optim": "adamw_torch"}
    cfg_off = SuppleConfig(decorrelation_cross_weight=0.0, decorrelation_weight=0.0, metrics_every=0)
    from supple.callbacks.decorrelation import LoraDecorrelation

    def overlap(model):
        d = LoraDecorrelation(0.0, 1.0)
        d.setup(model, load_previous_subspaces([str(adapter)]))
        return d.measure()[1]

    off = run("sft", steps=30, seed=1, out=tmp_path / "off", extra_args=common, callbacks=[SuppleCallback(cfg_off)])
    cfg_on = SuppleConfig(decorrelation_cross_weight=5.0, previous_adapters=[str(adapter)])
    on = run("sft", steps=30, seed=1, out=tmp_path / "on", extra_args=common, callbacks=[SuppleCallback(cfg_on)])
    ov_off, ov_on = overlap(off.model), overlap(on.model)
    logged = [h["supple/cross_overlap"] for h in on.state.log_history if "supple/cross_overlap" in h]
    assert logged[-1] < logged[0]
    assert ov_on < 0.25 * ov_off, (ov_on, ov_off)
    loss_off = [h["loss"] for h in off.state.log_history if "loss" in h][-5:]
    loss_on = [h["loss"] for h in on.state.log_history if "loss" in h][-5:]
    # stated tolerance: the mean of the last five logged losses within 10 % of the run without the term
    assert abs(sum(loss_on) - sum(loss_off)) / sum(loss_off) < 0.10, (loss_on, loss_off)


def test_same_seed_stage_warns_that_the_adapter_starts_in_the_old_subspace(stage1, tmp_path):
    """PEFT initializes LoRA A from the seed: stage 2 with stage 1's seed starts inside its subspace."""
    import warnings

    _, adapter = stage1
    cfg = SuppleConfig(decorrelation_cross_weight=1.0, previous_adapters=[str(adapter)])
    with pytest.warns(UserWarning, match="different seed per stage") as rec:
        same = run("sft", seed=0, steps=1, callbacks=[SuppleCallback(cfg)], out=tmp_path / "same")
    assert any("cross overlap" in str(w.message) for w in rec)
    assert same.state.log_history[0]["supple/cross_overlap"] > 0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        other = run("sft", seed=1, steps=1, callbacks=[SuppleCallback(cfg)], out=tmp_path / "other")
    assert not [w for w in caught if "different seed per stage" in str(w.message)]
    assert other.state.log_history[0]["supple/cross_overlap"] < 0.5


def test_adalora_is_refused_at_train_begin(tmp_path):
    from peft import AdaLoraConfig, get_peft_model

    model = get_peft_model(make_tiny_llama(), AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                            target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"does not support AdaLoRA.*ParameterDict"):
        run("sft", model=model, lora=False, callbacks=[SuppleCallback(SuppleConfig(decorrelation_weight=0.1))],
            out=tmp_path)


def test_lora_on_embeddings_is_reported_not_skipped_silently(tmp_path, monkeypatch):
    from peft import LoraConfig

    import tests._runs as runs

    monkeypatch.setattr(runs, "lora_config", lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], lora_dropout=0.0))
    with pytest.warns(UserWarning, match=r"left out: model\.embed_tokens \(LoRA on an embedding\)"):
        tr = run("sft", callbacks=[SuppleCallback(SuppleConfig(decorrelation_weight=0.1))], out=tmp_path / "a")
    assert all("supple/decorrelation" in h for h in tr.state.log_history if "loss" in h)
    with pytest.raises(ValueError, match=r"relora.*cannot merge model\.embed_tokens \(LoRA on an embedding\)"):
        run("sft", callbacks=[SuppleCallback(SuppleConfig(refresh_method="relora"))], out=tmp_path / "b")
