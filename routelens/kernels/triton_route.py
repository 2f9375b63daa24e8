"""Fused masked routing in Triton: router logits + a layer's steering tables -> top-k (weights, indices), one launch.

The function is ``reference.masked_route`` (same signature, same formulas; that module's docstring is the spec):
steer the float32 logits (bias, bias·|z|, force = row max + δ, disable = -inf; DeepSeek-V3: ±inf on the choice
scores after the correction bias), apply the family's rule (``routelens/adapters/routing.py``), multiply the
selected weights by ``boost`` (optionally renormalised to the original sum), cast to the rule's output dtype.
Sources: SteerMoE ``src/utils.py::steer_moe`` (force/disable, algorithms.md §5.3), the transformers router
classes named in each rule (selection), algorithms.md §7.4/§8.4 (mask at the router, after the DeepSeek-V3 bias).

One program handles ``BLOCK_T`` rows (tokens); E is padded to a power of two (at least 8); the tables are loaded
once per program. Top-k (``_select``): each thread sorts the 32-bit keys of its 8 adjacent experts in registers,
then k rounds take the best chunk head (one warp reduction) and shift that chunk; ties go to the lower expert
index, which is what ``torch.topk``/``torch.max`` return on CUDA for the sizes routed here (checked on the GPU by
``benchmarks/steer_kernels_gpu.py``); the CPU ``torch.topk`` orders ties by its own introselect (unspecified).
The 32-bit key is the score's order bits with its low log2(E_PAD) bits replaced by the column: exact for bf16
logits; a block where float32 scores could be misordered by the dropped bits is redone with 64-bit keys
(``_select_exact``). The selected experts' scores are then recomputed from the logits (``_steered_at``).

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
from torch import Tensor

from routelens.adapters.routing import DeepseekV2Rule, DeepseekV3Rule, GptOssRule, SoftmaxTopK, SparseMixerRule
from routelens.errors import InputError
from routelens.steering.spec import LayerTables

from .launch import cdiv, launch, next_pow2
from .reference import masked_route, weights_dtype
from .triton_grouped import _v2_stream_kernel, _v3_stream_kernel, grouped_stream_config
from .triton_rows import _deepseek_v2_rows, _deepseek_v3_rows, _select
from .triton_stream import SPARSE_MAX, _stream_topk_kernel, stream_config, stream_rows
from .triton_common import _CHOICE, _exp, _finish, _steered_at, _steered_logits, _sum_exp, _tile

__all__ = ["masked_route_triton", "route_kernel", "triton_available", "weights_dtype", "launch_config"]

# The interpreter replaces the kernels at decoration time, so this is fixed for the life of the process.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# libdevice (IEEE expf, as PyTorch's CUDA kernels use) does not exist in the interpreter; numpy's exp stands in.
_PRECISE = not _INTERPRET
_CACHE_ATTR = "_routelens_triton_tables"
_CORR_ATTR = "_routelens_v3_choice_bias"


def triton_available() -> bool:
    """True when the kernels can run: a CUDA device, or the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _INTERPRET or torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------------
# One kernel per routing family
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _softmax_topk_kernel(logits_ptr, stride_t, tabs_ptr, w_ptr, idx_ptr, T, E, force_delta,
                         K: tl.constexpr, SLOTS: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                         CB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_FORCE: tl.constexpr,
                         HAS_BOOST: tl.constexpr, RENORM_BOOST: tl.constexpr, RENORM: tl.constexpr,
                         PRECISE: tl.constexpr):
    """``SoftmaxTopK``: p = softmax(z'); top-k of p (selected on z'); w = p / Σp if RENORM."""
    rows, row_ok, cols, col_ok = _tile(T, E, BLOCK_T, E_PAD)
    z, mask, row_max = _steered_logits(logits_ptr, stride_t, rows, row_ok, cols, col_ok, tabs_ptr, E, force_delta,
                                       HAS_BIAS, HAS_MASK, True)
    if HAS_FORCE:  # δ > 0: the forced experts hold the row max, and are the first picks (in column order)
        mx = row_max + force_delta
    else:
        mx = tl.max(z, 1)
    denom = _sum_exp(z, mx, PRECISE)
    sel = _select(z, mask[None, :] > 0, row_ok, cols, col_ok, BLOCK_T, E_PAD, K, SLOTS, CB, HAS_FORCE)
    ok = row_ok[:, None] & (tl.arange(0, SLOTS)[None, :] < K)
    zs = _steered_at(logits_ptr, stride_t, rows, sel, ok, tabs_ptr, E, row_max, force_delta, HAS_BIAS, HAS_MASK,
                     True)
    w = tl.where(ok, tl.math.div_rn(_exp(zs - mx[:, None], PRECISE), denom[:, None]), 0.0)
    if RENORM:
        w = tl.math.div_rn(w, tl.sum(w, 1)[:, None])
    _finish(w, sel, rows, row_ok, tabs_ptr, E, w_ptr, idx_ptr, K, SLOTS, HAS_BOOST, RENORM_BOOST)


