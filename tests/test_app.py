"""The dashboard (``app/``): its queries and pure helpers against brute force on planted routing, and every page
through ``streamlit.testing.v1.AppTest`` on a small store built here (no exceptions, the key elements present,
interactions change what is shown, and the empty / missing / incomplete cases give their message and command)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from streamlit.testing.v1 import AppTest

from routelens.analyses.results import save_result
from routelens.records import ExpertStat, RunMeta, SequenceRecord, TokenBlock
from routelens.store import Store

MAIN = Path(__file__).resolve().parent.parent / "app" / "main.py"
E, K, LAYERS, NUM_LAYERS = 8, 2, (1, 2, 3), 4  # layer 0 is dense: the store's layer indices have a gap
SEQ_LEN = 12
LANGS = ("en", "de", "fr")
VOCAB = {i: f"w{i}" for i in range(20)} | {3: "<think>", 4: "</think>", 5: "Wait", 6: "<b>&amp;"}
SQL_NAME = "x'); DROP TABLE runs; --"
SUPER = (1, 6)  # the planted super expert (layer, expert)
PLANT_LAYER, PLANT_FROM, PLANT_TO = 2, 3, 7  # run B: expert 3 replaced by 7 in layer 2


def planted_routing(token_id: np.ndarray) -> np.ndarray:
    """experts[L, N, K]: rank 0 = (token + layer) % E, rank 1 = (3·token + layer + 1) % E (bumped if equal)."""
    out = np.zeros((len(LAYERS), len(token_id), K), np.int64)
    for li, layer in enumerate(LAYERS):
        a = (token_id + layer) % E
        b = (3 * token_id + layer + 1) % E
        b = np.where(b == a, (b + 1) % E, b)
        out[li, :, 0], out[li, :, 1] = a, b
    return out


def _meta(name, tags=()):
    return RunMeta(model="synthetic", architecture="Synthetic", family="qwen3_moe", config_hash="0", num_experts=E,
                   top_k=K, moe_layers=LAYERS, num_layers=NUM_LAYERS, dtype="float32", transformers_version="-",
                   torch_version="-", routelens_version="-", input_source="test.jsonl", name=name, tags=tuple(tags))


def _tokens():
    rng = np.random.default_rng(0)
    n_seq = 2 * len(LANGS)
    token_id = rng.integers(0, 20, n_seq * SEQ_LEN).astype(np.int32)
    token_id[SEQ_LEN * 0 + 2] = 3  # a <think> in sequence 0, a Wait in sequence 1
    token_id[SEQ_LEN * 1 + 5] = 5
    seq = np.repeat(np.arange(n_seq, dtype=np.int64), SEQ_LEN)
    pos = np.tile(np.arange(SEQ_LEN, dtype=np.int32), n_seq)
    seqs = [SequenceRecord(seq_id=i, text=" ".join(VOCAB[int(t)] for t in token_id[seq == i]), n_tokens=SEQ_LEN,
                           label="reasoning" if i % 2 else "parallel", lang=LANGS[i % len(LANGS)],
                           align_id=f"a{i // len(LANGS)}") for i in range(n_seq)]
    return seq, pos, token_id, seqs


def _write(store, name, experts, *, tags=(), logits=False, stats=False, status="complete"):
    seq, pos, token_id, seqs = _tokens()
    L, N, _ = experts.shape
    weights = np.broadcast_to(np.array([0.7, 0.3], np.float32), (L, N, K)).copy()
    lg = None
    if logits:
        lg = np.full((L, N, E), -2.0, np.float32)
        np.put_along_axis(lg, experts, np.array([2.0, 1.0], np.float32)[None, None, :], axis=2)
    res = np.linspace(1, 5, NUM_LAYERS * N, dtype=np.float32).reshape(NUM_LAYERS, N)
    res[2, 0] = 900.0  # a massive activation after layer 2 at (seq 0, pos 0)
    writer = store.create_run(_meta(name, tags))
    writer.add_sequences(seqs)
    writer.add_block(TokenBlock(seq_id=seq, pos=pos, token_id=token_id, layers=LAYERS, experts=experts.astype(np.uint16),
                                weights=weights, logits=None if lg is None else lg.astype(np.float16),
                                residual_layers=tuple(range(NUM_LAYERS)), residual_max=res,
                                residual_channel=np.zeros_like(res, dtype=np.int32)))
    writer.add_vocabulary(VOCAB)
    if stats:
        writer.add_expert_stats([ExpertStat(layer=l, expert=e, n_tokens=10, max_out=500.0 if (l, e) == SUPER else
                                            1.0 + e + l, max_out_seq=0, max_out_pos=0, max_out_channel=1,
                                            max_in=2.0, max_in_seq=0, max_in_pos=0, max_in_channel=0)
                                 for l in LAYERS for e in range(E)])
    return writer.finish(status)


def _results(store, info):
    rows = []
    for layer in (None, *LAYERS):
        base = 0.5 if layer is None else 0.4 + 0.1 * LAYERS.index(layer)
        for m in (4, 16, 64):
            rows.append(("srp", layer, m, None, base + 0.001 * m, base, base + 0.1))
            for rho in (1.0, 2.0):
                rows.append(("sch", layer, m, rho, base * rho / 2, None, None))
        for metric, f in (("lru", 0.3), ("lfu", 0.35), ("belady", 0.6)):
            for rho in (1.0, 2.0):
                rows.append((metric, layer, None, rho, f * rho / 2, None, None))
    lrc = pl.DataFrame(rows, schema={"metric": pl.Utf8, "layer": pl.Int32, "m": pl.Int32, "rho": pl.Float64,
                                     "value": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64}, orient="row")
    save_result(store, "lrc", [info], {"m": [4, 16, 64]}, {"values": lrc})
    experts = pl.DataFrame({"layer": [l for l in LAYERS for _ in range(E)], "expert": list(range(E)) * len(LAYERS)})
    experts = experts.with_columns(
        pl.when((pl.col("layer") == SUPER[0]) & (pl.col("expert") == SUPER[1])).then(500.0)
        .otherwise(1.0 + pl.col("expert") + pl.col("layer")).alias("max_out"),
        ((pl.col("layer") == SUPER[0]) & (pl.col("expert") == SUPER[1])).alias("is_super"))
    sink = pl.DataFrame({"layer": [1, 1, 2, 2] * 2, "head": [0, 1, 0, 1] * 2, "mode": ["weights"] * 4 + ["router"] * 4,
                         "mass_before": [0.8] * 8, "mass_after": [0.2, 0.3, 0.25, 0.35, 0.5, 0.6, 0.55, 0.65]})
    save_result(store, "super-experts", [info], {"q": 99.5}, {
        "experts": experts, "criterion": pl.DataFrame({"q": [99.5], "threshold": [50.0], "n_super": [1]}),
        "massive": pl.DataFrame({"layer": [0, 1, 2, 3], "max_value": [5.0, 6.0, 900.0, 7.0],
                                 "mean_value": [1.0, 1.0, 2.0, 2.0]}),
        "attention_sink": sink,
        "ablation": pl.DataFrame({"mode": ["weights"], "ppl_before": [10.0], "ppl_after": [30.0]})})
    div = pl.DataFrame({"lang": [l for l in ("de", "fr") for _ in LAYERS], "layer": list(LAYERS) * 2,
                        "jsd_n": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "jsd": [0.05, 0.1, 0.15, 0.2, 0.25, 0.3],
                        "n_pairs": [2] * 6})
    save_result(store, "crosslingual", [info], {"reference": "en", "mode": "counts"}, {
        "divergence": div, "pairwise": pl.DataFrame(schema={"lang_a": pl.Utf8, "lang_b": pl.Utf8, "layer": pl.Int32,
                                                            "jsd_n": pl.Float64, "jsd": pl.Float64}),
        "specialised": pl.DataFrame({"layer": [2], "expert": [4], "lang": ["de"], "diff": [0.3], "threshold": [0.2]})})
    ranking = pl.DataFrame({"marker": ["<think>"] * 3 + ["Wait"] * 2, "layer": [1, 2, 3, 1, 3],
                            "expert": [4, 5, 6, 6, 0], "n_x": [1] * 5, "n_y": [5] * 5, "n_xy": [1] * 5,
                            "npmi": [0.9, 0.8, 0.7, 0.95, 0.5], "rank": [1, 2, 3, 1, 2]})
    save_result(store, "npmi", [info], {"top_n": 3}, {
        "ranking": ranking, "markers": pl.DataFrame({"marker": ["<think>", "Wait"], "token_ids": [[3], [5]],
                                                     "n_x": [1, 1]}),
        "notes": pl.DataFrame(schema={"message": pl.Utf8})})


def build_store(path) -> dict:
    """The test store: run 1 (logits, expert stats, every analysis result), run 2 (same tokens, expert 3 replaced by
    7 in layer 2, steered-like), run 3 (incomplete, a name full of SQL). Returns the RunInfos by role."""
    store = Store.open(path)
    _, _, token_id, _ = _tokens()
    experts = planted_routing(token_id)
    a = _write(store, "base", experts, tags=("demo",), logits=True, stats=True)
    changed = experts.copy()
    li = LAYERS.index(PLANT_LAYER)
    changed[li][changed[li] == PLANT_FROM] = PLANT_TO
    changed[li, :, 1] = np.where(changed[li, :, 1] == changed[li, :, 0], (changed[li, :, 1] + 1) % E, changed[li, :, 1])
    b = _write(store, "steered", changed, tags=("steer", "it's"))
    c = _write(store, SQL_NAME, experts, status="incomplete")
    _results(store, a)
    return {"base": a, "steered": b, "sql": c, "experts": experts, "changed": changed, "token_id": token_id}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    db = tmp_path_factory.mktemp("app") / "store.duckdb"
    out = build_store(db)
    out["db"] = str(db)
    return out


def app(db: str | None, page: str | None = None, run_id: int | None = None) -> AppTest:
    at = AppTest.from_file(str(MAIN), default_timeout=60)
    if db is not None:
        at.session_state["rl_db"] = db
    if run_id is not None:
        at.session_state["rl_run"] = run_id
    at.run()
    if page:
        at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def arr(value) -> np.ndarray:
    """A plotly JSON array: a list, or plotly's typed-array form {"dtype", "bdata" (base64), "shape"}."""
    if isinstance(value, dict) and "bdata" in value:
        import base64

        out = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        if shape:
            out = out.reshape([int(x) for x in str(shape).split(",")])
        return out.astype(float)
    return np.array(value, dtype=float)


