"""hf_smooth: exact token-level label smoothing and MaxSup for Hugging Face training pipelines.

The maths lives in :mod:`hf_smooth.losses` (and the fused linear path in :mod:`hf_smooth.fused`); the trainer,
the ``compute_loss_func`` callable and the recipes only route to it. Plots (:mod:`hf_smooth.plots`, matplotlib) and
the comparison report (:mod:`hf_smooth.demo.report`) are imported on demand, not here, and so is TRL:
``from hf_smooth import SmoothSFTTrainer`` imports :mod:`hf_smooth.sft` (and trl) on first use.
"""

from .arguments import SmoothingArguments, SmoothSeq2SeqTrainingArguments, SmoothTrainingArguments
from .calibration import TemperatureResult, fit_temperature, fit_temperature_from_batches
from .fused import fused_linear_smoothed_loss
from .loss_func import SmoothedLoss
from .losses import LossComponents, label_smoothing_loss, maxsup_loss, smoothed_cross_entropy
from .metrics import TokenMetrics
from .trainer import SmoothLossMixin, SmoothSeq2SeqTrainer, SmoothTrainer

__version__ = "0.1.0"


def __getattr__(name: str):
    # TRL is optional ([trl] extra): SmoothSFTTrainer is imported on first access, never by `import hf_smooth`.
    if name == "SmoothSFTTrainer":
        from .sft import SmoothSFTTrainer

        return SmoothSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LossComponents",
    "SmoothLossMixin",
    "SmoothSeq2SeqTrainer",
    "SmoothSeq2SeqTrainingArguments",
    "SmoothTrainer",
    "SmoothTrainingArguments",
    "SmoothedLoss",
    "SmoothingArguments",
    "TemperatureResult",
    "TokenMetrics",
    "fit_temperature",
    "fit_temperature_from_batches",
    "fused_linear_smoothed_loss",
    "label_smoothing_loss",
    "maxsup_loss",
    "smoothed_cross_entropy",
]
