"""Streamed group-limited routing for DeepSeek-V3 (sigmoid scores, correction bias, groups scored by their top two)
and DeepSeek-V2's ``group_limited_greedy`` (softmax scores, groups scored by their best): the same functions as
``triton_route._deepseek_v3_kernel`` and ``_deepseek_v2_kernel`` (``reference.masked_route``), laid out like
``triton_stream``: a row belongs to ``S`` threads, each streaming 8-expert chunks of it.

Why: the rows kernel computes PyTorch's exact sigmoid (IEEE ``expf`` and a correctly rounded division, about 17
instructions) for every logit and spends a warp-wide reduction per pick; on the H100 it reached a sixth of the HBM
bandwidth at T = 65,536, E = 256, k = 8. Here:

1. Pass 1 scores the groups. A group is ``CPG`` consecutive chunks (DeepSeek-V3: 256 experts in 8 groups of 32,
   S = 4: one chunk), so each thread takes the top two of its share in registers and the S threads merge them. The
   choice scores ``c = sigmoid(z') + corr`` (±inf at forced / disabled experts) come from a fast sigmoid
   (``ex2.approx`` and ``rcp.approx``: within ``2^-21.1`` of PyTorch's, ``_slack``); no selection is final yet.
2. The ``TOPK_GROUP`` best groups (one reduction over the group keys per kept group) are streamed again (from L1/L2,
   not HBM) into each thread's sorted list of the k+1 best 32-bit keys (``triton_stream._absorb``), and the S
   threads pick k (``triton_stream._pick``). With ``RESIDENT`` (an option, off until timed:
   ``triton_route.GROUPED_RESIDENT``), where a group is one chunk and there are at most 8 (DeepSeek-V3's 256
   experts in 8 groups of 32, and E = 64 or 128 in 8 groups), the row is loaded at once in pass 1
   and its choice scores stay in registers (64 a thread), so pass 2 takes each kept group's chunk by a select per
   group and row instead of re-reading it: the re-read's rows keep different groups, so each of its per-column
   gathers (logits, correction bias, the spec's bias) cost L1 a wavefront per row, and its sigmoids ran again.
3. Certificate, per row: the picks' exact choice scores (recomputed from their logits, as PyTorch does) must all lie
   above the (k+1)-th key's bucket plus the fast sigmoid's error bound (``_slack``), and the kept groups' scores
   above the dropped ones' by twice the bound. Then the exact selection is this one (its order within the k aside:
   DeepSeek-V3 returns ``sorted=False``; here by fast-score rank). A row that fails (near-ties within ~2^-16,
   ties of equal scores at the boundary, fewer than k+1 finite scores in the kept groups) is selected again by the
   exact rows code (``triton_rows``: exact sigmoid; ties -> lower group / expert, as ``torch.topk`` on CUDA): for
   V3 in ``triton_route``'s second launch over the blocks this one flagged, a row a program; with ``IN_PLACE``
   (V2's default) here, in the stream's own program (``triton_route.GROUPED_IN_PLACE``, measured per family).

The weights are always the exact sigmoid of the picked logits, renormalised (+1e-20) and scaled as the rule does.

DeepSeek-V2 (``_v2_stream_kernel``) selects on the steered logits themselves (the softmax is monotone; the rows
kernel does the same), so the certificate needs no slack, and with 16-bit logits the keys are exact (equal scores
are true ties, ordered by index as the rule's) except at the few biased experts, whose float32 scores lose their
low bits: a boundary whose two sides share a key bucket is certain unless a biased expert's score falls in it (bf16
logits tie often: without this, every second block of T = 256 random rows went to the exact path). Pass 1 also sums the row's softmax, each thread against its running max (one extra ``ex2`` per
chunk instead of a fallback when the logits spread), and keeps the row max before masking (SteerMoE's force value,
only when something is forced); a group holding a forced expert scores +inf. Its uncertain rows go to the V2
rows code. Weights: ``exp(z' - max) / Σ · scaling``, the numerators IEEE as there.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (_BCHOICE, _BIAS, _BIAS_ABS, _CCOL, _CHOICE, _DROP, _FCOL, _MASK, _LOG2E, _TAKEN, _at_cols, _exp,
                            _cols8, _finish, _from_order_bits, _load8, _rcp, _runs, _split8, _steered_at)
from .triton_rows import _deepseek_v2_rows, _deepseek_v3_rows
from .triton_stream import _absorb, _empty_lists, _key32, _pick


@triton.jit
def _sigmoid(z, PRECISE: tl.constexpr):
    """PyTorch's CUDA sigmoid, bit for bit: ``1 / (1 + expf(-z))`` with IEEE expf and a correctly rounded divide."""
    return tl.math.div_rn(1.0, 1.0 + _exp(-z, PRECISE))


@triton.jit
def _fast_sigmoid(z, PRECISE: tl.constexpr):
    """``1 / (1 + 2^(-z·log2 e))`` through ``ex2.approx`` and ``rcp.approx`` (ftz): relative error below 2^-17 against
    the exact sigmoid (the rounded product z·log2 e, |z| < 104 where the result is not saturated, dominates), but
    absolute error below 2^-21.85 (``_slack``), which is what the certificate needs."""
    if PRECISE:
        return _rcp(1.0 + tl.math.exp2(z * -_LOG2E))
    else:
        return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _slack(x):
    """A bound on |fast choice score - exact choice score| near ``x``: the two sigmoids' difference plus the two
    roundings of ``s + corr`` (4x margin on each). The difference, first order in the roundings (ε = 2^-24):
    the product ``p = z·(-log2 e)`` and its rounded constant perturb ``2^p`` by ``|z|·2ε`` (relative), ``ex2.approx``
    by 2 ulp (4ε), which ``1 + e`` passes on scaled by ``1 - s`` and the reciprocal by ``s``: ``s(1-s)(2|z| + 4)ε``,
    with ``s(1-s)|z| <= 0.224`` and ``s(1-s) <= 1/4``; ``1 + e`` and ``rcp.approx`` (1 ulp) add ``3sε``. So the fast
    sigmoid is within ``4.45ε`` (2^-21.85) of the true one; PyTorch's (``expf``, 2 ulp, an IEEE divide) within
    ``3ε``; the two within ``7.45ε`` (2^-21.1), bounded here by 2^-19 (32ε). (An emulation at those extremes,
    every float32 rounding included, over a fine grid of |z| <= 110 and 2 M bf16 Gaussians, reached 2^-21.7.)
    Before, the relative bound times ``s <= 1`` (2^-16) made the group certificate flag ~4.5 % of the blocks of
    Gaussian rows, where this flags ~1.5 % (``benchmarks/v3_certificate.py``)."""
    return 1.9073486328125e-06 + tl.abs(x) * 4.76837158203125e-07  # 2^-19 + |x|·2^-21


