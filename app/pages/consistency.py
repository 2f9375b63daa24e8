"""Consistency: local routing consistency (moe-lrc) from the `lrc` result: SRP vs segment length, SCH vs cache ratio
with LRU/LFU/Belady baselines, per layer and for the whole model."""
import polars as pl
import streamlit as st

from routelens.app import figures, state, widgets

NEEDED = ("metric", "layer", "m", "rho", "value", "ci_low", "ci_high")
BASELINES = ("lru", "lfu", "belady")


def lrc_frame(res) -> pl.DataFrame | None:
    """The part of an `lrc` result that holds the metric rows (the analysis names it; found by its columns)."""
    for name, frame in res.frames.items():
        if all(c in frame.columns for c in NEEDED):
            return frame
    st.warning(f"the stored `lrc` result has no part with columns {list(NEEDED)} (parts: {', '.join(res.frames)}); "
               "re-run `routelens analyze lrc` with this routelens")
    return None


def scope(frame: pl.DataFrame) -> pl.DataFrame:
    """Add a ``scope`` column: "model" for model-level rows (layer null), else "layer N"."""
    return frame.with_columns(pl.when(pl.col("layer").is_null()).then(pl.lit("model"))
                              .otherwise(pl.lit("layer ") + pl.col("layer").cast(pl.Utf8)).alias("scope"))


def render() -> None:
    ctx = state.current()
    st.title("Consistency")
    st.caption("Local routing consistency (moe-lrc): SRP = segment routing best performance (how well one fixed "
               "expert set per m-token segment covers the routing); SCH = segment cache best hit rate at cache size "
               "C = ρ·k, against LRU, LFU and Belady caches.")
    run = state.require_run(ctx)
    if run is None:
        return
    res = widgets.analysis_result(ctx, "lrc", run, what="SRP and SCH per layer and model")
    if res is None:
        return
    frame = lrc_frame(res)
    if frame is None:
        return
    frame = scope(frame)
    srp = frame.filter(pl.col("metric") == "srp")
    if srp.height:
        fig = figures.lines(srp, "m", "value", color="scope", band=("ci_low", "ci_high"),
                            title="SRP vs segment length m", y_title="SRP",
                            dash_by={"model": "dash"})
        fig.update_xaxes(type="log")
        st.plotly_chart(fig, key="lrc_srp")
    else:
        st.info("this `lrc` result has no SRP rows (computed with other metrics)")

    cache = frame.filter(pl.col("metric").is_in(["sch", *BASELINES]))
    if cache.height:
        scopes = sorted(cache["scope"].unique().to_list(), key=lambda s: (s != "model", len(s), s))
        c1, c2 = st.columns(2)
        where = c1.selectbox("Layer or model", scopes, key="lrc_scope")
        ms = sorted(cache.filter(pl.col("metric") == "sch")["m"].drop_nulls().unique().to_list())
        m = c2.selectbox("Segment length m (SCH)", ms, key="lrc_m") if ms else None
        sub = cache.filter(pl.col("scope") == where)
        sub = sub.filter((pl.col("metric") != "sch") | (pl.col("m") == m)) if m is not None else sub
        st.plotly_chart(figures.lines(sub, "rho", "value", color="metric", band=("ci_low", "ci_high"),
                                      title=f"Cache hit rate vs cache ratio ρ ({where}" + (f", m={m})" if m else ")"),
                                      y_title="hit rate", dash_by={b: "dot" for b in BASELINES}), key="lrc_sch")
    else:
        st.info("this `lrc` result has no SCH or baseline rows")
    widgets.table(frame.drop("scope"), "lrc_table", f"lrc_run{run.run_id}")


if __name__ == "__main__":
    render()
