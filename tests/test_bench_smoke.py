"""The benchmarks run end to end: benchmarks/bench_loss.py (``--quick``: small shapes, every CPU variant in its own
process) and benchmarks/bench_trainer.py (``--quick``: a tiny Llama from a config; the slow tests cover the default
one-process-per-variant layout)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loss.py"


def test_bench_loss_quick_runs_every_variant(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    expected = ["torch_ce", "torch_ce_ls", "hf_label_smoother", "naive_maxsup", "hf_smooth_ls", "hf_smooth_maxsup",
                "fused_ls", "fused_maxsup"]
    assert [r["variant"] for r in rows] == expected
    assert not [r for r in rows if "error" in r]
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        assert r["time_s"] > 0 and r["peak_extra_bytes"] >= 0
    # Every variant scores the same hidden states and weight: the same loss within each family.
    for family in (["torch_ce_ls", "hf_label_smoother", "hf_smooth_ls", "fused_ls"],
                   ["naive_maxsup", "hf_smooth_maxsup", "fused_maxsup"]):
        losses = [by_name[name]["loss"] for name in family]
        assert max(losses) == pytest.approx(min(losses), rel=1e-5), dict(zip(family, losses))
    table = proc.stdout
    assert "| V | variant |" in table and all(f"| {name} |" in table for name in expected)


TRAINER_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_trainer.py"
TRAINER_VARIANTS = ["hf_ce", "hf_ls", "smooth_none", "smooth_ls", "smooth_ls_fused", "smooth_maxsup",
                    "smooth_maxsup_fused"]


def _load_bench_trainer():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_trainer", TRAINER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_trainer_quick_runs_every_variant(tmp_path):
    """bench_trainer.py --quick (tiny Llama from a config, LoRA, one child process): a row per variant, and the
    first-batch losses equal a float64 oracle computed here from the same model's logits."""
    import torch

    from oracles import maxsup_cross_entropy, soft_target_cross_entropy

    out = tmp_path / "bench_trainer.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(TRAINER_SCRIPT), "--quick", "--device", "cpu", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["variants"]
    assert [r["variant"] for r in rows] == TRAINER_VARIANTS
    assert not [r for r in rows if "error" in r]
    table_rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [line.split("|")[1].strip() for line in table_rows[1:]] == TRAINER_VARIANTS, proc.stdout
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"]) and r["peak_extra_bytes"] >= 0
        # A "_fused" row must really have run the fused loss, and the others must not have.
        assert r["fused"] is r["variant"].endswith("_fused"), r

    # Oracle: LoRA's B matrices start at zero, so the first batch is scored by the base model; rebuild it with the
    # script's builder (the same seed) and score its logits with the float64 definitions of tests/oracles.py.
    bench = _load_bench_trainer()
    args = bench.parse_args(["--quick", "--device", "cpu"])
    model = bench._build_model(args, torch.float32).eval()
    ids = torch.tensor(report["first_batch_input_ids"])
    assert ids.shape == (args.batch_size, args.seq_len)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    z, y = logits[:, :-1], ids[:, 1:]
    expected = {
        "cross-entropy": soft_target_cross_entropy(z, y, epsilon=0.0).mean().item(),
        "label smoothing 0.1": soft_target_cross_entropy(z, y, epsilon=0.1).mean().item(),
        "MaxSup 0.1": maxsup_cross_entropy(z, y, alpha=0.1).mean().item(),
    }
    assert len(set(round(v, 2) for v in expected.values())) == 3, expected  # three clearly different objectives
    for family, names in bench.FAMILIES.items():
        for name in names:
            assert by_name[name]["first_loss"] == pytest.approx(expected[family], rel=1e-5), (name, expected)


