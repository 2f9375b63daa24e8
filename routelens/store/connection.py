"""Short-lived DuckDB connections that wait out the single-writer file lock.

DuckDB lets one process hold a file read-write, or any number of processes hold it read-only, never
both; inside one process a read-only and a read-write connection to the same file also exclude each
other. The store therefore never keeps a connection open between operations: every operation
connects, works, and closes, and :func:`connect` retries the lock conflict with backoff so that a
dashboard reading while a tracer writes sees a short wait instead of DuckDB's lock error. The run writer's
writes (:func:`write_session`) attach the file to one in-memory DuckDB instance per process and detach it
afterwards instead: the same lock, released the same way, without starting an instance per write.
"""
from __future__ import annotations

import atexit
import ctypes
import itertools
import os
import random
import re
import threading
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


def _retry_lock(path: Path, timeout: float | None, open_once):
    """Call ``open_once()`` until it stops failing with a lock conflict (with backoff and jitter) and return its
    result; StoreError when the wait exceeds ``timeout`` or the file is not a DuckDB database."""
    deadline = None if timeout is None else time.monotonic() + timeout
    wait = _FIRST_WAIT_S
    while True:
        try:
            return open_once()
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
        # Jitter keeps several waiting readers from retrying in lockstep with the writer.
        time.sleep(wait * random.uniform(0.5, 1.5))
        wait = min(wait * 1.6, _MAX_WAIT_S)


def connect(path: str | os.PathLike, read_only: bool, *, timeout: float | None = READ_TIMEOUT_S
            ) -> duckdb.DuckDBPyConnection:
    """Open ``path``, retrying while another process (or connection mode) holds its lock.

    ``timeout=None`` waits forever: the background writer uses it because it can buffer meanwhile.
    Raises StoreError when the wait exceeds ``timeout`` or the file is not a DuckDB database.
    """
    path = Path(path)
    con = _retry_lock(path, timeout, lambda: duckdb.connect(str(path), read_only=read_only))
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


# -- the run writer's sessions: the store ATTACHed to one in-memory DuckDB instance per process ----------------

_host: duckdb.DuckDBPyConnection | None = None
_host_lock = threading.Lock()
_aliases = itertools.count()


def _forget_host() -> None:
    # A forked child must not use its parent's DuckDB instance (its threads are gone), nor shut it down (that
    # would wait for them): it keeps the object unused and makes its own instance when it writes. Unused means
    # never destroyed either, also not when the interpreter clears the modules at the child's exit: the
    # destructor joins the parent's threads and the child dies of SIGSEGV/SIGABRT. One reference is never dropped.
    global _host, _host_lock
    if _host is not None:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(_host))
    _host, _host_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, where processes are spawned, never forked
    os.register_at_fork(after_in_child=_forget_host)


@atexit.register
def _close_host() -> None:  # a clean shutdown of the instance (else nanobind reports it leaked at exit)
    global _host
    with _host_lock:
        if _host is not None:
            try:
                _host.close()
            except duckdb.Error:
                pass
            _host = None


def _writer_host() -> duckdb.DuckDBPyConnection:
    global _host
    with _host_lock:
        if _host is None:
            host = duckdb.connect(":memory:")
            # As in connect(): a checkpoint never vacuums (see there).
            host.sql("SET GLOBAL max_vacuum_tasks = 0")
            # Every COMMIT checkpoints at once instead of appending its rows to the WAL: each row is written to the
            # file once (not to the WAL at COMMIT and again by the checkpoint of the DETACH, which then has nothing
            # left to do). For a flush of logits that halves the bytes written. A checkpoint is atomic: a crash
            # mid-way leaves the file as of the previous commit.
            host.sql("SET GLOBAL checkpoint_threshold = '0KB'")
            host.sql("SET GLOBAL auto_checkpoint_skip_wal_threshold = 0")
            _host = host
        return _host


@contextmanager
def write_session(path: str | os.PathLike, *, timeout: float | None = None
                  ) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-write connection to the store for one write of the run writer, waiting out the lock like connect().

    The file is ATTACHed to a DuckDB instance kept for the process and DETACHed on exit, which checkpoints and
    releases the file lock like closing a connection does, but costs ~2 ms instead of the ~20 ms of starting
    and shutting down a DuckDB instance (what connect() and close() do). Unqualified names resolve in the
    store (``USE``), so statements read as with connect(). Inside this process the attached file excludes
    other connections to it exactly like an open connection does (they wait and retry). A transaction left
    open by the caller is rolled back before the DETACH, so the file is always released.
    """
    path = Path(path)
    cur = _writer_host().cursor()
    alias = f"rl_store_{next(_aliases)}"
    quoted = "'" + str(path).replace("'", "''") + "'"
    try:
        _retry_lock(path, timeout, lambda: cur.sql(f"ATTACH {quoted} AS {alias}"))
        try:
            cur.sql(f"USE {alias}; SET enable_progress_bar = false")
            yield cur
        finally:
            try:
                cur.sql(f"USE memory; DETACH {alias}")
            except duckdb.Error:  # e.g. a transaction still open after an error: end it, then detach
                try:
                    cur.sql("ROLLBACK")
                except duckdb.Error:
                    pass
                cur.sql(f"USE memory; DETACH {alias}")
    finally:
        cur.close()
