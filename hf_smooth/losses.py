"""Label smoothing and MaxSup: every loss formula hf_smooth uses lives in this module.

One family covers them all. For a scored token with label ``y`` and logits ``z`` over ``K`` vocabulary
entries, with ``lse = logsumexp(z)``:

    loss = w * (lse - a * z_y + m * z_max - u * mean(z) + c * lse**2)

    cross-entropy                    a = 1          m = 0      u = 0
    label smoothing, uniform (eps)   a = 1 - eps    m = 0      u = eps
    label smoothing, fairseq (eps)   the uniform form with eps' = eps * K / (K - 1)
    MaxSup (alpha)                   a = 1          m = alpha  u = alpha

plus, with any of them, PaLM's z-loss ``c * lse**2`` (``z_loss=c``, Liger's ``lse_square_scale``) and a per-token
weight ``w`` (``weights=``; 1 by default; ``"mean"`` divides by the sum of the weights, and ``w = 0`` is exactly
``ignore_index``). ``mean(z)`` and ``K`` run over the *smoothing classes*: all of them by default, or those kept by
``num_classes`` (ids below it: ``len(tokenizer)`` when the embedding matrix is padded, as Qwen's) and not in
``exclude_ids``. The other classes stay in the softmax (``lse``, the NLL, ``z_max``, the z-loss, the entropy): the
model can put mass on them, so they are real logits, but the smoothing target gives them nothing.

"uniform" is PyTorch's ``F.cross_entropy(label_smoothing=eps)`` and transformers' ``LabelSmoother``: the soft
target is ``(1 - eps) * onehot(y) + eps / K``, so ``LS = CE + eps * (z_y - mean z)``. "fairseq" is the target
``1 - eps`` on ``y`` and ``eps / (K - 1)`` on every other entry (fairseq's ``label_smoothed_cross_entropy``,
pytorch#148884 for the naming confusion). MaxSup (Zhou et al., NeurIPS 2025, arXiv 2502.15798, eq. 9) replaces
``z_y`` by ``z_max``: ``MaxSup = CE + alpha * (z_max - mean z)``; no detach, as in the official code.

The gradient with respect to the logits is closed-form:

    d loss / d z = w * ((1 + 2 c lse) * softmax(z) - a * onehot(y) + m * onehot(argmax z) - u / K * [smoothing class])

so the autograd function below never stores a log-softmax: it works through the rows in chunks in float32 (float64
for float64 input), keeps four numbers per row (logsumexp, argmax, finite-entry count, -inf flag) and rebuilds the
softmax chunk by chunk in backward. The extra memory is the gradient tensor (which autograd needs anyway) plus one
chunk, instead of the two to three full ``N x K`` tensors of ``F.cross_entropy`` and ``LabelSmoother``.

Rules chosen for inputs the maths leaves open (each is tested):

- Ignored positions (``labels == ignore_index``) contribute nothing: their logits may hold NaN or inf, they never
  reach the loss, the gradient (exactly 0 there) or the max.
- A logit equal to ``-inf`` marks a vocabulary entry as absent for that token (masked or padded vocabulary):
  ``K`` counts the other entries and ``mean z`` is taken over them, and the entry gets zero gradient. ``+inf`` and
  NaN in a scored row are not hidden: the loss is NaN, as the model really produced garbage.
- A ``-inf`` at the label's own entry means ``p_y = 0``: the token's loss is ``+inf`` for every method, as
  ``F.cross_entropy`` gives (the soft target keeps ``1 - eps + eps / K > 0`` on ``y``), not ``inf - inf = NaN``.
  The gradient stays finite, as PyTorch's does: ``softmax(z) - a * onehot(y) + ...`` with ``p_y = 0``, i.e.
  ``-a`` at ``y`` (PyTorch's ``-a - u / K`` counts the entry in ``K``; here it is absent from the mean, as above).
  In [`LossComponents`] ``nll`` and ``loss`` are ``+inf`` and the label-smoothing part of ``regularizer``,
  ``eps' * (z_y - mean z)``, is ``-inf`` (MaxSup's part stays finite).
- ``num_items_in_batch`` under ``"mean"`` must be a finite count, and at least 1 when the call scores a token; 0,
  a negative number or NaN raise ``ValueError`` (one host sync per call when it is a tensor).
- Labels of any integer dtype are range-checked after widening to int64.
- The backward is a closed form, not itself differentiable: double backward (``create_graph=True``) raises.
- A call with no scored token returns ``0.0`` connected to the graph (``backward()`` gives zero gradients), never
  NaN, so a rank with an all-masked micro-batch still joins the DDP gradient all-reduce.
- The loss is float32 (float64 for float64 logits) whatever the logits dtype; the gradient has the logits dtype.
- A label outside the smoothing classes is allowed: its one-hot part applies (target ``1 - eps`` on it) and ``eps`` is
  spread over the smoothing classes; for fairseq's convention every smoothing class is then an "other" class
  (``eps / K`` each).
- One host read per call (#12): counts, the label and weight checks and ``num_items_in_batch`` are read together,
  never inside the chunk loops. The materialized path scores the rows first without the ``-inf`` handling above; a
  ``-inf`` (or NaN) among the scored logits shows in the per-row sums, is read with the rest, and only then are the
  rows scored again with it (so ordinary logits never pay for it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import torch

__all__ = [
    "LossComponents",
    "label_smoothing_loss",
    "maxsup_loss",
    "perplexity",
    "smoothed_cross_entropy",
]

REDUCTIONS = ("mean", "sum", "none")
CONVENTIONS = ("uniform", "fairseq")

# Elements of the float32 working chunk (rows x vocabulary): 4M elements = 16 MiB per temporary. Large enough that
# the per-chunk Python overhead is negligible next to the arithmetic, small enough to be noise next to the logits.
CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------------------------------
# Parts for logging
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossComponents:
    """Detached sums over the scored (non-ignored) tokens of one loss call.

    They are sums, not means, so that micro-batches, accumulation steps and ranks merge exactly by adding them
    (``a + b``) and dividing once at the end (``.means()``). With per-token ``weights`` every per-token sum is
    weighted (``sum_t w_t * x_t``) and `means` divides by ``weight``, the sum of the weights, as the loss does.

    Args:
        num_tokens (`torch.Tensor`): number of scored tokens (label not ignored, weight not 0).
        loss (`torch.Tensor`): sum of the per-token objective (NLL plus regularizer plus z-loss).
        nll (`torch.Tensor`): sum of ``-log p_y``, the true cross-entropy.
        regularizer (`torch.Tensor`): the smoothing penalty: ``eps' * (z_y - mean z)`` for label smoothing,
            ``alpha * (z_max - mean z)`` for MaxSup, 0 for cross-entropy (``-inf`` from label smoothing when a label's
            logit is ``-inf``, where ``loss`` and ``nll`` are ``+inf``). ``loss = nll + regularizer + z_loss``.
        top1_prob (`torch.Tensor`): sum of the highest predicted probability ``max_k p_k``.
        correct (`torch.Tensor`): number of tokens whose argmax equals the label.
        logit_gap (`torch.Tensor`): sum of ``z_max - mean z`` (the quantity MaxSup penalizes).
        z_loss (`torch.Tensor`): sum of the z-loss term ``c * lse**2`` (0 when ``z_loss=0``).
        entropy (`torch.Tensor`): sum of the predictive entropy ``lse - sum_k p_k z_k`` (nats).
        weight (`torch.Tensor`): sum of the per-token weights (``num_tokens`` without weights).
    """

    num_tokens: torch.Tensor
    loss: torch.Tensor
    nll: torch.Tensor
    regularizer: torch.Tensor
    top1_prob: torch.Tensor
    correct: torch.Tensor
    logit_gap: torch.Tensor
    z_loss: torch.Tensor
    entropy: torch.Tensor
    weight: torch.Tensor

    # New fields go at the end: the trainer appends its own sums after these (len(FIELDS) marks the split).
    FIELDS = (
        "num_tokens", "loss", "nll", "regularizer", "top1_prob", "correct", "logit_gap", "z_loss", "entropy", "weight"
    )

    @classmethod
    def from_vector(cls, vector: torch.Tensor) -> LossComponents:
        return cls(*vector.unbind(0))

    def to_vector(self) -> torch.Tensor:
        """All sums stacked in ``FIELDS`` order (one tensor to all-reduce across ranks)."""
        return torch.stack([getattr(self, name) for name in self.FIELDS])

    def __add__(self, other: LossComponents) -> LossComponents:
        return LossComponents.from_vector(self.to_vector() + other.to_vector().to(self.num_tokens.device))

    def means(self) -> dict[str, float]:
        """Per-token means as Python floats (weighted by the per-token weights when there are any): ``loss``, ``nll``,
        ``ppl`` (``exp(nll)``), ``regularizer``, ``top1_prob``, ``accuracy``, ``logit_gap``, ``z_loss``, ``entropy``,
        plus the sums ``num_tokens`` and ``weight``. With no token every mean is 0 (``ppl`` 1); an NLL too large for
        ``exp`` gives ``ppl = inf`` (`perplexity`)."""
        sums = dict(zip(self.FIELDS, self.to_vector().double().tolist()))
        count, total = sums.pop("num_tokens"), sums.pop("weight")
        means = {name: (0.0 if total == 0 else value / total) for name, value in sums.items()}
        means["accuracy"] = means.pop("correct")
        means["ppl"] = perplexity(means["nll"])
        means["num_tokens"] = count
        means["weight"] = total
        return means


def perplexity(nll: float) -> float:
    """``exp(nll)`` as a Python float: ``inf`` once it overflows (``nll`` above about 709.78), never a clamped
    stand-in such as ``exp(700) = 1e304`` that reads like a measurement; NaN stays NaN."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


