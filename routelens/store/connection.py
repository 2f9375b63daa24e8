"""Short-lived DuckDB connections that wait out the single-writer file lock.

DuckDB lets one process hold a file read-write, or any number of processes hold it read-only, never
both; inside one process a read-only and a read-write connection to the same file also exclude each
other. The store therefore never keeps a connection open between operations: every operation
connects, works, and closes, and :func:`connect` retries the lock conflict with backoff so that a
dashboard reading while a tracer writes sees a short wait instead of DuckDB's lock error.
"""
from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from routelens.errors import StoreError

READ_TIMEOUT_S = 60.0
_FIRST_WAIT_S = 0.005
_MAX_WAIT_S = 0.2

_NOT_DUCKDB = "not a valid DuckDB database file"


def is_lock_conflict(exc: BaseException) -> bool:
    """True for the errors DuckDB raises while another connection holds the file in the other mode."""
    text = str(exc)
    if isinstance(exc, duckdb.IOException):
        return "Could not set lock" in text or "Conflicting lock" in text
    if isinstance(exc, duckdb.ConnectionException):
        return "different configuration" in text
    # Another thread of this process is closing or opening the same file's database instance.
    return isinstance(exc, duckdb.Error) and "Unique file handle conflict" in text


def not_a_store_message(path: str | os.PathLike, why: str) -> str:
    return (f"{path} is not a routelens store ({why}); "
            "pass a new path or a store made by `routelens trace`")


def connect(path: str | os.PathLike, read_only: bool, *, timeout: float | None = READ_TIMEOUT_S
            ) -> duckdb.DuckDBPyConnection:
    """Open ``path``, retrying while another process (or connection mode) holds its lock.

    ``timeout=None`` waits forever: the background writer uses it because it can buffer meanwhile.
    Raises StoreError when the wait exceeds ``timeout`` or the file is not a DuckDB database.
    """
    path = Path(path)
    deadline = None if timeout is None else time.monotonic() + timeout
    wait = _FIRST_WAIT_S
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as exc:
            if _NOT_DUCKDB in str(exc):
                raise StoreError(not_a_store_message(path, "not a DuckDB file")) from None
            if not is_lock_conflict(exc):
                first = str(exc).splitlines()[0]
                raise StoreError(f"cannot open store {path}: {first}") from exc
            if deadline is not None and time.monotonic() >= deadline:
                holder = re.search(r"PID (\d+)", str(exc))
                who = f"process {holder.group(1)}" if holder else "another connection"
                raise StoreError(
                    f"store {path} stayed locked by {who} for {timeout:.0f} s; "
                    "wait for that trace or query to finish and retry") from None
        else:
            # A library must not draw DuckDB's progress bar on the user's terminal (exports, imports).
            con.sql("SET enable_progress_bar = false")
            if not read_only:
                # Every close checkpoints, and by default a checkpoint "vacuums": it merges partly filled
                # row groups (each writer flush leaves one per table) by rewriting them. For the router
                # logits BLOBs that rewrote up to ~0.5 GB per flush, and at finish() most of the run,
                # leaving the old blocks free in the file (1.8x its size). The store never deletes rows
                # in bulk, so vacuuming has nothing else to reclaim. benchmarks/results/store_ingest.md
                con.sql("SET max_vacuum_tasks = 0")
            return con
        # Jitter keeps several waiting readers from retrying in lockstep with the writer.
        time.sleep(wait * random.uniform(0.5, 1.5))
        wait = min(wait * 1.6, _MAX_WAIT_S)


@contextmanager
def session(path: str | os.PathLike, read_only: bool, *, timeout: float | None = READ_TIMEOUT_S
            ) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection for one operation, closed on exit (releasing the file lock)."""
    con = connect(path, read_only, timeout=timeout)
    try:
        yield con
    finally:
        con.close()


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN ... COMMIT, rolled back on any exception so a failed write leaves nothing behind."""
    con.sql("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.sql("ROLLBACK")
        raise
    con.sql("COMMIT")