@triton.jit
def _biased(raw, cols, tabs_ptr, E, HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr):
    """A chunk of logits at ``cols`` as float32 with the spec's biases: ``z + b + b_abs·|z|``."""
    z = raw.to(tl.float32)
    if HAS_BIAS:
        zb = z + _at_cols(tabs_ptr + _BIAS * E, cols, raw.shape)
        if HAS_BIAS_ABS:
            zb = zb + _at_cols(tabs_ptr + _BIAS_ABS * E, cols, raw.shape) * tl.abs(z)
        z = zb
    return z


@triton.jit
def _v2_choice(raw, cols, tabs_ptr, E, HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr,
               HAS_MASK: tl.constexpr):
    """DeepSeek-V2's choice order at a chunk: the biased logits, +inf at forced and -inf at disabled experts (the
    table's CHOICE row added: one float add for the mask's two selects; it also turns -0.0 into +0.0, which a float
    comparison, the rule's, does not tell apart). Biased and masked without ``bias_abs``: the BCHOICE row (bias +
    CHOICE), one table gather a logit instead of two (pass 2's rows keep different groups, so each of its table
    loads costs L1 as many wavefronts as the logits' own)."""
    if HAS_BIAS and HAS_MASK and not HAS_BIAS_ABS:
        return raw.to(tl.float32) + _at_cols(tabs_ptr + _BCHOICE * E, cols, raw.shape)
    z = _biased(raw, cols, tabs_ptr, E, HAS_BIAS, HAS_BIAS_ABS)
    if HAS_MASK:
        z = z + _at_cols(tabs_ptr + _CHOICE * E, cols, raw.shape)
    return z


@triton.jit
def _choice(raw, cols, tabs_ptr, corr_ptr, E, HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr,
            PRECISE: tl.constexpr):
    """The choice scores of a chunk of logits at ``cols``: ``sigmoid(z') + corr``, where ``corr`` already holds
    +inf at forced and -inf at disabled experts (``triton_route._v3_choice_bias``: the steered rule's choice bias,
    which it adds right after the correction bias)."""
    z = _biased(raw, cols, tabs_ptr, E, HAS_BIAS, HAS_BIAS_ABS)
    return _fast_sigmoid(z, PRECISE) + _at_cols(corr_ptr, cols, raw.shape).to(tl.float32)


@triton.jit
def _top2_merge(a1, a2, b1, b2):
    """The two best of two descending pairs."""
    return tl.maximum(a1, b1), tl.maximum(tl.minimum(a1, b1), tl.maximum(a2, b2))


@triton.jit
def _top2_of8(x):
    """The two best of the last dimension (8 entries, one thread's): pairs, then a tree of pair merges."""
    c0, c1, c2, c3, c4, c5, c6, c7 = _split8(x)
    a1, a2 = _top2_merge(tl.maximum(c0, c1), tl.minimum(c0, c1), tl.maximum(c2, c3), tl.minimum(c2, c3))
    b1, b2 = _top2_merge(tl.maximum(c4, c5), tl.minimum(c4, c5), tl.maximum(c6, c7), tl.minimum(c6, c7))
    return _top2_merge(a1, a2, b1, b2)


@triton.jit
def _group_key(gkey, mag, a1, a2, g, gid, GB: tl.constexpr):
    """Group ``g``'s key into ``gkey`` from each thread's two best choice scores of it (``a1 >= a2``, ``[ROWS, S]``):
    the S threads' pairs merged, their sum (the rule's ``topk(2).sum``) as order bits with the group in the low GB
    bits; ``mag``: the largest finite magnitude of a group's two best scores so far (their rounding errors scale
    with it)."""
    m1, m2 = tl.reduce((a1, a2), 1, _top2_merge)
    m12 = tl.maximum(tl.abs(m1), tl.abs(m2))
    mag = tl.maximum(mag, tl.where(m12 < float("inf"), m12, 0.0))
    return tl.where(gid[None, :] == g, _key32(m1 + m2, g, GB)[:, None], gkey), mag


@triton.jit
def _key_upper(key, CB: tl.constexpr):
    """The largest float32 whose 32-bit key (order bits, low CB bits replaced) has the high bits of ``key``."""
    return _from_order_bits(key | ((1 << CB) - 1))


@triton.jit
def _group_into(gkey, mag, base, row_ok, tabs_ptr, corr_ptr, E, g, lanes, gid, S: tl.constexpr, CPG: tl.constexpr,
                GB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr, PRECISE: tl.constexpr):
    """Group ``g``'s key into ``gkey`` (``_group_key``), its ``CPG`` chunks streamed."""
    a1 = tl.full([row_ok.shape[0], S], -float("inf"), tl.float32)
    a2 = a1
    for ci in tl.static_range(CPG):
        cols = (g * CPG + ci) * 8 * S + lanes
        raw = _load8(base + cols, row_ok[:, None, None])
        b1, b2 = _top2_of8(_choice(raw, cols, tabs_ptr, corr_ptr, E, HAS_BIAS, HAS_BIAS_ABS, PRECISE))
        a1, a2 = _top2_merge(a1, a2, b1, b2)
    return _group_key(gkey, mag, a1, a2, g, gid, GB)


