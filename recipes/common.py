"""Pieces both recipes share: argument parsing with a config file, LoRA, metrics.json and the results table.

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
from transformers import HfArgumentParser


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


def parse_arguments(dataclass_types, argv: list[str] | None = None):
    """`HfArgumentParser` over `dataclass_types`; a leading .yaml/.json file gives defaults, flags after it win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from_file: list[str] = []
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        path = Path(argv.pop(0))
        if not path.is_file():
            raise SystemExit(f"Config file {path} does not exist.")
        values = yaml.safe_load(path.read_text()) if path.suffix != ".json" else json.loads(path.read_text())
        for key, value in (values or {}).items():
            from_file.append(f"--{key}")
            if isinstance(value, (list, tuple)):
                from_file.extend(str(v) for v in value)
            elif isinstance(value, dict):
                from_file.append(json.dumps(value))
            else:
                from_file.append(str(value))
    parser = HfArgumentParser(dataclass_types)
    try:
        return parser.parse_args_into_dataclasses(args=from_file + argv)
    except ValueError as error:  # __post_init__ validation: say it before anything loads
        raise SystemExit(f"Invalid arguments: {error}") from error


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
    print(f"LoRA: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)")
    return model


def finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def write_metrics(output_dir: str, metrics: dict) -> Path:
    path = Path(output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: (finite(v) if isinstance(v, float) else v) for k, v in metrics.items()}
    path.write_text(json.dumps(clean, indent=2, sort_keys=True))
    return path


RESULT_ROWS = [
    ("eval_loss", "objective (eval)"),
    ("eval_nll", "NLL (eval)"),
    ("eval_ppl", "perplexity (eval)"),
    ("eval_accuracy", "token accuracy"),
    ("eval_ece", "ECE (15 bins)"),
    ("eval_brier", "Brier"),
    ("eval_logit_gap", "logit gap z_max - mean z"),
    ("eval_bleu", "BLEU"),
    ("eval_chrf", "chrF"),
]


def print_results(title: str, metrics: dict, seconds: float | None = None) -> None:
    """A short results table at the end of a run (what a newcomer looks at)."""
    lines = [f"== {title} =="]
    for key, label in RESULT_ROWS:
        if key in metrics and isinstance(metrics[key], (int, float)):
            lines.append(f"  {label:<28} {metrics[key]:.4f}")
    if seconds is not None:
        lines.append(f"  {'wall time':<28} {seconds:.0f} s")
    print("\n".join(lines), flush=True)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
