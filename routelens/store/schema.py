"""The documented schema of a routelens store (a DuckDB file), version 1.

Analysts query the tables ``runs``, ``sequences``, ``residual_max``, ``expert_stats`` and the views
``tokens``, ``routing``, ``router_logits``; the ``*_data`` tables are the compact physical layout behind
the views and may change between schema versions. Every row is keyed by ``run_id`` (an integer local to
this file); ``run_uuid`` identifies a run across files (exports, shards). The Parquet export layout
is documented in ``routelens/store/parquet_io.py``.

Integer conventions: ``seq_id`` BIGINT, ``pos`` INTEGER (0-based position in the sequence), ``layer`` SMALLINT
(the *decoder-layer* index, so dense layers leave gaps: a model whose MoE layers are 1, 3, 5 has no
rows for layer 0, 2, 4), ``expert`` SMALLINT, ``rank`` TINYINT (0 = largest routing weight). All signed,
so that ``pos - 1`` and friends never overflow.

Tables
------
``meta(key VARCHAR PRIMARY KEY, value VARCHAR)``
    ``schema_version`` (this module's :data:`SCHEMA_VERSION`), ``created_by`` (routelens version),
    ``created_at`` (UTC, ISO 8601).

``runs`` — one row per run.
    ``run_id`` INTEGER, ``run_uuid`` VARCHAR (unique, shared by the shards of one run), ``name``,
    ``model``, ``architecture``, ``family``, ``config_hash``, ``num_experts``, ``top_k``,
    ``moe_layers`` INTEGER[] (decoder-layer indices of the MoE layers), ``num_layers``, ``dtype``,
    ``transformers_version``, ``torch_version``, ``routelens_version``, ``input_source``,
    ``created_at`` / ``finished_at`` TIMESTAMP (UTC), ``status`` (``'complete'`` | ``'incomplete'``),
    ``tags`` VARCHAR[], ``params`` JSON (tracer options), ``steering`` JSON (NULL when unsteered),
    shard info: ``shard`` (the shard index, -1 when the run merges several shards), ``num_shards``,
    ``shards`` INTEGER[] (shard indices held here), ``shards_complete`` INTEGER[] (those whose writer
    finished), and the counts ``n_sequences``, ``n_tokens``, ``n_decisions`` (one decision = one
    (token, layer, rank) entry). ``status`` is ``'complete'`` only when every shard 0..num_shards-1 is
    held and finished; a run whose tracer crashed or was killed stays ``'incomplete'``.

``sequences`` — one row per input text.
    ``run_id``, ``seq_id`` BIGINT, ``n_tokens`` (number of rows in ``tokens`` once the run finished;
    the tracer's figure before that), ``text``, ``label``, ``lang``, ``align_id`` (links translations
    of one text across languages), ``source_line`` (1-based line of the input file), ``meta`` JSON.

``token_data`` — one row per traced token; read it through the ``tokens`` view.
    ``run_id``, ``seq_id``, ``pos``, ``token_id`` INTEGER, ``generated`` BOOLEAN (produced by generation,
    not part of the prompt).

``vocab`` — the text of each token id a run used (``RunWriter.add_vocabulary``), one row per
    (``run_id``, ``token_id``): ``token`` VARCHAR, the token decoded on its own (byte-level pieces of a
    multi-byte character may show as U+FFFD). Stored once per id rather than once per token.

``routing_data`` — one row per (token, MoE layer): the physical routing layout.
    ``run_id``, ``layer``, ``seq_id``, ``pos``, ``choices`` UINTEGER[] (length top_k, rank order). Each
    element packs one decision as ``expert << 16 | w16`` where ``w16`` is the bit pattern of the routing
    weight as an IEEE-754 binary16 (float16): **weights are stored rounded to float16 precision**
    (relative error <= 2^-11; exact when the model ran in float16). The ``routing`` view unpacks them
    (``choice >> 16``, ``rl_half_to_float(choice & 65535)``). Rows are appended in (layer, token)
    order per group of blocks the writer encodes together (a flush holds one or a few), so
    run/layer/seq/pos compress to almost nothing (Constant/RLE/bit-packing) and a decision bit-packs to
    about log2(num_experts) + 16 bits; one packed list instead of an experts list plus a weights list
    makes ingest ~1.7x faster. Measured sizes and speeds:
    benchmarks/results/store_ingest.md.

``router_logits_data`` — raw router logits, only when the run was traced with logits; read them through
    ``RunHandle.logits(layer)`` or the ``router_logits`` view. One row per *span*: a run of consecutive
    positions of one sequence within one TokenBlock (a prefill gives one span per sequence, a decode step
    one single-token span per sequence, a chunked text one span per chunk; a gap in the positions starts
    a new span). ``run_id``, ``layer``, ``seq_id``, ``pos_start`` INTEGER (position of the span's first
    token), ``n`` INTEGER (tokens in the span), ``logits`` BLOB: ``n x num_experts`` little-endian float16
    values, token-major (the row of token ``pos_start + i`` is bytes ``[2Ei, 2E(i+1))``), i.e.
    ``numpy.frombuffer(blob, '<f2').reshape(n, num_experts)``. A span is also cut after
    ``MAX_SPAN_BYTES`` (routelens/store/encode.py: 1 KiB, i.e. 8 tokens at 64 experts), because big BLOBs
    ingest slower in DuckDB and make the view slow; a reader must not assume spans are maximal (an
    import rebuilds the longest spans allowed). The BLOB column is stored uncompressed: float16 logits
    barely compress, and DuckDB's attempt (dictionary/FSST analysis) took most of the ingest time.
    Measurements: benchmarks/results/store_ingest.md ("Router logits").

``residual_max`` — activation outliers of the residual stream, when measured.
    ``run_id``, ``seq_id``, ``pos``, ``layer``, ``value`` FLOAT (max |h| over the channels of the
    decoder layer's output hidden state), ``channel`` INTEGER (the argmax channel).

``expert_stats`` — activation extremes per routed expert over a run (Super Experts profiling).
    ``run_id``, ``layer``, ``expert``, ``n_tokens`` (tokens routed to it), ``max_out`` (max
    |down_proj output| before the routing weight) with ``max_out_seq``/``max_out_pos``/
    ``max_out_channel`` locating it, ``max_in`` (max |down_proj input|) with ``max_in_seq``/
    ``max_in_pos``/``max_in_channel``.

Views
-----
``tokens(run_id, seq_id, pos, token_id, token, generated)`` — ``token_data`` joined with ``vocab``
(``token`` is NULL when the tracer recorded no vocabulary).

``routing(run_id, seq_id, pos, layer, rank, expert, weight)`` — the tidy routing table: one row per
decision, ``weight`` FLOAT (float16-rounded, see above). Filter on ``run_id`` and ``layer`` first;
both are pushed into the scan of ``routing_data``.

``router_logits(run_id, seq_id, pos, layer, logits)`` — one row per (token, layer): the spans of
``router_logits_data`` cut into ``2 * num_experts``-byte BLOBs (``num_experts`` from ``runs``). Filter on
``run_id`` and ``layer``; both are pushed into the scan of ``router_logits_data``.

Macro
-----
``rl_half_to_float(bits)`` — float16 bit pattern (an integer in 0..65535) to FLOAT, exact for normal and subnormal
numbers; infinities and NaNs decode to NaN.
"""
from __future__ import annotations

