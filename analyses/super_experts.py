"""Super Experts (Su et al., arXiv 2507.23279, ICLR 2026; repo ``ZunhaiSu/Super-Experts-Profilling``): the rare
routed experts whose down projection emits the massive activations of the residual stream, and what removing
them does (algorithms.md §2).

Input: a run traced with ``expert_stats=True`` (table ``expert_stats``: per (layer, expert) the max |down_proj
output| before the routing weight, with its sequence, position and channel, and the max |down_proj input|) and,
traced by default, ``residual_max`` (per token and decoder layer the max |h| of the layer's output and its channel).

Criterion (``eval_utils.py::_super_experts_analysis`` + ``_identify_super_experts``, defaults ``--include_layers
0.75``, quantile 99.5, ``times`` 10)::

    cutoff = round(layer_frac * num_layers)          # Python round (half to even), decoder layers, as the reference
    V      = { a_{l,e} = max_out(l, e) : l < cutoff }
    SE     = { (l, e) in V : a > np.percentile(V, q)  and  a > max(V) * frac_of_max }

``np.percentile`` with its default linear interpolation. The reference writes the second test as
``np.max(V) // 10``: floor division on a float, i.e. ``floor(max(V) / 10)``. That differs from ``max(V) / 10`` by
less than 1, so it only matters when max(V) is small (a model whose experts never exceed ~10, e.g. a tiny
random-init one, gets a threshold of 0); ``floor_quirk=True`` reproduces it (``floor(max(V) / (1 / frac_of_max))``).

Differences from the reference profiler, on purpose:

* ``max_out`` is the max over **all** routed tokens and channels (routelens/adapters/experts.py). The reference
  hooks per-expert ``down_proj`` modules and reads ``output[0]``, which for routed experts (2-D input
  ``[n_routed, H]``) is only the first routed token's row; super experts fire on the earliest tokens, so the two
  usually agree, but the global max is the intended quantity (algorithms.md §2.1 "Quirk", §9.4).
* Only routed experts are measured: a DeepSeek ``shared_experts`` MLP (which the reference also ranks) has no row.
* An expert no token was routed to has no row (no measurement), instead of a 0 in V.

Parts:

``experts`` (primary): layer, expert, n_tokens, max_out, max_out_seq, max_out_pos, max_out_channel, max_out_token,
    max_in, included (layer < cutoff), is_super, rank (1 = largest max_out over all rows; ties by layer, expert);
    sorted by rank.
``criterion``: q, frac_of_max, layer_frac, floor_quirk, layers_included (the cutoff: layers 0..cutoff-1), n_values
    (|V|), percentile_value, max_value, max_threshold (max(V)·frac or its floor), threshold (the larger of the two
    bounds; SE iff a > threshold), n_super.
``massive``: per decoder layer from ``residual_max``: max_value, mean_value and median_value (mean / median over
    tokens of the per-token max |h|), max_over_median, top_channel, max_seq, max_pos (where the max is), n_tokens.
``attention_sink``: layer, head, mode, mass_before, mass_after: mean attention probability on the first token over
    query positions >= 1 of the held-out texts, intact vs with the super experts removed (``attention_sink.py``);
    with no super expert, mode ``none`` and mass_after null.
``ablation``: mode, target (``super``; ``pruned`` when ``prune`` names the experts; ``control1``.. for random
    non-super experts, as many per layer as there are targets, drawn from the same layers), experts (``layer:expert;...``), ppl_before, ppl_after, delta
    (after - before), n_tokens (predicted held-out tokens).

The model-side parts need the model (``model``: a local folder or ``tiny:FAMILY``; default the run's own ``model``,
refused when its config hash differs from the run's) and are skipped, as empty frames, with ``stats_only``. With
``dtype="auto"`` the model is loaded in float32 on the CPU (bfloat16 matmuls are several times slower there) and in
the checkpoint's dtype on an accelerator.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from routelens.errors import InputError
from routelens.records import RunInfo

from .registry import Analysis

__all__ = ["SuperExpertsParams", "Criterion", "layer_cutoff", "super_expert_criterion", "rank_desc", "analyze",
           "expert_frames", "massive_frame", "model_frames", "parse_pairs", "format_pairs", "control_pairs",
           "ANALYSIS"]


@dataclass(frozen=True)
class SuperExpertsParams:
    q: float = field(default=99.5, metadata={"help": "percentile of V an SE must exceed (reference: 99.5)"})
    frac_of_max: float = field(default=0.1, metadata={"help": "an SE must also exceed max(V) times this (reference: "
                                                              "max // 10)"})
    layer_frac: float = field(default=0.75, metadata={"help": "V holds layers < round(layer_frac * num_layers) "
                                                              "(reference --include_layers)"})
    floor_quirk: bool = field(default=False, metadata={"help": "floor the max bound like the reference's "
                                                               "np.max(V) // 10"})
    stats_only: bool = field(default=False, metadata={"help": "skip the model-side parts (attention sink, "
                                                              "ablation perplexity)"})
    model: str | None = field(default=None, metadata={"help": "model folder or tiny:FAMILY for the model-side parts "
                                                              "(default: the run's model)"})
    dtype: str = field(default="auto", metadata={"help": "dtype to load the model in: auto (the checkpoint's; float32 "
                                                         "on the CPU, where bfloat16 is slow), float32, bfloat16"})
    device: str | None = field(default=None, metadata={"help": "device for the model-side parts (default: cpu)"})
    heldout: str | None = field(default=None, metadata={"help": "held-out .txt/.jsonl(.gz) for perplexity and the "
                                                                "attention sink (default: data/corpus held-out)"})
    max_tokens: int = field(default=2048, metadata={"help": "held-out tokens to evaluate"})
    seq_len: int = field(default=256, metadata={"help": "held-out texts are cut to this many tokens"})
    batch_size: int = field(default=8, metadata={"help": "held-out sequences per forward"})
    modes: tuple[str, ...] = field(default=("weights", "router"), metadata={
        "help": "removal modes: weights (zero down_proj, router untouched: the paper) and/or router (disable)"})
    prune: tuple[str, ...] = field(default=(), metadata={"help": "remove these layer:expert pairs instead of the "
                                                                 "detected super experts"})
    controls: int = field(default=1, metadata={"help": "random non-super expert sets ablated for comparison"})
    seed: int = field(default=0, metadata={"help": "seed of the control sets"})


# ------------------------------------------------------------------------------------------------ the criterion

@dataclass(frozen=True)
class Criterion:
    """The thresholds of one identification (see the module docstring)."""

    q: float
    frac_of_max: float
    layer_frac: float
    floor_quirk: bool
    layers_included: int
    n_values: int
    percentile_value: float | None
    max_value: float | None
    max_threshold: float | None
    threshold: float | None
    n_super: int


def layer_cutoff(num_layers: int, layer_frac: float) -> int:
    """``round(num_layers * layer_frac)``: the reference's ``include_layers`` (Python's half-to-even rounding)."""
    return int(round(num_layers * layer_frac))


def super_expert_criterion(layers: np.ndarray, max_out: np.ndarray, num_layers: int, *, q: float = 99.5,
                           frac_of_max: float = 0.1, layer_frac: float = 0.75,
                           floor_quirk: bool = False) -> tuple[np.ndarray, np.ndarray, Criterion]:
    """Super experts among rows ``(layers[i], max_out[i])``: returns ``(included[bool], is_super[bool], Criterion)``.

    included = layers < round(layer_frac · num_layers); V = max_out[included];
    is_super = included & (max_out > np.percentile(V, q)) & (max_out > M) with M = max(V)·frac_of_max, or
    ``floor(max(V) / (1 / frac_of_max))`` with ``floor_quirk`` (ZunhaiSu/Super-Experts-Profilling
    ``eval_utils.py::_identify_super_experts``: ``np.max(V) // times``).
    """
    layers = np.asarray(layers)
    a = np.asarray(max_out, dtype=np.float64)
    cutoff = layer_cutoff(num_layers, layer_frac)
    included = layers < cutoff
    values = a[included]
    if values.size == 0:
        crit = Criterion(q, frac_of_max, layer_frac, floor_quirk, cutoff, 0, None, None, None, None, 0)
        return included, np.zeros_like(included), crit
    pct = float(np.percentile(values, q))
    vmax = float(values.max())
    bound = float(vmax // (1.0 / frac_of_max)) if floor_quirk else vmax * frac_of_max
    is_super = included & (a > pct) & (a > bound)
    crit = Criterion(q, frac_of_max, layer_frac, floor_quirk, cutoff, int(values.size), pct, vmax, bound,
                     max(pct, bound), int(is_super.sum()))
    return included, is_super, crit


def rank_desc(values: np.ndarray, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """1-based rank by value descending, ties broken by (layer, expert) ascending."""
    order = np.lexsort((np.asarray(experts), np.asarray(layers), -np.asarray(values, dtype=np.float64)))
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return rank


# ------------------------------------------------------------------------------------------------ stats parts

_EXPERT_SCHEMA = {"layer": pl.Int16, "expert": pl.Int16, "n_tokens": pl.Int64, "max_out": pl.Float32,
                  "max_out_seq": pl.Int64, "max_out_pos": pl.Int32, "max_out_channel": pl.Int32,
                  "max_out_token": pl.Utf8, "max_in": pl.Float32}


def _stats(store, info: RunInfo) -> pl.DataFrame:
    frame = store.sql(
        "SELECT s.layer, s.expert, s.n_tokens, s.max_out, s.max_out_seq, s.max_out_pos, s.max_out_channel, "
        "t.token AS max_out_token, s.max_in FROM expert_stats AS s LEFT JOIN tokens AS t ON t.run_id = s.run_id "
        "AND t.seq_id = s.max_out_seq AND t.pos = s.max_out_pos WHERE s.run_id = ? ORDER BY s.layer, s.expert",
        [info.run_id])
    if frame.is_empty():
        traced = bool((info.params or {}).get("expert_stats"))
        why = "its expert statistics are empty" if traced else "it was traced without expert statistics"
        raise InputError(f"run {info.run_id} has no expert_stats ({why}); re-trace it with "
                         "`routelens trace --expert-stats`")
    return frame.cast({k: v for k, v in _EXPERT_SCHEMA.items() if k in frame.columns})


def expert_frames(stats: pl.DataFrame, num_layers: int, params: SuperExpertsParams
                  ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The ``experts`` and ``criterion`` parts from an expert_stats frame (columns as ``_EXPERT_SCHEMA``)."""
    layers = stats["layer"].to_numpy()
    experts = stats["expert"].to_numpy()
    max_out = stats["max_out"].fill_null(0.0).to_numpy()
    included, is_super, crit = super_expert_criterion(
        layers, max_out, num_layers, q=params.q, frac_of_max=params.frac_of_max, layer_frac=params.layer_frac,
        floor_quirk=params.floor_quirk)
    frame = stats.with_columns(pl.Series("included", included, dtype=pl.Boolean),
                               pl.Series("is_super", is_super, dtype=pl.Boolean),
                               pl.Series("rank", rank_desc(max_out, layers, experts), dtype=pl.Int32)).sort("rank")
    criterion = pl.DataFrame([asdict(crit)], schema={
        "q": pl.Float64, "frac_of_max": pl.Float64, "layer_frac": pl.Float64, "floor_quirk": pl.Boolean,
        "layers_included": pl.Int32, "n_values": pl.Int64, "percentile_value": pl.Float64, "max_value": pl.Float64,
        "max_threshold": pl.Float64, "threshold": pl.Float64, "n_super": pl.Int64})
    return frame, criterion


_MASSIVE_SCHEMA = {"layer": pl.Int16, "max_value": pl.Float32, "mean_value": pl.Float64, "median_value": pl.Float64,
                   "max_over_median": pl.Float64, "top_channel": pl.Int32, "max_seq": pl.Int64, "max_pos": pl.Int32,
                   "n_tokens": pl.Int64}


def massive_frame(store, info: RunInfo) -> pl.DataFrame:
    """Massive activations per decoder layer from ``residual_max`` (one aggregate in DuckDB; the location of a
    tied max is the first by (seq_id, pos))."""
    from routelens.store.connection import session

    parts = []
    # one query per layer, each on a fresh connection: the exact median holds one layer's values, not the run's
    for layer in range(info.num_layers):
        with session(store.path, read_only=True) as con:
            part = con.sql(
                "SELECT layer, max(value) AS max_value, avg(value) AS mean_value, "
                "quantile_cont(value, 0.5) AS median_value, "
                "arg_max({'channel': channel, 'seq': seq_id, 'pos': pos}, (value, -seq_id, -pos)) AS at, "
                "count(*) AS n_tokens FROM residual_max WHERE run_id = ? AND layer = ? GROUP BY layer",
                params=[info.run_id, layer]).pl()
        if part.height:
            parts.append(part)
    frame = pl.concat(parts) if parts else pl.DataFrame()
    if frame.is_empty():
        return pl.DataFrame(schema=_MASSIVE_SCHEMA)
    frame = frame.with_columns(
        (pl.col("max_value").cast(pl.Float64) / pl.col("median_value")).alias("max_over_median"),
        pl.col("at").struct.field("channel").alias("top_channel"), pl.col("at").struct.field("seq").alias("max_seq"),
        pl.col("at").struct.field("pos").alias("max_pos"))
    return frame.select(list(_MASSIVE_SCHEMA)).cast(_MASSIVE_SCHEMA)


# ------------------------------------------------------------------------------------------------ model parts

_SINK_SCHEMA = {"layer": pl.Int16, "head": pl.Int32, "mode": pl.Utf8, "mass_before": pl.Float64,
                "mass_after": pl.Float64}
_ABLATION_SCHEMA = {"mode": pl.Utf8, "target": pl.Utf8, "experts": pl.Utf8, "ppl_before": pl.Float64,
                    "ppl_after": pl.Float64, "delta": pl.Float64, "n_tokens": pl.Int64}


def parse_pairs(items) -> list[tuple[int, int]]:
    """``("3:54", "4:38")`` -> ``[(3, 54), (4, 38)]`` (the reference's ``--prune_experts "3,54;4,38"``)."""
    pairs = []
    for item in items:
        parts = str(item).replace(",", ":").split(":")
        if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
            raise InputError(f"--prune takes layer:expert pairs separated by commas, e.g. 3:54,4:38; got {item!r}")
        pairs.append((int(parts[0]), int(parts[1])))
    return pairs


def format_pairs(pairs) -> str:
    return ";".join(f"{l}:{e}" for l, e in pairs)


def control_pairs(candidates: pl.DataFrame, targets: list[tuple[int, int]], rng: np.random.Generator
                  ) -> list[tuple[int, int]]:
    """A random control set: per layer of ``targets``, as many experts as targets there, drawn without replacement
    from ``candidates`` (rows layer, expert) of that layer that are not targets (fewer when too few exist)."""
    chosen = []
    target_set = set(targets)
    for layer in sorted({l for l, _ in targets}):
        need = sum(1 for l, _ in targets if l == layer)
        pool = [int(e) for e in candidates.filter(pl.col("layer") == layer)["expert"].to_list()
                if (layer, int(e)) not in target_set]
        if pool:
            pick = rng.choice(len(pool), size=min(need, len(pool)), replace=False)
            chosen += [(layer, pool[i]) for i in sorted(pick)]
    return chosen


def model_frames(model, tokenizer, pairs: list[tuple[int, int]], candidates: pl.DataFrame,
                 params: SuperExpertsParams, *, target: str = "super") -> tuple[pl.DataFrame, pl.DataFrame]:
    """The ``attention_sink`` and ``ablation`` parts: one intact pass over the held-out batches, then one pass per
    mode with ``pairs`` removed (ablation rows labelled ``target``) and one per mode and control set (perplexity
    only). With no pairs, the attention sink of the intact model alone (mode ``none``) and no ablation rows."""
    from . import attention_sink as sink

    seqs = sink.encode_texts(tokenizer, sink.heldout_texts(params.heldout), max_tokens=params.max_tokens,
                             seq_len=params.seq_len)
    batches = sink.make_batches(seqs, batch_size=params.batch_size, pad_id=sink.pad_id_of(tokenizer))
    before = sink.measure(model, batches)
    rng = np.random.default_rng(params.seed)
    controls = [control_pairs(candidates, pairs, rng) for _ in range(params.controls)] if pairs else []
    sink_rows, ablation_rows = [], []
    layers = sorted(before.sink_sum)
    if not pairs:
        for layer in layers:
            for h, m in enumerate(before.sink_mass(layer)):
                sink_rows.append((layer, h, "none", float(m), None))
    for mode in params.modes if pairs else ():
        with sink.ablated(model, pairs, mode):
            after = sink.measure(model, batches)
        for layer in layers:
            for h, (m0, m1) in enumerate(zip(before.sink_mass(layer), after.sink_mass(layer))):
                sink_rows.append((layer, h, mode, float(m0), float(m1)))
        ablation_rows.append((mode, target, format_pairs(pairs), before.ppl, after.ppl, after.ppl - before.ppl,
                              before.n_predicted))
        for i, ctrl in enumerate(controls, start=1):
            if not ctrl:
                continue
            with sink.ablated(model, ctrl, mode):
                after = sink.measure(model, batches, attention=False)
            ablation_rows.append((mode, f"control{i}", format_pairs(ctrl), before.ppl, after.ppl,
                                  after.ppl - before.ppl, before.n_predicted))
    return (pl.DataFrame(sink_rows, schema=_SINK_SCHEMA, orient="row"),
            pl.DataFrame(ablation_rows, schema=_ABLATION_SCHEMA, orient="row"))


def _check_params(p: SuperExpertsParams) -> None:
    from .attention_sink import MODES

    if not 0.0 <= p.q <= 100.0:
        raise InputError(f"--q is a percentile in [0, 100], got {p.q}")
    if not 0.0 < p.layer_frac <= 1.0:
        raise InputError(f"--layer-frac must be in (0, 1], got {p.layer_frac}")
    if not 0.0 < p.frac_of_max <= 1.0:
        raise InputError(f"--frac-of-max must be in (0, 1], got {p.frac_of_max}")
    bad = [m for m in p.modes if m not in MODES]
    if bad or not p.modes:
        raise InputError(f"--modes takes {' and/or '.join(MODES)} (comma list), got {','.join(p.modes) or 'nothing'}")
    if p.controls < 0:
        raise InputError(f"--controls must be >= 0, got {p.controls}")


def _load_for_run(info: RunInfo, params: SuperExpertsParams):
    from routelens.tracer.driver import config_hash

    from .attention_sink import load_model_ref

    ref = params.model or info.model
    if params.model is None and not (ref.startswith("tiny:") or (Path(ref).expanduser() / "config.json").exists()):
        raise InputError(f"run {info.run_id}'s model {ref!r} is not a local model folder; pass --model PATH (or "
                         "tiny:FAMILY), or --stats-only to skip the attention-sink and ablation parts")
    on_cpu = params.device is None or str(params.device).startswith("cpu")
    dtype = "float32" if params.dtype == "auto" and on_cpu else params.dtype
    model, tokenizer = load_model_ref(ref, dtype=dtype, device=params.device)
    have = config_hash(model.config)
    if info.config_hash and have != info.config_hash:
        raise InputError(f"model {ref} (config {have}) is not the model run {info.run_id} was traced with (config "
                         f"{info.config_hash}); pass that model with --model")
    return model, tokenizer


def analyze(store, info: RunInfo, params: SuperExpertsParams | None = None, *, model=None,
            tokenizer=None) -> dict[str, pl.DataFrame]:
    """All parts for one run. ``model``/``tokenizer`` (a live model, e.g. one edited in memory) replace loading
    ``params.model``; the model-side parts are empty frames with ``params.stats_only``."""
    params = params or SuperExpertsParams()
    _check_params(params)
    stats = _stats(store, info)
    experts, criterion = expert_frames(stats, info.num_layers, params)
    frames = {"experts": experts, "criterion": criterion, "massive": massive_frame(store, info)}
    if params.stats_only:
        frames["attention_sink"] = pl.DataFrame(schema=_SINK_SCHEMA)
        frames["ablation"] = pl.DataFrame(schema=_ABLATION_SCHEMA)
        return frames
    if params.prune:
        pairs = parse_pairs(params.prune)
    else:
        sup = experts.filter(pl.col("is_super")).sort("layer", "expert")
        pairs = list(zip(sup["layer"].to_list(), sup["expert"].to_list()))
    if model is None:
        model, tokenizer = _load_for_run(info, params)
    elif tokenizer is None:
        raise InputError("analyze(model=...) needs its tokenizer too")
    candidates = experts.filter(~pl.col("is_super")).select("layer", "expert")
    frames["attention_sink"], frames["ablation"] = model_frames(model, tokenizer, pairs, candidates, params,
                                                                target="pruned" if params.prune else "super")
    return frames


def compute(store, runs: list[RunInfo], params: SuperExpertsParams) -> dict[str, pl.DataFrame]:
    return analyze(store, runs[0], params)


ANALYSIS = Analysis(
    name="super-experts",
    summary="super experts (Su et al. 2025): max |down_proj out| per expert, the 99.5th-percentile criterion, "
            "massive activations, attention sink and ablation perplexity",
    params=SuperExpertsParams,
    compute=compute,
    primary="experts",
)
