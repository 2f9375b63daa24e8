"""Behaviour-contrast experts (CLI ``contrast``): SteerMoE's risk difference and MoTE's fTRI, with export of the top
experts as a steering spec. Specification: algorithms.md §5.2 (risk difference), §5.3 (selection), §6 (fTRI).

Two behaviours: with one run, its sequences labelled ``label1`` vs ``label2`` (``sequences.<label_field>``); with two
runs, run 1 vs run 2, each optionally restricted to ``label1`` / ``label2``. The tokens counted are chosen by
``span``: ``all``; ``generated`` (tokens produced by generation); ``target`` (SteerMoE counts only the target span:
the string in the sequence's ``meta.target``, at its LAST occurrence, see :func:`target_span`). ``eq`` truncates
both behaviours to the same token count (SteerMoE ``TOKEN_REDUCE_FN="eq"``).

Parts:
``experts`` (primary) — ``layer, expert, a1, d1, a2, d2, p1, p2, rd, abs_rd, rank`` (:func:`risk_difference`),
    ranked globally by |RD|; ``top_n`` > 0 keeps the first ``top_n`` rows.
``behaviours`` — ``behaviour, run_id, label, n_sequences, n_tokens, n_without_target`` (what was counted).
``spec`` (when ``num_pos``/``num_neg`` > 0) — ``layer, expert, action, rd, rank``: the rules of the exported
    steering spec (:func:`contrast_spec`); written to ``export_spec`` when given.

Activation here is the **executed** top-k (``routing_arrays``); SteerMoE recomputes it as the top-k of
softmax(raw logits), which is the same except for DeepSeek-V3 (bias-corrected, group-limited choice).

Memory: each behaviour's routing is read one MoE layer at a time and counted in token chunks, so the peak stays
under the trace's compact form (measured on 1 M tokens × 16 layers × top-8: 162 MiB for a 358 MiB compact form).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from routelens.errors import InputError, StoreError
from routelens.records import RunInfo
from routelens.steering import RoutingGeometry, SteeringSpec, spec_from_pairs

from .registry import Analysis
from .routing_arrays import load_routing

__all__ = ["ContrastParams", "ANALYSIS", "activation_counts", "risk_difference", "target_span", "select_experts",
           "contrast_spec"]

SPANS = ("all", "generated", "target")
# tokens whose expert lists are widened to int64 for one np.bincount at a time: a widened [L, N, k] copy (8 bytes
# per decision) would be larger than the trace's compact form (2.8 bytes per decision)
_TOKENS = 1 << 16
LABEL_FIELDS = ("label", "lang", "align_id")


@dataclass(frozen=True)
class ContrastParams:
    label1: str | None = field(default=None, metadata={
        "help": "behaviour 1: sequences with this label (one run: required; two runs: filters run 1)"})
    label2: str | None = field(default=None, metadata={
        "help": "behaviour 2: sequences with this label (one run: required; two runs: filters run 2)"})
    label_field: str = field(default="label", metadata={"help": "sequence field holding the labels: label, lang "
                                                                 "or align_id"})
    span: str = field(default="all", metadata={
        "help": "tokens counted: all, generated (generated tokens only) or target (the last occurrence of "
                "meta.target in each sequence, as SteerMoE)"})
    eq: bool = field(default=False, metadata={"help": "truncate both behaviours to the same token count "
                                                      "(SteerMoE 'eq')"})
    top_n: int = field(default=0, metadata={"help": "keep the top N experts by |RD| in the experts part (0 = all)"})
    num_pos: int = field(default=0, metadata={
        "help": "export: force the top N experts with RD > 0 (at most k per layer; extras skipped)"})
    num_neg: int = field(default=0, metadata={"help": "export: disable the top N experts with RD < 0"})
    reverse: bool = field(default=False, metadata={"help": "export: flip the sign of RD (steer toward behaviour 2)"})
    export_spec: str | None = field(default=None, metadata={
        "help": "write the steering spec (JSON, or YAML by suffix) to this path"})


# -- pure functions ----------------------------------------------------------------------------------------------

def activation_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """``a[l, e]`` = number of tokens whose top-k at layer l contains e (experts ``[L, N, k]``, distinct per token).
    int64 ``[L, E]``."""
    return np.stack([_layer_counts(layer, num_experts) for layer in experts]) if len(experts) else np.zeros(
        (0, num_experts), np.int64)


def _layer_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """``a[e]`` over one layer's ``[N, k]``, one bincount per token chunk."""
    counts = np.zeros(num_experts, np.int64)
    for lo in range(0, len(experts), _TOKENS):
        counts += np.bincount(experts[lo:lo + _TOKENS].reshape(-1).astype(np.intp), minlength=num_experts)
    return counts


