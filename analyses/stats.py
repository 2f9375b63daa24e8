"""Routing statistics of a run (CLI ``stats``): expert load and balance, router entropy, co-activation within a layer
and across consecutive MoE layers, vocabulary and domain specialisation, and routing agreement between two runs.

All counts are over the **executed** top-k (``routing_arrays.load_routing``), rank 0 = largest weight.

Parts (every frame starts with ``run_id``; with two runs each per-run part holds both runs):

``load`` — ``layer, expert, n_tokens, share, f_i, token_frac, p_i``: ``n_tokens`` decisions (tokens with the expert
    in their top-k), ``share = f_i = n_tokens / (N·k)`` (share of the layer's decisions; the Switch ``f_i``),
    ``token_frac = n_tokens / N``, ``p_i`` the mean router probability (softmax of the stored logits; NaN without).
``layers`` (primary) — ``layer, n_tokens, cv, lb_value, lb_value_hf, lb_source, entropy, entropy_source,
    entropy_max, n_unused, max_share, vocab_specialisation, n_vocab_tokens``. See :func:`balance` and
    :func:`router_entropy` / :func:`weights_entropy` for the formulas.
``coactivation`` — ``layer, expert_a, expert_b, count, p_b_given_a`` (non-zero pairs only), :func:`coactivation`.
``coactivation_next`` — ``layer, next_layer, expert_a, expert_b, count, p`` (non-zero pairs only),
    :func:`cross_layer_coactivation`.
``vocab`` — ``layer, token_id, token, count, top_expert, share`` for tokens seen >= ``vocab_min_freq`` times,
    :func:`vocab_specialisation`.
``domain`` — ``label, layer, expert, n_tokens, label_tokens, share, lift, vs_all`` per value of
    ``sequences.<domain_field>`` (tokens of sequences without one are left out), :func:`domain_counts`.
``agreement`` (two runs) — ``run_a, run_b, layer, n_tokens, topk_overlap, top1_agreement, exact_set``,
    :func:`topk_agreement`; tokens matched by (seq_id, pos), refused when their token ids differ.

Memory: the run is read one MoE layer at a time (the previous layer's experts kept for ``coactivation_next``) and
every count is a bincount over token chunks, so the peak stays under the trace's compact form (measured on 1 M
tokens × 16 layers × top-8: 293 MiB for a 358 MiB compact form).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from routelens.errors import InputError
from routelens.records import RunInfo

from .registry import Analysis
from .routing_arrays import RoutingArrays, load_routing

__all__ = ["StatsParams", "ANALYSIS", "expert_counts", "balance", "router_probs", "weights_entropy",
           "coactivation", "cross_layer_coactivation", "vocab_specialisation", "domain_counts", "topk_agreement"]

PAIR_MODES = ("all", "consecutive")
DOMAIN_FIELDS = ("label", "lang", "align_id")
_CHUNK = 1 << 16  # rows of logits converted to float32 at a time (bounded memory on long runs)
# tokens whose [k] expert lists are widened to int64 for one np.bincount at a time: the widened copy of a whole
# [N, k] layer (8 bytes per decision) would be larger than the trace's compact form (2.8 bytes per decision)
_TOKENS = 1 << 14


@dataclass(frozen=True)
class StatsParams:
    layers: tuple[int, ...] = field(default=(), metadata={"help": "MoE layers (decoder-layer indices); default all"})
    vocab_min_freq: int = field(default=20, metadata={
        "help": "vocabulary specialisation: only tokens seen at least this often (moe-lrc: 20)"})
    coactivation_pairs: str = field(default="all", metadata={
        "help": "co-activation pairs within a token's top-k: all (every pair) or consecutive (OLMoE: rank-adjacent)"})
    domain_field: str = field(default="label", metadata={
        "help": "sequence field whose values are the domains: label, lang or align_id"})
    prompt_only: bool = field(default=False, metadata={
        "help": "agreement (two runs): only prompt tokens, for runs whose generated continuations differ"})


# -- pure functions ----------------------------------------------------------------------------------------------

def expert_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """``n_i`` = number of top-k decisions for expert i in one layer; ``experts`` is ``[N, k]``. int64 ``[E]``."""
    counts = np.zeros(num_experts, np.int64)
    for a in range(0, len(experts), _TOKENS):
        counts += np.bincount(experts[a:a + _TOKENS].reshape(-1).astype(np.intp), minlength=num_experts)
    return counts


def balance(counts: np.ndarray, n_tokens: int, top_k: int, mean_prob: np.ndarray | None) -> tuple[float, float]:
    """(cv, lb_value) of one layer from the per-expert decision counts ``n_i``.

    - ``cv = std(n) / mean(n)`` (population std, ddof 0): 0 = perfectly even load.
    - ``lb_value = N_E · Σ_i f_i · P_i`` with ``f_i = n_i / (N·k)`` (fraction of the layer's top-k decisions, i.e.
      fraction of tokens routed to i divided by k) and ``P_i`` = mean over tokens of softmax(router logits)_i: the
      Switch Transformer auxiliary-loss quantity (Fedus et al. 2021, eq. 4-6), 1.0 when uniform. transformers'
      ``load_balancing_loss_func`` (``models/mixtral/modeling_mixtral.py``, 5.23) uses ``n_i / N`` (summing to k)
      instead of ``f_i``, so its value for one layer, before ``router_aux_loss_coef``, is ``k · lb_value``.
      NaN when ``mean_prob`` is None (no logits stored).
    """
    counts = np.asarray(counts, np.float64)
    mean = counts.mean() if counts.size else 0.0
    cv = float(counts.std() / mean) if mean > 0 else float("nan")
    if mean_prob is None or n_tokens == 0:
        return cv, float("nan")
    f = counts / (n_tokens * top_k)
    return cv, float(len(counts) * np.dot(f, np.asarray(mean_prob, np.float64)))


def router_probs(logits: np.ndarray) -> tuple[np.ndarray, float]:
    """(mean router probability ``P_i`` [E], mean per-token entropy in nats) from raw logits ``[N, E]``.

    ``p = softmax(z)``, ``H = −Σ_i p_i ln p_i = logsumexp(z) − Σ_i p_i z_i``, averaged over tokens. The softmax over
    all E logits is the Switch/Mixtral router distribution; for sigmoid (DeepSeek-V3) or top-k-then-softmax
    (gpt-oss) routers it is the distribution the aux loss and SteerMoE use, not the executed weights.
    """
    n, e = logits.shape
    if n == 0:
        return np.full(e, np.nan), float("nan")
    psum = np.zeros(e, np.float64)
    hsum = 0.0
    for start in range(0, n, _CHUNK):
        z = logits[start:start + _CHUNK].astype(np.float32)
        zmax = z.max(axis=1, keepdims=True)
        ez = np.exp(z - zmax)
        s = ez.sum(axis=1, keepdims=True)
        p = ez / s
        psum += p.sum(axis=0, dtype=np.float64)
        lse = np.log(s[:, 0]) + zmax[:, 0]
        hsum += float((lse - (p * z).sum(axis=1)).sum(dtype=np.float64))
    return psum / n, hsum / n


def weights_entropy(weights: np.ndarray) -> float:
    """Mean per-token entropy (nats) of the stored top-k routing weights ``[N, k]`` renormalised to sum 1:
    ``q = w / Σw``, ``H = −Σ q ln q``. Used when no logits are stored; it only sees the k selected experts, so it is
    at most ln k and not comparable with the logits entropy (at most ln E)."""
    weights = np.asarray(weights)
    if weights.shape[0] == 0:
        return float("nan")
    h = np.empty(weights.shape[0], np.float64)  # per token, then one mean: the same sum as unchunked
    for a in range(0, weights.shape[0], _CHUNK):
        w = weights[a:a + _CHUNK].astype(np.float64)
        q = w / w.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            h[a:a + _CHUNK] = -np.where(q > 0, q * np.log(q), 0.0).sum(axis=1)
    return float(h.mean())


def coactivation(experts: np.ndarray, num_experts: int, pairs: str = "all") -> np.ndarray:
    """Symmetric ``C[a, b]`` over one layer's top-k lists ``[N, k]``.

    ``pairs="all"``: ``C[a, b]`` = number of tokens with both a and b in their top-k (a ≠ b).
    ``pairs="consecutive"``: allenai/OLMoE ``scripts/run_moe_analysis.py::do_correlation_analysis``: only
    rank-adjacent pairs (``more_itertools.pairwise`` over the top-k list), counted in both directions.
    ``P(b | a) = C[a, b] / n_a`` with ``n_a`` the decision count of a (:func:`expert_counts`).
    """
    k = experts.shape[1]
    if pairs == "all":
        return _all_rank_pairs(experts, experts, num_experts, same_rank=False)
    if pairs != "consecutive":
        raise InputError(f"coactivation_pairs must be one of {PAIR_MODES}, got {pairs!r}")
    rs = np.array([r for r in range(k - 1)] + [r + 1 for r in range(k - 1)], np.intp)
    ss = np.array([r + 1 for r in range(k - 1)] + [r for r in range(k - 1)], np.intp)
    c = np.zeros(num_experts * num_experts, np.int64)
    for lo in range(0, len(experts), _TOKENS):
        x = experts[lo:lo + _TOKENS].astype(np.intp)
        c += np.bincount((x[:, rs] * num_experts + x[:, ss]).reshape(-1), minlength=num_experts * num_experts)
    return c.reshape(num_experts, num_experts)


def _all_rank_pairs(a: np.ndarray, b: np.ndarray, num_experts: int, same_rank: bool) -> np.ndarray:
    """``C[x, y]`` = number of (token, r, s) with ``a[token, r] = x`` and ``b[token, s] = y``, over every rank pair
    (``same_rank=False``: except r = s). One bincount of the combined indices ``x·E + y`` per token chunk; the
    r = s pairs are counted with the rest and subtracted (cheaper than gathering the r ≠ s columns)."""
    EE = num_experts * num_experts
    c = np.zeros(EE, np.int64)
    for lo in range(0, len(a), _TOKENS):
        x = a[lo:lo + _TOKENS].astype(np.intp)
        y = x if b is a else b[lo:lo + _TOKENS].astype(np.intp)
        c += np.bincount((x[:, :, None] * num_experts + y[:, None, :]).reshape(-1), minlength=EE)
        if not same_rank:
            c -= np.bincount((x * num_experts + y).reshape(-1), minlength=EE)
    return c.reshape(num_experts, num_experts)


def cross_layer_coactivation(experts_a: np.ndarray, experts_b: np.ndarray, num_experts: int) -> np.ndarray:
    """``C[a, b]`` = number of tokens with a in their top-k at layer l and b in their top-k at the next MoE layer;
    ``p = P(b at l' | a at l) = C[a, b] / n_a(l)``. (allenai/OLMoE ``run_routing_analysis.py`` counts ``zip`` of
    the flattened ``[N, k]`` lists, i.e. only same-rank pairs; here every one of the k×k pairs counts.)"""
    return _all_rank_pairs(experts_a, experts_b, num_experts, same_rank=True)


def vocab_specialisation(token_id: np.ndarray, top1: np.ndarray, num_experts: int, min_freq: int):
    """moe-lrc vocabulary specialisation (ljcleo/moe-lrc ``src/20_vocab_calc.py``, ``22_vocab_refine.py``;
    algorithms.md §1.4): with top-1 routing, for every token id v seen ``count(v) >= min_freq`` times,
    ``freq(v) = max_e count(v, e) / count(v)`` and its argmax expert (lowest id on ties).

    Returns (token_ids, counts, top_expert, share), sorted by token id.
    """
    index = _vocab_index(token_id, min_freq)
    return index.ids, index.counts, *_vocab_top(index, top1, num_experts)


@dataclass(frozen=True)
class _VocabIndex:
    """The token ids seen >= min_freq times (sorted), their counts, and each token's row among them (-1: none);
    the same for every layer, so built once per run."""
    ids: np.ndarray  # int64 [V]
    counts: np.ndarray  # int64 [V]
    row: np.ndarray  # int64 [N]


def _vocab_index(token_id: np.ndarray, min_freq: int) -> _VocabIndex:
    tok = np.asarray(token_id, np.int64)
    if tok.size == 0:
        z = np.zeros(0, np.int64)
        return _VocabIndex(z, z, z)
    uniq, inverse, counts = np.unique(tok, return_inverse=True, return_counts=True)
    keep = counts >= min_freq
    compact = np.full(len(uniq), -1, np.int64)
    compact[keep] = np.arange(int(keep.sum()))
    return _VocabIndex(uniq[keep], counts[keep], compact[inverse.reshape(-1)])


def _vocab_top(index: _VocabIndex, top1: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(argmax expert, its share) per kept token id, from the top-1 expert of each token ``top1`` [N]."""
    V = len(index.ids)
    if V == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    table = np.zeros(V * num_experts, np.int64)
    for a in range(0, len(index.row), _CHUNK):
        row = index.row[a:a + _CHUNK]
        sel = row >= 0
        table += np.bincount(row[sel] * num_experts + top1[a:a + _CHUNK][sel].astype(np.int64),
                             minlength=V * num_experts)
    table = table.reshape(V, num_experts)
    top = table.argmax(axis=1)
    share = table[np.arange(V), top] / index.counts
    return top.astype(np.int64), share.astype(np.float64)


