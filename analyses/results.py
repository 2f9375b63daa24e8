"""Analysis results in the store: one catalogue row per result, one table per result part.

Tables (created on the first saved result; additive to schema v1, older stores gain them on first use):

``analysis_results`` — one row per stored result.
    ``result_id`` INTEGER, ``analysis`` VARCHAR (CLI name, e.g. ``lrc``), ``run_ids`` INTEGER[] (the runs it was
    computed over, in argument order), ``run_uuids`` VARCHAR[], ``params`` JSON (every parameter, defaults
    included), ``params_key`` VARCHAR (canonical JSON: same analysis + runs + params_key = same result, and a new
    computation replaces the old), ``parts`` VARCHAR[], ``created_at`` TIMESTAMP (UTC), ``routelens_version``,
    ``seconds`` DOUBLE (compute time).

``result_<analysis>_<part>`` — the rows of one part of a result (e.g. ``result_lrc_values``), keyed by
    ``result_id``; the other columns are the analysis' frame columns (documented in its module).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

import duckdb

from routelens.errors import StoreError
from routelens.records import RunInfo
from routelens.store.connection import session, transaction

__all__ = ["ResultInfo", "Result", "save_result", "load_result", "list_results", "table_name"]

CATALOG_DDL = """
CREATE TABLE IF NOT EXISTS analysis_results (
    result_id INTEGER PRIMARY KEY,
    analysis VARCHAR NOT NULL,
    run_ids INTEGER[] NOT NULL,
    run_uuids VARCHAR[] NOT NULL,
    params JSON,
    params_key VARCHAR NOT NULL,
    parts VARCHAR[] NOT NULL,
    created_at TIMESTAMP NOT NULL,
    routelens_version VARCHAR,
    seconds DOUBLE
);
"""


@dataclass
class ResultInfo:
    result_id: int
    analysis: str
    run_ids: tuple[int, ...]
    params: dict
    parts: tuple[str, ...]
    created_at: datetime
    seconds: float | None = None


@dataclass
class Result:
    """An analysis result: its catalogue entry and one polars frame per part."""

    info: ResultInfo
    frames: dict = field(default_factory=dict)

    def __getitem__(self, part: str):
        return self.frames[part]


def table_name(analysis: str, part: str) -> str:
    name = f"result_{analysis}_{part}".replace("-", "_")
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"bad result table name {name!r}")
    return name


def params_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str, separators=(",", ":"))


def _has_catalog(con) -> bool:
    return bool(con.sql("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'analysis_results' "
                        "AND database_name = current_database()").fetchall()[0][0])


def _columns(con, table: str) -> dict[str, str] | None:
    rows = con.sql("SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = ? "
                   "AND database_name = current_database()", params=[table]).fetchall()
    return {r[0]: r[1] for r in rows} if rows else None


def save_result(store, analysis: str, runs: list[RunInfo], params: dict, frames: dict, *,
                seconds: float | None = None) -> ResultInfo:
    """Store ``frames`` (part name -> polars DataFrame) as the result of ``analysis`` over ``runs`` with ``params``,
    replacing an earlier result with the same analysis, runs and parameters. Atomic."""
    from routelens import __version__

    store._check(write=True)
    key = params_key(params)
    run_ids = [r.run_id for r in runs]
    with session(store.path, read_only=False, timeout=None) as con, transaction(con):
        con.sql(CATALOG_DDL)
        old = con.sql("SELECT result_id, parts FROM analysis_results WHERE analysis = ? AND run_ids = ? AND "
                      "params_key = ?", params=[analysis, run_ids, key]).fetchall()
        for rid, parts in old:
            for part in parts:
                if _columns(con, table_name(analysis, part)) is not None:
                    con.sql(f"DELETE FROM {table_name(analysis, part)} WHERE result_id = ?", params=[rid])
            con.sql("DELETE FROM analysis_results WHERE result_id = ?", params=[rid])
        rid = con.sql("SELECT coalesce(max(result_id), 0) + 1 FROM analysis_results").fetchall()[0][0]
        for part, frame in frames.items():
            _insert(con, table_name(analysis, part), rid, frame)
        created = datetime.now(timezone.utc).replace(tzinfo=None)
        con.execute("INSERT INTO analysis_results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [rid, analysis, run_ids, [r.run_uuid for r in runs], json.dumps(params, default=str), key,
                     list(frames), created, __version__, seconds])
    return ResultInfo(rid, analysis, tuple(run_ids), params, tuple(frames), created, seconds)


def _insert(con: duckdb.DuckDBPyConnection, table: str, rid: int, frame) -> None:
    import polars as pl

    frame = frame.with_columns(pl.lit(rid, dtype=pl.Int32).alias("result_id")).select(
        ["result_id", *[c for c in frame.columns if c != "result_id"]])
    arrow = frame.to_arrow()
    con.register("_rl_result", arrow)
    try:
        existing = _columns(con, table)
        if existing is None:
            con.sql(f"CREATE TABLE {table} AS SELECT * FROM _rl_result")
            return
        incoming = _columns_of(con)
        for name, dtype in incoming.items():  # a newer version of the analysis may add columns
            if name not in existing:
                con.sql(f'ALTER TABLE {table} ADD COLUMN "{name}" {dtype}')
        con.sql(f"INSERT INTO {table} BY NAME SELECT * FROM _rl_result")
    finally:
        con.unregister("_rl_result")


def _columns_of(con) -> dict[str, str]:
    return {r[0]: r[1] for r in con.sql("DESCRIBE SELECT * FROM _rl_result").fetchall()}


def list_results(store, run: RunInfo | None = None):
    """The catalogue (polars), newest first; only results involving ``run`` when given."""
    import polars as pl

    with session(store.path, read_only=True) as con:
        if not _has_catalog(con):
            return pl.DataFrame(schema={"result_id": pl.Int32, "analysis": pl.Utf8, "run_ids": pl.List(pl.Int32),
                                        "params": pl.Utf8, "parts": pl.List(pl.Utf8), "created_at": pl.Datetime,
                                        "seconds": pl.Float64})
        where, params = ("WHERE list_contains(run_ids, ?)", [run.run_id]) if run is not None else ("", None)
        return con.sql("SELECT result_id, analysis, run_ids, params, parts, created_at, seconds FROM analysis_results "
                       f"{where} ORDER BY result_id DESC", params=params).pl()


def load_result(store, analysis: str, runs: list[RunInfo], params: dict | None = None, *,
                parts: list[str] | None = None) -> Result | None:
    """The newest stored result of ``analysis`` over ``runs`` (with exactly ``params`` when given), or None."""
    with session(store.path, read_only=True) as con:
        if not _has_catalog(con):
            return None
        sql = ("SELECT result_id, run_ids, params, parts, created_at, seconds FROM analysis_results "
               "WHERE analysis = ? AND run_ids = ?")
        args: list = [analysis, [r.run_id for r in runs]]
        if params is not None:
            sql += " AND params_key = ?"
            args.append(params_key(params))
        rows = con.sql(sql + " ORDER BY result_id DESC LIMIT 1", params=args).fetchall()
        if not rows:
            return None
        rid, run_ids, p, stored_parts, created, seconds = rows[0]
        info = ResultInfo(rid, analysis, tuple(run_ids), json.loads(p) if p else {}, tuple(stored_parts), created,
                          seconds)
        frames = {}
        for part in parts or stored_parts:
            if part not in stored_parts:
                raise StoreError(f"result {rid} of {analysis} has no part {part!r} (parts: {list(stored_parts)})")
            frames[part] = con.sql(f"SELECT * EXCLUDE (result_id) FROM {table_name(analysis, part)} "
                                   "WHERE result_id = ?", params=[rid]).pl()
        return Result(info, frames)
