"""Tokens: a sequence's text coloured by its experts at one layer (hover: top-k experts and weights), or the
layer × token grid; optionally compared with another run over the same tokens, differences marked."""
import numpy as np
import polars as pl
import streamlit as st

from routelens.app import data, figures, state, tokenview, widgets

GRID_MAX_TOKENS = 256  # one plotly cell per (layer, token): wider grids are paged


def _aligned(tok_a: pl.DataFrame, tok_b: pl.DataFrame) -> np.ndarray:
    """Positions (indices into a) whose token id equals b's at the same position: where routing is comparable."""
    a = dict(zip(tok_a["pos"].to_list(), tok_a["token_id"].to_list()))
    b = dict(zip(tok_b["pos"].to_list(), tok_b["token_id"].to_list()))
    return np.array([b.get(p) == t for p, t in a.items()], dtype=bool)


def render() -> None:
    ctx = state.current()
    st.title("Tokens")
    run = state.require_run(ctx)
    if run is None:
        return
    search = st.text_input("Find sequences containing", key="tok_search")
    seqs = data.sequences(ctx.db, ctx.stamp, run.run_id, search)
    if seqs.is_empty():
        st.info(f"no sequence of run {run.run_id} contains {search!r}" if search else
                f"run {run.run_id} has no sequences yet")
        return
    previews = dict(zip(seqs["seq_id"].to_list(), seqs["preview"].to_list()))
    seq_id = st.selectbox("Sequence", list(previews), key="tok_seq",
                          format_func=lambda s: f"{s}: {(previews[s] or '').replace(chr(10), ' ')[:90]}")
    row = seqs.filter(pl.col("seq_id") == seq_id).row(0, named=True)
    meta = " · ".join(f"{k} {row[k]}" for k in ("label", "lang", "align_id") if row.get(k))
    if meta:
        st.caption(meta)

    c1, c2, c3 = st.columns([2, 1, 2])
    layer = c1.select_slider("Layer", options=list(run.moe_layers), key="tok_layer")
    view = c2.radio("View", ["text", "layer × token grid"], key="tok_view")
    others = {r.run_id: r for r in ctx.other_runs()}
    compare = c3.selectbox("Compare with run", [None, *others], key="tok_compare",
                           format_func=lambda i: "— none —" if i is None else state.run_label(others[i]))

    tokens, routing = data.sequence(ctx.db, ctx.stamp, run.run_id, int(seq_id), tuple(run.moe_layers), run.top_k)
    if tokens.is_empty():
        st.info(f"sequence {seq_id} has no stored tokens yet")
        return
    texts = [t if t is not None else f"[{i}]" for t, i in zip(tokens["token"].to_list(), tokens["token_id"].to_list())]
    generated = tokens["generated"].to_list()
    if routing.experts.shape[1] != len(texts):
        st.warning(f"routing covers {routing.experts.shape[1]} of {len(texts)} tokens (run still being written?)")
        n = min(routing.experts.shape[1], len(texts))
        texts, generated = texts[:n], generated[:n]
        routing.experts, routing.weights = routing.experts[:, :n], routing.weights[:, :n]
    li = list(run.moe_layers).index(layer)

    other = None
    if compare is not None:
        orun = others[compare]
        if (orun.num_experts, orun.top_k, tuple(orun.moe_layers)) != (run.num_experts, run.top_k, tuple(run.moe_layers)):
            st.warning(f"run {compare} has a different routing geometry (E, k or layers); it cannot be compared here")
        else:
            otok, orout = data.sequence(ctx.db, ctx.stamp, orun.run_id, int(seq_id), tuple(orun.moe_layers), orun.top_k)
            if otok.is_empty():
                st.warning(f"run {compare} has no sequence {seq_id}")
            else:
                other = _compare(run, orun, tokens, otok, routing, orout, len(texts))

    if row.get("generated_text"):
        st.markdown(f"**Generated continuation:** {row['generated_text']!r}")
    if view == "text":
        e, w = routing.experts[li], routing.weights[li]
        oe = ow = None
        if other is not None:
            oe, ow = other["experts"][li], other["weights"][li]
        st.html(tokenview.legend_html(sorted({int(x) for x in e[:, 0] if x >= 0})))
        st.html(tokenview.sequence_html(texts, e, w, layer=layer, generated=generated, other=oe, other_weights=ow,
                                        other_label=f"run {compare}"))
        st.caption("hover a token for its top-k experts and weights; dotted underline = generated token"
                   + ("; red outline = top-k set differs in the compared run" if other is not None else ""))
    else:
        start = 0
        if len(texts) > GRID_MAX_TOKENS:
            start = st.slider("First token", 0, len(texts) - 1, 0, step=GRID_MAX_TOKENS, key="tok_grid_start")
        sl = slice(start, start + GRID_MAX_TOKENS)
        changed = other["changed"][:, sl] if other is not None else None
        st.plotly_chart(figures.token_grid(texts[sl], routing.layers, routing.experts[:, sl], routing.weights[:, sl],
                                           title=f"Top-1 expert per layer, sequence {seq_id}", changed=changed),
                        key="tok_grid")
    if other is not None:
        st.subheader(f"Run {run.run_id} vs run {compare}")
        st.caption(f"{other['n_aligned']} of {len(texts)} tokens are the same token at the same position in both "
                   "runs; only those are compared")
        widgets.table(other["per_layer"], "tok_cmp", f"compare_{run.run_id}_{compare}_seq{seq_id}")
        whole = data.routing_change(ctx.db, ctx.stamp, run.run_id, int(compare))
        if whole.height:
            st.markdown("**Whole runs** (all aligned tokens)")
            st.plotly_chart(figures.lines(whole.unpivot(index="layer", on=["topk_changed", "top1_changed"],
                                                        variable_name="measure", value_name="share"),
                                          "layer", "share", color="measure", title="Share of tokens whose routing changed"),
                            key="tok_cmp_fig")


def _compare(run, orun, tokens, otok, routing, orout, n):
    """Align the other run's routing to this sequence's positions; mark top-k set changes on equal tokens."""
    ok = _aligned(tokens.head(n), otok)
    pos = tokens["pos"].to_numpy()[:n]
    index = {int(p): i for i, p in enumerate(orout.pos)}
    L, k = len(run.moe_layers), run.top_k
    E = np.full((L, n, k), -1, np.int16)
    W = np.full((L, n, k), np.nan, np.float32)
    for t, p in enumerate(pos):  # one sequence: at most a few thousand positions
        j = index.get(int(p))
        if j is not None and ok[t]:
            E[:, t], W[:, t] = orout.experts[:, j], orout.weights[:, j]
    changed = tokenview.topk_changed(routing.experts[:, :n], E) & ok[None, :]
    top1 = (routing.experts[:, :n, 0] != E[:, :, 0]) & ok[None, :]
    denom = max(int(ok.sum()), 1)
    per_layer = pl.DataFrame({"layer": list(run.moe_layers), "topk_changed": changed.sum(1) / denom,
                              "top1_changed": top1.sum(1) / denom, "n_tokens": [int(ok.sum())] * L})
    E[:, ~ok] = routing.experts[:, :n][:, ~ok]  # unaligned tokens are not marked as different
    return {"experts": E, "weights": W, "changed": changed, "per_layer": per_layer, "n_aligned": int(ok.sum())}


if __name__ == "__main__":
    render()
