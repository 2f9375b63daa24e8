"""stats: every formula on hand-computed cases and brute-force re-implementations, planted ground truth through
the store, two-run agreement (and its refusal), and the CLI."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from routelens.analyses import run
from routelens.analyses.stats import (balance, coactivation, cross_layer_coactivation, domain_counts, expert_counts,
                                      router_probs, topk_agreement, vocab_specialisation, weights_entropy)
from routelens.cli import main
from routelens.errors import InputError
from routelens.records import SequenceRecord
from routelens.store import Store
from tests.synthetic import write_run


@pytest.fixture()
def store(tmp_path):
    return Store.open(tmp_path / "s.duckdb")


# -- hand-computed cases -----------------------------------------------------------------------------------------

def test_counts_and_balance_by_hand():
    ex = np.array([[0, 1], [0, 2], [0, 1]], np.uint8)  # N=3, k=2, E=4
    counts = expert_counts(ex, 4)
    assert counts.tolist() == [3, 2, 1, 0]
    # mean 1.5; deviations 1.5, .5, -.5, -1.5 -> var (2.25+.25+.25+2.25)/4 = 1.25
    cv, lb = balance(counts, 3, 2, np.array([0.5, 0.25, 0.15, 0.1]))
    assert cv == pytest.approx(math.sqrt(1.25) / 1.5)
    # f = [3,2,1,0]/6; sum f*P = .25 + .0833333 + .025 = .3583333; times E=4
    assert lb == pytest.approx(4 * (0.25 + 2 / 6 * 0.25 + 1 / 6 * 0.15))
    assert math.isnan(balance(counts, 3, 2, None)[1])
    # perfectly uniform routing and probabilities: cv 0, lb 1
    cv, lb = balance(np.array([2, 2, 2, 2]), 4, 2, np.full(4, 0.25))
    assert cv == 0.0 and lb == pytest.approx(1.0)


def test_lb_matches_transformers_load_balancing_loss():
    """Independent implementation: transformers' Mixtral aux loss on one layer's logits equals k * lb_value."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    rng = np.random.default_rng(0)
    E, k, N = 8, 2, 500
    logits = rng.normal(size=(N, E)).astype(np.float32)
    experts = np.argsort(-logits, axis=1)[:, :k]
    mean_prob, _ = router_probs(logits)
    _, lb = balance(expert_counts(experts, E), N, k, mean_prob)
    hf = float(load_balancing_loss_func((torch.from_numpy(logits),), E, k))
    assert k * lb == pytest.approx(hf, rel=1e-5)


def test_router_probs_and_entropy_by_hand():
    # softmax([0, ln 3]) = [.25, .75]; H = -(.25 ln .25 + .75 ln .75)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    p, ent = router_probs(np.array([[0.0, math.log(3)], [5.0, 5.0]], np.float32))
    assert p == pytest.approx([(0.25 + 0.5) / 2, (0.75 + 0.5) / 2], abs=1e-6)
    assert ent == pytest.approx((h + math.log(2)) / 2, abs=1e-6)
    assert weights_entropy(np.array([[0.5, 0.5], [0.3, 0.1]])) == pytest.approx((math.log(2) + h) / 2)


def test_coactivation_by_hand():
    ex = np.array([[0, 1, 2], [0, 1, 3]])
    c = coactivation(ex, 4, "all")
    want = np.zeros((4, 4), int)
    for a, b, n in [(0, 1, 2), (0, 2, 1), (1, 2, 1), (0, 3, 1), (1, 3, 1)]:
        want[a, b] = want[b, a] = n
    assert (c == want).all()
    c = coactivation(ex, 4, "consecutive")  # OLMoE: pairs (0,1),(1,2) and (0,1),(1,3)
    want = np.zeros((4, 4), int)
    for a, b, n in [(0, 1, 2), (1, 2, 1), (1, 3, 1)]:
        want[a, b] = want[b, a] = n
    assert (c == want).all()
    with pytest.raises(InputError):
        coactivation(ex, 4, "nope")


def test_coactivation_brute_force():
    rng = np.random.default_rng(1)
    E, k, N = 6, 3, 200
    a = np.stack([rng.permutation(E)[:k] for _ in range(N)])
    b = np.stack([rng.permutation(E)[:k] for _ in range(N)])
    within = np.zeros((E, E), int)
    cross = np.zeros((E, E), int)
    for ra, rb in zip(a.tolist(), b.tolist()):
        for x, y in itertools.permutations(ra, 2):
            within[x, y] += 1
        for x in ra:
            for y in rb:
                cross[x, y] += 1
    assert (coactivation(a, E) == within).all()
    assert (cross_layer_coactivation(a, b, E) == cross).all()


