"""Cross-lingual routing divergence on parallel text (Bandarkar et al., "Multilingual Routing in Mixture-of-Experts",
arXiv 2510.04694; algorithms.md §3.1–3.4). CLI: ``routelens analyze crosslingual``.

Input: a run whose sequences carry ``lang`` and ``align_id`` (the jsonl fields): sequences of different languages
with one ``align_id`` are translations of one passage. Every token of a sequence counts (template and generated
tokens too, as in the reference, which routes the whole chat template); sequences sharing one (lang, align_id)
are pooled into one passage.

1. Routing distribution of passage i in language a at layer l (§3.2; ``mode``):

   * ``mean``  ("expert importance", the paper's version): ``q = (1/L_i) Σ_t p_t`` with ``p_t = softmax(z_t)``
     over the E router logits. Needs a run traced with router logits. Sigmoid routers (DeepSeek-V3) use
     ``s_t = sigmoid(z_t)`` normalised per token, ``p_t = s_t / Σ_e s_t,e`` (the reference code applies the bare
     sigmoid; a JSD needs distributions, so each token's scores are normalised to sum 1: our choice).
   * ``topk``  ("total actual weight", the reference code's default): ``p_t`` kept on its top-k (threshold =
     k-th largest value, ties kept) and renormalised, ``p_t·m_t / (Σ p_t·m_t + 1e-20)``, then averaged over
     tokens. From the logits when the run has them; otherwise from the stored executed top-k weights
     renormalised to sum 1, ``w_t,r / Σ_r w_t,r``. The two agree (up to float16 storage) for softmax-then-top-k
     routers (OLMoE, Qwen2/3-MoE, Mixtral, DeepSeek-V2, and gpt-oss, whose softmax over the top-k logits *is*
     that renormalisation); they differ for DeepSeek-V3 (the executed top-k is chosen on bias-corrected,
     group-limited scores) and PhiMoE (sparsemixer weights are not a renormalised softmax).
   * ``counts`` (activation counts): the executed top-k one-hot summed over tokens, divided by ``k·L_i`` so it
     is a distribution (the reference sums counts; a JSD needs them normalised).

   Source: ``lucasbandarkar/xl_moe_alignment`` ``routing_analysis/get_routing_weights.py``
   (``calculate_expert_importance_per_sequence``, ``calculate_total_actual_weight_per_sequence``,
   ``calculate_activation_counts``).

2. Divergence (§3.3; ``routing_analysis/analysis_helpers.py``), natural log::

       M = max(½(P+Q), 1e-10);  JSD(P,Q) = ½ Σ P ln(P/M) + ½ Σ Q ln(Q/M)     (0·ln 0 = 0)
       H(p) = −Σ p ln(p + 1e-10)
       JSD_n(P,Q) = JSD(P,Q) / max(ln E − ½(H(P) + H(Q)), 1e-6)

   ``D_l(a) = mean_i JSD_n(q_i^(ref,l), q_i^(a,l))`` over the passages aligned between a and the reference
   language (part ``divergence``, with the raw JSD's mean alongside); the same over every language pair in part
   ``pairwise``. Two languages routed to disjoint expert sets, each spread evenly over m experts, give the maximal
   JSD = ln 2 and JSD_n = ln 2 / (ln E − ln m) (= 1 when m = E/2); identical routing gives 0.

3. Multilingual-specialised experts (§3.4; notebook ``expert_importance_eda.ipynb``): per layer
   ``diff = p̄_a − p̄_ref`` (means of q over the aligned passages) and experts with ``diff > σ·std(diff)``
   (std over the E experts, ddof 1 as ``torch.std``; σ = 3). ``lang = "*"`` rows use the equally weighted mean of
   the languages' diffs (the notebook weights its own 15 languages 0.5/1.0). Since diff sums to 0, its largest
   z-score is at most (E−1)/√E: with E ≤ 10 experts no expert can pass 3σ.

Parts (polars frames): ``divergence`` (lang, layer, jsd_n, jsd, n_pairs) — primary; ``pairwise`` (lang_a, lang_b,
layer, jsd_n, jsd, n_pairs), empty unless ``pairwise``; ``specialised`` (layer, expert, lang, diff, threshold).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import polars as pl

from routelens.errors import InputError
from routelens.records import RunInfo

from .registry import Analysis
from .routing_arrays import load_routing

__all__ = ["CrosslingualParams", "MODES", "SIGMOID_FAMILIES", "entropy", "jsd", "jsd_normalized", "router_probs",
           "topk_renormalized", "counts_distribution", "weights_distribution", "specialised_experts",
           "compute", "ANALYSIS"]

MODES = ("mean", "topk", "counts")
SCORINGS = ("auto", "softmax", "sigmoid", "none")
SIGMOID_FAMILIES = frozenset({"deepseek_v3"})  # routers scoring with a sigmoid (routelens/adapters/routing.py)
_CHUNK = 1 << 16  # tokens per block when turning dense logits into probabilities (bounds float32 temporaries)


# ---------------------------------------------------------------------------------------------------------------
# pure functions


def entropy(p: np.ndarray) -> np.ndarray:
    """``H(p) = −Σ p ln(p + 1e-10)`` over the last axis (analysis_helpers.py ``calculate_entropy``)."""
    p = np.asarray(p, np.float64)
    return -np.sum(p * np.log(p + 1e-10), axis=-1)


def jsd(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen–Shannon divergence over the last axis, natural log, ``M`` clamped to ≥ 1e-10
    (analysis_helpers.py ``js_divergence``: ``F.kl_div(log M, P)``, which takes 0·ln 0 = 0)."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    log_m = np.log(np.maximum(0.5 * (p + q), 1e-10))

    def kl_to_m(x):
        safe = np.where(x > 0, x, 1.0)
        return np.sum(np.where(x > 0, x * (np.log(safe) - log_m), 0.0), axis=-1)

    return 0.5 * (kl_to_m(p) + kl_to_m(q))


def jsd_normalized(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Entropy-normalised JSD: ``JSD / max(ln E − ½(H(P)+H(Q)), 1e-6)``, E = the last axis' length
    (analysis_helpers.py ``calculate_entropy_normalized_jsd``)."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    denom = np.maximum(np.log(p.shape[-1]) - 0.5 * (entropy(p) + entropy(q)), 1e-6)
    return jsd(p, q) / denom


def router_probs(logits: np.ndarray, scoring: str) -> np.ndarray:
    """Per-token expert distribution float32 [N, E] from router outputs: ``softmax(z)``; ``sigmoid(z)`` normalised
    to sum 1 per token (sigmoid routers); ``none`` when the stored values already are probabilities."""
    z = np.asarray(logits, np.float32)
    if scoring == "softmax":
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if scoring == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-z))
        return s / s.sum(axis=-1, keepdims=True)
    if scoring == "none":
        return z
    raise InputError(f"scoring must be one of {', '.join(SCORINGS[1:])}, got {scoring!r}")


def topk_renormalized(p: np.ndarray, k: int) -> np.ndarray:
    """``p`` kept where ``p ≥`` its k-th largest value (ties kept, as the reference's threshold mask) and
    renormalised with ``+1e-20`` (get_routing_weights.py ``calculate_total_actual_weight_per_sequence``)."""
    p = np.asarray(p)
    k = min(int(k), p.shape[-1])
    threshold = np.partition(p, p.shape[-1] - k, axis=-1)[..., p.shape[-1] - k, None]
    kept = np.where(p >= threshold, p, 0)
    return kept / (kept.sum(axis=-1, keepdims=True) + 1e-20)


def _scatter_rows(out: np.ndarray, values: np.ndarray, group: np.ndarray) -> None:
    """``out[g] += Σ values[rows of group g]`` (−1 = dropped). Tokens come sorted by sequence, so a group's rows
    are mostly contiguous: runs of equal ids are summed with ``np.add.reduceat``, and only the few run sums are
    scattered with ``np.add.at``."""
    if len(group) == 0:
        return
    starts = np.concatenate([[0], np.flatnonzero(np.diff(group)) + 1])
    ids = group[starts]
    sums = np.add.reduceat(values.astype(np.float64, copy=False), starts, axis=0)
    keep = ids >= 0
    np.add.at(out, ids[keep], sums[keep])


def counts_distribution(experts: np.ndarray, group: np.ndarray, n_groups: int, num_experts: int) -> np.ndarray:
    """Activation counts of the executed top-k ``experts [N, k]`` per group, divided by ``k·n_tokens``
    (a distribution over E) -> float64 [G, E]."""
    experts = np.asarray(experts)
    keep = group >= 0
    g, e = group[keep].astype(np.int64), experts[keep].astype(np.int64)
    k = experts.shape[-1]
    counts = np.bincount((g[:, None] * num_experts + e).ravel(), minlength=n_groups * num_experts)
    n = np.bincount(g, minlength=n_groups).astype(np.float64)
    return counts.reshape(n_groups, num_experts) / np.maximum(k * n, 1)[:, None]


def weights_distribution(experts: np.ndarray, weights: np.ndarray, group: np.ndarray, n_groups: int,
                         num_experts: int) -> np.ndarray:
    """Top-k mode without logits: each token's executed top-k weights renormalised to sum 1, scattered onto
    their experts and averaged over the group's tokens -> float64 [G, E]."""
    keep = group >= 0
    g, e = group[keep].astype(np.int64), np.asarray(experts)[keep].astype(np.int64)
    w = np.asarray(weights, np.float64)[keep]
    w = w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-20)
    sums = np.bincount((g[:, None] * num_experts + e).ravel(), weights=w.ravel(), minlength=n_groups * num_experts)
    n = np.bincount(g, minlength=n_groups).astype(np.float64)
    return sums.reshape(n_groups, num_experts) / np.maximum(n, 1)[:, None]