# --------------------------------------------------------------------------------------------------------------------
# Validation (the internal API shared with fused.py, metrics.py and calibration.py; not exported)
# --------------------------------------------------------------------------------------------------------------------


def check_options(
    *, epsilon: float, alpha: float, convention: str, reduction: str, z_loss: float = 0.0
) -> None:
    if not 0.0 <= float(epsilon) <= 1.0:  # also rejects NaN and inf
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}.")
    if not (float(alpha) >= 0.0 and math.isfinite(float(alpha))):  # NaN fails >= 0
        raise ValueError(f"alpha must be >= 0 and finite, got {alpha}.")
    if not (float(z_loss) >= 0.0 and math.isfinite(float(z_loss))):
        raise ValueError(f"z_loss must be >= 0 and finite (PaLM uses 1e-4), got {z_loss}.")
    if convention not in CONVENTIONS:
        raise ValueError(f"Unknown convention {convention!r}; use one of {CONVENTIONS}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"Unknown reduction {reduction!r}; use one of {REDUCTIONS}.")


def check_inputs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, *, name: str = "logits", last: str = "vocab_size"
) -> None:
    """Types and shapes of ``logits (..., last)`` against ``labels (...)``; the fused path passes its hidden states
    with ``name="hidden", last="hidden_size"``."""
    if not torch.is_tensor(logits) or not torch.is_tensor(labels):
        raise TypeError(f"{name} and labels must be torch tensors.")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}.")
    if logits.dim() < 1 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"Shape mismatch: {name} {tuple(logits.shape)} and labels {tuple(labels.shape)}; expected {name} of shape "
            f"labels.shape + ({last},). For causal LMs shift first (labels[..., 1:] against {name}[..., :-1, :])."
        )
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} have an empty {last} dimension: shape {tuple(logits.shape)}.")


