"""hf_smooth.fused: the fused projection + loss equals the unfused path, values and gradients.

The reference is always the materialized path: ``smoothed_cross_entropy(softcap(scale * (h @ W.T + b)), ...)`` under
autograd, itself tested against float64 oracles in tests/test_losses.py. Float32 cases must agree to a relative error
below 1e-5 (max abs difference over max abs reference); bf16/fp16 cases are compared with the float32 reference on
the same inputs upcast, with the tolerances of ``LOW_PRECISION_TOL``.
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import hf_smooth.fused as fused
from hf_smooth import smoothed_cross_entropy
from hf_smooth.fused import (
    default_chunk_size,
    fused_linear_smoothed_loss,
    fused_linear_smoothed_loss_for_module,
    output_layer_weights,
)

FP32_RTOL = 1e-5
# (loss, gradient) relative tolerances against the float32 reference on the upcast inputs. The logits come out of a
# GEMM in the input dtype (8 / 11 significant bits), as from the model's own lm_head; everything after is float32.
LOW_PRECISION_TOL = {torch.bfloat16: (5e-3, 3e-2), torch.float16: (1e-3, 5e-3)}


@dataclass(frozen=True)
class Method:
    epsilon: float = 0.0
    alpha: float = 0.0
    convention: str = "uniform"

    @property
    def name(self) -> str:
        if self.epsilon and self.alpha:
            return f"ls{self.epsilon}+maxsup{self.alpha}-{self.convention}"
        if self.epsilon:
            return f"ls{self.epsilon}-{self.convention}"
        if self.alpha:
            return f"maxsup{self.alpha}"
        return "ce"

    def kwargs(self) -> dict:
        return {"epsilon": self.epsilon, "alpha": self.alpha, "convention": self.convention}


METHODS = [
    Method(epsilon=0.1),
    Method(epsilon=0.2, convention="fairseq"),
    Method(alpha=0.15),
    Method(),
    Method(epsilon=0.1, alpha=0.2, convention="fairseq"),
]
# (bias, logit_scale, final_logit_softcapping)
HEADS = [(False, None, None), (True, None, None), (False, 0.7, None), (True, 1.6, 3.0)]
REDUCTIONS = ["mean", "sum", "none"]
# (leading shape of labels, hidden size, vocab size)
SHAPES = [((1, 1), 3, 2), ((3, 17), 5, 41), ((2, 37), 16, 300), ((45,), 8, 7)]
NUM_ITEMS = [None, "int", "tensor"]
CHUNKS = [None, 3, 7, 1]


@dataclass(frozen=True)
class Case:
    shape: tuple
    hidden_size: int
    vocab_size: int
    method: Method
    head: tuple
    reduction: str
    num_items: str | None
    chunk_size: int | None
    ignore_index: int
    dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        bias, scale, cap = self.head
        return (
            f"{'x'.join(map(str, self.shape))}-H{self.hidden_size}-V{self.vocab_size}-{self.method.name}-"
            f"{'b' if bias else 'nob'}-s{scale}-cap{cap}-{self.reduction}-n{self.num_items}-c{self.chunk_size}-"
            f"ign{self.ignore_index}-{str(self.dtype).split('.')[-1]}"
        )


def table_cases() -> list[Case]:
    """Every method x head x reduction, with the shape, token count, chunk size and ignore value rotating, so each
    value of each factor meets every method and reduction."""
    cases = []
    i = 0
    for method in METHODS:
        for head in HEADS:
            for reduction in REDUCTIONS:
                shape = SHAPES[i % len(SHAPES)]
                cases.append(
                    Case(*shape, method, head, reduction, NUM_ITEMS[(i // 2) % 3], CHUNKS[(i // 3) % 4],
                         [-100, 0, 7][i % 3] if shape[2] > 7 else -100)
                )
                i += 1
    return cases


def low_precision_cases() -> list[Case]:
    cases = []
    for dtype in (torch.bfloat16, torch.float16):
        for i, (method, head, reduction) in enumerate(
            [(METHODS[0], HEADS[1], "mean"), (METHODS[2], HEADS[3], "sum"), (METHODS[4], HEADS[2], "none"),
             (METHODS[1], HEADS[0], "mean")]
        ):
            cases.append(Case((4, 33), 32, 500, method, head, reduction, NUM_ITEMS[i % 3], [None, 16][i % 2], -100,
                              dtype))
    return cases


TABLE = table_cases()
LOW_PRECISION = low_precision_cases()


def test_tables_are_not_empty():
    # STYLE.md: a parametrized test that silently excludes every case is a bug.
    assert len(TABLE) == len(METHODS) * len(HEADS) * len(REDUCTIONS) == 60
    assert {c.chunk_size for c in TABLE} == set(CHUNKS)
    assert {c.num_items for c in TABLE} == set(NUM_ITEMS)
    assert {c.shape for c in TABLE} == {s[0] for s in SHAPES}
    assert {c.ignore_index for c in TABLE} == {-100, 0, 7}
    assert {c.dtype for c in LOW_PRECISION} == {torch.bfloat16, torch.float16}
    assert len(LOW_PRECISION) == 8
    assert len(BLOCK_CASES) == 12 and {c.reduction for c in BLOCK_CASES} == set(REDUCTIONS)


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def make_inputs(case: Case, seed: int = 0):
    """Hidden states, weight (logits of std ~3), bias, labels with ~30% ignored (a fully ignored sequence when there
    are several rows, the first token always scored). For bf16/fp16 MaxSup cases, rows whose two largest logits are
    closer than 0.1 are ignored too: rounding the logits could flip their argmax, where MaxSup's gradient jumps."""
    g = torch.Generator().manual_seed(seed)
    lead, hidden_size, vocab_size = case.shape, case.hidden_size, case.vocab_size
    hidden = torch.randn(*lead, hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab_size, hidden_size, generator=g, dtype=torch.float64) * 3.0 / math.sqrt(hidden_size)
    bias = torch.randn(vocab_size, generator=g, dtype=torch.float64) if case.head[0] else None
    labels = torch.randint(vocab_size, lead, generator=g)
    ignored = torch.rand(lead, generator=g) < 0.3
    if len(lead) > 1 and lead[0] > 1:
        ignored[1] = True
    ignored.view(-1)[0] = False
    if case.dtype != torch.float32 and case.method.alpha and vocab_size > 1:
        logits = reference_logits(hidden.to(case.dtype).double(), weight.to(case.dtype).double(),
                                  None if bias is None else bias.to(case.dtype).double())
        top2 = logits.topk(2, dim=-1).values
        ignored |= (top2[..., 0] - top2[..., 1]) < 0.1
    labels[ignored] = case.ignore_index
    if case.ignore_index >= 0:
        labels[~ignored & (labels == case.ignore_index)] = (case.ignore_index + 1) % vocab_size
    cast = lambda t: None if t is None else t.to(case.dtype).requires_grad_(True)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), labels


