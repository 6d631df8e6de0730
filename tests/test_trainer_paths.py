"""The trainer on paths real pipelines take: bf16 autocast with the fused loss, MoE load balancing, logged numbers
that agree with each other, degenerate runs that say so, and SmoothedLoss reporting what SmoothTrainer reports.

Oracles are computed here from PyTorch's own functions in float64 (or the model's own loss), never from hf_smooth.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_models import PAD, VOCAB, ListDataset, PadCollator, causal_examples, tiny_gpt2, tiny_llama
from transformers import MixtralConfig, MixtralForCausalLM, Trainer, TrainingArguments

from hf_smooth import SmoothedLoss, SmoothTrainer, SmoothTrainingArguments


def args_for(tmp_path, name="run", **extra):
    defaults = dict(
        output_dir=str(tmp_path / name), per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=1,
        learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, smoothing_method="maxsup", smoothing_alpha=0.1,
    )
    defaults.update(extra)
    return SmoothTrainingArguments(**defaults)


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---- bf16 autocast + fused loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("method", ["label_smoothing", "maxsup"])
def test_bf16_autocast_fused_trains_and_matches_unfused(build, method, tmp_path):
    """bf16=True with float32 weights (accelerate's autocast around model.forward only): the fused route must train,
    and its update must match the unfused path's under the same autocast to bf16 tolerance."""
    examples = causal_examples(8, seed=3)
    updates = {}
    for fused in (False, True):
        model = build(0)
        initial = params_of(model)
        trainer = SmoothTrainer(
            model=model, args=args_for(tmp_path, f"f{fused}", bf16=True, smoothing_method=method,
                                       smoothing_fused_loss=fused, per_device_train_batch_size=8),
            train_dataset=ListDataset(examples), data_collator=PadCollator(),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no fallback warning
            trainer.train()
        assert trainer.fused_loss_active is fused
        assert next(model.parameters()).dtype == torch.float32
        updates[fused] = ({k: v - initial[k] for k, v in params_of(model).items()}, trainer.state.log_history[0])
    (unfused, log_u), (fused, log_f) = updates[False], updates[True]
    scale = max(v.abs().max().item() for v in unfused.values())
    assert scale > 1e-3  # the step moved the parameters: the comparison can fail
    assert max_diff(fused, unfused) <= 2e-2 * scale
    assert log_f["loss"] == pytest.approx(log_u["loss"], rel=5e-3)
    assert log_f["nll"] == pytest.approx(log_u["nll"], rel=5e-3)


def test_bf16_fused_loss_is_near_float64_oracle(tmp_path):
    """The bf16 fused objective is the float64 objective of the same model up to bf16 rounding of the logits."""
    examples = causal_examples(8, seed=4)
    model = tiny_llama(0)
    batch = PadCollator()(examples)
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(input_ids=batch["input_ids"],
                                               attention_mask=batch["attention_mask"]).logits
    z, y = logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1)
    keep = y != -100
    ce = F.cross_entropy(z[keep], y[keep], reduction="none")
    expected = (ce + 0.1 * (z[keep].max(-1).values - z[keep].mean(-1))).mean().item()
    trainer = SmoothTrainer(
        model=model, args=args_for(tmp_path, bf16=True, smoothing_fused_loss=True, per_device_train_batch_size=8),
        train_dataset=ListDataset(examples), data_collator=PadCollator(),
    )
    trainer.train()
    assert trainer.fused_loss_active
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=2e-2)


# ---- mixture of experts --------------------------------------------------------------------------------------------


def tiny_mixtral(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2, output_router_logits=True, router_aux_loss_coef=0.5,
        tie_word_embeddings=False,
    )
    return MixtralForCausalLM(config)


