"""Token-level calibration and logit statistics, streamed over batches and ranks without storing logits.

[`TokenMetrics`] accumulates, over the scored tokens (``labels != ignore_index``) of any number of batches:

    nll                -log p_y (natural log); ``ppl = exp(nll)``
    accuracy           argmax z == y (first maximum on ties, as ``torch.argmax``)
    confidence         top-1 probability max_k p_k
    ece                expected calibration error over ``num_bins`` equal-width confidence bins
    ece_adaptive       the same over ``num_bins`` equal-mass bins (sorted confidences split into equal groups)
    brier              multiclass Brier score sum_k (p_k - onehot(y)_k)^2, in [0, 2]
    entropy            predictive entropy -sum_k p_k log p_k (nats)
    logit_gap          z_max - mean_k z_k, the quantity MaxSup penalizes (arXiv 2502.15798, eq. 9)
    logit_norm         L2 norm of the logit vector
    small_logit_frac   share of logits with |z_k| < ``small_logit_threshold`` (MaxSup's logit analysis uses 0.01)
    loss               the training objective, only when ``update(..., token_loss=...)`` passes it

Every number is dataset-level, "sum then divide": each token weighs the same whatever the batch it came in, and
the ECE is computed once from bin sums over the whole set (the official MaxSup code averages per-batch ECEs, which
is a different and batch-size-dependent number). The state is one float64 vector of sums and bin counts plus,
for the equal-mass ECE only, two float64 numbers per scored token (confidence and correct): about 16 bytes per
token, e.g. 16 MB for a million evaluation tokens. ``adaptive_ece=False`` drops them. Two accumulators merge
exactly by adding the vectors and concatenating the pairs; [`TokenMetrics.gather`] does the same across ranks.

Choices the maths leaves open (each is tested in tests/test_metrics.py):

- Brier is the full multiclass score, not the top-label one: label smoothing and MaxSup change how the mass is
  spread over the non-top entries, which the top-label score ``(conf - correct)^2`` cannot see, and the multiclass
  score is the proper scoring rule of the whole predictive distribution. It needs one more vocabulary reduction:
  ``sum_k (p_k - onehot_k)^2 = (1 - p_y)^2 + (sum_k p_k^2 - p_y^2)``.
- Equal-width bins are right-closed, ``((b - 1) / M, b / M]`` for ``b = 1..M`` (Guo et al. 2017 and most ECE code);
  a confidence is never 0 (it is at least 1/K), so bin 1 is ``(0, 1/M]``.
- Equal-mass bins: the ``N`` (confidence, correct) pairs are sorted lexicographically (confidence, then incorrect
  before correct) and cut into ``M`` consecutive groups whose sizes differ by at most one, the first ``N mod M``
  groups taking one extra token (``numpy.array_split``). A run of equal confidences may straddle two groups; the
  sort key makes the value a function of the multiset of pairs only, so batch order, rank order and merge order
  never change it. With ``N < M`` the extra groups are empty and contribute nothing.
- The logit-gap histogram has fixed edges (default 0 to 50 in steps of 0.125, 400 bins: fine enough for tiny
  models whose gaps are below 1, wide enough for pretrained LMs whose gaps are 10 to 35); a gap below the first
  edge counts in the first bin and one at or above the last edge counts in the last bin.
- ``small_logit_frac`` pools all (token, vocabulary entry) pairs: small logits over finite logits. Without masked
  entries this equals the mean of the per-token shares.
- A logit equal to ``-inf`` marks an absent vocabulary entry (the rule of hf_smooth.losses): it has probability 0
  and is left out of the mean, the norm and the small-logit share. Ignored positions may hold NaN or inf: their
  rows are dropped before any arithmetic.
- With no scored token every mean is 0 (and ``ppl`` is 1), as in [`LossComponents.means`]. An NLL too large for
  ``exp`` (a label whose logit is ``-inf`` gives ``+inf``) gives ``ppl = inf`` (`hf_smooth.losses.perplexity`).

Logits are processed in row chunks in float32 (float64 for float64 input) under ``torch.no_grad``; the extra
memory is a few chunk-sized temporaries, never ``N x K`` of anything.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .losses import check_inputs, check_label_range, compute_dtype, perplexity, row_chunks

__all__ = [
    "DEFAULT_GAP_EDGES",
    "MetricsLayout",
    "TokenMetrics",
    "equal_mass_ece",
    "sequence_statistics",
]

FORMAT = "hf_smooth.TokenMetrics"
FORMAT_VERSION = 1

# 0, 0.125, ..., 50: multiples of 1/8 are exact binary fractions, so no edge is itself a rounding artefact.
DEFAULT_GAP_EDGES: tuple[float, ...] = tuple(i * 0.125 for i in range(401))

# Per-token sums, in this order, at the start of the state vector.
SCALARS = (
    "num_tokens",
    "loss_tokens",  # tokens whose objective was passed as token_loss
    "loss",
    "nll",
    "correct",
    "confidence",
    "brier",
    "entropy",
    "logit_gap",
    "logit_norm",
    "small_logits",  # count of finite logits with |z| < threshold
    "finite_logits",  # count of finite logits (K per token without masked entries)
)
_SCALAR = {name: i for i, name in enumerate(SCALARS)}

# Pad value of the per-token pairs in `sequence_statistics` (confidence is always > 0 for a scored token).
PAD_VALUE = -1.0


@dataclass(frozen=True)
class MetricsLayout:
    """Configuration of a [`TokenMetrics`] and the positions of its sums in the flat state vector.

    Two accumulators (or per-sequence statistics) can only be merged when their layouts are equal.

    Args:
        num_bins (`int`, *optional*, defaults to 15):
            Confidence bins of both ECEs and of the reliability diagram.
        small_logit_threshold (`float`, *optional*, defaults to 0.01):
            ``|z|`` below this counts as a small logit.
        gap_edges (`tuple[float, ...]`, *optional*, defaults to `DEFAULT_GAP_EDGES`):
            Increasing edges of the logit-gap histogram.
        adaptive_ece (`bool`, *optional*, defaults to `True`):
            Keep the per-token (confidence, correct) pairs for the equal-mass ECE.
        diagnostics (`bool`, *optional*, defaults to `True`):
            Compute the calibration and logit statistics (bins, Brier, entropy, norm, small logits, histogram). When
            False only NLL, accuracy, confidence, logit gap (and the objective) are computed.
    """

    num_bins: int = 15
    small_logit_threshold: float = 0.01
    gap_edges: tuple[float, ...] = DEFAULT_GAP_EDGES
    adaptive_ece: bool = True
    diagnostics: bool = True

    def __post_init__(self):
        if int(self.num_bins) != self.num_bins or self.num_bins < 1:
            raise ValueError(f"num_bins must be a positive integer, got {self.num_bins}.")
        if not float(self.small_logit_threshold) >= 0.0:
            raise ValueError(f"small_logit_threshold must be >= 0, got {self.small_logit_threshold}.")
        edges = tuple(float(e) for e in self.gap_edges)
        if len(edges) < 2 or any(not math.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError("gap_edges must hold at least two finite, strictly increasing values.")
        object.__setattr__(self, "gap_edges", edges)
        object.__setattr__(self, "num_bins", int(self.num_bins))
        object.__setattr__(self, "small_logit_threshold", float(self.small_logit_threshold))
        object.__setattr__(self, "adaptive_ece", bool(self.adaptive_ece) and bool(self.diagnostics))

    # Offsets in the state vector: scalars, then bin counts, bin confidence sums, bin correct sums, gap histogram.
    # Without diagnostics there are no bins and no histogram (and so a different width: the layouts cannot mix).
    @property
    def _bins(self) -> int:
        return self.num_bins if self.diagnostics else 0

    @property
    def num_gap_bins(self) -> int:
        return len(self.gap_edges) - 1 if self.diagnostics else 0

    @property
    def bin_count(self) -> slice:
        start = len(SCALARS)
        return slice(start, start + self._bins)

    @property
    def bin_confidence(self) -> slice:
        start = len(SCALARS) + self._bins
        return slice(start, start + self._bins)

    @property
    def bin_correct(self) -> slice:
        start = len(SCALARS) + 2 * self._bins
        return slice(start, start + self._bins)

    @property
    def gap_counts(self) -> slice:
        start = len(SCALARS) + 3 * self._bins
        return slice(start, start + self.num_gap_bins)

    @property
    def size(self) -> int:
        return len(SCALARS) + 3 * self._bins + self.num_gap_bins

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_bins": self.num_bins,
            "small_logit_threshold": self.small_logit_threshold,
            "gap_edges": list(self.gap_edges),
            "adaptive_ece": self.adaptive_ece,
            "diagnostics": self.diagnostics,
        }


# --------------------------------------------------------------------------------------------------------------------
# Per-token maths
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _TokenValues:
    """Per-token quantities of the scored rows of one chunk (1-D tensors of equal length)."""

    nll: torch.Tensor
    confidence: torch.Tensor
    correct: torch.Tensor
    gap: torch.Tensor
    brier: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    norm: torch.Tensor | None = None
    small: torch.Tensor | None = None
    finite: torch.Tensor | None = None


def _token_values(z: torch.Tensor, y: torch.Tensor, layout: MetricsLayout) -> _TokenValues:
    """Statistics of scored rows ``z`` (rows, K) in the compute dtype, labels ``y`` (rows,)."""
    zmax, amax = z.max(dim=-1)
    shifted = z - zmax.unsqueeze(-1)  # <= 0; -inf stays -inf
    expo = shifted.exp()
    sum_exp = expo.sum(dim=-1)
    log_sum_exp = sum_exp.log()
    z_y = z.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    # (z_max - z_y) first: exact for a correct token, where z_max + log_sum_exp would round a small log_sum_exp away
    # (at |z| ~ 1e4 a float32 ulp is 1e-3, more than the whole NLL of a confident token).
    nll = (zmax - z_y) + log_sum_exp
    confidence = sum_exp.reciprocal()  # exp(z_max - logsumexp z)
    correct = (amax == y).to(z.dtype)

    neginf = torch.isneginf(z)
    masked = bool(neginf.any())
    if masked:
        # Absent entries (module docstring): leave them out of every vocabulary sum but the softmax, where exp(-inf)
        # is already 0. One chunk-sized `where`, paid only by chunks that hold a -inf.
        finite = ~neginf
        z_finite = torch.where(finite, z, 0.0)
        count = finite.sum(dim=-1).to(z.dtype)
    else:
        z_finite = z
        count = torch.full_like(zmax, z.shape[-1])
    gap = zmax - z_finite.sum(dim=-1) / count
    values = _TokenValues(nll=nll, confidence=confidence, correct=correct, gap=gap)
    if not layout.diagnostics:
        return values

    prob = expo.div_(sum_exp.unsqueeze(-1))  # softmax, in place of expo
    p_y = (z_y - zmax - log_sum_exp).exp()
    # sum_k (p_k - onehot_k)^2 = (1 - p_y)^2 + sum_{k != y} p_k^2
    values.brier = ((1.0 - p_y).square() + (prob.square().sum(dim=-1) - p_y.square())).clamp_(min=0.0)
    # H = log sum_k exp(s_k) - sum_k p_k s_k with s = z - z_max: no cancellation against a large logsumexp.
    shifted_finite = torch.where(neginf, 0.0, shifted) if masked else shifted
    values.entropy = (log_sum_exp - (prob * shifted_finite).sum(dim=-1)).clamp_(min=0.0)
    values.norm = z_finite.square().sum(dim=-1).sqrt()
    small = z_finite.abs() < layout.small_logit_threshold
    if masked:
        small &= ~neginf
    values.small = small.sum(dim=-1).to(z.dtype)
    values.finite = count
    return values


def _confidence_bins(confidence: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Right-closed equal-width bin of each confidence: ``(b / M, (b + 1) / M]`` -> ``b`` (module docstring)."""
    scaled = confidence.to(torch.float64) * num_bins
    return (scaled.ceil().long() - 1).clamp_(0, num_bins - 1)