def check_weights(weights: torch.Tensor | None, labels: torch.Tensor) -> None:
    """Type and shape of per-token ``weights`` (their values are checked with the call's one host read)."""
    if weights is None:
        return
    if not torch.is_tensor(weights) or not weights.is_floating_point():
        what = weights.dtype if torch.is_tensor(weights) else type(weights).__name__
        raise TypeError(f"weights must be a floating-point tensor of per-token loss weights, got {what}.")
    if tuple(weights.shape) != tuple(labels.shape):
        raise ValueError(
            f"weights {tuple(weights.shape)} must have the shape of labels {tuple(labels.shape)} (one weight per "
            "token; for a causal LM shift them like the labels)."
        )


def _holds(dtype: torch.dtype, value: int) -> bool:
    info = torch.iinfo(dtype)
    return info.min <= value <= info.max


def _narrow_labels(labels: torch.Tensor, ignore_index: int) -> bool:
    """True (with a warning) when the labels' dtype cannot hold ``ignore_index``."""
    narrow = labels.dtype != torch.int64 and not _holds(labels.dtype, ignore_index)
    if narrow:
        # ignore_index can never occur in these labels, so no position is ignored; padding written as
        # ignore_index wrapped into some other value on the way in (-100 -> 156 in uint8).
        warnings.warn(
            f"labels have dtype {labels.dtype}, which cannot hold ignore_index={ignore_index}: no position is ignored. "
            "Use int64 labels (or an ignore_index the dtype holds) to mask padding.",
            stacklevel=4,
        )
    return narrow