def num_items_value(kind, labels, ignore_index):
    if kind is None:
        return None
    count = int((labels != ignore_index).sum()) + 5
    return count if kind == "int" else torch.tensor(count)


def reference_logits(hidden, weight, bias, logit_scale=None, cap=None):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    if logit_scale is not None:
        logits = logits * logit_scale
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return logits


def value_and_grads(fn, inputs, upstream):
    out = fn()
    grads = torch.autograd.grad((out * upstream).sum(), [t for t in inputs if t is not None], allow_unused=False)
    return out.detach(), list(grads)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return err / max(scale, 1e-12)


def run_case(case: Case, reference_dtype=None, seed=None):
    seed = zlib.crc32(case.id.encode()) if seed is None else seed
    hidden, weight, bias, labels = make_inputs(case, seed=seed)
    _, scale, cap = case.head
    num_items = num_items_value(case.num_items, labels, case.ignore_index)
    upstream = (
        torch.randn(labels.shape, generator=torch.Generator().manual_seed(1)) if case.reduction == "none"
        else torch.tensor(1.3)
    )
    common = dict(**case.method.kwargs(), ignore_index=case.ignore_index, reduction=case.reduction,
                  num_items_in_batch=num_items)
    inputs = [hidden, weight, bias]
    out, grads = value_and_grads(
        lambda: fused_linear_smoothed_loss(hidden, weight, labels, bias=bias, logit_scale=scale,
                                           final_logit_softcapping=cap, chunk_size=case.chunk_size, **common),
        inputs, upstream,
    )
    if reference_dtype is not None:
        inputs = [None if t is None else t.detach().to(reference_dtype).requires_grad_(True) for t in inputs]
    ref_out, ref_grads = value_and_grads(
        lambda: smoothed_cross_entropy(reference_logits(*inputs, scale, cap), labels, **common), inputs, upstream
    )
    return out, grads, ref_out, ref_grads, labels, [t for t in (hidden, weight, bias) if t is not None]


