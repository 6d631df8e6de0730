"""Loss-function edge cases (issue 10, item 5): each rule is checked on the materialized loss
(`smoothed_cross_entropy`) and on the fused one (`fused_linear_smoothed_loss`) where it applies, then on the
calibration and metrics code that shares it.

Expected values come from PyTorch (`F.cross_entropy`), from `math.exp`, or from the float64 formulas written out
below, never from hf_smooth itself.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hf_smooth import smoothed_cross_entropy
from hf_smooth.arguments import SmoothingArguments
from hf_smooth.calibration import fit_temperature
from hf_smooth.fused import fused_linear_smoothed_loss
from hf_smooth.metrics import TokenMetrics

N, H, V = 6, 5, 9


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fused_inputs(seed: int = 0, *, num_rows: int = N, vocab: int = V):
    g = _gen(seed)
    hidden = torch.randn(num_rows, H, generator=g)
    weight = torch.randn(vocab, H, generator=g)
    return hidden, weight


PATHS = ["materialized", "fused"]


def _call(path: str, labels, **kwargs):
    """The same loss through either path, on the logits ``hidden @ weight.T`` of a fixed random pair."""
    hidden, weight = _fused_inputs(num_rows=labels.shape[0], vocab=kwargs.pop("vocab", V))
    if path == "materialized":
        return smoothed_cross_entropy(hidden @ weight.T, labels, **kwargs)
    return fused_linear_smoothed_loss(hidden, weight, labels, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# num_items_in_batch
# --------------------------------------------------------------------------------------------------------------------

BAD_COUNTS = {
    "int0": 0,
    "tensor0": torch.tensor(0),
    "int-5": -5,
    "tensor-5": torch.tensor(-5),
    "float-nan": math.nan,
    "tensor-nan": torch.tensor(math.nan),
    "float-inf": math.inf,
    "half": 0.5,
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("count", list(BAD_COUNTS), ids=str)
def test_bad_num_items_in_batch_with_scored_tokens_raises(path, count):
    # Today a tensor 0 or -5 returned the plain sum (clamped to a divisor of 1), NaN a NaN loss.
    labels = torch.tensor([1, 2, -100, 3, 4, 0])
    with pytest.raises(ValueError, match="num_items_in_batch"):
        _call(path, labels, epsilon=0.1, num_items_in_batch=BAD_COUNTS[count])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("count", [0, torch.tensor(0)], ids=["int0", "tensor0"])
def test_zero_count_without_scored_tokens_is_still_a_zero_loss_with_a_graph(path, count):
    labels = torch.full((N,), -100)
    hidden, weight = _fused_inputs()
    hidden.requires_grad_(True)
    if path == "materialized":
        loss = smoothed_cross_entropy(hidden @ weight.T, labels, epsilon=0.1, num_items_in_batch=count)
    else:
        loss = fused_linear_smoothed_loss(hidden, weight, labels, epsilon=0.1, num_items_in_batch=count)
    assert loss.grad_fn is not None and float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("count", [11, torch.tensor(11), torch.tensor([11])], ids=["int", "tensor", "tensor1d"])
def test_valid_num_items_in_batch_divides_the_sum(path, count):
    labels = torch.tensor([1, 2, -100, 3, 4, 0])
    hidden, weight = _fused_inputs()
    expected = F.cross_entropy((hidden @ weight.T).double(), labels, reduction="sum") / 11
    loss = _call(path, labels, num_items_in_batch=count)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# -inf at the label's own logit
# --------------------------------------------------------------------------------------------------------------------


def formula_rows(z: torch.Tensor, y: torch.Tensor, *, epsilon: float, alpha: float, convention: str) -> torch.Tensor:
    """Per-row ``logsumexp z - a z_y + alpha z_max - u mean z`` in float64, ``-inf`` entries left out of ``K`` and of
    the mean (hf_smooth's absent-entry rule), written out with autograd ops so its gradient is the oracle's."""
    finite = ~torch.isneginf(z.detach())
    k = finite.sum(dim=-1).to(z.dtype)
    eps = epsilon * k / (k - 1.0) if convention == "fairseq" else torch.full_like(k, epsilon)
    mean = torch.where(finite, z, 0.0).sum(dim=-1) / k
    z_y = z.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(z, dim=-1) - (1.0 - eps) * z_y + alpha * z.max(dim=-1).values - (eps + alpha) * mean


METHODS = [
    pytest.param(0.0, 0.0, "uniform", id="ce"),
    pytest.param(0.1, 0.0, "uniform", id="ls"),
    pytest.param(0.1, 0.0, "fairseq", id="ls-fairseq"),
    pytest.param(0.0, 0.2, "uniform", id="maxsup"),
    pytest.param(0.1, 0.2, "uniform", id="both"),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("epsilon, alpha, convention", METHODS)
def test_neginf_label_logit_gives_inf_loss_and_finite_gradient_materialized(epsilon, alpha, convention, reduction):
    logits = torch.randn(N, V, generator=_gen(1))
    labels = torch.tensor([3, 0, 5, -100, 8, 2])
    logits[0, 3] = -math.inf  # the label's own entry
    logits[1, 6] = -math.inf  # an absent non-label entry, for contrast
    leaf = logits.clone().requires_grad_(True)
    loss, parts = smoothed_cross_entropy(leaf, labels, epsilon=epsilon, alpha=alpha, convention=convention,
                                         reduction=reduction, return_components=True)
    # Today: NaN (inf - inf inside the label-smoothing term, 0 * -inf in the others).
    value = loss.detach()
    if reduction == "none":
        assert float(value[0]) == math.inf
        assert bool(torch.isfinite(value[1:]).all())
    else:
        assert float(value) == math.inf
    if convention == "uniform" and alpha == 0.0:
        torch_loss = F.cross_entropy(logits, labels, label_smoothing=epsilon, reduction=reduction)
        assert float((torch_loss if reduction != "none" else torch_loss[0])) == math.inf
    assert float(parts.nll) == math.inf and float(parts.loss) == math.inf
    if epsilon > 0:  # eps' * (z_y - mean z) with z_y = -inf
        assert float(parts.regularizer) == -math.inf
    else:  # MaxSup's alpha * (z_max - mean z) does not involve z_y
        assert math.isfinite(float(parts.regularizer))
    assert parts.means()["ppl"] == math.inf

    (loss.sum() if reduction == "none" else loss).backward()
    assert bool(torch.isfinite(leaf.grad).all()), leaf.grad

    scored = labels != -100
    ref = logits.double().requires_grad_(True)
    rows = formula_rows(ref[scored], labels[scored], epsilon=epsilon, alpha=alpha, convention=convention)
    total = rows.sum() / (int(scored.sum()) if reduction == "mean" else 1)
    total.backward()
    torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-5, atol=1e-7)
    if reduction == "none":  # the finite rows keep their values
        torch.testing.assert_close(value[scored][1:].double(), rows[1:].detach(), rtol=1e-5, atol=1e-6)
    if epsilon == 0.0 and alpha == 0.0:
        # Plain CE: PyTorch's own gradient (softmax - onehot, 0 probability at the -inf entry), also finite.
        torch_leaf = logits.clone().requires_grad_(True)
        torch_loss = F.cross_entropy(torch_leaf, labels, reduction=reduction)
        (torch_loss.sum() if reduction == "none" else torch_loss).backward()
        torch.testing.assert_close(leaf.grad, torch_leaf.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("epsilon, alpha, convention", METHODS)
def test_neginf_label_logit_gives_inf_loss_and_finite_gradient_fused(epsilon, alpha, convention, reduction):
    # A bias of -inf on column 4 makes it absent from every row; row 0 has it as its label.
    hidden, weight = _fused_inputs(2)
    bias = torch.randn(V, generator=_gen(3))
    bias[4] = -math.inf
    labels = torch.tensor([4, 0, 5, -100, 8, 2])
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, parts = fused_linear_smoothed_loss(
        leaves[0], leaves[1], labels, bias=leaves[2], epsilon=epsilon, alpha=alpha, convention=convention,
        reduction=reduction, return_components=True,
    )
    value = loss.detach()
    if reduction == "none":
        assert float(value[0]) == math.inf and bool(torch.isfinite(value[1:]).all())
    else:
        assert float(value) == math.inf
    assert float(parts.nll) == math.inf and float(parts.loss) == math.inf
    (loss.sum() if reduction == "none" else loss).backward()

    refs = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    scored = labels != -100
    z = refs[0][scored] @ refs[1].T + refs[2]
    rows = formula_rows(z, labels[scored], epsilon=epsilon, alpha=alpha, convention=convention)
    (rows.sum() / (int(scored.sum()) if reduction == "mean" else 1)).backward()
    for leaf, ref, name in zip(leaves, refs, ("hidden", "weight", "bias")):
        assert bool(torch.isfinite(leaf.grad).all()), name
        torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("path", PATHS)
def test_confident_token_nll_keeps_float32_precision(path):
    # Logits ~30, most labels the argmax: the per-token NLL is tiny (1e-6..1e-2). Formed as lse - z_y it was rounded
    # to the float32 ulp of z_max (median relative error 2e-3); F.cross_entropy's float32 error is about 5e-5.
    g = _gen(12)
    hidden = torch.randn(2048, H, generator=g, dtype=torch.float64)
    weight = torch.randn(64, H, generator=g, dtype=torch.float64)
    scale = 13.0
    reference_logits = hidden @ weight.T * scale
    labels = reference_logits.argmax(dim=-1)
    labels[:50] = torch.randint(0, 64, (50,), generator=g)
    if path == "materialized":
        logits32 = reference_logits.float()
        rows = smoothed_cross_entropy(logits32, labels, reduction="none")
        reference_logits = logits32.double()  # the same float32 logits, scored in float64
    else:
        rows = fused_linear_smoothed_loss(hidden.float(), weight.float(), labels, reduction="none", logit_scale=scale)
    expected = F.cross_entropy(reference_logits, labels, reduction="none")
    relative = (rows.double() - expected).abs() / expected.clamp(min=1e-30)
    assert float(relative.median()) < 2e-4, float(relative.median())


# --------------------------------------------------------------------------------------------------------------------
# Infinite knobs
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("knob", ["alpha", "epsilon"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_infinite_or_nan_knobs_are_rejected(path, knob, value):
    with pytest.raises(ValueError, match=knob):
        _call(path, torch.tensor([1, 2, 3, 4, 5, 6]), **{knob: value})


@pytest.mark.parametrize("method", ["maxsup", "label_smoothing"])
@pytest.mark.parametrize("field", ["smoothing_alpha", "smoothing_alpha_end"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_smoothing_arguments_reject_infinite_or_nan_strength(method, field, value):
    kwargs = {"smoothing_method": method, "smoothing_alpha": 0.1, field: value}
    if field == "smoothing_alpha_end":
        kwargs["smoothing_schedule"] = "linear"
    with pytest.raises(ValueError, match=field):
        SmoothingArguments(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Narrow integer labels
# --------------------------------------------------------------------------------------------------------------------

WIDE_V = 300


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_narrow_integer_labels_are_range_checked_after_widening(path, dtype):
    # 50 < 300 is valid; compared in uint8, 300 wraps to 44 and 50 >= 44 was refused.
    values = [50, 1, 0, 99, 7, 120]
    ignore = dtype != torch.uint8  # int8 and int16 hold -100
    if ignore:
        values[3] = -100
    labels = torch.tensor(values, dtype=dtype)
    wide = labels.long()
    hidden, weight = _fused_inputs(num_rows=len(values), vocab=WIDE_V)
    expected = F.cross_entropy((hidden @ weight.T).double(), wide, label_smoothing=0.1)
    if ignore:
        loss = _call(path, labels, epsilon=0.1, vocab=WIDE_V)
    else:
        with pytest.warns(UserWarning, match="cannot hold ignore_index=-100"):
            loss = _call(path, labels, epsilon=0.1, vocab=WIDE_V)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_uint8_label_out_of_range_error_explains_the_dtype(path):
    labels = torch.tensor([1, 2, 255, 3, 4, 5], dtype=torch.uint8)  # e.g. -1 padding written into uint8
    with pytest.warns(UserWarning, match="uint8"), pytest.raises(ValueError) as info:
        _call(path, labels, vocab=64)
    message = str(info.value)
    assert "255" in message and "64 classes" in message
    assert "torch.uint8" in message and "ignore_index=-100" in message and "int64" in message


def test_token_metrics_accept_narrow_labels_in_range():
    logits = torch.randn(4, WIDE_V, generator=_gen(4))
    labels = torch.tensor([50, 5, -100, 120], dtype=torch.int8)  # int8 holds -100 but not 300
    metrics = TokenMetrics()
    metrics.update(logits, labels)
    scored = labels.long() != -100
    expected = F.cross_entropy(logits[scored].double(), labels.long()[scored])
    assert metrics.compute()["nll"] == pytest.approx(float(expected), rel=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Double backward
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("how", ["autograd.grad", "backward"])
def test_double_backward_raises_a_clear_error(path, reduction, how):
    labels = torch.tensor([1, 2, -100, 3, 4, 0])
    hidden, weight = _fused_inputs()
    hidden.requires_grad_(True)
    if path == "materialized":
        loss = smoothed_cross_entropy(hidden @ weight.T, labels, epsilon=0.1, alpha=0.1, reduction=reduction)
    else:
        loss = fused_linear_smoothed_loss(hidden, weight, labels, epsilon=0.1, alpha=0.1, reduction=reduction)
    total = loss.sum()
    # Today: an in-place-modification error (materialized) or a gradient with no graph (fused).
    with pytest.raises(RuntimeError, match="double backward") as info:
        if how == "autograd.grad":
            (grad,) = torch.autograd.grad(total, hidden, create_graph=True)
            grad.square().sum().backward()
        else:
            total.backward(create_graph=True)
            hidden.grad.square().sum().backward()
    assert "create_graph" in str(info.value)


# --------------------------------------------------------------------------------------------------------------------
# Temperature scaling near a bound
# --------------------------------------------------------------------------------------------------------------------


def _nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels))


def test_fit_temperature_all_correct_float32_logits_reach_the_lower_bound():
    # Every label holds its row's top logit, with large margins: the NLL falls all the way to T -> 0. In float32 the
    # derivative cancelled to 0 early; the old fit stopped at T = 0.0445, at_bound=False.
    logits = torch.randn(64, 50, generator=_gen(5)) * 30
    labels = logits.argmax(dim=-1)
    result = fit_temperature(logits, labels)
    assert result.temperature == 0.01 and result.at_bound
    # Oracle: PyTorch's NLL in float64 never rises as T decreases to the bound.
    grid = [1.0, 0.3, 0.1, 0.0445, 0.03, 0.02, 0.01]
    values = [_nll(logits, labels, t) for t in grid]
    assert all(b <= a for a, b in zip(values, values[1:])), values
    assert values[-1] < values[3]
    # nll_after is TokenMetrics' number, computed in float32 for float32 logits: logits / T ~ 1e4 here, whose
    # float32 ulp (1e-3) bounds the precision of each exp.
    assert result.nll_after == pytest.approx(values[-1], rel=1e-3)


def test_fit_temperature_upper_bound_is_reported():
    # Labels independent of the logits: the NLL is smallest as T -> inf, beyond the upper bound 5.
    logits = torch.randn(256, 20, generator=_gen(6)) * 3
    labels = torch.randint(0, 20, (256,), generator=_gen(7))
    result = fit_temperature(logits, labels, temperature_bounds=(0.1, 5.0))
    assert result.temperature == 5.0 and result.at_bound
    assert _nll(logits, labels, 5.0) < _nll(logits, labels, 4.0)


def _golden_section_temperature(logits: torch.Tensor, labels: torch.Tensor, low: float, high: float) -> float:
    """Minimizer of PyTorch's float64 NLL over log T in [low, high] (convex in 1/T, unimodal in log T)."""
    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(80):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if _nll(logits, labels, math.exp(c)) < _nll(logits, labels, math.exp(d)):
            b = d
        else:
            a = c
    return math.exp((a + b) / 2.0)


def test_fit_temperature_on_float32_logits_matches_a_float64_oracle():
    # A large common offset (which softmax ignores) made E_p[z] - z_y cancel in float32: the old fit returned
    # T = 0.0206165 for a true optimum of 0.0206154 (5e-5 relative, for a tolerance of 1e-7).
    g = _gen(0)
    base = torch.randn(512, 40, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(base, dim=-1), 1, generator=g).squeeze(-1)
    logits = (base * 0.02 + 300.0).float()
    result = fit_temperature(logits, labels)
    expected = _golden_section_temperature(logits, labels, 0.015, 0.03)
    assert not result.at_bound
    assert result.temperature == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Perplexity of an infinite or huge NLL
# --------------------------------------------------------------------------------------------------------------------


def test_token_metrics_ppl_is_inf_for_an_infinite_nll():
    logits = torch.randn(4, 7, generator=_gen(8))
    labels = torch.tensor([1, 2, 3, 4])
    logits[2, 3] = -math.inf
    metrics = TokenMetrics()
    metrics.update(logits, labels)
    out = metrics.compute()
    assert out["nll"] == math.inf
    assert out["ppl"] == math.inf  # today exp(700) = 1.0e304


def test_huge_finite_nll_gives_inf_ppl_in_metrics_and_loss_components():
    logits = torch.zeros(3, 5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    logits[:, :3] = -1000.0 * torch.eye(3, dtype=torch.float64)  # each label 1000 below the other entries
    expected_nll = float(F.cross_entropy(logits, labels))
    assert expected_nll > 709.8  # beyond math.exp's range
    with pytest.raises(OverflowError):
        math.exp(expected_nll)
    metrics = TokenMetrics()
    metrics.update(logits, labels)
    out = metrics.compute()
    assert out["nll"] == pytest.approx(expected_nll, rel=1e-12)
    assert out["ppl"] == math.inf
    _, parts = smoothed_cross_entropy(logits, labels, return_components=True)
    means = parts.means()
    assert means["nll"] == pytest.approx(expected_nll, rel=1e-6)
    assert means["ppl"] == math.inf


def test_ppl_is_exp_nll_when_it_fits():
    logits = torch.randn(8, 11, generator=_gen(9), dtype=torch.float64) * 4
    labels = torch.randint(0, 11, (8,), generator=_gen(10))
    expected = math.exp(float(F.cross_entropy(logits, labels)))
    metrics = TokenMetrics()
    metrics.update(logits, labels)
    assert metrics.compute()["ppl"] == pytest.approx(expected, rel=1e-12)
    _, parts = smoothed_cross_entropy(logits, labels, return_components=True)
    assert parts.means()["ppl"] == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# TokenMetrics.load of a damaged file
# --------------------------------------------------------------------------------------------------------------------


def _saved_state(tmp_path):
    metrics = TokenMetrics()
    metrics.update(torch.randn(5, 6, generator=_gen(11)), torch.tensor([0, 1, 2, 3, 4]))
    path = metrics.save(tmp_path / "metrics.json")
    return path, json.loads(path.read_text())


def test_load_names_the_file_and_the_missing_keys(tmp_path):
    path, state = _saved_state(tmp_path)
    del state["sums"]
    del state["layout"]["num_bins"]
    del state["metrics"]["ece_adaptive"]
    path.write_text(json.dumps(state))
    with pytest.raises(ValueError) as info:
        TokenMetrics.load(path)
    message = str(info.value)
    assert str(path) in message
    assert "sums" in message and "layout.num_bins" in message and "metrics.ece_adaptive" in message


def test_load_names_the_file_when_the_layout_is_missing(tmp_path):
    path, state = _saved_state(tmp_path)
    del state["layout"]
    path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"metrics\.json.*layout"):
        TokenMetrics.load(path)


def test_load_names_the_file_when_it_is_not_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"format": "hf_smooth.TokenMetrics", "ver')
    with pytest.raises(ValueError, match="broken.json"):
        TokenMetrics.load(path)


def test_load_round_trip_still_works(tmp_path):
    path, _ = _saved_state(tmp_path)
    original = TokenMetrics.load(path).compute()
    assert original == json.loads(path.read_text())["metrics"]
