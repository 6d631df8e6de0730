"""Label smoothing and MaxSup: every loss formula hf_smooth uses lives in this module.

One family covers them all. For a scored token with label ``y`` and logits ``z`` over ``K`` vocabulary
entries, with ``lse = logsumexp(z)``:

    loss = lse - a * z_y + m * z_max - u * mean(z)

    cross-entropy                    a = 1          m = 0      u = 0
    label smoothing, uniform (eps)   a = 1 - eps    m = 0      u = eps
    label smoothing, fairseq (eps)   the uniform form with eps' = eps * K / (K - 1)
    MaxSup (alpha)                   a = 1          m = alpha  u = alpha

"uniform" is PyTorch's ``F.cross_entropy(label_smoothing=eps)`` and transformers' ``LabelSmoother``: the soft
target is ``(1 - eps) * onehot(y) + eps / K``, so ``LS = CE + eps * (z_y - mean z)``. "fairseq" is the target
``1 - eps`` on ``y`` and ``eps / (K - 1)`` on every other entry (fairseq's ``label_smoothed_cross_entropy``,
pytorch#148884 for the naming confusion). MaxSup (Zhou et al., NeurIPS 2025, arXiv 2502.15798, eq. 9) replaces
``z_y`` by ``z_max``: ``MaxSup = CE + alpha * (z_max - mean z)``; no detach, as in the official code.

The gradient with respect to the logits is closed-form:

    d loss / d z = softmax(z) - a * onehot(y) + m * onehot(argmax z) - u / K

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
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

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
    (``a + b``) and dividing once at the end (``.means()``).

    Args:
        num_tokens (`torch.Tensor`): number of scored tokens.
        loss (`torch.Tensor`): sum of the per-token objective (NLL plus regularizer).
        nll (`torch.Tensor`): sum of ``-log p_y``, the true cross-entropy.
        regularizer (`torch.Tensor`): sum of ``loss - nll``: ``eps' * (z_y - mean z)`` for label smoothing,
            ``alpha * (z_max - mean z)`` for MaxSup, 0 for cross-entropy (``-inf`` from label smoothing when a label's
            logit is ``-inf``, where ``loss`` and ``nll`` are ``+inf``).
        top1_prob (`torch.Tensor`): sum of the highest predicted probability ``max_k p_k``.
        correct (`torch.Tensor`): number of tokens whose argmax equals the label.
        logit_gap (`torch.Tensor`): sum of ``z_max - mean z`` (the quantity MaxSup penalizes).
    """

    num_tokens: torch.Tensor
    loss: torch.Tensor
    nll: torch.Tensor
    regularizer: torch.Tensor
    top1_prob: torch.Tensor
    correct: torch.Tensor
    logit_gap: torch.Tensor

    FIELDS = ("num_tokens", "loss", "nll", "regularizer", "top1_prob", "correct", "logit_gap")

    @classmethod
    def from_vector(cls, vector: torch.Tensor) -> LossComponents:
        return cls(*vector.unbind(0))

    def to_vector(self) -> torch.Tensor:
        """All sums stacked in ``FIELDS`` order (one tensor to all-reduce across ranks)."""
        return torch.stack([getattr(self, name) for name in self.FIELDS])

    def __add__(self, other: LossComponents) -> LossComponents:
        return LossComponents.from_vector(self.to_vector() + other.to_vector().to(self.num_tokens.device))

    def means(self) -> dict[str, float]:
        """Per-token means as Python floats: ``loss``, ``nll``, ``ppl`` (``exp(nll)``), ``regularizer``,
        ``top1_prob``, ``accuracy``, ``logit_gap``, plus ``num_tokens``. With no token every mean is 0 (``ppl`` 1);
        an NLL too large for ``exp`` gives ``ppl = inf`` (`perplexity`)."""
        sums = self.to_vector().double().tolist()
        count = sums[0]
        if count == 0:
            means = {name: 0.0 for name in self.FIELDS[1:]}
        else:
            means = {name: value / count for name, value in zip(self.FIELDS[1:], sums[1:])}
        means["accuracy"] = means.pop("correct")
        means["ppl"] = perplexity(means["nll"])
        means["num_tokens"] = count
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


