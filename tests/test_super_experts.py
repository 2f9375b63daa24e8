"""super-experts: the criterion against hand-computed cases, the reductions against brute force, and planted ground
truth (a stored run with planted statistics; a tiny model with a planted super expert, in every family)."""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

import routelens
from routelens.analyses import run
from routelens.analyses import attention_sink as sink
from routelens.analyses import super_experts as se
from routelens.cli import main
from routelens.errors import InputError
from routelens.records import ExpertStat, RunMeta, SequenceRecord, TokenBlock
from routelens.store import Store
from routelens.tiny import BOS_ID, build_tiny_model, byte_tokenizer

REPO = Path(__file__).resolve().parent.parent
TEXTS = ["the cat sat on the mat", "a quick brown fox jumps", "hello world, hello moe", "numbers 12 + 30 = 42",
         "routing is fun", "bonjour le monde"]


# ---------------------------------------------------------------------------------------- criterion by hand

def test_layer_cutoff_is_pythons_half_even_round():
    # round(2 * 0.75) = round(1.5) = 2; round(6 * 0.75) = round(4.5) = 4 (half to even); round(10 * .75) = 8
    assert se.layer_cutoff(2, 0.75) == 2
    assert se.layer_cutoff(6, 0.75) == 4
    assert se.layer_cutoff(10, 0.75) == 8
    assert se.layer_cutoff(48, 0.75) == 36


def test_criterion_hand_computed():
    # layers 0..2 are included (cutoff round(4 * 0.75) = 3); layer 3's 500 is the largest but excluded
    layers = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    max_out = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 100.0, 500.0, 0.5])
    inc, sup, crit = se.super_expert_criterion(layers, max_out, 4)
    # V = [1, 2, 3, 4, 5, 100]; P99.5: rank (6-1) * 0.995 = 4.975 -> 5 + 0.975 * (100 - 5) = 97.625
    assert crit.layers_included == 3 and crit.n_values == 6
    assert crit.percentile_value == pytest.approx(97.625)
    assert crit.max_value == 100.0 and crit.max_threshold == pytest.approx(10.0)
    assert crit.threshold == pytest.approx(97.625)
    assert inc.tolist() == [True] * 6 + [False, False]
    assert sup.tolist() == [False] * 5 + [True, False, False] and crit.n_super == 1
    # q = 50: P50 = 3 + 0.5 * (4 - 3) = 3.5; bound 100 * 0.1 = 10 keeps only 100
    _, sup, crit = se.super_expert_criterion(layers, max_out, 4, q=50)
    assert crit.percentile_value == pytest.approx(3.5) and sup.tolist() == [False] * 5 + [True, False, False]
    # frac 0.01: bound 1 -> 4, 5 and 100 exceed both 3.5 and 1
    _, sup, crit = se.super_expert_criterion(layers, max_out, 4, q=50, frac_of_max=0.01)
    assert sup.tolist() == [False, False, False, True, True, True, False, False]
    assert crit.threshold == pytest.approx(3.5)
    # layer_frac 1.0 takes layer 3 in: V max 500, P99.5 over 8 values: rank 7 * .995 = 6.965 -> 100 + .965 * 400
    _, sup, crit = se.super_expert_criterion(layers, max_out, 4, layer_frac=1.0)
    assert crit.percentile_value == pytest.approx(486.0) and sup.tolist() == [False] * 6 + [True, False]


def test_floor_quirk_reproduces_the_reference_floor_division():
    layers = np.zeros(3, dtype=int)
    max_out = np.array([0.5, 0.9, 9.5])
    # q = 0: the percentile is the min, 0.5; bound max/10 = 0.95 keeps only 9.5
    _, sup, crit = se.super_expert_criterion(layers, max_out, 1, q=0, layer_frac=1.0)
    assert crit.max_threshold == pytest.approx(0.95) and sup.tolist() == [False, False, True]
    # the reference's np.max(V) // 10 is floor(0.95) = 0, so 0.9 passes too
    reference_bound = np.max(max_out) // 10
    _, sup, crit = se.super_expert_criterion(layers, max_out, 1, q=0, layer_frac=1.0, floor_quirk=True)
    assert crit.max_threshold == reference_bound == 0.0 and sup.tolist() == [False, True, True]


