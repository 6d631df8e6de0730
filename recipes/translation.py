"""Train or fine-tune a translation (seq2seq) model with label smoothing or MaxSup; report BLEU, chrF, calibration.

Launch commands (from the repository root):

    # Embedded default, offline: a small Marian-architecture model built from a config, a BPE tokenizer trained
    # here, English->German UI strings from the gettext catalogs of installed packages; label smoothing 0.1
    accelerate launch recipes/translation.py

    # MaxSup instead, or English->French
    accelerate launch recipes/translation.py --smoothing_method maxsup --output_dir outputs/translation-maxsup
    accelerate launch recipes/translation.py --target_lang fr --output_dir outputs/translation-fr

    # Two CPU processes (DDP over gloo)
    accelerate launch --config_file recipes/configs/cpu_2proc.yaml recipes/translation.py --max_steps 20

    # A pretrained model from a config file (opus-mt, t5-small with --source_prefix, mBART/NLLB with language codes)
    accelerate launch --config_file recipes/configs/single_gpu.yaml recipes/translation.py \
        recipes/configs/translation_opus_mt_ls.yaml
    accelerate launch recipes/translation.py --model_name_or_path google-t5/t5-small \
        --source_prefix "translate English to German: " --dataset_name wmt16 --dataset_config_name de-en

Data: a hub dataset or local .json/.jsonl files whose rows are {"translation": {"en": ..., "de": ...}} (the
format of transformers' run_translation.py), or flat {"en": ..., "de": ...} rows.

Output (in --output_dir): model, tokenizer, `metrics.json` (BLEU and chrF from sacrebleu on generated text; teacher-
forced objective, NLL, perplexity, accuracy, ECE, Brier, logit statistics), `diagnostics.json`, plots.
Decoder-only models translate through recipes/clm.py with --prompt_column/--completion_column (see its docstring).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, set_seed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import LoraArguments, apply_lora, parse_arguments, print_results, write_metrics  # noqa: E402

from hf_smooth import SmoothSeq2SeqTrainer, SmoothSeq2SeqTrainingArguments  # noqa: E402


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local directory of a seq2seq model (Marian, T5, BART, mBART, NLLB). Default: a "
                  "small Marian-architecture model built from a config with a tokenizer trained on the data."},
    )
    embedded_d_model: int = field(default=128, metadata={"help": "Embedded model: hidden size."})
    embedded_layers: int = field(default=2, metadata={"help": "Embedded model: encoder and decoder layers."})
    embedded_vocab_size: int = field(default=4000, metadata={"help": "Embedded model: BPE vocabulary size."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modeling code from the hub."})


@dataclass
class DataArguments:
    source_lang: str = field(default="en", metadata={"help": "Source language code (key in the translation dict)."})
    target_lang: str = field(default="de", metadata={"help": "Target language code."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset name."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration (e.g. de-en)."})
    train_file: str | None = field(default=None, metadata={"help": "Local .json/.jsonl training file."})
    validation_file: str | None = field(default=None, metadata={"help": "Local .json/.jsonl validation file."})
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
    max_source_length: int = field(default=64, metadata={"help": "Source tokens kept."})
    max_target_length: int = field(default=64, metadata={"help": "Target tokens kept."})
    validation_split_percentage: int = field(default=10, metadata={"help": "Held-out share without a validation split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=200, metadata={"help": "Truncate the evaluation set."})


@dataclass
class TranslationTrainingArguments(SmoothSeq2SeqTrainingArguments):
    """SmoothSeq2SeqTrainingArguments with defaults for the embedded CPU run."""

    output_dir: str = field(default="outputs/translation", metadata={"help": "Where the model and metrics go."})
    num_train_epochs: float = field(default=12, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Pairs per device per micro-batch."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Pairs per device during eval."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    warmup_steps: float = field(default=50, metadata={"help": "Linear warmup steps."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    logging_steps: float = field(default=25, metadata={"help": "Log every N optimizer steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpointing strategy."})
    report_to: str | list[str] | None = field(default="none", metadata={"help": "Experiment trackers."})
    predict_with_generate: bool = field(default=True, metadata={"help": "Generate for BLEU/chrF at evaluation."})
    generation_num_beams: int | None = field(default=4, metadata={"help": "Beams at evaluation."})
    generation_max_length: int | None = field(default=64, metadata={"help": "Max generated tokens at evaluation."})
    smoothing_method: str = field(
        default="label_smoothing",
        metadata={"help": "none | label_smoothing | maxsup.", "choices": ["none", "label_smoothing", "maxsup"]},
    )


# ---- data ----------------------------------------------------------------------------------------------------------


def load_pairs(args: DataArguments, seed: int):
    """(train_pairs, eval_pairs, description) as lists of (source, target) strings."""
    src, tgt = args.source_lang, args.target_lang
    if args.dataset_name is None and args.train_file is None:
        from hf_smooth.assets import gettext_pairs, train_test_split_pairs

        pairs = gettext_pairs(source_lang=src, target_lang=tgt)
        train, evaluation = train_test_split_pairs(pairs, test_size=args.validation_split_percentage / 100, seed=seed)
        return train, evaluation, f"gettext catalogs {src}->{tgt} ({len(pairs)} pairs)"

    from datasets import load_dataset

    if args.dataset_name is not None:
        raw = load_dataset(args.dataset_name, args.dataset_config_name)
        source = args.dataset_name
    else:
        files = {"train": args.train_file, **({"validation": args.validation_file} if args.validation_file else {})}
        for path in files.values():
            if not os.path.isfile(path):
                raise SystemExit(f"Data file {path} does not exist.")
        raw = load_dataset("json", data_files=files)
        source = args.train_file

    def rows(split):
        data = raw[split]
        if "translation" in data.column_names:
            items = data["translation"]
        elif src in data.column_names and tgt in data.column_names:
            items = [{src: a, tgt: b} for a, b in zip(data[src], data[tgt])]
        else:
            raise SystemExit(
                f"Split {split!r} has columns {data.column_names}: expected 'translation' or '{src}' and '{tgt}'."
            )
        if items and (src not in items[0] or tgt not in items[0]):
            raise SystemExit(f"Translation rows have languages {sorted(items[0])}, not {src!r} and {tgt!r}.")
        return [(item[src], item[tgt]) for item in items]

    train = rows("train")
    if "validation" in raw:
        evaluation = rows("validation")
    else:
        cut = int(len(train) * (100 - args.validation_split_percentage) / 100)
        train, evaluation = train[:cut], train[cut:]
    return train, evaluation, source


def build_model(model_args: ModelArguments, train_pairs, data_args: DataArguments):
    if model_args.model_name_or_path is None:
        from hf_smooth.assets import build_marian, train_bpe_tokenizer

        texts = [s for s, _ in train_pairs] + [t for _, t in train_pairs]  # training side only: no eval leakage
        tokenizer = train_bpe_tokenizer(texts, vocab_size=model_args.embedded_vocab_size)
        model = build_marian(
            tokenizer, d_model=model_args.embedded_d_model, layers=model_args.embedded_layers,
            heads=max(1, model_args.embedded_d_model // 32), ffn=4 * model_args.embedded_d_model,
        )
        return model, tokenizer, f"Marian-architecture from config (d_model {model_args.embedded_d_model})"
    path = model_args.model_name_or_path
    if path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise SystemExit(f"--model_name_or_path {path}: no such local directory.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
        model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise SystemExit(f"Could not load --model_name_or_path {path}: {error}") from error
    for attribute, code in (("src_lang", data_args.tokenizer_source_lang), ("tgt_lang", data_args.tokenizer_target_lang)):
        if code is not None:
            if not hasattr(tokenizer, attribute):
                raise SystemExit(f"{type(tokenizer).__name__} has no {attribute}; drop --tokenizer_{attribute}.")
            setattr(tokenizer, attribute, code)
    if data_args.forced_bos_token:
        model.generation_config.forced_bos_token_id = tokenizer.convert_tokens_to_ids(data_args.forced_bos_token)
    return model, tokenizer, path


def encode(pairs, tokenizer, args: DataArguments):
    from datasets import Dataset

    sources = [args.source_prefix + s for s, _ in pairs]
    targets = [t for _, t in pairs]
    features = tokenizer(sources, max_length=args.max_source_length, truncation=True)
    features["labels"] = tokenizer(text_target=targets, max_length=args.max_target_length, truncation=True)[
        "input_ids"
    ]
    return Dataset.from_dict(dict(features))


def bleu_metrics(tokenizer):
    import sacrebleu

    def compute(prediction):
        predictions, labels = prediction.predictions, prediction.label_ids
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        pad = tokenizer.pad_token_id
        predictions = np.where(predictions < 0, pad, predictions)
        labels = np.where(labels < 0, pad, labels)
        hypotheses = [t.strip() for t in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        references = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return {
            "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
            "gen_len": float(np.mean([np.count_nonzero(p != pad) for p in predictions])),
        }

    return compute


def main(argv: list[str] | None = None):
    started = time.time()
    model_args, data_args, lora_args, training_args = parse_arguments(
        (ModelArguments, DataArguments, LoraArguments, TranslationTrainingArguments), argv
    )
    set_seed(training_args.seed)
    train_pairs, eval_pairs, source = load_pairs(data_args, seed=training_args.seed)
    if data_args.max_train_samples:
        train_pairs = train_pairs[: data_args.max_train_samples]
    if data_args.max_eval_samples:
        eval_pairs = eval_pairs[: data_args.max_eval_samples]
    if not train_pairs or not eval_pairs:
        raise SystemExit(f"Empty split: {len(train_pairs)} train / {len(eval_pairs)} eval pairs from {source}.")
    model, tokenizer, model_name = build_model(model_args, train_pairs, data_args)
    if lora_args.use_lora:
        model = apply_lora(model, lora_args, task_type="SEQ_2_SEQ_LM")
    train, evaluation = encode(train_pairs, tokenizer, data_args), encode(eval_pairs, tokenizer, data_args)

    trainer = SmoothSeq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        compute_metrics=bleu_metrics(tokenizer),
    )
    train_result = trainer.train()
    eval_metrics = trainer.evaluate()
    trainer.save_model()
    metrics = {
        "task": "translation", "model": model_name, "data": source, "lora": lora_args.use_lora,
        "pair": f"{data_args.source_lang}-{data_args.target_lang}",
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
            json.dump(trainer.state.log_history, f, indent=1)
        print_results(f"translation: {model_name}, {training_args.smoothing_method}", metrics, metrics["wall_seconds"])
    return metrics


if __name__ == "__main__":
    main()
