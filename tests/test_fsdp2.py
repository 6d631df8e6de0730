"""The fused loss under FSDP2 (`torch.distributed.fsdp.fully_shard`) and DeepSpeed ZeRO-2 / ZeRO-3, 2 gloo ranks on
CPU, against one process.

tests/scripts/sharded_fused.py shards the float64 tiny Llama (FSDP2 exactly as accelerate 1.15 does, with its own
`fsdp2_prepare_model`, in float64 or with accelerate's bf16 mixed precision; or with the output layer resharded after
its forward; or as a ZeRO-2 / ZeRO-3 engine), runs `SmoothTrainer.compute_loss` with the fused loss on each rank's
half of a global batch of 8 variable-length rows, and backward. ZeRO-2 runs the fused loss; ZeRO-3 refuses it, and
the test checks the warning and the exact fallback. The reference is independent of hf_smooth: the unsharded model,
every row run alone, per-token losses from PyTorch's F.cross_entropy (label smoothing) or the naive MaxSup formula in
float64, summed and divided by the global token count, and autograd's gradient of that; the bf16 runs are compared
with the unfused path under the same sharding and precision.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fsdp2_cases import build_case_model, global_examples
from launch_helpers import ROOT, free_port, run_launch
from trainer_helpers import example_logits_and_targets, oracle_token_losses

from hf_smooth.fused_trainer import fused_unsupported_reason

SCRIPT = Path(__file__).resolve().parent / "scripts" / "sharded_fused.py"
ALPHA = 0.1  # the script's smoothing strength
TOLERANCE = 1e-9

# FSDP2 wrapped by accelerate's own code, for every head and both methods; then the output layer resharded after its
# forward (the route gathers it again), for the untied and LoRA heads (a tied head shares the embedding's group).
FSDP2_CASES = [
    f"{embeddings}-{method}-accelerate"
    for embeddings in ("untied", "tied", "lora")
    for method in ("label_smoothing", "maxsup")
]
FSDP2_CASES += ["untied-maxsup-head", "lora-label_smoothing-head"]
# accelerate's bf16 mixed precision under FSDP2 (bf16 parameters, reductions and outputs, bf16 autocast), each case
# also run unfused: the fused route must agree with the materialized path under the same sharding and precision.
BF16_CASES = ["untied-maxsup-bf16", "tied-label_smoothing-bf16", "lora-label_smoothing-bf16"]
# ZeRO-3: the fused route is refused (the weight is partitioned again before the backward), loudly, and the
# materialized fallback through the engine is exact.
ZERO3_CASES = ["untied-label_smoothing-zero3", "tied-maxsup-zero3", "lora-maxsup-zero3"]
# ZeRO-2 keeps the weights whole on every rank: the fused route runs (LoRA on the output layer included).
ZERO2_CASES = ["untied-maxsup-zero2", "tied-label_smoothing-zero2", "lora-label_smoothing-zero2"]

# The launched tests are slow: each launch takes 20-60 s of start-up on 2 cores.
LAUNCHABLE = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")


def reference(case: str):
    """Loss and gradients of the unsharded model on the whole global batch (float64, F.cross_entropy oracle)."""
    embeddings, method, _wrap = case.split("-")
    model = build_case_model(embeddings)
    model.train()
    total, count = 0.0, 0
    for example in global_examples():
        logits, targets = example_logits_and_targets(model, "llama", example)
        losses = oracle_token_losses(logits, targets, method, ALPHA)
        total, count = total + losses.sum(), count + losses.numel()
    loss = total / count
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def launch(out: Path, cases: list[str]) -> dict:
    """All `cases` in one 2-process torchrun launch (start-up is most of its cost); their recorded results."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(SCRIPT), str(out), *cases,
    ]
    run_launch(command, hf_home=out / "hf_home", timeout=420)
    return {case: torch.load(out / f"{case}.pt") for case in cases}


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    bf16 = [variant for case in BF16_CASES for variant in (case, f"{case}-unfused")]
    return launch(tmp_path_factory.mktemp("fsdp2"), FSDP2_CASES + bf16)


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed; DS_BUILD_OPS=0 is enough on CPU)")
    return launch(tmp_path_factory.mktemp("deepspeed"), ZERO3_CASES + ZERO2_CASES)


def assert_matches_one_process(run, case, *, grad_tolerance=TOLERANCE):
    loss, grads = reference(case)
    assert abs(run["loss"] - loss) < TOLERANCE, (run["loss"], loss)
    assert run["grads"].keys() == grads.keys() and grads
    errors = {name: (run["grads"][name].double() - grad).abs().max().item() for name, grad in grads.items()}
    assert max(errors.values()) < grad_tolerance, errors


def assert_fused_ran(run):
    assert run["fused_ran"] and run["fallback"] is None, run["fallback"]
    assert run["warnings"] == []
    assert run["logit_lengths"] == [1]  # the model projected one position: no B x T x V logits


@pytest.mark.parametrize("case", FSDP2_CASES)
@pytest.mark.slow
@LAUNCHABLE
def test_fused_loss_under_fsdp2_matches_one_process(fsdp2_runs, case):
    run = fsdp2_runs[case]
    assert run["num_sharded"] == run["num_params"] > 0  # every parameter was a DTensor shard
    assert_fused_ran(run)
    assert_matches_one_process(run, case)


