"""Pieces both recipes share: argument parsing with a config file, early checks, LoRA, evaluation diagnostics,
metrics.json and the results table.

Kept beside the recipes (imported by path, not part of the package) so `clm.py` and `translation.py` cannot drift
apart on the parts they have in common.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainerCallback


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


# ---- arguments ----------------------------------------------------------------------------------------------------


def _file_value(action, key: str, value, path: Path):
    """A value read from a YAML/JSON file, converted as the same flag's command-line string would be."""
    if value is None or isinstance(value, dict):
        return value  # None, or a dict for dict-valued TrainingArguments such as fsdp_config
    convert = action.type or (lambda text: text)
    if isinstance(value, (list, tuple)):
        if action.nargs not in ("+", "*"):
            return list(value)  # e.g. report_to: [tensorboard], which TrainingArguments accepts as a list
        values = [convert(str(v)) for v in value]
    else:
        values = [convert(str(value))]
    if action.choices is not None:
        wrong = [v for v in values if v not in action.choices]
        if wrong:
            raise SystemExit(f"{path}: {key}={wrong[0]!r} is not one of {list(action.choices)}.")
    return values if isinstance(value, (list, tuple)) else values[0]


def parse_arguments(dataclass_types, argv: list[str] | None = None):
    """`HfArgumentParser` over `dataclass_types`; a leading .yaml/.yml/.json file gives defaults, flags after it win.

    Every mistake stops here, before anything is loaded, with `SystemExit` and a message that names the argument: an
    unknown key in the file, an unknown flag, a bad choice, or a `__post_init__` check (conflicting smoothing knobs,
    ...).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    launched_ranks = _use_cpu_when_no_accelerator()
    parser = HfArgumentParser(dataclass_types)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        path = Path(argv.pop(0))
        if not path.is_file():
            raise SystemExit(f"Config file {path} does not exist.")
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise SystemExit(f"{path} must hold a mapping of argument names to values, got {type(values).__name__}.")
        actions = {action.dest: action for action in parser._actions if action.option_strings}
        unknown = sorted(key for key in values if key not in actions)
        if unknown:
            raise SystemExit(
                f"{path}: unknown argument(s) {unknown}. Keys are the recipe's flags without the leading '--' "
                f"(see `python {os.path.basename(sys.argv[0]) or 'recipe.py'} --help`)."
            )
        # File values become the parser's defaults, so any flag given after the file overrides them.
        parser.set_defaults(**{key: _file_value(actions[key], key, value, path) for key, value in values.items()})
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # unknown flags and __post_init__ validation: say it before anything loads
        raise SystemExit(f"Invalid arguments: {error}") from error
    training_args = parsed[-1]
    if training_args.world_size != launched_ranks:
        raise SystemExit(
            f"Launched as {launched_ranks} processes but training would run with world size "
            f"{training_args.world_size}: the processes would train independent copies. On a machine without GPUs "
            "add --use_cpu true (DDP over gloo); otherwise check the accelerate config."
        )
    if getattr(training_args, "label_smoothing_factor", 0.0):
        # SmoothingArguments already rejects it next to a smoothing method; with --smoothing_method none the
        # SmoothTrainer would reject it too, but only after the model is loaded.
        raise SystemExit(
            f"Invalid arguments: --label_smoothing_factor {training_args.label_smoothing_factor} is transformers' "
            "LabelSmoother, which these recipes never use (hf_smooth computes the loss). Use --smoothing_method "
            f"label_smoothing --smoothing_alpha {training_args.label_smoothing_factor} instead."
        )
    return parsed


def _use_cpu_when_no_accelerator() -> int:
    """Number of launched processes; on a machine without any accelerator, make a multi-process launch use CPU DDP.

    `accelerate launch` with a MULTI_GPU config (or `--multi_gpu`) starts the processes with torchrun but does not
    pass the config's `use_cpu` on to them; `TrainingArguments(use_cpu=False)` then finds no GPU and every process
    trains alone, silently. ACCELERATE_USE_CPU=true (read by accelerate's state, as `use_cpu=True` would be) makes
    them one gloo process group instead. The world size is checked against the launch after parsing.
    """
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes"):
        import torch

        accelerator = getattr(torch, "accelerator", None)
        available = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
        if not available:
            os.environ["ACCELERATE_USE_CPU"] = "true"
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"No GPU found: running the {ranks} processes as CPU DDP (gloo).", flush=True)
    return ranks


def check_local_path(path: str, flag: str) -> None:
    """Stop early when `path` is meant as a local directory but does not exist.

    Meant as local: it starts with `.`, `/` or `~`, or its first component is an existing local directory
    (`outputs/my-model` next to an `outputs/` folder). Anything else may be a hub id (`org/name`) and is left to
    `from_pretrained`.
    """
    expanded = os.path.expanduser(path)
    first = expanded.split(os.sep, 1)[0]
    looks_local = path.startswith((".", "/", "~")) or (os.sep in expanded and os.path.isdir(first))
    if looks_local and not os.path.isdir(expanded):
        raise SystemExit(f"{flag} {path}: no such local directory (a hub id looks like 'org/name').")


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
            raise SystemExit(
                f"LoRA target module(s) {missing} not found in {type(model).__name__}. Linear layers it has: {linear}."
            )
    config = LoraConfig(
        r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets, task_type=task_type,
    )
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


class EvalDiagnosticsMixin:
    """Keeps the last evaluation's `TokenMetrics` and writes it as `diagnostics.json` plus two plots.

    `SmoothLossMixin.evaluation_loop` holds its accumulator in `_eval_accumulator` only while it runs (an internal
    attribute: if it is renamed, `save_eval_diagnostics` says so instead of writing an empty file). On every rank it
    holds the statistics of the whole evaluation set (gathered per batch), so rank 0 can write them alone.
    """

    last_eval_token_metrics = None

    def evaluation_loop(self, *args, **kwargs):
        self.last_eval_token_metrics = None
        return super().evaluation_loop(*args, **kwargs)

    def prediction_step(self, *args, **kwargs):
        accumulator = getattr(self, "_eval_accumulator", None)
        if accumulator is not None:
            self.last_eval_token_metrics = accumulator
        return super().prediction_step(*args, **kwargs)

    def save_eval_diagnostics(self, output_dir: str) -> list[Path]:
        """`diagnostics.json` (reliability bins, logit-gap histogram: `TokenMetrics.to_dict()`, what
        `hf_smooth.plots` and recipes/compare.py read) and `eval_reliability.png` / `eval_logit_gap.png`."""
        from hf_smooth.plots import save_diagnostic_plots

        metrics = self.last_eval_token_metrics
        if metrics is None or metrics.num_tokens == 0:
            raise RuntimeError(
                "No evaluation statistics were captured: run trainer.evaluate() first (the SmoothLossMixin "
                "evaluation accumulator was not found)."
            )
        path = metrics.save(Path(output_dir) / "diagnostics.json")
        if not metrics.layout.diagnostics:
            return [path]  # --smoothing_eval_diagnostics false: no bins to plot
        return [path, *save_diagnostic_plots(metrics, output_dir)]


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

    def objective(log):
        return log["nll"] + log["smoothing_penalty"]

    if tokens:
        for name, value in (("train_objective", objective), ("train_nll", lambda log: log["nll"]),
                            ("train_token_accuracy", lambda log: log["token_accuracy"])):
            summary[name] = sum(value(log) * log["num_tokens_scored"] for log in windows) / tokens
        summary["train_ppl"] = math.exp(min(summary["train_nll"], 700.0))
    last = windows[-1]
    summary.update({"train_last_objective": objective(last), "train_last_nll": last["nll"],
                    "train_last_ppl": last["ppl"], "train_last_token_accuracy": last["token_accuracy"]})
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
    ("eval_accuracy", "token accuracy (eval)"),
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
