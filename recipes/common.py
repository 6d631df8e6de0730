"""Pieces both recipes share: argument parsing with a config file, the checks that stop bad input before anything
trains, the output directory (refuse, overwrite or resume), LoRA, Ctrl-C handling, the end of a run (save, evaluate,
write every output) and the results table.

Kept beside the recipes (imported by path, not part of the package) so `clm.py` and `translation.py` cannot drift
apart on the parts they have in common.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, TrainerCallback, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from hf_smooth.losses import perplexity

# ---- how a mistake reaches the user ---------------------------------------------------------------------------------


class RecipeError(Exception):
    """Bad input: a flag, a config file, a data file, a model directory or the output directory.

    Raised by the checks below, before anything trains; `recipe_main` prints it as one line, ``error: ...``, on stderr
    and exits with status 2, as argparse does for a bad flag. Each message names the flag or file and what to do.
    """


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a checkpoint was written; the message says how to resume.
    `recipe_main` prints it and exits with 128 + the signal number (130 for Ctrl-C), as a shell does."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def recipe_main(run, argv: list[str] | None = None) -> dict:
    """Call a recipe's `run(argv)` and return its metrics; a `RecipeError` becomes one line on stderr and exit 2."""
    try:
        metrics = run(argv)[0]
    except RecipeError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except TrainingInterrupted as stopped:
        if int(os.environ.get("RANK", "0")) == 0:
            print(stopped, file=sys.stderr, flush=True)
        close_process_group()
        raise SystemExit(stopped.exit_code) from None
    close_process_group()
    return metrics


def close_process_group() -> None:
    """Destroy the default process group once every rank has finished (or stopped at a checkpoint together), as
    torch asks of a script. Left to interpreter exit, gloo's worker threads can abort the process (SIGABRT,
    "terminate called without an active exception"), so a run that wrote all its outputs exits with 134; NCCL
    warns. Not after an error: a rank still inside a collective could then hang instead of failing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- arguments ------------------------------------------------------------------------------------------------------


@dataclass
class LoraArguments:
    """LoRA adapters (peft). Only the adapter weights train; the saved output is the adapter."""

    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module names to adapt (e.g. q_proj v_proj), or 'all-linear' for every linear layer but "
                  "the output head."},
    )

    def __post_init__(self):
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be a positive rank, got {self.lora_r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if "all-linear" in self.lora_target_modules and len(self.lora_target_modules) > 1:
            raise ValueError(
                f"lora_target_modules={self.lora_target_modules}: 'all-linear' cannot be combined with module names; "
                "give either 'all-linear' or the names."
            )


@dataclass
class OutputDirArguments:
    """What a run does with an existing --output_dir. Mixed into the recipes' TrainingArguments: transformers 5
    removed `overwrite_output_dir`, and `resume_from_checkpoint` is only read by scripts (as in run_clm.py)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a previous run in --output_dir: removes the files and checkpoint-* folders a run "
                  "writes (recipes/common.py RUN_OUTPUTS) and keeps anything else. Without it a non-empty "
                  "--output_dir is refused."},
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "Continue an interrupted run: a checkpoint-<step> folder, or 'true' for the last one in "
                  "--output_dir. Same step, learning-rate and alpha schedule, data order and loss curve."},
    )
    # A default of TrainingArguments changed for the recipes: with None, the Trainer asks DDP to search for unused
    # parameters every step (it does unless gradient checkpointing is on), and DDP then warns on every rank that it
    # found none. The recipes' models (and LoRA adapters) use every trainable parameter in each forward.
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "DDP: search the autograd graph for parameters without gradient at every step. Off: the "
                  "recipes' models use all their trainable parameters; turn it on for a model with unused branches."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.dataloader_pin_memory and not _accelerator_available():
            self.dataloader_pin_memory = False  # pinned memory needs an accelerator (torch warns and ignores it)


# Float flags for which +inf is a meaningful setting (clip nothing but still log the norm).
INFINITE_ALLOWED = {"max_grad_norm"}
CONVERTER_NAMES = {"int": "an integer", "float": "a number", "string_to_bool": "true or false"}


def _line_of(text: str, key: str) -> int | None:
    """1-based line where `key` is set in a YAML/JSON mapping (first match), or None."""
    pattern = re.compile(rf"""^\s*["']?{re.escape(key)}["']?\s*:""")
    return next((n for n, line in enumerate(text.splitlines(), 1) if pattern.search(line)), None)


def _key_near(text: str, line: int) -> str:
    """' (key 'x')' for the last key set at or before `line`, to point at the entry a syntax error is in."""
    pattern = re.compile(r"""^\s*["']?([A-Za-z_][\w.-]*)["']?\s*:""")
    for candidate in reversed(text.splitlines()[:line]):
        found = pattern.search(candidate)
        if found:
            return f" (key {found.group(1)!r})"
    return ""


