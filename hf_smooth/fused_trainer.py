"""Routing a Trainer's training step through the fused linear loss (`hf_smooth.fused`).

The model is still called through its (possibly DDP-wrapped) forward, so gradient synchronization, gradient
checkpointing and PEFT injection behave as usual. Two things change:

- ``logits_to_keep=1``: the model projects only the last position to the vocabulary (B x 1 x V instead of
  B x T x V);
- a forward hook on the backbone (``model.base_model``) captures the final hidden states, which the fused loss
  projects chunk by chunk with the output layer's weight.

Whatever a model does between its backbone and its logits must be reproduced (`hf_smooth.fused.OutputHead`): bias,
LoRA on the output layer, ``logit_scale`` (Cohere), ``logits_scaling`` (Granite) and ``final_logit_softcapping``
(Gemma 2) are; the first fused step checks the reconstruction against the model's own last-position logits and
refuses to continue on a mismatch, so an unknown head fails loudly instead of training the wrong objective.

Mixed precision: accelerate's autocast wraps ``model.forward`` only, so the loss, computed after the forward
returns, would run outside it. The hook records the autocast state the backbone ran under, and the projection (and
the reconstruction check) run under that same state: the projection in the autocast dtype, like the model's own
``lm_head``, the reductions in float32 (`hf_smooth.fused`).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .modeling import align_targets, align_weights, is_encoder_decoder, unwrap_model

__all__ = ["FusedRoute", "fused_unsupported_reason"]


def fused_unsupported_reason(trainer, model: nn.Module) -> str | None:
    """Why the fused path cannot run for this trainer/model, or None when it can."""
    base = unwrap_model(model)
    if is_encoder_decoder(base):
        return "encoder-decoder models are scored on materialized logits"
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP shards the output weight outside the forward"
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
            return "DeepSpeed ZeRO-3 partitions the output weight outside the forward"
    if not hasattr(base, "get_output_embeddings") or base.get_output_embeddings() is None:
        return f"{type(base).__name__} has no output embeddings"
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no logits_to_keep"
    backbone = getattr(base, "base_model", None)
    if backbone is None or backbone is base:
        return f"{type(base).__name__} has no separate backbone (base_model_prefix)"
    return None


def _hidden_of(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "last_hidden_state"):
        return output["last_hidden_state"] if isinstance(output, dict) else output.last_hidden_state
    return output[0]


def _logits_of(outputs) -> torch.Tensor:
    return outputs["logits"] if isinstance(outputs, dict) else outputs[0]


class FusedRoute:
    """The fused training forward of one model, decided once when the trainer first trains it.

    Attributes:
        reason (`str` or `None`): why the fused path cannot run (the trainer then warns once and uses the
            materialized logits), or None.
        steps (`int`): fused forwards run so far.
    """

    def __init__(self, trainer, model: nn.Module):
        self.base = unwrap_model(model)
        self.reason = fused_unsupported_reason(trainer, model)
        self.steps = 0

    def __call__(self, model, inputs, labels, shift_labels, knobs, num_items_in_batch, *, shift, ignore_index,
                 chunk_size, weights=None):
        """One training forward scored by the fused loss: ``(loss, LossComponents, outputs)``."""
        from .fused import LogitTransform, OutputHead

        captured = {}

        def capture(_module, _args, output):
            captured["hidden"] = _hidden_of(output)
            device_type = captured["hidden"].device.type
            captured["autocast"] = (device_type, torch.get_autocast_dtype(device_type),
                                    torch.is_autocast_enabled(device_type))

        handle = self.base.base_model.register_forward_hook(capture)
        try:
            outputs = model(**inputs, logits_to_keep=1)
        finally:
            handle.remove()
        hidden = captured["hidden"]
        # Read each step: PEFT may have wrapped the output layer since the route was built.
        head = OutputHead(self.base.get_output_embeddings(), LogitTransform.from_config(self.base.config))
        device_type, autocast_dtype, autocast_on = captured["autocast"]
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            if self.steps == 0:
                head.check(_logits_of(outputs)[:, -1:, :], hidden[:, -1:, :])
            targets = align_targets(
                labels, shift_labels, shift=shift, sequence_length=hidden.shape[-2], ignore_index=ignore_index
            ).to(hidden.device)
            shifted = shift_labels is not None
            weights = align_weights(
                weights, shift_labels if shifted else labels, shifted_labels=shifted, shift=shift,
                sequence_length=hidden.shape[-2],
            )
            loss, parts = head.loss(
                hidden, targets, **knobs, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
                chunk_size=chunk_size, return_components=True,
                weights=None if weights is None else weights.to(hidden.device),
            )
        self.steps += 1
        return loss, parts, outputs
