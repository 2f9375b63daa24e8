"""RunWriter: hands TokenBlocks to a background thread that writes them in short write transactions.

Why a thread: the tracer must never wait on the disk. Why short transactions: DuckDB's file lock is
exclusive, so the writer holds the file only to flush and releases it right after the COMMIT (and keeps it
released at least ``reader_gap_s`` before the next flush); a dashboard in another process reads in between.
Each flush is one transaction, so a crash or SIGKILL loses at most the flush in progress and the run
stays 'incomplete' (its status is only set by :meth:`RunWriter.finish`, in the same transaction as the
last rows, so no run is ever marked complete without all of them).

When flushes happen: as soon as the previous flush is done once a few row groups' worth of rows are pending
(``eager_rows``), so that at the end of a trace little is left to write; smaller amounts (decode steps,
small batches) wait up to ``flush_interval_s`` so that the table does not fill with small row groups.
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
import numpy as np
import pyarrow as pa

from routelens.errors import StoreError
from routelens.records import ExpertStat, RunInfo, SequenceRecord, TokenBlock
from routelens.store import catalog
from routelens.store.connection import write_session
from routelens.store.encode import (EncodedBatch, block_nbytes, encode_blocks, expert_stats_table,
                                    merge_encoded, sequences_table, validate_block, vocab_table)


@dataclass(frozen=True)
class WriterConfig:
    flush_interval_s: float = 1.0  # upper bound on how stale the store is behind the tracer
    flush_decisions: int = 32_000_000  # flush at once (when the previous flush is done) from this many decisions
    max_pending_bytes: int = 1 << 30  # queued + buffered host memory before add_block waits
    # Token-layer rows (routing_data rows) from which a flush starts as soon as the previous one is done instead
    # of waiting for flush_interval_s; 0 = never early. Two DuckDB row groups (122,880 rows each): a 16k-token
    # OLMoE forward (16 layers, 262k rows) is flushed as soon as it arrives, so that at the end of a trace only
    # the last forward is left to write (on an H100 this cut the end-of-run tail from ~105 to ~90 ms and lifted
    # whole-run top-k throughput from 0.964 to 0.973). The price: each flush leaves one partly filled row group
    # per table (a flush per forward made the routing ~5 % bigger than a flush per four row groups).
    eager_rows: int = 2 * 122_880
    reader_gap_s: float = 0.05  # least time the file stays unlocked between two flushes, for readers


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
_DONE = object()  # the in-flight flush finished (put by its future's callback)


class _Pending:
    """What the writer thread holds for the next flush. Blocks are encoded early, in groups of at least
    ``eager_rows`` rows, while the previous flush is inserting; the rest at flush time."""

    def __init__(self) -> None:
        self.raw: list[TokenBlock] = []
        self.raw_rows = 0
        self.encoded: list[EncodedBatch] = []
        self.extras: list[tuple[str, object]] = []
        self.rows = self.decisions = self.nbytes = 0
        self.since: float | None = None

    def __bool__(self) -> bool:
        return bool(self.raw or self.encoded or self.extras)


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
        self._final: RunInfo | None = None  # set by the writer thread's last transaction
        # Rows per sequence of every block written, so finish() sets sequences.n_tokens without a scan of
        # token_data; and whether sequences went out before the last flush (they then need an UPDATE).
        self._token_counts: dict[int, int] = {}
        self._sequences_written = False
        self._released_at = float("-inf")  # when the last flush released the file (monotonic)
        # finish() while a flush is inserting, with nothing else queued: that flush records the final status in
        # its own transaction (one COMMIT and release fewer at the end). The lock orders the check against the
        # writer thread taking items off the queue.
        self._lock = threading.Lock()
        self._n_put = self._n_taken = 0
        self._pending = _Pending()
        self._stop_status: str | None = None
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
        """Write what is pending and record this shard as finished (status 'complete') or not, in one
        transaction."""
        if self._finished is not None:
            return self._finished
        if status not in ("complete", "incomplete"):
            raise StoreError(f"finish(status={status!r}): status must be 'complete' or 'incomplete'")
        with self._lock:
            self._stop_status = status
        self._queue.put((_STOP, status, 0))
        self._thread.join()
        if self._error is not None or self._final is None:
            self._finished = self._info
            raise StoreError(f"writing run {self.run_id} to {self.path} failed "
                             f"({_one_line(self._error)}); the run stays 'incomplete'") from self._error
        self._finished = self._final
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
        with self._lock:
            self._n_put += 1
        self._queue.put((kind, item, nbytes))

    # -- background thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        cfg = self._config
        pending = self._pending
        # One flush inserts on the inserter thread while this thread takes (and encodes) the next blocks:
        # DuckDB's INSERT is mostly single-threaded, so the numpy encoding comes almost for free.
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

        def full() -> bool:  # a flush of this size goes as soon as it may, and no item is added to it
            return pending.decisions >= cfg.flush_decisions or pending.nbytes >= cfg.max_pending_bytes // 2

        def due_in() -> float | None:
            """Seconds until the pending items should be flushed; None: not before something happens."""
            if not pending or inflight is not None:
                return None  # a running flush wakes this thread when it is done
            at = pending.since + cfg.flush_interval_s
            if (cfg.eager_rows and pending.rows >= cfg.eager_rows) or full():
                at = 0.0
            return max(at, self._released_at + cfg.reader_gap_s) - time.monotonic()

        try:
            while True:
                wait = due_in()
                if wait is not None and wait > 0 and full():
                    time.sleep(wait)  # only the readers' gap is left to wait
                    continue
                if wait is None or wait > 0:
                    try:
                        kind, item, nbytes = self._queue.get(timeout=wait)
                    except queue.Empty:
                        kind, item, nbytes = None, None, 0
                    if kind is _DONE:
                        if inflight is not None and inflight[0] is item:
                            settle()
                    elif kind is _STOP:
                        settle()
                        if self._final is None:  # else the last flush recorded the status: nothing is left
                            self._last_flush(pending, status=item)
                        return
                    elif kind is not None:
                        with self._lock:
                            self._n_taken += 1
                            self._take(pending, kind, item, nbytes)
                        if inflight is not None and pending.raw_rows >= max(1, cfg.eager_rows):
                            # the inserter is busy: encode now, so that the next flush only has to be submitted
                            self._encode_raw(pending)
                        if inflight is not None and full():
                            settle()  # a full flush waits for the running one (no flush grows past the limits)
                    continue
                # due: flush what is pending on the inserter
                batch = self._assemble(pending)
                nbytes = pending.nbytes
                with self._lock:
                    pending = self._pending = _Pending()
                if batch is not None and self._error is None:
                    future = inserter.submit(self._write, *batch)
                    inflight = (future, nbytes)
                    future.add_done_callback(lambda f: self._queue.put((_DONE, f, 0)))
                else:
                    self._budget.release(nbytes)
        finally:
            inserter.shutdown(wait=True)

    def _take(self, pending: _Pending, kind: str, item, nbytes: int) -> None:
        if pending.since is None:
            pending.since = time.monotonic()
        pending.nbytes += nbytes
        if kind != "block":
            pending.extras.append((kind, item))
            return
        rows = len(item.layers) * item.n_tokens
        pending.raw.append(item)
        pending.raw_rows += rows
        pending.rows += rows
        pending.decisions += int(item.experts.size)

    def _encode_raw(self, pending: _Pending) -> None:
        if pending.raw and self._error is None:
            try:
                pending.encoded.append(encode_blocks(pending.raw))
                self._count_tokens(pending.raw)
            except BaseException as exc:
                self._fail(exc)
        pending.raw, pending.raw_rows = [], 0

    def _count_tokens(self, blocks: list[TokenBlock]) -> None:
        counts = self._token_counts
        for b in blocks:
            seq = np.asarray(b.seq_id)
            if seq.size == 0:
                continue
            starts = np.flatnonzero(np.concatenate(([True], seq[1:] != seq[:-1])))
            if len(starts) > 64:  # not grouped by sequence: count the distinct ids instead of the runs
                heads, lengths = np.unique(seq, return_counts=True)
            else:
                heads, lengths = seq[starts], np.diff(starts, append=seq.size)
            for s, n in zip(heads.tolist(), lengths.tolist()):
                counts[s] = counts.get(s, 0) + n

    def _assemble(self, pending: _Pending):
        """Encode what is left and gather the flush's tables; None when there is nothing to write."""
        self._encode_raw(pending)
        if self._error is not None:
            return None
        try:
            extras = pending.extras
            seqs = [s for kind, it in extras if kind == "sequences" for s in it]
            stats = [s for kind, it in extras if kind == "stats" for s in it]
            vocab: dict[int, str] = {}
            for kind, it in extras:
                if kind == "vocab":
                    vocab = {**it, **vocab}  # the first text given for an id wins
            # Encoding happens before connecting so the file lock is held only for the INSERTs.
            return (merge_encoded(pending.encoded), sequences_table(seqs) if seqs else None,
                    expert_stats_table(stats) if stats else None, vocab_table(vocab) if vocab else None)
        except BaseException as exc:
            self._fail(exc)
            return None

    def _last_flush(self, pending: _Pending, status: str) -> None:
        """The pending items and the run's final status, in one transaction (on this thread: the inserter
        has nothing in flight any more)."""
        batch = self._assemble(pending)
        try:
            if self._error is None:
                if batch is None:
                    batch = (merge_encoded([]), None, None, None)
                self._write(*batch, final_status=status)
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._budget.release(pending.nbytes)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._budget.break_()

    def _write(self, batch: EncodedBatch, seq_tbl: pa.Table | None, stats_tbl: pa.Table | None,
               vocab_tbl: pa.Table | None, final_status: str | None = None) -> RunInfo | None:
        """One flush = one transaction, the file released right after the COMMIT. Returns the run's RunInfo when
        this transaction recorded the final status (``final_status``, or a finish() that came meanwhile).

        The INSERTs go to DuckDB as one script, as do the counters' UPDATE and the COMMIT: each statement handed
        over from Python holds the GIL for a while (parsing, binding the Arrow tables), time the thread launching
        the next forward's kernels waits for."""
        info = None
        counted = final_status is not None and seq_tbl is not None
        if counted:
            seq_tbl = self._with_token_counts(seq_tbl)
        parts = [("routing_data", batch.routing), ("token_data", batch.tokens),
                 ("router_logits_data", batch.logits), ("residual_max", batch.residual),
                 ("sequences", seq_tbl), ("expert_stats", stats_tbl), ("vocab", vocab_tbl)]
        parts = [(table, data) for table, data in parts if data is not None and data.num_rows]
        n_seq = 0 if seq_tbl is None else seq_tbl.num_rows
        try:
            with write_session(self.path) as con:
                names = []
                try:
                    statements = ["BEGIN TRANSACTION"]
                    for table, data in parts:
                        name = f"rl_batch_{table}"
                        con.register(name, data)
                        names.append(name)
                        statements.append(_insert_sql(table, name, self.run_id, data.column_names))
                    con.sql("; ".join(statements))
                    if final_status is None:
                        final_status = self._join_stop()
                        counted = seq_tbl is None
                    if final_status is None:
                        con.sql(f"UPDATE runs SET n_sequences = n_sequences + {int(n_seq)}, "
                                f"n_tokens = n_tokens + {int(batch.n_tokens)}, "
                                f"n_decisions = n_decisions + {int(batch.n_decisions)} "
                                f"WHERE run_id = {int(self.run_id)}; COMMIT")
                    else:
                        info = self._finalise(con, final_status, n_seq, batch.n_tokens, batch.n_decisions,
                                              update_sequences=self._sequences_written or not counted)
                        con.sql("COMMIT")
                except BaseException:
                    try:  # nothing of this flush stays
                        con.sql("ROLLBACK")
                    except duckdb.Error:
                        pass
                    raise
                finally:
                    for name in names:
                        con.unregister(name)
        finally:
            self._released_at = time.monotonic()
        if seq_tbl is not None:
            self._sequences_written = True
        if info is not None:
            self._final = info
        return info

    def _join_stop(self) -> str | None:
        """finish()'s status if it was called and everything handed over before it is in this flush (and nothing
        was dropped: an item whose encoding failed left the pending set empty too)."""
        with self._lock:
            if (self._stop_status is not None and self._n_taken == self._n_put and not self._pending
                    and self._error is None):
                return self._stop_status
        return None

    def _with_token_counts(self, seq_tbl: pa.Table) -> pa.Table:
        """The sequences table with n_tokens = the rows written for each sequence that has any."""
        if not self._token_counts:
            return seq_tbl
        keys = np.fromiter(self._token_counts, np.int64, len(self._token_counts))
        vals = np.fromiter(self._token_counts.values(), np.int64, len(self._token_counts))
        order = np.argsort(keys)
        keys, vals = keys[order], vals[order]
        seq = seq_tbl.column("seq_id").to_numpy()
        at = np.minimum(np.searchsorted(keys, seq), len(keys) - 1)
        hit = keys[at] == seq
        n = np.where(hit, vals[at], seq_tbl.column("n_tokens").to_numpy(zero_copy_only=False)).astype(np.int32)
        i = seq_tbl.column_names.index("n_tokens")
        return seq_tbl.set_column(i, "n_tokens", pa.array(n, pa.int32()))

    def _finalise(self, con: duckdb.DuckDBPyConnection, status: str, n_seq: int, n_tokens: int,
                  n_decisions: int, update_sequences: bool) -> RunInfo:
        # The token rows are the truth about sequence length (truncation, generation): n_tokens of every sequence
        # with rows is the count kept as its blocks were encoded (set before the INSERT for the sequences of
        # the last flush, by this UPDATE for those written earlier), without a scan of token_data.
        if update_sequences and self._token_counts:
            counts = pa.table({"seq_id": pa.array(list(self._token_counts), pa.int64()),
                               "n": pa.array(list(self._token_counts.values()), pa.int32())})
            con.register("rl_token_counts", counts)
            try:
                con.sql("UPDATE sequences SET n_tokens = c.n FROM rl_token_counts AS c "
                        "WHERE sequences.run_id = $run AND sequences.seq_id = c.seq_id", params={"run": self.run_id})
            finally:
                con.unregister("rl_token_counts")
        row = catalog.read_run_row(con, self.run_id)
        complete = set(row["shards_complete"])
        if status == "complete":
            complete.add(self._info.shard)
        row.update(shards_complete=sorted(complete), status=catalog.run_status(complete, row["num_shards"]),
                   finished_at=datetime.now(timezone.utc).replace(tzinfo=None),
                   n_sequences=row["n_sequences"] + n_seq, n_tokens=row["n_tokens"] + n_tokens,
                   n_decisions=row["n_decisions"] + n_decisions)
        con.sql("UPDATE runs SET shards_complete = ?, status = ?, finished_at = ?, n_sequences = ?, n_tokens = ?, "
                "n_decisions = ? WHERE run_id = ?",
                params=[row["shards_complete"], row["status"], row["finished_at"], row["n_sequences"],
                        row["n_tokens"], row["n_decisions"], self.run_id])
        return catalog.row_to_info(row)