@triton.jit
def _deepseek_v3_kernel(logits_ptr, stride_t, tabs_ptr, corr_ptr, w_ptr, idx_ptr, T, E, force_delta, scaling,
                        K: tl.constexpr, SLOTS: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                        CB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_FORCE: tl.constexpr,
                        HAS_BOOST: tl.constexpr, RENORM_BOOST: tl.constexpr, RENORM: tl.constexpr,
                        PRECISE: tl.constexpr, PER_GROUP: tl.constexpr, N_GROUP: tl.constexpr,
                        TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr, RESHAPE: tl.constexpr):
    """``DeepseekV3Rule``: s = sigmoid(z'); c = s + corr (±inf forced/disabled); group-limited top-k of c;
    w = s[i] / (Σ s[i] + 1e-20) if RENORM; w *= scaling."""
    rows, row_ok, cols, col_ok = _tile(T, E, BLOCK_T, E_PAD)
    _deepseek_v3_rows(logits_ptr, stride_t, tabs_ptr, corr_ptr, w_ptr, idx_ptr, E, force_delta, scaling, rows,
                      row_ok, cols, col_ok, K, SLOTS, E_PAD, BLOCK_T, CB, HAS_BIAS, HAS_MASK, HAS_BOOST, RENORM_BOOST,
                      RENORM, PRECISE, PER_GROUP, N_GROUP, TOPK_GROUP, G_PAD, RESHAPE)


