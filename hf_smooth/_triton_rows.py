"""The Triton kernel of `hf_smooth.triton_kernels` (imported only from there, on first use: importing it imports
triton, and ``triton.jit`` reads ``TRITON_INTERPRET`` at that moment). See that module's docstring for the maths."""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # From exp (the interpreter has no libdevice): exactly +-1 once exp underflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits(src, cols, mask, scale, cap, HAS_CAP: tl.constexpr):
    # z = softcap(scale * s) in the compute dtype (that of `scale`); lanes past the row end read -inf.
    z = tl.load(src + cols, mask=mask, other=0.0).to(scale.dtype) * scale
    if HAS_CAP:
        z = cap * _tanh(z / cap)
    return tl.where(mask, z, float("-inf"))


@triton.jit
def rows_kernel(
    src_ptr, src_stride, dst_ptr, dst_stride, label_ptr, row_scale_ptr, coef_ptr,
    red_ptr, argmax_ptr, lse_ptr, k_ptr, num_rows, V, ignore_index,
    FAIRSEQ: tl.constexpr, HAS_CAP: tl.constexpr, REDUCE: tl.constexpr, GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(label_ptr + row)
    src = src_ptr + row * src_stride
    dst = dst_ptr + row * dst_stride
    # Coefficients as a tensor of the compute dtype (a float argument would arrive as float32).
    epsilon = tl.load(coef_ptr)
    alpha = tl.load(coef_ptr + 1)
    z_loss = tl.load(coef_ptr + 2)
    scale = tl.load(coef_ptr + 3)
    cap = tl.load(coef_ptr + 4)
    cdt = scale.dtype
    neg_inf = float("-inf")

    if y == ignore_index:
        # Never read: the logits of an ignored row may hold anything. Zero outputs, zero gradient.
        if REDUCE:
            for i in tl.static_range(6):
                tl.store(red_ptr + i * num_rows + row, tl.where(i == 3, V, 0).to(cdt))  # K = V
            tl.store(argmax_ptr + row, 0)
        if GRAD:
            for off in range(0, V, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                tl.store(dst + cols, tl.full([BLOCK], 0.0, dst_ptr.dtype.element_ty), mask=cols < V)
        return

    if REDUCE:
        m = tl.full((), neg_inf, cdt)  # running max (NaN entries left out; `nan` counts them)
        s = tl.full((), 0.0, cdt)  # sum exp(z - m)
        t = tl.full((), 0.0, cdt)  # sum exp(z - m) * (z - m)
        zsum = tl.full((), 0.0, cdt)  # sum of the entries that are not -inf
        k = tl.full((), 0.0, cdt)  # their count
        nan = tl.full((), 0.0, cdt)
        amax = tl.full((), 0, tl.int64)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < V
            z = _logits(src, cols, mask, scale, cap, HAS_CAP)
            present = mask & (z != neg_inf)  # NaN counts as present, as in torch: it poisons the mean
            is_nan = z != z
            nan += tl.sum(is_nan.to(cdt), axis=0)
            zc = tl.where(is_nan, neg_inf, z)
            block_max = tl.max(zc, axis=0)
            block_arg = tl.argmax(zc, axis=0, tie_break_left=True)
            amax = tl.where(block_max > m, (off + block_arg).to(tl.int64), amax)  # strict: the first max wins
            m_new = tl.maximum(m, block_max)
            # Rescale the running sums to the new max. While every entry so far is -inf, s = t = 0 and there is
            # nothing to rescale; `ref` (the max, or 0 while it is -inf) keeps -inf - -inf (NaN) out of every branch.
            ref = tl.where(m_new == neg_inf, 0.0, m_new).to(cdt)
            r = tl.exp(m - ref)
            shift = tl.where(s == 0.0, 0.0, m - ref) * s
            e = tl.where(present, tl.exp(z - ref), 0.0).to(cdt)
            d = tl.where(present, z - ref, 0.0).to(cdt)
            t = r * (t + shift) + tl.sum(e * d, axis=0)
            s = s * r + tl.sum(e, axis=0)
            zsum += tl.sum(tl.where(present, z, 0.0).to(cdt), axis=0)
            k += tl.sum(present.to(cdt), axis=0)
            m = m_new
        m = tl.where(nan > 0, float("nan"), m).to(cdt)
        log_sum = tl.log(s)
        z_y = tl.load(src + y).to(cdt) * scale
        if HAS_CAP:
            z_y = cap * _tanh(z_y / cap)
        tl.store(red_ptr + row, m)
        tl.store(red_ptr + num_rows + row, log_sum)
        tl.store(red_ptr + 2 * num_rows + row, zsum)
        tl.store(red_ptr + 3 * num_rows + row, k)
        tl.store(red_ptr + 4 * num_rows + row, z_y)
        tl.store(red_ptr + 5 * num_rows + row, log_sum - t / s)  # entropy: lse - sum p z
        tl.store(argmax_ptr + row, amax)
        lse = m + log_sum
    else:
        lse = tl.load(lse_ptr + row)
        k = tl.load(k_ptr + row)
        amax = tl.load(argmax_ptr + row)

    if GRAD:
        if FAIRSEQ:
            eps = epsilon * k / (k - 1.0)  # eps' = eps * K / (K - 1), K counting the present entries
        else:
            eps = epsilon
        spread = (eps + alpha) / k  # u / K
        row_scale = tl.load(row_scale_ptr + row).to(cdt)
        p_factor = 1.0 + 2.0 * z_loss * lse  # d (c * lse^2) / dz = 2 c lse softmax
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < V
            z = _logits(src, cols, mask, scale, cap, HAS_CAP)
            g = tl.where(z != neg_inf, tl.exp(z - lse) * p_factor - spread, 0.0)
            g += tl.where(cols == y, eps - 1.0, 0.0)
            g += tl.where(cols == amax, alpha, 0.0)
            # A fill, not only a product: 0 * NaN is NaN (as losses.chunk_logit_grad).
            g = tl.where(row_scale == 0.0, 0.0, g * row_scale)
            if HAS_CAP:
                tanh = tl.where(mask, z / cap, 0.0)
                g = g * (1.0 - tanh * tanh)
            tl.store(dst + cols, g.to(dst_ptr.dtype.element_ty), mask=mask)

