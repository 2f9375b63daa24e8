"""Every query the dashboard runs, parameterised (``?`` / ``$name``), on short-lived read-only connections.

Each function opens the store with ``routelens.store.connection.session(path, read_only=True)`` for the length of
one query and closes it, so a tracer writing the same file is never held up for more than a query (and the read
waits out a writer's flush instead of failing; see connection.py). Aggregations run in DuckDB over the packed
``routing_data`` table (``choice >> 16`` is the expert, ``choice & 65535`` the float16 bits of the weight;
schema.py); only small aggregates or one sequence's routing come back to Python. No Streamlit here: the pages
cache these results (``app/data.py``) and the benchmark calls them directly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from routelens.errors import StoreError
from routelens.records import RunInfo
from routelens.store import catalog
from routelens.store.connection import session

__all__ = [
    "SequenceRouting", "store_stamp", "check_store", "runs", "runs_table", "expert_load", "expert_tokens",
    "expert_partners", "sequences", "sequence_tokens", "sequence_routing", "unpack_choices", "has_logits",
    "logits_sample", "expert_stats", "residual_by_layer", "sequences_with_tokens", "token_ids_for_texts",
    "routing_change", "load_change", "has_residual", "usage_by_lang", "expert_positions",
]


def _one(con, sql: str, params=None):
    return con.sql(sql, params=params).fetchall()


def store_stamp(db: str | os.PathLike) -> tuple:
    """A cache key that changes whenever the store file (or its write-ahead log) is written."""
    out = []
    for p in (Path(db), Path(f"{db}.wal")):
        try:
            s = p.stat()
            out.append((s.st_mtime_ns, s.st_size))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def check_store(db: str | os.PathLike) -> None:
    """Raise a one-line StoreError unless ``db`` is an existing routelens store."""
    from routelens.store import Store

    p = Path(db)
    if not p.exists():
        raise StoreError(f"no store at {p}; create one with `routelens demo --db {p}` or "
                         f"`routelens trace MODEL --input FILE --db {p}`")
    Store.open(p, create=False, read_only=True)


def runs(db: str) -> list[RunInfo]:
    with session(db, read_only=True) as con:
        return catalog.read_runs(con)


def runs_table(db: str, text: str = "") -> pl.DataFrame:
    """The runs as a table, optionally filtered by ``text`` (a substring of the name, model or input source, or a
    tag equal to it). ``text`` is a bound parameter: quotes or SQL in it are just characters."""
    where, params = "", {}
    if text:
        where = ("WHERE contains(lower(coalesce(name, '')), lower($t)) OR contains(lower(model), lower($t)) "
                 "OR contains(lower(coalesce(input_source, '')), lower($t)) OR list_contains(tags, $t)")
        params = {"t": text}
    with session(db, read_only=True) as con:
        return con.sql(
            "SELECT run_id, name, model, architecture, family, num_experts AS E, top_k AS k, "
            "len(moe_layers) AS moe_layers, num_layers, input_source, status, tags, n_sequences, n_tokens, "
            "n_decisions, steering IS NOT NULL AS steered, created_at, finished_at, run_uuid "
            f"FROM runs {where} ORDER BY run_id", params=params or None).pl()


def expert_load(db: str, run_id: int, num_experts: int, layers: tuple[int, ...]) -> pl.DataFrame:
    """Decisions per (layer, expert): ``n`` (tokens whose top-k holds the expert), ``n_top1`` (rank 0) and
    ``weight_sum`` (sum of its routing weights), with zero rows for experts that never fired."""
    with session(db, read_only=True) as con:
        got = con.sql(
            "SELECT layer, (c >> 16)::SMALLINT AS expert, count(*) AS n, "
            "count(*) FILTER (WHERE r = 0) AS n_top1, sum(rl_half_to_float(c & 65535)) AS weight_sum "
            "FROM (SELECT layer, unnest(choices) AS c, unnest(range(len(choices))) AS r FROM routing_data "
            "WHERE run_id = $run) GROUP BY ALL", params={"run": run_id}).pl()
    full = pl.DataFrame({"layer": np.repeat(np.asarray(layers, np.int16), num_experts),
                         "expert": np.tile(np.arange(num_experts, dtype=np.int16), len(layers))})
    out = full.join(got.with_columns(pl.col("layer").cast(pl.Int16), pl.col("expert").cast(pl.Int16)),
                    on=["layer", "expert"], how="left")
    return out.with_columns(pl.col("n").fill_null(0), pl.col("n_top1").fill_null(0),
                            pl.col("weight_sum").fill_null(0.0)).sort(["layer", "expert"])


def tokens_per_layer(db: str, run_id: int) -> pl.DataFrame:
    with session(db, read_only=True) as con:
        return con.sql("SELECT layer, count(*) AS n_tokens FROM routing_data WHERE run_id = $run GROUP BY layer "
                       "ORDER BY layer", params={"run": run_id}).pl()


_HAS_EXPERT = "list_contains(list_transform(choices, lambda c: (c >> 16)::INTEGER), $expert)"


def expert_tokens(db: str, run_id: int, layer: int, expert: int, limit: int = 25) -> pl.DataFrame:
    """The tokens most often routed to (layer, expert): count, the token's total count, and the share of the
    token's occurrences that went to the expert."""
    with session(db, read_only=True) as con:
        return con.sql(
            "WITH hit AS (SELECT r.seq_id, r.pos, " + _HAS_EXPERT + " AS h FROM routing_data AS r "
            "WHERE r.run_id = $run AND r.layer = $layer) "
            "SELECT t.token_id, any_value(t.token) AS token, count(*) FILTER (WHERE h) AS n_routed, "
            "count(*) AS n_total, n_routed / n_total AS share "
            "FROM hit JOIN tokens AS t ON t.run_id = $run AND t.seq_id = hit.seq_id AND t.pos = hit.pos "
            "GROUP BY t.token_id HAVING n_routed > 0 ORDER BY n_routed DESC, t.token_id LIMIT $limit",
            params={"run": run_id, "layer": layer, "expert": expert, "limit": limit}).pl()


