"""What the trainer tests share: the per-example oracle of one SGD step, the tiny runs it is compared with, and the
checks that the fused path really ran.

The oracle (`oracle_token_losses`, `reference_step`) is independent of hf_smooth's maths: each example is run alone
(no padding), its per-token losses come from PyTorch's own F.cross_entropy (label smoothing) or the naive MaxSup
formula in float64, summed over the global batch and divided by its token count, then one SGD step by hand.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from collator_data import collator_features, make_collator, tiny_tokenizer
from tiny_models import BUILDERS, SEQ2SEQ, ListDataset, PadCollator, causal_examples, seq2seq_examples
from transformers import TrainingArguments

from hf_smooth import SmoothSeq2SeqTrainer, SmoothSeq2SeqTrainingArguments, SmoothTrainer, SmoothTrainingArguments
from hf_smooth.modeling import unwrap_model

METHODS = ["none", "label_smoothing", "maxsup"]
ALPHA = 0.1
LR = 1.0

# Every training-log key hf_smooth adds; the fused path must report the same numbers as the materialized one.
SMOOTH_LOG_KEYS = ["loss", "nll", "ppl", "smoothing_penalty", "smoothing_alpha", "top1_prob", "mean_token_accuracy",
                   "logit_gap", "num_tokens_scored", "num_tokens"]


# ---- the oracle --------------------------------------------------------------------------------------------------


def oracle_token_losses(logits: torch.Tensor, targets: torch.Tensor, method: str, alpha: float) -> torch.Tensor:
    """Per-token losses of the scored positions, float64, from PyTorch's own CE (independent of hf_smooth)."""
    keep = targets != -100
    z, y = logits[keep].double(), targets[keep]
    if method == "label_smoothing":
        return F.cross_entropy(z, y, label_smoothing=alpha, reduction="none")
    ce = F.cross_entropy(z, y, reduction="none")
    if method == "maxsup":
        return ce + alpha * (z.max(dim=-1).values - z.mean(dim=-1))
    return ce


def example_logits_and_targets(model, name: str, example: dict):
    ids = torch.tensor([example["input_ids"]])
    labels = torch.tensor([example["labels"]])
    if name in SEQ2SEQ:
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model(input_ids=ids, decoder_input_ids=decoder_input_ids).logits
        return logits[0], labels[0]
    logits = model(input_ids=ids).logits
    return logits[0, :-1], labels[0, 1:]


def reference_step(model, name: str, examples: list, method: str, alpha: float = ALPHA):
    """One SGD step on sum(per-token loss) / (token count) over all examples; returns the new parameters."""
    model = copy.deepcopy(model)
    model.train()
    total, count = 0.0, 0
    for example in examples:
        logits, targets = example_logits_and_targets(model, name, example)
        losses = oracle_token_losses(logits, targets, method, alpha)
        total = total + losses.sum()
        count += losses.numel()
    loss = total / count
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    return {k: v.detach() for k, v in model.named_parameters()}, loss.item()


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---- tiny runs ---------------------------------------------------------------------------------------------------


def training_args(tmp_path, bs: int, ga: int, method: str, seq2seq: bool = False, **extra):
    defaults = dict(
        output_dir=str(tmp_path / f"run_{bs}x{ga}"), per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
        max_steps=1, learning_rate=LR, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
        smoothing_method=method, smoothing_alpha=ALPHA if method != "none" else 0.1,
    )
    defaults.update(extra)
    return (SmoothSeq2SeqTrainingArguments if seq2seq else SmoothTrainingArguments)(**defaults)


def smooth_trainer(name, bs, ga, method, tmp_path, examples=None, *, model=None, data_collator=None, **extra):
    """SmoothTrainer (SmoothSeq2SeqTrainer for an encoder-decoder `name`) on `examples` (4 of the model's kind by
    default) with `training_args(tmp_path, bs, ga, method, **extra)`; a fresh tiny model unless `model` is given."""
    model = model if model is not None else BUILDERS[name](0)
    examples = examples or (seq2seq_examples(4) if name in SEQ2SEQ else causal_examples(4))
    trainer_cls = SmoothSeq2SeqTrainer if name in SEQ2SEQ else SmoothTrainer
    return trainer_cls(
        model=model, args=training_args(tmp_path, bs, ga, method, seq2seq=name in SEQ2SEQ, **extra),
        train_dataset=ListDataset(examples), data_collator=data_collator or PadCollator(),
    )


