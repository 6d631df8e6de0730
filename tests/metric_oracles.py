"""Straightforward float64 references for hf_smooth.metrics, written independently of the library.

Everything at once, no chunks, no streaming: keep the scored rows, take a float64 log-softmax, and apply each
definition literally. Used only by the tests.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def oracle_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    num_bins: int = 15,
    small_logit_threshold: float = 0.01,
    gap_edges=None,
) -> dict:
    keep = labels != ignore_index
    z = logits[keep].double()
    y = labels[keep].long()
    n, k = z.shape[0], logits.shape[-1]
    if n == 0:
        return {"num_tokens": 0}
    logp = torch.log_softmax(z, dim=-1)  # -inf entries stay -inf: probability 0
    p = logp.exp()
    finite = torch.isfinite(z)
    onehot = torch.nn.functional.one_hot(y, k).double()

    nll = -logp.gather(1, y[:, None]).squeeze(1)
    confidence = p.max(dim=1).values
    correct = (z.argmax(dim=1) == y).double()
    brier = ((p - onehot) ** 2).sum(dim=1)
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=1)
    z0 = torch.where(finite, z, torch.zeros_like(z))
    mean_z = z0.sum(dim=1) / finite.sum(dim=1)
    gap = z.max(dim=1).values - mean_z
    norm = torch.sqrt((z0**2).sum(dim=1))
    small = ((z.abs() < small_logit_threshold) & finite).sum()

    # Equal-width bins ((b-1)/M, b/M], literally.
    ece = 0.0
    counts, conf_means, acc_means = [], [], []
    for b in range(num_bins):
        in_bin = (confidence > b / num_bins) & (confidence <= (b + 1) / num_bins)
        m = int(in_bin.sum())
        counts.append(m)
        if m:
            acc_b, conf_b = correct[in_bin].mean().item(), confidence[in_bin].mean().item()
            ece += m / n * abs(acc_b - conf_b)
            conf_means.append(conf_b)
            acc_means.append(acc_b)
        else:
            conf_means.append(0.0)
            acc_means.append(0.0)

    out = {
        "nll": nll.mean().item(),
        "ppl": math.exp(nll.mean().item()),
        "accuracy": correct.mean().item(),
        "confidence": confidence.mean().item(),
        "ece": ece,
        "ece_adaptive": oracle_equal_mass_ece(confidence.numpy(), correct.numpy(), num_bins),
        "brier": brier.mean().item(),
        "entropy": entropy.mean().item(),
        "logit_gap": gap.mean().item(),
        "logit_norm": norm.mean().item(),
        "small_logit_frac": small.item() / finite.sum().item(),
        "num_tokens": n,
        "bin_count": counts,
        "bin_confidence": conf_means,
        "bin_accuracy": acc_means,
    }
    if gap_edges is not None:
        edges = np.asarray(gap_edges, dtype=np.float64)
        clipped = np.clip(gap.numpy(), edges[0], edges[-1])  # out-of-range values land in the end bins
        out["gap_count"] = np.histogram(clipped, bins=edges)[0].tolist()
    return out


def oracle_equal_mass_ece(confidence: np.ndarray, correct: np.ndarray, num_bins: int) -> float:
    """Sort by (confidence, correct), cut with numpy.array_split (first N mod M groups one larger)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    n = confidence.shape[0]
    order = np.lexsort((correct, confidence))  # last key is the primary one
    total = 0.0
    for group in np.array_split(order, num_bins):
        if len(group):
            total += len(group) / n * abs(correct[group].mean() - confidence[group].mean())
    return total


def oracle_nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int = -100) -> float:
    keep = labels != ignore_index
    z = logits[keep].double() / temperature
    return torch.nn.functional.cross_entropy(z, labels[keep].long()).item()
