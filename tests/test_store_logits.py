"""Router logits stored as spans: hand-made blocks in every shape a tracer makes, read back bit for bit."""
from __future__ import annotations

import duckdb
import numpy as np
import pytest

from routelens.errors import StoreError
from routelens.records import RunMeta, TokenBlock
from routelens.store import Store, encode

E, K, LAYERS = 8, 2, (1, 3)


def make_meta(**kw) -> RunMeta:
    base = dict(model="tiny/moe", architecture="TinyMoeForCausalLM", family="tiny", config_hash="cfg1",
                num_experts=E, top_k=K, moe_layers=LAYERS, num_layers=5, dtype="float16",
                transformers_version="5", torch_version="2", routelens_version="0.1", input_source="hand-made",
                name="logits")
    base.update(kw)
    return RunMeta(**base)


def bits(n: int, rng) -> np.ndarray:
    """[L, n, E] float16 logits from random bit patterns: every exponent, subnormals, -0.0, inf and NaN,
    so that only a byte-exact store passes."""
    return rng.integers(0, 1 << 16, (len(LAYERS), n, E), dtype=np.uint16).view(np.float16)


def block(rng, rows: list[tuple[int, int]], generated: bool = False) -> TokenBlock:
    seq = np.array([s for s, _ in rows], np.int64)
    pos = np.array([p for _, p in rows], np.int32)
    n = len(rows)
    return TokenBlock(seq_id=seq, pos=pos, token_id=rng.integers(0, 100, n).astype(np.int32), layers=LAYERS,
                      experts=np.stack([rng.permutation(E)[:K] for _ in range(len(LAYERS) * n)]
                                       ).reshape(len(LAYERS), n, K).astype(np.uint16),
                      weights=rng.random((len(LAYERS), n, K)).astype(np.float16), logits=bits(n, rng),
                      generated=np.full(n, generated))


def tracer_like_blocks(rng) -> list[TokenBlock]:
    return [
        # prefill: one span per sequence, except seq 22 whose positions have a gap (two spans in one block)
        block(rng, [(20, p) for p in range(5)] + [(21, p) for p in range(3)] + [(22, p) for p in (0, 1, 2, 5, 6)]),
        # seq 20 goes on in the next block (a chunked text); seq 21 too
        block(rng, [(20, p) for p in range(5, 8)] + [(21, 3)]),
        # rows not grouped by sequence: sorted for the logits, the routing keeps the block's order
        block(rng, [(23, 1), (24, 0), (23, 0), (24, 1)]),
        # generation: one token per sequence and decode step
        *[block(rng, [(20, 8 + t), (21, 4 + t), (22, 7 + t)], generated=True) for t in range(3)],
    ]


def expected(blocks: list[TokenBlock]) -> dict[tuple[int, int, int], np.ndarray]:
    """(layer, seq_id, pos) -> the E float16 logits handed over."""
    out = {}
    for b in blocks:
        for li, layer in enumerate(b.layers):
            for i, (s, p) in enumerate(zip(b.seq_id.tolist(), b.pos.tolist())):
                out[(layer, s, p)] = b.logits[li, i]
    return out


def write(store: Store, blocks: list[TokenBlock], **kw) -> int:
    with store.create_run(make_meta(**kw)) as w:
        for b in blocks:
            w.add_block(b)
    return w.run_id


def assert_logits_exact(store: Store, run_id: int, want: dict) -> None:
    for layer in LAYERS:
        keys = sorted((s, p) for (lay, s, p) in want if lay == layer)
        index, values = store.run(run_id).logits(layer)
        assert index.columns == ["seq_id", "pos"] and index.rows() == keys
        assert values.dtype == np.float16 and values.shape == (len(keys), E)
        np.testing.assert_array_equal(values.view(np.uint16),
                                      np.stack([want[(layer, s, p)] for s, p in keys]).view(np.uint16))


def assert_view_exact(store: Store, run_id: int, want: dict) -> None:
    got = store.sql("SELECT layer, seq_id, pos, logits FROM router_logits WHERE run_id = ? "
                    "ORDER BY layer, seq_id, pos", [run_id])
    assert got.columns == ["layer", "seq_id", "pos", "logits"]
    assert [(r[0], r[1], r[2]) for r in got.rows()] == sorted(want)
    assert [r[3] for r in got.rows()] == [want[k].astype("<f2").tobytes() for k in sorted(want)]


@pytest.fixture
def store(tmp_path):
    return Store.open(tmp_path / "s.duckdb")


