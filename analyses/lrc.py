"""Local routing consistency (Liang et al., arXiv 2505.16056, ICLR 2026; repo ``ljcleo/moe-lrc``): SRP and SCH.

Specification: ``algorithms.md`` §1.1–1.4. Everything is computed from the **executed** top-k (``load_routing``),
so DeepSeek-V3's bias-corrected choice is what is measured, not the raw-logit top-k moe-lrc's scripts rank.

SRP — segment routing best performance (moe-lrc ``src/30_srp_calc.py``, ``src/31_srp_refine.py``). For every
sliding window ``[s, s+m)`` inside one sequence and expert e, ``c = #tokens of the window routed to e``; the
histogram ``H[c]`` of these counts over (window, expert) pairs is all that is needed:
``M(τ) = Σ_{c≥τ} c·H[c]``, ``P(τ) = m·Σ_{c≥τ} H[c]``, ``Act = M(0)``, ``F1(τ) = 2M(τ)/(P(τ)+Act)``,
``SRP = max_τ F1(τ)`` with M, P, Act summed over windows, experts (and layers, at model level) before the max.
Extra columns: ``tau`` (the best τ, the first one on ties), ``best_rho = P(τ*)/Act`` (moe-lrc ``best_m``) and
``act_r = Act/P(0)``. A scope without any window (all sequences shorter than m) gets a null value.

SCH — segment cache best hit rate (moe-lrc ``src/41_sch_calc.py::calc_fsf``, ``src/42_sch_refine.py``): the hit rate
of a capacity-C cache that evicts the item with the lowest (look-ahead count over the segment of m tokens
starting at the current token, last access) — see ``lrc_kernels.band_counts`` for the exact rule and the
cold-start convention (the first C distinct experts are free hits). ``C = ρ·k`` per layer; at model level every
token requests all layers' top-k (layer order, items ``l·E + e``) from one shared cache with ``C = ρ·k·L``.
Baselines (moe-lrc ``src/50_chr_calc.py``): LRU, LFU (accesses since the sequence start, recency tie-break) and
Belady (furthest next use; items never used again leave largest id first), same cold-start rule, no m.

Request order inside a token: moe-lrc orders a token's experts by descending raw router logit; routelens stores
the executed top-k by rank (rank 0 = largest routing weight). Wherever the weight is monotone in the raw logit
(softmax routers, gpt-oss' softmax over the chosen k, DeepSeek-V3's unbiased sigmoid weights of the bias-chosen
set) the two orders coincide on the executed set; Phi-MoE's sparsemixer weights need not be. The order only
matters inside a token (which request may evict which), never across tokens.

Samples and averaging, as in moe-lrc: each stored sequence is one sample (moe-lrc cuts 512-token samples);
windows and caches never cross sequences. SRP is micro-averaged (M, P, Act summed over sequences); SCH and the
baselines are the mean over sequences of each sequence's hit rate ``hits/(T·k·L)``. ``sch_stride`` keeps every
n-th sequence for SCH (moe-lrc uses ``topk[::16]``; default 1 = all); the baselines always use all sequences, as
moe-lrc's do.

Confidence intervals: sequences are resampled with multinomial weights (B draws of n indices with replacement,
seeded by ``seed``; the unresampled estimate is θ), and the basic (pivot) interval
``[2θ − q[B − round(B·α/2)], 2θ − q[round(B·α/2)]]`` over the sorted bootstrap values q (α = 1 − confidence;
indices clipped to the B values) is reported, as moe-lrc does. The same weights are used for every layer, m
and metric over the same sequences, so model-level and layer-level intervals resample the same samples.

Output part ``values``: one row per (metric, scope, layer, m, ρ): ``metric`` (srp, sch, lru, lfu, belady),
``scope`` (layer | model), ``layer`` (decoder-layer index, null at model level), ``m`` (null for the baselines),
``rho`` (null for SRP), ``capacity`` (C), ``value``, ``ci_low``, ``ci_high``, ``tau``, ``best_rho``, ``act_r``
(SRP only), ``n_seqs`` (sequences used).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from routelens.errors import InputError

from . import lrc_kernels as K
from .registry import Analysis
from .routing_arrays import load_routing

__all__ = ["LrcParams", "SrpScore", "ANALYSIS", "compute", "srp_score", "srp_histograms", "rho_grid", "capacities",
           "cache_depth_counts", "hit_rates", "bootstrap_weights", "basic_interval", "POLICIES"]

POLICIES = {"sch": K.POLICY_SCH, "lru": K.POLICY_LRU, "lfu": K.POLICY_LFU, "belady": K.POLICY_BELADY}
METRICS = ("srp",) + tuple(POLICIES)


@dataclass(frozen=True)
class LrcParams:
    m: tuple[int, ...] = field(default=(4, 16, 64, 256), metadata={"help": "segment lengths m (SRP window, SCH "
                                                                         "look-ahead)"})
    rho: tuple[float, ...] = field(default=(), metadata={"help": "cache sizes ρ = C/k (C/(k·L) at model level); "
                                                             "empty: every multiple of 1/k up to --rho-max"})
    rho_max: float = field(default=4.0, metadata={"help": "largest ρ of the default grid"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples B over sequences (0: no interval)"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap weights"})
    confidence: float = field(default=0.95, metadata={"help": "confidence of the basic bootstrap interval"})
    layers: tuple[int, ...] = field(default=(), metadata={"help": "MoE decoder layers (empty: all); the model "
                                                                  "level uses these layers"})
    metrics: tuple[str, ...] = field(default=METRICS, metadata={"help": "any of srp, sch, lru, lfu, belady"})
    sch_stride: int = field(default=1, metadata={"help": "SCH on every n-th sequence only (moe-lrc: 16)"})
    model_level: bool = field(default=True, metadata={"help": "also the model level (all layers together)"})


# ----------------------------------------------------------------------------------------------------------- SRP
@dataclass(frozen=True)
class SrpScore:
    """SRP of histograms ``H[..., m+1]`` (leading axes kept): best F1, its τ, P(τ*)/Act and Act/P(0)."""

    f1: np.ndarray
    tau: np.ndarray
    best_rho: np.ndarray
    act_r: np.ndarray


def srp_score(hist: np.ndarray, m: int) -> SrpScore:
    """``max_τ 2M(τ)/(P(τ)+Act)`` from the count histogram ``hist[..., c]``, c = 0..m (algorithms.md §1.2).

    ``M(τ) = Σ_{c≥τ} c·H[c]``, ``P(τ) = m·Σ_{c≥τ} H[c]``, ``Act = M(0)`` (moe-lrc ``31_srp_refine.py::refine``:
    reverse cumulative sums, ``f1 = 2m/(p+a)``, ``best_m = p[τ*]/a``, ``act_r = a/p[0]``). Histograms without
    any window give NaN."""
    h = np.asarray(hist, np.float64)
    c = np.arange(h.shape[-1], dtype=np.float64)
    matched = np.flip(np.cumsum(np.flip(h * c, -1), -1), -1)
    predicted = m * np.flip(np.cumsum(np.flip(h, -1), -1), -1)
    act = matched[..., :1]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2.0 * matched / (predicted + act)
        empty = (predicted[..., 0] == 0)
        tau = np.argmax(np.where(np.isnan(f1), -np.inf, f1), -1)
        best = np.take_along_axis(f1, tau[..., None], -1)[..., 0]
        best_rho = np.take_along_axis(predicted, tau[..., None], -1)[..., 0] / act[..., 0]
        act_r = act[..., 0] / predicted[..., 0]
    best = np.where(empty, np.nan, best)
    return SrpScore(best, tau, np.where(empty, np.nan, best_rho), np.where(empty, np.nan, act_r))


def srp_histograms(experts: np.ndarray, seq_start: np.ndarray, num_experts: int, m: int) -> np.ndarray:
    """Per-sequence SRP histograms ``[S, m+1]`` (int64) of one layer's ``experts[N, k]`` (``lrc_kernels``)."""
    return K.srp_histograms(np.ascontiguousarray(experts), np.ascontiguousarray(seq_start, np.int64), int(num_experts),
                            int(m))


