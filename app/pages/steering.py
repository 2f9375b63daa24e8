"""Steering: build a spec from experts picked on any page (the basket) or typed here, run it on the loaded model (the
embedded default out of the box) for a prompt, see both outputs and the routing difference, and save the spec."""
import json

import pandas as pd
import polars as pl
import streamlit as st

from routelens.app import data, figures, state, steer_builder, widgets
from routelens.errors import RoutelensError
from routelens.steering import ACTIONS

KEY_RESULT = "rl_steer_result"


@st.cache_resource(show_spinner=False, max_entries=2)
def load_model(path: str):
    import routelens

    model, tok = routelens.load_model(path, dtype="float32")
    return model.eval(), tok


def render() -> None:
    ctx = state.current()
    st.title("Steering")
    run = None if ctx.error else ctx.run
    basket = st.session_state.setdefault(state.KEY_BASKET, [])

    st.subheader("1 · Experts")
    with st.form("steer_add", clear_on_submit=False, border=False):
        c = st.columns([2, 3, 2, 1, 1])
        layers = list(run.moe_layers) if run else []
        experts = list(range(run.num_experts)) if run else []
        sel_layers = c[0].multiselect("Layers", layers, key="steer_layers")
        sel_experts = c[1].multiselect("Experts", experts, key="steer_experts")
        action = c[2].selectbox("Action", ACTIONS, key="steer_action")
        value = c[3].number_input("Value", value=2.0, key="steer_value", help="boost factor β or bias b")
        add = c[4].form_submit_button("Add")
    if add:
        if not sel_layers or not sel_experts:
            st.warning("pick at least one layer and one expert")
        else:
            state.add_to_basket([(l, e) for l in sel_layers for e in sel_experts], "manual", action,
                                value if action in steer_builder.NEEDS_VALUE else None)
    st.caption("Experts also come from the other pages: Overview (a clicked cell), Super experts (flagged), "
               "Cross-lingual (specialised), Cognitive experts (nPMI ranking).")
    rows = _editor(basket)
    if not rows:
        st.info("the basket is empty: add experts above or from another page")

    st.subheader("2 · Spec")
    name = st.text_input("Spec name", value="app-spec", key="steer_name")
    spec = None
    try:
        spec = steer_builder.spec_from_rows(rows, name=name or None, source={"built_with": "routelens app"})
        if run is not None and rows:
            spec.resolve(steer_builder.geometry_of_run(run))
    except RoutelensError as exc:
        st.error(str(exc))
        spec = None
    if spec is not None:
        text = json.dumps(spec.to_dict(), indent=2)
        st.code(text, language="json")
        c1, c2, c3 = st.columns([1, 3, 1])
        c1.download_button("Save spec (JSON)", text + "\n", file_name=f"{name or 'spec'}.json",
                           mime="application/json", key="steer_download")
        path = c2.text_input("or write it to a file", key="steer_path", placeholder="specs/my-spec.json",
                             label_visibility="collapsed")
        if c3.button("Write", key="steer_write") and path:
            try:
                st.success(f"written to {spec.save(path)}")
            except (OSError, RoutelensError) as exc:
                st.error(f"cannot write {path}: {exc}")

    st.subheader("3 · Run it")
    if ctx.error:
        st.info(ctx.error + " (the runs are traced into the store)")
        return
    model_path = st.text_input("Model", value=steer_builder.model_for_run(run), key="steer_model",
                               help="local model folder; default: the run's model if local, else data/model")
    prompt = st.text_area("Prompt", value="<think> 12 + 7 = ", key="steer_prompt")
    max_new = st.slider("New tokens", 1, 64, 16, key="steer_max_new")
    go = st.button("Generate with and without the spec", type="primary", key="steer_go",
                   disabled=spec is None or not rows or not prompt.strip())
    if go:
        _run(ctx, model_path, prompt, int(max_new), spec)
    out = st.session_state.get(KEY_RESULT)
    if out:
        _show(ctx, out)


