"""Routing a Trainer's training step through the fused linear loss (`hf_smooth.fused`).

The model is still called through its (possibly DDP-wrapped) forward, so gradient synchronization, gradient
checkpointing and PEFT injection behave as usual. Two things change:

- ``logits_to_keep=1``: the model projects only the last position to the vocabulary (B x 1 x V instead of
  B x T x V);
- a forward hook on the backbone (``model.base_model``) captures the final hidden states, which the fused loss
  projects chunk by chunk with the output layer's weight.

Whatever a model does between its backbone and its logits must be reproduced here. Bias, LoRA on the output layer,
``logit_scale`` (Cohere), ``logits_scaling`` (Granite) and ``final_logit_softcapping`` (Gemma 2) are; the first
fused step checks the reconstruction against the model's own last-position logits and refuses to continue on a
mismatch, so an unknown head fails loudly instead of training the wrong objective.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from .modeling import align_targets, is_encoder_decoder, unwrap_model

__all__ = ["fused_forward_loss", "fused_unsupported_reason", "head_transform"]


def head_transform(config) -> dict:
    """Logit post-processing of known architectures, as keyword arguments of the fused loss."""
    scale = getattr(config, "logit_scale", None)
    granite = getattr(config, "logits_scaling", None)
    if granite:
        scale = (scale or 1.0) / float(granite)
    return {"logit_scale": scale, "final_logit_softcapping": getattr(config, "final_logit_softcapping", None)}


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


def _check_reconstruction(model_logits: torch.Tensor, hidden: torch.Tensor, head: nn.Module, transform: dict) -> None:
    with torch.no_grad():
        rebuilt = head(hidden[:, -1:, :]).float()
        if transform["logit_scale"] is not None:
            rebuilt = rebuilt * transform["logit_scale"]
        cap = transform["final_logit_softcapping"]
        if cap:
            rebuilt = cap * torch.tanh(rebuilt / cap)
        reference = model_logits[:, -1:, :].float()
        error = (rebuilt - reference).abs().max().item()
        scale = reference.abs().max().item() + 1e-6
    if not error <= 1e-3 * scale + 1e-4:
        raise ValueError(
            f"smoothing_fused_loss: the model's logits are not output_layer(backbone hidden states) with the known "
            f"post-processing (max abs difference {error:.3g} on the last position). This architecture transforms "
            "its hidden states or logits in a way hf_smooth.fused does not reproduce; set smoothing_fused_loss=False."
        )


def fused_forward_loss(trainer, model, inputs, labels, shift_labels, knobs, num_items_in_batch, *,
                       ignore_index, chunk_size):
    """One training forward scored by the fused loss: ``(loss, LossComponents, outputs)``, or None to fall back."""
    from .fused import fused_linear_smoothed_loss_for_module

    state = trainer._fused_state
    if state is None:
        state = trainer._fused_state = {"checked": set(), "warned": False}
    reason = fused_unsupported_reason(trainer, model)
    if reason is not None:
        if not state["warned"]:
            warnings.warn(f"smoothing_fused_loss=True falls back to materialized logits: {reason}.", stacklevel=3)
            state["warned"] = True
        return None

    base = unwrap_model(model)
    captured = {}

    def capture(_module, _args, output):
        captured["hidden"] = _hidden_of(output)

    handle = base.base_model.register_forward_hook(capture)
    try:
        outputs = model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    hidden = captured["hidden"]
    head = base.get_output_embeddings()
    transform = head_transform(base.config)
    if id(base) not in state["checked"]:
        _check_reconstruction(outputs["logits"] if isinstance(outputs, dict) else outputs[0], hidden, head, transform)
        state["checked"].add(id(base))

    targets = align_targets(
        labels, shift_labels, shift=trainer._shift(model), sequence_length=hidden.shape[-2], ignore_index=ignore_index
    ).to(hidden.device)
    loss, parts = fused_linear_smoothed_loss_for_module(
        hidden,
        head,
        targets,
        **knobs,
        **transform,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
        return_components=True,
    )
    return loss, parts, outputs
