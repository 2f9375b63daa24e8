"""Driving a trace: tokenise, split over-long texts, batch, run forwards (or `generate`), stream to the store."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version as _pkg_version
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .._compat import check_transformers
from ..adapters import ModelAdapter, adapt
from ..errors import InputError
from ..records import RunMeta, SequenceRecord, TokenBlock
from .hooks import RoutingRecorder
from .inputs import read_inputs, records_from_texts

OVERFLOW_POLICIES = ("error", "chunk", "truncate")
# A string argument names an input file only by its suffix; any other string is one text to trace.
INPUT_FILE = re.compile(r"\.(txt|jsonl|ndjson)(\.gz)?$", re.IGNORECASE)


@dataclass(frozen=True)
class TraceOptions:
    batch_size: int = 8
    max_tokens: int | None = None  # longest forward per sequence; default: the model's context length
    overflow: str = "error"  # what to do with a text longer than max_tokens: error | chunk | truncate
    logits: bool = False  # also store the full router logits (fp16)
    expert_stats: bool = False  # per (layer, expert) max |down_proj in/out| (instrumented experts forward)
    residual: bool = True  # per token and layer max |residual stream| (massive activations)
    max_new_tokens: int = 0  # > 0: greedy-generate and record the decode steps too
    shard: int = 0  # this process's shard: it traces texts i with i % num_shards == shard
    num_shards: int = 1
    run_uuid: str | None = None  # shared by all shards of one run


@dataclass(frozen=True)
class _Segment:
    seq_id: int
    pos_offset: int
    ids: list[int]


def config_hash(config) -> str:
    d = config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype"):
        d.pop(volatile, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def context_length(model) -> int | None:
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def run_meta(model, adapter: ModelAdapter, *, model_ref: str | None, input_source: str, name, tags,
             options: TraceOptions, steering: dict | None = None) -> RunMeta:
    from .. import __version__

    params = {k: v for k, v in asdict(options).items() if k not in ("run_uuid", "shard", "num_shards")}
    return RunMeta(
        model=model_ref or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        architecture=(getattr(model.config, "architectures", None) or [type(model).__name__])[0],
        family=adapter.family,
        config_hash=config_hash(model.config),
        num_experts=adapter.num_experts,
        top_k=adapter.top_k,
        moe_layers=tuple(layer.index for layer in adapter.moe_layers),
        num_layers=adapter.num_layers,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        transformers_version=_pkg_version("transformers"),
        torch_version=torch.__version__,
        routelens_version=__version__,
        input_source=input_source,
        name=name,
        tags=tuple(tags),
        params=params,
        steering=steering,
        run_uuid=options.run_uuid,
        shard=options.shard,
        num_shards=options.num_shards,
    )


def _segments(records: Sequence[SequenceRecord], tokenizer, limit: int | None, overflow: str,
              reserve: int) -> list[_Segment]:
    if overflow not in OVERFLOW_POLICIES:
        raise InputError(f"unknown overflow policy {overflow!r}; use one of {', '.join(OVERFLOW_POLICIES)}")
    segs: list[_Segment] = []
    for rec in records:
        ids = tokenizer(rec.text, add_special_tokens=True, verbose=False)["input_ids"]  # we split long texts ourselves
        if not ids:
            where = f"line {rec.source_line}" if rec.source_line else f"text {rec.seq_id}"
            raise InputError(f"{where} tokenises to no tokens; remove it")
        rec.n_tokens = len(ids)
        room = None if limit is None else limit - reserve
        if room is not None and room < 1:
            raise InputError(f"--max-new-tokens {reserve} leaves no room in a context of {limit} tokens; lower it")
        if room is None or len(ids) <= room:
            segs.append(_Segment(rec.seq_id, 0, ids))
        elif overflow == "error":
            where = f"line {rec.source_line}" if rec.source_line else f"text {rec.seq_id}"
            raise InputError(
                f"{where} has {len(ids):,} tokens, more than the {room:,} that fit the context; "
                "pass --overflow chunk to split it into windows, or --overflow truncate"
            )
        elif overflow == "truncate":
            rec.n_tokens = room
            segs.append(_Segment(rec.seq_id, 0, ids[:room]))
        else:  # chunk: non-overlapping windows; positions stay positions in the whole text
            for start in range(0, len(ids), room):
                segs.append(_Segment(rec.seq_id, start, ids[start:start + room]))
    return segs


def _batches(segs: list[_Segment], batch_size: int) -> Iterable[list[_Segment]]:
    # Longest first, so each batch holds similar lengths and padding stays small.
    order = sorted(segs, key=lambda s: -len(s.ids))
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


def _pad(batch: list[_Segment], pad_id: int, side: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s.ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, s in enumerate(batch):
        n = len(s.ids)
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        ids[r, sl] = torch.tensor(s.ids)
        mask[r, sl] = 1
    return ids.to(device), mask.to(device)


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _pad_id(tokenizer, model) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
              getattr(model.config, "pad_token_id", None), 0):
        if isinstance(v, int):
            return v
    return 0


def _generation_cut(block: TokenBlock, last_pos: dict[int, int], prompt_len: dict[int, int]) -> TokenBlock | None:
    """Drop tokens a batch keeps feeding after a sequence ended, and flag generated tokens."""
    keep = np.array([p <= last_pos[s] for s, p in zip(block.seq_id.tolist(), block.pos.tolist())], dtype=bool)
    if not keep.any():
        return None
    gen = np.array([p >= prompt_len[s] for s, p in zip(block.seq_id.tolist(), block.pos.tolist())], dtype=bool)
    return replace(
        block,
        seq_id=block.seq_id[keep], pos=block.pos[keep], token_id=block.token_id[keep],
        experts=block.experts[:, keep], weights=block.weights[:, keep],
        logits=None if block.logits is None else block.logits[:, keep],
        residual_max=None if block.residual_max is None else block.residual_max[:, keep],
        residual_channel=None if block.residual_channel is None else block.residual_channel[:, keep],
        generated=gen[keep],
    )


def trace(model, tokenizer, inputs, *, store, name: str | None = None, tags: Sequence[str] = (),
          options: TraceOptions | None = None, model_ref: str | None = None, input_source: str | None = None,
          progress: bool = False, steering: dict | None = None):
    """Trace the routing of `model` over `inputs` (a list of texts/SequenceRecords, or a .txt/.jsonl path)
    into `store` (a Store or a path to one). Returns the run's handle; on any error the run stays
    'incomplete' and earlier runs are untouched."""
    from ..store import RunHandle, Store

    check_transformers()
    options = options or TraceOptions()
    if options.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {options.batch_size}")
    adapter = adapt(model)
    if isinstance(inputs, Path) or (isinstance(inputs, str) and INPUT_FILE.search(inputs)):
        records = read_inputs(inputs)
        source = input_source or str(inputs)
    else:
        records = records_from_texts(inputs)
        source = input_source or "python"
    if options.num_shards > 1:
        records = [r for r in records if r.seq_id % options.num_shards == options.shard]
    limit = options.max_tokens or context_length(model)
    segs = _segments(records, tokenizer, limit, options.overflow, options.max_new_tokens)

    st = store if isinstance(store, Store) else Store.open(store)
    if steering is None:  # a steer() block open on the model: store its spec with the run
        from ..steering.apply import active_steering

        steering = active_steering(model)
    meta = run_meta(model, adapter, model_ref=model_ref, input_source=source, name=name, tags=tags,
                    options=options, steering=steering)
    writer = st.create_run(meta)
    with writer:
        seen = _run(model, tokenizer, adapter, segs, records, writer, options, progress)
        writer.add_vocabulary(token_texts(tokenizer, seen))
        info = writer.finish("complete")
    return RunHandle(st, info)  # finish() read the run back in its own transaction: no reopening


def token_texts(tokenizer, token_ids) -> dict[int, str]:
    """Each token's own text (decoded alone, so byte-level pieces of one character may show as U+FFFD)."""
    return {int(t): tokenizer.decode([int(t)]) for t in sorted(token_ids) if int(t) >= 0}