def test_criterion_with_nothing_included():
    inc, sup, crit = se.super_expert_criterion(np.array([6, 7]), np.array([1.0, 2.0]), 8)
    assert not inc.any() and not sup.any() and crit.n_values == 0 and crit.threshold is None


def test_rank_desc_breaks_ties_by_layer_then_expert():
    values = np.array([3.0, 5.0, 3.0, 1.0, 3.0])
    layers = np.array([1, 0, 0, 0, 1])
    experts = np.array([2, 0, 7, 1, 0])
    # 5.0 first; the 3.0s ordered (0,7), (1,0), (1,2); then 1.0
    assert se.rank_desc(values, layers, experts).tolist() == [4, 1, 2, 5, 3]


def test_parse_and_format_pairs():
    assert se.parse_pairs(("3:54", "4,38")) == [(3, 54), (4, 38)]
    assert se.format_pairs([(3, 54), (4, 38)]) == "3:54;4:38"
    with pytest.raises(InputError):
        se.parse_pairs(("3-54",))


def test_control_pairs_match_the_targets_layers_and_avoid_them():
    cand = pl.DataFrame({"layer": [1] * 6 + [2] * 3, "expert": [0, 1, 2, 3, 4, 5, 0, 1, 2]})
    targets = [(1, 3), (1, 4), (2, 1)]
    for seed in range(5):
        ctrl = se.control_pairs(cand, targets, np.random.default_rng(seed))
        assert sorted(l for l, _ in ctrl) == [1, 1, 2]
        assert not set(ctrl) & set(targets) and len(set(ctrl)) == 3


# ---------------------------------------------------------------------------------------- reductions vs brute force

def test_first_token_mass_brute_force():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(3, 2, 5, 5, generator=g)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    sums, count = sink.first_token_mass(attn, valid)
    want, n = [0.0, 0.0], 0
    for b in range(3):
        for q in range(1, 5):
            if valid[b, q]:
                n += 1
                for h in range(2):
                    want[h] += float(attn[b, h, q, 0])
    assert count == n == 4 + 2 + 1
    assert sums.tolist() == pytest.approx(want)


