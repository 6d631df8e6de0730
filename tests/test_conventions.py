"""The Hugging Face / TRL conventions users bring (issue 13, items 4 and 6 to 9).

- transformers' `label_smoothing_factor` is exact label smoothing with that epsilon, in every way in (the Smooth*
  argument classes, a plain `TrainingArguments` beside `SmoothingArguments`, `SmoothedLoss`, the recipes); only a
  contradiction raises, naming both knobs.
- One set of log names in training and evaluation, TRL's (`mean_token_accuracy`, `entropy`, cumulative
  `num_tokens`).
- MaxSup's per-epoch ramp as the official code runs it, resumable.
- Model-card tags; the line that names the default; the recipes' --help.

Oracles: PyTorch's own cross-entropy in float64 (tests/trainer_helpers.py), entropies and counts recomputed here from
the model's logits, the paper's schedule formula written out.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from recipe_helpers import load_recipe
from tiny_models import BUILDERS, ListDataset, PadCollator, causal_examples, seq2seq_examples
from trainer_helpers import LR, example_logits_and_targets, max_diff, params_of, reference_step, training_args
from transformers import HfArgumentParser, Trainer, TrainingArguments

from hf_smooth import SmoothedLoss, SmoothingArguments, SmoothSeq2SeqTrainer, SmoothTrainer, SmoothTrainingArguments
from hf_smooth.logs import NUM_TOKENS_STATE

# ---- label_smoothing_factor ------------------------------------------------------------------------------------------


def plain_args(tmp_path, name="plain", **extra) -> TrainingArguments:
    """One SGD step over 4 examples (2 x 2 accumulation) with a plain TrainingArguments."""
    values = dict(
        output_dir=str(tmp_path / name), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=LR, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
    )
    values.update(extra)
    return TrainingArguments(**values)


@pytest.mark.parametrize("name", ["llama", "marian"])
def test_label_smoothing_factor_is_exactly_the_label_smoothing_run(name, tmp_path, caplog):
    """SmoothTrainingArguments(label_smoothing_factor=0.1) (SmoothSeq2SeqTrainingArguments for Marian) trains exactly
    as smoothing_method='label_smoothing', smoothing_alpha=0.1, and as the float64 oracle; LabelSmoother never runs."""
    seq2seq = name == "marian"
    examples = seq2seq_examples(4) if seq2seq else causal_examples(4)
    trainer_class = SmoothSeq2SeqTrainer if seq2seq else SmoothTrainer
    runs = {}
    for key, extra in {
        "factor": dict(smoothing_method=None, smoothing_alpha=None, label_smoothing_factor=0.1),
        "explicit": dict(smoothing_method="label_smoothing", smoothing_alpha=0.1),
    }.items():
        with caplog.at_level(logging.INFO, logger="hf_smooth.arguments"):
            caplog.clear()
            args = training_args(tmp_path / key, 2, 2, "label_smoothing", seq2seq=seq2seq, **extra)
            mapped = [r.getMessage() for r in caplog.records if "label_smoothing_factor" in r.getMessage()]
        assert (args.smoothing_method, args.smoothing_alpha, args.smoothing_convention) == (
            "label_smoothing", 0.1, "uniform"
        )
        assert len(mapped) == (1 if key == "factor" else 0), mapped
        model = BUILDERS[name](0)
        trainer = trainer_class(model=model, args=args, train_dataset=ListDataset(examples),
                                data_collator=PadCollator())
        assert trainer.label_smoother is None
        trainer.train()
        runs[key] = (params_of(model), trainer.state.log_history[0])
    assert max_diff(runs["factor"][0], runs["explicit"][0]) == 0.0
    for key in ("loss", "nll", "smoothing_penalty", "smoothing_alpha"):
        assert runs["factor"][1][key] == runs["explicit"][1][key], key
    expected, expected_loss = reference_step(BUILDERS[name](0), name, examples, "label_smoothing", 0.1)
    assert max_diff(runs["factor"][0], expected) < 1e-6
    assert runs["factor"][1]["loss"] == pytest.approx(expected_loss, rel=1e-5)


@pytest.mark.parametrize(
    "route", ["trainer", "trainer+SmoothingArguments", "SmoothedLoss", "SmoothedLoss unregistered"]
)
def test_label_smoothing_factor_of_plain_training_arguments(route, tmp_path):
    """A plain TrainingArguments(label_smoothing_factor=0.2): SmoothTrainer (alone or with a default
    SmoothingArguments) and SmoothedLoss in a plain Trainer (as callback or not) train label smoothing 0.2, which the
    float64 oracle computes; transformers' LabelSmoother is not applied on top (it would change the update)."""
    examples = causal_examples(4)
    model = BUILDERS["llama"](0)
    args = plain_args(tmp_path, label_smoothing_factor=0.2)
    data = dict(train_dataset=ListDataset(examples), data_collator=PadCollator())
    if route == "trainer":
        trainer = SmoothTrainer(model=model, args=args, **data)
    elif route == "trainer+SmoothingArguments":
        trainer = SmoothTrainer(model=model, args=args, smoothing_args=SmoothingArguments(), **data)
    elif route == "SmoothedLoss":
        loss = SmoothedLoss()
        trainer = Trainer(model=model, args=args, compute_loss_func=loss, callbacks=[loss], **data)
        assert (loss.smoothing_args.smoothing_method, loss.smoothing_args.smoothing_alpha) == ("label_smoothing", 0.2)
    else:
        trainer = Trainer(model=model, args=args, compute_loss_func=SmoothedLoss(model=model), **data)
    trainer.train()
    expected, _ = reference_step(BUILDERS["llama"](0), "llama", examples, "label_smoothing", 0.2)
    assert max_diff(params_of(model), expected) < 1e-6
    # The same step with epsilon 0.1 differs: the oracle can tell the two apart.
    other, _ = reference_step(BUILDERS["llama"](0), "llama", examples, "label_smoothing", 0.1)
    assert max_diff(params_of(model), other) > 1e-4


