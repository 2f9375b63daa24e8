"""Fused masked routing in Triton: router logits + a layer's steering tables -> top-k (weights, indices), one launch.

The function is ``reference.masked_route`` (same signature, same formulas; that module's docstring is the spec):
steer the float32 logits (bias, bias·|z|, force = row max + δ, disable = -inf; DeepSeek-V3: ±inf on the choice
scores after the correction bias), apply the family's rule (``routelens/adapters/routing.py``), multiply the
selected weights by ``boost`` (optionally renormalised to the original sum), cast to the rule's output dtype.
Sources: SteerMoE ``src/utils.py::steer_moe`` (force/disable, algorithms.md §5.3), the transformers router
classes named in each rule (selection), algorithms.md §7.4/§8.4 (mask at the router, after the DeepSeek-V3 bias).

One program handles ``BLOCK_T`` rows (tokens); E is padded to a power of two; the tables are loaded once per
program. Top-k is k rounds of "row max, then the lowest index holding it", i.e. ties go to the lower expert
index, which is what ``torch.topk``/``torch.max`` return on CUDA for the sizes routed here (checked on the GPU by
``benchmarks/steer_kernels_gpu.py``); the CPU ``torch.topk`` orders ties by its own introselect (unspecified).

Selection keys. The softmax families (softmax-top-k, DeepSeek-V2, sparsemixer's argmax) select on the steered
logit ``z'`` rather than on ``softmax(z')``: the order is the same because exp is monotone, except where two
distinct logits round to the same float32 probability (|Δz| ≲ 1 ulp of z, or both underflow to 0), where the
reference breaks the artificial tie by index. DeepSeek-V3 selects on ``sigmoid(z') + bias`` computed with the
same IEEE expf and correctly rounded division as PyTorch's CUDA sigmoid, so its choice scores are bit-identical.
All arithmetic is float32 with FMA contraction off (``(z + b) + b_abs·|z|`` is rounded twice, as in PyTorch).

Known gaps (documented, not handled): NaN logits; a DeepSeek-V3 group whose only enabled expert is forced
(``inf + -inf`` group score); the DeepSeek ``sorted=False`` output order (returned here by rank, highest first).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from torch import Tensor

from routelens.adapters.routing import DeepseekV2Rule, DeepseekV3Rule, GptOssRule, SoftmaxTopK, SparseMixerRule
from routelens.errors import InputError
from routelens.steering.spec import LayerTables

from .reference import masked_route, weights_dtype

__all__ = ["masked_route_triton", "route_kernel", "triton_available", "weights_dtype", "launch_config"]

# The interpreter replaces the kernels at decoration time, so this is fixed for the life of the process.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# libdevice (IEEE expf, as PyTorch's CUDA kernels use) does not exist in the interpreter; numpy's exp stands in.
_PRECISE = not _INTERPRET
_CACHE_ATTR = "_routelens_triton_tables"
# rows of the packed [4, E] float32 table
_MASK, _BIAS, _BIAS_ABS, _BOOST = (tl.constexpr(i) for i in range(4))


def triton_available() -> bool:
    """True when the kernels can run: a CUDA device, or the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _INTERPRET or torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------------
