"""contrast: risk difference and selection on hand-computed counts, target-span mapping, planted ground truth through
the store, the exported spec (round trip, resolve, and steering a tiny model in the planted direction), every
family's trace through stats and contrast, and the CLI."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

import routelens
from routelens.analyses import run
from routelens.analyses.contrast import (activation_counts, contrast_spec, risk_difference, select_experts,
                                         target_span)
from routelens.cli import main
from routelens.errors import InputError
from routelens.records import RunMeta, SequenceRecord, TokenBlock
from routelens.steering import RoutingGeometry, SteeringSpec, steer
from routelens.store import Store
from routelens.tiny import build_tiny_model, byte_tokenizer
from tests.synthetic import write_run

FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe")


@pytest.fixture()
def store(tmp_path):
    return Store.open(tmp_path / "s.duckdb")


# -- hand-computed cases -----------------------------------------------------------------------------------------

def test_risk_difference_by_hand():
    # behaviour 1: 4 tokens, top-1 experts 0,0,0,1 -> a1 = [3,1,0]; behaviour 2: 5 tokens 1,1,2,2,2 -> a2 = [0,2,3]
    e1 = np.array([[[0], [0], [0], [1]]])
    e2 = np.array([[[1], [1], [2], [2], [2]]])
    a1, a2 = activation_counts(e1, 3), activation_counts(e2, 3)
    assert a1.tolist() == [[3, 1, 0]] and a2.tolist() == [[0, 2, 3]]
    f = risk_difference(a1, 4, a2, 5, [7])
    rows = {r["expert"]: r for r in f.to_dicts()}
    # p1 = [.75, .25, 0], p2 = [0, .4, .6], rd = [.75, -.15, -.6]
    assert [rows[e]["rd"] for e in range(3)] == pytest.approx([0.75, -0.15, -0.6])
    assert [rows[e]["rank"] for e in range(3)] == [1, 3, 2]
    assert [(rows[e]["a1"], rows[e]["d1"], rows[e]["a2"], rows[e]["d2"]) for e in range(3)] == [
        (3, 1, 0, 5), (1, 3, 2, 3), (0, 4, 3, 2)]
    assert f["layer"].to_list() == [7, 7, 7] and f["rank"].to_list() == [1, 2, 3]


def test_activation_counts_brute_force():
    rng = np.random.default_rng(0)
    L, N, k, E = 3, 100, 2, 6
    ex = np.stack([np.stack([rng.permutation(E)[:k] for _ in range(N)]) for _ in range(L)])
    brute = np.zeros((L, E), int)
    for l in range(L):
        for n in range(N):
            for e in ex[l, n]:
                brute[l, e] += 1
    assert (activation_counts(ex.astype(np.uint8), E) == brute).all()


def test_target_span():
    pieces = ["<s>", "a", "n", "s", ":", " ", "y", "e", "s", " ", "y", "e", "s"]
    assert target_span(pieces, "yes") == (10, 13)  # last occurrence
    assert target_span(["The", " answer", " is", " yes"], "answer is") == (1, 3)  # partial first token counts
    assert target_span(["n", "\ufffd", "\ufffd", "!"], "nö") == (0, 3)  # byte-level pieces of 'ö'
    assert target_span(["n", "ö", "!"], "nö") == (0, 2)
    assert target_span(["abc"], "x") is None and target_span(["abc"], "") is None


def _frame(rows):
    """A contrast frame from (layer, expert, rd) rows, ranked like risk_difference."""
    f = pl.DataFrame(rows, schema=["layer", "expert", "rd"], orient="row").with_columns(
        pl.col("rd").abs().alias("abs_rd"))
    return f.sort("abs_rd", "layer", "expert", descending=[True, False, False]).with_row_index(
        "rank", offset=1).with_columns(pl.col("rank").cast(pl.Int64))


def test_select_experts_by_hand():
    f = _frame([(0, 1, 0.9), (0, 2, 0.8), (1, 0, -0.7), (0, 3, 0.6), (1, 1, -0.5), (2, 4, 0.4)])
    # k=1: layer 0 accepts only expert 1; experts 2 and 3 are skipped (counted toward num_pos, as SteerMoE)
    s = select_experts(f, 3, 1, 1)
    assert list(zip(s["layer"], s["expert"], s["action"])) == [(0, 1, "force"), (1, 0, "disable")]
    s = select_experts(f, 4, 2, 2)
    assert list(zip(s["layer"], s["expert"], s["action"])) == [
        (0, 1, "force"), (0, 2, "force"), (1, 0, "disable"), (1, 1, "disable"), (2, 4, "force")]
    # reverse: the RD < 0 experts are forced, RD > 0 disabled
    s = select_experts(f, 1, 1, 2, reverse=True)
    assert list(zip(s["layer"], s["expert"], s["action"])) == [(0, 1, "disable"), (1, 0, "force")]
    # at most E - k disabled per layer when E is known (E=3, k=2: one)
    s = select_experts(f, 0, 2, 2, num_experts=3)
    assert list(zip(s["layer"], s["expert"], s["action"])) == [(1, 0, "disable")]
    with pytest.raises(InputError, match="only 4 and 2 exist"):
        select_experts(f, 0, 3, 2)
    spec = contrast_spec(f, 4, 2, 2)
    assert [r.to_dict() for r in spec.rules] == [
        {"layers": [0], "experts": [1, 2], "action": "force"}, {"layers": [2], "experts": [4], "action": "force"},
        {"layers": [1], "experts": [0, 1], "action": "disable"}]


def test_activation_counts_across_chunk_boundaries():
    """Counts accumulated over token chunks (bounded memory) equal an unchunked one-hot sum on > 2 chunks."""
    rng = np.random.default_rng(3)
    L, N, k, E = 2, 140_001, 3, 10
    ex = np.argsort(rng.random((L, N, E)) + np.linspace(0, 1, E), axis=-1)[..., :k].astype(np.uint8)
    onehot = np.zeros((L, N, E), np.int64)
    onehot[np.arange(L)[:, None, None], np.arange(N)[None, :, None], ex] = 1
    assert (activation_counts(ex, E) == onehot.sum(1)).all()


# -- planted ground truth ----------------------------------------------------------------------------------------

def _planted(store, n_seq=6, length=12, E=8, k=2):
    """Layer 1, expert 5 is rank 0 exactly for label-A tokens; everything else is drawn from the same pool."""
    rng = np.random.default_rng(0)
    labels = ["A" if i % 2 == 0 else "B" for i in range(n_seq)]
    N = n_seq * length
    lab = np.repeat(labels, length)
    ex = np.zeros((2, N, k), np.int64)
    for l in range(2):
        ex[l] = np.stack([rng.permutation(5)[:k] for _ in range(N)])
    ex[1, lab == "A", 0] = 5
    seqs = [SequenceRecord(seq_id=i, text=f"s{i}", n_tokens=length, label=labels[i]) for i in range(n_seq)]
    info = write_run(store, ex, seq_lengths=[length] * n_seq, num_experts=E, sequences=seqs, layers=(1, 3),
                     num_layers=4)
    return info, ex, lab


def test_planted_rank_one(store, tmp_path):
    info, ex, lab = _planted(store)
    r = run(store, "contrast", info.run_id, label1="A", label2="B", num_pos=1, num_neg=1,
            export_spec=str(tmp_path / "spec.json"))
    top = r.frames["experts"].row(0, named=True)
    assert (top["layer"], top["expert"], top["rd"], top["rank"]) == (3, 5, 1.0, 1)
    assert (top["a1"], top["d1"], top["a2"], top["d2"]) == (36, 0, 0, 36)
    assert r.frames["behaviours"]["n_tokens"].to_list() == [36, 36]
    # brute-force RD of every (layer, expert) from the planted arrays
    for row in r.frames["experts"].to_dicts():
        li = (1, 3).index(row["layer"])
        p1 = np.mean([row["expert"] in ex[li, n] for n in np.flatnonzero(lab == "A")])
        p2 = np.mean([row["expert"] in ex[li, n] for n in np.flatnonzero(lab == "B")])
        assert row["rd"] == pytest.approx(p1 - p2)
    # the export round-trips and resolves against the run's geometry
    spec = SteeringSpec.load(tmp_path / "spec.json")
    assert spec.source["analysis"] == "contrast" and spec.rules[0].to_dict() == {
        "layers": [3], "experts": [5], "action": "force"}
    tables = spec.resolve(RoutingGeometry(4, (1, 3), 8, 2))
    assert tables.layers[3].mask[5] == 1
    neg = r.frames["spec"].filter(action="disable").row(0, named=True)
    assert tables.layers[neg["layer"]].mask[neg["expert"]] == -1 and neg["rd"] < 0
    # reverse: the planted expert is disabled instead
    r = run(store, "contrast", info.run_id, label1="A", label2="B", num_neg=1, reverse=True, save=False)
    assert r.frames["spec"].to_dicts()[0] == {"layer": 3, "expert": 5, "action": "disable", "rd": 1.0, "rank": 1}


def test_loads_one_layer_at_a_time(store, monkeypatch):
    """Memory: each behaviour is read one MoE layer per load_routing call (all layers of a long run at once would
    exceed the trace's compact form), with the same planted result."""
    import routelens.analyses.contrast as contrast_module

    info, ex, lab = _planted(store)
    real, asked = contrast_module.load_routing, []

    def spy(st, run_info, layers=None, **kw):
        asked.append(tuple(layers))
        return real(st, run_info, layers, **kw)

    monkeypatch.setattr(contrast_module, "load_routing", spy)
    top = run(store, "contrast", info.run_id, label1="A", label2="B", eq=True, save=False).frames["experts"].row(
        0, named=True)
    assert sorted(asked) == [(1,), (1,), (3,), (3,)]  # each layer once per behaviour
    assert (top["layer"], top["expert"], top["rd"], top["a1"], top["a2"]) == (3, 5, 1.0, 36, 0)


def test_eq_and_two_runs(store):
    # run 1: 1 seq of 3 tokens all expert 0; run 2: 1 seq of 5 tokens: 0,0,1,1,1
    a = write_run(store, np.array([[[0], [0], [0]]]), seq_lengths=[3], num_experts=2, name="a")
    b = write_run(store, np.array([[[0], [0], [1], [1], [1]]]), seq_lengths=[5], num_experts=2, name="b")
    f = run(store, "contrast", [a.run_id, b.run_id], save=False).frames["experts"].sort("expert")
    assert f["rd"].to_list() == pytest.approx([1 - 2 / 5, 0 - 3 / 5])
    f = run(store, "contrast", [a.run_id, b.run_id], eq=True, save=False).frames["experts"].sort("expert")
    # eq keeps the first 3 tokens of each: run 2 -> 0,0,1
    assert f["rd"].to_list() == pytest.approx([1 - 2 / 3, 0 - 1 / 3]) and f["d2"].to_list() == [1, 2]
    c = write_run(store, np.array([[[0, 1]]]), seq_lengths=[1], num_experts=2, name="c")
    with pytest.raises(InputError, match="different routing"):
        run(store, "contrast", [a.run_id, c.run_id], save=False)


def _write_with_generated(store, experts, generated, token_texts, target):
    N = len(generated)
    meta = RunMeta(model="synthetic", architecture="Synthetic", family="qwen3_moe", config_hash="0", num_experts=4,
                   top_k=1, moe_layers=(0,), num_layers=1, dtype="float32", transformers_version="-",
                   torch_version="-", routelens_version="-", input_source="synthetic")
    ids = np.arange(N, dtype=np.int32)
    with store.create_run(meta) as w:
        w.add_sequences([SequenceRecord(seq_id=0, text="x", n_tokens=N, label="A", meta={"target": target}),
                         SequenceRecord(seq_id=1, text="y", n_tokens=N, label="B", meta={"target": target})])
        seq = np.repeat(np.arange(2, dtype=np.int64), N)
        pos = np.tile(np.arange(N, dtype=np.int32), 2)
        w.add_block(TokenBlock(seq_id=seq, pos=pos, token_id=np.tile(ids, 2), layers=(0,),
                               experts=np.asarray(experts, np.uint16), weights=np.ones(experts.shape, np.float32),
                               generated=np.tile(generated, 2)))
        w.add_vocabulary({int(i): t for i, t in zip(ids, token_texts)})
        return w.finish("complete")


def test_spans_generated_and_target(store):
    texts = ["q", ":", " ", "y", "e", "s", " ", "y", "e", "s"]
    gen = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1], bool)
    # seq A (first 10 tokens): expert 1 on the last 'yes' (7..9), else 0; seq B: always 2
    ex = np.zeros((1, 20, 1), np.int64)
    ex[0, 7:10, 0] = 1
    ex[0, 10:, 0] = 2
    info = _write_with_generated(store, ex, gen, texts, "yes")
    tgt = run(store, "contrast", info.run_id, label1="A", label2="B", span="target", save=False).frames
    assert tgt["behaviours"]["n_tokens"].to_list() == [3, 3]
    assert tgt["experts"].filter(expert=1)["rd"].item() == 1.0
    g = run(store, "contrast", info.run_id, label1="A", label2="B", span="generated", save=False).frames
    assert g["behaviours"]["n_tokens"].to_list() == [4, 4]
    assert g["experts"].filter(expert=1)["p1"].item() == 0.75  # generated tokens 6..9: 0,1,1,1
    missing = run(store, "contrast", info.run_id, label1="A", label2="B", span="target", save=False)
    assert missing.frames["behaviours"]["n_without_target"].to_list() == [0, 0]