# --------------------------------------------------------------------------------------------------------------------
# Values and gradients against the unfused path
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", TABLE, ids=[c.id for c in TABLE])
def test_matches_unfused_float32(case: Case):
    out, grads, ref_out, ref_grads, labels, inputs = run_case(case)
    assert out.dtype == torch.float32
    assert out.shape == (labels.shape if case.reduction == "none" else ())
    assert rel_error(out, ref_out) < FP32_RTOL, (out, ref_out)
    for name, grad, ref, tensor in zip(("hidden", "weight", "bias"), grads, ref_grads, inputs):
        assert grad.dtype == tensor.dtype and grad.shape == tensor.shape, name
        assert rel_error(grad, ref) < FP32_RTOL, name
    ignored = labels == case.ignore_index
    assert bool((grads[0][ignored] == 0).all()), "ignored tokens must get exactly zero hidden gradient"
    if case.reduction == "none":
        assert bool((out[ignored] == 0).all())


BLOCK_CASES = TABLE[::5]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=[c.id for c in BLOCK_CASES])
def test_matches_unfused_with_small_elementwise_blocks(case: Case, monkeypatch):
    # On CPU the elementwise work runs over blocks of rows inside each chunk (2**21 elements, so a single block at
    # these sizes); force 2-row blocks so the block bookkeeping is exercised, including a last partial block.
    monkeypatch.setitem(fused._BLOCK_ELEMENTS, "cpu", 2 * case.vocab_size)
    out, grads, ref_out, ref_grads, _, _ = run_case(case)
    assert rel_error(out, ref_out) < FP32_RTOL
    assert all(rel_error(a, b) < FP32_RTOL for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("case", LOW_PRECISION, ids=[c.id for c in LOW_PRECISION])
def test_low_precision_matches_float32_reference(case: Case):
    out, grads, ref_out, ref_grads, _, inputs = run_case(case, reference_dtype=torch.float32)
    loss_tol, grad_tol = LOW_PRECISION_TOL[case.dtype]
    assert out.dtype == torch.float32, "the loss is float32 whatever the input dtype"
    assert rel_error(out, ref_out) < loss_tol
    for name, grad, ref, tensor in zip(("hidden", "weight", "bias"), grads, ref_grads, inputs):
        assert grad.dtype == case.dtype, name
        assert torch.isfinite(grad.float()).all(), name
        assert rel_error(grad, ref) < grad_tol, name


def test_weight_gradient_is_accumulated_in_float32():
    # Many chunks of one row each: a bf16 accumulator would lose the small contributions (relative 2^-9 per add).
    case = Case((512,), 16, 64, METHODS[0], HEADS[0], "sum", None, 1, -100, torch.bfloat16)
    hidden, weight, _, labels = make_inputs(case)
    loss = fused_linear_smoothed_loss(hidden, weight, labels, epsilon=0.1, reduction="sum", chunk_size=1)
    (grad,) = torch.autograd.grad(loss, [weight])
    ref_weight = weight.detach().float().requires_grad_(True)
    (ref,) = torch.autograd.grad(
        smoothed_cross_entropy(hidden.detach().float() @ ref_weight.t(), labels, epsilon=0.1, reduction="sum"),
        [ref_weight],
    )
    assert rel_error(grad, ref) < 1e-2


def test_masked_vocabulary_through_negative_infinite_bias():
    case = Case((3, 11), 6, 20, METHODS[4], HEADS[1], "mean", None, 4, -100)
    hidden, weight, bias, labels = make_inputs(case)
    with torch.no_grad():
        bias[[2, 5, 11]] = -math.inf
    labels[torch.isin(labels, torch.tensor([2, 5, 11]))] = 0
    kwargs = dict(epsilon=0.1, alpha=0.2, convention="fairseq")
    out, grads = value_and_grads(
        lambda: fused_linear_smoothed_loss(hidden, weight, labels, bias=bias, chunk_size=4, **kwargs),
        [hidden, weight, bias], torch.tensor(1.0),
    )
    ref, ref_grads = value_and_grads(
        lambda: smoothed_cross_entropy(reference_logits(hidden, weight, bias), labels, **kwargs),
        [hidden, weight, bias], torch.tensor(1.0),
    )
    assert math.isfinite(float(out)) and rel_error(out, ref) < FP32_RTOL
    for grad, expected in zip(grads, ref_grads):
        assert torch.isfinite(grad).all() and rel_error(grad, expected) < FP32_RTOL


def test_non_contiguous_shifted_hidden_states():
    # The causal-LM call: hidden[:, :-1] against labels[:, 1:].
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    labels = torch.randint(30, (2, 9), generator=g)
    out = fused_linear_smoothed_loss(hidden[:, :-1], weight, labels[:, 1:], method="maxsup", chunk_size=5)
    ref = smoothed_cross_entropy((hidden @ weight.t())[:, :-1], labels[:, 1:], alpha=0.1)
    grads = torch.autograd.grad(out, [hidden, weight])
    ref_grads = torch.autograd.grad(ref, [hidden, weight])
    assert rel_error(out, ref) < FP32_RTOL
    assert all(rel_error(a, b) < FP32_RTOL for a, b in zip(grads, ref_grads))
    assert bool((grads[0][:, -1] == 0).all())


# --------------------------------------------------------------------------------------------------------------------
# Ignored tokens
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_chunk_and_garbage_hidden_states_there(reduction):
    case = Case((40,), 8, 50, METHODS[4], HEADS[3], reduction, None, 8, -100)
    hidden, weight, bias, labels = make_inputs(case)
    labels[8:24] = -100  # two whole chunks of 8 rows
    upstream = torch.randn(40) if reduction == "none" else torch.tensor(1.0)
    kwargs = dict(epsilon=0.1, alpha=0.2, convention="fairseq", reduction=reduction)
    run = lambda h: fused_linear_smoothed_loss(h, weight, labels, bias=bias, logit_scale=1.6,  # noqa: E731
                                               final_logit_softcapping=3.0, chunk_size=8, **kwargs)
    out, grads = value_and_grads(lambda: run(hidden), [hidden, weight, bias], upstream)
    ref, ref_grads = value_and_grads(
        lambda: smoothed_cross_entropy(reference_logits(hidden, weight, bias, 1.6, 3.0), labels, **kwargs),
        [hidden, weight, bias], upstream,
    )
    assert rel_error(out, ref) < FP32_RTOL
    assert all(rel_error(a, b) < FP32_RTOL for a, b in zip(grads, ref_grads))
    # Ignored tokens are never projected: NaN/inf hidden states there change nothing.
    poisoned = hidden.detach().clone()
    poisoned[8:24] = math.nan
    poisoned[labels == -100] = math.inf
    poisoned.requires_grad_(True)
    out2, grads2 = value_and_grads(lambda: run(poisoned), [poisoned, weight, bias], upstream)
    assert torch.equal(out2, out)
    assert all(torch.equal(a, b) for a, b in zip(grads2, grads))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_items", [None, 0, "tensor"])
def test_all_ignored_batch_gives_zero_with_a_graph_and_zero_grads(reduction, num_items):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 4, generator=g, requires_grad=True)
    weight = torch.randn(9, 4, generator=g, requires_grad=True)
    bias = torch.randn(9, generator=g, requires_grad=True)
    labels = torch.full((2, 5), -100)
    items = torch.tensor(0) if num_items == "tensor" else num_items
    out, parts = fused_linear_smoothed_loss(
        hidden, weight, labels, bias=bias, method="maxsup", reduction=reduction, num_items_in_batch=items,
        return_components=True,
    )
    assert out.requires_grad and out.grad_fn is not None
    assert bool((out == 0).all()) and torch.isfinite(out).all()
    out.sum().backward()
    for tensor in (hidden, weight, bias):
        assert tensor.grad is not None and bool((tensor.grad == 0).all())
    assert float(parts.num_tokens) == 0 and float(parts.loss) == 0


