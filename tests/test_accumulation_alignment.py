"""Port of transformers' `test_gradient_accumulation_loss_alignment_with_model_loss` (and its `_with_loss_func`
sibling) from tests/trainer/test_trainer.py, to a tiny offline Llama and a tokenizer built in code.

Upstream: 40 wikitext lines tokenized to max_length 16 (padding="max_length", pad = eos), transformers'
`DataCollatorForLanguageModeling(mlm=False)`, 5 AdamW steps at lr 3e-4 logging every step; per-device batch 8 x GA 1
against 4 x 2. The logged loss curves must agree (max |difference| < 0.01), while a "broken" run whose loss is not
normalized by the token count of the accumulation window must be far off (> 0.7), which shows the check can fail.

Here the same for `SmoothTrainer` (none / label smoothing / MaxSup, fused and unfused) and for `SmoothedLoss` as a
plain Trainer's `compute_loss_func`, with upstream's bound and stronger ones, since hf_smooth's normalization is
exact rather than approximate: the curves agree to 1e-5, and the first step's logged loss and `grad_norm` equal the
per-example float64 oracle of tests/trainer_helpers.py on the rows of the first global batch.

The broken control differs from upstream's. hf_smooth logs the token-weighted objective from its own sums (issue
10.7), so a normalization bug no longer shows in the logged loss of the same step; it shows in the gradient, i.e. in
the logged `grad_norm` (about GA x too large), and in the loss curve only through the later parameters, slightly,
since AdamW is nearly invariant to the scale of the gradient. The broken runs reproduce the bug of issue 10.1 (no
token count handed to the loss, so every micro-batch is averaged over itself): their `grad_norm` curve is far off and
their loss curve breaks the 1e-5 bound, which shows that these checks can fail.
"""

from __future__ import annotations

import pytest
import torch
from collator_data import tiny_tokenizer, word
from tiny_models import BUILDERS, VOCAB
from trainer_helpers import ALPHA, METHODS, oracle_token_losses, train_checking_fused
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments, set_seed

from hf_smooth import SmoothedLoss, SmoothTrainer, SmoothTrainingArguments

MAX_LENGTH = 16
NUM_ROWS = 40
ARGS = dict(logging_steps=1, max_steps=5, learning_rate=3e-4, disable_tqdm=True, report_to=[], use_cpu=True, seed=42)
BASE = dict(per_device_train_batch_size=8, gradient_accumulation_steps=1)
ACCUMULATED = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2)
GLOBAL_BATCH = 8


class StoreLossCallback(TrainerCallback):
    """As upstream: the logged training loss of every logging step; and its gradient norm (before clipping)."""

    def __init__(self):
        self.losses, self.grad_norms = [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])
            self.grad_norms.append(logs["grad_norm"])


def wikitext_like_lines(n: int = NUM_ROWS, seed: int = 0) -> list[str]:
    """Lines of 0 to 24 words: some empty (wikitext's blank lines: rows with nothing to score), some truncated."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        length = int(torch.randint(0, 25, (1,), generator=g))
        if int(torch.randint(0, 4, (1,), generator=g)) == 0:
            length = 0
        lines.append(" ".join(word(int(i)) for i in torch.randint(3, VOCAB, (length,), generator=g)))
    return lines


def tokenized_dataset():
    import datasets

    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # as upstream (tinyllama has no pad token)
    dataset = datasets.Dataset.from_dict({"text": wikitext_like_lines()})

    def tokenize_function(examples):
        return tokenizer(examples["text"], max_length=MAX_LENGTH, padding="max_length", truncation=True)

    return tokenizer, dataset.map(tokenize_function, batched=True, remove_columns=dataset.column_names)


class RecordingCollator:
    """transformers' collator, keeping the features of every micro-batch in the order the trainer drew them."""

    def __init__(self, collator):
        self.collator = collator
        self.features = []

    def __call__(self, features):
        self.features.extend(features)
        return self.collator(features)


def oracle_first_step(features: list[dict], pad_id: int, method: str) -> tuple[float, float]:
    """Objective and gradient norm of the first optimizer step at the initial parameters: each row alone (no
    padding), float64 per-token losses (tests/trainer_helpers.py's oracle), summed over the global batch / its scored
    tokens."""
    model = BUILDERS["llama"](0)
    total, count = 0.0, 0
    for feature in features[:GLOBAL_BATCH]:
        length = sum(feature["attention_mask"])
        ids = torch.tensor(feature["input_ids"][:length])
        labels = ids.masked_fill(ids == pad_id, -100)  # DataCollatorForLanguageModeling's rule
        if length < 2:
            continue
        logits = model(input_ids=ids[None]).logits[0, :-1]
        losses = oracle_token_losses(logits, labels[1:], method, ALPHA)
        total = total + losses.sum()
        count += losses.numel()
    assert count > 0
    loss = total / count
    loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None))
    return loss.item(), grad_norm.item()