def _accumulate(
    out: torch.Tensor, segment: torch.Tensor, values: _TokenValues, loss: torch.Tensor | None, layout: MetricsLayout
) -> None:
    """Add the sums of one chunk into ``out`` (segments, layout.size) float64, row ``segment[i]`` for token ``i``."""
    n = values.nll.shape[0]
    if n == 0:
        return
    f64 = torch.float64
    zeros = torch.zeros(n, dtype=f64, device=out.device)
    columns = [
        torch.ones(n, dtype=f64, device=out.device),
        zeros if loss is None else torch.ones(n, dtype=f64, device=out.device),
        zeros if loss is None else loss.to(f64),
        values.nll.to(f64),
        values.correct.to(f64),
        values.confidence.to(f64),
    ]
    if layout.diagnostics:
        extra = (values.brier, values.entropy, values.gap, values.norm, values.small, values.finite)
        columns += [v.to(f64) for v in extra]
    else:
        columns += [zeros, zeros, values.gap.to(f64), zeros, zeros, zeros]
    out[:, : len(SCALARS)].index_add_(0, segment, torch.stack(columns, dim=1))
    if not layout.diagnostics:
        return

    flat = out.view(-1)
    base = segment * layout.size
    bins = _confidence_bins(values.confidence, layout.num_bins)
    flat.index_add_(0, base + layout.bin_count.start + bins, torch.ones(n, dtype=f64, device=out.device))
    flat.index_add_(0, base + layout.bin_confidence.start + bins, values.confidence.to(f64))
    flat.index_add_(0, base + layout.bin_correct.start + bins, values.correct.to(f64))
    edges = torch.tensor(layout.gap_edges[1:-1], dtype=f64, device=out.device)
    gap_bins = torch.bucketize(values.gap.to(f64), edges, right=True)  # [e_j, e_{j+1}) -> j, clamped at both ends
    flat.index_add_(0, base + layout.gap_counts.start + gap_bins, torch.ones(n, dtype=f64, device=out.device))


