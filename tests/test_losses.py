"""hf_smooth/losses.py against the naive float64 oracles of tests/oracles.py: values and gradients over a table of
shapes, dtypes, ignore indices, reductions and knobs (Liger's test_cross_entropy.py is the model), the published
worked example, gradcheck, property tests, the numerical corner cases the module docstring promises, the logging
components, the all-ignored batch and input validation.

Low-precision logits are always compared with the float64 oracle evaluated on the SAME low-precision values, upcast:
hf_smooth computes in float32 whatever the logits dtype, so the loss tolerance only covers float32 rounding, and the
gradient tolerance only the rounding of the gradient to the logits dtype.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import (
    drop_masked_vocabulary,
    maxsup_cross_entropy,
    reduce_rows,
    smoothed_rows,
    soft_target_cross_entropy,
    torch_label_smoothing,
)

from hf_smooth import LossComponents, label_smoothing_loss, maxsup_loss, smoothed_cross_entropy


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Every tensor here is small: on a machine whose few cores are shared with other jobs, intra-op threads spin and
    # wait on each other (measured here: the module took 190 s with torch's default 2 threads under load, 32 s with 1).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The loss is computed in float32 for every logits dtype but float64, so one value tolerance serves all of them.
LOSS_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10)}
LOSS_TOL_LOW = dict(rtol=1e-5, atol=1e-5)
# The gradient is rounded to the logits dtype: half an ulp relative (2^-8 for bf16's 8-bit significand, 2^-11 for
# fp16), plus float32 arithmetic. fp16 gradients of a mean over a large vocabulary fall into the subnormal range
# (spacing 2^-24), hence an absolute floor.
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2**-8 + 1e-5, torch.float16: 2**-11 + 1e-5}
GRAD_ATOL_FLOOR = {torch.float16: 2**-24}


def assert_loss_close(actual: torch.Tensor, expected: torch.Tensor, logits_dtype: torch.dtype) -> None:
    assert actual.dtype == (torch.float64 if logits_dtype == torch.float64 else torch.float32)
    tol = LOSS_TOL.get(logits_dtype, LOSS_TOL_LOW)
    torch.testing.assert_close(actual.double(), expected.detach().double(), **tol)


def assert_grad_close(
    actual: torch.Tensor, expected: torch.Tensor, logits_dtype: torch.dtype, upstream: float | None = None
) -> None:
    """``upstream`` is the largest per-token factor of the gradient (upstream gradient / token count). The gradient
    ``softmax - target`` cancels when the prediction matches the target, so float32's absolute error is relative
    to that factor, not to the result; by default the largest expected entry stands in for it."""
    assert actual.dtype == logits_dtype
    if upstream is None:
        upstream = float(expected.abs().max())
    atol = 2e-6 * upstream + GRAD_ATOL_FLOOR.get(logits_dtype, 0.0)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=GRAD_RTOL[logits_dtype], atol=atol)


def value_and_grad(fn, logits: torch.Tensor, weights: torch.Tensor, *, upcast: bool = False):
    """``fn(leaf)`` and ``d sum(fn(leaf) * weights) / d leaf`` for a fresh leaf holding ``logits``' values (upcast to
    float64 for the oracles). ``weights`` scale each output element, so ``reduction="none"`` is checked with a
    non-uniform upstream gradient."""
    leaf = logits.detach().clone()
    if upcast:
        leaf = leaf.to(torch.float64)
    leaf.requires_grad_(True)
    out = fn(leaf)
    (out * weights.to(out.dtype)).sum().backward()
    return out.detach(), leaf.grad


# --------------------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One setting of the knobs, called through the public function a user would pick for it."""

    epsilon: float = 0.0
    alpha: float = 0.0
    convention: str = "uniform"

    def __call__(self, logits, labels, **kwargs):
        if self.alpha == 0.0:
            return label_smoothing_loss(logits, labels, epsilon=self.epsilon, convention=self.convention, **kwargs)
        if self.epsilon == 0.0 and self.convention == "uniform":
            return maxsup_loss(logits, labels, alpha=self.alpha, **kwargs)
        return smoothed_cross_entropy(
            logits, labels, epsilon=self.epsilon, alpha=self.alpha, convention=self.convention, **kwargs
        )

    def oracle_rows(self, logits, labels, ignore_index):
        return smoothed_rows(
            logits, labels, epsilon=self.epsilon, alpha=self.alpha, convention=self.convention,
            ignore_index=ignore_index,
        )

    def __str__(self):
        if self.alpha == 0.0:
            return f"ls-{self.convention}-{self.epsilon}"
        if self.epsilon == 0.0:
            return f"maxsup-{self.alpha}"
        return f"both-{self.convention}-{self.epsilon}-{self.alpha}"


METHODS = [
    Method(epsilon=0.0),  # plain cross-entropy through label_smoothing_loss
    Method(epsilon=0.1),
    Method(epsilon=0.6),
    Method(epsilon=0.1, convention="fairseq"),
    Method(epsilon=1.0, convention="fairseq"),
    Method(alpha=0.0, epsilon=0.0, convention="fairseq"),  # eps = 0 must be plain CE in either convention
    Method(alpha=0.1),
    Method(alpha=0.5),
    Method(epsilon=0.1, alpha=0.2, convention="fairseq"),
]
# maxsup_loss with alpha=0 must be plain cross-entropy too; Method routes alpha == 0 to label_smoothing_loss, so
# that call is checked on its own below (test_zero_knobs_equal_plain_cross_entropy).

