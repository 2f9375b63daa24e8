"""Streamed masked routing for the logit-domain families without groups (softmax-top-k, DeepSeek-V2 greedy,
gpt-oss, PhiMoE's sparsemixer) and k <= 8: the same function as ``triton_route`` (``reference.masked_route``), in
fewer instructions and registers.

Why another kernel: ``triton_route`` spreads a row over a whole warp, so each of the k picks costs a warp-wide
reduction; Nsight Compute showed it issue-bound at 65-80 instructions per routed logit, about a quarter of the
H100's HBM bandwidth. Here a row belongs to ``S`` threads (4 once E >= 32). Each thread streams its share of the
row in 8-expert chunks (one 16-byte load of bf16; chunk ``ch`` of thread ``s`` holds experts
``ch·8·S + s·8 + 0..7``, so the S threads of a row read 64 contiguous bytes) and keeps, in registers:
- its best keys, sorted: a chunk is sorted by a 19-comparator network and merged into the list (bitonic merge)
  for lists of 8; lists of up to 4 take each key by insertion;
- the softmax sum ``Σ 2^((z - off)·log2 e)`` against a fixed offset ``off`` (its first chunk's max): one fma, one
  ``ex2.approx`` and one add per logit, no running-max rescaling. A block where some thread's best enabled score
  lies more than 60 from its offset (where the sum could over- or underflow) gets its sums again, against the
  row max (``_sum_again``);
- the row max of the logits (SteerMoE's force value), only when something is forced.
A renormalised softmax-top-k (``RENORM``) keeps no sum: the row's sum cancels, its weights are a softmax over the
k picks (as gpt-oss's), and its stream is gpt-oss's.
Only at the end do the S threads combine: k picks of the best list head (log2(S) shuffles each). The stream's
offset sums are combined outside any branch: used only in the branch that skips ``_sum_again``, the compiler sank
the exponentials into it and kept all of a thread's scores live through the stream (99-127 registers against
64-79).

Steering. Where a layer's spec touches at most ``SPARSE_MAX`` experts and the logits are 16-bit (exact keys),
each touched ("special") expert leaves the stream and comes back as gathers at the end: the enabled biased ones
(``CCOL``) compete in the picks with exact 64-bit keys and join the sum. The force value is the stream's running
max of the raw logits and the candidates' biased ones, unless a biased expert holds the raw max (or a disabled or
forced one is biased): then the block takes it apart from the best key (exact), the candidates and the gathered
disabled and forced experts (``DCOL``). Otherwise one table row per column, ``DROP`` (-inf at disabled and forced
experts), is added to the biased logits. Either way forced experts take the first slots (their score, row max + δ,
is above every other), in ascending column order as ``torch.topk`` breaks their tie.

How the special experts leave (``SP_TABLE``) and how keys get their sign masks (``KEY_FMA``) follow from the H100's
pipes (Nsight Compute: the long lists' streams keep the half-rate integer pipe ~75 % busy with min/max, logic and
selects, while the issue slots are ~50 % busy): ``SP_TABLE`` adds a table row (``SDROP``: -inf at the special
columns, loaded with the chunk) per logit, a float add on the FMA pipe, where the bit test (``SPW``: a shift per
thread and chunk, a bit test and a select per logit) costs three integer-pipe instructions; ``KEY_FMA`` makes the
keys' sign masks with two integer multiplies (FMA pipe) instead of a shift. Each pays where the integer pipe binds
(``triton_route.stream_choices``, measured side by side): ``SP_TABLE`` for lists of 4 or more and for the families
without a softmax sum, ``KEY_FMA`` for those families only (the sum's exponentials already load the FMA pipe and
the issue slots there).

Sparsemixer has no row-wide sum: round j's weight is a softmax over the experts not yet picked within 2ε
(relative) of pick j. The smallest pick bounds all of them (``_sm_weights``), so each thread's list has room for
keys beyond the k (4, or 9 for k > 3) and the end takes the keys still above the bound; a block where a thread's
last list key is above it sums again over its logits (``_sm_again``).

Keys: the score's order bits with the low ``CB`` bits replaced by ``2^CB - 1 - column`` (ties -> lower column);
exact for 16-bit logits outside the biased columns. Otherwise (``LOSSY``: float32 logits, or biases in the dense
form) the lists keep k+1 keys, and a block where two
consecutive of them share their high bits is selected again with exact 64-bit keys (``_select_exact``, k
streamed passes: slow and few registers, for a case that needs a float32 tie in the top 24 bits). With exact keys
the picks' scores are decoded from them (``VALS``), else recomputed from the logits (``_steered_at``), bit for bit
as in the other kernel. ``KEEP_SIGN`` (exact keys) skips turning -0.0 into +0.0 in the stream; a block with a pick
of value 0, which could be misordered against another zero, is selected again with ``_select_exact``.
"""
from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

from .launch import next_pow2
from .triton_common import (_BIAS, _BIAS_ABS, _CCOL, _DCOL, _DROP, _FCOL, _LOG2E, _SDROP, _SPW, _TAKEN, _TAKEN64,
                            _at_cols, _ce, _cols8, _exp, _finish, _from_order_bits, _load8, _order_bits, _runs,
                            _sort8, _split8, _steered_at)

_SOFTMAX, _V2_GREEDY, _GPT_OSS, _SPARSEMIXER = (tl.constexpr(i) for i in range(4))
_SPAN = tl.constexpr(60.0)  # |best enabled score - offset| above which a thread's offset sum is redone
_NEG_INF_KEY = tl.constexpr(-2139095041)  # 0x807FFFFF: the highest key of -inf (order bits of -inf, low bits set)


@triton.jit
def _exp2_off(zd, off_l2, PRECISE: tl.constexpr):
    """``exp(zd - off)`` as ``2^(zd·log2 e - off·log2 e)``: one fma and ``ex2.approx`` on the GPU (sums only: no
    selection depends on them)."""
    if PRECISE:
        return tl.math.exp2(tl.fma(zd, _LOG2E, -off_l2))
    else:
        return tl.exp(zd - off_l2 / _LOG2E)


@triton.jit
def _load(base, cols, row_ok, E, EVEN: tl.constexpr):
    """The logits of one chunk at ``cols`` (``_runs``' offsets; the chunk ``[ROWS, S, 8]``), as stored: 16-byte
    loads."""
    if EVEN:
        x = _load8(base + cols, row_ok[:, None, None])
    else:
        x = _load8(base + cols, row_ok[:, None, None], cols, E)
    return x


