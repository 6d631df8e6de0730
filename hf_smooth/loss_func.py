"""`SmoothedLoss`: hf_smooth as a ``compute_loss_func`` for pipelines whose Trainer class cannot change.

    loss = SmoothedLoss(smoothing_method="maxsup", smoothing_alpha=0.1)
    trainer = Trainer(model=model, args=args, ..., compute_loss_func=loss, callbacks=[loss])

Passing it in ``callbacks`` too lets it see the trainer's arguments and model once, at the end of
``Trainer.__init__``: it decides the causal shift from the model, rejects configurations in which it would
silently not be called or would be doubled, follows the alpha schedule, and adds NLL/perplexity to the logs.
Without the callback it needs ``model=`` (or ``smoothing_shift_labels=``) and a constant schedule.

Normalization is the Trainer's: ``num_items_in_batch`` comes from ``Trainer._get_num_items_in_batch`` and the
Trainer multiplies the loss by the number of processes afterwards. That count is exact for the models transformers
knows to shift (Llama, Mistral, ...), but for GPT-2-style models it counts ``labels`` instead of ``labels[..., 1:]``
(one token per row too many; see ANCHORS/tests); a warning says so. `SmoothTrainer` counts exactly in every case.
"""

from __future__ import annotations

import warnings

import torch
from transformers import TrainerCallback

from .arguments import SmoothingArguments
from .losses import LossComponents, smoothed_cross_entropy
from .modeling import align_targets, loss_shifts_labels, unwrap_model

__all__ = ["SmoothedLoss"]


def _trainer_counts_shifted(model) -> bool:
    """Transformers' own rule for counting `labels[..., 1:]` in `num_items_in_batch` (Trainer.__init__, 5.x)."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    base = unwrap_model(model)
    config = getattr(base, "config", None)
    return LOSS_MAPPING.get(getattr(base, "loss_type", None)) is ForCausalLMLoss and not getattr(
        config, "is_encoder_decoder", False
    )


class SmoothedLoss(TrainerCallback):
    """A ``compute_loss_func(outputs, labels, num_items_in_batch=None)`` computing LS / MaxSup / CE with hf_smooth.

    Args:
        smoothing_args (`SmoothingArguments`, *optional*):
            The configuration; or pass its fields as keyword arguments (`smoothing_method="maxsup"`, ...).
        model (`torch.nn.Module`, *optional*):
            The model, to decide whether logits are shifted against labels. Not needed when registered as a callback.
    """

    def __init__(self, smoothing_args: SmoothingArguments | None = None, *, model=None, **smoothing_fields):
        if smoothing_args is not None and smoothing_fields:
            raise ValueError("Pass either a SmoothingArguments or smoothing_* keyword arguments, not both.")
        self.smoothing_args = smoothing_args or SmoothingArguments(**smoothing_fields)
        if self.smoothing_args.smoothing_fused_loss:
            raise ValueError(
                "smoothing_fused_loss=True needs SmoothTrainer (or SmoothLossMixin): a compute_loss_func only ever "
                "receives the materialized logits."
            )
        self._shift = self.smoothing_args.smoothing_shift_labels
        if self._shift is None and model is not None:
            self._shift = loss_shifts_labels(model)
            self._warn_if_count_differs(model)
        self._state = None
        self._registered = False
        self._parts: torch.Tensor | None = None

    # ---- callback hooks ------------------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._registered = True
        self._state = state
        if getattr(args, "label_smoothing_factor", 0.0):
            raise ValueError(
                f"label_smoothing_factor={args.label_smoothing_factor} is set together with SmoothedLoss: transformers "
                "ignores its LabelSmoother when compute_loss_func is given, so one of them is silently dropped. Set "
                "label_smoothing_factor=0 and configure the smoothing on SmoothedLoss."
            )
        loss_type = getattr(args, "loss_type", None)
        if loss_type is not None and loss_type != "nll":
            raise ValueError(
                f"loss_type={loss_type!r} (TRL) computes its own loss and never calls compute_loss_func, so "
                "SmoothedLoss would silently not be used. Set loss_type='nll', or use "
                "`class SmoothSFTTrainer(SmoothLossMixin, SFTTrainer)`."
            )
        if model is not None and self.smoothing_args.smoothing_shift_labels is None:
            self._shift = loss_shifts_labels(model)
            self._warn_if_count_differs(model)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._parts is None:
            return control
        totals, self._parts = self._parts, None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        means = LossComponents.from_vector(totals).means()
        extra = {
            "nll": means["nll"],
            "ppl": means["ppl"],
            "smoothing_penalty": means["regularizer"],
            "smoothing_alpha": self.smoothing_args.alpha_at(max(state.global_step - 1, 0), state.max_steps),
            "token_accuracy": means["accuracy"],
        }
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
        return control

    def _warn_if_count_differs(self, model) -> None:
        if self._shift and not _trainer_counts_shifted(model):
            warnings.warn(
                f"transformers' Trainer counts num_items_in_batch over labels, not labels[..., 1:], for "
                f"{type(unwrap_model(model)).__name__}: the loss and gradients are scaled by (n - rows) / n. Mask "
                "position 0 of the labels with -100 in the collator, or use SmoothTrainer, which counts exactly.",
                stacklevel=3,
            )

    # ---- the loss ------------------------------------------------------------------------------------------------

    @property
    def current_alpha(self) -> float:
        if self._state is None:
            if self.smoothing_args.smoothing_schedule != "constant":
                raise ValueError(
                    "A scheduled SmoothedLoss must see the training state: pass it also as callbacks=[loss]."
                )
            return self.smoothing_args.alpha_at(0, None)
        return self.smoothing_args.alpha_at(self._state.global_step, self._state.max_steps)

    def __call__(self, outputs, labels, num_items_in_batch=None):
        if self._shift is None:
            raise ValueError(
                "SmoothedLoss does not know whether the logits are shifted: pass model=, register it as a callback "
                "(callbacks=[loss]), or set smoothing_shift_labels."
            )
        if labels is None:
            raise ValueError("SmoothedLoss was called with labels=None: the batch has no 'labels' key.")
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        options = self.smoothing_args
        targets = align_targets(
            labels, None, shift=self._shift, sequence_length=None, ignore_index=options.smoothing_ignore_index
        ).to(logits.device)
        loss, parts = smoothed_cross_entropy(
            logits,
            targets,
            **options.loss_knobs(self.current_alpha),
            ignore_index=options.smoothing_ignore_index,
            num_items_in_batch=num_items_in_batch,
            return_components=True,
            chunk_size=options.smoothing_chunk_size,
        )
        if torch.is_grad_enabled() and self._registered:
            vector = parts.to_vector().double()
            self._parts = vector if self._parts is None else self._parts + vector
        return loss
