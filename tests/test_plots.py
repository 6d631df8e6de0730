"""hf_smooth.plots: the PNGs exist, open, have the promised pixel size and are not blank; runs overlay."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
import torch

from hf_smooth.metrics import TokenMetrics
from hf_smooth.plots import _coarsen, plot_logit_gaps, plot_reliability, save_diagnostic_plots


pytestmark = pytest.mark.usefixtures("one_thread")


def make_metrics(factor: float, seed: int = 0) -> TokenMetrics:
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(600, 20, generator=g) * 2.0
    labels = torch.multinomial(true.softmax(-1), 1, generator=g).squeeze(-1)
    return TokenMetrics().update(true * factor, labels)


def check_png(path, width, height):
    assert path.exists() and path.suffix == ".png"
    assert path.stat().st_size > 5_000
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (height, width)
    assert float(image[..., :3].std()) > 0.05  # something was drawn


def test_save_diagnostic_plots_single_run(tmp_path):
    paths = save_diagnostic_plots(make_metrics(3.0), tmp_path / "plots", prefix="eval")
    assert [p.name for p in paths] == ["eval_reliability.png", "eval_logit_gap.png"]
    check_png(paths[0], 500, 600)  # figsize (5, 6) at 100 dpi
    check_png(paths[1], 600, 400)  # figsize (6, 4) at 100 dpi


def test_overlay_from_objects_dicts_and_json_files(tmp_path):
    ce, ls, maxsup = make_metrics(3.0), make_metrics(1.0), make_metrics(0.6)
    saved = maxsup.save(tmp_path / "maxsup.json")
    runs = {"CE": ce, "LS 0.1": json.loads(json.dumps(ls.to_dict())), "MaxSup": saved}
    reliability = plot_reliability(runs, tmp_path / "cmp_reliability.png", dpi=80)
    check_png(reliability, 400, 480)
    gaps = plot_logit_gaps(runs, tmp_path / "cmp_gaps.png", figsize=(7.0, 3.0))
    check_png(gaps, 700, 300)
    paths = save_diagnostic_plots(runs, tmp_path, prefix="compare")
    assert all(p.exists() for p in paths)


def test_rejects_runs_it_cannot_draw(tmp_path):
    with pytest.raises(ValueError, match="diagnostics=False"):
        plot_reliability(TokenMetrics(diagnostics=False), tmp_path / "x.png")
    other = TokenMetrics(gap_edges=[0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="edges"):
        plot_logit_gaps({"a": make_metrics(1.0), "b": other}, tmp_path / "y.png")
    with pytest.raises(TypeError):
        plot_reliability({"a": 3}, tmp_path / "z.png")
    with pytest.raises(ValueError, match="No run"):
        plot_reliability({}, tmp_path / "z.png")


def test_empty_accumulator_still_plots(tmp_path):
    paths = save_diagnostic_plots(TokenMetrics(), tmp_path)
    for path in paths:
        assert matplotlib.image.imread(path).ndim == 3


def test_coarsen_trims_merges_and_keeps_counts():
    edges = [i * 0.5 for i in range(11)]  # 10 bins
    counts = [[0, 0, 1, 2, 3, 4, 5, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 6, 0, 0]]
    new_edges, new_counts = _coarsen(edges, counts, max_bars=3)
    assert new_edges[0] == 1.0 and new_edges[-1] >= 4.0  # occupied bins 2..7 -> [1.0, 4.0)
    assert all(len(c) == len(new_edges) - 1 <= 3 for c in new_counts)
    assert [sum(c) for c in new_counts] == [15, 7]
