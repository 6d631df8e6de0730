"""Launched by tests/test_compat.py as two CPU processes (gloo), with tests/ on PYTHONPATH:

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/scripts/ddp_compat.py OUT_DIR

On every rank, twice: a fresh tiny Llama, evaluate() first (which prepares the model for evaluation only), then
train() for one step. The first time as shipped; the second with `hf_smooth._compat.undo_evaluation_only_prepare`
replaced by a no-op, as if accelerate had renamed the state it resets. Rank R writes OUT_DIR/rank{R}.json:
{"world_size", "shipped": {"wrapped_as"} or {"error"}, "no_undo": the same}.
"""

from __future__ import annotations

import json
import os
import sys

from tiny_models import BUILDERS, ListDataset, PadCollator, causal_examples

import hf_smooth._compat
from hf_smooth import SmoothTrainer, SmoothTrainingArguments


def evaluate_then_train(out_dir: str) -> dict:
    args = SmoothTrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=1,
        learning_rate=1.0, optim="sgd", report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        smoothing_method="maxsup", smoothing_alpha=0.1,
    )
    trainer = SmoothTrainer(
        model=BUILDERS["llama"](0), args=args, train_dataset=ListDataset(causal_examples(4)),
        eval_dataset=ListDataset(causal_examples(4, seed=1)), data_collator=PadCollator(),
    )
    assert trainer.accelerator.num_processes == 2
    trainer.evaluate()
    try:
        trainer.train()
    except RuntimeError as error:
        return {"error": str(error)}
    return {"wrapped_as": type(trainer.model_wrapped).__name__}


def main(out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    result = {"world_size": int(os.environ["WORLD_SIZE"])}
    result["shipped"] = evaluate_then_train(os.path.join(out_dir, "shipped"))
    hf_smooth._compat.undo_evaluation_only_prepare = lambda trainer: None
    result["no_undo"] = evaluate_then_train(os.path.join(out_dir, "no_undo"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