@pytest.mark.parametrize(
    "extra, knob",
    [
        (dict(smoothing_method="maxsup"), "smoothing_method='maxsup'"),
        (dict(smoothing_method="none"), "smoothing_method='none'"),
        (dict(smoothing_alpha=0.2), "smoothing_alpha=0.2"),
        (dict(smoothing_method="label_smoothing", smoothing_convention="fairseq"), "smoothing_convention='fairseq'"),
        (dict(smoothing_method="maxsup", smoothing_alpha_end=0.2, smoothing_schedule="linear"),
         "smoothing_schedule='linear'"),
    ],
)
def test_a_contradiction_names_both_knobs(extra, knob, tmp_path):
    with pytest.raises(ValueError, match=rf"label_smoothing_factor=0.1 .*contradicts .*{knob}"):
        SmoothTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], label_smoothing_factor=0.1,
                                **extra)
    loss = SmoothedLoss(**extra)
    with pytest.raises(ValueError, match=rf"label_smoothing_factor=0.1 .*contradicts .*{knob}"):
        Trainer(model=BUILDERS["llama"](0), args=plain_args(tmp_path, label_smoothing_factor=0.1),
                compute_loss_func=loss, callbacks=[loss])


def test_agreeing_options_are_accepted_silently(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="hf_smooth"):
        args = SmoothTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], label_smoothing_factor=0.1,
                                       smoothing_method="label_smoothing", smoothing_alpha=0.1)
    assert (args.smoothing_method, args.smoothing_alpha) == ("label_smoothing", 0.1)
    assert not caplog.records
    # An explicit method with a default strength takes the factor as its strength.
    args = SmoothTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], label_smoothing_factor=0.3,
                                   smoothing_method="label_smoothing")
    assert args.smoothing_alpha == 0.3
    with pytest.raises(ValueError, match="label_smoothing_factor=1.5"):
        SmoothTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], label_smoothing_factor=1.5)


# ---- log names ------------------------------------------------------------------------------------------------------


def oracle_window(model, examples) -> dict:
    """Scored-token count, accuracy and mean predictive entropy over `examples`, float64, from the model's logits."""
    count, correct, entropy = 0, 0, 0.0
    with torch.no_grad():
        for example in examples:
            logits, targets = example_logits_and_targets(model, "llama", example)
            keep = targets != -100
            z = logits[keep].double()
            p = z.softmax(-1)
            entropy += float(-(p * z.log_softmax(-1)).sum())
            correct += int((z.argmax(-1) == targets[keep]).sum())
            count += int(keep.sum())
    return {"num_tokens": count, "mean_token_accuracy": correct / count, "entropy": entropy / count}


