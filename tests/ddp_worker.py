"""Worker for tests/test_ddp.py: tiny-model SFT with every supple intervention on.

Run as `torchrun --nproc_per_node 2 tests/ddp_worker.py OUT GA METHOD` (DDP, gloo on CPU) or
`python tests/ddp_worker.py OUT GA METHOD` (one process), METHOD a refresh_method. Every rank saves its
final trainable parameters (and frozen MLP weights, which ReDo may rewrite) to OUT/params_rank{R}.safetensors,
and rank 0 writes OUT/log.json with the supple/* log values.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from supple import SuppleCallback, SuppleConfig  # noqa: E402
from tests._runs import lora_config, sft_dataset  # noqa: E402
from tests._tiny import make_tiny_llama, make_tokenizer  # noqa: E402


def main() -> None:
    out, ga, method = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    tok = make_tokenizer()
    model = make_tiny_llama(tok, seed=0)
    gen = torch.Generator().manual_seed(3)
    bases = {}
    for name in [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj")]:
        bases[name] = torch.linalg.qr(torch.randn(32, 3, generator=gen))[0]
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
        disable_tqdm=True, dataloader_num_workers=0, ddp_backend="gloo" if "RANK" in os.environ else None,
    )
    tr = SFTTrainer(model=model, args=args, train_dataset=sft_dataset(16), processing_class=tok,
                    peft_config=lora_config(), callbacks=[SuppleCallback(cfg, previous_subspaces=bases)])
    tr.train()
    rank = tr.args.process_index
    state = {n: p.detach().contiguous() for n, p in tr.model.named_parameters() if p.requires_grad or ".mlp." in n}
    os.makedirs(out, exist_ok=True)
    save_file(state, os.path.join(out, f"params_rank{rank}.safetensors"))
    if rank == 0:
        logs = [{k: v for k, v in h.items() if k.startswith("supple/")} for h in tr.state.log_history if "loss" in h]
        with open(os.path.join(out, "log.json"), "w") as fh:
            json.dump(logs, fh)


if __name__ == "__main__":
    main()
