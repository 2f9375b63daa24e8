"""Bad input to the store: each is one StoreError line, and nothing already stored is lost."""
from __future__ import annotations

import hashlib

import duckdb
import numpy as np
import pytest

from routelens.errors import RoutelensError, StoreError
from routelens.records import RunMeta, TokenBlock
from routelens.store import SCHEMA_VERSION, Store


def make_meta(**kw) -> RunMeta:
    base = dict(model="tiny/moe", architecture="TinyMoe", family="tiny", config_hash="cfg", num_experts=4,
                top_k=1, moe_layers=(0,), num_layers=1, dtype="float32", transformers_version="5",
                torch_version="2", routelens_version="0.1", input_source="test", name="kept")
    base.update(kw)
    return RunMeta(**base)


def one_block() -> TokenBlock:
    return TokenBlock(seq_id=np.array([0, 0]), pos=np.array([0, 1], np.int32), token_id=np.array([5, 6], np.int32),
                      layers=(0,), experts=np.array([[[2], [3]]], np.uint16),
                      weights=np.array([[[1.0], [0.5]]], np.float16))


def stored_store(path) -> Store:
    store = Store.open(path)
    with store.create_run(make_meta()) as w:
        w.add_block(one_block())
    return store


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(fn, match: str) -> StoreError:
    with pytest.raises(StoreError, match=match) as err:
        fn()
    text = str(err.value)
    assert "\n" not in text and text.strip() == text and isinstance(err.value, RoutelensError)
    return err.value


def test_text_file_is_not_a_store_and_is_left_alone(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not a database\n")
    err = one_line_error(lambda: Store.open(path), "is not a routelens store")
    assert "not a DuckDB file" in str(err) and "routelens trace" in str(err)
    assert path.read_text() == "this is not a database\n"


def test_duckdb_file_without_our_schema(tmp_path):
    path = tmp_path / "other.duckdb"
    with duckdb.connect(str(path)) as con:
        con.sql("CREATE TABLE customers AS SELECT 42 AS id")
    before = digest(path)
    err = one_line_error(lambda: Store.open(path), "is not a routelens store")
    assert "without the routelens schema" in str(err)
    assert digest(path) == before
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.sql("SELECT id FROM customers").fetchall() == [(42,)]


def test_store_with_newer_schema_version(tmp_path):
    path = tmp_path / "s.duckdb"
    stored_store(path)
    with duckdb.connect(str(path)) as con:
        con.sql("UPDATE meta SET value = ? WHERE key = 'schema_version'", params=[str(SCHEMA_VERSION + 1)])
    before = digest(path)
    one_line_error(lambda: Store.open(path),
                   rf"store schema v{SCHEMA_VERSION + 1} is newer than this routelens \(v{SCHEMA_VERSION}\); "
                   "upgrade routelens")
    one_line_error(lambda: Store.open(path, read_only=True), "upgrade routelens")
    assert digest(path) == before


def test_missing_run_says_how_to_list_runs(tmp_path):
    path = tmp_path / "s.duckdb"
    store = stored_store(path)
    for ref in (99, "no-such-run"):
        err = one_line_error(lambda: store.run(ref), "no run")
        assert f"routelens runs --db {path}" in str(err)
    assert store.run("kept").info.status == "complete"


def test_import_of_a_directory_that_is_not_an_export(tmp_path):
    path = tmp_path / "s.duckdb"
    store = stored_store(path)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "data.parquet").write_bytes(b"PAR1 nope")
    one_line_error(lambda: store.import_runs(junk), "is not a routelens export")
    one_line_error(lambda: store.import_runs(tmp_path / "missing"), "does not exist")
    fake = junk / "run_uuid=abc" / "manifest"
    fake.mkdir(parents=True)
    (fake / "part-0.json").write_text('{"format": "something-else"}')
    one_line_error(lambda: store.import_runs(junk), "is not a routelens export")
    assert [(r.name, r.status, r.n_decisions) for r in store.runs()] == [("kept", "complete", 2)]


def test_incomplete_export_is_refused_atomically(tmp_path):
    store = stored_store(tmp_path / "s.duckdb")
    out = store.export_run("kept", tmp_path / "exp")
    next(out.glob("routing/layer=0/*.parquet")).unlink()
    target = Store.open(tmp_path / "t.duckdb")
    one_line_error(lambda: target.import_runs(tmp_path / "exp"), "is incomplete")
    assert target.runs() == []


def test_missing_store_without_create_and_bad_paths(tmp_path):
    one_line_error(lambda: Store.open(tmp_path / "nope.duckdb", create=False), "no store at")
    one_line_error(lambda: Store.open(tmp_path / "nope.duckdb", read_only=True), "no store at")
    one_line_error(lambda: Store.open(tmp_path / "no" / "dir" / "s.duckdb"), "does not exist")
    one_line_error(lambda: Store.open(tmp_path), "is a directory")
    assert not (tmp_path / "nope.duckdb").exists()


def test_bad_run_meta_is_rejected_before_anything_is_written(tmp_path):
    store = Store.open(tmp_path / "s.duckdb")
    one_line_error(lambda: store.create_run(make_meta(top_k=5)), "top_k=5")
    one_line_error(lambda: store.create_run(make_meta(moe_layers=(3, 1))), "ascending")
    one_line_error(lambda: store.create_run(make_meta(shard=2, num_shards=2)), "shard=2")
    assert store.runs() == []


def test_same_shard_twice_into_one_store(tmp_path):
    store = stored_store(tmp_path / "s.duckdb")
    uuid = store.runs()[0].run_uuid
    one_line_error(lambda: store.create_run(make_meta(run_uuid=uuid)), "already in this store")
    one_line_error(lambda: store.create_run(make_meta(run_uuid=uuid, shard=1, num_shards=2)), "disagree on num_shards")
    assert len(store.runs()) == 1
