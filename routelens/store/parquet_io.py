"""Parquet export/import of runs: the exchange format between stores, nodes and other engines.

Layout of one exported run (hive-style, readable by DuckDB, Spark, Ray Data, pyarrow)::

    DIR/run_uuid=<uuid>/manifest/<part>.json           written last: its presence marks the part complete
    DIR/run_uuid=<uuid>/runs/<part>.parquet            one row: the runs row without run_id
    DIR/run_uuid=<uuid>/sequences/<part>.parquet
    DIR/run_uuid=<uuid>/tokens/<part>.parquet              seq_id, pos, token_id, token (text), generated
    DIR/run_uuid=<uuid>/vocab/<part>.parquet               token_id, token
    DIR/run_uuid=<uuid>/routing/layer=<L>/<part>.parquet   tidy: seq_id, pos, rank, expert, weight (FLOAT)
    DIR/run_uuid=<uuid>/logits/layer=<L>/<part>.parquet    seq_id, pos, logits (BLOB, E x '<f2'): one row per
                                                           token, as in the router_logits view (the store keeps
                                                           spans of positions; import rebuilds them)
    DIR/run_uuid=<uuid>/residual/<part>.parquet
    DIR/run_uuid=<uuid>/expert_stats/<part>.parquet

``<part>`` is ``part-<shards>`` (e.g. ``part-0``; ``part-0_1`` for a run holding shards 0 and 1), so the
shards of one run, exported on different nodes, can be copied into one DIR without clashing. All files
use zstd; no file contains run_id (local to a store) -- the run is identified by run_uuid.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from routelens.errors import StoreError
from routelens.records import RunInfo, TokenBlock
from routelens.store import catalog
from routelens.store.connection import session, transaction
from routelens.store.encode import logits_table, pack_choices, routing_table
from routelens.store.schema import RUN_COLUMNS, SCHEMA_VERSION
from routelens.store.writer import insert_arrow, insert_vocab

FORMAT = "routelens-export"
_PARQUET = "(FORMAT parquet, COMPRESSION zstd)"
_SIMPLE_TABLES = {  # export folder -> (store table, ORDER BY); tokens and vocab are handled apart
    "sequences": ("sequences", "seq_id"),
    "residual": ("residual_max", "seq_id, pos, layer"),
    "expert_stats": ("expert_stats", "layer, expert"),
}


def _q(path: Path) -> str:
    """A path as a SQL string literal."""
    return "'" + str(path).replace("'", "''") + "'"


def _not_export(directory: Path, why: str) -> StoreError:
    return StoreError(f"{directory} is not a routelens export ({why}); pass a directory written by "
                      "Store.export_run / `routelens export`")


# -- export ---------------------------------------------------------------------------------------


def export_run(db_path: Path, info: RunInfo, directory: Path) -> Path:
    root = directory / f"run_uuid={info.run_uuid}"
    part = "part-" + "_".join(str(s) for s in sorted(info.shards))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot export to {directory}: {exc.strerror}; pass a writable folder") from None
    for stale in root.rglob(f"{part}.*"):  # a re-export replaces this part, nothing else
        stale.unlink()
    rid = int(info.run_id)
    files: list[str] = []

    def copy(con, select: str, rel: str) -> None:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        con.sql(f"COPY ({select}) TO {_q(target)} {_PARQUET}")
        files.append(rel)

    with session(db_path, read_only=True) as con:
        copy(con, f"SELECT * EXCLUDE (run_id) FROM runs WHERE run_id = {rid}", f"runs/{part}.parquet")
        for folder, (table, order) in _SIMPLE_TABLES.items():
            if _count(con, table, rid):
                copy(con, f"SELECT * EXCLUDE (run_id) FROM {table} WHERE run_id = {rid} ORDER BY {order}",
                     f"{folder}/{part}.parquet")
        if _count(con, "token_data", rid):  # with the token text, for readers that never see vocab
            copy(con, "SELECT seq_id, pos, token_id, token, generated FROM tokens "
                      f"WHERE run_id = {rid} ORDER BY seq_id, pos", f"tokens/{part}.parquet")
        if _count(con, "vocab", rid):
            copy(con, f"SELECT token_id, token FROM vocab WHERE run_id = {rid} ORDER BY token_id",
                 f"vocab/{part}.parquet")
        for layer in _layers(con, "routing_data", rid):
            copy(con, "SELECT seq_id, pos, rank, expert, weight FROM routing "
                      f"WHERE run_id = {rid} AND layer = {layer} ORDER BY seq_id, pos, rank",
                 f"routing/layer={layer}/{part}.parquet")
        for layer in _layers(con, "router_logits_data", rid):
            # one row per token, cut from the stored spans by the router_logits view
            copy(con, "SELECT seq_id, pos, logits FROM router_logits "
                      f"WHERE run_id = {rid} AND layer = {layer} ORDER BY seq_id, pos",
                 f"logits/layer={layer}/{part}.parquet")
        shards_complete = con.sql(f"SELECT shards_complete FROM runs WHERE run_id = {rid}").fetchall()[0][0]
    manifest = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "run_uuid": info.run_uuid,
        "part": part, "shards": sorted(info.shards), "shards_complete": sorted(shards_complete),
        "num_shards": info.num_shards, "status": info.status, "top_k": info.top_k,
        "num_experts": info.num_experts, "n_sequences": info.n_sequences, "n_tokens": info.n_tokens,
        "n_decisions": info.n_decisions, "weights": "float16-rounded FLOAT", "files": files,
        "exported_at": datetime.now(timezone.utc).isoformat(),
    }
    (root / "manifest").mkdir(exist_ok=True)
    tmp = root / "manifest" / f".{part}.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / "manifest" / f"{part}.json")
    return root


def _count(con, table: str, rid: int) -> int:
    return con.sql(f"SELECT count(*) FROM (SELECT 1 FROM {table} WHERE run_id = {rid} LIMIT 1)").fetchall()[0][0]


def _layers(con, table: str, rid: int) -> list[int]:
    return [r[0] for r in con.sql(f"SELECT DISTINCT layer FROM {table} WHERE run_id = {rid} "
                                  "ORDER BY layer").fetchall()]


# -- import ---------------------------------------------------------------------------------------


@dataclass
class _Part:
    root: Path  # the run_uuid=... folder
    name: str  # part-<shards>
    manifest: dict
    info: RunInfo  # from runs/<part>.parquet
    shards_complete: tuple[int, ...]

    def file(self, rel: str) -> Path:
        return self.root / rel

    def layer_files(self, kind: str) -> dict[int, Path]:
        out = {}
        for f in self.root.glob(f"{kind}/layer=*/{self.name}.parquet"):
            out[int(f.parent.name.split("=", 1)[1])] = f
        return out


def _read_manifests(directory: Path) -> list[tuple[Path, dict]]:
    if not directory.is_dir():
        raise _not_export(directory, "not a directory" if directory.exists() else "it does not exist")
    if directory.name.startswith("run_uuid="):
        found = sorted(directory.glob("manifest/part-*.json"))
    else:
        found = sorted(directory.glob("run_uuid=*/manifest/part-*.json"))
    if not found:
        raise _not_export(directory, "no run_uuid=*/manifest/part-*.json inside")
    out = []
    for f in found:
        try:
            manifest = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise _not_export(directory, f"unreadable manifest {f.name}: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
                or not re.fullmatch(r"part-[0-9]+(_[0-9]+)*", str(manifest.get("part"))) \
                or f.stem != manifest["part"]:
            raise _not_export(directory, f"{f} is not a {FORMAT} manifest")
        if int(manifest.get("schema_version", 0)) > SCHEMA_VERSION:
            raise StoreError(f"export {f.parent.parent} has schema v{manifest['schema_version']}, newer than "
                             f"this routelens (v{SCHEMA_VERSION}); upgrade routelens")
        out.append((f.parent.parent, manifest))
    return out


def _load_part(con: duckdb.DuckDBPyConnection, root: Path, manifest: dict) -> _Part:
    name = manifest["part"]
    runs_file = root / "runs" / f"{name}.parquet"
    missing = [rel for rel in manifest.get("files", []) if not (root / rel).is_file()]
    if missing or not runs_file.is_file():
        raise StoreError(f"export {root} is incomplete (missing {(missing or [runs_file.name])[0]}); "
                         "export the run again")
    cols = [c for c in RUN_COLUMNS if c != "run_id"]
    rows = con.sql(f"SELECT {', '.join(cols)} FROM read_parquet({_q(runs_file)}, hive_partitioning = false)"
                   ).fetchall()
    if len(rows) != 1:
        raise StoreError(f"export {root}: {runs_file.name} must hold exactly one run; export the run again")
    row = dict(zip(cols, rows[0]), run_id=-1)
    info = catalog.row_to_info(row)
    if info.run_uuid != manifest["run_uuid"] or root.name != f"run_uuid={info.run_uuid}":
        raise StoreError(f"export {root}: folder, manifest and runs file name different run_uuids; "
                         "do not rename export folders")
    return _Part(root, name, manifest, info, tuple(row["shards_complete"]))


def _check_parts(uuid: str, parts: list[_Part], con: duckdb.DuckDBPyConnection) -> None:
    seen: dict[int, Path] = {}
    for p in parts:
        for s in p.info.shards:
            if s in seen:
                raise StoreError(f"shard {s} of run {uuid} is given twice ({seen[s]} and {p.root}); "
                                 "pass each shard's export once")
            seen[s] = p.root
        catalog.check_same_run(parts[0].info, p.info, "the shard exports")
    if len(parts) > 1:
        selects = []
        for i, p in enumerate(parts):
            for rel in ("sequences", "tokens"):
                f = p.file(f"{rel}/{p.name}.parquet")
                if f.is_file():
                    selects.append(f"SELECT DISTINCT seq_id, {i} AS part FROM "
                                   f"read_parquet({_q(f)}, hive_partitioning = false)")
        if selects:
            clash = con.sql(f"SELECT seq_id, list(DISTINCT part ORDER BY part) FROM ({' UNION ALL '.join(selects)}) "
                            "GROUP BY seq_id HAVING count(DISTINCT part) > 1 ORDER BY seq_id LIMIT 1").fetchall()
            if clash:
                a, b = clash[0][1][:2]
                raise StoreError(f"shards {list(parts[a].info.shards)} and {list(parts[b].info.shards)} of run "
                                 f"{uuid} both contain seq_id {clash[0][0]}; shards must hold disjoint seq_ids")


def _merged_info(parts: list[_Part]) -> tuple[RunInfo, tuple[int, ...]]:
    parts = sorted(parts, key=lambda p: min(p.info.shards))
    info = parts[0].info
    info.shards = tuple(sorted(s for p in parts for s in p.info.shards))
    info.created_at = min(p.info.created_at for p in parts)
    finished = [p.info.finished_at for p in parts]
    info.finished_at = None if None in finished else max(finished)
    complete = tuple(sorted(s for p in parts for s in p.shards_complete))
    return info, complete


def _import_routing(con: duckdb.DuckDBPyConnection, run_id: int, part: _Part, top_k: int) -> None:
    for layer, f in sorted(part.layer_files("routing").items()):
        t = con.sql(f"SELECT seq_id, pos, rank, expert, weight FROM read_parquet({_q(f)}, hive_partitioning = false) "
                    "ORDER BY seq_id, pos, rank").fetchnumpy()
        n = len(t["rank"])
        ranks = np.asarray(t["rank"]).reshape(-1, top_k) if n % top_k == 0 else None
        if ranks is None or not np.array_equal(ranks, np.broadcast_to(np.arange(top_k), ranks.shape)):
            raise StoreError(f"export file {f} does not hold ranks 0..{top_k - 1} for every token; "
                             "export the run again")
        seq = np.asarray(t["seq_id"], np.int64).reshape(-1, top_k)
        pos = np.asarray(t["pos"], np.int32).reshape(-1, top_k)
        if not ((seq == seq[:, :1]).all() and (pos == pos[:, :1]).all()):
            raise StoreError(f"export file {f} does not hold ranks 0..{top_k - 1} for every token; "
                             "export the run again")
        seq, pos = seq[:, 0], pos[:, 0]
        choices = pack_choices(np.asarray(t["expert"]).reshape(-1, top_k),
                               np.asarray(t["weight"], np.float32).reshape(-1, top_k))
        table = routing_table(np.full(len(seq), layer, np.int16), seq, pos, choices)
        insert_arrow(con, "routing_data", run_id, table)


def _import_logits(con: duckdb.DuckDBPyConnection, run_id: int, part: _Part, num_experts: int) -> None:
    """Per-token logits files -> router_logits_data spans (consecutive positions), a batch of rows at a time."""
    width = 2 * num_experts
    for layer, f in sorted(part.layer_files("logits").items()):
        reader = con.sql(f"SELECT seq_id, pos, logits FROM read_parquet({_q(f)}, hive_partitioning = false) "
                         "ORDER BY seq_id, pos").to_arrow_reader(1 << 20)
        tables = []
        for batch in reader:  # each batch's BLOBs lie back to back in one buffer: spans are slices of it
            blobs = batch.column(2)
            if len(blobs) == 0:
                continue
            offset_type = np.int64 if pa.types.is_large_binary(blobs.type) else np.int32
            offsets = np.frombuffer(blobs.buffers()[1], offset_type)[blobs.offset: blobs.offset + len(blobs) + 1]
            if blobs.null_count or not np.all(np.diff(offsets) == width):
                raise StoreError(f"export file {f} holds logits that are not {num_experts} float16 values per "
                                 "token; export the run again")
            data = np.frombuffer(blobs.buffers()[2], np.uint8, count=int(offsets[-1] - offsets[0]),
                                 offset=int(offsets[0]))
            block = TokenBlock(seq_id=batch.column(0).to_numpy().astype(np.int64),
                               pos=batch.column(1).to_numpy().astype(np.int32), token_id=np.zeros(0, np.int32),
                               layers=(layer,), experts=np.zeros((1, 0, 0), np.uint16),
                               weights=np.zeros((1, 0, 0), np.float16),
                               logits=data.view("<f2").reshape(1, len(blobs), num_experts))
            tables.append(logits_table((layer,), [block]))
        # inserted after the reader is done: the connection runs one statement at a time
        for table in tables:
            insert_arrow(con, "router_logits_data", run_id, table)


def _merge_expert_stats(con: duckdb.DuckDBPyConnection, run_id: int) -> None:
    """Shards profile disjoint tokens: sum the counts, keep the largest extreme and its location."""
    dup = con.sql(f"SELECT count(*) > count(DISTINCT (layer, expert)) FROM expert_stats WHERE run_id = {run_id}"
                  ).fetchall()[0][0]
    if not dup:
        return
    merged = con.sql(f"""
        SELECT layer, expert, sum(n_tokens)::BIGINT AS n_tokens,
               max(max_out) AS max_out, arg_max(max_out_seq, max_out) AS max_out_seq,
               arg_max(max_out_pos, max_out) AS max_out_pos, arg_max(max_out_channel, max_out) AS max_out_channel,
               max(max_in) AS max_in, arg_max(max_in_seq, max_in) AS max_in_seq,
               arg_max(max_in_pos, max_in) AS max_in_pos, arg_max(max_in_channel, max_in) AS max_in_channel
        FROM expert_stats WHERE run_id = {run_id} GROUP BY layer, expert""").to_arrow_table()
    con.sql(f"DELETE FROM expert_stats WHERE run_id = {run_id}")
    insert_arrow(con, "expert_stats", run_id, merged)


def _import_run(con: duckdb.DuckDBPyConnection, uuid: str, parts: list[_Part]) -> int:
    info, complete = _merged_info(parts)
    run_id = catalog.add_run_or_shard(con, info, complete)
    for p in parts:
        for folder, (table, _) in _SIMPLE_TABLES.items():
            f = p.file(f"{folder}/{p.name}.parquet")
            if f.is_file():
                con.sql(f"INSERT INTO {table} BY NAME SELECT {run_id} AS run_id, * "
                        f"FROM read_parquet({_q(f)}, hive_partitioning = false)")
        tokens = p.file(f"tokens/{p.name}.parquet")
        if tokens.is_file():
            con.sql(f"INSERT INTO token_data (run_id, seq_id, pos, token_id, generated) SELECT {run_id}, seq_id, pos, "
                    f"token_id, generated FROM read_parquet({_q(tokens)}, hive_partitioning = false)")
        vocab = p.file(f"vocab/{p.name}.parquet")
        if vocab.is_file():  # shards share a tokenizer: insert_vocab skips the ids already there
            insert_vocab(con, run_id, con.sql(f"SELECT token_id, token FROM read_parquet({_q(vocab)}, "
                                              "hive_partitioning = false)").to_arrow_table())
        _import_routing(con, run_id, p, info.top_k)
        _import_logits(con, run_id, p, info.num_experts)
    # Rows from the exports plus any already stored for this run_uuid: a seq_id twice means overlap.
    twice = con.sql(f"""SELECT seq_id FROM (
                           SELECT seq_id FROM sequences WHERE run_id = {run_id} GROUP BY seq_id HAVING count(*) > 1
                           UNION ALL
                           SELECT seq_id FROM token_data WHERE run_id = {run_id} GROUP BY seq_id, pos HAVING count(*) > 1)
                       ORDER BY seq_id LIMIT 1""").fetchall()
    if twice:
        raise StoreError(f"importing run {uuid} would store seq_id {twice[0][0]} twice (it is already in this "
                         "store); shards must hold disjoint seq_ids")
    _merge_expert_stats(con, run_id)
    con.sql(f"""UPDATE runs SET
                  n_sequences = (SELECT count(*) FROM sequences WHERE run_id = {run_id}),
                  n_tokens = (SELECT count(*) FROM token_data WHERE run_id = {run_id}),
                  n_decisions = (SELECT coalesce(sum(len(choices)), 0) FROM routing_data WHERE run_id = {run_id})
                WHERE run_id = {run_id}""")
    return run_id


def import_runs(db_path: Path, directories: list[Path]) -> list[RunInfo]:
    if not directories:
        raise StoreError("import_runs needs at least one export directory; pass the folders written by export_run")
    found: dict[Path, tuple[Path, dict]] = {}
    for d in directories:
        for root, manifest in _read_manifests(d):
            found[(root / "manifest" / manifest.get("part", "")).resolve()] = (root, manifest)
    groups: dict[str, list[tuple[Path, dict]]] = defaultdict(list)
    for root, manifest in found.values():
        groups[manifest["run_uuid"]].append((root, manifest))
    run_ids = []
    with session(db_path, read_only=False) as con:
        for uuid, members in groups.items():
            parts = [_load_part(con, root, m) for root, m in members]
            _check_parts(uuid, parts, con)
            with transaction(con):
                run_ids.append(_import_run(con, uuid, parts))
        return [catalog.row_to_info(catalog.read_run_row(con, rid)) for rid in run_ids]