def _run(model, tokenizer, adapter, segs, records, writer, options: TraceOptions, progress: bool) -> None:
    generating = options.max_new_tokens > 0
    pad_id = _pad_id(tokenizer, model)
    device = _input_device(model)
    seen: set[int] = {t for s in segs for t in s.ids}
    pending: list[TokenBlock] = []
    sink = pending.append if generating else writer.add_block
    total = sum(len(s.ids) for s in segs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="tok", desc="tracing", dynamic_ncols=True)
    with torch.no_grad(), RoutingRecorder(model, adapter, sink, logits=options.logits, residual=options.residual,
                                          expert_stats=options.expert_stats) as rec:
        for batch in _batches(segs, options.batch_size):
            rec.set_sequences([s.seq_id for s in batch], [s.pos_offset for s in batch])
            ids, mask = _pad(batch, pad_id, "left" if generating else "right", device)
            if not generating:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            else:
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=options.max_new_tokens,
                                     do_sample=False, pad_token_id=pad_id)
                rec.flush()
                gen = out[:, ids.shape[1]:].cpu()
                seen.update(gen.reshape(-1).tolist())
                _flush_generation(gen, batch, pending, writer, tokenizer, records)
                pending.clear()
            if bar is not None:
                bar.update(sum(len(s.ids) for s in batch))
        rec.flush()
        writer.add_expert_stats(rec.expert_stats())
    if bar is not None:
        bar.close()
    writer.add_sequences(records)
    return seen


def _flush_generation(gen_ids: torch.Tensor, batch: list[_Segment], blocks: list[TokenBlock], writer, tokenizer,
                      records: Sequence[SequenceRecord]) -> None:
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    last_pos: dict[int, int] = {}
    prompt_len: dict[int, int] = {}
    by_id = {r.seq_id: r for r in records}
    for r, seg in enumerate(batch):
        row = gen_ids[r].tolist()
        n_gen = len(row)
        for j, t in enumerate(row):
            if t in eos_ids:
                n_gen = j + 1
                break
        start = seg.pos_offset + len(seg.ids)
        prompt_len[seg.seq_id] = start
        # the last generated token is never fed back, so routed positions end one before it
        last_pos[seg.seq_id] = start + n_gen - 2
        by_id[seg.seq_id].meta["generated_text"] = tokenizer.decode(row[:n_gen], skip_special_tokens=False)
        by_id[seg.seq_id].n_tokens = start + max(n_gen - 1, 0)
    for block in blocks:
        cut = _generation_cut(block, last_pos, prompt_len)
        if cut is not None:
            writer.add_block(cut)