def test_vocab_specialisation_by_hand():
    tok = np.array([5, 5, 5, 7, 7, 9])
    top1 = np.array([1, 1, 2, 0, 3, 2])
    ids, counts, top, share = vocab_specialisation(tok, top1, 4, 2)
    assert ids.tolist() == [5, 7] and counts.tolist() == [3, 2]
    assert top.tolist() == [1, 0]  # token 7: tie 0/3 -> lowest id
    assert share.tolist() == pytest.approx([2 / 3, 0.5])
    ids, *_ = vocab_specialisation(tok, top1, 4, 3)
    assert ids.tolist() == [5]


def test_domain_counts_and_agreement_by_hand():
    group = np.array([0, 0, 1, -1])
    ex = np.array([[0, 1], [0, 2], [3, 1], [2, 3]])
    c = domain_counts(group, 2, ex, 4)
    assert c.tolist() == [[2, 1, 1, 0], [0, 1, 0, 1]]
    overlap, top1 = topk_agreement(np.array([[0, 1], [2, 3], [4, 5]]), np.array([[1, 0], [2, 6], [7, 6]]))
    assert overlap.tolist() == [1.0, 0.5, 0.0] and top1.tolist() == [False, True, False]


def test_chunked_counts_across_chunk_boundaries():
    """The counts are accumulated over token chunks (bounded memory): on more tokens than two chunks they equal an
    independent one-hot formulation (X[n, e] = 1 when e is in token n's top-k): C = XᵀX off the diagonal,
    C_next = XₐᵀX_b, domain = GᵀX, and an unchunked entropy."""
    rng = np.random.default_rng(7)
    E, k, N, G = 16, 4, 70_001, 3  # > 4 chunks of 16,384 tokens and > 1 chunk of 65,536
    a = np.argsort(rng.random((N, E)) + np.linspace(0, 1, E), axis=1)[:, :k].astype(np.uint8)
    b = np.argsort(rng.random((N, E)), axis=1)[:, :k].astype(np.uint8)
    xa = np.zeros((N, E), np.int64)
    xa[np.arange(N)[:, None], a] = 1
    xb = np.zeros((N, E), np.int64)
    xb[np.arange(N)[:, None], b] = 1
    within = xa.T @ xa
    np.fill_diagonal(within, 0)
    assert (expert_counts(a, E) == xa.sum(0)).all()
    assert (coactivation(a, E) == within).all()
    assert (cross_layer_coactivation(a, b, E) == xa.T @ xb).all()
    group = rng.integers(-1, G, N)
    onehot_g = (group[:, None] == np.arange(G)).astype(np.int64)
    assert (domain_counts(group, G, a, E) == onehot_g.T @ xa).all()
    tok = rng.integers(0, 50, N)
    ids, counts, top, share = vocab_specialisation(tok, a[:, 0], E, 20)
    for i, t in enumerate(ids.tolist()):
        hist = np.bincount(a[tok == t, 0], minlength=E)
        assert counts[i] == (tok == t).sum() and top[i] == hist.argmax() and share[i] == hist.max() / counts[i]
    w = rng.random((N, k)).astype(np.float16)
    q = w.astype(np.float64) / w.astype(np.float64).sum(1, keepdims=True)
    assert weights_entropy(w) == pytest.approx(float((-(q * np.log(q)).sum(1)).mean()), rel=1e-12)


# -- planted ground truth through the store ----------------------------------------------------------------------

def _planted(store, *, logits=True, name="planted", perturb=None):
    """Layer 0: label x tokens -> {0, 1}, label y tokens -> {2, 3}; layer 1: token 9 always top-1 expert 3."""
    rng = np.random.default_rng(0)
    lengths = [10, 10, 10, 10]
    N, E, k = sum(lengths), 4, 2
    labels = ["x", "y", "x", "y"]
    tok = rng.integers(20, 30, N)
    tok[::2] = 9
    seq_label = np.repeat(labels, lengths)
    ex = np.zeros((2, N, k), np.int64)
    ex[0] = np.where((seq_label == "x")[:, None], [0, 1], [2, 3])
    ex[1] = np.stack([rng.permutation([0, 1, 2])[:2] for _ in range(N)])
    ex[1, tok == 9, 0] = 3
    if perturb is not None:
        ex = perturb(ex)
    lg = None
    if logits:  # consistent with the experts: rank 0 gets 2, rank 1 gets 1, others 0
        lg = np.zeros((2, N, E), np.float32)
        for l in range(2):
            lg[l, np.arange(N), ex[l, :, 0]] = 2.0
            lg[l, np.arange(N), ex[l, :, 1]] = 1.0
    seqs = [SequenceRecord(seq_id=i, text=f"s{i}", n_tokens=n, label=labels[i]) for i, n in enumerate(lengths)]
    info = write_run(store, ex, seq_lengths=lengths, num_experts=E, token_id=tok, logits=lg, sequences=seqs,
                     vocabulary={int(t): f"t{t}" for t in np.unique(tok)}, name=name)
    return info, ex, tok, lg