# Shared device functions
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _tile(T, E, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    return rows, rows < T, cols, cols < E


@triton.jit
def _steered_logits(logits_ptr, stride_t, rows, row_ok, cols, col_ok, tabs_ptr, E, force_delta,
                    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, LOGIT_MASK: tl.constexpr):
    """float32 ``z' = z + b + b_abs·|z|``; logit-domain families also get force (row max + δ) and disable (-inf).
    Padding columns are -inf. Returns ``(z', mask)`` (mask: -1/0/+1 as float32)."""
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * stride_t + cols[None, :]
    z = tl.load(logits_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(tabs_ptr + _BIAS * E + cols, mask=col_ok, other=0.0)
        b_abs = tl.load(tabs_ptr + _BIAS_ABS * E + cols, mask=col_ok, other=0.0)
        z = (z + b[None, :]) + b_abs[None, :] * tl.abs(z)
    z = tl.where(col_ok[None, :], z, -float("inf"))
    mask = tl.load(tabs_ptr + _MASK * E + cols, mask=col_ok, other=0.0)
    if HAS_MASK and LOGIT_MASK:
        row_max = tl.max(z, 1)  # before disabling, as the reference (and SteerMoE's max over all experts)
        z = tl.where(mask[None, :] > 0, row_max[:, None] + force_delta, z)
        z = tl.where(mask[None, :] < 0, -float("inf"), z)
    return z, mask


@triton.jit
def _topk(key, avail, val, cols, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr,
          K_PAD: tl.constexpr, GATHER: tl.constexpr):
    """k rounds of argmax over ``key`` where ``avail``; ties -> lowest column. Returns ``[BLOCK_T, K_PAD]`` tiles of
    the chosen columns, their keys, and (``GATHER``) ``val`` at those columns."""
    kcols = tl.arange(0, K_PAD)
    sel_i = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    sel_k = tl.full([BLOCK_T, K_PAD], -float("inf"), dtype=tl.float32)
    sel_v = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    key = tl.where(avail, key, -float("inf"))
    for j in tl.static_range(K):
        m = tl.max(key, 1)
        i = tl.min(tl.where(avail & (key == m[:, None]), cols[None, :], E_PAD), 1)
        pick = cols[None, :] == i[:, None]
        avail = avail & (~pick)
        key = tl.where(pick, -float("inf"), key)
        here = kcols[None, :] == j
        sel_i = tl.where(here, i[:, None], sel_i)
        sel_k = tl.where(here, m[:, None], sel_k)
        if GATHER:
            v = tl.sum(tl.where(pick, val, 0.0), 1)
            sel_v = tl.where(here, v[:, None], sel_v)
    return sel_i, sel_k, sel_v


@triton.jit
def _group_keep(score, cols, col_ok, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, PER_GROUP: tl.constexpr,
                N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr, TOP2: tl.constexpr):
    """Columns of the ``TOPK_GROUP`` best groups; group score = sum of its top-2 (``TOP2``, DeepSeek-V3) or its max
    (DeepSeek-V2). Ties between groups -> lowest group index."""
    gid = cols // PER_GROUP
    gcols = tl.arange(0, G_PAD)
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
    gavail = tl.broadcast_to(gcols[None, :] < N_GROUP, (BLOCK_T, G_PAD))
    gs = tl.where(gavail, gs, -float("inf"))
    kept = tl.broadcast_to(cols[None, :] < 0, (BLOCK_T, E_PAD))
    for j in tl.static_range(TOPK_GROUP):
        m = tl.max(gs, 1)
        gi = tl.min(tl.where(gavail & (gs == m[:, None]), gcols[None, :], G_PAD), 1)
        gpick = gcols[None, :] == gi[:, None]
        gavail = gavail & (~gpick)
        gs = tl.where(gpick, -float("inf"), gs)
        kept = kept | (gid[None, :] == gi[:, None])
    return kept


@triton.jit
def _finish(w, sel_i, rows, row_ok, tabs_ptr, E, w_ptr, idx_ptr, K: tl.constexpr, K_PAD: tl.constexpr,
            HAS_BOOST: tl.constexpr, RENORM_BOOST: tl.constexpr):
    """``w *= boost[i]`` (renormalised to the old row sum if asked), cast, store ``[T, K]`` weights and int64 ids."""
    kcols = tl.arange(0, K_PAD)
    ok = row_ok[:, None] & (kcols[None, :] < K)
    w = tl.where(ok, w, 0.0)
    if HAS_BOOST:
        factor = tl.load(tabs_ptr + _BOOST * E + sel_i, mask=ok, other=1.0)
        boosted = w * factor
        if RENORM_BOOST:
            ratio = tl.math.div_rn(tl.sum(w, 1), tl.sum(boosted, 1))
            boosted = boosted * ratio[:, None]
        w = boosted
    offs = rows[:, None].to(tl.int64) * K + kcols[None, :]
    tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=ok)
    tl.store(idx_ptr + offs, sel_i.to(tl.int64), mask=ok)


# ---------------------------------------------------------------------------------------------------------------
# One kernel per routing family
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _softmax_topk_kernel(logits_ptr, stride_t, tabs_ptr, w_ptr, idx_ptr, T, E, force_delta,
                         K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                         HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BOOST: tl.constexpr,
                         RENORM_BOOST: tl.constexpr, RENORM: tl.constexpr, PRECISE: tl.constexpr):
    """``SoftmaxTopK``: p = softmax(z'); top-k of p (selected on z'); w = p / Σp if RENORM."""
    rows, row_ok, cols, col_ok = _tile(T, E, BLOCK_T, E_PAD)
    z, mask = _steered_logits(logits_ptr, stride_t, rows, row_ok, cols, col_ok, tabs_ptr, E, force_delta,
                              HAS_BIAS, HAS_MASK, True)
    mx = tl.max(z, 1)
    denom = tl.sum(_exp(z - mx[:, None], PRECISE), 1)
    avail = tl.broadcast_to(col_ok[None, :], (BLOCK_T, E_PAD))
    sel_i, sel_k, _ = _topk(z, avail, z, cols, BLOCK_T, E_PAD, K, K_PAD, False)
    w = tl.math.div_rn(_exp(sel_k - mx[:, None], PRECISE), denom[:, None])
    if RENORM:
        kok = tl.arange(0, K_PAD)[None, :] < K
        w = tl.math.div_rn(w, tl.sum(tl.where(kok, w, 0.0), 1)[:, None])
    _finish(w, sel_i, rows, row_ok, tabs_ptr, E, w_ptr, idx_ptr, K, K_PAD, HAS_BOOST, RENORM_BOOST)


@triton.jit
def _deepseek_v3_kernel(logits_ptr, stride_t, tabs_ptr, corr_ptr, w_ptr, idx_ptr, T, E, force_delta, scaling,
                        K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BOOST: tl.constexpr,
                        RENORM_BOOST: tl.constexpr, RENORM: tl.constexpr, PRECISE: tl.constexpr,
                        PER_GROUP: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                        G_PAD: tl.constexpr):
    """``DeepseekV3Rule``: s = sigmoid(z'); c = s + corr (±inf forced/disabled); group-limited top-k of c;
    w = s[i] / (Σ s[i] + 1e-20) if RENORM; w *= scaling."""
    rows, row_ok, cols, col_ok = _tile(T, E, BLOCK_T, E_PAD)
    z, mask = _steered_logits(logits_ptr, stride_t, rows, row_ok, cols, col_ok, tabs_ptr, E, force_delta,
                              HAS_BIAS, HAS_MASK, False)
    s = tl.math.div_rn(1.0, 1.0 + _exp(-z, PRECISE))  # PyTorch CUDA sigmoid: 1 / (1 + expf(-x))
    corr = tl.load(corr_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    c = s + corr[None, :]
    if HAS_MASK:
        c = tl.where(mask[None, :] > 0, float("inf"), tl.where(mask[None, :] < 0, -float("inf"), c))
    c = tl.where(col_ok[None, :], c, -float("inf"))
    if N_GROUP > 1:
        kept = _group_keep(c, cols, col_ok, BLOCK_T, E_PAD, PER_GROUP, N_GROUP, TOPK_GROUP, G_PAD, True)
        c = tl.where(kept, c, -float("inf"))
    avail = tl.broadcast_to(col_ok[None, :], (BLOCK_T, E_PAD))
    sel_i, _, w = _topk(c, avail, s, cols, BLOCK_T, E_PAD, K, K_PAD, True)
    if RENORM:
        kok = tl.arange(0, K_PAD)[None, :] < K
        w = tl.math.div_rn(w, (tl.sum(tl.where(kok, w, 0.0), 1) + 1e-20)[:, None])
    w = w * scaling
    _finish(w, sel_i, rows, row_ok, tabs_ptr, E, w_ptr, idx_ptr, K, K_PAD, HAS_BOOST, RENORM_BOOST)


@triton.jit
def _deepseek_v2_kernel(logits_ptr, stride_t, tabs_ptr, w_ptr, idx_ptr, T, E, force_delta, scaling,
                        K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BOOST: tl.constexpr,
                        RENORM_BOOST: tl.constexpr, PRECISE: tl.constexpr, GROUPED: tl.constexpr,
                        PER_GROUP: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                        G_PAD: tl.constexpr):
    """``DeepseekV2Rule``: p = softmax(z'); greedy or group-limited (group score = max p) top-k; w = p·scaling."""
    rows, row_ok, cols, col_ok = _tile(T, E, BLOCK_T, E_PAD)
    z, mask = _steered_logits(logits_ptr, stride_t, rows, row_ok, cols, col_ok, tabs_ptr, E, force_delta,
                              HAS_BIAS, HAS_MASK, True)
    mx = tl.max(z, 1)
    denom = tl.sum(_exp(z - mx[:, None], PRECISE), 1)
    key = z
    if GROUPED:
        kept = _group_keep(z, cols, col_ok, BLOCK_T, E_PAD, PER_GROUP, N_GROUP, TOPK_GROUP, G_PAD, False)
        key = tl.where(kept, z, -float("inf"))
    avail = tl.broadcast_to(col_ok[None, :], (BLOCK_T, E_PAD))
    sel_i, sel_k, _ = _topk(key, avail, z, cols, BLOCK_T, E_PAD, K, K_PAD, False)
    w = tl.math.div_rn(_exp(sel_k - mx[:, None], PRECISE), denom[:, None]) * scaling
    _finish(w, sel_i, rows, row_ok, tabs_ptr, E, w_ptr, idx_ptr, K, K_PAD, HAS_BOOST, RENORM_BOOST)


@triton.jit
def _gpt_oss_kernel(logits_ptr, stride_t, tabs_ptr, w_ptr, idx_ptr, T, E, force_delta,
                    K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BOOST: tl.constexpr,
                    RENORM_BOOST: tl.constexpr, PRECISE: tl.constexpr):
    """``GptOssRule``: top-k of z'; w = softmax over the k selected logits."""
    rows, row_ok, cols, col_ok = _tile(T, E, BLOCK_T, E_PAD)
    z, mask = _steered_logits(logits_ptr, stride_t, rows, row_ok, cols, col_ok, tabs_ptr, E, force_delta,
                              HAS_BIAS, HAS_MASK, True)
    avail = tl.broadcast_to(col_ok[None, :], (BLOCK_T, E_PAD))
    sel_i, sel_k, _ = _topk(z, avail, z, cols, BLOCK_T, E_PAD, K, K_PAD, False)
    e = _exp(sel_k - tl.max(sel_k, 1)[:, None], PRECISE)  # padding slots are -inf -> 0
    w = tl.math.div_rn(e, tl.sum(e, 1)[:, None])
    _finish(w, sel_i, rows, row_ok, tabs_ptr, E, w_ptr, idx_ptr, K, K_PAD, HAS_BOOST, RENORM_BOOST)


@triton.jit
def _sparsemixer_kernel(logits_ptr, stride_t, tabs_ptr, w_ptr, idx_ptr, T, E, force_delta, jitter2,
                        K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BOOST: tl.constexpr,
                        RENORM_BOOST: tl.constexpr, PRECISE: tl.constexpr):
    """``SparseMixerRule``: round j: t = max(m), i = argmax(m); drop = (t - z)/max(|z|, t) > 2ε (vs the original
    z'); w_j = softmax(m with drop -> -inf)[i]; m[i] = -inf."""
    rows, row_ok, cols, col_ok = _tile(T, E, BLOCK_T, E_PAD)
    z, mask = _steered_logits(logits_ptr, stride_t, rows, row_ok, cols, col_ok, tabs_ptr, E, force_delta,
                              HAS_BIAS, HAS_MASK, True)
    abs_z = tl.abs(z)
    masked = z
    avail = tl.broadcast_to(col_ok[None, :], (BLOCK_T, E_PAD))
    kcols = tl.arange(0, K_PAD)
    sel_i = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    for j in tl.static_range(K):
        t = tl.max(masked, 1)
        i = tl.min(tl.where(avail & (masked == t[:, None]), cols[None, :], E_PAD), 1)
        factor = tl.maximum(abs_z, t[:, None])
        drop = tl.math.div_rn(t[:, None] - z, factor) > jitter2
        gates = tl.where(drop, -float("inf"), masked)
        gmax = tl.max(gates, 1)
        wj = tl.math.div_rn(_exp(t - gmax, PRECISE), tl.sum(_exp(gates - gmax[:, None], PRECISE), 1))
        pick = cols[None, :] == i[:, None]
        avail = avail & (~pick)
        masked = tl.where(pick, -float("inf"), masked)
        here = kcols[None, :] == j
        sel_i = tl.where(here, i[:, None], sel_i)
        w = tl.where(here, wj[:, None], w)
    _finish(w, sel_i, rows, row_ok, tabs_ptr, E, w_ptr, idx_ptr, K, K_PAD, HAS_BOOST, RENORM_BOOST)


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------

_FAMILIES = (SoftmaxTopK, DeepseekV3Rule, DeepseekV2Rule, GptOssRule, SparseMixerRule)


def launch_config(num_experts: int, num_tokens: int, block_rows: int | None = None,
                  num_warps: int | None = None) -> tuple[int, int, int]:
    """``(E_PAD, BLOCK_T, num_warps)``: about 2k elements of the ``[BLOCK_T, E_PAD]`` tile per program."""
    e_pad = triton.next_power_of_2(max(num_experts, 2))
    if block_rows is None:
        block_rows = max(1, min(64, 2048 // e_pad))
    block_rows = max(1, min(block_rows, triton.next_power_of_2(max(num_tokens, 1))))
    if num_warps is None:
        num_warps = 4 if block_rows * e_pad >= 1024 else (2 if block_rows * e_pad >= 256 else 1)
    return e_pad, block_rows, num_warps


def _device_tables(tables: LayerTables, device: torch.device) -> tuple[Tensor, tuple[bool, bool, bool, bool]]:
    """The packed ``[4, E]`` float32 table on ``device`` and (has_bias, has_mask, has_boost, renormalize).

    Cached on the tables object: a steered model routes every forward with the same tables, and copying a pageable
    numpy array to the GPU would synchronise the stream once per layer. The cache is keyed on the table bytes, so
    editing the arrays in place invalidates it.
    """
    key = (str(device), tables.mask.tobytes(), tables.bias.tobytes(), tables.bias_abs.tobytes(),
           tables.boost.tobytes(), bool(tables.renormalize))
    cached = tables.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    packed = np.stack([tables.mask.astype(np.float32), tables.bias.astype(np.float32),
                       tables.bias_abs.astype(np.float32), tables.boost.astype(np.float32)])
    tab = torch.from_numpy(np.ascontiguousarray(packed)).to(device)
    flags = (tables.has_bias, tables.has_mask, tables.has_boost, bool(tables.renormalize))
    tables.__dict__[_CACHE_ATTR] = (key, tab, flags)
    return tab, flags


def route_kernel(logits: Tensor, rule, tables: LayerTables | None, force_delta: float = 0.01, *,
                 block_rows: int | None = None, num_warps: int | None = None, precise: bool | None = None,
                 _device: tuple | None = None) -> tuple[Tensor, Tensor]:
    """Run the family's kernel (also for neutral tables: then it is the rule itself). ``(weights, indices)``."""
    if not isinstance(rule, _FAMILIES):
        raise InputError(f"no Triton routing kernel for {type(rule).__name__}; use the torch steering backend")
    if not (logits.is_cuda or _INTERPRET):
        raise InputError(f"the triton steering backend needs CUDA tensors (got {logits.device}); "
                         "use backend=\"auto\" or \"torch\"")
    if logits.dim() != 2:
        logits = logits.reshape(-1, logits.shape[-1])
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    T, E = logits.shape
    k = rule.k
    if _device is None:  # masked_route_triton passes the tables it already looked up
        _device = _device_tables(tables if tables is not None else LayerTables.neutral(E), logits.device)
    tab, (has_bias, has_mask, has_boost, renorm_boost) = _device
    weights = torch.empty((T, k), dtype=weights_dtype(rule, logits.dtype), device=logits.device)
    indices = torch.empty((T, k), dtype=torch.int64, device=logits.device)
    if T == 0:
        return weights, indices
    e_pad, block_t, warps = launch_config(E, T, block_rows, num_warps)
    grid = (triton.cdiv(T, block_t),)
    common = dict(K=k, K_PAD=triton.next_power_of_2(k), E_PAD=e_pad, BLOCK_T=block_t, HAS_BIAS=has_bias,
                  HAS_MASK=has_mask, HAS_BOOST=has_boost, RENORM_BOOST=has_boost and renorm_boost,
                  PRECISE=_PRECISE if precise is None else (precise and not _INTERPRET), num_warps=warps,
                  enable_fp_fusion=False)
    fd = float(force_delta)
    if isinstance(rule, SoftmaxTopK):
        _softmax_topk_kernel[grid](logits, logits.stride(0), tab, weights, indices, T, E, fd,
                                   RENORM=bool(rule.renormalize), **common)
    elif isinstance(rule, DeepseekV3Rule):
        corr = rule.correction_bias
        if corr.device != logits.device:
            corr = corr.to(logits.device)
        n_group = int(rule.n_group)
        _deepseek_v3_kernel[grid](logits, logits.stride(0), tab, corr.contiguous(), weights, indices, T, E, fd,
                                  float(rule.scaling), RENORM=bool(rule.renormalize), PER_GROUP=E // n_group,
                                  N_GROUP=n_group, TOPK_GROUP=int(rule.topk_group),
                                  G_PAD=triton.next_power_of_2(n_group), **common)
    elif isinstance(rule, DeepseekV2Rule):
        grouped = rule.method == "group_limited_greedy"
        n_group = int(rule.n_group) if grouped else 1
        _deepseek_v2_kernel[grid](logits, logits.stride(0), tab, weights, indices, T, E, fd, float(rule.scaling),
                                  GROUPED=grouped, PER_GROUP=E // n_group, N_GROUP=n_group,
                                  TOPK_GROUP=int(rule.topk_group) if grouped else 1,
                                  G_PAD=triton.next_power_of_2(n_group), **common)
    elif isinstance(rule, GptOssRule):
        _gpt_oss_kernel[grid](logits, logits.stride(0), tab, weights, indices, T, E, fd, **common)
    else:
        _sparsemixer_kernel[grid](logits, logits.stride(0), tab, weights, indices, T, E, fd,
                                  float(2 * rule.jitter_eps), **common)
    return weights, indices


def masked_route_triton(logits: Tensor, rule, tables: LayerTables | None, force_delta: float = 0.01
                        ) -> tuple[Tensor, Tensor]:
    """``reference.masked_route`` through the Triton kernels. Neutral tables return ``rule(logits)`` itself (bit for
    bit the model's routing, as the reference does); rules without a kernel fall back to the reference."""
    if tables is None:
        return rule(logits)
    # the cached flags stand in for tables.is_neutral (four numpy reductions a call, per layer, per step)
    device_tables = _device_tables(tables, logits.device)
    has_bias, has_mask, has_boost, _ = device_tables[1]
    if not (has_bias or has_mask or has_boost):
        return rule(logits)
    if not isinstance(rule, _FAMILIES):
        return masked_route(logits, rule, tables, force_delta)
    return route_kernel(logits, rule, tables, force_delta, _device=device_tables)
