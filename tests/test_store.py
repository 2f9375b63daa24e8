"""Store API on hand-made TokenBlocks: exact routing rows, tokens, sequences, logits, residual, stats."""
from __future__ import annotations

import time

import numpy as np
import polars as pl
import pytest

from routelens.errors import StoreError
from routelens.records import ExpertStat, RunMeta, SequenceRecord, TokenBlock
from routelens.store import Store, WriterConfig


def make_meta(**kw) -> RunMeta:
    base = dict(model="tiny/moe", architecture="TinyMoeForCausalLM", family="tiny", config_hash="cfg1",
                num_experts=8, top_k=2, moe_layers=(1, 3), num_layers=5, dtype="float32",
                transformers_version="5.23.0", torch_version="2.13.0", routelens_version="0.1.0",
                input_source="hand-made", name="hand")
    base.update(kw)
    return RunMeta(**base)


def block_one() -> TokenBlock:
    # layers 1 and 3 of a 5-layer model: 0, 2, 4 are dense and must not appear anywhere.
    return TokenBlock(
        seq_id=np.array([10, 10, 11], np.int64), pos=np.array([0, 1, 0], np.int32),
        token_id=np.array([100, 101, 200], np.int32), layers=(1, 3),
        experts=np.array([[[3, 5], [0, 7], [6, 2]],
                          [[1, 2], [7, 6], [5, 0]]], np.uint16),
        weights=np.array([[[0.75, 0.25], [0.5, 0.5], [0.625, 0.375]],
                          [[0.875, 0.125], [0.5625, 0.4375], [1.0, 0.0]]], np.float16),
        generated=np.array([False, True, False]))


def block_two() -> TokenBlock:
    return TokenBlock(
        seq_id=np.array([11, 12], np.int64), pos=np.array([1, 0], np.int32),
        token_id=np.array([201, 300], np.int32), layers=(1, 3),
        experts=np.array([[[4, 1], [2, 3]], [[0, 6], [7, 5]]], np.uint16),
        # float32 that float16 cannot represent: stored rounded to float16
        weights=np.array([[[0.9, 0.1], [0.7, 0.3]], [[0.6, 0.4], [0.55, 0.45]]], np.float32))


# (seq_id, pos, layer, rank, expert, weight), written out by hand from the blocks above
EXPECTED_BLOCK_ONE = [
    (10, 0, 1, 0, 3, 0.75), (10, 0, 1, 1, 5, 0.25), (10, 0, 3, 0, 1, 0.875), (10, 0, 3, 1, 2, 0.125),
    (10, 1, 1, 0, 0, 0.5), (10, 1, 1, 1, 7, 0.5), (10, 1, 3, 0, 7, 0.5625), (10, 1, 3, 1, 6, 0.4375),
    (11, 0, 1, 0, 6, 0.625), (11, 0, 1, 1, 2, 0.375), (11, 0, 3, 0, 5, 1.0), (11, 0, 3, 1, 0, 0.0),
]
F16 = lambda x: float(np.float16(x))  # noqa: E731
EXPECTED_BLOCK_TWO = [
    (11, 1, 1, 0, 4, F16(0.9)), (11, 1, 1, 1, 1, F16(0.1)), (11, 1, 3, 0, 0, F16(0.6)), (11, 1, 3, 1, 6, F16(0.4)),
    (12, 0, 1, 0, 2, F16(0.7)), (12, 0, 1, 1, 3, F16(0.3)), (12, 0, 3, 0, 7, F16(0.55)), (12, 0, 3, 1, 5, F16(0.45)),
]


def rows(frame: pl.DataFrame) -> list[tuple]:
    return [tuple(r) for r in frame.select("seq_id", "pos", "layer", "rank", "expert", "weight").iter_rows()]


@pytest.fixture
def store(tmp_path):
    return Store.open(tmp_path / "s.duckdb")


