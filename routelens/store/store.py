"""Store (open/create a store file, list and read runs) and RunHandle (one run's data as frames).

A Store object holds only the path: every call opens a short-lived connection (see connection.py), so
several processes can share one store file as long as each call is short.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa

from routelens.errors import StoreError
from routelens.records import RunInfo, RunMeta
from routelens.store import catalog, parquet_io
from routelens.store.connection import not_a_store_message, session, transaction, write_session
from routelens.store.schema import REQUIRED_TABLES, SCHEMA_VERSION, TABLES_DDL
from routelens.store.writer import RunWriter, WriterConfig

if TYPE_CHECKING:  # polars is imported where frames are made, so writing a trace never needs it
    import polars as pl

_FORMATS = ("polars", "pandas", "arrow")


def _routelens_version() -> str:
    try:
        from importlib.metadata import version

        return version("routelens")
    except Exception:  # running from a source tree that is not installed
        return "unknown"


def _has_schema(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.sql("SELECT table_name FROM duckdb_tables() WHERE database_name = "
                                  "current_database()").fetchall()}


def _check_schema(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    tables = _has_schema(con)
    if "meta" not in tables:
        raise StoreError(not_a_store_message(path, "a DuckDB file without the routelens schema"))
    rows = dict(con.sql("SELECT key, value FROM meta").fetchall())
    try:
        version = int(rows["schema_version"])
    except (KeyError, TypeError, ValueError):
        raise StoreError(not_a_store_message(path, "its meta table has no schema_version")) from None
    if version > SCHEMA_VERSION:
        raise StoreError(f"store schema v{version} is newer than this routelens (v{SCHEMA_VERSION}); "
                         "upgrade routelens")
    if version < SCHEMA_VERSION:
        raise StoreError(f"store schema v{version} is older than this routelens (v{SCHEMA_VERSION}) "
                         "and cannot be migrated; re-trace into a new store")
    missing = [t for t in REQUIRED_TABLES if t not in tables]
    if missing:
        raise StoreError(not_a_store_message(path, f"routelens schema incomplete, missing {missing}"))


def _fetch(rel, as_: str):
    if as_ == "polars":
        return rel.pl()
    if as_ == "pandas":
        return rel.df()
    return rel.to_arrow_table()


def _check_format(as_: str) -> None:
    if as_ not in _FORMATS:
        raise StoreError(f"as_={as_!r} is not a frame type; use one of {', '.join(_FORMATS)}")


class Store:
    """A routelens trace store (a DuckDB file). Create with :meth:`Store.open`."""

    def __init__(self, path: Path, read_only: bool, writer_config: WriterConfig | None):
        self.path = path
        self.read_only = read_only
        self.writer_config = writer_config
        self._closed = False

    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = True, read_only: bool = False,
             writer_config: WriterConfig | None = None) -> "Store":
        """Open the store at ``path``; a missing file is created with the schema when ``create``."""
        path = Path(path)
        if path.is_dir():
            raise StoreError(not_a_store_message(path, "it is a directory"))
        if not path.exists():
            if read_only or not create:
                raise StoreError(f"no store at {path}; trace a run into it first "
                                 f"(`routelens trace ... --db {path}`) or check the path")
            if not path.parent.is_dir():
                raise StoreError(f"cannot create store {path}: folder {path.parent} does not exist; "
                                 "create it first")
            with session(path, read_only=False, timeout=None) as con:
                if not _has_schema(con):  # another process may have created it meanwhile
                    with transaction(con):
                        con.sql(TABLES_DDL)
                        con.executemany("INSERT INTO meta VALUES (?, ?)", [
                            ["schema_version", str(SCHEMA_VERSION)],
                            ["created_by", f"routelens {_routelens_version()}"],
                            ["created_at", datetime.now(timezone.utc).isoformat()]])
                _check_schema(con, path)
        else:
            with session(path, read_only=True) as con:
                _check_schema(con, path)
        return cls(path, read_only, writer_config)

    # -- writing ----------------------------------------------------------------------------------

    def create_run(self, meta: RunMeta) -> RunWriter:
        """Register the run (status 'incomplete', committed now) and return its writer."""
        self._check(write=True)
        catalog.validate_meta(meta)
        info = catalog.new_info(meta)
        with write_session(self.path) as con, transaction(con):
            info.run_id = catalog.add_run_or_shard(con, info)
        return RunWriter(self.path, info, self.writer_config)

    def import_runs(self, *directories: str | os.PathLike) -> list[RunInfo]:
        """Import Parquet exports; the shards of one run_uuid become one run. Atomic per run."""
        self._check(write=True)
        return parquet_io.import_runs(self.path, [Path(d) for d in directories])

    # -- reading ----------------------------------------------------------------------------------

    def runs(self) -> list[RunInfo]:
        self._check()
        with session(self.path, read_only=True) as con:
            return catalog.read_runs(con)

    def run(self, ref: int | str) -> "RunHandle":
        """A run by run_id, name or run_uuid."""
        self._check()
        with session(self.path, read_only=True) as con:
            return RunHandle(self, catalog.resolve(con, ref, self.path))

    def sql(self, query: str, params: list | dict | None = None) -> pl.DataFrame:
        """Run a read-only query (``?`` or ``$name`` parameters) and return a polars DataFrame."""
        self._check()
        with session(self.path, read_only=True) as con:
            try:
                rel = con.sql(query, params=params)
                if rel is not None:
                    return rel.pl()
                import polars as pl

                return pl.DataFrame()
            except duckdb.Error as exc:
                first = str(exc).strip().splitlines()[0]
                raise StoreError(f"query failed: {first}; queries are read-only, see the schema in "
                                 "routelens/store/schema.py") from exc

    def export_run(self, ref: int | str, directory: str | os.PathLike) -> Path:
        """Write the run as Parquet (zstd) under ``directory``; returns its ``run_uuid=...`` folder."""
        info = self.run(ref).info
        return parquet_io.export_run(self.path, info, Path(directory))

    def close(self) -> None:
        """Forget the store. Writers already created keep working until they finish."""
        self._closed = True

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, read_only={self.read_only})"

    def _check(self, write: bool = False) -> None:
        if self._closed:
            raise StoreError(f"store {self.path} is closed; open it again with Store.open")
        if write and self.read_only:
            raise StoreError(f"store {self.path} was opened read-only; open it with read_only=False to write")


class RunHandle:
    """One run's data. ``info`` is a snapshot taken when the handle was made."""

    def __init__(self, store: Store, info: RunInfo):
        self.store = store
        self.info = info

    def __repr__(self) -> str:
        return f"RunHandle(run_id={self.info.run_id}, name={self.info.name!r}, status={self.info.status!r})"

    def _query(self, sql: str, as_: str):
        _check_format(as_)
        self.store._check()
        with session(self.store.path, read_only=True) as con:
            return _fetch(con.sql(sql, params={"run": self.info.run_id}), as_)

    def _layers(self, layers: int | Iterable[int] | None) -> list[int] | None:
        if layers is None:
            return None
        wanted = [int(layers)] if isinstance(layers, (int, np.integer)) else [int(x) for x in layers]
        unknown = sorted(set(wanted) - set(self.info.moe_layers))
        if unknown:
            raise StoreError(f"layer {unknown} is not a traced MoE layer of run {self.info.run_id} "
                             f"(MoE layers: {list(self.info.moe_layers)}); layers are decoder-layer indices")
        return wanted

    def routing(self, layers: int | Iterable[int] | None = None, *, as_: str = "polars"):
        """Tidy decisions (run_id, seq_id, pos, layer, rank, expert, weight), by seq_id, pos, layer, rank."""
        wanted = self._layers(layers)
        where = "" if wanted is None else f" AND layer IN ({', '.join(map(str, wanted))})"
        return self._query("SELECT run_id, seq_id, pos, layer, rank, expert, weight FROM routing "
                           f"WHERE run_id = $run{where} ORDER BY seq_id, pos, layer, rank", as_)

    def tokens(self, as_: str = "polars"):
        return self._query("SELECT run_id, seq_id, pos, token_id, token, generated FROM tokens "
                           "WHERE run_id = $run ORDER BY seq_id, pos", as_)

    def sequences(self, as_: str = "polars"):
        return self._query("SELECT run_id, seq_id, n_tokens, text, label, lang, align_id, source_line, meta "
                           "FROM sequences WHERE run_id = $run ORDER BY seq_id", as_)

    def expert_stats(self, as_: str = "polars"):
        return self._query("SELECT * FROM expert_stats WHERE run_id = $run ORDER BY layer, expert", as_)

    def residual(self, as_: str = "polars"):
        return self._query("SELECT run_id, seq_id, pos, layer, value, channel FROM residual_max "
                           "WHERE run_id = $run ORDER BY seq_id, pos, layer", as_)

    def logits(self, layer: int) -> tuple[pl.DataFrame, np.ndarray]:
        """Raw router logits of one MoE layer: (frame of seq_id, pos) and float16 [N, num_experts].

        Rows are ordered by seq_id, pos. Reads the spans of ``router_logits_data`` and cuts them with
        numpy (not through the per-token ``router_logits`` view).
        """
        (layer,) = self._layers(layer)
        self.store._check()
        with session(self.store.path, read_only=True) as con:
            con.sql("SET arrow_large_buffer_size = true")  # a layer's BLOBs may pass 2 GiB
            table: pa.Table = con.sql(
                "SELECT seq_id, pos_start, n, logits FROM router_logits_data "
                "WHERE run_id = $run AND layer = $layer ORDER BY seq_id, pos_start",
                params={"run": self.info.run_id, "layer": layer}).to_arrow_table()
        if table.num_rows == 0 and not self.has_logits():
            raise StoreError(f"run {self.info.run_id} has no router logits; "
                             "trace it again with router logits enabled")
        import polars as pl

        seq, pos, values = decode_logit_spans(table, self.info.num_experts)
        return pl.DataFrame({"seq_id": seq, "pos": pos}), values

    def has_logits(self) -> bool:
        return bool(self._query("SELECT count(*) > 0 AS x FROM (SELECT 1 FROM router_logits_data "
                                "WHERE run_id = $run LIMIT 1)", "arrow").column("x")[0].as_py())


