"""Cached access to the store for the pages: ``queries`` functions behind ``st.cache_data``.

Every cached function takes the store path and its ``stamp`` (``queries.store_stamp``: mtime and size of the file
and its WAL), so a cache entry is reused until the store is written again: a finished trace or a new analysis
result shows up on the next rerun, an idle store is never re-queried.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import polars as pl
import streamlit as st

from routelens.records import RunInfo

from . import metrics, queries


def stamp(db: str) -> tuple:
    return queries.store_stamp(db)


@st.cache_data(show_spinner=False, max_entries=16)
def runs(db: str, stamp: tuple) -> list[RunInfo]:
    return queries.runs(db)


@st.cache_data(show_spinner=False, max_entries=32)
def runs_table(db: str, stamp: tuple, text: str) -> pl.DataFrame:
    return queries.runs_table(db, text)


@st.cache_data(show_spinner=False, max_entries=32)
def expert_load(db: str, stamp: tuple, run_id: int, num_experts: int, layers: tuple[int, ...]) -> pl.DataFrame:
    return queries.expert_load(db, run_id, num_experts, layers)


@st.cache_data(show_spinner=False, max_entries=32)
def has_logits(db: str, stamp: tuple, run_id: int) -> bool:
    return queries.has_logits(db, run_id)


ENTROPY_MAX_TOKENS = 20_000  # the first sequences' tokens: a 2-3 digit estimate in bounded time on huge runs


@st.cache_data(show_spinner=False, max_entries=16)
def router_figures(db: str, stamp: tuple, run_id: int, layers: tuple[int, ...], num_experts: int, family: str,
                   f: tuple[tuple[float, ...], ...]) -> pl.DataFrame:
    """Per layer: mean router entropy (nats), its ratio to ln E, and the load-balancing value E·Σ f_i P_i, from the
    logits of the first sequences (about ``ENTROPY_MAX_TOKENS`` tokens)."""
    rows = []
    sample = queries.logits_sample(db, run_id, layers, num_experts, ENTROPY_MAX_TOKENS)
    for i, layer in enumerate(layers):
        p = metrics.router_probabilities(sample[layer], family)
        h = metrics.router_entropy(p)
        rows.append({"layer": layer, "router_entropy": h, "router_entropy_norm": h / np.log(num_experts),
                     "lb_value": metrics.lb_value(np.asarray(f[i]), p) if len(p) else float("nan"),
                     "n_tokens_used": len(p)})
    return pl.DataFrame(rows)


@st.cache_data(show_spinner=False, max_entries=64)
def expert_detail(db: str, stamp: tuple, run_id: int, layer: int, expert: int):
    tokens = queries.expert_tokens(db, run_id, layer, expert)
    partners, ranks = queries.expert_partners(db, run_id, layer, expert)
    return tokens, partners, ranks


@st.cache_data(show_spinner=False, max_entries=64)
def sequences(db: str, stamp: tuple, run_id: int, search: str) -> pl.DataFrame:
    return queries.sequences(db, run_id, search)


@st.cache_data(show_spinner=False, max_entries=64)
def sequence(db: str, stamp: tuple, run_id: int, seq_id: int, layers: tuple[int, ...], top_k: int):
    return queries.sequence_tokens(db, run_id, seq_id), queries.sequence_routing(db, run_id, seq_id, layers, top_k)


@st.cache_data(show_spinner=False, max_entries=16)
def expert_stats(db: str, stamp: tuple, run_id: int) -> pl.DataFrame:
    return queries.expert_stats(db, run_id)


@st.cache_data(show_spinner=False, max_entries=16)
def residual_by_layer(db: str, stamp: tuple, run_id: int) -> pl.DataFrame:
    return queries.residual_by_layer(db, run_id)


@st.cache_data(show_spinner=False, max_entries=16)
def token_ids_for_texts(db: str, stamp: tuple, run_id: int, texts: tuple[str, ...]) -> pl.DataFrame:
    return queries.token_ids_for_texts(db, run_id, list(texts))


@st.cache_data(show_spinner=False, max_entries=16)
def sequences_with_tokens(db: str, stamp: tuple, run_id: int, token_ids: tuple[int, ...]) -> pl.DataFrame:
    return queries.sequences_with_tokens(db, run_id, list(token_ids))


@st.cache_data(show_spinner=False, max_entries=16)
def routing_change(db: str, stamp: tuple, run_a: int, run_b: int) -> pl.DataFrame:
    return queries.routing_change(db, run_a, run_b)


@st.cache_data(show_spinner=False, max_entries=16)
def load_change(db: str, stamp: tuple, run_a: int, run_b: int) -> pl.DataFrame:
    return queries.load_change(db, run_a, run_b)


@st.cache_data(show_spinner=False, max_entries=32)
def result(db: str, stamp: tuple, analysis: str, run_ids: tuple[int, ...]):
    """The newest stored result of ``analysis`` over ``run_ids`` (any parameters), or None."""
    from routelens.analyses.results import load_result
    from routelens.store import Store

    store = Store.open(db, create=False, read_only=True)
    # load_result looks runs up by run_id only
    return load_result(store, analysis, [SimpleNamespace(run_id=r) for r in run_ids])


@st.cache_data(show_spinner=False, max_entries=16)
def results_catalog(db: str, stamp: tuple, run_id: int | None) -> pl.DataFrame:
    from routelens.analyses.results import list_results
    from routelens.store import Store

    store = Store.open(db, create=False, read_only=True)
    return list_results(store, None if run_id is None else SimpleNamespace(run_id=run_id))


@st.cache_data(show_spinner=False, max_entries=16)
def usage_by_lang(db: str, stamp: tuple, run_id: int) -> pl.DataFrame:
    return queries.usage_by_lang(db, run_id)


@st.cache_data(show_spinner=False, max_entries=64)
def expert_positions(db: str, stamp: tuple, run_id: int, seq_id: int, layer: int, expert: int) -> list[int]:
    return queries.expert_positions(db, run_id, seq_id, layer, expert)