def row_reader(logits: torch.Tensor):
    """``take(index)`` -> the rows ``index`` (positions in the flattened leading dimensions) as ``(n, K)``.

    Never copies the whole tensor: a sliced view such as ``logits[:, :-1]`` cannot be flattened without a copy
    (``reshape`` would duplicate every logit), so such rows are read through their unravelled coordinates.
    """
    logits = logits.detach()
    try:
        flat = logits.view(-1, logits.shape[-1])
    except RuntimeError:
        lead = tuple(logits.shape[:-1])
        return lambda index: logits[torch.unravel_index(index, lead)]
    return lambda index: flat.index_select(0, index)


def _reduce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    layout: MetricsLayout,
    ignore_index: int,
    token_loss: torch.Tensor | None,
    rows_per_segment: int | None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
):
    """Sums per segment (``rows_per_segment`` consecutive label positions, or one segment for everything) and the
    (confidence, correct) pair of every position (``PAD_VALUE`` at ignored ones) when the layout keeps them."""
    check_inputs(logits, labels, ignore_index)
    num_classes = logits.shape[-1]
    check_label_range(labels, num_classes, ignore_index)
    take_rows = row_reader(logits)
    flat_labels = labels.reshape(-1).to(device=logits.device, dtype=torch.long)
    num_rows = flat_labels.shape[0]
    if token_loss is not None:
        if tuple(token_loss.shape) != tuple(labels.shape):
            raise ValueError(
                f"token_loss has shape {tuple(token_loss.shape)}; expected the labels' shape {tuple(labels.shape)} "
                "(the per-token objective, e.g. smoothed_cross_entropy(..., reduction='none'))."
            )
        token_loss = token_loss.detach().reshape(-1).to(logits.device)
    if not float(temperature) > 0.0 or not math.isfinite(float(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}.")
    scale = 1.0 / float(temperature)

    if rows_per_segment is None:
        num_segments = 1
    else:
        num_segments = num_rows // rows_per_segment if rows_per_segment else labels.shape[0]
    sums = torch.zeros(num_segments, layout.size, dtype=torch.float64, device=logits.device)
    keep_pairs = layout.adaptive_ece
    pairs = torch.full((num_rows, 2), PAD_VALUE, dtype=torch.float64, device=logits.device) if keep_pairs else None
    valid_all = flat_labels != ignore_index
    cdtype = compute_dtype(logits.dtype)
    for rows in row_chunks(num_rows, num_classes, chunk_size):
        valid = valid_all[rows]
        if not bool(valid.any()):
            continue
        index = valid.nonzero().squeeze(-1) + rows.start  # positions of the scored rows
        z = take_rows(index).to(cdtype)  # ignored rows (maybe NaN) never enter the arithmetic
        if scale != 1.0:
            z = z * scale
        values = _token_values(z, flat_labels.index_select(0, index), layout)
        loss = None if token_loss is None else token_loss.index_select(0, index)
        segment = torch.zeros_like(index) if rows_per_segment is None else index // rows_per_segment
        _accumulate(sums, segment, values, loss, layout)
        if keep_pairs:
            pairs[index, 0] = values.confidence.to(torch.float64)
            pairs[index, 1] = values.correct.to(torch.float64)
    return sums, pairs


def equal_mass_ece(confidence: torch.Tensor, correct: torch.Tensor, num_bins: int = 15) -> float:
    """Expected calibration error over ``num_bins`` equal-mass bins (module docstring for ties and remainders).

    ``sum_g |sum_{i in g} correct_i - sum_{i in g} confidence_i| / N`` over the groups ``g`` of the sorted pairs.
    """
    confidence = confidence.reshape(-1).to(torch.float64)
    correct = correct.reshape(-1).to(torch.float64)
    n = confidence.shape[0]
    if n == 0:
        return 0.0
    # Lexicographic sort by (confidence, correct): stable sort on the secondary key, then on the primary one.
    order = torch.sort(correct, stable=True).indices
    order = order[torch.sort(confidence[order], stable=True).indices]
    base, extra = divmod(n, num_bins)
    sizes = torch.full((num_bins,), base, dtype=torch.long)
    sizes[:extra] += 1
    group = torch.repeat_interleave(torch.arange(num_bins), sizes).to(confidence.device)
    zeros = torch.zeros(num_bins, dtype=torch.float64, device=confidence.device)
    conf_sum = zeros.clone().index_add_(0, group, confidence[order])
    corr_sum = zeros.clone().index_add_(0, group, correct[order])
    return float((corr_sum - conf_sum).abs().sum() / n)


# --------------------------------------------------------------------------------------------------------------------
# The accumulator
# --------------------------------------------------------------------------------------------------------------------


class TokenMetrics:
    """Streaming, mergeable calibration and logit statistics over scored tokens (module docstring for definitions).

    Args:
        num_bins (`int`, *optional*, defaults to 15):
            Confidence bins of the equal-width and the equal-mass ECE.
        small_logit_threshold (`float`, *optional*, defaults to 0.01):
            ``|z|`` below this counts towards `small_logit_frac`.
        ignore_index (`int`, *optional*, defaults to -100):
            Label value of positions that are not scored.
        adaptive_ece (`bool`, *optional*, defaults to `True`):
            Keep two float64 numbers per scored token (confidence, correct) for the equal-mass ECE.
        diagnostics (`bool`, *optional*, defaults to `True`):
            When False only `nll`, `ppl`, `accuracy`, `confidence`, `logit_gap`, `num_tokens` (and `loss`) are
            computed: no bins, Brier, entropy, norms, histogram or pairs.
        gap_edges (`Sequence[float]`, *optional*):
            Edges of the logit-gap histogram (default: 0 to 50 in steps of 0.125).
        chunk_size (`int`, *optional*):
            Rows of logits processed at once (default: about 4M elements per chunk, as in hf_smooth.losses).

    Example (an evaluation loop; `gather` is collective, call it on every rank)::

        metrics = TokenMetrics()
        for batch in loader:
            with torch.no_grad():
                logits = model(**batch).logits
            metrics.update(logits[:, :-1], batch["labels"][:, 1:])   # aligned: shift causal LMs first
        results = metrics.gather(accelerator).compute()
    """

    def __init__(
        self,
        *,
        num_bins: int = 15,
        small_logit_threshold: float = 0.01,
        ignore_index: int = -100,
        adaptive_ece: bool = True,
        diagnostics: bool = True,
        gap_edges: Sequence[float] | None = None,
        chunk_size: int | None = None,
    ):
        self.layout = MetricsLayout(
            num_bins=num_bins,
            small_logit_threshold=small_logit_threshold,
            gap_edges=DEFAULT_GAP_EDGES if gap_edges is None else tuple(gap_edges),
            adaptive_ece=adaptive_ece,
            diagnostics=diagnostics,
        )
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}.")
        self.ignore_index = int(ignore_index)
        self.chunk_size = chunk_size
        self._sums = torch.zeros(self.layout.size, dtype=torch.float64)
        self._pairs: list[torch.Tensor] = []  # (n, 2) float64 CPU tensors: confidence, correct
        # An equal-mass ECE restored from a dict saved without its pairs: reported, but cannot be merged.
        self._saved_ece_adaptive: float | None = None

    # ---- accumulation ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        token_loss: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> TokenMetrics:
        """Add one batch.

        Args:
            logits (`torch.Tensor` of shape `(..., K)`):
                Any floating dtype, aligned with `labels` (for causal LMs pass `logits[:, :-1]` and `labels[:, 1:]`).
            labels (`torch.Tensor` of shape `(...)`):
                Class indices in `[0, K)` or `ignore_index`.
            token_loss (`torch.Tensor` of shape `(...)`, *optional*):
                Per-token training objective (e.g. `smoothed_cross_entropy(..., reduction="none")`); its token mean
                is reported as `loss`. Pass it for every update or for none.
            temperature (`float`, *optional*, defaults to 1.0):
                Score `logits / temperature` (temperature scaling) without copying the logits.

        Returns `self`.
        """
        sums, pairs = _reduce(
            logits,
            labels,
            layout=self.layout,
            ignore_index=self.ignore_index,
            token_loss=token_loss,
            rows_per_segment=None,
            temperature=temperature,
            chunk_size=self.chunk_size,
        )
        self._sums += sums[0].cpu()
        if pairs is not None:
            self._append_pairs(pairs)
        return self

    def add(self, statistics: dict[str, torch.Tensor]) -> TokenMetrics:
        """Add per-sequence statistics from [`sequence_statistics`] (possibly gathered from every rank)."""
        sums = statistics["sums"]
        if sums.dim() != 2 or sums.shape[1] != self.layout.size:
            raise ValueError(
                f"Statistics of width {tuple(sums.shape)} do not match this accumulator's layout (width "
                f"{self.layout.size}); build them with sequence_statistics(..., layout=metrics.layout)."
            )
        self._sums += sums.detach().to("cpu", torch.float64).sum(dim=0)
        if self.layout.adaptive_ece:
            if "pairs" not in statistics:
                raise ValueError(
                    "This accumulator keeps per-token pairs (adaptive_ece=True); the statistics have none."
                )
            self._append_pairs(statistics["pairs"])
        return self

    def _append_pairs(self, pairs: torch.Tensor) -> None:
        pairs = pairs.detach().reshape(-1, 2).to("cpu", torch.float64)
        pairs = pairs[pairs[:, 0] != PAD_VALUE]  # ignored positions and cross-rank padding
        if pairs.shape[0]:
            self._pairs.append(pairs)

    def _check_compatible(self, other: TokenMetrics) -> None:
        if not isinstance(other, TokenMetrics):
            raise TypeError(f"Can only merge another TokenMetrics, got {type(other).__name__}.")
        if other.layout != self.layout:
            raise ValueError(f"Cannot merge accumulators with different layouts: {self.layout} vs {other.layout}.")
        if self._saved_ece_adaptive is not None or other._saved_ece_adaptive is not None:
            raise ValueError(
                "An accumulator restored without its per-token pairs cannot be merged (its equal-mass ECE is not a "
                "sum). Save with to_dict(include_token_pairs=True) to merge later."
            )

    def merge(self, other: TokenMetrics) -> TokenMetrics:
        """Add ``other``'s tokens to this accumulator (in place; returns `self`). Exact: sums add, pairs concatenate."""
        self._check_compatible(other)
        self._sums += other._sums
        self._pairs.extend(p.clone() for p in other._pairs)
        return self

    def copy(self) -> TokenMetrics:
        new = TokenMetrics.__new__(TokenMetrics)
        new.layout, new.ignore_index, new.chunk_size = self.layout, self.ignore_index, self.chunk_size
        new._sums = self._sums.clone()
        new._pairs = [p.clone() for p in self._pairs]
        new._saved_ece_adaptive = self._saved_ece_adaptive
        return new

    def reset(self) -> None:
        self._sums.zero_()
        self._pairs.clear()
        self._saved_ece_adaptive = None

    def gather(self, accelerator) -> TokenMetrics:
        """A new accumulator holding the tokens of every rank; every rank gets the same result. Collective: call it
        on all ranks, in the same order as the other collectives.

        Uses three methods of `accelerate.Accelerator`: ``num_processes`` and ``device`` (attributes),
        ``reduce(tensor, reduction="sum")`` for the sums, ``pad_across_processes(tensor, dim=0, pad_index=-1.0)`` and
        ``gather(tensor)`` for the per-token pairs (padded rows are dropped). With one process it returns a copy
        and calls nothing.
        """
        result = self.copy()
        if int(getattr(accelerator, "num_processes", 1)) <= 1:
            return result
        if self._saved_ece_adaptive is not None:
            raise ValueError("An accumulator restored without its per-token pairs cannot be gathered.")
        device = accelerator.device
        result._sums = accelerator.reduce(self._sums.to(device), reduction="sum").to("cpu", torch.float64)
        if self.layout.adaptive_ece:
            local = self.token_pairs().to(device)
            padded = accelerator.pad_across_processes(local, dim=0, pad_index=PAD_VALUE)
            result._pairs = []
            result._append_pairs(accelerator.gather(padded))
        return result

    # ---- results -----------------------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return int(self._sums[_SCALAR["num_tokens"]].item())

    def token_pairs(self) -> torch.Tensor:
        """``(N, 2)`` float64 tensor of (confidence, correct) per scored token, in arrival order."""
        if not self._pairs:
            return torch.zeros(0, 2, dtype=torch.float64)
        if len(self._pairs) > 1:
            self._pairs = [torch.cat(self._pairs)]
        return self._pairs[0]

    def compute(self) -> dict[str, float]:
        """Token means over everything accumulated.

        Keys: `nll`, `ppl`, `accuracy`, `confidence`, `logit_gap`, `num_tokens`; with diagnostics also `ece`,
        `brier`, `entropy`, `logit_norm`, `small_logit_frac` and, with `adaptive_ece`, `ece_adaptive`; `loss` when
        the objective was passed to `update`.
        """
        s = self._sums.tolist()
        count = s[_SCALAR["num_tokens"]]
        loss_tokens = s[_SCALAR["loss_tokens"]]
        if loss_tokens and loss_tokens != count:
            raise ValueError(
                f"token_loss was passed for {int(loss_tokens)} of {int(count)} tokens: pass it to every update or none."
            )

        def mean(name: str) -> float:
            return s[_SCALAR[name]] / count if count else 0.0

        out: dict[str, float] = {}
        if loss_tokens:
            out["loss"] = mean("loss")
        out["nll"] = mean("nll")
        out["ppl"] = perplexity(out["nll"])
        out["accuracy"] = mean("correct")
        out["confidence"] = mean("confidence")
        if self.layout.diagnostics:
            bins_conf = self._sums[self.layout.bin_confidence]
            bins_corr = self._sums[self.layout.bin_correct]
            out["ece"] = float((bins_corr - bins_conf).abs().sum() / count) if count else 0.0
            if self.layout.adaptive_ece:
                if self._saved_ece_adaptive is not None:
                    out["ece_adaptive"] = self._saved_ece_adaptive
                else:
                    pairs = self.token_pairs()
                    out["ece_adaptive"] = equal_mass_ece(pairs[:, 0], pairs[:, 1], self.layout.num_bins)
            out["brier"] = mean("brier")
            out["entropy"] = mean("entropy")
        out["logit_gap"] = mean("logit_gap")
        if self.layout.diagnostics:
            out["logit_norm"] = mean("logit_norm")
            finite = s[_SCALAR["finite_logits"]]
            out["small_logit_frac"] = s[_SCALAR["small_logits"]] / finite if finite else 0.0
        out["num_tokens"] = int(count)
        return out

    def reliability(self) -> dict[str, list[float]]:
        """Per equal-width bin: `edges` (M + 1), `count`, `confidence` (mean), `accuracy`; both means are 0.0 in
        empty bins (check `count`). What the reliability diagram and its confidence histogram need."""
        if not self.layout.diagnostics:
            raise ValueError("reliability() needs diagnostics=True.")
        count = self._sums[self.layout.bin_count]
        safe = count.clamp(min=1.0)
        m = self.layout.num_bins
        return {
            "edges": [i / m for i in range(m + 1)],
            "count": count.tolist(),
            "confidence": (self._sums[self.layout.bin_confidence] / safe).tolist(),
            "accuracy": (self._sums[self.layout.bin_correct] / safe).tolist(),
        }

    def logit_gap_histogram(self) -> dict[str, list[float]]:
        """`edges` and `count` of the per-token ``z_max - mean z`` histogram (first/last bins also hold the values
        below/above the edges)."""
        if not self.layout.diagnostics:
            raise ValueError("logit_gap_histogram() needs diagnostics=True.")
        return {"edges": list(self.layout.gap_edges), "count": self._sums[self.layout.gap_counts].tolist()}

    # ---- saving ------------------------------------------------------------------------------------------------

    def to_dict(self, *, include_token_pairs: bool = False) -> dict[str, Any]:
        """JSON-ready state: configuration, raw sums, the computed metrics, reliability bins and gap histogram.

        `from_dict` restores an accumulator that computes and plots the same numbers. The per-token pairs (16 bytes
        per token, much more as JSON text) are only written with `include_token_pairs=True`; without them the
        restored accumulator reports the saved `ece_adaptive` but cannot be merged or gathered.
        """
        state: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "layout": self.layout.to_dict(),
            "ignore_index": self.ignore_index,
            "sums": self._sums.tolist(),
            "metrics": self.compute(),
        }
        if self.layout.diagnostics:
            state["reliability"] = self.reliability()
            state["logit_gap_histogram"] = self.logit_gap_histogram()
        if include_token_pairs and self.layout.adaptive_ece:
            pairs = self.token_pairs()
            state["token_confidence"] = pairs[:, 0].tolist()
            state["token_correct"] = pairs[:, 1].to(torch.int64).tolist()
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any], *, source: str | None = None) -> TokenMetrics:
        """Inverse of [`to_dict`] (also accepts the dict read back from JSON). ``source`` names where ``state``
        came from in error messages (`load` passes the file)."""
        where = f" in {source}" if source else ""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"Not a saved TokenMetrics{where} (expected 'format': {FORMAT!r}).")
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(f"Unsupported TokenMetrics format version {state.get('version')}{where}.")
        _check_saved_keys(state, where)
        layout = state["layout"]
        metrics = cls(
            num_bins=layout["num_bins"],
            small_logit_threshold=layout["small_logit_threshold"],
            gap_edges=layout["gap_edges"],
            adaptive_ece=layout["adaptive_ece"],
            diagnostics=layout["diagnostics"],
            ignore_index=state.get("ignore_index", -100),
        )
        sums = torch.tensor(state["sums"], dtype=torch.float64)
        if sums.shape != (metrics.layout.size,):
            raise ValueError(f"Saved sums have {sums.numel()} entries; the layout needs {metrics.layout.size}.")
        metrics._sums = sums
        if metrics.layout.adaptive_ece:
            if "token_confidence" in state:
                pairs = torch.tensor([state["token_confidence"], state["token_correct"]], dtype=torch.float64).T
                metrics._pairs = [pairs.contiguous()] if pairs.shape[0] else []
            elif metrics.num_tokens:
                metrics._saved_ece_adaptive = float(state["metrics"]["ece_adaptive"])
        return metrics

    def save(self, path: str | os.PathLike, *, include_token_pairs: bool = False) -> Path:
        """Write [`to_dict`] as JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(include_token_pairs=include_token_pairs)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenMetrics:
        """Read a file written by [`save`]; errors name the file (and the missing keys of a truncated state)."""
        path = Path(path)
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a saved TokenMetrics: invalid JSON ({error}).") from error
        return cls.from_dict(state, source=str(path))

    def __repr__(self) -> str:
        return f"TokenMetrics(num_tokens={self.num_tokens}, layout={self.layout.num_bins} bins)"


def _check_saved_keys(state: dict[str, Any], where: str) -> None:
    """Every key `from_dict` reads, checked before reading any, so a truncated or hand-edited state fails with the
    list of what is missing rather than a bare ``KeyError``."""
    missing = [key for key in ("layout", "sums") if key not in state]
    layout = state.get("layout")
    if isinstance(layout, dict):
        missing += [
            f"layout.{key}"
            for key in ("num_bins", "small_logit_threshold", "gap_edges", "adaptive_ece", "diagnostics")
            if key not in layout
        ]
        if layout.get("adaptive_ece"):
            if "token_confidence" in state and "token_correct" not in state:
                missing.append("token_correct")
            # Without the per-token pairs the saved equal-mass ECE is restored as is.
            elif "token_confidence" not in state and "ece_adaptive" not in (state.get("metrics") or {}):
                missing.append("metrics.ece_adaptive (or token_confidence and token_correct)")
    elif "layout" in state:
        missing.append("layout (not a dict)")
    if missing:
        raise ValueError(
            f"Saved TokenMetrics{where} lacks {', '.join(missing)}: it was truncated or edited. Save it again with "
            "TokenMetrics.save."
        )



@torch.no_grad()
def sequence_statistics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    token_loss: torch.Tensor | None = None,
    *,
    layout: MetricsLayout,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sequence sums of one batch, for ``accelerator.gather_for_metrics`` (which drops by the first dimension
    the samples a distributed sampler duplicated), then [`TokenMetrics.add`].

    Args:
        logits (`torch.Tensor` of shape `(B, T, K)` or `(B, K)`): aligned with `labels`.
        labels (`torch.Tensor` of shape `(B, T)` or `(B,)`).
        token_loss (`torch.Tensor` of shape of `labels`, *optional*): per-token objective, reported as `loss`.
        layout (`MetricsLayout`): the accumulator's `layout`.

    Returns a dict on the logits' device: `sums` `(B, layout.size)` float64 and, when the layout keeps per-token
    pairs, `pairs` `(B, T, 2)` float64 (confidence, correct; -1 at ignored positions). `T` differs between ranks,
    so pad before gathering::

        stats = accelerator.pad_across_processes(stats, dim=1, pad_index=-1)   # `sums` has equal widths: untouched
        metrics.add(accelerator.gather_for_metrics(stats))
    """
    if labels.dim() < 1:
        raise ValueError("labels need a batch dimension.")
    batch = labels.shape[0]
    per_row = math.prod(labels.shape[1:])
    sums, pairs = _reduce(
        logits,
        labels,
        layout=layout,
        ignore_index=ignore_index,
        token_loss=token_loss,
        rows_per_segment=per_row,
        chunk_size=chunk_size,
    )
    out = {"sums": sums}
    if pairs is not None:
        out["pairs"] = pairs.reshape(batch, per_row, 2)
    return out