@triton.jit
def _v3_group_resident(gkey, mag, raw, g: tl.constexpr, lanes, gid, tabs_ptr, corr_ptr, E, S: tl.constexpr,
                       GB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr,
                       PRECISE: tl.constexpr):
    """Group ``g``'s key from its one chunk of logits ``raw`` (``RESIDENT``), and the chunk's choice scores, which
    stay in registers for pass 2."""
    x = _choice(raw, g * 8 * S + lanes, tabs_ptr, corr_ptr, E, HAS_BIAS, HAS_BIAS_ABS, PRECISE)
    a1, a2 = _top2_of8(x)
    gkey, mag = _group_key(gkey, mag, a1, a2, g, gid, GB)
    return gkey, mag, x


@triton.jit
def _nth8(i: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7):
    """The ``i``-th of eight (a compile-time index: Triton has no lists of tensors)."""
    x = a0
    if i == 1:
        x = a1
    if i == 2:
        x = a2
    if i == 3:
        x = a3
    if i == 4:
        x = a4
    if i == 5:
        x = a5
    if i == 6:
        x = a6
    if i == 7:
        x = a7
    return x


@triton.jit
def _put8(i: tl.constexpr, v, a0, a1, a2, a3, a4, a5, a6, a7):
    """The eight with the ``i``-th replaced by ``v``."""
    if i == 0:
        a0 = v
    if i == 1:
        a1 = v
    if i == 2:
        a2 = v
    if i == 3:
        a3 = v
    if i == 4:
        a4 = v
    if i == 5:
        a5 = v
    if i == 6:
        a6 = v
    if i == 7:
        a7 = v
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _load_row(base, row_ok, lanes, S: tl.constexpr, NCH: tl.constexpr):
    """A row's ``NCH`` (<= 8) chunks of ``8·S`` logits, loaded before any is used, so that their HBM latencies
    overlap (``RESIDENT``); the chunks past NCH repeat the first (never used)."""
    r0 = _load8(base + lanes, row_ok[:, None, None])
    r1, r2, r3, r4, r5, r6, r7 = r0, r0, r0, r0, r0, r0, r0
    for i in tl.static_range(1, NCH):
        r = _load8(base + i * 8 * S + lanes, row_ok[:, None, None])
        r0, r1, r2, r3, r4, r5, r6, r7 = _put8(i, r, r0, r1, r2, r3, r4, r5, r6, r7)
    return r0, r1, r2, r3, r4, r5, r6, r7


@triton.jit
def _next_group(gkey, row_ok, GB: tl.constexpr, N_GROUP: tl.constexpr):
    """The best remaining group per row (all of the row when there is one group): the group keys without it, its
    key and its index."""
    if N_GROUP > 1:
        gm = tl.max(gkey, 1)
        gkey = tl.where(gkey == gm[:, None], _TAKEN, gkey)
        g = (1 << GB) - 1 - (gm & ((1 << GB) - 1))
    else:
        gm = tl.zeros([row_ok.shape[0]], tl.int32)
        g = gm
    return gkey, gm, g


@triton.jit
def _kept_resident(l0, l1, l2, l3, l4, l5, l6, l7, l8, gkey, row_ok, x0, x1, x2, x3, x4, x5, x6, x7, lanes,
                   S: tl.constexpr, N: tl.constexpr, CB: tl.constexpr, GB: tl.constexpr, N_GROUP: tl.constexpr):
    """``_kept_into`` from registers (``RESIDENT``: a chunk a group, ``x0`` ... its choice scores): the best remaining
    group's chunk, picked per row by a select per group, into each thread's list of the N best keys. No load: the
    streamed pass 2's rows keep different groups, so each of its per-column gathers cost L1 a wavefront per row."""
    gkey, gm, g = _next_group(gkey, row_ok, GB, N_GROUP)
    gi = g[:, None, None]
    x = x0
    for i in tl.static_range(1, N_GROUP):
        x = tl.where(gi == i, _nth8(i, x0, x1, x2, x3, x4, x5, x6, x7), x)
    key = _key32(x, _cols8(gi * 8 * S + lanes), CB)
    l0, l1, l2, l3, l4, l5, l6, l7, l8 = _absorb(l0, l1, l2, l3, l4, l5, l6, l7, l8, key, N)
    return l0, l1, l2, l3, l4, l5, l6, l7, l8, gkey, gm


@triton.jit
def _kept_into(l0, l1, l2, l3, l4, l5, l6, l7, l8, gkey, base, row_ok, tabs_ptr, corr_ptr, E, lanes,
               S: tl.constexpr, CPG: tl.constexpr, N: tl.constexpr, CB: tl.constexpr, GB: tl.constexpr,
               N_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr,
               HAS_MASK: tl.constexpr, PRECISE: tl.constexpr, V2: tl.constexpr = False):
    """The best remaining group (the one with the largest key; all of the row when there is one group) into each
    thread's list of the N best keys; returns the lists, the group keys without it, and its key. ``V2``: the
    choice scores are DeepSeek-V2's steered logits (``HAS_MASK``: its CHOICE row), else V3's sigmoid + correction
    (the mask folded in)."""
    gkey, gm, g = _next_group(gkey, row_ok, GB, N_GROUP)
    for ci in tl.static_range(CPG):
        cols = ((g * CPG + ci) * 8 * S)[:, None, None] + lanes
        raw = _load8(base + cols, row_ok[:, None, None])
        if V2:
            x = _v2_choice(raw, cols, tabs_ptr, E, HAS_BIAS, HAS_BIAS_ABS, HAS_MASK)
        else:
            x = _choice(raw, cols, tabs_ptr, corr_ptr, E, HAS_BIAS, HAS_BIAS_ABS, PRECISE)
        key = _key32(x, _cols8(cols), CB)
        l0, l1, l2, l3, l4, l5, l6, l7, l8 = _absorb(l0, l1, l2, l3, l4, l5, l6, l7, l8, key, N)
    return l0, l1, l2, l3, l4, l5, l6, l7, l8, gkey, gm


