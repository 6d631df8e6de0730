"""End-to-end loss benchmark: output projection + loss, forward and backward, from the same hidden states.

    python benchmarks/bench_loss.py                 # N=4096 tokens, H=1024, V=32000 and 128256 (several GiB)
    python benchmarks/bench_loss.py --quick         # small shapes, seconds (what tests/test_fused.py runs)
    python benchmarks/bench_loss.py --vocab 128256 --variants torch_ce_ls fused_ls --chunk-size 512

Every variant starts from the same ``hidden (N, H)`` and ``weight (V, H)`` (both ``requires_grad``) and includes the
projection, so materialized-logit losses and the fused path are compared end to end. Each variant runs in its own
subprocess (a clean peak), one warm-up then ``--repeats`` timed forward+backward steps (gradients set to None before
each step, as ``optimizer.zero_grad()`` does); the time is the median.

Peak extra memory:
- CPU: peak RSS (``resource.getrusage(...).ru_maxrss``) minus the same high-water mark read right before the first
  forward, after the inputs are allocated (in place, so no temporary copy raises the baseline). Float32.
- CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated after the inputs. Bfloat16.

Ratios are to ``torch_ce_ls`` (``F.cross_entropy(label_smoothing=0.1)`` on materialized logits). Liger-Kernel's fused
linear cross-entropy is added on CUDA when it is importable. Labels are uniform over the vocabulary, none ignored
(ignored tokens would favour the fused path, which skips them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "torch_ce": "F.cross_entropy (no smoothing)",
    "torch_ce_ls": "F.cross_entropy(label_smoothing=0.1)",
    "hf_label_smoother": "transformers LabelSmoother(0.1)",
    "naive_maxsup": "naive MaxSup: CE + 0.1*(max - mean), autograd",
    "hf_smooth_ls": "hf_smooth smoothed_cross_entropy, LS 0.1",
    "hf_smooth_maxsup": "hf_smooth smoothed_cross_entropy, MaxSup 0.1",
    "fused_ls": "hf_smooth fused, LS 0.1",
    "fused_maxsup": "hf_smooth fused, MaxSup 0.1",
    "liger_fused_ls": "Liger fused linear CE, LS 0.1 (CUDA)",
}
REFERENCE = "torch_ce_ls"
EPSILON = ALPHA = 0.1


# --------------------------------------------------------------------------------------------------------------------
# Child: one variant, one case
# --------------------------------------------------------------------------------------------------------------------


def _loss_fn(name: str, chunk_size):
    import torch.nn.functional as F

    if name == "torch_ce":
        return lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y)
    if name == "torch_ce_ls":
        return lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y, label_smoothing=EPSILON)
    if name == "hf_label_smoother":
        from transformers.trainer_pt_utils import LabelSmoother

        smoother = LabelSmoother(epsilon=EPSILON)
        return lambda h, w, y: smoother({"logits": F.linear(h, w)}, y)
    if name == "naive_maxsup":

        def naive_maxsup(h, w, y):
            logits = F.linear(h, w).float()
            ce = F.cross_entropy(logits, y, reduction="none")
            scored = y != -100
            penalty = logits.max(dim=-1).values - logits.mean(dim=-1)
            return ((ce + ALPHA * penalty) * scored).sum() / scored.sum()

        return naive_maxsup
    if name in ("hf_smooth_ls", "hf_smooth_maxsup"):
        from hf_smooth import smoothed_cross_entropy

        knobs = {"epsilon": EPSILON} if name == "hf_smooth_ls" else {"alpha": ALPHA}
        return lambda h, w, y: smoothed_cross_entropy(F.linear(h, w), y, **knobs)
    if name in ("fused_ls", "fused_maxsup"):
        from hf_smooth.fused import fused_linear_smoothed_loss

        knobs = {"method": "label_smoothing", "epsilon": EPSILON} if name == "fused_ls" else {
            "method": "maxsup", "alpha": ALPHA}
        return lambda h, w, y: fused_linear_smoothed_loss(h, w, y, chunk_size=chunk_size, **knobs)
    if name == "liger_fused_ls":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(label_smoothing=EPSILON)
        return lambda h, w, y: liger(w, h, y)
    raise ValueError(name)


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(args) -> dict:
    import resource

    import torch

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    fn = _loss_fn(args.variant, args.chunk_size)  # imports happen here, before the baseline

    gen = torch.Generator(device=device).manual_seed(0)
    # In place: torch.randn(...) * scale would leave a same-size temporary in the RSS high-water mark.
    hidden = torch.empty(args.tokens, args.hidden, device=device, dtype=dtype).normal_(generator=gen)
    weight = torch.empty(args.vocab, args.hidden, device=device, dtype=dtype)
    weight.normal_(std=args.hidden**-0.5, generator=gen)
    labels = torch.randint(args.vocab, (args.tokens,), device=device, generator=gen)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        base_current = _current_rss_bytes()
    times, loss_value = [], None
    for step in range(args.warmup + args.repeats):
        hidden.grad = weight.grad = None
        sync()
        start = time.perf_counter()
        loss = fn(hidden, weight, labels)
        loss.backward()
        sync()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
        loss_value = float(loss.detach().float())
        del loss
    if cuda:
        peak_extra = torch.cuda.max_memory_allocated() - base
        note = ""
    else:
        peak_extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        # The baseline is a high-water mark; it should be the current RSS, not an earlier transient.
        note = f"baseline high-water mark {base / 2**20:.0f} MiB, current RSS {base_current / 2**20:.0f} MiB"
    return {
        "variant": args.variant,
        "vocab": args.vocab,
        "time_s": statistics.median(times),
        "times_s": times,
        "peak_extra_bytes": peak_extra,
        "loss": loss_value,
        "grad_norm_weight": float(weight.grad.float().norm()),
        "note": note,
    }


# --------------------------------------------------------------------------------------------------------------------
# Parent: every variant in its own process, one table
# --------------------------------------------------------------------------------------------------------------------


def _variants_for(args) -> list[str]:
    if args.variants:
        return list(args.variants)
    names = [name for name in VARIANTS if name != "liger_fused_ls"]
    if args.device.startswith("cuda"):
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is not None:
            names.append("liger_fused_ls")
    return names


def run_parent(args) -> list[dict]:
    rows = []
    for vocab in args.vocab:
        for name in _variants_for(args):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--variant", name, "--vocab", str(vocab),
                   "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--device", args.device,
                   "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
            if args.chunk_size:
                cmd += ["--chunk-size", str(args.chunk_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout, proc.stderr, file=sys.stderr)
                rows.append({"variant": name, "vocab": vocab, "error": f"exit {proc.returncode}"})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if args.verbose:
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def format_table(rows: list[dict], args) -> str:
    lines = [
        f"N={args.tokens} tokens, H={args.hidden}, device={args.device}, "
        f"dtype={'bf16' if args.device.startswith('cuda') else 'fp32'}, warm-up {args.warmup}, median of "
        f"{args.repeats}; torch threads={_threads()}; ratios to {REFERENCE}",
        "",
        "| V | variant | fwd+bwd time (s) | time ratio | peak extra memory (MiB) | memory ratio | loss |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    reference = {r["vocab"]: r for r in rows if r["variant"] == REFERENCE and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['vocab']} | {r['variant']} | {r['error']} | | | | |")
            continue
        ref = reference.get(r["vocab"])
        time_ratio = f"{r['time_s'] / ref['time_s']:.2f}" if ref else "-"
        mem_ratio = f"{r['peak_extra_bytes'] / ref['peak_extra_bytes']:.3f}" if ref and ref["peak_extra_bytes"] else "-"
        lines.append(
            f"| {r['vocab']} | {r['variant']} | {r['time_s']:.3f} | {time_ratio} | "
            f"{r['peak_extra_bytes'] / 2**20:.0f} | {mem_ratio} | {r['loss']:.4f} |"
        )
    return "\n".join(lines)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (N=256, H=64, V=2000), 2 repeats")
    parser.add_argument("--tokens", type=int, default=4096, help="N, rows of hidden states")
    parser.add_argument("--hidden", type=int, default=1024, help="H, hidden size")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256], help="V, one case per value")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), help="subset of variants to run")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk for the fused variants")
    parser.add_argument("--json", default=None, help="also write the raw rows to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="print each child's result as it arrives")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.vocab, args.repeats = 256, 64, [2000], 2
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        args.vocab = args.vocab[0] if isinstance(args.vocab, list) else args.vocab
        print(json.dumps(run_child(args)))
        return
    rows = run_parent(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "platform": platform.platform(), "rows": rows}, f, indent=1)
    print(format_table(rows, args))


if __name__ == "__main__":
    main()