def write_hand_run(store: Store, **meta_kw):
    with store.create_run(make_meta(**meta_kw)) as w:
        w.add_sequences([SequenceRecord(10, "Hello", label="greeting", lang="en", align_id="a1", source_line=1,
                                        meta={"src": "x"}),
                         SequenceRecord(11, "Hallo", lang="de", align_id="a1", source_line=2),
                         SequenceRecord(12, "Ciao", lang="it", n_tokens=99)])
        w.add_block(block_one())
        w.add_block(block_two())
        w.add_expert_stats([ExpertStat(1, 3, 2, 7.5, 10, 0, 12, 1.25, 11, 0, 3)])
        w.add_vocabulary({100: "He", 101: "llo", 200: "Hal"})
        w.add_vocabulary({200: "ignored: 200 already has a text", 300: "Ci"})
    return w


def test_routing_view_returns_exactly_the_hand_written_decisions(store):
    w = write_hand_run(store)
    frame = store.run(w.run_id).routing()
    assert rows(frame) == sorted(EXPECTED_BLOCK_ONE + EXPECTED_BLOCK_TWO)
    assert set(frame["layer"]) == {1, 3}  # dense layers 0, 2, 4 leave gaps
    assert set(frame["run_id"]) == {w.run_id}
    assert frame.schema["weight"] == pl.Float32 and frame.schema["pos"] == pl.Int32


def test_routing_layer_filter_and_view_sql(store):
    w = write_hand_run(store)
    only3 = store.run("hand").routing(layers=[3])
    assert rows(only3) == sorted(r for r in EXPECTED_BLOCK_ONE + EXPECTED_BLOCK_TWO if r[2] == 3)
    top1 = store.sql("SELECT layer, expert, count(*)::INTEGER AS n FROM routing WHERE run_id = ? AND rank = 0 "
                     "GROUP BY ALL ORDER BY ALL", [w.run_id])
    expected = {}
    for seq, pos, layer, rank, expert, _ in EXPECTED_BLOCK_ONE + EXPECTED_BLOCK_TWO:
        if rank == 0:
            expected[(layer, expert)] = expected.get((layer, expert), 0) + 1
    assert [tuple(r) for r in top1.iter_rows()] == sorted((k[0], k[1], v) for k, v in expected.items())
    with pytest.raises(StoreError, match="not a traced MoE layer"):
        store.run(w.run_id).routing(layers=2)


def test_run_counts_tokens_and_sequences(store):
    w = write_hand_run(store)
    info = store.run(w.run_id).info
    assert (info.status, info.n_sequences, info.n_tokens, info.n_decisions) == ("complete", 3, 5, 5 * 2 * 2)
    assert info.moe_layers == (1, 3) and info.shards == (0,) and info.finished_at is not None
    toks = store.run(w.run_id).tokens()
    assert [tuple(r) for r in toks.select("seq_id", "pos", "token_id", "token", "generated").iter_rows()] == [
        (10, 0, 100, "He", False), (10, 1, 101, "llo", True), (11, 0, 200, "Hal", False),
        (11, 1, 201, None, False), (12, 0, 300, "Ci", False)]  # 201: no text recorded
    seqs = store.run(w.run_id).sequences()
    # n_tokens comes from the stored tokens once the run finishes (12 claimed 99, has 1)
    assert seqs.select("seq_id", "n_tokens", "text", "lang").rows() == [
        (10, 2, "Hello", "en"), (11, 2, "Hallo", "de"), (12, 1, "Ciao", "it")]
    first = seqs.row(0, named=True)
    assert (first["label"], first["align_id"], first["source_line"], first["meta"]) == \
        ("greeting", "a1", 1, '{"src": "x"}')


def test_frames_as_pandas_and_arrow(store):
    w = write_hand_run(store)
    handle = store.run(w.run_id)
    pdf = handle.routing(as_="pandas")
    assert len(pdf) == 20 and list(pdf.columns) == ["run_id", "seq_id", "pos", "layer", "rank", "expert", "weight"]
    tbl = handle.tokens(as_="arrow")
    assert tbl.num_rows == 5 and tbl.column("token_id").to_pylist() == [100, 101, 200, 201, 300]
    with pytest.raises(StoreError, match="polars, pandas, arrow"):
        handle.routing(as_="csv")