def test_bad_inputs(store):
    info, *_ = _planted(store)
    with pytest.raises(InputError, match="--label1 and --label2"):
        run(store, "contrast", info.run_id, save=False)
    with pytest.raises(InputError, match="no sequences with label 'C'"):
        run(store, "contrast", info.run_id, label1="A", label2="C", save=False)
    with pytest.raises(InputError, match="--num-pos"):
        run(store, "contrast", info.run_id, label1="A", label2="B", export_spec="x.json", save=False)
    with pytest.raises(InputError, match="span"):
        run(store, "contrast", info.run_id, label1="A", label2="B", span="middle", save=False)


# -- real tiny models ----------------------------------------------------------------------------------------------

# distinct lengths: with no padding in a batch the tracer stores generated tokens as generated=false (reported)
TEXTS_A = ["aaaa aaaa aaaa", "abab abab", "aaa bbb aaa a"]
TEXTS_B = ["zzzz zzzz zz", "zyzy zyzy zzzz z", "zzz yyy"]


def _records(texts_a, texts_b):
    return ([SequenceRecord(seq_id=i, text=t, label="A") for i, t in enumerate(texts_a)]
            + [SequenceRecord(seq_id=len(texts_a) + i, text=t, label="B") for i, t in enumerate(texts_b)])


