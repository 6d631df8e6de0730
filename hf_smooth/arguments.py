"""Configuration: the `smoothing_*` knobs, alone or combined with the Hugging Face argument classes.

Every field is prefixed ``smoothing_`` so it cannot collide with `TrainingArguments`, has help text for
`HfArgumentParser` (CLI, JSON, YAML), and is validated in `__post_init__` with errors that name the knobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from .methods import METHODS, get_method

__all__ = [
    "SmoothingArguments",
    "SmoothTrainingArguments",
    "SmoothSeq2SeqTrainingArguments",
    "METHODS",
    "SCHEDULES",
]

SCHEDULES = ("constant", "linear")
CONVENTIONS = ("uniform", "fairseq")


@dataclass
class SmoothingArguments:
    """What `SmoothTrainer` optimizes and how it reports it.

    Use alone (`SmoothTrainer(..., smoothing_args=SmoothingArguments(...))`) or through
    [`SmoothTrainingArguments`] / [`SmoothSeq2SeqTrainingArguments`], which add these fields to the HF classes.
    """

    smoothing_method: str = field(
        default="label_smoothing",
        metadata={
            "help": "Training objective: "
            + ", ".join(f"'{m.name}' ({m.summary})" for m in METHODS.values())
            + ".",
            "choices": list(METHODS),
        },
    )
    smoothing_alpha: float = field(
        default=0.1,
        metadata={
            "help": "Strength: epsilon for label_smoothing (in [0, 1]), alpha for maxsup (>= 0). With a linear "
            "schedule, the value at the first optimizer step."
        },
    )
    smoothing_alpha_end: float | None = field(
        default=None,
        metadata={
            "help": "With smoothing_schedule='linear': the value at the last optimizer step (the MaxSup paper ramps "
            "0.1 -> 0.2). Must be unset for the constant schedule."
        },
    )
    smoothing_schedule: str = field(
        default="constant",
        metadata={
            "help": "'constant', or 'linear' from smoothing_alpha to smoothing_alpha_end over the optimizer steps "
            "of training (step t of T uses alpha + (alpha_end - alpha) * t / (T - 1)). The value follows "
            "global_step, so it resumes exactly from a checkpoint.",
            "choices": list(SCHEDULES),
        },
    )
    smoothing_convention: str = field(
        default="uniform",
        metadata={
            "help": "Label-smoothing target. 'uniform': (1-eps)*onehot + eps/K, as PyTorch's label_smoothing and "
            "transformers' label_smoothing_factor. 'fairseq': 1-eps on the label and eps/(K-1) on each other "
            "class (= uniform with eps*K/(K-1)). Only for smoothing_method='label_smoothing'.",
            "choices": list(CONVENTIONS),
        },
    )
    smoothing_fused_loss: bool = field(
        default=False,
        metadata={
            "help": "Compute the training loss from the last hidden states and the output projection chunk by "
            "chunk (hf_smooth.fused), never materializing batch x seq x vocab logits. Decoder-only models whose "
            "forward takes logits_to_keep; otherwise (encoder-decoder, FSDP, DeepSpeed ZeRO-3, LoRA with dropout "
            "on the output layer) it falls back to the materialized path with a warning. Evaluation always uses "
            "the materialized logits."
        },
    )
    smoothing_ignore_index: int = field(
        default=-100, metadata={"help": "Label value of positions that are not scored (padding, prompts)."}
    )
    smoothing_shift_labels: bool | None = field(
        default=None,
        metadata={
            "help": "Whether logits at position t predict the label at t+1. Default: decided from the model "
            "(decoder-only generative LMs shift, encoder-decoder and classification models do not), through "
            "PEFT and DDP wrappers. A batch's 'shift_labels' key is always used as-is."
        },
    )
    smoothing_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Rows of logits processed at once by the loss (default: chosen from the shapes)."},
    )
    smoothing_eval_diagnostics: bool = field(
        default=True,
        metadata={
            "help": "During evaluate(), also report calibration and logit statistics (ECE, Brier, entropy, logit "
            "gap, ...), computed per batch without storing the logits."
        },
    )
    smoothing_ece_bins: int = field(
        default=15, metadata={"help": "Number of equal-width confidence bins of the expected calibration error."}
    )

    def __post_init__(self):
        # Chained dataclass __post_init__: the HF argument classes also define one.
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        self._validate_smoothing()

    def _validate_smoothing(self) -> None:
        if self.smoothing_method not in METHODS:
            raise ValueError(f"smoothing_method must be one of {tuple(METHODS)}, got {self.smoothing_method!r}.")
        method = get_method(self.smoothing_method)
        if self.smoothing_schedule not in SCHEDULES:
            raise ValueError(f"smoothing_schedule must be one of {SCHEDULES}, got {self.smoothing_schedule!r}.")
        if self.smoothing_convention not in CONVENTIONS:
            raise ValueError(f"smoothing_convention must be one of {CONVENTIONS}, got {self.smoothing_convention!r}.")
        values = {"smoothing_alpha": self.smoothing_alpha}
        if self.smoothing_alpha_end is not None:
            values["smoothing_alpha_end"] = self.smoothing_alpha_end
        for name, value in values.items():
            method.check_strength(value, name)
        if self.smoothing_schedule == "linear" and self.smoothing_alpha_end is None:
            raise ValueError("smoothing_schedule='linear' needs smoothing_alpha_end (e.g. 0.2 for MaxSup's 0.1 -> 0.2).")
        if self.smoothing_schedule == "constant" and self.smoothing_alpha_end is not None:
            raise ValueError(
                f"smoothing_alpha_end={self.smoothing_alpha_end} is set but smoothing_schedule='constant'; set "
                "smoothing_schedule='linear' to ramp, or drop smoothing_alpha_end."
            )
        if method.knob is None and (
            self.smoothing_schedule != "constant" or self.smoothing_alpha_end is not None
        ):
            raise ValueError("smoothing_method='none' has no strength to schedule; drop smoothing_schedule/alpha_end.")
        if self.smoothing_convention != "uniform" and method.knob != "epsilon":
            raise ValueError(
                f"smoothing_convention={self.smoothing_convention!r} only applies to smoothing_method="
                f"'label_smoothing' (got smoothing_method={self.smoothing_method!r})."
            )
        if self.smoothing_chunk_size is not None and self.smoothing_chunk_size < 1:
            raise ValueError(f"smoothing_chunk_size must be a positive number of rows, got {self.smoothing_chunk_size}.")
        if self.smoothing_ece_bins < 1:
            raise ValueError(f"smoothing_ece_bins must be >= 1, got {self.smoothing_ece_bins}.")
        label_smoothing_factor = getattr(self, "label_smoothing_factor", 0.0)
        if label_smoothing_factor and self.smoothing_method != "none":
            raise ValueError(
                f"label_smoothing_factor={label_smoothing_factor} (transformers' LabelSmoother) and "
                f"smoothing_method={self.smoothing_method!r} (hf_smooth) both smooth the loss. Use one: set "
                "label_smoothing_factor=0 and smoothing_method='label_smoothing' with smoothing_alpha="
                f"{label_smoothing_factor} for the same objective computed exactly."
            )

    # ---- derived values ------------------------------------------------------------------------------------------

    def alpha_at(self, step: int, total_steps: int | None) -> float:
        """Strength used at optimizer step `step` (0-based) of `total_steps`."""
        if get_method(self.smoothing_method).knob is None:
            return 0.0
        if self.smoothing_schedule == "constant":
            return float(self.smoothing_alpha)
        if not total_steps or total_steps <= 1:
            return float(self.smoothing_alpha)
        fraction = min(max(step / (total_steps - 1), 0.0), 1.0)
        return float(self.smoothing_alpha + (self.smoothing_alpha_end - self.smoothing_alpha) * fraction)

    def loss_knobs(self, alpha: float) -> dict:
        """Keyword arguments of `hf_smooth.smoothed_cross_entropy` for the current strength."""
        return get_method(self.smoothing_method).knobs(alpha, self.smoothing_convention)


@dataclass
class SmoothTrainingArguments(SmoothingArguments, TrainingArguments):
    """`TrainingArguments` plus the `smoothing_*` fields of [`SmoothingArguments`]."""


@dataclass
class SmoothSeq2SeqTrainingArguments(SmoothingArguments, Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` plus the `smoothing_*` fields of [`SmoothingArguments`]."""