# --------------------------------------------------------------------------------------------------------------------
# Components, knobs, paths
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("method", [METHODS[0], METHODS[2], METHODS[4]], ids=lambda m: m.name)
def test_components_equal_unfused(method, reduction):
    case = Case((3, 17), 8, 60, method, HEADS[3], reduction, None, 5, -100)
    hidden, weight, bias, labels = make_inputs(case)
    _, parts = fused_linear_smoothed_loss(
        hidden, weight, labels, bias=bias, logit_scale=1.6, final_logit_softcapping=3.0, chunk_size=5,
        reduction=reduction, return_components=True, **method.kwargs(),
    )
    _, ref = smoothed_cross_entropy(
        reference_logits(hidden, weight, bias, 1.6, 3.0), labels, reduction=reduction, return_components=True,
        **method.kwargs(),
    )
    for name in parts.FIELDS:
        assert float(getattr(parts, name)) == pytest.approx(float(getattr(ref, name)), rel=1e-5, abs=1e-5), name
        assert not getattr(parts, name).requires_grad


def test_method_names_and_defaults():
    case = Case((2, 9), 8, 30, METHODS[0], HEADS[0], "mean", None, None, -100)
    hidden, weight, _, labels = make_inputs(case)
    logits = (hidden @ weight.t()).detach()

    def fused(**kw):
        return float(fused_linear_smoothed_loss(hidden, weight, labels, **kw).detach())

    assert fused(method="label_smoothing") == pytest.approx(float(smoothed_cross_entropy(logits, labels, epsilon=0.1)))
    assert fused(method="maxsup") == pytest.approx(float(smoothed_cross_entropy(logits, labels, alpha=0.1)))
    assert fused(method="maxsup", alpha=0.3) == pytest.approx(float(smoothed_cross_entropy(logits, labels, alpha=0.3)))
    assert fused(method="none") == pytest.approx(float(smoothed_cross_entropy(logits, labels)))
    assert fused() == fused(method="none"), "method=None with no knob is plain cross-entropy"
    assert fused(epsilon=0.1, alpha=0.2) == pytest.approx(
        float(smoothed_cross_entropy(logits, labels, epsilon=0.1, alpha=0.2))
    )


