"""Cross-lingual: routing divergence from the reference language per layer (one line per language) from the
`crosslingual` result, its specialised experts, and the expert usage differences per language."""
import polars as pl
import streamlit as st

from routelens.app import data, figures, state, widgets


def usage_diff(usage: pl.DataFrame, lang: str, ref: str, layers, num_experts: int) -> pl.DataFrame:
    """Share of ``lang``'s tokens routed to each (layer, expert) minus the reference language's (0 where unused)."""
    import numpy as np

    grid = pl.DataFrame({"layer": np.repeat(np.asarray(layers, np.int16), num_experts),
                         "expert": np.tile(np.arange(num_experts, dtype=np.int16), len(layers))})

    def of(code):
        return grid.join(usage.filter(pl.col("lang") == code).select("layer", "expert", "share"),
                         on=["layer", "expert"], how="left").with_columns(pl.col("share").fill_null(0.0))

    a, b = of(lang), of(ref)
    return a.with_columns((a["share"] - b["share"]).alias("diff"), b["share"].alias("share_ref"))


def render() -> None:
    ctx = state.current()
    st.title("Cross-lingual")
    run = state.require_run(ctx)
    if run is None:
        return
    res = widgets.analysis_result(ctx, "crosslingual", run, what="divergence from the reference language per layer; "
                                  "needs sequences with `lang` and `align_id`")
    ref = "en"
    if res is not None:
        ref = str(res.info.params.get("reference", "en"))
        div = widgets.part(res, "divergence", ("lang", "layer", "jsd_n", "jsd"), "crosslingual")
        if div is not None:
            measure = st.radio("Divergence", ["jsd_n", "jsd"], horizontal=True, key="xl_measure",
                               format_func=lambda m: {"jsd_n": "entropy-normalised JSD", "jsd": "raw JSD"}[m])
            st.plotly_chart(figures.divergence_lines(div.filter(pl.col("lang") != ref), measure,
                                                     title=f"Divergence from {ref} per layer (mode "
                                                           f"{res.info.params.get('mode', '?')})"),
                            key="xl_div")
            widgets.table(div, "xl_div_t", f"divergence_run{run.run_id}")
        spec = res.frames.get("specialised")
        if spec is not None:
            st.subheader("Multilingual-specialised experts")
            if spec.is_empty():
                st.caption("no expert passes the σ threshold in any layer")
            else:
                widgets.table(spec, "xl_spec", f"specialised_run{run.run_id}")
                if st.button("Add the specialised experts to the steering basket", key="xl_add"):
                    n = state.add_to_basket(zip(spec["layer"].to_list(), spec["expert"].to_list()), "crosslingual")
                    st.toast(f"{n} added")
        pw = res.frames.get("pairwise")
        if pw is not None and pw.height:
            with st.expander("pairwise divergence"):
                layer = st.select_slider("Layer", sorted(pw["layer"].unique().to_list()), key="xl_pw_layer")
                st.plotly_chart(figures.heatmap(pw.filter(pl.col("layer") == layer), "jsd_n", x="lang_b", y="lang_a",
                                                title=f"Pairwise JSD_n, layer {layer}"), key="xl_pw")

    st.subheader("Expert usage differences")
    usage = data.usage_by_lang(ctx.db, ctx.stamp, run.run_id)
    langs = sorted(usage["lang"].unique().to_list())
    if not langs:
        st.info(f"run {run.run_id} has no sequences with a `lang` field; trace a jsonl with `lang` and `align_id` "
                "(e.g. data/corpus/parallel.heldout.jsonl.gz)")
        return
    if ref not in langs:
        ref = langs[0]
    c1, c2 = st.columns(2)
    others = [l for l in langs if l != ref] or langs
    lang = c1.selectbox("Language", others, key="xl_lang")
    ref = c2.selectbox("against", langs, index=langs.index(ref), key="xl_ref")
    diff = usage_diff(usage, lang, ref, run.moe_layers, run.num_experts)
    st.plotly_chart(figures.heatmap(diff, "diff", title=f"Share of tokens per expert: {lang} − {ref} (executed top-k)",
                                    colorscale="RdBu_r", zmid=0.0, hover_label="difference"), key="xl_usage")
    widgets.table(diff, "xl_usage_t", f"usage_{lang}_vs_{ref}_run{run.run_id}")


if __name__ == "__main__":
    render()