def read_utf8(path: Path, what: str) -> str:
    """The text of `path`; invalid UTF-8 is a `RecipeError` naming the file, byte offset and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise RecipeError(
            f"{what} {path}: invalid UTF-8 at byte {error.start} (line {line}): re-save the file as UTF-8."
        ) from None


def _read_config_file(path: Path) -> tuple[dict, str]:
    """The mapping of a .yaml/.yml/.json argument file and its text; syntax errors name the file, line and key."""
    if not path.is_file():
        raise RecipeError(f"Config file {path} does not exist.")
    text = read_utf8(path, "Config file")
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise RecipeError(
            f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}{_key_near(text, error.lineno)}."
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        near = _key_near(text, mark.line + 1) if mark is not None else ""
        raise RecipeError(f"{where}: invalid YAML: {problem}{near}.") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"{path} must hold a mapping of argument names to values, got {type(values).__name__}.")
    return values, text


def _file_value(action, key: str, value, path: Path, text: str):
    """A value read from a YAML/JSON file, converted as the same flag's command-line string would be."""
    if value is None or isinstance(value, dict):
        return value  # None, or a dict for dict-valued TrainingArguments such as fsdp_config
    convert = action.type or (lambda text: text)
    line = _line_of(text, key)
    where = f"{path}:{line}" if line else str(path)
    if isinstance(value, (list, tuple)):
        if action.nargs not in ("+", "*"):
            return list(value)  # e.g. report_to: [tensorboard], which TrainingArguments accepts as a list
        items = list(value)
    else:
        items = [value]
    values = []
    for item in items:
        try:
            values.append(convert(str(item)))
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            expected = CONVERTER_NAMES.get(getattr(convert, "__name__", ""), "a valid value")
            raise RecipeError(f"{where}: {key}: {item!r} is not {expected}.") from None
    if action.choices is not None:
        wrong = [v for v in values if v not in action.choices]
        if wrong:
            raise RecipeError(f"{where}: {key}: {wrong[0]!r} is not one of {list(action.choices)}.")
    return values if isinstance(value, (list, tuple)) else values[0]


def parse_arguments(dataclass_types, argv: list[str] | None = None):
    """`HfArgumentParser` over `dataclass_types`; a leading .yaml/.yml/.json file gives defaults, flags after it win.

    Every mistake stops here, before anything is loaded, with a `RecipeError` that names the argument: an unknown or
    wrongly typed key in the file, a syntax error in it (file, line and key), an unknown flag, a bad choice or a
    badly typed value on the command line (argparse's message, without its usage text), a non-finite number, or a
    `__post_init__` check (conflicting smoothing knobs, ...).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    launched_ranks = _use_cpu_when_no_accelerator()
    parser = HfArgumentParser(dataclass_types)
    group_smoothing_options(parser)

    def one_line(message: str):  # argparse would print the usage of every TrainingArguments flag first
        raise RecipeError(f"{message} (see --help)")

    parser.error = one_line
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        path = Path(argv.pop(0))
        values, text = _read_config_file(path)
        # The flag named after each field (not the `--no_<field>` switch HfArgumentParser adds for True booleans).
        actions = {action.dest: action for action in parser._actions if f"--{action.dest}" in action.option_strings}
        unknown = sorted(key for key in values if key not in actions)
        if unknown:
            raise RecipeError(
                f"{path}: unknown argument(s) {unknown}. Keys are the recipe's flags without the leading '--' "
                f"(see `python {os.path.basename(sys.argv[0]) or 'recipe.py'} --help`)."
            )
        # File values become the parser's defaults, so any flag given after the file overrides them.
        parser.set_defaults(**{key: _file_value(actions[key], key, value, path, text) for key, value in values.items()})
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # unknown flags and __post_init__ validation: say it before anything loads
        raise RecipeError(f"Invalid arguments: {error}") from None
    for arguments in parsed:
        for item in dataclasses.fields(arguments):
            value = getattr(arguments, item.name, None)
            if isinstance(value, float) and not math.isfinite(value):
                if not (item.name in INFINITE_ALLOWED and value == math.inf):
                    raise RecipeError(f"--{item.name} {value}: give a finite number.")
    training_args = parsed[-1]
    if training_args.learning_rate < 0:
        raise RecipeError(f"--learning_rate {training_args.learning_rate}: give a learning rate >= 0.")
    if training_args.world_size != launched_ranks:
        raise RecipeError(
            f"Launched as {launched_ranks} processes but training would run with world size "
            f"{training_args.world_size}: the processes would train independent copies. On a machine without GPUs "
            "add --use_cpu true (DDP over gloo); otherwise check the accelerate config."
        )
    # --label_smoothing_factor needs no check here: SmoothingArguments took it as --smoothing_method label_smoothing
    # with that epsilon (as run_translation.py users expect), or refused it next to a contradicting smoothing option.
    return parsed


SMOOTHING_GROUP = "smoothing (hf_smooth)"


def catalog_package_pairs(src: str, tgt: str):
    """(train, test, description) from the pinned catalog packages, split by English string (seed 0, 1,000 test
    pairs; the 1,000 dev pairs are not used here): translation.py's default data, and clm.py's with
    --embedded_translation, so that both recipes are scored on the same test pairs."""
    from hf_smooth.demo.catalogs import catalog_pairs, merge_pairs, split_by_source

    if src != "en":
        raise RecipeError(f"--embedded_catalogs packages reads English->X catalogs: --source_lang {src} is not en.")
    try:
        sources = catalog_pairs(tgt, strict=True)
    except (ImportError, ValueError) as error:
        raise RecipeError(f"The catalog packages cannot be read: {error}") from None
    pairs = merge_pairs(sources)
    splits = split_by_source(pairs, test_pairs=1000, dev_pairs=1000, seed=0)
    names = ", ".join(f"{s.package}=={s.version}" for s in sources)
    description = (f"gettext/JSON translation catalogs of {len(sources)} packages ({names}) {src}->{tgt}, "
                   f"{len(pairs)} pairs, test split (embedded)")
    return splits["train"], splits["test"], description


def argument_defaults(dataclass_types) -> dict:
    """Every argument's default as plain JSON values (enums and other objects as their `str`): what a run computes
    with for each flag it does not give. `recipes/compare.py` records them to notice a default changed since a run."""
    values = {}
    for arguments in dataclass_types:
        for item in dataclasses.fields(arguments):
            if not item.init:
                continue
            if item.default is not dataclasses.MISSING:
                values[item.name] = item.default
            elif item.default_factory is not dataclasses.MISSING:
                values[item.name] = item.default_factory()
    return json.loads(json.dumps(values, default=str))


def group_smoothing_options(parser: argparse.ArgumentParser) -> None:
    """List hf_smooth's options (``--smoothing_*``, and transformers' ``--label_smoothing_factor``, which maps onto
    them) first in ``--help``, in their own group, not after the ~700 lines of TrainingArguments. Only the help layout
    changes: argparse parses every action from the parser itself, whatever group shows it."""
    group = parser.add_argument_group(
        SMOOTHING_GROUP,
        "What the loss is: method, strength, schedule. The model, data and TrainingArguments options follow.",
    )
    ours = [action for action in parser._actions if action.dest.startswith("smoothing_")]
    ours += [action for action in parser._actions if action.dest == "label_smoothing_factor"]
    for action in ours:
        for other in parser._action_groups:
            if other is not group and action in other._group_actions:
                other._group_actions.remove(action)
        group._group_actions.append(action)
    parser._action_groups.remove(group)
    parser._action_groups.insert(0, group)
    # The default usage line lists every flag of TrainingArguments before the help text starts.
    parser.usage = "%(prog)s [config.yaml|config.json] [--smoothing_method ...] [--smoothing_alpha ...] [options]"


def check_sample_limits(args) -> None:
    """`--max_train_samples` / `--max_eval_samples`: unset or 0 keeps everything, a negative count is a mistake."""
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ValueError(f"--{name} {value}: give a number of examples >= 0 (0 or unset: all).")


@dataclass
class DataSourceArguments:
    """Where the data comes from, in both recipes: a hub dataset, local files, or (neither) the embedded assets."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset name (datasets.load_dataset)."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Hub dataset configuration (e.g. de-en)."}
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "Local training file: .txt/.json/.jsonl/.csv for clm.py, .json/.jsonl for translation.py."},
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file (same format)."})