# ----------------------------------------------------------------------------------------------------------- SCH
def rho_grid(top_k: int, rho: tuple[float, ...] = (), rho_max: float = 4.0) -> np.ndarray:
    """The ρ values: ``rho`` if given, else every multiple of 1/k in (0, rho_max] (moe-lrc's C = 1, 2, ..)."""
    if rho:
        out = np.asarray(sorted(set(float(r) for r in rho)), np.float64)
    else:
        out = np.arange(1, int(np.floor(rho_max * top_k + 1e-9)) + 1, dtype=np.float64) / top_k
    if out.size == 0 or out[0] <= 0:
        raise InputError(f"lrc: cache sizes ρ must be positive (got {list(rho) or rho_max}); pass --rho 0.5,1,2")
    return out


def capacities(rho: np.ndarray, top_k: int, n_layers: int = 1) -> np.ndarray:
    """``C = ρ·k·n_layers`` as integers; refuses a ρ for which ρ·k is not a whole number of experts."""
    c = np.asarray(rho, np.float64) * top_k
    if not np.allclose(c, np.round(c), atol=1e-9):
        raise InputError(f"lrc: every ρ must be a multiple of 1/k = 1/{top_k} (ρ·k experts); got {list(rho)}")
    return np.round(c).astype(np.int64) * int(n_layers)