@triton.jit
def _v3_select(logits_ptr, stride_t, rows, row_ok, tabs_ptr, corr_ptr, E, ROWS: tl.constexpr, S: tl.constexpr,
               K: tl.constexpr, SLOTS: tl.constexpr, SLOTS1: tl.constexpr, CB: tl.constexpr, CPG: tl.constexpr,
               N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr, GB: tl.constexpr,
               UNROLL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr,
               PRECISE: tl.constexpr, WIDE: tl.constexpr, RESIDENT: tl.constexpr):
    """Passes 1 and 2 and the certificate (module docstring), with the fast sigmoid. Returns the ``[ROWS, SLOTS]``
    picks, their exact sigmoids, and per row whether the selection is certain. ``UNROLL``: the group loops
    unrolled (more loads in flight, more registers) or runtime loops. ``WIDE``: 32-bit logits (``_runs``).
    ``RESIDENT`` (a chunk a group, at most 8 groups: DeepSeek-V3's 256 experts in 8 groups of 32): the row is
    loaded at once and its choice scores stay in registers, so pass 2 neither loads nor recomputes a sigmoid."""
    tl.static_assert(not RESIDENT or (CPG == 1 and N_GROUP <= 8), "RESIDENT: a chunk a group, at most 8 groups")
    lanes = _runs(S, WIDE)
    base = logits_ptr + rows.to(tl.int64)[:, None, None] * stride_t
    N: tl.constexpr = K + 1  # the (k+1)-th best bounds what was left out
    gid = tl.arange(0, G_PAD)
    sure = row_ok
    gkey = tl.full([ROWS, G_PAD], _TAKEN, tl.int32)
    mag = tl.zeros([ROWS], tl.float32)
    if RESIDENT:  # pass 1 from one load of the row; pass 2 from registers
        r0, r1, r2, r3, r4, r5, r6, r7 = _load_row(base, row_ok, lanes, S, N_GROUP)
        x0 = r0.to(tl.float32)  # placeholders for the chunks' choice scores, set in turn
        x1, x2, x3, x4, x5, x6, x7 = x0, x0, x0, x0, x0, x0, x0
        for g in tl.static_range(N_GROUP):
            gkey, mag, x = _v3_group_resident(gkey, mag, _nth8(g, r0, r1, r2, r3, r4, r5, r6, r7), g, lanes, gid,
                                              tabs_ptr, corr_ptr, E, S, GB, HAS_BIAS, HAS_BIAS_ABS, PRECISE)
            x0, x1, x2, x3, x4, x5, x6, x7 = _put8(g, x, x0, x1, x2, x3, x4, x5, x6, x7)
    elif N_GROUP > 1:  # pass 1: the group keys
        if UNROLL:
            for g in tl.static_range(N_GROUP):
                gkey, mag = _group_into(gkey, mag, base, row_ok, tabs_ptr, corr_ptr, E, g, lanes, gid, S, CPG, GB,
                                        HAS_BIAS, HAS_BIAS_ABS, PRECISE)
        else:
            for g in tl.range(0, N_GROUP, loop_unroll_factor=1, num_stages=1):
                gkey, mag = _group_into(gkey, mag, base, row_ok, tabs_ptr, corr_ptr, E, g, lanes, gid, S, CPG, GB,
                                        HAS_BIAS, HAS_BIAS_ABS, PRECISE)
    l0, l1, l2, l3, l4, l5, l6, l7, l8 = _empty_lists(ROWS, S)
    gm = tl.zeros([ROWS], tl.int32)
    if RESIDENT:
        for j in tl.static_range(TOPK_GROUP):
            l0, l1, l2, l3, l4, l5, l6, l7, l8, gkey, gm = _kept_resident(
                l0, l1, l2, l3, l4, l5, l6, l7, l8, gkey, row_ok, x0, x1, x2, x3, x4, x5, x6, x7, lanes, S, N, CB,
                GB, N_GROUP)
    elif UNROLL:  # pass 2: the kept groups, best first
        for j in tl.static_range(TOPK_GROUP):
            l0, l1, l2, l3, l4, l5, l6, l7, l8, gkey, gm = _kept_into(
                l0, l1, l2, l3, l4, l5, l6, l7, l8, gkey, base, row_ok, tabs_ptr, corr_ptr, E, lanes, S, CPG, N, CB,
                GB, N_GROUP, HAS_BIAS, HAS_BIAS_ABS, False, PRECISE)
    else:
        for j in tl.range(0, TOPK_GROUP, loop_unroll_factor=1, num_stages=1):
            l0, l1, l2, l3, l4, l5, l6, l7, l8, gkey, gm = _kept_into(
                l0, l1, l2, l3, l4, l5, l6, l7, l8, gkey, base, row_ok, tabs_ptr, corr_ptr, E, lanes, S, CPG, N, CB,
                GB, N_GROUP, HAS_BIAS, HAS_BIAS_ABS, False, PRECISE)
    if N_GROUP > TOPK_GROUP:  # the kept groups above the dropped ones by more than both scores' error bounds
        lo = _key_upper(gm & ~((1 << GB) - 1), 0)
        hi = _key_upper(tl.max(gkey, 1), GB)
        sure = sure & (lo - hi > 8.0 * _slack(mag))  # each score sums two fast scores (4x margin)
    picked = _pick(l0, l1, l2, l3, l4, l5, l6, l7, l8, None, 0, ROWS, K, SLOTS, N, CB, True, SLOTS1)
    sel, last = picked[0], picked[17]
    ok = row_ok[:, None] & (tl.arange(0, SLOTS)[None, :] < K)
    zs = _steered_at(logits_ptr, stride_t, rows, sel, ok, tabs_ptr, E, None, 0.0, HAS_BIAS, False, False)
    sg = _sigmoid(zs, PRECISE)
    cs = sg + tl.load(corr_ptr + sel, mask=ok, other=0.0).to(tl.float32)  # the mask is in corr
    low = tl.min(tl.where(ok, cs, float("inf")), 1)  # the picks' exact scores, lowest
    up = tl.where(last > _TAKEN, _key_upper(last, CB), -float("inf"))  # what was left out: its key's bucket, top
    finite = up > -float("inf")
    up = tl.where(finite, up + _slack(tl.where(finite, up, 0.0)), -float("inf"))
    return sel, sg, sure & (low > up)


