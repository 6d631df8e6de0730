"""`SmoothedLoss`: hf_smooth as a ``compute_loss_func`` for pipelines whose Trainer class cannot change.

    loss = SmoothedLoss(smoothing_method="maxsup", smoothing_alpha=0.1)
    trainer = Trainer(model=model, args=args, ..., compute_loss_func=loss, callbacks=[loss])

Passing it in ``callbacks`` too lets it see the trainer's arguments and model once, at the end of
``Trainer.__init__``: it decides the causal shift from the model, rejects configurations in which it would
silently not be called or would be doubled, follows the alpha schedule, and adds NLL/perplexity to the logs.
Without the callback it needs ``model=`` (or ``smoothing_shift_labels=``) and a constant schedule.

Normalization is the Trainer's: ``num_items_in_batch`` comes from the Trainer and the
Trainer multiplies the loss by the number of processes afterwards. That count is exact for the models transformers
knows to shift (Llama, Mistral, ...), but for GPT-2-style models it counts ``labels`` instead of ``labels[..., 1:]``
(one token per row too many; see ANCHORS/tests); a warning says so. `SmoothTrainer` counts exactly in every case.
"""

from __future__ import annotations

import logging
import warnings

import torch
from transformers import TrainerCallback

from . import _compat
from .arguments import SmoothingArguments
from .logs import eval_logs, train_window_logs
from .losses import LossComponents, smoothed_cross_entropy
from .modeling import align_targets, align_weights, loss_shifts_labels, unwrap_model

__all__ = ["SmoothedLoss"]

logger = logging.getLogger(__name__)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(totals: torch.Tensor) -> torch.Tensor:
    if _world_size() > 1:
        backend_device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        moved = totals.to(backend_device)
        torch.distributed.all_reduce(moved)
        totals = moved.to(totals.device)
    return totals


