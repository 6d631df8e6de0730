"""The `evaluate.Metric` classes behind the module scripts in this folder (each script subclasses one of these).

Importing this file imports `evaluate` and `datasets`; [`hf_smooth.evaluate_modules.load`] imports it only when a
module is loaded. The maths is in [`token_statistics`] (calibration) and sacrebleu (BLEU, chrF); these classes only
declare the Arrow features and route.
"""

from __future__ import annotations

import inspect

import datasets
import evaluate

from .token_statistics import STATISTICS, summarize

__all__ = ["CorpusBleuChrfMetric", "TokenStatisticsMetric"]

_EVALUATE_INIT_ARGUMENTS = frozenset(inspect.signature(evaluate.EvaluationModule.__init__).parameters) - {
    "self",
    "kwargs",
}

_TOKEN_INPUTS = """
Args (one entry per scored token; build them with hf_smooth.evaluate_modules.token_statistics, or in a Trainer with
TokenStatisticsPreprocessor + ComputeMetrics):
    confidence (`float`): top-1 probability max_k p_k.
    correct (`int`): 1 when the argmax equals the label, else 0.
    nll (`float`): -log p_y.
    brier (`float`): sum_k (p_k - onehot(y)_k)^2.
Each module declares only the columns it reads.
"""

_TEXT_INPUTS = """
Args:
    predictions (`list[str]`): one hypothesis per segment.
    references (`list[str]` or `list[list[str]]`): one reference per segment, or a list of references per segment
        (every segment the same number).
"""

_CITATION_ECE = """@inproceedings{guo2017calibration, title={On Calibration of Modern Neural Networks},
author={Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.}, booktitle={ICML}, year={2017}}"""


def _check_init_arguments(module: str, kwargs: dict) -> None:
    # EvaluationModule.__init__ swallows unknown keywords; a misspelt num_bins would silently keep 15 bins.
    unknown = sorted(set(kwargs) - _EVALUATE_INIT_ARGUMENTS)
    if unknown:
        raise TypeError(
            f"{module} got unknown arguments {unknown}; it takes num_bins (token metrics) and evaluate's own "
            f"{sorted(_EVALUATE_INIT_ARGUMENTS)}."
        )


class TokenStatisticsMetric(evaluate.Metric):
    """Base of the token-level calibration modules: `COLUMNS` are the features read, `METRICS` the keys returned
    (from [`summarize`] of the columns, and `num_tokens`), `DESCRIPTION` says so in the module's info.

    Args:
        num_bins (`int`, *optional*, defaults to 15): bins of both ECEs (as `TokenMetrics(num_bins=...)`).
    """

    COLUMNS: tuple[str, ...] = STATISTICS
    METRICS: tuple[str, ...] = ()
    DESCRIPTION = ""

    def __init__(self, *, num_bins: int = 15, **kwargs):
        _check_init_arguments(type(self).__name__, kwargs)
        if isinstance(num_bins, bool) or int(num_bins) != num_bins or num_bins < 1:
            raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}.")
        self.num_bins = int(num_bins)
        super().__init__(**kwargs)

    def _info(self):
        features = {name: datasets.Value("int8" if name == "correct" else "float64") for name in self.COLUMNS}
        return evaluate.MetricInfo(
            description=self.DESCRIPTION,
            citation=_CITATION_ECE,
            inputs_description=_TOKEN_INPUTS,
            features=datasets.Features(features),
            # Arrow columns, read as float64 in `summarize`: datasets' "numpy" format casts float64 columns to float32
            # (NumpyFormatter's default dtype), which would move the NLL in its 8th digit.
            format="arrow",
        )

    def _compute(self, **columns):
        out = summarize(columns, num_bins=self.num_bins)
        out["num_tokens"] = len(next(iter(columns.values())))
        return {name: out[name] for name in self.METRICS}


class CorpusBleuChrfMetric(evaluate.Metric):
    """Corpus BLEU and chrF from sacrebleu with its defaults (`sacrebleu.corpus_bleu(...).score`,
    `sacrebleu.corpus_chrf(...).score`), the numbers `sacrebleu` prints."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus BLEU and chrF (sacrebleu defaults): {'bleu': float, 'chrf': float}, 0 to 100.",
            citation="""@inproceedings{post-2018-call, title={A Call for Clarity in Reporting {BLEU} Scores},
author={Post, Matt}, booktitle={WMT}, year={2018}}""",
            inputs_description=_TEXT_INPUTS,
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references):
        try:
            import sacrebleu
        except ImportError as error:
            raise ImportError("corpus_bleu_chrf needs sacrebleu: pip install 'hf-smooth[evaluate]'.") from error

        references = [[r] if isinstance(r, str) else list(r) for r in references]
        counts = {len(r) for r in references}
        if len(counts) > 1:
            raise ValueError(f"Every segment needs the same number of references; got {sorted(counts)}.")
        streams = [list(stream) for stream in zip(*references)]  # sacrebleu: one list per reference "stream"
        return {
            "bleu": sacrebleu.corpus_bleu(list(predictions), streams).score,
            "chrf": sacrebleu.corpus_chrf(list(predictions), streams).score,
        }
