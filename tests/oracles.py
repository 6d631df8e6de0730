"""Naive float64 reference losses for tests/test_losses.py.

Written from the definitions only, independently of hf_smooth (never import hf_smooth here): each oracle builds
what the maths says, the slow and memory-hungry way, in float64. Callers pass logits that require grad (any dtype)
and get float64 results connected to them, so the same oracle gives reference values and reference gradients.

- ``soft_target_cross_entropy``: builds the full target distribution ``q`` for a convention and computes
  ``-sum_k q_k * log_softmax(z)_k`` per scored token.
- ``maxsup_cross_entropy``: ``F.cross_entropy(reduction="none") + alpha * (max_k z_k - mean_k z_k)`` on the scored
  rows, picked with boolean indexing.
- ``torch_label_smoothing``: PyTorch's own ``F.cross_entropy(label_smoothing=eps)``, a second, independent oracle for
  the uniform convention.
- ``reduce_rows``: the ``mean`` / ``sum`` / ``none`` reductions, with ``num_items_in_batch``.
- ``drop_masked_vocabulary``: the same losses when some logits are ``-inf``, computed by removing those columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _flat(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    num_classes = logits.shape[-1]
    z = logits.reshape(-1, num_classes).to(torch.float64)
    y = labels.reshape(-1).long()
    return z, y, y != ignore_index


def _scatter_rows(values: torch.Tensor, valid: torch.Tensor, shape) -> torch.Tensor:
    """Per-token tensor of ``shape`` holding ``values`` at the scored positions and 0 elsewhere (differentiable)."""
    out = torch.zeros(valid.shape, dtype=torch.float64)
    out = out.index_put((valid.nonzero().squeeze(-1),), values)
    return out.reshape(shape)


def soft_targets(labels: torch.Tensor, num_classes: int, epsilon: float, convention: str) -> torch.Tensor:
    """The ``(N, K)`` float64 target distribution of each convention."""
    onehot = F.one_hot(labels, num_classes).to(torch.float64)
    if convention == "uniform":
        # (1 - eps) on the label, plus eps / K on every class (the label included).
        return (1.0 - epsilon) * onehot + epsilon / num_classes
    if convention == "fairseq":
        # 1 - eps on the label, eps / (K - 1) on each of the other K - 1 classes.
        return (1.0 - epsilon) * onehot + epsilon / (num_classes - 1) * (1.0 - onehot)
    raise ValueError(convention)


def soft_target_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, epsilon: float, convention: str = "uniform", ignore_index: int = -100
) -> torch.Tensor:
    """Per-token ``-sum_k q_k log p_k`` (shape of ``labels``, 0 at ignored positions), float64."""
    z, y, valid = _flat(logits, labels, ignore_index)
    q = soft_targets(y[valid], z.shape[-1], epsilon, convention)
    rows = -(q * F.log_softmax(z[valid], dim=-1)).sum(dim=-1)
    return _scatter_rows(rows, valid, labels.shape)


def maxsup_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, alpha: float, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token ``CE + alpha * (z_max - mean z)`` (shape of ``labels``, 0 at ignored positions), float64."""
    z, y, valid = _flat(logits, labels, ignore_index)
    zv = z[valid]
    ce = F.cross_entropy(zv, y[valid], reduction="none")
    rows = ce + alpha * (zv.max(dim=-1).values - zv.mean(dim=-1))
    return _scatter_rows(rows, valid, labels.shape)


