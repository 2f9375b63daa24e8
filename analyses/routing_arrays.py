"""A run's routing as compact numpy arrays, the input of every analysis.

Read straight from ``routing_data`` (schema v1, ``routelens/store/schema.py``): one packed ``expert << 16 |
float16 bits`` per decision, unpacked with numpy. Experts are the **executed** top-k in rank order (rank 0 =
largest weight), so DeepSeek-V3's bias-corrected choice is what analyses see (algorithms.md §1.1 note).

Memory: experts are ``uint8`` when E <= 256 (else ``uint16``): 1 byte per decision, under the store's 2.8; weights
(float16, 2 bytes) only on request.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa

from routelens.errors import StoreError
from routelens.records import RunInfo
from routelens.store.connection import session

__all__ = ["RoutingArrays", "load_routing", "expert_dtype"]


def expert_dtype(num_experts: int):
    return np.uint8 if num_experts <= 256 else np.uint16


@dataclass
class RoutingArrays:
    """Routing of one run over ``layers``, tokens ordered by (seq_id, pos) and aligned across layers.

    ``experts[l, n, r]``: expert at rank r of token n in MoE layer ``layers[l]`` (uint8/uint16);
    ``weights[l, n, r]``: its routing weight (float16), or None when not loaded.
    ``seq_start``: index of the first token of each sequence (``seq_ids[i]`` starts at ``seq_start[i]``), plus
    a final entry N, so sequence i is ``slice(seq_start[i], seq_start[i + 1])``.
    """

    info: RunInfo
    layers: tuple[int, ...]
    seq_id: np.ndarray  # int64 [N]
    pos: np.ndarray  # int32 [N]
    experts: np.ndarray  # [L, N, k]
    weights: np.ndarray | None  # float16 [L, N, k]
    token_id: np.ndarray | None = None  # int32 [N], when loaded

    @property
    def num_experts(self) -> int:
        return self.info.num_experts

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def n_tokens(self) -> int:
        return int(self.seq_id.shape[0])

    @property
    def seq_ids(self) -> np.ndarray:
        return self.seq_id[self.seq_start[:-1]]

    @property
    def seq_start(self) -> np.ndarray:
        if self.n_tokens == 0:
            return np.zeros(1, np.int64)
        change = np.flatnonzero(np.diff(self.seq_id)) + 1
        return np.concatenate([[0], change, [self.n_tokens]]).astype(np.int64)

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise StoreError(f"layer {layer} is not among the loaded MoE layers {list(self.layers)}") from None


def _unpack(choices: pa.ChunkedArray, k: int, num_experts: int, with_weights: bool):
    flat = pa.chunked_array([c.flatten() for c in choices.chunks], type=pa.uint32()).to_numpy()
    packed = flat.reshape(-1, k)
    experts = (packed >> 16).astype(expert_dtype(num_experts))
    weights = (packed & 0xFFFF).astype(np.uint16).view(np.float16) if with_weights else None
    return experts, weights


def load_routing(store, run: RunInfo, layers: Iterable[int] | None = None, *, weights: bool = False,
                 tokens: bool = False, seq_ids: Iterable[int] | None = None) -> RoutingArrays:
    """Load ``run``'s routing (all MoE layers by default) from ``store`` (a Store) as RoutingArrays."""
    info = run
    wanted = tuple(info.moe_layers) if layers is None else tuple(int(l) for l in layers)
    unknown = sorted(set(wanted) - set(info.moe_layers))
    if unknown:
        raise StoreError(f"layer {unknown} is not a traced MoE layer of run {info.run_id} (MoE layers: "
                         f"{list(info.moe_layers)}); layers are decoder-layer indices")
    seq_filter = ""
    params: dict = {"run": info.run_id}
    if seq_ids is not None:
        ids = sorted({int(s) for s in seq_ids})
        seq_filter = " AND list_contains($seqs, seq_id)"
        params["seqs"] = ids
    k = info.top_k
    experts = weights_arr = None  # [L, N, k], allocated once the first layer gives N (no stacking copy)
    seq = pos = None
    # One short-lived connection per layer: DuckDB keeps the blocks it read cached for the connection's life, so
    # a single connection over 16 layers would hold most of the file in memory (measured: +0.9 GiB for 1 M tokens).
    for li, layer in enumerate(wanted):
        with session(store.path, read_only=True) as con:
            con.sql("SET threads = 1")  # lower peak memory; the unpacking, not the scan, is the bottleneck
            tbl = con.sql("SELECT seq_id, pos, choices FROM routing_data WHERE run_id = $run AND layer = $layer"
                          f"{seq_filter}", params={**params, "layer": layer}).to_arrow_table()
        s = tbl.column("seq_id").to_numpy()
        p = tbl.column("pos").to_numpy()
        # rows come in insertion order, which is (seq_id, pos) order for a prefill trace; sort here only when not:
        # a numpy argsort costs far less memory than DuckDB's ORDER BY over the list column
        key = (s.astype(np.int64) << 32) | p.astype(np.int64)
        order = None if (len(key) < 2 or bool((np.diff(key) > 0).all())) else np.argsort(key, kind="stable")
        if order is not None:
            s, p = s[order], p[order]
        if seq is None:
            seq, pos = s.astype(np.int64), p.astype(np.int32)
        elif len(s) != len(seq) or not (np.array_equal(s, seq) and np.array_equal(p, pos)):
            raise StoreError(f"run {info.run_id}: layer {layer} holds other tokens than layer {wanted[0]}; "
                             "the run is damaged or incomplete, re-trace it")
        e, w = _unpack(tbl.column("choices"), k, info.num_experts, weights)
        del tbl
        if order is not None:
            e = e[order]
            w = None if w is None else w[order]
        if experts is None:
            experts = np.empty((len(wanted),) + e.shape, e.dtype)
            weights_arr = np.empty((len(wanted),) + e.shape, np.float16) if weights else None
        experts[li] = e
        if weights:
            weights_arr[li] = w
        del e, w
    tok = None
    if tokens:
        with session(store.path, read_only=True) as con:
            t = con.sql(f"SELECT seq_id, pos, token_id FROM token_data WHERE run_id = $run{seq_filter} "
                        "ORDER BY seq_id, pos", params=params).to_arrow_table()
        if seq is not None and not (np.array_equal(t.column("seq_id").to_numpy(), seq)
                                    and np.array_equal(t.column("pos").to_numpy(), pos)):
            raise StoreError(f"run {info.run_id}: tokens and routing disagree; the run is damaged, re-trace it")
        tok = t.column("token_id").to_numpy().astype(np.int32)
    if seq is None:
        seq, pos = np.zeros(0, np.int64), np.zeros(0, np.int32)
    if experts is None:
        experts = np.zeros((0, len(seq), k), expert_dtype(info.num_experts))
    return RoutingArrays(info, wanted, seq, pos, experts, weights_arr, tok)
