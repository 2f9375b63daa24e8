"""npmi: the formula on a hand-computed count table, marker matching, planted truth written straight into a store
and planted inside a model's router (every family), the shipped model's <think> markers, the spec export and the
CLI. Expected values come from hand computation or brute force here (loops over the tidy `routing` / `tokens`
views), never from analyses/npmi.py itself."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from routelens import analyses
from routelens.analyses.npmi import cooccurrence_counts, match_markers, normalize_token_text, npmi, npmi_spec
from routelens.cli import main
from routelens.errors import InputError
from routelens.store import Store

from synthetic import write_run


def test_npmi_hand_computed_table():
    T = 100
    # n_x=10, n_y=20, n_xy=5: p(x,y)=.05, p(x)p(y)=.02, PMI=log2 2.5=1.3219281, -log2 .05=4.3219281 -> 0.3058650
    # n_xy=2: p(x,y)=.02 = p(x)p(y): independent -> 0
    # n_xy=1: PMI=log2 .5=-1, -log2 .01=6.6438562 -> -0.1505150
    # n_xy=10=n_x=n_y: PMI=log2 10=3.3219281, -log2 .1=3.3219281 -> 1 (always together)
    # n_xy=0 -> -1 (the paper's rule); n_xy=T (then n_x=n_y=T) -> 1 (p(x,y)=1, denominator 0)
    got = npmi([5, 2, 1, 10, 0, 100], [10, 10, 10, 10, 10, 100], [20, 20, 20, 10, 20, 100], T)
    assert got == pytest.approx([0.3058650, 0.0, -0.1505150, 1.0, -1.0, 1.0], abs=1e-6)


def test_cooccurrence_counts_match_brute_force():
    rng = np.random.default_rng(3)
    L, N, k, E = 3, 200, 2, 6
    experts = np.stack([np.stack([rng.permutation(E)[:k] for _ in range(N)]) for _ in range(L)]).astype(np.uint8)
    mask = rng.random(N) < 0.2
    n_y, n_xy = cooccurrence_counts(experts, mask, E)
    for l in range(L):
        for e in range(E):
            assert n_y[l, e] == sum(e in experts[l, t] for t in range(N))
            assert n_xy[l, e] == sum(e in experts[l, t] for t in range(N) if mask[t])


def test_marker_matching_strips_whitespace_and_bpe_space_markers():
    assert normalize_token_text("ĠWait") == "Wait" == normalize_token_text(" Wait\n")
    assert normalize_token_text("▁Wait") == "Wait"
    vocab = {5: "ĠWait", 6: " Wait", 7: "Wait", 8: "wait", 9: "▁Wait", 10: "Waiting", 11: "<think>", 12: " </think>"}
    got = match_markers(vocab, ["Wait", "<think>", "</think>", "Alternatively"])
    assert got == {"Wait": (5, 6, 7, 9), "<think>": (11,), "</think>": (12,), "Alternatively": ()}


@pytest.fixture()
def store(tmp_path):
    st = Store.open(tmp_path / "npmi.duckdb")
    yield st
    st.close()


def _brute_force_npmi(store, run_id, marker_ids):
    """nPMI of every (layer, expert) from the tidy views, by Python loops."""
    toks = store.sql("SELECT seq_id, pos, token_id FROM tokens WHERE run_id = $run", {"run": run_id})
    is_marker = {(r["seq_id"], r["pos"]): r["token_id"] in marker_ids for r in toks.iter_rows(named=True)}
    T, n_x = len(is_marker), sum(is_marker.values())
    n_y, n_xy = {}, {}
    for r in store.sql("SELECT seq_id, pos, layer, expert FROM routing WHERE run_id = $run",
                       {"run": run_id}).iter_rows(named=True):
        key = (r["layer"], r["expert"])
        n_y[key] = n_y.get(key, 0) + 1
        if is_marker[r["seq_id"], r["pos"]]:
            n_xy[key] = n_xy.get(key, 0) + 1
    out = {}
    for key, ny in n_y.items():
        c = n_xy.get(key, 0)
        if c == 0:
            out[key] = -1.0
        elif c == T:
            out[key] = 1.0
        else:
            out[key] = math.log2((c / T) / ((n_x / T) * (ny / T))) / -math.log2(c / T)
    return out, n_x


def test_planted_expert_ranks_first_and_values_match_brute_force(store):
    rng = np.random.default_rng(0)
    L, N, E = 2, 300, 8
    tok = rng.integers(10, 20, N).astype(np.int32)
    tok[::12] = 3  # the marker
    marker = tok == 3
    experts = np.stack([np.stack([rng.permutation(E)[:2] for _ in range(N)]) for _ in range(L)])
    # layer 1, expert 5: on every marker token (rank 0) and on no other token
    not5 = np.array([0, 1, 2, 3, 4, 6, 7])
    experts[1] = np.stack([[5, rng.choice(not5)] if m else rng.permutation(not5)[:2] for m in marker])
    assert all(len(set(row)) == 2 for row in experts.reshape(-1, 2))
    vocab = {3: "<think>", **{i: f"Ġw{i}" for i in range(10, 20)}}
    info = write_run(store, experts, seq_lengths=[150, 150], num_experts=E, token_id=tok, vocabulary=vocab)
    res = analyses.run(store, "npmi", info.run_id, markers=("<think>",), top_n=0, save=False)
    ranking = res.frames["ranking"]
    assert ranking.height == L * E and ranking["rank"].to_list() == list(range(1, L * E + 1))
    top = ranking.row(0, named=True)
    assert (top["layer"], top["expert"], top["npmi"]) == (1, 5, pytest.approx(1.0))
    assert top["n_x"] == top["n_y"] == top["n_xy"] == int(marker.sum()) == 25
    want, n_x = _brute_force_npmi(store, info.run_id, {3})
    assert n_x == 25
    got = {(r["layer"], r["expert"]): r["npmi"] for r in ranking.to_dicts()}
    assert set(got) == {(l, e) for l in range(L) for e in range(E)}
    for key, value in got.items():
        assert value == pytest.approx(want.get(key, -1.0), abs=1e-12)
    assert ranking["npmi"].to_list() == sorted(ranking["npmi"].to_list(), reverse=True)
    # top_n keeps the best pairs per marker; a layer subset ranks only those layers
    assert analyses.run(store, "npmi", info.run_id, markers=("<think>",), top_n=3, save=False
                        ).frames["ranking"].height == 3
    only0 = analyses.run(store, "npmi", info.run_id, markers=("<think>",), layers=(0,), top_n=0, save=False)
    assert set(only0.frames["ranking"]["layer"]) == {0}
    # markers as token ids give the same numbers
    by_id = analyses.run(store, "npmi", info.run_id, markers=(), marker_ids=(3,), top_n=0, save=False)
    assert by_id.frames["ranking"]["npmi"].to_list() == ranking["npmi"].to_list()
    assert by_id.frames["ranking"]["marker"][0] == "id:3"


def test_missing_markers_are_reported_not_fatal(store, caplog):
    tok = np.array([10, 11, 12, 10], np.int32)
    experts = np.array([[[0, 1], [1, 2], [2, 3], [0, 3]]], np.uint8)
    info = write_run(store, experts, seq_lengths=[4], num_experts=4, token_id=tok,
                     vocabulary={10: "Ġa", 11: "Wait", 12: "b"})
    with caplog.at_level(logging.WARNING, logger="routelens.analyses.npmi"):
        res = analyses.run(store, "npmi", info.run_id, save=False)  # default markers: only Wait occurs
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "<think>, </think>, Alternatively" in msgs[0] and "\n" not in msgs[0]
    assert res.frames["notes"]["message"].to_list() == msgs
    m = {r["marker"]: (r["token_ids"], r["n_x"]) for r in res.frames["markers"].to_dicts()}
    assert m == {"<think>": ([], 0), "</think>": ([], 0), "Wait": ([11], 1), "Alternatively": ([], 0)}
    assert set(res.frames["ranking"]["marker"]) == {"Wait"}
    # Wait at token 1 routed to {1, 2}: T=4, n_x=1, n_y=2, n_xy=1 -> log2(.25/(.25*.5))/-log2(.25) = 1/2 for
    # both; the tie goes to the lower expert
    top = res.frames["ranking"].row(0, named=True)
    assert (top["layer"], top["expert"], top["npmi"]) == (0, 1, pytest.approx(0.5))
    none = analyses.run(store, "npmi", info.run_id, markers=("Hmm",), save=False)
    assert none.frames["ranking"].height == 0 and none.frames["notes"].height == 1
    with pytest.raises(InputError, match="no markers"):
        analyses.run(store, "npmi", info.run_id, markers=(), save=False)


def test_ties_go_to_the_larger_joint_count(store):
    # T=8, marker at tokens 0-3. Expert 1 at {0,4}: n_y=2, n_xy=1 -> log2(1*8/(4*2)) = 0. Expert 2 at {0,1,4,5}:
    # n_y=4, n_xy=2 -> log2(2*8/(4*4)) = 0: a tie, which the larger n_xy wins (expert order would pick 1).
    # Expert 0 at {1,2,3,6,7}: n_xy=3 -> log2(24/20)/-log2(3/8) = 0.2630344/1.4150375 = 0.1858853.
    # Expert 3 at {2,3,5,6,7}: n_xy=2 -> log2(16/20)/-log2(2/8) = -0.3219281/2 = -0.1609640.
    tok = np.array([3, 3, 3, 3, 0, 0, 0, 0], np.int32)
    experts = np.array([[[1, 2], [2, 0], [0, 3], [0, 3], [1, 2], [2, 3], [0, 3], [0, 3]]], np.uint8)
    info = write_run(store, experts, seq_lengths=[8], num_experts=4, token_id=tok, vocabulary={3: "<think>", 0: "x"})
    r = analyses.run(store, "npmi", info.run_id, markers=("<think>",), save=False).frames["ranking"]
    assert r.select("expert", "n_xy").rows() == [(0, 3), (2, 2), (1, 1), (3, 2)]
    assert r["npmi"].to_list() == pytest.approx([0.1858853, 0.0, 0.0, -0.1609640], abs=1e-6)


def test_npmi_spec_boosts_the_top_pairs(store):
    tok = np.array([3, 0, 0, 3, 0, 0], np.int32)
    experts = np.array([[[1, 0], [2, 0], [2, 0], [1, 0], [3, 0], [2, 0]],
                        [[2, 3], [0, 1], [0, 1], [2, 3], [0, 1], [0, 1]]], np.uint8)
    info = write_run(store, experts, seq_lengths=[6], num_experts=4, token_id=tok, layers=(3, 4),
                     vocabulary={3: "<think>", 0: "x"})
    res = analyses.run(store, "npmi", info.run_id, markers=("<think>",), top_n=0, save=False)
    # n_xy = n_y = n_x = 2 for (3,1), (4,2), (4,3): nPMI = 1 each; ties go to the larger n_xy, then layer, expert
    assert res.frames["ranking"].head(3).select("layer", "expert").rows() == [(3, 1), (4, 2), (4, 3)]
    spec = npmi_spec(res, "<think>", top=2, beta=1.5)
    assert [(r.layers, r.experts, r.action, r.value) for r in spec.rules] == [((3,), (1,), "boost", 1.5),
                                                                          ((4,), (2,), "boost", 1.5)]
    assert spec.source["analysis"] == "npmi" and spec.source["pairs"] == [[3, 1], [4, 2]]
    with pytest.raises(InputError, match="no expert"):
        npmi_spec(res.frames["ranking"], "Wait")


# ----------------------------------------------------------------------------------------------- planted in a model


FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe")
TEXTS = ["<think>Let me add 2 and 3.</think> The answer is 5.", "Some plain text without markers at all.",
         "Question: what is 7 times 6? <think>7*6 = 42, check: 6*7=42</think> 42",
         "<think>hmm</think><think>again</think> ok"]


def _plant(model, tok, moe, marker_id: int, expert: int, scale: float = 20.0) -> None:
    """Set router row ``expert`` of MoE layer ``moe`` to a direction in its input space whose projection is +1 on
    the hidden states that reach this router at ``marker_id`` and -1 elsewhere (least squares over the captured
    inputs), times ``scale``: the expert's logit is then large at the marker and very negative elsewhere."""
    captured = []
    hook = moe.router.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        model(**enc)
    hook.remove()
    h = captured[0].reshape(-1, captured[0].shape[-1]).double()  # routers see [B*S, H] or [B, S, H], row-major
    valid = enc["attention_mask"].reshape(-1).bool()
    target = torch.where(enc["input_ids"].reshape(-1) == marker_id, 1.0, -1.0).double()
    w = torch.linalg.lstsq(h[valid], target[valid, None]).solution[:, 0]
    with torch.no_grad():
        moe.router.weight[expert] = (scale * w).to(moe.router.weight.dtype)


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_planted_in_a_router_ranks_first(tmp_path, family):
    import routelens
    from routelens.tiny import END_THINK_ID, THINK_ID, build_tiny_model, byte_tokenizer

    model, tok = build_tiny_model(family, num_layers=2, num_experts=8, top_k=2), byte_tokenizer()
    moe = routelens.adapt(model).moe_layers[-1]
    _plant(model, tok, moe, THINK_ID, expert=5)
    _plant(model, tok, moe, END_THINK_ID, expert=2)  # same layer: its input does not depend on the router
    st = Store.open(tmp_path / "m.duckdb")
    run = routelens.trace(model, tok, TEXTS, store=st)
    res = analyses.run(st, "npmi", run.info.run_id, markers=("<think>", "</think>", "Wait"), top_n=3)
    ranking = res.frames["ranking"]
    for marker, expert in (("<think>", 5), ("</think>", 2)):
        top = ranking.filter(ranking["marker"] == marker).row(0, named=True)
        assert (top["layer"], top["expert"]) == (moe.index, expert), (family, marker, ranking)
        assert top["n_x"] == 4 and top["n_xy"] == 4  # fires at every marker occurrence
        assert top["npmi"] > 0.9  # measured 1.0 (fires nowhere else) in all eight families
    assert res.frames["notes"]["message"][0].startswith(f"markers absent from run {run.info.run_id}: Wait")
    # the RICE-style export is a valid spec that steer() accepts on the same model
    spec = npmi_spec(res, "<think>", top=1, beta=2.0)
    from routelens.steering import steer

    with steer(model, spec):
        pass
    st.close()


