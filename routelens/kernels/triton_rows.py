"""The rows kernels' device functions (``triton_route``'s family kernels: a tile of ``[BLOCK_T, E_PAD]``, a row to a
warp or more): exact top-k selection, DeepSeek's group limit, and the DeepSeek-V3 and V2 rules over a tile of rows.
A module of its own because the streamed group-limited kernels (``triton_grouped``) run the same exact rows in place
for the rows their certificate leaves uncertain. Formulas: ``reference.masked_route``."""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (_TAKEN, _TAKEN64, _exp, _finish, _order_bits, _sorted_chunks, _steered_at,
                            _steered_logits, _sum_exp)
from .triton_stream import _shift


@triton.jit
def _select_exact(score, top, cols, col_ok, BLOCK_T: tl.constexpr, K: tl.constexpr, SLOTS: tl.constexpr,
                  HAS_TOP: tl.constexpr):
    """k rounds of a 64-bit max over (order bits of ``score`` << 32 | ~column): exact, ties -> lower column;
    ``top`` columns first. ``[BLOCK_T, SLOTS]`` int32 columns (slots >= k unused)."""
    okey = _order_bits(score)
    if HAS_TOP:
        okey = tl.where(top, 0x7FFFFFFF, okey)
    low = tl.where(col_ok, 0x7FFFFFFF - cols, 0).to(tl.int64)
    key = (okey.to(tl.int64) << 32) | low[None, :]
    slot = tl.arange(0, SLOTS)
    sel = tl.zeros([BLOCK_T, SLOTS], dtype=tl.int32)
    for j in tl.static_range(K):
        m = tl.max(key, 1)
        key = tl.where(key == m[:, None], _TAKEN64, key)
        c = 0x7FFFFFFF - (m & 0x7FFFFFFF).to(tl.int32)
        sel = tl.where(slot[None, :] == j, c[:, None], sel)
    return sel


@triton.jit
def _select(score, top, row_ok, cols, col_ok, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr,
            SLOTS: tl.constexpr, CB: tl.constexpr, HAS_TOP: tl.constexpr):
    """Columns of the k largest ``score`` per row, ranked, ties -> lower column; ``top`` columns (forced experts,
    all of equal score) first in column order. Returns ``[BLOCK_T, SLOTS]`` int32 (slots >= k unused).

    Fast path, 32-bit: key = order bits of the score with its low ``CB`` bits replaced by ``2^CB - 1 - column``.
    Each thread sorts its 8 adjacent keys in registers, then k rounds take the best chunk head (one warp
    reduction) and shift that chunk. The keys are exact when every score's low CB bits are zero (bf16/fp16 logits,
    biases with few significant bits); otherwise only two scores agreeing in all other bits can be misordered, so
    a row whose k+1 best keys have pairwise distinct high bits is exact too. Blocks with a row that is neither
    (fp32 near-ties) are redone by ``_select_exact``.
    """
    LOW: tl.constexpr = (1 << CB) - 1
    TOP_HIGH: tl.constexpr = 0x7FFFFFFF & ~LOW
    bits = _order_bits(score)
    low = tl.where(col_ok, LOW - cols, 0)
    key = (bits & ~LOW) | low[None, :]
    lossy = (score.to(tl.int32, bitcast=True) & LOW) != 0  # ±inf and bf16 values have zero low bits
    if HAS_TOP:
        key = tl.where(top, TOP_HIGH | low[None, :], key)
        lossy = lossy & ~top
    row_lossy = tl.max(lossy.to(tl.int32), 1)
    h0, h1, h2, h3, h4, h5, h6, h7 = _sorted_chunks(key, BLOCK_T, E_PAD)
    slot = tl.arange(0, SLOTS)
    sel = tl.zeros([BLOCK_T, SLOTS], dtype=tl.int32)
    clash = tl.zeros([BLOCK_T], dtype=tl.int32)
    prev = tl.max(h0, 1)
    for j in tl.static_range(K):
        m = tl.max(h0, 1)
        if j > 0:  # equal high bits; forced experts are equal by construction
            clash = clash | ((((m ^ prev) & ~LOW) == 0) & ((m & ~LOW) != TOP_HIGH)).to(tl.int32)
        prev = m
        h0, h1, h2, h3, h4, h5, h6, h7, _ = _shift(h0 == m[:, None], h0, h1, h2, h3, h4, h5, h6, h7, _TAKEN, 8)
        sel = tl.where(slot[None, :] == j, LOW - (m & LOW)[:, None], sel)
    nxt = tl.max(h0, 1)
    clash = clash | ((((nxt ^ prev) & ~LOW) == 0) & (nxt != _TAKEN)).to(tl.int32)
    if tl.max(clash & row_lossy & row_ok.to(tl.int32), 0) != 0:
        sel = _select_exact(score, top, cols, col_ok, BLOCK_T, K, SLOTS, HAS_TOP)
    return sel