def htmls(at) -> str:
    return "".join(h.proto.body for h in at.get("html"))


PAGES = ("runs", "overview", "tokens", "consistency", "super_experts", "crosslingual", "cognitive", "steering")


# -- pure helpers and queries, against hand-computed values and brute force ---------------------------------------

def test_load_balance_hand_computed():
    from routelens.app.metrics import lb_value, load_balance, router_entropy

    b = load_balance(np.array([[2, 2, 0, 0], [1, 1, 1, 1]]), top_k=2)
    # layer 0: f = (.5, .5, 0, 0), mean .25, std .25 -> cv 1; max/mean 2; entropy ln2/ln4 = 0.5; 2 tokens
    assert b["cv"][0] == pytest.approx(1.0) and b["max_over_mean"][0] == pytest.approx(2.0)
    assert b["load_entropy"][0] == pytest.approx(0.5) and b["n_tokens"][0] == 2
    assert b["cv"][1] == pytest.approx(0.0) and b["load_entropy"][1] == pytest.approx(1.0)
    assert router_entropy(np.array([[0.5, 0.5, 0, 0], [1, 0, 0, 0]])) == pytest.approx(math.log(2) / 2)
    # f = (.5,.5,0,0), P = mean rows = (.75,.25,0,0): 4 * (.375 + .125) = 2
    assert lb_value(np.array([.5, .5, 0, 0]), np.array([[.5, .5, 0, 0], [1, 0, 0, 0]])) == pytest.approx(2.0)


