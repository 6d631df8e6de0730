"""transformers' own collators on the tiny models of tests/tiny_models.py: a tiny tokenizer built in code, the
features each collator takes, and the examples the per-example oracle of tests/trainer_helpers.py scores.

`DataCollatorForLanguageModeling` and `DataCollatorForSeq2Seq` return a `BatchEncoding` (a `UserDict`, not a `dict`);
`DataCollatorWithFlattening` (padding-free) returns a plain dict of one packed row with `position_ids`. These are
the batches real pipelines hand the Trainer, so the trainer tests that use them prove what hand-made `dict` batches
cannot.
"""

from __future__ import annotations

from tiny_models import PAD, SEQ2SEQ, VOCAB
from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, DataCollatorWithFlattening
from transformers import PreTrainedTokenizerFast

UNK, EOS = 1, 2

# Extra padding beyond the longest row, so padded positions are many and any mis-masking shows.
PAD_TO_MULTIPLE_OF = 8

COLLATORS = ("lm", "seq2seq", "flattening")


def word(i: int) -> str:
    return f"w{i}"


def tiny_tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``<pad> <unk> </s> w3 ... w{vocab-1}`` (ids = the tiny models' token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    table = {"<pad>": PAD, "<unk>": UNK, "</s>": EOS, **{word(i): i for i in range(3, vocab)}}
    assert sorted(table.values()) == list(range(vocab))
    backend = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )
    assert tokenizer.pad_token_id == PAD and tokenizer.padding_side == "right"
    return tokenizer


def make_collator(kind: str, tokenizer=None, model=None):
    """transformers' collator of each kind, as a user would build it."""
    if kind == "lm":
        return DataCollatorForLanguageModeling(tokenizer, mlm=False, pad_to_multiple_of=PAD_TO_MULTIPLE_OF)
    if kind == "seq2seq":
        if model is None:
            raise ValueError("DataCollatorForSeq2Seq needs model= to build decoder_input_ids from the labels.")
        return DataCollatorForSeq2Seq(tokenizer, model=model, pad_to_multiple_of=PAD_TO_MULTIPLE_OF)
    if kind == "flattening":
        return DataCollatorWithFlattening()
    raise ValueError(f"unknown collator kind {kind!r}; one of {COLLATORS}")


def collator_features(kind: str, examples: list[dict]) -> list[dict]:
    """What the collator is fed, from `causal_examples` / `seq2seq_examples` rows.

    `DataCollatorForLanguageModeling(mlm=False)` takes only `input_ids` and scores every non-pad token;
    `DataCollatorWithFlattening` keeps the given labels (prompt masks included) and puts -100 on each row's first
    token; `DataCollatorForSeq2Seq` takes source `input_ids` and target `labels`.
    """
    if kind == "lm":
        return [{"input_ids": list(e["input_ids"])} for e in examples]
    return [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])} for e in examples]


def oracle_examples(kind: str, examples: list[dict]) -> list[dict]:
    """The same rows as the oracle sees them: unpadded, with the labels the collator will produce."""
    if kind == "lm":
        assert all(PAD not in e["input_ids"] for e in examples)  # the collator masks pad ids only
        return [{"input_ids": list(e["input_ids"]), "labels": list(e["input_ids"])} for e in examples]
    return [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])} for e in examples]


def scored_tokens(name: str, oracle_rows: list[dict]) -> int:
    """Tokens the loss scores, by hand: all non-ignored labels (seq2seq) or those after the causal shift."""
    start = 0 if name in SEQ2SEQ else 1
    return sum(sum(1 for label in row["labels"][start:] if label != -100) for row in oracle_rows)
