"""`token_nll`: mean negative log-likelihood of the labels and its perplexity exp(nll) (`TokenMetrics`' nll, ppl).
An `evaluate` module shipped inside hf_smooth: `hf_smooth.evaluate_modules.load("token_nll")`."""

from hf_smooth.evaluate_modules import modules


class TokenNll(modules.TokenStatisticsMetric):
    COLUMNS = ("nll",)
    METRICS = ("nll", "ppl")
    DESCRIPTION = "Token NLL and perplexity: {'nll': float, 'ppl': float} (ppl is inf once exp overflows)."
