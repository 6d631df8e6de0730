"""Launched by tests/test_distributed.py as two CPU processes (gloo), with tests/ on PYTHONPATH:

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/scripts/ddp_train.py RUN_DIR

RUN_DIR/scenarios.json holds the scenarios of tests/ddp_scenarios.py (name, model, method, fused, lora, train,
per_device_train_batch_size, gradient_accumulation_steps), each with also

    eval         examples for evaluate(), or null
    per_device_eval_batch_size
    sampling     train_sampling_strategy ("random" or "sequential"; sequential fixes which rank gets which rows)

For each scenario, on every rank: a fresh model, evaluate() when there is an eval set, one SGD step (lr 1, no
clipping), evaluate() again. The outputs are those of ddp_scenarios.write_outputs; result.json also holds both
evaluations (eval_before, eval_after) and, with an eval set, evaluate() of a second trainer on a fresh model with
smoothing_z_loss=Z_LOSS (eval_z).
"""

from ddp_scenarios import Z_LOSS, RecordingSeq2SeqTrainer, RecordingTrainer, build_model, run_scenarios, scenario_args
from ddp_scenarios import train_recording_fallbacks, write_outputs
from tiny_models import SEQ2SEQ, ListDataset, PadCollator
from trainer_helpers import params_of


def run(out, scenario):
    args = scenario_args(
        scenario, out, per_device_eval_batch_size=scenario["per_device_eval_batch_size"],
        train_sampling_strategy=scenario["sampling"],
    )
    model = build_model(scenario)
    initial = params_of(model)
    trainer_cls = RecordingSeq2SeqTrainer if scenario["model"] in SEQ2SEQ else RecordingTrainer
    eval_set = ListDataset(scenario["eval"]) if scenario.get("eval") else None
    trainer = trainer_cls(
        model=model, args=args, train_dataset=ListDataset(scenario["train"]), eval_dataset=eval_set,
        data_collator=PadCollator(),
    )
    trainer.micro_batches = []
    assert trainer.accelerator.num_processes == 2

    eval_before = trainer.evaluate() if eval_set is not None else None
    eval_z = None
    if eval_set is not None:
        z_args = scenario_args(
            scenario, out, per_device_eval_batch_size=scenario["per_device_eval_batch_size"], smoothing_z_loss=Z_LOSS
        )
        z_trainer = trainer_cls(model=build_model(scenario), args=z_args, eval_dataset=eval_set,
                                data_collator=PadCollator())
        eval_z = z_trainer.evaluate()
    fallback = train_recording_fallbacks(trainer)
    eval_after = trainer.evaluate() if eval_set is not None else None
    write_outputs(trainer, model, out, initial=initial, fallback=fallback,
                  result={"eval_before": eval_before, "eval_after": eval_after, "eval_z": eval_z})


if __name__ == "__main__":
    run_scenarios(run)