def test_planted_store(store):
    info, ex, tok, lg = _planted(store)
    r = run(store, "stats", info.run_id, vocab_min_freq=20)
    f = r.frames
    dom = {(d["label"], d["layer"], d["expert"]): d for d in f["domain"].to_dicts()}
    for e in range(4):
        assert dom[("x", 0, e)]["share"] == (0.5 if e in (0, 1) else 0.0)
        assert dom[("y", 0, e)]["share"] == (0.5 if e in (2, 3) else 0.0)
    assert dom[("x", 0, 0)]["lift"] == 2.0 and dom[("x", 0, 0)]["vs_all"] == 2.0
    assert dom[("x", 0, 0)]["label_tokens"] == 20
    vocab = f["vocab"].filter(layer=1).to_dicts()
    assert [(v["token_id"], v["token"], v["count"], v["top_expert"], v["share"]) for v in vocab] == [
        (9, "t9", 20, 3, 1.0)]
    load = f["load"].filter(layer=0).sort("expert")
    assert load["n_tokens"].to_list() == [20, 20, 20, 20] and load["share"].to_list() == [0.25] * 4
    co = {(c["expert_a"], c["expert_b"]): c for c in f["coactivation"].filter(layer=0).to_dicts()}
    assert set(co) == {(0, 1), (1, 0), (2, 3), (3, 2)} and co[(0, 1)]["p_b_given_a"] == 1.0
    nxt = f["coactivation_next"]
    brute = np.zeros((4, 4), int)
    for n in range(ex.shape[1]):
        for a in ex[0, n]:
            for b in ex[1, n]:
                brute[a, b] += 1
    got = np.zeros((4, 4), int)
    got[nxt["expert_a"].to_numpy(), nxt["expert_b"].to_numpy()] = nxt["count"].to_numpy()
    assert (got == brute).all() and set(nxt["next_layer"].to_list()) == {1}
    layers = {row["layer"]: row for row in f["layers"].to_dicts()}
    assert layers[0]["cv"] == 0.0 and layers[0]["entropy_source"] == "logits"
    # independent: softmax of the planted logits (float16-stored) by hand
    z = lg[0].astype(np.float16).astype(np.float64)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert layers[0]["entropy"] == pytest.approx(float((-(p * np.log(p)).sum(1)).mean()), rel=1e-5)
    assert layers[0]["lb_value"] == pytest.approx(4 * np.dot(np.full(4, 0.25), p.mean(0)), rel=1e-5)
    assert layers[0]["lb_value_hf"] == pytest.approx(2 * layers[0]["lb_value"])
    assert layers[1]["vocab_specialisation"] == 1.0 and layers[1]["n_vocab_tokens"] == 1


def test_no_logits_says_so(store):
    info, *_ = _planted(store, logits=False)
    layers = run(store, "stats", info.run_id).frames["layers"].to_dicts()
    for row in layers:
        assert math.isnan(row["lb_value"]) and "no logits" in row["lb_source"]
        assert row["entropy_source"] == "top-k weights"
        assert row["entropy"] == pytest.approx(math.log(2), rel=1e-3)  # planted weights are 1/k each


def test_agreement_two_runs(store):
    a, ex, *_ = _planted(store, name="a")

    def swap_half(e):  # layer 1, first 20 of 40 tokens: same top-k set, ranks swapped (top-1 differs)
        e = e.copy()
        e[1, :20] = e[1, :20, ::-1]  # same set, different top-1
        return e

    b, ex_b, *_ = _planted(store, name="b", perturb=swap_half)
    agree = run(store, "stats", [a.run_id, b.run_id]).frames["agreement"].sort("layer").to_dicts()
    assert agree[0]["topk_overlap"] == 1.0 and agree[0]["top1_agreement"] == 1.0
    assert agree[1]["topk_overlap"] == 1.0 and agree[1]["top1_agreement"] == 0.5
    assert agree[1]["exact_set"] == 1.0 and agree[1]["n_tokens"] == 40
    # different token ids: refused with one line
    rng = np.random.default_rng(3)
    other = write_run(store, ex, seq_lengths=[10, 10, 10, 10], num_experts=4, token_id=rng.integers(40, 50, 40),
                      name="other")
    with pytest.raises(InputError, match="different tokens") as err:
        run(store, "stats", [a.run_id, other.run_id])
    assert "\n" not in str(err.value)


