"""Cognitive experts by nPMI with thinking-marker tokens (RICE: Wang et al., "Two Experts Are All You Need for
Steering Thinking", arXiv 2505.14681; algorithms.md §4.1). CLI: ``routelens analyze npmi``.

Counts over all T tokens of the run (prompt and generated alike), from the **executed** top-k:

* ``n_x``  = occurrences of marker x (tokens whose id is one of the marker's ids),
* ``n_y``  = tokens whose top-k at y's layer contains expert y (y = a (layer, expert) pair),
* ``n_xy`` = occurrences of x whose top-k at y's layer contains y;

``p = n / T``, ``PMI(x,y) = log2(p(x,y) / (p(x) p(y)))`` and ``nPMI(x,y) = PMI / (−log2 p(x,y)) ∈ [−1, 1]``
(Bouma's normalisation, as the paper per the review in algorithms.md §4.1). Edge cases: ``n_xy = 0`` gives −1
(never together; the paper's rule); ``p(x,y) = 1`` makes the denominator 0 and forces ``n_x = n_y = T`` (x and y
at every token): nPMI = 1, the limit of perfect co-occurrence. The paper's repo is not public, so the counting is
INFERRED from the review's formulas.

Markers are matched against the run's vocabulary (the text of each token id the tracer saw): a token matches a
marker when its text, stripped of surrounding whitespace and of leading BPE word-boundary markers ("Ġ" GPT-2 byte
level, "▁" SentencePiece), equals the marker's text stripped the same way (case-sensitive). So "Wait",
" Wait" and "ĠWait" all count for the marker "Wait". Matching is per single token: a marker that the tokenizer
splits into several tokens is not found. Markers can also be given as token ids (``marker_ids``; named
``id:N``). A marker with no occurrence in the run is reported, not an error: one log line lists the missing
markers, part ``notes`` holds the same line, and ``markers`` lists them with ``n_x = 0``.

Parts: ``ranking`` (marker, layer, expert, n_x, n_y, n_xy, npmi, rank) — primary, the ``top_n`` best (layer, expert)
pairs per marker (rank 1 = highest nPMI; ties broken by n_xy, then layer and expert); ``markers`` (marker,
token_ids, n_x); ``notes`` (message). ``npmi_spec`` turns a ranking into a RICE-style boost steering spec.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from routelens.errors import InputError
from routelens.records import RunInfo

from .registry import Analysis
from .routing_arrays import load_routing

__all__ = ["NpmiParams", "DEFAULT_MARKERS", "normalize_token_text", "match_markers", "npmi", "cooccurrence_counts",
           "rank_pairs", "npmi_spec", "compute", "ANALYSIS"]

log = logging.getLogger("routelens.analyses.npmi")

DEFAULT_MARKERS = ("<think>", "</think>", "Wait", "Alternatively")
_BPE_SPACE = "Ġ▁"  # word-boundary markers of GPT-2 byte-level BPE and SentencePiece

_RANKING_SCHEMA = {"marker": pl.Utf8, "layer": pl.Int32, "expert": pl.Int32, "n_x": pl.Int64, "n_y": pl.Int64,
                   "n_xy": pl.Int64, "npmi": pl.Float64, "rank": pl.Int32}


# ---------------------------------------------------------------------------------------------------------------
# pure functions


def normalize_token_text(text: str) -> str:
    """Token or marker text as matched: whitespace stripped, then leading "Ġ"/"▁" markers, then whitespace."""
    return text.strip().lstrip(_BPE_SPACE).strip()


def match_markers(vocab: dict[int, str], markers) -> dict[str, tuple[int, ...]]:
    """Token ids of each marker: the vocabulary entries whose normalised text equals the normalised marker."""
    by_text: dict[str, list[int]] = {}
    for tid, text in vocab.items():
        if text is not None:
            by_text.setdefault(normalize_token_text(text), []).append(int(tid))
    return {m: tuple(sorted(by_text.get(normalize_token_text(m), ()))) for m in markers}


def npmi(n_xy, n_x, n_y, total: int) -> np.ndarray:
    """``nPMI = log2(p(x,y)/(p(x)p(y))) / (−log2 p(x,y))`` with ``p = n/T``; −1 where ``n_xy = 0``; 1 where
    ``p(x,y) = 1`` (RICE, algorithms.md §4.1). Arrays broadcast."""
    n_xy, n_x, n_y = (np.asarray(a, np.float64) for a in (n_xy, n_x, n_y))
    n_xy, n_x, n_y = np.broadcast_arrays(n_xy, n_x, n_y)
    out = np.full(n_xy.shape, -1.0)
    ok = n_xy > 0
    full = ok & (n_xy >= total)
    mid = ok & ~full
    p_xy = n_xy[mid] / total
    pmi = np.log2(p_xy / ((n_x[mid] / total) * (n_y[mid] / total)))
    out[mid] = pmi / -np.log2(p_xy)
    out[full] = 1.0
    return out


def cooccurrence_counts(experts: np.ndarray, marker_mask: np.ndarray,
                        num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """From executed top-k ``experts [L, N, k]`` and a marker mask ``[N]``: ``n_y [L, E]`` (tokens routed to each
    expert) and ``n_xy [L, E]`` (marker tokens routed to it). A token's top-k holds distinct experts, so a
    bincount over its k entries counts each token at most once per expert."""
    L = experts.shape[0]
    n_y = np.zeros((L, num_experts), np.int64)
    n_xy = np.zeros((L, num_experts), np.int64)
    for li in range(L):  # per layer: bincount on one [N, k] slice, no [L, N, k] int64 copy
        n_y[li] = np.bincount(experts[li].ravel(), minlength=num_experts)
        n_xy[li] = np.bincount(experts[li][marker_mask].ravel(), minlength=num_experts)
    return n_y, n_xy


def rank_pairs(values: np.ndarray, n_xy: np.ndarray, layers) -> tuple[np.ndarray, np.ndarray]:
    """Order of the (layer, expert) cells of ``values [L, E]``: nPMI descending, then n_xy descending, then layer
    and expert ascending. Returns (layer-index array, expert array) in rank order."""
    L, E = values.shape
    li, e = np.meshgrid(np.arange(L), np.arange(E), indexing="ij")
    layer = np.asarray(layers)[li.ravel()]
    order = np.lexsort((e.ravel(), layer, -n_xy.ravel(), -values.ravel()))
    return li.ravel()[order], e.ravel()[order]


def npmi_spec(ranking, marker: str, *, top: int = 2, beta: float = 2.0, renormalize: bool = False):
    """A RICE-style steering spec boosting the ``top`` (layer, expert) pairs of ``marker``: when selected, their
    routing weight is multiplied by ``beta`` (algorithms.md §4.2; the paper's β is unknown: sweep it). ``ranking``
    is the ``ranking`` part (a polars frame or a Result). Pairs that never co-occur with the marker are skipped."""
    from routelens.steering import spec_from_pairs

    frame = ranking.frames["ranking"] if hasattr(ranking, "frames") else ranking
    rows = (frame.filter((pl.col("marker") == marker) & (pl.col("n_xy") > 0)).sort("rank").head(int(top)))
    if rows.height == 0:
        known = sorted(set(frame["marker"].to_list())) if frame.height else []
        raise InputError(f"marker {marker!r} has no expert that co-occurs with it in this ranking "
                         f"(markers ranked: {', '.join(known) or 'none'})")
    pairs = list(zip(rows["layer"].to_list(), rows["expert"].to_list()))
    spec = spec_from_pairs(pairs, "boost", value=float(beta), name=f"rice-npmi-{marker}",
                           source={"analysis": "npmi", "marker": marker, "beta": float(beta),
                                   "pairs": [list(p) for p in pairs], "npmi": rows["npmi"].to_list(),
                                   "note": "RICE-style (unverified hyperparameters)"})
    if renormalize:
        import dataclasses

        spec = dataclasses.replace(spec, rules=tuple(dataclasses.replace(r, renormalize=True) for r in spec.rules))
    return spec


# ---------------------------------------------------------------------------------------------------------------
# the analysis


@dataclass(frozen=True)
class NpmiParams:
    markers: tuple[str, ...] = field(default=DEFAULT_MARKERS, metadata={
        "help": "marker token texts (comma list), matched against the run's vocabulary after stripping "
                "whitespace and leading Ġ/▁"})
    marker_ids: tuple[int, ...] = field(default=(), metadata={"help": "markers given as token ids (comma list)"})
    top_n: int = field(default=10, metadata={"help": "(layer, expert) pairs kept per marker; 0 keeps all"})
    layers: tuple[int, ...] = field(default=(), metadata={"help": "decoder layers to rank (default: all MoE layers)"})


def _vocabulary(store, info: RunInfo) -> dict[int, str]:
    frame = store.sql("SELECT token_id, token FROM vocab WHERE run_id = $run", {"run": info.run_id})
    return dict(zip(frame["token_id"].to_list(), frame["token"].to_list()))


def compute(store, runs: list[RunInfo], params: NpmiParams) -> dict[str, pl.DataFrame]:
    info = runs[0]
    if params.top_n < 0:
        raise InputError(f"--top-n must be >= 0 (0 keeps every pair), got {params.top_n}")
    if not params.markers and not params.marker_ids:
        raise InputError("no markers given; pass --markers TEXT,... or --marker-ids ID,...")
    vocab = _vocabulary(store, info) if params.markers else {}
    if params.markers and not vocab and not params.marker_ids:
        raise InputError(f"run {info.run_id} has no vocabulary (token texts) to match markers against; give them "
                         "as token ids with --marker-ids")
    wanted = match_markers(vocab, params.markers)
    wanted.update({f"id:{int(t)}": (int(t),) for t in params.marker_ids})

    # One MoE layer in memory at a time (the counts per layer are all nPMI needs): peak memory stays under the
    # trace's compact form however many layers the run has.
    layers = tuple(params.layers) if params.layers else tuple(info.moe_layers)
    first = load_routing(store, info, layers[:1], tokens=True)
    T, E = first.n_tokens, info.num_experts
    token_id = first.token_id
    masks: dict[str, np.ndarray] = {}
    marker_rows, rank_frames, missing = [], [], []
    for marker, ids in wanted.items():
        mask = np.isin(token_id, np.asarray(ids, np.int64)) if ids else np.zeros(T, bool)
        n_x = int(mask.sum())
        marker_rows.append((marker, list(ids), n_x))
        if n_x == 0:
            missing.append(marker)
        else:
            masks[marker] = mask
    per_layer: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {m: [] for m in masks}
    for li, layer in enumerate(layers):
        routing = first if li == 0 else load_routing(store, info, [layer])
        for marker, mask in masks.items():
            n_y, n_xy = cooccurrence_counts(routing.experts, mask, E)
            per_layer[marker].append((n_y[0], n_xy[0]))
        del routing
    first = None
    for marker, mask in masks.items():
        n_x = int(mask.sum())
        n_y = np.stack([c[0] for c in per_layer[marker]])
        n_xy = np.stack([c[1] for c in per_layer[marker]])
        values = npmi(n_xy, n_x, n_y, T)
        li, e = rank_pairs(values, n_xy, layers)
        if params.top_n:
            li, e = li[:params.top_n], e[:params.top_n]
        rank_frames.append(pl.DataFrame({
            "marker": [marker] * len(li), "layer": np.asarray(layers, np.int32)[li],
            "expert": e.astype(np.int32), "n_x": np.full(len(li), n_x, np.int64), "n_y": n_y[li, e],
            "n_xy": n_xy[li, e], "npmi": values[li, e], "rank": np.arange(1, len(li) + 1, dtype=np.int32)},
            schema=_RANKING_SCHEMA))
    notes = []
    if missing:
        notes.append(f"markers absent from run {info.run_id}: {', '.join(missing)} (no token of the run matches; "
                     "text markers match whole single tokens, stripped of whitespace and Ġ/▁)")
        log.warning(notes[-1])
    ranking = pl.concat(rank_frames) if rank_frames else pl.DataFrame(schema=_RANKING_SCHEMA)
    markers = pl.DataFrame(marker_rows, schema={"marker": pl.Utf8, "token_ids": pl.List(pl.Int64), "n_x": pl.Int64},
                           orient="row")
    notes_frame = pl.DataFrame({"message": notes}, schema={"message": pl.Utf8})
    return {"ranking": ranking, "markers": markers, "notes": notes_frame}


ANALYSIS = Analysis(
    name="npmi",
    summary="experts tied to thinking-marker tokens by nPMI over executed top-k (RICE cognitive experts)",
    params=NpmiParams,
    compute=compute,
    primary="ranking",
)
