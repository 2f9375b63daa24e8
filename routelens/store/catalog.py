"""The `runs` table: RunMeta/RunInfo <-> rows, run lookup, and the shard bookkeeping shared by the
writer (several shards traced into one file) and the importer (shard exports merged into one run)."""
from __future__ import annotations

import json
import uuid
from dataclasses import fields
from datetime import datetime, timezone

import duckdb

from routelens.errors import StoreError
from routelens.records import RunInfo, RunMeta
from routelens.store.encode import MAX_EXPERTS
from routelens.store.schema import RUN_COLUMNS

# Fields that must agree between the shards of one run: they define the model and the routing
# geometry. Versions, names, tags and input files may legitimately differ per node.
IDENTITY_FIELDS = ("model", "architecture", "family", "config_hash", "num_experts", "top_k",
                   "moe_layers", "num_layers", "dtype", "num_shards")


def utc_naive(ts: datetime | None) -> datetime:
    """Timestamps are stored as naive UTC; naive inputs are taken to be UTC already."""
    if ts is None:
        return datetime.now(timezone.utc).replace(tzinfo=None)
    return ts.astimezone(timezone.utc).replace(tzinfo=None) if ts.tzinfo else ts


def _aware(ts: datetime | None) -> datetime | None:
    return None if ts is None else ts.replace(tzinfo=timezone.utc)


def validate_meta(meta: RunMeta) -> None:
    def bad(what: str) -> StoreError:
        return StoreError(f"RunMeta rejected: {what}; fix the tracer's run metadata")

    if not 1 <= meta.num_experts <= MAX_EXPERTS:
        raise bad(f"num_experts={meta.num_experts} must be between 1 and {MAX_EXPERTS}")
    if not 1 <= meta.top_k <= meta.num_experts:
        raise bad(f"top_k={meta.top_k} must be between 1 and num_experts={meta.num_experts}")
    layers = [int(x) for x in meta.moe_layers]
    if not layers or layers != sorted(set(layers)) or layers[0] < 0:
        raise bad(f"moe_layers {tuple(layers)} must be a non-empty ascending tuple of layer indices")
    if not 0 <= meta.shard < meta.num_shards:
        raise bad(f"shard={meta.shard} must be in 0..num_shards-1 (num_shards={meta.num_shards})")


def new_info(meta: RunMeta) -> RunInfo:
    """A RunInfo for a run about to be written: uuid and created_at filled, status incomplete."""
    values = {f.name: getattr(meta, f.name) for f in fields(RunMeta)}
    values["run_uuid"] = meta.run_uuid or str(uuid.uuid4())
    values["created_at"] = utc_naive(meta.created_at)
    values["moe_layers"] = tuple(int(x) for x in meta.moe_layers)
    values["tags"] = tuple(meta.tags)
    return RunInfo(**values, status="incomplete", shards=(meta.shard,))


def info_to_row(info: RunInfo, shards_complete: tuple[int, ...] = ()) -> dict:
    row = {c: getattr(info, c) for c in RUN_COLUMNS if c != "shards_complete"}
    row.update(
        moe_layers=list(info.moe_layers), tags=list(info.tags), shards=sorted(info.shards),
        shards_complete=sorted(shards_complete), params=json.dumps(info.params, default=str),
        steering=None if info.steering is None else json.dumps(info.steering, default=str),
        created_at=utc_naive(info.created_at),
        finished_at=None if info.finished_at is None else utc_naive(info.finished_at),
    )
    return row


def row_to_info(row: dict) -> RunInfo:
    values = {k: row[k] for k in RUN_COLUMNS if k not in ("shards_complete",)}
    values.update(
        moe_layers=tuple(row["moe_layers"]), tags=tuple(row["tags"] or ()), shards=tuple(row["shards"]),
        params=json.loads(row["params"]) if row["params"] else {},
        steering=json.loads(row["steering"]) if row["steering"] else None,
        created_at=_aware(row["created_at"]), finished_at=_aware(row["finished_at"]),
    )
    return RunInfo(**values)


