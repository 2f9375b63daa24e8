"""Cognitive experts: the `npmi` ranking per marker token, and where the chosen experts fire in example text."""
import numpy as np
import polars as pl
import streamlit as st

from routelens.app import data, figures, state, tokenview, widgets


def render() -> None:
    ctx = state.current()
    st.title("Cognitive experts")
    st.caption("nPMI between thinking-marker tokens and (layer, expert) pairs from the executed top-k (RICE).")
    run = state.require_run(ctx)
    if run is None:
        return
    res = widgets.analysis_result(ctx, "npmi", run, what="nPMI of marker tokens with every (layer, expert)")
    if res is None:
        return
    notes = res.frames.get("notes")
    if notes is not None and notes.height:
        for msg in notes["message"].to_list():
            st.warning(msg)
    ranking = widgets.part(res, "ranking", ("marker", "layer", "expert", "npmi", "rank"), "npmi")
    if ranking is None:
        return
    markers = ranking["marker"].unique(maintain_order=True).to_list()
    if not markers:
        st.info("none of the markers occurs in this run")
        return
    marker = st.selectbox("Marker", markers, key="cog_marker")
    sub = ranking.filter(pl.col("marker") == marker).sort("rank")
    sub = sub.with_columns((pl.lit("L") + pl.col("layer").cast(pl.Utf8) + pl.lit(" e")
                            + pl.col("expert").cast(pl.Utf8)).alias("pair"))
    st.plotly_chart(figures.bars(sub, "pair", "npmi", title=f"nPMI ranking for {marker!r}", orientation="h"),
                    key="cog_bars")
    picked = widgets.table(sub.drop("pair"), "cog_rank", f"npmi_{marker}_run{run.run_id}", on_select="rerun",
                           selection_mode="multi-row")
    rows = list(getattr(getattr(picked, "selection", None), "rows", []) or [])
    chosen = sub[rows] if rows else sub.head(2)
    st.caption("selected rows (default: the top 2) are used below" )
    if st.button(f"Add {chosen.height} expert(s) to the steering basket", key="cog_add"):
        n = state.add_to_basket(zip(chosen["layer"].to_list(), chosen["expert"].to_list()), f"npmi:{marker}", action="boost", value=2.0)
        st.toast(f"{n} added")

    st.subheader("Where they fire")
    mk = res.frames.get("markers")
    ids = []
    if mk is not None and "token_ids" in mk.columns:
        hit = mk.filter(pl.col("marker") == marker)
        if hit.height:
            got = hit["token_ids"][0]
            ids = [] if got is None else [int(i) for i in got]
    if not ids:
        ids = data.token_ids_for_texts(ctx.db, ctx.stamp, run.run_id, (marker,))["token_id"].to_list()
    seqs = data.sequences_with_tokens(ctx.db, ctx.stamp, run.run_id, tuple(ids)) if ids else pl.DataFrame()
    if seqs.is_empty():
        st.info(f"no sequence of run {run.run_id} contains {marker!r}")
        return
    previews = dict(zip(seqs["seq_id"].to_list(), seqs["preview"].to_list()))
    seq_id = st.selectbox("Example sequence", list(previews), key="cog_seq",
                          format_func=lambda s: f"{s}: {previews[s][:90]}")
    pairs = list(zip(chosen["layer"].to_list(), chosen["expert"].to_list()))
    tokens, _ = data.sequence(ctx.db, ctx.stamp, run.run_id, int(seq_id), tuple(run.moe_layers), run.top_k)
    texts = [t if t is not None else f"[{i}]" for t, i in zip(tokens["token"].to_list(), tokens["token_id"].to_list())]
    pos = tokens["pos"].to_list()
    fires = np.zeros((len(pairs), len(texts)), bool)
    index = {p: i for i, p in enumerate(pos)}
    for j, (layer, expert) in enumerate(pairs):
        for p in data.expert_positions(ctx.db, ctx.stamp, run.run_id, int(seq_id), int(layer), int(expert)):
            if p in index:
                fires[j, index[p]] = True
    is_marker = np.isin(tokens["token_id"].to_numpy(), ids)
    st.html(firing_html(texts, pairs, fires, is_marker))
    st.caption("a token is highlighted when any selected expert is in its top-k (hover: which); marker tokens are "
               "boxed")


def firing_html(texts, pairs, fires: np.ndarray, is_marker: np.ndarray) -> str:
    import html

    out = [tokenview.CSS, '<div class="rl-seq">']
    for t, text in enumerate(texts):
        who = [f"L{l} e{e}" for (l, e), f in zip(pairs, fires[:, t]) if f]
        style = f"background:{figures.expert_color(pairs[int(np.argmax(fires[:, t]))][1], 0.9)}" if who else ""
        cls = "rl-tok rl-diff" if is_marker[t] else "rl-tok"
        title = ("fires: " + ", ".join(who)) if who else "none of the selected experts"
        out.append(f'<span class="{cls}" style="{style}" title="{html.escape(title)}">'
                   f'{html.escape(text.replace(chr(10), "⏎" + chr(10)) or "∅")}</span>')
    out.append("</div>")
    return "".join(out)


if __name__ == "__main__":
    render()
