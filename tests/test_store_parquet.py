"""Parquet export/import: identical round trip, hive layout readable by DuckDB, shard merging."""
from __future__ import annotations

import json

import duckdb
import numpy as np
import polars as pl
import pytest

from routelens.errors import StoreError
from routelens.records import ExpertStat, RunMeta, SequenceRecord, TokenBlock
from routelens.store import Store

MOE_LAYERS = (1, 2, 4)
E, K = 6, 2


def make_meta(**kw) -> RunMeta:
    base = dict(model="tiny/moe", architecture="TinyMoe", family="tiny", config_hash="cfg", num_experts=E,
                top_k=K, moe_layers=MOE_LAYERS, num_layers=5, dtype="bfloat16", transformers_version="5",
                torch_version="2", routelens_version="0.1", input_source="in.jsonl", name="exported",
                tags=("a", "b"), params={"logits": True, "batch_size": 4}, steering={"ban": [[1, 3]]})
    base.update(kw)
    return RunMeta(**base)


def random_block(rng, seqs: list[int], n_pos: int = 4, logits: bool = True) -> TokenBlock:
    n = len(seqs) * n_pos
    L = len(MOE_LAYERS)
    raw = rng.standard_normal((L, n, E)).astype(np.float32)
    experts = np.argsort(-raw, axis=-1)[..., :K].astype(np.uint16)
    weights = np.sort(rng.random((L, n, K)), axis=-1)[..., ::-1].astype(np.float32)
    return TokenBlock(
        seq_id=np.repeat(np.array(seqs, np.int64), n_pos), pos=np.tile(np.arange(n_pos, dtype=np.int32), len(seqs)),
        token_id=rng.integers(0, 1000, n).astype(np.int32), layers=MOE_LAYERS, experts=experts, weights=weights,
        logits=raw.astype(np.float16) if logits else None, residual_layers=(0, 3),
        residual_max=rng.random((2, n)).astype(np.float32), residual_channel=rng.integers(0, 64, (2, n)).astype(np.int32),
        generated=rng.random(n) < 0.3)