def expert_partners(db: str, run_id: int, layer: int, expert: int) -> pl.DataFrame:
    """Experts co-selected with (layer, expert) in the same token's top-k, and the rank the expert held."""
    with session(db, read_only=True) as con:
        partners = con.sql(
            "SELECT (c >> 16)::SMALLINT AS partner, count(*) AS n FROM (SELECT unnest(choices) AS c FROM routing_data "
            "WHERE run_id = $run AND layer = $layer AND " + _HAS_EXPERT + ") WHERE (c >> 16) <> $expert "
            "GROUP BY ALL ORDER BY n DESC, partner", params={"run": run_id, "layer": layer, "expert": expert}).pl()
        ranks = con.sql(
            "SELECT r AS rank, count(*) AS n, avg(rl_half_to_float(c & 65535)) AS mean_weight FROM ("
            "SELECT unnest(choices) AS c, unnest(range(len(choices))) AS r FROM routing_data "
            "WHERE run_id = $run AND layer = $layer) WHERE (c >> 16) = $expert GROUP BY r ORDER BY r",
            params={"run": run_id, "layer": layer, "expert": expert}).pl()
    return partners, ranks


def sequences(db: str, run_id: int, search: str = "", limit: int = 200) -> pl.DataFrame:
    """Sequences of a run (id, tokens, label, lang, a text preview), optionally those whose text contains
    ``search`` (bound parameter, case-insensitive)."""
    where = "AND contains(lower(text), lower($q))" if search else ""
    params = {"run": run_id, "limit": limit, **({"q": search} if search else {})}
    with session(db, read_only=True) as con:
        return con.sql(
            "SELECT seq_id, n_tokens, label, lang, align_id, left(text, 120) AS preview, "
            "json_extract_string(meta, '$.generated_text') AS generated_text FROM sequences "
            f"WHERE run_id = $run {where} ORDER BY seq_id LIMIT $limit", params=params).pl()


def sequence_tokens(db: str, run_id: int, seq_id: int) -> pl.DataFrame:
    with session(db, read_only=True) as con:
        return con.sql("SELECT pos, token_id, token, generated FROM tokens WHERE run_id = $run AND seq_id = $seq "
                       "ORDER BY pos", params={"run": run_id, "seq": seq_id}).pl()


@dataclass
class SequenceRouting:
    """One sequence's routing: ``experts[l, t, r]`` (int16) and ``weights[l, t, r]`` (float32) for MoE layers
    ``layers`` and positions ``pos`` (positions a layer did not record are -1 / NaN)."""

    layers: tuple[int, ...]
    pos: np.ndarray
    experts: np.ndarray
    weights: np.ndarray


