"""`token_brier`: mean multiclass Brier score sum_k (p_k - onehot(y)_k)^2 of scored tokens (`TokenMetrics`' brier).
An `evaluate` module shipped inside hf_smooth: `hf_smooth.evaluate_modules.load("token_brier")`."""

from hf_smooth.evaluate_modules import modules


class TokenBrier(modules.TokenStatisticsMetric):
    COLUMNS = ("brier",)
    METRICS = ("brier",)
    DESCRIPTION = "Multiclass Brier score, in [0, 2]: {'brier': float}."