def _editor(basket: list[dict]) -> list[dict]:
    frame = pd.DataFrame(basket, columns=["layer", "expert", "action", "value", "source"])
    version = st.session_state.get("rl_basket_version", 0)
    edited = st.data_editor(
        frame, key=f"steer_editor_{version}", num_rows="dynamic", hide_index=True, width="stretch",
        column_config={"action": st.column_config.SelectboxColumn("action", options=list(ACTIONS), required=True),
                       "value": st.column_config.NumberColumn("value", help="boost β / bias b"),
                       "layer": st.column_config.NumberColumn("layer", step=1, required=True),
                       "expert": st.column_config.NumberColumn("expert", step=1, required=True)})
    rows = [r for r in edited.to_dict("records") if pd.notna(r.get("layer")) and pd.notna(r.get("expert"))]
    if st.button("Clear the basket", key="steer_clear") and basket:
        basket.clear()
        st.session_state["rl_basket_version"] = version + 1
        st.rerun()
    return rows


def _run(ctx, model_path: str, prompt: str, max_new: int, spec) -> None:
    from routelens.records import SequenceRecord
    from routelens.steering.experiment import compare

    with st.status("steering run", expanded=True) as status:
        bar = st.progress(0, text="loading the model")
        try:
            model, tok = load_model(model_path)
            bar.progress(25, text=f"generating {max_new} tokens without, then with, the spec (both traced into "
                                  "the store)")
            result = compare(model, tok, [SequenceRecord(seq_id=0, text=prompt)], spec, store=ctx.db,
                             max_new_tokens=max_new, name="app", model_ref=model_path, input_source="routelens app",
                             batch_size=1)
            bar.progress(90, text="comparing the routing")
        except RoutelensError as exc:
            status.update(label="steering run failed", state="error")
            st.error(str(exc))
            return
        bar.progress(100, text="done")
        status.update(label=f"done: base run {result.base_run_id}, steered run {result.steered_run_id}",
                      state="complete", expanded=False)
    p = result.prompts[0]
    st.session_state[KEY_RESULT] = {"base": result.base_run_id, "steered": result.steered_run_id,
                                    "prompt": p.prompt, "base_text": p.base_text, "steered_text": p.steered_text,
                                    "changed": p.routing_changed}


def _show(ctx, out: dict) -> None:
    stamp = data.stamp(ctx.db)
    st.markdown(f"**Prompt:** `{out['prompt']}`")
    c1, c2 = st.columns(2)
    c1.markdown(f"**Without the spec** (run {out['base']})")
    c1.code(out["base_text"] or "", language=None)
    c2.markdown(f"**With the spec** (run {out['steered']})")
    c2.code(out["steered_text"] or "", language=None)
    if out.get("changed") is not None:
        st.metric("prompt routing changed", f"{out['changed']:.1%}",
                  help="share of (prompt token, MoE layer) top-k sets that differ")
    change = data.routing_change(ctx.db, stamp, out["base"], out["steered"])
    if change.height:
        st.plotly_chart(figures.lines(change.unpivot(index="layer", on=["topk_changed", "top1_changed"],
                                                     variable_name="measure", value_name="share"),
                                      "layer", "share", color="measure",
                                      title="Tokens whose routing changed (same token, same position)"),
                        key="steer_change")
    load = data.load_change(ctx.db, stamp, out["base"], out["steered"])
    st.plotly_chart(figures.heatmap(load, "diff", title="Expert load, steered − base (share of tokens)",
                                    colorscale="RdBu_r", zmid=0.0, hover_label="difference"), key="steer_load")
    widgets.table(load.filter(pl.col("diff") != 0), "steer_load_t", f"load_change_{out['base']}_{out['steered']}")
    st.caption(f"both runs are in the store: open Tokens, pick run {out['base']} and compare with run {out['steered']}")


if __name__ == "__main__":
    render()