@pytest.mark.parametrize("case", BF16_CASES)
@pytest.mark.slow
@LAUNCHABLE
def test_fused_loss_under_fsdp2_bf16_matches_the_unfused_path(fsdp2_runs, case):
    fused, unfused = fsdp2_runs[case], fsdp2_runs[f"{case}-unfused"]
    assert_fused_ran(fused)
    assert not unfused["fused_ran"] and unfused["fallback"] is None and unfused["logit_lengths"] != [1]
    # Both project in bf16 and reduce in float32. Measured: equal losses (untied, tied), 6.7e-4 apart with LoRA on
    # the output layer (adapter folded into the weight vs added to the output: a different bf16 rounding), and
    # gradients at most 1% of each parameter's largest entry apart (about one bf16 step, 2**-8).
    assert abs(fused["loss"] - unfused["loss"]) < 2e-3 * abs(unfused["loss"]), (fused["loss"], unfused["loss"])
    assert fused["grads"].keys() == unfused["grads"].keys() and fused["grads"]
    for name, grad in unfused["grads"].items():
        assert (fused["grads"][name] - grad).abs().max() <= 2e-2 * grad.abs().max(), name


@pytest.mark.parametrize("case", ZERO3_CASES)
@pytest.mark.slow
@LAUNCHABLE
def test_zero3_falls_back_loudly_and_exactly(deepspeed_runs, case):
    run = deepspeed_runs[case]
    assert run["num_sharded"] == run["num_params"] > 0  # every parameter was partitioned
    assert not run["fused_ran"]
    assert "DeepSpeed ZeRO-3" in run["fallback"] and "FSDP2" in run["fallback"]
    assert any("falls back" in message and "DeepSpeed ZeRO-3" in message for message in run["warnings"])
    # DeepSpeed hands out gradients in its float32 accumulation dtype (safe_get_full_grad), whatever the model's.
    assert_matches_one_process(run, case, grad_tolerance=1e-6)


@pytest.mark.slow
@LAUNCHABLE
@pytest.mark.parametrize("case", ZERO2_CASES)
def test_fused_loss_under_zero2_matches_one_process(deepspeed_runs, case):
    run = deepspeed_runs[case]
    assert run["num_sharded"] == 0  # ZeRO-2 partitions gradients and optimizer state, not the weights
    assert_fused_ran(run)
    assert_matches_one_process(run, case, grad_tolerance=1e-6)  # float32 gradients, as for ZeRO-3


# ---- which setups the trainer routes through the fused loss (no launch) ------------------------------------------


def trainer_stub(*, fsdp=False, fsdp2=False, fsdp_version=None, zero_stage=None):
    """What `fused_unsupported_reason` reads of a Trainer: its accelerate flags and plugins (with `fsdp_version`, an
    accelerate without `Accelerator.is_fsdp2`, whose FSDP plugin says the version)."""
    plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
    fsdp_plugin = None if fsdp_version is None else SimpleNamespace(fsdp_version=fsdp_version)
    state = SimpleNamespace(deepspeed_plugin=plugin, fsdp_plugin=fsdp_plugin)
    if fsdp_version is not None:
        accelerator = SimpleNamespace(state=state)
    else:
        accelerator = SimpleNamespace(is_fsdp2=fsdp2, state=state)
    return SimpleNamespace(is_fsdp_enabled=fsdp, is_deepspeed_enabled=zero_stage is not None, accelerator=accelerator)


@pytest.mark.parametrize(
    ("setup", "stub", "refused_with"),
    [
        ("one process / DDP", trainer_stub(), None),
        ("FSDP2", trainer_stub(fsdp=True, fsdp2=True), None),
        ("FSDP1", trainer_stub(fsdp=True), "fsdp_version: 2"),
        ("FSDP2, accelerate without is_fsdp2", trainer_stub(fsdp=True, fsdp_version=2), None),
        ("FSDP1, accelerate without is_fsdp2", trainer_stub(fsdp=True, fsdp_version=1), "fsdp_version: 2"),
        ("ZeRO-2", trainer_stub(zero_stage=2), None),
        ("ZeRO-3", trainer_stub(zero_stage=3), "DeepSpeed ZeRO-3"),
    ],
)
def test_fused_route_per_setup(setup, stub, refused_with):
    reason = fused_unsupported_reason(stub, build_case_model("untied"))
    if refused_with is None:
        assert reason is None, (setup, reason)
    else:
        assert reason is not None and refused_with in reason, (setup, reason)


def test_fsdp2_yaml_gives_accelerate_an_fsdp2_plugin(monkeypatch):
    """recipes/configs/fsdp2.yaml as accelerate 1.15 reads it: the environment its launcher hands the processes, and
    the FSDP plugin an Accelerator builds from it (FSDP2, per-layer wrapping, resharding after forward), without a
    warning. Nothing is launched (accelerate refuses FSDP without GPUs)."""
    import warnings

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    monkeypatch.setattr("accelerate.utils.launch.is_port_in_use", lambda port: False)
    config = ROOT / "recipes" / "configs" / "fsdp2.yaml"
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config), "x.py"]))
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plugin = FullyShardedDataParallelPlugin()
    assert [str(w.message) for w in caught] == []
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
