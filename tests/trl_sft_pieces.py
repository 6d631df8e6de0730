"""Tiny pieces for TRL's SFTTrainer (tests/test_integrations.py, the README's TRL examples in tests/test_readme.py):
a word-level tokenizer trained here, prompt/completion rows, a tiny Llama of the tokenizer's size and an SFTConfig.
"""

from __future__ import annotations

import contextlib
import importlib.metadata

import pytest
from packaging.version import Version
from tiny_models import BUILDERS


def sft_pieces(tmp_path, **config_extra):
    """(trl, tokenizer, dataset, model, config); skips the test when trl is not installed."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"question {i} answer {i * 7 % 11} done" for i in range(40)]
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    data = Dataset.from_list(
        [{"prompt": f"question {i}", "completion": f" answer {i * 7 % 11} done"} for i in range(16)]
    )
    model = BUILDERS["llama"](0, vocab=len(tokenizer))
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="no", disable_tqdm=True, completion_only_loss=True, max_length=32,
        learning_rate=1e-2, **config_extra,
    )
    return trl, tokenizer, data, model, config


def compute_loss_func_deprecation():
    """Context for building an SFTTrainer with compute_loss_func=: expects the FutureWarning of trl >= 1.15, which
    deprecated that argument (removal planned for trl 2.0); older trl (the floor, 1.0) accepts it silently."""
    if Version(importlib.metadata.version("trl")) >= Version("1.15"):
        return pytest.warns(FutureWarning, match="compute_loss_func")
    return contextlib.nullcontext()
