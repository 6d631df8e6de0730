"""Tiny models built from configs, and a deterministic padded dataset, for the trainer tests (no hub access)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MarianConfig, MarianMTModel
from transformers import T5Config, T5ForConditionalGeneration

VOCAB = 64
PAD = 0


def tiny_llama(seed: int = 0, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, attention_dropout=0.0,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2(seed: int = 0, vocab: int = VOCAB) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    return GPT2LMHeadModel(config)


def tiny_t5(seed: int = 0, vocab: int = VOCAB) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
        dropout_rate=0.0, pad_token_id=PAD, eos_token_id=2, decoder_start_token_id=PAD,
    )
    return T5ForConditionalGeneration(config)


def tiny_marian(seed: int = 0, vocab: int = VOCAB) -> MarianMTModel:
    torch.manual_seed(seed)
    config = MarianConfig(
        vocab_size=vocab, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=PAD, eos_token_id=2,
        decoder_start_token_id=PAD, forced_eos_token_id=2,
    )
    return MarianMTModel(config)


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5, "marian": tiny_marian}
SEQ2SEQ = {"t5", "marian"}


def causal_examples(n: int = 8, seed: int = 0, vocab: int = VOCAB, min_len: int = 3, max_len: int = 12):
    """Variable-length examples; some prompt tokens masked with -100 so counts differ from lengths."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        labels = list(ids)
        prompt = int(torch.randint(0, length - 1, (1,), generator=g))
        labels[:prompt] = [-100] * prompt
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def seq2seq_examples(n: int = 8, seed: int = 0, vocab: int = VOCAB, min_len: int = 2, max_len: int = 10):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        src = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        tgt = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        examples.append(
            {
                "input_ids": torch.randint(3, vocab, (src,), generator=g).tolist() + [2],
                "labels": torch.randint(3, vocab, (tgt,), generator=g).tolist() + [2],
            }
        )
    return examples


class PadCollator:
    """Right-pads input_ids with PAD (attention_mask 0) and labels with -100, to the longest in the batch."""

    def __call__(self, features):
        batch = {}
        longest = max(len(f["input_ids"]) for f in features)
        batch["input_ids"] = torch.tensor([f["input_ids"] + [PAD] * (longest - len(f["input_ids"])) for f in features])
        batch["attention_mask"] = torch.tensor(
            [[1] * len(f["input_ids"]) + [0] * (longest - len(f["input_ids"])) for f in features]
        )
        longest_labels = max(len(f["labels"]) for f in features)
        batch["labels"] = torch.tensor([f["labels"] + [-100] * (longest_labels - len(f["labels"])) for f in features])
        return batch


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]