def risk_difference(a1: np.ndarray, n1: int, a2: np.ndarray, n2: int, layers) -> pl.DataFrame:
    """SteerMoE risk difference (adobe-research/SteerMoE ``custom_steering.ipynb::calc_risk_diff``):
    ``d = n − a``, ``p1 = a1 / (a1 + d1)``, ``p2 = a2 / (a2 + d2)``, ``RD = p1 − p2``, ranked over all layers by
    ``|RD|`` descending (``rank`` 1 = largest; ties by layer, then expert). ``a1, a2`` are ``[L, E]`` activation
    counts over ``n1, n2`` tokens; ``layers`` the decoder-layer index of each row."""
    L, E = a1.shape
    a1 = a1.astype(np.int64).reshape(-1)
    a2 = a2.astype(np.int64).reshape(-1)
    p1 = a1 / n1
    p2 = a2 / n2
    rd = p1 - p2
    layer = np.repeat(np.asarray(layers, np.int32), E)
    expert = np.tile(np.arange(E, dtype=np.int32), L)
    order = np.lexsort((expert, layer, -np.abs(rd)))
    rank = np.empty(L * E, np.int64)
    rank[order] = np.arange(1, L * E + 1)
    frame = pl.DataFrame({"layer": layer, "expert": expert, "a1": a1, "d1": n1 - a1, "a2": a2, "d2": n2 - a2,
                          "p1": p1, "p2": p2, "rd": rd, "abs_rd": np.abs(rd), "rank": rank})
    return frame.sort("rank")


def _byte_fallback(text: str) -> str:
    return "".join(c if ord(c) < 128 else "\ufffd" * len(c.encode("utf-8")) for c in text)


def target_span(pieces: list[str], target: str) -> tuple[int, int] | None:
    """Token range ``[start, stop)`` covering the LAST occurrence of ``target`` in the concatenated per-token texts
    ``pieces`` (SteerMoE ``find_sub_list``, last location), or None when it does not occur.

    Approximation: SteerMoE matches the target's token ids inside the prompt's ids; the store keeps each token's
    text decoded on its own, so we match characters instead. A token partly inside the match counts as inside.
    Byte-level pieces of a multi-byte character decode to U+FFFD each, so a target with non-ASCII characters is
    also tried in that form (one U+FFFD per UTF-8 byte), which cannot tell apart two non-ASCII characters of the
    same byte length. A target whose tokenization in context differs (e.g. a leading space merged into the first
    token) is still found here, where SteerMoE would need the exact ids.
    """
    if not target:
        return None
    joined = "".join(pieces)
    at = joined.rfind(target)
    length = len(target)
    if at < 0:
        alt = _byte_fallback(target)
        at = joined.rfind(alt) if alt != target else -1
        length = len(alt)
    if at < 0:
        return None
    ends = np.cumsum([len(p) for p in pieces])
    starts = ends - np.array([len(p) for p in pieces])
    inside = np.flatnonzero((starts < at + length) & (ends > at))
    return int(inside[0]), int(inside[-1]) + 1