@pytest.mark.parametrize("route", ["SmoothTrainer", "SmoothedLoss"])
def test_log_names_are_trl_names_in_training_and_evaluation(route, tmp_path):
    """With the learning rate 0 the model stays as built, so every window is checked against the oracle over its
    examples; the windows' `num_tokens_scored` add up to the scored tokens of all examples (each once)."""
    examples = causal_examples(12, seed=3)
    model = BUILDERS["llama"](0)
    args = plain_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=3,
                      learning_rate=0.0, per_device_eval_batch_size=5)
    data = dict(train_dataset=ListDataset(examples), eval_dataset=ListDataset(examples), data_collator=PadCollator())
    if route == "SmoothTrainer":
        trainer = SmoothTrainer(model=model, args=args, smoothing_args=SmoothingArguments(smoothing_method="maxsup"),
                                **data)
    else:
        loss = SmoothedLoss(smoothing_method="maxsup")
        trainer = Trainer(model=model, args=args, compute_loss_func=loss, callbacks=[loss], **data)
    trainer.train()
    metrics = trainer.evaluate()
    whole = oracle_window(model, examples)

    windows = [log for log in trainer.state.log_history if "nll" in log]
    assert len(windows) == 3
    assert all("token_accuracy" not in log and "accuracy" not in log for log in windows)
    running = 0
    for log in windows:
        running += log["num_tokens_scored"]
        assert 0.0 <= log["mean_token_accuracy"] <= 1.0 and log["entropy"] > 0.0
    assert running == whole["num_tokens"]
    # num_tokens is TRL's: cumulative input tokens (attention mask, prompts included), growing by each window's; a
    # compute_loss_func never sees the inputs, so SmoothedLoss does not log it.
    if route == "SmoothTrainer":
        totals = [log["num_tokens"] for log in windows]
        assert totals == sorted(totals) and len(set(totals)) == 3
        assert totals[-1] == sum(len(example["input_ids"]) for example in examples) > running
    else:
        assert all("num_tokens" not in log for log in windows)
    # Token-weighted over the three windows == over all examples (the windows partition them).
    for key in ("mean_token_accuracy", "entropy"):
        pooled = sum(log[key] * log["num_tokens_scored"] for log in windows) / running
        assert pooled == pytest.approx(whole[key], rel=1e-5), key

    assert "eval_accuracy" not in metrics
    assert metrics["eval_mean_token_accuracy"] == pytest.approx(whole["mean_token_accuracy"], rel=1e-9)
    assert metrics["eval_entropy"] == pytest.approx(whole["entropy"], rel=1e-5)


def _num_tokens_run(tmp_path, output, resume=None, save_steps=4, **extra):
    """Cumulative num_tokens per logging step of an 8-step run logged every 2 steps (resumed from `resume`)."""
    examples = causal_examples(16, seed=4)
    model = BUILDERS["llama"](0)
    args = plain_args(tmp_path, name=output, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                      max_steps=8, learning_rate=0.1, save_strategy="steps", save_steps=save_steps, logging_steps=2,
                      **extra)
    smoothing = SmoothingArguments(smoothing_method="maxsup")
    trainer = SmoothTrainer(model=model, args=args, train_dataset=ListDataset(examples),
                            data_collator=PadCollator(), smoothing_args=smoothing)
    trainer.train(resume_from_checkpoint=resume)
    return {log["step"]: log["num_tokens"] for log in trainer.state.log_history if "num_tokens" in log}


@pytest.mark.parametrize(
    "save_steps, restore", [(4, False), (3, False), (3, True)],
    ids=["checkpoint-at-a-log", "checkpoint-between-logs", "restoring-callback-states"],
)
def test_num_tokens_continues_after_resume(tmp_path, save_steps, restore):
    """A run resumed from a checkpoint logs the same cumulative num_tokens as the uninterrupted run, also when the
    checkpoint (step 3) falls between two logs (steps 2 and 4): the count of step 3 comes from the checkpoint. With
    transformers restoring callback states, the entry (no callback) is left to hf_smooth."""
    full = _num_tokens_run(tmp_path, "full", save_steps=save_steps)
    checkpoint = tmp_path / "full" / f"checkpoint-{save_steps}"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"][NUM_TOKENS_STATE]
    resumed = _num_tokens_run(tmp_path, "full", resume=str(checkpoint), save_steps=save_steps,
                              restore_callback_states_from_checkpoint=restore)
    assert sorted(full) == [2, 4, 6, 8]
    assert resumed == full
    assert full[2] < saved["attributes"]["num_tokens"] <= full[4]
    if save_steps == 4:
        assert saved["attributes"]["num_tokens"] == full[4]


