"""`token_calibration`: nll, ppl, accuracy, confidence, ece, ece_adaptive, brier and num_tokens of scored tokens, the
numbers of `hf_smooth.TokenMetrics`. An `evaluate` module shipped inside hf_smooth: load it offline with
`hf_smooth.evaluate_modules.load("token_calibration")` or `evaluate.load(hf_smooth.evaluate_modules.path(...))`."""

from hf_smooth.evaluate_modules import modules


class TokenCalibration(modules.TokenStatisticsMetric):
    COLUMNS = ("confidence", "correct", "nll", "brier")
    METRICS = ("nll", "ppl", "accuracy", "confidence", "ece", "ece_adaptive", "brier", "num_tokens")
    DESCRIPTION = "Token-level calibration: nll, ppl, accuracy, confidence, ece, ece_adaptive, brier, num_tokens."