# (reduction, num_items_in_batch kind); the count passed is the local count + 3, as in gradient accumulation.
REDUCTIONS = [("mean", None), ("mean", "int"), ("mean", "tensor"), ("sum", None), ("none", None)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@dataclass(frozen=True)
class Case:
    shape: tuple
    dtype: torch.dtype
    ignore_index: int
    reduction: str
    num_items: str | None
    method: Method
    chunk_size: int | None

    @property
    def id(self):
        dtype = str(self.dtype).removeprefix("torch.")
        shape = "x".join(map(str, self.shape))
        return (
            f"{shape}-{dtype}-ign{self.ignore_index}-{self.reduction}-n{self.num_items}-{self.method}"
            f"-chunk{self.chunk_size}"
        )


def table_cases() -> list[Case]:
    cases = []
    for shape, chunk_sizes in [((1, 1, 2), (None,)), ((3, 17, 41), (None, 3))]:
        for dtype in DTYPES:
            for ignore_index in (-100, 7):  # 7 is a real class of the (3, 17, 41) vocabulary: those labels are ignored
                for reduction, num_items in REDUCTIONS:
                    for method in METHODS:
                        for chunk_size in chunk_sizes:
                            cases.append(Case(shape, dtype, ignore_index, reduction, num_items, method, chunk_size))
    # The realistic vocabulary, on a few combinations only (each is a 4M-element float64 oracle).
    big = (2, 64, 32000)
    cases += [
        Case(big, torch.float32, -100, "mean", None, Method(epsilon=0.1), None),
        Case(big, torch.bfloat16, -1, "sum", None, Method(alpha=0.1), None),
        Case(big, torch.float16, -100, "mean", "tensor", Method(epsilon=0.1, convention="fairseq"), 50),
        Case(big, torch.float32, 7, "none", None, Method(epsilon=0.1, alpha=0.2, convention="fairseq"), None),
        Case(big, torch.bfloat16, -100, "mean", "int", Method(epsilon=0.0), 7),
    ]
    return cases


TABLE = table_cases()


def test_table_is_not_empty():
    # STYLE.md: a parametrized test that silently excludes every case is a bug.
    assert len(TABLE) > 500
    assert {c.dtype for c in TABLE} == set(DTYPES)
    assert {c.reduction for c in TABLE} == {"mean", "sum", "none"}
    assert {c.method.convention for c in TABLE} == {"uniform", "fairseq"}
    assert any(c.chunk_size == 3 for c in TABLE)


def make_batch(shape, dtype, ignore_index, seed=0):
    """Random logits with a unique row maximum (so MaxSup's argmax is not a tie, even after rounding to bf16) and
    labels with about 30% of positions ignored, a fully ignored sequence when there are several, and the first
    position always scored."""
    g = torch.Generator().manual_seed(seed)
    *lead, num_classes = shape
    logits = torch.randn(*shape, generator=g, dtype=torch.float64) * 3.0
    top = logits.argmax(-1, keepdim=True)
    logits.scatter_add_(-1, top, torch.ones_like(top, dtype=torch.float64))  # a gap >= 1 survives bf16 rounding
    labels = torch.randint(num_classes, tuple(lead), generator=g)
    ignored = torch.rand(tuple(lead), generator=g) < 0.3
    if lead[0] > 1:
        ignored[1] = True
    ignored.view(-1)[0] = False
    labels[ignored] = ignore_index
    return logits.to(dtype), labels


def num_items_value(kind, labels, ignore_index):
    count = int((labels != ignore_index).sum())
    if kind is None:
        return None
    if kind == "int":
        return count + 3
    return torch.tensor(count + 3)


@pytest.mark.parametrize("case", TABLE, ids=[c.id for c in TABLE])
def test_values_and_gradients_match_oracles(case: Case):
    logits, labels = make_batch(case.shape, case.dtype, case.ignore_index, seed=zlib.crc32(case.id.encode()))
    num_items = num_items_value(case.num_items, labels, case.ignore_index)
    scored = labels != case.ignore_index
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(labels.shape, generator=g) if case.reduction == "none" else torch.tensor(1.7)
    kwargs = dict(ignore_index=case.ignore_index, reduction=case.reduction, num_items_in_batch=num_items)

    out, grad = value_and_grad(
        lambda z: case.method(z, labels, chunk_size=case.chunk_size, **kwargs), logits, weights
    )
    assert out.shape == (labels.shape if case.reduction == "none" else ())
    assert bool((grad[~scored] == 0).all()), "ignored positions must get exactly zero gradient"

    def oracle(z):
        return reduce_rows(case.method.oracle_rows(z, labels, case.ignore_index), labels, **kwargs)

    expected, expected_grad = value_and_grad(oracle, logits, weights, upcast=True)
    assert_loss_close(out, expected, case.dtype)
    upstream = float(weights.abs().max())
    if case.reduction == "mean":
        upstream /= max(float(num_items if num_items is not None else scored.sum()), 1.0)
    assert_grad_close(grad, expected_grad, case.dtype, upstream)
    if case.reduction == "none":
        assert bool((out[~scored] == 0).all())

    if case.method.alpha == 0.0 and (case.method.convention == "uniform" or case.method.epsilon == 0.0):
        # Second, independent oracle: PyTorch's own label smoothing (eps = 0: plain cross-entropy).
        def torch_oracle(z):
            rows = torch_label_smoothing(z, labels, epsilon=case.method.epsilon, ignore_index=case.ignore_index)
            return reduce_rows(rows, labels, **kwargs)

        expected, expected_grad = value_and_grad(torch_oracle, logits, weights, upcast=True)
        assert_loss_close(out, expected, case.dtype)
        assert_grad_close(grad, expected_grad, case.dtype, upstream)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_knobs_equal_plain_cross_entropy(reduction):
    logits, labels = make_batch((3, 17, 41), torch.float32, -100)
    expected = F.cross_entropy(logits.double().transpose(1, 2), labels, reduction=reduction)
    for loss in (
        label_smoothing_loss(logits, labels, epsilon=0.0, reduction=reduction),
        label_smoothing_loss(logits, labels, epsilon=0.0, convention="fairseq", reduction=reduction),
        maxsup_loss(logits, labels, alpha=0.0, reduction=reduction),
        smoothed_cross_entropy(logits, labels, reduction=reduction),
    ):
        assert_loss_close(loss, expected, torch.float32)


def test_default_knobs():
    logits, labels = make_batch((3, 17, 41), torch.float64, -100)
    expected = F.cross_entropy(logits.transpose(1, 2), labels, label_smoothing=0.1)
    assert_loss_close(label_smoothing_loss(logits, labels), expected, torch.float64)
    expected = reduce_rows(maxsup_cross_entropy(logits, labels, alpha=0.1), labels, reduction="mean")
    assert_loss_close(maxsup_loss(logits, labels), expected, torch.float64)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_num_items_in_batch_only_affects_mean(reduction):
    logits, labels = make_batch((3, 17, 41), torch.float32, -100)
    plain = label_smoothing_loss(logits, labels, reduction=reduction)
    for count in (1000, torch.tensor(1000)):
        torch.testing.assert_close(label_smoothing_loss(logits, labels, reduction=reduction,
                                                        num_items_in_batch=count), plain)


def test_other_label_shapes_and_non_contiguous_logits():
    # 1-D labels against (N, K) logits, as in F.cross_entropy; 3-D labels; a shifted, non-contiguous view.
    logits, labels = make_batch((4, 9, 13), torch.float32, -100)
    flat = label_smoothing_loss(logits.reshape(-1, 13), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(flat.reshape(4, 9), label_smoothing_loss(logits, labels, reduction="none"))
    cube = maxsup_loss(logits.reshape(2, 2, 9, 13), labels.reshape(2, 2, 9), reduction="none")
    torch.testing.assert_close(cube.reshape(4, 9), maxsup_loss(logits, labels, reduction="none"))

    shifted = logits[:, :-1, :]  # the causal-LM shift: a non-contiguous view
    assert not shifted.is_contiguous()
    leaf = logits.clone().requires_grad_(True)
    loss = label_smoothing_loss(leaf[:, :-1, :], labels[:, 1:], epsilon=0.2)
    loss.backward()
    expected, expected_grad = value_and_grad(
        lambda z: reduce_rows(
            soft_target_cross_entropy(z[:, :-1, :], labels[:, 1:], epsilon=0.2), labels[:, 1:], reduction="mean"
        ),
        logits, torch.tensor(1.0), upcast=True,
    )
    assert_loss_close(loss, expected, torch.float32)
    assert_grad_close(leaf.grad, expected_grad, torch.float32)
    assert bool((leaf.grad[:, -1] == 0).all())


def test_gradient_flows_through_upstream_graph():
    # logits = hidden @ W: the custom backward must hand autograd a gradient it can chain.
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=g)
    weight = torch.randn(8, 11, generator=g, requires_grad=True)
    labels = torch.randint(11, (2, 5), generator=g)
    labels[0, 1] = -100
    smoothed_cross_entropy(hidden @ weight, labels, epsilon=0.1, alpha=0.3).backward()
    ref_weight = weight.detach().double().requires_grad_(True)
    rows = smoothed_rows(hidden.double() @ ref_weight, labels, epsilon=0.1, alpha=0.3)
    reduce_rows(rows, labels, reduction="mean").backward()
    assert_grad_close(weight.grad, ref_weight.grad, torch.float32)


def test_logits_are_not_modified():
    # Liger #272: a loss that writes its gradient into the logits corrupts anything computed from them afterwards.
    logits, labels = make_batch((3, 17, 41), torch.float32, -100)
    before = logits.clone()
    leaf = logits.requires_grad_(True)
    smoothed_cross_entropy(leaf, labels, epsilon=0.1, alpha=0.1, chunk_size=4).backward()
    assert torch.equal(logits.detach(), before)


# --------------------------------------------------------------------------------------------------------------------
# Published worked example and closed forms
# --------------------------------------------------------------------------------------------------------------------


def test_worked_example():
    # K = 4, true class 2, eps = 0.1, p = [0.1, 0.2, 0.6, 0.1]; logits = log p, so softmax(logits) = p.
    # Uniform target q = 0.9 * onehot + 0.1 / 4 = [0.025, 0.025, 0.925, 0.025].
    # Smoothed CE = -sum q log p = 0.025 * (ln 10 + ln 5 + ln 10) + 0.925 * ln(1 / 0.6)
    #             = 0.025 * 6.214608 + 0.925 * 0.510826 = 0.155365 + 0.472514 = 0.627879.
    # Hard CE = -ln 0.6 = 0.510826.
    # Gradient at the true class: p_2 - q_2 = 0.6 - 0.925 = -0.325 (hard: 0.6 - 1 = -0.4).
    p = torch.tensor([[0.1, 0.2, 0.6, 0.1]], dtype=torch.float64)
    labels = torch.tensor([2])
    for reduction in ("mean", "sum"):
        logits = p.log().requires_grad_(True)
        loss = label_smoothing_loss(logits, labels, epsilon=0.1, reduction=reduction)
        loss.backward()
        assert loss.item() == pytest.approx(0.6279, abs=5e-5)
        assert loss.item() == pytest.approx(0.627879, abs=1e-6)
        assert logits.grad[0, 2].item() == pytest.approx(-0.325, abs=1e-12)
        # Off-target classes: p_k - 0.025.
        q = torch.tensor([0.025, 0.025, 0.925, 0.025], dtype=torch.float64)
        torch.testing.assert_close(logits.grad[0], p[0] - q)

        hard_logits = p.log().requires_grad_(True)
        hard = label_smoothing_loss(hard_logits, labels, epsilon=0.0, reduction=reduction)
        hard.backward()
        assert hard.item() == pytest.approx(0.5108, abs=5e-5)
        assert hard_logits.grad[0, 2].item() == pytest.approx(-0.40, abs=1e-12)


@pytest.mark.parametrize("num_classes", [2, 5, 41])
@pytest.mark.parametrize("epsilon", [0.05, 0.3, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fairseq_equals_uniform_with_rescaled_epsilon(num_classes, epsilon, reduction):
    # Target 1 - eps on y and eps / (K - 1) elsewhere == (1 - eps') onehot + eps' / K with eps' = eps K / (K - 1).
    logits, labels = make_batch((3, 7, num_classes), torch.float32, -100)
    g = torch.Generator().manual_seed(2)
    weights = torch.randn(labels.shape, generator=g) if reduction == "none" else torch.tensor(1.0)
    fairseq, fairseq_grad = value_and_grad(
        lambda z: label_smoothing_loss(z, labels, epsilon=epsilon, convention="fairseq", reduction=reduction),
        logits, weights,
    )
    rescaled = epsilon * num_classes / (num_classes - 1)
    uniform, uniform_grad = value_and_grad(
        lambda z: label_smoothing_loss(z, labels, epsilon=rescaled, reduction=reduction), logits, weights
    )
    torch.testing.assert_close(fairseq, uniform, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fairseq_grad, uniform_grad, rtol=1e-6, atol=1e-7)
    # And the fairseq form really differs from uniform with the same eps (the two are not interchangeable names).
    same_eps = label_smoothing_loss(logits, labels, epsilon=epsilon, reduction=reduction)
    assert not torch.allclose(fairseq, same_eps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.1, 0.7])
def test_maxsup_penalty_gradient_closed_form(alpha):
    # d/dz [alpha (z_max - mean z)] = alpha (1 - 1/K) at the argmax, -alpha / K elsewhere (no detach).
    logits, labels = make_batch((2, 6, 9), torch.float64, -100)
    weights = torch.tensor(1.0)
    _, maxsup_grad = value_and_grad(lambda z: maxsup_loss(z, labels, alpha=alpha, reduction="sum"), logits, weights)
    _, ce_grad = value_and_grad(lambda z: maxsup_loss(z, labels, alpha=0.0, reduction="sum"), logits, weights)
    onehot = F.one_hot(logits.argmax(-1), 9).double()
    expected = alpha * (onehot - 1.0 / 9) * (labels != -100).unsqueeze(-1)
    torch.testing.assert_close(maxsup_grad - ce_grad, expected, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# gradcheck (float64)
# --------------------------------------------------------------------------------------------------------------------

GRADCHECK_METHODS = [
    Method(epsilon=0.2),
    Method(epsilon=0.2, convention="fairseq"),
    Method(alpha=0.3),
    Method(epsilon=0.15, alpha=0.25, convention="fairseq"),
]


@pytest.mark.parametrize("method", GRADCHECK_METHODS, ids=str)
@pytest.mark.parametrize("reduction, num_items", [("none", None), ("sum", None), ("mean", None), ("mean", 11)])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gradcheck(method, reduction, num_items, chunk_size):
    logits, labels = make_batch((2, 4, 6), torch.float64, -100, seed=3)
    logits.requires_grad_(True)

    def fn(z):
        return method(z, labels, reduction=reduction, num_items_in_batch=num_items, chunk_size=chunk_size)

    assert fn(logits).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------------------------------

GARBAGE = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 3e38, -3e38]),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
)


