"""Comparison reports: collect the runs of a CE / LS / MaxSup sweep and summarize them across seeds.

Every number in a report comes from a run's ``metrics.json`` (written by the recipes); nothing is typed by hand.
Used by ``recipes/compare.py`` and ``notebooks/02_ls_vs_maxsup.ipynb``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..methods import get_method

__all__ = [
    "Run",
    "MethodSpec",
    "distinct_output_share",
    "load_runs",
    "pool_diagnostics",
    "summarize",
    "to_markdown",
    "runs_to_markdown",
    "to_csv",
    "plot_training_curves",
]

# (metric key in metrics.json, column title, lower is better?)
DEFAULT_METRICS = [
    ("eval_nll", "eval NLL", True),
    ("eval_ppl", "eval ppl", True),
    ("eval_mean_token_accuracy", "token acc.", False),
    ("eval_ece", "ECE", True),
    ("eval_ece_adaptive", "ECE (adaptive)", True),
    ("eval_confidence", "confidence", None),
    ("eval_brier", "Brier", True),
    ("eval_entropy", "entropy", None),
    ("eval_logit_gap", "logit gap", None),
    ("eval_bleu", "BLEU", False),
    ("eval_chrf", "chrF", False),
    ("eval_distinct_outputs", "distinct outputs", False),
]


@dataclass(frozen=True)
class MethodSpec:
    """One arm of a comparison, written ``ce``, ``ls:0.1`` or ``maxsup:0.1-0.2`` (a linear ramp)."""

    name: str
    method: str
    alpha: float
    alpha_end: float | None = None

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        kind, _, value = text.partition(":")
        kind = kind.strip().lower()
        try:
            row = get_method(kind, allow_short=True)
        except ValueError:
            raise ValueError(f"Unknown method {text!r}: use ce, ls:EPS or maxsup:ALPHA[-ALPHA_END].") from None
        if row.knob is None:
            if value:
                raise ValueError(f"{text!r}: plain cross-entropy takes no strength.")
            return cls(name=row.label, method=row.name, alpha=0.0)
        if not value:
            raise ValueError(f"{text!r}: give the strength, e.g. {kind}:0.1")
        start, _, end = value.partition("-")
        try:
            alpha, alpha_end = float(start), float(end) if end else None
        except ValueError:
            raise ValueError(
                f"{text!r}: the strength must be a plain decimal number, or START-END for a linear ramp "
                f"(e.g. {kind}:0.1 or {kind}:0.1-0.2; no exponent notation)."
            ) from None
        name = f"{row.label} {alpha:g}" + (f"->{alpha_end:g}" if alpha_end is not None else "")
        return cls(name=name, method=row.name, alpha=alpha, alpha_end=alpha_end)

    @property
    def slug(self) -> str:
        return self.name.lower().replace(" ", "").replace("->", "-").replace(".", "p")

    def recipe_flags(self) -> list[str]:
        flags = ["--smoothing_method", self.method]
        if get_method(self.method).knob is not None:
            flags += ["--smoothing_alpha", str(self.alpha)]
        if self.alpha_end is not None:
            flags += ["--smoothing_schedule", "linear", "--smoothing_alpha_end", str(self.alpha_end)]
        else:
            flags += ["--smoothing_schedule", "constant"]
        return flags


@dataclass
class Run:
    method: str
    seed: int
    path: Path
    metrics: dict = field(default_factory=dict)

    def diagnostics(self) -> dict | None:
        path = self.path / "diagnostics.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def log_history(self) -> list[dict]:
        path = self.path / "log_history.json"
        return json.loads(path.read_text()) if path.is_file() else []


def distinct_output_share(path: str | Path) -> float | None:
    """Distinct hypotheses / distinct sources in an ``eval_predictions.jsonl`` (rows with ``source`` and
    ``hypothesis``): 1.0 when every distinct source gets its own output, near 0 when the model says one thing to
    everything. None when the file has no such rows."""
    sources, hypotheses = set(), set()
    with open(path) as rows:
        for line in rows:
            if not line.strip():
                continue
            row = json.loads(line)
            if "source" in row and "hypothesis" in row:
                sources.add(row["source"])
                hypotheses.add(row["hypothesis"])
    return len(hypotheses) / len(sources) if sources else None


def load_runs(root: str | Path) -> list[Run]:
    """Every ``<root>/<method-slug>/seed<k>/metrics.json``, with the method name recorded in ``run.json``; a run with
    an ``eval_predictions.jsonl`` also gets ``eval_distinct_outputs`` (see `distinct_output_share`)."""
    runs = []
    for metrics_path in sorted(Path(root).glob("*/seed*/metrics.json")):
        run_dir = metrics_path.parent
        info_path = run_dir / "run.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        metrics = json.loads(metrics_path.read_text())
        predictions = run_dir / "eval_predictions.jsonl"
        if "eval_distinct_outputs" not in metrics and predictions.is_file():
            metrics["eval_distinct_outputs"] = distinct_output_share(predictions)
        runs.append(
            Run(
                method=info.get("method", run_dir.parent.name),
                seed=int(info.get("seed", run_dir.name.removeprefix("seed"))),
                path=run_dir,
                metrics=metrics,
            )
        )
    return runs


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)  # sample standard deviation
    return mean, math.sqrt(var)


def _columns(runs: list[Run], metrics) -> list[tuple[str, str]]:
    return [(key, title) for key, title, _ in metrics if any(key in run.metrics for run in runs)]


def summarize(runs: list[Run], metrics=DEFAULT_METRICS, order: list[str] | None = None) -> dict:
    """``{"methods": [...], "columns": [(key, title)], "cells": {method: {key: (mean, sd, n)}}}``.

    Metrics absent from every run are dropped (BLEU for language modeling); the sd is the sample standard
    deviation over seeds (None with one seed).
    """
    methods = order or list(dict.fromkeys(run.method for run in runs))
    columns = _columns(runs, metrics)
    cells = {}
    for method in methods:
        mine = [run for run in runs if run.method == method]
        cells[method] = {}
        for key, _ in columns:
            values = [float(run.metrics[key]) for run in mine if run.metrics.get(key) is not None]
            if values:
                mean, sd = _mean_sd(values)
                cells[method][key] = (mean, sd, len(values))
    return {"methods": methods, "columns": columns, "cells": cells}


def _cell(value) -> str:
    if value is None:
        return "n/a"
    mean, sd, n = value
    return f"{mean:.4f}" if sd is None else f"{mean:.4f} ± {sd:.4f}"


def _md(text: str) -> str:
    return text.replace("|", "\\|")  # a literal pipe would split the Markdown cell


def to_markdown(summary: dict) -> str:
    """A Markdown table: one row per method, ``mean ± sd`` (4 decimals) per metric, "n/a" where a method has none."""
    header = ["method", "runs"] + [title for _, title in summary["columns"]]
    lines = ["| " + " | ".join(map(_md, header)) + " |", "|" + "---|" * len(header)]
    for method in summary["methods"]:
        cells = summary["cells"][method]
        count = max((v[2] for v in cells.values()), default=0)
        row = [method, str(count)] + [_cell(cells.get(key)) for key, _ in summary["columns"]]
        lines.append("| " + " | ".join(map(_md, row)) + " |")
    return "\n".join(lines) + "\n"


def runs_to_markdown(runs: list[Run], metrics=DEFAULT_METRICS, order: list[str] | None = None) -> str:
    """A Markdown table with one row per run (method, seed, each metric to 4 decimals, "n/a" where the run has none):
    the per-seed view behind `to_markdown`'s means, for when seeds differ more than methods do. Methods in `order`
    (default: first appearance), seeds ascending; the columns are `summarize`'s."""
    order = order or list(dict.fromkeys(run.method for run in runs))
    columns = _columns(runs, metrics)
    header = ["method", "seed"] + [title for _, title in columns]
    lines = ["| " + " | ".join(map(_md, header)) + " |", "|" + "---|" * len(header)]
    for method in order:
        for run in sorted((run for run in runs if run.method == method), key=lambda run: run.seed):
            values = [run.metrics.get(key) for key, _ in columns]
            row = [method, str(run.seed)] + ["n/a" if value is None else f"{float(value):.4f}" for value in values]
            lines.append("| " + " | ".join(map(_md, row)) + " |")
    return "\n".join(lines) + "\n"