@pytest.mark.parametrize("fused", [False, True])
def test_moe_objective_equals_model_loss_with_aux(fused, tmp_path):
    """At smoothing 'none' the objective of one micro-batch is the model's own loss: CE + coef * aux_loss."""
    examples = causal_examples(4, seed=5)
    model = tiny_mixtral()
    batch = PadCollator()(examples)
    model.train()
    with torch.no_grad():
        own = model(**batch)
    assert own.aux_loss is not None and own.aux_loss.item() > 0
    trainer = SmoothTrainer(
        model=model, args=args_for(tmp_path, smoothing_method="none", smoothing_fused_loss=fused, learning_rate=0.0),
        train_dataset=ListDataset(examples), data_collator=PadCollator(),
    )
    trainer.train()
    log = trainer.state.log_history[0]
    assert trainer.fused_loss_active is fused
    assert log["loss"] == pytest.approx(own.loss.item(), rel=1e-5)
    assert log["aux_loss"] == pytest.approx(own.aux_loss.item(), rel=1e-5)
    assert log["loss"] == pytest.approx(log["nll"] + log["smoothing_penalty"] + 0.5 * log["aux_loss"], rel=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_moe_aux_term_does_not_grow_with_accumulation(fused, tmp_path):
    """The load-balancing loss is a product of two batch means, so it changes with the batch's composition; with
    two identical halves it does not. Then 4 x GA1 and 2 x GA2 must give the same update: counting the aux term
    once per micro-batch (as a plain sum would) doubles it under GA2."""
    half = causal_examples(2, seed=6)
    examples = half + copy.deepcopy(half)
    results = {}
    for bs, ga in [(4, 1), (2, 2)]:
        model = tiny_mixtral()
        initial = params_of(model)
        trainer = SmoothTrainer(
            model=model, args=args_for(tmp_path, f"{bs}x{ga}", per_device_train_batch_size=bs,
                                       gradient_accumulation_steps=ga, smoothing_fused_loss=fused),
            train_dataset=ListDataset(examples), data_collator=PadCollator(),
        )
        trainer.train()
        results[bs] = ({k: v - initial[k] for k, v in params_of(model).items()}, trainer.state.log_history[0])
    (one, log1), (two, log2) = results[4], results[2]
    router = [k for k in one if "gate.weight" in k]
    assert router and max(one[k].abs().max().item() for k in router) > 1e-4  # the router moves
    assert max_diff(one, two) < 1e-6
    assert log1["loss"] == pytest.approx(log2["loss"], rel=1e-6)
    assert log1["aux_loss"] == pytest.approx(log2["aux_loss"], rel=1e-6)


# ---- logged numbers ----------------------------------------------------------------------------------------------


def float64_scored_logits(model, examples):
    """Each example alone (no padding) through a float64 copy of `model`: (logits, labels) of its scored positions,
    after the causal shift."""
    model = copy.deepcopy(model).double()
    for example in examples:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
        y = torch.tensor(example["labels"][1:])
        keep = y != -100
        yield logits[keep], y[keep]


def float64_objective(model, examples, alpha=0.1) -> float:
    """Token-weighted MaxSup objective of `examples` under `model`, float64, from F.cross_entropy."""
    total, count = 0.0, 0
    for z, y in float64_scored_logits(model, examples):
        per = F.cross_entropy(z, y, reduction="none") + alpha * (z.max(-1).values - z.mean(-1))
        total += per.sum().item()
        count += len(y)
    return total / count


def test_logged_loss_is_token_weighted_objective_over_the_window(tmp_path):
    """logging_steps=3 with learning rate 0: every window's `loss` and the final `train_loss` are the token-weighted
    objective of the examples they saw (float64 oracle), and loss == nll + smoothing_penalty on every line."""
    examples = causal_examples(12, seed=7)
    model = tiny_llama(0)
    reference = copy.deepcopy(model)
    fetched = []

    class Recording(ListDataset):
        def __getitem__(self, i):
            fetched.append(i)
            return super().__getitem__(i)

    trainer = SmoothTrainer(
        model=model, args=args_for(tmp_path, per_device_train_batch_size=2, max_steps=6, logging_steps=3,
                                   learning_rate=0.0),
        train_dataset=Recording(examples), data_collator=PadCollator(),
    )
    trainer.train()
    assert sorted(fetched) == list(range(12))  # one epoch, in the order the steps saw them
    seen = [examples[i] for i in fetched]
    lines = [h for h in trainer.state.log_history if "nll" in h]
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert line["loss"] == pytest.approx(line["nll"] + line["smoothing_penalty"], abs=1e-6)
        assert line["loss"] == pytest.approx(float64_objective(reference, seen[6 * i: 6 * i + 6]), rel=1e-5)
    final = trainer.state.log_history[-1]
    assert final["train_loss"] == pytest.approx(float64_objective(reference, seen), rel=1e-5)


def test_all_ignored_training_set_warns_and_reports_nan(tmp_path):
    examples = causal_examples(4)
    for example in examples:
        example["labels"] = [-100] * len(example["labels"])
    trainer = SmoothTrainer(
        model=tiny_llama(0), args=args_for(tmp_path, max_steps=1), train_dataset=ListDataset(examples),
        eval_dataset=ListDataset(examples), data_collator=PadCollator(),
    )
    with pytest.warns(UserWarning, match="scored no token"):
        trainer.train()
    assert math.isnan(trainer.state.log_history[0]["loss"])
    with pytest.warns(UserWarning, match="scored no token"):
        metrics = trainer.evaluate()
    assert math.isnan(metrics["eval_loss"])


# ---- SmoothedLoss ------------------------------------------------------------------------------------------------


def plain_args(tmp_path, **extra):
    defaults = dict(
        output_dir=str(tmp_path / "plain"), per_device_train_batch_size=2, max_steps=2, learning_rate=0.0,
        optim="sgd", report_to=[], use_cpu=True, logging_steps=2, save_strategy="no", disable_tqdm=True, seed=0,
        per_device_eval_batch_size=3,
    )
    defaults.update(extra)
    return TrainingArguments(**defaults)


def test_smoothed_loss_without_callback_refuses_contradicting_label_smoothing_factor_at_first_call(tmp_path):
    model = tiny_llama(0)
    loss = SmoothedLoss(smoothing_method="maxsup", model=model)
    trainer = Trainer(
        model=model, args=plain_args(tmp_path, label_smoothing_factor=0.1), train_dataset=ListDataset(causal_examples(4)),
        data_collator=PadCollator(), compute_loss_func=loss,
    )
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 .*contradicts smoothing_method='maxsup'"):
        trainer.train()


def test_smoothed_loss_reports_token_weighted_eval_metrics(tmp_path):
    """evaluate() with SmoothedLoss gives eval_nll / eval_ppl / calibration, over all tokens (float64 oracle),
    and eval_loss is the token-weighted objective, not a mean of batch means."""
    examples = causal_examples(7, seed=8)  # batches of 3, 3, 1: unequal token counts
    model = tiny_llama(0)
    loss = SmoothedLoss(smoothing_method="maxsup", smoothing_alpha=0.1)
    trainer = Trainer(
        model=model, args=plain_args(tmp_path), train_dataset=ListDataset(examples), eval_dataset=ListDataset(examples),
        data_collator=PadCollator(), compute_loss_func=loss, callbacks=[loss],
    )
    metrics = trainer.evaluate()
    objective = float64_objective(model, examples)
    nll_total, count = 0.0, 0
    for z, y in float64_scored_logits(model, examples):
        nll_total += F.cross_entropy(z, y, reduction="sum").item()
        count += len(y)
    assert metrics["eval_loss"] == pytest.approx(objective, rel=1e-5)
    assert metrics["eval_nll"] == pytest.approx(nll_total / count, rel=1e-5)
    assert metrics["eval_ppl"] == pytest.approx(math.exp(nll_total / count), rel=1e-5)
    assert metrics["eval_num_tokens"] == count
    assert "eval_ece" in metrics
    trainer.train()  # and the training log line agrees with itself
    line = next(h for h in trainer.state.log_history if "nll" in h)
    assert line["loss"] == pytest.approx(line["nll"] + line["smoothing_penalty"], abs=1e-6)


def test_fused_function_under_autocast_accepts_bf16_hidden_with_float32_weight():
    """Under autocast nn.Linear takes bf16 activations with float32 weights; so must the fused loss, with the same
    value and gradients as nn.Linear + F.cross_entropy under the same autocast (float32 reductions)."""
    from hf_smooth import fused_linear_smoothed_loss

    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8).bfloat16().requires_grad_()
    weight = torch.randn(32, 8, requires_grad=True)
    labels = torch.randint(0, 32, (2, 5))
    labels[0, :2] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fused_linear_smoothed_loss(hidden, weight, labels, method="label_smoothing", epsilon=0.1)
        logits = torch.nn.functional.linear(hidden, weight)
    assert logits.dtype == torch.bfloat16
    theirs = F.cross_entropy(logits.float().reshape(-1, 32), labels.reshape(-1), label_smoothing=0.1)
    g_ours = torch.autograd.grad(ours, (hidden, weight))
    g_theirs = torch.autograd.grad(theirs, (hidden, weight))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-3)
    assert g_ours[1].dtype == torch.float32 and g_ours[0].dtype == torch.bfloat16
    for a, b in zip(g_ours, g_theirs):
        assert (a.float() - b.float()).abs().max().item() <= 2e-2 * b.float().abs().max().item()


def test_eval_token_metrics_is_public_after_evaluate(tmp_path):
    """The last evaluation's TokenMetrics is a public attribute (recipes read it; no private handshake)."""
    examples = causal_examples(5, seed=9)
    trainer = SmoothTrainer(
        model=tiny_llama(0), args=args_for(tmp_path), train_dataset=ListDataset(examples),
        eval_dataset=ListDataset(examples), data_collator=PadCollator(),
    )
    assert trainer.eval_token_metrics is None
    metrics = trainer.evaluate()
    scored = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    assert trainer.eval_token_metrics.num_tokens == scored == metrics["eval_num_tokens"]
    assert trainer.eval_token_metrics.compute()["nll"] == pytest.approx(metrics["eval_nll"], rel=1e-12)
