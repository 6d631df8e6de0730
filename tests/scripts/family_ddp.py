"""Launched by tests/test_family.py as two CPU processes (gloo), with tests/ on PYTHONPATH:

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/scripts/family_ddp.py RUN_DIR

RUN_DIR/scenarios.json holds scenarios of tests/ddp_scenarios.py whose training rows also carry ``weights`` (one per
label position), turned into the batch's ``loss_weights`` by the collator; every scenario trains with
``smoothing_z_loss=Z_LOSS``. One SGD step (lr 1, no clipping) per scenario; outputs as ddp_scenarios.write_outputs.
"""

import torch
from ddp_scenarios import build_model, run_scenarios, scenario_args, train_recording_fallbacks, write_outputs
from tiny_models import ListDataset, PadCollator
from trainer_helpers import params_of

from hf_smooth import SmoothTrainer

Z_LOSS = 1e-3


class WeightedPadCollator(PadCollator):
    """PadCollator, plus ``loss_weights`` from each example's ``weights`` (padded with 0, like the labels)."""

    def __call__(self, features):
        batch = super().__call__([{k: f[k] for k in ("input_ids", "labels")} for f in features])
        longest = batch["labels"].shape[1]
        batch["loss_weights"] = torch.tensor([f["weights"] + [0.0] * (longest - len(f["weights"])) for f in features])
        return batch


def run(out, scenario):
    args = scenario_args(scenario, out, smoothing_z_loss=Z_LOSS, remove_unused_columns=False)
    model = build_model(scenario)
    initial = params_of(model)
    trainer = SmoothTrainer(model=model, args=args, train_dataset=ListDataset(scenario["train"]),
                            data_collator=WeightedPadCollator())
    trainer.micro_batches = []
    assert trainer.accelerator.num_processes == 2
    fallback = train_recording_fallbacks(trainer)
    write_outputs(trainer, model, out, initial=initial, fallback=fallback)


if __name__ == "__main__":
    run_scenarios(run)
