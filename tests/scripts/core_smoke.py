"""`pip install -e .` alone (torch, transformers, accelerate; no extras) gives a working library.

Run by .ci/run's `core` leg in a virtual environment holding only the core dependencies:

    python tests/scripts/core_smoke.py

It checks that no optional package is installed (so the check means something), then trains a tiny Llama for two
steps with SmoothTrainer (MaxSup, fused and unfused, gradient accumulation), evaluates it, and checks the logged
objective against a float64 oracle computed here with torch alone. Exits non-zero on any failure.
"""

import importlib.util
import math
import sys
import tempfile

OPTIONAL = ("datasets", "sacrebleu", "gguf", "polib", "peft", "matplotlib", "trl", "evaluate", "triton")  # pyyaml: accelerate

present = [name for name in OPTIONAL if importlib.util.find_spec(name) is not None]
if present:
    sys.exit(f"core_smoke: optional packages are installed ({present}); run it where only the core ones are.")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import hf_smooth  # noqa: E402
from hf_smooth import SmoothTrainer, SmoothTrainingArguments, TokenMetrics, maxsup_loss  # noqa: E402

ALPHA = 0.1


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def examples(n=8):
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 12, (1,), generator=g))
        ids = torch.randint(3, 64, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


def collate(features):
    longest = max(len(f["input_ids"]) for f in features)
    pad = lambda seq, value: seq + [value] * (longest - len(seq))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(f["input_ids"], 0) for f in features]),
        "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features]),
        "labels": torch.tensor([pad(f["labels"], -100) for f in features]),
    }


def oracle(model, rows) -> float:
    model = tiny_llama().double()
    total, count = 0.0, 0
    for row in rows:
        with torch.no_grad():
            z = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
        y = torch.tensor(row["labels"][1:])
        per = F.cross_entropy(z, y, reduction="none") + ALPHA * (z.max(-1).values - z.mean(-1))
        total, count = total + per.sum().item(), count + len(y)
    return total / count


rows = examples()
expected = oracle(None, rows)
for fused in (False, True):
    with tempfile.TemporaryDirectory() as out:
        args = SmoothTrainingArguments(
            output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1,
            learning_rate=0.0, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
            smoothing_method="maxsup", smoothing_alpha=ALPHA, smoothing_fused_loss=fused,
        )
        trainer = SmoothTrainer(model=tiny_llama(), args=args, train_dataset=rows, eval_dataset=rows,
                                data_collator=collate)
        trainer.train()
        logged = trainer.state.log_history[0]["loss"]
        assert math.isclose(logged, expected, rel_tol=1e-5), (fused, logged, expected)
        assert trainer.fused_loss_active is fused
        metrics = trainer.evaluate()
        assert math.isclose(metrics["eval_loss"], expected, rel_tol=1e-5), metrics
assert isinstance(TokenMetrics(), TokenMetrics) and callable(maxsup_loss)
# The optional parts say what to install, not a bare ModuleNotFoundError.
for name, load, extra in (
    ("SmoothSFTTrainer", lambda: hf_smooth.SmoothSFTTrainer, "hf_smooth[trl]"),
    ("evaluate_modules", lambda: __import__("hf_smooth.evaluate_modules", fromlist=["load"]).load("token_nll"),
     "evaluate"),
):
    try:
        load()
    except ImportError as error:
        assert extra in str(error), (name, str(error))
    else:
        sys.exit(f"core_smoke: {name} loaded without its optional dependency")
print(f"core_smoke: hf_smooth {hf_smooth.__version__} works with torch, transformers, accelerate alone "
      f"(objective {expected:.6f} == logged, fused and unfused)")
