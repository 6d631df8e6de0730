"""Two real processes (gloo DDP on CPU) fed by transformers' own collators == one process == the hand oracle.

tests/test_distributed.py proves process invariance on hand-made `dict` batches; here the batches are what real
pipelines produce (tests/collator_data.py): `DataCollatorForLanguageModeling(mlm=False)` and
`DataCollatorForSeq2Seq(model=...)` (a `BatchEncoding`, not a `dict`), and the padding-free
`DataCollatorWithFlattening`. One launch of tests/scripts/ddp_collators_train.py runs every scenario: one SGD step
(lr 1, no clipping) on a global batch of 8 rows, 2 ranks x 2 rows x 2 accumulation steps. The references, computed
in this process: the per-example float64 oracle of tests/test_trainer.py, and SmoothTrainer with the same collator,
the global batch in one micro-batch (8 x 1).

A trainer that did not count the tokens of these batches (issue 10.1) hands each micro-batch `None`: every rank then
averages each micro-batch over itself, and the step is off by the accumulation steps and the number of processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from collator_data import oracle_examples
from test_collators import scored_tokens, train_with_collator
from test_distributed import LAUNCH_TIMEOUT_S, _free_port, _kill_tree
from test_trainer import SMOOTH_LOG_KEYS, max_diff, reference_step
from tiny_models import BUILDERS, SEQ2SEQ, causal_examples, seq2seq_examples

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SCRIPT = TESTS / "scripts" / "ddp_collators_train.py"

BS, GA = 2, 2
GLOBAL_ROWS = 2 * BS * GA


def scenario(name, model, method, collator, *, fused=False):
    examples = seq2seq_examples(GLOBAL_ROWS, seed=0) if model in SEQ2SEQ else causal_examples(GLOBAL_ROWS, seed=0)
    return {
        "name": name, "model": model, "method": method, "fused": fused, "collator": collator, "lora": None,
        "train": examples, "per_device_train_batch_size": BS, "gradient_accumulation_steps": GA,
    }


SCENARIOS = [
    scenario("llama-lm-maxsup", "llama", "maxsup", "lm"),
    scenario("llama-lm-fused-label_smoothing", "llama", "label_smoothing", "lm", fused=True),
    scenario("gpt2-lm-none", "gpt2", "none", "lm"),
    scenario("llama-flattening-fused-maxsup", "llama", "maxsup", "flattening", fused=True),
    scenario("t5-seq2seq-label_smoothing", "t5", "label_smoothing", "seq2seq"),
    scenario("marian-seq2seq-maxsup", "marian", "maxsup", "seq2seq"),
]
NAMES = [s["name"] for s in SCENARIOS]
assert len(set(NAMES)) == len(NAMES) == 6


def launch(run_dir: Path, scenarios: list) -> dict:
    """All `scenarios` in one 2-process launch (as tests/test_distributed.py launches ddp_train.py)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "scenarios.json").write_text(json.dumps(scenarios))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(SCRIPT), str(run_dir),
    ]
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1", HF_HOME=str(run_dir / "hf_home"),
        PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p),
    )
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_tree(process.pid)
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"2-process launch did not finish in {LAUNCH_TIMEOUT_S} s (a rank hanging?):\n{output[-8000:]}")
    if process.returncode != 0:
        pytest.fail(f"2-process launch failed with exit code {process.returncode}:\n{output[-8000:]}")
    results = {}
    for spec in scenarios:
        out = run_dir / spec["name"]
        result = json.loads((out / "result.json").read_text())
        result["ranks"] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        result["params"] = torch.load(out / "params.pt")
        results[spec["name"]] = result
    return results


@pytest.fixture(scope="module")
def collator_run(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ddp_collators"), SCENARIOS)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_two_processes_with_transformers_collators_equal_one_process(collator_run, name, tmp_path):
    (spec,) = [s for s in SCENARIOS if s["name"] == name]
    result = collator_run[name]
    kind = spec["collator"]
    assert result["world_size"] == 2 and result["wrapped_as"] == "DistributedDataParallel"

    # the premise: each rank trained on the collator's own batch type, GA micro-batches each
    expected_type = "dict" if kind == "flattening" else "BatchEncoding"
    for rank in result["ranks"]:
        assert rank["batch_types"] == [expected_type] * GA, rank["batch_types"]

    rows = oracle_examples(kind, spec["train"])
    total = scored_tokens(spec["model"], rows)
    tokens = [[m["local_tokens"] for m in rank["micro_batches"]] for rank in result["ranks"]]
    assert sum(map(sum, tokens)) == total and sum(tokens[0]) != sum(tokens[1]), tokens  # unequal ranks
    for rank in result["ranks"]:
        for micro in rank["micro_batches"]:
            assert micro["num_items_in_batch"] == total, (micro, total)  # the global count, on every micro-batch

    expected, expected_loss = reference_step(BUILDERS[spec["model"]](0), spec["model"], rows, spec["method"])
    initial = {k: v.detach() for k, v in BUILDERS[spec["model"]](0).named_parameters()}
    assert max_diff(expected, initial) > 1e-3  # the step moves the parameters
    assert max_diff(result["params"], expected) < 1e-6

    one_params, one = train_with_collator(
        spec["model"], kind, GLOBAL_ROWS, 1, spec["method"], spec["fused"], tmp_path, spec["train"]
    )
    assert max_diff(result["params"], one_params) < 1e-6
    (logged,) = [log for log in result["log_history"] if "nll" in log]
    (reference_log,) = [log for log in one.state.log_history if "nll" in log]
    assert logged["loss"] == pytest.approx(expected_loss, rel=1e-5)
    for key in SMOOTH_LOG_KEYS:
        assert logged[key] == pytest.approx(reference_log[key], rel=1e-5, abs=1e-7), key
    assert logged["num_tokens_scored"] == total
    assert result["fused_ran"] == spec["fused"] and not result["fallback_warnings"]