def to_csv(summary: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method"] + [f"{key}_{part}" for key, _ in summary["columns"] for part in ("mean", "sd", "n")])
    for method in summary["methods"]:
        row = [method]
        for key, _ in summary["columns"]:
            mean, sd, n = summary["cells"][method].get(key, (None, None, 0))
            row += ["" if mean is None else repr(mean), "" if sd is None else repr(sd), n]
        writer.writerow(row)
    return out.getvalue()


def pool_diagnostics(states: list[dict]):
    """One [`TokenMetrics`] holding the evaluation tokens of several runs (e.g. every seed of a method), for the plots.

    `states` are saved evaluations (``diagnostics.json``, i.e. `TokenMetrics.to_dict()`). Bin counts, bin sums and the
    logit-gap histogram are sums over tokens, so pooling them is exact: the pooled reliability diagram, equal-width
    ECE and token means are those of the concatenated evaluation sets. The equal-mass ECE needs every token's
    (confidence, correct) pair, which ``diagnostics.json`` does not keep, so the pooled accumulator has
    ``adaptive_ece`` off. Runs saved with different bins or histogram edges cannot be pooled (ValueError).
    """
    from ..metrics import TokenMetrics

    if not states:
        raise ValueError("pool_diagnostics needs at least one saved evaluation.")
    pooled = None
    for state in states:
        state = {k: v for k, v in state.items() if k not in ("token_confidence", "token_correct")}
        if not isinstance(state.get("layout"), dict):
            raise ValueError("Not a saved TokenMetrics (no 'layout'): expected the contents of a diagnostics.json.")
        state["layout"] = {**state["layout"], "adaptive_ece": False}
        metrics = TokenMetrics.from_dict(state)
        pooled = metrics if pooled is None else pooled.merge(metrics)
    return pooled


def plot_training_curves(runs: list[Run], path: str | Path, keys=("loss", "nll")) -> Path:
    """Training objective and NLL per optimizer step, mean over seeds, one line per method.

    The objective differs between methods (LS and MaxSup add their penalty); the NLL panel is the comparable one.
    Drawn on a `Figure` with the Agg canvas, as in hf_smooth.plots: no pyplot state, no backend switch.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5 * len(keys), 3.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)
    methods = list(dict.fromkeys(run.method for run in runs))
    for ax, key in zip(axes[0], keys):
        for method in methods:
            curves: dict[int, list[float]] = {}
            for run in (r for r in runs if r.method == method):
                for log in run.log_history():
                    if key in log and "step" in log and not any(k.startswith("eval_") for k in log):
                        curves.setdefault(int(log["step"]), []).append(float(log[key]))
            if curves:
                steps = sorted(curves)
                ax.plot(steps, [sum(curves[s]) / len(curves[s]) for s in steps], marker=".", label=method)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"train {key}")
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