class _DistributedReducer:
    """The three collectives `TokenMetrics.gather` uses, from accelerate's functions (no Accelerator needed)."""

    def __init__(self):
        from accelerate import PartialState

        state = PartialState()
        self.num_processes, self.device = state.num_processes, state.device

    @staticmethod
    def reduce(tensor, reduction="sum"):
        from accelerate.utils import reduce

        return reduce(tensor, reduction=reduction)

    @staticmethod
    def pad_across_processes(tensor, dim=0, pad_index=0):
        from accelerate.utils import pad_across_processes

        return pad_across_processes(tensor, dim=dim, pad_index=pad_index)

    @staticmethod
    def gather(tensor):
        from accelerate.utils import gather

        return gather(tensor)


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
        self._checked_caller = False
        self._parts: torch.Tensor | None = None
        self._eval_metrics = None  # TokenMetrics of the evaluation in progress (calls under torch.no_grad)

    # ---- callback hooks ------------------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._registered = True
        self._state = state
        # transformers never runs its LabelSmoother when compute_loss_func is given (5.19 to 5.24): the factor is taken
        # here as exact label smoothing with that epsilon, or raises when it contradicts this loss's configuration.
        self.smoothing_args.apply_label_smoothing_factor(getattr(args, "label_smoothing_factor", 0.0))
        if model is not None and hasattr(model, "add_model_tags"):
            model.add_model_tags(self.smoothing_args.model_card_tags())  # push_to_hub's model card carries them
        loss_type = getattr(args, "loss_type", None)
        if loss_type is not None and loss_type != "nll":
            raise ValueError(
                f"loss_type={loss_type!r} (TRL) computes its own loss and never calls compute_loss_func, so "
                "SmoothedLoss would silently not be used. Set loss_type='nll', or use "
                "`from hf_smooth import SmoothSFTTrainer` in place of SFTTrainer."
            )
        if any(cls.__name__ == "SFTConfig" for cls in type(args).__mro__):
            # TRL 1.15 deprecated compute_loss_func in SFTTrainer (removal planned for 2.0); from 1.16 it runs a
            # second, fused forward per step for its own metrics.
            warnings.warn(
                "SmoothedLoss as TRL SFTTrainer's compute_loss_func: TRL deprecates compute_loss_func there (removal "
                "planned for trl 2.0) and runs an extra forward pass per step for its metrics. Use "
                "`from hf_smooth import SmoothSFTTrainer` in place of SFTTrainer: one forward, the same smoothing "
                "options (smoothing_args=), TRL's metrics kept.",
                UserWarning,
                stacklevel=2,
            )
        if model is not None and self.smoothing_args.smoothing_shift_labels is None:
            self._shift = loss_shifts_labels(model)
            self._warn_if_count_differs(model)
        if model is not None:
            # The Trainer passes every batch key to the model; a pre-hook takes `loss_weights` out first.
            model.register_forward_pre_hook(self._take_loss_weights, with_kwargs=True)
        return control

    def _take_loss_weights(self, _module, args, kwargs):
        """Forward pre-hook: keep the batch's ``loss_weights`` for the loss call that follows, away from the model."""
        if "loss_weights" not in kwargs:
            return None
        kwargs = dict(kwargs)
        self._pending_weights = kwargs.pop("loss_weights")
        return args, kwargs

    def on_train_begin(self, args, state, control, **kwargs):
        self._run_parts = None
        options = self.smoothing_args
        if "smoothing_method" in options.smoothing_explicit:
            logger.info("hf_smooth SmoothedLoss: training with %s.", options.describe())
        else:
            logger.warning(
                "hf_smooth SmoothedLoss: training with %s, the default (no smoothing_method given).", options.describe()
            )
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Replace the Trainer's `loss` (a mean of per-step means) by the token-weighted objective, so that
        ``loss == nll + smoothing_penalty`` on every line, and add NLL, perplexity, penalty, alpha and accuracy."""
        if logs is None:
            return control
        extra = {}
        if "train_loss" in logs and getattr(self, "_run_parts", None) is not None:
            run = LossComponents.from_vector(_all_reduce(self._run_parts.clone())).means()
            extra["train_loss"] = run["loss"] if run["num_tokens"] else float("nan")
        if "loss" in logs and self._parts is not None:
            extra.update(self._window_logs(state))
        if extra:
            logs.update(extra)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(extra)
        return control

    def _window_logs(self, state) -> dict[str, float]:
        totals, self._parts = self._parts, None
        means = LossComponents.from_vector(_all_reduce(totals)).means()
        if means["num_tokens"] == 0:
            warnings.warn(
                "SmoothedLoss: a whole training logging window scored no token (every label is ignore_index="
                f"{self.smoothing_args.smoothing_ignore_index}); its loss is reported as NaN. Check the collator's "
                "label masking.",
                stacklevel=2,
            )
            means = None
        return train_window_logs(
            means,
            alpha=self.smoothing_args.alpha_for_state(state, last_step=True),
        )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """Put the token-weighted evaluation metrics (`eval_nll`, `eval_ppl`, calibration, ...) into the results,
        as `SmoothTrainer` reports them; `eval_loss` becomes the token-weighted objective."""
        accumulator, self._eval_metrics = self._eval_metrics, None
        if metrics is None or accumulator is None:
            return control
        prefix = next((k[: -len("_runtime")] for k in metrics if k.endswith("_runtime")), "eval")
        accumulator = accumulator.gather(_DistributedReducer()) if _world_size() > 1 else accumulator
        if accumulator.num_tokens == 0:
            warnings.warn(f"SmoothedLoss: the evaluation ({prefix}) scored no token; {prefix}_loss is NaN.", stacklevel=2)
            extra = {f"{prefix}_loss": float("nan")}
        else:
            results = accumulator.compute()
            results["smoothing_alpha"] = self.current_alpha
            extra = eval_logs(results, prefix)
        metrics.update(extra)
        if state.log_history and any(k.startswith(prefix) for k in state.log_history[-1]):
            state.log_history[-1].update(extra)
        return control

    def _warn_if_count_differs(self, model) -> None:
        if self._shift and not _compat.trainer_counts_shifted_labels(unwrap_model(model)):
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
        return self.smoothing_args.alpha_for_state(self._state)

    def __call__(self, outputs, labels, num_items_in_batch=None):
        if not self._checked_caller:
            self._check_caller()
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
        knobs = dict(
            **options.loss_knobs(self.current_alpha),
            ignore_index=options.smoothing_ignore_index,
            chunk_size=options.smoothing_chunk_size,
        )
        weights, self._pending_weights = getattr(self, "_pending_weights", None), None
        weights = align_weights(weights, labels, shifted_labels=False, shift=self._shift, sequence_length=None)
        weights = None if weights is None else weights.to(logits.device)
        if not torch.is_grad_enabled() and self._registered:
            # Evaluation (Trainer.prediction_step runs under no_grad): per-token losses into the eval metrics; there
            # loss_weights only drop the tokens of weight 0 (as SmoothTrainer does).
            if weights is not None:
                targets = targets.masked_fill(weights == 0, options.smoothing_ignore_index)
            token_loss = smoothed_cross_entropy(logits, targets, reduction="none", **knobs)
            self._record_eval_batch(logits, targets, token_loss)
            count = targets.ne(options.smoothing_ignore_index).sum()
            return token_loss.sum() / count.clamp(min=1)
        if weights is not None and num_items_in_batch is not None and not getattr(self, "_warned_weights", False):
            warnings.warn(
                "SmoothedLoss with loss_weights: transformers' Trainer hands compute_loss_func a token count, so the "
                "loss is sum(w * l) / (scored tokens of the window), not / sum(w) (still exact under accumulation and "
                "several processes). SmoothTrainer divides by the window's total weight.",
                stacklevel=2,
            )
            self._warned_weights = True
        loss, parts = smoothed_cross_entropy(
            logits, targets, num_items_in_batch=num_items_in_batch, return_components=True, weights=weights, **knobs
        )
        if torch.is_grad_enabled() and self._registered:
            vector = parts.to_vector().double()
            self._parts = vector if self._parts is None else self._parts + vector
            run = getattr(self, "_run_parts", None)
            self._run_parts = vector.clone() if run is None else run + vector
        return loss

    def _record_eval_batch(self, logits, targets, token_loss) -> None:
        from .metrics import TokenMetrics

        options = self.smoothing_args
        if self._eval_metrics is None:
            self._eval_metrics = TokenMetrics(
                num_bins=options.smoothing_ece_bins,
                ignore_index=options.smoothing_ignore_index,
                diagnostics=options.smoothing_eval_diagnostics,
            )
            if _world_size() > 1:
                warnings.warn(
                    "SmoothedLoss evaluation metrics under several processes include the samples the distributed "
                    "sampler repeats to even out the last batch; SmoothTrainer drops them (gather_for_metrics).",
                    stacklevel=3,
                )
        self._eval_metrics.update(logits.detach(), targets, token_loss=token_loss.detach())

    def _check_caller(self) -> None:
        """At the first call, take the calling Trainer's `label_smoothing_factor` as this loss's label smoothing (or
        raise on a contradiction), which transformers would otherwise silently drop for a compute_loss_func.

        Registered as a callback, `on_init_end` already did; without it, the calling Trainer is found on the call
        stack (hf_smooth._compat).
        """
        self._checked_caller = True
        if self._registered:
            return
        trainer = _compat.calling_trainer()
        self.smoothing_args.apply_label_smoothing_factor(
            getattr(getattr(trainer, "args", None), "label_smoothing_factor", 0.0)
        )