def specialised_experts(p_lang: np.ndarray, p_ref: np.ndarray,
                        sigma: float = 3.0) -> tuple[np.ndarray, np.ndarray, float]:
    """§3.4: ``diff = p̄_lang − p̄_ref`` over E experts; selected where ``diff > σ·std(diff)`` (ddof 1).
    Returns (selected expert indices, diff, threshold)."""
    diff = np.asarray(p_lang, np.float64) - np.asarray(p_ref, np.float64)
    threshold = float(sigma * diff.std(ddof=1)) if diff.size > 1 else float("inf")
    return np.flatnonzero(diff > threshold), diff, threshold


# ---------------------------------------------------------------------------------------------------------------
# the analysis


@dataclass(frozen=True)
class CrosslingualParams:
    mode: str = field(default="topk", metadata={"help": "routing distribution per passage: mean (mean softmax, "
                                                        "needs --logits traces), topk (top-k renormalised), counts"})
    reference: str = field(default="en", metadata={"help": "reference language (the `lang` field) for divergence "
                                                           "and specialised experts"})
    pairwise: bool = field(default=False, metadata={"help": "also compute the divergence of every language pair"})
    langs: tuple[str, ...] = field(default=(), metadata={"help": "languages to include (default: all in the run)"})
    layer_range: tuple[int, ...] = field(default=(), metadata={"help": "first,last decoder layer (inclusive) to "
                                                                       "analyse; default all MoE layers"})
    sigma: float = field(default=3.0, metadata={"help": "specialised experts: diff > sigma * std(diff)"})
    scoring: str = field(default="auto", metadata={"help": "router activation for logits: auto (sigmoid for "
                                                           "DeepSeek-V3, else softmax), softmax, sigmoid, none"})
    topk_source: str = field(default="auto", metadata={"help": "topk mode: auto (logits if traced, else weights), "
                                                               "logits, weights"})


