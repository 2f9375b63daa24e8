"""The analyses' shared plumbing: results tables (save, replace, load), parameter coercion, refusals."""
from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest

from routelens.analyses.registry import Analysis, _coerce, params_from_dict
from routelens.analyses.results import list_results, load_result, save_result
from routelens.analyses.routing_arrays import load_routing
from routelens.errors import InputError
from routelens.store import Store
from synthetic import write_run


@pytest.fixture()
def store_and_run(tmp_path):
    store = Store.open(tmp_path / "s.duckdb")
    rng = np.random.default_rng(0)
    experts = np.stack([np.stack([rng.permutation(8)[:2] for _ in range(30)]) for _ in range(3)])
    info = write_run(store, experts, seq_lengths=[10, 20], num_experts=8, layers=(1, 2, 4), num_layers=5)
    return store, info, experts


def test_load_routing_is_exact_and_compact(store_and_run):
    store, info, experts = store_and_run
    ra = load_routing(store, info, weights=True)
    assert ra.experts.dtype == np.uint8 and np.array_equal(ra.experts, experts)
    assert ra.seq_start.tolist() == [0, 10, 30] and ra.layers == (1, 2, 4)
    assert np.all(ra.weights == np.float16(0.5))
    sub = load_routing(store, info, layers=[2], seq_ids=[1])
    assert np.array_equal(sub.experts[0], experts[1, 10:])
    with pytest.raises(Exception, match="layer \\[3\\] is not a traced MoE layer"):
        load_routing(store, info, layers=[3])


def test_results_replace_same_params_and_keep_others(store_and_run):
    store, info, _ = store_and_run
    save_result(store, "lrc", [info], {"m": [4]}, {"values": pl.DataFrame({"a": [1, 2]})})
    save_result(store, "lrc", [info], {"m": [4]}, {"values": pl.DataFrame({"a": [3], "b": ["new column"]})})
    save_result(store, "lrc", [info], {"m": [16]}, {"values": pl.DataFrame({"a": [9]})})
    assert load_result(store, "lrc", [info], {"m": [4]})["values"].to_dicts() == [{"a": 3, "b": "new column"}]
    assert load_result(store, "lrc", [info])["values"]["a"].to_list() == [9]  # newest
    assert list_results(store, info).height == 2
    assert load_result(store, "npmi", [info]) is None


def test_param_coercion_and_refusals():
    @dataclasses.dataclass(frozen=True)
    class P:
        m: tuple[int, ...] = (4, 16)
        rho: float = 2.0
        flag: bool = False
        lang: str | None = None

    a = Analysis("x", "x", P, lambda *a: {}, "values")
    assert params_from_dict(a, {"m": "4,64", "rho": "0.5", "flag": "true"}) == P((4, 64), 0.5, True, None)
    with pytest.raises(InputError, match="unknown parameter"):
        params_from_dict(a, {"nope": 1})
    with pytest.raises(InputError, match="expected int"):
        _coerce("x", tuple[int, ...], "m")


def test_load_routing_sorts_rows_written_out_of_order(tmp_path):
    from routelens.records import RunMeta, TokenBlock

    store = Store.open(tmp_path / "s.duckdb")
    meta = RunMeta(model="synthetic", architecture="S", family="olmoe", config_hash="0", num_experts=8, top_k=2,
                   moe_layers=(0,), num_layers=1, dtype="float32", transformers_version="-", torch_version="-",
                   routelens_version="-", input_source="t")
    w = store.create_run(meta)
    with w:
        # sequence 1 arrives before sequence 0, and positions within a block are reversed
        for seq, experts in ((1, [[5, 6], [7, 0]]), (0, [[1, 2], [3, 4], [0, 1]])):
            n = len(experts)
            w.add_block(TokenBlock(seq_id=np.full(n, seq, np.int64), pos=np.arange(n, dtype=np.int32)[::-1].copy(),
                                   token_id=np.zeros(n, np.int32), layers=(0,),
                                   experts=np.asarray([experts], np.uint16), weights=np.full((1, n, 2), 0.5, np.float32)))
        info = w.finish("complete")
    ra = load_routing(store, info)
    assert ra.seq_id.tolist() == [0, 0, 0, 1, 1] and ra.pos.tolist() == [0, 1, 2, 0, 1]
    # position p of a block was written at row n-1-p
    assert ra.experts[0].tolist() == [[0, 1], [3, 4], [1, 2], [7, 0], [5, 6]]