def test_num_tokens_resumed_without_a_count_says_what_it_misses(tmp_path, caplog):
    """A checkpoint without hf_smooth's count (another trainer's, an older hf_smooth's): the count continues from the
    last log, short by step 3's tokens, and a warning says so."""
    full = _num_tokens_run(tmp_path, "full", save_steps=3)
    state_file = tmp_path / "full" / "checkpoint-3" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"][NUM_TOKENS_STATE]
    state_file.write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="hf_smooth"):
        resumed = _num_tokens_run(tmp_path, "full", resume=str(tmp_path / "full" / "checkpoint-3"), save_steps=3)
    assert "num_tokens continues from the log of step 2" in caplog.text
    assert "the input tokens of step 3." in caplog.text
    missing = full[4] - resumed[4]
    assert missing > 0
    assert all(full[step] - resumed[step] == missing for step in (4, 6, 8))


# ---- MaxSup per-epoch schedule --------------------------------------------------------------------------------------


def paper_alpha(epoch: int, epochs: int, begin: float = 0.1, end: float = 0.2) -> float:
    """The official MaxSup code: begin + (end - begin) * current_epoch / epochs (current_epoch 0-based)."""
    return begin + (end - begin) * epoch / epochs


def epoch_run(tmp_path, output, resume=None):
    examples = causal_examples(8, seed=5)  # 4 steps of 2 per epoch, 3 epochs
    model = BUILDERS["llama"](0)
    args = SmoothTrainingArguments(
        output_dir=str(tmp_path / output), per_device_train_batch_size=2, num_train_epochs=3, learning_rate=0.05,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True, logging_steps=1,
        save_strategy="steps", save_steps=6, disable_tqdm=True, seed=0, smoothing_method="maxsup",
        smoothing_alpha=0.1, smoothing_alpha_end=0.2, smoothing_schedule="linear", smoothing_schedule_unit="epoch",
    )
    trainer = SmoothTrainer(model=model, args=args, train_dataset=ListDataset(examples), data_collator=PadCollator())
    trainer.train(resume_from_checkpoint=resume)
    logs = {log["step"]: log for log in trainer.state.log_history if "smoothing_penalty" in log}
    return logs, params_of(model), trainer


def test_epoch_schedule_is_the_papers_and_resumes(tmp_path):
    logs, params, trainer = epoch_run(tmp_path, "full")
    assert sorted(logs) == list(range(1, 13))
    for step, log in logs.items():
        epoch = (step - 1) // 4
        assert log["smoothing_alpha"] == pytest.approx(paper_alpha(epoch, 3), abs=1e-12), step
        # The alpha the loss used: MaxSup's penalty is alpha * (z_max - mean z), logged as smoothing_penalty and
        # logit_gap (token means of the same window).
        assert log["smoothing_penalty"] / log["logit_gap"] == pytest.approx(paper_alpha(epoch, 3), rel=1e-5), step
    # The last epoch does not reach alpha_end, as in the paper's code (2/3 of the way from 0.1 to 0.2).
    assert logs[12]["smoothing_alpha"] == pytest.approx(0.1 + 0.1 * 2 / 3)
    assert trainer.smoothing_alpha == pytest.approx(paper_alpha(3, 3))  # after training: the end of the ramp

    resumed_logs, resumed_params, _ = epoch_run(tmp_path, "full", resume=str(tmp_path / "full" / "checkpoint-6"))
    assert sorted(resumed_logs) == list(range(1, 13))  # steps 1-6 from the checkpoint's history, 7-12 trained now
    for step in range(7, 13):
        for key in ("smoothing_alpha", "loss", "nll", "smoothing_penalty"):
            assert resumed_logs[step][key] == pytest.approx(logs[step][key], rel=1e-6), (step, key)
    assert max_diff(resumed_params, params) < 1e-6