def unpack_choices(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``expert << 16 | float16 bits`` (uint32) -> (expert int16, weight float32); schema.py ``routing_data``."""
    packed = np.asarray(packed, np.uint32)
    experts = (packed >> 16).astype(np.int16)
    weights = (packed & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32)
    return experts, weights


def sequence_routing(db: str, run_id: int, seq_id: int, layers: tuple[int, ...], top_k: int) -> SequenceRouting:
    with session(db, read_only=True) as con:
        tbl = con.sql("SELECT layer, pos, choices FROM routing_data WHERE run_id = $run AND seq_id = $seq "
                      "ORDER BY layer, pos", params={"run": run_id, "seq": seq_id}).to_arrow_table()
    layer = tbl.column("layer").to_numpy().astype(np.int64)
    pos = tbl.column("pos").to_numpy().astype(np.int64)
    flat = np.concatenate([c.flatten().to_numpy(zero_copy_only=False) for c in tbl.column("choices").chunks]) \
        if tbl.num_rows else np.zeros(0, np.uint32)
    experts, weights = unpack_choices(flat.reshape(-1, top_k) if tbl.num_rows else np.zeros((0, top_k), np.uint32))
    all_pos = np.unique(pos)
    li = np.searchsorted(np.asarray(layers), layer)
    ti = np.searchsorted(all_pos, pos)
    E = np.full((len(layers), len(all_pos), top_k), -1, np.int16)
    W = np.full((len(layers), len(all_pos), top_k), np.nan, np.float32)
    E[li, ti] = experts
    W[li, ti] = weights
    return SequenceRouting(tuple(layers), all_pos, E, W)


def has_logits(db: str, run_id: int) -> bool:
    with session(db, read_only=True) as con:
        return bool(_one(con, "SELECT count(*) > 0 FROM (SELECT 1 FROM router_logits_data WHERE run_id = ? LIMIT 1)",
                         [run_id])[0][0])


def logits_sample(db: str, run_id: int, layers: tuple[int, ...], num_experts: int, max_tokens: int
                  ) -> dict[int, np.ndarray]:
    """Raw router logits (float16 [N, E]) per layer over the first sequences of the run holding about
    ``max_tokens`` tokens (whole sequences, at least one), in one scan; decoded with
    ``routelens.store.store.decode_logit_spans``. Filtering on seq_id keeps DuckDB from reading the other BLOBs."""
    from routelens.store.store import decode_logit_spans

    with session(db, read_only=True) as con:
        cut = con.sql("SELECT max(seq_id) FROM (SELECT seq_id FROM sequences WHERE run_id = $run QUALIFY "
                      "sum(coalesce(n_tokens, 0)) OVER (ORDER BY seq_id ROWS UNBOUNDED PRECEDING) - coalesce(n_tokens, 0)"
                      " < $cap)", params={"run": run_id, "cap": max_tokens}).fetchall()[0][0]
        con.sql("SET arrow_large_buffer_size = true")
        tbl = con.sql("SELECT layer, seq_id, pos_start, n, logits FROM router_logits_data WHERE run_id = $run AND "
                      "seq_id <= $cut ORDER BY layer, seq_id, pos_start",
                      params={"run": run_id, "cut": -1 if cut is None else int(cut)}).to_arrow_table()
    layer_col = tbl.column("layer").to_numpy()
    out = {}
    for layer in layers:
        rows = np.flatnonzero(layer_col == layer)
        part = tbl.take(rows) if len(rows) else tbl.slice(0, 0)
        out[layer] = decode_logit_spans(part.drop_columns(["layer"]), num_experts)[2]
    return out


def expert_stats(db: str, run_id: int) -> pl.DataFrame:
    with session(db, read_only=True) as con:
        return con.sql("SELECT layer, expert, n_tokens, max_out, max_out_seq, max_out_pos, max_out_channel, max_in "
                       "FROM expert_stats WHERE run_id = $run ORDER BY layer, expert", params={"run": run_id}).pl()


def has_residual(db: str, run_id: int) -> bool:
    with session(db, read_only=True) as con:
        return bool(_one(con, "SELECT count(*) > 0 FROM (SELECT 1 FROM residual_max WHERE run_id = ? LIMIT 1)",
                         [run_id])[0][0])


def residual_by_layer(db: str, run_id: int) -> pl.DataFrame:
    """Massive activations straight from the store: per decoder layer the max and median of max |h| over tokens
    and where the max is (``residual_max`` table)."""
    with session(db, read_only=True) as con:
        return con.sql(
            "SELECT layer, max(value) AS max_value, median(value) AS median_value, arg_max(channel, value) AS "
            "top_channel, arg_max(seq_id, value) AS max_seq, arg_max(pos, value) AS max_pos FROM residual_max "
            "WHERE run_id = $run GROUP BY layer ORDER BY layer", params={"run": run_id}).pl()


def token_ids_for_texts(db: str, run_id: int, texts: list[str]) -> pl.DataFrame:
    """Vocabulary entries of the run whose text, stripped of whitespace and the BPE space markers Ġ/▁, equals one
    of ``texts``."""
    with session(db, read_only=True) as con:
        return con.sql(
            "SELECT token_id, token FROM vocab WHERE run_id = $run AND "
            "list_contains($texts, trim(replace(replace(token, 'Ġ', ''), '▁', ''))) ORDER BY token_id",
            params={"run": run_id, "texts": list(texts)}).pl()


def sequences_with_tokens(db: str, run_id: int, token_ids: list[int], limit: int = 50) -> pl.DataFrame:
    with session(db, read_only=True) as con:
        return con.sql(
            "SELECT s.seq_id, count(*) AS n_marker, any_value(left(s.text, 120)) AS preview FROM token_data AS t "
            "JOIN sequences AS s ON s.run_id = t.run_id AND s.seq_id = t.seq_id WHERE t.run_id = $run AND "
            "list_contains($ids, t.token_id) GROUP BY s.seq_id ORDER BY s.seq_id LIMIT $limit",
            params={"run": run_id, "ids": [int(i) for i in token_ids], "limit": limit}).pl()


def routing_change(db: str, run_a: int, run_b: int) -> pl.DataFrame:
    """Per MoE layer, over the tokens both runs hold at the same (seq_id, pos) with the same token id: how many,
    the share whose top-k *set* differs, and the share whose top-1 differs."""
    with session(db, read_only=True) as con:
        return con.sql(
            "WITH a AS (SELECT r.seq_id, r.pos, r.layer, r.choices FROM routing_data r WHERE r.run_id = $a), "
            "b AS (SELECT r.seq_id, r.pos, r.layer, r.choices FROM routing_data r WHERE r.run_id = $b), "
            "same AS (SELECT ta.seq_id, ta.pos FROM token_data ta JOIN token_data tb ON tb.run_id = $b AND "
            "tb.seq_id = ta.seq_id AND tb.pos = ta.pos AND tb.token_id = ta.token_id WHERE ta.run_id = $a) "
            "SELECT a.layer, count(*) AS n_tokens, "
            "avg(CASE WHEN list_sort(list_transform(a.choices, lambda c: c >> 16)) = "
            "list_sort(list_transform(b.choices, lambda c: c >> 16)) THEN 0.0 ELSE 1.0 END) AS topk_changed, "
            "avg(CASE WHEN a.choices[1] >> 16 = b.choices[1] >> 16 THEN 0.0 ELSE 1.0 END) AS top1_changed "
            "FROM a JOIN b USING (seq_id, pos, layer) JOIN same USING (seq_id, pos) GROUP BY a.layer ORDER BY a.layer",
            params={"a": run_a, "b": run_b}).pl()


def load_change(db: str, run_a: int, run_b: int) -> pl.DataFrame:
    """Per (layer, expert): share of each run's tokens routed to the expert and the difference b − a."""
    sub = ("SELECT layer, (c >> 16)::SMALLINT AS expert, count(*)::DOUBLE / any_value(nt) AS share FROM ("
           "SELECT layer, unnest(choices) AS c, count(*) OVER (PARTITION BY layer) AS nt FROM routing_data "
           "WHERE run_id = {}) GROUP BY ALL")
    with session(db, read_only=True) as con:
        return con.sql(
            f"SELECT coalesce(a.layer, b.layer) AS layer, coalesce(a.expert, b.expert) AS expert, "
            f"coalesce(a.share, 0) AS share_a, coalesce(b.share, 0) AS share_b, share_b - share_a AS diff "
            f"FROM ({sub.format('$a')}) a FULL JOIN ({sub.format('$b')}) b USING (layer, expert) "
            f"ORDER BY layer, expert", params={"a": run_a, "b": run_b}).pl()


def usage_by_lang(db: str, run_id: int) -> pl.DataFrame:
    """Per language, layer and expert: the share of the language's tokens whose executed top-k holds the expert
    (activation counts ÷ tokens), from ``routing_data`` joined to ``sequences.lang``."""
    with session(db, read_only=True) as con:
        return con.sql(
            "WITH r AS (SELECT s.lang, d.layer, d.choices FROM routing_data d JOIN sequences s ON s.run_id = d.run_id "
            "AND s.seq_id = d.seq_id WHERE d.run_id = $run AND s.lang IS NOT NULL), "
            "n AS (SELECT lang, layer, count(*) AS n_tokens FROM r GROUP BY ALL) "
            "SELECT u.lang, u.layer, u.expert, u.n / n.n_tokens AS share FROM (SELECT lang, layer, "
            "(c >> 16)::SMALLINT AS expert, count(*) AS n FROM (SELECT lang, layer, unnest(choices) AS c FROM r) "
            "GROUP BY ALL) u "
            "JOIN n USING (lang, layer) ORDER BY u.lang, u.layer, u.expert", params={"run": run_id}).pl()


def expert_positions(db: str, run_id: int, seq_id: int, layer: int, expert: int) -> list[int]:
    """Positions of one sequence whose executed top-k at ``layer`` holds ``expert``."""
    with session(db, read_only=True) as con:
        rows = con.sql("SELECT pos FROM routing_data WHERE run_id = $run AND seq_id = $seq AND layer = $layer AND "
                       + _HAS_EXPERT + " ORDER BY pos",
                       params={"run": run_id, "seq": seq_id, "layer": layer, "expert": expert}).fetchall()
    return [r[0] for r in rows]
