"""Two real processes (gloo DDP on CPU) fed by transformers' own collators == one process == the hand oracle.

tests/test_distributed.py proves process invariance on hand-made `dict` batches; here the batches are what real
pipelines produce (tests/collator_data.py): `DataCollatorForLanguageModeling(mlm=False)` and
`DataCollatorForSeq2Seq(model=...)` (a `BatchEncoding`, not a `dict`), and the padding-free
`DataCollatorWithFlattening`. One launch of tests/scripts/ddp_collators_train.py runs every scenario: one SGD step
(lr 1, no clipping) on a global batch of 8 rows, 2 ranks x 2 rows x 2 accumulation steps. The references, computed
in this process: the per-example float64 oracle of tests/trainer_helpers.py, and SmoothTrainer with the same collator,
the global batch in one micro-batch (8 x 1).

A trainer that did not count the tokens of these batches (issue 10.1) hands each micro-batch `None`: every rank then
averages each micro-batch over itself, and the step is off by the accumulation steps and the number of processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from collator_data import oracle_examples, scored_tokens
from ddp_scenarios import check_two_process_step, launch_scenarios
from tiny_models import BUILDERS, SEQ2SEQ, causal_examples, seq2seq_examples
from trainer_helpers import max_diff, params_of, reference_step, smooth_log, train_with_collator

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_collators_train.py"

BS, GA = 2, 2
GLOBAL_ROWS = 2 * BS * GA


def scenario(name, model, method, collator, *, fused=False):
    examples = seq2seq_examples(GLOBAL_ROWS, seed=0) if model in SEQ2SEQ else causal_examples(GLOBAL_ROWS, seed=0)
    return {
        "name": name, "model": model, "method": method, "fused": fused, "collator": collator, "lora": None,
        "train": examples, "per_device_train_batch_size": BS, "gradient_accumulation_steps": GA,
    }


SCENARIOS = [
    scenario("llama-lm-maxsup", "llama", "maxsup", "lm"),
    scenario("llama-lm-fused-label_smoothing", "llama", "label_smoothing", "lm", fused=True),
    scenario("gpt2-lm-none", "gpt2", "none", "lm"),
    scenario("llama-flattening-fused-maxsup", "llama", "maxsup", "flattening", fused=True),
    scenario("t5-seq2seq-label_smoothing", "t5", "label_smoothing", "seq2seq"),
    scenario("marian-seq2seq-maxsup", "marian", "maxsup", "seq2seq"),
]
NAMES = [s["name"] for s in SCENARIOS]
assert len(set(NAMES)) == len(NAMES) == 6


@pytest.fixture(scope="module")
def collator_run(tmp_path_factory):
    return launch_scenarios(SCRIPT, tmp_path_factory.mktemp("ddp_collators"), SCENARIOS)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_two_processes_with_transformers_collators_equal_one_process(collator_run, name, tmp_path):
    (spec,) = [s for s in SCENARIOS if s["name"] == name]
    result = collator_run[name]
    kind = spec["collator"]
    # the premise: each rank trained on the collator's own batch type, GA micro-batches each
    expected_type = "dict" if kind == "flattening" else "BatchEncoding"
    for rank in result["ranks"]:
        assert rank["batch_types"] == [expected_type] * GA, rank["batch_types"]

    rows = oracle_examples(kind, spec["train"])
    total = scored_tokens(spec["model"], rows)
    expected, expected_loss = reference_step(BUILDERS[spec["model"]](0), spec["model"], rows, spec["method"])
    assert max_diff(expected, params_of(BUILDERS[spec["model"]](0))) > 1e-3  # the step moves the parameters
    one_params, one = train_with_collator(
        spec["model"], kind, GLOBAL_ROWS, 1, spec["method"], spec["fused"], tmp_path, spec["train"]
    )
    tokens = check_two_process_step(
        result, ga=GA, expected=expected, expected_loss=expected_loss, one_params=one_params,
        one_log=smooth_log(one.state.log_history),
    )
    assert sum(map(sum, tokens)) == total and sum(tokens[0]) != sum(tokens[1]), tokens  # unequal ranks
    assert result["fused_ran"] == spec["fused"] and not result["fallback_warnings"]
