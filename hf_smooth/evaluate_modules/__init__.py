"""Hugging Face `evaluate` modules shipped inside hf_smooth, loadable offline (no hub download).

`evaluate.load("accuracy")` or `evaluate.load("sacrebleu")` fetch a script from the hub and fail offline; a module
loaded from a local folder does not. Each folder here is such a module (`<name>/<name>.py`), installed with the
package:

    token_calibration   nll, ppl, accuracy, confidence, ece, ece_adaptive, brier, num_tokens (= TokenMetrics)
    token_accuracy      accuracy
    token_nll           nll, ppl
    token_brier         brier
    token_ece           ece, ece_adaptive
    corpus_bleu_chrf    bleu, chrf (sacrebleu's corpus scores)

The token modules take four per-token columns (`token_statistics.STATISTICS`) instead of logits; see
[`token_statistics`] for why and for the Trainer adapters. Example::

    import evaluate
    from hf_smooth import evaluate_modules

    ece = evaluate_modules.load("token_ece", num_bins=10)
    metrics = evaluate.combine([ece, evaluate_modules.load("token_nll")])
    stats = evaluate_modules.scored_statistics(evaluate_modules.token_statistics(logits[:, :-1], labels[:, 1:]))
    metrics.add_batch(**stats)
    metrics.compute()   # {'ece': ..., 'ece_adaptive': ..., 'nll': ..., 'ppl': ...}

Importing this package does not import `evaluate` (only [`load`] does), so the core keeps its three dependencies.
"""

from __future__ import annotations

from pathlib import Path

from .token_statistics import (
    STATISTICS,
    ComputeMetrics,
    TokenStatisticsPreprocessor,
    scored_statistics,
    summarize,
    token_statistics,
)

__all__ = [
    "MODULES",
    "STATISTICS",
    "ComputeMetrics",
    "TokenStatisticsPreprocessor",
    "load",
    "path",
    "scored_statistics",
    "summarize",
    "token_statistics",
]

# The module folders of this package; each holds <name>/<name>.py.
MODULES = ("token_calibration", "token_accuracy", "token_nll", "token_brier", "token_ece", "corpus_bleu_chrf")

_HERE = Path(__file__).resolve().parent


def path(name: str) -> str:
    """The folder of the shipped module `name`, for ``evaluate.load(path(name))`` (or a list for `evaluate.combine`)."""
    if name not in MODULES:
        raise ValueError(f"Unknown hf_smooth evaluate module {name!r}; the shipped modules are {', '.join(MODULES)}.")
    folder = _HERE / name
    if not (folder / f"{name}.py").is_file():
        raise FileNotFoundError(
            f"{folder / f'{name}.py'} is missing: the installed hf_smooth lacks its evaluate module files "
            "(reinstall it; pyproject.toml's package-data ships hf_smooth/evaluate_modules/*/*.py)."
        )
    return str(folder)


def load(name: str, **kwargs):
    """``evaluate.load(path(name), keep_in_memory=True, **kwargs)``: the shipped module, offline. `kwargs` go to the
    module (e.g. ``num_bins=10`` for the token modules) and to `evaluate.load` (``experiment_id``, ...).

    `keep_in_memory` defaults to True here (evaluate's own default writes an Arrow file under ~/.cache and locks it,
    which every process of a Trainer evaluation would do on the same path, since each calls `compute_metrics` with
    the gathered predictions); pass ``keep_in_memory=False`` for evaluate's cache files."""
    kwargs.setdefault("keep_in_memory", True)
    folder = path(name)
    try:
        import evaluate
    except ImportError as error:
        raise ImportError(
            "hf_smooth.evaluate_modules.load needs the `evaluate` package: pip install 'hf-smooth[evaluate]' "
            "(or pip install evaluate)."
        ) from error
    return evaluate.load(folder, **kwargs)
