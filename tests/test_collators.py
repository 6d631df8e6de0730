"""Accumulation invariance fed by transformers' own collators, against the per-example oracle of trainer_helpers.

`DataCollatorForLanguageModeling(mlm=False)` (Llama, GPT-2) and `DataCollatorForSeq2Seq(model=...)` (T5, Marian)
return a `BatchEncoding`, not a `dict`; `DataCollatorWithFlattening` packs a micro-batch into one row with
`position_ids` (padding-free). For each, one SGD step (lr 1) on the global batch of 4 rows split as 4 x 1, 2 x 2 and
1 x 4 must land on the oracle's parameters (each row run alone, float64 per-token losses from F.cross_entropy or the
naive MaxSup formula, summed over the global batch, divided by its scored-token count), log the oracle's loss, and
hand `compute_loss` that global count. A trainer that skipped the token count for these batches (issue 10.1) fails
here: each micro-batch is then averaged over itself and the step is about GA times too large.
"""

from __future__ import annotations

import pytest
import torch
from collator_data import collator_features, make_collator, oracle_examples, scored_tokens
from tiny_models import BUILDERS, SEQ2SEQ, causal_examples, seq2seq_examples
from trainer_helpers import METHODS, max_diff, params_of, reference_step, train_with_collator
from transformers import BatchEncoding

SPLITS = [(4, 1), (2, 2), (1, 4)]


def examples_for(name: str) -> list[dict]:
    return seq2seq_examples(4) if name in SEQ2SEQ else causal_examples(4)


def assert_collator_output(kind: str, batches: list, rows_per_batch: int) -> None:
    """The premise: the trainer got the collator's own batch type, not a dict made for the test."""
    assert batches
    for batch in batches:
        if kind == "flattening":
            # padding-free: one packed row, positions restarting at 0 for every example
            assert type(batch) is dict and batch["input_ids"].shape[0] == 1, type(batch)
            assert "position_ids" in batch and "attention_mask" not in batch
            assert int((batch["position_ids"][0] == 0).sum()) == rows_per_batch  # examples packed in the row
        else:
            assert isinstance(batch, BatchEncoding) and not isinstance(batch, dict), type(batch)
            assert batch["labels"].shape[-1] % 8 == 0 and bool((batch["labels"] == -100).any())  # padded


CASES = (
    [(name, "lm", method, fused) for name in ["llama", "gpt2"] for method in METHODS for fused in [False, True]]
    + [(name, "seq2seq", method, False) for name in ["t5", "marian"] for method in METHODS]
    + [("llama", "flattening", method, fused) for method in METHODS for fused in [False, True]]
    + [("gpt2", "flattening", "maxsup", True)]
)
assert len(CASES) == 25


@pytest.mark.parametrize("name,kind,method,fused", CASES)
def test_accumulation_invariance_with_transformers_collators(name, kind, method, fused, tmp_path):
    examples = examples_for(name)
    rows = oracle_examples(kind, examples)
    expected, expected_loss = reference_step(BUILDERS[name](0), name, rows, method)
    initial = params_of(BUILDERS[name](0))
    assert max_diff(expected, initial) > 1e-3  # the step moves the parameters: the comparison can fail
    scored = scored_tokens(name, rows)
    for bs, ga in SPLITS:
        params, trainer = train_with_collator(name, kind, bs, ga, method, fused, tmp_path / f"{bs}x{ga}", examples)
        assert_collator_output(kind, trainer.seen_batches, bs)
        assert len(trainer.seen_batches) == ga, (bs, ga)
        # compute_loss was handed the count of the whole global batch (None: each micro-batch averaged alone)
        assert [None if c is None else int(c) for c in trainer.step_counts] == [scored], (bs, ga)
        assert max_diff(params, expected) < 1e-6, (bs, ga)
        (log,) = [entry for entry in trainer.state.log_history if "nll" in entry]
        assert log["loss"] == pytest.approx(expected_loss, rel=1e-5), (bs, ga)
        assert log["num_tokens_scored"] == scored, (bs, ga)


def test_flattened_rows_do_not_attend_to_each_other():
    """The premise of the padding-free cases: with the Trainer's use_cache=False, a packed row's logits are each
    example's own (block-diagonal causal attention from position_ids), so the oracle's one-row-at-a-time run is the
    right reference. transformers builds no packed mask when a cache exists, which is why this is checked."""
    examples = causal_examples(4)
    batch = make_collator("flattening")(collator_features("flattening", examples))
    for name in ["llama", "gpt2"]:
        model = BUILDERS[name](0)
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples])
        assert (packed[0] - alone).abs().max().item() < 1e-5, name