class UncountedSmoothTrainer(SmoothTrainer):
    """The bug of issue 10.1: no token count for the accumulation window, so each micro-batch is its own mean."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        return batches, None


def run_smooth_trainer(tmp_path, split: dict, method: str, fused: bool, trainer_cls=SmoothTrainer):
    tokenizer, dataset = tokenized_dataset()
    collator = RecordingCollator(DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False))
    args = SmoothTrainingArguments(
        str(tmp_path), **ARGS, **split, smoothing_method=method, smoothing_alpha=ALPHA, smoothing_fused_loss=fused
    )
    set_seed(42)
    callback = StoreLossCallback()
    model = BUILDERS["llama"](0)
    trainer = trainer_cls(model, args, train_dataset=dataset, callbacks=[callback], data_collator=collator)
    train_checking_fused(trainer, model, fused)
    return callback, collator.features, tokenizer.pad_token_id


def run_smoothed_loss(tmp_path, split: dict, method: str, broken: bool = False):
    tokenizer, dataset = tokenized_dataset()
    collator = RecordingCollator(DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False))
    args = TrainingArguments(str(tmp_path), **ARGS, **split)
    loss = SmoothedLoss(smoothing_method=method, smoothing_alpha=ALPHA)

    def without_count(outputs, labels, num_items_in_batch=None):  # upstream's disable_num_items_in_batch=True
        return loss(outputs, labels, num_items_in_batch=None)

    compute_loss_func = without_count if broken else loss
    set_seed(42)
    callback = StoreLossCallback()
    trainer = Trainer(
        BUILDERS["llama"](0), args, train_dataset=dataset, callbacks=[loss, callback], data_collator=collator,
        compute_loss_func=compute_loss_func,
    )
    trainer.train()
    return callback, collator.features, tokenizer.pad_token_id


def check_alignment(base, accumulated, method):
    """Upstream's assertion, then hf_smooth's stronger ones (exact up to float32 round-off, equal to the oracle)."""
    (base_log, base_features, pad_id), (ga_log, ga_features, _) = base, accumulated
    assert len(base_log.losses) == len(ga_log.losses) == ARGS["max_steps"]
    diff_truth = [abs(b - g) for b, g in zip(base_log.losses, ga_log.losses)]
    assert max(diff_truth) < 0.01, f"Difference {max(diff_truth)} is not within 0.01"
    assert max(diff_truth) < 1e-5, diff_truth
    assert ga_log.grad_norms == pytest.approx(base_log.grad_norms, rel=1e-4)
    # both runs drew the same rows for the first optimizer step (same seed), and logged the oracle's numbers
    first_rows = [[f["input_ids"] for f in features[:GLOBAL_BATCH]] for features in (base_features, ga_features)]
    assert first_rows[0] == first_rows[1]
    assert any(sum(f["attention_mask"]) == 0 for f in base_features)  # the premise: rows with nothing to score
    expected_loss, expected_grad_norm = oracle_first_step(base_features, pad_id, method)
    for log in (base_log, ga_log):
        assert log.losses[0] == pytest.approx(expected_loss, rel=1e-5)
        assert log.grad_norms[0] == pytest.approx(expected_grad_norm, rel=1e-4)


SMOOTH_CASES = [(method, fused) for method in METHODS for fused in [False, True]]
assert len(SMOOTH_CASES) == 6


@pytest.mark.parametrize("method,fused", SMOOTH_CASES)
def test_gradient_accumulation_loss_alignment_smooth_trainer(method, fused, tmp_path):
    base = run_smooth_trainer(tmp_path / "base", BASE, method, fused)
    accumulated = run_smooth_trainer(tmp_path / "ga", ACCUMULATED, method, fused)
    check_alignment(base, accumulated, method)


@pytest.mark.parametrize("method", METHODS)
def test_gradient_accumulation_loss_alignment_smoothed_loss(method, tmp_path):
    base = run_smoothed_loss(tmp_path / "base", BASE, method)
    accumulated = run_smoothed_loss(tmp_path / "ga", ACCUMULATED, method)
    check_alignment(base, accumulated, method)


def broken_gap(base: StoreLossCallback, broken: StoreLossCallback) -> tuple[float, float]:
    loss_gap = max(abs(b - g) for b, g in zip(base.losses, broken.losses))
    grad_gap = max(abs(g / b - 1) for b, g in zip(base.grad_norms, broken.grad_norms))
    return loss_gap, grad_gap


def test_broken_normalization_is_detected(tmp_path):
    """The control: without the window's token count (issue 10.1) the checks above fail."""
    base, _, _ = run_smooth_trainer(tmp_path / "base", BASE, "maxsup", False)
    broken, _, _ = run_smooth_trainer(tmp_path / "broken", ACCUMULATED, "maxsup", False, UncountedSmoothTrainer)
    loss_gap, grad_gap = broken_gap(base, broken)
    assert loss_gap > 1e-5 and grad_gap > 0.5, (loss_gap, grad_gap)

    base, _, _ = run_smoothed_loss(tmp_path / "loss_base", BASE, "maxsup")
    broken, _, _ = run_smoothed_loss(tmp_path / "loss_broken", ACCUMULATED, "maxsup", broken=True)
    loss_gap, grad_gap = broken_gap(base, broken)
    assert loss_gap > 1e-5 and grad_gap > 0.5, (loss_gap, grad_gap)