def test_router_probabilities_softmax_and_sigmoid():
    from routelens.app.metrics import router_probabilities

    z = np.array([[0.0, math.log(3.0)]])
    assert router_probabilities(z, "qwen3_moe")[0] == pytest.approx([0.25, 0.75])
    s = 1 / (1 + np.exp(-z[0]))  # sigmoid(0) = .5, sigmoid(ln 3) = .75 -> normalised .4, .6
    assert router_probabilities(z, "deepseek_v3")[0] == pytest.approx(s / s.sum()) and s[1] == pytest.approx(0.75)


def test_unpack_and_topk_changed():
    from routelens.app.queries import unpack_choices
    from routelens.app.tokenview import topk_changed

    bits = np.array([0.5, 0.25], np.float16).view(np.uint16).astype(np.uint32)
    e, w = unpack_choices(np.array([(3 << 16) | bits[0], (40 << 16) | bits[1]]))
    assert e.tolist() == [3, 40] and w.tolist() == [0.5, 0.25]
    assert topk_changed(np.array([[1, 2], [1, 2]]), np.array([[2, 1], [1, 3]])).tolist() == [False, True]


def test_sequence_html_escapes_and_marks():
    from routelens.app.tokenview import sequence_html

    out = sequence_html(["<script>", "ok"], np.array([[1, 2], [3, 4]]), np.array([[.6, .4], [.5, .5]]), layer=2,
                        other=np.array([[2, 1], [3, 5]]), other_weights=np.array([[.5, .5], [.9, .1]]))
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert out.count("rl-diff\"") == 1 and "e1 0.600, e2 0.400" in out and "e3 0.900, e5 0.100" in out