def _layers(info: RunInfo, layer_range: tuple[int, ...]) -> tuple[int, ...]:
    if not layer_range:
        return tuple(info.moe_layers)
    if len(layer_range) != 2 or layer_range[0] > layer_range[1]:
        raise InputError(f"--layer-range takes two decoder-layer indices first,last (first <= last), got "
                         f"{','.join(map(str, layer_range))}")
    chosen = tuple(l for l in info.moe_layers if layer_range[0] <= l <= layer_range[1])
    if not chosen:
        raise InputError(f"--layer-range {layer_range[0]},{layer_range[1]} holds no MoE layer of run {info.run_id} "
                         f"(MoE layers: {list(info.moe_layers)})")
    return chosen


def _passages(store, info: RunInfo, langs: tuple[str, ...]):
    """Sequences with lang and align_id -> (sorted seq ids, their group ids, group keys (lang, align_id))."""
    seqs = store.sql("SELECT seq_id, lang, align_id FROM sequences WHERE run_id = $run AND lang IS NOT NULL "
                     "AND align_id IS NOT NULL ORDER BY seq_id", {"run": info.run_id})
    if langs:
        seqs = seqs.filter(pl.col("lang").is_in(list(langs)))
    if seqs.height == 0:
        what = f" in languages {', '.join(langs)}" if langs else ""
        raise InputError(f"run {info.run_id} has no sequences with `lang` and `align_id`{what}; trace a .jsonl whose "
                         "lines carry `lang` and `align_id` (parallel text, e.g. data/corpus/parallel.*.jsonl.gz)")
    keys = seqs.select("lang", "align_id").unique(maintain_order=True).with_row_index("group")
    seqs = seqs.join(keys, on=["lang", "align_id"], how="left").sort("seq_id")
    return (seqs["seq_id"].to_numpy().astype(np.int64), seqs["group"].to_numpy().astype(np.int64),
            list(zip(keys["lang"].to_list(), keys["align_id"].to_list())))


