"""Temperature scaling (Guo et al. 2017): one temperature ``T > 0`` fitted on an evaluation set by minimizing NLL.

Why the fit is robust: with ``beta = 1 / T`` the mean NLL

    f(beta) = mean over scored tokens of  logsumexp(beta * z) - beta * z_y

is convex in ``beta`` (a log-sum-exp of linear functions minus a linear function), with

    f'(beta)  = mean of  E_{p_beta}[z] - z_y          (increasing in beta)
    f''(beta) = mean of  Var_{p_beta}[z] >= 0

where ``p_beta = softmax(beta * z)``. One pass over the data gives ``f``, ``f'`` and ``f''`` together, so the
minimizer is the root of a monotone function: it is bracketed by stepping ``beta`` by factors of 4 from 1, then found
by Newton steps that fall back to bisection (in ``log beta``) whenever a step would leave the bracket. It converges in
a handful of passes, needs no learning rate, and returns a bound of ``temperature_bounds`` when the optimum lies
beyond it (e.g. a model that is right on every token with the top logit: ``T -> 0``).

Precision: each pass works in float64 whatever the logits dtype, and forms ``f'`` as ``sum_k p_k (z_k - z_y)``
rather than ``E_p[z] - z_y``. Near a bound the true ``f'`` is tiny (a confident model at ``T = 0.05`` puts
``p ~ 1e-20`` on the runner-up): ``E_p[z] - z_y`` cancels to float32 round-off there (about ``1e-6 * |z|``), so a
float32 search read ``f' = 0`` or the wrong sign and stopped early, e.g. at ``T = 0.04`` with ``at_bound=False``.
One case is decided without a search: when every scored token's label holds its largest logit (and some token has
a smaller finite one), every term of ``f'`` is negative at every ``beta``, so the NLL falls all the way to ``T -> 0``
and the fit returns the lower bound with ``at_bound=True``. (A search would stall there anyway: for large enough
``beta`` every ``p_k``, ``k != y``, underflows even in float64 and ``f'`` reads exactly 0.)

Inputs: stored logits (``fit_temperature``) or, for evaluation sets whose logits do not fit in memory, any
re-iterable source of ``(logits, labels)`` batches, such as a function that re-runs the model
(``fit_temperature_from_batches``). Ignored positions (NaN allowed there) and ``-inf`` logits follow the rules of
hf_smooth.losses. Each pass processes the logits in row chunks (half as many rows per chunk as the loss uses, as the
temporaries are float64).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch

from .losses import CHUNK_ELEMENTS, check_inputs, check_label_range, row_chunks
from .metrics import TokenMetrics, row_reader

__all__ = ["TemperatureResult", "fit_temperature", "fit_temperature_from_batches"]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TemperatureResult:
    """Outcome of a temperature fit; ``*_before`` at ``T = 1``, ``*_after`` at the fitted ``T``.

    Args:
        temperature (`float`): the fitted ``T``; calibrated logits are ``logits / T``.
        nll_before, nll_after (`float`): mean NLL over the scored tokens.
        ece_before, ece_after (`float`): equal-width ECE (``num_bins`` bins) over the same tokens.
        num_tokens (`int`): scored tokens.
        passes (`int`): passes over the data the fit took (the two metric passes included).
        at_bound (`bool`): the optimum lies at or beyond a bound of ``temperature_bounds``.
        metrics_before, metrics_after (`dict`): every [`TokenMetrics.compute`] value at ``T = 1`` and at ``T``.
    """

    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    num_tokens: int
    passes: int
    at_bound: bool
    metrics_before: dict = field(default_factory=dict, repr=False)
    metrics_after: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


class _Objective:
    """One pass over the data: mean NLL and its first two derivatives in ``beta``, in float64.

    Each pass also counts the tokens whose label is not an argmax (``wrong``) and those with a finite logit below
    the label's (``spread``): ``wrong == 0 < spread`` means ``f' < 0`` at every ``beta`` (module docstring).
    """

    def __init__(self, batches: Callable[[], Batches], ignore_index: int, chunk_size: int | None):
        self.batches, self.ignore_index = batches, ignore_index
        self.chunk_size = chunk_size
        self.passes = 0
        self.wrong = self.spread = 0

    @torch.no_grad()
    def __call__(self, beta: float, metrics: TokenMetrics | None = None) -> tuple[float, float, float, int]:
        self.passes += 1
        nll = grad = curv = 0.0
        count = wrong = spread = 0
        for logits, labels in self.batches():
            check_inputs(logits, labels, self.ignore_index)
            num_classes = logits.shape[-1]
            check_label_range(labels, num_classes, self.ignore_index)
            if metrics is not None:
                metrics.update(logits, labels, temperature=1.0 / beta)
            take_rows = row_reader(logits)
            target = labels.reshape(-1).to(device=logits.device, dtype=torch.long)
            valid_all = target != self.ignore_index
            # float64 temporaries: half the rows of the loss's float32 chunk, so the same bytes.
            chunk = self.chunk_size or max(1, (CHUNK_ELEMENTS // 2) // max(1, num_classes))
            for rows in row_chunks(target.shape[0], num_classes, chunk):
                index = valid_all[rows].nonzero().squeeze(-1) + rows.start
                if index.numel() == 0:
                    continue
                z = take_rows(index).to(torch.float64)  # ignored rows never enter the arithmetic
                y = target.index_select(0, index)
                zmax = z.max(dim=-1, keepdim=True).values
                z_y = z.gather(-1, y.unsqueeze(-1))
                expo = (z - zmax).mul_(beta).exp_()  # -inf entries: exp(-inf) = 0
                sum_exp = expo.sum(dim=-1, keepdim=True)
                prob = expo.div_(sum_exp)
                # z_k - z_y, 0 at -inf entries (p = 0 there; avoids 0 * inf). f' per token is sum_k p_k (z_k - z_y):
                # each term formed before weighting, so no cancellation between E_p[z] and z_y (module docstring).
                diff = z - z_y
                neginf = torch.isneginf(z)
                masked = bool(neginf.any())
                if masked:
                    diff = diff.masked_fill_(neginf, 0.0)
                slope = (prob * diff).sum(dim=-1, keepdim=True)
                var_z = (prob * (diff - slope).square()).sum(dim=-1)
                # logsumexp(beta z) - beta z_y = log sum exp(beta (z - z_max)) + beta (z_max - z_y)
                nll += float((sum_exp.log() + beta * (zmax - z_y)).sum())
                grad += float(slope.sum())
                curv += float(var_z.sum())
                count += int(index.numel())
                zmin = (z.masked_fill(neginf, math.inf) if masked else z).min(dim=-1, keepdim=True).values
                wrong += int((zmax > z_y).sum())
                spread += int((zmin < z_y).sum())
        if count == 0:
            raise ValueError("No scored token (every label equals ignore_index): cannot fit a temperature.")
        if not (math.isfinite(nll) and math.isfinite(grad) and math.isfinite(curv)):
            raise ValueError(
                f"The NLL at temperature {1.0 / beta:.6g} is not finite: the logits hold NaN or +inf at scored "
                "positions, or -inf at a label's own entry (p_y = 0 at every temperature)."
            )
        self.wrong, self.spread = wrong, spread
        return nll / count, grad / count, curv / count, count


def fit_temperature_from_batches(
    batches: Batches | Callable[[], Batches],
    *,
    ignore_index: int = -100,
    num_bins: int = 15,
    temperature_bounds: tuple[float, float] = (0.01, 100.0),
    tolerance: float = 1e-7,
    max_passes: int = 60,
    chunk_size: int | None = None,
) -> TemperatureResult:
    """Fit the temperature minimizing the mean NLL over every scored token of ``batches``.

    Args:
        batches (`Iterable[(logits, labels)]` or a callable returning one):
            Aligned `(logits (..., K), labels (...))` pairs, read once per pass (typically 4 to 12 passes, more
            when the optimum lies at a bound): give a list, or a function that returns them afresh on each call
            (e.g. a generator function re-running the model under `torch.no_grad`).
        ignore_index (`int`, *optional*, defaults to -100):
            Label value of positions that are not scored.
        num_bins (`int`, *optional*, defaults to 15):
            Bins of the equal-width ECE reported before and after.
        temperature_bounds (`tuple[float, float]`, *optional*, defaults to `(0.01, 100.0)`):
            The search interval of ``T``.
        tolerance (`float`, *optional*, defaults to 1e-7):
            Relative precision on ``T``.
        max_passes (`int`, *optional*, defaults to 60):
            Upper limit on passes over the data for the search.
        chunk_size (`int`, *optional*):
            Rows of logits processed at once.
    """
    t_min, t_max = (float(v) for v in temperature_bounds)
    if not 0.0 < t_min < t_max < math.inf:
        raise ValueError(f"temperature_bounds must satisfy 0 < low < high < inf, got {temperature_bounds}.")
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance}.")
    if callable(batches):
        source = batches
    elif iter(batches) is batches:
        raise TypeError(
            "batches is a one-shot iterator (e.g. a generator) but the fit reads the data several times: pass a list, "
            "or a function that returns a fresh iterable on each call."
        )
    else:
        source = lambda: batches  # noqa: E731
    objective = _Objective(source, ignore_index, chunk_size)
    beta_lo, beta_hi = 1.0 / t_max, 1.0 / t_min  # search interval of beta; lo/hi below are the current bracket

    before = TokenMetrics(num_bins=num_bins, ignore_index=ignore_index, adaptive_ece=False, chunk_size=chunk_size)
    beta = min(max(1.0, beta_lo), beta_hi)
    _, g, h, _ = objective(beta, before if beta == 1.0 else None)
    if beta != 1.0:  # T = 1 lies outside the bounds: still report the uncalibrated numbers
        objective(1.0, before)

    # Safeguarded Newton on the increasing f' (Numerical Recipes' rtsafe). Until the root is bracketed
    # (f'(lo) < 0 < f'(hi), both evaluated), Newton steps towards it are capped at a factor 4 in beta; once it is,
    # a Newton point that leaves the bracket or fails to halve the previous step is replaced by bisection in log beta.
    lo, hi = beta_lo, beta_hi
    lo_known = hi_known = at_bound = False
    if objective.wrong == 0 and objective.spread > 0:
        # Every label is an argmax and some token has a smaller logit: f' < 0 for every beta (module docstring), so
        # the minimum over the bounds is at the largest beta, the lowest temperature. No search to stall on underflow.
        beta, g, at_bound = beta_hi, 0.0, True
    previous_step = math.inf
    while g != 0.0 and objective.passes < max_passes:
        if g > 0.0:  # the optimum has a smaller beta (a higher temperature)
            hi, hi_known = beta, True
            at_bound = beta <= beta_lo
        else:
            lo, lo_known = beta, True
            at_bound = beta >= beta_hi
        if at_bound:
            break
        newton = beta - g / h if h > 0.0 else math.nan
        if lo_known and hi_known:
            if lo < newton < hi and abs(newton - beta) <= 0.5 * previous_step:
                target = newton
            else:
                target = math.sqrt(lo * hi)
        elif g < 0.0:
            target = min(newton if newton == newton else math.inf, 4.0 * beta, beta_hi)
        else:
            target = max(newton if newton == newton else 0.0, beta / 4.0, beta_lo)
        previous_step = abs(target - beta)
        beta = target
        if previous_step <= tolerance * beta or (lo_known and hi_known and hi <= lo * (1.0 + tolerance)):
            break
        _, g, h, _ = objective(beta)

    after = TokenMetrics(num_bins=num_bins, ignore_index=ignore_index, adaptive_ece=False, chunk_size=chunk_size)
    objective(beta, after)
    m0, m1 = before.compute(), after.compute()
    return TemperatureResult(
        temperature=1.0 / beta,
        nll_before=m0["nll"],
        nll_after=m1["nll"],
        ece_before=m0["ece"],
        ece_after=m1["ece"],
        num_tokens=m1["num_tokens"],
        passes=objective.passes,
        at_bound=at_bound,
        metrics_before=m0,
        metrics_after=m1,
    )


def fit_temperature(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    num_bins: int = 15,
    temperature_bounds: tuple[float, float] = (0.01, 100.0),
    tolerance: float = 1e-7,
    chunk_size: int | None = None,
) -> TemperatureResult:
    """Fit one temperature on stored logits `(..., K)` and aligned labels `(...)`; see
    [`fit_temperature_from_batches`] for the arguments and the method."""
    return fit_temperature_from_batches(
        [(logits, labels)],
        ignore_index=ignore_index,
        num_bins=num_bins,
        temperature_bounds=temperature_bounds,
        tolerance=tolerance,
        chunk_size=chunk_size,
    )
