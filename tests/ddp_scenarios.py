"""The scenario protocol of the 2-process tests (tests/test_distributed.py, tests/test_distributed_collators.py).

A test writes RUN_DIR/scenarios.json, a list of scenarios, and runs them all in one launch of a script of
tests/scripts (`launch_scenarios`; each launch costs 10-20 s of start-up on a 2-core machine):

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/scripts/ddp_train.py RUN_DIR

A scenario is a dict with at least

    name         sub-directory of RUN_DIR for its outputs
    model        a key of tiny_models.BUILDERS (built with seed 0, as the test process does)
    method       smoothing_method; the strength is always ALPHA
    fused        smoothing_fused_loss
    lora         null, or a list of target module names for a peft LoRA adapter (r=4, init_lora_weights=False)
    train        the rows of one optimizer step: exactly 2 x per_device_train_batch_size x
                 gradient_accumulation_steps of them, so the step sees every row once whatever the sampler's order
    per_device_train_batch_size, gradient_accumulation_steps

and whatever else its script reads. On every rank, for each scenario, the script builds a fresh model and a recording
trainer, takes one SGD step (lr 1, no clipping), and writes (`write_outputs`) rank{R}.json (the scored tokens of
each of its micro-batches, the num_items_in_batch it was given, its loss); rank 0 also writes initial.pt / params.pt
(parameters before and after the step) and result.json (log history, whether the fused path ran, its fallback
warnings, the world size, the wrapper of the trained model). `launch_scenarios` reads them back.

The world size is asserted, so a launch that silently started one process fails instead of passing trivially.
"""

from __future__ import annotations

import faulthandler
import json
import math
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from launch_helpers import launch_two_processes
from tiny_models import BUILDERS, SEQ2SEQ
from trainer_helpers import SMOOTH_LOG_KEYS, is_fallback_warning, max_diff, smooth_log

from hf_smooth import SmoothSeq2SeqTrainer, SmoothSeq2SeqTrainingArguments, SmoothTrainer, SmoothTrainingArguments

ALPHA = 0.1
Z_LOSS = 0.01  # the z-loss coefficient of the eval_z evaluation (tests/scripts/ddp_train.py)
# A rank left waiting in a collective (the other rank skipped a backward, or called a different collective) waits
# for good: with ddp_timeout=120 such a wait had not ended after 5 minutes here. After this many seconds in one
# scenario (which takes 1-5 s) a rank prints the stack of every thread and exits, ending the launch with the place
# it hung.
SCENARIO_TIMEOUT_S = 120


# ---- in the launched processes ---------------------------------------------------------------------------------


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


def scenario_args(scenario, out: str, **extra):
    """The training arguments of one SGD step on the scenario's global batch, checked against the launch."""
    seq2seq = scenario["model"] in SEQ2SEQ
    args_cls = SmoothSeq2SeqTrainingArguments if seq2seq else SmoothTrainingArguments
    args = args_cls(
        output_dir=os.path.join(out, "trainer"),
        per_device_train_batch_size=scenario["per_device_train_batch_size"],
        gradient_accumulation_steps=scenario["gradient_accumulation_steps"],
        max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[],
        use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
        smoothing_method=scenario["method"], smoothing_alpha=ALPHA, smoothing_fused_loss=scenario["fused"], **extra,
    )
    assert args.world_size == 2, f"expected 2 processes, got world_size={args.world_size}"
    global_rows = 2 * args.per_device_train_batch_size * args.gradient_accumulation_steps
    assert len(scenario["train"]) == global_rows, "one optimizer step must see every training row exactly once"
    return args