SCHEMA_VERSION = 1

# Scale factor by the 6 high bits of a float16 (sign + exponent), applied to the significand
# (mantissa plus the implicit leading 1 for normal numbers). A list lookup is ~2x faster in DuckDB
# than pow() per row, which matters for the dashboard's GROUP BY over tens of millions of decisions.
_HALF_SCALE = ", ".join(
    repr(float("nan") if exp == 31 else (-1.0 if sign else 1.0) * 2.0 ** (max(exp, 1) - 25))
    for sign in (0, 1)
    for exp in range(32)
).replace("nan", "'NaN'::DOUBLE")

TABLES_DDL = f"""
CREATE TABLE meta (
    key VARCHAR PRIMARY KEY,
    value VARCHAR
);

CREATE TABLE runs (
    run_id INTEGER PRIMARY KEY,
    run_uuid VARCHAR NOT NULL UNIQUE,
    name VARCHAR,
    model VARCHAR NOT NULL,
    architecture VARCHAR,
    family VARCHAR,
    config_hash VARCHAR,
    num_experts INTEGER NOT NULL,
    top_k INTEGER NOT NULL,
    moe_layers INTEGER[] NOT NULL,
    num_layers INTEGER,
    dtype VARCHAR,
    transformers_version VARCHAR,
    torch_version VARCHAR,
    routelens_version VARCHAR,
    input_source VARCHAR,
    created_at TIMESTAMP NOT NULL,
    finished_at TIMESTAMP,
    status VARCHAR NOT NULL CHECK (status IN ('complete', 'incomplete')),
    tags VARCHAR[],
    params JSON,
    steering JSON,
    shard INTEGER NOT NULL,
    num_shards INTEGER NOT NULL,
    shards INTEGER[] NOT NULL,
    shards_complete INTEGER[] NOT NULL,
    n_sequences BIGINT NOT NULL DEFAULT 0,
    n_tokens BIGINT NOT NULL DEFAULT 0,
    n_decisions BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE sequences (
    run_id INTEGER NOT NULL,
    seq_id BIGINT NOT NULL,
    n_tokens INTEGER,
    text VARCHAR,
    label VARCHAR,
    lang VARCHAR,
    align_id VARCHAR,
    source_line INTEGER,
    meta JSON
);

CREATE TABLE token_data (
    run_id INTEGER NOT NULL,
    seq_id BIGINT NOT NULL,
    pos INTEGER NOT NULL,
    token_id INTEGER NOT NULL,
    generated BOOLEAN NOT NULL
);

CREATE TABLE vocab (
    run_id INTEGER NOT NULL,
    token_id INTEGER NOT NULL,
    token VARCHAR
);

CREATE TABLE routing_data (
    run_id INTEGER NOT NULL,
    layer SMALLINT NOT NULL,
    seq_id BIGINT NOT NULL,
    pos INTEGER NOT NULL,
    choices UINTEGER[] NOT NULL
);

CREATE TABLE router_logits_data (
    run_id INTEGER NOT NULL,
    layer SMALLINT NOT NULL,
    seq_id BIGINT NOT NULL,
    pos_start INTEGER NOT NULL,
    n INTEGER NOT NULL,
    logits BLOB NOT NULL USING COMPRESSION uncompressed
);

CREATE TABLE residual_max (
    run_id INTEGER NOT NULL,
    seq_id BIGINT NOT NULL,
    pos INTEGER NOT NULL,
    layer SMALLINT NOT NULL,
    value FLOAT NOT NULL,
    channel INTEGER NOT NULL
);

CREATE TABLE expert_stats (
    run_id INTEGER NOT NULL,
    layer SMALLINT NOT NULL,
    expert SMALLINT NOT NULL,
    n_tokens BIGINT NOT NULL,
    max_out FLOAT,
    max_out_seq BIGINT,
    max_out_pos INTEGER,
    max_out_channel INTEGER,
    max_in FLOAT,
    max_in_seq BIGINT,
    max_in_pos INTEGER,
    max_in_channel INTEGER
);

CREATE MACRO rl_half_to_float(bits) AS (
    ((bits & 1023)::INTEGER + CASE WHEN (bits & 31744) = 0 THEN 0 ELSE 1024 END)
    * [{_HALF_SCALE}][(bits >> 10)::INTEGER + 1]
)::FLOAT;

CREATE VIEW tokens AS
SELECT t.run_id, t.seq_id, t.pos, t.token_id, v.token, t.generated
FROM token_data AS t LEFT JOIN vocab AS v ON v.run_id = t.run_id AND v.token_id = t.token_id;

CREATE VIEW routing AS
SELECT run_id, seq_id, pos, layer, rank::TINYINT AS rank, (choice >> 16)::SMALLINT AS expert,
       rl_half_to_float(choice & 65535) AS weight
FROM (
    SELECT run_id, seq_id, pos, layer, unnest(range(len(choices))) AS rank, unnest(choices) AS choice
    FROM routing_data
);

CREATE VIEW router_logits AS
SELECT run_id, seq_id, (pos_start + i)::INTEGER AS pos, layer, logits[i * w + 1:(i + 1) * w] AS logits
FROM (
    SELECT d.run_id, d.seq_id, d.pos_start, d.layer, d.logits, 2 * r.num_experts AS w, unnest(range(d.n)) AS i
    FROM router_logits_data AS d JOIN runs AS r ON r.run_id = d.run_id
);
"""

# Columns of `runs` in table order; the catalog module maps them to and from RunInfo.
RUN_COLUMNS = (
    "run_id", "run_uuid", "name", "model", "architecture", "family", "config_hash", "num_experts",
    "top_k", "moe_layers", "num_layers", "dtype", "transformers_version", "torch_version",
    "routelens_version", "input_source", "created_at", "finished_at", "status", "tags", "params",
    "steering", "shard", "num_shards", "shards", "shards_complete", "n_sequences", "n_tokens",
    "n_decisions",
)

# Objects whose presence marks a file as a routelens store (checked on open).
REQUIRED_TABLES = ("meta", "runs", "sequences", "token_data", "vocab", "routing_data", "router_logits_data",
                   "residual_max", "expert_stats")