def test_exported_spec_steers_tiny_model_in_planted_direction(store, tmp_path):
    model, tok = build_tiny_model("qwen3_moe"), byte_tokenizer()
    h = routelens.trace(model, tok, _records(TEXTS_A, TEXTS_B), store=store)
    path = tmp_path / "steer.json"
    r = run(store, "contrast", h.info.run_id, label1="A", label2="B", num_pos=1, num_neg=1, export_spec=str(path))
    rows = {row["action"]: row for row in r.frames["spec"].to_dicts()}
    spec = SteeringSpec.load(path)
    with steer(model, spec):
        steered = routelens.trace(model, tok, _records(TEXTS_A, TEXTS_B), store=store)
    base = run(store, "contrast", [h.info.run_id, steered.info.run_id], label1="B", label2="B", save=False)
    f = base.frames["experts"]
    force = f.filter(layer=rows["force"]["layer"], expert=rows["force"]["expert"]).row(0, named=True)
    off = f.filter(layer=rows["disable"]["layer"], expert=rows["disable"]["expert"]).row(0, named=True)
    # behaviour-2 (B) inputs: the forced (A-typical) expert now always fires, the disabled one never
    assert force["p2"] == 1.0 and force["p1"] < 1.0
    assert off["p2"] == 0.0 and off["p1"] > 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_through_both_analyses(store, family):
    model, tok = build_tiny_model(family, num_layers=3), byte_tokenizer()
    h = routelens.trace(model, tok, _records(TEXTS_A[:2], TEXTS_B[:2]), store=store,
                        options=routelens.TraceOptions(logits=True, max_new_tokens=2))
    s = run(store, "stats", h.info.run_id, vocab_min_freq=2, save=False).frames
    assert s["layers"]["layer"].to_list() == list(h.info.moe_layers)
    assert (s["layers"]["entropy_source"] == "logits").all() and s["layers"]["lb_value"].is_finite().all()
    assert s["load"].group_by("layer").agg(pl.col("share").sum())["share"].to_list() == pytest.approx(
        [1.0] * len(h.info.moe_layers))
    assert set(s["domain"]["label"].unique()) == {"A", "B"}
    c = run(store, "contrast", h.info.run_id, label1="A", label2="B", span="generated", num_pos=1, num_neg=1,
            save=False).frames
    assert c["experts"].height == len(h.info.moe_layers) * h.info.num_experts
    n_gen = store.sql("SELECT s.label, count(*) AS n FROM tokens t JOIN sequences s USING (run_id, seq_id) "
                      "WHERE t.run_id = $r AND t.generated GROUP BY 1 ORDER BY 1", {"r": h.info.run_id})
    assert c["behaviours"]["n_tokens"].to_list() == n_gen["n"].to_list() and n_gen["n"].min() > 0
    spec = contrast_spec(c["experts"], 1, 1, h.info.top_k, num_experts=h.info.num_experts)
    with steer(model, spec):  # resolves against the family's real geometry (groups included) and runs
        model(**tok(["abc"], return_tensors="pt"))


def test_cli_json(store, tmp_path, capsys):
    info, *_ = _planted(store)
    out_spec = tmp_path / "cli.json"
    code = main(["analyze", "contrast", "--db", str(store.path), "--run", str(info.run_id), "--label1", "A",
                 "--label2", "B", "--top-n", "3", "--num-pos", "1", "--export-spec", str(out_spec), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 3 and rows[0]["layer"] == 3 and rows[0]["expert"] == 5 and rows[0]["rd"] == 1.0
    assert SteeringSpec.load(out_spec).rules[0].experts == (5,)
    code = main(["analyze", "contrast", "--db", str(store.path), "--run", str(info.run_id), "--label1", "A"])
    _, err = capsys.readouterr()
    assert code != 0 and len(err.strip().splitlines()) == 1