def test_spec_from_rows_groups_and_validates():
    from routelens.app.steer_builder import geometry_of_run, spec_from_rows
    from routelens.steering import SteeringError, SteeringSpec

    spec = spec_from_rows([{"layer": 1, "expert": 3, "action": "disable", "value": 2.0},
                           {"layer": 1, "expert": 5, "action": "disable", "value": None},
                           {"layer": 2, "expert": 4, "action": "boost", "value": 1.5}], name="t")
    d = spec.to_dict()
    assert d["rules"] == [{"layers": [1], "experts": [3, 5], "action": "disable"},
                          {"layers": [2], "experts": [4], "action": "boost", "value": 1.5}]
    assert SteeringSpec.from_dict(d) == SteeringSpec.from_dict(json.loads(json.dumps(d)))
    with pytest.raises(SteeringError):
        spec_from_rows([{"layer": 1, "expert": 3, "action": "boost", "value": None}])
    geometry = geometry_of_run(_info_like())
    with pytest.raises(SteeringError, match="forces 3 experts"):
        spec_from_rows([{"layer": 1, "expert": e, "action": "force"} for e in range(3)]).resolve(geometry)


def _info_like():
    from routelens.records import RunInfo

    m = _meta("x")
    return RunInfo(**{**m.__dict__, "run_id": 1})


def test_expert_load_matches_brute_force(built):
    from routelens.app import queries

    got = queries.expert_load(built["db"], built["base"].run_id, E, LAYERS)
    ex = built["experts"]
    for li, layer in enumerate(LAYERS):
        want = np.bincount(ex[li].ravel(), minlength=E)
        top1 = np.bincount(ex[li, :, 0], minlength=E)
        sub = got.filter(pl.col("layer") == layer).sort("expert")
        assert sub["n"].to_list() == want.tolist() and sub["n_top1"].to_list() == top1.tolist()
        # weights are stored rounded to float16 (schema.py)
        w = (np.bincount(ex[li, :, 0], minlength=E) * float(np.float16(0.7))
             + np.bincount(ex[li, :, 1], minlength=E) * float(np.float16(0.3)))
        assert sub["weight_sum"].to_numpy() == pytest.approx(w, rel=1e-6)
    assert got.height == E * len(LAYERS)