@triton.jit
def _fetch(base, tabs_ptr, ch, lanes, s, row_ok, E, S: tl.constexpr, EVEN: tl.constexpr, SPARSE: tl.constexpr,
           SP_TABLE: tl.constexpr):
    """Chunk ``ch``'s logits and, for the sparse form, its ``SDROP`` entries (``SP_TABLE``) or each thread's bits
    of the special-column word (32 columns a word) shifted to its 8 columns, issued ahead of use (``_stream``'s
    prefetch window: the table entries waited on at once measured slower than the bit test)."""
    cols = ch * 8 * S + lanes
    raw = _load(base, cols, row_ok, E, EVEN)
    if SPARSE and SP_TABLE:
        if EVEN:
            return raw, _at_cols(tabs_ptr + _SDROP * E, cols, raw.shape)
        else:
            return raw, _at_cols(tabs_ptr + _SDROP * E, cols, raw.shape, E)
    elif SPARSE:
        word = tl.load(tabs_ptr.to(tl.pointer_type(tl.int32)) + _SPW * E + (ch * 8 * S) // 32)
        return raw, word >> ((ch * 8 * S) % 32 + s * 8)
    else:
        return raw, raw


@triton.jit
def _chunk(base, cols, row_ok, tabs_ptr, E, EVEN: tl.constexpr, HAS_BIAS: tl.constexpr,
           HAS_BIAS_ABS: tl.constexpr, HAS_MASK: tl.constexpr, raw=None, CANON: tl.constexpr = True,
           drop=None, special=None):
    """One chunk of the block at ``cols`` (``_runs``' offsets; the chunk ``[ROWS, S, 8]``): ``z' = z + b
    (+ b_abs·|z|)`` (-inf in padding columns) and ``zd``, which is ``z'`` plus the table row ``DROP`` when ``HAS_MASK`` (-inf at disabled and forced experts; or
    ``drop``, the sparse form's ``SDROP`` entries: -inf at every special column, unbiased ``z``), which also turns
    -0.0 into +0.0, as a float comparison sees it (so does ``CANON`` without a mask; otherwise the caller checks
    picks of value 0). ``special``: the sparse form's other way, one bit per column (-inf where set). ``raw``: the
    chunk's logits when already loaded."""
    if raw is None:
        raw = _load(base, cols, row_ok, E, EVEN)
    if special is not None:
        z = raw.to(tl.float32)
        if not EVEN:
            z = tl.where(_cols8(cols) < E, z, -float("inf"))
        if CANON:
            z = z + 0.0
        zd = tl.where(special, -float("inf"), z)
    elif EVEN:  # no column masks: the table loads stay 16-byte vectors
        z = raw.to(tl.float32)
        if HAS_BIAS:
            zb = z + _at_cols(tabs_ptr + _BIAS * E, cols, z.shape)
            if HAS_BIAS_ABS:
                zb = zb + _at_cols(tabs_ptr + _BIAS_ABS * E, cols, z.shape) * tl.abs(z)
            z = zb
        if drop is not None:
            zd = z + drop
        elif HAS_MASK:  # + 0.0 where kept, which also turns -0.0 into +0.0
            zd = z + _at_cols(tabs_ptr + _DROP * E, cols, z.shape)
        elif CANON:
            zd = z + 0.0
        else:
            zd = z
    else:
        col_ok = _cols8(cols) < E
        z = raw.to(tl.float32)
        if HAS_BIAS:
            zb = z + _at_cols(tabs_ptr + _BIAS * E, cols, z.shape, E)
            if HAS_BIAS_ABS:
                b_abs = _at_cols(tabs_ptr + _BIAS_ABS * E, cols, z.shape, E)
                zb = zb + b_abs * tl.abs(z)
            z = zb
        z = tl.where(col_ok, z, -float("inf"))
        if drop is not None:
            zd = z + drop
        elif HAS_MASK:
            zd = z + _at_cols(tabs_ptr + _DROP * E, cols, z.shape, E)
        elif CANON:
            zd = z + 0.0
        else:
            zd = z
    return z, zd


@triton.jit
def _insert(l0, l1, l2, l3, x, N: tl.constexpr):
    """Insert ``x`` into the descending list ``l0..l(N-1)`` (N <= 4), dropping the smallest."""
    hi = tl.maximum(l0, x)
    x = tl.minimum(l0, x)
    l0 = hi
    if N > 1:
        hi = tl.maximum(l1, x)
        x = tl.minimum(l1, x)
        l1 = hi
    if N > 2:
        hi = tl.maximum(l2, x)
        x = tl.minimum(l2, x)
        l2 = hi
    if N > 3:
        l3 = tl.maximum(l3, x)
    return l0, l1, l2, l3


@triton.jit
def _merge8(l0, l1, l2, l3, l4, l5, l6, l7, l8, c0, c1, c2, c3, c4, c5, c6, c7, NINTH: tl.constexpr):
    """The best 8 of two descending lists of 8, sorted (the pairwise maxima of one list against the other reversed
    form a bitonic sequence: three half-cleaner stages sort it); ``l8`` keeps the 9th best when ``NINTH`` (the
    best of the pairwise minima, which are the 8 worst)."""
    if NINTH:
        d = tl.maximum(tl.maximum(tl.maximum(tl.minimum(l0, c7), tl.minimum(l1, c6)),
                                  tl.maximum(tl.minimum(l2, c5), tl.minimum(l3, c4))),
                       tl.maximum(tl.maximum(tl.minimum(l4, c3), tl.minimum(l5, c2)),
                                  tl.maximum(tl.minimum(l6, c1), tl.minimum(l7, c0))))
        l8 = tl.maximum(l8, d)
    m0 = tl.maximum(l0, c7)
    m1 = tl.maximum(l1, c6)
    m2 = tl.maximum(l2, c5)
    m3 = tl.maximum(l3, c4)
    m4 = tl.maximum(l4, c3)
    m5 = tl.maximum(l5, c2)
    m6 = tl.maximum(l6, c1)
    m7 = tl.maximum(l7, c0)
    m0, m4 = _ce(m0, m4)
    m1, m5 = _ce(m1, m5)
    m2, m6 = _ce(m2, m6)
    m3, m7 = _ce(m3, m7)
    m0, m2 = _ce(m0, m2)
    m1, m3 = _ce(m1, m3)
    m4, m6 = _ce(m4, m6)
    m5, m7 = _ce(m5, m7)
    m0, m1 = _ce(m0, m1)
    m2, m3 = _ce(m2, m3)
    m4, m5 = _ce(m4, m5)
    m6, m7 = _ce(m6, m7)
    return m0, m1, m2, m3, m4, m5, m6, m7, l8


@triton.jit
def _empty_lists(ROWS: tl.constexpr, S: tl.constexpr):
    """Nine empty key lists ``[ROWS, S]`` (every entry below any key), for ``_absorb``."""
    taken = tl.full([ROWS, S], _TAKEN, tl.int32)
    return taken, taken, taken, taken, taken, taken, taken, taken, taken


@triton.jit
def _absorb(l0, l1, l2, l3, l4, l5, l6, l7, l8, key, N: tl.constexpr):
    """A chunk's keys (the last dimension of ``key``, 8 per thread) into each thread's descending list of the ``N``
    best: lists of 8 (+ a 9th when N = 9) merge the sorted chunk, lists of up to 4 take each key by insertion."""
    if N > 4:
        c0, c1, c2, c3, c4, c5, c6, c7 = _sort8(key)
        l0, l1, l2, l3, l4, l5, l6, l7, l8 = _merge8(l0, l1, l2, l3, l4, l5, l6, l7, l8,
                                                     c0, c1, c2, c3, c4, c5, c6, c7, N > 8)
    else:
        c0, c1, c2, c3, c4, c5, c6, c7 = _split8(key)
        l0, l1, l2, l3 = _insert(l0, l1, l2, l3, c0, N)
        l0, l1, l2, l3 = _insert(l0, l1, l2, l3, c1, N)
        l0, l1, l2, l3 = _insert(l0, l1, l2, l3, c2, N)
        l0, l1, l2, l3 = _insert(l0, l1, l2, l3, c3, N)
        l0, l1, l2, l3 = _insert(l0, l1, l2, l3, c4, N)
        l0, l1, l2, l3 = _insert(l0, l1, l2, l3, c5, N)
        l0, l1, l2, l3 = _insert(l0, l1, l2, l3, c6, N)
        l0, l1, l2, l3 = _insert(l0, l1, l2, l3, c7, N)
    return l0, l1, l2, l3, l4, l5, l6, l7, l8


@triton.jit
def _stream(logits_ptr, stride_t, rows, row_ok, tabs_ptr, E, ROWS: tl.constexpr, S: tl.constexpr,
            E_PAD: tl.constexpr, EVEN: tl.constexpr, CB: tl.constexpr, N: tl.constexpr, SUM: tl.constexpr,
            HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_FORCE: tl.constexpr,
            SPARSE: tl.constexpr, PRECISE: tl.constexpr, CANON: tl.constexpr, SP_TABLE: tl.constexpr,
            KEY_FMA: tl.constexpr, WIDE: tl.constexpr, AHEAD: tl.constexpr = 1):
    """One pass over the block: per thread (``[ROWS, S]`` each) the ``N`` best keys of ``zd`` (lists of up to 4,
    or 8 [+ a 9th when N = 9]); the row max of ``z'`` (SteerMoE's force value); the offset ``off`` (the first
    chunk's max of ``z'``) and ``Σ exp(zd - off)``. ``AHEAD`` (1 to 3): how many chunks' loads are written ahead
    of the chunk being worked on."""
    LOW: tl.constexpr = (1 << CB) - 1
    s = tl.arange(0, S)
    c = tl.arange(0, 8)
    lanes = _runs(S, WIDE)
    l0, l1, l2, l3, l4, l5, l6, l7, l8 = _empty_lists(ROWS, S)
    row_max = tl.full([ROWS, S], -float("inf"), tl.float32)
    off = tl.zeros([ROWS, S], tl.float32)
    off_l2 = tl.zeros([ROWS, S], tl.float32)
    acc = tl.zeros([ROWS, S], tl.float32)
    base = logits_ptr + rows.to(tl.int64)[:, None, None] * stride_t
    NCH: tl.constexpr = E_PAD // (8 * S)
    # the next chunk's load is issued before this chunk's work (ptxas schedules the loads itself; a wider window
    # written here compiled to the same SASS)
    nxt, nxt_sp = _fetch(base, tabs_ptr, 0, lanes, s, row_ok, E, S, EVEN, SPARSE, SP_TABLE)
    nxt2, nxt2_sp = nxt, nxt_sp
    nxt3, nxt3_sp = nxt, nxt_sp
    if AHEAD > 1 and NCH > 1:
        nxt2, nxt2_sp = _fetch(base, tabs_ptr, 1, lanes, s, row_ok, E, S, EVEN, SPARSE, SP_TABLE)
    if AHEAD > 2 and NCH > 2:
        nxt3, nxt3_sp = _fetch(base, tabs_ptr, 2, lanes, s, row_ok, E, S, EVEN, SPARSE, SP_TABLE)
    for ch in tl.static_range(NCH):
        cols = ch * 8 * S + lanes
        raw = nxt
        sp = nxt_sp
        if AHEAD > 2:
            nxt, nxt_sp = nxt2, nxt2_sp
            nxt2, nxt2_sp = nxt3, nxt3_sp
            if ch + 3 < NCH:
                nxt3, nxt3_sp = _fetch(base, tabs_ptr, ch + 3, lanes, s, row_ok, E, S, EVEN, SPARSE, SP_TABLE)
        elif AHEAD > 1:
            nxt, nxt_sp = nxt2, nxt2_sp
            if ch + 2 < NCH:
                nxt2, nxt2_sp = _fetch(base, tabs_ptr, ch + 2, lanes, s, row_ok, E, S, EVEN, SPARSE, SP_TABLE)
        elif ch + 1 < NCH:
            nxt, nxt_sp = _fetch(base, tabs_ptr, ch + 1, lanes, s, row_ok, E, S, EVEN, SPARSE, SP_TABLE)
        if SPARSE and SP_TABLE:  # special columns (steered in any way) leave: + SDROP (-inf there), unbiased
            z, zd = _chunk(base, cols, row_ok, tabs_ptr, E, EVEN, False, False, False, raw, CANON, sp)
        elif SPARSE:  # or through one test of a fixed bit per element
            special = ((sp[:, None] & (1 << c)[None, :]) != 0)[None, :, :]  # 16-bit logits only: 8 adjacent
            z, zd = _chunk(base, cols, row_ok, tabs_ptr, E, EVEN, False, False, False, raw, CANON, None, special)
        else:
            z, zd = _chunk(base, cols, row_ok, tabs_ptr, E, EVEN, HAS_BIAS, HAS_BIAS_ABS, HAS_MASK, raw, CANON)
        if HAS_FORCE:  # sparse form: the raw logits, biased columns included (the kernel checks those)
            row_max = tl.maximum(row_max, tl.max(z, 2))
        if SUM:
            if ch == 0:
                off = tl.max(z, 2)
                if not EVEN:  # a thread whose first chunk is all padding
                    off = tl.where(off == -float("inf"), 0.0, off)
                off_l2 = off * _LOG2E
            acc += tl.sum(_exp2_off(zd, off_l2[:, :, None], PRECISE), 2)
        key = _key32(zd, _cols8(cols), CB, KEY_FMA)
        l0, l1, l2, l3, l4, l5, l6, l7, l8 = _absorb(l0, l1, l2, l3, l4, l5, l6, l7, l8, key, N)
    return l0, l1, l2, l3, l4, l5, l6, l7, l8, row_max, off, acc


@triton.jit
def _key_value(key, CB: tl.constexpr):
    """The float32 a 32-bit key was made from, its low CB bits cleared (within 2^CB ulp, for the offset guard)."""
    return _from_order_bits(key & ~((1 << CB) - 1))


@triton.jit
def _key_exact(key, CB: tl.constexpr):
    """The float32 an exact 32-bit key was made from (scores with zero low CB bits: 16-bit logits, unbiased): the
    order bits get their low bits back (0, or 1 for negative scores, whose order bits are inverted)."""
    return _from_order_bits((key & ~((1 << CB) - 1)) | ((key >> 31) & ((1 << CB) - 1)))


@triton.jit
def _shift(win, l0, l1, l2, l3, l4, l5, l6, l7, l8, N: tl.constexpr):
    """Drop the head of the descending lists (of 4, or 8-9 when N > 4) where ``win``: each key moves up one."""
    l0 = tl.where(win, l1, l0)
    l1 = tl.where(win, l2, l1)
    l2 = tl.where(win, l3, l2)
    if N > 4:
        l3 = tl.where(win, l4, l3)
        l4 = tl.where(win, l5, l4)
        l5 = tl.where(win, l6, l5)
        l6 = tl.where(win, l7, l6)
        l7 = tl.where(win, l8, l7)
        l8 = tl.where(win, _TAKEN, l8)
    else:
        l3 = tl.where(win, _TAKEN, l3)
    return l0, l1, l2, l3, l4, l5, l6, l7, l8


@triton.jit
def _pick(l0, l1, l2, l3, l4, l5, l6, l7, l8, cand, n_forced, ROWS: tl.constexpr, K: tl.constexpr,
          SLOTS: tl.constexpr, N: tl.constexpr, CB: tl.constexpr, LOSSY: tl.constexpr, SLOTS1: tl.constexpr,
          EXTRACTED: tl.constexpr = False):
    """k rounds over the S threads of each row: take the best list head, shift that thread's list; pick j goes to
    slot ``n_forced + j``. Returns the ``[ROWS, SLOTS]`` int32 columns (slots before ``n_forced`` left 0), their
    scores when the keys are exact (not ``LOSSY``: no gather of the picked logits needed), and, when ``LOSSY``,
    the columns of the k+1 best keys with a flag on each that shares its high bits with a neighbour
    (``[ROWS, SLOTS1]`` each): their dropped low bits could have ordered them differently. ``EXTRACTED``: also
    the column and order bits of the key taken in each round j < k (slot j; with n_forced > 0 the last rounds take
    keys that are not picks), and whether it was a real score (not an exhausted list); then the candidates and
    lists left after the k rounds; last, the key of the last round (with ``LOSSY``: the (k+1)-th best)."""
    LOW: tl.constexpr = (1 << CB) - 1
    slot = tl.arange(0, SLOTS)
    sel = tl.zeros([ROWS, SLOTS], dtype=tl.int32)
    obits = tl.zeros([ROWS, SLOTS], dtype=tl.int32)  # the picks' order bits (exact keys only)
    slot1 = tl.arange(0, SLOTS1)
    cols = tl.zeros([ROWS, SLOTS1], dtype=tl.int32)
    near = tl.zeros([ROWS, SLOTS1], dtype=tl.int32)
    ecol = tl.zeros([ROWS, SLOTS], dtype=tl.int32)
    eob = tl.zeros([ROWS, SLOTS], dtype=tl.int32)
    eok = tl.zeros([ROWS, SLOTS], dtype=tl.int1)
    prev = tl.max(l0, 1)
    for j in tl.static_range(K + LOSSY):
        m = tl.max(l0, 1)
        col = LOW - (m & LOW)
        from_list = m == m  # all true
        ob = (m & ~LOW) | ((m >> 31) & LOW)  # exact keys: the score's order bits (its low bits were 0)
        if cand is not None:  # exact list keys made 64-bit, against the candidates
            mc = tl.max(cand, 1)
            from_list = ((ob.to(tl.int64) << 32) | (0x7FFFFFFF - col)) > mc
            col = tl.where(from_list, col, (0x7FFFFFFF - (mc & 0x7FFFFFFF)).to(tl.int32))
            ob = tl.where(from_list, ob, (mc >> 32).to(tl.int32))
            if j < K:
                cand = tl.where((cand == mc[:, None]) & ~from_list[:, None], _TAKEN64, cand)
            if EXTRACTED and j < K:
                eok = tl.where(slot[None, :] == j, tl.where(from_list, m > _NEG_INF_KEY, mc > _TAKEN64)[:, None],
                               eok)
        elif EXTRACTED and j < K:
            eok = tl.where(slot[None, :] == j, (m > _NEG_INF_KEY)[:, None], eok)
        if EXTRACTED and j < K:
            ecol = tl.where(slot[None, :] == j, col[:, None], ecol)
            eob = tl.where(slot[None, :] == j, ob[:, None], eob)
        if LOSSY:
            if j > 0:
                tie = (((m ^ prev) & ~LOW) == 0) & (m != _TAKEN)
                near = tl.where(((slot1[None, :] == j) | (slot1[None, :] == j - 1)) & tie[:, None], 1, near)
            cols = tl.where(slot1[None, :] == j, col[:, None], cols)
        prev = m
        if j < K:
            win = (l0 == m[:, None]) & from_list[:, None]
            l0, l1, l2, l3, l4, l5, l6, l7, l8 = _shift(win, l0, l1, l2, l3, l4, l5, l6, l7, l8, N)
            sel = tl.where(slot[None, :] == j + n_forced, col[:, None], sel)
            if not LOSSY:
                obits = tl.where(slot[None, :] == j + n_forced, ob[:, None], obits)
    if cand is None:  # a tuple cannot hold None
        cand = tl.full([ROWS, 1], _TAKEN64, tl.int64)
    return (sel, _from_order_bits(obits), cols, near, ecol, _from_order_bits(eob), eok, cand,
            l0, l1, l2, l3, l4, l5, l6, l7, l8, prev)


@triton.jit
def _select_exact(logits_ptr, stride_t, rows, row_ok, tabs_ptr, E, n_forced, ROWS: tl.constexpr, S: tl.constexpr,
                  E_PAD: tl.constexpr, EVEN: tl.constexpr, K: tl.constexpr, SLOTS: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr, HAS_MASK: tl.constexpr):
    """The selection again with exact 64-bit keys (order bits << 32 | 2^31 - 1 - column), one streamed pass per
    pick (each takes the best key below the previous pick): ``[ROWS, SLOTS]`` int32 columns."""
    lanes = _runs(S, False)  # a rare path: any layout, the shuffles do not matter
    slot = tl.arange(0, SLOTS)
    sel = tl.zeros([ROWS, SLOTS], dtype=tl.int32)
    prev = tl.full([ROWS], 9223372036854775807, tl.int64)
    base = logits_ptr + rows.to(tl.int64)[:, None, None] * stride_t
    for j in tl.range(0, K, loop_unroll_factor=1):  # runtime loops: a rare path, kept small and register-light
        best = tl.full([ROWS, S], _TAKEN64, tl.int64)
        for ch in tl.range(0, E_PAD // (8 * S), loop_unroll_factor=1):
            cols = ch * 8 * S + lanes
            col_ok = cols < E
            _, zd = _chunk(base, cols, row_ok, tabs_ptr, E, EVEN, HAS_BIAS, HAS_BIAS_ABS, HAS_MASK)
            low = tl.where(col_ok, 0x7FFFFFFF - cols, 0).to(tl.int64)
            key = (_order_bits(zd).to(tl.int64) << 32) | low
            key = tl.where(key < prev[:, None, None], key, _TAKEN64)
            best = tl.maximum(best, tl.max(key, 2))
        m = tl.max(best, 1)
        prev = m
        sel = tl.where(slot[None, :] == j + n_forced, (0x7FFFFFFF - (m & 0x7FFFFFFF)).to(tl.int32)[:, None], sel)
    return sel


@triton.jit
def _sum_again(logits_ptr, stride_t, rows, row_ok, tabs_ptr, E, mx, ROWS: tl.constexpr, S: tl.constexpr,
               E_PAD: tl.constexpr, EVEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr,
               HAS_MASK: tl.constexpr, PRECISE: tl.constexpr):
    """``Σ exp(zd - mx)`` per row, streamed again (the offset sums could have over- or underflowed)."""
    lanes = _runs(S, False)
    acc = tl.zeros([ROWS, S], tl.float32)
    base = logits_ptr + rows.to(tl.int64)[:, None, None] * stride_t
    for ch in tl.range(0, E_PAD // (8 * S), loop_unroll_factor=1):
        cols = ch * 8 * S + lanes
        _, zd = _chunk(base, cols, row_ok, tabs_ptr, E, EVEN, HAS_BIAS, HAS_BIAS_ABS, HAS_MASK)
        acc += tl.sum(_exp(zd - mx[:, None, None], PRECISE), 2)
    return tl.sum(acc, 1)


@triton.jit
def _key32(x, cols, CB: tl.constexpr, FMA: tl.constexpr = False):
    """The selection key of float32 scores ``x`` at ``cols``: order bits, the low CB bits set to 2^CB - 1 - column
    (``LOW ^ column``: the column has only those bits). ``FMA`` (only for exact keys: the low CB bits of ``x`` are
    0, 16-bit logits): one three-way xor, the sign mask from two integer multiplies (on the FMA pipe, not the
    integer pipe that the lists' min/max saturate)."""
    LOW: tl.constexpr = (1 << CB) - 1
    b32 = x.to(tl.int32, bitcast=True)
    if FMA:
        neg = tl.umulhi(b32.to(tl.uint32, bitcast=True), 2)  # b32 >> 31, logical
        return b32 ^ (neg * (0x7FFFFFFF & ~LOW)).to(tl.int32, bitcast=True) ^ (LOW ^ cols)
    else:
        return ((b32 ^ ((b32 >> 31) & 0x7FFFFFFF)) | LOW) ^ cols


@triton.jit(do_not_specialize=["n_forced", "n_cand", "n_drop"])
def _stream_topk_kernel(logits_ptr, stride_t, tabs_ptr, w_ptr, idx_ptr, T, E, force_delta, scaling, n_forced,
                        n_cand, n_drop,
                        FAMILY: tl.constexpr, K: tl.constexpr, N: tl.constexpr, SLOTS: tl.constexpr,
                        SLOTS1: tl.constexpr,
                        E_PAD: tl.constexpr, EVEN: tl.constexpr, S: tl.constexpr, ROWS: tl.constexpr,
                        CB: tl.constexpr, LOSSY: tl.constexpr, SPARSE: tl.constexpr,
                        C_PAD: tl.constexpr, D_PAD: tl.constexpr, D_BIAS: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr, HAS_MASK: tl.constexpr,
                        HAS_FORCE: tl.constexpr, HAS_BOOST: tl.constexpr, RENORM_BOOST: tl.constexpr,
                        RENORM: tl.constexpr, PRECISE: tl.constexpr, VALS: tl.constexpr,
                        KEEP_SIGN: tl.constexpr, SP_TABLE: tl.constexpr, KEY_FMA: tl.constexpr,
                        WIDE: tl.constexpr = False, AHEAD: tl.constexpr = 1):
    """``SoftmaxTopK`` (FAMILY 0), ``DeepseekV2Rule`` greedy (1), ``GptOssRule`` (2), ``SparseMixerRule`` (3); see
    the module docstring. ``scaling``: DeepSeek-V2's routed scaling factor, sparsemixer's 2ε. ``N``: list length per
    thread (k, +1 for ``LOSSY``; sparsemixer: 4, 8 or 9, room for the keys near the picks: ``triton_route.stream_choices``).

    ``SPARSE``: the special columns (any bias or mask) leave the stream (``SP_TABLE``: through the ``SDROP`` row,
    else one bit each; ``KEY_FMA``: see the module docstring) and come back as gathers: ``n_cand`` enabled biased
    columns (``CCOL``) compete in the picks and join the sum; the ``n_drop`` disabled and forced ones (``DCOL``)
    only count for the row max (force; ``D_BIAS``: some of them are biased). ``WIDE``: 32-bit logits, each thread's
    8 columns of a chunk as two runs of 4 (``_runs``)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < T
    itabs = tabs_ptr.to(tl.pointer_type(tl.int32))
    # the softmax families sum over the whole row, except a renormalised softmax-top-k, where that sum cancels
    SUM: tl.constexpr = FAMILY < _GPT_OSS and not RENORM
    l0, l1, l2, l3, l4, l5, l6, l7, l8, row_max, off, acc = _stream(
        logits_ptr, stride_t, rows, row_ok, tabs_ptr, E, ROWS, S, E_PAD, EVEN, CB, N, SUM, HAS_BIAS, HAS_BIAS_ABS,
        HAS_MASK, HAS_FORCE, SPARSE, PRECISE, not KEEP_SIGN, SP_TABLE, KEY_FMA and not LOSSY, WIDE, AHEAD)
    if SUM:  # a thread whose best enabled score is far from its offset: its sum may have over- or underflowed
        best = _key_value(l0, CB) - off
        far = ((best > _SPAN) | ((best < -_SPAN) & (l0 != _TAKEN))).to(tl.int32)
        far_any = tl.max(tl.max(far, 1) & row_ok.to(tl.int32), 0)
    if HAS_FORCE:  # the dense form: the max of the steered logits; the sparse form: of the raw ones
        row_max = tl.max(row_max, 1)
    cand = None
    if SPARSE:
        if C_PAD > 0:
            cj = tl.arange(0, C_PAD)
            ccol = tl.load(itabs + _CCOL * E + cj, mask=cj < n_cand, other=0)
            cok = row_ok[:, None] & (cj < n_cand)[None, :]
            zc = _steered_at(logits_ptr, stride_t, rows, ccol[None, :], cok, tabs_ptr, E, None, force_delta,
                             HAS_BIAS, False, False) + 0.0
            cand = tl.where(cok, (_order_bits(zc).to(tl.int64) << 32) | (0x7FFFFFFF - ccol)[None, :], _TAKEN64)
        if HAS_FORCE and (C_PAD > 0 or D_BIAS):
            # the raw max is the steered one unless a biased column holds it: then (and whenever a disabled or
            # forced column is biased) take it apart: the best non-special key (exact), the candidates, the
            # gathered disabled and forced columns
            if D_BIAS:
                shadow = row_ok
            else:
                zc_raw = _steered_at(logits_ptr, stride_t, rows, ccol[None, :], cok, tabs_ptr, E, None, force_delta,
                                     False, False, False)
                shadow = row_ok & (tl.max(tl.where(cok, zc_raw, -float("inf")), 1) >= row_max)
            if C_PAD > 0:
                row_max = tl.maximum(row_max, tl.max(tl.where(cok, zc, -float("inf")), 1))
            if tl.max(shadow.to(tl.int32), 0) != 0:
                top = tl.max(l0, 1)
                parts = tl.where(top > _NEG_INF_KEY, _key_exact(top, CB), -float("inf"))
                if C_PAD > 0:
                    parts = tl.maximum(parts, tl.max(tl.where(cok, zc, -float("inf")), 1))
                if D_PAD > 0:  # 8 columns a step, as many steps as there are dropped columns
                    for d0 in tl.range(0, n_drop, 8, loop_unroll_factor=1):
                        dj = d0 + tl.arange(0, 8)
                        dcol = tl.load(itabs + _DCOL * E + dj, mask=dj < n_drop, other=0)
                        dok = row_ok[:, None] & (dj < n_drop)[None, :]
                        zdr = _steered_at(logits_ptr, stride_t, rows, dcol[None, :], dok, tabs_ptr, E, None,
                                          force_delta, D_BIAS, False, False)
                        parts = tl.maximum(parts, tl.max(tl.where(dok, zdr, -float("inf")), 1))
                row_max = tl.where(shadow, parts, row_max)
    if FAMILY == _SPARSEMIXER:  # a thread's last list entry: were all its keys near the picks kept?
        if N > 8:
            last = l8
        elif N > 4:
            last = l7
        elif N == 4:
            last = l3
        elif N == 3:
            last = l2
        else:
            last = l1
    sel, vals, cols, near, ecol, evals, eok, cand_left, l0, l1, l2, l3, l4, l5, l6, l7, l8, _ = _pick(
        l0, l1, l2, l3, l4, l5, l6, l7, l8, cand, n_forced, ROWS, K, SLOTS, N, CB, LOSSY, SLOTS1,
        FAMILY == _SPARSEMIXER)
    near_any = 0
    if LOSSY:  # keys that share their high bits, from scores with low bits set: select again, exactly
        near = near & row_ok[:, None].to(tl.int32)
        near_any = tl.max(tl.max(near, 1), 0)
        if near_any != 0:  # exact ties of bf16 logits land here too: check the low bits
            zn = _steered_at(logits_ptr, stride_t, rows, cols, (near != 0) & (cols < E), tabs_ptr, E, None,
                             force_delta, HAS_BIAS, False, False) + 0.0
            low = (zn.to(tl.int32, bitcast=True) & ((1 << CB) - 1)) != 0
            if tl.max(tl.max((low & (near != 0)).to(tl.int32), 1), 0) != 0:
                sel = _select_exact(logits_ptr, stride_t, rows, row_ok, tabs_ptr, E, n_forced, ROWS, S, E_PAD, EVEN,
                                    K, SLOTS, HAS_BIAS, HAS_BIAS_ABS, HAS_MASK)
    slot = tl.arange(0, SLOTS)
    if HAS_FORCE:  # forced experts first, ascending: their score row max + δ is above every other
        sel = tl.where(slot[None, :] < n_forced,
                       tl.load(itabs + _FCOL * E + slot, mask=slot < n_forced, other=0)[None, :], sel)
    else:
        row_max = tl.zeros([ROWS], tl.float32)
    ok = row_ok[:, None] & (slot[None, :] < K)
    if LOSSY or not VALS:  # the picked scores again, from the logits
        zs = _steered_at(logits_ptr, stride_t, rows, sel, ok, tabs_ptr, E, row_max, force_delta, HAS_BIAS,
                         HAS_MASK, True)
    else:  # exact keys: the picks' scores are in them
        zs = vals
        if HAS_FORCE:
            zs = tl.where(slot[None, :] < n_forced, (row_max + force_delta)[:, None], zs)
    if KEEP_SIGN:  # the stream kept -0.0 (one add per logit less): a pick of value 0 may have been ordered wrongly
        # against another zero (torch.topk ties them, lower column first); select such a block again, exactly
        if tl.max(tl.max(((zs == 0.0) & ok & (slot[None, :] >= n_forced)).to(tl.int32), 1), 0) != 0:
            sel = _select_exact(logits_ptr, stride_t, rows, row_ok, tabs_ptr, E, n_forced, ROWS, S, E_PAD, EVEN,
                                K, SLOTS, HAS_BIAS, HAS_BIAS_ABS, HAS_MASK)
            if HAS_FORCE:
                sel = tl.where(slot[None, :] < n_forced,
                               tl.load(itabs + _FCOL * E + slot, mask=slot < n_forced, other=0)[None, :], sel)
            zs = _steered_at(logits_ptr, stride_t, rows, sel, ok, tabs_ptr, E, row_max, force_delta, HAS_BIAS,
                             HAS_MASK, True)
    zs = tl.where(ok, zs, -float("inf"))
    mx = tl.max(zs, 1)  # the best selected score: the row max of the steered scores
    if SUM:
        # outside the branch below: used only there, the compiler sank the stream's exponentials into it, which
        # kept all 64 of a thread's scores live through the stream (30+ registers)
        denom = tl.sum(acc * _exp2_off(off, mx[:, None] * _LOG2E, PRECISE), 1)
        if cand is not None:
            denom = denom + tl.sum(tl.where(cok, _exp(zc - mx[:, None], PRECISE), 0.0), 1)
        if far_any != 0:  # every enabled column, the sparse form's candidates included
            denom = _sum_again(logits_ptr, stride_t, rows, row_ok, tabs_ptr, E, mx, ROWS, S, E_PAD, EVEN, HAS_BIAS,
                               HAS_BIAS_ABS, HAS_MASK, PRECISE)
        if HAS_FORCE:  # forced experts left the sum; each adds exp(row max + δ - mx)
            denom = denom + n_forced.to(tl.float32) * _exp(row_max + force_delta - mx, PRECISE)
        w = tl.where(ok, tl.math.div_rn(_exp(zs - mx[:, None], PRECISE), denom[:, None]), 0.0)
        if FAMILY == _V2_GREEDY:
            w = w * scaling
    elif FAMILY == _SPARSEMIXER:
        w = _sm_weights(logits_ptr, stride_t, rows, row_ok, tabs_ptr, E, force_delta, scaling, n_forced, sel, zs,
                        ecol, evals, eok, cand_left, last, near_any, l0, l1, l2, l3, l4, l5, l6, l7, l8, ROWS, S, E_PAD,
                        EVEN, K, SLOTS, N, CB, LOSSY, C_PAD, HAS_BIAS, HAS_BIAS_ABS, HAS_MASK, HAS_FORCE, PRECISE)
    else:  # gpt-oss's softmax over the k; a renormalised softmax-top-k is the same function of the picks
        e = _exp(zs - mx[:, None], PRECISE)
        w = tl.math.div_rn(e, tl.sum(e, 1)[:, None])
    _finish(w, sel, rows, row_ok, tabs_ptr, E, w_ptr, idx_ptr, K, SLOTS, HAS_BOOST, RENORM_BOOST)


# ---------------------------------------------------------------------------------------------------------------
# sparsemixer (PhiMoE): each round's weight is a softmax over the experts within 2ε (relative) of that round's pick
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _sm_term(x, t, jitter2, PRECISE: tl.constexpr):
    """``exp(x - t)`` where round ``t`` keeps ``x``, else 0: PhiMoE drops ``x`` when ``(t - x) / max(|x|, t) > 2ε``
    (the same float32 operations as ``triton_route._sparsemixer_kernel``, so the same sets; NaN, from -inf, is
    kept, at weight 0). The exponential is ``ex2.approx`` on the GPU, as in the other streamed sums (no selection
    depends on it); ``x - t`` is exact for the scores a round keeps (within a factor 2 of ``t``)."""
    drop = tl.math.div_rn(t - x, tl.maximum(tl.abs(x), t)) > jitter2
    if PRECISE:
        e = tl.math.exp2((x - t) * _LOG2E)
    else:
        e = tl.exp(x - t)
    return tl.where(drop, 0.0, e)


@triton.jit
def _sm_rounds(x, ok, zs, jitter2, K: tl.constexpr, SLOTS: tl.constexpr, PRECISE: tl.constexpr):
    """``[ROWS, SLOTS]``: what score ``x`` (``[ROWS]``, counted where ``ok``) adds to each round's sum when it is
    not a pick (every round sees it)."""
    slot = tl.arange(0, SLOTS)
    return tl.where(ok[:, None] & (slot[None, :] < K), _sm_term(x[:, None], zs, jitter2, PRECISE), 0.0)


@triton.jit
def _sm_weights(logits_ptr, stride_t, rows, row_ok, tabs_ptr, E, force_delta, jitter2, n_forced, sel, zs, ecol,
                evals, eok, cand, last, near_any, l0, l1, l2, l3, l4, l5, l6, l7, l8, ROWS: tl.constexpr,
                S: tl.constexpr, E_PAD: tl.constexpr, EVEN: tl.constexpr, K: tl.constexpr, SLOTS: tl.constexpr,
                N: tl.constexpr, CB: tl.constexpr, LOSSY: tl.constexpr, C_PAD: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr, HAS_MASK: tl.constexpr,
                HAS_FORCE: tl.constexpr, PRECISE: tl.constexpr):
    """Round j's weight ``1 / Σ exp(z' - t_j)`` over the experts not picked before round j that round j keeps
    (``t_j``: pick j's score, ``zs``). Only experts within 2ε·max(|z'|, t) of some ``t_j`` count, and the smallest
    pick bounds them all: below ``lo = t_min - |t_min|·1.01·2ε/(1-2ε)`` every round drops a score (with a 1 %
    margin over rounding). Those experts are: the picks, the keys ``_pick`` took that were not picks (with forced
    experts), the candidates left, and the list keys left above ``lo``, taken best first while any row has one.
    A thread whose last list key is above ``lo`` may have lost one; a block with one (or whose smallest pick is
    not finite, or whose 32-bit keys were near-tied) sums again over its logits (``_sm_again``)."""
    LOW: tl.constexpr = (1 << CB) - 1
    slot = tl.arange(0, SLOTS)
    ok = row_ok[:, None] & (slot[None, :] < K)
    t_min = tl.min(tl.where(ok, zs, float("inf")), 1)
    lo = t_min - tl.abs(t_min) * (1.01 * jitter2 / (1.0 - jitter2))
    lo_key = _order_bits(lo) & ~LOW  # every key of a score >= lo is >= lo_key
    acc = tl.zeros([ROWS, SLOTS], tl.float32)
    for jp in tl.static_range(K):  # the picks: pick jp counts in rounds 0..jp
        x = tl.max(tl.where(slot[None, :] == jp, zs, -float("inf")), 1)
        acc += tl.where(ok & (slot[None, :] <= jp), _sm_term(x[:, None], zs, jitter2, PRECISE), 0.0)
    if HAS_FORCE:  # _pick's last n_forced rounds took keys that are not picks
        if LOSSY:
            evals = _steered_at(logits_ptr, stride_t, rows, ecol, ok & eok, tabs_ptr, E, None, force_delta, HAS_BIAS,
                                False, False) + 0.0
        for j in tl.static_range(K):
            x = tl.max(tl.where(slot[None, :] == j, evals, -float("inf")), 1)
            okj = tl.max((eok & (slot[None, :] == j)).to(tl.int32), 1) != 0
            acc += _sm_rounds(x, row_ok & okj & (j + n_forced >= K), zs, jitter2, K, SLOTS, PRECISE)
    if C_PAD > 0:  # the candidates no round took
        vc = _from_order_bits((cand >> 32).to(tl.int32))
        for j in tl.static_range(K):
            tj = tl.max(tl.where(slot[None, :] == j, zs, -float("inf")), 1)
            sj = tl.sum(tl.where(cand > _TAKEN64, _sm_term(vc, tj[:, None], jitter2, PRECISE), 0.0), 1)
            acc += tl.where((slot[None, :] == j) & ok, sj[:, None], 0.0)
    go = tl.max(tl.max(((l0 >= lo_key[:, None]) & row_ok[:, None]).to(tl.int32), 1), 0)
    while go != 0:  # the list keys left above lo, best first (most blocks: none, or one or two rounds)
        m = tl.max(l0, 1)
        if LOSSY:
            mcol = (LOW - (m & LOW))[:, None]
            x = _steered_at(logits_ptr, stride_t, rows, mcol, (row_ok & (m > _NEG_INF_KEY))[:, None], tabs_ptr, E,
                            None, force_delta, HAS_BIAS, False, False) + 0.0
            x = tl.max(x, 1)
        else:
            x = _key_exact(m, CB)
        acc += _sm_rounds(x, row_ok & (m > _NEG_INF_KEY), zs, jitter2, K, SLOTS, PRECISE)
        l0, l1, l2, l3, l4, l5, l6, l7, l8 = _shift(l0 == m[:, None], l0, l1, l2, l3, l4, l5, l6, l7, l8, N)
        go = tl.max(tl.max(((l0 >= lo_key[:, None]) & row_ok[:, None]).to(tl.int32), 1), 0)
    lost = (last >= lo_key[:, None]) & row_ok[:, None]
    if (tl.max(tl.max(lost.to(tl.int32), 1), 0) != 0) | (near_any != 0) | (
            tl.max(((t_min == -float("inf")) & row_ok).to(tl.int32), 0) != 0):
        acc = _sm_again(logits_ptr, stride_t, rows, row_ok, tabs_ptr, E, sel, zs, n_forced, jitter2, ROWS, S, E_PAD,
                        EVEN, K, SLOTS, HAS_BIAS, HAS_BIAS_ABS, HAS_MASK, PRECISE)
    return tl.where(ok, tl.math.div_rn(1.0, acc), 0.0)


@triton.jit
def _sm_again(logits_ptr, stride_t, rows, row_ok, tabs_ptr, E, sel, zs, n_forced, jitter2, ROWS: tl.constexpr,
              S: tl.constexpr, E_PAD: tl.constexpr, EVEN: tl.constexpr, K: tl.constexpr, SLOTS: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr, HAS_MASK: tl.constexpr, PRECISE: tl.constexpr):
    """The rounds' sums streamed again (runtime loops: rare, register-light): an expert is in round j's set when
    its 64-bit key (order bits << 32 | 2^31 - 1 - column) is at most pick j's; forced experts, which left the
    stream (-inf), add 1 to each round before theirs."""
    lanes = _runs(S, False)
    slot = tl.arange(0, SLOTS)
    pkey = (_order_bits(zs).to(tl.int64) << 32) | (0x7FFFFFFF - sel).to(tl.int64)
    acc = tl.maximum(n_forced - slot, 0).to(tl.float32)[None, :] + tl.zeros([ROWS, SLOTS], tl.float32)
    base = logits_ptr + rows.to(tl.int64)[:, None, None] * stride_t
    for j in tl.range(0, K, loop_unroll_factor=1):
        tj = tl.max(tl.where(slot[None, :] == j, zs, -float("inf")), 1)
        kj = tl.max(tl.where(slot[None, :] == j, pkey, _TAKEN64), 1)
        a = tl.zeros([ROWS, S], tl.float32)
        for ch in tl.range(0, E_PAD // (8 * S), loop_unroll_factor=1):
            cols = ch * 8 * S + lanes
            _, zd = _chunk(base, cols, row_ok, tabs_ptr, E, EVEN, HAS_BIAS, HAS_BIAS_ABS, HAS_MASK)
            key = (_order_bits(zd).to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)
            term = _sm_term(zd, tj[:, None, None], jitter2, PRECISE)
            a += tl.sum(tl.where(key <= kj[:, None, None], term, 0.0), 2)
        acc += tl.where(slot[None, :] == j, tl.sum(a, 1)[:, None], 0.0)
    return acc


def stream_config(num_experts: int, num_tokens: int, threads_per_row: int | None = None,
                  num_warps: int | None = None) -> tuple[int, int, int, int]:
    """``(E_PAD, S, ROWS, num_warps)``: S threads per row (4 once the row has 32 experts: 64 contiguous bytes of
    bf16 per row and load), ``32 / S`` rows per warp, one warp."""
    e_pad = next_pow2(max(num_experts, 8))
    s = threads_per_row or min(4, e_pad // 8)
    s = max(1, min(s, e_pad // 8))
    if num_warps is None:
        num_warps = 1  # programs of one warp: more of them resident per SM, no block-wide barrier
    return e_pad, s, (32 // s) * num_warps, num_warps


SPARSE_MAX = 64  # special columns beyond which the dense tables (one load per column) are cheaper than gathers


def stream_rows(mask: np.ndarray, bias: np.ndarray, bias_abs: np.ndarray
                ) -> tuple[np.ndarray, tuple[int, int, bool]]:
    """The derived table rows DROP, FCOL, SPW, CCOL, DCOL, SDROP, CHOICE, BCHOICE (``triton_common``) of a layer, ``[8, E]``
    float32 (FCOL..DCOL as int32 bits), and for the sparse form: the counts of enabled biased columns and of
    disabled and forced columns, and whether any of the latter is biased."""
    E = mask.shape[0]
    drop = np.where(mask != 0, -np.inf, 0.0).astype(np.float32)
    special = (mask != 0) | (bias != 0) | (bias_abs != 0)
    rows = np.zeros((4, E), dtype=np.int32)
    forced = np.flatnonzero(mask > 0)
    rows[0, :forced.size] = forced
    words = np.zeros(-(-E // 32), dtype=np.uint64)
    np.add.at(words, np.flatnonzero(special) // 32, np.left_shift(1, np.flatnonzero(special) % 32).astype(np.uint64))
    rows[1, :words.size] = words.astype(np.uint32).view(np.int32)
    cand = np.flatnonzero(special & (mask == 0))
    dropped = np.flatnonzero(mask != 0)
    rows[2, :cand.size] = cand
    rows[3, :dropped.size] = dropped
    drop_biased = bool(((bias != 0) | (bias_abs != 0))[dropped].any())
    sdrop = np.where(special, -np.inf, 0.0).astype(np.float32)
    choice = np.where(mask > 0, np.inf, np.where(mask < 0, -np.inf, 0.0)).astype(np.float32)
    bchoice = (bias.astype(np.float32) + choice).astype(np.float32)
    return (np.concatenate([drop[None], rows.view(np.float32), sdrop[None], choice[None], bchoice[None]]),
            (int(cand.size), int(dropped.size), drop_biased))