def decode_logit_spans(table: pa.Table, num_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spans (seq_id, pos_start, n, logits BLOB of n x E '<f2') -> per-token seq_id int64 [N],
    pos int32 [N] and float16 [N, E], in the table's row order; one copy of the logits."""
    width = 2 * num_experts
    n = table.column("n").to_numpy().astype(np.int64)
    total = int(n.sum())
    out = np.empty(total * width, np.uint8)
    at = row = 0
    for chunk in table.column("logits").chunks:  # a chunk's BLOBs lie back to back in one buffer
        k = len(chunk)
        if k == 0:
            continue
        offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(chunk.buffers()[1], offset_type)[chunk.offset: chunk.offset + k + 1]
        if not np.array_equal(np.diff(offsets), n[row:row + k] * width):
            raise StoreError(f"router logits spans do not hold n x {num_experts} float16 values each; "
                             "the store is damaged, re-trace the run")
        size = int(offsets[-1] - offsets[0])
        out[at:at + size] = np.frombuffer(chunk.buffers()[2], np.uint8, count=size, offset=int(offsets[0]))
        at, row = at + size, row + k
    seq = np.repeat(table.column("seq_id").to_numpy().astype(np.int64), n)
    first = np.cumsum(n) - n  # index of each span's first token
    pos = (np.arange(total, dtype=np.int64)
           + np.repeat(table.column("pos_start").to_numpy().astype(np.int64) - first, n)).astype(np.int32)
    return seq, pos, out.view("<f2").reshape(total, num_experts).astype(np.float16, copy=False)