def _bad_labels(wide: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    return (wide != ignore_index) & ((wide < 0) | (wide >= num_classes))


def _raise_label_range(labels: torch.Tensor, wide: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    bad = _bad_labels(wide, num_classes, ignore_index)
    value = int(wide[bad][0])
    hint = ""
    if labels.dtype != torch.int64 and not _holds(labels.dtype, ignore_index):
        hint = (
            f" labels have dtype {labels.dtype}, which cannot hold ignore_index={ignore_index}: padding stored as "
            f"{ignore_index} reads as another value there; build the labels as int64."
        )
    raise ValueError(
        f"Label {value} is out of range for {num_classes} classes: labels must be in [0, {num_classes}) or equal to "
        f"ignore_index={ignore_index}. Check the tokenizer/model vocabulary sizes and the padding value.{hint}"
    )


def check_label_range(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Labels in ``[0, num_classes)`` or equal to ``ignore_index``, compared in int64: in a narrow dtype (uint8, int8,
    int16) ``labels >= num_classes`` would compare against ``num_classes`` wrapped into that dtype (300 -> 44 in uint8)
    and refuse valid labels."""
    _narrow_labels(labels, ignore_index)
    wide = labels.to(torch.int64)
    if bool(_bad_labels(wide, num_classes, ignore_index).any()):
        _raise_label_range(labels, wide, num_classes, ignore_index)


def read_host(values: torch.Tensor) -> list[float]:
    """The one device-to-host read of a loss call (tests count the calls)."""
    return values.tolist()


@dataclass(frozen=True)
class CallFacts:
    """What a loss call reads from the device, once: scored-token count, weight sum, the ``"mean"`` denominator and
    whether a scored row holds a ``-inf`` logit (materialized path) or may (fused path: a non-finite input)."""

    num_valid: int
    weight_sum: float
    denominator: float | None
    neginf: bool


def read_call_facts(
    labels: torch.Tensor,
    wide: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    num_classes: int,
    ignore_index: int,
    reduction: str,
    num_items_in_batch,
    neginf: torch.Tensor | bool = False,
) -> CallFacts:
    """Validate a call's labels, weights and ``num_items_in_batch`` and read its counts in ONE host read (no sync per
    chunk: #12). ``labels`` are the labels as given (for the error message), ``wide`` the flat int64 labels, ``valid``
    the scored rows (label kept and weight not 0), ``weights`` the flat weights or None."""
    device = valid.device
    f64 = torch.float64
    count = valid.sum()
    facts = [
        count.to(f64),
        torch.where(valid, weights, 0.0).sum(dtype=f64) if weights is not None else count.to(f64),
        _bad_labels(wide, num_classes, ignore_index).any().to(f64),
        (~torch.isfinite(weights) | (weights < 0)).any().to(f64) if weights is not None else count.new_zeros((), dtype=f64),
        torch.as_tensor(neginf, device=device).to(f64).reshape(()),
    ]
    if torch.is_tensor(num_items_in_batch):
        facts.append(num_items_in_batch.detach().reshape(-1)[0].to(device=device, dtype=f64))
    host = read_host(torch.stack(facts))
    num_valid, weight_sum, bad_labels, bad_weights, has_neginf = host[:5]
    if bad_labels:
        _raise_label_range(labels, wide, num_classes, ignore_index)
    if bad_weights:
        flat = weights.reshape(-1)
        index = int((~torch.isfinite(flat) | (flat < 0)).nonzero()[0])
        raise ValueError(
            f"weights must be finite and >= 0 (0 means: do not score this token), got {float(flat[index])} at flat "
            f"position {index}. Check the collator's loss_weights."
        )
    items = host[5] if len(host) > 5 else num_items_in_batch
    denominator = None
    if reduction == "mean":
        denominator = mean_denominator(
            num_items_in_batch, items, int(num_valid), weight_sum, weighted=weights is not None
        )
    return CallFacts(int(num_valid), float(weight_sum), denominator, bool(has_neginf))


def mean_denominator(num_items_in_batch, value, num_valid: int, weight_sum: float, *, weighted: bool) -> float:
    """What a ``"mean"`` divides by, as a Python float > 0 (a window with no scored token gives 0 / 1 = 0).

    Without weights: the token count, ``num_items_in_batch`` when given, which must be finite, >= 0, and >= 1 when
    this call scores a token (0, a negative count or NaN would otherwise return the sum, or a negated or NaN loss,
    without a word). With weights: the total weight, ``num_items_in_batch`` when given (the window's total weight,
    any positive number), else this call's weight sum.
    """
    if num_items_in_batch is None:
        if weighted:
            return weight_sum if weight_sum > 0 else 1.0
        return float(max(num_valid, 1))
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(
            f"num_items_in_batch must be a finite token count >= 0, got {num_items_in_batch!r}. It is the number of "
            "scored tokens a 'mean' divides by (the Trainer's count over the accumulation window and ranks)."
        )
    if weighted:
        if value == 0.0 and num_valid > 0:
            raise ValueError(
                f"num_items_in_batch=0 but this call scores {num_valid} token(s) with weight sum {weight_sum:g}: with "
                "weights it is the total weight a 'mean' divides by (over the accumulation window and ranks) and must "
                "include them. Pass that total, or None to divide by this call's weight sum."
            )
        return value if value > 0 else 1.0
    if value < 1.0 and num_valid > 0:
        raise ValueError(
            f"num_items_in_batch={value:g} but this call scores {num_valid} token(s): the count a 'mean' divides "
            "by must include them (the Trainer's count of labels != ignore_index over the accumulation window and "
            "ranks). Pass that count, or None to divide by the tokens scored here."
        )
    return max(value, 1.0)


def smoothing_classes(
    vocab_size: int, *, num_classes: int | None = None, exclude_ids=None
) -> tuple[torch.Tensor | None, int]:
    """``(mask, K)``: the ``(vocab_size,)`` bool mask of the classes that take part in smoothing (the smoothing
    target's support, MaxSup's mean and ``K``), or None when that is the whole vocabulary, and their number.

    ``num_classes`` keeps ids ``< num_classes`` (``len(tokenizer)`` when the embedding matrix is padded, as Qwen's
    151,936 rows for 151,665 tokens); ``exclude_ids`` drops single ids (padding, special tokens). Validated here, on
    the host (the mask is built in Python: no device read)."""
    keep = vocab_size
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= vocab_size:
            raise ValueError(
                f"num_classes (smoothing_num_classes) must be an int in [1, {vocab_size}] (the logits' last "
                f"dimension), got {num_classes!r}. It is the number of real classes, e.g. len(tokenizer)."
            )
        keep = num_classes
    excluded = set()
    if exclude_ids is not None:
        ids = exclude_ids.tolist() if torch.is_tensor(exclude_ids) else list(exclude_ids)
        for value in ids:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
                raise ValueError(
                    f"exclude_ids (smoothing_exclude_ids) must hold int class ids in [0, {vocab_size}), got "
                    f"{value!r}."
                )
        excluded = {value for value in ids if value < keep}
    count = keep - len(excluded)
    if count == vocab_size:
        return None, vocab_size
    if count == 0:
        raise ValueError(
            "num_classes / exclude_ids (smoothing_num_classes / smoothing_exclude_ids) leave no class to smooth over."
        )
    mask = [index < keep and index not in excluded for index in range(vocab_size)]
    return torch.tensor(mask, dtype=torch.bool), count


def refuse_double_backward(name: str) -> None:
    """Called first in a closed-form backward: grad mode is on there only under ``create_graph=True``."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{name} does not support double backward: backward ran with create_graph=True (Hessian-vector products, "
            "gradient penalties, second-order optimizers), but its gradient is a closed form computed outside "
            "autograd, so a graph through it would be wrong. Call backward / torch.autograd.grad with "
            "create_graph=False, or compute this loss with differentiable torch ops (e.g. F.cross_entropy with "
            "label_smoothing) where second derivatives are needed."
        )


# --------------------------------------------------------------------------------------------------------------------
# Per-chunk maths, shared with the fused linear path (hf_smooth/fused.py)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Coefficients:
    """The (a, m, u) of the module docstring, built from the user-facing knobs, plus what else the per-chunk maths
    needs to know: the z-loss factor, the smoothing classes and whether ``-inf`` logits must be handled."""

    epsilon: float = 0.0
    alpha: float = 0.0
    fairseq: bool = False
    z_loss: float = 0.0
    # (V,) 0/1 in the compute dtype: the classes that take part in smoothing (`smoothing_classes`); None: all.
    classes: torch.Tensor | None = None
    num_included: int | None = None  # their number (host-side: reading classes.sum() in a chunk would sync)
    # False only when the caller knows no scored row holds a -inf logit: the plain sums then serve (no extra pass).
    neginf: bool = True

    def smoothing(self, k: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor | float:
        """eps' per row: eps for the uniform convention; for fairseq's, eps * K / (number of other classes), i.e.
        K - 1, or K when the label is outside the smoothing classes."""
        if not self.fairseq or self.epsilon == 0.0:
            return self.epsilon
        if self.classes is None or target is None:
            return self.epsilon * k / (k - 1.0)
        return self.epsilon * k / (k - self.classes.index_select(0, target))

    def on(self, device: torch.device, dtype: torch.dtype, *, neginf: bool) -> Coefficients:
        """These coefficients for one call: the class mask as 0/1 in the compute dtype on the device."""
        classes = None if self.classes is None else self.classes.to(device=device, dtype=dtype)
        return replace(self, classes=classes, neginf=neginf)


@dataclass
class RowStats:
    """What the backward pass keeps per row: four numbers, never a vocabulary-sized tensor."""

    lse: torch.Tensor  # logsumexp over finite entries
    argmax: torch.Tensor  # int64
    k: torch.Tensor  # number of smoothing classes that are not -inf (float)
    has_neginf: torch.Tensor  # bool


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _class_sum(z: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
    """Per-row sum over the smoothing classes: a matrix-vector product, no (rows, K) temporary."""
    return z.sum(dim=-1) if classes is None else torch.mv(z, classes)


def chunk_forward(
    z: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, coefs: Coefficients, *, workspace=None
):
    """Loss parts for one chunk of rows.

    Args:
        z: ``(rows, K)`` logits in the compute dtype (never modified).
        target: ``(rows,)`` labels with ignored rows replaced by 0.
        valid: ``(rows,)`` bool, False where the label is ignored.
        workspace: optional ``(rows, K)`` tensor like ``z`` for the one chunk-sized temporary (the fused path reuses
            it across chunks instead of allocating, and page-faulting, a fresh one each time).

    Returns ``(stats, row_loss, row_parts)``; ``row_parts`` is ``(nll, regularizer, top1_prob, correct, gap, z_loss,
    entropy)``, unweighted. Values at invalid rows are garbage (possibly NaN): the caller masks them with
    ``torch.where``. No host-device synchronization: every row takes the same path (#12).
    """
    classes = coefs.classes
    zmax, amax = z.max(dim=-1)
    # exp(z_k - z_max), with the max already at hand; -inf entries give exp(-inf) = 0.
    shifted = torch.sub(z, zmax.unsqueeze(-1), out=workspace).exp_()
    total = shifted.sum(dim=-1)
    log_sum = total.log()
    lse = log_sum + zmax
    if coefs.neginf:
        # Masked vocabulary entries: K and the mean over the finite ones (module docstring). Every row pays (two
        # temporaries), so the caller sets neginf only when a -inf may be there.
        absent = torch.isneginf(z)
        finite = z.masked_fill(absent, 0.0)  # NaN and +inf kept: they make the row NaN, as they should
        k = _class_sum((~absent).to(z.dtype), classes)
        zsum = _class_sum(finite, classes)
        expected = shifted.mul_(finite).sum(dim=-1)  # shifted is not needed after its sum: reused in place
        has_neginf = absent.any(dim=-1)
    else:
        zsum = _class_sum(z, classes)
        k = torch.full_like(zsum, z.shape[-1] if coefs.num_included is None else coefs.num_included)
        expected = shifted.mul_(z).sum(dim=-1)  # in place: measured 4x faster than a batched dot (bmm) on CPU
        # Not known without a pass: a -inf (or NaN) logit makes the plain sum -inf or NaN, so this flags every row
        # that may hold one; the caller reads the flags once per call and re-scores with neginf=True if any is set.
        has_neginf = ~torch.isfinite(zsum)
    z_y = z.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    # H = lse - sum_k p_k z_k, with sum_k p_k z_k = sum_k exp(z_k - z_max) z_k / sum_k exp(z_k - z_max).
    entropy = lse - expected / total
    return row_parts(zmax, amax, log_sum, zsum, k, z_y, entropy, has_neginf, target, coefs)


def row_parts(zmax, amax, log_sum, zsum, k, z_y, entropy, has_neginf, target, coefs: Coefficients):
    """`chunk_forward`'s results from its per-row reductions, all ``(rows,)``: the loss formulas, shared with the
    Triton kernel (hf_smooth/triton_kernels.py), which computes the same reductions in one pass over the row."""
    lse = log_sum + zmax
    zmean = zsum / k
    eps = coefs.smoothing(k, target)
    # (z_max - z_y) + log_sum, not lse - z_y: for a confident token log_sum is tiny and z_max + log_sum rounds it to
    # the float32 ulp of z_max (logits ~30: per-token NLL off by 0.2% at the median, F.cross_entropy 0.005%).
    nll = (zmax - z_y) + log_sum
    regularizer = coefs.alpha * (zmax - zmean)
    if torch.is_tensor(eps) or eps != 0.0:  # skipped at eps = 0: 0 * (z_y - mean z) is NaN when z_y = -inf
        regularizer = regularizer + eps * (z_y - zmean)
    # PaLM's z-loss (Chowdhery et al. 2022, sec. 5): c * log(Z)**2 keeps the normalizer near 1.
    z_loss = coefs.z_loss * lse.square() if coefs.z_loss != 0.0 else torch.zeros_like(lse)
    # z_y = -inf (p_y = 0): +inf whatever the regularizer (module docstring), not inf + eps * (-inf) = NaN. A NaN nll
    # (NaN or +inf logits) stays NaN.
    row_loss = torch.where(torch.isposinf(nll), nll, nll + regularizer + z_loss)
    top1 = log_sum.neg().exp()  # exp(z_max - lse)
    correct = (amax == target).to(zmax.dtype)
    gap = zmax - zmean
    return RowStats(lse, amax, k, has_neginf), row_loss, (nll, regularizer, top1, correct, gap, z_loss, entropy)


def chunk_logit_grad(
    z: torch.Tensor,
    target: torch.Tensor,
    stats: RowStats,
    coefs: Coefficients,
    row_scale: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``d loss / d z`` for one chunk, times ``row_scale`` per row (0 for ignored rows), in the compute dtype.

    ``(1 + 2 c lse) softmax(z) - a * onehot(y) + m * onehot(argmax) - u / K`` (module docstring), with ``u / K`` only
    on the smoothing classes that are not ``-inf``. Written into ``out`` when given; ``out=z`` overwrites the logits
    (the fused path, which needs them no more). No host-device synchronization (#12).
    """
    eps = coefs.smoothing(stats.k, target)
    u = eps + coefs.alpha
    spread = torch.is_tensor(u) or u != 0.0
    absent = torch.isneginf(z) if spread and coefs.neginf else None  # read before out overwrites z
    grad = torch.sub(z, stats.lse.unsqueeze(-1), out=out).exp_()
    # The row scale goes in with the softmax pass, so z-loss's factor (1 + 2 c lse) costs no extra pass.
    soft = row_scale if coefs.z_loss == 0.0 else row_scale * (1.0 + 2.0 * coefs.z_loss * stats.lse)
    grad.mul_(soft.unsqueeze(-1))
    if spread:
        share = u * row_scale / stats.k
        if coefs.classes is None:
            grad.sub_(share.unsqueeze(-1))
        else:
            grad.addr_(share, coefs.classes, alpha=-1.0)  # rank-1 update in place: -share on the smoothing classes
        if absent is not None:
            grad.masked_fill_(absent, 0.0)
    rows = torch.arange(z.shape[0], device=z.device)
    grad.index_put_((rows, target), (eps - 1.0) * row_scale, accumulate=True)
    if coefs.alpha != 0.0:
        grad.index_put_((rows, stats.argmax), coefs.alpha * row_scale, accumulate=True)
    # A fill, not only the product: 0 * NaN is NaN, and ignored rows may hold NaN logits.
    return grad.masked_fill_((row_scale == 0).unsqueeze(-1), 0.0)


def row_chunks(num_rows: int, num_classes: int, chunk_size: int | None):
    rows = chunk_size if chunk_size else max(1, CHUNK_ELEMENTS // max(1, num_classes))
    for start in range(0, num_rows, rows):
        yield slice(start, min(start + rows, num_rows))


# --------------------------------------------------------------------------------------------------------------------
# Autograd function on materialized logits
# --------------------------------------------------------------------------------------------------------------------


class _SmoothedCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, weights, coefs, ignore_index, reduction, num_items_in_batch, chunk_size, given):
        num_rows, num_classes = logits.shape
        cdtype = compute_dtype(logits.dtype)
        valid = labels != ignore_index
        if weights is not None:
            weights = weights.to(cdtype)
            valid = valid & (weights != 0)  # weight 0 == ignored: never scored, NaN logits there included
        # Clamped so that an out-of-range label cannot index out of bounds before the host read refuses it.
        target = torch.where(valid, labels, 0).clamp_(0, num_classes - 1)
        row_weights = None if weights is None else torch.where(valid, weights, 0.0)

        def scores(coefs):
            row_loss = torch.zeros(num_rows, dtype=cdtype, device=logits.device)
            parts = torch.zeros(7, num_rows, dtype=cdtype, device=logits.device)
            lse = torch.zeros(num_rows, dtype=cdtype, device=logits.device)
            argmax = torch.zeros(num_rows, dtype=torch.long, device=logits.device)
            k = torch.ones(num_rows, dtype=cdtype, device=logits.device)
            has_neginf = torch.zeros(num_rows, dtype=torch.bool, device=logits.device)
            for rows in row_chunks(num_rows, num_classes, chunk_size):
                z = logits[rows].to(cdtype)
                stats, loss_rows, part_rows = chunk_forward(z, target[rows], valid[rows], coefs)
                keep = valid[rows]
                part_rows = torch.stack(part_rows)
                if row_weights is not None:
                    loss_rows, part_rows = loss_rows * row_weights[rows], part_rows * row_weights[rows]
                row_loss[rows] = torch.where(keep, loss_rows, 0.0)
                parts[:, rows] = torch.where(keep, part_rows, 0.0)
                lse[rows], argmax[rows], k[rows] = stats.lse, stats.argmax, stats.k
                has_neginf[rows] = stats.has_neginf & keep
            return row_loss, parts, lse, argmax, k, has_neginf

        # First pass without the -inf handling; its plain class sums show whether a scored row holds a -inf logit,
        # read with everything else in the call's one host read. Only then, and rarely, a second, exact pass.
        fast = coefs.on(logits.device, cdtype, neginf=False)
        row_loss, parts, lse, argmax, k, has_neginf = scores(fast)
        probe = has_neginf.any()
        facts = read_call_facts(
            given, labels, valid, weights, num_classes=num_classes, ignore_index=ignore_index, reduction=reduction,
            num_items_in_batch=num_items_in_batch, neginf=probe,
        )
        coefs = fast
        if facts.neginf:
            coefs = coefs.on(logits.device, cdtype, neginf=True)
            row_loss, parts, lse, argmax, k, has_neginf = scores(coefs)

        weight_sum = row_weights.sum() if row_weights is not None else valid.sum().to(cdtype)
        sums = torch.cat([valid.sum().to(cdtype).unsqueeze(0), row_loss.sum().unsqueeze(0), parts.sum(dim=1),
                          weight_sum.to(cdtype).unsqueeze(0)])
        if reduction == "none":
            out = row_loss
        elif reduction == "sum":
            out = row_loss.sum()
        else:
            out = (row_loss.sum(dtype=torch.float64) / facts.denominator).to(cdtype)

        ctx.save_for_backward(logits, target, valid, row_weights, lse, argmax, k, has_neginf)
        ctx.coefs, ctx.reduction, ctx.denominator, ctx.chunk_size = coefs, reduction, facts.denominator, chunk_size
        ctx.mark_non_differentiable(sums)
        return out, sums

    @staticmethod
    def backward(ctx, grad_out, _grad_sums):
        refuse_double_backward("smoothed_cross_entropy")
        logits, target, valid, row_weights, lse, argmax, k, has_neginf = ctx.saved_tensors
        cdtype = lse.dtype
        if ctx.reduction == "none":
            scale = grad_out.to(cdtype)
        elif ctx.reduction == "sum":
            scale = grad_out.to(cdtype).expand(logits.shape[0])
        else:
            scale = (grad_out.to(cdtype) / ctx.denominator).expand(logits.shape[0])
        scale = torch.where(valid, scale, 0.0)
        if row_weights is not None:
            scale = scale * row_weights

        grad = torch.empty_like(logits)
        for rows in row_chunks(logits.shape[0], logits.shape[1], ctx.chunk_size):
            stats = RowStats(lse[rows], argmax[rows], k[rows], has_neginf[rows])
            z = logits[rows].to(cdtype)
            grad[rows] = chunk_logit_grad(z, target[rows], stats, ctx.coefs, scale[rows]).to(logits.dtype)
        return grad, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------------


def prepare_call(logits, labels, *, epsilon, alpha, convention, ignore_index, reduction, z_loss, weights, num_classes,
             exclude_ids, chunk_size, name="logits", last="vocab_size", vocab_size=None):
    """Checks shared by the two public entry points; ``(coefs, flat labels, flat weights)``."""
    check_options(epsilon=epsilon, alpha=alpha, convention=convention, reduction=reduction, z_loss=z_loss)
    check_inputs(logits, labels, ignore_index, name=name, last=last)
    check_weights(weights, labels)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}.")
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    classes, included = smoothing_classes(vocab_size, num_classes=num_classes, exclude_ids=exclude_ids)
    if convention == "fairseq" and epsilon > 0 and included < 2:
        raise ValueError("The fairseq convention spreads eps over K - 1 classes and needs K >= 2.")
    _narrow_labels(labels, ignore_index)
    coefs = Coefficients(
        epsilon=float(epsilon), alpha=float(alpha), fairseq=convention == "fairseq", z_loss=float(z_loss),
        classes=classes, num_included=None if classes is None else included,
    )
    flat_labels = labels.reshape(-1).to(device=logits.device, dtype=torch.long)
    flat_weights = None if weights is None else weights.reshape(-1).to(device=logits.device)
    return coefs, flat_labels, flat_weights


def smoothed_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    epsilon: float = 0.0,
    alpha: float = 0.0,
    convention: str = "uniform",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    return_components: bool = False,
    chunk_size: int | None = None,
    z_loss: float = 0.0,
    weights: torch.Tensor | None = None,
    num_classes: int | None = None,
    exclude_ids=None,
):
    """Cross-entropy with label smoothing (``epsilon``) and/or MaxSup (``alpha``), exact under padding.

    ``label_smoothing_loss`` and ``maxsup_loss`` are this function with one knob set; both knobs together give
    ``CE + eps' * (z_y - mean z) + alpha * (z_max - mean z)``, plus ``z_loss * lse**2`` when set.

    Args:
        logits (`torch.Tensor` of shape `(..., K)`):
            Unnormalized scores, any floating dtype; aligned with `labels` (shift causal LMs before calling).
        labels (`torch.Tensor` of shape `(...)`):
            Class indices in `[0, K)`, or `ignore_index`.
        epsilon (`float`, *optional*, defaults to 0.0):
            Label-smoothing mass, in [0, 1]; its meaning depends on `convention`.
        alpha (`float`, *optional*, defaults to 0.0):
            MaxSup weight, >= 0.
        convention (`str`, *optional*, defaults to `"uniform"`):
            `"uniform"`: target `(1 - eps) * onehot + eps / K` (PyTorch, transformers). `"fairseq"`: target `1 - eps` on
            the label and `eps / (K - 1)` on each other class.
        ignore_index (`int`, *optional*, defaults to -100):
            Label value that marks positions contributing nothing.
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"`: sum over scored tokens divided by `num_items_in_batch` when given, else by their count (their
            weight sum with `weights`); `"sum"`; `"none"`: per-token loss of the shape of `labels`, 0 at ignored
            positions.
        num_items_in_batch (`int`, `float` or `torch.Tensor`, *optional*):
            Global token count (total weight, with `weights`) to divide by under `"mean"` (the Trainer's count over
            the accumulation window and ranks).
        return_components (`bool`, *optional*, defaults to `False`):
            Also return a [`LossComponents`] of detached sums (NLL, regularizer, accuracy, ...) for logging.
        chunk_size (`int`, *optional*):
            Rows processed at once; by default chosen so one float32 chunk holds about 4M elements.
        z_loss (`float`, *optional*, defaults to 0.0):
            Adds `z_loss * lse**2` per scored token, `lse = logsumexp(z)` (PaLM's z-loss, Liger's `lse_square_scale`;
            1e-4 is usual): it keeps the softmax normalizer near 1. Combines with any smoothing.
        weights (`torch.Tensor` of the shape of `labels`, *optional*):
            Per-token loss weights, finite and >= 0 (a negative or NaN weight is refused). The loss becomes
            `sum_t w_t * l_t`; `"mean"` divides by the weight sum (`num_items_in_batch` then means the total weight of
            the accumulation window); a weight of 0 is exactly `ignore_index`. `"none"` returns `w_t * l_t`.
        num_classes (`int`, *optional*):
            Only classes `< num_classes` take part in smoothing (e.g. `len(tokenizer)` when the embedding matrix is
            padded past the tokenizer). The others keep their place in the softmax (and in the NLL, the z-loss and the
            entropy) but receive no smoothing mass and are left out of `mean z` and of `K`, in both conventions.
        exclude_ids (sequence of `int`, *optional*):
            Single class ids left out of smoothing the same way (padding, special tokens). A label may be such a class:
            its one-hot part still applies (target `1 - eps` on it, `eps` spread over the smoothing classes).

    Returns:
        `torch.Tensor` (float32, or float64 for float64 logits), or `(loss, LossComponents)`.
    """
    coefs, flat_labels, flat_weights = prepare_call(
        logits, labels, epsilon=epsilon, alpha=alpha, convention=convention, ignore_index=ignore_index,
        reduction=reduction, z_loss=z_loss, weights=weights, num_classes=num_classes, exclude_ids=exclude_ids,
        chunk_size=chunk_size,
    )
    num_classes_total = logits.shape[-1]
    flat_logits = logits.reshape(-1, num_classes_total)
    out, sums = _SmoothedCrossEntropyFunction.apply(
        flat_logits, flat_labels, flat_weights, coefs, ignore_index, reduction, num_items_in_batch, chunk_size, labels
    )
    if reduction == "none":
        out = out.reshape(labels.shape)
    if return_components:
        return out, LossComponents.from_vector(sums.detach().float())
    return out


def label_smoothing_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    epsilon: float = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    convention: str = "uniform",
    return_components: bool = False,
    chunk_size: int | None = None,
    **family,
):
    """Label-smoothed cross-entropy; with the default convention it equals
    ``F.cross_entropy(logits, labels, label_smoothing=epsilon, ignore_index=ignore_index)``.

    Args:
        epsilon (`float`, *optional*, defaults to 0.1):
            Smoothing mass in [0, 1]. `convention="uniform"` spreads it over all K classes (`eps / K` each, the true
            class keeps `1 - eps + eps / K`); `convention="fairseq"` keeps `1 - eps` on the true class and gives
            `eps / (K - 1)` to each other class, which equals uniform with `eps * K / (K - 1)`.

    The other arguments (`z_loss`, `weights`, `num_classes`, `exclude_ids` included) are those of
    [`smoothed_cross_entropy`].
    """
    return smoothed_cross_entropy(
        logits,
        labels,
        epsilon=epsilon,
        convention=convention,
        ignore_index=ignore_index,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        return_components=return_components,
        chunk_size=chunk_size,
        **_family(family),
    )


def maxsup_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    return_components: bool = False,
    chunk_size: int | None = None,
    **family,
):
    """Max Suppression: ``CE + alpha * (z_max - mean_k z_k)`` per scored token (arXiv 2502.15798).

    The max and the mean run over the vocabulary of that token only; ignored tokens contribute nothing. The penalty
    gradient is ``alpha * (1 - 1/K)`` on the argmax logit and ``-alpha / K`` on every other logit (no detach). With
    `num_classes` / `exclude_ids` the mean (and `K`) run over the smoothing classes; the max over every class.

    Args:
        alpha (`float`, *optional*, defaults to 0.1):
            Penalty weight, >= 0. The paper ramps it 0.1 -> 0.2 over training; the trainer's schedule does that.

    The other arguments (`z_loss`, `weights`, `num_classes`, `exclude_ids` included) are those of
    [`smoothed_cross_entropy`].
    """
    return smoothed_cross_entropy(
        logits,
        labels,
        alpha=alpha,
        ignore_index=ignore_index,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        return_components=return_components,
        chunk_size=chunk_size,
        **_family(family),
    )


FAMILY_KEYWORDS = ("z_loss", "weights", "num_classes", "exclude_ids")


def _family(kwargs: dict) -> dict:
    unknown = sorted(set(kwargs) - set(FAMILY_KEYWORDS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; the extra keywords are {FAMILY_KEYWORDS}.")
    return kwargs