def test_routing_change_and_usage_match_brute_force(built):
    from routelens.app import queries

    got = queries.routing_change(built["db"], built["base"].run_id, built["steered"].run_id).sort("layer")
    a, b = built["experts"], built["changed"]
    want_set = (np.sort(a, -1) != np.sort(b, -1)).any(-1).mean(1)
    want_top1 = (a[:, :, 0] != b[:, :, 0]).mean(1)
    assert got["topk_changed"].to_numpy() == pytest.approx(want_set)
    assert got["top1_changed"].to_numpy() == pytest.approx(want_top1)
    assert want_set[LAYERS.index(PLANT_LAYER)] > 0 and want_set[0] == 0
    usage = queries.usage_by_lang(built["db"], built["base"].run_id)
    seq = np.repeat(np.arange(2 * len(LANGS)), SEQ_LEN)
    lang = np.array([LANGS[s % len(LANGS)] for s in seq])
    li = 1
    mask = lang == "de"
    want = np.bincount(a[li, mask].ravel(), minlength=E) / mask.sum()
    sub = usage.filter((pl.col("lang") == "de") & (pl.col("layer") == LAYERS[li])).sort("expert")
    full = dict(zip(sub["expert"].to_list(), sub["share"].to_list()))
    assert [full.get(e, 0.0) for e in range(E)] == pytest.approx(want.tolist())


def test_queries_bind_parameters(built):
    from routelens.app import queries

    frame = queries.runs_table(built["db"], SQL_NAME)
    assert frame["name"].to_list() == [SQL_NAME]
    assert queries.runs_table(built["db"], "it's")["name"].to_list() == ["steered"]  # tag with a quote
    assert len(queries.runs(built["db"])) == 3  # the table is still there
    assert queries.sequences(built["db"], built["base"].run_id, "'; --").is_empty()
    ids = queries.token_ids_for_texts(built["db"], built["base"].run_id, ["<think>", "Wait"])
    assert sorted(ids["token_id"].to_list()) == [3, 5]


# -- pages through AppTest -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders(built, page):
    at = app(built["db"], page if page != "runs" else None, built["base"].run_id)
    assert at.title[0].value.startswith({"super_experts": "Super", "cognitive": "Cognitive",
                                         "crosslingual": "Cross"}.get(page, page.capitalize()[:5]))
    assert not at.error, [e.value for e in at.error]


def test_runs_page(built):
    at = app(built["db"])
    table = at.dataframe[0].value
    assert sorted(table["name"].tolist()) == sorted(["base", "steered", SQL_NAME])
    assert {m.label: m.value for m in at.metric}["experts E"] == str(E)
    assert any("incomplete run(s) [3]" in w.value for w in at.warning)
    at.text_input(key="runs_filter").set_value(SQL_NAME).run()
    assert not at.exception and at.dataframe[0].value["name"].tolist() == [SQL_NAME]
    assert len(at.download_button) >= 2


def test_overview_heatmap_and_detail(built):
    at = app(built["db"], "overview", built["base"].run_id)
    fig = charts(at)[0]
    z = arr(fig["data"][0]["z"])
    ex = built["experts"]
    assert z.shape == (len(LAYERS), E)
    assert z[0] == pytest.approx(np.bincount(ex[0].ravel(), minlength=E) / ex.shape[1])
    assert any("router entropy" in c.value for c in at.caption)
    layer, expert = LAYERS[1], int(ex[1, 0, 0])
    at.selectbox(key="ov_layer").set_value(layer)
    at.selectbox(key="ov_expert").set_value(expert).run()
    n = {m.label: m.value for m in at.metric}["tokens routed"]
    assert int(n.replace(",", "")) == int((ex[1] == expert).any(-1).sum())
    at.radio(key="ov_metric").set_value("× even share").run()
    z2 = arr(charts(at)[0]["data"][0]["z"])
    assert z2[0] == pytest.approx(z[0] / (K / E))
    at.button(key="ov_add").click().run()
    assert at.session_state["rl_basket"][0]["layer"] == layer


