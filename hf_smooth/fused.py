"""The fused path: output projection + label smoothing / MaxSup, chunk by chunk, never holding all N x V logits.

For hidden states ``h (N, H)``, an output weight ``W (V, H)`` and optional bias ``b (V,)``, the logits a model feeds to
its loss are

    z = softcap(scale * (h @ W.T + b)),      softcap(s) = cap * tanh(s / cap)

(``scale``: Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``; ``cap``: Gemma 2's ``final_logit_softcapping``;
both optional). The loss of `hf_smooth.losses` needs four vocabulary reductions per token (logsumexp, ``z_y``,
``z_max``, ``mean z``) and has a closed-form ``d loss / d z``, so the rows can be processed a chunk at a time: project
the chunk, reduce it (`losses.chunk_forward`), turn it into its logit gradient (`losses.chunk_logit_grad`), chain
through the soft-cap and scale, and multiply into the gradients of ``h``, ``W`` and ``b``. Only one ``(rows, V)``
chunk exists at a time; ignored tokens are skipped before the projection (they cost nothing and their hidden states
may hold anything).

When the gradients are computed (design choice; see `_FusedLinearSmoothedLoss`):

- ``reduction="mean"`` / ``"sum"`` (training): during the forward. The output gradient is one scalar times a factor
  known at forward time (``1 / num_items_in_batch``), and gradients are linear in it, so the forward computes them at
  ``grad_output = 1`` and the backward only multiplies. Three GEMMs per chunk (logits, ``dh``, ``dW``) instead of
  four: the chunk's logits are never computed twice.
- ``reduction="none"``: recomputed in the backward. ``grad_output`` differs per token and ``dW`` sums over tokens, so
  it cannot be factored out; the forward keeps four numbers per token (`losses.RowStats`) and the backward projects
  each chunk again. Also used for float16 inputs: fp16 training multiplies ``grad_output`` by a loss scale of up to
  2**16 *because* unscaled gradients underflow in fp16, so they must not be formed before that factor is known.
- No gradient work at all unless ``torch.is_grad_enabled()`` and one of ``h``, ``W``, ``b`` requires grad.

Precision: the projection runs in the input dtype, then the chunk is upcast and everything after it (scale, soft-cap,
reductions, logit gradient) is float32 (float64 for float64 inputs), like the unfused loss. bf16 GEMMs accumulate in
fp32 internally; their bf16 logits are what the model's own ``lm_head`` produces, and the loss and gradients stay
as close to the float32 answer as the unfused path on those logits (tests/test_fused.py tolerance table; measured:
about 1% of the largest gradient entry, at most 0.2% of the loss). The alternative, upcasting the inputs, needs an fp32 copy of the
whole weight (per chunk, or once at twice the bf16 weight's memory) and fp32 GEMMs: measured 1.9x slower on a CPU
with AVX512-BF16 (N=2048, H=1024, V=32000: 3.45 s vs 1.80 s forward+backward), and tensor-core GPUs favour bf16 more.
``dW`` and ``db`` are accumulated in float32 over the chunks (``dW`` from the float32 logit gradient and the chunk of
``h`` upcast, a small copy) and cast to the weight dtype once at the end; ``dh`` is one GEMM per chunk in the weight
dtype.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import triton_kernels
from .methods import get_method
from .losses import (
    Coefficients,
    LossComponents,
    RowStats,
    check_inputs,
    check_options,
    prepare_call,
    read_call_facts,
    refuse_double_backward,
    chunk_forward,
    chunk_logit_grad,
    compute_dtype,
    smoothed_cross_entropy,
)

__all__ = [
    "LogitTransform",
    "OutputHead",
    "default_chunk_size",
    "fused_linear_smoothed_loss",
    "fused_linear_smoothed_loss_for_module",
    "output_layer_weights",
]


# Chunk rule (`default_chunk_size`). Memory: besides the float32 dW it must return anyway, the loss holds one float32
# (rows x V) chunk (plus one small block, `_Workspace`); a chunk about as large as the hidden input (rows ~ N * H / V)
# keeps that in proportion with the activations it is given. Clamped to 2**23 .. 2**25 elements (32 .. 128 MiB of
# float32): below, the per-chunk overhead (three GEMM calls, the dW read-modify-write) grows; above, memory is spent
# for no speed. Speed: GEMMs with few rows run below peak, so a per-device floor in rows; the CPU floor of 256 rows
# was chosen by measurement (benchmarks/RESULTS.md, "Chunk rule") as the point past which larger chunks buy little
# speed and cost peak memory.
_MIN_ROWS = {"cpu": 256}
_DEFAULT_MIN_ROWS = 128  # CUDA and others: tensor-core GEMMs reach most of their speed at 128 rows
_CHUNK_ELEMENTS = (1 << 23, 1 << 25)
# Elementwise blocks inside a chunk (`_Workspace`): 2**21 float32 elements (8 MiB) on CPU, so a block and its
# temporary stay in a 32 MiB L3 cache; elsewhere the whole chunk at once (GPU kernels prefer fewer, larger launches).
_BLOCK_ELEMENTS = {"cpu": 1 << 21}


def _block_rows(rows: int, vocab_size: int, device: torch.device) -> int:
    elements = _BLOCK_ELEMENTS.get(device.type)
    return rows if elements is None else max(1, elements // max(1, vocab_size))


def default_chunk_size(num_rows: int, hidden_size: int, vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk when ``chunk_size=None``.

    ``rows = clamp(N * H, 2**23, 2**25) / V``: a float32 logit chunk as large as the hidden input, but between 32 and
    128 MiB; then at least 256 rows on CPU (128 elsewhere) so the GEMMs run near full speed, and at most ``N``.

    With ``N = 4096, H = 1024`` (hidden input of 2**22 elements): ``V = 32000`` gives 262 rows (32 MiB chunks),
    ``V = 128256`` gives the floor, 256 rows on CPU (125 MiB) and 128 on GPU; ``V = 256`` gives all 4096 rows.
    """
    device_type = torch.device(device).type
    floor = _MIN_ROWS.get(device_type, _DEFAULT_MIN_ROWS)
    low, high = _CHUNK_ELEMENTS
    elements = min(max(num_rows * hidden_size, low), high)
    rows = max(elements // max(1, vocab_size), floor)
    return max(1, min(rows, num_rows))


# --------------------------------------------------------------------------------------------------------------------
# Between the hidden state and the loss
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to ``h @ W.T + b`` before its loss: ``z = softcap(scale * s)``, ``softcap(s) =
    cap * tanh(s / cap)``, and its derivative. The one place this post-processing is written."""

    scale: float = 1.0
    cap: float | None = None

    @classmethod
    def from_knobs(cls, logit_scale: float | None = None, final_logit_softcapping: float | None = None):
        """From the keyword arguments of the fused loss, validated."""
        scale = 1.0 if logit_scale is None else float(logit_scale)
        if not math.isfinite(scale):
            raise ValueError(f"logit_scale must be a finite number, got {logit_scale}.")
        cap = None
        if final_logit_softcapping is not None:
            cap = float(final_logit_softcapping)
            if not (math.isfinite(cap) and cap > 0):
                raise ValueError(
                    f"final_logit_softcapping must be a positive number or None, got {final_logit_softcapping}."
                )
        return cls(scale=scale, cap=cap)

    @classmethod
    def from_config(cls, config):
        """The post-processing of known architectures: Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``,
        Gemma 2's ``final_logit_softcapping``."""
        scale = getattr(config, "logit_scale", None)
        granite = getattr(config, "logits_scaling", None)
        if granite:
            scale = (scale or 1.0) / float(granite)
        return cls.from_knobs(scale, getattr(config, "final_logit_softcapping", None))

    def apply(self, s: torch.Tensor) -> torch.Tensor:
        """``z`` from ``s = h @ W.T + b``, out of place (differentiable)."""
        z = s * self.scale if self.scale != 1.0 else s
        return self.cap * torch.tanh(z / self.cap) if self.cap is not None else z

    def transform_(self, z: torch.Tensor) -> torch.Tensor:
        """`apply`, in place on one chunk."""
        if self.cap is not None:
            z.mul_(self.scale / self.cap).tanh_().mul_(self.cap)
        elif self.scale != 1.0:
            z.mul_(self.scale)
        return z

    def chain_into_(self, z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``d loss / d (h @ W.T + b)`` from ``grad = d loss / d z``, written into ``z``. The ``scale`` factor is
        folded into the row scale given to `chunk_logit_grad` (it is constant per row); the soft-cap's derivative is
        ``1 - tanh^2`` with ``tanh = z / cap``. Without a soft-cap ``grad`` already is ``z`` (computed in place)."""
        if self.cap is None:
            return grad
        return z.div_(self.cap).square_().neg_().add_(1.0).mul_(grad)


class _Workspace:
    """The buffers of one call, allocated once and reused by every chunk.

    ``z`` (chunk rows x V, compute dtype) holds the logits, then in place their gradient, which feeds the ``dh`` and
    ``dW`` GEMMs. The elementwise work (`chunk_forward`, `chunk_logit_grad`, the soft-cap's chain rule) runs over
    blocks of ``block_rows`` rows of it, with ``work`` (block rows x V) as the one temporary. So the chunk can be large
    (efficient GEMMs) while the temporaries stay small, and on CPU each block (8 MiB) stays in the cache across the
    ~8 elementwise passes made over it. ``low`` (bf16/fp16 inputs only, chunk rows x V) receives the GEMM output and
    later the gradient cast for the ``dh`` GEMM. Peak: one float32 chunk plus one block (plus half a chunk for
    bf16/fp16). Reusing the buffers matters on CPU: a fresh 100 MiB tensor per chunk is a fresh ``mmap``, and faulting
    its pages in made the whole step about 12% slower (V=128256).

    With the Triton kernel (`hf_smooth.triton_kernels`: CUDA, Triton installed, coefficients it covers) the whole
    chunk is one block: `logits` leaves the raw GEMM output (in ``low`` for bf16/fp16), the kernel reads it, applies
    the scale and soft-cap on the fly and writes the gradient into ``z``, in one launch; no ``work`` temporary.
    """

    def __init__(self, rows: int, block_rows: int, vocab_size: int, cdtype, dtype, device, coefs=None):
        self.kernel = coefs is not None and triton_kernels.kernel_enabled(device) and triton_kernels.covers(coefs)
        self.block_rows = rows if self.kernel else max(1, min(block_rows, rows))
        self.z = torch.empty(rows, vocab_size, dtype=cdtype, device=device)
        self.work = None if self.kernel else torch.empty(self.block_rows, vocab_size, dtype=cdtype, device=device)
        self.low = None if dtype == cdtype else torch.empty(rows, vocab_size, dtype=dtype, device=device)

    def logits(self, x, weight, bias, head: LogitTransform) -> torch.Tensor:
        """``softcap(scale * (x @ W.T + b))`` in the compute dtype, in ``self.z``: one GEMM in the input dtype."""
        rows = x.shape[0]
        z = self.z[:rows]
        out = z if self.low is None else self.low[:rows]
        if bias is None:
            torch.mm(x, weight.t(), out=out)
        else:
            torch.addmm(bias, x, weight.t(), out=out)
        if self.kernel:
            return out  # the kernel upcasts, scales and soft-caps as it reads
        if self.low is not None:
            z.copy_(out)
        return head.transform_(z)

    def blocks(self, rows: int):
        """Row slices of the current chunk, ``block_rows`` at a time."""
        return _chunks(rows, self.block_rows)

    def forward(self, z, target, coefs, head: LogitTransform, row_scale=None):
        """`chunk_forward` on one block of logits (``work`` its temporary); with ``row_scale``, then `logit_grad_`.
        The one dispatch point to the Triton kernel in the forward: there both are one launch."""
        n = z.shape[0]
        if self.kernel:
            grad_out = None if row_scale is None else self.z[:n]
            return triton_kernels.chunk_forward(z, target, coefs, head, grad_out=grad_out, row_scale=row_scale)
        result = chunk_forward(z, target, z.new_ones(n, dtype=torch.bool), coefs, workspace=self.work[:n])
        if row_scale is not None:
            self.logit_grad_(z, target, result[0], coefs, head, row_scale)
        return result

    def logit_grad_(self, z, target, stats, coefs, head: LogitTransform, row_scale) -> None:
        """Overwrite one block of logits with ``d loss / d (x @ W.T + b)`` (into ``z`` of this workspace)."""
        if self.kernel:
            triton_kernels.chunk_logit_grad_(z, target, stats, coefs, head, row_scale, out=self.z[: z.shape[0]])
            return
        out = z if head.cap is None else self.work[: z.shape[0]]
        head.chain_into_(z, chunk_logit_grad(z, target, stats, coefs, row_scale, out=out))

    def accumulate(self, grad, x, positions, weight, grads, needs) -> None:
        """Add one chunk's gradient to ``grads = [dh, dW, db]`` (``dh`` rows written, the others summed)."""
        grad_hidden, grad_weight, grad_bias = grads
        grad = self.z[: grad.shape[0]]  # the same buffer, unless the kernel read the raw GEMM output from `low`
        if needs[0]:
            low = grad if self.low is None else self.low[: grad.shape[0]].copy_(grad)
            # (W.T @ g.T).T rather than g @ W: the same product, measured ~10-25% faster with MKL for these shapes
            # (few rows, long vocabulary reduction). Rows are distinct tokens: written, not summed.
            grad_hidden.index_copy_(0, positions, torch.mm(weight.t(), low.t()).t())
        if needs[1]:
            grad_weight.addmm_(grad.t(), x.to(grad.dtype))  # float32 accumulation (x upcast: a small copy)
        if needs[2]:
            grad_bias.add_(grad.sum(dim=0))


# --------------------------------------------------------------------------------------------------------------------
# Autograd function
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    coefs: Coefficients
    head: LogitTransform
    ignore_index: int
    reduction: str
    num_items_in_batch: object
    labels: torch.Tensor  # as given, for the error message of an out-of-range label
    rows: int  # chunk size in rows
    block_rows: int  # rows per elementwise block inside a chunk
    needs: tuple[bool, bool, bool]  # grads wanted for (hidden, weight, bias)
    grad_in_forward: bool


def _chunks(num: int, rows: int):
    for start in range(0, num, rows):
        yield slice(start, min(start + rows, num))


def _zero_grads(hidden, weight, cdtype, needs):
    """``[dh, dW, db]`` accumulators: ``dh`` in the input dtype (each row written once), ``dW`` and ``db`` float32."""
    return [
        torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if needs[0] else None,
        torch.zeros(weight.shape, dtype=cdtype, device=weight.device) if needs[1] else None,
        torch.zeros(weight.shape[0], dtype=cdtype, device=weight.device) if needs[2] else None,
    ]


class _FusedLinearSmoothedLoss(torch.autograd.Function):
    """Loss of ``z = softcap(scale * (hidden @ weight.T + bias))`` against ``labels``, chunk by chunk.

    Gradients in the forward for ``mean``/``sum`` (three GEMMs per chunk, the backward only scales them by
    ``grad_output``), recomputed in the backward for ``none`` and float16 (four GEMMs per chunk); module docstring.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, weights, plan: _Plan):
        num_rows = hidden.shape[0]
        cdtype = compute_dtype(hidden.dtype)
        device = hidden.device
        head = plan.head

        valid = labels != plan.ignore_index
        if weights is not None:
            weights = weights.to(cdtype)
            valid = valid & (weights != 0)  # weight 0 == ignored: never projected
        # The call's one host read (#12): counts, label/weight checks, the denominator, and whether a -inf logit is
        # possible at all (a non-finite input; a float16 GEMM can overflow), which decides the -inf handling.
        facts = read_call_facts(
            plan.labels, labels, valid, weights, num_classes=weight.shape[0], ignore_index=plan.ignore_index,
            reduction=plan.reduction, num_items_in_batch=plan.num_items_in_batch,
            neginf=_may_hold_neginf(hidden, weight, bias, valid, head),
        )
        coefs = plan.coefs.on(device, cdtype, neginf=facts.neginf)
        # Scored rows only: ignored ones are never projected. Sized from the host read, so no second sync.
        positions = torch.nonzero_static(valid, size=facts.num_valid).squeeze(-1)
        target = labels.index_select(0, positions)
        row_weights = None if weights is None else weights.index_select(0, positions)
        num_scored = facts.num_valid
        denominator = facts.denominator

        row_loss = torch.zeros(num_scored, dtype=cdtype, device=device)
        parts = torch.zeros(7, num_scored, dtype=cdtype, device=device)
        keep_stats = any(plan.needs) and not plan.grad_in_forward
        if keep_stats:
            lse = torch.zeros(num_scored, dtype=cdtype, device=device)
            argmax = torch.zeros(num_scored, dtype=torch.long, device=device)
            k = torch.ones(num_scored, dtype=cdtype, device=device)
            has_neginf = torch.zeros(num_scored, dtype=torch.bool, device=device)
        grads = [None, None, None]
        if plan.grad_in_forward:
            grads = _zero_grads(hidden, weight, cdtype, plan.needs)
            # grad_output = 1 here; d loss / d row is 1 / denominator (mean) or 1 (sum), times the logit scale.
            factor = head.scale / denominator if denominator is not None else head.scale
        ws = _Workspace(min(plan.rows, num_scored), plan.block_rows, weight.shape[0], cdtype, hidden.dtype, device,
                        coefs)
        for rows in _chunks(num_scored, plan.rows):
            x = hidden.index_select(0, positions[rows])
            z = ws.logits(x, weight, bias, head)
            for block in ws.blocks(z.shape[0]):
                zb = z[block]
                at = slice(rows.start + block.start, rows.start + block.stop)  # the block's scored rows
                row_scale = None
                if plan.grad_in_forward:
                    row_scale = torch.full((zb.shape[0],), factor, dtype=cdtype, device=device)
                    if row_weights is not None:
                        row_scale = row_scale * row_weights[at]
                # The gradient too when row_scale is given (one kernel launch on CUDA).
                stats, loss_rows, part_rows = ws.forward(zb, target[at], coefs, head, row_scale)
                part_rows = torch.stack(part_rows)
                if row_weights is not None:
                    loss_rows, part_rows = loss_rows * row_weights[at], part_rows * row_weights[at]
                row_loss[at] = loss_rows
                parts[:, at] = part_rows
                if keep_stats:
                    lse[at], argmax[at], k[at], has_neginf[at] = stats.lse, stats.argmax, stats.k, stats.has_neginf
            if plan.grad_in_forward:
                ws.accumulate(z, x, positions[rows], weight, grads, plan.needs)
        del ws

        weight_sum = valid.sum().to(cdtype) if row_weights is None else row_weights.sum()
        sums = torch.cat([valid.sum().to(cdtype).reshape(1), row_loss.sum().reshape(1), parts.sum(dim=1),
                          weight_sum.reshape(1)])
        if plan.reduction == "none":
            out = torch.zeros(num_rows, dtype=cdtype, device=device).index_copy_(0, positions, row_loss)
        elif plan.reduction == "sum":
            out = row_loss.sum()
        else:
            out = (row_loss.sum(dtype=torch.float64) / denominator).to(cdtype)

        ctx.plan, ctx.denominator, ctx.coefs = plan, denominator, coefs
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if plan.grad_in_forward:
            ctx.save_for_backward(*grads)
        elif keep_stats:
            ctx.save_for_backward(hidden, weight, bias, positions, target, row_weights, lse, argmax, k, has_neginf)
        ctx.mark_non_differentiable(sums)
        return out, sums

    @staticmethod
    def backward(ctx, grad_out, _grad_sums):
        refuse_double_backward("fused_linear_smoothed_loss")
        if ctx.plan.grad_in_forward:
            # Saved with save_for_backward, so autograd drops our reference right after this call (unless the graph
            # is retained) and AccumulateGrad adopts the float32 dW as weight.grad without a copy. Never modified in
            # place: a retained graph hands them out again.
            grads, scale = ctx.saved_tensors, None if bool(grad_out == 1) else grad_out
        else:
            grads, scale = _recompute_grads(ctx, grad_out), None
        out = []
        for grad, dtype in zip(grads, ctx.dtypes):
            if grad is not None and grad.dtype != dtype:
                grad = grad.to(dtype)  # a new tensor: scaled in place below
                grad = grad if scale is None else grad.mul_(scale)
            elif grad is not None and scale is not None:
                grad = grad * scale
            out.append(grad)
        return (*out, None, None, None)


def _may_hold_neginf(hidden, weight, bias, valid, head: LogitTransform) -> torch.Tensor | bool:
    """Whether a scored row's logits may hold ``-inf`` (a device bool, read with the call's one host read): only from
    a non-finite input (a ``-inf`` bias masks a column) or a float16 GEMM overflowing. A soft-cap bounds the logits.
    A float32/bf16 GEMM of finite inputs overflowing past 3.4e38 is not guarded: its logits are garbage anyway."""
    if head.cap is not None:
        return False
    if hidden.dtype == torch.float16:
        return True
    rows = (~torch.isfinite(hidden.amax(dim=-1)) | ~torch.isfinite(hidden.amin(dim=-1))) & valid
    flags = [rows.any(), ~torch.isfinite(weight.amax()), ~torch.isfinite(weight.amin())]
    if bias is not None:
        flags += [~torch.isfinite(bias.amax()), ~torch.isfinite(bias.amin())]
    return torch.stack(flags).any()


def _recompute_grads(ctx, grad_out):
    """The backward of ``reduction="none"`` and float16: project each chunk again, with the real ``grad_output``."""
    hidden, weight, bias, positions, target, row_weights, lse, argmax, k, has_neginf = ctx.saved_tensors
    plan = ctx.plan
    cdtype = lse.dtype
    grad_out = grad_out.to(cdtype)
    if plan.reduction == "none":
        scale = grad_out.index_select(0, positions)
    elif plan.reduction == "sum":
        scale = grad_out.expand(positions.shape[0])
    else:
        scale = (grad_out / ctx.denominator).expand(positions.shape[0])
    scale = scale * plan.head.scale
    if row_weights is not None:
        scale = scale * row_weights

    grads = _zero_grads(hidden, weight, cdtype, plan.needs)
    num_scored = positions.shape[0]
    ws = _Workspace(min(plan.rows, num_scored), plan.block_rows, weight.shape[0], cdtype, hidden.dtype, hidden.device,
                    ctx.coefs)
    for rows in _chunks(num_scored, plan.rows):
        x = hidden.index_select(0, positions[rows])
        z = ws.logits(x, weight, bias, plan.head)
        for block in ws.blocks(z.shape[0]):
            at = slice(rows.start + block.start, rows.start + block.stop)
            stats = RowStats(lse[at], argmax[at], k[at], has_neginf[at])
            ws.logit_grad_(z[block], target[at], stats, ctx.coefs, plan.head, scale[at])
        ws.accumulate(z, x, positions[rows], weight, grads, plan.needs)
    return grads


# --------------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------------


def _resolve_knobs(method, epsilon, alpha) -> tuple[float, float]:
    """``(epsilon, alpha)`` from ``method`` and the knobs; ``method=None`` takes the knobs as given (both allowed)."""
    if method is None:
        return (0.0 if epsilon is None else epsilon), (0.0 if alpha is None else alpha)
    row = get_method(method)
    given = {"epsilon": epsilon, "alpha": alpha}
    for knob, value in given.items():
        if knob != row.knob and value not in (None, 0, 0.0):
            takes = f"takes {row.knob}" if row.knob else "is plain cross-entropy"
            raise ValueError(f"method={method!r} {takes}, not {knob}={value}; use method=None to pass both.")
    knobs = row.knobs(row.default if row.knob is None or given[row.knob] is None else given[row.knob])
    return knobs["epsilon"], knobs["alpha"]


def _check_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not torch.is_tensor(weight) or weight.dim() != 2:
        shape = tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D (vocab_size, hidden_size) tensor, got {shape}.")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"Shape mismatch: weight {tuple(weight.shape)} is (vocab_size, hidden_size) for hidden_size "
            f"{weight.shape[1]}, but hidden {tuple(hidden.shape)} has hidden_size {hidden.shape[-1]}. Pass the output "
            "layer's weight as stored by nn.Linear (out_features x in_features)."
        )
    if weight.shape[0] < 1:
        raise ValueError(f"weight has an empty vocabulary dimension: shape {tuple(weight.shape)}.")
    if bias is not None and (not torch.is_tensor(bias) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(
            f"bias must have shape (vocab_size,) = ({weight.shape[0]},), got {tuple(getattr(bias, 'shape', ()))}."
        )
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) > 1:
        raise TypeError(
            f"hidden ({hidden.dtype}), weight ({weight.dtype}) and bias ({None if bias is None else bias.dtype}) must "
            "share one dtype, as for nn.functional.linear (under torch.autocast they are cast for you)."
        )


def fused_linear_smoothed_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    method: str | None = None,
    epsilon: float | None = None,
    alpha: float | None = None,
    convention: str = "uniform",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    logit_scale: float | None = None,
    final_logit_softcapping: float | None = None,
    return_components: bool = False,
    z_loss: float = 0.0,
    weights: torch.Tensor | None = None,
    num_classes: int | None = None,
    exclude_ids=None,
):
    """`smoothed_cross_entropy` of ``softcap(logit_scale * (hidden @ weight.T + bias))``, without the logits.

    Same values, gradients (for `hidden`, `weight` and `bias`), reductions, errors and [`LossComponents`] as
    ``smoothed_cross_entropy(logits, labels, ...)`` on the materialized logits, but only one chunk of rows is projected
    to the vocabulary at a time, in the forward and in the backward. Ignored tokens are not projected at all.

    Args:
        hidden (`torch.Tensor` of shape `(..., H)`):
            Final hidden states, aligned with `labels` (shift causal LMs first: `hidden[..., :-1, :]` against
            `labels[..., 1:]`).
        weight (`torch.Tensor` of shape `(V, H)`):
            Output layer weight, as stored by `nn.Linear` (`lm_head.weight`), same dtype as `hidden`.
        labels (`torch.Tensor` of shape `(...)`):
            Class indices in `[0, V)`, or `ignore_index`.
        bias (`torch.Tensor` of shape `(V,)`, *optional*):
            Output layer bias.
        method (`str`, *optional*):
            `"label_smoothing"` (`epsilon` defaults to 0.1), `"maxsup"` (`alpha` defaults to 0.1) or `"none"` (plain
            cross-entropy). `None` (default) takes `epsilon` and `alpha` as given, both defaulting to 0, as
            `smoothed_cross_entropy` does (both may be set together).
        epsilon (`float`, *optional*):
            Label-smoothing mass in [0, 1]; its meaning depends on `convention`.
        alpha (`float`, *optional*):
            MaxSup weight, >= 0.
        convention (`str`, *optional*, defaults to `"uniform"`):
            `"uniform"` (PyTorch, transformers: `eps / V` on every class) or `"fairseq"` (`eps / (V - 1)` on the
            others).
        ignore_index (`int`, *optional*, defaults to -100):
            Label value of positions that contribute nothing (zero loss, zero gradient, never projected).
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"` (sum divided by `num_items_in_batch` when given, else by the scored-token count), `"sum"` or
            `"none"` (per token, shape of `labels`, 0 at ignored positions).
        num_items_in_batch (`int` or `torch.Tensor`, *optional*):
            Global token count a `"mean"` divides by (the Trainer's count over accumulation steps and ranks).
        chunk_size (`int`, *optional*):
            Scored rows projected at once. Default: [`default_chunk_size`] (a float32 logit chunk about the size of
            `hidden`, clamped to 32-128 MiB, and at least 256 rows on CPU / 128 on GPU for GEMM efficiency).
        logit_scale (`float`, *optional*):
            Multiplies the logits before the soft-cap (Cohere's `logit_scale`; Granite's `1 / logits_scaling`).
        final_logit_softcapping (`float`, *optional*):
            `cap * tanh(logits / cap)` after the scale (Gemma 2's `final_logit_softcapping`).
        return_components (`bool`, *optional*, defaults to `False`):
            Also return a [`LossComponents`] of detached sums for logging (NLL, regularizer, accuracy, ...).
        z_loss (`float`, *optional*, defaults to 0.0), weights (`torch.Tensor`, *optional*), num_classes (`int`,
        *optional*), exclude_ids (sequence of `int`, *optional*):
            z-loss, per-token loss weights and the smoothing classes, as in [`smoothed_cross_entropy`]. Zero-weight
            tokens are not projected, like ignored ones.

    Returns:
        `torch.Tensor` (float32, or float64 for float64 inputs), or `(loss, LossComponents)`.
    """
    epsilon, alpha = _resolve_knobs(method, epsilon, alpha)
    check_options(epsilon=epsilon, alpha=alpha, convention=convention, reduction=reduction, z_loss=z_loss)
    check_inputs(hidden, labels, ignore_index, name="hidden", last="hidden_size")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and torch.is_tensor(weight):
        # What nn.Linear does under autocast: the projection runs in the autocast dtype (differentiable casts, so
        # float32 master weights receive float32 gradients). Before the dtype check, which then compares like with like.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if torch.is_tensor(bias) else bias
    _check_linear(hidden, weight, bias)
    vocab_size, hidden_size = weight.shape
    coefs, flat_labels, flat_weights = prepare_call(
        hidden, labels, epsilon=epsilon, alpha=alpha, convention=convention, ignore_index=ignore_index,
        reduction=reduction, z_loss=z_loss, weights=weights, num_classes=num_classes, exclude_ids=exclude_ids,
        chunk_size=chunk_size, name="hidden", last="hidden_size", vocab_size=vocab_size,
    )
    head = LogitTransform.from_knobs(logit_scale, final_logit_softcapping)

    flat_hidden = hidden.reshape(-1, hidden_size)
    num_rows = flat_hidden.shape[0]
    grad_enabled = torch.is_grad_enabled()
    needs = tuple(bool(grad_enabled and t is not None and t.requires_grad) for t in (hidden, weight, bias))
    rows = int(chunk_size) if chunk_size else default_chunk_size(num_rows, hidden_size, vocab_size, hidden.device)
    plan = _Plan(
        coefs=coefs,
        head=head,
        ignore_index=ignore_index,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        labels=labels,
        rows=rows,
        block_rows=_block_rows(rows, vocab_size, hidden.device),
        needs=needs,
        grad_in_forward=any(needs) and reduction != "none" and hidden.dtype != torch.float16,
    )
    with torch.autocast(device_type, enabled=False):
        out, sums = _FusedLinearSmoothedLoss.apply(flat_hidden, weight, bias, flat_labels, flat_weights, plan)
    if reduction == "none":
        out = out.reshape(labels.shape)
    if return_components:
        return out, LossComponents.from_vector(sums.detach().float())
    return out


# --------------------------------------------------------------------------------------------------------------------
# From an output module (nn.Linear, peft LoRA Linear)
# --------------------------------------------------------------------------------------------------------------------


def _plain_linear_reason(module: nn.Module, what: str) -> str | None:
    """Why ``module(x)`` may not be ``F.linear(x, module.weight, module.bias)``, or None when it is."""
    if not isinstance(module, nn.Linear):
        return f"{what} is a {type(module).__name__}, not an nn.Linear"
    if type(module).forward is not nn.Linear.forward or "forward" in vars(module):
        # Quantized layers (bitsandbytes Linear4bit, ...) subclass nn.Linear with their own forward; accelerate's
        # offloading hooks replace forward on the instance.
        return f"{what} ({type(module).__name__}) overrides nn.Linear.forward"
    hooks = (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
    if any(not _is_sharding_hook(hook) for hook in hooks):
        return f"{what} has forward hooks that the fused loss would bypass"
    if any(type(p).__name__ == "DTensor" for p in (module.weight, module.bias) if p is not None):
        return (
            f"{what}'s parameters are sharded DTensors (FSDP2) here, outside the forward that gathers them; "
            "call the fused loss where they are unsharded (hf_smooth's trainer does)"
        )
    return None


# FSDP2 (`fully_shard`) hooks the modules it shards to all-gather their parameters before the forward (cast to its
# mixed-precision param dtype) and free them after it. The fused loss reads the weight while it is gathered
# (`hf_smooth.fused_trainer`), in that dtype, and its gradient reaches FSDP2's reduce-scatter through autograd as the
# module's own would, so it does not bypass them.
_SHARDING_HOOK_MODULES = ("torch.distributed.fsdp.",)


def _is_sharding_hook(hook) -> bool:
    return getattr(getattr(hook, "func", hook), "__module__", "").startswith(_SHARDING_HOOK_MODULES)


def _lora_linear_class():
    try:
        from peft.tuners.lora import Linear
    except ImportError:  # peft is optional here: without it no module can be a LoRA layer
        return None
    return Linear


def _fold_lora(module) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    """``(W + sum_a scaling_a * B_a @ A_a, b + sum_a scaling_a * b_B_a)`` for the active adapters of a peft
    ``lora.Linear``, differentiable w.r.t. the adapters, or the reason it would not equal ``module(x)``."""
    base = module.base_layer
    reason = _plain_linear_reason(base, "its base layer")
    if reason is not None:
        return reason
    if getattr(module, "fan_in_fan_out", False):
        return "the LoRA layer is fan_in_fan_out (Conv1D-style weights)"
    if module.disable_adapters:
        if module.merged:
            return "adapters are disabled but merged (peft unmerges them inside forward)"
        return base.weight, base.bias
    if module.merged:  # the active adapters are already in base.weight
        return base.weight, base.bias
    weight, bias = base.weight, base.bias
    variants = getattr(module, "lora_variant", {})
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in variants or getattr(module, "use_dora", {}).get(name, False):
            return f"adapter {name!r} is a LoRA variant (DoRA or similar), which is not a weight delta"
        dropout = module.lora_dropout[name]
        if not isinstance(dropout, nn.Identity):
            if not isinstance(dropout, nn.Dropout):
                return f"adapter {name!r} has an unknown lora_dropout {type(dropout).__name__}"
            if dropout.training and dropout.p > 0:
                return (
                    f"adapter {name!r} has lora_dropout p={dropout.p} in training mode: the adapter sees a dropped-out "
                    "input that no single weight reproduces (use lora_dropout=0 or eval mode)"
                )
        lora_a, lora_b = module.lora_A[name], module.lora_B[name]
        for part, label in ((lora_a, "lora_A"), (lora_b, "lora_B")):
            reason = _plain_linear_reason(part, f"{label}[{name!r}]")
            if reason is not None:
                return reason
        if lora_a.bias is not None:
            return f"lora_A[{name!r}] has a bias"
        scaling = module.scaling[name]
        delta = (lora_b.weight @ lora_a.weight) * scaling
        # peft adds the adapter output (in the adapter dtype) to the base output, then casts to the base dtype.
        if delta.dtype == weight.dtype:
            weight = weight + delta
        else:
            weight = (weight.to(delta.dtype) + delta).to(weight.dtype)
        if lora_b.bias is not None:
            extra = (lora_b.bias * scaling).to(weight.dtype)
            bias = extra if bias is None else bias + extra
    return weight, bias


def output_layer_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    """``(weight, bias)`` such that ``module(x) == F.linear(x, weight, bias)`` (differentiable w.r.t. the module's
    trainable parameters), or a string saying why no such pair is known for this module."""
    lora_linear = _lora_linear_class()
    if lora_linear is not None and isinstance(module, lora_linear):
        return _fold_lora(module)
    reason = _plain_linear_reason(module, "the output layer")
    if reason is not None:
        return reason
    return module.weight, module.bias


class OutputHead:
    """A model's output layer as the loss sees it: the module (``nn.Linear`` or peft ``lora.Linear``) and the
    post-processing of its output (`LogitTransform`). Used alike by the fused loss, its fallback and the
    reconstruction check.

    - `linear`: ``(weight, bias)`` with ``module(x) == F.linear(x, weight, bias)`` (LoRA adapters folded in, so they
      train; Liger's fused path reads ``lm_head.weight`` only and leaves a LoRA ``lm_head`` untrained, TRL#4612), or
      the reason there is none (quantized or hooked layers, LoRA dropout in training, DoRA, ...).
    - `logits`: ``transform(module(hidden))``, materialized.
    - `loss`: the fused loss when `linear` exists, else a warning with the reason and the materialized path.
    - `check`: compare `logits` with logits the model produced itself.
    """

    def __init__(self, module: nn.Module, transform: LogitTransform | None = None):
        self.module = module
        self.transform = transform or LogitTransform()
        self.fallback_reason: str | None = None  # set by `loss`: why it used the materialized logits, or None

    def linear(self) -> tuple[torch.Tensor, torch.Tensor | None] | str:
        return output_layer_weights(self.module)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform.apply(self.module(hidden))

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, *, method=None, epsilon=None, alpha=None, **kwargs):
        """[`fused_linear_smoothed_loss`] of this head; keyword arguments as there (without bias, scale, cap)."""
        weights = self.linear()
        self.fallback_reason = weights if isinstance(weights, str) else None
        if isinstance(weights, str):
            warnings.warn(
                f"hf_smooth fused loss: {weights}; falling back to module(hidden) and smoothed_cross_entropy "
                "(the full logits are materialized).",
                stacklevel=3,
            )
            epsilon, alpha = _resolve_knobs(method, epsilon, alpha)
            return smoothed_cross_entropy(self.logits(hidden), labels, epsilon=epsilon, alpha=alpha, **kwargs)
        weight, bias = weights
        return fused_linear_smoothed_loss(
            hidden, weight, labels, bias=bias, method=method, epsilon=epsilon, alpha=alpha,
            logit_scale=self.transform.scale, final_logit_softcapping=self.transform.cap, **kwargs,
        )

    def check(self, model_logits: torch.Tensor, hidden: torch.Tensor) -> None:
        """Raise unless `logits(hidden)` equals `model_logits` (same positions), to the rounding of their dtype.

        Call it under the autocast state the model ran under, so both sides are computed in the same dtype.
        """
        with torch.no_grad():
            rebuilt = self.logits(hidden).float()
            reference = model_logits.float()
            error = (rebuilt - reference).abs().max().item()
            scale = reference.abs().max().item() + 1e-6
        relative = max(1e-3, 8 * torch.finfo(model_logits.dtype).eps)
        if not error <= relative * scale + 1e-4:
            raise ValueError(
                "smoothing_fused_loss: the model's logits are not output_layer(backbone hidden states) with the known "
                f"post-processing (max abs difference {error:.3g}, logits in {model_logits.dtype}). This architecture "
                "transforms its hidden states or logits in a way hf_smooth.fused does not reproduce; set "
                "smoothing_fused_loss=False."
            )


def fused_linear_smoothed_loss_for_module(
    hidden: torch.Tensor,
    module: nn.Module,
    labels: torch.Tensor,
    *,
    logit_scale: float | None = None,
    final_logit_softcapping: float | None = None,
    **kwargs,
):
    """[`fused_linear_smoothed_loss`] for an output module (`model.get_output_embeddings()`): `OutputHead.loss`.

    - `nn.Linear`: its `weight` and `bias`.
    - peft `lora.Linear`: the adapters folded into an effective weight `W + scaling * B @ A` (plus `scaling * b_B`
      with `lora_bias`), so the adapter trains. Valid only while `module(x)` equals that linear map: lora_dropout
      inactive (p = 0 or eval mode), no DoRA or other variant, plain `nn.Linear` base layer.
    - Anything else, or a LoRA layer outside those conditions: `warnings.warn` with the reason, then the unfused path
      `module(hidden)` (+ scale / soft-cap) and [`smoothed_cross_entropy`], which materializes the logits.

    Keyword arguments are those of [`fused_linear_smoothed_loss`] (except `bias`, taken from the module).
    """
    if "bias" in kwargs:
        raise TypeError("fused_linear_smoothed_loss_for_module takes the bias from the module; do not pass bias=.")
    head = OutputHead(module, LogitTransform.from_knobs(logit_scale, final_logit_softcapping))
    return head.loss(hidden, labels, **kwargs)
