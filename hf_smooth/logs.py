"""The names hf_smooth logs under, written once for `SmoothTrainer` (`SmoothLossMixin`) and `SmoothedLoss`.

TRL's names where TRL has one (`mean_token_accuracy`, `entropy`, `num_tokens`), so dashboards built for
`SFTTrainer` read hf_smooth runs, and the same name in training and, with the ``eval_`` prefix, in evaluation:

| training log | evaluation | meaning |
|---|---|---|
| `loss` | `eval_loss` | the objective (NLL + smoothing penalty [+ z-loss]), token-weighted |
| `nll`, `ppl` | `eval_nll`, `eval_ppl` | cross-entropy and exp(nll) |
| `mean_token_accuracy` | `eval_mean_token_accuracy` | share of scored tokens whose argmax is the label |
| `entropy` | `eval_entropy` | mean predictive entropy over scored tokens (nats) |
| `num_tokens` | | input tokens trained on so far, all processes (cumulative, TRL's meaning) |
| `num_tokens_scored` | `eval_num_tokens` | scored tokens of this logging window / of the evaluation set |

`num_tokens` is TRL's count in `SmoothTrainer`, `SmoothSeq2SeqTrainer` and `SmoothSFTTrainer` alike: the attention
mask's tokens (prompts included), a padding-free batch's flattened length, else every input id; it continues from
the last logged value when training resumes. `SmoothedLoss` does not log it: a ``compute_loss_func`` never sees the
inputs (transformers' ``include_num_input_tokens_seen=True`` logs ``num_input_tokens_seen`` there). Every average
here (loss, nll, accuracy, entropy) is over the scored tokens, which `num_tokens_scored` counts.
"""

from __future__ import annotations

import math

__all__ = ["EVAL_RENAMES", "eval_logs", "previous_num_tokens", "train_window_logs"]

# TokenMetrics.compute() key -> logged name (before the eval_ prefix).
EVAL_RENAMES = {"accuracy": "mean_token_accuracy"}

# LossComponents.means() keys logged under their own name when the loss produced them.
_OPTIONAL = ("entropy", "z_loss")


def previous_num_tokens(log_history: list[dict]) -> float:
    """The cumulative `num_tokens` of the last training log in `log_history` (0 before any).

    Read from the trainer state rather than kept in the trainer, so that a run resumed from a checkpoint continues
    from the count its last log reached (steps after that log and before the checkpoint are not in it).
    """
    for entry in reversed(log_history):
        if "num_tokens" in entry:
            return float(entry["num_tokens"])
    return 0.0


def train_window_logs(means: dict[str, float] | None, *, alpha: float) -> dict[str, float]:
    """One training log line from the token-weighted means of a logging window (`LossComponents.means()`, all
    processes; ``objective`` when a term beyond the loss, such as the MoE aux loss, is added), or NaN everywhere when
    the window scored no token (``means=None``)."""
    if means is None:
        nan = math.nan
        means = {"loss": nan, "nll": nan, "ppl": nan, "regularizer": nan, "top1_prob": nan, "accuracy": nan,
                 "logit_gap": nan, "num_tokens": 0.0}
    logs = {
        "loss": means.get("objective", means["loss"]),
        "nll": means["nll"],
        "ppl": means["ppl"],
        "smoothing_penalty": means["regularizer"],
        "smoothing_alpha": alpha,
        "top1_prob": means["top1_prob"],
        "mean_token_accuracy": means["accuracy"],
        "logit_gap": means["logit_gap"],
        "num_tokens_scored": means["num_tokens"],
    }
    logs.update({name: means[name] for name in _OPTIONAL if name in means})
    return logs


def eval_logs(results: dict[str, float], prefix: str) -> dict[str, float]:
    """`TokenMetrics.compute()` results under their logged names, prefixed (``eval_nll``, ``eval_mean_token_accuracy``,
    ...)."""
    return {f"{prefix}_{EVAL_RENAMES.get(name, name)}": value for name, value in results.items()}
