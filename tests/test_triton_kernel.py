"""hf_smooth.triton_kernels: the fused Triton kernel of the per-chunk loss work, against float64 oracles.

No GPU here: the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by the module fixture below before
the kernel module is imported, and undone after) on CPU tensors, with ``HF_SMOOTH_TRITON=1`` forcing the kernel on.
The interpreter runs the kernel's own code (the online max, the rescaled sums, the masks, the in-place gradient), so
a wrong formula fails here; what it cannot show is that the kernel compiles for a GPU, which
`test_kernel_compiles_for_sm90` checks by compiling it to a cubin for an H100 without one. Skipped without triton.

References: tests/oracles.py (float64, autograd through the naive soft-target / MaxSup losses, ``-inf`` columns
dropped by ``drop_masked_vocabulary``), and a hand-written closed form for the one case autograd cannot give (a
``-inf`` label logit, where the loss is ``+inf``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from oracles import drop_masked_vocabulary, smoothed_rows

pytest.importorskip("triton", reason="the Triton kernel tests need `pip install triton`")

import hf_smooth.triton_kernels as tk  # noqa: E402
from hf_smooth.fused import LogitTransform, fused_linear_smoothed_loss  # noqa: E402
from hf_smooth.losses import Coefficients  # noqa: E402

IGNORE = -100
# (epsilon, alpha, convention): CE, LS both conventions, MaxSup, both knobs.
METHODS = [(0.0, 0.0, "uniform"), (0.1, 0.0, "uniform"), (0.2, 0.0, "fairseq"), (0.0, 0.15, "uniform"),
           (0.1, 0.2, "fairseq")]
# (logit_scale, final_logit_softcapping)
HEADS = [(None, None), (0.7, None), (1.6, 3.0)]
# (compute dtype, relative tolerance on values and gradients, as max abs error over max abs reference)
DTYPES = [(torch.float64, 1e-12), (torch.float32, 2e-6)]


# Triton's interpreter must be on before triton is first imported (its own library functions are decorated then), and
# every test module shares one pytest process: so the interpreted tests run in a child pytest of this file with
# TRITON_INTERPRET=1 (`test_interpreted_tests_in_a_subprocess`), and are skipped in a process without it.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child pytest")


@pytest.fixture(autouse=True)
def force_kernel(monkeypatch):
    monkeypatch.setenv(tk.ENV, "1")


def _coefs(epsilon, alpha, convention):
    return Coefficients(epsilon=epsilon, alpha=alpha, fairseq=convention == "fairseq")


def _inputs(rows, vocab, *, seed, dtype, neg_inf=True, ignored=True):
    """Raw logits ``s`` and labels: some rows ignored (holding NaN, never read), some with ``-inf`` entries (never at
    the label), spread wide enough that the max and the soft-cap matter."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 2.5
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    if neg_inf and vocab > 3:
        for r in range(0, rows, 3):
            cols = torch.randperm(vocab, generator=gen)[: max(1, vocab // 4)]
            cols = cols[cols != labels[r]]
            s[r, cols] = float("-inf")
    if ignored and rows > 2:
        labels[1] = IGNORE
        s[1] = float("nan")
        labels[-1] = IGNORE
    return s.to(dtype), labels


def _oracle(s, labels, epsilon, alpha, convention, head: LogitTransform, row_weight):
    """Float64 per-row loss and ``d sum_i w_i loss_i / d s`` through autograd."""
    s64 = s.detach().to(torch.float64).requires_grad_(True)
    z = head.apply(s64)
    knobs = {"epsilon": epsilon, "alpha": alpha, "convention": convention, "ignore_index": IGNORE}
    rows = drop_masked_vocabulary(z, labels, **knobs) if bool(torch.isneginf(z).any()) else smoothed_rows(
        z, labels, **knobs
    )
    valid = labels != IGNORE
    # Ignored rows hold NaN: autograd would give NaN * 0 there, so they are kept out of the graph's sum.
    (rows[valid] * row_weight[valid]).sum().backward()
    grad = torch.where(valid.unsqueeze(-1), s64.grad, 0.0)
    return rows.detach(), grad


def _rel(actual, expected):
    actual, expected = actual.detach().to(torch.float64), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


def table_cases():
    """Every method x head x dtype x block layout; a rotation of 5 of them (each method once, each head, dtype and
    layout at least once) in the default run, the other 55 under -m slow (the interpreter takes ~1 s per case)."""
    default = {(i, i % 3, i % 2, (i + 1) % 2) for i in range(len(METHODS))}
    cases = []
    for i, method in enumerate(METHODS):
        for h, head in enumerate(HEADS):
            for d, dtype in enumerate(DTYPES):
                for small_blocks in (0, 1):
                    marks = () if (i, h, d, small_blocks) in default else (pytest.mark.slow,)
                    name = f"{method}-{head}-{str(dtype[0])[6:]}-{'many' if small_blocks else 'one'}"
                    cases.append(pytest.param(method, head, dtype, bool(small_blocks), marks=marks, id=name))
    return cases


CASES = table_cases()


def test_case_table_is_not_empty():
    assert len(CASES) == 60 and sum(not c.marks for c in CASES) == 5
    assert {c.values[1] for c in CASES if not c.marks} == set(HEADS)
    assert {c.values[3] for c in CASES if not c.marks} == {False, True}


@interpreted
@pytest.mark.parametrize(("method", "head", "dtype", "small_blocks"), CASES)
def test_forward_and_gradient_against_oracle(method, head, dtype, small_blocks, monkeypatch):
    """One launch: loss parts and the in-place gradient, for every method x head x dtype, with ignored rows (NaN
    logits) and ``-inf`` entries; ``many-blocks`` makes each row span several 16-entry blocks (the online rescaling
    and the cross-block argmax)."""
    epsilon, alpha, convention = method
    cdtype, tol = dtype
    if small_blocks:
        monkeypatch.setattr(tk, "_MAX_BLOCK", {torch.float32: 16, torch.float64: 16})
    transform = LogitTransform.from_knobs(*head)
    s, labels = _inputs(7, 53, seed=zlib.crc32(repr((method, head)).encode()) % 1000, dtype=cdtype)
    weight = torch.linspace(0.5, 1.5, 7, dtype=torch.float64)
    expected_rows, expected_grad = _oracle(s, labels, epsilon, alpha, convention, transform, weight)

    src = s.clone()
    coefs = _coefs(epsilon, alpha, convention)
    stats, row_loss, parts = tk.chunk_forward(src, labels, coefs, transform, grad_out=src,
                                              row_scale=(weight * transform.scale).to(cdtype), ignore_index=IGNORE)
    valid = labels != IGNORE
    assert row_loss.dtype == cdtype
    assert _rel(row_loss[valid], expected_rows[valid]) < tol
    assert _rel(src, expected_grad) < tol  # written in place over the logits, zero on ignored rows
    assert bool((src[~valid] == 0).all())
    nll, regularizer, top1, correct, gap, z_loss, entropy = parts
    assert bool((z_loss == 0).all())
    torch.testing.assert_close((nll + regularizer)[valid], row_loss[valid], rtol=tol, atol=0)
    z = transform.apply(s.to(torch.float64))
    assert torch.equal(stats.argmax[valid], z[valid].argmax(-1))
    assert torch.equal(stats.k[valid], (~torch.isneginf(z[valid])).sum(-1).to(cdtype))
    assert torch.equal(stats.has_neginf[valid], torch.isneginf(z[valid]).any(-1))
    torch.testing.assert_close(stats.lse[valid].double(), torch.logsumexp(z[valid], -1), rtol=tol, atol=0)
    torch.testing.assert_close(top1[valid].double(), z[valid].softmax(-1).max(-1).values, rtol=tol, atol=0)
    p = z[valid].softmax(-1)
    assert _rel(entropy[valid], -torch.where(p > 0, p * p.log(), 0.0).sum(-1)) < tol


@interpreted
@pytest.mark.parametrize(("cdtype", "tol"), DTYPES)
def test_gradient_from_saved_stats(cdtype, tol):
    """The backward's recompute: the gradient pass alone, from ``lse``, ``argmax`` and ``K``, into a separate output,
    with a per-row scale (``reduction="none"``) that is 0 on some scored rows."""
    epsilon, alpha, convention = 0.1, 0.2, "fairseq"
    transform = LogitTransform.from_knobs(1.3, 4.0)
    s, labels = _inputs(6, 29, seed=3, dtype=cdtype)
    weight = torch.tensor([0.3, 1.0, 0.0, 2.0, 0.7, 1.0], dtype=torch.float64)
    _, expected_grad = _oracle(s, labels, epsilon, alpha, convention, transform, weight)
    coefs = _coefs(epsilon, alpha, convention)
    stats, _, _ = tk.chunk_forward(s, labels, coefs, transform, ignore_index=IGNORE)
    out = torch.full_like(s, 7.0)
    tk.chunk_logit_grad_(s, labels, stats, coefs, transform, (weight * transform.scale).to(cdtype), out=out,
                         ignore_index=IGNORE)
    assert _rel(out, expected_grad) < tol
    assert bool((out[2] == 0).all())


@interpreted
def test_low_precision_input_reads_directly():
    """bf16 logits (the GEMM output) are read as they are and the float32 gradient goes to a separate buffer: equal
    to the float32 computation on the same values upcast."""
    s, labels = _inputs(5, 300, seed=5, dtype=torch.float32)
    s_bf16 = s.to(torch.bfloat16)
    transform = LogitTransform.from_knobs(None, 5.0)
    coefs = _coefs(0.1, 0.0, "uniform")
    grad = torch.empty(s.shape, dtype=torch.float32)
    stats, row_loss, _ = tk.chunk_forward(s_bf16, labels, coefs, transform, grad_out=grad,
                                          row_scale=torch.ones(5), ignore_index=IGNORE)
    ref = s_bf16.to(torch.float32)
    ref_stats, ref_loss, _ = tk.chunk_forward(ref, labels, coefs, transform, grad_out=ref, row_scale=torch.ones(5),
                                              ignore_index=IGNORE)
    assert torch.equal(row_loss, ref_loss) and torch.equal(grad, ref)
    ones = torch.ones(5, dtype=torch.float64)
    expected_rows, expected_grad = _oracle(s_bf16, labels, 0.1, 0.0, "uniform", transform, ones)
    valid = labels != IGNORE
    assert _rel(row_loss[valid], expected_rows[valid]) < 2e-6
    assert _rel(grad, expected_grad) < 2e-6


@interpreted
@pytest.mark.parametrize(
    ("method", "cdtype", "tol"),
    [((0.2, 0.1, "fairseq"), *DTYPES[0]), ((0.0, 0.0, "uniform"), *DTYPES[1]),
     pytest.param((0.1, 0.0, "uniform"), *DTYPES[1], marks=pytest.mark.slow),
     pytest.param((0.2, 0.1, "fairseq"), *DTYPES[1], marks=pytest.mark.slow)],
)
def test_neg_inf_at_the_label(method, cdtype, tol):
    """``p_y = 0``: the loss is ``+inf`` for every method (module docstring of hf_smooth.losses), the gradient stays
    finite: ``softmax - u / K`` on the present entries, ``-(1 - eps')`` at the label, ``+alpha`` at the argmax."""
    epsilon, alpha, convention = method
    s = torch.tensor([[1.0, float("-inf"), 0.5, -2.0, float("-inf"), 3.0]], dtype=cdtype)
    labels = torch.tensor([1])
    coefs = _coefs(epsilon, alpha, convention)
    grad = torch.empty_like(s)
    _, row_loss, (nll, *_) = tk.chunk_forward(s, labels, coefs, LogitTransform(), grad_out=grad,
                                                      row_scale=torch.ones(1, dtype=cdtype), ignore_index=IGNORE)
    assert torch.isposinf(row_loss).all() and torch.isposinf(nll).all()
    # Hand closed form, float64: K = 4 present entries, eps' = eps * K / (K - 1) for fairseq.
    z = s[0].to(torch.float64)
    present = ~torch.isneginf(z)
    k = int(present.sum())
    eps = epsilon * k / (k - 1) if convention == "fairseq" else epsilon
    expected = torch.where(present, torch.softmax(z, 0) - (eps + alpha) / k, 0.0)
    expected[1] -= 1.0 - eps
    expected[5] += alpha
    assert torch.isfinite(grad).all()
    assert _rel(grad[0], expected) < tol


@interpreted
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on the NaN row's arithmetic
def test_nan_and_posinf_rows_give_nan_loss():
    """``+inf`` or NaN in a scored row is not hidden (hf_smooth.losses rules): NaN loss, for that row only."""
    s = torch.randn(3, 10, dtype=torch.float64)
    s[0, 4] = float("nan")
    s[1, 2] = float("inf")
    labels = torch.tensor([3, 3, 3])
    _, row_loss, _ = tk.chunk_forward(s, labels, _coefs(0.1, 0.1, "uniform"), LogitTransform(), ignore_index=IGNORE)
    assert row_loss[:2].isnan().all() and torch.isfinite(row_loss[2])


@interpreted
@pytest.mark.parametrize(("cdtype", "tol"), DTYPES)
def test_z_loss(cdtype, tol, monkeypatch):
    """PaLM's z-loss ``c * lse^2`` (gradient ``2 c lse softmax``) on top of LS, values and gradients against autograd
    in float64; across several blocks."""
    monkeypatch.setattr(tk, "_MAX_BLOCK", {torch.float32: 16, torch.float64: 16})
    c = 1e-3
    s, labels = _inputs(5, 40, seed=9, dtype=cdtype, ignored=False)
    s = s * 4.0  # lse well away from 0
    s64 = s.to(torch.float64).requires_grad_(True)
    rows = drop_masked_vocabulary(s64, labels, epsilon=0.1) + c * torch.logsumexp(s64, -1) ** 2
    rows.sum().backward()
    grad = s.clone()
    coefs = Coefficients(epsilon=0.1, z_loss=c)
    _, row_loss, parts = tk.chunk_forward(grad, labels, coefs, LogitTransform(), grad_out=grad,
                                          row_scale=torch.ones(5, dtype=cdtype))
    assert _rel(row_loss, rows) < tol
    assert _rel(parts[5], c * torch.logsumexp(s64, -1) ** 2) < tol
    assert _rel(grad, s64.grad) < tol


@interpreted
def test_first_maximum_wins_across_blocks(monkeypatch):
    """Ties: the argmax (where MaxSup puts ``alpha``) is the first maximal entry, as torch.max's, also when the tie is
    between blocks; a leading block of only ``-inf`` entries is skipped without NaN."""
    monkeypatch.setattr(tk, "_MAX_BLOCK", {torch.float32: 16, torch.float64: 16})
    s = torch.zeros(2, 50, dtype=torch.float64)
    s[0, 20] = s[0, 40] = s[0, 45] = 5.0
    s[1, :16] = float("-inf")
    s[1, 30] = s[1, 31] = 2.0
    labels = torch.tensor([0, 17])
    stats, row_loss, _ = tk.chunk_forward(s, labels, _coefs(0.0, 0.3, "uniform"), LogitTransform(),
                                          ignore_index=IGNORE)
    assert stats.argmax.tolist() == [20, 30] == s.argmax(-1).tolist()
    assert stats.k.tolist() == [50, 34]
    assert torch.isfinite(row_loss).all()


@interpreted
def test_no_rows():
    s = torch.empty(0, 11)
    stats, row_loss, _ = tk.chunk_forward(s, torch.empty(0, dtype=torch.long), _coefs(0.1, 0.0, "uniform"),
                                          LogitTransform(), grad_out=s, row_scale=torch.ones(0))
    assert row_loss.shape == (0,) and stats.lse.shape == (0,)


# --------------------------------------------------------------------------------------------------------------------
# When the kernel runs
# --------------------------------------------------------------------------------------------------------------------


def test_kernel_enabled_switch(monkeypatch, caplog):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(tk.ENV, raising=False)
    assert not tk.kernel_enabled(cpu)  # by default only on CUDA
    assert tk.kernel_enabled(cuda)
    monkeypatch.setenv(tk.ENV, "0")
    assert not tk.kernel_enabled(cuda)
    monkeypatch.setenv(tk.ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tk.kernel_enabled(cpu)  # forced on, with the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        tk.kernel_enabled(cpu)
    monkeypatch.setenv(tk.ENV, "yes")
    with pytest.raises(ValueError, match="HF_SMOOTH_TRITON='yes'"):
        tk.kernel_enabled(cuda)
    # Without triton: the torch path on CUDA with one info log; forcing it on is an error naming the install.
    monkeypatch.setattr(tk, "_triton", lambda: None)
    tk._log_missing_triton.cache_clear()
    monkeypatch.delenv(tk.ENV)
    with caplog.at_level(logging.INFO, logger=tk.__name__):
        assert not tk.kernel_enabled(cuda) and not tk.kernel_enabled(cuda)
    assert len([r for r in caplog.records if "Triton is not installed" in r.getMessage()]) == 1
    monkeypatch.setenv(tk.ENV, "1")
    with pytest.raises(ImportError, match="pip install triton"):
        tk.kernel_enabled(cuda)


def test_smoothing_classes_fall_back_to_torch(caplog):
    tk._log_fallback.cache_clear()
    assert tk.covers(Coefficients(epsilon=0.1, z_loss=1e-4))
    with caplog.at_level(logging.INFO, logger=tk.__name__):
        assert not tk.covers(Coefficients(epsilon=0.1, classes=torch.ones(5)))
    assert "does not cover smoothing classes" in caplog.text


def _compile_for_h100(**constexprs):
    """Compile the kernel (not interpreted: a fresh copy of its module, loaded with TRITON_INTERPRET=0) to a cubin for
    sm_90 with Triton's bundled ptxas; no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    path = Path(tk.__file__).with_name("_triton_rows.py")
    spec = importlib.util.spec_from_file_location("_triton_rows_compiled", path)
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")
        spec.loader.exec_module(module)
    src, cdt = constexprs.pop("src"), constexprs.pop("cdt")
    signature = {
        "src_ptr": f"*{src}", "src_stride": "i64", "dst_ptr": f"*{cdt}", "dst_stride": "i64", "label_ptr": "*i64",
        "row_scale_ptr": f"*{cdt}", "coef_ptr": f"*{cdt}", "red_ptr": f"*{cdt}", "argmax_ptr": "*i64",
        "lse_ptr": f"*{cdt}", "k_ptr": f"*{cdt}", "num_rows": "i32", "V": "i32", "ignore_index": "i32",
        **{name: "constexpr" for name in constexprs},
    }
    names = list(signature)
    source = ASTSource(fn=module.rows_kernel, signature=signature,
                       constexprs={(names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})


VARIANTS = [
    # The training step's launch: bf16 GEMM output in, float32 gradient out, everything on.
    pytest.param(dict(src="bf16", cdt="fp32", FAIRSEQ=True, HAS_CAP=True, REDUCE=True, GRAD=True, BLOCK=8192)),
    pytest.param(dict(src="fp32", cdt="fp32", FAIRSEQ=False, HAS_CAP=False, REDUCE=True, GRAD=False, BLOCK=8192),
                 marks=pytest.mark.slow),
    pytest.param(dict(src="fp64", cdt="fp64", FAIRSEQ=False, HAS_CAP=True, REDUCE=False, GRAD=True, BLOCK=4096),
                 marks=pytest.mark.slow),
]


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning")
@pytest.mark.parametrize("constexprs", VARIANTS)
def test_kernel_compiles_for_sm90(constexprs):
    """The interpreter does not type-check like the compiler (loop-carried scalar types, early return): compile."""
    compiled = _compile_for_h100(**constexprs)
    assert compiled.asm["cubin"] and ".entry rows_kernel" in compiled.asm["ptx"]


@pytest.mark.skipif(INTERPRETED, reason="this is the child pytest")
@pytest.mark.parametrize("marker", ["not slow", pytest.param("slow", marks=pytest.mark.slow)])
def test_interpreted_tests_in_a_subprocess(marker):
    """The @interpreted tests of this file, in a child pytest with TRITON_INTERPRET=1 (see `interpreted`)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    parent_only = "compiles_for or in_a_subprocess or kernel_enabled or is_not_empty or forced_on"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m", marker,
               "-k", f"not ({parent_only})"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert " passed" in summary and "skipped" not in summary, summary  # every collected case ran


# --------------------------------------------------------------------------------------------------------------------
# The fused path with the kernel forced on: tests/test_fused.py's own oracle tables (the unfused path as reference)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def launches(monkeypatch):
    """Counts kernel launches, so a test proves the kernel ran instead of inferring it."""
    calls = []
    real = tk._launch

    def counting(*args, **kwargs):
        calls.append(kwargs["reduce"])
        return real(*args, **kwargs)

    monkeypatch.setattr(tk, "_launch", counting)
    return calls


def _fused_oracle(hidden, weight, bias, labels, *, epsilon, alpha, convention, scale, cap, z_loss, weights,
                  reduction):
    """Float64 loss of the materialized logits ``softcap(scale * (h @ W.T + b))``: tests/oracles.py per row, plus
    ``z_loss * lse^2``, times the per-token weights; "mean" over the scored tokens (unweighted calls only here)."""
    z = LogitTransform.from_knobs(scale, cap).apply(hidden @ weight.T + (0.0 if bias is None else bias))
    rows = smoothed_rows(z, labels, epsilon=epsilon, alpha=alpha, convention=convention, ignore_index=IGNORE)
    valid = labels != IGNORE
    rows = rows + torch.where(valid, z_loss * torch.logsumexp(z, -1) ** 2, 0.0)
    if weights is not None:
        rows = rows * weights
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / valid.sum()


# (dtype, epsilon, alpha, convention, scale, cap, bias, z_loss, weighted, reduction, chunk_size)
FUSED = [
    (torch.float64, 0.1, 0.0, "uniform", None, None, False, 0.0, False, "mean", 5),
    (torch.float64, 0.2, 0.1, "fairseq", 1.6, 3.0, True, 0.0, False, "none", 4),  # gradients recomputed in backward
    (torch.float64, 0.0, 0.15, "uniform", 0.7, None, True, 1e-2, True, "sum", 3),
    (torch.float32, 0.1, 0.2, "fairseq", None, 5.0, False, 1e-3, True, "sum", None),
    (torch.bfloat16, 0.1, 0.0, "uniform", None, None, True, 0.0, False, "mean", 8),  # the bf16 GEMM output read as is
]


@interpreted
@pytest.mark.parametrize("config", FUSED, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_fused_loss_with_the_kernel(config, launches):
    """`fused_linear_smoothed_loss` with the kernel forced on against the float64 oracle of the materialized logits:
    values and the gradients of hidden, weight and bias; ignored tokens hold NaN hidden states."""
    dtype, epsilon, alpha, convention, scale, cap, with_bias, z_loss, weighted, reduction, chunk_size = config
    gen = torch.Generator().manual_seed(11)
    rows, hidden_size, vocab = 23, 8, 37
    hidden = torch.randn(rows, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[[2, 9, 10]] = IGNORE
    hidden[[2, 9]] = float("nan")
    weights = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5 if weighted else None
    upstream = torch.linspace(0.5, 1.5, rows, dtype=torch.float64) if reduction == "none" else torch.tensor(1.3)
    knobs = dict(epsilon=epsilon, alpha=alpha, convention=convention, z_loss=z_loss, reduction=reduction)

    leaves = [t.to(dtype).requires_grad_(True) for t in (hidden, weight) + ((bias,) if with_bias else ())]
    loss = fused_linear_smoothed_loss(
        leaves[0], leaves[1], labels, bias=leaves[2] if with_bias else None, logit_scale=scale,
        final_logit_softcapping=cap, chunk_size=chunk_size, weights=None if weights is None else weights.to(dtype),
        **knobs,
    )
    grads = torch.autograd.grad((loss * upstream.to(loss.dtype)).sum(), leaves)
    assert launches, "the kernel did not run"
    assert (False in launches) == (reduction == "none"), "one launch per chunk unless the backward recomputes"

    # The oracle on the same (rounded) inputs, in float64; NaN hidden rows are ignored, so they are zeroed there.
    ref_leaves = [t.detach().to(torch.float64).nan_to_num(0.0).requires_grad_(True) for t in leaves]
    expected = _fused_oracle(ref_leaves[0], ref_leaves[1], ref_leaves[2] if with_bias else None, labels,
                             epsilon=epsilon, alpha=alpha, convention=convention, scale=scale, cap=cap, z_loss=z_loss,
                             weights=weights, reduction=reduction)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), ref_leaves)
    # float64: rounding only; float32: 1e-5; bf16: the projection runs in bf16 (tests/test_fused.py's tolerances).
    tolerances = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 3e-2)}
    loss_tol, grad_tol = tolerances[dtype]
    assert _rel(loss, expected) < loss_tol
    for got, want in zip(grads, expected_grads):
        assert torch.isfinite(got.float()).all() and got.dtype == dtype
        assert _rel(got, want) < grad_tol
    assert bool((grads[0][labels == IGNORE] == 0).all())


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="starts its own interpreter child")
def test_existing_oracle_tables_with_the_kernel_forced_on():
    """tests/test_fused.py's and tests/test_family.py's oracle tables (fused path) in a child pytest with the kernel
    forced on in the interpreter (test modules do not import each other, so by node selection)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", tk.ENV: "1", "OMP_NUM_THREADS": "1"}
    tests = Path(__file__).parent
    selection = (
        "test_matches_unfused or test_low_precision or masked_vocabulary or all_ignored or components_equal or "
        "non_contiguous or fp16_gradients or grad_output_scales or materialized_and_fused or zero_weight or "
        "weighted_components"
    )
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "test_fused.py"),
               str(tests / "test_family.py"), "-k", selection]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert int(summary.split(" passed")[0].split()[-1]) >= 150, summary