@triton.jit
def _redo_rows(redo_ptr, i, BLOCK_T: tl.constexpr, SPLIT: tl.constexpr):
    """The rows of work item ``i`` of a redo launch: part ``i % SPLIT`` of the flagged block ``redo_ptr[i // SPLIT]``
    (of ``BLOCK_T·SPLIT`` rows)."""
    return (tl.load(redo_ptr + i // SPLIT) * SPLIT + i % SPLIT) * BLOCK_T + tl.arange(0, BLOCK_T)


@triton.jit
def _deepseek_v3_redo_kernel(logits_ptr, stride_t, tabs_ptr, corr_ptr, w_ptr, idx_ptr, T, E, force_delta, scaling,
                             redo_ptr, n_redo_ptr, K: tl.constexpr, SLOTS: tl.constexpr, E_PAD: tl.constexpr,
                             BLOCK_T: tl.constexpr, CB: tl.constexpr, HAS_BIAS: tl.constexpr,
                             HAS_MASK: tl.constexpr, HAS_FORCE: tl.constexpr, HAS_BOOST: tl.constexpr,
                             RENORM_BOOST: tl.constexpr, RENORM: tl.constexpr, PRECISE: tl.constexpr,
                             PER_GROUP: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                             G_PAD: tl.constexpr, RESHAPE: tl.constexpr, SPLIT: tl.constexpr = 1):
    """``_deepseek_v3_kernel`` over the blocks of ``BLOCK_T·SPLIT`` rows listed at ``redo_ptr`` (``n_redo_ptr`` of
    them, read on the device: no host sync): the streamed kernel's uncertain blocks (``triton_grouped``), each as
    ``SPLIT`` programs' work of ``BLOCK_T`` rows (the launch's time is one block's latency, not its throughput)."""
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E
    for i in tl.range(tl.program_id(0), tl.load(n_redo_ptr) * SPLIT, tl.num_programs(0)):
        rows = _redo_rows(redo_ptr, i, BLOCK_T, SPLIT)
        _deepseek_v3_rows(logits_ptr, stride_t, tabs_ptr, corr_ptr, w_ptr, idx_ptr, E, force_delta, scaling, rows,
                          rows < T, cols, col_ok, K, SLOTS, E_PAD, BLOCK_T, CB, HAS_BIAS, HAS_MASK, HAS_BOOST,
                          RENORM_BOOST, RENORM, PRECISE, PER_GROUP, N_GROUP, TOPK_GROUP, G_PAD, RESHAPE)


@triton.jit
def _deepseek_v2_redo_kernel(logits_ptr, stride_t, tabs_ptr, w_ptr, idx_ptr, T, E, force_delta, scaling, redo_ptr,
                             n_redo_ptr, K: tl.constexpr, SLOTS: tl.constexpr, E_PAD: tl.constexpr,
                             BLOCK_T: tl.constexpr, CB: tl.constexpr, HAS_BIAS: tl.constexpr,
                             HAS_MASK: tl.constexpr, HAS_FORCE: tl.constexpr, HAS_BOOST: tl.constexpr,
                             RENORM_BOOST: tl.constexpr, PRECISE: tl.constexpr, PER_GROUP: tl.constexpr,
                             N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr,
                             RESHAPE: tl.constexpr, SPLIT: tl.constexpr = 1):
    """``_deepseek_v2_kernel`` (group-limited) over the blocks the streamed V2 kernel flagged (as V3's redo)."""
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E
    for i in tl.range(tl.program_id(0), tl.load(n_redo_ptr) * SPLIT, tl.num_programs(0)):
        rows = _redo_rows(redo_ptr, i, BLOCK_T, SPLIT)
        _deepseek_v2_rows(logits_ptr, stride_t, tabs_ptr, w_ptr, idx_ptr, E, force_delta, scaling, rows, rows < T,
                          cols, col_ok, K, SLOTS, E_PAD, BLOCK_T, CB, HAS_BIAS, HAS_MASK, HAS_FORCE, HAS_BOOST,
                          RENORM_BOOST, PRECISE, True, PER_GROUP, N_GROUP, TOPK_GROUP, G_PAD, RESHAPE)


@triton.jit
def _deepseek_v2_kernel(logits_ptr, stride_t, tabs_ptr, w_ptr, idx_ptr, T, E, force_delta, scaling,
                        K: tl.constexpr, SLOTS: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                        CB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_FORCE: tl.constexpr,
                        HAS_BOOST: tl.constexpr, RENORM_BOOST: tl.constexpr, PRECISE: tl.constexpr,
                        GROUPED: tl.constexpr, PER_GROUP: tl.constexpr, N_GROUP: tl.constexpr,
                        TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr, RESHAPE: tl.constexpr):
    """``DeepseekV2Rule``: p = softmax(z'); greedy or group-limited (group score = max p) top-k; w = p·scaling."""
    rows, row_ok, cols, col_ok = _tile(T, E, BLOCK_T, E_PAD)
    _deepseek_v2_rows(logits_ptr, stride_t, tabs_ptr, w_ptr, idx_ptr, E, force_delta, scaling, rows, row_ok, cols,
                      col_ok, K, SLOTS, E_PAD, BLOCK_T, CB, HAS_BIAS, HAS_MASK, HAS_FORCE, HAS_BOOST, RENORM_BOOST,
                      PRECISE, GROUPED, PER_GROUP, N_GROUP, TOPK_GROUP, G_PAD, RESHAPE)


@triton.jit
def _gpt_oss_kernel(logits_ptr, stride_t, tabs_ptr, w_ptr, idx_ptr, T, E, force_delta,
                    K: tl.constexpr, SLOTS: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                    CB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_FORCE: tl.constexpr,
                    HAS_BOOST: tl.constexpr, RENORM_BOOST: tl.constexpr, PRECISE: tl.constexpr):
    """``GptOssRule``: top-k of z'; w = softmax over the k selected logits."""
    rows, row_ok, cols, col_ok = _tile(T, E, BLOCK_T, E_PAD)
    z, mask, row_max = _steered_logits(logits_ptr, stride_t, rows, row_ok, cols, col_ok, tabs_ptr, E, force_delta,
                                       HAS_BIAS, HAS_MASK, True)
    sel = _select(z, mask[None, :] > 0, row_ok, cols, col_ok, BLOCK_T, E_PAD, K, SLOTS, CB, HAS_FORCE)
    ok = row_ok[:, None] & (tl.arange(0, SLOTS)[None, :] < K)
    zs = _steered_at(logits_ptr, stride_t, rows, sel, ok, tabs_ptr, E, row_max, force_delta, HAS_BIAS, HAS_MASK,
                     True)
    zs = tl.where(ok, zs, -float("inf"))
    e = _exp(zs - tl.max(zs, 1)[:, None], PRECISE)  # unused slots are -inf -> 0
    w = tl.math.div_rn(e, tl.sum(e, 1)[:, None])
    _finish(w, sel, rows, row_ok, tabs_ptr, E, w_ptr, idx_ptr, K, SLOTS, HAS_BOOST, RENORM_BOOST)


@triton.jit
def _sparsemixer_kernel(logits_ptr, stride_t, tabs_ptr, w_ptr, idx_ptr, T, E, force_delta, jitter2,
                        K: tl.constexpr, SLOTS: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                        CB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_FORCE: tl.constexpr,
                        HAS_BOOST: tl.constexpr, RENORM_BOOST: tl.constexpr, PRECISE: tl.constexpr):
    """``SparseMixerRule``: round j: t = max(m), i = argmax(m); drop = (t - z)/max(|z|, t) > 2ε (vs the original
    z'); w_j = softmax(m with drop -> -inf)[i]; m[i] = -inf. Each round needs the whole row (the drop mask
    depends on t), so this family keeps k full-row rounds."""
    rows, row_ok, cols, col_ok = _tile(T, E, BLOCK_T, E_PAD)
    z, mask, row_max = _steered_logits(logits_ptr, stride_t, rows, row_ok, cols, col_ok, tabs_ptr, E, force_delta,
                                       HAS_BIAS, HAS_MASK, True)
    abs_z = tl.abs(z)
    masked = z
    avail = tl.broadcast_to(col_ok[None, :], (BLOCK_T, E_PAD))
    slot = tl.arange(0, SLOTS)
    sel = tl.zeros([BLOCK_T, SLOTS], dtype=tl.int32)
    w = tl.zeros([BLOCK_T, SLOTS], dtype=tl.float32)
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
        here = slot[None, :] == j
        sel = tl.where(here, i[:, None], sel)
        w = tl.where(here, wj[:, None], w)
    _finish(w, sel, rows, row_ok, tabs_ptr, E, w_ptr, idx_ptr, K, SLOTS, HAS_BOOST, RENORM_BOOST)


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------

_FAMILIES = (SoftmaxTopK, DeepseekV3Rule, DeepseekV2Rule, GptOssRule, SparseMixerRule)


def launch_config(num_experts: int, num_tokens: int, block_rows: int | None = None,
                  num_warps: int | None = None) -> tuple[int, int, int]:
    """``(E_PAD, BLOCK_T, num_warps)``: about 1k elements of the ``[BLOCK_T, E_PAD]`` tile per program, 16 per
    thread (two 16-byte loads of bf16); E is padded to a power of two, at least one chunk of 8."""
    e_pad = next_pow2(max(num_experts, 8))
    if block_rows is None:
        block_rows = max(1, min(64, 1024 // e_pad))
    block_rows = max(1, min(block_rows, next_pow2(max(num_tokens, 1))))
    if num_warps is None:
        num_warps = max(1, min(4, block_rows * e_pad // 512))
    return e_pad, block_rows, num_warps


def _groups_fill(E: int, e_pad: int, n_group: int) -> bool:
    """Groups are equal power-of-two runs that fill the padded row (DeepSeek-V3: 256 = 8 x 32): one-pass scoring."""
    return E == e_pad and n_group == next_pow2(n_group) and e_pad % n_group == 0


def _device_tables(tables: LayerTables, device: torch.device) -> tuple[Tensor, tuple[bool, ...]]:
    """The packed ``[12, E]`` float32 table (``triton_common``'s rows) on ``device`` and the flags (has_bias, has_mask,
    has_boost, renormalize, forced experts, has_bias_abs, and ``stream_rows``' counts).

    Cached on the tables object: a steered model routes every forward with the same tables, and copying a pageable
    numpy array to the GPU would synchronise the stream once per layer. The cache is keyed on the table bytes, so
    editing the arrays in place invalidates it.
    """
    key = (str(device), tables.mask.tobytes(), tables.bias.tobytes(), tables.bias_abs.tobytes(),
           tables.boost.tobytes(), bool(tables.renormalize))
    cached = tables.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    derived, sparse_counts = stream_rows(tables.mask, tables.bias, tables.bias_abs)
    packed = np.concatenate([np.stack([tables.mask.astype(np.float32), tables.bias.astype(np.float32),
                                       tables.bias_abs.astype(np.float32), tables.boost.astype(np.float32)]),
                             derived])
    tab = torch.from_numpy(np.ascontiguousarray(packed)).to(device)
    flags = (tables.has_bias, tables.has_mask, tables.has_boost, bool(tables.renormalize),
             int((tables.mask > 0).sum()), bool(tables.bias_abs.any()), *sparse_counts)
    tables.__dict__[_CACHE_ATTR] = (key, tab, flags)
    return tab, flags


def _v3_choice_bias(corr: Tensor, tab: Tensor, tables: LayerTables) -> Tensor:
    """DeepSeek-V3's correction bias ``corr`` (the rule's buffer) as float32 on ``tab``'s device, with the spec's
    choice bias folded in: the table's CHOICE row (+inf at forced, -inf at disabled experts) where it is set. The
    rule adds that choice bias right after the correction bias, and ``sigmoid(z') + (±inf)`` is ±inf for every
    sigmoid (finite, in [0, 1]), so the kernels' choice scores ``sigmoid(z') + this`` are the steered ones exactly,
    with one per-column table load a logit instead of two (correction and mask) and no mask selects.

    Cached on the tables object per buffer (its storage, version and dtype) and per device table ``tab`` (rebuilt
    when the tables change): a steered DeepSeek model routes every forward with the same pairs, one per MoE layer,
    and a buffer on another device is copied only when the fold is built."""
    cache = tables.__dict__.setdefault(_CORR_ATTR, {})
    key = (corr.data_ptr(), corr._version, corr.dtype, str(tab.device))
    hit = cache.get(key)
    if hit is not None and hit[0] is tab:
        return hit[1]
    choice = tab[_CHOICE.value]
    folded = torch.where(choice != 0, choice, corr.to(device=tab.device, dtype=torch.float32))
    if len(cache) >= 1024:  # buffers come and go (a model reloaded, moved): keep the cache bounded
        cache.clear()
    cache[key] = (tab, folded)
    return folded


def route_kernel(logits: Tensor, rule, tables: LayerTables | None, force_delta: float = 0.01, *,
                 block_rows: int | None = None, num_warps: int | None = None, precise: bool | None = None,
                 impl: str = "auto", threads_per_row: int | None = None,
                 _device: tuple | None = None, _stream_opts: dict | None = None) -> tuple[Tensor, Tensor]:
    """Run the family's kernel (also for neutral tables: then it is the rule itself). ``(weights, indices)``.

    ``impl``: "stream" (``triton_stream``: softmax-top-k, DeepSeek-V2 greedy, gpt-oss and sparsemixer, k <= 8;
    ``triton_grouped``: DeepSeek-V3 and V2's group-limited greedy with power-of-two groups of at least 8 experts),
    "rows" (this module's kernels, every family), "auto": stream where it applies (DeepSeek-V3 from
    ``V3_STREAM_MIN_TOKENS`` tokens, V2 grouped from ``V2_STREAM_MIN_LOGITS`` logits and ``V2_STREAM_MIN_EXPERTS``)."""
    if impl not in ("auto", "rows", "stream"):
        raise InputError(f"unknown kernel impl {impl!r}; expected 'auto', 'rows' or 'stream'")
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
    tab, (has_bias, has_mask, has_boost, renorm_boost, n_forced, has_bias_abs, n_cand, n_drop, drop_biased) = _device
    has_force = n_forced > 0
    weights = torch.empty((T, k), dtype=weights_dtype(rule, logits.dtype), device=logits.device)
    indices = torch.empty((T, k), dtype=torch.int64, device=logits.device)
    if T == 0:
        return weights, indices
    fd = float(force_delta)
    precise = _PRECISE if precise is None else (precise and not _INTERPRET)
    v3 = isinstance(rule, DeepseekV3Rule)
    wide = logits.element_size() == 4  # 32-bit logits: the streamed kernels' two-run chunk layout (_runs)
    flags = _device[1]
    if v3 and has_mask:  # the mask rides in the correction bias: one table load a logit less, no mask selects
        corr = _v3_choice_bias(rule.correction_bias, tab, tables)
        has_mask = False
        flags = (flags[0], False, *flags[2:])
    elif v3:
        corr = rule.correction_bias
        if corr.device != logits.device:
            corr = corr.to(logits.device)
        corr = corr.contiguous()
    # DeepSeek-V3 and V2 grouped: streamed; the rows the certificate leaves uncertain are selected again by the exact
    # rows code, in place (IN_PLACE) or in a second launch over the flagged blocks. With the second launch the rows
    # kernel is faster at small T (H100, E = 256: 2x at 4,096 tokens, mixed at 32,768; the stream 1.3-1.6x faster at
    # 65,536: benchmarks/results/v3_stream_gpu.json)
    # V2 grouped: from 2^22 logits and E >= 128, where it won every case measured (v2_grouped_stream_gpu.json)
    big = T >= V3_STREAM_MIN_TOKENS if v3 else (T * E >= V2_STREAM_MIN_LOGITS and E >= V2_STREAM_MIN_EXPERTS)
    if _grouped(rule) and _streams(rule, E) and not (has_force and force_delta <= 0 and not v3) and (
            impl == "stream" or (impl == "auto" and big)):
        opts = dict(_stream_opts or {})
        s, cpg, rows = grouped_stream_config(E, int(rule.n_group), int(rule.topk_group), k,
                                             opts.pop("ROWS_PER_THREAD", 1))
        g_pad = next_pow2(int(rule.n_group))
        n_blocks = cdiv(T, rows)
        in_place = bool(opts.pop("IN_PLACE", GROUPED_IN_PLACE["deepseek_v3" if v3 else "deepseek_v2"]))
        redo_rows = min(rows, int(opts.pop("REDO_ROWS", GROUPED_REDO_ROWS)))
        # the row held in registers: only where a group is one chunk and there are at most 8 (DeepSeek-V3's 256
        # experts in 8 of 32); off unless asked (GROUPED_RESIDENT) until it is timed
        resident = bool(opts.pop("RESIDENT", GROUPED_RESIDENT)) and cpg == 1 and int(rule.n_group) <= 8
        if in_place:  # the exact path's registers would set every block's occupancy: capped (the rare path spills)
            opts.setdefault("maxnreg", _grouped_maxnreg(v3, has_bias or has_mask or has_boost, resident))
            redo = indices  # a stand-in: in place, the stream neither reads nor writes the redo list
        else:
            redo = torch.zeros(n_blocks + 1, dtype=torch.int32, device=logits.device)  # [0]: the count
        rows_kw = _rows_kwargs(k, E, 1, 1, flags, force_delta, precise)
        shape = dict(K=k, SLOTS=next_pow2(k), SLOTS1=next_pow2(k + 1), S=s, ROWS=rows, CB=E.bit_length() - 1,
                     CPG=cpg, GB=g_pad.bit_length() - 1, HAS_BIAS=has_bias, HAS_BIAS_ABS=has_bias_abs,
                     HAS_MASK=has_mask, HAS_BOOST=has_boost, RENORM_BOOST=has_boost and renorm_boost,
                     PRECISE=precise, num_warps=1, enable_fp_fusion=False, E_PAD=E, R_SLOTS=rows_kw["SLOTS"],
                     WIDE=wide, IN_PLACE=in_place, RESIDENT=resident,
                     **_group_kwargs(E, E, int(rule.n_group), int(rule.topk_group)))
        if v3:
            launch(_v3_stream_kernel, (n_blocks,), logits, logits.stride(0), tab, corr, weights, indices, T, E,
                   float(rule.scaling), redo[1:], redo, RENORM=bool(rule.renormalize), **shape,
                   **{"UNROLL": True, **opts})
        else:
            exact = logits.dtype in (torch.bfloat16, torch.float16) and n_cand <= SPARSE_MAX
            launch(_v2_stream_kernel, (n_blocks,), logits, logits.stride(0), tab, weights, indices, T, E, fd,
                   float(rule.scaling), n_forced, n_cand, redo[1:], redo, EXACT=exact,
                   HAS_FORCE=has_mask and has_force, R_HAS_FORCE=rows_kw["HAS_FORCE"], **shape, **opts)
        if not in_place:
            # the launch's time is the latency of one flagged block in the rows kernel: each block's rows split
            # into programs of REDO_ROWS rows (1: a row a warp, no shared-memory reductions between warps)
            split = rows // redo_rows
            e_pad, _, warps = launch_config(E, T, redo_rows)
            redo_grid = (min(n_blocks * split, _redo_programs(logits.device) * split),)
            redo_kw = dict(**_group_kwargs(E, e_pad, int(rule.n_group), int(rule.topk_group)),
                           **_rows_kwargs(k, e_pad, redo_rows, warps, flags, force_delta, precise), SPLIT=split)
            if v3:
                launch(_deepseek_v3_redo_kernel, redo_grid, logits, logits.stride(0), tab, corr, weights, indices, T,
                       E, fd, float(rule.scaling), redo[1:], redo, RENORM=bool(rule.renormalize), **redo_kw)
            else:
                launch(_deepseek_v2_redo_kernel, redo_grid, logits, logits.stride(0), tab, weights, indices, T, E,
                       fd, float(rule.scaling), redo[1:], redo, **redo_kw)
        return weights, indices
    # force with δ <= 0 sets the forced logits to the row max (+ δ), which a single pass does not know yet
    if impl != "rows" and not _grouped(rule) and _streams(rule, E) and not (
            has_force and force_delta <= 0):
        e_pad, s, rows, warps = stream_config(E, T, threads_per_row, num_warps)
        family = stream_family(rule)
        exact_keys = logits.dtype in (torch.bfloat16, torch.float16) and e_pad <= 1 << 13
        # the sparse form needs exact stream keys: its special columns compare exactly against them
        sparse = exact_keys and (has_bias or has_mask) and n_cand + n_drop <= SPARSE_MAX and s <= 4
        lossy = (has_bias and not sparse) or not exact_keys
        opts = stream_choices(rule, lossy, sparse, n_forced)
        opts.update(_stream_opts or {})
        param = float(rule.scaling) if family == 1 else float(2 * rule.jitter_eps) if family == 3 else 1.0
        launch(
            _stream_topk_kernel, (cdiv(T, rows),),
            logits, logits.stride(0), tab, weights, indices, T, E, fd, param, n_forced, n_cand, n_drop,
            FAMILY=family, K=k,
            SLOTS=next_pow2(k), SLOTS1=next_pow2(k + 1), E_PAD=e_pad, EVEN=e_pad == E, S=s,
            ROWS=rows, CB=e_pad.bit_length() - 1, LOSSY=lossy,
            SPARSE=sparse, C_PAD=next_pow2(n_cand) if sparse and n_cand else 0,
            D_PAD=next_pow2(n_drop) if sparse and n_drop else 0, D_BIAS=drop_biased,
            HAS_BIAS=has_bias, HAS_BIAS_ABS=has_bias_abs, HAS_MASK=has_mask,
            HAS_FORCE=has_mask and has_force and force_delta > 0, HAS_BOOST=has_boost,
            RENORM_BOOST=has_boost and renorm_boost, RENORM=family == 0 and bool(rule.renormalize),
            PRECISE=precise, WIDE=wide, num_warps=warps, enable_fp_fusion=False, **opts)
        return weights, indices
    if impl == "stream":
        why = ("a force with δ <= 0" if _streams(rule, E) else
               f"sparsemixer with 2ε = {2 * rule.jitter_eps:g} >= 0.45" if isinstance(rule, SparseMixerRule) and k <= 8
               else f"{type(rule).__name__} with k={k}, E={E}")
        raise InputError(f"no streamed kernel for {why}; use impl='rows' or 'auto'")
    e_pad, block_t, warps = launch_config(E, T, block_rows, num_warps)
    grid = (cdiv(T, block_t),)
    common = _rows_kwargs(k, e_pad, block_t, warps, flags, force_delta, precise)
    if isinstance(rule, SoftmaxTopK):
        launch(_softmax_topk_kernel, grid, logits, logits.stride(0), tab, weights, indices, T, E, fd,
               RENORM=bool(rule.renormalize), **common)
    elif isinstance(rule, DeepseekV3Rule):
        launch(_deepseek_v3_kernel, grid, logits, logits.stride(0), tab, corr, weights, indices, T, E, fd,
               float(rule.scaling), RENORM=bool(rule.renormalize),
               **_group_kwargs(E, e_pad, int(rule.n_group), int(rule.topk_group)), **common)
    elif isinstance(rule, DeepseekV2Rule):
        grouped = rule.method == "group_limited_greedy"
        launch(_deepseek_v2_kernel, grid, logits, logits.stride(0), tab, weights, indices, T, E, fd,
               float(rule.scaling), GROUPED=grouped,
               **_group_kwargs(E, e_pad, int(rule.n_group) if grouped else 1, int(rule.topk_group) if grouped else 1),
               **common)
    elif isinstance(rule, GptOssRule):
        launch(_gpt_oss_kernel, grid, logits, logits.stride(0), tab, weights, indices, T, E, fd, **common)
    else:
        launch(_sparsemixer_kernel, grid, logits, logits.stride(0), tab, weights, indices, T, E, fd,
               float(2 * rule.jitter_eps), **common)
    return weights, indices


def stream_family(rule) -> int:
    """``triton_stream``'s FAMILY of a rule it streams: 0 softmax-top-k, 1 DeepSeek-V2 greedy, 2 gpt-oss,
    3 sparsemixer."""
    return (0 if isinstance(rule, SoftmaxTopK) else 1 if isinstance(rule, DeepseekV2Rule)
            else 2 if isinstance(rule, GptOssRule) else 3)


def stream_choices(rule, lossy: bool, sparse: bool, n_forced: int = 0) -> dict:
    """The streamed kernel's code-generation choices for ``rule``, measured side by side on the H100
    (``benchmarks/stream_variants_gpu.py``):

    - ``VALS``: decode the picks' scores from their keys for k <= 4, gather them for k = 8;
    - ``KEEP_SIGN``: keep -0.0 in the keys (an add per logit less, a block with a pick of value 0 selected again)
      for k > 4 where the stream sums the row's softmax (``stream_variants_gpu.json``); without a row sum, for
      k <= 4 in the sparse form (``sparse``), where the other way compiled to ~155 registers against 64 (gpt-oss
      k = 2/4 steered: 59/50 % of HBM against 63/58 %; unsteered it is 2-6 % slower: ``stream_keep_gpu.json``);
    - ``N``: the list length per thread (4 at most by insertion, else 8 or 9 by merging sorted chunks). Sparsemixer
      needs room for the keys near the picks (its weights' sets): a thread whose list fills within the window
      sends its block to the rare second pass (``triton_stream._sm_again``, a runtime loop whose latency a
      straggling block adds to the call). Lists of 4 serve one free pick (the others ``n_forced``); two free
      picks (k = 2 unforced) overflowed them in 0.6 % of the blocks of Gaussian bf16 rows (T = 65,536, E = 256;
      ``benchmarks/sparsemixer_lists.py``), and k = 4 with lists of 9 ran faster than k = 2 with 4 (24.8 against
      28.2 µs, ``stream_keep_gpu.json``). Lists of 8 overflowed in none of those blocks for up to 4 free picks
      (9: for more; at 8 free picks lists of 8 overflowed in 0.5 % of them, lists of 9 in 0.02 %);
    - ``SP_TABLE``, ``KEY_FMA`` (``stream_pipes_gpu.json``): the streams bound by the integer pipe (the lists'
      min/max) take the sparse form's special columns out through a table row added per logit (the FMA pipe)
      rather than a bit test and select, and, without a row sum (whose exponentials load the FMA pipe and the
      issue slots), make the keys' sign masks with integer multiplies.

    The stream sums the row for softmax-top-k without renormalisation and DeepSeek-V2 greedy; renormalised, the
    sum cancels (the weights are a softmax over the k picks, as gpt-oss's), so that stream is gpt-oss's."""
    family, k = stream_family(rule), rule.k
    sums = family == 1 or (family == 0 and not rule.renormalize)
    n = k + lossy if family < 3 else 4 if k - n_forced <= 1 else 8 if k - n_forced <= 4 else 9
    keep_sign = not lossy and (k > 4 if sums else sparse and k <= 4)
    return dict(VALS=k <= 4, KEEP_SIGN=keep_sign, N=n, SP_TABLE=not sums or n >= 4, KEY_FMA=not sums)


V3_STREAM_MIN_TOKENS = 65536  # "auto" streams DeepSeek-V3 from here (see route_kernel)
V2_STREAM_MIN_LOGITS, V2_STREAM_MIN_EXPERTS = 1 << 22, 128  # and DeepSeek-V2's group-limited greedy
# where their uncertain rows are selected again (route_kernel), measured side by side on the H100 (float32, T = 65,536,
# E = 256: benchmarks/results/redo_ab_fp32_gpu.jsonl): V2 grouped in the stream's own programs (0.73-0.83x the
# second launch's time), DeepSeek-V3 in a second launch of one row a program (REDO_ROWS = 1: 0.79-0.93x the launch
# of whole blocks; in place it took 0.91-0.99x at k = 8 but 1.33-1.35x at k = 2)
GROUPED_IN_PLACE = {"deepseek_v3": False, "deepseek_v2": True}
GROUPED_REDO_ROWS = 1
# the row resident in registers (triton_grouped's RESIDENT: one load of the row, pass 2 without re-reads or per-row
# gathers; sm_90: 116-130 registers against 64-72, the same instruction count): off by default, since it has not
# been timed on the GPU yet (benchmarks/kernels_ab_gpu.py with {"RESIDENT": true} against {} decides it)
GROUPED_RESIDENT = False


def _rows_kwargs(k: int, e_pad: int, block_t: int, warps: int, flags: tuple, force_delta: float,
                 precise: bool) -> dict:
    """The launch keywords every rows kernel takes (``flags``: ``_device_tables``'). Slots: the k picks laid out
    like the chunk heads (one per thread) when there are at least k chunks."""
    has_bias, has_mask, has_boost, renorm_boost, n_forced = flags[:5]
    return dict(K=k, SLOTS=max(e_pad // 8, next_pow2(k)), E_PAD=e_pad, BLOCK_T=block_t,
                CB=e_pad.bit_length() - 1, HAS_BIAS=has_bias, HAS_MASK=has_mask,
                HAS_FORCE=n_forced > 0 and force_delta > 0, HAS_BOOST=has_boost,
                RENORM_BOOST=has_boost and renorm_boost, PRECISE=precise, num_warps=warps, enable_fp_fusion=False)


def _group_kwargs(E: int, e_pad: int, n_group: int, topk_group: int) -> dict:
    """The group-limited kernels' keywords (DeepSeek-V3, V2 grouped; one group of E for V2 greedy)."""
    return dict(PER_GROUP=E // n_group, N_GROUP=n_group, TOPK_GROUP=topk_group,
                G_PAD=next_pow2(n_group), RESHAPE=_groups_fill(E, e_pad, n_group))


def _redo_programs(device) -> int:
    """Programs of the redo launch: a few per SM (each loops over the flagged blocks; most calls have few)."""
    if _INTERPRET:
        return 2
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _grouped_maxnreg(v3: bool, steered: bool, resident: bool) -> int:
    """The streamed group-limited kernels' register cap: what each compiled to with its exact rows in a second
    launch (sm_90: V3 64-72 registers, V2 64 unsteered, 72-84 steered), so that the exact rows in place spill in
    their rare path rather than cost every block occupancy (registers set it: 28 warps an SM at 72). With the
    row resident (its choice scores held: 64 registers more) 128, where neither spills."""
    if resident:
        return 128
    return 72 if v3 else 80 if steered else 64


def _grouped(rule) -> bool:
    """Group-limited routing: DeepSeek-V3, or V2 with ``group_limited_greedy`` (``triton_grouped``'s families)."""
    return isinstance(rule, DeepseekV3Rule) or (isinstance(rule, DeepseekV2Rule)
                                                and rule.method == "group_limited_greedy")


def _streams(rule, num_experts: int) -> bool:
    """A streamed kernel applies: ``triton_stream`` for the logit-domain families without groups, k <= 8 (a list
    of 8 per thread; sparsemixer while 2ε < 0.45, where its bound on the experts near a pick holds);
    ``triton_grouped`` for DeepSeek-V3 and V2's group-limited greedy where ``grouped_stream_config`` fits."""
    if _grouped(rule):
        return grouped_stream_config(num_experts, int(rule.n_group), int(rule.topk_group), rule.k) is not None
    if rule.k > 8:
        return False
    if isinstance(rule, DeepseekV2Rule):
        return True
    if isinstance(rule, SparseMixerRule):
        return 2 * rule.jitter_eps < 0.45
    return isinstance(rule, (SoftmaxTopK, GptOssRule))


def masked_route_triton(logits: Tensor, rule, tables: LayerTables | None, force_delta: float = 0.01
                        ) -> tuple[Tensor, Tensor]:
    """``reference.masked_route`` through the Triton kernels. Neutral tables return ``rule(logits)`` itself (bit for
    bit the model's routing, as the reference does); rules without a kernel fall back to the reference."""
    if tables is None:
        return rule(logits)
    # the cached flags stand in for tables.is_neutral (four numpy reductions a call, per layer, per step)
    device_tables = _device_tables(tables, logits.device)
    has_bias, has_mask, has_boost = device_tables[1][:3]
    if not (has_bias or has_mask or has_boost):
        return rule(logits)
    if not isinstance(rule, _FAMILIES):
        return masked_route(logits, rule, tables, force_delta)
    return route_kernel(logits, rule, tables, force_delta, _device=device_tables)
