"""SmoothTrainer / SmoothSeq2SeqTrainer: exact normalization, shifting, logging, schedule and resume.

The reference for every update is the oracle of tests/trainer_helpers.py, computed by hand: each example run alone
(no padding), its per-token losses from PyTorch's own F.cross_entropy (label smoothing) or the naive MaxSup formula,
summed over the global batch and divided by its token count, then one SGD step. The trainer must land on the same
parameters whatever the micro-batch split.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_models import BUILDERS, SEQ2SEQ, ListDataset, PadCollator, causal_examples, seq2seq_examples
from trainer_helpers import ALPHA, LR, METHODS, SMOOTH_LOG_KEYS, checkpointing_args, example_logits_and_targets
from trainer_helpers import is_checkpointing, is_fallback_warning, max_diff, oracle_token_losses, params_of
from trainer_helpers import reference_step, smooth_log, smooth_trainer, train_checking_fused, train_once
from trainer_helpers import training_args
from transformers import Trainer, TrainingArguments

from hf_smooth import SmoothingArguments, SmoothTrainer, SmoothTrainingArguments
from hf_smooth import label_smoothing_loss, maxsup_loss

CASES = [(name, method) for name in ["llama", "gpt2", "t5", "marian"] for method in METHODS]
assert len(CASES) == 12


@pytest.mark.parametrize("name,method", CASES)
def test_accumulation_invariance_matches_oracle(name, method, tmp_path):
    examples = seq2seq_examples(4) if name in SEQ2SEQ else causal_examples(4)
    expected, expected_loss = reference_step(BUILDERS[name](0), name, examples, method)
    initial = params_of(BUILDERS[name](0))
    assert max_diff(expected, initial) > 1e-3  # the step moves the parameters: the comparison can fail
    for bs, ga in [(4, 1), (2, 2), (1, 4)]:
        params, trainer = train_once(name, bs, ga, method, tmp_path, examples)
        assert max_diff(params, expected) < 1e-6, (bs, ga)
        logged = trainer.state.log_history[0]
        assert logged["loss"] == pytest.approx(expected_loss, rel=1e-5), (bs, ga)


def test_reported_loss_equals_functions_by_hand(tmp_path):
    """Logged loss/nll equal label_smoothing_loss / maxsup_loss on the model's shifted logits (before the step)."""
    examples = causal_examples(4)
    model = BUILDERS["llama"](0)
    batch = PadCollator()(examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted, targets = logits[:, :-1], batch["labels"][:, 1:]
    for method, fn in [("label_smoothing", label_smoothing_loss), ("maxsup", maxsup_loss)]:
        kwargs = {"epsilon": ALPHA} if method == "label_smoothing" else {"alpha": ALPHA}
        expected = fn(shifted, targets, **kwargs).item()
        nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1)).item()
        _, trainer = train_once("llama", 4, 1, method, tmp_path, examples)
        log = trainer.state.log_history[0]
        assert log["loss"] == pytest.approx(expected, rel=1e-5)
        assert log["nll"] == pytest.approx(nll, rel=1e-5)
        assert log["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
        assert log["smoothing_penalty"] == pytest.approx(expected - nll, abs=1e-5)
        assert log["smoothing_alpha"] == pytest.approx(ALPHA)
        assert log["num_tokens_scored"] == int(targets.ne(-100).sum())


def test_label_smoothing_equals_transformers_label_smoothing_factor(tmp_path):
    """On a causal LM, transformers 5.x's own LabelSmoother path is exact: ours must agree with it."""
    examples = causal_examples(4)
    ours, trainer = train_once("llama", 2, 2, "label_smoothing", tmp_path, examples)
    model = BUILDERS["llama"](0)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=LR, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, label_smoothing_factor=ALPHA,
    )
    hf = Trainer(model=model, args=args, train_dataset=ListDataset(examples), data_collator=PadCollator())
    hf.train()
    theirs = {k: v.detach() for k, v in model.named_parameters()}
    assert max_diff(ours, theirs) < 1e-6
    assert trainer.state.log_history[0]["loss"] == pytest.approx(hf.state.log_history[0]["loss"], rel=1e-5)


