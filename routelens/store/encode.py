"""numpy records -> Arrow tables in the physical layout of the store (no DuckDB here).

The writer thread calls :func:`encode_blocks` on the blocks of a flush (in one or a few groups: while the
previous flush inserts, blocks already waiting are encoded), outside the file lock, so that the lock is
held only for the INSERTs. Everything is built from contiguous numpy buffers that Arrow wraps without a
copy; DuckDB then reads the Arrow tables directly (`INSERT ... SELECT FROM <registered table>`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from routelens.errors import StoreError
from routelens.records import ExpertStat, SequenceRecord, TokenBlock

MAX_EXPERTS = 32767  # the routing view returns expert as SMALLINT


@dataclass
class EncodedBatch:
    """Arrow tables for one flush; None where no block carried that kind of data."""

    routing: pa.Table | None  # layer, seq_id, pos, choices (fixed-size list of packed uint32)
    tokens: pa.Table | None  # seq_id, pos, token_id, generated
    logits: pa.Table | None  # layer, seq_id, pos_start, n, logits (large binary, n x E x '<f2')
    residual: pa.Table | None  # seq_id, pos, layer, value, channel
    n_tokens: int
    n_decisions: int


def block_nbytes(block: TokenBlock) -> int:
    """Host memory a queued block pins (what the writer's bounded queue counts)."""
    arrays = (block.seq_id, block.pos, block.token_id, block.experts, block.weights, block.logits,
              block.residual_max, block.residual_channel, block.generated)
    return sum(a.nbytes for a in arrays if a is not None)


def validate_block(block: TokenBlock, *, top_k: int, num_experts: int, moe_layers: Sequence[int]) -> None:
    """Reject a malformed block in the caller's thread, before it is queued, with one line."""
    n = block.n_tokens
    layers = tuple(int(x) for x in block.layers)

    def bad(what: str) -> StoreError:
        return StoreError(f"TokenBlock rejected: {what}; fix the tracer that built it")

    for name in ("pos", "token_id"):
        if getattr(block, name).shape != (n,):
            raise bad(f"{name} has shape {getattr(block, name).shape}, expected ({n},) like seq_id")
    if not layers or list(layers) != sorted(set(layers)):
        raise bad(f"layers {layers} must be a non-empty ascending tuple of decoder-layer indices")
    unknown = sorted(set(layers) - set(moe_layers))
    if unknown:
        raise bad(f"layers {unknown} are not MoE layers of this run ({list(moe_layers)})")
    want = (len(layers), n, top_k)
    if block.experts.shape != want:
        raise bad(f"experts has shape {block.experts.shape}, expected {want} (layers, tokens, top_k)")
    if block.weights.shape != want:
        raise bad(f"weights has shape {block.weights.shape}, expected {want}")
    if block.experts.dtype.kind not in "iu":
        raise bad(f"experts has dtype {block.experts.dtype}, expected an integer type")
    if block.experts.size and (int(block.experts.max()) >= num_experts or int(block.experts.min()) < 0):
        raise bad(f"experts holds ids outside 0..{num_experts - 1} (num_experts={num_experts})")
    if block.weights.dtype.kind != "f":
        raise bad(f"weights has dtype {block.weights.dtype}, expected float16 or float32")
    if block.logits is not None and block.logits.shape != (len(layers), n, num_experts):
        raise bad(f"logits has shape {block.logits.shape}, expected {(len(layers), n, num_experts)}")
    if block.residual_max is not None:
        shape = (len(block.residual_layers), n)
        if block.residual_max.shape != shape or block.residual_channel is None \
                or block.residual_channel.shape != shape:
            raise bad(f"residual_max/residual_channel must both have shape {shape}")
    if block.generated is not None and block.generated.shape != (n,):
        raise bad(f"generated has shape {block.generated.shape}, expected ({n},)")


def half_bits(weights: np.ndarray) -> np.ndarray:
    """Float weights -> uint16 bit patterns of their float16 rounding."""
    return np.ascontiguousarray(weights, dtype=np.float16).view(np.uint16)


def pack_choices(experts: np.ndarray, weights: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(expert, weight) -> one uint32 per decision: ``expert << 16 | float16 bits of weight``.

    One list column instead of two makes DuckDB's INSERT ~1.7x faster (one set of list offsets, one
    child column to bit-pack); with the expert in the high bits the frame-of-reference bit-packing
    still needs only ~log2(E) + 16 bits. See benchmarks/results/store_ingest.md.
    """
    if out is None:
        out = np.empty(experts.shape, np.uint32)
    np.left_shift(experts, 16, out=out, dtype=np.uint32, casting="unsafe")
    np.bitwise_or(out, half_bits(weights), out=out, dtype=np.uint32)
    return out


def routing_table(layer: np.ndarray, seq_id: np.ndarray, pos: np.ndarray, choices: np.ndarray) -> pa.Table:
    """One row per (token, layer); ``choices`` is [rows, k] packed decisions in rank order."""
    k = choices.shape[-1]
    flat = np.ascontiguousarray(choices, dtype=np.uint32).reshape(-1)
    return pa.table({
        "layer": pa.array(np.asarray(layer, dtype=np.int16)),
        "seq_id": pa.array(np.asarray(seq_id, dtype=np.int64)),
        "pos": pa.array(np.asarray(pos, dtype=np.int32)),
        # Fixed-size list: zero-copy from numpy; DuckDB casts it to the LIST column on INSERT.
        "choices": pa.FixedSizeListArray.from_arrays(pa.array(flat), k),
    })


# Longest span stored in one router_logits_data row, in bytes of logits (n x E x 2): a span is cut
# after MAX_SPAN_BYTES // (2E) tokens (at least one), 0 = never cut. Measured with the RunWriter
# (benchmarks/results/store_ingest.md, "Router logits"): DuckDB's INSERT costs per byte, hardly per
# row, and BLOBs of a few KiB and more ingest slower (whole 2,048-token spans: 256 KiB BLOBs, about
# half the rate) and make the router_logits view slow (slicing a big BLOB per token). 1 KiB rows were
# as fast as any and 2 % smaller on disk than a row per token.
MAX_SPAN_BYTES = 1024


def logit_spans(seq_id: np.ndarray, pos: np.ndarray, max_tokens: int = 0
                ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Split one block's rows into spans: maximal runs of consecutive positions of one sequence.

    Returns ``(order, starts, lengths)``: ``order`` is None when the rows are already grouped by
    sequence with ascending positions, else the permutation sorting them by (seq_id, pos) (stable, so
    duplicate rows keep their order); ``starts``/``lengths`` index the rows in that order. A span is
    also cut every ``max_tokens`` rows when ``max_tokens`` > 0.
    """
    n = int(seq_id.shape[0])
    if n == 0:
        empty = np.zeros(0, np.int64)
        return None, empty, empty
    same = seq_id[1:] == seq_id[:-1]
    order = None
    if not (np.all(pos[1:][same] > pos[:-1][same]) and _groups_unique(seq_id, same)):
        order = np.lexsort((pos, seq_id))
        seq_id, pos = seq_id[order], pos[order]
        same = seq_id[1:] == seq_id[:-1]
    cut = np.empty(n, bool)
    cut[0] = True
    np.logical_or(~same, pos[1:] != pos[:-1] + 1, out=cut[1:])
    starts = np.flatnonzero(cut)
    lengths = np.diff(starts, append=n)
    if max_tokens > 0 and int(lengths.max()) > max_tokens:
        pieces = -(-lengths // max_tokens)
        which = np.repeat(np.arange(len(starts)), pieces)
        k = np.arange(len(which)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        starts = starts[which] + k * max_tokens
        lengths = np.minimum(lengths[which] - k * max_tokens, max_tokens)
    return order, starts, lengths


def _groups_unique(seq_id: np.ndarray, same: np.ndarray) -> bool:
    """Each sequence's rows form one contiguous group."""
    heads = seq_id[np.flatnonzero(np.concatenate(([True], ~same)))]
    return len(heads) == 1 or len(np.unique(heads)) == len(heads)


def logits_table(layers: tuple[int, ...], blocks: list[TokenBlock], max_span_bytes: int | None = None
                 ) -> pa.Table | None:
    """router_logits_data rows for the blocks' logits: one per (layer, span); block by block, layer-major.

    A span's BLOB is the contiguous slice ``logits[l, start:start + n, :]`` of its block (rows sorted by
    (seq_id, pos) first where they are not), so each block becomes one Arrow record batch whose LargeBinary
    offsets point into the block's own [L, N, E] '<f2' buffer: no copy of the logits on this side
    (a fresh 512 MB buffer per flush cost more in page faults than the INSERT of the BLOBs).
    """
    if not blocks:
        return None
    width = 2 * int(blocks[0].logits.shape[-1])
    limit = MAX_SPAN_BYTES if max_span_bytes is None else max_span_bytes
    cap = max(1, limit // width) if limit > 0 else 0  # tokens per row at most; 0: whole spans
    n_layers = len(layers)
    layer_ids = np.asarray(layers, np.int16)
    batches = []
    for b in blocks:
        seq = np.asarray(b.seq_id, np.int64)
        pos = np.asarray(b.pos, np.int32)
        order, starts, lengths = logit_spans(seq, pos, cap)
        if order is None:
            arr = np.ascontiguousarray(b.logits, dtype=np.dtype("<f2"))
        else:
            seq, pos = seq[order], pos[order]
            arr = np.ascontiguousarray(np.take(b.logits, order, axis=1), dtype=np.dtype("<f2"))
        n, n_spans = b.n_tokens, len(starts)
        offsets = np.empty(n_layers * n_spans + 1, np.int64)
        np.multiply(np.add.outer(np.arange(n_layers, dtype=np.int64) * n, starts).reshape(-1), width,
                    out=offsets[:-1])
        offsets[-1] = n_layers * n * width
        batches.append(pa.record_batch({
            "layer": pa.array(np.repeat(layer_ids, n_spans)),
            "seq_id": pa.array(np.tile(seq[starts], n_layers)),
            "pos_start": pa.array(np.tile(pos[starts], n_layers)),
            "n": pa.array(np.tile(lengths.astype(np.int32), n_layers)),
            "logits": pa.LargeBinaryArray.from_buffers(pa.large_binary(), n_layers * n_spans,
                                                       [None, pa.py_buffer(offsets), pa.py_buffer(arr)]),
        }))
    return pa.Table.from_batches(batches)


def _concat(arrays: list[np.ndarray], axis: int, dtype) -> np.ndarray:
    if len(arrays) == 1:
        return np.ascontiguousarray(arrays[0], dtype=dtype)
    return np.concatenate(arrays, axis=axis, dtype=dtype, casting="same_kind")


def _encode_group(blocks: list[TokenBlock], layers: tuple[int, ...]) -> tuple[pa.Table, pa.Table | None]:
    seq = _concat([b.seq_id for b in blocks], 0, np.int64)
    pos = _concat([b.pos for b in blocks], 0, np.int32)
    n_layers, n = len(layers), seq.shape[0]
    # Layer-major order (all tokens of layer l, then l+1) is the [L, N, k] memory order of the
    # packed array, and it is what lets DuckDB run-length encode the layer column to nothing.
    choices = np.empty((n_layers, n, blocks[0].experts.shape[-1]), np.uint32)
    offset = 0
    for b in blocks:
        pack_choices(b.experts, b.weights, out=choices[:, offset:offset + b.n_tokens])
        offset += b.n_tokens
    routing = routing_table(np.repeat(np.asarray(layers, np.int16), n), np.tile(seq, n_layers),
                            np.tile(pos, n_layers), choices)
    logits = logits_table(layers, [b for b in blocks if b.logits is not None])
    return routing, logits


def _residual_table(blocks: list[TokenBlock]) -> pa.Table | None:
    parts = []
    for b in blocks:
        if b.residual_max is None or not b.residual_layers:
            continue
        r, n = b.residual_max.shape
        parts.append(pa.table({
            "seq_id": pa.array(np.tile(np.asarray(b.seq_id, np.int64), r)),
            "pos": pa.array(np.tile(np.asarray(b.pos, np.int32), r)),
            "layer": pa.array(np.repeat(np.asarray(b.residual_layers, np.int16), n)),
            "value": pa.array(np.ascontiguousarray(b.residual_max, dtype=np.float32).reshape(-1)),
            "channel": pa.array(np.ascontiguousarray(b.residual_channel, dtype=np.int32).reshape(-1)),
        }))
    return pa.concat_tables(parts) if parts else None


def _tokens_table(blocks: list[TokenBlock]) -> pa.Table:
    generated = _concat([b.generated if b.generated is not None else np.zeros(b.n_tokens, bool)
                         for b in blocks], 0, np.bool_)
    return pa.table({
        "seq_id": pa.array(_concat([b.seq_id for b in blocks], 0, np.int64)),
        "pos": pa.array(_concat([b.pos for b in blocks], 0, np.int32)),
        "token_id": pa.array(_concat([b.token_id for b in blocks], 0, np.int32)),
        "generated": pa.array(generated),
    })


def encode_blocks(blocks: list[TokenBlock]) -> EncodedBatch:
    """Concatenate the blocks of one flush into the physical tables."""
    if not blocks:
        return EncodedBatch(None, None, None, None, 0, 0)
    groups: dict[tuple[int, ...], list[TokenBlock]] = {}
    for b in blocks:  # a run normally has one layer set; grouping keeps odd ones correct
        groups.setdefault(tuple(int(x) for x in b.layers), []).append(b)
    routing_parts, logits_parts = [], []
    for layers, group in groups.items():
        routing, logits = _encode_group(group, layers)
        routing_parts.append(routing)
        if logits is not None:
            logits_parts.append(logits)
    return EncodedBatch(
        routing=pa.concat_tables(routing_parts),
        tokens=_tokens_table(blocks),
        logits=pa.concat_tables(logits_parts) if logits_parts else None,
        residual=_residual_table(blocks),
        n_tokens=sum(b.n_tokens for b in blocks),
        n_decisions=sum(int(b.experts.size) for b in blocks),
    )


def merge_encoded(batches: list[EncodedBatch]) -> EncodedBatch:
    """The batches of one flush as one (their tables concatenated without copying), in the given order."""
    if len(batches) == 1:
        return batches[0]

    def cat(tables):
        tables = [t for t in tables if t is not None]
        return pa.concat_tables(tables) if tables else None

    return EncodedBatch(
        routing=cat(b.routing for b in batches),
        tokens=cat(b.tokens for b in batches),
        logits=cat(b.logits for b in batches),
        residual=cat(b.residual for b in batches),
        n_tokens=sum(b.n_tokens for b in batches),
        n_decisions=sum(b.n_decisions for b in batches),
    )


def sequences_table(seqs: Sequence[SequenceRecord]) -> pa.Table:
    return pa.table({
        "seq_id": pa.array([int(s.seq_id) for s in seqs], pa.int64()),
        "n_tokens": pa.array([int(s.n_tokens) for s in seqs], pa.int32()),
        "text": pa.array([s.text for s in seqs], pa.string()),
        "label": pa.array([s.label for s in seqs], pa.string()),
        "lang": pa.array([s.lang for s in seqs], pa.string()),
        "align_id": pa.array([s.align_id for s in seqs], pa.string()),
        "source_line": pa.array([s.source_line for s in seqs], pa.int32()),
        "meta": pa.array([json.dumps(s.meta, default=str) for s in seqs], pa.string()),
    })


def vocab_table(texts: Mapping[int, str]) -> pa.Table:
    return pa.table({"token_id": pa.array(list(texts.keys()), pa.int32()),
                     "token": pa.array(list(texts.values()), pa.string())})


def expert_stats_table(stats: Sequence[ExpertStat]) -> pa.Table:
    cols = ("layer", "expert", "n_tokens", "max_out", "max_out_seq", "max_out_pos", "max_out_channel",
            "max_in", "max_in_seq", "max_in_pos", "max_in_channel")
    types = (pa.int16(), pa.int16(), pa.int64(), pa.float32(), pa.int64(), pa.int32(), pa.int32(),
             pa.float32(), pa.int64(), pa.int32(), pa.int32())
    return pa.table({c: pa.array([getattr(s, c) for s in stats], t) for c, t in zip(cols, types)})
