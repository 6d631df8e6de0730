"""Per-token statistics that carry the calibration metrics, and the metrics computed back from them.

`evaluate` stores the inputs of a metric as Arrow columns, one row per example: a logit vector per token does not fit
(and gathering full logits is what a Trainer evaluation should avoid). Four numbers per scored token are enough for
the metrics of [`hf_smooth.metrics.TokenMetrics`] that are token means or built from (confidence, correct) pairs:

    confidence   top-1 probability max_k p_k
    correct      1 when argmax z == y (first maximum on ties), else 0
    nll          -log p_y
    brier        multiclass Brier term sum_k (p_k - onehot(y)_k)^2

They come from the same per-token code as `TokenMetrics` (`hf_smooth.metrics._token_values`), in the same compute
dtype, and the metrics below apply the same binning (`_confidence_bins`, `equal_mass_ece`): the numbers equal
`TokenMetrics.compute()`'s up to the order of float64 additions.

In a Trainer, [`TokenStatisticsPreprocessor`] is the `preprocess_logits_for_metrics`: it turns each evaluation
batch's ``(B, T, K)`` logits into ``(B, T, 4)`` statistics on the device, so the Trainer gathers and keeps 4 numbers
per position instead of ``K`` (with a 32k vocabulary, 8,000 times less). [`ComputeMetrics`] is the
`compute_metrics`: it feeds the scored positions to an `evaluate` module (or `evaluate.combine` of several) and
returns its results. Neither imports `evaluate`; only the modules themselves do.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ..losses import check_inputs, check_label_range, compute_dtype, perplexity, row_chunks
from ..metrics import PAD_VALUE, MetricsLayout, _confidence_bins, _token_values, equal_mass_ece, row_reader

__all__ = [
    "STATISTICS",
    "ComputeMetrics",
    "TokenStatisticsPreprocessor",
    "scored_statistics",
    "summarize",
    "token_statistics",
]

# Column order of the statistics tensor (last dimension).
STATISTICS = ("confidence", "correct", "nll", "brier")

# Only the fields `_token_values` needs from a layout (bins and histogram are not used here).
_LAYOUT = MetricsLayout(adaptive_ece=False)


@torch.no_grad()
def token_statistics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The four [`STATISTICS`] of every position, on the logits' device.

    Args:
        logits (`torch.Tensor` of shape `(..., K)`): aligned with `labels` (for causal LMs pass `logits[:, :-1]` and
            `labels[:, 1:]`, or use [`TokenStatisticsPreprocessor`] with `shift_labels=True`).
        labels (`torch.Tensor` of shape `(...)`): class indices in `[0, K)` or `ignore_index`.
        ignore_index (`int`, *optional*, defaults to -100): label of positions that are not scored.
        chunk_size (`int`, *optional*): rows of logits processed at once (default as in hf_smooth.losses).

    Returns a tensor of shape `(..., 4)` in float32 (float64 for float64 logits, the compute dtype of `TokenMetrics`,
    so nothing is rounded); ignored positions hold -1 in every column (a scored confidence is always > 0).
    """
    check_inputs(logits, labels, ignore_index)
    num_classes = logits.shape[-1]
    check_label_range(labels, num_classes, ignore_index)
    take_rows = row_reader(logits)
    flat_labels = labels.reshape(-1).to(device=logits.device, dtype=torch.long)
    cdtype = compute_dtype(logits.dtype)
    out = torch.full((flat_labels.shape[0], len(STATISTICS)), PAD_VALUE, dtype=cdtype, device=logits.device)
    valid_all = flat_labels != ignore_index
    for rows in row_chunks(flat_labels.shape[0], num_classes, chunk_size):
        valid = valid_all[rows]
        if not bool(valid.any()):
            continue
        index = valid.nonzero().squeeze(-1) + rows.start
        values = _token_values(take_rows(index).to(cdtype), flat_labels.index_select(0, index), _LAYOUT)
        out[index] = torch.stack([values.confidence, values.correct, values.nll, values.brier], dim=-1)
    return out.reshape(*labels.shape, len(STATISTICS))


def scored_statistics(statistics) -> dict[str, np.ndarray]:
    """The columns of the scored positions of a statistics array (any leading shape; a tensor or numpy array, e.g.
    the `predictions` a Trainer hands to `compute_metrics`), as float64 numpy arrays (`correct` as int8).

    Positions with a confidence <= 0 are dropped: ignored positions (-1) and the -100 the Trainer pads with when it
    concatenates batches of different lengths.
    """
    if torch.is_tensor(statistics):
        statistics = statistics.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(statistics, dtype=np.float64)
    if array.ndim < 1 or array.shape[-1] != len(STATISTICS):
        raise ValueError(
            f"Expected token statistics with a last dimension of {len(STATISTICS)} {STATISTICS}, got shape "
            f"{array.shape}: pass preprocess_logits_for_metrics=TokenStatisticsPreprocessor(...) to the Trainer."
        )
    rows = array.reshape(-1, len(STATISTICS))
    rows = rows[rows[:, 0] > 0.0]
    columns = {name: rows[:, i] for i, name in enumerate(STATISTICS)}
    columns["correct"] = columns["correct"].astype(np.int8)
    return columns


