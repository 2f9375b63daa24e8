"""Device functions shared by the masked-routing kernels (``triton_route``: a row per thread group, chunk heads;
``triton_stream``: rows streamed through a few threads each). The formulas are ``reference.masked_route``'s."""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

# rows of the packed [12, E] float32 table: the spec's four (mask -1/0/+1, bias, bias_abs, boost) and eight derived
# for the streamed kernels, so that no mask test runs per element: DROP (-inf at disabled and forced experts, else
# 0: what leaves the selection and the softmax sum), as int32 bits FCOL (the forced columns, ascending), SPW (one
# bit per special column: any bias or mask, 32 columns a word), CCOL (the enabled special columns: biased), DCOL
# (the disabled and forced columns), each list followed by zeros; SDROP (-inf at the special columns, else 0);
# CHOICE (+inf at forced, -inf at disabled experts, else 0: added, the mask's choice order in one float add); and
# BCHOICE (bias + CHOICE: the biased choice order in one load and add, where no bias_abs is set; z + (b + c) is
# (z + b) + c for c in {0, ±inf}, signed zeros included)
_MASK, _BIAS, _BIAS_ABS, _BOOST, _DROP, _FCOL, _SPW, _CCOL, _DCOL, _SDROP, _CHOICE, _BCHOICE = (
    tl.constexpr(i) for i in range(12))
_TAKEN = tl.constexpr(-2147483648)  # int32 min: below every selection key (the key of -inf is above it)
_TAKEN64 = tl.constexpr(-9223372036854775807)
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _rcp(x):
    """``1 / x`` by one ``rcp.approx.ftz.f32`` (MUFU.RCP; 1 ulp), for the fast sigmoid's certified scores:
    ``libdevice.fast_dividef(1, x)`` compiled to an extra FADD a logit around it (sm_90 SASS). GPU only (the
    interpreter runs no PTX)."""
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _sum_exp(x, mx, PRECISE: tl.constexpr):
    """Row sums of ``exp(x - mx)``: the softmax denominator. On the GPU through ``ex2.approx`` (2 ulp), which no
    selection depends on; each selected numerator is recomputed with the IEEE ``expf``."""
    if PRECISE:
        return tl.sum(tl.math.exp2((x - mx[:, None]) * _LOG2E), 1)
    else:
        return tl.sum(tl.exp(x - mx[:, None]), 1)


@triton.jit
def _at_cols(ptr, cols, shape, lim=None):
    """Table entries ``ptr[cols]`` laid out as a chunk of logits of ``shape`` (``[ROWS, S, 8]``): each thread loads
    its own columns' entries, the rows' copies from L1. (Loaded as ``[S, 8]`` and broadcast, they reached the
    chunk's layout through shared memory, a barrier each chunk: sm_90 SASS.) ``cols``: ``_runs``' offsets, for
    32-bit logits both runs loaded and paired (``_pair8``); ``lim``: columns from it on are padding (0)."""
    if len(cols.shape) == 3 and cols.shape[2] == 4:
        rows = tl.zeros([shape[0], 1, 1], tl.int32)  # the rows' copies, each thread its own (see above)
        hi = cols + 4 * cols.shape[1]
        if lim is None:
            x = _pair8(tl.load(ptr + (cols + rows)), tl.load(ptr + (hi + rows)))
        else:
            x = _pair8(tl.load(ptr + (cols + rows), mask=(cols + rows) < lim, other=0.0),
                       tl.load(ptr + (hi + rows), mask=(hi + rows) < lim, other=0.0))
    elif lim is None:
        x = tl.load(tl.broadcast_to(ptr + cols, shape))
    else:
        x = tl.load(tl.broadcast_to(ptr + cols, shape), mask=tl.broadcast_to(cols < lim, shape), other=0.0)
    return x


@triton.jit
def _pair8(lo, hi):
    """Two ``[.., S, 4]`` runs of each thread's columns as one ``[.., S, 8]`` chunk, still in the thread's registers
    (``tl.join`` adds an in-thread dimension; merging it with the run's is a relabelling)."""
    return tl.reshape(tl.join(lo, hi), [lo.shape[0], lo.shape[1], 8])