def test_gpt2_count_is_exact_where_trainer_overcounts(tmp_path):
    """transformers counts GPT-2's num_items_in_batch over labels, not labels[..., 1:] (ANCHORS); we must not."""
    examples = causal_examples(4)
    for example in examples:  # every row scores position 0, so an over-count would show
        example["labels"] = list(example["input_ids"])
    expected, _ = reference_step(BUILDERS["gpt2"](0), "gpt2", examples, "none")
    params, trainer = train_once("gpt2", 2, 2, "none", tmp_path, examples)
    assert max_diff(params, expected) < 1e-6
    scored = sum(len(e["labels"]) - 1 for e in examples)
    assert trainer.state.log_history[0]["num_tokens_scored"] == scored


def test_shift_labels_used_as_is(tmp_path):
    """A collator's shift_labels are already aligned with the logits and must not be shifted again."""

    class ShiftCollator(PadCollator):
        def __call__(self, features):
            batch = super().__call__(features)
            batch["shift_labels"] = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
            batch["labels"] = torch.full_like(batch["labels"], 5)  # garbage: must be ignored when shift_labels exist
            return batch

    examples = causal_examples(4)
    expected, _ = reference_step(BUILDERS["llama"](0), "llama", examples, "label_smoothing")
    params, _ = train_once("llama", 2, 2, "label_smoothing", tmp_path, examples, data_collator=ShiftCollator())
    assert max_diff(params, expected) < 1e-6


def test_seq2seq_builds_decoder_inputs_from_labels(tmp_path):
    """No decoder_input_ids in the batch (plain padding collator): they are built from the labels."""
    params, trainer = train_once("t5", 4, 1, "maxsup", tmp_path)
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_all_ignored_micro_batch_gives_zero_loss_with_graph(tmp_path):
    examples = causal_examples(4)
    for example in examples[:2]:
        example["labels"] = [-100] * len(example["labels"])
    trainer = smooth_trainer("llama", 2, 1, "maxsup", tmp_path, examples)
    model = trainer.model
    batch = PadCollator()(examples[:2])
    loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(0))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    # A whole step whose first micro-batch is all-ignored matches the reference on the remaining tokens.
    expected, _ = reference_step(BUILDERS["llama"](0), "llama", examples, "maxsup")
    params, _ = train_once("llama", 1, 4, "maxsup", tmp_path, examples)
    assert max_diff(params, expected) < 1e-6


def test_linear_schedule_follows_optimizer_steps(tmp_path):
    params, trainer = train_once(
        "llama", 1, 2, "maxsup", tmp_path, causal_examples(8), max_steps=4, smoothing_alpha=0.1,
        smoothing_alpha_end=0.2, smoothing_schedule="linear",
    )
    alphas = [log["smoothing_alpha"] for log in trainer.state.log_history if "smoothing_alpha" in log]
    assert alphas == pytest.approx([0.1, 0.1 + 0.1 / 3, 0.1 + 0.2 / 3, 0.2])


def test_resume_continues_alpha_and_loss_curve(tmp_path):
    common = dict(
        max_steps=4, smoothing_alpha=0.1, smoothing_alpha_end=0.3, smoothing_schedule="linear",
        save_strategy="steps", save_steps=2, optim="adamw_torch", learning_rate=1e-2,
    )
    examples = causal_examples(16)
    straight, trainer = train_once("llama", 2, 1, "maxsup", tmp_path / "straight", examples, **common)
    curve = [(log["loss"], log["smoothing_alpha"]) for log in trainer.state.log_history if "loss" in log]

    smooth_trainer("llama", 2, 1, "maxsup", tmp_path / "resumed", examples, **common).train()
    second = smooth_trainer("llama", 2, 1, "maxsup", tmp_path / "resumed", examples, **common)
    model = second.model
    second.train(resume_from_checkpoint=str(tmp_path / "resumed" / "run_2x1" / "checkpoint-2"))
    resumed = [(log["loss"], log["smoothing_alpha"]) for log in second.state.log_history if "loss" in log]
    assert len(resumed) == 4 and len(curve) == 4
    for (loss_a, alpha_a), (loss_b, alpha_b) in zip(curve, resumed):
        assert alpha_a == pytest.approx(alpha_b)
        assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert max_diff({k: v.detach() for k, v in model.named_parameters()}, straight) < 1e-5