def _run_bench_trainer(tmp_path, *extra):
    out = tmp_path / "bench_trainer.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(TRAINER_SCRIPT), "--device", "cpu", "--json", str(out), *extra],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_bench_trainer_one_process_per_variant_and_rounds(tmp_path):
    """The default layout: one child per variant and round, the batches tokenized once by the parent."""
    variants = ["hf_ce", "smooth_maxsup_fused"]
    report, _ = _run_bench_trainer(
        tmp_path, "--model", "tiny", "--batch-size", "2", "--seq-len", "32", "--lora-r", "4", "--warmup", "1",
        "--repeats", "2", "--rounds", "2", "--variants", *variants,
    )
    # Round 0 runs the variants in order, round 1 reversed (a drift of the machine's load hits both alike).
    assert [(r["round"], r["variant"]) for r in report["rows"]] == [
        (0, "hf_ce"), (0, "smooth_maxsup_fused"), (1, "smooth_maxsup_fused"), (1, "hf_ce")]
    merged = {r["variant"]: r for r in report["variants"]}
    for name in variants:
        rounds = [r for r in report["rows"] if r["variant"] == name]
        # Pooled over both rounds; each child starts from the same model and batches, so the first loss repeats.
        assert sorted(merged[name]["times_s"]) == sorted(rounds[0]["times_s"] + rounds[1]["times_s"])
        assert merged[name]["peak_extra_bytes"] == max(r["peak_extra_bytes"] for r in rounds) > 0
        assert rounds[0]["first_loss"] == rounds[1]["first_loss"]
    assert merged["smooth_maxsup_fused"]["fused"] and not merged["hf_ce"]["fused"]


def test_bench_trainer_interleaved_gives_paired_ratios(tmp_path):
    """--interleaved: one optimizer step of each variant in turn in one process, same batches and dropout masks."""
    report, stdout = _run_bench_trainer(tmp_path, "--quick", "--interleaved")
    rows = report["variants"]
    assert [r["variant"] for r in rows] == TRAINER_VARIANTS
    by_name = {r["variant"]: r for r in rows}
    reference = by_name["hf_ce"]
    assert reference["paired_time_ratio"] == 1.0
    for r in rows:
        assert r["peak_extra_bytes"] is None  # one process: no per-variant memory number
        # The median of step-by-step ratios, not a ratio of medians: steps i of all variants ran back to back.
        ratios = [t / ref for t, ref in zip(r["times_s"], reference["times_s"], strict=True)]
        assert r["paired_time_ratio"] == pytest.approx(statistics.median(ratios))
    # Same objective, same batch, same LoRA dropout masks: the first step's loss and gradient norm agree.
    bench = _load_bench_trainer()
    for names in bench.FAMILIES.values():
        for name in names[1:]:
            assert by_name[name]["first_loss"] == pytest.approx(by_name[names[0]]["first_loss"], rel=1e-5)
            assert by_name[name]["first_grad_norm"] == pytest.approx(by_name[names[0]]["first_grad_norm"], rel=1e-4)
    assert "interleaved in one process" in stdout


class _RunsCodeOnLoad:
    """Unpickling it creates a file: the kind of payload `torch.load(weights_only=False)` would execute."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return open, (self.sentinel, "w")


def test_bench_trainer_data_is_loaded_weights_only(tmp_path):
    """The batches file is read with weights_only=True: a pickled object that runs code is refused, even where the
    environment turns torch's safe default off (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD overrides only an implicit choice)."""
    import torch

    sentinel = tmp_path / "code-ran"
    data = tmp_path / "blocks.pt"
    torch.save({"input_ids": torch.zeros(4, 32, dtype=torch.long), "source": _RunsCodeOnLoad(str(sentinel))}, data)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    proc = subprocess.run(
        [sys.executable, str(TRAINER_SCRIPT), "--child", "--variants", "hf_ce", "--model", "tiny", "--device", "cpu",
         "--dtype", "fp32", "--batch-size", "2", "--seq-len", "32", "--warmup", "1", "--repeats", "1",
         "--data", str(data)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode != 0
    assert "Weights only load failed" in proc.stderr, proc.stderr[-3000:]
    assert "Unsupported global: GLOBAL io.open" in proc.stderr, proc.stderr[-3000:]
    assert not sentinel.exists()