def select_experts(frame: pl.DataFrame, num_pos: int, num_neg: int, top_k: int, reverse: bool = False, *,
                   num_experts: int | None = None) -> pl.DataFrame:
    """SteerMoE's selection (adobe-research/SteerMoE ``src/utils.py::steer_moe``): in |RD| order, the first
    ``num_pos`` experts with RD > 0 are forced and the first ``num_neg`` with RD < 0 disabled; ``reverse`` flips
    the sign of RD first (steers toward behaviour 2). A layer accepts at most ``top_k`` forced experts: the extras
    are skipped, not replaced (as in SteerMoE). With ``num_experts`` given, a layer also keeps at least ``top_k``
    experts enabled (extra disables skipped), so the spec always resolves. Returns ``layer, expert, action, rd,
    rank`` (``rd`` as in the frame, unflipped)."""
    if num_pos < 0 or num_neg < 0:
        raise InputError(f"num_pos and num_neg must be >= 0, got {num_pos} and {num_neg}")
    ranked = frame.sort("abs_rd", "layer", "expert", descending=[True, False, False])
    sign = -ranked["rd"].to_numpy() if reverse else ranked["rd"].to_numpy()
    pos_idx = np.flatnonzero(sign > 0)[:num_pos]
    neg_idx = np.flatnonzero(sign < 0)[:num_neg]
    if len(pos_idx) < num_pos or len(neg_idx) < num_neg:
        raise InputError(f"asked for {num_pos} experts with RD > 0 and {num_neg} with RD < 0"
                         f"{' (reversed)' if reverse else ''}, but only {int((sign > 0).sum())} and "
                         f"{int((sign < 0).sum())} exist; lower --num-pos/--num-neg")
    layer = ranked["layer"].to_numpy()
    expert = ranked["expert"].to_numpy()
    forced: dict[int, int] = {}
    disabled: dict[int, int] = {}
    keep = []
    for i in sorted(np.concatenate([pos_idx, neg_idx]).tolist()):
        l = int(layer[i])
        if sign[i] > 0:
            if forced.get(l, 0) >= top_k:
                continue
            forced[l] = forced.get(l, 0) + 1
        else:
            if num_experts is not None and disabled.get(l, 0) >= num_experts - top_k:
                continue
            disabled[l] = disabled.get(l, 0) + 1
        keep.append(i)
    keep_arr = np.asarray(keep, np.int64)
    out = ranked[keep_arr] if len(keep_arr) else ranked.head(0)
    actions = ["force" if sign[i] > 0 else "disable" for i in keep]
    return out.select("layer", "expert", pl.Series("action", actions, dtype=pl.Utf8), "rd", "rank")


def contrast_spec(frame: pl.DataFrame, num_pos: int, num_neg: int, top_k: int, reverse: bool = False, *,
                  num_experts: int | None = None, name: str | None = None, source: dict | None = None) -> SteeringSpec:
    """The :func:`select_experts` choice as a SteeringSpec: ``force`` rules for the positive experts, ``disable``
    rules for the negative ones, one rule per (layer, action)."""
    rows = select_experts(frame, num_pos, num_neg, top_k, reverse, num_experts=num_experts)
    rules = []
    for action in ("force", "disable"):
        part = rows.filter(pl.col("action") == action)
        if part.height:
            rules += spec_from_pairs(zip(part["layer"].to_list(), part["expert"].to_list()), action).rules
    return SteeringSpec(rules=tuple(rules), name=name, source=dict(source or {}))


# -- store side ---------------------------------------------------------------------------------------------------

@dataclass
class _Behaviour:
    info: RunInfo
    label: str | None
    seq_ids: list[int]


def _seqs(store, info: RunInfo, fld: str, label: str | None) -> list[int]:
    where = "" if label is None else f" AND {fld} = $label"
    params = {"run": info.run_id, **({} if label is None else {"label": label})}
    ids = store.sql(f"SELECT seq_id FROM sequences WHERE run_id = $run{where} ORDER BY seq_id", params)
    if ids.height == 0:
        have = store.sql(f"SELECT DISTINCT {fld} AS v FROM sequences WHERE run_id = $run AND {fld} IS NOT NULL "
                         "ORDER BY v", {"run": info.run_id})["v"].to_list()
        raise InputError(f"run {info.run_id} has no sequences with {fld} {label!r} (its {fld}s: "
                         f"{', '.join(map(str, have[:20])) or 'none'})")
    return ids["seq_id"].to_list()


