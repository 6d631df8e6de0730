"""A fused Triton kernel for the per-chunk elementwise work of the fused loss (`hf_smooth.fused`), used on CUDA.

The torch path (`losses.chunk_forward`, `losses.chunk_logit_grad`, `fused.LogitTransform`) makes about ten
elementwise passes over each ``(rows, V)`` chunk of logits: upcast, scale and soft-cap, max, ``exp`` and sum, the
finite-entry mean, then the softmax, the ``u / K`` spread, two scatters, the row scale and the soft-cap's chain rule.
Each pass reads and writes the whole chunk, so on a GPU this part is bound by memory bandwidth, not by the GEMMs.
This kernel does the same work in one launch per chunk, one program per row, reading the row twice (the approach of
Liger-Kernel's cross-entropy kernel, written here for the loss family of `hf_smooth.losses`):

1. One pass over the row, online (the running max rescales the running sums when it grows): ``z_max`` and its
   first index, ``sum exp(z - z_max)``, the sum and count of the entries that are not ``-inf`` (for ``mean z`` and
   ``K``), ``sum exp(z - z_max) * (z - z_max)`` (the predictive entropy), plus ``z_y`` (one load).
2. When a gradient is wanted, a second pass writes ``d loss / d s`` over the row, in place when ``src`` is ``dst``:
   ``(softmax(z) * (1 + 2 c lse) - u / K [not -inf] - a * onehot(y) + m * onehot(argmax)) * row_scale``, times the
   soft-cap's ``1 - (z / cap)^2``.

Here ``s`` is the raw ``h @ W.T + b`` (any float dtype: the bf16 GEMM output is read directly, without the float32
copy the torch path makes) and ``z = cap * tanh(scale * s / cap)`` is formed on the fly in both passes
(`fused.LogitTransform`); the logit ``scale`` itself is folded into ``row_scale`` by the caller, as for
`losses.chunk_logit_grad`. Arithmetic is float32 (float64 for float64 input). The per-row results become the loss
parts through `losses.row_parts`, the formulas `losses.chunk_forward` itself uses, so the loss maths stays in one
place; the rules of `hf_smooth.losses` hold: ``-inf`` entries are absent from ``K`` and the mean and get zero
gradient, ``-inf`` at the label gives ``+inf`` loss, NaN or ``+inf`` in a row gives a NaN loss, ignored rows (``label
== ignore_index``) are never read and get zero outputs and a zero gradient row. A row's ``argmax`` is the first
maximal entry, as ``torch.max``'s.

When it runs (`kernel_enabled`): on CUDA tensors when Triton imports (one info log when it does not: the torch path
runs). ``HF_SMOOTH_TRITON=0`` turns it off; ``HF_SMOOTH_TRITON=1`` forces it on for any device, which on CPU tensors
needs Triton's interpreter (``TRITON_INTERPRET=1``; that is how tests/test_triton_kernel.py checks it without a GPU).
It covers every option of the fused loss (LS both conventions, MaxSup, z-loss, per-token weights through the row
scale, logit scale and soft-cap) except smoothing classes (``num_classes`` / ``exclude_ids``): those calls run on the
torch path, with one info log (`covers`). The dispatch is ``fused._Workspace`` (`forward`, `logit_grad_`).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)

ENV = "HF_SMOOTH_TRITON"
# Entries of a row loaded at once: 8192 float32 (4096 float64) values, 32 KiB per program, as Liger's kernel uses.
_MAX_BLOCK = {torch.float32: 8192, torch.float64: 4096}
_NUM_REDUCTIONS = 6  # zmax, log_sum, zsum, k, z_y, entropy (the rows of `Reductions.values`)


@functools.lru_cache(maxsize=None)
def _triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    return triton


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _log_missing_triton() -> None:
    logger.info(
        "hf_smooth: Triton is not installed, so the fused loss runs its elementwise work with torch ops on CUDA "
        "(correct, but more passes over each chunk). `pip install hf-smooth[triton]` for the fused kernel."
    )


def kernel_enabled(device: torch.device) -> bool:
    """Whether the fused loss uses the Triton kernel for tensors on ``device`` (module docstring)."""
    setting = os.environ.get(ENV, "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"{ENV}={setting!r}: use 1 (force the Triton kernel on), 0 (off) or leave it unset (on CUDA).")
    if setting == "0":
        return False
    if setting == "1":
        if _triton() is None:
            raise ImportError(f"{ENV}=1 asks for the Triton kernel, but triton is not installed: pip install triton.")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"{ENV}=1 on {device.type} tensors: Triton runs there only in its interpreter. Set TRITON_INTERPRET=1 "
                f"(tests) or unset {ENV}."
            )
        return True
    if device.type != "cuda":
        return False
    if _triton() is None:
        _log_missing_triton()
        return False
    return True


# --------------------------------------------------------------------------------------------------------------------
# The kernel (built on first use: importing this module never imports triton)
# --------------------------------------------------------------------------------------------------------------------


def _kernel():
    from ._triton_rows import rows_kernel  # triton is imported here, on the first launch

    return rows_kernel


# --------------------------------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _coefficients(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The kernel's coefficients as a device tensor of the compute dtype (a float kernel argument would arrive as
    float32), made once per setting: a fresh tensor per launch would be a host-to-device copy per chunk (#12)."""
    return torch.tensor(values, dtype=dtype, device=device)


