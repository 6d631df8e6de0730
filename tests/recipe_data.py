"""Tiny models and data files for the recipe tests: a Llama model directory with a BPE tokenizer trained here, English
text files, instruction pairs and translation pairs. Everything is built from configs and the standard library's own
English text (`pydoc_data.topics`); nothing is downloaded.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def english_lines(count: int, *, offset: int = 0) -> list[str]:
    """Non-empty lines of Python's help topics (real English, shipped with CPython)."""
    from pydoc_data.topics import topics

    lines = []
    for key in sorted(topics):
        lines.extend(line.strip() for line in topics[key].splitlines() if len(line.split()) >= 4)
    if len(lines) < offset + count:
        raise ValueError(f"pydoc_data.topics has {len(lines)} usable lines, {offset + count} requested.")
    return lines[offset : offset + count]


def train_causal_tokenizer(texts: list[str], vocab_size: int = 400):
    """Byte-level BPE with <s> prepended (a Llama-style template: bos, no eos), as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="right",
    )


def write_tiny_llama_dir(directory: Path, texts: list[str], *, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32) and its tokenizer, saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_causal_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def instruction_rows(lines: list[str]) -> list[dict]:
    """Prompt: "Repeat in capitals: <line>" ; completion: the line in capitals (a learnable mapping)."""
    return [{"prompt": f"Repeat in capitals: {line}\n", "completion": line.upper()} for line in lines]


# A small English->German lexicon; sentences are built from it word by word with German word order kept simple.
_NUMBERS = {"one": "ein", "two": "zwei", "three": "drei", "four": "vier", "five": "fünf", "six": "sechs"}
_COLOURS = {"red": "rote", "green": "grüne", "blue": "blaue", "black": "schwarze", "white": "weiße"}
_NOUNS = {"houses": "Häuser", "cars": "Autos", "books": "Bücher", "trees": "Bäume", "windows": "Fenster"}
_VERBS = {"I see": "Ich sehe", "we buy": "Wir kaufen", "you paint": "Du malst", "they sell": "Sie verkaufen"}


def translation_pairs(count: int, *, seed: int = 0) -> list[tuple[str, str]]:
    """Distinct (English, German) sentence pairs such as ("I see two red cars", "Ich sehe zwei rote Autos")."""
    combos = list(itertools.product(_VERBS.items(), _NUMBERS.items(), _COLOURS.items(), _NOUNS.items()))
    random.Random(seed).shuffle(combos)
    if count > len(combos):
        raise ValueError(f"Only {len(combos)} distinct pairs exist, {count} requested.")
    pairs = []
    for (verb, verb_de), (number, number_de), (colour, colour_de), (noun, noun_de) in combos[:count]:
        number_de = "einen" if number == "one" else number_de
        pairs.append((f"{verb} {number} {colour} {noun}", f"{verb_de} {number_de} {colour_de} {noun_de}"))
    return pairs


def write_translation_files(directory: Path, train: int, validation: int) -> tuple[Path, Path, list[tuple[str, str]]]:
    """train.jsonl / dev.jsonl in run_translation.py's format; returns the paths and the validation pairs."""
    pairs = translation_pairs(train + validation)
    rows = [{"translation": {"en": en, "de": de}} for en, de in pairs]
    directory.mkdir(parents=True, exist_ok=True)
    return (
        write_jsonl(directory / "train.jsonl", rows[:train]),
        write_jsonl(directory / "dev.jsonl", rows[train:]),
        pairs[train:],
    )