def test_logits_round_trip_exact_float16(store):
    logits = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8) / 7 - 3  # not exact in fp16
    block = block_one()
    block.logits = logits.astype(np.float16)
    with store.create_run(make_meta(name="with-logits")) as w:
        w.add_block(block)
    index, values = store.run("with-logits").logits(3)
    assert index.rows() == [(10, 0), (10, 1), (11, 0)]
    assert values.dtype == np.float16 and values.shape == (3, 8)
    np.testing.assert_array_equal(values, logits[1].astype(np.float16))
    _, values1 = store.run("with-logits").logits(1)
    np.testing.assert_array_equal(values1, logits[0].astype(np.float16))
    no_logits = write_hand_run(store, name="plain")
    with pytest.raises(StoreError, match="has no router logits"):
        store.run(no_logits.run_id).logits(1)


def test_residual_and_expert_stats(store):
    block = block_one()
    block.residual_layers = (0, 2)
    block.residual_max = np.array([[1.5, 2.5, 3.5], [10.0, 20.0, 30.0]], np.float32)
    block.residual_channel = np.array([[7, 8, 9], [70, 80, 90]], np.int32)
    with store.create_run(make_meta()) as w:
        w.add_block(block)
        w.add_expert_stats([ExpertStat(3, 5, 4, 9.0, 10, 1, 33, 2.0, 11, 0, 44)])
    res = store.run(w.run_id).residual()
    assert res.select("seq_id", "pos", "layer", "value", "channel").rows() == [
        (10, 0, 0, 1.5, 7), (10, 0, 2, 10.0, 70), (10, 1, 0, 2.5, 8), (10, 1, 2, 20.0, 80),
        (11, 0, 0, 3.5, 9), (11, 0, 2, 30.0, 90)]
    stats = store.run(w.run_id).expert_stats()
    assert stats.drop("run_id").rows() == [(3, 5, 4, 9.0, 10, 1, 33, 2.0, 11, 0, 44)]


def test_many_small_flushes_keep_every_row(tmp_path):
    store = Store.open(tmp_path / "s.duckdb",
                       writer_config=WriterConfig(flush_interval_s=0.01, flush_decisions=8))
    rng = np.random.default_rng(0)
    expected = []
    with store.create_run(make_meta(top_k=3, moe_layers=(0, 2, 5), num_layers=6, num_experts=16)) as w:
        for seq in range(12):
            n = 5
            experts = np.stack([rng.permutation(16)[:3] for _ in range(3 * n)]).reshape(3, n, 3).astype(np.uint16)
            weights = rng.random((3, n, 3)).astype(np.float16)
            w.add_block(TokenBlock(seq_id=np.full(n, seq), pos=np.arange(n, dtype=np.int32),
                                   token_id=np.arange(n, dtype=np.int32), layers=(0, 2, 5),
                                   experts=experts, weights=weights))
            for li, layer in enumerate((0, 2, 5)):
                for p in range(n):
                    for r in range(3):
                        expected.append((seq, p, layer, r, int(experts[li, p, r]), float(weights[li, p, r])))
    frame = store.run(w.run_id).routing()
    assert rows(frame) == sorted(expected)
    assert store.run(w.run_id).info.n_decisions == len(expected)


def test_exception_inside_writer_leaves_run_incomplete_with_its_data(store):
    with pytest.raises(RuntimeError, match="tracer crashed"):
        with store.create_run(make_meta(name="crashy")) as w:
            w.add_block(block_one())
            raise RuntimeError("tracer crashed")
    info = store.run("crashy").info
    assert info.status == "incomplete" and info.finished_at is not None
    assert rows(store.run("crashy").routing()) == sorted(EXPECTED_BLOCK_ONE)


def test_run_is_registered_incomplete_before_any_data(store):
    w = store.create_run(make_meta(name="fresh"))
    assert [(r.name, r.status, r.n_tokens) for r in store.runs()] == [("fresh", "incomplete", 0)]
    assert w.finish().status == "complete"
    with pytest.raises(StoreError, match="already finished"):
        w.add_block(block_one())


@pytest.mark.parametrize("mutate, message", [
    (lambda b: setattr(b, "experts", b.experts[:, :, :1]), "experts has shape"),
    (lambda b: setattr(b, "layers", (1, 2)), r"layers \[2\] are not MoE layers"),
    (lambda b: b.experts.__setitem__((0, 0, 0), 8), "outside 0..7"),
    (lambda b: setattr(b, "pos", b.pos[:2]), "pos has shape"),
    (lambda b: setattr(b, "generated", np.zeros(2, bool)), "generated has shape"),
])
def test_malformed_blocks_are_rejected_in_one_line(store, mutate, message):
    block = block_one()
    mutate(block)
    with store.create_run(make_meta()) as w:
        with pytest.raises(StoreError, match=message) as err:
            w.add_block(block)
        assert "\n" not in str(err.value)
        w.add_block(block_one())  # the writer is still usable
    assert rows(store.run(w.run_id).routing()) == sorted(EXPECTED_BLOCK_ONE)


