"""Configuration: the `smoothing_*` knobs, alone or combined with the Hugging Face argument classes.

Every field is prefixed ``smoothing_`` so it cannot collide with `TrainingArguments`, has help text for
`HfArgumentParser` (CLI, JSON, YAML), and is validated in `__post_init__` with errors that name the knobs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from .methods import METHODS, get_method

logger = logging.getLogger(__name__)

__all__ = [
    "SmoothingArguments",
    "SmoothTrainingArguments",
    "SmoothSeq2SeqTrainingArguments",
    "METHODS",
    "SCHEDULES",
]

SCHEDULES = ("constant", "linear")
SCHEDULE_UNITS = ("step", "epoch")
CONVENTIONS = ("uniform", "fairseq")


@dataclass
class SmoothingArguments:
    """What `SmoothTrainer` optimizes and how it reports it.

    Use alone (`SmoothTrainer(..., smoothing_args=SmoothingArguments(...))`) or through
    [`SmoothTrainingArguments`] / [`SmoothSeq2SeqTrainingArguments`], which add these fields to the HF classes.
    """

    # The method used when neither smoothing_method nor label_smoothing_factor is given (a recipe may change it).
    smoothing_default_method: ClassVar[str] = "label_smoothing"

    smoothing_method: str | None = field(
        default=None,
        metadata={
            "help": "Training objective: "
            + ", ".join(f"'{m.name}' ({m.summary})" for m in METHODS.values())
            + ". Default: 'label_smoothing' (epsilon 0.1), or, when transformers' label_smoothing_factor is set, "
            "label smoothing with that epsilon.",
            "choices": list(METHODS),
        },
    )
    smoothing_alpha: float | None = field(
        default=None,
        metadata={
            "help": "Strength: epsilon for label_smoothing (in [0, 1]), alpha for maxsup (>= 0). With a linear "
            "schedule, the value at the start. Default: 0.1 (label_smoothing_factor, when that is set)."
        },
    )
    smoothing_alpha_end: float | None = field(
        default=None,
        metadata={
            "help": "With smoothing_schedule='linear': the value at the end (the MaxSup paper ramps 0.1 -> 0.2). Must "
            "be unset for the constant schedule."
        },
    )
    smoothing_schedule: str = field(
        default="constant",
        metadata={
            "help": "'constant', or 'linear' from smoothing_alpha to smoothing_alpha_end (see "
            "smoothing_schedule_unit). The value follows the trainer state, so it resumes exactly from a checkpoint.",
            "choices": list(SCHEDULES),
        },
    )
    smoothing_schedule_unit: str = field(
        default="step",
        metadata={
            "help": "What the linear schedule counts. 'step': optimizer step t of T uses alpha + (alpha_end - alpha) * "
            "t / (T - 1), reaching alpha_end at the last step. 'epoch', as the official MaxSup code: epoch e (0-based) "
            "of E uses alpha + (alpha_end - alpha) * e / E, constant within an epoch (so the last epoch uses "
            "alpha + (alpha_end - alpha) * (E - 1) / E).",
            "choices": list(SCHEDULE_UNITS),
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
    smoothing_z_loss: float = field(
        default=0.0,
        metadata={
            "help": "z-loss coefficient c: adds c * logsumexp(z)**2 per scored token (PaLM; Liger's lse_square_scale; "
            "1e-4 is usual), with any smoothing_method. Logged as z_loss. 0 (default) turns it off."
        },
    )
    smoothing_num_classes: int | None = field(
        default=None,
        metadata={
            "help": "Only class ids below this get smoothing mass and count in MaxSup's mean and in K (both "
            "conventions); the others stay in the softmax and the NLL. For an embedding matrix padded past the "
            "tokenizer (Qwen: 151936 rows, 151665 tokens) set len(tokenizer); the recipes do. Default: all."
        },
    )
    smoothing_exclude_ids: list[int] | None = field(
        default=None,
        metadata={
            "help": "Class ids left out of smoothing like those >= smoothing_num_classes (e.g. the pad or special "
            "tokens). A label may be one of them: its one-hot part still applies."
        },
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
        if self.smoothing_method is not None and self.smoothing_method not in METHODS:
            raise ValueError(f"smoothing_method must be one of {tuple(METHODS)}, got {self.smoothing_method!r}.")
        # The knobs given explicitly, before defaults fill the others: label_smoothing_factor may set only those not
        # given (apply_label_smoothing_factor), and the start-of-training line says when the method is a default.
        self.smoothing_explicit = frozenset(
            name for name in ("smoothing_method", "smoothing_alpha") if getattr(self, name) is not None
        )
        if self.smoothing_method is None:
            self.smoothing_method = self.smoothing_default_method
        if self.smoothing_alpha is None:
            self.smoothing_alpha = get_method(self.smoothing_method).default
        self._validate_smoothing()
        self.apply_label_smoothing_factor(getattr(self, "label_smoothing_factor", 0.0))

    def _validate_smoothing(self) -> None:
        if self.smoothing_method not in METHODS:
            raise ValueError(f"smoothing_method must be one of {tuple(METHODS)}, got {self.smoothing_method!r}.")
        method = get_method(self.smoothing_method)
        if self.smoothing_schedule not in SCHEDULES:
            raise ValueError(f"smoothing_schedule must be one of {SCHEDULES}, got {self.smoothing_schedule!r}.")
        if self.smoothing_schedule_unit not in SCHEDULE_UNITS:
            raise ValueError(
                f"smoothing_schedule_unit must be one of {SCHEDULE_UNITS}, got {self.smoothing_schedule_unit!r}."
            )
        if self.smoothing_schedule_unit != "step" and self.smoothing_schedule != "linear":
            raise ValueError(
                f"smoothing_schedule_unit={self.smoothing_schedule_unit!r} only applies to smoothing_schedule='linear' "
                f"(got smoothing_schedule={self.smoothing_schedule!r})."
            )
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
        self._validate_family()

    def _validate_family(self) -> None:
        """z-loss and the smoothing classes (the vocabulary bound is checked against the logits by the loss)."""
        z_loss = self.smoothing_z_loss
        if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or not (
            math.isfinite(z_loss) and z_loss >= 0
        ):
            raise ValueError(f"smoothing_z_loss must be a finite number >= 0 (e.g. 1e-4), got {z_loss!r}.")
        count = self.smoothing_num_classes
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValueError(
                f"smoothing_num_classes must be a positive int (the number of real classes, e.g. len(tokenizer)), "
                f"got {count!r}."
            )
        ids = self.smoothing_exclude_ids
        if ids is not None:
            if isinstance(ids, (str, int)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
            ):
                raise ValueError(f"smoothing_exclude_ids must be a list of class ids (ints >= 0), got {ids!r}.")
            self.smoothing_exclude_ids = list(ids)

    # ---- transformers' label_smoothing_factor --------------------------------------------------------------------

    def apply_label_smoothing_factor(self, factor: float) -> None:
        """Take transformers' ``label_smoothing_factor`` as exact label smoothing with that epsilon, so HF configs and
        ``run_translation.py``-style commands work unchanged: it is the uniform convention (``(1-eps)*onehot +
        eps/K``) that transformers' ``LabelSmoother`` computes, here computed by hf_smooth (the ``LabelSmoother``
        never runs on top of it). Only the knobs not given explicitly are filled; a different method, strength,
        convention or a schedule given explicitly is a contradiction and raises, naming both knobs.
        """
        if not factor:
            return
        get_method("label_smoothing").check_strength(factor, "label_smoothing_factor")
        factor = float(factor)
        conflicts = []
        if "smoothing_method" in self.smoothing_explicit and self.smoothing_method != "label_smoothing":
            conflicts.append(f"smoothing_method={self.smoothing_method!r}")
        if "smoothing_alpha" in self.smoothing_explicit and float(self.smoothing_alpha) != factor:
            conflicts.append(f"smoothing_alpha={self.smoothing_alpha}")
        if self.smoothing_convention != "uniform":
            conflicts.append(f"smoothing_convention={self.smoothing_convention!r}")
        if self.smoothing_schedule != "constant":
            conflicts.append(f"smoothing_schedule={self.smoothing_schedule!r}")
        if conflicts:
            raise ValueError(
                f"label_smoothing_factor={factor} (label smoothing with epsilon {factor}, uniform convention, "
                f"constant) contradicts {', '.join(conflicts)}. Drop label_smoothing_factor and configure hf_smooth "
                "with the smoothing_* options, or drop those options to train with label_smoothing_factor alone."
            )
        if {"smoothing_method", "smoothing_alpha"} <= self.smoothing_explicit:
            return  # this objective given explicitly (or the factor already applied): nothing to say twice
        self.smoothing_method, self.smoothing_alpha = "label_smoothing", factor
        self.smoothing_explicit = self.smoothing_explicit | {"smoothing_method", "smoothing_alpha"}
        logger.info(
            "label_smoothing_factor=%g: hf_smooth computes it as exact label smoothing (smoothing_method="
            "'label_smoothing', smoothing_alpha=%g, uniform convention as transformers' LabelSmoother).", factor, factor
        )

    # ---- derived values ------------------------------------------------------------------------------------------

    def alpha_at(self, step: int, total: int | None) -> float:
        """Strength at position `step` (0-based) of `total`, counted in ``smoothing_schedule_unit`` (optimizer steps,
        or epochs)."""
        if get_method(self.smoothing_method).knob is None:
            return 0.0
        if self.smoothing_schedule == "constant" or not total or total <= 0:
            return float(self.smoothing_alpha)
        if self.smoothing_schedule_unit == "epoch":
            fraction = step / total  # the official MaxSup code: begin + (end - begin) * epoch / epochs
        elif total <= 1:
            return float(self.smoothing_alpha)
        else:
            fraction = step / (total - 1)
        fraction = min(max(fraction, 0.0), 1.0)
        return float(self.smoothing_alpha + (self.smoothing_alpha_end - self.smoothing_alpha) * fraction)

    def schedule_position(self, state, *, last_step: bool = False) -> tuple[int, int]:
        """``(index, total)`` of the schedule in a `transformers.TrainerState`: the optimizer step about to run (or,
        with ``last_step``, the one just taken) of ``max_steps``, or its 0-based epoch of ``num_train_epochs``.

        Both are read from the state, which a checkpoint restores, so a resumed run uses the same strengths as an
        uninterrupted one. ``state.epoch`` is ``e + k / n`` after step ``k`` of the ``n`` of epoch ``e`` (so exactly
        ``e`` before the first step of epoch ``e``): the step about to run is in epoch ``floor(epoch)``, the one just
        taken in ``ceil(epoch) - 1``.
        """
        if self.smoothing_schedule_unit == "epoch":
            epoch = float(state.epoch or 0.0)
            index = math.ceil(epoch) - 1 if last_step else math.floor(epoch)
            total = int(state.num_train_epochs or 0)
            if self.smoothing_schedule == "linear" and not 0 < total < 2**62:  # sys.maxsize: no length to count
                raise ValueError(
                    "smoothing_schedule_unit='epoch' needs the number of epochs, but the training data has no length "
                    "(an IterableDataset with max_steps). Use smoothing_schedule_unit='step'."
                )
            return max(index, 0), total
        step = state.global_step - 1 if last_step else state.global_step
        return max(step, 0), state.max_steps

    def alpha_for_state(self, state, *, last_step: bool = False) -> float:
        """Strength at the position of `state` (see `schedule_position`)."""
        return self.alpha_at(*self.schedule_position(state, last_step=last_step))

    def model_card_tags(self) -> list[str]:
        """Tags for the model card and the Hub: ``hf_smooth`` and the method's (``label-smoothing``, ``maxsup``; none
        for plain cross-entropy), as TRL tags the models its trainers train."""
        method = get_method(self.smoothing_method)
        return ["hf_smooth"] + ([method.name.replace("_", "-")] if method.knob is not None else [])

    def describe(self) -> str:
        """One line naming the method, its strength (or schedule) and, for label smoothing, the convention."""
        method = get_method(self.smoothing_method)
        if method.knob is None:
            return "smoothing_method='none' (plain cross-entropy)"
        if self.smoothing_schedule == "constant":
            strength = f"{method.knob} {self.smoothing_alpha:g}"
        else:
            strength = (
                f"{method.knob} {self.smoothing_alpha:g} -> {self.smoothing_alpha_end:g}, linear per "
                f"{self.smoothing_schedule_unit}"
            )
        text = f"smoothing_method={method.name!r} ({method.label}), {strength}"
        if method.knob == "epsilon":
            uniform = self.smoothing_convention == "uniform"
            target = "(1-eps)*onehot + eps/K" if uniform else "1-eps on the label, eps/(K-1) elsewhere"
            text += f", convention {self.smoothing_convention!r} (target {target})"
        return text

    def loss_knobs(self, alpha: float) -> dict:
        """Keyword arguments of `hf_smooth.smoothed_cross_entropy` for the current strength (with the z-loss and
        the smoothing classes)."""
        knobs = get_method(self.smoothing_method).knobs(alpha, self.smoothing_convention)
        knobs.update(
            z_loss=float(self.smoothing_z_loss),
            num_classes=self.smoothing_num_classes,
            exclude_ids=self.smoothing_exclude_ids or None,
        )
        return knobs


@dataclass
class SmoothTrainingArguments(SmoothingArguments, TrainingArguments):
    """`TrainingArguments` plus the `smoothing_*` fields of [`SmoothingArguments`]."""


@dataclass
class SmoothSeq2SeqTrainingArguments(SmoothingArguments, Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` plus the `smoothing_*` fields of [`SmoothingArguments`]."""
