"""Runs: the store's runs (model, architecture, E, k, layers, input source, status, tags), filtered by text, and
the analysis results stored for the chosen run."""
import json

import streamlit as st

from routelens.app import data, state, widgets


def render() -> None:
    ctx = state.current()
    st.title("Runs")
    if ctx.error:
        st.info(ctx.error)
        return
    st.caption(f"store `{ctx.db}` · {len(ctx.runs)} run(s)")
    text = st.text_input("Filter by name, model, input or tag", key="runs_filter")
    frame = data.runs_table(ctx.db, ctx.stamp, text)
    if frame.is_empty():
        st.info(f"no run matches {text!r}")
    else:
        widgets.table(frame, "runs_table", "runs")
    incomplete = [r.run_id for r in ctx.runs if r.status != "complete"]
    if incomplete:
        st.warning(f"incomplete run(s) {incomplete}: the tracer has not finished (still writing, or it crashed); "
                   "their data may be partial and analyses refuse them until re-traced with `routelens trace`.")
    run = ctx.run
    if run is None:
        return
    st.subheader(f"Run {run.run_id}" + (f" · {run.name}" if run.name else ""))
    c = st.columns(4)
    c[0].metric("experts E", run.num_experts)
    c[1].metric("top-k", run.top_k)
    c[2].metric("MoE layers", f"{len(run.moe_layers)} / {run.num_layers}")
    c[3].metric("decisions", f"{run.n_decisions:,}")
    st.markdown(
        f"- model: `{run.model}` ({run.architecture}, family `{run.family}`, {run.dtype})\n"
        f"- input: `{run.input_source}` · {run.n_sequences:,} sequences · {run.n_tokens:,} tokens\n"
        f"- status: **{run.status}** · created {run.created_at:%Y-%m-%d %H:%M} UTC"
        + (f" · finished {run.finished_at:%Y-%m-%d %H:%M} UTC" if run.finished_at else "") + "\n"
        f"- MoE layers: {', '.join(map(str, run.moe_layers))}\n"
        f"- tags: {', '.join(run.tags) if run.tags else '—'}")
    if run.steering:
        with st.expander("steering spec of this run"):
            st.code(json.dumps(run.steering, indent=2), language="json")
    if run.params:
        with st.expander("tracer options"):
            st.code(json.dumps(run.params, indent=2, default=str), language="json")
    st.subheader("Analysis results for this run")
    results = data.results_catalog(ctx.db, ctx.stamp, run.run_id)
    if results.is_empty():
        st.info(f"no analysis results yet; e.g. `routelens analyze stats --db {ctx.db} --run {run.run_id}` "
                "(or open an analysis page and press its compute button)")
    else:
        widgets.table(results, "runs_results", f"results_run{run.run_id}")


if __name__ == "__main__":
    render()
