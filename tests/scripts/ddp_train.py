"""Launched by tests/test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo).

usage: ddp_train.py OUTPUT_DIR METHOD MODEL FUSED
Trains one SGD step with a global batch of 4 (per-device 1 x accumulation 2 x 2 ranks), then evaluates; rank 0
writes the parameters and the metrics. Asserts the world size so a launch that silently started one process fails.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tiny_models import BUILDERS, SEQ2SEQ, ListDataset, PadCollator  # noqa: E402

from hf_smooth import SmoothSeq2SeqTrainer, SmoothSeq2SeqTrainingArguments, SmoothTrainer  # noqa: E402
from hf_smooth import SmoothTrainingArguments  # noqa: E402


def main():
    output_dir, method, name, fused = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    with open(os.path.join(output_dir, "data.json")) as f:
        data = json.load(f)
    seq2seq = name in SEQ2SEQ
    args_cls = SmoothSeq2SeqTrainingArguments if seq2seq else SmoothTrainingArguments
    args = args_cls(
        output_dir=os.path.join(output_dir, "trainer"), per_device_train_batch_size=1, gradient_accumulation_steps=2,
        per_device_eval_batch_size=2, max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
        max_grad_norm=0.0, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
        smoothing_method=method, smoothing_alpha=0.1, smoothing_fused_loss=fused,
    )
    assert args.world_size == 2, f"expected 2 processes, got world_size={args.world_size}"
    model = BUILDERS[name](0)
    trainer_cls = SmoothSeq2SeqTrainer if seq2seq else SmoothTrainer
    trainer = trainer_cls(
        model=model, args=args, train_dataset=ListDataset(data["train"]), eval_dataset=ListDataset(data["eval"]),
        data_collator=PadCollator(),
    )
    assert trainer.accelerator.num_processes == 2
    trainer.train()
    metrics = trainer.evaluate()
    if trainer.accelerator.is_main_process:
        torch.save({k: v.detach().cpu() for k, v in model.named_parameters()}, os.path.join(output_dir, "params.pt"))
        with open(os.path.join(output_dir, "result.json"), "w") as f:
            json.dump({"log_history": trainer.state.log_history, "eval": metrics}, f)


if __name__ == "__main__":
    main()
