"""`token_ece`: expected calibration error over num_bins equal-width bins (`ece`) and equal-mass bins
(`ece_adaptive`), as `TokenMetrics`. An `evaluate` module shipped inside hf_smooth:
`hf_smooth.evaluate_modules.load("token_ece", num_bins=15)`."""

from hf_smooth.evaluate_modules import modules


class TokenEce(modules.TokenStatisticsMetric):
    COLUMNS = ("confidence", "correct")
    METRICS = ("ece", "ece_adaptive")
    DESCRIPTION = "Expected calibration error: {'ece': float, 'ece_adaptive': float}."
