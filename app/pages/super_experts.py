"""Super experts: max down_proj output per layer × expert with the criterion's flagged experts, massive activations
per layer, and the attention-sink change and perplexity change after removing them."""
import polars as pl
import streamlit as st

from routelens.app import data, figures, state, widgets


def render() -> None:
    ctx = state.current()
    st.title("Super experts")
    run = state.require_run(ctx)
    if run is None:
        return
    stats = data.expert_stats(ctx.db, ctx.stamp, run.run_id)
    if stats.is_empty():
        st.info(f"run {run.run_id} has no expert statistics: re-trace it with `routelens trace MODEL --input FILE "
                f"--db {ctx.db} --expert-stats` (the demo run has them)")
    res = widgets.analysis_result(ctx, "super-experts", run, what="the criterion, massive activations, attention "
                                  "sink and ablation")
    flagged = None
    experts = widgets.part(res, "experts", ("layer", "expert", "max_out", "is_super"), "super-experts") \
        if res is not None else None
    if experts is not None:
        flagged = experts.filter(pl.col("is_super"))
        source = experts
    elif not stats.is_empty():
        source = stats
        st.caption("heatmap from the raw expert statistics; the flagged experts need the `super-experts` result")
    else:
        source = None
    if source is not None:
        # max |out| spans orders of magnitude (a super expert is far above the rest): colour by log10
        source = source.with_columns(pl.col("max_out").clip(1e-6).log10().alias("log10_max_out"))
        st.plotly_chart(figures.heatmap(source, "log10_max_out", title="Max |down_proj output| per layer × expert"
                                        + (" (circled: super experts)" if flagged is not None else ""),
                                        marks=flagged, colorscale="Viridis", hover_label="log10 max |out|"),
                        key="se_heatmap")
    if res is not None:
        crit = res.frames.get("criterion")
        if crit is not None and crit.height:
            st.subheader("Criterion")
            widgets.table(crit, "se_criterion", f"se_criterion_run{run.run_id}")
        if flagged is not None:
            st.subheader(f"Flagged experts ({flagged.height})")
            if flagged.height:
                widgets.table(flagged, "se_flagged", f"super_experts_run{run.run_id}")
                if st.button("Add the flagged experts to the steering basket", key="se_add"):
                    n = state.add_to_basket(zip(flagged["layer"].to_list(), flagged["expert"].to_list()),
                                            "super-experts")
                    st.toast(f"{n} added")
            with st.expander("all experts, ranked by max |out|"):
                widgets.table(experts, "se_experts", f"se_experts_run{run.run_id}")

    st.subheader("Massive activations per layer")
    massive = res.frames.get("massive") if res is not None else None
    if massive is None or massive.is_empty():
        massive = data.residual_by_layer(ctx.db, ctx.stamp, run.run_id)
    if massive.is_empty():
        st.info(f"run {run.run_id} has no residual-stream maxima (traced with --no-residual); re-trace without it")
    else:
        cols = [c for c in ("max_value", "mean_value", "median_value") if c in massive.columns]
        long = massive.unpivot(index="layer", on=cols, variable_name="measure", value_name="max |h|")
        fig = figures.lines(long, "layer", "max |h|", color="measure", title="Residual stream max |h| per layer")
        fig.update_yaxes(type="log")
        st.plotly_chart(fig, key="se_massive")
        widgets.table(massive, "se_massive_t", f"massive_run{run.run_id}")

    if res is None:
        return
    st.subheader("Attention sink before / after removal")
    sink = res.frames.get("attention_sink")
    if sink is None or sink.is_empty():
        st.info("no attention-sink measurement in this result (computed with stats only); run `routelens analyze "
                f"super-experts --db {ctx.db} --run {run.run_id}` with the model available")
    else:
        modes = sorted(sink["mode"].unique().to_list())
        mode = st.selectbox("Removal mode", modes, key="se_mode")
        per_layer = (sink.filter(pl.col("mode") == mode).group_by("layer")
                     .agg(pl.col("mass_before").mean(), pl.col("mass_after").mean()).sort("layer"))
        long = per_layer.unpivot(index="layer", on=["mass_before", "mass_after"], variable_name="measure",
                                 value_name="attention on token 0")
        st.plotly_chart(figures.lines(long, "layer", "attention on token 0", color="measure",
                                      title=f"Attention mass on the first token (mean over heads), mode {mode}"),
                        key="se_sink")
        head = sink.filter(pl.col("mode") == mode).with_columns(
            (pl.col("mass_after") - pl.col("mass_before")).alias("change"))
        st.plotly_chart(figures.heatmap(head, "change", x="head", title="Change per layer × head (after − before)",
                                        colorscale="RdBu_r", zmid=0.0), key="se_sink_heads")
        widgets.table(sink, "se_sink_t", f"attention_sink_run{run.run_id}")
    abl = res.frames.get("ablation")
    if abl is not None and abl.height:
        st.subheader("Perplexity after removal")
        widgets.table(abl, "se_ablation", f"ablation_run{run.run_id}")


if __name__ == "__main__":
    render()