def test_tokens_page_layers_and_compare(built):
    at = app(built["db"], "tokens", built["base"].run_id)
    html1 = htmls(at)
    assert "&lt;b&gt;&amp;amp;" in html1 or "w" in html1
    assert f"layer {LAYERS[0]}:" in html1
    at.select_slider(key="tok_layer").set_value(PLANT_LAYER).run()
    html2 = htmls(at)
    assert f"layer {PLANT_LAYER}:" in html2 and html1 != html2 and "rl-diff\"" not in html2
    at.selectbox(key="tok_compare").set_value(built["steered"].run_id).run()
    html3 = htmls(at)
    a, b = built["experts"], built["changed"]
    li = LAYERS.index(PLANT_LAYER)
    want = int((np.sort(a[li, :SEQ_LEN], -1) != np.sort(b[li, :SEQ_LEN], -1)).any(-1).sum())
    assert html3.count("rl-diff\"") == want > 0
    at.radio(key="tok_view").set_value("layer × token grid").run()
    figs = charts(at)
    assert figs and arr(figs[0]["data"][0]["z"]).shape[0] == len(LAYERS)


def test_consistency_page(built):
    at = app(built["db"], "consistency", built["base"].run_id)
    figs = charts(at)
    assert len(figs) == 2 and {t["name"] for t in figs[0]["data"] if "name" in t} >= {"model", "layer 1"}
    names = {t.get("name") for t in figs[1]["data"]}
    assert {"sch", "lru", "lfu", "belady"} <= names
    at.selectbox(key="lrc_scope").set_value("layer 3").run()
    sch = [t for t in charts(at)[1]["data"] if t.get("name") == "sch"][0]
    assert arr(sch["y"]).tolist() == pytest.approx([0.6 * 1 / 2, 0.6 * 2 / 2])  # layer 3: base 0.6, value base·ρ/2


def test_analysis_pages_without_results(built):
    for page, name in (("consistency", "lrc"), ("cognitive", "npmi"), ("crosslingual", "crosslingual"),
                       ("super_experts", "super-experts")):
        at = app(built["db"], page, built["steered"].run_id)
        assert any(f"no `{name}` result for run {built['steered'].run_id}" in i.value for i in at.info), page
        assert any(f"routelens analyze {name} --db" in c.value and f"--run {built['steered'].run_id}" in c.value
                   for c in at.code), page


def test_super_experts_page(built):
    at = app(built["db"], "super_experts", built["base"].run_id)
    figs = charts(at)
    marks = [t for t in figs[0]["data"] if t.get("name") == "flagged"][0]
    assert (marks["y"], marks["x"]) == ([SUPER[0]], [SUPER[1]])
    flagged = [d.value for d in at.dataframe if "is_super" in d.value.columns][0]
    assert flagged[["layer", "expert"]].values.tolist()[0] == list(SUPER)
    before = charts(at)[2]
    at.selectbox(key="se_mode").set_value("weights").run()
    assert charts(at)[2] != before


def test_crosslingual_page(built):
    at = app(built["db"], "crosslingual", built["base"].run_id)
    figs = charts(at)
    assert {t["name"] for t in figs[0]["data"] if t.get("mode")} == {"de", "fr"}
    at.radio(key="xl_measure").set_value("jsd").run()
    de = [t for t in charts(at)[0]["data"] if t.get("name") == "de"][0]
    assert arr(de["y"]).tolist() == pytest.approx([0.05, 0.1, 0.15])
    at.selectbox(key="xl_lang").set_value("fr").run()
    assert "fr − en" in charts(at)[-1]["layout"]["title"]["text"]


def test_cognitive_page(built):
    at = app(built["db"], "cognitive", built["base"].run_id)
    assert arr(charts(at)[0]["data"][0]["x"]).tolist() == [0.9, 0.8, 0.7]
    assert "rl-diff" in htmls(at)  # the <think> token is boxed in its example sequence
    at.selectbox(key="cog_marker").set_value("Wait").run()
    assert arr(charts(at)[0]["data"][0]["x"]).tolist() == [0.95, 0.5]


