"""hf_smooth: exact token-level label smoothing and MaxSup for Hugging Face training pipelines.

The maths lives in :mod:`hf_smooth.losses` (and the fused linear path in :mod:`hf_smooth.fused`); everything else
routes to it.
"""

from .losses import LossComponents, label_smoothing_loss, maxsup_loss, smoothed_cross_entropy

__version__ = "0.1.0"

__all__ = [
    "LossComponents",
    "label_smoothing_loss",
    "maxsup_loss",
    "smoothed_cross_entropy",
]