def smoothed_rows(
    logits: torch.Tensor, labels: torch.Tensor, *, epsilon: float = 0.0, alpha: float = 0.0,
    convention: str = "uniform", ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token loss for either knob or both: soft-target CE plus the MaxSup penalty."""
    if alpha == 0.0:
        return soft_target_cross_entropy(
            logits, labels, epsilon=epsilon, convention=convention, ignore_index=ignore_index
        )
    if epsilon == 0.0:
        return maxsup_cross_entropy(logits, labels, alpha=alpha, ignore_index=ignore_index)
    # Both: the soft-target CE already holds the NLL; add the penalty alone.
    z, y, valid = _flat(logits, labels, ignore_index)
    zv = z[valid]
    penalty = _scatter_rows(alpha * (zv.max(dim=-1).values - zv.mean(dim=-1)), valid, labels.shape)
    smoothed = soft_target_cross_entropy(
        logits, labels, epsilon=epsilon, convention=convention, ignore_index=ignore_index
    )
    return smoothed + penalty


def torch_label_smoothing(
    logits: torch.Tensor, labels: torch.Tensor, *, epsilon: float, ignore_index: int = -100
) -> torch.Tensor:
    """PyTorch's uniform label smoothing per token (0 at ignored positions), float64."""
    z, y, _ = _flat(logits, labels, ignore_index)
    rows = F.cross_entropy(z, y, label_smoothing=epsilon, ignore_index=ignore_index, reduction="none")
    return rows.reshape(labels.shape)


def reduce_rows(
    rows: torch.Tensor, labels: torch.Tensor, *, reduction: str, num_items_in_batch=None, ignore_index: int = -100
) -> torch.Tensor:
    """``none``: the rows; ``sum``: their sum; ``mean``: the sum divided by ``num_items_in_batch`` when given, else by
    the number of scored tokens. A call with no scored token gives 0."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    assert reduction == "mean", reduction
    if num_items_in_batch is None:
        count = int((labels != ignore_index).sum())
    else:
        count = float(num_items_in_batch)  # int or one-element tensor
    if count == 0:
        assert bool((labels == ignore_index).all()), "dividing scored tokens by a zero count is undefined"
        return total * 0.0
    return total / count


def drop_masked_vocabulary(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, **knobs):
    """Per-token loss (float64) where ``-inf`` logits mark absent vocabulary entries: each scored row is scored as
    if its ``-inf`` columns did not exist (``K`` = its finite entries, the label index remapped), one row at a time,
    by ``smoothed_rows`` with ``knobs`` (``epsilon``, ``alpha``, ``convention``).
    """
    z, y, valid = _flat(logits, labels, ignore_index)
    rows = []
    for i in valid.nonzero().squeeze(-1).tolist():
        keep = ~torch.isneginf(z[i].detach())
        sub = z[i][keep].unsqueeze(0)
        new_label = int(keep[: int(y[i])].sum())  # position of the label among the kept columns
        assert bool(keep[int(y[i])]), "the label itself must be a finite entry"
        rows.append(smoothed_rows(sub, torch.tensor([new_label]), **knobs)[0])
    values = torch.stack(rows) if rows else torch.zeros(0, dtype=torch.float64)
    return _scatter_rows(values, valid, labels.shape)


def family_rows(
    logits: torch.Tensor, labels: torch.Tensor, *, epsilon: float = 0.0, alpha: float = 0.0,
    convention: str = "uniform", z_loss: float = 0.0, smoothing_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token ``-sum_k q_k log p_k + alpha * (z_max - mean_S z) + z_loss * lse**2`` in float64 (0 at ignored
    positions), where ``S`` (``smoothing_mask``, all classes by default) are the classes that get smoothing mass:
    ``q = (1 - eps) onehot(y) + eps / |S|`` on ``S`` (uniform), or ``eps / |S \\ {y}|`` on ``S \\ {y}`` (fairseq).
    The softmax, ``lse`` and ``z_max`` run over every class. Written from the definitions, the full ``q`` built."""
    z, y, valid = _flat(logits, labels, ignore_index)
    zv, yv = z[valid], y[valid]
    num_classes = z.shape[-1]
    mask = torch.ones(num_classes, dtype=torch.bool) if smoothing_mask is None else smoothing_mask.bool()
    support = mask.to(torch.float64).expand(zv.shape[0], num_classes)
    onehot = F.one_hot(yv, num_classes).to(torch.float64)
    if convention == "uniform":
        q = (1.0 - epsilon) * onehot + epsilon * support / support.sum(-1, keepdim=True)
    else:
        others = support * (1.0 - onehot)
        q = (1.0 - epsilon) * onehot + epsilon * others / others.sum(-1, keepdim=True)
    lse = torch.logsumexp(zv, dim=-1)
    rows = -(q * (zv - lse.unsqueeze(-1))).sum(-1)
    mean_s = (zv * support).sum(-1) / support.sum(-1)
    rows = rows + alpha * (zv.max(-1).values - mean_s) + z_loss * lse**2
    return _scatter_rows(rows, valid, labels.shape)


def weighted_reduce(rows: torch.Tensor, weights: torch.Tensor, *, reduction: str, num_items_in_batch=None):
    """``w * rows`` reduced: ``none``, ``sum``, or ``mean`` = the sum over ``num_items_in_batch`` when given, else over
    the sum of the weights (weights at ignored positions do not count: ``rows`` is 0 there, pass them as 0)."""
    weighted = rows * weights.to(torch.float64)
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    denominator = float(weights.double().sum()) if num_items_in_batch is None else float(num_items_in_batch)
    return total / denominator
