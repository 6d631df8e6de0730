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
from hf_smooth.fused import LogitTransform  # noqa: E402
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
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m", marker,
               "-k", "not compiles_for and not in_a_subprocess and not kernel_enabled and not is_not_empty"]
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


def _fused_tables():
    import test_fused

    # By default one case per method (the table runs method x head x reduction), heads and reductions rotating.
    default = {m * 12 + (m % 4) * 3 + m % 3 for m in range(5)}
    table = [pytest.param(test_fused.test_matches_unfused_float32, case, id=f"float32-{case.id}",
                          marks=() if i in default else (pytest.mark.slow,))
             for i, case in enumerate(test_fused.TABLE)]
    table += [pytest.param(test_fused.test_low_precision_matches_float32_reference, case, id=f"low-{case.id}",
                           marks=() if i == 0 else (pytest.mark.slow,))
              for i, case in enumerate(test_fused.LOW_PRECISION)]
    return table


FUSED_TABLES = _fused_tables()


def test_fused_table_selection_is_not_empty():
    defaults = [p for p in FUSED_TABLES if not p.marks]
    assert len(FUSED_TABLES) == 68 and len(defaults) == 6
    assert {p.values[1].reduction for p in defaults} == {"mean", "sum", "none"}
    assert len({p.values[1].head for p in defaults}) == 4 and len({p.values[1].method for p in defaults}) == 5
    assert {p.values[1].dtype for p in defaults} == {torch.float32, torch.bfloat16}


@interpreted
@pytest.mark.parametrize(("test", "case"), FUSED_TABLES)
def test_fused_tables_with_the_kernel(test, case, launches):
    test(case)
    assert launches, "the kernel did not run"
    if case.reduction != "none" and case.dtype != torch.float16:
        assert not any(reduce is False for reduce in launches), "gradients in the forward: one launch per chunk"


@interpreted
@pytest.mark.slow  # ~12 s in the interpreter
def test_fused_masked_vocabulary_and_all_ignored_with_the_kernel(launches):
    import test_fused

    test_fused.test_masked_vocabulary_through_negative_infinite_bias()
    test_fused.test_non_contiguous_shifted_hidden_states()
    for reduction in ("mean", "sum", "none"):
        test_fused.test_all_ignored_chunk_and_garbage_hidden_states_there(reduction)
    assert launches


@interpreted
@pytest.mark.parametrize("reduction", ["mean", "none"])  # gradients formed in the forward / recomputed in backward
def test_fused_z_loss_and_weights_with_the_kernel(reduction, launches):
    """tests/test_family.py's float64 oracle for z-loss and per-token weights (float64 fused path, kernel forced on).
    Its smoothing-class cases run on the torch path (`tk.covers`), so they are not repeated here."""
    import test_family

    for knobs, family in [(test_family.METHODS[4], (1e-2, False, None)), (test_family.METHODS[3], (0.0, True, None))]:
        test_family.test_materialized_and_fused_match_the_float64_oracle(knobs, family, reduction)
    assert launches
