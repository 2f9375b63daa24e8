"""Shared page pieces: tables with CSV/Parquet downloads, and reading (or starting) an analysis result."""
from __future__ import annotations

import io
import shlex

import polars as pl
import streamlit as st

from routelens.errors import RoutelensError
from routelens.records import RunInfo

from . import data
from .state import AppContext


def _csv_safe(frame: pl.DataFrame) -> pl.DataFrame:
    """CSV has no nested types: lists become 'a;b;c' strings."""
    cols = []
    for name, dtype in frame.schema.items():
        if isinstance(dtype, (pl.List, pl.Array)):
            cols.append(pl.col(name).cast(pl.List(pl.Utf8)).list.join(";").alias(name))
        elif isinstance(dtype, pl.Struct):
            cols.append(pl.col(name).struct.json_encode().alias(name))
    return frame.with_columns(cols) if cols else frame


def table(frame: pl.DataFrame, key: str, name: str, *, height: int | None = None, **kwargs):
    """``st.dataframe`` of ``frame`` plus CSV and Parquet download buttons; returns st.dataframe's value (the
    selection state when ``on_select`` is passed)."""
    out = st.dataframe(frame.to_pandas() if kwargs.get("on_select") else frame, key=key, height=height or "auto",
                       hide_index=True, **kwargs)
    c1, c2, _ = st.columns([1, 1, 6])
    c1.download_button("CSV", _csv_safe(frame).write_csv().encode(), file_name=f"{name}.csv", mime="text/csv",
                       key=f"{key}_csv")
    buf = io.BytesIO()
    frame.write_parquet(buf)
    c2.download_button("Parquet", buf.getvalue(), file_name=f"{name}.parquet",
                       mime="application/vnd.apache.parquet", key=f"{key}_parquet")
    return out


def analyze_command(ctx: AppContext, name: str, run: RunInfo, extra: str = "") -> str:
    db = shlex.quote(str(ctx.db))
    return f"routelens analyze {name} --db {db} --run {run.run_id}{(' ' + extra) if extra else ''}"


def analysis_result(ctx: AppContext, name: str, run: RunInfo, *, what: str, extra_cmd: str = ""):
    """The newest stored ``name`` result over ``run``, or None after showing what command produces it and a button
    that computes it here (with a spinner)."""
    res = data.result(ctx.db, ctx.stamp, name, (run.run_id,))
    if res is not None:
        p = ", ".join(f"{k}={v}" for k, v in sorted(res.info.params.items()))
        st.caption(f"`{name}` result {res.info.result_id} from {res.info.created_at:%Y-%m-%d %H:%M} UTC"
                   + (f" ({res.info.seconds:.1f} s)" if res.info.seconds else "") + (f"; parameters: {p}" if p else ""))
        return res
    cmd = analyze_command(ctx, name, run, extra_cmd)
    st.info(f"no `{name}` result for run {run.run_id} yet ({what}). Produce it with:")
    st.code(cmd, language="bash")
    available = _module_available(name)
    if not available:
        st.caption(f"the `{name}` analysis is not installed in this routelens; the command above needs it")
        return None
    if run.status != "complete":
        st.caption("run it after the run is complete")
        return None
    if st.button(f"Compute `{name}` now", key=f"compute_{name}"):
        compute(ctx, name, run)
    return None


def _module_available(name: str) -> bool:
    try:
        from routelens.analyses.registry import get

        get(name)
        return True
    except Exception:  # ImportError of a module still being written, or an unknown name
        return False


def compute(ctx: AppContext, name: str, run: RunInfo, params: dict | None = None) -> bool:
    """Run an analysis over ``run`` and store it, showing progress; reruns the page when done."""
    from routelens.analyses.registry import run_analysis
    from routelens.store import Store

    with st.status(f"computing `{name}` over run {run.run_id} …", expanded=True) as status:
        try:
            st.write("reading the run and computing (this may take a while on a big run)")
            res = run_analysis(Store.open(ctx.db, create=False), name, [run], params or {})
        except RoutelensError as exc:
            status.update(label=f"`{name}` failed", state="error")
            st.error(str(exc))
            return False
        status.update(label=f"`{name}` done in {res.info.seconds:.1f} s (result {res.info.result_id})",
                      state="complete")
    st.rerun()
    return True


def part(res, name: str, columns: tuple[str, ...], analysis: str) -> pl.DataFrame | None:
    """A part of a stored result, checked for the columns the page draws; None (after a message) when missing."""
    frame = res.frames.get(name)
    if frame is None:
        st.warning(f"the stored `{analysis}` result has no part `{name}` (parts: {', '.join(res.frames)}); "
                   f"re-run `routelens analyze {analysis}` with this routelens")
        return None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        st.warning(f"the `{analysis}` part `{name}` lacks column(s) {missing}; re-run `routelens analyze "
                   f"{analysis}` with this routelens")
        return None
    return frame
