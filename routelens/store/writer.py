"""RunWriter: hands TokenBlocks to a background thread that flushes them in short write transactions.

Why a thread: the tracer must never wait on the disk. Why short transactions: DuckDB's file lock is
exclusive, so the writer connects only to flush (about once a second, or every ``flush_decisions``
decisions) and closes right after the COMMIT; a dashboard in another process reads in between.
Each flush is one transaction, so a crash or SIGKILL loses at most the flush in progress and the run
stays 'incomplete' (its status is only set by :meth:`RunWriter.finish`).
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa

from routelens.errors import StoreError
from routelens.records import ExpertStat, RunInfo, SequenceRecord, TokenBlock
from routelens.store import catalog
from routelens.store.connection import session, transaction
from routelens.store.encode import (EncodedBatch, block_nbytes, encode_blocks, expert_stats_table,
                                    sequences_table, validate_block, vocab_table)


@dataclass(frozen=True)
class WriterConfig:
    flush_interval_s: float = 1.0  # upper bound on how stale the store is behind the tracer
    flush_decisions: int = 32_000_000  # ~1 s of inserting; bigger flushes amortise connect/commit
    max_pending_bytes: int = 1 << 30  # queued + buffered host memory before add_block waits


class _ByteBudget:
    """Bounds the memory pinned by queued blocks; the producer waits only when it is exhausted."""

    def __init__(self, limit: int):
        self._limit, self._used = limit, 0
        self._cond = threading.Condition()
        self.broken = False  # set when the writer died: never block the producer again

    def acquire(self, n: int) -> None:
        with self._cond:
            # An oversize item is admitted alone, otherwise it could never enter.
            while not self.broken and self._used > 0 and self._used + n > self._limit:
                self._cond.wait()
            self._used += n

    def release(self, n: int) -> None:
        with self._cond:
            self._used -= n
            self._cond.notify_all()

    def break_(self) -> None:
        with self._cond:
            self.broken = True
            self._cond.notify_all()


_STOP = object()


class RunWriter:
    """Writes one run (one shard of it). Use as a context manager or call :meth:`finish`.

    The writer takes ownership of the arrays handed to it: do not modify them afterwards.
    """

    def __init__(self, path: Path, info: RunInfo, config: WriterConfig | None = None):
        self.path = path
        self.run_id: int = info.run_id
        self._info = info
        self._config = config or WriterConfig()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._budget = _ByteBudget(self._config.max_pending_bytes)
        self._error: BaseException | None = None
        self._finished: RunInfo | None = None
        self._thread = threading.Thread(target=self._loop, name=f"routelens-writer-run{self.run_id}",
                                        daemon=True)
        self._thread.start()

    # -- producer side (tracer thread) ------------------------------------------------------------

    def add_sequences(self, seqs: list[SequenceRecord]) -> None:
        if seqs:
            self._put("sequences", list(seqs), 256 * len(seqs) + sum(len(s.text or "") for s in seqs))

    def add_block(self, block: TokenBlock) -> None:
        """Queue a block; returns at once unless ``max_pending_bytes`` are already waiting."""
        self._check_open()
        validate_block(block, top_k=self._info.top_k, num_experts=self._info.num_experts,
                       moe_layers=self._info.moe_layers)
        self._put("block", block, block_nbytes(block))

    def add_vocabulary(self, texts: Mapping[int, str]) -> None:
        """Text of the token ids this run used ({token_id: text}); fills the ``token`` column of ``tokens``.

        May be called more than once; an id already recorded for this run keeps its first text.
        """
        if texts:
            texts = {int(k): str(v) for k, v in texts.items()}
            self._put("vocab", texts, 64 * len(texts) + sum(len(v) for v in texts.values()))

    def add_expert_stats(self, stats: list[ExpertStat]) -> None:
        """Per-expert extremes of this shard; call once, at the end of the trace."""
        if stats:
            self._put("stats", list(stats), 128 * len(stats))

    def finish(self, status: str = "complete") -> RunInfo:
        """Flush everything, then record this shard as finished (status 'complete') or not."""
        if self._finished is not None:
            return self._finished
        if status not in ("complete", "incomplete"):
            raise StoreError(f"finish(status={status!r}): status must be 'complete' or 'incomplete'")
        self._queue.put((_STOP, None, 0))
        self._thread.join()
        if self._error is not None:
            self._finished = self._info
            raise StoreError(f"writing run {self.run_id} to {self.path} failed "
                             f"({_one_line(self._error)}); the run stays 'incomplete'") from self._error
        with session(self.path, read_only=False, timeout=None) as con, transaction(con):
            self._finalise(con, status)
            self._finished = catalog.row_to_info(catalog.read_run_row(con, self.run_id))
        return self._finished

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finish()
        elif self._finished is None:
            try:  # keep what was handed over, but never report the run complete
                self.finish("incomplete")
            except StoreError:
                pass  # the original exception is the one worth seeing
        return False

    def _check_open(self) -> None:
        if self._finished is not None:
            raise StoreError(f"run {self.run_id} is already finished; start a new run with create_run")
        if self._error is not None:
            raise StoreError(f"writing run {self.run_id} to {self.path} failed "
                             f"({_one_line(self._error)}); the run stays 'incomplete'") from self._error

    def _put(self, kind: str, item, nbytes: int) -> None:
        self._check_open()
        self._budget.acquire(nbytes)
        self._queue.put((kind, item, nbytes))

    # -- background thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        cfg = self._config
        pending: list[tuple[str, object, int]] = []
        decisions = held_bytes = 0
        deadline = None
        # One insert runs on the inserter thread while this thread encodes the next flush: DuckDB's
        # INSERT is mostly single-threaded, so on 2 cores the numpy encoding comes for free.
        inserter = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"routelens-insert-run{self.run_id}")
        inflight: tuple[Future, int] | None = None

        def settle() -> None:
            nonlocal inflight
            if inflight is None:
                return
            future, nbytes = inflight
            inflight = None
            try:
                future.result()
            except BaseException as exc:  # surfaced to the producer on its next call
                self._fail(exc)
            self._budget.release(nbytes)

        try:
            while True:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    kind, item, nbytes = self._queue.get(timeout=timeout)
                except queue.Empty:
                    kind, item, nbytes = None, None, 0
                if kind is not None and kind is not _STOP:
                    pending.append((kind, item, nbytes))
                    held_bytes += nbytes
                    if kind == "block":
                        decisions += int(item.experts.size)
                    if deadline is None:
                        deadline = time.monotonic() + cfg.flush_interval_s
                due = (kind is None or kind is _STOP or decisions >= cfg.flush_decisions
                       or held_bytes >= cfg.max_pending_bytes // 2
                       or (deadline is not None and time.monotonic() >= deadline))
                if due and pending:
                    encoded = None
                    if self._error is None:
                        try:
                            encoded = self._encode(pending)
                        except BaseException as exc:
                            self._fail(exc)
                    settle()  # at most one flush in flight: keeps memory bounded and commits ordered
                    if encoded is not None and self._error is None:
                        inflight = (inserter.submit(self._write, *encoded), held_bytes)
                    else:
                        self._budget.release(held_bytes)
                    pending, decisions, held_bytes, deadline = [], 0, 0, None
                if kind is _STOP:
                    settle()
                    return
        finally:
            inserter.shutdown(wait=True)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._budget.break_()

    def _encode(self, items: list[tuple[str, object, int]]):
        blocks = [it for kind, it, _ in items if kind == "block"]
        seqs = [s for kind, it, _ in items if kind == "sequences" for s in it]
        stats = [s for kind, it, _ in items if kind == "stats" for s in it]
        vocab: dict[int, str] = {}
        for kind, it, _ in items:
            if kind == "vocab":
                vocab = {**it, **vocab}  # the first text given for an id wins
        # Encoding happens before connecting so the file lock is held only for the INSERTs.
        return (encode_blocks(blocks), sequences_table(seqs) if seqs else None,
                expert_stats_table(stats) if stats else None, vocab_table(vocab) if vocab else None)

    def _write(self, batch: EncodedBatch, seq_tbl: pa.Table | None, stats_tbl: pa.Table | None,
               vocab_tbl: pa.Table | None) -> None:
        """One flush = one transaction on a fresh connection, closed right after the COMMIT."""
        with session(self.path, read_only=False, timeout=None) as con, transaction(con):
            insert_batch(con, self.run_id, batch)
            if seq_tbl is not None:
                insert_arrow(con, "sequences", self.run_id, seq_tbl)
            if stats_tbl is not None:
                insert_arrow(con, "expert_stats", self.run_id, stats_tbl)
            if vocab_tbl is not None:
                insert_vocab(con, self.run_id, vocab_tbl)
            con.sql("UPDATE runs SET n_sequences = n_sequences + ?, n_tokens = n_tokens + ?, "
                    "n_decisions = n_decisions + ? WHERE run_id = ?",
                    params=[0 if seq_tbl is None else seq_tbl.num_rows, batch.n_tokens, batch.n_decisions,
                            self.run_id])

    def _finalise(self, con: duckdb.DuckDBPyConnection, status: str) -> None:
        # The token rows are the truth about sequence length (truncation, generation).
        con.sql("""UPDATE sequences SET n_tokens = t.n
                   FROM (SELECT seq_id, count(*)::INTEGER AS n FROM token_data WHERE run_id = $run
                         GROUP BY seq_id) AS t
                   WHERE sequences.run_id = $run AND sequences.seq_id = t.seq_id""",
                params={"run": self.run_id})
        row = catalog.read_run_row(con, self.run_id)
        complete = set(row["shards_complete"])
        if status == "complete":
            complete.add(self._info.shard)
        con.sql("UPDATE runs SET shards_complete = ?, status = ?, finished_at = ? WHERE run_id = ?",
                params=[sorted(complete), catalog.run_status(complete, row["num_shards"]),
                        datetime.now(timezone.utc).replace(tzinfo=None), self.run_id])


def insert_arrow(con: duckdb.DuckDBPyConnection, table: str, run_id: int, data: pa.Table) -> None:
    """INSERT the Arrow table's columns (by name) plus run_id into ``table``."""
    name = f"rl_batch_{table}"
    con.register(name, data)
    try:
        cols = ", ".join(data.column_names)
        con.sql(f"INSERT INTO {table} (run_id, {cols}) SELECT {int(run_id)}, {cols} FROM {name}")
    finally:
        con.unregister(name)


def insert_vocab(con: duckdb.DuckDBPyConnection, run_id: int, data: pa.Table) -> None:
    """Add token texts, skipping ids the run already has (the tokens view joins on run_id, token_id)."""
    con.register("rl_batch_vocab", data)
    try:
        con.sql(f"""INSERT INTO vocab (run_id, token_id, token)
                    SELECT {int(run_id)}, token_id, token FROM rl_batch_vocab
                    WHERE token_id NOT IN (SELECT token_id FROM vocab WHERE run_id = {int(run_id)})""")
    finally:
        con.unregister("rl_batch_vocab")


def insert_batch(con: duckdb.DuckDBPyConnection, run_id: int, batch: EncodedBatch) -> None:
    for table, data in (("routing_data", batch.routing), ("token_data", batch.tokens),
                        ("router_logits_data", batch.logits), ("residual_max", batch.residual)):
        if data is not None and data.num_rows:
            insert_arrow(con, table, run_id, data)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