@triton.jit
def _flagged(bad, redo_ptr, n_redo_ptr, IN_PLACE: tl.constexpr, COUNT: tl.constexpr):
    """A block with uncertain rows (``bad``): listed at ``redo_ptr`` for the redo launch, or (``IN_PLACE``) counted
    at ``n_redo_ptr`` if ``COUNT``; whether its rows are to be selected again here."""
    any_bad = tl.max(bad, 0) != 0
    if any_bad and not IN_PLACE:
        tl.store(redo_ptr + tl.atomic_add(n_redo_ptr, 1), tl.program_id(0))
    if any_bad and IN_PLACE and COUNT:
        tl.atomic_add(n_redo_ptr, tl.sum(bad, 0))
    return any_bad and IN_PLACE


@triton.jit
def _unsure(bad, r, ROWS: tl.constexpr):
    """Whether row ``r`` of the block is flagged in ``bad`` (``[ROWS]`` int32), as a scalar."""
    return tl.sum(tl.where(tl.arange(0, ROWS) == r, bad, 0), 0) != 0


@triton.jit
def _select_again(bad, logits_ptr, stride_t, tabs_ptr, corr_ptr, w_ptr, idx_ptr, T, E, force_delta, scaling,
                  ROWS: tl.constexpr, K: tl.constexpr, R_SLOTS: tl.constexpr, E_PAD: tl.constexpr, CB: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_FORCE: tl.constexpr, HAS_BOOST: tl.constexpr,
                  RENORM_BOOST: tl.constexpr, RENORM: tl.constexpr, PRECISE: tl.constexpr, PER_GROUP: tl.constexpr,
                  N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr, RESHAPE: tl.constexpr,
                  V2: tl.constexpr):
    """The block's rows flagged in ``bad`` selected and written again by ``triton_rows``' exact code, one row to
    the warp (``R_SLOTS``, ``PER_GROUP``, ``RESHAPE``: the keywords of its tile): DeepSeek-V2 grouped's
    (``V2``; ``HAS_FORCE`` its force flag, δ > 0) or V3's (``corr_ptr``, ``RENORM``)."""
    cols = tl.arange(0, E_PAD)
    for r in tl.range(0, ROWS, loop_unroll_factor=1):
        if _unsure(bad, r, ROWS):
            one = tl.program_id(0) * ROWS + r + tl.arange(0, 1)
            if V2:
                _deepseek_v2_rows(logits_ptr, stride_t, tabs_ptr, w_ptr, idx_ptr, E, force_delta, scaling, one,
                                  one < T, cols, cols < E, K, R_SLOTS, E_PAD, 1, CB, HAS_BIAS, HAS_MASK, HAS_FORCE,
                                  HAS_BOOST, RENORM_BOOST, PRECISE, True, PER_GROUP, N_GROUP, TOPK_GROUP, G_PAD,
                                  RESHAPE)
            else:
                _deepseek_v3_rows(logits_ptr, stride_t, tabs_ptr, corr_ptr, w_ptr, idx_ptr, E, force_delta, scaling,
                                  one, one < T, cols, cols < E, K, R_SLOTS, E_PAD, 1, CB, HAS_BIAS, HAS_MASK,
                                  HAS_BOOST, RENORM_BOOST, RENORM, PRECISE, PER_GROUP, N_GROUP, TOPK_GROUP, G_PAD,
                                  RESHAPE)


@triton.jit
def _v3_stream_kernel(logits_ptr, stride_t, tabs_ptr, corr_ptr, w_ptr, idx_ptr, T, E, scaling, redo_ptr, n_redo_ptr,
                      K: tl.constexpr, SLOTS: tl.constexpr, SLOTS1: tl.constexpr, E_PAD: tl.constexpr,
                      S: tl.constexpr, ROWS: tl.constexpr, CB: tl.constexpr, CPG: tl.constexpr,
                      N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr, GB: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr, HAS_MASK: tl.constexpr,
                      HAS_BOOST: tl.constexpr, RENORM_BOOST: tl.constexpr, RENORM: tl.constexpr,
                      PRECISE: tl.constexpr, UNROLL: tl.constexpr, R_SLOTS: tl.constexpr, PER_GROUP: tl.constexpr,
                      RESHAPE: tl.constexpr, WIDE: tl.constexpr = False, IN_PLACE: tl.constexpr = False,
                      COUNT: tl.constexpr = False, RESIDENT: tl.constexpr = False):
    """``DeepseekV3Rule`` (see the module docstring); E = E_PAD, groups of ``CPG`` chunks of ``8·S`` experts
    (``RESIDENT``: ``_v3_select``'s).
    The certain rows are written from the stream. ``IN_PLACE``: each uncertain one is then selected again here by
    ``triton_rows``' exact V3 rows code, one row to the warp (``R_SLOTS``, ``PER_GROUP``, ``RESHAPE``: its tile's
    keywords; ``COUNT``: their number added at ``n_redo_ptr``, for tests); else the block's index goes to
    ``redo_ptr`` (``n_redo_ptr`` counts them) for ``triton_route``'s redo launch of the rows kernel, whose time is
    the latency of one flagged row in it (``REDO_ROWS`` = 1, V3's default: a row a program).
    The spec's mask arrives folded into ``corr`` (``triton_route._v3_choice_bias``), so ``HAS_MASK`` must be off."""
    tl.static_assert(not HAS_MASK, "DeepSeek-V3's mask rides in corr_ptr (_v3_choice_bias): launch with HAS_MASK off")
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < T
    sel, sg, sure = _v3_select(logits_ptr, stride_t, rows, row_ok, tabs_ptr, corr_ptr, E, ROWS, S, K, SLOTS, SLOTS1,
                               CB, CPG, N_GROUP, TOPK_GROUP, G_PAD, GB, UNROLL, HAS_BIAS, HAS_BIAS_ABS,
                               PRECISE, WIDE, RESIDENT)
    ok = row_ok[:, None] & (tl.arange(0, SLOTS)[None, :] < K)
    w = tl.where(ok, sg, 0.0)
    if RENORM:
        w = tl.math.div_rn(w, (tl.sum(w, 1) + 1e-20)[:, None])
    w = w * scaling
    _finish(w, sel, rows, row_ok & sure, tabs_ptr, E, w_ptr, idx_ptr, K, SLOTS, HAS_BOOST, RENORM_BOOST)
    bad = (row_ok & ~sure).to(tl.int32)
    if _flagged(bad, redo_ptr, n_redo_ptr, IN_PLACE, COUNT):
        _select_again(bad, logits_ptr, stride_t, tabs_ptr, corr_ptr, w_ptr, idx_ptr, T, E, 0.0, scaling, ROWS, K,
                      R_SLOTS, E_PAD, CB, HAS_BIAS, False, False, HAS_BOOST, RENORM_BOOST, RENORM, PRECISE,
                      PER_GROUP, N_GROUP, TOPK_GROUP, G_PAD, RESHAPE, False)