class _CountGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "reduction, grad, needs, forward_gemms, backward_gemms",
    [
        ("mean", True, "hwb", 3, 0),  # gradients in the forward: logits, dh, dW per chunk; backward only scales
        ("sum", True, "w", 2, 0),  # frozen hidden: no dh GEMM
        ("none", True, "hwb", 1, 3),  # recomputed in the backward: logits again, dh, dW
        ("mean", False, "hwb", 1, None),  # torch.no_grad(): no gradient work
        ("mean", True, "", 1, None),  # nothing requires grad
    ],
)
def test_gradient_work_only_when_needed(reduction, grad, needs, forward_gemms, backward_gemms):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 8, generator=g, requires_grad="h" in needs)
    weight = torch.randn(30, 8, generator=g, requires_grad="w" in needs)
    bias = torch.randn(30, generator=g, requires_grad="b" in needs)
    labels = torch.randint(30, (20,), generator=g)
    chunks = 4  # 20 rows / 5
    with torch.set_grad_enabled(grad), _CountGemms() as counter:
        out = fused_linear_smoothed_loss(hidden, weight, labels, bias=bias, method="maxsup", reduction=reduction,
                                         chunk_size=5)
    assert counter.count == forward_gemms * chunks
    if backward_gemms is None:
        assert not out.requires_grad
        return
    with _CountGemms() as counter:
        out.sum().backward()
    assert counter.count == backward_gemms * chunks
    assert (hidden.grad is not None) == ("h" in needs) and (weight.grad is not None) == ("w" in needs)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_output_scales_gradients_computed_in_forward(reduction):
    # The gradients are formed at grad_output = 1 during the forward; backward multiplies by the real one.
    case = Case((30,), 8, 40, METHODS[4], HEADS[3], reduction, "int", 7, -100)
    hidden, weight, bias, labels = make_inputs(case)
    kwargs = dict(epsilon=0.1, alpha=0.2, bias=bias, reduction=reduction, chunk_size=7, num_items_in_batch=50)
    grads = torch.autograd.grad(-3.5 * fused_linear_smoothed_loss(hidden, weight, labels, **kwargs),
                                [hidden, weight, bias])
    ref = torch.autograd.grad(fused_linear_smoothed_loss(hidden, weight, labels, **kwargs), [hidden, weight, bias])
    assert all(rel_error(a, -3.5 * b) < FP32_RTOL for a, b in zip(grads, ref))
    # A retained graph hands the same gradients out again (they are never scaled in place).
    loss = 2.0 * fused_linear_smoothed_loss(hidden, weight, labels, **kwargs)
    first = torch.autograd.grad(loss, [hidden, weight, bias], retain_graph=True)
    second = torch.autograd.grad(loss, [hidden, weight, bias])
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(rel_error(a, 2.0 * b) < FP32_RTOL for a, b in zip(first, ref))


