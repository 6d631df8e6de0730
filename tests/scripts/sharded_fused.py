"""Launched by tests/test_fsdp2.py as two CPU processes (gloo), with tests/ and the repository root on PYTHONPATH:

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/sharded_fused.py OUT_DIR CASE [CASE ...]

A CASE is ``<embeddings>-<method>-<wrap>``, with ``-unfused`` appended for the materialized-logits path: embeddings
``untied``, ``tied``, ``lora`` (untied, peft LoRA on q_proj, v_proj and lm_head) or ``lorabody`` (LoRA on q_proj and
v_proj only), method ``label_smoothing`` or ``maxsup``, and wrap one of

- ``accelerate``: FSDP2 as accelerate 1.15 shards the model (its own `fsdp2_prepare_model`: each decoder layer, the
  input embedding when untied, [final norm, output layer] together with reshard_after_forward=False, then the root);
- ``bf16``: ``accelerate`` with accelerate's bf16 mixed precision (float32 master weights, bf16 parameters,
  reductions and outputs in FSDP2's MixedPrecisionPolicy, the forward under bf16 autocast);
- ``head``: FSDP2 on each decoder layer and on the output layer alone with reshard_after_forward=True (its weight is a
  DTensor shard again after the forward), then the root;
- ``zero2`` / ``zero3``: a DeepSpeed ZeRO-2 / ZeRO-3 engine (ZeRO-3: every parameter partitioned, persistence
  threshold 0). All cases of one launch must be DeepSpeed or none.

For each case, on both ranks: the float64 model of tests/fsdp2_cases.py, one `SmoothTrainer.compute_loss` with the
fused loss on this rank's half of the global batch of tests/test_fsdp2.py, and backward (the engine's for ZeRO-3).
accelerate refuses FSDP and DeepSpeed on CPU, so the Trainer is not given a plugin: the model is sharded here and
handed to `compute_loss` as the Trainer would hand it after `accelerator.prepare`.

Rank 0 writes OUT_DIR/CASE.pt: the global loss (each rank's loss is scaled by the world size, as under DDP, so it is
the sum over ranks divided by 2), every parameter's full gradient (FSDP2: `full_tensor()` of the sharded grads;
ZeRO-3: `deepspeed.utils.safe_get_full_grad`), and what was observed: whether the fused path ran
(`trainer.fused_loss_active`) or why not (`trainer.fused_fallback_reason`), the sequence length of the logits the model
returned (1: no B x T x V logits), how many parameters were sharded, and any fallback warning.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import SimpleNamespace

import torch
import torch.distributed as dist
from fsdp2_cases import GLOBAL_ROWS, build_case_model, case_batch, global_token_count
from tiny_models import ListDataset, PadCollator
from trainer_helpers import is_fallback_warning

from hf_smooth import SmoothTrainer, SmoothTrainingArguments

ALPHA = 0.1


def shard_like_accelerate(model):
    """accelerate 1.15's own FSDP2 preparation (`fsdp2_prepare_model`), with the plugin its fsdp2.yaml builds."""
    from accelerate.utils import FullyShardedDataParallelPlugin, fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True
    )
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no")
    return fsdp2_prepare_model(accelerator, model)


def shard_like_accelerate_bf16(model):
    """What accelerate 1.15 does for FSDP2 with mixed_precision="bf16": float32 master weights, a MixedPrecisionPolicy
    of bf16 parameters, reductions and outputs (`FullyShardedDataParallelPlugin.set_mixed_precision`), and the model's
    forward under bf16 autocast (`Accelerator.prepare_model`)."""
    from accelerate.utils import FullyShardedDataParallelPlugin, fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True
    )
    plugin.set_mixed_precision("bf16")
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="bf16", is_main_process=dist.get_rank() == 0
    )
    model = fsdp2_prepare_model(accelerator, model.float())
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    return model


def shard_head_alone(model):
    """Each decoder layer and the output layer in groups of their own that reshard after their forward; the root."""
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(base.get_output_embeddings(), reshard_after_forward=True)
    return fully_shard(model)