def smoothing_classes_from_tokenizer(model, training_args, tokenizer) -> None:
    """Smooth over the tokenizer's vocabulary only: when the model's output layer has more rows than
    ``len(tokenizer)`` (embedding matrices padded to a multiple, as Qwen's 151,936 rows for 151,665 tokens), set
    ``smoothing_num_classes = len(tokenizer)`` unless it was given, and say so in one line. The padded rows stay in
    the softmax; they get no smoothing mass and leave MaxSup's mean and K."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    rows = getattr(getattr(output, "weight", None), "shape", [None])[0] or getattr(model.config, "vocab_size", None)
    if rows is None or getattr(training_args, "smoothing_num_classes", 0) is not None or tokenizer is None:
        return
    if rows > len(tokenizer):
        training_args.smoothing_num_classes = len(tokenizer)
        print(f"Smoothing over the tokenizer's {len(tokenizer):,} tokens: the output layer has {rows:,} rows "
              f"(smoothing_num_classes={len(tokenizer)}; the padded rows get no smoothing mass).", flush=True)


def build_trainer(trainer_class, model, training_args, train, evaluation, tokenizer, data_collator, **extra):
    """The recipe's trainer on its data, with the callback that logs the last step (`LogLastStepCallback`); the
    smoothing classes set from the tokenizer (`smoothing_classes_from_tokenizer`)."""
    smoothing_classes_from_tokenizer(model, training_args, tokenizer)
    return trainer_class(
        model=model, args=training_args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        data_collator=data_collator, callbacks=[LogLastStepCallback()], **extra,
    )


def run_description(task: str, model_name: str, source: str, lora_args, training_args, train, evaluation, **extra):
    """What a run was (written to metrics.json): the task, model, data, method, strength, seed and sizes."""
    return {
        "task": task, "model": model_name, "data": source, "lora": lora_args.use_lora,
        "smoothing_method": training_args.smoothing_method, "smoothing_alpha": training_args.smoothing_alpha,
        "smoothing_alpha_end": training_args.smoothing_alpha_end, "seed": training_args.seed,
        "train_examples": len(train), "eval_examples": len(evaluation), **extra,
    }


def check_data_sources(args, suffixes: tuple[str, ...], what: str) -> None:
    """The data flags both recipes share: a hub dataset or local files (not both), the validation split, the sample
    limits, and local files that exist with one of `suffixes` (`what` names the accepted formats)."""
    if args.dataset_name and args.train_file:
        raise ValueError("Give --dataset_name or --train_file, not both.")
    if args.validation_file and not args.train_file:
        raise ValueError("--validation_file needs --train_file.")
    if not 0 < args.validation_split_percentage < 100:
        raise ValueError(f"--validation_split_percentage must be in (0, 100), got {args.validation_split_percentage}.")
    check_sample_limits(args)
    for path in (args.train_file, args.validation_file):
        if path is None:
            continue
        if not os.path.isfile(path):
            raise ValueError(f"Data file {path} does not exist.")
        if not path.endswith(suffixes):
            raise ValueError(f"Data file {path} must be {what}.")


def load_hub_dataset(args):
    """`datasets.load_dataset(--dataset_name, --dataset_config_name)`, with a one-line error when it fails."""
    from datasets import load_dataset

    try:
        return load_dataset(args.dataset_name, args.dataset_config_name)
    except Exception as error:  # offline, unknown name or config: datasets raises several types
        raise RecipeError(f"Could not load --dataset_name {args.dataset_name}: {error}") from None


def start_run(argument_classes, argv):
    """The start both recipes share: parse (command line and config file; the model arguments first, the training
    arguments last), check the output folder (returns the checkpoint to resume from, or None), check a local model
    path, seed. Returns ``(parsed, checkpoint)``."""
    parsed = parse_arguments(argument_classes, argv)
    training_args = parsed[-1]
    checkpoint = prepare_output_dir(training_args)
    model_path = parsed[0].model_name_or_path
    if model_path is not None:
        check_local_path(model_path, "--model_name_or_path")
    set_seed(training_args.seed)
    return parsed, checkpoint


def _accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _use_cpu_when_no_accelerator() -> int:
    """Number of launched processes; on a machine without any accelerator, make a multi-process launch use CPU DDP.

    `accelerate launch` with a MULTI_GPU config (or `--multi_gpu`) starts the processes with torchrun but does not
    pass the config's `use_cpu` on to them; `TrainingArguments(use_cpu=False)` then finds no GPU and every process
    trains alone, silently. ACCELERATE_USE_CPU=true (read by accelerate's state, as `use_cpu=True` would be) makes
    them one gloo process group instead. The world size is checked against the launch after parsing.
    """
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes"):
        if not _accelerator_available():
            os.environ["ACCELERATE_USE_CPU"] = "true"
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"No GPU found: running the {ranks} processes as CPU DDP (gloo).", flush=True)
    return ranks


# ---- input files and directories ------------------------------------------------------------------------------------

# A local model directory needs a config, weights and a tokenizer (any of these names).
WEIGHT_FILES = re.compile(r"(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "source.spm", "tokenizer.model"}


def check_local_path(path: str, flag: str) -> None:
    """Stop early when `path` is meant as a local model directory but does not exist or lacks model files.

    Meant as local: it starts with `.`, `/` or `~`, it exists, or its first component is an existing local directory
    (`outputs/my-model` next to an `outputs/` folder). Anything else may be a hub id (`org/name`) and is left to
    `from_pretrained`.
    """
    expanded = os.path.expanduser(path)
    first = expanded.split(os.sep, 1)[0]
    looks_local = path.startswith((".", "/", "~")) or os.path.exists(expanded) or (
        os.sep in expanded and os.path.isdir(first)
    )
    if not looks_local:
        return
    if not os.path.isdir(expanded):
        raise RecipeError(f"{flag} {path}: no such local directory (a hub id looks like 'org/name').")
    names = set(os.listdir(expanded))
    if "config.json" not in names and "adapter_config.json" not in names:
        raise RecipeError(
            f"{flag} {path}: no config.json in this directory, so it holds no model. Point it at a folder written by "
            "save_pretrained (config.json, model.safetensors and the tokenizer files)."
        )
    if not any(WEIGHT_FILES.fullmatch(name) for name in names):
        raise RecipeError(
            f"{flag} {path}: has config.json but no weights (model.safetensors or pytorch_model.bin). Save the model "
            "there with model.save_pretrained(...)."
        )
    if "config.json" in names and not names & TOKENIZER_FILES:
        raise RecipeError(
            f"{flag} {path}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...). Save the tokenizer "
            "there with tokenizer.save_pretrained(...)."
        )


def check_data_file(path: str, flag: str) -> None:
    """A local data file must hold some non-blank text and be valid UTF-8 (checked in 1 MiB pieces, so a large file
    is never held in memory); the error names the file, and for bad bytes the byte offset and line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0
    has_text = False
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            pending = decoder.getstate()[0]  # bytes of a character cut at the previous chunk's end
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                data = pending + chunk
                position = offset - len(pending) + error.start
                line = lines + data.count(b"\n", 0, error.start) + 1
                raise RecipeError(
                    f"{flag} {path}: invalid UTF-8 at byte {position} (line {line}): re-save the file as UTF-8."
                ) from None
            has_text = has_text or bool(text.strip())
            if not chunk:
                break
            offset += len(chunk)
            lines += chunk.count(b"\n")
    if not has_text:
        raise RecipeError(f"{flag} {path} is empty: give a file with at least one example.")


def load_data_files(builder: str, files: dict[str, str], flags: dict[str, str]):
    """`datasets.load_dataset(builder, data_files=files)` after `check_data_file` on each; a file datasets cannot read
    (malformed JSON, ragged CSV) is a `RecipeError` naming the flag and file."""
    from datasets import load_dataset

    for split, path in files.items():
        check_data_file(path, flags[split])
    try:
        return load_dataset(builder, data_files=files)
    except Exception as error:  # datasets wraps the parser's error in DatasetGenerationError: report the cause
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        message = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        named = " / ".join(f"{flags[split]} {path}" for split, path in files.items())
        raise RecipeError(f"Could not read {named} as {builder} data: {message}") from None


# ---- the output directory -------------------------------------------------------------------------------------------

# Every file and folder a run writes into --output_dir, as full-match patterns (plus peft's README.md, see
# `is_run_output`): the only names --overwrite_output_dir removes (anything else there is the user's and stays).
# Resuming removes them too, except the checkpoints, because the resumed run writes them all again.
RUN_OUTPUTS = (
    # model or LoRA adapter (save_pretrained), and the TrainingArguments save_model writes beside it
    r"config\.json", r"generation_config\.json", WEIGHT_FILES.pattern, r"adapter_config\.json",
    r"training_args\.bin",
    # tokenizer (save_pretrained of the processing class)
    r"tokenizer\.json", r"tokenizer_config\.json", r"special_tokens_map\.json", r"added_tokens\.json",
    r"chat_template\.(jinja|json)", r"vocab\.(json|txt)", r"merges\.txt", r"spiece\.model",
    r"sentencepiece\.bpe\.model", r"(source|target)\.spm", r"tokenizer\.model",
    # Trainer: checkpoints, state, HF example-script results, TensorBoard logs
    rf"{PREFIX_CHECKPOINT_DIR}-\d+", r"trainer_state\.json", r"(train|eval|all)_results\.json", r"runs",
    # the recipes' own files (and the temporary name log_history.json is written under)
    r"metrics\.json", r"diagnostics\.json", r"eval_reliability\.png", r"eval_logit_gap\.png",
    r"log_history\.json", r"\.log_history\.json\.tmp", r"eval_predictions\.jsonl",
)
_RUN_OUTPUT = re.compile("|".join(f"(?:{pattern})" for pattern in RUN_OUTPUTS))
_PROBE_PREFIX = ".hf_smooth-write-check-"  # the start-up write check's file, removed at once; never counted


def is_run_output(entry: Path) -> bool:
    """Whether `entry` (a path in --output_dir) is something a run writes: its name is in `RUN_OUTPUTS`, or it is the
    README.md model card peft writes beside an adapter (recognized by its front matter; any other README stays)."""
    if entry.name == "README.md":
        with contextlib.suppress(OSError):
            return entry.is_file() and "library_name: peft" in entry.read_text(errors="replace")[:2000]
        return False
    return _RUN_OUTPUT.fullmatch(entry.name) is not None


def _listing(entries: list[Path], limit: int = 4) -> str:
    names = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in entries)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def prepare_output_dir(args) -> str | None:
    """Start-up checks of --output_dir, --overwrite_output_dir and --resume_from_checkpoint, before anything loads.

    Returns the checkpoint to resume from (None for a fresh run). Refuses a non-empty --output_dir unless the run
    overwrites it or resumes a checkpoint inside it, refuses to overwrite the folder a checkpoint is resumed from,
    and checks that the directory can be written (it is created if missing). Nothing is deleted here:
    `clear_previous_outputs` does that once every other check has passed.
    """
    out = Path(args.output_dir)
    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume.strip().lower() in ("", "false", "no", "none"):
        resume = args.resume_from_checkpoint = None
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--output_dir {out} is a file, not a directory: choose another --output_dir.")
    checkpoint = None
    if resume is not None:
        if resume.strip().lower() in ("true", "yes", "1"):
            checkpoint = get_last_checkpoint(out) if out.is_dir() else None
            if checkpoint is None:
                raise RecipeError(
                    f"--resume_from_checkpoint true: no {PREFIX_CHECKPOINT_DIR}-<step> folder in --output_dir {out}. "
                    "Give the checkpoint's path, or drop the flag to start a new run."
                )
        else:
            checkpoint = resume
            if not os.path.isdir(checkpoint):
                raise RecipeError(f"--resume_from_checkpoint {checkpoint}: no such directory.")
        if not os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
            raise RecipeError(
                f"--resume_from_checkpoint: {checkpoint} is not a complete Trainer checkpoint (no trainer_state.json; "
                "its save may have been cut short). Give an earlier checkpoint's path."
            )
    in_place = checkpoint is not None and resumes_in_place(checkpoint, out)
    if in_place and args.overwrite_output_dir:
        raise RecipeError(
            f"--overwrite_output_dir true would delete {checkpoint}, which --resume_from_checkpoint continues from: "
            "give only one of them."
        )
    if not in_place and out.is_dir() and not args.overwrite_output_dir:
        existing = [entry for entry in out.iterdir() if not entry.name.startswith(_PROBE_PREFIX)]
        if existing:
            last = get_last_checkpoint(out)
            resume_hint = f"--resume_from_checkpoint true to continue from {Path(last).name}, " if last else ""
            raise RecipeError(
                f"--output_dir {out} is not empty ({_listing(existing)}). Add {resume_hint}--overwrite_output_dir "
                "true to replace the previous run (only files a run writes are removed), or choose another "
                "--output_dir."
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=out)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise RecipeError(
            f"--output_dir {out} cannot be written ({error.strerror or error}): choose a directory you can write to."
        ) from None
    return checkpoint


