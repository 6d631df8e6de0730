"""`SmoothSFTTrainer`: TRL's `SFTTrainer` whose loss is label smoothing / MaxSup / CE computed by hf_smooth.

    from hf_smooth import SmoothSFTTrainer      # imports trl on first use (pip install "hf_smooth[trl]")

Everything TRL does before the loss stays TRL's: dataset preparation, chat templates, completion-only
(``completion_only_loss``) and assistant-only (``assistant_only_loss``) label masks, padding-free and packed batches
(``position_ids``, the first token of each packed sequence masked), PEFT wrapping, model-card tags. The loss is
`SmoothLossMixin.compute_loss`: labels popped, the model called once, the scored tokens counted exactly over the
accumulation window and the processes, optionally the fused path (`smoothing_fused_loss`). TRL's own loss path (its
fused LM head, ``compute_loss_func``, ``label_smoothing_factor``) never runs, so nothing is computed twice.

TRL's training metrics keep their names and meanings:

- ``mean_token_accuracy`` and ``entropy``: over the tokens the loss scores (labels != -100 after the shift), as in
  TRL >= 1.16; logged by the mixin from hf_smooth's loss components, so they exist on the fused path too, where no
  logits are materialized. TRL averages per-micro-batch ratios over a logging window; hf_smooth weights every scored
  token equally (the same when the micro-batches score equally many tokens). TRL 1.0 took the entropy over all
  non-padding tokens, prompts included.
- ``num_tokens``: as TRL counts it, the input tokens trained on so far over all processes (the attention mask, prompts
  included; a padding-free batch's flattened length), not only the scored ones (those are ``num_tokens_scored`` per
  logging window); counted by the mixin, so `SmoothTrainer` logs the same. It continues from the last logged value
  when training resumes from a checkpoint.
- ``aux_loss`` (mixture-of-experts): the mixin adds ``router_aux_loss_coef * aux_loss`` once, weighted by each
  micro-batch's share of the scored tokens; the model never adds it (it gets no labels), nor does TRL (its
  ``compute_loss`` is not called). ``output_router_logits=True`` is requested per call as TRL does, for the
  vision-language wrappers that honour it only as a forward argument.

Written against trl 1.0 (the floor) and 1.16.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import torch
from torch import nn

if importlib.util.find_spec("trl") is None:
    raise ImportError('SmoothSFTTrainer needs TRL, which is not installed: pip install "hf_smooth[trl]"')

from trl import SFTTrainer  # noqa: E402

from .trainer import SmoothLossMixin  # noqa: E402

__all__ = ["SmoothSFTTrainer"]


class SmoothSFTTrainer(SmoothLossMixin, SFTTrainer):
    """`trl.SFTTrainer` whose loss is computed by hf_smooth; takes the smoothing configuration as `SmoothTrainer`
    does (``smoothing_args=SmoothingArguments(...)``; the `SFTConfig` keeps TRL's own options)."""

    def __init__(self, *args, **kwargs):
        # TRL's other losses (loss_type="dft") live in SFTTrainer.compute_loss, which never runs here. Checked before
        # SFTTrainer.__init__, which turns "dft" into a compute_loss_func in trl 1.0.
        config = kwargs["args"] if "args" in kwargs else args[1] if len(args) > 1 else None
        loss_type = getattr(config, "loss_type", "nll")
        if loss_type not in ("nll", "chunked_nll"):
            raise ValueError(
                f"loss_type={loss_type!r} is a TRL loss that SmoothSFTTrainer would silently not compute (hf_smooth "
                "computes the loss: smoothing_method in smoothing_args). Set loss_type='nll' in the SFTConfig, or use "
                "trl.SFTTrainer for that loss."
            )
        with warnings.catch_warnings():
            # TRL >= 1.15 warns that label_smoothing_factor is deprecated in SFTTrainer and costs an extra forward
            # pass; here the mixin takes it as hf_smooth's exact label smoothing, computed in the one forward.
            warnings.filterwarnings("ignore", message="`label_smoothing_factor` is deprecated", category=FutureWarning)
            super().__init__(*args, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        inputs = dict(inputs)
        # TRL 1.0's prediction_step marks the batch for its own compute_loss; the model must not receive the key.
        inputs.pop("_prediction_loss_only", None)
        inputs["use_cache"] = False  # as SFTTrainer.compute_loss: no KV cache in training (gradient checkpointing)
        if getattr(self, "aux_loss_enabled", False):
            inputs["output_router_logits"] = True
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