def test_run_lookup_by_id_name_uuid(store):
    a = write_hand_run(store, name="alpha")
    b = write_hand_run(store, name="beta", run_uuid="uuid-beta")
    assert store.run(a.run_id).info.name == "alpha"
    assert store.run("beta").info.run_id == b.run_id
    assert store.run("uuid-beta").info.run_id == b.run_id
    assert store.run(str(b.run_id)).info.name == "beta"
    assert [r.run_id for r in store.runs()] == [a.run_id, b.run_id]


def test_sql_is_parameterised_and_read_only(store):
    write_hand_run(store)
    out = store.sql("SELECT count(*) AS n FROM routing WHERE expert = $e", {"e": 7})
    assert out["n"][0] == sum(1 for r in EXPECTED_BLOCK_ONE + EXPECTED_BLOCK_TWO if r[4] == 7)
    with pytest.raises(StoreError, match="query failed") as err:
        store.sql("DELETE FROM runs")
    assert "\n" not in str(err.value)
    assert len(store.runs()) == 1


def test_read_only_store_refuses_writes(store):
    write_hand_run(store)
    ro = Store.open(store.path, read_only=True)
    with pytest.raises(StoreError, match="read-only"):
        ro.create_run(make_meta())
    assert ro.runs()[0].status == "complete"


def test_reading_in_the_writing_process_waits_for_the_writer_thread(tmp_path):
    # Inside one process a read-only and a read-write connection exclude each other too.
    store = Store.open(tmp_path / "s.duckdb", writer_config=WriterConfig(flush_interval_s=0.001, flush_decisions=1))
    seen = []
    with store.create_run(make_meta()) as w:
        for i in range(30):
            b = block_one()
            b.seq_id = b.seq_id + 100 * i
            w.add_block(b)
            seen.append(store.runs()[0].n_tokens)
    assert seen == sorted(seen)
    assert store.runs()[0].n_tokens == 90


def test_sequences_flushed_before_their_tokens_get_the_token_counts(tmp_path):
    # The sequences go out in an earlier flush than the blocks: finish() corrects n_tokens with an UPDATE.
    store = Store.open(tmp_path / "s.duckdb", writer_config=WriterConfig(flush_interval_s=0.001, reader_gap_s=0))
    with store.create_run(make_meta()) as w:
        w.add_sequences([SequenceRecord(10, "Hello", n_tokens=7), SequenceRecord(11, "Hallo", n_tokens=7),
                         SequenceRecord(12, "Ciao", n_tokens=99), SequenceRecord(13, "none", n_tokens=4)])
        time.sleep(0.2)  # the sequences are committed by now
        assert store.runs()[0].n_sequences == 4
        w.add_block(block_one())
        w.add_block(block_two())
    seqs = store.run(w.run_id).sequences()
    assert seqs.select("seq_id", "n_tokens").rows() == [(10, 2), (11, 2), (12, 1), (13, 4)]  # 13 has no tokens