@st.composite
def scored_batches(draw, max_rows=6, max_classes=9, dtype=torch.float32):
    num_classes = draw(st.integers(2, max_classes))
    num_rows = draw(st.integers(1, max_rows))
    values = draw(st.lists(st.floats(-20, 20, width=32), min_size=num_rows * num_classes,
                           max_size=num_rows * num_classes))
    labels = draw(st.lists(st.integers(0, num_classes - 1), min_size=num_rows, max_size=num_rows))
    return torch.tensor(values, dtype=dtype).reshape(num_rows, num_classes), torch.tensor(labels)


KNOBS = dict(
    epsilon=st.floats(0.0, 1.0),
    alpha=st.floats(0.0, 2.0),
    convention=st.sampled_from(["uniform", "fairseq"]),
)


@PROPERTY_SETTINGS
@given(
    batch=scored_batches(),
    pad=st.data(),
    ignore_index=st.sampled_from([-100, -1, 1000]),
    chunk_size=st.sampled_from([None, 1, 2, 3]),
    **KNOBS,
)
def test_padding_changes_nothing(batch, pad, ignore_index, chunk_size, epsilon, alpha, convention):
    logits, labels = batch
    num_rows, num_classes = logits.shape
    num_pad = pad.draw(st.integers(1, 5))
    is_pad = torch.tensor(pad.draw(st.permutations([False] * num_rows + [True] * num_pad)))
    garbage = pad.draw(st.lists(GARBAGE, min_size=num_pad * num_classes, max_size=num_pad * num_classes))
    padded = torch.empty(num_rows + num_pad, num_classes)
    padded[~is_pad] = logits
    padded[is_pad] = torch.tensor(garbage, dtype=torch.float32).reshape(num_pad, num_classes)
    padded_labels = torch.full((num_rows + num_pad,), ignore_index)
    padded_labels[~is_pad] = labels

    def loss(z, y):
        return smoothed_cross_entropy(
            z, y, epsilon=epsilon, alpha=alpha, convention=convention, ignore_index=ignore_index,
            reduction="sum", chunk_size=chunk_size,
        )

    weights = torch.tensor(1.0)
    value, grad = value_and_grad(lambda z: loss(z, labels), logits, weights)
    padded_value, padded_grad = value_and_grad(lambda z: loss(z, padded_labels), padded, weights)
    assert torch.isfinite(padded_value)
    torch.testing.assert_close(padded_value, value, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(padded_grad[~is_pad], grad, rtol=1e-6, atol=1e-7)
    assert bool((padded_grad[is_pad] == 0).all()), "padding must get exactly zero gradient (not NaN)"


@PROPERTY_SETTINGS
@given(batch=scored_batches(dtype=torch.float64), epsilon=st.floats(0.0, 1.0),
       convention=st.sampled_from(["uniform", "fairseq"]))
def test_label_smoothing_identity(batch, epsilon, convention):
    # LS(eps) = CE + eps' (z_y - mean z), eps' = eps (uniform) or eps K / (K - 1) (fairseq).
    logits, labels = batch
    num_classes = logits.shape[-1]
    rescaled = epsilon if convention == "uniform" else epsilon * num_classes / (num_classes - 1)
    z_y = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    expected = F.cross_entropy(logits, labels, reduction="none") + rescaled * (z_y - logits.mean(-1))
    loss, parts = label_smoothing_loss(
        logits, labels, epsilon=epsilon, convention=convention, reduction="none", return_components=True
    )
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-9)
    reg = float((rescaled * (z_y - logits.mean(-1))).sum())
    assert float(parts.regularizer) == pytest.approx(reg, rel=1e-5, abs=1e-4)


