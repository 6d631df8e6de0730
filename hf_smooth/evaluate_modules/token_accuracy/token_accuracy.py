"""`token_accuracy`: share of scored tokens whose argmax is the label (`TokenMetrics`' accuracy). An `evaluate`
module shipped inside hf_smooth: `hf_smooth.evaluate_modules.load("token_accuracy")`."""

from hf_smooth.evaluate_modules import modules


class TokenAccuracy(modules.TokenStatisticsMetric):
    COLUMNS = ("correct",)
    METRICS = ("accuracy",)
    DESCRIPTION = "Token accuracy: {'accuracy': float}."