def test_fp16_gradients_survive_loss_scaling():
    # fp16 recomputes in backward, so a GradScaler-sized grad_output is applied before anything is rounded to fp16.
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4096, 16, generator=g).half().requires_grad_(True)
    weight = (torch.randn(2000, 16, generator=g) * 0.25).half().requires_grad_(True)
    labels = torch.randint(2000, (4096,), generator=g)
    loss = fused_linear_smoothed_loss(hidden, weight, labels, method="label_smoothing")
    (grad,) = torch.autograd.grad(loss * 65536.0, [hidden])
    ref_hidden = hidden.detach().float().requires_grad_(True)
    (ref,) = torch.autograd.grad(
        smoothed_cross_entropy(ref_hidden @ weight.detach().float().t(), labels, epsilon=0.1) * 65536.0, [ref_hidden]
    )
    assert rel_error(grad, ref) < 5e-3


def test_autocast_runs_the_projection_in_the_autocast_dtype():
    case = Case((4, 9), 16, 70, METHODS[0], HEADS[1], "mean", None, None, -100)
    hidden, weight, bias, labels = make_inputs(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_smoothed_loss(hidden, weight, labels, bias=bias, epsilon=0.1)
    bf16 = [t.detach().bfloat16() for t in (hidden, weight, bias)]
    expected = fused_linear_smoothed_loss(bf16[0], bf16[1], labels, bias=bf16[2], epsilon=0.1)
    assert out.dtype == torch.float32 and float(out.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    out.backward()
    assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()


def test_default_chunk_size_rule():
    # clamp(N * H, 2**23, 2**25) / V rows, at least 256 on CPU (128 elsewhere), at most N.
    assert default_chunk_size(4096, 1024, 32000, "cpu") == (1 << 23) // 32000 == 262
    assert default_chunk_size(4096, 1024, 128256, "cpu") == 256
    assert default_chunk_size(4096, 1024, 128256, "cuda") == 128
    assert default_chunk_size(4096, 1024, 256, "cpu") == 4096  # small vocabulary: all rows at once
    assert default_chunk_size(16384, 4096, 128256, "cpu") == (1 << 25) // 128256  # the 128 MiB cap
    assert default_chunk_size(10, 1024, 128256, "cpu") == 10
    assert default_chunk_size(0, 8, 8, "cpu") == 1


# --------------------------------------------------------------------------------------------------------------------
# gradcheck
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])  # gradients in forward / recomputed in backward
@pytest.mark.parametrize("head", [HEADS[0], HEADS[3]], ids=["plain", "bias-scale-softcap"])
def test_gradcheck(reduction, head):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(7, (2, 5), generator=g)
    labels[0, 1] = labels[1, 3] = -100
    with_bias, scale, cap = head

    def fn(h, w, b):
        return fused_linear_smoothed_loss(
            h, w, labels, bias=b if with_bias else None, epsilon=0.1, alpha=0.2, convention="fairseq",
            reduction=reduction, num_items_in_batch=11, logit_scale=scale, final_logit_softcapping=cap, chunk_size=3,
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias if with_bias else None), eps=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------------------