def domain_counts(group: np.ndarray, n_groups: int, experts: np.ndarray, num_experts: int) -> np.ndarray:
    """``C[g, e]`` = top-k decisions for expert e among tokens of domain g (``group`` [N], -1 = none) in one layer
    (allenai/OLMoE ``run_routing_analysis.py``: per-domain expert counters, plotted as shares)."""
    g = np.asarray(group)
    c = np.zeros(n_groups * num_experts, np.int64)
    for a in range(0, len(g), _TOKENS):
        gs = g[a:a + _TOKENS]
        sel = gs >= 0
        idx = gs[sel].astype(np.intp)[:, None] * num_experts + experts[a:a + _TOKENS][sel].astype(np.intp)
        c += np.bincount(idx.reshape(-1), minlength=n_groups * num_experts)
    return c.reshape(n_groups, num_experts)


def topk_agreement(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token: ``|A ∩ B| / k`` of two top-k lists ``[N, k]`` (experts within a list are distinct) and whether
    their rank-0 experts agree. Router saturation (allenai/OLMoE ``run_moe_analysis.py::do_ckpt_analysis``) is the
    mean of the first (top-k) or of the second (top-1) over tokens."""
    k = a.shape[1]
    inter = np.zeros(a.shape[0], np.int64)
    for r in range(k):
        for s in range(b.shape[1]):
            inter += a[:, r] == b[:, s]
    return inter / k, a[:, 0] == b[:, 0]


# -- store side ---------------------------------------------------------------------------------------------------

def _keys(seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return (seq.astype(np.int64) << 32) | pos.astype(np.int64)


def _align(ref_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Index into ``ref_keys`` (sorted) of each of ``keys``, -1 where absent."""
    at = np.searchsorted(ref_keys, keys)
    at = np.minimum(at, max(len(ref_keys) - 1, 0))
    ok = (len(ref_keys) > 0) & (ref_keys[at] == keys) if len(ref_keys) else np.zeros(len(keys), bool)
    return np.where(ok, at, -1)


def _layers_wanted(info: RunInfo, params: StatsParams) -> tuple[int, ...]:
    if not params.layers:
        return tuple(info.moe_layers)
    bad = sorted(set(params.layers) - set(info.moe_layers))
    if bad:
        raise InputError(f"--layers {bad} are not MoE layers of run {info.run_id} (MoE layers: "
                         f"{list(info.moe_layers)}); layers are decoder-layer indices")
    return tuple(sorted(set(params.layers)))


def _vocab_texts(store, run_id: int, ids: np.ndarray) -> list[str | None]:
    if len(ids) == 0:
        return []
    rows = store.sql("SELECT token_id, token FROM vocab WHERE run_id = $run AND list_contains($ids, token_id)",
                     {"run": run_id, "ids": [int(i) for i in ids]})
    text = dict(zip(rows["token_id"].to_list(), rows["token"].to_list()))
    return [text.get(int(i)) for i in ids]


def _domains(store, info: RunInfo, ra: RoutingArrays, fld: str) -> tuple[list[str], np.ndarray]:
    seqs = store.sql(f"SELECT seq_id, {fld} AS d FROM sequences WHERE run_id = $run AND {fld} IS NOT NULL",
                     {"run": info.run_id})
    names = sorted(set(seqs["d"].to_list()))
    code = {n: i for i, n in enumerate(names)}
    seq_ids = seqs["seq_id"].to_numpy().astype(np.int64)
    seq_code = np.array([code[d] for d in seqs["d"].to_list()], np.int64)
    order = np.argsort(seq_ids)
    seq_ids, seq_code = seq_ids[order], seq_code[order]
    group = np.full(ra.n_tokens, -1, np.int64)
    if len(seq_ids):
        at = _align(seq_ids, ra.seq_id)
        group = np.where(at >= 0, seq_code[np.maximum(at, 0)], -1)
    return names, group


def _run_parts(store, info: RunInfo, params: StatsParams) -> dict[str, pl.DataFrame]:
    layers = _layers_wanted(info, params)
    handle = store.run(info.run_id)
    has_logits = handle.has_logits()
    E = info.num_experts
    load_rows, layer_rows, co_rows, next_rows, vocab_rows, dom_rows = [], [], [], [], [], []
    prev_ex = prev_counts = None
    # One layer in memory at a time (plus the previous one's experts, for the cross-layer counts): all layers at
    # once, with their weights, would exceed the trace's compact form.
    for li, layer in enumerate(layers):
        ra = load_routing(store, info, (layer,), weights=not has_logits, tokens=li == 0)
        if li == 0:
            k, N = ra.top_k, ra.n_tokens
            ref_keys = _keys(ra.seq_id, ra.pos) if has_logits else None
            domain_names, group = _domains(store, info, ra, params.domain_field)
            vocab_index = _vocab_index(ra.token_id, params.vocab_min_freq)
            vocab_texts = _vocab_texts(store, info.run_id, vocab_index.ids)
            label_tokens = np.bincount(group[group >= 0], minlength=len(domain_names))
        ex = ra.experts[0]
        layer_weights = ra.weights
        del ra
        counts = expert_counts(ex, E)
        mean_prob, entropy, lb_source, ent_source = None, float("nan"), "no logits (trace with --logits)", "top-k weights"
        lb_counts, lb_n = counts, N
        if has_logits:
            lframe, logits = handle.logits(layer)
            at = _align(ref_keys, _keys(lframe["seq_id"].to_numpy(), lframe["pos"].to_numpy()))
            found = at >= 0
            if not found.all():  # the copy only when some rows are not among the routed tokens
                logits = logits[found]
                at = at[found]
            mean_prob, entropy = router_probs(logits)
            ent_source = lb_source = "logits"
            if len(at) != N:  # some tokens have no logits: f_i over the same tokens as P_i
                lb_counts, lb_n = expert_counts(ex[at], E), len(at)
                lb_source = f"logits ({len(at)} of {N} tokens)"
            del logits
        else:
            entropy = weights_entropy(layer_weights[0])
        del layer_weights
        cv = balance(counts, N, k, None)[0]
        lb = balance(lb_counts, lb_n, k, mean_prob)[1]
        share = counts / (N * k) if N else np.full(E, np.nan)
        load_rows.append(pl.DataFrame({
            "layer": np.full(E, layer, np.int32), "expert": np.arange(E, dtype=np.int32), "n_tokens": counts,
            "share": share, "f_i": share, "token_frac": counts / N if N else np.full(E, np.nan),
            "p_i": np.full(E, np.nan) if mean_prob is None else mean_prob}))
        vids, vcounts = vocab_index.ids, vocab_index.counts
        vtop, vshare = _vocab_top(vocab_index, ex[:, 0], E)
        layer_rows.append({
            "layer": layer, "n_tokens": N, "cv": cv, "lb_value": lb, "lb_value_hf": k * lb, "lb_source": lb_source,
            "entropy": entropy, "entropy_source": ent_source, "entropy_max": float(np.log(E if has_logits else k)),
            "n_unused": int((counts == 0).sum()), "max_share": float(share.max()) if N else float("nan"),
            "vocab_specialisation": float(vshare.mean()) if len(vshare) else float("nan"),
            "n_vocab_tokens": len(vids)})
        vocab_rows.append(pl.DataFrame({
            "layer": np.full(len(vids), layer, np.int32), "token_id": vids.astype(np.int64),
            "token": pl.Series(vocab_texts, dtype=pl.Utf8), "count": vcounts,
            "top_expert": vtop.astype(np.int32), "share": vshare}))
        c = coactivation(ex, E, params.coactivation_pairs)
        a, b = np.nonzero(c)
        co_rows.append(pl.DataFrame({
            "layer": np.full(len(a), layer, np.int32), "expert_a": a.astype(np.int32), "expert_b": b.astype(np.int32),
            "count": c[a, b], "p_b_given_a": c[a, b] / counts[a]}))
        if prev_ex is not None:
            c = cross_layer_coactivation(prev_ex, ex, E)
            a, b = np.nonzero(c)
            next_rows.append(pl.DataFrame({
                "layer": np.full(len(a), layers[li - 1], np.int32), "next_layer": np.full(len(a), layer, np.int32),
                "expert_a": a.astype(np.int32), "expert_b": b.astype(np.int32), "count": c[a, b],
                "p": c[a, b] / prev_counts[a]}))
        prev_ex, prev_counts = ex, counts
        if domain_names:
            dc = domain_counts(group, len(domain_names), ex, E)
            with np.errstate(divide="ignore", invalid="ignore"):
                dshare = dc / (label_tokens[:, None] * k)
                vs_all = dshare / share[None, :]
            G = len(domain_names)
            dom_rows.append(pl.DataFrame({
                "label": np.repeat(np.array(domain_names, object), E).tolist(),
                "layer": np.full(G * E, layer, np.int32), "expert": np.tile(np.arange(E, dtype=np.int32), G),
                "n_tokens": dc.reshape(-1), "label_tokens": np.repeat(label_tokens, E),
                "share": dshare.reshape(-1), "lift": (dshare * E).reshape(-1), "vs_all": vs_all.reshape(-1)}))
    schema_co = {"layer": pl.Int32, "expert_a": pl.Int32, "expert_b": pl.Int32, "count": pl.Int64,
                 "p_b_given_a": pl.Float64}
    schema_next = {"layer": pl.Int32, "next_layer": pl.Int32, "expert_a": pl.Int32, "expert_b": pl.Int32,
                   "count": pl.Int64, "p": pl.Float64}
    schema_dom = {"label": pl.Utf8, "layer": pl.Int32, "expert": pl.Int32, "n_tokens": pl.Int64,
                  "label_tokens": pl.Int64, "share": pl.Float64, "lift": pl.Float64, "vs_all": pl.Float64}
    parts = {
        "load": _concat(load_rows, None),
        "layers": pl.DataFrame(layer_rows).with_columns(pl.col("layer").cast(pl.Int32)),
        "coactivation": _concat(co_rows, schema_co),
        "coactivation_next": _concat(next_rows, schema_next),
        "vocab": _concat(vocab_rows, {"layer": pl.Int32, "token_id": pl.Int64, "token": pl.Utf8, "count": pl.Int64,
                                      "top_expert": pl.Int32, "share": pl.Float64}),
        "domain": _concat(dom_rows, schema_dom),
    }
    return {name: frame.select(pl.lit(info.run_id, pl.Int32).alias("run_id"), pl.all()) if frame.width else frame
            for name, frame in parts.items()}


def _concat(frames: list[pl.DataFrame], schema: dict | None) -> pl.DataFrame:
    frames = [f for f in frames if f.height]
    if frames:
        out = pl.concat(frames, how="vertical_relaxed")
        return out.cast(schema) if schema else out
    return pl.DataFrame(schema=schema or {})


def _generated(store, info: RunInfo) -> tuple[np.ndarray, np.ndarray]:
    t = store.sql("SELECT seq_id, pos, generated FROM token_data WHERE run_id = $run ORDER BY seq_id, pos",
                  {"run": info.run_id})
    return _keys(t["seq_id"].to_numpy(), t["pos"].to_numpy()), t["generated"].to_numpy()


def _agreement(store, a: RunInfo, b: RunInfo, params: StatsParams) -> pl.DataFrame:
    if (a.num_experts, a.top_k) != (b.num_experts, b.top_k):
        raise InputError(f"runs {a.run_id} and {b.run_id} route differently ({a.num_experts} experts top-{a.top_k} vs "
                         f"{b.num_experts} top-{b.top_k}); agreement needs the same routing geometry")
    layers = tuple(l for l in _layers_wanted(a, params) if l in set(b.moe_layers))
    if not layers:
        raise InputError(f"runs {a.run_id} and {b.run_id} share no MoE layer; agreement compares the same layers")
    # the first layer gives the tokens to match; then one layer of each run in memory at a time
    ra = load_routing(store, a, layers[:1], tokens=True)
    rb = load_routing(store, b, layers[:1], tokens=True)
    ka, kb = _keys(ra.seq_id, ra.pos), _keys(rb.seq_id, rb.pos)
    common, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    if params.prompt_only:
        gk, gen = _generated(store, a)
        gk2, gen2 = _generated(store, b)
        keep = ~gen[_align(gk, common)] & ~gen2[_align(gk2, common)]
        common, ia, ib = common[keep], ia[keep], ib[keep]
    if len(common) == 0:
        raise InputError(f"runs {a.run_id} and {b.run_id} share no (seq_id, pos) token; agreement needs runs over "
                         "the same inputs")
    differ = ra.token_id[ia] != rb.token_id[ib]
    if differ.any():
        first = int(np.flatnonzero(differ)[0])
        raise InputError(
            f"runs {a.run_id} and {b.run_id} hold different tokens at {int(differ.sum())} of {len(common)} shared "
            f"positions (first: seq {int(common[first] >> 32)}, pos {int(common[first] & 0xFFFFFFFF)}); agreement "
            "needs the same token stream (for runs with different generations use --prompt-only true)")
    del ka, kb
    rows = []
    for li, layer in enumerate(layers):
        if li:
            ra, rb = load_routing(store, a, (layer,)), load_routing(store, b, (layer,))
        overlap, top1 = topk_agreement(ra.experts[0][ia], rb.experts[0][ib])
        ra = rb = None
        rows.append({"run_a": a.run_id, "run_b": b.run_id, "layer": layer, "n_tokens": len(common),
                     "topk_overlap": float(overlap.mean()), "top1_agreement": float(top1.mean()),
                     "exact_set": float((overlap == 1.0).mean())})
    return pl.DataFrame(rows).with_columns(pl.col("run_a", "run_b", "layer").cast(pl.Int32))


def compute(store, runs: list[RunInfo], params: StatsParams) -> dict[str, pl.DataFrame]:
    if params.coactivation_pairs not in PAIR_MODES:
        raise InputError(f"--coactivation-pairs must be one of {', '.join(PAIR_MODES)}, got "
                         f"{params.coactivation_pairs!r}")
    if params.domain_field not in DOMAIN_FIELDS:
        raise InputError(f"--domain-field must be one of {', '.join(DOMAIN_FIELDS)}, got {params.domain_field!r}")
    if params.vocab_min_freq < 1:
        raise InputError(f"--vocab-min-freq must be >= 1, got {params.vocab_min_freq}")
    per_run = [_run_parts(store, info, params) for info in runs]
    parts = {name: _concat([p[name] for p in per_run], None) for name in per_run[0]}
    if len(runs) == 2:
        parts["agreement"] = _agreement(store, runs[0], runs[1], params)
    return parts


ANALYSIS = Analysis(
    name="stats",
    summary="expert load and balance, router entropy, co-activation, vocabulary/domain specialisation, agreement",
    params=StatsParams,
    compute=compute,
    primary="layers",
    min_runs=1,
    max_runs=2,
)