def test_finish_right_after_a_large_block_records_everything(tmp_path):
    # A block flushed at once (eager_rows), then finish() while that flush is inserting: the status goes into the
    # flush's own transaction (nothing else handed over) or into one more (sequences came after the block).
    store = Store.open(tmp_path / "s.duckdb", writer_config=WriterConfig(eager_rows=1))
    n, L, k = 20_000, 2, 2
    rng = np.random.default_rng(1)
    for with_sequences in (False, True, False, True):
        with store.create_run(make_meta()) as w:
            w.add_block(TokenBlock(seq_id=np.repeat(np.arange(4, dtype=np.int64), n // 4),
                                   pos=np.tile(np.arange(n // 4, dtype=np.int32), 4),
                                   token_id=np.zeros(n, np.int32), layers=(1, 3),
                                   experts=rng.integers(0, 8, (L, n, k)).astype(np.uint16),
                                   weights=rng.random((L, n, k)).astype(np.float16)))
            if with_sequences:
                w.add_sequences([SequenceRecord(i, f"s{i}") for i in range(4)])
        info = w.finish()
        assert (info.status, info.n_tokens, info.n_decisions) == ("complete", n, n * L * k)
        assert store.run(w.run_id).info == info
        assert store.run(w.run_id).sequences()["n_tokens"].to_list() == ([n // 4] * 4 if with_sequences else [])
        assert len(store.run(w.run_id).routing()) == n * L * k


def test_failed_flush_keeps_the_run_incomplete_and_releases_the_file(tmp_path):
    import duckdb

    path = tmp_path / "s.duckdb"
    store = Store.open(path)
    write_hand_run(store, name="before")
    with duckdb.connect(str(path)) as con:  # sabotage: the residual table is gone
        con.sql("ALTER TABLE residual_max RENAME TO residual_max_gone")
    block = block_one()
    block.residual_layers = (0, 2)
    block.residual_max = np.ones((2, 3), np.float32)
    block.residual_channel = np.zeros((2, 3), np.int32)
    w = store.create_run(make_meta(name="broken"))
    w.add_block(block)
    with pytest.raises(StoreError, match="stays 'incomplete'"):
        w.finish()
    by_name = {r.name: r for r in store.runs()}  # the file was released: this process reads it again
    assert by_name["broken"].status == "incomplete" and by_name["broken"].n_tokens == 0
    assert rows(store.run("before").routing()) == sorted(EXPECTED_BLOCK_ONE + EXPECTED_BLOCK_TWO)
    with duckdb.connect(str(path)) as con:
        con.sql("ALTER TABLE residual_max_gone RENAME TO residual_max")
    write_hand_run(store, name="after")  # and writes to it
    assert store.run("after").info.status == "complete"


def test_failed_encoding_during_a_flush_never_lets_that_flush_mark_the_run_complete(tmp_path, monkeypatch):
    # block_two's encoding fails while block_one's flush is inserting, then finish(): that flush must not record
    # the run 'complete' (block_two is missing), and finish() reports the failure.
    import contextlib

    from routelens.store import writer as writer_mod

    real_encode, real_session = writer_mod.encode_blocks, writer_mod.write_session
    calls = {"encode": 0, "session": 0}

    def encode(blocks):
        calls["encode"] += 1
        if calls["encode"] == 2:
            raise MemoryError("encoding failed")
        return real_encode(blocks)

    @contextlib.contextmanager
    def slow_session(path, **kw):
        calls["session"] += 1
        if calls["session"] == 1:
            time.sleep(0.5)  # block_one's flush is still inserting when block_two and finish() come
        with real_session(path, **kw) as con:
            yield con

    monkeypatch.setattr(writer_mod, "encode_blocks", encode)
    monkeypatch.setattr(writer_mod, "write_session", slow_session)
    store = Store.open(tmp_path / "s.duckdb", writer_config=WriterConfig(eager_rows=1, reader_gap_s=0))
    w = store.create_run(make_meta())
    w.add_block(block_one())
    time.sleep(0.1)  # block_one's flush has started
    w.add_block(block_two())
    time.sleep(0.1)  # block_two was taken (and its encoding failed)
    with pytest.raises(StoreError, match="encoding failed.*stays 'incomplete'"):
        w.finish()
    (run,) = store.runs()
    assert (run.status, run.n_tokens) == ("incomplete", 3)


def test_a_forked_child_exits_cleanly_after_the_parent_wrote(tmp_path):
    # The parent's process-wide DuckDB instance (the run writer's) is inherited by a fork: the child must never
    # destroy it (its destructor joins threads the child does not have), also not at a normal interpreter exit.
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    script = f"""
import os, sys
from routelens.store import connection
with connection.write_session({str(tmp_path / "s.duckdb")!r}) as con:
    con.sql("CREATE TABLE t (x INTEGER)")
pid = os.fork()
if pid == 0:
    sys.exit(3)  # a normal exit: the interpreter finalises its modules
_, status = os.waitpid(pid, 0)
print(os.WEXITSTATUS(status) if os.WIFEXITED(status) else f"signal {{os.WTERMSIG(status)}}")
"""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=repo, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "3", (out.stdout, out.stderr[-2000:])
