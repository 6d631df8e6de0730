"""Launched by tests/test_distributed.py as two CPU processes (gloo):

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/scripts/ddp_train.py RUN_DIR

RUN_DIR/scenarios.json is a list of scenarios, all run in this one launch (each launch costs 10-20 s of start-up
on a 2-core machine, so the test batches them). A scenario is a dict with

    name         sub-directory of RUN_DIR for its outputs
    model        a key of tiny_models.BUILDERS (built with seed 0, as the test process does)
    method       smoothing_method; the strength is always 0.1
    fused        smoothing_fused_loss
    lora         null, or a list of target module names for a peft LoRA adapter (r=4, init_lora_weights=False)
    train        examples of one optimizer step: exactly 2 x per_device_train_batch_size x
                 gradient_accumulation_steps rows, so the step sees every row once whatever the sampler's order
    eval         examples for evaluate(), or null
    per_device_train_batch_size, gradient_accumulation_steps, per_device_eval_batch_size
    sampling     train_sampling_strategy ("random" or "sequential"; sequential fixes which rank gets which rows)

For each scenario, on every rank: a fresh model, evaluate() when there is an eval set, one SGD step (lr 1, no
clipping), evaluate() again. Every rank writes rank{R}.json (the scored tokens of each of its micro-batches, the
num_items_in_batch it was given, its loss); rank 0 also writes initial.pt / params.pt (parameters before and
after the step) and result.json (log history, both evaluations, whether the fused path ran).

The world size is asserted, so a launch that silently started one process fails instead of passing trivially.
"""

import faulthandler
import json
import math
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiny_models import BUILDERS, SEQ2SEQ, ListDataset, PadCollator  # noqa: E402

from hf_smooth import SmoothSeq2SeqTrainer, SmoothSeq2SeqTrainingArguments, SmoothTrainer  # noqa: E402
from hf_smooth import SmoothTrainingArguments  # noqa: E402

ALPHA = 0.1
# A rank left waiting in a collective (the other rank skipped a backward, or called a different collective) waits
# for good: with ddp_timeout=120 such a wait had not ended after 5 minutes here. After this many seconds in one
# scenario (which takes 1-5 s) a rank prints the stack of every thread and exits, ending the launch with the place
# it hung.
SCENARIO_TIMEOUT_S = 120


class RecordingMixin:
    """Records, per training micro-batch, what this rank scored and the global count it divided by."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            loss = result[0] if return_outputs else result
            local = self._targets(inputs, model).ne(self.smoothing_args.smoothing_ignore_index).sum()
            self.micro_batches.append(
                {
                    "local_tokens": int(local),
                    "num_items_in_batch": None if num_items_in_batch is None else int(num_items_in_batch),
                    "loss": float(loss.detach()),
                    "rows": int(inputs["labels"].shape[0]),
                }
            )
        return result


class RecordingTrainer(RecordingMixin, SmoothTrainer):
    pass


class RecordingSeq2SeqTrainer(RecordingMixin, SmoothSeq2SeqTrainer):
    pass


def build_model(scenario):
    model = BUILDERS[scenario["model"]](0)
    if scenario.get("lora"):
        import peft

        config = peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(scenario["lora"]), init_lora_weights=False
        )
        model = peft.get_peft_model(model, config)
    return model


def run(run_dir, scenario):
    out = os.path.join(run_dir, scenario["name"])
    os.makedirs(out, exist_ok=True)
    seq2seq = scenario["model"] in SEQ2SEQ
    args_cls = SmoothSeq2SeqTrainingArguments if seq2seq else SmoothTrainingArguments
    args = args_cls(
        output_dir=os.path.join(out, "trainer"),
        per_device_train_batch_size=scenario["per_device_train_batch_size"],
        gradient_accumulation_steps=scenario["gradient_accumulation_steps"],
        per_device_eval_batch_size=scenario["per_device_eval_batch_size"],
        train_sampling_strategy=scenario["sampling"],
        max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[],
        use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
        smoothing_method=scenario["method"], smoothing_alpha=ALPHA, smoothing_fused_loss=scenario["fused"],
    )
    assert args.world_size == 2, f"expected 2 processes, got world_size={args.world_size}"
    global_rows = 2 * args.per_device_train_batch_size * args.gradient_accumulation_steps
    assert len(scenario["train"]) == global_rows, "one optimizer step must see every training row exactly once"

    model = build_model(scenario)
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer_cls = RecordingSeq2SeqTrainer if seq2seq else RecordingTrainer
    eval_set = ListDataset(scenario["eval"]) if scenario.get("eval") else None
    trainer = trainer_cls(
        model=model, args=args, train_dataset=ListDataset(scenario["train"]), eval_dataset=eval_set,
        data_collator=PadCollator(),
    )
    trainer.micro_batches = []
    assert trainer.accelerator.num_processes == 2
    rank = trainer.accelerator.process_index

    eval_before = trainer.evaluate() if eval_set is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    # fused_trainer warns "falls back to materialized logits", fused (an output layer it cannot fold) "falling back"
    fallback = [str(w.message) for w in caught if "falls back" in str(w.message) or "falling back" in str(w.message)]
    eval_after = trainer.evaluate() if eval_set is not None else None

    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"micro_batches": trainer.micro_batches}, f)
    if trainer.accelerator.is_main_process:
        params = {k: v.detach().cpu() for k, v in model.named_parameters()}
        assert all(math.isfinite(v.abs().max().item()) for v in params.values())
        torch.save(initial, os.path.join(out, "initial.pt"))
        torch.save(params, os.path.join(out, "params.pt"))
        result = {
            "log_history": trainer.state.log_history,
            "eval_before": eval_before,
            "eval_after": eval_after,
            "fused_ran": trainer.fused_loss_active,
            "fallback_warnings": fallback,
            "world_size": args.world_size,
            # after train(): the model the optimizer stepped must have been wrapped for gradient synchronization
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