@triton.jit
def _exp_off(z, off, PRECISE: tl.constexpr):
    """``exp(z - off)`` for the softmax sums (no selection depends on them): on the GPU one fma against
    ``off·log2 e`` (one product per thread and row) and ``ex2.approx``."""
    if PRECISE:
        return tl.math.exp2(tl.fma(z, _LOG2E, -(off * _LOG2E)))
    else:
        return tl.exp(z - off)


@triton.jit
def _rescale(off, new, PRECISE: tl.constexpr):
    """``exp(off - new)``, exactly 1 where the offset did not move: through the fma, ``off·log2 e - round(off·log2
    e)`` is that product's rounding error, a factor of 1 ± 2^-24·|off| on the sum at every chunk."""
    return tl.where(new == off, 1.0, _exp_off(off, new, PRECISE))


@triton.jit
def _v2_chunk_into(best, off, sm, raw_max, raw, cols, tabs_ptr, E, HAS_BIAS: tl.constexpr,
                   HAS_BIAS_ABS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_FORCE: tl.constexpr,
                   PRECISE: tl.constexpr, CHOICE: tl.constexpr):
    """DeepSeek-V2's pass 1 over a chunk of logits at ``cols``: each thread's best enabled steered logit ``best``,
    its softmax sum ``sm`` of the enabled experts against its offset ``off``, ``raw_max`` (the biased logits' max
    before masking: the force value's base, with ``HAS_FORCE``); and (``CHOICE``: the resident form) the chunk's
    choice order, ``_v2_choice``'s values (``z' + CHOICE`` is ``raw + BCHOICE`` bit for bit), for pass 2."""
    z = _biased(raw, cols, tabs_ptr, E, HAS_BIAS, HAS_BIAS_ABS)
    if HAS_FORCE:
        raw_max = tl.maximum(raw_max, tl.max(z, 2))
    zc = z
    if HAS_MASK:  # disabled and forced experts leave the sum (forced ones come back as exp(0) each)
        if CHOICE:
            zc = z + _at_cols(tabs_ptr + _CHOICE * E, cols, raw.shape)
        z = z + _at_cols(tabs_ptr + _DROP * E, cols, raw.shape)
    top = tl.max(z, 2)
    best = tl.maximum(best, top)
    # a new offset only where the chunk's best is far above it (the terms stay below e^16): each change costs
    # the earlier terms a rounding (rtol 2e-6 failed with one at every new max)
    new = tl.where(top > off + 16.0, top, off)
    sm = sm * _rescale(off, new, PRECISE) + tl.sum(_exp_off(z, new[:, :, None], PRECISE), 2)
    return best, new, sm, raw_max, zc


@triton.jit
def _v2_group_key(gkey, hi, best, g, fgroup, gid, GB: tl.constexpr, HAS_FORCE: tl.constexpr):
    """Group ``g``'s key from each thread's best of it: the best (+inf where it holds a forced expert: ``fgroup``,
    the forced experts' groups) into ``gkey``; ``hi``, each thread's best so far."""
    hi = tl.maximum(hi, best)
    score = tl.max(best, 1)
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties +0.0, as in the rule; its key would order them
    if HAS_FORCE:
        score = tl.where(tl.max((fgroup == g).to(tl.int32), 0) > 0, float("inf"), score)
    return tl.where(gid[None, :] == g, _key32(score, g, GB)[:, None], gkey), hi


@triton.jit
def _v2_group_into(gkey, off, sm, hi, raw_max, base, row_ok, tabs_ptr, E, g, fgroup, lanes, gid, S: tl.constexpr,
                   CPG: tl.constexpr, GB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr,
                   HAS_MASK: tl.constexpr, HAS_FORCE: tl.constexpr, PRECISE: tl.constexpr):
    """DeepSeek-V2's pass 1 over group ``g``, its ``CPG`` chunks streamed (``_v2_chunk_into``, ``_v2_group_key``)."""
    best = tl.full([row_ok.shape[0], S], -float("inf"), tl.float32)
    for ci in tl.static_range(CPG):
        cols = (g * CPG + ci) * 8 * S + lanes
        raw = _load8(base + cols, row_ok[:, None, None])
        best, off, sm, raw_max, _ = _v2_chunk_into(best, off, sm, raw_max, raw, cols, tabs_ptr, E, HAS_BIAS,
                                                   HAS_BIAS_ABS, HAS_MASK, HAS_FORCE, PRECISE, False)
    gkey, hi = _v2_group_key(gkey, hi, best, g, fgroup, gid, GB, HAS_FORCE)
    return gkey, off, sm, hi, raw_max


@triton.jit
def _v2_group_resident(gkey, off, sm, hi, raw_max, raw, g: tl.constexpr, fgroup, lanes, gid, tabs_ptr, E,
                       S: tl.constexpr, GB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr,
                       HAS_MASK: tl.constexpr, HAS_FORCE: tl.constexpr, PRECISE: tl.constexpr):
    """``_v2_group_into`` for a group of one chunk already loaded (``RESIDENT``), also returning the chunk's choice
    order, which stays in registers for pass 2."""
    best = tl.full([raw_max.shape[0], S], -float("inf"), tl.float32)
    best, off, sm, raw_max, x = _v2_chunk_into(best, off, sm, raw_max, raw, g * 8 * S + lanes, tabs_ptr, E,
                                               HAS_BIAS, HAS_BIAS_ABS, HAS_MASK, HAS_FORCE, PRECISE, True)
    gkey, hi = _v2_group_key(gkey, hi, best, g, fgroup, gid, GB, HAS_FORCE)
    return gkey, off, sm, hi, raw_max, x


