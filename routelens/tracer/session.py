"""Recording any forwards the user runs: plain calls, `generate`, or a user's own nnsight trace.

`routelens.trace` drives the model itself; `recording` instead watches whatever the user does while the
block is open, so routing is captured in the same forward as the user's own interventions (e.g. an
nnsight `.source` edit of a router): the experts pre-hook sees the routing that actually executed.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .._compat import check_transformers
from ..adapters import adapt
from ..records import SequenceRecord, TokenBlock
from .driver import TraceOptions, run_meta, token_texts
from .hooks import RoutingRecorder


def unwrap(model):
    """The torch module under an nnsight wrapper (NNsight / TransformersModel keep it as `_module`)."""
    inner = getattr(model, "_module", None)
    return inner if inner is not None and hasattr(inner, "forward") else model


@dataclass
class Recording:
    """Handle yielded by `recording`; `run` is set to the stored run's handle when the block exits."""

    recorder: RoutingRecorder
    run: object | None = None
    _blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)  # seq, pos, token

    def set_sequences(self, seq_ids, pos_offset=None) -> None:
        self.recorder.set_sequences(seq_ids, pos_offset)


@contextmanager
def recording(model, store, *, tokenizer=None, name: str | None = None, tags=(), logits: bool = False,
              residual: bool = True, expert_stats: bool = False, model_ref: str | None = None,
              input_source: str = "python"):
    """Record the routing of every forward of `model` (a transformers model or an nnsight wrapper of one)
    run inside the block into a new run of `store`. Rows without `set_sequences` get fresh sequence ids."""
    from ..store import RunHandle, Store

    check_transformers()
    base = unwrap(model)
    adapter = adapt(base)
    st = store if isinstance(store, Store) else Store.open(store)
    options = TraceOptions(logits=logits, residual=residual, expert_stats=expert_stats)
    from ..steering.apply import active_steering

    meta = run_meta(base, adapter, model_ref=model_ref, input_source=input_source, name=name, tags=tags,
                    options=options, steering=active_steering(base))
    writer = st.create_run(meta)
    handle: Recording | None = None

    def sink(block: TokenBlock) -> None:
        # keep arrays, not per-token Python objects: this runs on the consumer thread, beside the forward
        handle._blocks.append((block.seq_id, block.pos, block.token_id))
        writer.add_block(block)

    with writer:
        with RoutingRecorder(base, adapter, sink, logits=logits, residual=residual,
                             expert_stats=expert_stats) as rec:
            handle = Recording(rec)
            yield handle
            rec.flush()
            writer.add_expert_stats(rec.expert_stats())
        seqs = []
        seen: set[int] = set()
        if handle._blocks:
            seq, pos, tok = (np.concatenate(cols) for cols in zip(*handle._blocks))
            order = np.lexsort((pos, seq))
            seq, tok = seq[order], tok[order]
            starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
            for seq_id, ids in zip(seq[starts].tolist(), np.split(tok, starts[1:])):
                ids = ids.tolist()
                text = tokenizer.decode(ids) if tokenizer is not None else ""
                seqs.append(SequenceRecord(seq_id=seq_id, text=text, n_tokens=len(ids)))
            seen = set(np.unique(tok).tolist())
        writer.add_sequences(seqs)
        if tokenizer is not None:
            writer.add_vocabulary(token_texts(tokenizer, seen))
        info = writer.finish("complete")
    handle.run = RunHandle(st, info)  # finish() read the run back in its own transaction
