"""Store ingest benchmark: decisions/s through RunWriter, bytes/decision on disk, dashboard query time.

    .venv/bin/python benchmarks/store_ingest.py [--tokens 1048576] [--skip-compare] [--workdir DIR]
    .venv/bin/python benchmarks/store_ingest.py --logits-only [--logit-tokens 1048576] [--max-span-bytes N]
    .venv/bin/python benchmarks/store_ingest.py --span-sweep   # router logits by longest span per row

Data: 16 MoE layers x top-8 of 64 experts, sequences of 512 tokens, handed over as TokenBlocks of
8192 tokens (float16 weights, as a bf16/fp16 model's router gives them). Routing is realistic but cheap to
generate: per layer a pool of 65,536 routings is drawn from softmax(popularity bias + N(0,1) noise) with a
Zipf-like skewed expert popularity (counting top-8 selections, a layer's most popular expert is chosen ~57x
as often as its median expert), and every token picks one pool entry at random. (Bit-packing does not exploit repeated rows, so the pool
does not flatter the compression figures.)

A decision is one (token, layer, rank) entry. The ingest time runs from the first add_block call to
finish() returning, i.e. until the data is committed and the connection closed (DuckDB checkpoints on
close); the store file is then measured on disk.

Router-logits case (``logits_benchmark``): the same 16 layers x top-8 of 64 experts, now with the raw float16
router logits (E per token and layer) as an OLMoE-shaped tracer hands them over on a GPU: TokenBlocks of
16,384 tokens (8 sequences x 2,048 positions, as one prefill batch). Experts and weights are the top-8 and
softmax of those very logits. The same blocks are also ingested without logits, and the logits' bytes on
disk are the difference between the two files.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from routelens.records import RunMeta, TokenBlock  # noqa: E402
from routelens.store import Store, WriterConfig  # noqa: E402
from routelens.store import encode  # noqa: E402
from routelens.store.encode import pack_choices  # noqa: E402
from routelens.store.schema import TABLES_DDL  # noqa: E402

L, K, E, SEQ_LEN, BLOCK = 16, 8, 64, 512, 8192
GROUP_BY = "SELECT layer, expert, count(*) AS n, avg(weight) AS w FROM routing WHERE run_id = ? GROUP BY layer, expert"


def routing_pool(rng: np.random.Generator, pool: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """[L, pool, K] experts (uint16) and float16 softmax weights, rank order, skewed popularity."""
    experts = np.empty((L, pool, K), np.uint16)
    weights = np.empty((L, pool, K), np.float16)
    for layer in range(L):
        bias = (-1.3 * np.log1p(rng.permutation(E))).astype(np.float32)  # Zipf-like popularity
        logits = bias + rng.standard_normal((pool, E), dtype=np.float32)
        top = np.argpartition(logits, E - K, axis=-1)[:, E - K:]
        top_logits = np.take_along_axis(logits, top, -1)
        order = np.argsort(-top_logits, axis=-1)
        top, top_logits = np.take_along_axis(top, order, -1), np.take_along_axis(top_logits, order, -1)
        z = np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
        experts[layer] = top
        weights[layer] = np.exp(top_logits - logits.max(-1, keepdims=True)) / z
    return experts, weights


def make_blocks(n_tokens: int, seed: int = 0) -> list[TokenBlock]:
    rng = np.random.default_rng(seed)
    pool_e, pool_w = routing_pool(rng)
    blocks = []
    for start in range(0, n_tokens, BLOCK):
        n = min(BLOCK, n_tokens - start)
        g = np.arange(start, start + n)
        pick = rng.integers(0, pool_e.shape[1], size=(L, n))
        blocks.append(TokenBlock(
            seq_id=(g // SEQ_LEN).astype(np.int64), pos=(g % SEQ_LEN).astype(np.int32),
            token_id=rng.zipf(1.3, n).clip(0, 150_000).astype(np.int32), layers=tuple(range(L)),
            experts=np.take_along_axis(pool_e, pick[..., None], 1),
            weights=np.take_along_axis(pool_w, pick[..., None], 1)))
    return blocks


LOGIT_BLOCK, LOGIT_SEQ = 16384, 2048


def logit_pool(rng: np.random.Generator, pool: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[L, pool, E] float16 logits with their top-K experts and float16 softmax weights."""
    logits = np.empty((L, pool, E), np.float16)
    experts = np.empty((L, pool, K), np.uint16)
    weights = np.empty((L, pool, K), np.float16)
    for layer in range(L):
        bias = (-1.3 * np.log1p(rng.permutation(E))).astype(np.float32)
        lg = (bias + rng.standard_normal((pool, E), dtype=np.float32)).astype(np.float16)
        f = lg.astype(np.float32)
        top = np.argsort(-f, axis=-1, kind="stable")[:, :K]
        p = np.exp(f - f.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        logits[layer], experts[layer] = lg, top
        weights[layer] = np.take_along_axis(p, top, -1)
    return logits, experts, weights


def make_logit_blocks(n_tokens: int, seed: int = 7, block: int = LOGIT_BLOCK,
                      seq_len: int = LOGIT_SEQ) -> list[TokenBlock]:
    """Prefill-like blocks: each block holds block // seq_len whole sequences, with raw logits."""
    rng = np.random.default_rng(seed)
    pool_l, pool_e, pool_w = logit_pool(rng)
    blocks = []
    for start in range(0, n_tokens, block):
        n = min(block, n_tokens - start)
        g = np.arange(start, start + n)
        pick = rng.integers(0, pool_l.shape[1], size=(L, n))
        blocks.append(TokenBlock(
            seq_id=(g // seq_len).astype(np.int64), pos=(g % seq_len).astype(np.int32),
            token_id=rng.zipf(1.3, n).clip(0, 150_000).astype(np.int32), layers=tuple(range(L)),
            experts=np.take_along_axis(pool_e, pick[..., None], 1),
            weights=np.take_along_axis(pool_w, pick[..., None], 1),
            logits=np.take_along_axis(pool_l, pick[..., None], 1)))
    return blocks


def meta(name: str) -> RunMeta:
    return RunMeta(model="bench/synthetic-moe", architecture="SyntheticMoe", family="bench", config_hash="bench",
                   num_experts=E, top_k=K, moe_layers=tuple(range(L)), num_layers=L, dtype="float16",
                   transformers_version="-", torch_version="-", routelens_version="-",
                   input_source="synthetic", name=name)


def column_bytes(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, int]:
    """Approximate on-disk bytes per column: distance between consecutive segments in each block."""
    rows = con.sql(f"SELECT column_name, block_id, block_offset FROM pragma_storage_info('{table}') "
                   "WHERE persistent AND block_id >= 0 ORDER BY block_id, block_offset").fetchall()
    block_size = 256 * 1024
    out: dict[str, int] = {}
    for i, (col, block, off) in enumerate(rows):
        nxt = rows[i + 1] if i + 1 < len(rows) and rows[i + 1][1] == block else None
        out[col.split(".")[0]] = out.get(col.split(".")[0], 0) + ((nxt[2] if nxt else block_size) - off)
    return out


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(str(path) + ".wal")) if p.exists())