@triton.jit
def _v2_select(logits_ptr, stride_t, rows, row_ok, tabs_ptr, E, force_delta, scaling, n_forced, n_cand,
               EXACT: tl.constexpr, ROWS: tl.constexpr, S: tl.constexpr, K: tl.constexpr, SLOTS: tl.constexpr, SLOTS1: tl.constexpr,
               CB: tl.constexpr, CPG: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
               G_PAD: tl.constexpr, GB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr,
               HAS_MASK: tl.constexpr, HAS_FORCE: tl.constexpr, PRECISE: tl.constexpr, WIDE: tl.constexpr,
               RESIDENT: tl.constexpr):
    """DeepSeek-V2 group-limited greedy (module docstring): the ``[ROWS, SLOTS]`` picks, their weights, and per
    row whether the selection is certain. ``EXACT``: 16-bit logits, whose keys lose nothing outside the ``n_cand``
    enabled biased experts (listed in the table's ``CCOL`` row). ``WIDE``: 32-bit logits (``_runs``).
    ``RESIDENT``: as ``_v3_select``'s (the choice order kept in registers, pass 2 without loads)."""
    tl.static_assert(not RESIDENT or (CPG == 1 and N_GROUP <= 8), "RESIDENT: a chunk a group, at most 8 groups")
    lanes = _runs(S, WIDE)
    base = logits_ptr + rows.to(tl.int64)[:, None, None] * stride_t
    N: tl.constexpr = K + 1
    PER_GROUP: tl.constexpr = CPG * 8 * S
    gid = tl.arange(0, G_PAD)
    slot = tl.arange(0, SLOTS)
    fgroup = tl.full([SLOTS], -1, tl.int32)
    if HAS_FORCE:  # the forced experts' groups, from the table's list of forced columns
        fcol = tl.load(tabs_ptr.to(tl.pointer_type(tl.int32)) + _FCOL * E + slot, mask=slot < n_forced, other=0)
        fgroup = tl.where(slot < n_forced, fcol // PER_GROUP, -1)
    gkey = tl.full([ROWS, G_PAD], _TAKEN, tl.int32)
    off = tl.full([ROWS, S], -2.0 ** 100, tl.float32)  # finite, and off·log2 e exact: no term yet
    sm = tl.zeros([ROWS, S], tl.float32)
    hi = tl.full([ROWS, S], -float("inf"), tl.float32)
    raw_max = hi
    if RESIDENT:  # pass 1 from one load of the row
        r0, r1, r2, r3, r4, r5, r6, r7 = _load_row(base, row_ok, lanes, S, N_GROUP)
        x0 = r0.to(tl.float32)  # placeholders for the chunks' choice order, set in turn
        x1, x2, x3, x4, x5, x6, x7 = x0, x0, x0, x0, x0, x0, x0
        for g in tl.static_range(N_GROUP):
            gkey, off, sm, hi, raw_max, x = _v2_group_resident(
                gkey, off, sm, hi, raw_max, _nth8(g, r0, r1, r2, r3, r4, r5, r6, r7), g, fgroup, lanes, gid,
                tabs_ptr, E, S, GB, HAS_BIAS, HAS_BIAS_ABS, HAS_MASK, HAS_FORCE, PRECISE)
            x0, x1, x2, x3, x4, x5, x6, x7 = _put8(g, x, x0, x1, x2, x3, x4, x5, x6, x7)
    else:
        for g in tl.static_range(N_GROUP):  # pass 1
            gkey, off, sm, hi, raw_max = _v2_group_into(gkey, off, sm, hi, raw_max, base, row_ok, tabs_ptr, E, g,
                                                        fgroup, lanes, gid, S, CPG, GB, HAS_BIAS, HAS_BIAS_ABS,
                                                        HAS_MASK, HAS_FORCE, PRECISE)
    l0, l1, l2, l3, l4, l5, l6, l7, l8 = _empty_lists(ROWS, S)
    gm = tl.zeros([ROWS], tl.int32)
    for j in tl.static_range(TOPK_GROUP):  # pass 2: the kept groups, best first
        if RESIDENT:
            l0, l1, l2, l3, l4, l5, l6, l7, l8, gkey, gm = _kept_resident(
                l0, l1, l2, l3, l4, l5, l6, l7, l8, gkey, row_ok, x0, x1, x2, x3, x4, x5, x6, x7, lanes, S, N, CB,
                GB, N_GROUP)
        else:
            l0, l1, l2, l3, l4, l5, l6, l7, l8, gkey, gm = _kept_into(
                l0, l1, l2, l3, l4, l5, l6, l7, l8, gkey, base, row_ok, tabs_ptr, None, E, lanes, S, CPG, N, CB,
                GB, N_GROUP, HAS_BIAS, HAS_BIAS_ABS, HAS_MASK, PRECISE, True)
    picked = _pick(l0, l1, l2, l3, l4, l5, l6, l7, l8, None, 0, ROWS, K, SLOTS, N, CB, True, SLOTS1)
    sel, last = picked[0], picked[17]
    ok = row_ok[:, None] & (slot[None, :] < K)
    # the certificate's exact ties: with 16-bit logits (EXACT) only the biased experts' keys can have lost bits; a
    # tie of buckets at a boundary is exact unless one of them falls in that bucket
    clash_p = tl.zeros([ROWS], tl.int1)
    clash_g = clash_p
    if EXACT and HAS_BIAS:
        itabs = tabs_ptr.to(tl.pointer_type(tl.int32))
        for j in tl.range(0, n_cand):
            col = tl.load(itabs + _CCOL * E + j)
            zc = tl.load(logits_ptr + rows.to(tl.int64) * stride_t + col, mask=row_ok, other=0.0).to(tl.float32)
            zc = (zc + tl.load(tabs_ptr + _BIAS * E + col)) + tl.load(tabs_ptr + _BIAS_ABS * E + col) * tl.abs(zc)
            clash_p = clash_p | ((_key32(zc, 0, CB) >> CB) == (last >> CB))
            clash_g = clash_g | ((_key32(zc, 0, GB) >> GB) == (gm >> GB))
    sure = row_ok
    if N_GROUP > TOPK_GROUP:  # the kept groups' scores above the dropped ones' (their keys' buckets apart)
        apart = _key_upper(gm & ~((1 << GB) - 1), 0) > _key_upper(tl.max(gkey, 1), GB)
        if EXACT:
            apart = apart | ~clash_g
        sure = sure & apart
    # the softmax: each thread's sum brought to the row max of the enabled experts, then to the force value
    m_row = tl.max(hi, 1)
    total = tl.sum(sm * _rescale(off, m_row[:, None], PRECISE), 1)
    top = m_row
    if HAS_FORCE:
        raw_row = tl.max(raw_max, 1)
        top = raw_row + force_delta
        total = n_forced + total * _exp_off(m_row, top, PRECISE)
    else:
        raw_row = m_row  # nothing is forced: unused
    zs = _steered_at(logits_ptr, stride_t, rows, sel, ok, tabs_ptr, E, raw_row, force_delta, HAS_BIAS, HAS_MASK,
                     True)
    cs = zs  # the picks' exact choice scores
    if HAS_MASK:
        cs = tl.where(tl.load(tabs_ptr + _MASK * E + sel, mask=ok, other=0.0) > 0, float("inf"), zs)
    low = tl.min(tl.where(ok, cs, float("inf")), 1)
    up = tl.where(last > _TAKEN, _key_upper(last, CB), -float("inf"))  # what was left out: its key's bucket, top
    apart = low > up
    if EXACT:  # -0.0 left out (up == 0) could tie a +0.0 pick of a higher column
        apart = apart | ((low > -float("inf")) & (up != 0.0) & ~clash_p)
    sure = sure & apart
    w = tl.where(ok, tl.math.div_rn(_exp(zs - top[:, None], PRECISE), total[:, None]) * scaling, 0.0)
    return sel, w, sure


@triton.jit(do_not_specialize=["n_forced", "n_cand"])
def _v2_stream_kernel(logits_ptr, stride_t, tabs_ptr, w_ptr, idx_ptr, T, E, force_delta, scaling, n_forced, n_cand,
                      redo_ptr, n_redo_ptr, EXACT: tl.constexpr, K: tl.constexpr, SLOTS: tl.constexpr, SLOTS1: tl.constexpr,
                      S: tl.constexpr, ROWS: tl.constexpr, CB: tl.constexpr, CPG: tl.constexpr,
                      N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr, GB: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_BIAS_ABS: tl.constexpr, HAS_MASK: tl.constexpr,
                      HAS_FORCE: tl.constexpr, HAS_BOOST: tl.constexpr, RENORM_BOOST: tl.constexpr,
                      PRECISE: tl.constexpr, E_PAD: tl.constexpr, R_SLOTS: tl.constexpr, PER_GROUP: tl.constexpr,
                      RESHAPE: tl.constexpr, R_HAS_FORCE: tl.constexpr, WIDE: tl.constexpr = False,
                      IN_PLACE: tl.constexpr = False, COUNT: tl.constexpr = False, RESIDENT: tl.constexpr = False):
    """``DeepseekV2Rule`` with ``group_limited_greedy`` (module docstring), the layout of ``_v3_stream_kernel``, and
    as there its uncertain rows selected again in place by ``triton_rows``' exact V2 rows code (``R_HAS_FORCE``: that
    code's force flag, which needs δ > 0) or their blocks listed for ``triton_route``'s V2 redo launch."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < T
    sel, w, sure = _v2_select(logits_ptr, stride_t, rows, row_ok, tabs_ptr, E, force_delta, scaling, n_forced,
                              n_cand, EXACT, ROWS, S, K, SLOTS, SLOTS1, CB, CPG, N_GROUP, TOPK_GROUP, G_PAD, GB, HAS_BIAS,
                              HAS_BIAS_ABS, HAS_MASK, HAS_FORCE, PRECISE, WIDE, RESIDENT)
    _finish(w, sel, rows, row_ok & sure, tabs_ptr, E, w_ptr, idx_ptr, K, SLOTS, HAS_BOOST, RENORM_BOOST)
    bad = (row_ok & ~sure).to(tl.int32)
    if _flagged(bad, redo_ptr, n_redo_ptr, IN_PLACE, COUNT):
        _select_again(bad, logits_ptr, stride_t, tabs_ptr, None, w_ptr, idx_ptr, T, E, force_delta, scaling, ROWS, K,
                      R_SLOTS, E_PAD, CB, HAS_BIAS, HAS_MASK, R_HAS_FORCE, HAS_BOOST, RENORM_BOOST, False, PRECISE,
                      PER_GROUP, N_GROUP, TOPK_GROUP, G_PAD, RESHAPE, True)


def grouped_stream_config(num_experts: int, n_group: int, topk_group: int, k: int,
                          rows_per_thread: int = 1) -> tuple[int, int, int] | None:
    """``(S, CPG, ROWS)`` for the streamed group-limited kernels (DeepSeek-V3, V2), or None where it does not apply: E a power of two,
    groups of a power-of-two number of experts, at least 8 (S = min(4, group / 8) threads a row, each group
    ``CPG`` chunks of 8·S), k <= 8, at most 64 groups, and at least k experts in the kept groups. A block is one
    warp; ``rows_per_thread`` > 1 gives each thread that many rows of the same columns, so one table load serves
    them all (Nsight Compute had the V3 kernel L1-bound: L1/TEX 82 % busy, DRAM 34 %)."""
    if k > 8 or num_experts < 8 or num_experts & (num_experts - 1) or not 1 <= n_group <= 64:
        return None
    if num_experts % n_group or not 1 <= topk_group <= n_group:
        return None
    per = num_experts // n_group
    if per < 8 or per & (per - 1) or per * topk_group < k:
        return None
    s = min(4, per // 8)
    return s, per // (8 * s), 32 * rows_per_thread // s