def _token_groups(token_seq: np.ndarray, seq_ids: np.ndarray, seq_group: np.ndarray) -> np.ndarray:
    at = np.clip(np.searchsorted(seq_ids, token_seq), 0, max(len(seq_ids) - 1, 0))
    found = seq_ids[at] == token_seq if len(seq_ids) else np.zeros(len(token_seq), bool)
    return np.where(found, seq_group[at], -1)


def _scoring(info: RunInfo, requested: str, sample: np.ndarray) -> str:
    if requested != "auto":
        return requested
    if info.family in SIGMOID_FAMILIES:
        return "sigmoid"
    # algorithms.md §8: some transformers versions return probabilities under the name router_logits
    if sample.size and np.all(sample >= 0) and np.allclose(sample.astype(np.float32).sum(-1), 1.0, atol=1e-2):
        return "none"
    return "softmax"


class _Distributions:
    """Per-layer passage distributions [G, E] of one run in one mode (loaded one layer at a time)."""

    def __init__(self, store, info: RunInfo, params: CrosslingualParams, seq_ids, seq_group, n_groups):
        self.store, self.info, self.params = store, info, params
        self.seq_ids, self.seq_group, self.n_groups = seq_ids, seq_group, n_groups
        handle = store.run(info.run_id)
        self.handle = handle
        has_logits = handle.has_logits()
        mode = params.mode
        if mode == "mean" and not has_logits:
            raise InputError(f"run {info.run_id} has no router logits, which mode mean needs; re-trace it with "
                             "`routelens trace --logits`, or use --mode topk or --mode counts")
        if mode == "topk":
            if params.topk_source == "logits" and not has_logits:
                raise InputError(f"run {info.run_id} has no router logits; re-trace it with `routelens trace "
                                 "--logits`, or use --topk-source weights")
            self.from_logits = params.topk_source == "logits" or (params.topk_source == "auto" and has_logits)
        else:
            self.from_logits = mode == "mean"
        self.groups = None  # token -> passage group, from the first layer loaded (every layer has the same tokens)

    def layer(self, layer: int) -> np.ndarray:
        E, k = self.info.num_experts, self.info.top_k
        if not self.from_logits:  # counts, or topk from the stored executed weights: one layer in memory at a time
            routing = load_routing(self.store, self.info, [layer], weights=self.params.mode == "topk")
            if self.groups is None:
                self.groups = _token_groups(routing.seq_id, self.seq_ids, self.seq_group)
            if self.params.mode == "counts":
                return counts_distribution(routing.experts[0], self.groups, self.n_groups, E)
            return weights_distribution(routing.experts[0], routing.weights[0], self.groups, self.n_groups, E)
        frame, logits = self.handle.logits(layer)
        groups = _token_groups(frame["seq_id"].to_numpy().astype(np.int64), self.seq_ids, self.seq_group)
        scoring = _scoring(self.info, self.params.scoring, logits[:256])
        out = np.zeros((self.n_groups, E), np.float64)
        for start in range(0, len(groups), _CHUNK):
            g = groups[start:start + _CHUNK]
            if not np.any(g >= 0):
                continue
            p = router_probs(logits[start:start + _CHUNK], scoring)
            if self.params.mode == "topk":
                p = topk_renormalized(p, k)
            _scatter_rows(out, p, g)
        n = np.bincount(groups[groups >= 0], minlength=self.n_groups).astype(np.float64)
        return out / np.maximum(n, 1)[:, None]