@triton.jit
def _group_keep(score, cols, col_ok, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, PER_GROUP: tl.constexpr,
                N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr, TOP2: tl.constexpr,
                RESHAPE: tl.constexpr):
    """``score`` with the columns outside the ``TOPK_GROUP`` best groups set to -inf; group score = sum of its two
    best (``TOP2``, DeepSeek-V3) or its max (DeepSeek-V2). Ties between groups -> lower group index.
    ``RESHAPE``: groups are power-of-two runs filling ``E_PAD`` (DeepSeek-V3: 8 x 32), scored in one pass over a
    ``[rows, groups, per group]`` view; otherwise one masked pass per group."""
    gcols = tl.arange(0, G_PAD)
    if RESHAPE:
        s3 = tl.reshape(score, [BLOCK_T, G_PAD, E_PAD // G_PAD])
        m1 = tl.max(s3, 2)
        if TOP2:
            at_max = s3 == m1[:, :, None]
            n_max = tl.sum(at_max.to(tl.int32), 2)
            m2 = tl.where(n_max > 1, m1, tl.max(tl.where(at_max, -float("inf"), s3), 2))
            gs = m1 + m2
        else:
            gs = m1
    else:
        gid = cols // PER_GROUP
        gs = tl.full([BLOCK_T, G_PAD], -float("inf"), dtype=tl.float32)
        for g in tl.static_range(N_GROUP):
            in_g = (gid == g) & col_ok
            sg = tl.where(in_g[None, :], score, -float("inf"))
            m1 = tl.max(sg, 1)
            if TOP2:
                i1 = tl.min(tl.where(in_g[None, :] & (sg == m1[:, None]), cols[None, :], E_PAD), 1)
                m2 = tl.max(tl.where(cols[None, :] == i1[:, None], -float("inf"), sg), 1)
                v = m1 + m2
            else:
                v = m1
            gs = tl.where(gcols[None, :] == g, v[:, None], gs)
    gkey = (_order_bits(gs).to(tl.int64) << 32) | (G_PAD - 1 - gcols)[None, :].to(tl.int64)
    gkey = tl.where(gcols[None, :] < N_GROUP, gkey, _TAKEN64)
    kept = gcols[None, :] < 0  # per group (RESHAPE) or per column
    if not RESHAPE:
        kept = cols[None, :] < 0
    for j in tl.static_range(TOPK_GROUP):
        m = tl.max(gkey, 1)
        pick = gkey == m[:, None]
        gkey = tl.where(pick, _TAKEN64, gkey)
        if RESHAPE:
            kept = kept | pick
        else:
            g = G_PAD - 1 - (m & 0x7FFFFFFF).to(tl.int32)
            kept = kept | ((cols // PER_GROUP)[None, :] == g[:, None])
    if RESHAPE:
        s3 = tl.where(kept[:, :, None], tl.reshape(score, [BLOCK_T, G_PAD, E_PAD // G_PAD]), -float("inf"))
        return tl.reshape(s3, [BLOCK_T, E_PAD])
    else:
        return tl.where(kept, score, -float("inf"))


@triton.jit
def _v3_choice(logits_ptr, stride_t, rows, row_ok, cols, col_ok, tabs_ptr, corr_ptr, E, force_delta,
               BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
               PRECISE: tl.constexpr, PER_GROUP: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
               G_PAD: tl.constexpr, RESHAPE: tl.constexpr):
    """DeepSeek-V3 choice scores: sigmoid(z') + correction bias, ±inf at forced/disabled (folded into the bias by
    ``_v3_choice_bias``: ``HAS_MASK`` must be off), -inf outside the kept groups (the rule's ``masked_fill``)."""
    tl.static_assert(not HAS_MASK, "DeepSeek-V3's mask rides in corr_ptr (_v3_choice_bias): launch with HAS_MASK off")
    z, _, _ = _steered_logits(logits_ptr, stride_t, rows, row_ok, cols, col_ok, tabs_ptr, E, force_delta,
                              HAS_BIAS, False, False)
    s = tl.math.div_rn(1.0, 1.0 + _exp(-z, PRECISE))  # PyTorch CUDA sigmoid: 1 / (1 + expf(-x))
    corr = tl.load(corr_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    c = s + corr[None, :]
    c = tl.where(col_ok[None, :], c, -float("inf"))
    if N_GROUP > 1:
        c = _group_keep(c, cols, col_ok, BLOCK_T, E_PAD, PER_GROUP, N_GROUP, TOPK_GROUP, G_PAD, True, RESHAPE)
    return c


@triton.jit
def _deepseek_v3_rows(logits_ptr, stride_t, tabs_ptr, corr_ptr, w_ptr, idx_ptr, E, force_delta, scaling, rows,
                      row_ok, cols, col_ok, K: tl.constexpr, SLOTS: tl.constexpr, E_PAD: tl.constexpr,
                      BLOCK_T: tl.constexpr, CB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                      HAS_BOOST: tl.constexpr, RENORM_BOOST: tl.constexpr, RENORM: tl.constexpr,
                      PRECISE: tl.constexpr, PER_GROUP: tl.constexpr, N_GROUP: tl.constexpr,
                      TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr, RESHAPE: tl.constexpr):
    c = _v3_choice(logits_ptr, stride_t, rows, row_ok, cols, col_ok, tabs_ptr, corr_ptr, E, force_delta, BLOCK_T,
                   E_PAD, HAS_BIAS, HAS_MASK, PRECISE, PER_GROUP, N_GROUP, TOPK_GROUP, G_PAD, RESHAPE)
    sel = _select(c, c > 0, row_ok, cols, col_ok, BLOCK_T, E_PAD, K, SLOTS, CB, False)  # forced: +inf, exact
    ok = row_ok[:, None] & (tl.arange(0, SLOTS)[None, :] < K)
    zs = _steered_at(logits_ptr, stride_t, rows, sel, ok, tabs_ptr, E, None, force_delta, HAS_BIAS, HAS_MASK, False)
    w = tl.where(ok, tl.math.div_rn(1.0, 1.0 + _exp(-zs, PRECISE)), 0.0)
    if RENORM:
        w = tl.math.div_rn(w, (tl.sum(w, 1) + 1e-20)[:, None])
    w = w * scaling
    _finish(w, sel, rows, row_ok, tabs_ptr, E, w_ptr, idx_ptr, K, SLOTS, HAS_BOOST, RENORM_BOOST)


@triton.jit
def _deepseek_v2_rows(logits_ptr, stride_t, tabs_ptr, w_ptr, idx_ptr, E, force_delta, scaling, rows, row_ok, cols,
                      col_ok, K: tl.constexpr, SLOTS: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                      CB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_FORCE: tl.constexpr,
                      HAS_BOOST: tl.constexpr, RENORM_BOOST: tl.constexpr, PRECISE: tl.constexpr,
                      GROUPED: tl.constexpr, PER_GROUP: tl.constexpr, N_GROUP: tl.constexpr,
                      TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr, RESHAPE: tl.constexpr):
    z, mask, row_max = _steered_logits(logits_ptr, stride_t, rows, row_ok, cols, col_ok, tabs_ptr, E, force_delta,
                                       HAS_BIAS, HAS_MASK, True)
    if HAS_FORCE:
        mx = row_max + force_delta
    else:
        mx = tl.max(z, 1)
    denom = _sum_exp(z, mx, PRECISE)
    key = z
    if GROUPED:
        key = _group_keep(z, cols, col_ok, BLOCK_T, E_PAD, PER_GROUP, N_GROUP, TOPK_GROUP, G_PAD, False, RESHAPE)
    # a forced expert in a dropped group is -inf there, not first
    sel = _select(key, (mask[None, :] > 0) & (key == z), row_ok, cols, col_ok, BLOCK_T, E_PAD, K, SLOTS, CB,
                  HAS_FORCE)
    ok = row_ok[:, None] & (tl.arange(0, SLOTS)[None, :] < K)
    zs = _steered_at(logits_ptr, stride_t, rows, sel, ok, tabs_ptr, E, row_max, force_delta, HAS_BIAS, HAS_MASK,
                     True)
    w = tl.where(ok, tl.math.div_rn(_exp(zs - mx[:, None], PRECISE), denom[:, None]) * scaling, 0.0)
    _finish(w, sel, rows, row_ok, tabs_ptr, E, w_ptr, idx_ptr, K, SLOTS, HAS_BOOST, RENORM_BOOST)
