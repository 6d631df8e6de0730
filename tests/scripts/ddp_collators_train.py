"""Launched by tests/test_distributed_collators.py as two CPU processes (gloo), like tests/scripts/ddp_train.py:

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/scripts/ddp_collators_train.py RUN_DIR

but the batches come from transformers' own collators (tests/collator_data.py): `DataCollatorForLanguageModeling`
and `DataCollatorForSeq2Seq` (a `BatchEncoding` each), or `DataCollatorWithFlattening` (padding-free). A scenario
in RUN_DIR/scenarios.json is a dict with

    name, model, method, fused    as in ddp_train.py (the strength is always 0.1)
    collator                      "lm", "seq2seq" or "flattening" (tests/collator_data.make_collator)
    train                         causal_examples / seq2seq_examples rows of one optimizer step (exactly 2 x
                                  per_device_train_batch_size x gradient_accumulation_steps of them); the
                                  collator's features are made from them (collator_data.collator_features)
    per_device_train_batch_size, gradient_accumulation_steps

For each scenario, on every rank: a fresh model, one SGD step (lr 1, no clipping). Every rank writes rank{R}.json
(per micro-batch: its type as the collator returned it, the tokens it scored, the count it divided by, its loss);
rank 0 also writes params.pt and result.json (log history, whether the fused path ran, the DDP wrapper).
"""

import faulthandler
import json
import math
import os
import sys
import warnings

import torch

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, TESTS)
from collator_data import collator_features, make_collator, tiny_tokenizer  # noqa: E402
from ddp_train import SCENARIO_TIMEOUT_S, RecordingMixin, build_model  # noqa: E402
from tiny_models import SEQ2SEQ, ListDataset  # noqa: E402

from hf_smooth import SmoothSeq2SeqTrainer, SmoothSeq2SeqTrainingArguments, SmoothTrainer  # noqa: E402
from hf_smooth import SmoothTrainingArguments  # noqa: E402

ALPHA = 0.1


class RecordBatchTypes(RecordingMixin):
    """ddp_train's per-micro-batch record, plus the type of each batch as the collator returned it."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.batch_types.extend(type(batch).__name__ for batch in batches)
        return batches, count


class CollatorTrainer(RecordBatchTypes, SmoothTrainer):
    pass


class CollatorSeq2SeqTrainer(RecordBatchTypes, SmoothSeq2SeqTrainer):
    pass


def run(run_dir, scenario):
    out = os.path.join(run_dir, scenario["name"])
    os.makedirs(out, exist_ok=True)
    seq2seq = scenario["model"] in SEQ2SEQ
    args_cls = SmoothSeq2SeqTrainingArguments if seq2seq else SmoothTrainingArguments
    args = args_cls(
        output_dir=os.path.join(out, "trainer"),
        per_device_train_batch_size=scenario["per_device_train_batch_size"],
        gradient_accumulation_steps=scenario["gradient_accumulation_steps"],
        max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[],
        use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
        smoothing_method=scenario["method"], smoothing_alpha=ALPHA, smoothing_fused_loss=scenario["fused"],
    )
    assert args.world_size == 2, f"expected 2 processes, got world_size={args.world_size}"
    global_rows = 2 * args.per_device_train_batch_size * args.gradient_accumulation_steps
    assert len(scenario["train"]) == global_rows, "one optimizer step must see every training row exactly once"

    model = build_model(scenario)
    tokenizer = tiny_tokenizer()
    kind = scenario["collator"]
    trainer = (CollatorSeq2SeqTrainer if seq2seq else CollatorTrainer)(
        model=model, args=args, train_dataset=ListDataset(collator_features(kind, scenario["train"])),
        data_collator=make_collator(kind, tokenizer, model), processing_class=tokenizer,
    )
    trainer.micro_batches, trainer.batch_types = [], []
    assert trainer.accelerator.num_processes == 2
    rank = trainer.accelerator.process_index

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    fallback = [str(w.message) for w in caught if "falls back" in str(w.message) or "falling back" in str(w.message)]

    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"micro_batches": trainer.micro_batches, "batch_types": trainer.batch_types}, f)
    if trainer.accelerator.is_main_process:
        params = {k: v.detach().cpu() for k, v in model.named_parameters()}
        assert all(math.isfinite(v.abs().max().item()) for v in params.values())
        torch.save(params, os.path.join(out, "params.pt"))
        result = {
            "log_history": trainer.state.log_history,
            "fused_ran": trainer.fused_loss_active,
            "fallback_warnings": fallback,
            "world_size": args.world_size,
            "wrapped_as": type(trainer.model_wrapped).__name__,
        }
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    trainer.accelerator.wait_for_everyone()


def main():
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} RUN_DIR (with RUN_DIR/scenarios.json)")
    run_dir = sys.argv[1]
    with open(os.path.join(run_dir, "scenarios.json")) as f:
        scenarios = json.load(f)
    if not scenarios:
        raise SystemExit("scenarios.json holds no scenario")
    for scenario in scenarios:
        faulthandler.dump_traceback_later(SCENARIO_TIMEOUT_S, exit=True)
        run(run_dir, scenario)
        faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