def check_options(*, epsilon: float, alpha: float, convention: str, reduction: str) -> None:
    if not 0.0 <= float(epsilon) <= 1.0:  # also rejects NaN and inf
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}.")
    if not (float(alpha) >= 0.0 and math.isfinite(float(alpha))):  # NaN fails >= 0
        raise ValueError(f"alpha must be >= 0 and finite, got {alpha}.")
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


def _holds(dtype: torch.dtype, value: int) -> bool:
    info = torch.iinfo(dtype)
    return info.min <= value <= info.max


def check_label_range(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Labels in ``[0, num_classes)`` or equal to ``ignore_index``, compared in int64: in a narrow dtype (uint8, int8,
    int16) ``labels >= num_classes`` would compare against ``num_classes`` wrapped into that dtype (300 -> 44 in uint8)
    and refuse valid labels."""
    narrow = labels.dtype != torch.int64 and not _holds(labels.dtype, ignore_index)
    if narrow:
        # ignore_index can never occur in these labels, so no position is ignored; padding written as
        # ignore_index wrapped into some other value on the way in (-100 -> 156 in uint8).
        warnings.warn(
            f"labels have dtype {labels.dtype}, which cannot hold ignore_index={ignore_index}: no position is ignored. "
            "Use int64 labels (or an ignore_index the dtype holds) to mask padding.",
            stacklevel=3,
        )
    wide = labels.to(torch.int64)
    bad = (wide != ignore_index) & ((wide < 0) | (wide >= num_classes))
    if bool(bad.any()):
        value = int(wide[bad][0])
        hint = ""
        if narrow:
            hint = (
                f" labels have dtype {labels.dtype}, which cannot hold ignore_index={ignore_index}: padding stored as "
                f"{ignore_index} reads as another value there; build the labels as int64."
            )
        raise ValueError(
            f"Label {value} is out of range for {num_classes} classes: labels must be in [0, {num_classes}) or equal to "
            f"ignore_index={ignore_index}. Check the tokenizer/model vocabulary sizes and the padding value.{hint}"
        )


def token_denominator(num_items_in_batch, num_valid: torch.Tensor) -> torch.Tensor:
    """The token count a ``"mean"`` divides by, as a float64 tensor >= 1 (a window with no token gives 0 / 1 = 0).

    ``num_items_in_batch`` must be finite and >= 0, and >= 1 when this call scores a token (``num_valid > 0``): 0, a
    negative count or NaN would otherwise return the sum, or a negated or NaN loss, without a word. A tensor count
    costs one host sync (count and ``num_valid`` read together); a Python number only when it is below 1.
    """
    if num_items_in_batch is None:
        return num_valid.to(torch.float64).clamp(min=1.0)
    if torch.is_tensor(num_items_in_batch):
        count = num_items_in_batch.detach().reshape(-1)[0].to(device=num_valid.device, dtype=torch.float64)
        value, scored = torch.stack([count, num_valid.to(torch.float64)]).tolist()
    else:
        value, scored = float(num_items_in_batch), None
        count = torch.tensor(value, dtype=torch.float64, device=num_valid.device)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(
            f"num_items_in_batch must be a finite token count >= 0, got {num_items_in_batch!r}. It is the number of "
            "scored tokens a 'mean' divides by (the Trainer's count over the accumulation window and ranks)."
        )
    if value < 1.0:
        scored = int(num_valid) if scored is None else scored
        if scored > 0:
            raise ValueError(
                f"num_items_in_batch={value:g} but this call scores {int(scored)} token(s): the count a 'mean' divides "
                "by must include them (the Trainer's count of labels != ignore_index over the accumulation window and "
                "ranks). Pass that count, or None to divide by the tokens scored here."
            )
    return count.clamp(min=1.0)


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


@dataclass(frozen=True)
class Coefficients:
    """The (a, m, u) of the module docstring, built from the user-facing knobs."""

    epsilon: float = 0.0
    alpha: float = 0.0
    fairseq: bool = False

    def smoothing(self, k: torch.Tensor) -> torch.Tensor | float:
        """eps' per row: eps for the uniform convention, eps * K / (K - 1) for fairseq's."""
        if not self.fairseq or self.epsilon == 0.0:
            return self.epsilon
        return self.epsilon * k / (k - 1.0)



@dataclass
class RowStats:
    """What the backward pass keeps per row: four numbers, never a vocabulary-sized tensor."""

    lse: torch.Tensor  # logsumexp over finite entries
    argmax: torch.Tensor  # int64
    k: torch.Tensor  # number of entries that are not -inf (float)
    has_neginf: torch.Tensor  # bool


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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

    Returns ``(stats, row_loss, row_parts)``; ``row_parts`` is ``(nll, regularizer, top1_prob, correct, gap)``.
    Values at invalid rows are garbage (possibly NaN): the caller masks them with ``torch.where``.
    """
    zmax, amax = z.max(dim=-1)
    # log sum_k exp(z_k - z_max), with the max already at hand; -inf entries give exp(-inf) = 0.
    log_sum = torch.sub(z, zmax.unsqueeze(-1), out=workspace).exp_().sum(dim=-1).log_()
    lse = log_sum + zmax
    zsum = z.sum(dim=-1)
    k = torch.full_like(zsum, z.shape[-1])
    has_neginf = torch.isneginf(zsum)
    if bool(has_neginf.any()):
        # Masked vocabulary entries: mean over the finite ones (module docstring). Only rows that need it pay.
        rows = has_neginf.nonzero().squeeze(-1)
        sub = z.index_select(0, rows)
        finite = ~torch.isneginf(sub)
        zsum = zsum.index_put((rows,), torch.where(finite, sub, 0.0).sum(dim=-1))
        k = k.index_put((rows,), finite.sum(dim=-1).to(k.dtype))
    zmean = zsum / k
    z_y = z.gather(-1, target.unsqueeze(-1)).squeeze(-1)

    eps = coefs.smoothing(k)
    # (z_max - z_y) + log_sum, not lse - z_y: for a confident token log_sum is tiny and z_max + log_sum rounds it to
    # the float32 ulp of z_max (logits ~30: per-token NLL off by 0.2% at the median, F.cross_entropy 0.005%).
    nll = (zmax - z_y) + log_sum
    regularizer = coefs.alpha * (zmax - zmean)
    if torch.is_tensor(eps) or eps != 0.0:  # skipped at eps = 0: 0 * (z_y - mean z) is NaN when z_y = -inf
        regularizer = regularizer + eps * (z_y - zmean)
    # z_y = -inf (p_y = 0): +inf whatever the regularizer (module docstring), not inf + eps * (-inf) = NaN. A NaN nll
    # (NaN or +inf logits) stays NaN.
    row_loss = torch.where(torch.isposinf(nll), nll, nll + regularizer)
    top1 = log_sum.neg().exp()  # exp(z_max - lse)
    correct = (amax == target).to(z.dtype)
    gap = zmax - zmean
    return RowStats(lse, amax, k, has_neginf), row_loss, (nll, regularizer, top1, correct, gap)


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

    ``softmax(z) - a * onehot(y) + m * onehot(argmax) - u / K`` (module docstring), with ``u / K`` only on entries
    that are not ``-inf``. Written into ``out`` when given; ``out=z`` overwrites the logits (the fused path, which
    needs them no more).
    """
    eps = coefs.smoothing(stats.k)
    u = eps + coefs.alpha
    spread = torch.is_tensor(u) or u != 0.0
    neginf = torch.isneginf(z) if spread and bool(stats.has_neginf.any()) else None  # read before out overwrites z
    grad = torch.sub(z, stats.lse.unsqueeze(-1), out=out).exp_()
    if spread:
        grad.sub_((u / stats.k).unsqueeze(-1))
        if neginf is not None:
            grad.masked_fill_(neginf, 0.0)
    rows = torch.arange(z.shape[0], device=z.device)
    grad.index_put_((rows, target), torch.full_like(stats.lse, -1.0) + eps, accumulate=True)
    if coefs.alpha != 0.0:
        grad.index_put_((rows, stats.argmax), torch.full_like(stats.lse, coefs.alpha), accumulate=True)
    # In place (the chunk is the largest temporary), then a fill, not only a product: 0 * NaN is NaN, and ignored rows
    # may hold NaN logits.
    scale = row_scale.unsqueeze(-1)
    return grad.mul_(scale).masked_fill_(scale == 0, 0.0)


def row_chunks(num_rows: int, num_classes: int, chunk_size: int | None):
    rows = chunk_size if chunk_size else max(1, CHUNK_ELEMENTS // max(1, num_classes))
    for start in range(0, num_rows, rows):
        yield slice(start, min(start + rows, num_rows))


# --------------------------------------------------------------------------------------------------------------------
# Autograd function on materialized logits
# --------------------------------------------------------------------------------------------------------------------


class _SmoothedCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, coefs, ignore_index, reduction, num_items_in_batch, chunk_size):
        num_rows, num_classes = logits.shape
        cdtype = compute_dtype(logits.dtype)
        valid = labels != ignore_index
        target = torch.where(valid, labels, 0)

        row_loss = torch.zeros(num_rows, dtype=cdtype, device=logits.device)
        parts = torch.zeros(5, num_rows, dtype=cdtype, device=logits.device)
        lse = torch.zeros(num_rows, dtype=cdtype, device=logits.device)
        argmax = torch.zeros(num_rows, dtype=torch.long, device=logits.device)
        k = torch.ones(num_rows, dtype=cdtype, device=logits.device)
        has_neginf = torch.zeros(num_rows, dtype=torch.bool, device=logits.device)
        for rows in row_chunks(num_rows, num_classes, chunk_size):
            z = logits[rows].to(cdtype)
            stats, loss_rows, part_rows = chunk_forward(z, target[rows], valid[rows], coefs)
            keep = valid[rows]
            row_loss[rows] = torch.where(keep, loss_rows, 0.0)
            for i, part in enumerate(part_rows):
                parts[i, rows] = torch.where(keep, part, 0.0)
            lse[rows], argmax[rows], k[rows], has_neginf[rows] = stats.lse, stats.argmax, stats.k, stats.has_neginf

        num_valid = valid.sum()
        sums = torch.cat([num_valid.to(cdtype).unsqueeze(0), row_loss.sum().unsqueeze(0), parts.sum(dim=1)])
        if reduction == "none":
            out = row_loss
            denominator = None
        elif reduction == "sum":
            out = row_loss.sum()
            denominator = None
        else:
            denominator = token_denominator(num_items_in_batch, num_valid)
            out = (row_loss.sum() / denominator).to(cdtype)

        ctx.save_for_backward(logits, target, valid, lse, argmax, k, has_neginf)
        ctx.coefs, ctx.reduction, ctx.denominator, ctx.chunk_size = coefs, reduction, denominator, chunk_size
        ctx.mark_non_differentiable(sums)
        return out, sums

    @staticmethod
    def backward(ctx, grad_out, _grad_sums):
        refuse_double_backward("smoothed_cross_entropy")
        logits, target, valid, lse, argmax, k, has_neginf = ctx.saved_tensors
        cdtype = lse.dtype
        if ctx.reduction == "none":
            scale = grad_out.to(cdtype)
        elif ctx.reduction == "sum":
            scale = grad_out.to(cdtype).expand(logits.shape[0])
        else:
            scale = (grad_out.to(cdtype) / ctx.denominator.to(cdtype)).expand(logits.shape[0])
        scale = torch.where(valid, scale, 0.0)

        grad = torch.empty_like(logits)
        for rows in row_chunks(logits.shape[0], logits.shape[1], ctx.chunk_size):
            stats = RowStats(lse[rows], argmax[rows], k[rows], has_neginf[rows])
            z = logits[rows].to(cdtype)
            grad[rows] = chunk_logit_grad(z, target[rows], stats, ctx.coefs, scale[rows]).to(logits.dtype)
        return grad, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------------


def smoothed_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    epsilon: float = 0.0,
    alpha: float = 0.0,
    convention: str = "uniform",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    return_components: bool = False,
    chunk_size: int | None = None,
):
    """Cross-entropy with label smoothing (``epsilon``) and/or MaxSup (``alpha``), exact under padding.

    ``label_smoothing_loss`` and ``maxsup_loss`` are this function with one knob set; both knobs together give
    ``CE + eps' * (z_y - mean z) + alpha * (z_max - mean z)``.

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
            `"mean"`: sum over scored tokens divided by `num_items_in_batch` when given, else by their count;
            `"sum"`; `"none"`: per-token loss of the shape of `labels`, 0 at ignored positions.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*):
            Global token count to divide by under `"mean"` (the Trainer's count over the accumulation window and ranks).
        return_components (`bool`, *optional*, defaults to `False`):
            Also return a [`LossComponents`] of detached sums (NLL, regularizer, accuracy, ...) for logging.
        chunk_size (`int`, *optional*):
            Rows processed at once; by default chosen so one float32 chunk holds about 4M elements.

    Returns:
        `torch.Tensor` (float32, or float64 for float64 logits), or `(loss, LossComponents)`.
    """
    check_options(epsilon=epsilon, alpha=alpha, convention=convention, reduction=reduction)
    check_inputs(logits, labels, ignore_index)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}.")
    num_classes = logits.shape[-1]
    if convention == "fairseq" and epsilon > 0 and num_classes < 2:
        raise ValueError("The fairseq convention spreads eps over K - 1 classes and needs K >= 2.")
    check_label_range(labels, num_classes, ignore_index)

    coefs = Coefficients(epsilon=float(epsilon), alpha=float(alpha), fairseq=convention == "fairseq")
    flat_logits = logits.reshape(-1, num_classes)
    flat_labels = labels.reshape(-1).to(device=logits.device, dtype=torch.long)
    out, sums = _SmoothedCrossEntropyFunction.apply(
        flat_logits, flat_labels, coefs, ignore_index, reduction, num_items_in_batch, chunk_size
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
    num_items_in_batch: int | torch.Tensor | None = None,
    convention: str = "uniform",
    return_components: bool = False,
    chunk_size: int | None = None,
):
    """Label-smoothed cross-entropy; with the default convention it equals
    ``F.cross_entropy(logits, labels, label_smoothing=epsilon, ignore_index=ignore_index)``.

    Args:
        epsilon (`float`, *optional*, defaults to 0.1):
            Smoothing mass in [0, 1]. `convention="uniform"` spreads it over all K classes (`eps / K` each, the true
            class keeps `1 - eps + eps / K`); `convention="fairseq"` keeps `1 - eps` on the true class and gives
            `eps / (K - 1)` to each other class, which equals uniform with `eps * K / (K - 1)`.

    The other arguments are those of [`smoothed_cross_entropy`].
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
    )


def maxsup_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    return_components: bool = False,
    chunk_size: int | None = None,
):
    """Max Suppression: ``CE + alpha * (z_max - mean_k z_k)`` per scored token (arXiv 2502.15798).

    The max and the mean run over the vocabulary of that token only; ignored tokens contribute nothing. The penalty
    gradient is ``alpha * (1 - 1/K)`` on the argmax logit and ``-alpha / K`` on every other logit (no detach).

    Args:
        alpha (`float`, *optional*, defaults to 0.1):
            Penalty weight, >= 0. The paper ramps it 0.1 -> 0.2 over training; the trainer's schedule does that.

    The other arguments are those of [`smoothed_cross_entropy`].
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
    )