def test_shipped_model_think_markers(tmp_path):
    """data/model on 8 held-out reasoning traces: both markers found once per trace, values equal brute force,
    and the best expert of each marker co-occurs with it far above chance."""
    import gzip
    from pathlib import Path

    import routelens

    root = Path(__file__).resolve().parents[1]
    with gzip.open(root / "data/corpus/reasoning.heldout.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(next(f))["text"] for _ in range(8)]
    model, tok = routelens.load_model(str(root / "data/model"))
    st = Store.open(tmp_path / "shipped.duckdb")
    run = routelens.trace(model, tok, texts, store=st, options=routelens.TraceOptions(batch_size=8))
    res = analyses.run(st, "npmi", run.info.run_id, markers=("<think>", "</think>"), top_n=0)
    markers = {r["marker"]: r for r in res.frames["markers"].to_dicts()}
    assert markers["<think>"]["token_ids"] == [3] and markers["</think>"]["token_ids"] == [4]
    assert markers["<think>"]["n_x"] == sum(t.count("<think>") for t in texts) >= 8
    ranking = res.frames["ranking"]
    for marker, tid in (("<think>", 3), ("</think>", 4)):
        want, _ = _brute_force_npmi(st, run.info.run_id, {tid})
        rows = ranking.filter(ranking["marker"] == marker)
        assert rows.height == 8 * 32
        for r in rows.head(20).to_dicts():
            assert r["npmi"] == pytest.approx(want[r["layer"], r["expert"]], abs=1e-12)
        assert rows["npmi"][0] > 0.3
    st.close()


def test_cli_json(tmp_path, capsys):
    st = Store.open(tmp_path / "cli.duckdb")
    tok = np.array([3, 0, 0, 3], np.int32)
    experts = np.array([[[1, 0], [2, 0], [2, 3], [1, 2]]], np.uint8)
    info = write_run(st, experts, seq_lengths=[4], num_experts=4, token_id=tok, vocabulary={3: "<think>", 0: "a"})
    st.close()
    code = main(["analyze", "npmi", "--db", str(tmp_path / "cli.duckdb"), "--run", str(info.run_id),
                 "--markers", "<think>", "--top-n", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    # expert 1: n_x = n_y = n_xy = 2 of T = 4 -> nPMI 1
    assert json.loads(out) == [{"marker": "<think>", "layer": 0, "expert": 1, "n_x": 2, "n_y": 2, "n_xy": 2,
                                "npmi": 1.0, "rank": 1}]