def _select(con: duckdb.DuckDBPyConnection, where: str = "", params: list | None = None) -> list[dict]:
    rel = con.sql(f"SELECT {', '.join(RUN_COLUMNS)} FROM runs {where} ORDER BY run_id", params=params)
    return [dict(zip(RUN_COLUMNS, r)) for r in rel.fetchall()]


def read_runs(con: duckdb.DuckDBPyConnection) -> list[RunInfo]:
    return [row_to_info(r) for r in _select(con)]


def read_run_row(con: duckdb.DuckDBPyConnection, run_id: int) -> dict:
    rows = _select(con, "WHERE run_id = ?", [run_id])
    if not rows:
        raise StoreError(f"run {run_id} vanished from the store while it was being written; "
                         "was the store file replaced?")
    return rows[0]


def resolve(con: duckdb.DuckDBPyConnection, ref: int | str, path) -> RunInfo:
    """run_id, name or run_uuid -> RunInfo; one-line StoreError when missing or ambiguous."""
    hint = f"list the runs with `routelens runs --db {path}`"
    if isinstance(ref, bool) or not isinstance(ref, (int, str)):
        raise StoreError(f"run reference {ref!r} must be a run_id, name or run_uuid; {hint}")
    if isinstance(ref, int):
        rows = _select(con, "WHERE run_id = ?", [ref])
    else:
        rows = _select(con, "WHERE name = ?", [ref]) or _select(con, "WHERE run_uuid = ?", [ref])
        if not rows and ref.strip().isdigit():
            rows = _select(con, "WHERE run_id = ?", [int(ref)])
    if not rows:
        raise StoreError(f"no run {ref!r} in {path}; {hint}")
    if len(rows) > 1:
        ids = ", ".join(str(r["run_id"]) for r in rows)
        raise StoreError(f"run name {ref!r} matches runs {ids} in {path}; pass a run_id or run_uuid instead")
    return row_to_info(rows[0])


def check_same_run(existing: RunInfo, incoming: RunInfo, what: str) -> None:
    def norm(v):
        return tuple(v) if isinstance(v, (list, tuple)) else v

    for f in IDENTITY_FIELDS:
        a, b = getattr(existing, f), getattr(incoming, f)
        if norm(a) != norm(b):
            raise StoreError(f"{what} of run {incoming.run_uuid} disagree on {f} ({a!r} vs {b!r}); "
                             "they are not shards of one run — give them different run_uuids")


def add_run_or_shard(con: duckdb.DuckDBPyConnection, info: RunInfo,
                     shards_complete: tuple[int, ...] = ()) -> int:
    """Insert the run, or add ``info.shards`` to the existing run with the same run_uuid.

    Returns the run_id. Call inside a transaction: the caller commits.
    """
    rows = _select(con, "WHERE run_uuid = ?", [info.run_uuid])
    if rows:
        existing = row_to_info(rows[0])
        check_same_run(existing, info, "this store and the new shard")
        overlap = sorted(set(existing.shards) & set(info.shards))
        if overlap:
            raise StoreError(
                f"shard {overlap} of run {info.run_uuid} is already in this store (run_id "
                f"{existing.run_id}); trace it under a new run_uuid or into a new store")
        shards = sorted(set(existing.shards) | set(info.shards))
        complete = sorted(set(rows[0]["shards_complete"]) | set(shards_complete))
        con.sql("UPDATE runs SET shards = ?, shards_complete = ?, shard = ?, status = ? WHERE run_id = ?",
                params=[shards, complete, shards[0] if len(shards) == 1 else -1,
                        run_status(complete, existing.num_shards), existing.run_id])
        return existing.run_id
    run_id = con.sql("SELECT coalesce(max(run_id), 0) + 1 FROM runs").fetchall()[0][0]
    info.run_id = run_id
    info.shard = info.shards[0] if len(info.shards) == 1 else -1
    info.status = run_status(shards_complete, info.num_shards)
    row = info_to_row(info, shards_complete)
    con.sql(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
            params=list(row.values()))
    return run_id


def run_status(shards_complete, num_shards: int) -> str:
    return "complete" if set(shards_complete) >= set(range(num_shards)) else "incomplete"