def summarize(columns: Mapping[str, Any], *, num_bins: int = 15) -> dict[str, float]:
    """The metrics of the per-token columns present in `columns` (each optional; the modules pass the ones they
    declare): `accuracy` (correct), `nll` and `ppl` (nll), `brier` (brier), `confidence` (confidence), `ece` and
    `ece_adaptive` over `num_bins` bins (confidence and correct). Definitions as in `TokenMetrics`, including the
    empty case (every mean 0, ppl 1)."""
    if int(num_bins) != num_bins or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins}.")
    data = {name: torch.from_numpy(np.asarray(value, dtype=np.float64).copy()).reshape(-1)  # Arrow columns: read-only
            for name, value in columns.items()}
    lengths = {name: value.shape[0] for name, value in data.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"Token statistics columns differ in length: {lengths}.")
    count = next(iter(lengths.values()), 0)

    def mean(name: str) -> float:
        return float(data[name].sum() / count) if count else 0.0

    out: dict[str, float] = {}
    if "nll" in data:
        out["nll"] = mean("nll")
        out["ppl"] = perplexity(out["nll"])
    if "correct" in data:
        out["accuracy"] = mean("correct")
    if "confidence" in data:
        out["confidence"] = mean("confidence")
    if "confidence" in data and "correct" in data:
        confidence, correct = data["confidence"], data["correct"]
        bins = _confidence_bins(confidence, int(num_bins))
        zeros = torch.zeros(int(num_bins), dtype=torch.float64)
        gap = zeros.clone().index_add_(0, bins, correct) - zeros.clone().index_add_(0, bins, confidence)
        out["ece"] = float(gap.abs().sum() / count) if count else 0.0
        out["ece_adaptive"] = equal_mass_ece(confidence, correct, int(num_bins))
    if "brier" in data:
        out["brier"] = mean("brier")
    return out


class TokenStatisticsPreprocessor:
    """`preprocess_logits_for_metrics` for a `Trainer` / `Seq2SeqTrainer`: ``(B, T, K)`` logits -> ``(B, T', 4)``
    [`token_statistics`] on the device, so only 4 numbers per position are gathered and kept until the end of the
    evaluation.

    Args:
        shift_labels (`bool`):
            True for causal LMs (logits at position t predict the label at t + 1: the statistics are those of
            ``logits[:, :-1]`` against ``labels[:, 1:]``, T' = T - 1); False for encoder-decoder models, whose decoder
            logits are aligned with `labels`. No default: a wrong guess would silently score every token against its
            neighbour.
        ignore_index (`int`, *optional*, defaults to -100):
            Label of positions that are not scored.
    """

    def __init__(self, *, shift_labels: bool, ignore_index: int = -100):
        if not isinstance(shift_labels, bool):
            raise TypeError(f"shift_labels must be True (causal LM) or False (encoder-decoder), got {shift_labels!r}.")
        self.shift_labels = shift_labels
        self.ignore_index = int(ignore_index)

    def __call__(self, logits, labels) -> torch.Tensor:
        if isinstance(logits, (tuple, list)):  # seq2seq outputs: (logits, encoder_last_hidden_state, ...)
            logits = logits[0]
        if not logits.is_floating_point():
            raise TypeError(
                f"preprocess_logits_for_metrics got {logits.dtype} ids, not logits: token statistics need the model's "
                "logits, so evaluate with predict_with_generate=False (generate for BLEU in a separate run)."
            )
        if labels is None:
            raise ValueError("Token statistics need labels in the evaluation batches.")
        if self.shift_labels:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        return token_statistics(logits, labels, ignore_index=self.ignore_index)


class ComputeMetrics:
    """`compute_metrics` for a `Trainer`: the scored positions of the [`TokenStatisticsPreprocessor`] output go into
    an `evaluate` module or an `evaluate.combine(...)` of several; its `compute()` is returned.

    Args:
        module: a loaded module (e.g. ``hf_smooth.evaluate_modules.load("token_calibration")``) or
            ``evaluate.combine([...])``. A single module gets only the columns it declares as features.
    """

    def __init__(self, module):
        if not (hasattr(module, "add_batch") and hasattr(module, "compute")):
            raise TypeError(
                f"ComputeMetrics needs an evaluate module or evaluate.combine(...), got {type(module).__name__}: "
                "load one with hf_smooth.evaluate_modules.load(name)."
            )
        self.module = module

    def __call__(self, eval_prediction) -> dict[str, float]:
        predictions = eval_prediction.predictions
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        columns = scored_statistics(predictions)
        features = getattr(self.module, "features", None)  # None for evaluate.combine: it routes the columns itself
        if features is not None:
            columns = {name: value for name, value in columns.items() if name in features}
        self.module.add_batch(**columns)
        return dict(self.module.compute())
