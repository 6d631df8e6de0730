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

Sharded models: under FSDP2 the output weight is the gathered one right after the forward, or is gathered again
(`unshard_output_layer`), and the loss's gradient reaches FSDP2's reduce-scatter through autograd like the layer's
own. FSDP version 1 and DeepSpeed ZeRO-3 are refused with the reason (`fused_unsupported_reason`); ZeRO-2 keeps whole
weights and needs nothing. Tested on CPU with 2 gloo ranks (tests/test_fsdp2.py).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .modeling import align_targets, align_weights, is_encoder_decoder, unwrap_model

__all__ = ["FusedRoute", "fused_unsupported_reason", "unshard_output_layer"]


def fused_unsupported_reason(trainer, model: nn.Module) -> str | None:
    """Why the fused path cannot run for this trainer/model, or None when it can."""
    base = unwrap_model(model)
    if is_encoder_decoder(base):
        return "encoder-decoder models are scored on materialized logits"
    if getattr(trainer, "is_fsdp_enabled", False) and not _is_fsdp2(trainer):
        return (
            "FSDP version 1 holds the output weight in a flattened shard outside the forward; use FSDP2 "
            "(fsdp_version: 2, recipes/configs/fsdp2.yaml), where the fused loss runs"
        )
    if _is_zero3(trainer, base):
        # Gathering the weight for the loss (deepspeed.zero.GatheredParameters) is not enough: ZeRO-3 partitions it
        # again when the context exits, and in the backward autograd accumulates the fused loss's (V, H) gradient
        # against the parameter's current, empty shape ("The size of tensor a (0) must match the size of tensor b",
        # reproduced on CPU with deepspeed 0.19.8). The layer's own backward works because ZeRO-3 gathers it again
        # first, from a hook on the layer's output, which the fused loss does not use.
        return (
            "DeepSpeed ZeRO-3 partitions the output weight again after the forward, before the backward that "
            "accumulates the fused loss's gradient into it; use FSDP2 (recipes/configs/fsdp2.yaml) or ZeRO-2 to run "
            "the fused loss"
        )
    if not hasattr(base, "get_output_embeddings") or base.get_output_embeddings() is None:
        return f"{type(base).__name__} has no output embeddings"
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no logits_to_keep"
    backbone = getattr(base, "base_model", None)
    if backbone is None or backbone is base:
        return f"{type(base).__name__} has no separate backbone (base_model_prefix)"
    return None


def _is_fsdp2(trainer) -> bool:
    # `Accelerator.is_fsdp2` (accelerate 1.15), else the plugin's `fsdp_version`; neither: FSDP version 1.
    accelerator = trainer.accelerator
    if hasattr(accelerator, "is_fsdp2"):
        return bool(accelerator.is_fsdp2)
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return getattr(plugin, "fsdp_version", 1) == 2


def _zero3_partitioned(module: nn.Module) -> bool:
    # DeepSpeed ZeRO-3 marks every parameter it partitions with a `ds_id` (deepspeed 0.19).
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _is_zero3(trainer, model: nn.Module) -> bool:
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
            return True
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return output_layer is not None and _zero3_partitioned(output_layer)


def unshard_output_layer(module: nn.Module) -> None:
    """FSDP2: make sure the output layer's parameters are the gathered (unsharded) ones, as in its forward.

    The fused loss runs right after the model's forward, on the weights its output layer used there. Under FSDP2
    (`fully_shard`) those are still gathered when the layer belongs to the root module (the root never reshards after
    its forward) or to a group with ``reshard_after_forward=False`` (accelerate >= 1.15 shards [final norm, output
    layer] as one such group). A wrapping that reshards the output layer after its forward leaves DTensor shards
    instead: gather them again with FSDP2's public ``FSDPModule.unshard()``, the all-gather its forward runs. Either
    way the loss's gradient reaches the gathered parameter through autograd, exactly as the layer's own would, and
    FSDP2's post-backward reduce-scatters it into the sharded parameter and reshards (its end-of-backward callback
    runs the post-backward of every group, also of one whose outputs the loss did not use; read in torch 2.13).
    ``DTensor.full_tensor()`` on the shards (TRL's fused head does that) is not used: its backward keeps each rank's
    slice of that rank's own gradient, which never reaches FSDP2's reduce-scatter, so the sharded gradient is neither
    averaged nor summed over ranks (measured with torch 2.13 and 2 gloo ranks).
    """
    if not any(type(p).__name__ == "DTensor" for p in module.parameters()):
        return
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.unshard()


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
        steps (`int`): training forwards scored by the fused loss so far.
        head_fallback (`str` or `None`): why the last forward's output layer could not be fused (`OutputHead.loss`
            warned and scored materialized logits; such a forward is not counted in `steps`), or None.
    """

    def __init__(self, trainer, model: nn.Module):
        self.base = unwrap_model(model)
        self.reason = fused_unsupported_reason(trainer, model)
        self.steps = 0
        self.head_fallback = None
        self._checked = False

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
        output_layer = self.base.get_output_embeddings()
        head = OutputHead(output_layer, LogitTransform.from_config(self.base.config))
        device_type, autocast_dtype, autocast_on = captured["autocast"]
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            if not self._checked:
                head.check(_logits_of(outputs)[:, -1:, :], hidden[:, -1:, :])
                self._checked = True
            targets = align_targets(
                labels, shift_labels, shift=shift, sequence_length=hidden.shape[-2], ignore_index=ignore_index
            ).to(hidden.device)
            shifted = shift_labels is not None
            weights = align_weights(
                weights, shift_labels if shifted else labels, shifted_labels=shifted, shift=shift,
                sequence_length=hidden.shape[-2],
            )
            unshard_output_layer(output_layer)  # after the check, whose call of the layer may reshard it again
            loss, parts = head.loss(
                hidden, targets, **knobs, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
                chunk_size=chunk_size, return_components=True,
                weights=None if weights is None else weights.to(hidden.device),
            )
        self.head_fallback = head.fallback_reason
        self.steps += head.fallback_reason is None
        return loss, parts, outputs
