"""Two real processes (gloo DDP on CPU) against one process and against a hand oracle.

Each test module launch runs `tests/scripts/ddp_train.py` once under

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no

with a list of scenarios (tests/ddp_scenarios.py; a launch costs 10-20 s of start-up here, so scenarios share one).
Every scenario takes one SGD step (lr 1, no clipping) on a global batch of 8 variable-length rows: 2 ranks x 2 padded
rows x 2 accumulation steps. The single-process references are computed in this process:

- the oracle of tests/trainer_helpers.py: every row run alone (no padding), per-token losses from PyTorch's own
  F.cross_entropy / the naive MaxSup formula in float64, summed and divided by the global token count, one SGD step;
- SmoothTrainer in one process with the whole global batch in one micro-batch (8 x 1).

The step is the gradient of a sum over the rows divided by their count, so the order the distributed sampler
deals the rows in does not matter: the data is exactly one global batch. What each rank scored is recorded by the
script, so the tests also check the premise of each scenario (unequal token counts, an all-ignored micro-batch, a
rank with nothing to score).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ddp_scenarios import Z_LOSS, build_model, check_two_process_step, launch_scenarios
from metric_oracles import oracle_metrics
from tiny_models import SEQ2SEQ, ListDataset, PadCollator, causal_examples, seq2seq_examples
from trainer_helpers import ALPHA, example_logits_and_targets, max_diff, oracle_token_losses, params_of
from trainer_helpers import reference_step, smooth_log, training_args

from hf_smooth import SmoothSeq2SeqTrainer, SmoothTrainer

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_train.py"

# The training arguments of the scenarios: 2 ranks x 2 rows x 2 accumulation steps = a global batch of 8.
BS, GA, EVAL_BS = 2, 2, 2
GLOBAL_ROWS = 2 * BS * GA

# What the Trainer adds to evaluate()'s output besides the metrics; these differ between runs by nature.
TIMING_KEYS = {
    "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_model_preparation_time", "epoch",
}


# ---- data and scenarios ----------------------------------------------------------------------------------------


def causal_train():
    # Scored tokens per row (after the shift): 6, 5, 10, 3, 4, 9, 8, 9; lengths 4 to 12, so rows are padded.
    return causal_examples(GLOBAL_ROWS, seed=0)


def seq2seq_train():
    return seq2seq_examples(GLOBAL_ROWS, seed=0)


def masked(examples, rows):
    """A copy of `examples` whose `rows` have every label ignored (a prompt-only row after completion masking)."""
    examples = [dict(e) for e in examples]
    for i in rows:
        examples[i]["labels"] = [-100] * len(examples[i]["labels"])
    return examples


def scenario(name, model, method, *, fused=False, train=None, eval=None, sampling="random", lora=None, **extra):
    seq2seq = model in SEQ2SEQ
    return {
        "name": name, "model": model, "method": method, "fused": fused, "lora": lora,
        "train": train if train is not None else (seq2seq_train() if seq2seq else causal_train()),
        "eval": eval, "sampling": sampling,
        "per_device_train_batch_size": BS, "gradient_accumulation_steps": GA, "per_device_eval_batch_size": EVAL_BS,
        **extra,
    }


# Sequential sampling deals whole micro-batches of consecutive rows to the ranks in turn: rank 0 gets rows
# [0, 1] and [4, 5], rank 1 gets [2, 3] and [6, 7] (checked from what the ranks recorded, not assumed).
RANK1_FIRST_MICRO_BATCH = [2, 3]
RANK1_ALL_ROWS = [2, 3, 6, 7]

# Eval sets whose sizes are not multiples of 2 ranks x EVAL_BS = 4: the distributed sampler pads the last batch
# with duplicated samples, which must not be counted twice.
CAUSAL_EVAL = causal_examples(7, seed=2)
SEQ2SEQ_EVAL = seq2seq_examples(5, seed=3)

DEFAULT_SCENARIOS = [
    scenario("llama-none", "llama", "none"),
    scenario("llama-label_smoothing", "llama", "label_smoothing"),
    scenario("llama-maxsup", "llama", "maxsup", eval=CAUSAL_EVAL),
    scenario("llama-fused-none", "llama", "none", fused=True),
    scenario("llama-fused-label_smoothing", "llama", "label_smoothing", fused=True),
    scenario("llama-fused-maxsup", "llama", "maxsup", fused=True),
    scenario("t5-label_smoothing", "t5", "label_smoothing", eval=SEQ2SEQ_EVAL),
    scenario("llama-ignored-micro-batch", "llama", "maxsup", sampling="sequential",
             train=masked(causal_train(), RANK1_FIRST_MICRO_BATCH)),
    scenario("llama-idle-rank", "llama", "maxsup", sampling="sequential",
             train=masked(causal_train(), RANK1_ALL_ROWS)),
    scenario("llama-fused-idle-rank", "llama", "label_smoothing", fused=True, sampling="sequential",
             train=masked(causal_train(), RANK1_ALL_ROWS)),
]

SLOW_SCENARIOS = [
    scenario("gpt2-none", "gpt2", "none"),
    scenario("gpt2-label_smoothing", "gpt2", "label_smoothing", eval=CAUSAL_EVAL),
    scenario("gpt2-maxsup", "gpt2", "maxsup"),
    scenario("gpt2-fused-label_smoothing", "gpt2", "label_smoothing", fused=True),
    scenario("gpt2-fused-maxsup", "gpt2", "maxsup", fused=True),
    scenario("gpt2-fused-idle-rank", "gpt2", "maxsup", fused=True, sampling="sequential",
             train=masked(causal_train(), RANK1_ALL_ROWS)),
    scenario("t5-none", "t5", "none"),
    scenario("t5-maxsup", "t5", "maxsup"),
    scenario("marian-none", "marian", "none"),
    scenario("marian-label_smoothing", "marian", "label_smoothing"),
    scenario("marian-maxsup", "marian", "maxsup", eval=SEQ2SEQ_EVAL),
    # encoder-decoder + fused: a warned fallback to materialized logits, still exact
    scenario("marian-fused-maxsup", "marian", "maxsup", fused=True),
    # LoRA on attention and on the output layer, fused: the adapter of lm_head is folded into the fused weight
    scenario("llama-lora-fused-maxsup", "llama", "maxsup", fused=True, lora=["q_proj", "v_proj", "lm_head"]),
    # other splits of the same global batch: 1 row x 4 accumulation steps, 4 rows x 1 step per rank
    scenario("llama-1x4-label_smoothing", "llama", "label_smoothing",
             per_device_train_batch_size=1, gradient_accumulation_steps=4),
    scenario("llama-4x1-maxsup", "llama", "maxsup", eval=CAUSAL_EVAL,
             per_device_train_batch_size=4, gradient_accumulation_steps=1, per_device_eval_batch_size=3),
]

assert len({s["name"] for s in DEFAULT_SCENARIOS + SLOW_SCENARIOS}) == len(DEFAULT_SCENARIOS) + len(SLOW_SCENARIOS)


# ---- launching -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    return launch_scenarios(SCRIPT, tmp_path_factory.mktemp("ddp_default"), DEFAULT_SCENARIOS)


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory):
    return launch_scenarios(SCRIPT, tmp_path_factory.mktemp("ddp_slow"), SLOW_SCENARIOS)


# ---- references computed in this process -----------------------------------------------------------------------


def one_process_trainer(spec, tmp_path):
    """SmoothTrainer in this process on the scenario's model and data, the global batch in one micro-batch."""
    seq2seq = spec["model"] in SEQ2SEQ
    args = training_args(
        tmp_path, GLOBAL_ROWS, 1, spec["method"], seq2seq=seq2seq, smoothing_fused_loss=spec["fused"],
        per_device_eval_batch_size=spec["per_device_eval_batch_size"],
    )
    trainer_cls = SmoothSeq2SeqTrainer if seq2seq else SmoothTrainer
    return trainer_cls(
        model=build_model(spec), args=args, train_dataset=ListDataset(spec["train"]), data_collator=PadCollator()
    )