def _token_mask(store, b: _Behaviour, seq: np.ndarray, pos: np.ndarray, span: str) -> tuple[np.ndarray, int]:
    """Which of the behaviour's tokens (ordered by seq_id, pos) are counted, and how many sequences had no target."""
    if span == "all":
        return np.ones(len(seq), bool), 0
    params = {"run": b.info.run_id, "seqs": b.seq_ids}
    if span == "generated":
        t = store.sql("SELECT generated FROM token_data WHERE run_id = $run AND list_contains($seqs, seq_id) "
                      "ORDER BY seq_id, pos", params)
        if t.height != len(seq):
            raise InputError(f"run {b.info.run_id}: tokens and routing disagree; the run is damaged, re-trace it")
        return t["generated"].to_numpy().astype(bool), 0
    targets = store.sql("SELECT seq_id, json_extract_string(meta, '$.target') AS target FROM sequences "
                        "WHERE run_id = $run AND list_contains($seqs, seq_id)", params)
    target_of = dict(zip(targets["seq_id"].to_list(), targets["target"].to_list()))
    t = store.sql("SELECT seq_id, token FROM tokens WHERE run_id = $run AND list_contains($seqs, seq_id) "
                  "ORDER BY seq_id, pos", params)
    if t["token"].null_count() == t.height and t.height:
        raise InputError(f"run {b.info.run_id} recorded no token texts (vocab), which --span target needs to find "
                         "the target; re-trace it with routelens trace")
    if t.height != len(seq):
        raise InputError(f"run {b.info.run_id}: tokens and routing disagree; the run is damaged, re-trace it")
    tokens = t["token"].fill_null("").to_list()
    mask = np.zeros(len(seq), bool)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(seq)) + 1, [len(seq)]])
    missing = 0
    for i in range(len(starts) - 1):
        lo, hi = int(starts[i]), int(starts[i + 1])
        span_ = target_span(tokens[lo:hi], target_of.get(int(seq[lo])) or "")
        if span_ is None:
            missing += 1
        else:
            mask[lo + span_[0]:lo + span_[1]] = True
    return mask, missing


