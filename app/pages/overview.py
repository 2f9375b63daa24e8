"""Overview: layer × expert load heatmap, per-layer router entropy and load balance, expert detail on click."""
import numpy as np
import polars as pl
import streamlit as st

from routelens.app import data, figures, metrics, state, widgets

METRICS = {
    "share of tokens": ("share", "share of the layer's tokens whose top-k holds the expert"),
    "× even share": ("ratio", "load ÷ the even share k/E (1 = balanced)"),
    "top-1 share": ("top1_share", "share of the layer's tokens with the expert at rank 0"),
    "mean weight": ("mean_weight", "mean routing weight when selected"),
}


def load_frame(ctx, run) -> pl.DataFrame:
    load = data.expert_load(ctx.db, ctx.stamp, run.run_id, run.num_experts, tuple(run.moe_layers))
    n_tok = load.group_by("layer").agg((pl.col("n").sum() / run.top_k).alias("n_tokens"))
    return load.join(n_tok, on="layer").with_columns(
        (pl.col("n") / pl.col("n_tokens")).alias("share"),
        (pl.col("n") / pl.col("n_tokens") / (run.top_k / run.num_experts)).alias("ratio"),
        (pl.col("n_top1") / pl.col("n_tokens")).alias("top1_share"),
        pl.when(pl.col("n") > 0).then(pl.col("weight_sum") / pl.col("n")).otherwise(None).alias("mean_weight"),
    ).sort(["layer", "expert"])


def balance_frame(ctx, run, load: pl.DataFrame) -> tuple[pl.DataFrame, str]:
    layers = tuple(run.moe_layers)
    counts = load.sort(["layer", "expert"])["n"].to_numpy().reshape(len(layers), run.num_experts)
    b = metrics.load_balance(counts, run.top_k)
    frame = pl.DataFrame({"layer": list(layers), "n_tokens": b["n_tokens"].astype(np.int64), "cv": b["cv"],
                          "max_over_mean": b["max_over_mean"], "load_entropy": b["load_entropy"]})
    res = data.result(ctx.db, ctx.stamp, "stats", (run.run_id,))
    if res is not None and "layers" in res.frames:
        extra = [c for c in ("entropy", "entropy_max", "lb_value", "entropy_source", "lb_source")
                 if c in res.frames["layers"].columns]
        if extra:
            src = res.frames["layers"].select(["layer", *extra]).with_columns(pl.col("layer").cast(pl.Int64))
            if "entropy" in extra:
                src = src.with_columns((pl.col("entropy") / (pl.col("entropy_max") if "entropy_max" in extra
                                                             else np.log(run.num_experts))).alias("router_entropy_norm"))
            return frame.join(src, on="layer", how="left"), f"router entropy and LB value from `stats` result {res.info.result_id}"
    if data.has_logits(ctx.db, ctx.stamp, run.run_id):
        f = tuple(tuple(row) for row in b["f"].tolist())
        router = data.router_figures(ctx.db, ctx.stamp, run.run_id, layers, run.num_experts, run.family, f)
        used = int(router["n_tokens_used"].max() or 0)
        note = "router entropy and LB value from the stored logits" + (
            f" of the first {used:,} tokens (whole sequences; `routelens analyze stats` uses all)"
            if used < run.n_tokens else "")
        return frame.join(router.with_columns(pl.col("layer").cast(pl.Int64)), on="layer", how="left"), note
    return frame, (f"router entropy and the load-balancing value need router logits: re-trace with `routelens trace "
                   f"--logits`, or run `routelens analyze stats --db {ctx.db} --run {run.run_id}`")


