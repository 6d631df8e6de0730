"""Train or fine-tune a translation (seq2seq) model with label smoothing or MaxSup; report BLEU, chrF, calibration.

Launch commands (from the repository root):

    # Embedded default, offline: a Marian-architecture model built from a config (d_model 256, 3+3 layers), a
    # BPE tokenizer (8,000) trained here, 31,720 English->German UI strings from the translation catalogs of 8 pinned
    # packages (install them with the command in docs/translation_default.md; without them: plone.app.locales, with a
    # warning), label smoothing 0.1, 1,800 steps of 64 pairs (Adam beta2 0.99), evaluated on the 1,000-pair test split:
    # BLEU 15.9, chrF 31.5 in 30 CPU-minutes at one thread (seed 42; seed 1: 16.2, 32.4; docs/translation_default.md).
    # One thread: on a shared machine the default thread count ran about 14x slower (issue 15).
    OMP_NUM_THREADS=1 python recipes/translation.py --output_dir outputs/translation
    accelerate launch --config_file recipes/configs/one_process.yaml recipes/translation.py --output_dir outputs/translation

    # MaxSup instead, or English->French
    python recipes/translation.py --smoothing_method maxsup --output_dir outputs/translation-maxsup
    python recipes/translation.py --target_lang fr --output_dir outputs/translation-fr

    # Two CPU processes (DDP over gloo)
    accelerate launch --config_file recipes/configs/cpu_2proc.yaml recipes/translation.py --max_steps 20 \
        --output_dir outputs/translation-2proc

    # A pretrained model from a config file (opus-mt, t5-small with --source_prefix, mBART/NLLB with language codes)
    accelerate launch --config_file recipes/configs/single_gpu.yaml recipes/translation.py \
        recipes/configs/translation_opus_mt_ls.yaml
    python recipes/translation.py --model_name_or_path google-t5/t5-small \
        --source_prefix "translate English to German: " --dataset_name wmt16 --dataset_config_name de-en
    python recipes/translation.py --model_name_or_path facebook/nllb-200-distilled-600M --dataset_name wmt16 \
        --dataset_config_name de-en --tokenizer_source_lang eng_Latn --tokenizer_target_lang deu_Latn \
        --forced_bos_token deu_Latn --use_lora true --lora_target_modules q_proj v_proj

    # Your own pairs in local .json/.jsonl files
    python recipes/translation.py --train_file train.jsonl --validation_file dev.jsonl --source_lang en \
        --target_lang de --num_train_epochs 20

    # Ctrl-C (or SIGTERM) saves a checkpoint and prints this; the same command plus the flag continues the run
    python recipes/translation.py --output_dir outputs/translation --resume_from_checkpoint true
    # Replace an earlier run in the same folder (without the flag a non-empty --output_dir is refused)
    python recipes/translation.py --output_dir outputs/translation --overwrite_output_dir true

Data: a hub dataset or local .json/.jsonl files whose rows are {"translation": {"en": ..., "de": ...}} (the
format of transformers' run_translation.py), or flat {"en": ..., "de": ...} rows.

Output (in --output_dir): model (or LoRA adapter), tokenizer, `metrics.json` (BLEU and chrF from sacrebleu on the
beam-search output; teacher-forced objective, NLL, perplexity, accuracy, ECE, Brier, logit statistics),
`eval_predictions.jsonl` (source, reference and hypothesis per evaluation pair, in the data's order; BLEU/chrF are
computed against these reference texts; `eval_gen_len` counts generated tokens up to the first end-of-sequence),
`diagnostics.json`, `eval_reliability.png`, `eval_logit_gap.png`, `log_history.json` (rewritten at every log), and
the files transformers' example scripts write: `train_results.json`, `eval_results.json`, `all_results.json`,
`trainer_state.json`. The model and the training files are saved as soon as training ends, before evaluation and
generation. Decoder-only models translate through recipes/clm.py with --prompt_column/--completion_column (see its
docstring).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq

from common import DataSourceArguments, EvalDiagnosticsMixin, LoraArguments, OutputDirArguments, RecipeError
from common import apply_lora, build_trainer, check_data_sources, load_data_files, load_hub_dataset, recipe_main
from common import catalog_package_pairs, run_description, start_run, train_and_report

from hf_smooth import SmoothSeq2SeqTrainer, SmoothSeq2SeqTrainingArguments  # noqa: E402


@dataclass
class ModelArguments:
    """The seq2seq model: a pretrained one, or the embedded Marian-architecture model built from a config (its
    size is set by the embedded_* flags)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local directory of a seq2seq model (Marian, T5, BART, mBART, NLLB). Default: a "
                  "small Marian-architecture model built from a config with a tokenizer trained on the data."},
    )
    # Sized by measurement on the catalog data (docs/translation_default.md): d_model 256, 3+3 layers, BPE 8000.
    embedded_d_model: int = field(default=256, metadata={"help": "Embedded model: hidden size (a multiple of 32)."})
    embedded_layers: int = field(default=3, metadata={"help": "Embedded model: encoder and decoder layers."})
    embedded_vocab_size: int = field(default=8000, metadata={"help": "Embedded model: BPE vocabulary size."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modeling code from the hub."})

    def __post_init__(self):
        if self.embedded_d_model < 32 or self.embedded_d_model % 32:
            raise ValueError(f"--embedded_d_model must be a positive multiple of 32 (heads of 32), got "
                             f"{self.embedded_d_model}.")
        if self.embedded_layers < 1:
            raise ValueError(f"--embedded_layers must be >= 1, got {self.embedded_layers}.")
        if self.embedded_vocab_size < 300:
            raise ValueError(f"--embedded_vocab_size must be >= 300 (256 byte symbols + merges), got "
                             f"{self.embedded_vocab_size}.")


@dataclass
class DataArguments(DataSourceArguments):
    source_lang: str = field(default="en", metadata={"help": "Source language code (key in the translation dict)."})
    target_lang: str = field(default="de", metadata={"help": "Target language code."})
    source_prefix: str = field(default="", metadata={"help": "Prepended to every source (T5: 'translate ...: ')."})
    tokenizer_source_lang: str | None = field(
        default=None, metadata={"help": "mBART/NLLB: tokenizer.src_lang code (e.g. en_XX, eng_Latn)."}
    )
    tokenizer_target_lang: str | None = field(
        default=None, metadata={"help": "mBART/NLLB: tokenizer.tgt_lang code (e.g. de_DE, deu_Latn)."}
    )
    forced_bos_token: str | None = field(
        default=None, metadata={"help": "mBART/NLLB: target language token forced first when generating."}
    )
    max_source_length: int = field(default=64, metadata={"help": "Source tokens kept (longer sources are cut)."})
    max_target_length: int = field(default=64, metadata={"help": "Target tokens kept (longer targets are cut)."})
    validation_split_percentage: int = field(
        default=10, metadata={"help": "Held-out share without a validation split."}
    )
    split_seed: int = field(
        default=0,
        metadata={"help": "Seed of the train/validation split when the data has no validation split (kept apart from "
                  "--seed so runs with different seeds are evaluated on the same pairs)."},
    )
    embedded_catalogs: list[str] = field(
        default_factory=lambda: ["auto"],
        metadata={"help": "Embedded data only. 'packages': the translation catalogs of the pinned catalog packages "
                  "(hf_smooth/demo/catalogs.py: 33.7k en-de pairs; install them with the command in "
                  "docs/translation_default.md), split by English string with a 1,000-pair test set; or gettext "
                  "catalogs from plone (plone.app.locales, ~3.2k en-de pairs) and django (~0.7k more). 'auto' "
                  "(default): 'packages' when all of them are installed, else plone (with a warning)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training pairs (0: all)."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N evaluation pairs (default and 0: all)."}
    )

    def __post_init__(self):
        if self.source_lang == self.target_lang:
            raise ValueError(f"--source_lang and --target_lang are both {self.source_lang!r}.")
        check_data_sources(self, (".json", ".jsonl"), ".json or .jsonl (rows with a 'translation' dict)")
        for name in ("max_source_length", "max_target_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: give a number of tokens >= 1.")


@dataclass
class TranslationTrainingArguments(OutputDirArguments, SmoothSeq2SeqTrainingArguments):
    """SmoothSeq2SeqTrainingArguments with defaults for the embedded CPU run on the catalog data (about 1,800 steps of
    64 pairs; docs/translation_default.md has the measurements), plus --overwrite_output_dir and
    --resume_from_checkpoint (OutputDirArguments)."""

    output_dir: str = field(default="outputs/translation", metadata={"help": "Where the model and metrics go."})
    num_train_epochs: float = field(
        default=3.63,
        metadata={"help": "Training epochs (3.63 x 496 steps of 64 pairs = 1,801 on the 31,720 catalog training pairs; "
                  "with the plone fallback give about 30)."},
    )
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "Batches of similar lengths: UI strings run from 1 to 64 tokens, and grouping them cut the "
                  "padding (and the step time on CPU) about 3x. 'random' for plain shuffling.",
                  "choices": ["random", "sequential", "group_by_length", "batch_rebalance"]},
    )
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Pairs per device per micro-batch."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Pairs per device during eval."})
    learning_rate: float = field(
        default=5e-4, metadata={"help": "Peak learning rate (1e-3 stalled at a unigram solution on the catalog data)."}
    )
    warmup_steps: float = field(
        default=400,
        metadata={"help": "Linear warmup steps (Marian is post-LN: with 50 the embedded model stalled at BLEU 0)."},
    )
    adam_beta2: float = field(
        default=0.99,
        metadata={"help": "Adam beta2. With HF's 0.999 the embedded model sat on a unigram plateau to step ~650 at "
                  "--seed 1 and ended at BLEU < 1; 0.99 and 0.98 both learn there, 0.99 ends better "
                  "(docs/translation_default.md, 'The seed-1 plateau')."},
    )
    include_for_metrics: list[str] = field(
        default_factory=lambda: ["inputs"],
        metadata={"help": "Passed to compute_metrics; 'inputs' lets eval_predictions.jsonl follow the dataset order "
                  "(the evaluation batches are length-grouped)."},
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    logging_steps: float = field(default=50, metadata={"help": "Log every N optimizer steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpointing strategy."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Experiment trackers."})
    predict_with_generate: bool = field(default=True, metadata={"help": "Generate for BLEU/chrF at evaluation."})
    generation_num_beams: int | None = field(default=4, metadata={"help": "Beams at evaluation."})
    generation_max_length: int | None = field(default=64, metadata={"help": "Max generated tokens at evaluation."})
    # None until parsed: an explicit --label_smoothing_factor then means label smoothing (SmoothingArguments).
    smoothing_default_method: ClassVar[str] = "label_smoothing"
    smoothing_method: str | None = field(
        default=None,
        metadata={"help": "none | label_smoothing | maxsup (default: label_smoothing; label_smoothing with "
                          "--label_smoothing_factor).", "choices": ["none", "label_smoothing", "maxsup"]},
    )

    def __post_init__(self):
        super().__post_init__()
        # Checked here, not at the first evaluation: beam search with 0 beams divides by zero after training.
        for name in ("generation_num_beams", "generation_max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} {value}: give a number >= 1 (or leave it unset for the model's default).")
        if self.predict_with_generate and "inputs" not in (self.include_for_metrics or []):
            raise ValueError(f"--include_for_metrics {' '.join(self.include_for_metrics or []) or '(empty)'}: keep "
                             "'inputs' in it; the predictions are put back in dataset order through their inputs.")


# What the command line (and a leading .yaml/.json file) is parsed into, in this order.
ARGUMENT_CLASSES = (ModelArguments, DataArguments, LoraArguments, TranslationTrainingArguments)


class TranslationTrainer(EvalDiagnosticsMixin, SmoothSeq2SeqTrainer):
    """SmoothSeq2SeqTrainer that also writes the evaluation's reliability bins and logit-gap histogram."""


# ---- data ------------------------------------------------------------------------------------------------------------


def resolve_embedded_catalogs(requested: list[str]) -> list[str]:
    """'auto' -> ['packages'] when every pinned catalog package is installed, else ['plone'] (announced)."""
    if requested != ["auto"]:
        if "packages" in requested and requested != ["packages"]:
            raise RecipeError(f"--embedded_catalogs {' '.join(requested)}: 'packages' stands alone (it reads every "
                              "catalog package); give 'packages', or any of plone django.")
        if "auto" in requested:
            raise RecipeError(f"--embedded_catalogs {' '.join(requested)}: 'auto' stands alone.")
        return requested
    import importlib.metadata

    from hf_smooth.demo.catalogs import CATALOG_PACKAGES, install_command

    missing = []
    for name in CATALOG_PACKAGES:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if not missing:
        return ["packages"]
    print(f"Warning: the catalog packages {', '.join(missing)} are not installed, so the embedded data falls back to "
          f"plone.app.locales (~2.9k pairs; the defaults are sized for the 33.7k-pair catalog data: add "
          f"--num_train_epochs 30). For the default data:\n  {install_command()}", flush=True)
    return ["plone"]


def load_pairs(args: DataArguments):
    """(train_pairs, eval_pairs, description) as lists of (source, target) strings."""
    src, tgt = args.source_lang, args.target_lang
    if args.dataset_name is None and args.train_file is None:
        from hf_smooth.demo.assets import gettext_pairs, train_test_split_pairs

        catalogs = resolve_embedded_catalogs(args.embedded_catalogs)
        if catalogs == ["packages"]:
            return catalog_package_pairs(src, tgt)
        try:
            pairs = gettext_pairs(source_lang=src, target_lang=tgt, sources=catalogs)
        except (ImportError, FileNotFoundError, ValueError) as error:
            raise RecipeError(f"The embedded translation pairs are not available: {error}") from None
        train, evaluation = train_test_split_pairs(
            pairs, test_size=args.validation_split_percentage / 100, seed=args.split_seed
        )
        return train, evaluation, f"gettext catalogs ({'+'.join(catalogs)}) {src}->{tgt}, {len(pairs)} pairs (embedded)"

    if args.dataset_name is not None:
        raw = load_hub_dataset(args)
        source = args.dataset_name
    else:
        files = {"train": args.train_file, **({"validation": args.validation_file} if args.validation_file else {})}
        flags = {"train": "--train_file", "validation": "--validation_file"}
        raw = load_data_files("json", files, flags)
        source = args.train_file

    def rows(split):
        data = raw[split]
        where = f"{flags[split]} {files[split]}" if args.dataset_name is None else f"{source} ({split} split)"
        if "translation" in data.column_names:
            items = data["translation"]
        elif src in data.column_names and tgt in data.column_names:
            items = [{src: a, tgt: b} for a, b in zip(data[src], data[tgt])]
        else:
            raise RecipeError(
                f"{where} has columns {data.column_names}: expected 'translation' or '{src}' and '{tgt}' (set "
                "--source_lang/--target_lang)."
            )
        if items and (src not in items[0] or tgt not in items[0]):
            raise RecipeError(
                f"Translation rows of {where} have languages {sorted(items[0])}, not {src!r} and {tgt!r} (set "
                "--source_lang/--target_lang)."
            )
        # Every row: datasets fills a language missing from some rows with None, which the tokenizer rejects.
        bad = [i for i, item in enumerate(items) if not all(isinstance(item.get(k), str) for k in (src, tgt))]
        if bad:
            first = items[bad[0]]
            missing = [lang for lang in (src, tgt) if not isinstance(first.get(lang), str)]
            raise RecipeError(
                f"{where}: {len(bad)} of {len(items)} rows lack a {src!r} or {tgt!r} text (first: row {bad[0] + 1}, "
                f"no {' / '.join(map(repr, missing))}); fix or remove them."
            )
        return [(item[src], item[tgt]) for item in items]

    if "train" not in raw:
        raise RecipeError(f"{source} has no 'train' split (splits: {list(raw)}).")
    train = rows("train")
    if "validation" in raw:
        evaluation = rows("validation")
    else:
        from hf_smooth.demo.assets import train_test_split_pairs

        train, evaluation = train_test_split_pairs(
            train, test_size=args.validation_split_percentage / 100, seed=args.split_seed
        )
    return train, evaluation, source


def build_model(model_args: ModelArguments, train_pairs, data_args: DataArguments, seed: int):
    if model_args.model_name_or_path is None:
        from hf_smooth.demo.assets import build_marian, train_bpe_tokenizer

        print(f"Training a {model_args.embedded_vocab_size}-token BPE tokenizer on {len(train_pairs)} training pairs",
              flush=True)
        texts = [s for s, _ in train_pairs] + [t for _, t in train_pairs]  # training side only: no eval leakage
        tokenizer = train_bpe_tokenizer(texts, vocab_size=model_args.embedded_vocab_size)
        model = build_marian(
            tokenizer, d_model=model_args.embedded_d_model, layers=model_args.embedded_layers,
            heads=model_args.embedded_d_model // 32, ffn=4 * model_args.embedded_d_model, seed=seed,
        )
        layers = model_args.embedded_layers
        name = f"Marian-architecture from config (d_model {model_args.embedded_d_model}, {layers}+{layers} layers)"
    else:
        name = model_args.model_name_or_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=model_args.trust_remote_code)
            model = AutoModelForSeq2SeqLM.from_pretrained(name, trust_remote_code=model_args.trust_remote_code)
        except (OSError, ValueError) as error:
            message = str(error).strip().splitlines()[0]
            raise RecipeError(f"Could not load --model_name_or_path {name}: {message}") from None
    # Language codes and the forced first token, for the embedded model too (its tokenizer has neither, so asking
    # for them is an error rather than a flag silently ignored).
    languages = (("src_lang", "--tokenizer_source_lang", data_args.tokenizer_source_lang),
                 ("tgt_lang", "--tokenizer_target_lang", data_args.tokenizer_target_lang))
    for attribute, flag, code in languages:
        if code is not None:
            if not hasattr(tokenizer, attribute):
                raise RecipeError(f"{flag} {code}: the tokenizer of {name} ({type(tokenizer).__name__}) has no "
                                  f"{attribute} (only mBART/NLLB-style tokenizers do); drop {flag}.")
            setattr(tokenizer, attribute, code)
    if data_args.forced_bos_token:
        token_id = tokenizer.convert_tokens_to_ids(data_args.forced_bos_token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise RecipeError(f"--forced_bos_token {data_args.forced_bos_token} is not a token of {name}'s tokenizer: "
                              "give one of its language tokens (e.g. deu_Latn for NLLB) or drop the flag.")
        model.generation_config.forced_bos_token_id = token_id
    if model.config.model_type in ("t5", "mt5") and not data_args.source_prefix:
        print("Warning: T5 checkpoints expect a task prefix, e.g. --source_prefix \"translate English to German: \".",
              flush=True)
    return model, tokenizer, name


def encode(pairs, tokenizer, args: DataArguments):
    from datasets import Dataset

    sources = [args.source_prefix + s for s, _ in pairs]
    targets = [t for _, t in pairs]
    features = tokenizer(sources, max_length=args.max_source_length, truncation=True)
    features["labels"] = tokenizer(text_target=targets, max_length=args.max_target_length, truncation=True)[
        "input_ids"
    ]
    return Dataset.from_dict(dict(features))


def generated_lengths(predictions: np.ndarray, *, pad: int, eos: int | None, start: int | None) -> np.ndarray:
    """Generated tokens per row: the decoder start token and everything after the first end-of-sequence are not
    counted (beam search fills finished rows with eos or pad up to the batch's longest row), the eos itself is."""
    lengths = []
    for row in predictions:
        row = row[1:] if start is not None and len(row) and row[0] == start else row
        ends = np.flatnonzero((row == eos) | (row == pad) | (row < 0)) if eos is not None else np.flatnonzero(
            (row == pad) | (row < 0))
        lengths.append(int(ends[0]) + int(eos is not None and row[ends[0]] == eos) if len(ends) else len(row))
    return np.asarray(lengths)


def bleu_chrf_scorer():
    """`(hypotheses, references) -> {"bleu", "chrf"}`: hf_smooth's `corpus_bleu_chrf` evaluate module, loaded offline
    from the installed package (`evaluate.load("sacrebleu")` needs the hub), or sacrebleu directly, with one line
    saying so, where `evaluate` is missing or the module does not load. Both are sacrebleu's corpus scores."""
    try:
        from hf_smooth import evaluate_modules

        module = evaluate_modules.load("corpus_bleu_chrf")
    except Exception as error:  # ImportError without evaluate, or whatever evaluate raises while loading
        print(f"Warning: BLEU/chrF from sacrebleu directly (the evaluate module did not load: {error}).", flush=True)
        import sacrebleu

        return lambda hypotheses, references: {
            "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
        }
    return lambda hypotheses, references: module.compute(predictions=hypotheses, references=references)


class BleuMetrics:
    """`compute_metrics` for generated ids: BLEU and chrF of the hypotheses against the evaluation pairs' reference
    texts ([`bleu_chrf_scorer`]). The evaluation batches come length-grouped, so each prediction is put back in
    dataset order through its input ids (`include_for_metrics=["inputs"]`); `eval_predictions.jsonl` then has one
    {"source", "reference", "hypothesis"} per evaluation pair, in the order of the data."""

    def __init__(self, tokenizer, eval_pairs, encoded_inputs, *, decoder_start_token_id=None):
        self.tokenizer = tokenizer
        self.eval_pairs = list(eval_pairs)
        self.start = decoder_start_token_id
        # input ids (without padding) -> dataset rows with those ids, in dataset order
        self.rows_of: dict[tuple[int, ...], list[int]] = {}
        for index, ids in enumerate(encoded_inputs):
            self.rows_of.setdefault(tuple(int(i) for i in ids), []).append(index)
        self.hypotheses: list[str] = []
        self.score = None  # bleu_chrf_scorer(), built at the first evaluation (runs without generation never load it)

    def _key(self, ids) -> tuple[int, ...]:
        pad = self.tokenizer.pad_token_id
        return tuple(int(i) for i in ids if i >= 0 and i != pad)

    def _dataset_order(self, hypotheses: list[str], inputs) -> list[str]:
        """The hypotheses re-ordered to the evaluation pairs' order (rows with identical input ids are
        interchangeable: greedy and beam search give them the same hypothesis)."""
        if inputs is None or len(inputs) != len(self.eval_pairs):
            raise RecipeError(
                f"compute_metrics got {0 if inputs is None else len(inputs)} inputs for {len(self.eval_pairs)} "
                "evaluation pairs: keep 'inputs' in --include_for_metrics so the predictions can be put in dataset "
                "order."
            )
        pending = {key: list(rows) for key, rows in self.rows_of.items()}
        ordered: list[str | None] = [None] * len(self.eval_pairs)
        for hypothesis, ids in zip(hypotheses, inputs):
            rows = pending.get(self._key(ids))
            if not rows:
                raise RecipeError("An evaluation input matches no evaluation pair: the evaluation data changed after "
                                  "encoding.")
            ordered[rows.pop(0)] = hypothesis
        return ordered

    def __call__(self, prediction):
        predictions = prediction.predictions
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        pad = self.tokenizer.pad_token_id
        lengths = generated_lengths(predictions, pad=pad, eos=self.tokenizer.eos_token_id, start=self.start)
        predictions = np.where(predictions < 0, pad, predictions)  # -100 where batches were padded to one length
        hypotheses = [t.strip() for t in self.tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        self.hypotheses = self._dataset_order(hypotheses, prediction.inputs)
        references = [target for _, target in self.eval_pairs]
        self.score = self.score or bleu_chrf_scorer()
        scores = self.score(self.hypotheses, references)
        return {"bleu": scores["bleu"], "chrf": scores["chrf"], "gen_len": float(np.mean(lengths))}

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for (source, reference), hypothesis in zip(self.eval_pairs, self.hypotheses):
                row = {"source": source, "reference": reference, "hypothesis": hypothesis}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---- run -------------------------------------------------------------------------------------------------------------


def run(argv: list[str] | None = None):
    """Parse, check, train, save, evaluate and write the outputs; returns `(metrics, trainer)`."""
    started = time.time()
    (model_args, data_args, lora_args, training_args), checkpoint = start_run(ARGUMENT_CLASSES, argv)
    train_pairs, eval_pairs, source = load_pairs(data_args)  # before the model: wrong languages stop it in seconds
    if data_args.max_train_samples:
        train_pairs = train_pairs[: data_args.max_train_samples]
    if data_args.max_eval_samples:
        eval_pairs = eval_pairs[: data_args.max_eval_samples]
    if not train_pairs or not eval_pairs:
        raise RecipeError(f"Empty split: {len(train_pairs)} train / {len(eval_pairs)} eval pairs from {source}.")
    model, tokenizer, model_name = build_model(model_args, train_pairs, data_args, seed=training_args.seed)
    if lora_args.use_lora:
        model = apply_lora(model, lora_args, task_type="SEQ_2_SEQ_LM")
    train, evaluation = encode(train_pairs, tokenizer, data_args), encode(eval_pairs, tokenizer, data_args)

    bleu = BleuMetrics(tokenizer, eval_pairs, evaluation["input_ids"],
                       decoder_start_token_id=getattr(model.generation_config, "decoder_start_token_id", None))
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    trainer = build_trainer(
        TranslationTrainer, model, training_args, train, evaluation, tokenizer, collator,
        compute_metrics=bleu if training_args.predict_with_generate else None,
    )
    description = run_description(
        "translation", model_name, source, lora_args, training_args, train, evaluation,
        pair=f"{data_args.source_lang}-{data_args.target_lang}", generation_num_beams=training_args.generation_num_beams,
    )

    def write_predictions(output_dir: str) -> None:
        if bleu.hypotheses:
            bleu.save(os.path.join(output_dir, "eval_predictions.jsonl"))

    metrics = train_and_report(
        trainer, checkpoint=checkpoint, description=description, started=started, script=__file__, argv=argv,
        title=f"translation: {model_name}, {training_args.smoothing_method}", write_extra=write_predictions,
    )
    return metrics, trainer


def main(argv: list[str] | None = None) -> dict:
    return recipe_main(run, argv)


if __name__ == "__main__":
    main()