def trained_params(trainer):
    trainer.train()
    return params_of(trainer.model)


def hand_eval(model, spec, examples):
    """eval metrics by hand: each row alone (no padding), float64 oracles over all scored tokens of the set."""
    model.eval()
    logits, targets = [], []
    with torch.no_grad():
        for example in examples:
            z, y = example_logits_and_targets(model, spec["model"], example)
            logits.append(z)
            targets.append(y)
    z, y = torch.cat(logits), torch.cat(targets)
    keep = y != -100
    expected = oracle_metrics(z, y)
    expected["nll_by_cross_entropy"] = F.cross_entropy(z[keep].double(), y[keep]).item()
    expected["loss"] = oracle_token_losses(z, y, spec["method"], ALPHA).sum().item() / int(keep.sum())
    expected["z_loss"] = (Z_LOSS * torch.logsumexp(z[keep].double(), dim=-1).square()).sum().item() / int(keep.sum())
    return expected


def metric_items(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


# ---- checks ----------------------------------------------------------------------------------------------------


def check_training_step(result, spec, tmp_path):
    """Parameters and logs of the 2-process step equal the oracle and the 1-process SmoothTrainer."""
    initial = {k: v.detach() for k, v in build_model(spec).named_parameters()}
    assert max_diff(result["initial"], initial) == 0.0  # the ranks built the same model as this process

    reference_model = build_model(spec)
    expected, expected_loss = reference_step(reference_model, spec["model"], spec["train"], spec["method"])
    trainable = {k for k, v in reference_model.named_parameters() if v.requires_grad}
    assert max_diff({k: expected[k] for k in trainable}, {k: initial[k] for k in trainable}) > 1e-3  # it moved

    one = one_process_trainer(spec, tmp_path)
    tokens = check_two_process_step(
        result, ga=spec["gradient_accumulation_steps"], expected=expected, expected_loss=expected_loss,
        one_params=trained_params(one), one_log=smooth_log(one.state.log_history),
    )
    if spec["fused"] and spec["model"] not in SEQ2SEQ:
        assert result["fused_ran"] and not result["fallback_warnings"]
    else:
        assert not result["fused_ran"]
    return tokens


def check_evaluation(result, spec, tmp_path):
    """2-process evaluate() == 1-process evaluate() == hand oracles, before and after the step."""
    examples = spec["eval"]
    assert len(examples) % (2 * spec["per_device_eval_batch_size"]) != 0  # the sampler must duplicate samples

    one = one_process_trainer(spec, tmp_path / "fresh")
    one_before = metric_items(one.evaluate(ListDataset(examples)))
    two_before = metric_items(result["eval_before"])
    assert set(two_before) == set(one_before) and len(two_before) > 10, sorted(two_before)
    for key, value in one_before.items():
        assert two_before[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key

    expected = hand_eval(build_model(spec), spec, examples)
    assert two_before["eval_num_tokens"] == expected["num_tokens"]  # duplicated samples counted once
    assert two_before["eval_nll"] == pytest.approx(expected["nll_by_cross_entropy"], rel=1e-6)
    assert two_before["eval_loss"] == pytest.approx(expected["loss"], rel=1e-6)
    for name in ["nll", "ppl", "accuracy", "confidence", "ece", "ece_adaptive", "brier", "entropy", "logit_gap",
                 "logit_norm", "small_logit_frac"]:
        logged = "mean_token_accuracy" if name == "accuracy" else name  # TRL's name in the logs (hf_smooth/logs.py)
        assert two_before[f"eval_{logged}"] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    # With a z-loss (a second trainer, same fresh model): each sample's z-loss once, and the loss includes it.
    with_z = result["eval_z"]
    assert with_z["eval_num_tokens"] == expected["num_tokens"]
    assert with_z["eval_z_loss"] == pytest.approx(expected["z_loss"], rel=1e-7)  # counting a duplicate twice: ~1e-5
    assert with_z["eval_loss"] == pytest.approx(expected["loss"] + expected["z_loss"], rel=1e-6)

    # After the step: the same comparison on the models each side trained (equal to ~1e-7).
    trained = one_process_trainer(spec, tmp_path / "trained")
    trained_params(trained)
    one_after = metric_items(trained.evaluate(ListDataset(examples)))
    two_after = metric_items(result["eval_after"])
    assert set(two_after) == set(one_after)
    for key, value in one_after.items():
        assert two_after[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert two_after["eval_num_tokens"] == expected["num_tokens"]


def spec_named(scenarios, name):
    (spec,) = [s for s in scenarios if s["name"] == name]
    return spec


# ---- default run: one launch -----------------------------------------------------------------------------------

RANDOM_DEFAULT = [s["name"] for s in DEFAULT_SCENARIOS if s["sampling"] == "random"]
EVAL_DEFAULT = [s["name"] for s in DEFAULT_SCENARIOS if s["eval"]]
assert len(RANDOM_DEFAULT) == 7 and len(EVAL_DEFAULT) == 2


@pytest.mark.parametrize("name", RANDOM_DEFAULT)
def test_two_processes_with_unequal_token_counts_equal_one_process(default_run, name, tmp_path):
    spec = spec_named(DEFAULT_SCENARIOS, name)
    tokens = check_training_step(default_run[name], spec, tmp_path)
    assert sum(tokens[0]) != sum(tokens[1]), tokens  # the premise: the ranks score different numbers of tokens


@pytest.mark.parametrize("name", ["llama-ignored-micro-batch", "llama-idle-rank", "llama-fused-idle-rank"])
def test_all_ignored_micro_batches_on_one_rank(default_run, name, tmp_path):
    """A rank whose micro-batch (or whole step) scores nothing: no hang, finite loss, the 1-process parameters."""
    spec = spec_named(DEFAULT_SCENARIOS, name)
    tokens = check_training_step(default_run[name], spec, tmp_path)
    if name == "llama-ignored-micro-batch":
        assert tokens[1][0] == 0 and tokens[1][1] > 0 and min(tokens[0]) > 0, tokens
    else:
        assert tokens[1] == [0, 0] and min(tokens[0]) > 0, tokens
        # the idle rank still took part in the all-reduce: its loss is an exact 0 with a graph
        assert [m["loss"] for m in default_run[name]["ranks"][1]["micro_batches"]] == [0.0, 0.0]


@pytest.mark.parametrize("name", EVAL_DEFAULT)
def test_two_process_evaluate_equals_one_process_and_oracle(default_run, name, tmp_path):
    check_evaluation(default_run[name], spec_named(DEFAULT_SCENARIOS, name), tmp_path)


# ---- slow run: the other architectures and splits, one more launch --------------------------------------------

SLOW_NAMES = [s["name"] for s in SLOW_SCENARIOS]
EVAL_SLOW = [s["name"] for s in SLOW_SCENARIOS if s["eval"]]
assert len(SLOW_NAMES) == 15 and len(EVAL_SLOW) == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_NAMES)
def test_slow_two_processes_equal_one_process(slow_run, name, tmp_path):
    spec = spec_named(SLOW_SCENARIOS, name)
    result = slow_run[name]
    tokens = check_training_step(result, spec, tmp_path)
    if spec["sampling"] == "sequential":
        assert tokens[1] == [0, 0] and min(tokens[0]) > 0, tokens
    if spec["fused"] and spec["model"] in SEQ2SEQ:
        assert result["fallback_warnings"] and "encoder-decoder" in result["fallback_warnings"][0]
    if spec["lora"]:
        changed = {k for k in result["params"] if not torch.equal(result["params"][k], result["initial"][k])}
        assert changed and all("lora_" in k for k in changed), sorted(changed)
        assert any("lm_head.lora_B" in k for k in changed)  # the output layer's adapter got a gradient


@pytest.mark.slow
@pytest.mark.parametrize("name", EVAL_SLOW)
def test_slow_two_process_evaluate_equals_one_process_and_oracle(slow_run, name, tmp_path):
    check_evaluation(slow_run[name], spec_named(SLOW_SCENARIOS, name), tmp_path)
