"""Write synthetic routing straight into a store (no model): planted ground truth for the analyses' tests."""
from __future__ import annotations

import numpy as np

from routelens.records import RunMeta, SequenceRecord, TokenBlock
from routelens.store import Store


def write_run(store: Store, experts: np.ndarray, *, seq_lengths, num_experts: int, weights: np.ndarray | None = None,
              layers=None, token_id: np.ndarray | None = None, logits: np.ndarray | None = None,
              sequences: list[SequenceRecord] | None = None, vocabulary: dict[int, str] | None = None,
              name: str | None = None, family: str = "qwen3_moe", num_layers: int | None = None):
    """Store ``experts[L, N, k]`` (rank order) for sequences of ``seq_lengths`` tokens (seq_id 0.., positions 0..)
    as one complete run and return its RunInfo. Weights default to 1/k; logits (float16 [L, N, E]) are optional.
    ``sequences`` may carry text/label/lang/align_id per sequence (seq_id must match 0..)."""
    experts = np.asarray(experts)
    L, N, k = experts.shape
    layers = tuple(range(L)) if layers is None else tuple(layers)
    assert sum(seq_lengths) == N
    seq = np.repeat(np.arange(len(seq_lengths), dtype=np.int64), seq_lengths)
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in seq_lengths]) if N else np.zeros(0, np.int32)
    if weights is None:
        weights = np.full((L, N, k), 1.0 / k, np.float32)
    if token_id is None:
        token_id = np.zeros(N, np.int32)
    meta = RunMeta(model="synthetic", architecture="Synthetic", family=family, config_hash="0", num_experts=num_experts,
                   top_k=k, moe_layers=layers, num_layers=num_layers or (max(layers) + 1), dtype="float32",
                   transformers_version="-", torch_version="-", routelens_version="-", input_source="synthetic",
                   name=name)
    writer = store.create_run(meta)
    with writer:
        writer.add_sequences(sequences or [SequenceRecord(seq_id=i, text=f"seq {i}", n_tokens=n)
                                           for i, n in enumerate(seq_lengths)])
        writer.add_block(TokenBlock(seq_id=seq, pos=pos, token_id=np.asarray(token_id, np.int32), layers=layers,
                                    experts=experts.astype(np.uint16), weights=np.asarray(weights, np.float32),
                                    logits=None if logits is None else np.asarray(logits, np.float16)))
        if vocabulary:
            writer.add_vocabulary(vocabulary)
        info = writer.finish("complete")
    return info