def _launch(src, labels, coefs, *, ignore_index, scale, cap, z_loss, reduce, dst=None, row_scale=None, stats=None):
    triton = _triton()
    num_rows, vocab_size = src.shape
    cdtype = torch.float64 if src.dtype == torch.float64 else torch.float32
    if src.stride(-1) != 1 or (dst is not None and dst.stride(-1) != 1):
        raise ValueError("the Triton kernel needs rows with contiguous vocabulary entries (stride 1).")
    device = src.device
    values = (float(coefs.epsilon), float(coefs.alpha), float(z_loss), float(scale), 1.0 if cap is None else float(cap))
    coef = _coefficients(values, cdtype, device)
    labels = labels.to(torch.int64)
    if reduce:
        red = torch.empty(_NUM_REDUCTIONS, num_rows, dtype=cdtype, device=device)
        argmax = torch.empty(num_rows, dtype=torch.int64, device=device)
        lse = k = red  # unused placeholders
    else:
        red = coef  # unused placeholder
        lse, argmax, k = stats
    grad = dst is not None
    if grad:
        row_scale = row_scale.to(cdtype).expand(num_rows).contiguous()
    else:
        dst, row_scale = src, coef  # unused placeholders
    if num_rows == 0:
        return (red, argmax) if reduce else None
    block = min(triton.next_power_of_2(vocab_size), _MAX_BLOCK[cdtype])
    _kernel()[(num_rows,)](
        src, src.stride(0), dst, dst.stride(0), labels, row_scale, coef, red, argmax, lse, k,
        num_rows, vocab_size, ignore_index,
        FAIRSEQ=coefs.fairseq and coefs.epsilon != 0.0, HAS_CAP=cap is not None, REDUCE=reduce, GRAD=grad,
        BLOCK=block, num_warps=max(1, min(16, block // 512)),
    )
    return (red, argmax) if reduce else None


def row_reductions(src, labels, coefs, *, ignore_index=-100, scale=1.0, cap=None, z_loss=0.0, grad_out=None,
                   row_scale=None):
    """One launch over ``src (rows, V)``: the per-row reductions, and with ``grad_out`` the logit gradient written
    there (module docstring; ``grad_out`` may be ``src`` itself when it has the compute dtype).

    Returns ``(values, argmax)``: ``values`` is ``(6, rows)`` in the compute dtype holding ``z_max`` (NaN when the row
    has a NaN), ``log sum exp(z - z_max)``, the sum and the count ``K`` of the entries that are not ``-inf``, ``z_y``
    and the entropy ``lse - sum_k p_k z_k``; ``argmax`` is int64. Ignored rows give ``K = V`` and zeros elsewhere.
    """
    if grad_out is not None and row_scale is None:
        raise ValueError("row_reductions: grad_out needs row_scale.")
    return _launch(src, labels, coefs, ignore_index=ignore_index, scale=scale, cap=cap, z_loss=z_loss, reduce=True,
                   dst=grad_out, row_scale=row_scale)


def logit_grad_(src, labels, lse, argmax, k, coefs, row_scale, *, out, ignore_index=-100, scale=1.0, cap=None,
                z_loss=0.0) -> torch.Tensor:
    """The gradient pass alone, from saved row statistics (``lse``, ``argmax``, ``K``), written into ``out``."""
    cdtype = out.dtype
    stats = (lse.to(cdtype).contiguous(), argmax.to(torch.int64).contiguous(), k.to(cdtype).contiguous())
    _launch(src, labels, coefs, ignore_index=ignore_index, scale=scale, cap=cap, z_loss=z_loss, reduce=False,
            dst=out, row_scale=row_scale, stats=stats)
    return out


# --------------------------------------------------------------------------------------------------------------------
# The fused path's per-chunk calls (the same results as losses.chunk_forward / chunk_logit_grad + LogitTransform)
# --------------------------------------------------------------------------------------------------------------------


def chunk_forward(src, target, coefs, head, *, grad_out=None, row_scale=None, ignore_index=-100):
    """`losses.chunk_forward` of ``head.apply(src)`` in one launch: ``(stats, row_loss, row_parts)``; with ``grad_out``
    also `losses.chunk_logit_grad` chained through the soft-cap (``d loss / d src``, times ``row_scale``) written
    there. ``coefs.z_loss`` is covered; smoothing classes (``coefs.classes``) are not (`covers`)."""
    from .losses import row_parts

    values, argmax = row_reductions(src, target, coefs, ignore_index=ignore_index, scale=head.scale, cap=head.cap,
                                    z_loss=coefs.z_loss, grad_out=grad_out, row_scale=row_scale)
    zmax, log_sum, zsum, k, z_y, entropy = values.unbind(0)
    return row_parts(zmax, argmax, log_sum, zsum, k, z_y, entropy, k < src.shape[-1], target, coefs)


def chunk_logit_grad_(src, target, stats, coefs, head, row_scale, *, out, ignore_index=-100):
    """`losses.chunk_logit_grad` chained through ``head`` (`fused.LogitTransform.chain_into_`), from saved stats."""
    return logit_grad_(src, target, stats.lse, stats.argmax, stats.k, coefs, row_scale, out=out,
                       ignore_index=ignore_index, scale=head.scale, cap=head.cap, z_loss=coefs.z_loss)


def covers(coefs) -> bool:
    """Whether the kernel computes these coefficients: everything but smoothing classes (``num_classes`` /
    ``exclude_ids``), which run on the torch path (one info log)."""
    if getattr(coefs, "classes", None) is None:
        return True
    _log_fallback("smoothing classes (num_classes / exclude_ids)")
    return False


@functools.lru_cache(maxsize=None)
def _log_fallback(option: str) -> None:
    logger.info("hf_smooth: the Triton kernel does not cover %s; the fused loss uses its torch path.", option)
