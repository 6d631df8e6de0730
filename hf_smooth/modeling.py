"""What the trainer needs to know about a model: unwrapping, whether its logits are shifted, seq2seq inputs.

Decided from the model object itself (config, loss type, generation ability), through PEFT and DDP/compile
wrappers, because a name list alone misses PEFT-wrapped and custom classes (transformers #25044, #27161).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "unwrap_model",
    "is_encoder_decoder",
    "loss_shifts_labels",
    "shift_targets",
    "align_targets",
    "align_weights",
    "prepare_decoder_input_ids",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/FSDP/DeepSpeed and `torch.compile` wrappers (accelerate's
    `extract_model_from_parallel`) and PEFT (`get_base_model`)."""
    from accelerate.utils import extract_model_from_parallel

    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            model = model.get_base_model()
    return model


def _config(model: nn.Module):
    return getattr(unwrap_model(model), "config", None)


def is_encoder_decoder(model: nn.Module) -> bool:
    config = _config(model)
    return bool(getattr(config, "is_encoder_decoder", False))


def loss_shifts_labels(model: nn.Module) -> bool:
    """Whether the logits at position t are scored against the label at t + 1 (decoder-only language models).

    Encoder-decoder models feed right-shifted `decoder_input_ids`, so their logits are already aligned with the
    labels. A decoder-only model shifts when it is a causal LM by any of: its class is registered as a causal LM,
    its `loss_type` maps to transformers' causal-LM loss, or it can generate (custom subclasses keep these).
    Classification and masked-LM heads do not shift.
    """
    base = unwrap_model(model)
    if is_encoder_decoder(base):
        return False
    from ._compat import causal_lm_facts

    if any(causal_lm_facts(base)):
        return True
    can_generate = getattr(base, "can_generate", None)
    return bool(callable(can_generate) and can_generate())


def shift_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels aligned with unshifted causal-LM logits: ``labels[..., 1:]`` padded with `ignore_index` at the end.

    Padding the labels instead of slicing the logits keeps the logits contiguous, so the loss reads them in place
    instead of copying batch x seq x vocab values (transformers' ForCausalLMLoss does the same).
    """
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def align_targets(
    labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None,
    *,
    shift: bool,
    sequence_length: int | None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The targets the logits are scored against.

    A collator's ``shift_labels`` (padding-free/packed, context parallel) is already shifted and is used as-is, never
    shifted twice; when it is one position shorter than the logits it is padded at the end.
    """
    if shift_labels is not None:
        targets = shift_labels
        if sequence_length is not None and targets.shape[-1] + 1 == sequence_length:
            targets = F.pad(targets, (0, 1), value=ignore_index)
        return targets
    if labels is None:
        raise ValueError("No labels in the batch: SmoothTrainer needs 'labels' (or 'shift_labels') to compute a loss.")
    return shift_targets(labels, ignore_index) if shift else labels


def align_weights(
    weights: torch.Tensor | None,
    reference: torch.Tensor | None,
    *,
    shifted_labels: bool,
    shift: bool,
    sequence_length: int | None,
) -> torch.Tensor | None:
    """A batch's ``loss_weights`` aligned with the targets exactly as `align_targets` aligns the labels.

    ``loss_weights`` has the shape of the batch's ``labels`` (or of its ``shift_labels``, ``shifted_labels=True``,
    then used as-is) and weights the token at the same position; it is shifted with them for causal LMs, padded with 0
    (a weight of 0 is an ignored token). ``reference`` is the labels tensor it must match.
    """
    if weights is None:
        return None
    if reference is not None and tuple(weights.shape) != tuple(reference.shape):
        name = "shift_labels" if shifted_labels else "labels"
        raise ValueError(
            f"The batch's loss_weights {tuple(weights.shape)} must have the shape of its {name} "
            f"{tuple(reference.shape)}: one weight per label position, aligned with the labels (hf_smooth shifts "
            "both for causal LMs)."
        )
    if not weights.is_floating_point():
        weights = weights.to(torch.float32)
    if shifted_labels:
        if sequence_length is not None and weights.shape[-1] + 1 == sequence_length:
            weights = F.pad(weights, (0, 1), value=0.0)
        return weights
    return F.pad(weights[..., 1:], (0, 1), value=0.0) if shift else weights


def prepare_decoder_input_ids(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Right-shifted decoder inputs for an encoder-decoder model whose labels were popped from the batch.

    Without them T5/Marian/BART raise "You must specify exactly one of input_ids or inputs_embeds" once the labels
    are no longer passed to the model (what `DataCollatorForSeq2Seq(model=...)` would otherwise have added).
    """
    base = unwrap_model(model)
    prepare = getattr(base, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:
        raise ValueError(
            f"{type(base).__name__} is encoder-decoder but has no prepare_decoder_input_ids_from_labels; pass "
            "'decoder_input_ids' in the batch (e.g. DataCollatorForSeq2Seq(tokenizer, model=model))."
        )
    return prepare(labels=labels)