def test_token_nll_brute_force():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, generator=g)
    ids = torch.tensor([[1, 2, 3, 4], [5, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    nll, n = sink.token_nll(logits, ids, mask)
    want, cnt = 0.0, 0
    for b in range(2):
        for t in range(1, 4):
            if mask[b, t]:
                row = logits[b, t - 1].double()
                want += -(float(row[ids[b, t]]) - math.log(sum(math.exp(v) for v in row.tolist())))
                cnt += 1
    assert n == cnt == 4 and nll == pytest.approx(want, rel=1e-6)


def test_encode_and_batch_heldout():
    tok = byte_tokenizer()
    seqs = sink.encode_texts(tok, ["abcdef", "x", "ghij"], max_tokens=9, seq_len=5)
    # "abcdef" -> <s> a b c d (cut at 5), "x" -> <s> x (2), then 2 tokens of budget left for "ghij"
    assert seqs == [[BOS_ID, 97, 98, 99, 100], [BOS_ID, 120], [BOS_ID, 103]]
    # shortest first; 3 rows padded to 5 = 15 <= 2 * 9 real tokens: one batch
    (b,) = sink.make_batches(seqs, batch_size=4, pad_id=0)
    assert b.input_ids[0].tolist() == [BOS_ID, 120, 0, 0, 0] and b.attention_mask.sum(1).tolist() == [2, 2, 5]
    assert b.input_ids[2].tolist() == seqs[0]
    # lengths 2, 2, 10: 3 * 10 = 30 > 2 * 14, so the long one goes alone; batch_size caps the count
    batches = sink.make_batches([[1] * 10, [2, 2], [3, 3]], batch_size=4)
    assert [tuple(x.input_ids.shape) for x in batches] == [(2, 2), (1, 10)]
    batches = sink.make_batches([[1, 1]] * 5, batch_size=2)
    assert [x.input_ids.shape[0] for x in batches] == [2, 2, 1]


# ---------------------------------------------------------------------------------------- planted store statistics

def _planted_stats_run(store: Store, *, with_stats: bool = True) -> RunMeta:
    """A 4-layer run, 2 sequences of 5 tokens; layer 1 expert 3 has a planted max_out of 400 at (seq 1, pos 0,
    channel 9); the residual stream has 250 at (seq 1, pos 0, channel 9) from layer 1 on."""
    L, E, k = 4, 4, 2
    N = 10
    experts = np.tile(np.array([[0, 1]], dtype=np.uint16), (L, N, 1))
    res = np.full((L, N), 1.0, dtype=np.float32)
    res[:, ::2] = 2.0
    ch = np.zeros((L, N), dtype=np.int32)
    res[1:, 5] = 250.0
    ch[1:, 5] = 9
    meta = RunMeta(model="synthetic", architecture="Synthetic", family="qwen3_moe", config_hash="0", num_experts=E,
                   top_k=k, moe_layers=tuple(range(L)), num_layers=L, dtype="float32", transformers_version="-",
                   torch_version="-", routelens_version="-", input_source="synthetic", name="planted",
                   params={"expert_stats": with_stats})
    writer = store.create_run(meta)
    with writer:
        writer.add_sequences([SequenceRecord(seq_id=i, text=f"s{i}", n_tokens=5) for i in range(2)])
        writer.add_block(TokenBlock(
            seq_id=np.repeat(np.arange(2), 5), pos=np.tile(np.arange(5, dtype=np.int32), 2),
            token_id=np.arange(N, dtype=np.int32), layers=tuple(range(L)), experts=experts,
            weights=np.full((L, N, k), 0.5, np.float32), residual_layers=tuple(range(L)), residual_max=res,
            residual_channel=ch))
        writer.add_vocabulary({i: f"t{i}" for i in range(N)})
        if with_stats:
            stats = []
            for layer in range(L):
                for e in range(E):
                    big = layer == 1 and e == 3
                    value = 400.0 if big else 900.0 if (layer, e) == (3, 0) else 1.0 + layer + 0.1 * e
                    stats.append(ExpertStat(layer=layer, expert=e, n_tokens=3 + e, max_out=value,
                                            max_out_seq=1 if big else 0, max_out_pos=0 if big else e,
                                            max_out_channel=9 if big else e, max_in=2.0, max_in_seq=0, max_in_pos=0,
                                            max_in_channel=0))
            writer.add_expert_stats(stats)  # layer 3 (past the cutoff 3) holds the largest value, 900
        return writer.finish("complete")


def test_stats_parts_on_planted_store(tmp_path):
    store = Store.open(tmp_path / "s.duckdb")
    info = _planted_stats_run(store)
    res = run(store, "super-experts", info.run_id, stats_only=True)
    ex = res.frames["experts"]
    assert ex.height == 16
    sup = ex.filter(pl.col("is_super"))
    assert sup.select("layer", "expert").rows() == [(1, 3)]
    top = ex.row(0, named=True)  # rank 1: layer 3's 900, excluded from V
    assert (top["layer"], top["expert"], top["rank"], top["included"], top["is_super"]) == (3, 0, 1, False, False)
    row = ex.filter((pl.col("layer") == 1) & (pl.col("expert") == 3)).row(0, named=True)
    assert (row["rank"], row["max_out_seq"], row["max_out_pos"], row["max_out_channel"], row["max_out_token"]) == \
        (2, 1, 0, 9, "t5")
    crit = res.frames["criterion"].row(0, named=True)
    v = sorted([1.0 + l + 0.1 * e for l in range(3) for e in range(4) if (l, e) != (1, 3)] + [400.0])
    assert crit["n_values"] == 12 and crit["layers_included"] == 3 and crit["n_super"] == 1
    # P99.5 of 12 values by hand: rank 11 * .995 = 10.945 -> v[10] + .945 * (v[11] - v[10])
    assert crit["percentile_value"] == pytest.approx(v[10] + 0.945 * (v[11] - v[10]), rel=1e-6)
    m = res.frames["massive"]
    assert m["layer"].to_list() == [0, 1, 2, 3]
    assert m["max_value"].to_list() == [2.0, 250.0, 250.0, 250.0]
    assert m.row(1, named=True)["top_channel"] == 9 and m.row(1, named=True)["max_seq"] == 1
    assert m.row(1, named=True)["max_pos"] == 0 and m.row(0, named=True)["max_pos"] == 0  # tie: first (seq, pos)
    # mean/median over 10 tokens of layer 1: five 2.0s, four 1.0s and the 250
    assert m.row(1, named=True)["mean_value"] == pytest.approx((5 * 2 + 4 * 1 + 250) / 10)
    assert m.row(1, named=True)["median_value"] == pytest.approx(2.0)
    assert res.frames["attention_sink"].is_empty() and res.frames["ablation"].is_empty()
    assert set(res.frames["ablation"].columns) == {"mode", "target", "experts", "ppl_before", "ppl_after", "delta",
                                                   "n_tokens"}


def test_run_without_stats_gets_one_line(tmp_path):
    store = Store.open(tmp_path / "s.duckdb")
    info = _planted_stats_run(store, with_stats=False)
    with pytest.raises(InputError, match="--expert-stats"):
        run(store, "super-experts", info.run_id, stats_only=True)


def test_model_side_needs_a_loadable_model(tmp_path):
    store = Store.open(tmp_path / "s.duckdb")
    info = _planted_stats_run(store)
    with pytest.raises(InputError, match="--stats-only"):
        run(store, "super-experts", info.run_id)
    with pytest.raises(InputError, match="modes"):
        run(store, "super-experts", info.run_id, stats_only=True, modes=("zero",))


# ---------------------------------------------------------------------------------------- planted tiny model

PL_LAYER, PL_EXPERT, PL_CHANNEL, MARK = 1, 5, 7, 0


def _planted_qwen3():
    """Qwen3-MoE, 4 layers, 8 experts, top-2, where expert 5 of layer 1 gets exactly the BOS tokens and writes
    32 * silu(a) * a (a ~ 4) into channel 7 of the residual stream: a super expert by construction.

    Channel 0 of every embedding is -0.2 (BOS: +1.0), so after RMSNorm channel 0 dominates every token (~ -6 /
    +8); the expert's router row reads only channel 0 (x5), so its logit is ~ +40 for BOS and ~ -30 for the rest.
    Its gate and up rows read channel 0 (x0.5) and its down projection writes 1.0 per unit into channel 7 only.
    """
    model = build_tiny_model("qwen3_moe", num_layers=4, num_experts=8, top_k=2, seed=3)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, MARK] = -0.2
        emb[BOS_ID, MARK] = 1.0
        block = model.model.layers[PL_LAYER].mlp
        block.gate.weight[:, MARK] = 0.0
        block.gate.weight[PL_EXPERT] = 0.0
        block.gate.weight[PL_EXPERT, MARK] = 5.0
        gu = block.experts.gate_up_proj[PL_EXPERT]  # [2I, H]: gate rows, then up rows
        gu.zero_()
        gu[:, MARK] = 0.5
        down = block.experts.down_proj[PL_EXPERT]  # [H, I]
        down.zero_()
        down[PL_CHANNEL] = 1.0
    return model


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planted")
    model, tok = _planted_qwen3(), byte_tokenizer()
    store = Store.open(tmp / "s.duckdb")
    handle = routelens.trace(model, tok, TEXTS, store=store, options=routelens.TraceOptions(expert_stats=True))
    heldout = tmp / "heldout.txt"
    heldout.write_text("\n".join(["held out text one", "another held-out line", "x + y = z", "the end"]) + "\n")
    params = se.SuperExpertsParams(heldout=str(heldout), max_tokens=200, batch_size=3, controls=2)
    frames = se.analyze(store, handle.info, params, model=model, tokenizer=tok)
    return dict(model=model, tok=tok, store=store, info=handle.info, frames=frames, heldout=heldout, params=params)


def test_planted_expert_is_found_exactly(planted):
    ex = planted["frames"]["experts"]
    assert ex.filter(pl.col("is_super")).select("layer", "expert").rows() == [(PL_LAYER, PL_EXPERT)]
    row = ex.row(0, named=True)
    assert (row["layer"], row["expert"], row["rank"]) == (PL_LAYER, PL_EXPERT, 1)
    # it got exactly the BOS tokens (one per text) and peaked on one of them, in the planted channel
    assert row["n_tokens"] == len(TEXTS) and row["max_out_pos"] == 0 and row["max_out_channel"] == PL_CHANNEL
    assert row["max_out_token"] == "<s>"
    assert row["max_out"] > 100 * ex.filter(~pl.col("is_super"))["max_out"].max()


def test_residual_shows_the_massive_activation_after_its_layer(planted):
    m = planted["frames"]["massive"].sort("layer")
    before, after = m.filter(pl.col("layer") < PL_LAYER), m.filter(pl.col("layer") >= PL_LAYER)
    assert (after["top_channel"] == PL_CHANNEL).all() and (after["max_pos"] == 0).all()
    assert after["max_value"].min() > 50 * before["max_value"].max()
    assert (after["max_over_median"] > 20).all()


def _experts_of(model, layer):
    return next(m.experts for m in routelens.adapt(model).moe_layers if m.index == layer)


def _router_capture(model, layer):
    """Executed routing of one MoE layer (the experts' pre-hook sees what is run, whatever hooks the router)."""
    got = []
    experts = _experts_of(model, layer)
    h = experts.register_forward_pre_hook(lambda m, args: got.append(args[1].clone()))
    return got, h


def _ppl_brute_force(model, seqs):
    """exp of the mean NLL, each sequence alone through HF's own loss (labels = ids)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s])
            total += float(model(input_ids=ids, labels=ids).loss) * (len(s) - 1)
            n += len(s) - 1
    return math.exp(total / n), n


def test_ablation_matches_brute_force_and_moves_ppl_more_than_controls(planted):
    model, tok, params = planted["model"], planted["tok"], planted["params"]
    ab = planted["frames"]["ablation"]
    seqs = sink.encode_texts(tok, sink.heldout_texts(params.heldout), max_tokens=params.max_tokens,
                             seq_len=params.seq_len)
    ppl0, n = _ppl_brute_force(model, seqs)
    assert (ab["ppl_before"] - ppl0).abs().max() < 1e-4 * ppl0 and (ab["n_tokens"] == n).all()
    # weights mode by hand: a copy with expert 5's down projection zeroed
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.model.layers[PL_LAYER].mlp.experts.down_proj[PL_EXPERT].zero_()
    w = ab.filter((pl.col("mode") == "weights") & (pl.col("target") == "super")).row(0, named=True)
    assert w["experts"] == f"{PL_LAYER}:{PL_EXPERT}"
    assert w["ppl_after"] == pytest.approx(_ppl_brute_force(zeroed, seqs)[0], rel=1e-4)
    # router mode by hand: the expert's logit at -inf, then Qwen3's softmax -> top-k (no renorm in this config)
    assert not model.config.norm_topk_prob

    def ban(module, args, output):
        logits = output[0].clone()
        logits[:, PL_EXPERT] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        wts, idx = probs.topk(2, dim=-1)
        return output[0], wts.to(output[1].dtype), idx

    hook = model.model.layers[PL_LAYER].mlp.gate.register_forward_hook(ban)
    try:
        ppl_router, _ = _ppl_brute_force(model, seqs)
    finally:
        hook.remove()
    r = ab.filter((pl.col("mode") == "router") & (pl.col("target") == "super")).row(0, named=True)
    assert r["ppl_after"] == pytest.approx(ppl_router, rel=1e-4)
    # the two modes are different interventions: each matches its own brute force, not the other's
    print("ppl before/weights/router:", ppl0, w["ppl_after"], r["ppl_after"], "router brute force error:",
          abs(r["ppl_after"] - ppl_router))
    assert abs(r["ppl_after"] - ppl_router) < 0.1 * abs(w["ppl_after"] - ppl_router)
    # removing the planted expert erases a ~500 activation; a normal expert's output is ~0.01: far smaller change
    for mode in ("weights", "router"):
        sup = ab.filter((pl.col("mode") == mode) & (pl.col("target") == "super"))["delta"].abs().item()
        ctrl = ab.filter((pl.col("mode") == mode) & pl.col("target").str.starts_with("control"))
        assert ctrl.height == 2 and (ctrl["experts"].str.starts_with(f"{PL_LAYER}:")).all()
        assert sup > 10 * ctrl["delta"].abs().max()


def test_modes_differ_in_routing(planted):
    model, tok = planted["model"], planted["tok"]
    ids = torch.tensor([tok("hello there")["input_ids"]])
    pairs = [(PL_LAYER, PL_EXPERT)]
    runs = {}
    for mode in (None, "weights", "router"):
        got, h = _router_capture(model, PL_LAYER)
        try:
            with torch.no_grad(), (sink.ablated(model, pairs, mode) if mode else torch.no_grad()):
                model(input_ids=ids)
        finally:
            h.remove()
        runs[mode] = got[0]
    assert (runs[None][0] == PL_EXPERT).any()  # BOS goes to the planted expert
    assert torch.equal(runs["weights"], runs[None])  # weights mode: routing untouched
    assert not (runs["router"] == PL_EXPERT).any()  # router mode: never selected, BOS re-routed
    changed = (runs["router"] != runs[None]).any(dim=-1)
    assert changed[0] and changed.sum() == 1


def test_attention_sink_matches_brute_force_and_is_unchanged_up_to_the_layer(planted):
    model, tok, params = planted["model"], planted["tok"], planted["params"]
    att = planted["frames"]["attention_sink"]
    assert set(att["mode"].unique()) == {"weights", "router"} and att.height == 2 * 4 * 4
    seqs = sink.encode_texts(tok, sink.heldout_texts(params.heldout), max_tokens=params.max_tokens,
                             seq_len=params.seq_len)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    sums = np.zeros((4, 4))
    count = 0
    with torch.no_grad():
        for s in seqs:
            out = eager(input_ids=torch.tensor([s]), output_attentions=True)
            for layer, a in enumerate(out.attentions):
                for h in range(4):
                    sums[layer, h] += sum(float(a[0, h, q, 0]) for q in range(1, len(s)))
            count += len(s) - 1
    want = sums / count
    for row in att.filter(pl.col("mode") == "weights").iter_rows(named=True):
        assert row["mass_before"] == pytest.approx(want[row["layer"], row["head"]], rel=1e-5)
    assert model.config._attn_implementation == "sdpa"  # measure() switched to eager and back
    for mode in ("weights", "router"):
        part = att.filter(pl.col("mode") == mode)
        upto = part.filter(pl.col("layer") <= PL_LAYER)  # attention runs before the layer's experts
        assert (upto["mass_before"] == upto["mass_after"]).all()
        later = part.filter(pl.col("layer") > PL_LAYER)
        assert ((later["mass_before"] - later["mass_after"]).abs() > 1e-6).any()


def test_no_super_expert_and_explicit_prune(planted):
    model, tok, store, info = planted["model"], planted["tok"], planted["store"], planted["info"]
    base = dict(heldout=str(planted["heldout"]), max_tokens=60)
    # q = 100: the percentile is max(V) itself and nothing exceeds it
    frames = se.analyze(store, info, se.SuperExpertsParams(q=100.0, **base), model=model, tokenizer=tok)
    assert frames["criterion"]["n_super"].item() == 0 and frames["ablation"].is_empty()
    att = frames["attention_sink"]
    assert set(att["mode"]) == {"none"} and att["mass_after"].is_null().all() and att.height == 16
    # --prune names the experts to remove whatever the criterion says
    frames = se.analyze(store, info, se.SuperExpertsParams(q=100.0, prune=("0:2",), modes=("weights",),
                                                           controls=0, **base), model=model, tokenizer=tok)
    assert frames["ablation"].select("mode", "target", "experts").rows() == [("weights", "pruned", "0:2")]


# ---------------------------------------------------------------------------------------- every family

FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "phimoe", "gpt_oss"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_traces_and_analyses(family, tmp_path):
    model, tok = build_tiny_model(family), byte_tokenizer()
    adapter = routelens.adapt(model)
    layer = adapter.moe_layers[-1]
    store = Store.open(tmp_path / "s.duckdb")
    # plant on the expert the first token goes to (rank 0): scale its output channel 3 by 1000
    got, h = _router_capture(model, layer.index)
    with torch.no_grad():
        model(input_ids=torch.tensor([tok(TEXTS[0])["input_ids"]]))
    h.remove()
    e = int(got[0][0, 0])
    with torch.no_grad():
        down = layer.experts.down_proj[e]
        if adapter.experts_layout == "gpt_oss":  # [I, H] (+ bias [H])
            down[:, 3] *= 1000.0
            layer.experts.down_proj_bias[e, 3] *= 1000.0
        else:  # [H, I]
            down[3] *= 1000.0
    handle = routelens.trace(model, tok, TEXTS[:3], store=store, options=routelens.TraceOptions(expert_stats=True))
    heldout = tmp_path / "h.txt"
    heldout.write_text("one held-out line\nand another\n")
    frames = se.analyze(store, handle.info, se.SuperExpertsParams(heldout=str(heldout), max_tokens=40),
                        model=model, tokenizer=tok)
    ex = frames["experts"]
    assert ex.filter(pl.col("is_super")).select("layer", "expert").rows() == [(layer.index, e)]
    assert ex.row(0, named=True)["max_out_channel"] == 3
    ab = frames["ablation"]
    assert set(ab["mode"]) == {"weights", "router"} and ab.filter(pl.col("target") == "super").height == 2
    assert ab["ppl_after"].is_finite().all() and (ab["n_tokens"] > 0).all()
    att = frames["attention_sink"]
    assert att.height == 2 * adapter.num_layers * model.config.num_attention_heads
    assert att["mass_before"].is_between(0.0, 1.0).all()


# ---------------------------------------------------------------------------------------- shipped model and CLI

def run_cli(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def test_shipped_model_full_analysis(tmp_path):
    model_dir = REPO / "data" / "model"
    model, tok = routelens.load_model(str(model_dir))
    texts = [json.loads(line)["text"] for line in (REPO / "data/corpus/demo.jsonl").read_text().splitlines()[:3]]
    store = Store.open(tmp_path / "s.duckdb")
    handle = routelens.trace(model, tok, texts, store=store, model_ref=str(model_dir),
                             options=routelens.TraceOptions(expert_stats=True))
    del model
    t0 = time.perf_counter()
    res = run(store, "super-experts", handle.info.run_id, max_tokens=160)
    seconds = time.perf_counter() - t0
    print(f"data/model full super-experts analysis: {seconds:.1f} s")
    f = res.frames
    # one row per routed (layer, expert), n_tokens = its decisions in the routing table
    counts = store.sql("SELECT layer, expert, count(*) AS n FROM routing WHERE run_id = ? GROUP BY ALL",
                       [handle.info.run_id])
    joined = f["experts"].join(counts.cast({"layer": pl.Int16, "expert": pl.Int16}), on=["layer", "expert"])
    assert joined.height == f["experts"].height == counts.height and (joined["n_tokens"] == joined["n"]).all()
    assert f["criterion"]["layers_included"].item() == 6 and f["massive"].height == 8
    n_super = f["criterion"]["n_super"].item()
    assert n_super >= 1 and f["ablation"].filter(pl.col("target") == "super").height == 2
    assert f["attention_sink"].height == 2 * 8 * 4 and f["ablation"]["ppl_before"].is_finite().all()
    assert seconds < 60


def test_cli_json_and_errors(tmp_path, capsys):
    db = tmp_path / "s.duckdb"
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(TEXTS[:3]) + "\n")
    heldout = tmp_path / "h.txt"
    heldout.write_text("some held-out words\nmore words here\n")
    code, out, err = run_cli(capsys, "trace", "tiny:qwen3_moe", "--input", inp, "--db", db, "--expert-stats",
                             "--json")
    assert code == 0, err
    run_id = json.loads(out)["run_id"]
    code, out, err = run_cli(capsys, "analyze", "super-experts", "--db", db, "--run", run_id, "--heldout", heldout,
                             "--max-tokens", 40, "--modes", "weights,router", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert {"layer", "expert", "max_out", "max_out_token", "is_super", "rank"} <= set(rows[0])
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    stored = Store.open(db).sql("SELECT count(*) AS n FROM result_super_experts_experts")["n"].item()
    assert stored == len(rows)
    ablation = Store.open(db).sql("SELECT * FROM result_super_experts_ablation")
    assert sorted(ablation["mode"].unique().to_list()) == ["router", "weights"]
    code, out, err = run_cli(capsys, "analyze", "super-experts", "--db", db, "--run", run_id, "--stats-only",
                             "--floor-quirk", "--q", "50", "--json")
    assert code == 0, err
    assert any(r["is_super"] for r in json.loads(out))
    # a run without statistics: one line naming the fix
    code, out, err = run_cli(capsys, "trace", "tiny:qwen3_moe", "--input", inp, "--db", db, "--json")
    bare = json.loads(out)["run_id"]
    code, out, err = run_cli(capsys, "analyze", "super-experts", "--db", db, "--run", bare, "--stats-only")
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code != 0 and len(lines) == 1 and "--expert-stats" in lines[0] and "Traceback" not in err
    # a model that is not the traced one: refused in one line
    code, out, err = run_cli(capsys, "analyze", "super-experts", "--db", db, "--run", run_id, "--model",
                             "tiny:olmoe", "--heldout", heldout)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code != 0 and len(lines) == 1 and "not the model" in lines[0]
