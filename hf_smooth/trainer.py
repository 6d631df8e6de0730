"""`SmoothLossMixin` and the Trainer classes built on it: the loss comes from hf_smooth, never from the model.

The mixin only routes: formulas live in `hf_smooth.losses` (and `hf_smooth.fused`), model facts in
`hf_smooth.modeling`, evaluation statistics in `hf_smooth.metrics`.

Normalization (transformers #34191, #46731, #46204): the training loss of a micro-batch is its per-token sum
divided by the number of scored tokens in the whole accumulation window on all ranks, counted here over exactly
the tokens the loss scores (after the causal shift, or from a collator's `shift_labels`). Because DDP averages
gradients over ranks, the loss is multiplied by the number of processes when that count spans them
(`average_tokens_across_devices`, as `Trainer.compute_loss` does), and `loss_is_scaled_for_ga = True` tells
`training_step` not to divide by the accumulation steps again. The update is then the gradient of
(sum over the global batch) / (its token count) whatever the split into micro-batches and ranks.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Trainer

from . import _compat
from .arguments import SmoothingArguments
from .logs import NUM_TOKENS_STATE, eval_logs, resumed_num_tokens, train_window_logs
from .losses import LossComponents, smoothed_cross_entropy
from .modeling import align_targets, align_weights, is_encoder_decoder, loss_shifts_labels, prepare_decoder_input_ids, unwrap_model

__all__ = ["SmoothLossMixin", "SmoothTrainer", "SmoothSeq2SeqTrainer"]

logger = logging.getLogger(__name__)


def _denominator_value(num_items_in_batch, num_tokens: torch.Tensor) -> torch.Tensor:
    """The token count a training loss divides by (as `hf_smooth.losses`), as a float tensor >= 1."""
    if num_items_in_batch is None:
        return num_tokens.clamp(min=1.0)
    count = torch.as_tensor(num_items_in_batch, device=num_tokens.device).reshape(-1)[0]
    return count.to(num_tokens.dtype).clamp(min=1.0)


def _logits_of(outputs) -> torch.Tensor:
    return outputs["logits"] if isinstance(outputs, dict) else outputs[0]


def _eval_loss_per_sequence(logits: torch.Tensor, targets: torch.Tensor, knobs: dict, reduce_kwargs: dict):
    """The per-token loss of an eval batch and ``(B, 2)`` float64 ``[z-loss sum, scored tokens]`` per sequence, one
    loss call a sequence: per sequence, so that ``gather_for_metrics`` drops the samples a distributed sampler
    duplicated, as it does for the other eval sums."""
    losses, z_rows = [], []
    for row_logits, row_targets in zip(logits.split(1), targets.split(1)):
        row_loss, parts = smoothed_cross_entropy(
            row_logits, row_targets, **knobs, reduction="none", return_components=True, **reduce_kwargs
        )
        losses.append(row_loss)
        z_rows.append(torch.stack([parts.z_loss, parts.num_tokens]))
    return torch.cat(losses), torch.stack(z_rows).double()


class SmoothLossMixin(_compat.ResumableTrainOrder):
    """Put before a `Trainer` subclass: ``class MyTrainer(SmoothLossMixin, SFTTrainer): ...``.

    Takes the smoothing configuration from ``smoothing_args=`` or, when the training arguments are a
    [`SmoothTrainingArguments`], from them. Overrides `compute_loss` (labels popped, model called for logits, loss
    from hf_smooth), `get_batch_samples` (exact token count), `prediction_step` / `evaluation_loop` (token-weighted
    eval metrics) and `log` (NLL, perplexity, penalty, alpha, confidence, accuracy next to the objective).
    """

    # compute_loss divides by the token count of the whole accumulation window: no further division by the
    # number of accumulation steps in Trainer.training_step.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, smoothing_args: SmoothingArguments | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        train_args = self.args
        if smoothing_args is not None and isinstance(train_args, SmoothingArguments):
            raise ValueError(
                "Smoothing options were given twice: as smoothing_args= and inside the training arguments "
                f"({type(train_args).__name__}). Pass one of them."
            )
        if smoothing_args is None:
            smoothing_args = train_args if isinstance(train_args, SmoothingArguments) else SmoothingArguments()
        if not isinstance(smoothing_args, SmoothingArguments):
            raise TypeError(f"smoothing_args must be a SmoothingArguments, got {type(smoothing_args).__name__}.")
        self.smoothing_args = smoothing_args
        # transformers' label_smoothing_factor becomes hf_smooth's exact label smoothing with that epsilon (or raises on
        # a contradiction); Trainer.__init__ built a LabelSmoother for it, which must never run on top: compute_loss
        # below never calls it, and it is dropped here so that no other path can.
        smoothing_args.apply_label_smoothing_factor(getattr(train_args, "label_smoothing_factor", 0.0))
        self.label_smoother = None
        if self.compute_loss_func is not None:
            raise ValueError(
                f"compute_loss_func is set but {type(self).__name__} computes the loss itself; drop one of them "
                "(SmoothedLoss is the compute_loss_func form for a Trainer class you cannot change)."
            )
        if getattr(train_args, "n_gpu", 1) > 1:
            raise ValueError(
                f"{train_args.n_gpu} GPUs in one process (torch.nn.DataParallel) are not supported: it splits the "
                "batch after the token count is taken. Launch one process per GPU: accelerate launch --multi_gpu ..."
            )
        self._shift_cache: dict[int, bool] = {}
        self._train_parts: torch.Tensor | None = None  # LossComponents sums since the last log
        self._eval_accumulator = None  # set by evaluation_loop
        # The token metrics (TokenMetrics) of the last completed evaluation, over every rank; None before one.
        self.eval_token_metrics = None
        self._pending_eval_stats = None  # per-sample statistics of the current eval batch
        self._fused_routes: dict = {}  # id(unwrapped model) -> hf_smooth.fused_trainer.FusedRoute, built once
        self._fused_warned = False
        self._run_parts: torch.Tensor | None = None  # the same sums since train() began, for train_loss
        self._input_tokens: torch.Tensor | None = None  # this process's input tokens since train() began (num_tokens)
        self._num_tokens_before = 0.0  # num_tokens when train() began (a resumed run's, from its checkpoint)
        self._warned_empty: set[str] = set()  # what has been reported as scoring no token (warned once each)
        self._warned_eval_weights = False  # evaluation with loss_weights other than 0/1 (warned once)
        self._eval_z_loss: torch.Tensor | None = None  # [z-loss sum, tokens] of the evaluation in progress

        _compat.check_trainer_supported(self)  # loud failure on a Trainer without the hooks the mixin relies on
        # Tag the model as TRL does (`_tag_names`): push_to_hub and the model card carry them.
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self.smoothing_tags)
        # After train() prepares the model: with several data-parallel processes it must be DDP-wrapped, or raise.
        self.add_callback(_compat.DDPWrapCheck(self))

    # ---- configuration -------------------------------------------------------------------------------------------

    @property
    def smoothing_alpha(self) -> float:
        """Strength at the current optimizer step or epoch (follows the trainer state, so it survives resuming)."""
        return self.smoothing_args.alpha_for_state(self.state)

    @property
    def smoothing_tags(self) -> list[str]:
        """Model-card tags: ``hf_smooth`` and the method's (``label-smoothing``, ``maxsup``; none for plain CE)."""
        return self.smoothing_args.model_card_tags()

    def create_model_card(self, *args, **kwargs):
        """The parent's model card, with `smoothing_tags` added to its ``tags`` (as TRL adds its `_tag_names`)."""
        bound = inspect.signature(super().create_model_card).bind_partial(*args, **kwargs)
        tags = bound.arguments.get("tags")
        tags = [] if tags is None else [tags] if isinstance(tags, str) else list(tags)
        bound.arguments["tags"] = tags + [tag for tag in self.smoothing_tags if tag not in tags]
        return super().create_model_card(*bound.args, **bound.kwargs)

    def _shift(self, model: nn.Module) -> bool:
        if self.smoothing_args.smoothing_shift_labels is not None:
            return bool(self.smoothing_args.smoothing_shift_labels)
        key = id(model)
        if key not in self._shift_cache:
            self._shift_cache[key] = loss_shifts_labels(model)
        return self._shift_cache[key]

    def _weights(self, batch: dict, model: nn.Module, sequence_length: int | None = None) -> torch.Tensor | None:
        """The batch's ``loss_weights`` aligned with `_targets` (None without them)."""
        shifted = batch.get("shift_labels") is not None
        return align_weights(
            batch.get("loss_weights"),
            batch.get("shift_labels") if shifted else batch.get("labels"),
            shifted_labels=shifted,
            shift=self._shift(model),
            sequence_length=sequence_length,
        )

    def _targets(self, batch: dict, model: nn.Module, sequence_length: int | None = None) -> torch.Tensor:
        return align_targets(
            batch.get("labels"),
            batch.get("shift_labels"),
            shift=self._shift(model),
            sequence_length=sequence_length,
            ignore_index=self.smoothing_args.smoothing_ignore_index,
        )

    # ---- training ------------------------------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        # evaluate() before train() must not leave the model without its DDP wrapper (see _compat).
        _compat.undo_evaluation_only_prepare(self)
        self._run_parts = None
        self._input_tokens = None
        self._announce_smoothing()
        output = super().train(*args, **kwargs)
        # `log` replaced metrics["train_loss"] by the token-weighted objective; TrainOutput carries the old mean.
        train_loss = output.metrics.get("train_loss", output.training_loss)
        return type(output)(output.global_step, train_loss, output.metrics)

    def _announce_smoothing(self) -> None:
        """One line at the start of training naming the method, strength and convention; a warning when none of it
        was chosen (a plain `TrainingArguments`: label smoothing 0.1 is the default), else an info line."""
        options = self.smoothing_args
        if "smoothing_method" in options.smoothing_explicit:
            logger.info("hf_smooth: training with %s.", options.describe())
        else:
            logger.warning(
                "hf_smooth: training with %s, the default (no smoothing_method given). Set smoothing_method (and "
                "smoothing_alpha) to choose; smoothing_method='none' is plain cross-entropy.",
                options.describe(),
            )

    # ---- token count over the accumulation window ----------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """Fetch the micro-batches of one optimizer step and count the tokens the loss will score.

        Counted here rather than by `Trainer`, whose rule (`labels[..., 1:]` only when it recognizes the loss type,
        `-100` hard-coded) over-counts GPT-2-style models by one token per row and ignores a custom ignore_index.
        """
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        return batch_samples, self._count_scored_tokens(batch_samples, device)

    def _count_scored_tokens(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Scored tokens of the accumulation window, or, when a batch carries ``loss_weights``, the window's total
        weight (the denominator of ``sum(w * l) / sum(w)``), over all processes."""
        ignore_index = self.smoothing_args.smoothing_ignore_index
        counts = []
        weighted = False
        for batch in batch_samples:
            # transformers' collators return a BatchEncoding (a UserDict, not a dict): accept any Mapping.
            if not (isinstance(batch, Mapping) and ("labels" in batch or "shift_labels" in batch)):
                continue
            scored = self._targets(batch, self.model).ne(ignore_index)
            weights = self._weights(batch, self.model)
            if weights is None:
                counts.append(scored.sum().to(device))
            else:
                weighted = True
                counts.append(torch.where(scored, weights.to(torch.float64), 0.0).sum().to(device))
        if not counts:
            return None
        if weighted:
            counts = [count.to(torch.float64) for count in counts]
        total = torch.stack(counts).sum()
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return total

    def _count_input_tokens(self, inputs: dict[str, Any]) -> None:
        """TRL's ``num_tokens``: the batch's non-padding input tokens (``attention_mask``), a padding-free batch's
        flattened length (``position_ids``), else every input id; accumulated on the device, summed over the
        processes when logged (`log`)."""
        if inputs.get("attention_mask") is not None:
            count = inputs["attention_mask"].sum()
        elif inputs.get("position_ids") is not None:
            position_ids = inputs["position_ids"]
            count = torch.tensor(position_ids.size(-1), device=position_ids.device)
        elif inputs.get("input_ids") is not None:
            count = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
        else:  # inputs_embeds only: one token per embedded position
            embeds = inputs.get("inputs_embeds")
            count = torch.tensor(0 if embeds is None else embeds.shape[:-1].numel())
        count = count.to(torch.int64)
        if self._input_tokens is None:
            # First batch of this train(): the trainer state (a resumed run's checkpoint) is loaded by now.
            self._num_tokens_before, missing = resumed_num_tokens(self.state)
            if missing:
                logger.warning(missing)
            self._input_tokens = count
        else:
            self._input_tokens = self._input_tokens + count.to(self._input_tokens.device)

    def _num_tokens(self) -> float:
        """Input tokens trained on so far over all processes, continuing a resumed run's count. Called at a logging
        step on every process (one collective per log, not per micro-batch as in TRL)."""
        if self._input_tokens is None:
            return self._num_tokens_before
        seen = self._input_tokens
        if self.accelerator.num_processes > 1:
            seen = self.accelerator.reduce(seen.clone(), reduction="sum")
        return self._num_tokens_before + float(seen.item())

    def _save_checkpoint(self, model, trial):
        # The count at this step goes into the checkpoint's trainer_state.json (`resumed_num_tokens` reads it back).
        # Called on every process, as `_num_tokens` needs under DDP; only the main process writes the file.
        count = {"args": {}, "attributes": {"num_tokens": self._num_tokens()}}
        self.state.stateful_callbacks[NUM_TOKENS_STATE] = count
        _compat.save_checkpoint(super(), model, trial)

    # ---- the loss ------------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Pop the labels, run the model for logits, score them with hf_smooth.

        In training, `num_items_in_batch` (from `get_batch_samples`) is the denominator; in evaluation the
        micro-batch's own count is (the eval metrics are re-weighted by tokens over the whole set anyway).
        """
        inputs = dict(inputs)
        if model.training:
            self._count_input_tokens(inputs)
        labels = inputs.pop("labels", None)
        shift_labels = inputs.pop("shift_labels", None)
        loss_weights = inputs.pop("loss_weights", None)  # per-token weights (README): never reach the model
        if labels is None and shift_labels is None:
            raise ValueError(
                f"{type(self).__name__} needs 'labels' in every batch to compute a loss; got keys "
                f"{sorted(inputs)}. Use a collator that sets labels (e.g. DataCollatorForLanguageModeling(mlm=False))."
            )
        if labels is not None and is_encoder_decoder(model):
            if "decoder_input_ids" not in inputs and "decoder_inputs_embeds" not in inputs:
                inputs["decoder_input_ids"] = prepare_decoder_input_ids(model, labels)

        options = self.smoothing_args
        knobs = options.loss_knobs(self.smoothing_alpha)
        training = model.training
        reduce_kwargs = dict(ignore_index=options.smoothing_ignore_index, chunk_size=options.smoothing_chunk_size)

        route = self._fused_route(model) if training and options.smoothing_fused_loss else None
        if route is not None:
            loss, parts, outputs = route(
                model, inputs, labels, shift_labels, knobs, num_items_in_batch, shift=self._shift(model),
                weights=loss_weights, **reduce_kwargs,
            )
        else:
            outputs = model(**inputs)
            logits = _logits_of(outputs)
            batch = {"labels": labels, "shift_labels": shift_labels, "loss_weights": loss_weights}
            length = logits.shape[-2] if logits.dim() >= 3 else None
            targets = self._targets(batch, model, sequence_length=length).to(logits.device)
            weights = self._weights(batch, model, sequence_length=length)
            weights = None if weights is None else weights.to(logits.device)
            if training:
                loss, parts = smoothed_cross_entropy(
                    logits, targets, **knobs, num_items_in_batch=num_items_in_batch, return_components=True,
                    weights=weights, **reduce_kwargs,
                )
            else:
                targets = self._eval_targets(targets, weights)
                z_rows = None
                if self._eval_z_loss is not None:  # inside evaluation_loop with a z-loss: eval_z_loss per sequence
                    token_loss, z_rows = _eval_loss_per_sequence(logits, targets, knobs, reduce_kwargs)
                else:
                    token_loss = smoothed_cross_entropy(logits, targets, **knobs, reduction="none", **reduce_kwargs)
                count = targets.ne(options.smoothing_ignore_index).sum()
                loss = token_loss.sum() / count.clamp(min=1)
                self._record_eval_batch(logits, targets, token_loss)
                if z_rows is not None and self._pending_eval_stats is not None:
                    self._pending_eval_stats["z_loss"] = z_rows

        if training:
            # The micro-batch's share of the window: its weight over the window's total (token counts without weights).
            loss, aux_sums = self._add_router_aux_loss(model, outputs, loss, parts.weight, num_items_in_batch)
            self._accumulate_train_parts(parts, aux_sums)
            if (
                num_items_in_batch is not None
                and self.args.average_tokens_across_devices
                and self.accelerator.num_processes > 1
            ):
                # The count spans all ranks and DDP averages gradients over them (as Trainer.compute_loss does).
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _eval_targets(self, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Evaluation metrics are per token (calibration, accuracy, perplexity): ``loss_weights`` only mask there (a
        weight of 0 drops the token); other weights are not applied, said once."""
        if weights is None:
            return targets
        if not self._warned_eval_weights and bool(((weights != 0) & (weights != 1)).any()):
            warnings.warn(
                "hf_smooth: evaluation metrics are per-token means; the batch's loss_weights only drop the tokens "
                "whose weight is 0 there (the other weights are used in training only).",
                stacklevel=3,
            )
            self._warned_eval_weights = True
        return targets.masked_fill(weights.to(targets.device) == 0, self.smoothing_args.smoothing_ignore_index)

    # ---- fused route ---------------------------------------------------------------------------------------------

    def _fused_route(self, model: nn.Module):
        """The fused route of this model (built once), or None after warning once why it cannot run."""
        from .fused_trainer import FusedRoute

        key = id(unwrap_model(model))
        route = self._fused_routes.get(key)
        if route is None:
            route = self._fused_routes[key] = FusedRoute(self, model)
        if route.reason is None:
            return route
        if not self._fused_warned:
            warnings.warn(f"smoothing_fused_loss=True falls back to materialized logits: {route.reason}.", stacklevel=3)
            self._fused_warned = True
        return None

    @property
    def fused_fallback_reason(self) -> str | None:
        """Why `smoothing_fused_loss=True` fell back to materialized logits for the model being trained (None when
        the fused path runs, when it is off, or before the first training step)."""
        route = self._fused_routes.get(id(unwrap_model(self.model)))
        return None if route is None else route.reason or route.head_fallback

    @property
    def fused_loss_active(self) -> bool:
        """True once a training step of the current model was scored by the fused loss (hf_smooth.fused)."""
        route = self._fused_routes.get(id(unwrap_model(self.model)))
        return bool(route is not None and route.reason is None and route.steps > 0)

    # ---- mixture-of-experts load balancing -----------------------------------------------------------------------

    def _add_router_aux_loss(self, model, outputs, loss, num_tokens, num_items_in_batch):
        """Add a MoE model's load-balancing loss, which transformers adds only when `labels` reach the model.

        Mixtral, Qwen2/3-MoE, OLMoE, ... return ``aux_loss`` when ``output_router_logits=True`` and add
        ``router_aux_loss_coef * aux_loss`` to their loss only if given labels, which this trainer pops. The term is
        a statistic of the whole micro-batch (a product of two batch means), so it is weighted by the micro-batch's
        share of the scored tokens of the optimizer step (``num_tokens / num_items_in_batch``): the weights of one
        step sum to 1 over micro-batches and ranks, so the term does not grow with the accumulation steps or the
        number of processes, and with one micro-batch it is exactly the model's own ``loss`` term.

        Returns ``(loss, sums)``, where ``sums = [aux * n, coef * aux * n]`` (detached, float64) for logging.
        """
        aux = outputs.get("aux_loss") if isinstance(outputs, Mapping) else None
        if aux is None:
            return loss, None
        config = getattr(unwrap_model(model), "config", None)
        coef = getattr(config, "router_aux_loss_coef", None)
        if coef is None:
            raise ValueError(
                f"{type(unwrap_model(model)).__name__} returned an aux_loss but its config has no "
                "router_aux_loss_coef, so hf_smooth cannot add it as transformers would. Set "
                "config.router_aux_loss_coef (0 to train without it) or output_router_logits=False."
            )
        aux = aux.to(loss.device).float()
        n = num_tokens.to(loss.device, torch.float32)
        share = n / _denominator_value(num_items_in_batch, n)
        loss = loss + float(coef) * aux * share
        sums = torch.stack([aux.detach().double() * n.double(), float(coef) * aux.detach().double() * n.double()])
        return loss, sums

    # ---- training metrics ----------------------------------------------------------------------------------------

    def _accumulate_train_parts(self, parts: LossComponents, aux_sums: torch.Tensor | None) -> None:
        vector = parts.to_vector().detach().double()
        extra = torch.zeros(2, dtype=vector.dtype, device=vector.device) if aux_sums is None else aux_sums
        vector = torch.cat([vector, extra.to(vector.device)])
        self._train_parts = vector if self._train_parts is None else self._train_parts + vector
        self._run_parts = vector.clone() if self._run_parts is None else self._run_parts + vector

    def _train_means(self, totals: torch.Tensor) -> dict[str, float] | None:
        """Token-weighted means of accumulated sums (all ranks), or None when they hold no scored token."""
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        num_fields = len(LossComponents.FIELDS)
        means = LossComponents.from_vector(totals[:num_fields]).means()
        count = means["num_tokens"]
        if count == 0:
            return None
        aux, aux_term = (totals[num_fields:] / count).tolist()
        means["aux_loss"], means["objective"] = aux, means["loss"] + aux_term
        return means

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Report the token-weighted objective as `loss` (and `train_loss`), with NLL, perplexity, penalty, alpha,
        confidence, accuracy and the MoE `aux_loss` beside it, so that on every line
        ``loss == nll + smoothing_penalty + router_aux_loss_coef * aux_loss``.

        `Trainer` logs the mean of per-step losses, which weights steps equally whatever their token counts. Called
        on every rank at logging steps; the sums are all-reduced here, over all tokens of all ranks since the
        previous log.
        """
        if "loss" in logs and self._train_parts is not None:
            totals, self._train_parts = self._train_parts, None
            means = self._train_means(totals)
            if means is None:
                self._warn_empty("training logging window")
            logs.update(
                train_window_logs(
                    means,
                    alpha=self.smoothing_args.alpha_for_state(self.state, last_step=True),
                )
            )
            logs["num_tokens"] = self._num_tokens()
            if totals[len(LossComponents.FIELDS):].abs().sum() > 0 or self._has_router_aux():
                logs["aux_loss"] = float("nan") if means is None else means["aux_loss"]
        if "train_loss" in logs and self._run_parts is not None:
            means = self._train_means(self._run_parts)
            logs["train_loss"] = float("nan") if means is None else means["objective"]
        super().log(logs, start_time)

    def _has_router_aux(self) -> bool:
        config = getattr(unwrap_model(self.model), "config", None)
        return bool(getattr(config, "output_router_logits", False))

    def _warn_empty(self, what: str) -> None:
        if what not in self._warned_empty:
            warnings.warn(
                f"hf_smooth: a whole {what} scored no token (every label is ignore_index="
                f"{self.smoothing_args.smoothing_ignore_index}); its loss and metrics are reported as NaN. Check the "
                "collator's label masking (prompt masking, truncation, padding).",
                stacklevel=3,
            )
            self._warned_empty.add(what)

    # ---- evaluation ----------------------------------------------------------------------------------------------

    def _record_eval_batch(self, logits: torch.Tensor, targets: torch.Tensor, token_loss: torch.Tensor) -> None:
        if self._eval_accumulator is None:
            return
        from .metrics import sequence_statistics

        self._pending_eval_stats = sequence_statistics(
            logits.detach(),
            targets,
            token_loss.detach(),
            ignore_index=self.smoothing_args.smoothing_ignore_index,
            layout=self._eval_accumulator.layout,
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self._pending_eval_stats = None
        has_labels = "labels" in inputs or "shift_labels" in inputs
        generate = bool(getattr(self.args, "predict_with_generate", False)) and not prediction_loss_only
        if has_labels and generate:
            # Seq2SeqTrainer's generation path scores the batch with the model's own loss; score it here with
            # hf_smooth (teacher-forced, same as training) and keep the generated tokens from the parent.
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, _compat.prepare_inputs(self, inputs)).detach()
            # The parent hands the batch to generate(): the weights are the loss's, never a model input.
            model_inputs = {key: value for key, value in inputs.items() if key != "loss_weights"}
            _, generated, labels = super().prediction_step(
                model, model_inputs, prediction_loss_only, ignore_keys=ignore_keys
            )
            result = (loss, generated, labels)
        else:
            result = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        if self._eval_accumulator is not None and has_labels:
            stats, self._pending_eval_stats = self._pending_eval_stats, None
            if stats is None:
                raise RuntimeError("prediction_step did not go through compute_loss; cannot collect eval metrics.")
            if self.accelerator.num_processes > 1:
                # The per-token pairs are (B, T, 2) with T the longest row of this rank's batch: pad them to one
                # width (PAD_VALUE rows are dropped by add) or all_gather fails on mismatched sizes. `sums` has
                # the same width on every rank and is left alone.
                from .metrics import PAD_VALUE

                stats = self.accelerator.pad_across_processes(stats, dim=1, pad_index=PAD_VALUE)
            # gather_for_metrics drops the samples the distributed sampler duplicated to even out the last batch,
            # so a 2-process evaluation sums exactly the same samples as a 1-process one.
            gathered = self.accelerator.gather_for_metrics(stats)
            z_rows = gathered.pop("z_loss", None)
            if z_rows is not None:  # every rank gathered the same rows: no reduce at the end
                self._eval_z_loss += z_rows.sum(dim=0).to(self._eval_z_loss.device)
            self._eval_accumulator.add(gathered)
        return result

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        from .metrics import TokenMetrics

        self._eval_accumulator = TokenMetrics(
            num_bins=self.smoothing_args.smoothing_ece_bins,
            diagnostics=self.smoothing_args.smoothing_eval_diagnostics,
        )
        if isinstance(self, Seq2SeqTrainer):
            _compat.gather_generations_once(self)  # BLEU over each evaluation pair once under DDP
        z_loss_on = self.smoothing_args.smoothing_z_loss > 0
        self._eval_z_loss = torch.zeros(2, dtype=torch.float64, device=self.accelerator.device) if z_loss_on else None
        try:
            output = super().evaluation_loop(
                dataloader,
                description,
                prediction_loss_only=prediction_loss_only,
                ignore_keys=ignore_keys,
                metric_key_prefix=metric_key_prefix,
            )
            accumulator = self._eval_accumulator
        finally:
            self._eval_accumulator = None
        self.eval_token_metrics = accumulator
        if accumulator.num_tokens == 0:
            if f"{metric_key_prefix}_loss" in output.metrics:
                self._warn_empty(f"evaluation ({metric_key_prefix})")
                output.metrics[f"{metric_key_prefix}_loss"] = float("nan")
        else:
            results = accumulator.compute()
            # Token-weighted over the whole set (Trainer's eval_loss is a mean of per-batch means).
            output.metrics[f"{metric_key_prefix}_loss"] = results.pop("loss")
            results["smoothing_alpha"] = self.smoothing_alpha
            output.metrics.update(eval_logs(results, metric_key_prefix))
        if self._eval_z_loss is not None:
            z_sum, count = self._eval_z_loss.tolist()
            output.metrics[f"{metric_key_prefix}_z_loss"] = z_sum / count if count else float("nan")
            self._eval_z_loss = None
        return output


class SmoothTrainer(SmoothLossMixin, Trainer):
    """`transformers.Trainer` whose loss is label smoothing / MaxSup / CE computed exactly by hf_smooth."""


class SmoothSeq2SeqTrainer(SmoothLossMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` whose loss is computed by hf_smooth; generation and BLEU work as usual."""