def _write_generated(store, experts, token_id, generated, name):
    """One sequence with a generated tail (tests.synthetic.write_run has no generated flags)."""
    from routelens.records import RunMeta, TokenBlock

    N = len(token_id)
    meta = RunMeta(model="synthetic", architecture="Synthetic", family="qwen3_moe", config_hash="0", num_experts=4,
                   top_k=2, moe_layers=(0,), num_layers=1, dtype="float32", transformers_version="-",
                   torch_version="-", routelens_version="-", input_source="synthetic", name=name)
    with store.create_run(meta) as w:
        w.add_sequences([SequenceRecord(seq_id=0, text="x", n_tokens=N)])
        w.add_block(TokenBlock(seq_id=np.zeros(N, np.int64), pos=np.arange(N, dtype=np.int32),
                               token_id=np.asarray(token_id, np.int32), layers=(0,),
                               experts=np.asarray(experts, np.uint16), weights=np.full(experts.shape, 0.5, np.float32),
                               generated=np.asarray(generated, bool)))
        return w.finish("complete")


def test_agreement_prompt_only(store):
    gen = [False] * 4 + [True] * 2
    a = _write_generated(store, np.array([[[0, 1]] * 6]), [1, 2, 3, 4, 5, 6], gen, "a")
    # same prompt, a different continuation; prompt routing: tokens 0-1 same set, 2-3 share one expert
    b = _write_generated(store, np.array([[[0, 1], [1, 0], [0, 2], [3, 2], [2, 3], [2, 3]]]),
                         [1, 2, 3, 4, 9, 9], gen, "b")
    with pytest.raises(InputError, match="--prompt-only"):
        run(store, "stats", [a.run_id, b.run_id], save=False)
    row = run(store, "stats", [a.run_id, b.run_id], prompt_only=True, save=False).frames["agreement"].row(0, named=True)
    assert row["n_tokens"] == 4
    assert row["topk_overlap"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert row["top1_agreement"] == pytest.approx(2 / 4) and row["exact_set"] == pytest.approx(2 / 4)


def test_bad_params(store):
    info, *_ = _planted(store)
    for kw in ({"coactivation_pairs": "x"}, {"domain_field": "text"}, {"layers": (5,)}, {"vocab_min_freq": 0}):
        with pytest.raises(InputError):
            run(store, "stats", info.run_id, save=False, **kw)


def test_cli_json(store, tmp_path, capsys):
    info, *_ = _planted(store)
    code = main(["analyze", "stats", "--db", str(store.path), "--run", str(info.run_id), "--json",
                 "--coactivation-pairs", "consecutive"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads(out)
    assert [r["layer"] for r in rows] == [0, 1] and all(r["run_id"] == info.run_id for r in rows)


def test_loads_one_layer_at_a_time(store, monkeypatch):
    """Memory: the run is read one MoE layer per load_routing call (all layers at once, with weights, would exceed
    the trace's compact form on a long run), and the results are those of the planted run."""
    import routelens.analyses.stats as stats_module

    a, *_ = _planted(store, name="a", logits=False)
    b, *_ = _planted(store, name="b")
    real, asked = stats_module.load_routing, []

    def spy(st, info, layers=None, **kw):
        asked.append(tuple(layers))
        return real(st, info, layers, **kw)

    monkeypatch.setattr(stats_module, "load_routing", spy)
    f = run(store, "stats", [a.run_id, b.run_id], save=False).frames
    assert asked and all(len(layers) == 1 for layers in asked)
    assert f["agreement"]["topk_overlap"].to_list() == [1.0, 1.0]
    assert f["load"].filter(layer=0)["n_tokens"].to_list() == [20, 20, 20, 20] * 2


def test_cli_json_is_strict_json_without_logits(store, capsys):
    # without router logits the balance value is NaN; --json must print null, not the non-JSON token NaN
    info, *_ = _planted(store, name="nologits", logits=False)
    code = main(["analyze", "stats", "--db", str(store.path), "--run", str(info.run_id), "--json", "--no-save"])
    out, err = capsys.readouterr()
    assert code == 0, err

    def refuse(token):
        raise ValueError(f"non-JSON constant {token}")

    rows = json.loads(out, parse_constant=refuse)
    assert rows and all(r["lb_value"] is None for r in rows)