def write_run(store: Store, seqs: list[int], seed: int, finish: str = "complete", **meta_kw) -> int:
    rng = np.random.default_rng(seed)
    w = store.create_run(make_meta(**meta_kw))
    w.add_sequences([SequenceRecord(s, f"text {s}", lang="en", meta={"i": s}) for s in seqs])
    for chunk in (seqs[: len(seqs) // 2], seqs[len(seqs) // 2:]):
        w.add_block(random_block(rng, chunk))
    w.add_vocabulary({i: f"tok{i}" for i in range(0, 1000, 2)})  # odd ids: no text
    w.add_expert_stats([ExpertStat(layer, e, int(rng.integers(1, 50)), float(rng.random() * 10), seqs[0], 1, 5,
                                   float(rng.random()), seqs[-1], 2, 6)
                        for layer in MOE_LAYERS for e in range(E)])
    return w.finish(finish).run_id


def snapshot(store: Store, ref) -> dict:
    h = store.run(ref)
    _, l1 = h.logits(1)
    return {"routing": h.routing().drop("run_id"), "tokens": h.tokens().drop("run_id"),
            "sequences": h.sequences().drop("run_id"), "residual": h.residual().drop("run_id"),
            "stats": h.expert_stats().drop("run_id"), "logits1": l1}


def assert_same(a: dict, b: dict) -> None:
    for key in a:
        if key == "logits1":
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key].equals(b[key]), key


def test_export_import_round_trip_is_identical(tmp_path):
    src = Store.open(tmp_path / "src.duckdb")
    write_run(src, [0, 1], seed=1, name="other")  # so the exported run is not run_id 1
    rid = write_run(src, [3, 5, 7, 9], seed=2)
    out = src.export_run(rid, tmp_path / "exp")
    assert out.name == f"run_uuid={src.run(rid).info.run_uuid}"
    dst = Store.open(tmp_path / "dst.duckdb")
    (imported,) = dst.import_runs(tmp_path / "exp")
    assert imported.run_id == 1
    original = src.run(rid).info
    for field in vars(original):
        if field != "run_id":
            assert getattr(imported, field) == getattr(original, field), field
    assert_same(snapshot(src, rid), snapshot(dst, imported.run_id))


def test_export_layout_is_hive_partitioned_parquet(tmp_path):
    src = Store.open(tmp_path / "src.duckdb")
    rid = write_run(src, [0, 1, 2], seed=3)
    out = src.export_run(rid, tmp_path / "exp")
    manifest = json.loads((out / "manifest" / "part-0.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["shards"] == [0] and manifest["status"] == "complete"
    assert sorted(p.parent.name for p in out.glob("routing/layer=*/part-0.parquet")) == ["layer=1", "layer=2", "layer=4"]
    with duckdb.connect() as con:
        glob = str(tmp_path / "exp" / "run_uuid=*" / "routing" / "layer=*" / "*.parquet")
        got = con.sql(f"SELECT run_uuid, layer::INTEGER, count(*) FROM read_parquet('{glob}', hive_partitioning = true) "
                      "GROUP BY ALL ORDER BY ALL").fetchall()
        meta = con.sql(f"SELECT compression FROM parquet_metadata('{glob}') LIMIT 1").fetchall()
    uuid = src.run(rid).info.run_uuid
    assert got == [(uuid, layer, 3 * 4 * K) for layer in MOE_LAYERS]
    assert meta[0][0] == "ZSTD"


def shard_stores(tmp_path, complete=("complete", "complete"), seqs=([0, 2, 4, 6], [1, 3, 5, 7]), **meta_kw):
    dirs = []
    for shard, (status, shard_seqs) in enumerate(zip(complete, seqs)):
        store = Store.open(tmp_path / f"node{shard}.duckdb")
        rid = write_run(store, list(shard_seqs), seed=10 + shard, finish=status, run_uuid="run-x", shard=shard,
                        num_shards=2, **(meta_kw if shard == 1 else {}))
        dirs.append(store.export_run(rid, tmp_path / f"exp{shard}"))
    return dirs


def test_shards_merge_into_one_run(tmp_path):
    dirs = shard_stores(tmp_path)
    merged = Store.open(tmp_path / "merged.duckdb")
    (info,) = merged.import_runs(*[d.parent for d in dirs])
    assert (info.run_uuid, info.status, info.shards, info.shard, info.num_shards) == ("run-x", "complete", (0, 1), -1, 2)
    assert (info.n_sequences, info.n_tokens, info.n_decisions) == (8, 32, 32 * len(MOE_LAYERS) * K)
    routing = merged.run("run-x").routing()
    parts = [Store.open(tmp_path / f"node{i}.duckdb").run("run-x").routing() for i in (0, 1)]
    expected = pl.concat(parts).drop("run_id").sort("seq_id", "pos", "layer", "rank")
    assert routing.drop("run_id").equals(expected)
    tokens = merged.run("run-x").tokens()
    assert len(tokens) == 32 and tokens["token"].null_count() == (tokens["token_id"] % 2 == 1).sum()
    assert tokens.filter(pl.col("token_id") % 2 == 0)["token"].to_list() == \
        [f"tok{i}" for i in tokens.filter(pl.col("token_id") % 2 == 0)["token_id"]]
    assert merged.run("run-x").sequences()["seq_id"].to_list() == list(range(8))
    # expert stats: counts add up, the extreme is the larger of the two shards'
    stats = merged.run("run-x").expert_stats()
    s0 = Store.open(tmp_path / "node0.duckdb").run("run-x").expert_stats()
    s1 = Store.open(tmp_path / "node1.duckdb").run("run-x").expert_stats()
    assert stats["n_tokens"].to_list() == (s0["n_tokens"] + s1["n_tokens"]).to_list()
    assert stats["max_out"].to_list() == [max(a, b) for a, b in zip(s0["max_out"], s1["max_out"])]
    first = 0 if s0["max_out"][0] >= s1["max_out"][0] else 1
    assert stats["max_out_seq"][0] == [s0, s1][first]["max_out_seq"][0]


def test_shard_exports_copied_into_one_folder_and_imported_one_by_one(tmp_path):
    dirs = shard_stores(tmp_path, complete=("complete", "incomplete"))
    merged = Store.open(tmp_path / "merged.duckdb")
    (first,) = merged.import_runs(dirs[0])
    assert (first.status, first.shards) == ("incomplete", (0,))  # shard 1 missing
    (second,) = merged.import_runs(dirs[1])
    assert second.run_id == first.run_id and second.shards == (0, 1)
    assert second.status == "incomplete"  # shard 1 never finished
    assert second.n_tokens == 32
    with pytest.raises(StoreError, match="already in this store"):
        merged.import_runs(dirs[1])
    assert merged.run("run-x").info.n_tokens == 32


def test_shards_that_disagree_are_refused(tmp_path):
    dirs = shard_stores(tmp_path, config_hash="different")
    merged = Store.open(tmp_path / "merged.duckdb")
    with pytest.raises(StoreError, match="disagree on config_hash") as err:
        merged.import_runs(*dirs)
    assert "\n" not in str(err.value) and merged.runs() == []


def test_shards_with_overlapping_seq_ids_are_refused(tmp_path):
    dirs = shard_stores(tmp_path, seqs=([0, 1, 2, 3], [3, 4, 5, 6]))
    merged = Store.open(tmp_path / "merged.duckdb")
    with pytest.raises(StoreError, match="both contain seq_id 3"):
        merged.import_runs(*dirs)
    merged.import_runs(dirs[0])
    with pytest.raises(StoreError, match="seq_id 3 twice"):
        merged.import_runs(dirs[1])
    assert [(r.shards, r.n_tokens) for r in merged.runs()] == [((0,), 16)]  # the failed import left nothing


def test_same_shard_given_twice_is_refused(tmp_path):
    src = Store.open(tmp_path / "src.duckdb")
    rid = write_run(src, [0, 1], seed=5)
    a = src.export_run(rid, tmp_path / "a")
    b = src.export_run(rid, tmp_path / "b")
    with pytest.raises(StoreError, match="given twice"):
        Store.open(tmp_path / "dst.duckdb").import_runs(a, b)