def deepspeed_engine(model, stage: int):
    """A DeepSpeed ZeRO engine over the model; for ZeRO-3 nothing is kept whole (persistence threshold 0)."""
    import deepspeed

    zero = {"stage": stage, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": stage}
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_ROWS // 2, "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "optimizer": {"type": "SGD", "params": {"lr": 1.0}}, "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(
        model=model, config=config, model_parameters=[p for p in model.parameters() if p.requires_grad]
    )
    return engine


WRAPS = {
    "accelerate": shard_like_accelerate, "bf16": shard_like_accelerate_bf16, "head": shard_head_alone,
    "zero2": lambda model: deepspeed_engine(model, 2), "zero3": lambda model: deepspeed_engine(model, 3),
}
DEEPSPEED = ("zero2", "zero3")


def full_grads(model, wrap: str) -> dict:
    if wrap in DEEPSPEED:
        from deepspeed.utils import safe_get_full_grad  # a collective: every rank calls it for every parameter

        grads = {name: safe_get_full_grad(p) for name, p in model.module.named_parameters()}
        return {name: grad.detach().clone() for name, grad in grads.items() if grad is not None}
    return {
        name: p.grad.full_tensor().detach().double().clone()
        for name, p in model.named_parameters()
        if p.grad is not None
    }


def num_sharded(model, wrap: str) -> int:
    if wrap in DEEPSPEED:  # ZeRO-3 partitions every parameter; ZeRO-2 none (gradients and optimizer state only)
        return sum(hasattr(p, "ds_id") for p in model.parameters())
    return sum(type(p).__name__ == "DTensor" for p in model.parameters())


def run_case(out_dir: str, case: str, rank: int, world: int) -> None:
    embeddings, method, wrap, *unfused = case.split("-")
    model = WRAPS[wrap](build_case_model(embeddings))
    sharded = num_sharded(model, wrap)
    args = SmoothTrainingArguments(
        output_dir=os.path.join(out_dir, f"run-{case}"), use_cpu=True, report_to=[], disable_tqdm=True,
        per_device_train_batch_size=GLOBAL_ROWS // world, smoothing_method=method, smoothing_alpha=ALPHA,
        smoothing_fused_loss=not unfused,
    )
    module = model.module if wrap in DEEPSPEED else model  # the Trainer holds the model, compute_loss gets the engine
    trainer = SmoothTrainer(model=module, args=args, train_dataset=ListDataset([]), data_collator=PadCollator())
    assert trainer.accelerator.num_processes == world, (trainer.accelerator.num_processes, world)
    assert not trainer.is_fsdp_enabled  # the sharding is ours; the Trainer only routes the loss
    lengths = []
    handle = model.register_forward_hook(lambda _m, _a, out: lengths.append(out.logits.shape[-2]))
    batch = case_batch(rank, world)
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(global_token_count()))
        if wrap in DEEPSPEED:
            model.backward(loss)
        else:
            loss.backward()
    handle.remove()
    grads = full_grads(model, wrap)
    total = loss.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save(
            {
                "loss": total.item() / world, "grads": grads, "fused_ran": trainer.fused_loss_active,
                "fallback": trainer.fused_fallback_reason, "logit_lengths": lengths, "num_sharded": sharded,
                "num_params": sum(1 for _ in model.parameters()),
                "warnings": [str(w.message) for w in caught if is_fallback_warning(w.message)],
            },
            os.path.join(out_dir, f"{case}.pt"),
        )


def main() -> None:
    out_dir, cases = sys.argv[1], sys.argv[2:]
    uses_deepspeed = {case.endswith(DEEPSPEED) for case in cases}
    if len(uses_deepspeed) != 1:
        raise SystemExit(f"launch DeepSpeed cases and FSDP2 cases separately: {cases}")
    if uses_deepspeed.pop():
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world
    try:
        for case in cases:
            run_case(out_dir, case, rank, world)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