@PROPERTY_SETTINGS
@given(batch=scored_batches(), alpha=st.floats(0.0, 5.0))
def test_maxsup_is_at_least_cross_entropy(batch, alpha):
    logits, labels = batch
    maxsup = maxsup_loss(logits, labels, alpha=alpha, reduction="none")
    ce = F.cross_entropy(logits.double(), labels, reduction="none")
    # z_max - mean z >= 0, so MaxSup >= CE for alpha >= 0; the slack only covers float32 rounding of the mean.
    slack = 1e-5 * (1.0 + alpha) * (1.0 + float(logits.abs().max()))
    assert bool((maxsup.double() >= ce - slack).all()), (maxsup, ce)


@PROPERTY_SETTINGS
@given(
    batch=scored_batches(max_rows=8),
    ignored=st.lists(st.booleans(), min_size=8, max_size=8),
    extra=st.integers(0, 20),
    **KNOBS,
)
def test_mean_is_sum_over_count(batch, ignored, extra, epsilon, alpha, convention):
    logits, labels = batch
    labels = torch.where(torch.tensor(ignored[: len(labels)]), -100, labels)
    count = int((labels != -100).sum())

    def loss(**kwargs):
        return smoothed_cross_entropy(logits, labels, epsilon=epsilon, alpha=alpha, convention=convention, **kwargs)

    total = loss(reduction="sum")
    mean = loss(reduction="mean")
    assert torch.isfinite(mean)
    torch.testing.assert_close(mean, total / max(count, 1), rtol=1e-6, atol=1e-6)
    if count == 0:
        assert mean.item() == 0.0
    for num_items in (count + extra, torch.tensor(count + extra)):
        if count + extra == 0:
            continue
        torch.testing.assert_close(loss(reduction="mean", num_items_in_batch=num_items), total / (count + extra),
                                   rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------------------------


def test_bf16_large_vocabulary_gives_the_float32_answer():
    from transformers.trainer_pt_utils import LabelSmoother

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 64, 32000, generator=g).bfloat16()
    labels = torch.randint(32000, (2, 64), generator=g)
    labels[0, :5] = -100
    ours = label_smoothing_loss(logits, labels, epsilon=0.1)
    oracle = reduce_rows(soft_target_cross_entropy(logits, labels, epsilon=0.1), labels, reduction="mean")
    assert_loss_close(ours, oracle, torch.bfloat16)
    fp32 = F.cross_entropy(logits.float().transpose(1, 2), labels, label_smoothing=0.1)
    torch.testing.assert_close(ours, fp32, **LOSS_TOL_LOW)
    # The tolerance discriminates: transformers' LabelSmoother takes log_softmax in bf16 and is ~4e-3 off
    # relative (ANCHORS.md: 16.8655 vs 16.8721), hundreds of times the tolerance above.
    theirs = LabelSmoother(epsilon=0.1)({"logits": logits}, labels)
    error = abs(theirs.item() - oracle.item())
    assert error > 100 * (LOSS_TOL_LOW["atol"] + LOSS_TOL_LOW["rtol"] * abs(oracle.item()))