def test_spans_split_at_gaps_blocks_and_sequences(store):
    rng = np.random.default_rng(1)
    blocks = tracer_like_blocks(rng)
    rid = write(store, blocks)
    spans = store.sql("SELECT seq_id, pos_start, n, octet_length(logits) AS bytes FROM router_logits_data "
                      "WHERE run_id = ? AND layer = 3 ORDER BY seq_id, pos_start", [rid]).rows()
    assert spans == [(s, p, n, n * 2 * E) for s, p, n in [
        (20, 0, 5), (20, 5, 3), (20, 8, 1), (20, 9, 1), (20, 10, 1),  # split where a block ends
        (21, 0, 3), (21, 3, 1), (21, 4, 1), (21, 5, 1), (21, 6, 1),
        (22, 0, 3), (22, 5, 2), (22, 7, 1), (22, 8, 1), (22, 9, 1),  # the gap 3..4 splits the prefill
        (23, 0, 2), (24, 0, 2)]]
    assert store.run(rid).info.n_tokens == sum(b.n_tokens for b in blocks)
    want = expected(blocks)
    assert_logits_exact(store, rid, want)
    assert_view_exact(store, rid, want)


def test_sorting_the_logits_leaves_the_routing_of_an_unsorted_block_alone(store):
    rng = np.random.default_rng(2)
    b = tracer_like_blocks(rng)[2]
    rid = write(store, [b])
    got = {(r[0], r[1], r[2], r[3]): r[4] for r in store.run(rid).routing().select(
        "seq_id", "pos", "layer", "rank", "expert").rows()}
    for li, layer in enumerate(LAYERS):
        for i, (s, p) in enumerate(zip(b.seq_id.tolist(), b.pos.tolist())):
            assert [got[(s, p, layer, r)] for r in range(K)] == b.experts[li, i].tolist()
    assert_logits_exact(store, rid, expected([b]))


def test_long_spans_are_cut_at_max_span_bytes(store, monkeypatch):
    monkeypatch.setattr(encode, "MAX_SPAN_BYTES", 3 * 2 * E)  # three tokens per row at most
    rng = np.random.default_rng(3)
    blocks = tracer_like_blocks(rng)
    rid = write(store, blocks)
    spans = store.sql("SELECT seq_id, pos_start, n FROM router_logits_data WHERE run_id = ? AND layer = 1 "
                      "AND seq_id = 20 ORDER BY pos_start", [rid]).rows()
    assert spans == [(20, 0, 3), (20, 3, 2), (20, 5, 3), (20, 8, 1), (20, 9, 1), (20, 10, 1)]
    assert_logits_exact(store, rid, expected(blocks))


def test_duplicate_positions_and_float32_logits(store):
    rng = np.random.default_rng(4)
    b = block(rng, [(5, 0), (5, 1), (5, 1), (5, 2)])  # a tracer bug, but nothing must get lost
    b.logits = rng.standard_normal((len(LAYERS), 4, E)).astype(np.float32)
    rid = write(store, [b])
    index, values = store.run(rid).logits(1)
    assert index.rows() == [(5, 0), (5, 1), (5, 1), (5, 2)]
    np.testing.assert_array_equal(values, b.logits[0].astype(np.float16))


def test_export_import_round_trip_with_spans(tmp_path, store):
    rng = np.random.default_rng(5)
    blocks = tracer_like_blocks(rng)
    write(store, [block(rng, [(0, 0)])], name="other")  # so that run_ids differ between the stores
    rid = write(store, blocks)
    out = store.export_run(rid, tmp_path / "exp")
    with duckdb.connect() as con:  # the export keeps one row per token
        n = con.sql(f"SELECT count(*), min(octet_length(logits)), max(octet_length(logits)) FROM "
                    f"read_parquet('{out}/logits/layer=3/*.parquet')").fetchall()[0]
    assert n == (sum(b.n_tokens for b in blocks), 2 * E, 2 * E)
    dst = Store.open(tmp_path / "dst.duckdb")
    (info,) = dst.import_runs(tmp_path / "exp")
    want = expected(blocks)
    assert_logits_exact(dst, info.run_id, want)
    assert_view_exact(dst, info.run_id, want)
    # import rebuilds the longest spans the per-token rows allow (block boundaries are not exported)
    assert dst.sql("SELECT seq_id, pos_start, n FROM router_logits_data WHERE run_id = ? AND layer = 1 "
                   "ORDER BY seq_id, pos_start", [info.run_id]).rows() == [
        (20, 0, 11), (21, 0, 7), (22, 0, 3), (22, 5, 5), (23, 0, 2), (24, 0, 2)]
    assert store.run(rid).routing().drop("run_id").equals(dst.run(info.run_id).routing().drop("run_id"))


def test_layer_without_logits_and_damaged_spans(store):
    rng = np.random.default_rng(6)
    rid = write(store, [block(rng, [(1, 0), (1, 1)])])
    with duckdb.connect(str(store.path)) as con:  # a span whose BLOB is one token short
        con.sql(f"UPDATE router_logits_data SET n = 3 WHERE run_id = {rid} AND layer = 3")
    with pytest.raises(StoreError, match="damaged") as err:
        store.run(rid).logits(3)
    assert "\n" not in str(err.value)
    assert store.run(rid).logits(1)[1].shape == (2, E)
    plain = block(rng, [(2, 0)])
    plain.logits = None
    other = write(store, [plain], name="plain")
    with pytest.raises(StoreError, match="has no router logits"):
        store.run(other).logits(1)