def train_once(name, bs, ga, method, tmp_path, examples=None, **kwargs):
    """`smooth_trainer(...)` trained; returns the trained parameters and the trainer."""
    trainer = smooth_trainer(name, bs, ga, method, tmp_path, examples, **kwargs)
    model = trainer.model
    trainer.train()
    return params_of(model), trainer


class RecordBatches:
    """Keeps every micro-batch the trainer fetched (as the collator returned it) and the count of each step; set
    `seen_batches` and `step_counts` to empty lists before training."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.seen_batches.extend(batches)
        self.step_counts.append(count)
        return batches, count


class RecordingSmoothTrainer(RecordBatches, SmoothTrainer):
    pass


class RecordingSmoothSeq2SeqTrainer(RecordBatches, SmoothSeq2SeqTrainer):
    pass


def train_with_collator(name, kind, bs, ga, method, fused, tmp_path, examples):
    """A run fed by transformers' collator of `kind` (tests/collator_data.py), recording its batches; with `fused`,
    checked to have taken the fused path. Returns the trained parameters and the trainer."""
    model = BUILDERS[name](0)
    tokenizer = tiny_tokenizer()
    seq2seq = name in SEQ2SEQ
    trainer_cls = RecordingSmoothSeq2SeqTrainer if seq2seq else RecordingSmoothTrainer
    trainer = trainer_cls(
        model=model,
        args=training_args(tmp_path, bs, ga, method, seq2seq=seq2seq, smoothing_fused_loss=fused),
        train_dataset=ListDataset(collator_features(kind, examples)),
        data_collator=make_collator(kind, tokenizer, model),
        processing_class=tokenizer,
    )
    trainer.seen_batches, trainer.step_counts = [], []
    train_checking_fused(trainer, model, fused)
    return params_of(model), trainer


def smooth_log(log_history: list[dict]) -> dict:
    """The one training log that carries hf_smooth's keys, in the log history of a run of one optimizer step."""
    (log,) = [entry for entry in log_history if "nll" in entry]
    return log


# ---- activation checkpointing, as the installed transformers spells it ------------------------------------------

# transformers 5.23 renamed gradient_checkpointing (TrainingArguments, PreTrainedModel.is_gradient_checkpointing) to
# activation_checkpointing and kept the old names as deprecated aliases; the floor (5.19) has only the old ones.
CHECKPOINTING = (
    "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


def checkpointing_args() -> dict:
    """Training arguments that turn activation checkpointing on (non-reentrant), in the installed spelling."""
    return {CHECKPOINTING: True, f"{CHECKPOINTING}_kwargs": {"use_reentrant": False}}


def is_checkpointing(model) -> bool:
    """Whether activation checkpointing is on for `model` (unwrapped), in the installed spelling."""
    return getattr(unwrap_model(model), f"is_{CHECKPOINTING}")


# ---- the fused path ran (smoothing_fused_loss=True) -------------------------------------------------------------


def is_fallback_warning(message) -> bool:
    # fused_trainer: "falls back to materialized logits"; fused (output layer it cannot fold): "falling back to ..."
    return "falls back" in str(message) or "falling back" in str(message)


class LogitLengths:
    """Sequence length of the logits the model returns: 1 when the fused path runs (logits_to_keep=1: the loss
    projects the hidden states itself, so no B x T x V logits exist). Hooks the model, not the output layer: a hook
    on the output layer makes the fused loss fall back (it would bypass the hook)."""

    def __init__(self, model):
        self.lengths = []
        base = unwrap_model(model)
        self.handle = base.register_forward_hook(lambda _m, _args, out: self.lengths.append(out.logits.shape[-2]))


def assert_fused_ran(trainer, logit_lengths: LogitLengths, caught) -> None:
    assert trainer.fused_loss_active, "the fused path never ran"
    assert logit_lengths.lengths and set(logit_lengths.lengths) == {1}, logit_lengths.lengths
    fallbacks = [str(w.message) for w in caught if is_fallback_warning(w.message)]
    assert not fallbacks, fallbacks


def train_checking_fused(trainer, model, fused: bool) -> None:
    """`trainer.train()` (warnings recorded); with `fused`, then assert that the fused path ran on every forward of
    `model` and never fell back."""
    lengths = LogitLengths(model) if fused else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    if fused:
        lengths.handle.remove()
        assert_fused_ran(trainer, lengths, caught)