@pytest.mark.parametrize("method", [Method(epsilon=0.1), Method(epsilon=0.1, convention="fairseq"), Method(alpha=0.1)],
                         ids=str)
def test_fp16_logits_near_fp16_max_give_a_finite_exact_loss(method):
    # #10674: fp16 logits of magnitude ~6e4 with a 128k vocabulary. log p reaches -1.2e5, beyond fp16's range, and
    # the vocabulary sum of the logits reaches ~8e9.
    vocab = 128256
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, vocab, generator=g, dtype=torch.float64) * 20000
    logits[..., :100] = 60000 + torch.rand(2, 3, 100, generator=g, dtype=torch.float64) * 5000
    logits[1, 2] = -60000 + torch.rand(vocab, generator=g, dtype=torch.float64) * 120000
    logits = logits.clamp(-65504, 65504).half()
    labels = torch.randint(vocab, (2, 3), generator=g)
    labels[0, 1] = -100
    weights = torch.tensor(1.0)

    out, grad = value_and_grad(lambda z: method(z, labels), logits, weights)
    assert torch.isfinite(out) and bool(torch.isfinite(grad).all())
    expected, expected_grad = value_and_grad(
        lambda z: reduce_rows(method.oracle_rows(z, labels, -100), labels, reduction="mean"), logits, weights,
        upcast=True,
    )
    assert_loss_close(out, expected, torch.float16)
    # Gradient: softmax(z) = exp(z - lse) with z - lse formed in float32, whose spacing at |z| ~ 6.5e4 is ~4e-3, so
    # each p_k carries a relative error up to ~|z| 2^-23 (PyTorch's own float32 F.cross_entropy on these values is off
    # by 2.2e-5 absolute too). Bound each entry by that (x2) on p_k and on the result, plus fp16 rounding.
    scored = (labels != -100).unsqueeze(-1)
    p = torch.softmax(logits.double(), dim=-1) * scored
    delta = float(logits.abs().max()) * 2**-22
    upstream = 1.0 / int(scored.sum())
    bound = (2**-11 + delta) * expected_grad.abs() + 2**-24 + upstream * delta * p
    assert grad.dtype == torch.float16
    excess = (grad.double() - expected_grad).abs() - bound
    assert float(excess.max()) <= 0.0, float(excess.max())
    if method.convention == "uniform" and method.alpha == 0.0:
        # The naive fp16 pipeline overflows on the same input (the test input really is at the edge).
        from transformers.trainer_pt_utils import LabelSmoother

        assert not torch.isfinite(LabelSmoother(epsilon=0.1)({"logits": logits}, labels))


