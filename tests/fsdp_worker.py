"""Worker for tests/test_fsdp.py: tiny-model SFT with every supple intervention on, FSDP2-sharded.

Run as `torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT GA METHOD` (FSDP2, gloo on CPU) or
`python tests/fsdp_worker.py OUT GA METHOD` (one process, nothing sharded), METHOD a refresh_method.

accelerate cannot shard on CPU (docs/design.md, "Distributed"), so the worker shards the model the way
accelerate's FSDP2 path does — PEFT first, then `fully_shard` on each decoder block, then on the root — and
hands it to the stock SFTTrainer through the door transformers uses for a model it sharded at load time
(`is_distributed_loading_by_transformers`): the Trainer then neither wraps it in DDP nor shards it again, and
FSDP2 reduce-scatters the gradients. Every rank saves the gathered (full) trainable parameters and frozen MLP
weights to OUT/params_rank{R}.safetensors; rank 0 writes OUT/log.json with the supple/* log values.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from supple import SuppleCallback, SuppleConfig  # noqa: E402
from tests._runs import lora_config, sft_dataset  # noqa: E402
from tests._tiny import make_tiny_llama, make_tokenizer  # noqa: E402


def shard_like_accelerate(model: torch.nn.Module) -> None:
    """`fully_shard` every decoder block, then the root (accelerate's fsdp2_prepare_model with the
    transformer-layer wrap policy), on a 1-D CPU mesh over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    base = model.get_base_model()
    for block in base.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    base._is_distributed_loading_by_transformers = True  # the Trainer must not wrap it in DDP
    # Its no_sync for such a model (Trainer._defer_fsdp_gradient_reduction) reads the replicate size of the
    # load-time DistributedConfig: plain FSDP, no HSDP replicas.
    base.config.distributed_config = SimpleNamespace(dp_replicate_size=1)


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full values of the trainable parameters and the MLP weights (a collective under FSDP2)."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad or ".mlp." in n:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[n] = full.detach().contiguous().clone()
    return out


def main() -> None:
    out, ga, method = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    sharded = "RANK" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    tok = make_tokenizer()
    model = get_peft_model(make_tiny_llama(tok, seed=0), lora_config())
    gen = torch.Generator().manual_seed(3)
    bases = {}
    for name in [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj")]:
        bases[name] = torch.linalg.qr(torch.randn(32, 3, generator=gen))[0]
    if sharded:
        shard_like_accelerate(model)
    # the pre-stage reference pools W·N reference batches over W ranks: N = 4 / W gives one process's sample
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = SuppleConfig(
        diversity_weight=0.5, diversity_layers=[0, -1], diversity_max_tokens=24,
        diversity_reference="pre_stage", diversity_reference_batches=4 // world, diversity_weight_schedule="auto",
        diversity_weight_rate=0.5,
        decorrelation_weight=0.5, decorrelation_cross_weight=1.0,
        replay_data="builtin:pydoc", replay_every=2, replay_batch_size=2, replay_weight=0.3,
        refresh_method=method, refresh_every=3 if method != "redo" else 2, redo_threshold=0.6, metrics_every=2,
    )
    args = SFTConfig(
        output_dir=out, max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=ga,
        learning_rate=0.3, optim="sgd", lr_scheduler_type="constant", report_to=[], logging_steps=1,
        use_cpu=True, bf16=False, seed=0, data_seed=0, max_length=48, save_strategy="no", max_grad_norm=1e9,
        disable_tqdm=True, dataloader_num_workers=0, ddp_backend="gloo" if sharded else None,
    )
    tr = SFTTrainer(model=model, args=args, train_dataset=sft_dataset(16), processing_class=tok)
    with SuppleCallback(cfg, previous_subspaces=bases).attach(tr):
        tr.train()
    rank = tr.args.process_index
    trainable = [p for p in tr.model.parameters() if p.requires_grad]
    n_sharded = sum(hasattr(p, "full_tensor") for p in trainable)
    state = gathered(tr.model)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"sharded_rank{rank}.json"), "w") as fh:
        json.dump({"trainable": len(trainable), "sharded": n_sharded, "world": tr.args.world_size}, fh)
    save_file(state, os.path.join(out, f"params_rank{rank}.safetensors"))
    if rank == 0:
        logs = [{k: v for k, v in h.items() if k.startswith("supple/")} for h in tr.state.log_history if "loss" in h]
        with open(os.path.join(out, "log.json"), "w") as fh:
            json.dump(logs, fh)
    if sharded:
        dist.barrier()  # both ranks done writing before the group goes: a rank torn down mid-collective can abort
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