def train_recording_fallbacks(trainer) -> list[str]:
    """trainer.train(); returns the fused path's fallback warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return [str(w.message) for w in caught if is_fallback_warning(w.message)]


def write_outputs(trainer, model, out: str, *, initial: dict, fallback: list[str], rank_record=None, result=None):
    """rank{R}.json on every rank; initial.pt, params.pt (of `model`) and result.json on rank 0 (see the module
    docstring); `rank_record` and `result` add entries to the rank file and result.json."""
    rank = trainer.accelerator.process_index
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"micro_batches": trainer.micro_batches, **(rank_record or {})}, f)
    if trainer.accelerator.is_main_process:
        params = {k: v.detach().cpu() for k, v in model.named_parameters()}
        assert all(math.isfinite(v.abs().max().item()) for v in params.values())
        torch.save(initial, os.path.join(out, "initial.pt"))
        torch.save(params, os.path.join(out, "params.pt"))
        summary = {
            "log_history": trainer.state.log_history,
            "fused_ran": trainer.fused_loss_active,
            "fallback_warnings": fallback,
            "world_size": trainer.args.world_size,
            # after train(): the model the optimizer stepped must have been wrapped for gradient synchronization
            "wrapped_as": type(trainer.model_wrapped).__name__,
            **(result or {}),
        }
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(summary, f)
    trainer.accelerator.wait_for_everyone()


def run_scenarios(run) -> None:
    """The main of a launched script: `run(run_dir, scenario)` for every scenario of RUN_DIR/scenarios.json."""
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} RUN_DIR (with RUN_DIR/scenarios.json)")
    run_dir = sys.argv[1]
    with open(os.path.join(run_dir, "scenarios.json")) as f:
        scenarios = json.load(f)
    if not scenarios:
        raise SystemExit("scenarios.json holds no scenario")
    for scenario in scenarios:
        faulthandler.dump_traceback_later(SCENARIO_TIMEOUT_S, exit=True)
        out = os.path.join(run_dir, scenario["name"])
        os.makedirs(out, exist_ok=True)
        run(out, scenario)
        faulthandler.cancel_dump_traceback_later()
    # Left to interpreter exit, gloo's threads can abort a rank (SIGABRT) after every result was written.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- in the test process ---------------------------------------------------------------------------------------


def launch_scenarios(script: Path, run_dir: Path, scenarios: list) -> dict:
    """Run all `scenarios` in one 2-process launch of `script`; returns {name: result.json + "ranks" (the rank
    files), "initial" and "params" (the parameters before and after the step)}."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "scenarios.json").write_text(json.dumps(scenarios))
    launch_two_processes(script, [str(run_dir)], hf_home=run_dir / "hf_home")
    results = {}
    for spec in scenarios:
        out = run_dir / spec["name"]
        result = json.loads((out / "result.json").read_text())
        result["ranks"] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        result["initial"] = torch.load(out / "initial.pt")
        result["params"] = torch.load(out / "params.pt")
        results[spec["name"]] = result
    return results


def rank_tokens(result) -> list[list[int]]:
    """The tokens each rank scored, per micro-batch."""
    return [[m["local_tokens"] for m in rank["micro_batches"]] for rank in result["ranks"]]


def check_two_process_step(result, *, ga, expected, expected_loss, one_params, one_log) -> list[list[int]]:
    """A 2-process step against the oracle (`expected` parameters, `expected_loss`) and the same step in one process
    (`one_params`, its step log `one_log`): 2 DDP-wrapped processes, `ga` micro-batches each, every micro-batch divided
    by the count of the whole step (never its own); returns `rank_tokens(result)`."""
    assert result["world_size"] == 2
    assert result["wrapped_as"] == "DistributedDataParallel"
    tokens = rank_tokens(result)
    assert [len(t) for t in tokens] == [ga, ga], tokens  # each rank took ga micro-batches
    total = sum(map(sum, tokens))
    for rank in result["ranks"]:
        for micro in rank["micro_batches"]:
            assert micro["num_items_in_batch"] == total, (micro, total)
            assert math.isfinite(micro["loss"])
    assert max_diff(result["params"], expected) < 1e-6
    assert max_diff(result["params"], one_params) < 1e-6
    logged = smooth_log(result["log_history"])  # the step's log (eval logs aside)
    assert logged["loss"] == pytest.approx(expected_loss, rel=1e-5)
    for key in SMOOTH_LOG_KEYS:
        assert logged[key] == pytest.approx(one_log[key], rel=1e-5, abs=1e-7), key
    assert logged["num_tokens_scored"] == total
    return tokens