@pytest.mark.parametrize("method", [Method(epsilon=0.1), Method(alpha=0.3), Method(0.2, 0.2, "fairseq")], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 2, 5])
def test_nan_and_inf_at_ignored_positions_change_nothing(method, reduction, chunk_size):
    logits, labels = make_batch((3, 9, 13), torch.float32, -100)
    ignored = labels == -100
    dirty = logits.clone()
    garbage = torch.tensor([math.nan, math.inf, -math.inf, 3e38, -3e38])
    dirty[ignored] = garbage[torch.arange(int(ignored.sum()) * 13) % 5].reshape(-1, 13)
    dirty[tuple(ignored.nonzero()[0].tolist())] = math.nan  # one position all NaN
    dirty[tuple(ignored.nonzero()[1].tolist())] = -math.inf  # one position all -inf
    clean = torch.where(ignored.unsqueeze(-1), torch.zeros(()), logits)
    g = torch.Generator().manual_seed(3)
    weights = torch.randn(labels.shape, generator=g) if reduction == "none" else torch.tensor(1.0)

    def fn(z):
        return method(z, labels, reduction=reduction, chunk_size=chunk_size)

    value, grad = value_and_grad(fn, clean, weights)
    dirty_value, dirty_grad = value_and_grad(fn, dirty, weights)
    assert bool(torch.isfinite(dirty_value).all())
    assert torch.equal(dirty_value, value)
    assert torch.equal(dirty_grad, grad)
    assert bool((dirty_grad[ignored] == 0).all())


