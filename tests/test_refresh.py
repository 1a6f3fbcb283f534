"""Feature refresh: Shrink & Perturb, ReLoRA merge-and-reinit, ReDo, determinism and checkpoint resume."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from supple import SuppleCallback, SuppleConfig
from supple.callbacks.refresh import DormantTracker, redo_, refresh_generator, relora_, shrink_perturb_
from supple.modeling import find_lora_modules

from ._runs import lora_config, max_abs_diff, run, trainable_state
from ._tiny import make_tiny_llama


def test_shrink_perturb_formula():
    p = torch.nn.Parameter(torch.randn(4, 6))
    before = p.detach().clone()
    shrink_perturb_([p], 0.8, 0.05, refresh_generator(0, 3, "sp"))
    eps = torch.randn(4, 6, generator=refresh_generator(0, 3, "sp"))
    expected = 0.8 * before + 0.05 * before.pow(2).mean().sqrt() * eps
    torch.testing.assert_close(p.detach(), expected)


def _peft_with_trained_b(seed=0):
    model = get_peft_model(make_tiny_llama(seed=seed), lora_config())
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for r in find_lora_modules(model):
            r.lora_b.copy_(torch.randn(r.lora_b.shape, generator=gen) * 0.1)
    return model


def test_relora_merge_keeps_outputs_and_zeroes_moments():
    model = _peft_with_trained_b()
    ids = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    mods = find_lora_modules(model)
    n = relora_(mods, opt, refresh_generator(0, 1, "relora"))
    assert n == len(mods) > 0
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    for r in mods:
        assert torch.count_nonzero(r.lora_b) == 0 and torch.count_nonzero(r.lora_a) > 0
        for p in (r.lora_a, r.lora_b):
            st = opt.state[p]
            assert torch.count_nonzero(st["exp_avg"]) == 0 and torch.count_nonzero(st["exp_avg_sq"]) == 0


def test_relora_training_continues_and_loss_falls(tmp_path):
    from transformers import TrainerCallback

    class RecordLR(TrainerCallback):
        lrs: list = []

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            self.lrs.append(optimizer.param_groups[0]["lr"])

    rec = RecordLR()
    cfg = SuppleConfig(refresh_method="relora", refresh_every=4, relora_warmup_steps=2)
    tr = run("sft", callbacks=[SuppleCallback(cfg), rec], steps=16, out=tmp_path,
             extra_args={"learning_rate": 5e-3, "optim": "adamw_torch"})
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert sum(losses[-4:]) < sum(losses[:4])
    refreshes = [h["supple/refreshes"] for h in tr.state.log_history if "supple/refreshes" in h]
    assert refreshes[-1] == 4.0
    lrs = rec.lrs  # effective learning rate of each optimizer step: re-warm-up after the refresh at step 4
    assert lrs[3] == pytest.approx(5e-3) and lrs[4] == pytest.approx(5e-3 / 3) and lrs[5] == pytest.approx(1e-2 / 3)
    assert lrs[6] == pytest.approx(5e-3)


def test_redo_recycles_planted_dormant_unit():
    model = make_tiny_llama()
    mlp = model.model.layers[0].mlp
    unit = 5
    with torch.no_grad():
        mlp.gate_proj.weight[unit] = 0
        mlp.up_proj.weight[unit] = 0
        mlp.down_proj.weight[:, unit] = 1.0  # outgoing weights to be zeroed
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    tracker = DormantTracker(model)
    tracker.active = True
    model.train()
    model(input_ids=ids, labels=ids)
    scores = tracker.scores()
    assert float(scores[0][unit]) == 0.0 and float(scores[0].median()) > 0.5
    n = redo_(tracker, 0.01, opt, refresh_generator(0, 1, "redo"))
    assert n >= 1
    assert torch.count_nonzero(mlp.gate_proj.weight[unit]) > 0 and torch.count_nonzero(mlp.up_proj.weight[unit]) > 0
    assert torch.count_nonzero(mlp.down_proj.weight[:, unit]) == 0
    assert torch.count_nonzero(opt.state[mlp.up_proj.weight]["exp_avg"][unit]) == 0
    assert torch.count_nonzero(opt.state[mlp.down_proj.weight]["exp_avg_sq"][:, unit]) == 0
    assert torch.count_nonzero(opt.state[mlp.down_proj.weight]["exp_avg_sq"][:, unit + 1]) > 0  # others kept


def test_redo_with_lora_refreshes_adapter_rows():
    model = get_peft_model(make_tiny_llama(), lora_config())
    base_mlp = model.base_model.model.model.layers[0].mlp
    with torch.no_grad():
        base_mlp.up_proj.base_layer.weight[3] = 0
        base_mlp.gate_proj.weight[3] = 0
    tracker = DormantTracker(model)
    tracker.active = True
    model.train()
    ids = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids)
    lora = {r.name: r for r in find_lora_modules(model)}
    redo_(tracker, 0.01, None, refresh_generator(0, 1, "redo"), lora)
    up = lora["model.layers.0.mlp.up_proj"]
    assert torch.count_nonzero(up.lora_b[3]) > 0  # the adapter row feeding the unit was re-initialized


@pytest.mark.parametrize("method", ["shrink_perturb", "redo"])
def test_refresh_is_deterministic_and_changes_training(tmp_path, method):
    cfg = SuppleConfig(refresh_method=method, refresh_every=2, redo_threshold=0.5)
    lora = method != "redo"
    a = run("sft", callbacks=[SuppleCallback(cfg)], steps=4, lora=lora, out=tmp_path / "a")
    b = run("sft", callbacks=[SuppleCallback(cfg)], steps=4, lora=lora, out=tmp_path / "b")
    c = run("sft", steps=4, lora=lora, out=tmp_path / "c")
    sa, sb = trainable_state(a), trainable_state(b)
    assert max_abs_diff(sa, sb) == 0.0
    assert max_abs_diff(sa, trainable_state(c)) > 1e-4


def test_relora_needs_lora(tmp_path):
    with pytest.raises(ValueError, match="has none"):
        run("sft", lora=False, callbacks=[SuppleCallback(SuppleConfig(refresh_method="relora"))], out=tmp_path)


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    cfg = SuppleConfig(diversity_weight=0.5, diversity_max_tokens=16, decorrelation_weight=0.5,
                       replay_data="builtin:pydoc", replay_every=2, replay_batch_size=2,
                       refresh_method="shrink_perturb", refresh_every=3)
    extra = {"save_strategy": "steps", "save_steps": 3, "optim": "adamw_torch", "learning_rate": 1e-2}
    full = run("sft", callbacks=[SuppleCallback(copy.deepcopy(cfg))], steps=6, out=tmp_path / "full",
               extra_args=extra)
    # interrupted: a fresh trainer resumes from the step-3 checkpoint of the same run
    from trl import SFTConfig, SFTTrainer

    from ._runs import sft_dataset
    from ._tiny import make_tokenizer

    tok = make_tokenizer()
    args = SFTConfig(output_dir=str(tmp_path / "full"), max_steps=6, per_device_train_batch_size=2,
                     learning_rate=1e-2, optim="adamw_torch", lr_scheduler_type="constant", report_to=[],
                     logging_steps=1, use_cpu=True, bf16=False, seed=0, data_seed=0, max_length=48,
                     save_strategy="no", max_grad_norm=1e9, disable_tqdm=True)
    resumed = SFTTrainer(model=make_tiny_llama(tok), args=args, train_dataset=sft_dataset(), processing_class=tok,
                         peft_config=lora_config(), callbacks=[SuppleCallback(copy.deepcopy(cfg))])
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    sa, sb = trainable_state(full), trainable_state(resumed)
    assert max_abs_diff(sa, sb) < 1e-6


def test_relora_merge_keeps_the_function_of_a_dora_adapter():
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0,
                     use_dora=True)
    model = get_peft_model(make_tiny_llama(), cfg)
    mods = find_lora_modules(model)
    assert mods and all(r.magnitude is not None for r in mods)
    ids = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):  # move B, A and the magnitudes away from their initial values
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    relora_(mods, opt, refresh_generator(0, 1, "relora"))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    for r in mods:
        assert torch.count_nonzero(r.lora_b) == 0
        assert torch.count_nonzero(opt.state[r.magnitude]["exp_avg"]) == 0