def _check_key_bits(max_len: int, n_layers: int, top_k: int) -> None:
    # the kernel packs (count, request counter, slot) into one int64 priority
    bits = int(max_len).bit_length() + int(max_len * n_layers * top_k + 1).bit_length() + int(n_layers).bit_length()
    if bits > 61:
        raise InputError(f"lrc: a {max_len}-token sequence is too long for the cache kernels; split it into samples")


def cache_depth_counts(experts: np.ndarray, seq_start: np.ndarray, seq_sel: np.ndarray, num_experts: int,
                       policy: str, window: int, cmax: int, group: int = 1) -> np.ndarray:
    """Requests of each selected sequence served at stack depths ``[g·j, g·(j+1))``, ``[len(seq_sel), cmax/g]``.

    ``experts[Lc, N, k]``: Lc = 1 is a per-layer cache, Lc > 1 one shared cache over the layers' concatenated
    requests. ``hits(C) = counts[:, :C/g].sum(1)`` for every multiple C of g = ``group`` up to cmax
    (``lrc_kernels.band_counts``; g = 1 gives every depth)."""
    if experts.ndim != 3:
        raise ValueError("experts must be [layers, tokens, k]")
    if group < 1 or cmax % group:
        raise ValueError("cmax must be a multiple of group")
    _check_key_bits(int(np.diff(seq_start).max(initial=0)), experts.shape[0], experts.shape[2])
    # contiguous int64 inputs: one compiled specialisation per expert dtype, none per stride
    _, out = K.band_counts(np.ascontiguousarray(experts), np.ascontiguousarray(seq_start, np.int64),
                           np.ascontiguousarray(seq_sel, np.int64), int(num_experts), POLICIES[policy],
                           np.array([window], np.int64), 0, int(group), int(cmax) // int(group))
    return out[0]


def hit_rates(counts: np.ndarray, caps: np.ndarray, requests: np.ndarray, group: int = 1) -> np.ndarray:
    """Per-sequence hit rate at each capacity: ``hits(C)/requests``, ``[S, len(caps)]``, from counts per band of
    ``group`` depths; C beyond the counted depths (C >= the universe) hits everything."""
    cum = np.cumsum(counts, axis=1)
    idx = np.minimum(np.asarray(caps) // group, counts.shape[1]) - 1
    return cum[:, idx] / np.asarray(requests, np.float64)[:, None]


# ----------------------------------------------------------------------------------------------------- bootstrap
def bootstrap_weights(n: int, draws: int, seed: int) -> np.ndarray:
    """``W[b, i]`` = how often sequence i is drawn in resample b (n draws with replacement), int32 ``[B, n]``."""
    rng = np.random.default_rng(seed)
    out = np.zeros((draws, n), np.int32)
    step = max(1, 4_000_000 // max(n, 1))
    for b0 in range(0, draws, step):
        b1 = min(draws, b0 + step)
        idx = rng.integers(0, n, size=(b1 - b0, n)) + (np.arange(b1 - b0)[:, None] * n)
        out[b0:b1] = np.bincount(idx.ravel(), minlength=(b1 - b0) * n).reshape(b1 - b0, n)
    return out


def basic_interval(theta: np.ndarray, boot: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Basic (pivot) interval ``[2θ − q[B−j], 2θ − q[j]]``, j = round(B·(1−confidence)/2), q the bootstrap values
    sorted along axis 0 (moe-lrc ``31_srp_refine.py``/``41_sch_calc.py::stat``); indices clipped to 0..B−1."""
    theta = np.asarray(theta, np.float64)
    n_boot = boot.shape[0]
    if n_boot == 0:
        nan = np.full(theta.shape, np.nan)
        return nan, nan
    q = np.sort(boot, axis=0)
    lo = min(max(round(n_boot * ((1 - confidence) / 2)), 0), n_boot - 1)
    hi = min(n_boot - lo, n_boot - 1)
    return 2 * theta - q[hi], 2 * theta - q[lo]


# ------------------------------------------------------------------------------------------------------- compute
def _check(params: LrcParams) -> None:
    bad = sorted(set(params.metrics) - set(METRICS))
    if bad:
        raise InputError(f"lrc: unknown metric(s) {bad}; choose from {', '.join(METRICS)}")
    if not params.m or min(params.m) < 1:
        raise InputError(f"lrc: segment lengths m must be positive integers, got {list(params.m)}")
    if params.bootstrap < 0 or params.sch_stride < 1 or not 0 < params.confidence < 1:
        raise InputError("lrc: need --bootstrap >= 0, --sch-stride >= 1 and 0 < --confidence < 1")


def _rows_from(metric, scope, layer, m, rho, caps, theta, boot, params, n_seqs, extra=None):
    lo, hi = basic_interval(theta, boot, params.confidence)
    rows = []
    for j in range(len(theta)):
        row = {"metric": metric, "scope": scope, "layer": layer, "m": m,
               "rho": None if rho is None else float(rho[j]), "capacity": None if caps is None else int(caps[j]),
               "value": float(theta[j]), "ci_low": float(lo[j]), "ci_high": float(hi[j]),
               "tau": None, "best_rho": None, "act_r": None, "n_seqs": int(n_seqs)}
        if extra:
            row.update({k: v[j] for k, v in extra.items()})
        rows.append(row)
    return rows


_SCHEMA = {"metric": pl.Utf8, "scope": pl.Utf8, "layer": pl.Int64, "m": pl.Int64, "rho": pl.Float64,
           "capacity": pl.Int64, "value": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
           "tau": pl.Int64, "best_rho": pl.Float64, "act_r": pl.Float64, "n_seqs": pl.Int64}


def _nan_to_none(x):
    x = float(x)
    return None if np.isnan(x) else x


def compute(store, runs, params: LrcParams) -> dict[str, pl.DataFrame]:
    _check(params)
    info = runs[0]
    arrays = load_routing(store, info, layers=params.layers or None)
    if arrays.n_tokens == 0:
        raise InputError(f"run {info.run_id} holds no tokens; trace some text first")
    ex = arrays.experts
    L, _, k = ex.shape
    E = int(info.num_experts)
    seq_start = arrays.seq_start
    lengths = np.diff(seq_start)
    n_seq = len(lengths)
    scopes = [("layer", li, ex[li:li + 1]) for li in range(L)]
    if params.model_level:
        scopes.append(("model", None, ex))
    weights_all = bootstrap_weights(n_seq, params.bootstrap, params.seed).astype(np.float64)
    rows: list[dict] = []

    if "srp" in params.metrics:
        for m in params.m:
            hists = [srp_histograms(ex[li], seq_start, E, m) for li in range(L)]
            used = int((lengths >= m).sum())
            for scope, li, _ in scopes:
                h = hists[li] if scope == "layer" else np.sum(hists, axis=0)
                point = srp_score(h.sum(0), m)
                boot = srp_score(weights_all @ h, m).f1
                row = _rows_from("srp", scope, None if li is None else arrays.layers[li], m, None, None,
                                 point.f1[None], boot[:, None], params, used)[0]
                row.update(tau=None if np.isnan(point.f1) else int(point.tau),
                           best_rho=_nan_to_none(point.best_rho), act_r=_nan_to_none(point.act_r),
                           value=_nan_to_none(row["value"]), ci_low=_nan_to_none(row["ci_low"]),
                           ci_high=_nan_to_none(row["ci_high"]))
                rows.append(row)

    rho = rho_grid(k, params.rho, params.rho_max)
    policies = [p for p in POLICIES if p in params.metrics]
    all_seqs = np.arange(n_seq, dtype=np.int64)
    sch_seqs = all_seqs[::params.sch_stride]
    weights_sch = (weights_all if params.sch_stride == 1
                   else bootstrap_weights(len(sch_seqs), params.bootstrap, params.seed).astype(np.float64))
    if policies:
        _check_key_bits(int(lengths.max()), L, k)
        caps_layer = capacities(rho, k)
        caps_model = caps_layer * L
        cmax_layer = int(min(caps_layer.max(), E))
        cmax_model = int(min(caps_model.max(), L * E))  # a multiple of L: every model-level C is one
    for policy in policies:
        sel, weights = (sch_seqs, weights_sch) if policy == "sch" else (all_seqs, weights_all)
        windows = params.m if policy == "sch" else (None,)
        # one parallel pass: every window length, every layer's cache and the shared one
        lay, mod = K.band_counts(np.ascontiguousarray(ex), np.ascontiguousarray(seq_start, np.int64), sel, E,
                                 POLICIES[policy], np.array([m or 1 for m in windows], np.int64), cmax_layer,
                                 L, cmax_model // L if params.model_level else 0)
        for w, m in enumerate(windows):
            for scope, li, _ in scopes:
                if scope == "layer":
                    caps, rates = caps_layer, hit_rates(lay[w, li], caps_layer, lengths[sel] * k)
                else:
                    caps, rates = caps_model, hit_rates(mod[w], caps_model, lengths[sel] * k * L, group=L)
                theta = rates.mean(0)
                boot = weights @ rates / len(sel)
                rows += _rows_from(policy, scope, None if li is None else arrays.layers[li], m, rho, caps, theta,
                                   boot, params, len(sel))
    return {"values": pl.DataFrame(rows, schema=_SCHEMA) if rows else pl.DataFrame(schema=_SCHEMA)}


ANALYSIS = Analysis(name="lrc", summary="local routing consistency: SRP and SCH (moe-lrc), with LRU/LFU/Belady "
                                        "cache baselines and bootstrap intervals over sequences",
                    params=LrcParams, compute=compute, primary="values")