@pytest.mark.parametrize(
    "method",
    [Method(epsilon=0.1), Method(epsilon=0.3, convention="fairseq"), Method(alpha=0.4), Method(0.1, 0.2, "fairseq"),
     Method(epsilon=0.0)],
    ids=str,
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_negative_infinity_masks_vocabulary_entries(method, reduction, chunk_size):
    # A -inf logit marks an absent entry: K counts the finite entries, the mean runs over them, and the entry gets
    # zero gradient. The oracle simply drops those columns row by row.
    g = torch.Generator().manual_seed(5)
    num_classes = 11
    logits, labels = make_batch((3, 6, num_classes), torch.float32, -100, seed=5)
    masked = torch.rand(3, 6, num_classes, generator=g) < 0.4
    masked[:, :, -2:] = True  # a padded vocabulary tail
    scored = labels != -100
    masked.scatter_(-1, torch.where(scored, labels, 0).unsqueeze(-1), False)  # the label itself stays finite
    masked[..., :2] &= ~scored.unsqueeze(-1)  # at least two finite entries per scored row
    masked[0, 0] = False  # one scored row without any masked entry
    masked[~scored] = True  # ignored rows entirely -inf
    assert bool(masked[scored].any()) and bool((~masked[scored]).sum(-1).min() >= 2)
    logits = logits.masked_fill(masked, -math.inf)
    weights = torch.randn(labels.shape, generator=g) if reduction == "none" else torch.tensor(1.0)

    out, grad = value_and_grad(lambda z: method(z, labels, reduction=reduction, chunk_size=chunk_size), logits,
                               weights)
    assert bool(torch.isfinite(out).all())
    assert bool((grad[masked] == 0).all())

    def oracle(z):
        rows = drop_masked_vocabulary(z, labels, epsilon=method.epsilon, alpha=method.alpha,
                                      convention=method.convention)
        return reduce_rows(rows, labels, reduction=reduction)

    expected, expected_grad = value_and_grad(oracle, logits, weights, upcast=True)
    assert_loss_close(out, expected, torch.float32)
    assert_grad_close(grad, expected_grad, torch.float32)


# --------------------------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------------------------

COMPONENT_METHODS = [Method(epsilon=0.1), Method(epsilon=0.2, convention="fairseq"), Method(alpha=0.3),
                     Method(0.1, 0.2, "fairseq"), Method(epsilon=0.0)]


def oracle_components(logits, labels, method, ignore_index=-100):
    z = logits.reshape(-1, logits.shape[-1]).double()
    y = labels.reshape(-1)
    scored = y != ignore_index
    z, y = z[scored], y[scored]
    loss = method.oracle_rows(z, y, ignore_index).sum()
    nll = F.cross_entropy(z, y, reduction="sum")
    return {
        "num_tokens": float(scored.sum()),
        "loss": float(loss),
        "nll": float(nll),
        "regularizer": float(loss - nll),
        "top1_prob": float(z.softmax(-1).max(-1).values.sum()),
        "correct": float((z.argmax(-1) == y).sum()),
        "logit_gap": float((z.max(-1).values - z.mean(-1)).sum()),
        "z_loss": 0.0,  # no z-loss here (tests/test_family.py has it)
        "entropy": float(-(z.softmax(-1) * z.log_softmax(-1)).sum()),
        "weight": float(scored.sum()),  # no weights: the token count
    }


@pytest.mark.parametrize("method", COMPONENT_METHODS, ids=str)
@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_components_match_oracle(method, chunk_size, reduction):
    logits, labels = make_batch((3, 17, 41), torch.float32, -100, seed=11)
    leaf = logits.clone().requires_grad_(True)
    loss, parts = method(leaf, labels, reduction=reduction, chunk_size=chunk_size, return_components=True)
    assert isinstance(parts, LossComponents)
    # The returned loss is unchanged by asking for components.
    torch.testing.assert_close(loss, method(logits, labels, reduction=reduction, chunk_size=chunk_size))

    expected = oracle_components(logits, labels, method)
    for name in LossComponents.FIELDS:
        value = getattr(parts, name)
        assert value.shape == () and not value.requires_grad and value.dtype == torch.float32, name
        assert float(value) == pytest.approx(expected[name], rel=1e-5, abs=1e-4), name
    # nll is the true cross-entropy, whatever the knobs; regularizer = loss - nll.
    assert float(parts.nll) == pytest.approx(float(F.cross_entropy(logits.double().transpose(1, 2), labels,
                                                                   reduction="sum")), rel=1e-6)
    assert float(parts.regularizer) == pytest.approx(float(parts.loss - parts.nll), rel=1e-4, abs=1e-4)
    loss = loss.detach()
    total = loss.sum() if reduction == "none" else loss * (parts.num_tokens if reduction == "mean" else 1)
    assert float(parts.loss) == pytest.approx(float(total), rel=1e-5)
    if method.epsilon == method.alpha == 0.0:
        assert float(parts.regularizer) == pytest.approx(0.0, abs=1e-4)

    means = parts.means()
    count = expected["num_tokens"]
    assert means["num_tokens"] == count
    for name in ("loss", "nll", "regularizer", "top1_prob", "logit_gap"):
        assert means[name] == pytest.approx(expected[name] / count, rel=1e-5, abs=1e-6), name
    assert means["accuracy"] == pytest.approx(expected["correct"] / count, rel=1e-6)
    assert means["ppl"] == pytest.approx(math.exp(expected["nll"] / count), rel=1e-5)
    assert "correct" not in means


def test_components_worked_example():
    # p = [0.1, 0.2, 0.6, 0.1], label 2, eps 0.1. ln p = [-2.302585, -1.609438, -0.510826, -2.302585], mean -1.681359.
    # logit_gap = z_max - mean z = -0.510826 + 1.681359 = 1.170533; regularizer = eps * (z_y - mean z) = 0.117053
    # (z_y = z_max here) = 0.627879 - 0.510826; top1 = 0.6; the argmax is the label, so correct = 1.
    logits = torch.tensor([[0.1, 0.2, 0.6, 0.1]], dtype=torch.float64).log()
    loss, parts = label_smoothing_loss(logits, torch.tensor([2]), epsilon=0.1, return_components=True)
    assert float(parts.num_tokens) == 1
    assert float(parts.loss) == pytest.approx(0.627879, abs=1e-6)
    assert float(parts.nll) == pytest.approx(0.510826, abs=1e-6)
    assert float(parts.regularizer) == pytest.approx(0.117053, abs=1e-6)
    assert float(parts.top1_prob) == pytest.approx(0.6, abs=1e-6)
    assert float(parts.correct) == 1
    assert float(parts.logit_gap) == pytest.approx(1.170533, abs=1e-6)
    means = parts.means()
    assert means["accuracy"] == 1.0
    assert means["ppl"] == pytest.approx(1 / 0.6, rel=1e-6)
    # A wrong argmax: label 1.
    _, parts = label_smoothing_loss(logits, torch.tensor([1]), epsilon=0.1, return_components=True)
    assert float(parts.correct) == 0
    assert float(parts.nll) == pytest.approx(-math.log(0.2), abs=1e-6)


@pytest.mark.parametrize("method", [Method(epsilon=0.1), Method(alpha=0.3)], ids=str)
def test_components_of_two_batches_add_up_to_one_batch(method):
    first, first_labels = make_batch((2, 5, 17), torch.float32, -100, seed=1)
    second, second_labels = make_batch((3, 7, 17), torch.float32, -100, seed=2)
    _, a = method(first, first_labels, return_components=True)
    _, b = method(second, second_labels, return_components=True)
    joined = torch.cat([first.reshape(-1, 17), second.reshape(-1, 17)])
    joined_labels = torch.cat([first_labels.reshape(-1), second_labels.reshape(-1)])
    _, both = method(joined, joined_labels, return_components=True)
    merged = a + b
    assert isinstance(merged, LossComponents)
    for name in LossComponents.FIELDS:
        assert float(getattr(merged, name)) == pytest.approx(float(getattr(both, name)), rel=1e-5, abs=1e-5), name
    merged_means, both_means = merged.means(), both.means()
    assert merged_means.keys() == both_means.keys()
    for name, value in both_means.items():
        assert merged_means[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name

    # An all-ignored micro-batch adds nothing.
    _, empty = method(first, torch.full_like(first_labels, -100), return_components=True)
    for name in LossComponents.FIELDS:
        assert float(getattr(empty, name)) == 0.0, name
        assert float(getattr(empty + a, name)) == pytest.approx(float(getattr(a, name)), rel=1e-6), name
    empty_means = empty.means()
    assert empty_means["num_tokens"] == 0
    for name in ("loss", "nll", "regularizer", "top1_prob", "accuracy", "logit_gap"):
        assert empty_means[name] == 0.0, name
    assert math.isfinite(empty_means["ppl"])


# --------------------------------------------------------------------------------------------------------------------
# Empty batch
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [Method(epsilon=0.1), Method(alpha=0.1), Method(0.1, 0.1, "fairseq")], ids=str)
@pytest.mark.parametrize("reduction, num_items", [
    ("mean", None), ("mean", 0), ("mean", "tensor0"), ("mean", 5), ("mean", "tensor5"), ("sum", None), ("none", None),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_ignored_batch_gives_zero_connected_to_the_graph(method, reduction, num_items, dtype):
    # TRL completion-only / padding-free collators can hand a rank a micro-batch with every label -100; it must still
    # return a finite 0 with a grad_fn so that backward() runs and DDP's all-reduce does not hang.
    if isinstance(num_items, str):
        num_items = torch.tensor(int(num_items.removeprefix("tensor")))
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[0, 1] = math.nan  # ignored garbage must not leak either
    labels = torch.full((2, 5), -100)
    leaf = logits.requires_grad_(True)
    loss = method(leaf, labels, reduction=reduction, num_items_in_batch=num_items)
    assert loss.grad_fn is not None
    assert loss.dtype == torch.float32
    if reduction == "none":
        assert loss.shape == (2, 5)
    assert bool((loss == 0.0).all()), loss
    (loss.sum() if reduction == "none" else loss).backward()
    assert leaf.grad is not None and leaf.grad.dtype == dtype
    assert torch.equal(leaf.grad, torch.zeros_like(leaf))
    if reduction == "mean" and num_items is None:
        # What this replaces: PyTorch returns NaN for the same batch.
        assert torch.isnan(F.cross_entropy(torch.randn(10, 7), labels.reshape(-1), label_smoothing=0.1))


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------

ENTRY_POINTS = [label_smoothing_loss, maxsup_loss, smoothed_cross_entropy]


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad_label, ignore_index", [(50, -100), (41, -100), (-3, -100), (-100, -1)])
def test_out_of_range_label_names_the_value(fn, bad_label, ignore_index):
    logits = torch.randn(2, 3, 41)
    labels = torch.tensor([[1, 2, 3], [4, bad_label, 6]])
    # 50 (and -3) appear nowhere else in the message, so the match shows the offending value is named.
    with pytest.raises(ValueError, match=rf"(?<![\d-]){bad_label}(?!\d)"):
        fn(logits, labels, ignore_index=ignore_index)


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_shape_mismatch_names_both_shapes(fn):
    with pytest.raises(ValueError) as info:
        fn(torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
    assert "(2, 5, 7)" in str(info.value) and "(2, 4)" in str(info.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda z, y: label_smoothing_loss(z, y, epsilon=-0.1),
        lambda z, y: label_smoothing_loss(z, y, epsilon=1.5),
        lambda z, y: label_smoothing_loss(z, y, epsilon=math.nan),
        lambda z, y: smoothed_cross_entropy(z, y, epsilon=1.01),
        lambda z, y: maxsup_loss(z, y, alpha=-0.1),
        lambda z, y: maxsup_loss(z, y, alpha=math.nan),
        lambda z, y: smoothed_cross_entropy(z, y, alpha=-1.0),
        lambda z, y: label_smoothing_loss(z, y, reduction="avg"),
        lambda z, y: maxsup_loss(z, y, reduction="batchmean"),
        lambda z, y: smoothed_cross_entropy(z, y, reduction="mean_tokens"),
        lambda z, y: label_smoothing_loss(z, y, convention="fair"),
        lambda z, y: smoothed_cross_entropy(z, y, epsilon=0.1, convention="Uniform"),
        lambda z, y: label_smoothing_loss(z, y, num_items_in_batch=-1),
        lambda z, y: label_smoothing_loss(z, y, chunk_size=0),
        lambda z, y: label_smoothing_loss(z[..., :1], torch.zeros_like(y), convention="fairseq"),
    ],
)
def test_bad_options_raise_value_error(call):
    with pytest.raises(ValueError):
        call(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("labels_dtype", [torch.float32, torch.float64, torch.bool])
def test_non_integer_labels_raise_type_error(fn, labels_dtype):
    with pytest.raises(TypeError):
        fn(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=labels_dtype))


def test_integer_logits_raise_type_error():
    with pytest.raises(TypeError):
        label_smoothing_loss(torch.zeros(2, 3, 5, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