def compute(store, runs: list[RunInfo], params: CrosslingualParams) -> dict[str, pl.DataFrame]:
    info = runs[0]
    if params.mode not in MODES:
        raise InputError(f"--mode must be one of {', '.join(MODES)}, got {params.mode!r}")
    if params.scoring not in SCORINGS:
        raise InputError(f"--scoring must be one of {', '.join(SCORINGS)}, got {params.scoring!r}")
    if params.topk_source not in ("auto", "logits", "weights"):
        raise InputError(f"--topk-source must be auto, logits or weights, got {params.topk_source!r}")
    layers = _layers(info, params.layer_range)
    seq_ids, seq_group, keys = _passages(store, info, params.langs)
    langs = sorted({lang for lang, _ in keys})
    if params.reference not in langs:
        raise InputError(f"reference language {params.reference!r} is not in run {info.run_id} (languages: "
                         f"{', '.join(langs)}); choose one with --reference")
    by_lang: dict[str, dict[str, int]] = {}
    for g, (lang, align) in enumerate(keys):
        by_lang.setdefault(lang, {})[align] = g

    def aligned(a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
        common = sorted(set(by_lang[a]) & set(by_lang[b]))
        return (np.array([by_lang[a][x] for x in common], np.int64),
                np.array([by_lang[b][x] for x in common], np.int64))

    ref = params.reference
    others = [lang for lang in langs if lang != ref]
    pairs_ref = {lang: aligned(ref, lang) for lang in others}
    pairs_all = {(a, b): aligned(a, b) for a, b in combinations(langs, 2)} if params.pairwise else {}
    dists = _Distributions(store, info, params, seq_ids, seq_group, len(keys))

    div_rows, pair_rows, spec_rows = [], [], []
    for layer in layers:
        q = dists.layer(layer)
        diffs = []
        for lang in others:
            gi_ref, gi = pairs_ref[lang]
            if len(gi) == 0:
                continue
            div_rows.append((lang, layer, float(np.mean(jsd_normalized(q[gi_ref], q[gi]))),
                             float(np.mean(jsd(q[gi_ref], q[gi]))), len(gi)))
            chosen, diff, thr = specialised_experts(q[gi].mean(0), q[gi_ref].mean(0), params.sigma)
            diffs.append(diff)
            spec_rows += [(layer, int(e), lang, float(diff[e]), thr) for e in chosen]
        if len(diffs) > 1:
            mean_diff = np.mean(diffs, axis=0)
            thr = float(params.sigma * mean_diff.std(ddof=1))
            spec_rows += [(layer, int(e), "*", float(mean_diff[e]), thr) for e in np.flatnonzero(mean_diff > thr)]
        for (a, b), (ga, gb) in pairs_all.items():
            if len(ga):
                pair_rows.append((a, b, layer, float(np.mean(jsd_normalized(q[ga], q[gb]))),
                                  float(np.mean(jsd(q[ga], q[gb]))), len(ga)))
    if not div_rows and others:
        raise InputError(f"no passage of run {info.run_id} is aligned with a {ref!r} passage (no shared align_id); "
                         "check the `align_id` fields of the input")

    divergence = pl.DataFrame(div_rows, schema={"lang": pl.Utf8, "layer": pl.Int32, "jsd_n": pl.Float64,
                                                "jsd": pl.Float64, "n_pairs": pl.Int64}, orient="row")
    pairwise = pl.DataFrame(pair_rows, schema={"lang_a": pl.Utf8, "lang_b": pl.Utf8, "layer": pl.Int32,
                                               "jsd_n": pl.Float64, "jsd": pl.Float64, "n_pairs": pl.Int64},
                            orient="row")
    specialised = pl.DataFrame(spec_rows, schema={"layer": pl.Int32, "expert": pl.Int32, "lang": pl.Utf8,
                                                  "diff": pl.Float64, "threshold": pl.Float64}, orient="row")
    return {"divergence": divergence.sort("lang", "layer"),
            "pairwise": pairwise.sort("lang_a", "lang_b", "layer"),
            "specialised": specialised.sort("layer", "lang", "diff", descending=[False, False, True])}


ANALYSIS = Analysis(
    name="crosslingual",
    summary="routing divergence between languages on parallel text (entropy-normalised JSD, Bandarkar et al.)",
    params=CrosslingualParams,
    compute=compute,
    primary="divergence",
)