def resumes_in_place(checkpoint: str, out: Path) -> bool:
    """Whether `checkpoint` is a folder of --output_dir `out` (the run continues there) rather than elsewhere."""
    return out.is_dir() and Path(checkpoint).resolve().parent == out.resolve()


def clear_previous_outputs(args, *, resuming: bool) -> list[str]:
    """Remove what a previous run wrote in --output_dir (`RUN_OUTPUTS`), on the main process, just before training.

    Called when overwriting or resuming, so the new run's files are never mixed with stale ones (a translation run
    without generation next to an older eval_predictions.jsonl, an all_results.json that transformers' save_metrics
    would merge into). A resumed run keeps its checkpoints. Files and folders with other names are never touched;
    symbolic links are removed, never followed. Returns the removed names.
    """
    out = Path(args.output_dir)
    removed, kept = [], []
    with args.main_process_first(desc="clearing the previous run's outputs", local=False):
        if not (args.process_index == 0 and out.is_dir()):
            return []
        for entry in sorted(out.iterdir()):
            if entry.name.startswith(_PROBE_PREFIX):
                continue
            if not is_run_output(entry) or (resuming and entry.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")):
                kept.append(entry)
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry.name)
    if removed:
        others = [entry for entry in kept if not entry.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")]
        note = f"; kept files a run does not write: {_listing(others)}" if others else ""
        why = "resuming: the run writes them again" if resuming else "--overwrite_output_dir"
        print(f"Removed {len(removed)} outputs of the previous run from {out} ({why}){note}.", flush=True)
    return removed


# ---- LoRA ---------------------------------------------------------------------------------------------------------


def apply_lora(model, lora: LoraArguments, task_type: str):
    """Wrap `model` with LoRA adapters after checking every named target module exists."""
    from peft import LoraConfig, get_peft_model

    targets = list(lora.lora_target_modules)
    if targets != ["all-linear"]:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
            raise RecipeError(
                f"LoRA target module(s) {missing} not found in {type(model).__name__}. Linear layers it has: {linear}."
            )
    config = LoraConfig(
        r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets, task_type=task_type,
    )
    with warnings.catch_warnings():
        # peft (0.21) reads the model's deprecated `is_gradient_checkpointing` property, so transformers (5.24) warns
        # about a spelling neither the user nor hf_smooth wrote.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"LoRA: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)", flush=True)
    return model


# ---- trainer additions ----------------------------------------------------------------------------------------------


class LogLastStepCallback(TrainerCallback):
    """Log at the last optimizer step too, so the training NLL of the final window reaches `log_history`.

    SmoothTrainer sums the loss components between logs; without this, the steps after the last multiple of
    `logging_steps` would never be reported and the run's training NLL would miss them.
    """

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and args.logging_strategy == "steps":
            control.should_log = True
        return control


class LiveLogCallback(TrainerCallback):
    """Rewrite `log_history.json` in --output_dir at every log (main process), so the log so far is on disk whatever
    ends the run: a crash, an interrupt, a killed job. Written to a temporary name and renamed, so a reader never
    sees half a file."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            write_log_history(args.output_dir, state.log_history)
        return control


def write_log_history(output_dir: str, log_history: list[dict]) -> Path:
    path = Path(output_dir) / "log_history.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(".log_history.json.tmp")
    temporary.write_text(json.dumps(log_history, indent=1))
    os.replace(temporary, path)
    return path


class GracefulInterrupt(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM during training: finish the optimizer step, write a checkpoint, stop.

    The handler only records the signal. After a Ctrl-C it restores the previous SIGINT handler, so a second Ctrl-C
    acts as Python's own (KeyboardInterrupt: abort without saving). Further SIGTERMs are ignored: a scheduler (SLURM at
    a time limit) signals every process and torchrun forwards the signal again, so a worker commonly gets two at once,
    and the second must not cancel the checkpoint the first asked for (SIGKILL, or the launcher's own timeout, still
    ends the process). At the end of
    the step the callback sets `control.should_log` (the log covers every step done), `should_save` (the Trainer
    writes a real checkpoint-<step>: weights or adapter, optimizer, scheduler, RNG states and trainer_state.json,
    which `--resume_from_checkpoint` reads) and `should_training_stop`. Under DDP the ranks agree on the stop
    (an all-reduce of the flag per step) so all of them save at the same step; a launcher such as torchrun may
    follow Ctrl-C with SIGTERM and, after its own timeout (30 s for torchrun), SIGKILL.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None  # the first signal received
        self.stopped_at: int | None = None  # the step training stopped at because of it
        self._previous: dict[int, object] = {}

    @contextlib.contextmanager
    def installed(self):
        """Handle the signals inside the block (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            print("Warning: not in the main thread, so Ctrl-C cannot save a checkpoint before stopping.", flush=True)
            yield self
            return
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if signum == signal.SIGTERM and self.signum is not None:
            return  # a repeated SIGTERM (scheduler + launcher): the checkpoint is already on its way
        if signum == signal.SIGINT:
            signal.signal(signum, self._previous[signum])  # the next Ctrl-C aborts
        if self.signum is None:
            self.signum = signum
        abort = "press Ctrl-C again" if signum == signal.SIGINT else "send SIGKILL"
        print(f"\n{signal.Signals(signum).name} received: finishing this optimizer step, then saving a checkpoint "
              f"({abort} to abort without saving).", file=sys.stderr, flush=True)

    def _stop_requested(self, args) -> bool:
        stop = self.signum is not None
        if args.world_size > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                flag = torch.tensor([float(stop)], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
                if stop and self.signum is None:
                    self.signum = signal.SIGINT  # another rank got it
        return stop

    def on_step_end(self, args, state, control, **kwargs):
        if self._stop_requested(args):
            control.should_log = control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def resume_command(script: str, argv: list[str], world_size: int) -> str:
    """The command that continues this run: the same arguments without --overwrite_output_dir and any earlier
    --resume_from_checkpoint, plus `--resume_from_checkpoint true`."""
    dropped = ("--overwrite_output_dir", "--resume_from_checkpoint")
    kept, index = [], 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if token.split("=", 1)[0] not in dropped:
            kept.append(token)
        elif "=" not in token and index < len(argv) and not argv[index].startswith("--"):
            index += 1  # its value
    launcher = "accelerate launch <your launch flags>" if world_size > 1 else "python"
    script = os.path.relpath(script) if not os.path.relpath(script).startswith("..") else script
    return f"{launcher} {shlex.join([script, *kept, '--resume_from_checkpoint', 'true'])}"


class EvalDiagnosticsMixin:
    """Writes the last evaluation's `TokenMetrics` (`SmoothLossMixin.eval_token_metrics`, gathered over every rank,
    so rank 0 can write them alone) as `diagnostics.json` plus two plots."""

    def save_eval_diagnostics(self, output_dir: str) -> list[Path]:
        """`diagnostics.json` (reliability bins, logit-gap histogram: `TokenMetrics.to_dict()`, what
        `hf_smooth.plots` and recipes/compare.py read) and `eval_reliability.png` / `eval_logit_gap.png`."""
        from hf_smooth.plots import save_diagnostic_plots

        metrics = self.eval_token_metrics
        if metrics is None or metrics.num_tokens == 0:
            raise RuntimeError(
                "No evaluation statistics were captured: run trainer.evaluate() first (the SmoothLossMixin "
                "evaluation accumulator was not found)."
            )
        path = metrics.save(Path(output_dir) / "diagnostics.json")
        if not metrics.layout.diagnostics:
            return [path]  # --smoothing_eval_diagnostics false: no bins to plot
        return [path, *save_diagnostic_plots(metrics, output_dir)]


# ---- the run: train, save at once, evaluate, write everything -------------------------------------------------------


def train_and_report(trainer, *, checkpoint: str | None, description: dict, title: str, started: float,
                     script: str, argv: list[str] | None, write_extra=None) -> dict:
    """Everything both recipes do once their Trainer is built; returns the metrics written to metrics.json.

    1. Clear the previous run's outputs when overwriting or resuming (`clear_previous_outputs`).
    2. Train, resuming from `checkpoint`; Ctrl-C/SIGTERM stop after the current step with a checkpoint
       (`GracefulInterrupt`), and `log_history.json` is rewritten at every log (`LiveLogCallback`).
    3. Save at once, before anything else can fail: model or adapter and tokenizer (`save_model`),
       `trainer_state.json` (`save_state`), `train_results.json` / `all_results.json` (`save_metrics`, as
       transformers' example scripts write them) and `log_history.json`. An interrupted run stops here with
       `TrainingInterrupted`, whose message is the command that resumes it.
    4. Evaluate; if that raises, say that the trained model is saved, and re-raise.
    5. `eval_results.json` (and `all_results.json` again), `metrics.json` (run `description`, train and eval numbers),
       `diagnostics.json` and its plots, whatever `write_extra(output_dir)` writes, and the results table.
    """
    args = trainer.args
    out = args.output_dir
    in_place = checkpoint is not None and resumes_in_place(checkpoint, Path(out))
    if in_place or args.overwrite_output_dir:
        clear_previous_outputs(args, resuming=in_place)
    if checkpoint is not None and trainer.is_world_process_zero():
        print(f"Resuming from {checkpoint}.", flush=True)
    interrupt = GracefulInterrupt()
    trainer.add_callback(LiveLogCallback())
    trainer.add_callback(interrupt)
    with interrupt.installed():
        train_result = trainer.train(resume_from_checkpoint=checkpoint)

    trainer.save_model()  # model or adapter, and the tokenizer (processing_class); every rank takes part
    trainer.save_metrics("train", train_result.metrics)  # rank 0 only, like save_state
    trainer.save_state()
    if trainer.is_world_process_zero():
        write_log_history(out, trainer.state.log_history)
    if interrupt.stopped_at is not None:
        step, total = interrupt.stopped_at, trainer.state.max_steps
        command = resume_command(script, list(sys.argv[1:] if argv is None else argv), args.world_size)
        raise TrainingInterrupted(
            f"Interrupted by {signal.Signals(interrupt.signum).name} at step {step} of {total}. Saved in {out}: "
            f"{PREFIX_CHECKPOINT_DIR}-{step} (what resuming reads), the model or adapter with its tokenizer, "
            f"trainer_state.json and log_history.json; no evaluation was run.\n"
            f"To continue, run the same command with --resume_from_checkpoint true:\n  {command}",
            interrupt.signum,
        )

    try:
        eval_metrics = trainer.evaluate()
    except Exception:
        if trainer.is_world_process_zero():
            print(f"Evaluation failed; the trained model, trainer_state.json and log_history.json are saved in {out}.",
                  file=sys.stderr, flush=True)
        raise
    trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()  # again, so trainer_state.json holds the evaluation's log too
    metrics = {
        **description, "world_size": args.world_size, "global_step": trainer.state.global_step,
        **train_result.metrics, **training_summary(trainer.state.log_history), **eval_metrics,
        "wall_seconds": time.time() - started,
    }
    if trainer.is_world_process_zero():
        write_metrics(out, metrics)
        trainer.save_eval_diagnostics(out)
        if write_extra is not None:
            write_extra(out)
        write_log_history(out, trainer.state.log_history)
        print_results(title, metrics, metrics["wall_seconds"])
    return metrics


# ---- metrics ------------------------------------------------------------------------------------------------------


def training_summary(log_history: list[dict]) -> dict:
    """Whole-run training objective, NLL, perplexity and token accuracy, token-weighted over the logged windows.

    Each training log of SmoothTrainer holds means over the tokens scored since the previous log
    (`num_tokens_scored`); weighting by that count gives the mean over every token trained on (all windows are
    logged, the last one by `LogLastStepCallback`). The objective is `nll + smoothing_penalty` (the penalty is the
    token mean of objective - NLL); the Trainer's own `loss` is a mean over optimizer steps instead, which differs
    when steps hold different numbers of tokens (length-grouped batches). `train_last_*` is the final window alone.
    """
    windows = [log for log in log_history if "nll" in log and "num_tokens_scored" in log and "eval_nll" not in log]
    if not windows:
        return {}
    tokens = sum(log["num_tokens_scored"] for log in windows)
    summary = {"train_tokens_scored": tokens}

    def objective(log):  # the loss being minimized, as logged: NLL + smoothing penalty + z-loss
        return log["nll"] + log["smoothing_penalty"] + log.get("z_loss", 0.0)

    if tokens:
        for name, value in (("train_objective", objective), ("train_nll", lambda log: log["nll"]),
                            ("train_mean_token_accuracy", lambda log: log["mean_token_accuracy"])):
            summary[name] = sum(value(log) * log["num_tokens_scored"] for log in windows) / tokens
        summary["train_ppl"] = perplexity(summary["train_nll"])
    last = windows[-1]
    summary.update({"train_last_objective": objective(last), "train_last_nll": last["nll"],
                    "train_last_ppl": last["ppl"], "train_last_mean_token_accuracy": last["mean_token_accuracy"]})
    return summary


def finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def write_metrics(output_dir: str, metrics: dict) -> Path:
    """metrics.json; a NaN or infinite number becomes null (JSON has no NaN) so readers see it is missing."""
    path = Path(output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: (finite(v) if isinstance(v, float) else v) for k, v in metrics.items()}
    path.write_text(json.dumps(clean, indent=2, sort_keys=True))
    return path


RESULT_ROWS = [
    ("train_objective", "objective (train)"),
    ("train_nll", "NLL (train)"),
    ("eval_loss", "objective (eval)"),
    ("eval_nll", "NLL (eval)"),
    ("eval_ppl", "perplexity (eval)"),
    ("eval_mean_token_accuracy", "token accuracy (eval)"),
    ("eval_ece", "ECE, 15 bins (eval)"),
    ("eval_brier", "Brier (eval)"),
    ("eval_logit_gap", "z_max - mean z (eval)"),
    ("eval_bleu", "BLEU"),
    ("eval_chrf", "chrF"),
]


def print_results(title: str, metrics: dict, seconds: float | None = None) -> None:
    """A short results table at the end of a run (what a newcomer looks at)."""
    lines = [f"== {title} =="]
    for key, label in RESULT_ROWS:
        if isinstance(metrics.get(key), (int, float)):
            lines.append(f"  {label:<28} {metrics[key]:.4f}")
    if seconds is not None:
        lines.append(f"  {'wall time':<28} {seconds:.0f} s")
    print("\n".join(lines), flush=True)
