"""FSDP2 on CPU (gloo, 2 processes, `fully_shard` on each decoder block then the root, as accelerate does):
with every supple term on — diversity taps (anchored to the pre-stage reference, automatic weight), LoRA
decorrelation intra and cross-stage, replay, live metrics —
and each refresh method, the gathered parameters and the logged supple/* values equal those of 1 process at
the same global batch. The LoRA parameters really are sharded (DTensors) in the 2-process run."""

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
# method -> (gradient accumulation under FSDP2, master port); one process runs 2 × that accumulation
CASES = {"shrink_perturb": (1, 29543), "relora": (2, 29544), "redo": (1, 29545)}


def _run(cmd) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]


def _close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{what}: {k}: {m}")


@pytest.mark.parametrize("method", sorted(CASES))
def test_fsdp2_equals_one_process(tmp_path, method):
    ga, port = CASES[method]
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    _run([sys.executable, "tests/fsdp_worker.py", str(single), str(2 * ga), method])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
          "tests/fsdp_worker.py", str(fsdp), str(ga), method])
    for r in (0, 1):
        facts = json.loads((fsdp / f"sharded_rank{r}.json").read_text())
        assert facts["world"] == 2 and facts["sharded"] == facts["trainable"] > 0, facts
    one = load_file(str(single / "params_rank0.safetensors"))
    for r in (0, 1):
        _close(one, load_file(str(fsdp / f"params_rank{r}.safetensors")), f"FSDP2 rank {r} vs one process")

    logs_one = json.loads((single / "log.json").read_text())
    logs = json.loads((fsdp / "log.json").read_text())
    assert len(logs) == len(logs_one) == 4
    for step, (want, got) in enumerate(zip(logs_one, logs)):
        assert want.keys() == got.keys(), f"step {step}: {sorted(set(want) ^ set(got))}"
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-6), f"step {step}: {k}: {got[k]} vs {v}"
    seen = set().union(*logs)
    for key in ("supple/diversity", "supple/decorrelation", "supple/cross_overlap", "supple/replay_loss",
                "supple/erank/layer_0", "supple/anisotropy/layer_1", "supple/lora_stable_rank",
                "supple/diversity_reference", "supple/diversity_weight", "supple/diversity_active"):
        assert key in seen, f"{key} was never logged: the test has no teeth"
    assert any(h["supple/diversity_active"] > 0 for h in logs), "no term above the pre-stage reference: no teeth"
    assert logs[-1]["supple/refreshes"] >= 1
    if method == "redo":
        assert sum(h.get("supple/redo_units", 0) for h in logs) > 0, "no unit was recycled: the test has no teeth"


# -- what each backend supports, refused at train begin (DeepSpeed cannot run here: its trainer is faked) ----------

def _ctx(fp16: bool = False, **trainer):
    from types import SimpleNamespace

    from supple.callbacks.context import TrainingContext

    return TrainingContext(SimpleNamespace(fp16=fp16, world_size=2), SimpleNamespace(global_step=0),
                           torch.nn.Linear(2, 2), SimpleNamespace(**trainer))


def _deepspeed(stage: int) -> dict:
    from types import SimpleNamespace

    plugin = SimpleNamespace(zero_stage=stage)
    return {"is_deepspeed_enabled": True, "accelerator": SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))}


@pytest.mark.parametrize("field, value, needle", [
    ("decorrelation_weight", 0.1, "LoRA decorrelation"),
    ("replay_data", "builtin:pydoc", "replay"),
    ("refresh_method", "shrink_perturb", "refresh"),
])
def test_deepspeed_refuses_parameter_terms_before_fsdp_alternative(field, value, needle):
    from supple import SuppleConfig
    from supple.callbacks.distributed import check_backend

    cfg = SuppleConfig(**{field: value})
    with pytest.raises(ValueError, match=needle) as err:
        check_backend(cfg, _ctx(**_deepspeed(2)), replay=cfg.replay_data is not None)
    assert "FSDP2" in str(err.value) and "supports only the hidden-state term" in str(err.value)


def test_deepspeed_hidden_state_term_fp16_and_zero3_metrics_refused_bf16_allowed_not_fsdp():
    from supple import SuppleConfig
    from supple.callbacks.distributed import check_backend

    check_backend(SuppleConfig(diversity_weight=0.1, metrics_every=2), _ctx(**_deepspeed(2)))  # allowed
    with pytest.raises(ValueError, match="fp16.*loss scale"):
        check_backend(SuppleConfig(diversity_weight=0.1), _ctx(fp16=True, **_deepspeed(2)))
    with pytest.raises(ValueError, match="ZeRO-3"):
        check_backend(SuppleConfig(diversity_weight=0.1, metrics_every=2), _ctx(**_deepspeed(3)))


def test_fsdp1_refuses_parameter_terms_fsdp2_accepts_them():
    from types import SimpleNamespace

    from supple import SuppleConfig
    from supple.callbacks.distributed import check_backend

    cfg = SuppleConfig(decorrelation_weight=0.1, refresh_method="relora", metrics_every=1)
    with pytest.raises(ValueError, match="FSDP1 flattens.*fsdp_version: 2"):
        check_backend(cfg, _ctx(is_fsdp_enabled=True, accelerator=SimpleNamespace(is_fsdp2=False)))
    check_backend(cfg, _ctx(is_fsdp_enabled=True, accelerator=SimpleNamespace(is_fsdp2=True)))
    check_backend(SuppleConfig(diversity_weight=0.1), _ctx(is_fsdp_enabled=True,
                                                          accelerator=SimpleNamespace(is_fsdp2=False)))


def test_deepspeed_refusal_through_the_callback_attaches_nothing_not_fsdp(tmp_path):
    from trl import SFTConfig, SFTTrainer

    from supple import SuppleCallback, SuppleConfig
    from tests._runs import lora_config, sft_dataset
    from tests._tiny import make_tiny_llama, make_tokenizer

    tok = make_tokenizer()
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, bf16=False, max_length=32, save_strategy="no", disable_tqdm=True)
    tr = SFTTrainer(model=make_tiny_llama(tok), args=args, train_dataset=sft_dataset(4), processing_class=tok,
                    peft_config=lora_config())
    tr.is_deepspeed_enabled = True  # as the Trainer sets it under a DeepSpeed config
    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tr.model.modules())

    before = hooks()
    cb = SuppleCallback(SuppleConfig(diversity_weight=0.1, decorrelation_weight=0.1)).attach(tr)
    with pytest.raises(ValueError, match="DeepSpeed.*LoRA decorrelation"):
        cb.on_train_begin(tr.args, tr.state, tr.control, model=tr.model)
    assert hooks() == before
    assert cb.trainer is None