def test_steering_builder(built):
    at = app(built["db"], "steering", built["base"].run_id)
    assert any("basket is empty" in i.value for i in at.info)
    at.multiselect(key="steer_layers").set_value([1, 2])
    at.multiselect(key="steer_experts").set_value([3])
    at.selectbox(key="steer_action").set_value("disable")
    at.button[0].click().run()  # the form's Add
    spec = json.loads(at.code[0].value)
    assert spec["rules"] == [{"layers": [1], "experts": [3], "action": "disable"},
                             {"layers": [2], "experts": [3], "action": "disable"}]
    assert any(b.label == "Save spec (JSON)" for b in at.download_button)
    at.multiselect(key="steer_experts").set_value([0, 1, 2])
    at.selectbox(key="steer_action").set_value("force")
    at.button[0].click().run()
    assert any("forces 3 experts" in e.value for e in at.error)  # k = 2


def test_steering_runs_the_embedded_model(tmp_path):
    """Out of the box: the shipped data/model generates with and without the spec, both traced into the store."""
    import routelens
    from routelens.app.steer_builder import DEFAULT_MODEL

    if not (DEFAULT_MODEL / "config.json").is_file():
        pytest.skip("data/model is not present")
    db = tmp_path / "s.duckdb"
    model, tok = routelens.load_model(str(DEFAULT_MODEL), dtype="float32")
    routelens.trace(model, tok, ["1 + 1 = 2"], store=db, name="seed", model_ref=str(DEFAULT_MODEL))
    at = app(str(db), "steering")
    at.session_state["rl_basket"] = [{"layer": l, "expert": e, "action": "disable", "value": None, "source": "t"}
                                     for l in range(8) for e in range(8)]
    at.session_state["rl_basket_version"] = 99
    at.run()
    at.slider(key="steer_max_new").set_value(4)
    at.button(key="steer_go").click().run(timeout=180)
    assert not at.exception, [e.value for e in at.exception]
    out = at.session_state["rl_steer_result"]
    runs = Store.open(db).runs()
    assert [r.name for r in runs] == ["seed", "app-base", "app-steered"] and runs[2].steering is not None
    assert out["changed"] > 0 and len(at.get("plotly_chart")) >= 2
    assert any("With the spec" in m.value for m in at.markdown)


# -- missing pieces: each says what is wrong and which command fixes it ------------------------------------------

def test_no_store_chosen(monkeypatch):
    monkeypatch.delenv("ROUTELENS_DB", raising=False)
    for page in PAGES:
        at = app(None, page if page != "runs" else None)
        assert any("no store chosen" in i.value and "routelens app --db" in i.value for i in at.info), page


def test_missing_and_empty_store(tmp_path):
    at = app(str(tmp_path / "nope.duckdb"))
    assert any("no store at" in i.value and "routelens demo" in i.value for i in at.info)
    empty = tmp_path / "empty.duckdb"
    Store.open(empty)
    for page in PAGES:
        at = app(str(empty), page if page != "runs" else None)
        assert any("holds no runs yet" in i.value and "routelens trace" in i.value for i in at.info), page


def test_incomplete_run_and_open_writer(tmp_path):
    """A run still being written: the store is read between the writer's flushes, the page warns and shows it."""
    db = tmp_path / "w.duckdb"
    store = Store.open(db)
    seq, pos, token_id, seqs = _tokens()
    writer = store.create_run(_meta("writing"))
    writer.add_sequences(seqs)
    writer.add_block(TokenBlock(seq_id=seq, pos=pos, token_id=token_id, layers=LAYERS,
                                experts=planted_routing(token_id).astype(np.uint16),
                                weights=np.full((len(LAYERS), len(seq), K), 0.5, np.float32)))
    import time

    deadline = time.monotonic() + 20
    while Store.open(db).sql("SELECT count(*) AS n FROM routing_data")["n"][0] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)  # the background writer flushes about once a second
    try:
        for page in ("overview", "tokens", "runs"):
            at = app(str(db), page if page != "runs" else None)
            assert any("incomplete" in w.value for w in at.warning), page
        at = app(str(db), "consistency")
        assert any("run it after the run is complete" in c.value for c in at.caption)
    finally:
        writer.finish()
    at = app(str(db), "overview")
    assert not any("incomplete" in w.value for w in at.warning)
