"""The models and the global batch of tests/test_fsdp2.py, shared with the script it launches
(tests/scripts/sharded_fused.py), so both sides build exactly the same float64 model and data."""

from __future__ import annotations

import torch
from tiny_models import PadCollator, causal_examples, tiny_llama
from transformers import LlamaForCausalLM

GLOBAL_ROWS = 8  # 2 ranks x 4 rows, one micro-batch each
EMBEDDINGS = ("untied", "tied", "lora", "lorabody")
LORA_TARGETS = {"lora": ["q_proj", "v_proj", "lm_head"], "lorabody": ["q_proj", "v_proj"]}


def build_case_model(embeddings: str):
    """The tiny Llama (seed 0) in float64: untied, tied (lm_head.weight is embed_tokens.weight), or untied with a peft
    LoRA adapter (r=4, non-zero B) on q_proj, v_proj and the output layer (``lora``) or on q_proj and v_proj only
    (``lorabody``)."""
    if embeddings not in EMBEDDINGS:
        raise ValueError(f"embeddings must be one of {EMBEDDINGS}, got {embeddings!r}")
    model = tiny_llama(0)
    if embeddings == "tied":
        config = model.config
        config.tie_word_embeddings = True
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        assert model.lm_head.weight is model.model.embed_tokens.weight
    model = model.double()
    if embeddings in LORA_TARGETS:
        import peft

        torch.manual_seed(1)
        config = peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[embeddings], init_lora_weights=False
        )
        model = peft.get_peft_model(model, config)
    return model


def global_examples():
    return causal_examples(GLOBAL_ROWS, seed=0)


def global_token_count() -> int:
    """Scored tokens of the global batch (labels after the causal shift that are not -100)."""
    return sum(sum(label != -100 for label in example["labels"][1:]) for example in global_examples())


def case_batch(rank: int, world: int):
    """Rank `rank`'s micro-batch: its contiguous share of the global rows, padded by tests/tiny_models.PadCollator."""
    per_rank = GLOBAL_ROWS // world
    return PadCollator()(global_examples()[rank * per_rank : (rank + 1) * per_rank])
