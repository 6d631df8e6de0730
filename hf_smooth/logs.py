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
mask's tokens (prompts included), a padding-free batch's flattened length, else every input id. Each checkpoint's
``trainer_state.json`` keeps the count at its step (`NUM_TOKENS_STATE`), so a resumed run continues from exactly that
count. `SmoothedLoss` does not log it: a ``compute_loss_func`` never sees the
inputs (transformers' ``include_num_input_tokens_seen=True`` logs ``num_input_tokens_seen`` there). Every average
here (loss, nll, accuracy, entropy) is over the scored tokens, which `num_tokens_scored` counts.
"""

from __future__ import annotations

import math

__all__ = ["EVAL_RENAMES", "NUM_TOKENS_STATE", "eval_logs", "resumed_num_tokens", "train_window_logs"]

# TokenMetrics.compute() key -> logged name (before the eval_ prefix).
EVAL_RENAMES = {"accuracy": "mean_token_accuracy"}

# The TrainerState.stateful_callbacks entry (saved in each checkpoint's trainer_state.json) holding the cumulative
# num_tokens at that checkpoint's step, in the {"args", "attributes"} form transformers gives callback states. It is no
# callback: with `restore_callback_states_from_checkpoint=True`, transformers warns that it ignores it, and that is all.
NUM_TOKENS_STATE = "hf_smooth_num_tokens"

# LossComponents.means() keys logged under their own name when the loss produced them.
_OPTIONAL = ("entropy", "z_loss")


def resumed_num_tokens(state) -> tuple[float, str | None]:
    """The cumulative `num_tokens` a run continues from, read from its `TrainerState`, and a warning when that count
    misses tokens.

    A checkpoint written by hf_smooth holds the count at its step (``stateful_callbacks[NUM_TOKENS_STATE]``). One
    written without it (by another trainer, or an hf_smooth before this entry) leaves only the last training log: the
    count continues from there, and the input tokens of the steps between that log and the checkpoint are missing.
    """
    saved = (state.stateful_callbacks or {}).get(NUM_TOKENS_STATE)
    if isinstance(saved, dict) and "num_tokens" in saved.get("attributes", {}):
        return float(saved["attributes"]["num_tokens"]), None
    step, count = 0, 0.0
    for entry in reversed(state.log_history):
        if "num_tokens" in entry:
            step, count = int(entry.get("step", 0)), float(entry["num_tokens"])
            break
    if state.global_step <= step:
        return count, None
    missed = f"step {step + 1}" if step + 1 == state.global_step else f"steps {step + 1}-{state.global_step}"
    return count, (
        f"hf_smooth: the checkpoint of step {state.global_step} has no num_tokens count (written by another trainer or "
        f"an older hf_smooth); num_tokens continues from the log of step {step} ({count:.0f}) and does not include "
        f"the input tokens of {missed}."
    )


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