@triton.jit
def _runs(S: tl.constexpr, WIDE: tl.constexpr):
    """Each thread's columns of a chunk of ``8·S`` as load offsets: 16-bit logits ``[1, S, 8]``, thread s holds
    8s .. 8s+7 (one 16-byte load); 32-bit logits (``WIDE``) ``[1, S, 4]``, the first of its two runs, 4s .. 4s+3
    and 4S+4s .. 4S+4s+3 (two 16-byte loads: ``_load8``, ``_at_cols``; the chunk's columns: ``_cols8``).
    Why two loads of ``[.., S, 4]`` rather than one ``[2, .., S, 4]`` (as before): Triton 3.6's coalescing gave
    the ``2`` threads of its own (ties of contiguity ordered from the first dimension), so every top-2 and sum of
    a thread's 8 went through shuffles (sm_90, DeepSeek-V3 float32 k = 8 steered: 276 SHFL, 739 FMNMX, 3,184
    instructions against Triton 3.9's 70, 259 and 2,080)."""
    s = tl.arange(0, S)
    if WIDE:
        return (s[:, None] * 4 + tl.arange(0, 4)[None, :])[None, :, :]
    else:
        return (s[:, None] * 8 + tl.arange(0, 8)[None, :])[None, :, :]


@triton.jit
def _load8(ptrs, mask, cols=None, lim=None):
    """A chunk of logits at ``ptrs`` (``_runs``' offsets ``cols`` added): one load, or for 32-bit logits both runs,
    paired. ``mask``: per row (``[ROWS, 1, 1]``); ``lim``: columns from it on are padding (0)."""
    if ptrs.shape[2] == 4:
        step = 4 * ptrs.shape[1]
        if lim is None:
            x = _pair8(tl.load(ptrs, mask=mask, other=0.0), tl.load(ptrs + step, mask=mask, other=0.0))
        else:
            x = _pair8(tl.load(ptrs, mask=mask & (cols < lim), other=0.0),
                       tl.load(ptrs + step, mask=mask & (cols + step < lim), other=0.0))
    elif lim is None:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs, mask=mask & (cols < lim), other=0.0)
    return x


@triton.jit
def _cols8(cols):
    """The chunk's columns (``[.., S, 8]``, in the layout ``_load8`` gives) from ``_runs``' offsets."""
    if cols.shape[2] == 4:
        cols = _pair8(cols, cols + 4 * cols.shape[1])
    return cols