def render() -> None:
    ctx = state.current()
    st.title("Overview")
    run = state.require_run(ctx)
    if run is None:
        return
    if run.n_decisions == 0 and run.status == "complete":
        st.info(f"run {run.run_id} holds no routing decisions")
        return
    load = load_frame(ctx, run)
    choice = st.radio("Colour by", list(METRICS), horizontal=True, key="ov_metric")
    col, label = METRICS[choice]
    fig = figures.heatmap(load, col, title=f"Expert load, run {run.run_id} (click a cell for its detail)",
                          hover_label=label, zmid=1.0 if col == "ratio" else None,
                          colorscale="RdBu_r" if col == "ratio" else "Viridis", clickable=True)
    event = st.plotly_chart(fig, key="ov_heatmap", on_select="rerun", selection_mode="points")
    _take_click(event, run)

    st.subheader("Per-layer balance")
    balance, note = balance_frame(ctx, run, load)
    st.caption(note)
    load_cols = [c for c in ("cv", "max_over_mean", "load_entropy") if c in balance.columns]
    router_cols = [c for c in ("router_entropy_norm", "lb_value") if c in balance.columns]
    a, b = st.columns(2)
    a.plotly_chart(figures.lines(balance.unpivot(index="layer", on=load_cols, variable_name="measure",
                                                 value_name="value"), "layer", "value", color="measure",
                                 title="Load balance per layer"), key="ov_balance_fig")
    if router_cols:
        b.plotly_chart(figures.lines(balance.unpivot(index="layer", on=router_cols, variable_name="measure",
                                                     value_name="value"), "layer", "value", color="measure",
                                     title="Router entropy ÷ ln E and load-balancing value"), key="ov_router_fig")
    widgets.table(balance, "ov_balance", f"balance_run{run.run_id}")

    st.subheader("Expert detail")
    c1, c2 = st.columns(2)
    layer = c1.selectbox("Layer", list(run.moe_layers), key="ov_layer")
    expert = c2.selectbox("Expert", list(range(run.num_experts)), key="ov_expert")
    _detail(ctx, run, load, int(layer), int(expert))


def _take_click(event, run) -> None:
    """A clicked heatmap cell selects that layer and expert (before their selectboxes are drawn)."""
    points = (event or {}).get("selection", {}).get("points", []) if isinstance(event, dict) else \
        getattr(getattr(event, "selection", None), "points", []) or []
    if not points:
        return
    p = points[0]
    key = (p.get("y"), p.get("x"))
    if key == st.session_state.get("_ov_last_click"):
        return
    st.session_state["_ov_last_click"] = key
    try:
        layer, expert = int(p["y"]), int(p["x"])
    except (KeyError, TypeError, ValueError):
        return
    if layer in run.moe_layers and 0 <= expert < run.num_experts:
        st.session_state["ov_layer"], st.session_state["ov_expert"] = layer, expert


def _detail(ctx, run, load: pl.DataFrame, layer: int, expert: int) -> None:
    row = load.filter((pl.col("layer") == layer) & (pl.col("expert") == expert)).row(0, named=True)
    c = st.columns(4)
    c[0].metric("tokens routed", f"{row['n']:,}")
    c[1].metric("share of layer", f"{row['share']:.2%}")
    c[2].metric("× even share", f"{row['ratio']:.2f}")
    c[3].metric("mean weight", "—" if row["mean_weight"] is None else f"{row['mean_weight']:.3f}")
    if st.button(f"Add layer {layer} expert {expert} to the steering basket", key="ov_add"):
        n = state.add_to_basket([(layer, expert)], "overview")
        st.toast("added" if n else "already in the basket")
    across = load.filter(pl.col("expert") == expert).select("layer", "share")
    tokens, partners, ranks = data.expert_detail(ctx.db, ctx.stamp, run.run_id, layer, expert)
    a, b = st.columns(2)
    with a:
        st.plotly_chart(figures.lines(across, "layer", "share", title=f"Expert {expert}'s share in every layer"),
                        key="ov_detail_layers")
        st.markdown("**Rank held and weight when selected**")
        widgets.table(ranks, "ov_ranks", f"ranks_l{layer}_e{expert}")
    with b:
        if partners.height:
            st.plotly_chart(figures.bars(partners.head(15), "partner", "n", color="partner",
                                         title=f"Co-selected experts in layer {layer}"), key="ov_partners")
        else:
            st.caption("never co-selected (top-1 routing, or never routed)")
    st.markdown(f"**Tokens most often routed to layer {layer}, expert {expert}**")
    if tokens.height:
        widgets.table(tokens, "ov_tokens", f"tokens_l{layer}_e{expert}")
    else:
        st.caption("no token was routed to this expert")
    stats = data.expert_stats(ctx.db, ctx.stamp, run.run_id)
    hit = stats.filter((pl.col("layer") == layer) & (pl.col("expert") == expert))
    if hit.height:
        st.markdown("**Activation extremes** (expert stats)")
        widgets.table(hit, "ov_stats", f"expert_stats_l{layer}_e{expert}")


if __name__ == "__main__":
    render()
