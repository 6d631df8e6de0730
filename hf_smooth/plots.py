"""PNG diagnostics of [`TokenMetrics`]: reliability diagram (with its confidence histogram) and logit-gap histogram.

Every function takes one run or several to overlay. A run is a [`TokenMetrics`], its saved form
(`TokenMetrics.to_dict()`, possibly read back from JSON) or the path of a JSON file written by `TokenMetrics.save`;
several runs are a mapping from a legend label to any of those, e.g. ``{"CE": m1, "LS 0.1": m2, "MaxSup": m3}``,
so a comparison script can re-plot saved evaluations without the models.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never through `pyplot`: no global
state, no display needed, safe in a training process. The PNG is exactly ``figsize * dpi`` pixels.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import FORMAT, TokenMetrics

__all__ = ["plot_logit_gaps", "plot_reliability", "save_diagnostic_plots"]

Run = Union[TokenMetrics, dict, str, os.PathLike]
Runs = Union[Run, Mapping[str, Run]]


def _as_metrics(run: Run) -> TokenMetrics:
    if isinstance(run, TokenMetrics):
        return run
    if isinstance(run, dict):
        return TokenMetrics.from_dict(run)
    if isinstance(run, (str, os.PathLike)):
        return TokenMetrics.from_dict(json.loads(Path(run).read_text()))
    raise TypeError(f"Expected a TokenMetrics, its to_dict() form or a JSON path; got {type(run).__name__}.")


def _as_runs(runs: Runs) -> dict[str, TokenMetrics]:
    """A single run becomes ``{"": run}``; a mapping keeps its labels and order."""
    saved_form = isinstance(runs, dict) and runs.get("format") == FORMAT
    single = saved_form or isinstance(runs, (TokenMetrics, str, os.PathLike))
    items = {"": runs} if single else dict(runs)
    if not items:
        raise ValueError("No run to plot.")
    out = {}
    for label, run in items.items():
        metrics = _as_metrics(run)
        if not metrics.layout.diagnostics:
            raise ValueError(f"Run {label!r} was accumulated with diagnostics=False: it has no bins to plot.")
        out[str(label)] = metrics
    return out


def _label(name: str, text: str) -> str:
    return f"{name} ({text})" if name else text


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png")  # no bbox_inches="tight": the size stays figsize * dpi
    return path


def plot_reliability(
    runs: Runs,
    path: str | os.PathLike,
    *,
    title: str | None = "Reliability diagram",
    figsize: tuple[float, float] = (5.0, 6.0),
    dpi: int = 100,
) -> Path:
    """Reliability diagram (accuracy against confidence per equal-width bin) above the share of tokens per bin.

    One run: accuracy bars with the gap to the bin's mean confidence shaded. Several runs: one line per run through
    (mean confidence, accuracy) of its non-empty bins. The legend holds each run's ECE. Returns the PNG path.
    """
    runs = _as_runs(runs)
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="0.5", linewidth=1, label="perfect calibration")
    single = len(runs) == 1
    for i, (name, metrics) in enumerate(runs.items()):
        color = f"C{i}"
        bins = metrics.reliability()
        results = metrics.compute()
        edges, count = bins["edges"], bins["count"]
        lefts, width = edges[:-1], edges[1] - edges[0]
        nonempty = [j for j, c in enumerate(count) if c > 0]
        total = sum(count) or 1.0
        label = _label(name, f"ECE {results['ece']:.3f}, {results['num_tokens']} tokens")
        if single:
            acc = [bins["accuracy"][j] for j in nonempty]
            conf = [bins["confidence"][j] for j in nonempty]
            x = [lefts[j] for j in nonempty]
            top.bar(x, acc, width=width, align="edge", color=color, edgecolor="black", linewidth=0.5, label=label)
            low = [min(a, c) for a, c in zip(acc, conf)]
            gap = [abs(a - c) for a, c in zip(acc, conf)]
            top.bar(x, gap, bottom=low, width=width, align="edge", color="red", alpha=0.3, edgecolor="red",
                    linewidth=0.5, hatch="//", label="gap to mean confidence")
            bottom.bar(lefts, [c / total for c in count], width=width, align="edge", color=color, edgecolor="black",
                       linewidth=0.5)
            bottom.axvline(results["confidence"], color="black", linestyle="--", linewidth=1, label="mean confidence")
            bottom.axvline(results["accuracy"], color="red", linestyle=":", linewidth=1, label="accuracy")
            bottom.legend(fontsize="x-small", loc="upper left")
        else:
            top.plot([bins["confidence"][j] for j in nonempty], [bins["accuracy"][j] for j in nonempty],
                     marker="o", markersize=3, color=color, label=label)
            bottom.stairs([c / total for c in count], edges, color=color, linewidth=1.5)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    if title:
        top.set_title(title)
    top.legend(fontsize="x-small", loc="upper left")
    bottom.set(xlabel="confidence (top-1 probability)", ylabel="share of tokens")
    return _save(fig, path)


def _coarsen(edges: list[float], counts: list[list[float]], max_bars: int) -> tuple[list[float], list[list[float]]]:
    """Trim to the bins any run occupies and merge neighbours so at most ``max_bars`` remain."""
    occupied = [j for j in range(len(edges) - 1) if any(c[j] > 0 for c in counts)]
    if not occupied:
        return edges[:2], [[0.0] for _ in counts]
    first, last = occupied[0], occupied[-1] + 1
    factor = max(1, math.ceil((last - first) / max_bars))
    starts = list(range(first, last, factor))
    new_edges = [edges[s] for s in starts] + [edges[min(starts[-1] + factor, len(edges) - 1)]]
    new_counts = [[sum(c[s : min(s + factor, len(edges) - 1)]) for s in starts] for c in counts]
    return new_edges, new_counts


def plot_logit_gaps(
    runs: Runs,
    path: str | os.PathLike,
    *,
    title: str | None = "Logit gap z_max - mean z per token",
    figsize: tuple[float, float] = (6.0, 4.0),
    dpi: int = 100,
    max_bars: int = 60,
) -> Path:
    """Histogram (as a density, so runs of different sizes compare) of the per-token logit gap, one outline per
    run, with each run's mean gap as a dashed line. The range is cut to the occupied bins of all runs and neighbouring
    bins are merged to at most ``max_bars``. Returns the PNG path."""
    runs = _as_runs(runs)
    hists = [m.logit_gap_histogram() for m in runs.values()]
    for h in hists[1:]:
        if h["edges"] != hists[0]["edges"]:
            raise ValueError("Runs with different logit-gap edges cannot share one histogram.")
    edges, counts = _coarsen(hists[0]["edges"], [h["count"] for h in hists], max_bars)
    widths = [b - a for a, b in zip(edges, edges[1:])]
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    ax = fig.subplots()
    single = len(runs) == 1
    for i, ((name, metrics), count) in enumerate(zip(runs.items(), counts)):
        color = f"C{i}"
        total = sum(count) or 1.0
        density = [c / (total * w) for c, w in zip(count, widths)]
        mean_gap = metrics.compute()["logit_gap"]
        ax.stairs(density, edges, color=color, linewidth=1.5, fill=single, alpha=0.6 if single else 1.0,
                  label=_label(name, f"mean {mean_gap:.3g}"))
        ax.axvline(mean_gap, color=color, linestyle="--", linewidth=1)
    ax.set(xlabel="z_max - mean z", ylabel="density")
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    return _save(fig, path)


def save_diagnostic_plots(runs: Runs, output_dir: str | os.PathLike, *, prefix: str = "eval") -> list[Path]:
    """Write ``{prefix}_reliability.png`` and ``{prefix}_logit_gap.png`` into ``output_dir``; returns the paths."""
    output_dir = Path(output_dir)
    runs = _as_runs(runs)
    return [
        plot_reliability(runs, output_dir / f"{prefix}_reliability.png"),
        plot_logit_gaps(runs, output_dir / f"{prefix}_logit_gap.png"),
    ]