def _insert_sql(table: str, name: str, run_id: int, columns: list[str]) -> str:
    """INSERT of the registered Arrow table ``name`` into ``table``, with run_id: the one place this SQL is written
    (the writer's flush script, insert_arrow, insert_vocab)."""
    cols = ", ".join(columns)
    if table == "vocab":  # skip ids the run already has (the tokens view joins on run_id, token_id)
        return (f"INSERT INTO vocab (run_id, token_id, token) SELECT {int(run_id)}, token_id, token FROM {name} "
                f"WHERE token_id NOT IN (SELECT token_id FROM vocab WHERE run_id = {int(run_id)})")
    return f"INSERT INTO {table} (run_id, {cols}) SELECT {int(run_id)}, {cols} FROM {name}"


def insert_arrow(con: duckdb.DuckDBPyConnection, table: str, run_id: int, data: pa.Table) -> None:
    """INSERT the Arrow table's columns (by name) plus run_id into ``table``."""
    _insert_registered(con, table, run_id, data, data.column_names)


def insert_vocab(con: duckdb.DuckDBPyConnection, run_id: int, data) -> None:
    """Add token texts (``token_id``, ``token``), skipping ids the run already has."""
    _insert_registered(con, "vocab", run_id, data, ["token_id", "token"])


def _insert_registered(con: duckdb.DuckDBPyConnection, table: str, run_id: int, data, columns: list[str]) -> None:
    name = f"rl_batch_{table}"
    con.register(name, data)
    try:
        con.sql(_insert_sql(table, name, run_id, columns))
    finally:
        con.unregister(name)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