@triton.jit
def _tile(T, E, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    return rows, rows < T, cols, cols < E


@triton.jit
def _steered_logits(logits_ptr, stride_t, rows, row_ok, cols, col_ok, tabs_ptr, E, force_delta,
                    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, LOGIT_MASK: tl.constexpr):
    """float32 ``z' = z + b + b_abs·|z|``; logit-domain families also get force (row max + δ) and disable (-inf).
    Padding columns are -inf. Returns ``(z', mask, row max before masking)`` (mask: -1/0/+1 as float32)."""
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * stride_t + cols[None, :]
    z = tl.load(logits_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(tabs_ptr + _BIAS * E + cols, mask=col_ok, other=0.0)
        b_abs = tl.load(tabs_ptr + _BIAS_ABS * E + cols, mask=col_ok, other=0.0)
        z = (z + b[None, :]) + b_abs[None, :] * tl.abs(z)
    z = tl.where(col_ok[None, :], z, -float("inf"))
    mask = tl.load(tabs_ptr + _MASK * E + cols, mask=col_ok, other=0.0)
    row_max = tl.max(z, 1)  # before disabling, as the reference (and SteerMoE's max over all experts)
    if HAS_MASK and LOGIT_MASK:
        z = tl.where(mask[None, :] > 0, row_max[:, None] + force_delta, z)
        z = tl.where(mask[None, :] < 0, -float("inf"), z)
    return z, mask, row_max


@triton.jit
def _steered_at(logits_ptr, stride_t, rows, sel, ok, tabs_ptr, E, row_max, force_delta,
                HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, LOGIT_MASK: tl.constexpr):
    """``z'`` of ``_steered_logits`` at the selected columns ``sel`` ([rows, slots]), recomputed from the logits
    with the same float32 operations, hence bit-identical (the selection keys keep only its top bits)."""
    z = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_t + sel, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(tabs_ptr + _BIAS * E + sel, mask=ok, other=0.0)
        b_abs = tl.load(tabs_ptr + _BIAS_ABS * E + sel, mask=ok, other=0.0)
        z = (z + b) + b_abs * tl.abs(z)
    if HAS_MASK and LOGIT_MASK:
        mask = tl.load(tabs_ptr + _MASK * E + sel, mask=ok, other=0.0)
        z = tl.where(mask > 0, row_max[:, None] + force_delta, z)
        z = tl.where(mask < 0, -float("inf"), z)
    return z


@triton.jit
def _order_bits(x):
    """float32 -> int32 in the same order (-0.0 counted as +0.0, as a float comparison sees them)."""
    b = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _from_order_bits(o):
    """The float32 whose order bits (``_order_bits``) are ``o``."""
    return (o ^ ((o >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _ce(a, b):
    return tl.maximum(a, b), tl.minimum(a, b)


@triton.jit
def _split8(x):
    """The 8 entries of the last dimension (one thread's registers: a 16-byte load of bf16, or two of float32
    paired, ``_runs``) as eight tensors without it, in the order 0, 4, 2, 6, 1, 5, 3, 7 (the callers sort or
    insert, so order is free)."""
    h = tl.reshape(x, [x.shape[0], x.shape[1], 2, 2, 2])
    a, b = tl.split(h)
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    c0, c1 = tl.split(a0)
    c2, c3 = tl.split(a1)
    c4, c5 = tl.split(b0)
    c6, c7 = tl.split(b1)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _sort8(x):
    """The last dimension (8 entries) sorted descending by Knuth's 19-comparator network: eight tensors, rank 0
    first."""
    c0, c1, c2, c3, c4, c5, c6, c7 = _split8(x)
    c0, c2 = _ce(c0, c2)
    c1, c3 = _ce(c1, c3)
    c4, c6 = _ce(c4, c6)
    c5, c7 = _ce(c5, c7)
    c0, c4 = _ce(c0, c4)
    c1, c5 = _ce(c1, c5)
    c2, c6 = _ce(c2, c6)
    c3, c7 = _ce(c3, c7)
    c0, c1 = _ce(c0, c1)
    c2, c3 = _ce(c2, c3)
    c4, c5 = _ce(c4, c5)
    c6, c7 = _ce(c6, c7)
    c2, c4 = _ce(c2, c4)
    c3, c5 = _ce(c3, c5)
    c1, c4 = _ce(c1, c4)
    c3, c6 = _ce(c3, c6)
    c1, c2 = _ce(c1, c2)
    c3, c4 = _ce(c3, c4)
    c5, c6 = _ce(c5, c6)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _sorted_chunks(key, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr):
    """Each run of 8 adjacent columns sorted descending: eight ``[BLOCK_T, E_PAD // 8]`` tensors, rank 0 first."""
    return _sort8(tl.reshape(key, [BLOCK_T, E_PAD // 8, 8]))


@triton.jit
def _finish(w, sel, rows, row_ok, tabs_ptr, E, w_ptr, idx_ptr, K: tl.constexpr, SLOTS: tl.constexpr,
            HAS_BOOST: tl.constexpr, RENORM_BOOST: tl.constexpr):
    """``w *= boost[i]`` (renormalised to the old row sum if asked), cast, store ``[T, K]`` weights and int64 ids."""
    slot = tl.arange(0, SLOTS)
    ok = row_ok[:, None] & (slot[None, :] < K)
    w = tl.where(ok, w, 0.0)
    if HAS_BOOST:
        factor = tl.load(tabs_ptr + _BOOST * E + sel, mask=ok, other=1.0)
        boosted = w * factor
        if RENORM_BOOST:
            ratio = tl.math.div_rn(tl.sum(w, 1), tl.sum(boosted, 1))
            boosted = boosted * ratio[:, None]
        w = boosted
    offs = rows[:, None].to(tl.int64) * K + slot[None, :]
    tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=ok)
    tl.store(idx_ptr + offs, sel.to(tl.int64), mask=ok)
