"""Launched by tests/test_distributed_collators.py as two CPU processes (gloo), with tests/ on PYTHONPATH, like
tests/scripts/ddp_train.py:

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/scripts/ddp_collators_train.py RUN_DIR

but the batches come from transformers' own collators (tests/collator_data.py): `DataCollatorForLanguageModeling`
and `DataCollatorForSeq2Seq` (a `BatchEncoding` each), or `DataCollatorWithFlattening` (padding-free). A scenario
in RUN_DIR/scenarios.json is one of tests/ddp_scenarios.py, with also

    collator     "lm", "seq2seq" or "flattening" (tests/collator_data.make_collator); its features are made from
                 the `train` rows (collator_data.collator_features)

For each scenario, on every rank: a fresh model, one SGD step (lr 1, no clipping). The outputs are those of
ddp_scenarios.write_outputs; each rank file also holds the type of each micro-batch as the collator returned it.
"""

from collator_data import collator_features, make_collator, tiny_tokenizer
from ddp_scenarios import RecordingSeq2SeqTrainer, RecordingTrainer, build_model, run_scenarios, scenario_args
from ddp_scenarios import train_recording_fallbacks, write_outputs
from tiny_models import SEQ2SEQ, ListDataset
from trainer_helpers import RecordBatches, params_of


class CollatorTrainer(RecordBatches, RecordingTrainer):
    pass


class CollatorSeq2SeqTrainer(RecordBatches, RecordingSeq2SeqTrainer):
    pass


def run(out, scenario):
    args = scenario_args(scenario, out)
    model = build_model(scenario)
    initial = params_of(model)
    tokenizer = tiny_tokenizer()
    kind = scenario["collator"]
    trainer = (CollatorSeq2SeqTrainer if scenario["model"] in SEQ2SEQ else CollatorTrainer)(
        model=model, args=args, train_dataset=ListDataset(collator_features(kind, scenario["train"])),
        data_collator=make_collator(kind, tokenizer, model), processing_class=tokenizer,
    )
    trainer.micro_batches, trainer.seen_batches, trainer.step_counts = [], [], []
    assert trainer.accelerator.num_processes == 2

    fallback = train_recording_fallbacks(trainer)
    write_outputs(trainer, model, out, initial=initial, fallback=fallback,
                  rank_record={"batch_types": [type(batch).__name__ for batch in trainer.seen_batches]})


if __name__ == "__main__":
    run_scenarios(run)