def _good():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 4, generator=g), torch.randn(10, 4, generator=g), torch.randint(10, (2, 3), generator=g)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda h, w, y, kw: y.__setitem__((0, 0), 10), ValueError, r"Label 10 is out of range for 10 classes"),
        (lambda h, w, y, kw: y.__setitem__((0, 0), -3), ValueError, r"Label -3 is out of range"),
        (lambda h, w, y, kw: kw.update(labels=y[:, :2]), ValueError, r"hidden \(2, 3, 4\) and labels \(2, 2\)"),
        (lambda h, w, y, kw: kw.update(weight=w[:, :3]), ValueError, r"weight \(10, 3\).*hidden_size 4"),
        (lambda h, w, y, kw: kw.update(weight=w[0]), ValueError, r"2-D \(vocab_size, hidden_size\)"),
        (lambda h, w, y, kw: kw.update(bias=torch.zeros(9)), ValueError, r"bias must have shape \(vocab_size,\)"),
        (lambda h, w, y, kw: kw.update(bias=torch.zeros(10).double()), TypeError, r"share one dtype"),
        (lambda h, w, y, kw: kw.update(epsilon=1.5), ValueError, r"epsilon must be in \[0, 1\]"),
        (lambda h, w, y, kw: kw.update(alpha=-0.1), ValueError, r"alpha must be >= 0"),
        (lambda h, w, y, kw: kw.update(reduction="avg"), ValueError, r"Unknown reduction 'avg'"),
        (lambda h, w, y, kw: kw.update(convention="torch"), ValueError, r"Unknown convention 'torch'"),
        (lambda h, w, y, kw: kw.update(method="ls"), ValueError, r"Unknown method 'ls'"),
        (lambda h, w, y, kw: kw.update(method="maxsup", epsilon=0.1), ValueError, r"method='maxsup' takes alpha"),
        (lambda h, w, y, kw: kw.update(method="label_smoothing", alpha=0.1), ValueError, r"takes epsilon"),
        (lambda h, w, y, kw: kw.update(chunk_size=0), ValueError, r"chunk_size must be a positive"),
        (lambda h, w, y, kw: kw.update(final_logit_softcapping=0.0), ValueError, r"final_logit_softcapping"),
        (lambda h, w, y, kw: kw.update(logit_scale=math.inf), ValueError, r"logit_scale must be a finite"),
        (lambda h, w, y, kw: kw.update(labels=y.float()), TypeError, r"labels must be an integer tensor"),
        (lambda h, w, y, kw: kw.update(hidden=h.long()), TypeError, r"hidden must be a floating-point tensor"),
    ],
)
def test_bad_inputs_raise(mutate, error, match):
    hidden, weight, labels = _good()
    kwargs = {}
    mutate(hidden, weight, labels, kwargs)
    call = dict(hidden=hidden, weight=weight, labels=labels)
    call.update({k: kwargs.pop(k) for k in list(kwargs) if k in call})
    with pytest.raises(error, match=match):
        fused_linear_smoothed_loss(call["hidden"], call["weight"], call["labels"], **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Output modules: nn.Linear, peft LoRA
# --------------------------------------------------------------------------------------------------------------------


def _lora_head(hidden_size=8, vocab_size=40, *, dropout=0.0, use_dora=False, bias=True, lora_bias=False):
    """A peft ``lora.Linear`` output layer, built the way users get one (``get_peft_model``, base weights frozen),
    with random B (peft's default B = 0 would give A a zero gradient)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(hidden_size, vocab_size, bias=bias)

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["lm_head"], init_lora_weights=False,
                        use_dora=use_dora, lora_bias=lora_bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = get_peft_model(Head(), config).base_model.model.lm_head
    assert isinstance(head, LoraLinear)
    return head


def _adapter_params(head):
    return [p for n, p in head.named_parameters() if "lora_" in n and p.requires_grad]


def _module_case(head, *, seed=1, **kwargs):
    """Fused-for-module vs unfused (module(hidden) then smoothed_cross_entropy): values and adapter/hidden grads."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 11, head.in_features, generator=g, requires_grad=True)
    labels = torch.randint(head.out_features, (3, 11), generator=g)
    labels[1, 3:] = -100
    params = [hidden] + [p for p in head.parameters() if p.requires_grad]
    knobs = dict(epsilon=0.1, alpha=0.05, logit_scale=1.3, final_logit_softcapping=6.0)
    torch.manual_seed(7)
    out = fused_linear_smoothed_loss_for_module(hidden, head, labels, chunk_size=4, **knobs)
    grads = torch.autograd.grad(out, params)
    torch.manual_seed(7)  # same dropout mask for the reference
    logits = reference_logits(head(hidden), torch.eye(head.out_features), None, 1.3, 6.0)
    ref = smoothed_cross_entropy(logits, labels, epsilon=0.1, alpha=0.05)
    ref_grads = torch.autograd.grad(ref, params)
    return out, grads, ref, ref_grads


def _assert_same(out, grads, ref, ref_grads, tol=FP32_RTOL):
    assert rel_error(out, ref) < tol
    for grad, expected in zip(grads, ref_grads):
        assert rel_error(grad, expected) < tol


@pytest.mark.parametrize("lora_bias", [False, True])
def test_lora_head_is_folded_and_its_adapter_trains(lora_bias):
    head = _lora_head(lora_bias=lora_bias)
    head.train()
    weight, _ = output_layer_weights(head)
    assert weight.requires_grad and weight.grad_fn is not None, "the folded weight must be differentiable"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path warns only when it falls back
        out, grads, ref, ref_grads = _module_case(head)
    _assert_same(out, grads, ref, ref_grads)
    adapter = _adapter_params(head)
    assert len(adapter) == (3 if lora_bias else 2)
    adapter_grads = grads[-len(adapter):]
    assert all(bool(g.abs().sum() > 0) for g in adapter_grads), "LoRA A and B must get non-zero gradients"


def test_lora_head_with_active_dropout_falls_back_with_a_warning():
    head = _lora_head(dropout=0.3)
    head.train()
    assert isinstance(output_layer_weights(head), str)
    with pytest.warns(UserWarning, match=r"lora_dropout p=0.3 in training mode.*falling back"):
        out, grads, ref, ref_grads = _module_case(head)
    _assert_same(out, grads, ref, ref_grads)
    assert all(bool(g.abs().sum() > 0) for g in grads[-2:])


def test_lora_head_with_dropout_in_eval_mode_is_folded():
    head = _lora_head(dropout=0.3)
    head.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, grads, ref, ref_grads = _module_case(head)
    _assert_same(out, grads, ref, ref_grads)


def test_dora_head_falls_back():
    head = _lora_head(use_dora=True)
    with pytest.warns(UserWarning, match=r"DoRA"):
        out, grads, ref, ref_grads = _module_case(head)
    _assert_same(out, grads, ref, ref_grads)


def test_lora_head_with_disabled_adapter_uses_the_base_weight():
    head = _lora_head()
    head.enable_adapters(False)
    try:
        weight, bias = output_layer_weights(head)
        assert weight is head.base_layer.weight and bias is head.base_layer.bias
    finally:
        head.enable_adapters(True)


def test_plain_linear_head_is_fused_and_others_fall_back():
    torch.manual_seed(0)
    linear = nn.Linear(8, 40)
    assert output_layer_weights(linear) == (linear.weight, linear.bias)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(*_module_case(linear))

    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    custom = Custom(8, 40)
    with pytest.warns(UserWarning, match=r"overrides nn.Linear.forward"):
        _assert_same(*_module_case(custom))

    hooked = nn.Linear(8, 40)
    hooked.register_forward_hook(lambda module, args, out: out + 1.0)
    with pytest.warns(UserWarning, match=r"forward hooks"):
        _assert_same(*_module_case(hooked))

    seq = nn.Sequential(nn.Linear(8, 40))
    seq.in_features, seq.out_features = 8, 40
    with pytest.warns(UserWarning, match=r"Sequential, not an nn.Linear"):
        _assert_same(*_module_case(seq))
