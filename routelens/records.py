"""Typed records that cross module boundaries: tracer -> store writer, store -> readers.

Arrays are numpy on the host; the tracer produces them, the store only serialises them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np


@dataclass
class TokenBlock:
    """Routing of N non-padding tokens from one forward pass, over the traced MoE layers.

    ``experts[l, n, r]`` is the expert executed at rank r (0 = largest routing weight) for token n at
    MoE layer ``layers[l]`` (a decoder-layer index: dense layers leave gaps).
    """

    seq_id: np.ndarray  # int64 [N]
    pos: np.ndarray  # int32 [N], position of the token in its sequence, 0-based
    token_id: np.ndarray  # int32 [N]
    layers: tuple[int, ...]  # decoder-layer index of each traced MoE layer, ascending
    experts: np.ndarray  # uint16 [L, N, k]
    weights: np.ndarray  # float16 or float32 [L, N, k]; stored as float16-rounded float
    logits: np.ndarray | None = None  # float16 [L, N, E], raw router logits, when requested
    residual_layers: tuple[int, ...] = ()  # decoder layers whose output residual was measured
    residual_max: np.ndarray | None = None  # float32 [R, N], max |h| over channels after layer
    residual_channel: np.ndarray | None = None  # int32 [R, N], channel of that max
    generated: np.ndarray | None = None  # bool [N], token was produced by generate(), not the prompt

    @property
    def n_tokens(self) -> int:
        return int(self.seq_id.shape[0])


@dataclass
class SequenceRecord:
    """One input text (or generated continuation) of a run."""

    seq_id: int
    text: str
    n_tokens: int = 0
    label: str | None = None
    lang: str | None = None
    align_id: str | None = None
    source_line: int | None = None  # 1-based line in the input file, when read from one
    meta: dict = field(default_factory=dict)  # any other jsonl fields


@dataclass
class ExpertStat:
    """Activation extremes of one routed expert over a run (Super Experts profiling)."""

    layer: int
    expert: int
    n_tokens: int  # tokens routed to it
    max_out: float  # max |down_proj output| over routed tokens and channels (before routing weight)
    max_out_seq: int
    max_out_pos: int
    max_out_channel: int
    max_in: float  # max |down_proj input| = max |act(gate) * up|
    max_in_seq: int
    max_in_pos: int
    max_in_channel: int


@dataclass
class RunMeta:
    """What a run is: model, routing geometry, provenance. Written when the run starts."""

    model: str  # hub id, local path, or a description for in-memory models
    architecture: str  # e.g. "OlmoeForCausalLM"
    family: str  # adapter family, e.g. "olmoe"
    config_hash: str
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    num_layers: int
    dtype: str
    transformers_version: str
    torch_version: str
    routelens_version: str
    input_source: str
    name: str | None = None
    tags: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)  # tracer options: logits, expert_stats, batch size, ...
    steering: dict | None = None  # the steering spec in force, if any
    run_uuid: str | None = None  # shared by the shards of one run; generated when None
    shard: int = 0
    num_shards: int = 1
    created_at: datetime | None = None


@dataclass
class RunInfo(RunMeta):
    """A run as stored: its meta plus id, status and counts."""

    run_id: int = -1
    status: str = "incomplete"  # "complete" | "incomplete"
    finished_at: datetime | None = None
    n_sequences: int = 0
    n_tokens: int = 0
    n_decisions: int = 0
    shards: tuple[int, ...] = ()  # shard indices held by this store (merged shards: several, shard = -1)