def test_eval_metrics_are_token_weighted_and_nll_is_plain_ce(tmp_path):
    train = causal_examples(8, seed=1)
    evaluation = causal_examples(7, seed=2)
    model = BUILDERS["llama"](0)
    args = training_args(tmp_path, 2, 1, "maxsup", per_device_eval_batch_size=3, max_steps=2)
    trainer = SmoothTrainer(
        model=model, args=args, train_dataset=ListDataset(train), eval_dataset=ListDataset(evaluation),
        data_collator=PadCollator(),
    )
    trainer.train()
    metrics = trainer.evaluate()
    model.eval()
    nll_sum, obj_sum, count, correct = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for example in evaluation:
            logits, targets = example_logits_and_targets(model, "llama", example)
            keep = targets != -100
            nll_sum += F.cross_entropy(logits[keep].double(), targets[keep], reduction="sum").item()
            obj_sum += oracle_token_losses(logits, targets, "maxsup", ALPHA).sum().item()
            correct += (logits[keep].argmax(-1) == targets[keep]).sum().item()
            count += int(keep.sum())
    assert metrics["eval_nll"] == pytest.approx(nll_sum / count, rel=1e-5)
    assert metrics["eval_ppl"] == pytest.approx(math.exp(nll_sum / count), rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(obj_sum / count, rel=1e-5)
    assert metrics["eval_mean_token_accuracy"] == pytest.approx(correct / count)
    assert metrics["eval_num_tokens"] == count


def test_configuration_errors(tmp_path):
    model = BUILDERS["llama"](0)
    data = ListDataset(causal_examples(4))
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 .*contradicts smoothing_method='maxsup'"):
        SmoothTrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, smoothing_method="maxsup",
                                use_cpu=True)
    hf_args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 .*contradicts smoothing_alpha=0.2"):
        SmoothTrainer(model=model, args=hf_args, train_dataset=data, data_collator=PadCollator(),
                      smoothing_args=SmoothingArguments(smoothing_alpha=0.2))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="compute_loss_func"):
        SmoothTrainer(model=model, args=args, train_dataset=data, compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(ValueError, match="twice"):
        SmoothTrainer(model=model, args=training_args(tmp_path, 2, 1, "maxsup"), smoothing_args=SmoothingArguments())
    with pytest.raises(ValueError, match="smoothing_alpha_end"):
        SmoothingArguments(smoothing_method="maxsup", smoothing_schedule="linear")
    with pytest.raises(ValueError, match="smoothing_convention"):
        SmoothingArguments(smoothing_method="maxsup", smoothing_convention="fairseq")
    with pytest.raises(ValueError, match="epsilon"):
        SmoothingArguments(smoothing_method="label_smoothing", smoothing_alpha=1.5)
    trainer = SmoothTrainer(model=model, args=args, smoothing_args=SmoothingArguments(), train_dataset=data)
    with pytest.raises(ValueError, match="labels"):
        trainer.compute_loss(model, {"input_ids": torch.tensor([[3, 4, 5]])})


# ---- the fused path (smoothing_fused_loss=True) at trainer level -------------------------------------------------

FUSED_CASES = [(name, method) for name in ["llama", "gpt2"] for method in METHODS]
assert len(FUSED_CASES) == 6


def train_fused(name, bs, ga, method, tmp_path, examples, model=None, **extra):
    trainer = smooth_trainer(name, bs, ga, method, tmp_path, examples, model=model, smoothing_fused_loss=True, **extra)
    model = trainer.model
    train_checking_fused(trainer, model, fused=True)
    return params_of(model), trainer


@pytest.mark.parametrize("name,method", FUSED_CASES)
def test_fused_accumulation_invariance_matches_oracle_and_unfused(name, method, tmp_path):
    examples = causal_examples(4)
    expected, expected_loss = reference_step(BUILDERS[name](0), name, examples, method)
    unfused, unfused_trainer = train_once(name, 2, 2, method, tmp_path / "unfused", examples)
    reference_log = smooth_log(unfused_trainer.state.log_history)
    for bs, ga in [(4, 1), (2, 2), (1, 4)]:
        params, trainer = train_fused(name, bs, ga, method, tmp_path / "fused", examples)
        assert max_diff(params, expected) < 1e-6, (bs, ga)
        assert max_diff(params, unfused) < 1e-6, (bs, ga)
        log = smooth_log(trainer.state.log_history)
        assert log["loss"] == pytest.approx(expected_loss, rel=1e-5), (bs, ga)
        for key in SMOOTH_LOG_KEYS:
            assert log[key] == pytest.approx(reference_log[key], rel=1e-5, abs=1e-7), (bs, ga, key)


def test_fused_evaluation_uses_materialized_logits_and_matches_unfused(tmp_path):
    examples, evaluation = causal_examples(8, seed=1), causal_examples(7, seed=2)
    _, fused = train_fused("llama", 2, 2, "maxsup", tmp_path / "fused", examples, max_steps=2,
                           per_device_eval_batch_size=3)
    _, unfused = train_once("llama", 2, 2, "maxsup", tmp_path / "unfused", examples, max_steps=2,
                            per_device_eval_batch_size=3)
    fused_metrics, unfused_metrics = fused.evaluate(ListDataset(evaluation)), unfused.evaluate(ListDataset(evaluation))
    names = [k for k in unfused_metrics if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))]
    assert "eval_ece" in names and "eval_nll" in names and set(fused_metrics) == set(unfused_metrics)
    for key in names:
        assert fused_metrics[key] == pytest.approx(unfused_metrics[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("name", ["t5", "marian"])
def test_fused_falls_back_cleanly_for_encoder_decoder(name, tmp_path):
    """No logits_to_keep path for encoder-decoder models: one warning, then exactly the materialized update."""
    examples = seq2seq_examples(4)
    expected, _ = reference_step(BUILDERS[name](0), name, examples, "maxsup")
    unfused, unfused_trainer = train_once(name, 2, 2, "maxsup", tmp_path / "unfused", examples)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused, trainer = train_once(name, 2, 2, "maxsup", tmp_path / "fused", examples, smoothing_fused_loss=True)
    fallbacks = [str(w.message) for w in caught if is_fallback_warning(w.message)]
    assert len(fallbacks) == 1 and "encoder-decoder" in fallbacks[0], fallbacks  # warned once, not per micro-batch
    assert not trainer.fused_loss_active and "encoder-decoder" in trainer.fused_fallback_reason
    assert max_diff(fused, unfused) < 1e-7
    assert max_diff(fused, expected) < 1e-6
    for key in SMOOTH_LOG_KEYS:
        assert smooth_log(trainer.state.log_history)[key] == pytest.approx(smooth_log(unfused_trainer.state.log_history)[key], rel=1e-6), key


@pytest.mark.parametrize(
    "targets,checkpointing",
    [(["q_proj", "v_proj"], False), (["q_proj", "v_proj", "lm_head"], False), (["q_proj", "v_proj", "lm_head"], True)],
)
def test_fused_with_lora_matches_reference(targets, checkpointing, tmp_path):
    """LoRA through the fused path: adapters on attention, and on the output layer (folded into the fused weight, so
    its adapter trains, unlike a fused loss that reads lm_head.weight only: TRL #4612), with activation checkpointing
    (adapter gradients must not vanish: transformers #42489)."""
    peft = pytest.importorskip("peft")

    def lora_model():
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
        return peft.get_peft_model(BUILDERS["llama"](0), config)

    examples = causal_examples(4)
    initial = params_of(lora_model())
    expected, _ = reference_step(lora_model(), "llama", examples, "maxsup")
    extra = checkpointing_args() if checkpointing else {}
    params, trainer = train_fused("llama", 2, 2, "maxsup", tmp_path, examples, model=lora_model(), **extra)
    assert is_checkpointing(trainer.model) == checkpointing
    assert max_diff(params, expected) < 1e-6
    changed = {k for k in params if not torch.equal(params[k], initial[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)
    if "lm_head" in targets:
        assert any("lm_head.lora_B" in k for k in changed), sorted(changed)
