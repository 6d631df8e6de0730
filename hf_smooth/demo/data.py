"""What the seq2seq demo builds at run time from its data: a train/test split, a BPE tokenizer, a small Marian model.

No pretrained seq2seq model ships on PyPI, so the translation recipe trains both the tokenizer (with the
`tokenizers` library, on the training pairs only) and the model (Marian architecture from a `MarianConfig`) from
scratch. The data itself is read by :mod:`hf_smooth.demo.assets`, which re-exports these three helpers.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Sequence

__all__ = ["build_marian", "train_bpe_tokenizer", "train_test_split_pairs"]


def train_test_split_pairs(
    pairs: Sequence[tuple[str, str]], test_size: float | int = 0.1, seed: int = 0
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split translation pairs deterministically, never putting one source string on both sides.

    Pairs are grouped by source text (gettext catalogs hold the same English with different targets under different
    message contexts; splitting such a group would leak the source into the test set). Groups are shuffled with
    `random.Random(seed)` and taken for the test set until it holds `test_size` pairs; each side keeps the input
    order. The result depends only on `pairs`, `test_size` and `seed`, so every rank of a DDP run gets the same split.

    Args:
        pairs (`Sequence[tuple[str, str]]`):
            (source, target) pairs.
        test_size (`float` or `int`, *optional*, defaults to 0.1):
            Fraction of the pairs in (0, 1), or a number of pairs.
        seed (`int`, *optional*, defaults to 0):
            Shuffling seed.

    Returns:
        `(train_pairs, test_pairs)`, both non-empty.
    """
    pairs = list(pairs)
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"A fractional test_size must lie in (0, 1), got {test_size}.")
        wanted = max(1, round(test_size * len(pairs)))
    elif isinstance(test_size, int) and test_size > 0:
        wanted = test_size
    else:
        raise ValueError(f"test_size must be a fraction in (0, 1) or a positive number of pairs, got {test_size!r}.")
    groups: dict[str, list[int]] = {}
    for index, (source, _) in enumerate(pairs):
        groups.setdefault(source, []).append(index)
    if len(groups) < 2 or wanted >= len(pairs):
        raise ValueError(
            f"Cannot split {len(pairs)} pairs ({len(groups)} distinct sources) into train and a test set of {wanted}."
        )
    order = list(groups)
    random.Random(seed).shuffle(order)
    test_indices: set[int] = set()
    for source in order:
        if len(test_indices) >= wanted:
            break
        test_indices.update(groups[source])
    train = [pair for i, pair in enumerate(pairs) if i not in test_indices]
    test = [pair for i, pair in enumerate(pairs) if i in test_indices]
    if not train:
        raise ValueError(f"test_size={test_size!r} leaves no training pairs.")
    return train, test


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4000,
    special_tokens: Sequence[str] = ("<pad>", "</s>", "<unk>"),
    *,
    min_frequency: int = 2,
    model_max_length: int = 512,
):
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a `PreTrainedTokenizerFast` for Marian.

    One vocabulary for source and target (Marian's `share_encoder_decoder_embeddings`): train it on both sides.
    Byte-level BPE never produces an unknown token and decodes back to the exact input text (spaces and umlauts
    included), so BLEU is computed on the real strings. Every encoded sequence ends with ``</s>``, as Marian's
    SentencePiece tokenizer does; `tokenizer(text_target=...)` uses the same vocabulary.

    Training is deterministic for given texts (checked across processes with different hash seeds), so every rank
    of a DDP run builds the same vocabulary.

    Args:
        texts (`Iterable[str]`):
            Training text, e.g. the sources and targets of the training pairs (not the test pairs).
        vocab_size (`int`, *optional*, defaults to 4000):
            Target vocabulary size, including the 256 byte symbols and the special tokens.
        special_tokens (`Sequence[str]`, *optional*, defaults to `("<pad>", "</s>", "<unk>")`):
            Pad, eos and unk tokens, in this order; they get ids 0, 1, 2. Extra entries are added as additional
            special tokens.
        min_frequency (`int`, *optional*, defaults to 2):
            Minimum count of a merge.
        model_max_length (`int`, *optional*, defaults to 512):
            Stored on the tokenizer (truncation limit when `max_length` is not given).

    Returns:
        `transformers.PreTrainedTokenizerFast` with `pad_token`, `eos_token` and `unk_token` set.
    """
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(special_tokens)
    tokenizer = _train_byte_level_bpe(texts, vocab_size, special_tokens, min_frequency=min_frequency)
    pad, eos, unk = special_tokens[:3]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=pad,
        eos_token=eos,
        unk_token=unk,
        additional_special_tokens=special_tokens[3:] or None,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def _train_byte_level_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str], *, min_frequency: int):
    """The `tokenizers.Tokenizer` behind `train_bpe_tokenizer` (imports no transformers: tests run it in
    subprocesses)."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    except ImportError as error:
        raise ImportError("train_bpe_tokenizer needs the `tokenizers` package: pip install tokenizers") from error

    if len(special_tokens) < 3 or len(set(special_tokens)) != len(special_tokens):
        raise ValueError(
            f"special_tokens must hold distinct pad, eos and unk tokens (in that order), got {special_tokens}."
        )
    eos, unk = special_tokens[1], special_tokens[2]
    texts = [text for text in texts if text]
    if not texts:
        raise ValueError("train_bpe_tokenizer got no non-empty text.")

    tokenizer = Tokenizer(models.BPE(unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A $B {eos}", special_tokens=[(eos, tokenizer.token_to_id(eos))]
    )
    return tokenizer


def build_marian(
    tokenizer,
    *,
    d_model: int = 128,
    layers: int = 2,
    heads: int = 4,
    ffn: int = 512,
    max_position_embeddings: int = 256,
    dropout: float = 0.1,
    seed: int | None = 0,
):
    """A small Marian-architecture translation model, randomly initialized, matching `tokenizer`.

    Token ids follow the tokenizer: `pad_token_id` and `eos_token_id` from it, and `decoder_start_token_id = pad`
    as in every opus-mt Marian checkpoint (so `DataCollatorForSeq2Seq(model=...)` /
    `prepare_decoder_input_ids_from_labels` start decoding from pad). Encoder, decoder and output embeddings are
    shared (one vocabulary), embeddings are scaled by sqrt(d_model) as in Marian. The defaults (1.5M parameters
    with a 4000-token vocabulary) train a few thousand short UI strings in minutes on 2 CPU cores.

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            Tokenizer with pad and eos tokens, e.g. from :func:`train_bpe_tokenizer`.
        d_model (`int`, *optional*, defaults to 128):
            Hidden size.
        layers (`int`, *optional*, defaults to 2):
            Encoder layers and decoder layers (each).
        heads (`int`, *optional*, defaults to 4):
            Attention heads; must divide `d_model`.
        ffn (`int`, *optional*, defaults to 512):
            Feed-forward inner size.
        max_position_embeddings (`int`, *optional*, defaults to 256):
            Longest source or target sequence (Marian uses fixed sinusoidal positions).
        dropout (`float`, *optional*, defaults to 0.1):
            Dropout probability.
        seed (`int`, *optional*, defaults to 0):
            Seeds the initialization (the global torch RNG is restored afterwards); `None` uses the current RNG.

    Returns:
        `transformers.MarianMTModel`.
    """
    import torch
    from transformers import MarianConfig, MarianMTModel

    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("build_marian needs a tokenizer with pad and eos tokens (train_bpe_tokenizer sets both).")
    if d_model % heads:
        raise ValueError(f"heads ({heads}) must divide d_model ({d_model}).")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    vocab_size = len(tokenizer)
    config = MarianConfig(
        vocab_size=vocab_size,
        decoder_vocab_size=vocab_size,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        max_position_embeddings=max_position_embeddings,
        dropout=dropout,
        activation_function="swish",  # as opus-mt
        scale_embedding=True,
        pad_token_id=pad,
        eos_token_id=eos,
        decoder_start_token_id=pad,
        forced_eos_token_id=eos,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
    )
    rng = torch.random.fork_rng() if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        model = MarianMTModel(config)
    generation = model.generation_config
    generation.decoder_start_token_id = pad
    generation.pad_token_id = pad
    generation.eos_token_id = eos
    generation.forced_eos_token_id = eos
    generation.bad_words_ids = [[pad]]  # never emit pad mid-sequence (opus-mt does the same)
    generation.max_length = max_position_embeddings
    return model