def test_schedule_unit_is_validated():
    with pytest.raises(ValueError, match="smoothing_schedule_unit='epoch' only applies to smoothing_schedule='linear'"):
        SmoothingArguments(smoothing_method="maxsup", smoothing_schedule_unit="epoch")
    with pytest.raises(ValueError, match="smoothing_schedule_unit must be one of"):
        SmoothingArguments(smoothing_method="maxsup", smoothing_alpha_end=0.2, smoothing_schedule="linear",
                           smoothing_schedule_unit="batch")


# ---- model card, the default, --help -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, tags", [("maxsup", {"hf_smooth", "maxsup"}), ("label_smoothing", {"hf_smooth", "label-smoothing"}),
                     ("none", {"hf_smooth"})]
)
def test_model_card_carries_the_tags(method, tags, tmp_path):
    model = BUILDERS["llama"](0)
    trainer = SmoothTrainer(model=model, args=plain_args(tmp_path), train_dataset=ListDataset(causal_examples(4)),
                            data_collator=PadCollator(), smoothing_args=SmoothingArguments(smoothing_method=method))
    assert tags <= set(model.model_tags)  # push_to_hub adds the model's tags to the card
    trainer.create_model_card(tags=["mine"])
    card = (tmp_path / "plain" / "README.md").read_text()
    header = card.split("---")[1]  # the YAML metadata block
    listed = {line.strip()[2:] for line in header.splitlines() if line.strip().startswith("- ")}
    assert tags | {"mine"} <= listed, header
    assert not ({"hf_smooth", "maxsup", "label-smoothing"} - tags) & listed, header


def test_the_default_is_said_at_train_start(tmp_path, caplog):
    data = dict(train_dataset=ListDataset(causal_examples(4)), data_collator=PadCollator())
    trainer = SmoothTrainer(model=BUILDERS["llama"](0), args=plain_args(tmp_path), **data)
    with caplog.at_level(logging.INFO, logger="hf_smooth.trainer"):
        trainer.train()
    said = [r for r in caplog.records if r.name == "hf_smooth.trainer"]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert all(part in said[0].getMessage() for part in ("'label_smoothing'", "epsilon 0.1", "'uniform'", "default"))

    caplog.clear()
    trainer = SmoothTrainer(model=BUILDERS["llama"](0), args=plain_args(tmp_path), **data,
                            smoothing_args=SmoothingArguments(smoothing_method="maxsup", smoothing_alpha=0.15))
    with caplog.at_level(logging.INFO, logger="hf_smooth.trainer"):
        trainer.train()
    said = [r for r in caplog.records if r.name == "hf_smooth.trainer"]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert "'maxsup'" in said[0].getMessage() and "alpha 0.15" in said[0].getMessage()


@pytest.mark.parametrize("name, default", [("clm", "maxsup"), ("translation", "label_smoothing")])
def test_recipes_take_label_smoothing_factor_and_list_smoothing_first(name, default, tmp_path):
    recipe = load_recipe(name)
    from common import SMOOTHING_GROUP, group_smoothing_options, parse_arguments

    training = parse_arguments(recipe.ARGUMENT_CLASSES, ["--output_dir", str(tmp_path / "a")])[-1]
    assert (training.smoothing_method, training.smoothing_alpha) == (default, 0.1)
    training = parse_arguments(recipe.ARGUMENT_CLASSES, ["--output_dir", str(tmp_path / "b"),
                                                         "--label_smoothing_factor", "0.2"])[-1]
    assert (training.smoothing_method, training.smoothing_alpha) == ("label_smoothing", 0.2)

    parser = HfArgumentParser(recipe.ARGUMENT_CLASSES)
    group_smoothing_options(parser)
    usage, text = parser.format_help().split("\n\n", 1)
    assert len(usage) < 120  # not every flag of TrainingArguments
    first_other = min(text.index(flag) for flag in ("--output_dir", "--learning_rate", "--train_file"))
    assert text.index(f"{SMOOTHING_GROUP}:") < text.index("--smoothing_method ") < first_other
    assert text.index("--label_smoothing_factor ") < first_other
    assert text.index("--smoothing_schedule_unit ") < first_other