def time_query(path: Path, sql: str, params: list, repeat: int = 5) -> float:
    with duckdb.connect(str(path), read_only=True) as con:
        con.sql("SET enable_progress_bar = false")
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            con.sql(sql, params=params).fetchall()
            times.append(time.perf_counter() - t0)
    return min(times)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process, DuckDB's included
    return r.ru_utime + r.ru_stime


def ingest(path: Path, blocks: list[TokenBlock], config: WriterConfig | None = None, name: str = "bench") -> dict:
    store = Store.open(path, writer_config=config)
    writer = store.create_run(meta(name))
    t0, c0 = time.perf_counter(), _cpu_s()
    for b in blocks:
        writer.add_block(b)
    t_handed = time.perf_counter() - t0
    info = writer.finish()
    dt, cpu = time.perf_counter() - t0, _cpu_s() - c0
    return {"run_id": info.run_id, "decisions": info.n_decisions, "seconds": dt, "handover_s": t_handed,
            "rate": info.n_decisions / dt, "cpu_s": cpu}


def main_benchmark(work: Path, n_tokens: int, repeats: int = 3) -> None:
    print(f"# generating {n_tokens:,} tokens x {L} layers x top-{K} of {E} experts ...", flush=True)
    blocks = make_blocks(n_tokens)
    # The box is shared: repeat on fresh files and report the median and the spread.
    results = []
    for rep in range(repeats):
        path = work / f"bench{rep}.duckdb"
        results.append(ingest(path, blocks))
        if rep + 1 < repeats:
            path.unlink()
    res = sorted(results, key=lambda r: r["rate"])[len(results) // 2]
    size = file_bytes(path)
    with duckdb.connect(str(path), read_only=True) as con:
        cols = column_bytes(con, "routing_data")
        tok = column_bytes(con, "token_data")
    d = res["decisions"]
    print(f"\n## RunWriter ingest ({n_tokens:,} tokens, {d:,} decisions, {len(blocks)} blocks of {BLOCK})")
    rates = ", ".join(f"{r['rate'] / 1e6:.1f}" for r in results)
    print(f"- ingest, median of {repeats}: {res['seconds']:.2f} s -> **{res['rate'] / 1e6:.1f} M decisions/s** "
          f"(runs: {rates} M/s; "
          f"{res['cpu_s']:.2f} CPU-s = {res['decisions'] / res['cpu_s'] / 1e6:.1f} M decisions per CPU-second)")
    print(f"- the tracer's add_block calls returned after {res['handover_s']:.3f} s in total "
          "(validation + queueing; the background writer does the rest)")
    print(f"- store file: {size / 2**20:.1f} MiB -> **{size / d:.3f} bytes/decision** total "
          f"(routing + tokens + catalog)")
    print("- routing_data columns (bytes/decision): " + ", ".join(f"{c} {b / d:.3f}" for c, b in sorted(cols.items())))
    print(f"- expert + weight (the packed `choices` list): **{cols.get('choices', 0) / d:.3f} bytes/decision**; "
          f"token_data {sum(tok.values()) / n_tokens:.2f} bytes/token")
    t_all = time_query(path, GROUP_BY, [results[-1]["run_id"]])
    print(f"- GROUP BY layer, expert over all {d / 1e6:.0f} M decisions via the routing view: {t_all * 1000:.0f} ms")

    # Dashboard query on a 10 M-decision run, in a store that also holds another run.
    n10 = 10_000_000 // (L * K) + 1
    path2 = work / "bench10m.duckdb"
    ingest(path2, make_blocks(n10, seed=1), name="other")
    r10 = ingest(path2, make_blocks(n10, seed=2), name="10M")
    q10 = time_query(path2, GROUP_BY, [r10["run_id"]])
    qcount = time_query(path2, "SELECT layer, expert, count(*) FROM routing WHERE run_id = ? GROUP BY ALL", [r10["run_id"]])
    qtop1 = time_query(path2, "SELECT layer, expert, count(*) FROM routing WHERE run_id = ? AND rank = 0 GROUP BY ALL",
                       [r10["run_id"]])
    print(f"\n## Dashboard queries on a {r10['decisions'] / 1e6:.1f} M-decision run (store holds 2 runs)")
    print(f"- `{GROUP_BY}`: **{q10 * 1000:.0f} ms**")
    print(f"- count(*) only: {qcount * 1000:.0f} ms; top-1 only (rank = 0): {qtop1 * 1000:.0f} ms")


def _rates(results: list[dict]) -> str:
    return ", ".join(f"{r['rate'] / 1e6:.1f}" for r in results)


def logits_benchmark(work: Path, n_tokens: int, repeats: int = 3) -> None:
    span = getattr(encode, "MAX_SPAN_BYTES", None)
    print(f"\n# MAX_SPAN_BYTES = {span}")
    print(f"# generating {n_tokens:,} tokens x {L} layers x top-{K} of {E} experts, with float16 router logits, "
          f"in blocks of {LOGIT_BLOCK:,} tokens ({LOGIT_BLOCK // LOGIT_SEQ} sequences x {LOGIT_SEQ:,}) ...", flush=True)
    blocks = make_logit_blocks(n_tokens)
    plain = [dataclasses.replace(b, logits=None) for b in blocks]
    token_layers = n_tokens * L
    logit_bytes = token_layers * E * 2
    with_l, without = [], []
    for rep in range(repeats):  # interleaved, so that both see the same neighbours on the shared box
        for blks, out, tag in ((blocks, with_l, "logits"), (plain, without, "plain")):
            path = work / f"{tag}{rep}.duckdb"
            res = ingest(path, blks)
            res["file"] = file_bytes(path)
            out.append(res)
            if rep + 1 < repeats:
                path.unlink()
    mid = lambda rs: sorted(rs, key=lambda r: r["rate"])[len(rs) // 2]  # noqa: E731
    rl, rp = mid(with_l), mid(without)
    d = rl["decisions"]
    path = work / f"logits{repeats - 1}.duckdb"
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.sql("SELECT count(*) FROM router_logits_data").fetchall()[0][0]
        total_blocks, free_blocks = con.sql(
            "SELECT total_blocks, free_blocks FROM pragma_database_size()").fetchall()[0]
    print(f"\n## Ingest with router logits ({n_tokens:,} tokens, {d:,} decisions, {token_layers:,} token-layers, "
          f"{logit_bytes / 1e6:,.0f} MB of raw logits, {len(blocks)} blocks of {LOGIT_BLOCK:,})")
    print(f"- with logits, median of {repeats}: {rl['seconds']:.2f} s -> **{rl['rate'] / 1e6:.1f} M decisions/s**, "
          f"**{logit_bytes / rl['seconds'] / 1e6:.0f} MB/s of logits**, {token_layers / rl['seconds'] / 1e6:.2f} M "
          f"token-layers/s (runs: {_rates(with_l)} M decisions/s; "
          f"{d / rl['cpu_s'] / 1e6:.1f} M decisions per CPU-second)")
    print(f"- same blocks without logits: {rp['seconds']:.2f} s -> {rp['rate'] / 1e6:.1f} M decisions/s "
          f"(runs: {_rates(without)})")
    print(f"- add_block calls returned after {rl['handover_s']:.2f} s in total (they wait while 1 GiB is queued)")
    extra = rl["file"] - rp["file"]
    print(f"- router_logits_data: {rows:,} rows; store file {rl['file'] / 2**20:,.0f} MiB with logits vs "
          f"{rp['file'] / 2**20:,.0f} MiB without -> logits take **{extra / token_layers:.1f} bytes per token-layer** "
          f"on disk (raw: {2 * E}); {free_blocks:,} of the file's {total_blocks:,} blocks are free")
    run_id = with_l[-1]["run_id"]
    store = Store.open(path, read_only=True)
    t0 = time.perf_counter()
    index, values = store.run(run_id).logits(L // 2)
    t_read = time.perf_counter() - t0
    assert values.shape == (n_tokens, E) and len(index) == n_tokens
    t_view = time_query(path, "SELECT count(*), sum(octet_length(logits)) FROM router_logits WHERE run_id = ? "
                              f"AND layer = {L // 2}", [run_id], repeat=3)
    print(f"- RunHandle.logits(layer) for one layer ({n_tokens:,} x {E}): {t_read:.2f} s; "
          f"count(*) and octet_length over the `router_logits` view, one layer: {t_view:.2f} s")


def span_sweep(work: Path, n_tokens: int, rounds: int = 2) -> None:
    """Router-logits ingest by the longest span a row may hold (encode.MAX_SPAN_BYTES) and flush pattern."""
    blocks = make_logit_blocks(n_tokens, seed=8)
    token_layers = n_tokens * L
    # ~1 s of an H100 tracing OLMoE; eager_rows=0: exactly these flushes, none earlier
    gpu_like = WriterConfig(flush_decisions=5 * LOGIT_BLOCK * L * K, eager_rows=0)
    caps = {2 * E: "1 token (a row per token)", 1024: "1 KiB (8 tokens)", 4096: "4 KiB (32 tokens)",
            16384: "16 KiB (128 tokens)", 0: f"whole spans ({LOGIT_SEQ:,} tokens, 256 KiB)"}
    saved = encode.MAX_SPAN_BYTES
    results: dict[tuple[int, str], list[dict]] = {}
    try:
        for _ in range(rounds):  # interleaved rounds: the box is shared
            for cap in caps:
                for flush, cfg in (("bulk", None), ("gpu", gpu_like)):
                    encode.MAX_SPAN_BYTES = cap
                    path = work / "span.duckdb"
                    for f in (path, Path(str(path) + ".wal")):
                        f.unlink(missing_ok=True)
                    res = ingest(path, blocks, cfg)
                    with duckdb.connect(str(path), read_only=True) as con:
                        res["rows"] = con.sql("SELECT count(*) FROM router_logits_data").fetchall()[0][0]
                        res["free"] = con.sql("SELECT free_blocks FROM pragma_database_size()").fetchall()[0][0]
                    res["file"] = file_bytes(path)
                    res["view"] = time_query(path, "SELECT count(*), sum(octet_length(logits)) FROM router_logits "
                                                   "WHERE run_id = ? AND layer = 0", [res["run_id"]], repeat=1)
                    results.setdefault((cap, flush), []).append(res)
    finally:
        encode.MAX_SPAN_BYTES = saved
    print(f"\n## Router logits: longest span per row ({n_tokens:,} tokens, {L} layers x {E} experts; "
          f"bulk = default WriterConfig, gpu = a flush every 5 blocks = {5 * LOGIT_BLOCK:,} tokens)")
    print("| MAX_SPAN_BYTES | rows | M decisions/s bulk | M decisions/s gpu | store bytes per token-layer (bulk / gpu) "
          "| free blocks (bulk / gpu) | `router_logits` view, count one layer |")
    print("|---|---|---|---|---|---|---|")
    for cap, label in caps.items():
        b, g = results[(cap, "bulk")], results[(cap, "gpu")]
        print(f"| {cap} = {label} | {b[-1]['rows']:,} | {_rates(b)} | {_rates(g)} | "
              f"{b[-1]['file'] / token_layers:.1f} / {g[-1]['file'] / token_layers:.1f} | "
              f"{b[-1]['free']:,} / {g[-1]['free']:,} | {min(r['view'] for r in b):.2f} s |", flush=True)


def flush_sensitivity(work: Path, n_tokens: int) -> None:
    blocks = make_blocks(n_tokens, seed=3)
    print(f"\n## Flush size ({n_tokens:,} tokens; the writer flushes every ~1 s or every N decisions)")
    print("| flush every | M decisions/s | bytes/decision (file) |")
    print("|---|---|---|")
    for n in (250_000, 1_000_000, 4_000_000, 16_000_000, 32_000_000):
        path = work / f"flush{n}.duckdb"
        res = ingest(path, blocks, WriterConfig(flush_interval_s=3600, flush_decisions=n, eager_rows=0))
        print(f"| {n / 1e6:g} M decisions | {res['rate'] / 1e6:.1f} | {file_bytes(path) / res['decisions']:.3f} |", flush=True)


# -- layout comparison: raw INSERT of one table per layout, no RunWriter ---------------------------

_D = "rl_half_to_float({})"


def _layouts(k: int) -> dict[str, tuple[str, str, str]]:
    """name -> (column DDL, Arrow builder key, routing view SELECT)."""
    base = "run_id INTEGER, layer SMALLINT, seq_id BIGINT, pos INTEGER"
    unnest = ("SELECT run_id, seq_id, pos, layer, rank, expert, {w} AS weight FROM (SELECT run_id, seq_id, pos, layer, "
              "unnest(range(len(experts)))::TINYINT AS rank, unnest(experts) AS expert, unnest(weights) AS w FROM r)")
    packed = ("SELECT run_id, seq_id, pos, layer, rank, (c >> 16)::SMALLINT AS expert, "
              f"{_D.format('c & 65535')} AS weight FROM (SELECT run_id, seq_id, pos, layer, "
              "unnest(range(len(choices)))::TINYINT AS rank, unnest(choices) AS c FROM r)")
    return {
        "tidy rows, weight FLOAT (fp16-rounded)": (f"{base}, rank TINYINT, expert SMALLINT, weight FLOAT", "tidy_f",
                                                   "SELECT * FROM r"),
        "tidy rows, weight fp16 bits USMALLINT": (f"{base}, rank TINYINT, expert SMALLINT, weight USMALLINT", "tidy_b",
                                                  f"SELECT * REPLACE ({_D.format('weight')} AS weight) FROM r"),
        f"row per (token, layer), ARRAY[{k}], weights FLOAT": (
            f"{base}, experts SMALLINT[{k}], weights FLOAT[{k}]", "fsl_f", unnest.format(w="w")),
        f"row per (token, layer), ARRAY[{k}], weights fp16 bits": (
            f"{base}, experts SMALLINT[{k}], weights USMALLINT[{k}]", "fsl_b", unnest.format(w=_D.format("w"))),
        "row per (token, layer), LIST, weights FLOAT": (
            f"{base}, experts SMALLINT[], weights FLOAT[]", "fsl_f", unnest.format(w="w")),
        "row per (token, layer), LIST, weights fp16 bits": (
            f"{base}, experts SMALLINT[], weights USMALLINT[]", "fsl_b", unnest.format(w=_D.format("w"))),
        f"row per (token, layer), one ARRAY[{k}] of packed UINTEGER (expert<<16 + fp16 bits)": (
            f"{base}, choices UINTEGER[{k}]", "packed", packed),
        "**row per (token, layer), one LIST of packed UINTEGER (expert<<16 + fp16 bits): chosen**": (
            f"{base}, choices UINTEGER[]", "packed", packed),
    }


def _arrow(kind: str, blocks: list[TokenBlock]) -> pa.Table:
    seq = np.concatenate([b.seq_id for b in blocks])
    pos = np.concatenate([b.pos for b in blocks])
    ex = np.concatenate([b.experts for b in blocks], axis=1).astype(np.int16)
    w16 = np.concatenate([b.weights for b in blocks], axis=1)
    n = seq.shape[0]
    cols = {"run_id": pa.array(np.ones(L * n * (K if kind.startswith("tidy") else 1), np.int32))}
    if kind.startswith("tidy"):
        cols.update(layer=np.repeat(np.arange(L, dtype=np.int16), n * K), seq_id=np.tile(np.repeat(seq, K), L),
                    pos=np.tile(np.repeat(pos, K), L), rank=np.tile(np.arange(K, dtype=np.int8), L * n),
                    expert=ex.reshape(-1),
                    weight=w16.reshape(-1).astype(np.float32) if kind == "tidy_f" else w16.reshape(-1).view(np.uint16))
        return pa.table(cols)
    cols.update(layer=np.repeat(np.arange(L, dtype=np.int16), n), seq_id=np.tile(seq, L), pos=np.tile(pos, L))
    if kind == "packed":
        cols["choices"] = pa.FixedSizeListArray.from_arrays(pa.array(pack_choices(ex, w16).reshape(-1)), K)
        return pa.table(cols)
    w = w16.reshape(-1).astype(np.float32) if kind == "fsl_f" else w16.reshape(-1).view(np.uint16)
    cols.update(layer=np.repeat(np.arange(L, dtype=np.int16), n), seq_id=np.tile(seq, L), pos=np.tile(pos, L),
                experts=pa.FixedSizeListArray.from_arrays(pa.array(ex.reshape(-1)), K),
                weights=pa.FixedSizeListArray.from_arrays(pa.array(w), K))
    return pa.table(cols)


def compare_layouts(work: Path, n_tokens: int, flush_tokens: int = 131072) -> None:
    blocks = make_blocks(n_tokens, seed=4)
    per_flush = flush_tokens // BLOCK
    nd = n_tokens * L * K
    n10 = 10_000_000 // (L * K)
    print(f"\n## Physical layouts compared ({nd / 1e6:.1f} M decisions; one connect/INSERT/close per "
          f"{flush_tokens * L * K / 1e6:.1f} M decisions; query over the first ~10 M decisions)")
    print("| layout | M decisions/s (Arrow build + INSERT + close) | M decisions per CPU-second | "
          "bytes/decision (file) | GROUP BY layer, expert, avg(weight) on 10 M |")
    print("|---|---|---|---|---|")
    macro = TABLES_DDL[TABLES_DDL.index("CREATE MACRO"):TABLES_DDL.index("CREATE VIEW")]
    for name, (ddl, kind, view) in _layouts(K).items():
        path = work / "layout.duckdb"
        for p in (path, Path(str(path) + ".wal")):
            p.unlink(missing_ok=True)
        with duckdb.connect(str(path)) as con:
            con.sql(f"CREATE TABLE r({ddl}); {macro}")
            con.sql(f"CREATE VIEW routing AS {view}")
        t0, c0 = time.perf_counter(), _cpu_s()
        for i in range(0, len(blocks), per_flush):
            tbl = _arrow(kind, blocks[i:i + per_flush])
            with duckdb.connect(str(path)) as con:
                con.register("batch", tbl)
                con.sql("INSERT INTO r SELECT * FROM batch")
        dt, cpu = time.perf_counter() - t0, _cpu_s() - c0
        size = file_bytes(path)
        with duckdb.connect(str(path), read_only=True) as con:
            con.sql("SET enable_progress_bar = false")
            con.sql(f"CREATE TEMP VIEW first10m AS SELECT * FROM routing WHERE seq_id < {n10 // SEQ_LEN}")
            times = []
            for _ in range(3):
                t1 = time.perf_counter()
                con.sql("SELECT layer, expert, count(*), avg(weight) FROM first10m GROUP BY ALL").fetchall()
                times.append(time.perf_counter() - t1)
        print(f"| {name} | {nd / dt / 1e6:.1f} | {nd / cpu / 1e6:.1f} | {size / nd:.3f} | {min(times) * 1000:.0f} ms |",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--skip-compare", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--logit-tokens", type=int, default=1 << 20, help="0: skip the router-logits case")
    ap.add_argument("--logits-only", action="store_true", help="run only the router-logits case")
    ap.add_argument("--logit-repeats", type=int, default=3)
    ap.add_argument("--span-sweep", action="store_true", help="only the router-logits span-size sweep")
    ap.add_argument("--max-span-bytes", type=int, default=None,
                    help="override routelens.store.encode.MAX_SPAN_BYTES (0: spans are never cut)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="routelens-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# routelens store ingest benchmark: duckdb {duckdb.__version__}, numpy {np.__version__}, "
          f"pyarrow {pa.__version__}, {os.cpu_count()} CPUs")
    try:
        if args.max_span_bytes is not None:
            encode.MAX_SPAN_BYTES = args.max_span_bytes
        if args.span_sweep:
            span_sweep(work, args.logit_tokens // 2)
            return
        if args.logits_only:
            logits_benchmark(work, args.logit_tokens, args.logit_repeats)
            return
        main_benchmark(work, args.tokens)
        if args.logit_tokens:
            logits_benchmark(work, args.logit_tokens, args.logit_repeats)
        if not args.skip_compare:
            flush_sensitivity(work, 262144)
            compare_layouts(work, 262144)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