@dataclass
class _Counted:
    """A behaviour's counted tokens: ``mask`` over its tokens (seq_id, pos order), the first layer's experts of
    the counted tokens, and the sequences without a target."""
    mask: np.ndarray
    first: np.ndarray
    missing: int

    @property
    def n_tokens(self) -> int:
        return len(self.first)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` counted tokens (SteerMoE 'eq')."""
        if n < self.n_tokens:
            self.mask = self.mask.copy()
            self.mask[np.flatnonzero(self.mask)[n]:] = False
            self.first = self.first[:n]


def _counted(store, b: _Behaviour, layer: int, span: str) -> _Counted:
    ra = load_routing(store, b.info, (layer,), seq_ids=b.seq_ids)
    mask, missing = _token_mask(store, b, ra.seq_id, ra.pos, span)
    return _Counted(mask, ra.experts[0] if mask.all() else ra.experts[0][mask], missing)


def _activations(store, b: _Behaviour, c: _Counted, layers, num_experts: int) -> np.ndarray:
    """``a[l, e]`` over the counted tokens, loading one layer at a time (all layers of a long run at once would
    not fit in the trace's compact form)."""
    out = np.zeros((len(layers), num_experts), np.int64)
    for li, layer in enumerate(layers):
        if li == 0:
            ex = c.first
        else:
            ex = load_routing(store, b.info, (layer,), seq_ids=b.seq_ids).experts[0]
            if len(ex) != len(c.mask):
                raise StoreError(f"run {b.info.run_id}: layer {layer} holds other tokens than layer {layers[0]}; "
                                 "the run is damaged, re-trace it")
            ex = ex if c.mask.all() else ex[c.mask]
        out[li] = _layer_counts(ex, num_experts)
        del ex
    return out


def _behaviours(store, runs: list[RunInfo], p: ContrastParams) -> tuple[_Behaviour, _Behaviour]:
    if len(runs) == 1:
        if p.label1 is None or p.label2 is None:
            raise InputError("contrast over one run compares two labels: give --label1 and --label2 (or a second "
                             "--run)")
        if p.label1 == p.label2:
            raise InputError(f"--label1 and --label2 are both {p.label1!r}; contrast needs two different labels")
        info = runs[0]
        return (_Behaviour(info, p.label1, _seqs(store, info, p.label_field, p.label1)),
                _Behaviour(info, p.label2, _seqs(store, info, p.label_field, p.label2)))
    a, b = runs
    if (a.num_experts, a.top_k, tuple(a.moe_layers)) != (b.num_experts, b.top_k, tuple(b.moe_layers)):
        raise InputError(f"runs {a.run_id} and {b.run_id} have different routing ({a.num_experts} experts top-"
                         f"{a.top_k}, MoE layers {list(a.moe_layers)} vs {b.num_experts} top-{b.top_k}, "
                         f"{list(b.moe_layers)}); contrast compares runs of one model")
    return (_Behaviour(a, p.label1, _seqs(store, a, p.label_field, p.label1)),
            _Behaviour(b, p.label2, _seqs(store, b, p.label_field, p.label2)))


def compute(store, runs: list[RunInfo], params: ContrastParams) -> dict[str, pl.DataFrame]:
    p = params
    if p.span not in SPANS:
        raise InputError(f"--span must be one of {', '.join(SPANS)}, got {p.span!r}")
    if p.label_field not in LABEL_FIELDS:
        raise InputError(f"--label-field must be one of {', '.join(LABEL_FIELDS)}, got {p.label_field!r}")
    if p.top_n < 0:
        raise InputError(f"--top-n must be >= 0, got {p.top_n}")
    exporting = p.num_pos > 0 or p.num_neg > 0
    if p.export_spec and not exporting:
        raise InputError("--export-spec needs experts to export: set --num-pos and/or --num-neg")
    b1, b2 = _behaviours(store, runs, p)
    info = b1.info
    layers = tuple(info.moe_layers)
    E, k = info.num_experts, info.top_k
    c1, c2 = _counted(store, b1, layers[0], p.span), _counted(store, b2, layers[0], p.span)
    miss1, miss2 = c1.missing, c2.missing
    if p.eq:
        n = min(c1.n_tokens, c2.n_tokens)
        c1.truncate(n)
        c2.truncate(n)
    for i, (c, b) in enumerate(((c1, b1), (c2, b2)), start=1):
        if c.n_tokens == 0:
            raise InputError(f"behaviour {i} (run {b.info.run_id}, {p.label_field} {b.label!r}) has no tokens in "
                             f"span {p.span!r}; choose another --span or other sequences")
    n1, n2 = c1.n_tokens, c2.n_tokens
    a1 = _activations(store, b1, c1, layers, E)
    a2 = _activations(store, b2, c2, layers, E)
    frame = risk_difference(a1, n1, a2, n2, layers)
    parts = {
        "experts": frame.head(p.top_n) if p.top_n else frame,
        "behaviours": pl.DataFrame({
            "behaviour": [1, 2], "run_id": [b1.info.run_id, b2.info.run_id], "label": [b1.label, b2.label],
            "n_sequences": [len(b1.seq_ids), len(b2.seq_ids)], "n_tokens": [n1, n2],
            "n_without_target": [miss1, miss2]}, schema_overrides={"label": pl.Utf8}),
    }
    if exporting:
        source = {"analysis": "contrast", "run_ids": [r.run_id for r in runs], "label1": p.label1,
                  "label2": p.label2, "span": p.span, "eq": p.eq, "reverse": p.reverse}
        spec = contrast_spec(frame, p.num_pos, p.num_neg, k, p.reverse, num_experts=E, name="contrast",
                             source=source)
        spec.resolve(RoutingGeometry(info.num_layers, layers, E, k))  # one-line SteeringError if unusable
        parts["spec"] = select_experts(frame, p.num_pos, p.num_neg, k, p.reverse, num_experts=E)
        if p.export_spec:
            spec.save(p.export_spec)
    return parts


ANALYSIS = Analysis(
    name="contrast",
    summary="behaviour-contrast experts (SteerMoE risk difference / fTRI) and their export as a steering spec",
    params=ContrastParams,
    compute=compute,
    primary="experts",
    min_runs=1,
    max_runs=2,
)
