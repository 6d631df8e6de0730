"""benchmarks/bench_loss.py runs end to end (``--quick``: small shapes, every CPU variant in its own process)."""

from __future__ import annotations

import json
import os
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
