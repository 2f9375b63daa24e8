"""What every page needs: the store path and the chosen run(s), kept in ``st.session_state``.

The run comes from the sidebar's picker, first set from the page address (``?run=N``) when given, else the newest
complete run. The store path comes, in order, from the sidebar's text input (session state ``rl_db``), the command line
(``streamlit run app/main.py -- --db PATH``, which ``routelens app`` builds), or the ``ROUTELENS_DB`` environment
variable. The main script resolves it once per rerun (``sidebar``); pages call ``current()``.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from routelens.errors import RoutelensError
from routelens.records import RunInfo

from . import data, queries

ENV_DB = "ROUTELENS_DB"
KEY_DB = "rl_db"
KEY_RUN = "rl_run"
KEY_BASKET = "rl_basket"  # steering basket: list of {"layer", "expert", "source"}


@dataclass
class AppContext:
    db: str | None  # None: no store chosen
    error: str | None  # why the store cannot be read (one line), or None
    runs: list[RunInfo] = field(default_factory=list)
    run: RunInfo | None = None
    stamp: tuple = ()

    def other_runs(self) -> list[RunInfo]:
        return [r for r in self.runs if self.run is None or r.run_id != self.run.run_id]


def db_from_argv(argv: list[str] | None = None) -> str | None:
    """``--db PATH`` after Streamlit's ``--`` separator, else the environment variable."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--db", default=None)
    args, _ = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    return args.db or os.environ.get(ENV_DB) or None


def run_label(r: RunInfo) -> str:
    name = f" {r.name}" if r.name else ""
    flag = "" if r.status == "complete" else " (incomplete)"
    return f"#{r.run_id}{name} · {Path(r.model).name or r.model} · E={r.num_experts} k={r.top_k}{flag}"


def sidebar() -> AppContext:
    """Draw the store and run pickers in the sidebar and return the context (called by main.py each rerun)."""
    if KEY_DB not in st.session_state:
        st.session_state[KEY_DB] = db_from_argv() or ""
    st.session_state.setdefault(KEY_BASKET, [])
    with st.sidebar:
        st.text_input("Store (DuckDB file)", key=KEY_DB, help="a store written by `routelens trace` or "
                      "`routelens demo`; also `routelens app --db PATH`")
        db = st.session_state[KEY_DB].strip() or None
        ctx = AppContext(db=db, error=None)
        if db is None:
            ctx.error = ("no store chosen: type a store path above, or start the app with `routelens app --db "
                         "PATH`; make one with `routelens demo --db routelens-demo.duckdb`")
            return _keep(ctx)
        try:
            queries.check_store(db)
            ctx.stamp = data.stamp(db)
            ctx.runs = data.runs(db, ctx.stamp)
        except RoutelensError as exc:
            ctx.error = str(exc)
            return _keep(ctx)
        if not ctx.runs:
            ctx.error = (f"the store {db} holds no runs yet: trace one with `routelens trace MODEL --input FILE "
                         f"--db {db}` or `routelens demo --db {db}`")
            return _keep(ctx)
        ids = [r.run_id for r in ctx.runs]
        asked = st.query_params.get("run")  # a link like /overview?run=3 opens on that run
        if KEY_RUN not in st.session_state and asked and asked.isdigit() and int(asked) in ids:
            st.session_state[KEY_RUN] = int(asked)
        if st.session_state.get(KEY_RUN) not in ids:
            complete = [r.run_id for r in ctx.runs if r.status == "complete"]
            st.session_state[KEY_RUN] = (complete or ids)[-1]
        by_id = {r.run_id: r for r in ctx.runs}
        st.selectbox("Run", ids, key=KEY_RUN, format_func=lambda i: run_label(by_id[i]))
        ctx.run = by_id[st.session_state[KEY_RUN]]
        basket = st.session_state[KEY_BASKET]
        if basket:
            st.caption(f"steering basket: {len(basket)} expert(s) — see the Steering page")
    return _keep(ctx)


def _keep(ctx: AppContext) -> AppContext:
    st.session_state["_rl_ctx"] = ctx
    return ctx


def current() -> AppContext:
    ctx = st.session_state.get("_rl_ctx")
    if ctx is None:  # a page script run on its own (not through main.py)
        ctx = sidebar()
    return ctx


def require_run(ctx: AppContext) -> RunInfo | None:
    """Show the context's problem (no store, empty store) and return None, or return the chosen run."""
    if ctx.error:
        st.info(ctx.error)
        return None
    if ctx.run is not None and ctx.run.status != "complete":
        st.warning(f"run {ctx.run.run_id} is incomplete: its tracer has not finished (still writing, or it "
                   "crashed). What is stored so far is shown; analyses need a complete run, so re-trace it with "
                   "`routelens trace` if it does not finish.")
    return ctx.run


def add_to_basket(pairs, source: str, action: str = "disable", value: float | None = None) -> int:
    """Add (layer, expert) pairs to the steering basket (with a default action); returns how many were new."""
    basket = st.session_state.setdefault(KEY_BASKET, [])
    have = {(b["layer"], b["expert"]) for b in basket}
    new = 0
    for layer, expert in pairs:
        key = (int(layer), int(expert))
        if key not in have:
            basket.append({"layer": key[0], "expert": key[1], "action": action, "value": value, "source": source})
            have.add(key)
            new += 1
    st.session_state["rl_basket_version"] = st.session_state.get("rl_basket_version", 0) + 1
    return new
