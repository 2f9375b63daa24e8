"""lrc (SRP, SCH, LRU/LFU/Belady): brute force from the plain definitions, hand cases, planted structure, CLI, models.

The references below are written from algorithms.md §1.2 (threshold rule over explicit windows) and §1.3 (the
simple set-based cache simulation), independently of the compiled kernels in ``analyses/lrc_kernels.py``.
"""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from routelens.analyses import lrc
from routelens.cli import main
from routelens.errors import InputError
from routelens.store import Store

from synthetic import write_run

POLICY_NAMES = ("sch", "lru", "lfu", "belady")


# --------------------------------------------------------------------------------------- brute-force references
def brute_srp(seqs_per_layer, num_experts, m):
    """max_τ F1(τ) with M, P, Act summed over every sliding window, expert and given layer (explicit windows)."""
    M = np.zeros(m + 1)
    P = np.zeros(m + 1)
    act = 0.0
    for seqs in seqs_per_layer:
        for seq in seqs:
            for s in range(len(seq) - m + 1):
                for e in range(num_experts):
                    c = sum(e in tok for tok in seq[s:s + m])
                    act += c
                    for tau in range(m + 1):
                        if c >= tau:
                            M[tau] += c
                            P[tau] += m
    if act == 0:
        return None
    f1 = 2 * M / (P + act)
    return float(f1.max())


def brute_hits(R, C, policy, L=1):
    """Hits of a capacity-C cache over token request lists R (algorithms.md §1.3 reference pseudo-code)."""
    T = len(R)
    flat = [x for r in R for x in r]
    cache, first, ts, freq, clock, hits = set(), set(), {}, {}, 0, 0
    for t in range(T):
        n_seen = len(first)
        for x in R[t]:
            if x in cache:
                hits += 1
            elif x not in first:
                hits += n_seen < C
                n_seen += 1
        done = set()
        for x in R[t]:
            first.add(x)
            cache.add(x)
            freq[x] = freq.get(x, 0) + 1
            j = clock
            if len(cache) > C:
                def pri(y):
                    if policy == "sch":
                        lo = t + 1 if (y in done or y == x) else t
                        return (sum(y in R[u] for u in range(lo, min(t + L, T))), ts.get(y, 0))
                    if policy == "lru":
                        return ts[y]
                    if policy == "lfu":
                        return (freq[y], ts[y])
                    nxt = next((jj + 1 for jj in range(j + 1, len(flat)) if flat[jj] == y), len(flat) + y + 1)
                    return -nxt
                cache.remove(min((y for y in cache if y != x), key=pri))
            clock += 1
            ts[x] = clock
            done.add(x)
    return hits


def random_routing(rng, L, E, k, lengths):
    n = int(sum(lengths))
    return np.stack([np.stack([rng.permutation(E)[:k] for _ in range(n)]) for _ in range(L)]).astype(np.uint8)


def random_case(rng, layers):
    """A random trace for the cache tests: L layers drawn from ``layers`` (low, high), 2-6 experts, top-k,
    1-3 sequences of 1-11 tokens, their start offsets, and the policies' look-ahead window (1-5 tokens)."""
    L, E = int(rng.integers(*layers)), int(rng.integers(2, 7))
    k = int(rng.integers(1, E + 1))
    lengths = rng.integers(1, 12, size=int(rng.integers(1, 4)))
    ex = random_routing(rng, L, E, k, lengths)
    start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return L, E, lengths, ex, start, int(rng.integers(1, 6))


def requests(ex, a, b, layers, E):
    return [[l * E + int(ex[l, t, r]) for l in layers for r in range(ex.shape[2])] for t in range(a, b)]


# --------------------------------------------------------------------------------------------- kernel vs brute
def test_srp_matches_brute_force_per_layer_and_model():
    rng = np.random.default_rng(1)
    for _ in range(40):
        L, E = int(rng.integers(1, 4)), int(rng.integers(2, 7))
        k = int(rng.integers(1, E + 1))
        lengths = rng.integers(1, 14, size=int(rng.integers(1, 4)))
        ex = random_routing(rng, L, E, k, lengths)
        start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        for m in (1, 2, 3, 4, 8):
            hists = [lrc.srp_histograms(ex[l], start, E, m) for l in range(L)]
            seqs = [[[set(ex[l, t].tolist()) for t in range(start[i], start[i + 1])] for i in range(len(lengths))]
                    for l in range(L)]
            for l in range(L):
                want = brute_srp([seqs[l]], E, m)
                got = lrc.srp_score(hists[l].sum(0), m).f1
                assert (want is None and np.isnan(got)) or got == pytest.approx(want, rel=1e-12, abs=1e-15)
            want = brute_srp(seqs, E, m)
            got = lrc.srp_score(np.sum(hists, 0).sum(0), m).f1
            assert (want is None and np.isnan(got)) or got == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_cache_hits_match_brute_force_per_layer_and_model(policy):
    rng = np.random.default_rng(hash(policy) % 1000)
    checked = 0
    for _ in range(40):
        L, E, lengths, ex, start, window = random_case(rng, layers=(1, 4))
        for sub_layers in [[l] for l in range(L)] + [list(range(L))]:
            sub = ex[sub_layers[0]:sub_layers[-1] + 1]
            U = len(sub_layers) * E
            cmax = int(rng.integers(1, U + 1))
            counts = lrc.cache_depth_counts(sub, start, np.arange(len(lengths)), E, policy, window, cmax)
            for i in range(len(lengths)):
                R = requests(ex, start[i], start[i + 1], sub_layers, E)
                for C in range(1, cmax + 1):
                    assert counts[i, :C].sum() == brute_hits(R, C, policy, window), (policy, sub_layers, C, R)
                    checked += 1
    assert checked > 500


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_banded_cache_counts_match_brute_force(policy):
    """The shared cache kept as bands of g depths (g = number of layers, as the model level uses): hits at every
    multiple of g equal the brute-force cache."""
    rng = np.random.default_rng(11 + POLICY_NAMES.index(policy))
    checked = 0
    for _ in range(25):
        L, E, lengths, ex, start, window = random_case(rng, layers=(2, 5))
        cmax = L * int(rng.integers(1, E + 1))
        counts = lrc.cache_depth_counts(ex, start, np.arange(len(lengths)), E, policy, window, cmax, group=L)
        assert counts.shape == (len(lengths), cmax // L)
        for i in range(len(lengths)):
            R = requests(ex, start[i], start[i + 1], list(range(L)), E)
            for j in range(cmax // L):
                assert counts[i, :j + 1].sum() == brute_hits(R, (j + 1) * L, policy, window), (policy, j, R)
                checked += 1
    assert checked > 100


def test_analysis_values_equal_brute_force_means(tmp_path):
    """End to end through the store: per-layer and model-level rows equal the brute-force definitions."""
    rng = np.random.default_rng(7)
    E, k, lengths = 5, 2, [9, 6, 11]
    ex = random_routing(rng, 2, E, k, lengths)
    store = Store.open(tmp_path / "s.duckdb")
    info = write_run(store, ex, seq_lengths=lengths, num_experts=E, layers=(1, 3))
    res = lrc.compute(store, [info], lrc.LrcParams(m=(2, 4), rho=(0.5, 1.0, 2.0), bootstrap=0))["values"]
    start = np.concatenate([[0], np.cumsum(lengths)])
    for row in res.iter_rows(named=True):
        layers = [0, 1] if row["scope"] == "model" else [(1, 3).index(row["layer"])]
        if row["metric"] == "srp":
            seqs = [[[set(ex[l, t].tolist()) for t in range(start[i], start[i + 1])] for i in range(3)]
                    for l in layers]
            assert row["value"] == pytest.approx(brute_srp(seqs, E, row["m"]), rel=1e-12)
            continue
        C = round(row["rho"] * k * len(layers))
        assert row["capacity"] == C
        rates = [brute_hits(requests(ex, start[i], start[i + 1], layers, E), C, row["metric"], row["m"] or 1)
                 / (lengths[i] * k * len(layers)) for i in range(3)]
        assert row["value"] == pytest.approx(np.mean(rates), rel=1e-12)
        assert row["ci_low"] is None or np.isnan(row["ci_low"])


# ----------------------------------------------------------------------------------------------- hand computed
def test_srp_hand_case():
    # one sequence, E=2, k=1, experts [0, 0, 1], m=2: windows [0,0] -> c=(2,0); [0,1] -> c=(1,1).
    # H = {0: 1, 1: 2, 2: 1}; Act = 4.  τ=0: M=4, P=2·4=8, F1=8/12.  τ=1: M=1+1+2=4, P=2·3=6, F1=8/10=0.8.
    # τ=2: M=2, P=2, F1=4/6.  SRP=0.8 at τ=1, best_rho=P/Act=6/4=1.5, act_r=Act/P(0)=4/8=0.5
    ex = np.array([[0], [0], [1]], np.uint8)
    h = lrc.srp_histograms(ex, np.array([0, 3]), 2, 2)
    assert h.tolist() == [[1, 2, 1]]
    s = lrc.srp_score(h[0], 2)
    assert (s.f1, s.tau, s.best_rho, s.act_r) == (pytest.approx(0.8), 1, pytest.approx(1.5), pytest.approx(0.5))
    # experts [0, 0, 1, 1], m=2: H = {0: 2, 1: 2, 2: 2}, Act=6; τ=1: M=6, P=2·4=8 -> 12/14 = 6/7 (τ=2: 8/10)
    s = lrc.srp_score(lrc.srp_histograms(np.array([[0], [0], [1], [1]], np.uint8), np.array([0, 4]), 2, 2)[0], 2)
    assert s.f1 == pytest.approx(6 / 7) and s.tau == 1


def test_cache_hand_cases():
    # E=3, k=1, requests 0,1,0,2,1 with C=2. t0, t1: cold-start hits (0 and 1 distinct seen before < 2); t2: 0 hit.
    # t3: 2 is new with 2 distinct seen -> miss; evict one of {0, 1}:
    #   SCH m=3: look-ahead [4, 6) holds token 4 = {1}: n0=0 < n1=1 -> evict 0; t4: 1 hits -> 4/5
    #   LRU: 1 (t1) older than 0 (t2) -> evict 1; t4 misses -> 3/5.  LFU: counts 0:2, 1:1 -> evict 1 -> 3/5
    #   Belady: 1 used next at t4, 0 never -> evict 0 -> 4/5.  SCH m=1 (empty look-ahead) = LRU -> 3/5
    ex = np.array([0, 1, 0, 2, 1], np.uint8).reshape(1, 5, 1)
    start, sel = np.array([0, 5]), np.array([0])

    def rate(policy, m):
        return lrc.hit_rates(lrc.cache_depth_counts(ex, start, sel, 3, policy, m, 3), np.array([2]),
                             np.array([5]))[0, 0]

    assert rate("sch", 3) == pytest.approx(0.8)
    assert rate("sch", 1) == pytest.approx(0.6)
    assert rate("lru", 1) == pytest.approx(0.6)
    assert rate("lfu", 1) == pytest.approx(0.6)
    assert rate("belady", 1) == pytest.approx(0.8)
    # model level, 2 layers of E=2, k=1: layer 0 uses 0,1 and layer 1 uses 1,1 -> items t0: [0, 3], t1: [1, 3].
    # C = ρ·k·L = 2. t0: both new with 0 and 1 seen before -> 2 hits; t1: 1 is new with 2 seen -> miss, 3 hits.
    # LRU: 3/4
    ex2 = np.array([[[0], [1]], [[1], [1]]], np.uint8)
    counts = lrc.cache_depth_counts(ex2, np.array([0, 2]), sel, 2, "lru", 1, 4)
    assert lrc.hit_rates(counts, np.array([2]), np.array([4]))[0, 0] == pytest.approx(0.75)


def test_bootstrap_interval_and_weights():
    # B=10, confidence 0.8: j=round(10·0.1)=1; sorted q = 0.0..0.9; θ=0.5 -> [1 − q[9], 1 − q[1]] = [0.1, 0.9]
    lo, hi = lrc.basic_interval(np.array([0.5]), (np.arange(10) / 10)[::-1, None], 0.8)
    assert lo[0] == pytest.approx(0.1) and hi[0] == pytest.approx(0.9)
    w = lrc.bootstrap_weights(7, 50, seed=3)
    assert w.shape == (50, 7) and (w.sum(1) == 7).all() and (w >= 0).all()
    assert np.array_equal(w, lrc.bootstrap_weights(7, 50, seed=3))
    assert not np.array_equal(w, lrc.bootstrap_weights(7, 50, seed=4))


def test_bootstrap_srp_is_srp_of_the_resampled_sequences():
    """A weight row W[b] applied to per-sequence histograms = SRP of the sequence list with sequence i repeated
    W[b, i] times (brute force)."""
    rng = np.random.default_rng(5)
    E, k, lengths, m = 4, 2, [6, 5, 8, 7], 3
    ex = random_routing(rng, 1, E, k, lengths)
    start = np.concatenate([[0], np.cumsum(lengths)])
    h = lrc.srp_histograms(ex[0], start, E, m)
    seqs = [[set(ex[0, t].tolist()) for t in range(start[i], start[i + 1])] for i in range(4)]
    for w in lrc.bootstrap_weights(4, 5, seed=0):
        resampled = [s for i, s in enumerate(seqs) for _ in range(w[i])]
        assert lrc.srp_score(w @ h, m).f1 == pytest.approx(brute_srp([resampled], E, m), rel=1e-12)


# -------------------------------------------------------------------------------------------- planted structure
def planted_blocks(n_seq, n_blocks, m, k, L):
    """Each aligned block of m tokens routes every token to one fixed set of k experts, alternating between the
    disjoint sets A = {0..k-1} and B = {k..2k-1} (so E >= 2k) in every layer."""
    tok = np.arange(n_blocks * m) // m % 2
    one = np.where(tok[:, None] == 0, np.arange(k), np.arange(k, 2 * k))
    return np.broadcast_to(np.tile(one, (n_seq, 1)), (L, n_seq * n_blocks * m, k)).astype(np.uint8).copy()


def test_planted_segments_give_predicted_srp_and_sch(tmp_path):
    n_seq, n_blocks, m, k, L, E = 3, 5, 8, 2, 2, 6
    ex = planted_blocks(n_seq, n_blocks, m, k, L)
    store = Store.open(tmp_path / "p.duckdb")
    info = write_run(store, ex, seq_lengths=[n_blocks * m] * n_seq, num_experts=E)
    res = lrc.compute(store, [info], lrc.LrcParams(m=(m,), rho=(1.0, 2.0), bootstrap=20))["values"]

    # SRP by window offset o = s mod m (theory, not windows): o = 0 covers one block (A at count m); 0 < o < m
    # covers m−o tokens of one set and o of the other. Offset 0 occurs n_blocks times per sequence, others
    # n_blocks−1 times. For τ: M = Σ_o n_o·k·[(m−o)·1(m−o≥τ) + o·1(o≥τ)], P = m·Σ_o n_o·(#experts with c ≥ τ,
    # all E at τ=0), Act = Σ_o n_o·k·m.
    M, P = np.zeros(m + 1), np.zeros(m + 1)
    act = 0.0
    for o in range(m):
        n_o = n_blocks if o == 0 else n_blocks - 1
        counts = [m - o] * k + ([o] * k if o else []) + [0] * (E - (2 * k if o else k))
        act += n_o * k * m
        for tau in range(m + 1):
            M[tau] += n_o * sum(c for c in counts if c >= tau)
            P[tau] += n_o * m * sum(c >= tau for c in counts)
    srp_theory = (2 * M / (P + act)).max()
    srp = res.filter(pl.col("metric") == "srp")
    assert srp["value"].to_list() == pytest.approx([srp_theory] * (L + 1), rel=1e-12)
    # identical sequences: every resample gives the same SRP, so the interval collapses onto the value
    assert srp["ci_low"].to_list() == pytest.approx([srp_theory] * (L + 1))

    # SCH/LRU/Belady: C = k (ρ=1) holds exactly one block's set: at each of the n_blocks−1 block changes the k new
    # requests miss and evict the old set (old items have no future use in the look-ahead, are least recent, are
    # used furthest ahead), then the block hits; the first set's requests are cold-start hits. Hit rate =
    # 1 − (n_blocks−1)/(n_blocks·m). C = 2k holds both sets: every request hits. The same at model level
    # (C = ρ·k·L, all layers change set together). LFU is excluded at ρ=1: its high counts keep the old set.
    want1 = 1 - (n_blocks - 1) / (n_blocks * m)
    cache = res.filter(pl.col("metric") != "srp")
    rho1 = cache.filter((pl.col("rho") == 1.0) & (pl.col("metric") != "lfu"))["value"].to_list()
    assert rho1 == pytest.approx([want1] * 3 * (L + 1))
    # LFU at C = k: the second new request of a block change evicts the first (count 1 < the old set's counts)
    assert (cache.filter((pl.col("rho") == 1.0) & (pl.col("metric") == "lfu"))["value"] < want1).all()
    assert cache.filter(pl.col("rho") == 2.0)["value"].to_list() == pytest.approx([1.0] * 4 * (L + 1))

    # constant routing (one fixed set): SRP = 1 with a best group of exactly k experts; SCH(ρ=1) = 1
    const = np.zeros((1, 40, k), np.uint8) + np.arange(k, dtype=np.uint8)
    info2 = write_run(store, const, seq_lengths=[20, 20], num_experts=E, name="const")
    r2 = lrc.compute(store, [info2], lrc.LrcParams(m=(4, 16), rho=(1.0,), bootstrap=0))["values"]
    s2 = r2.filter(pl.col("metric") == "srp")
    assert s2["value"].to_list() == pytest.approx([1.0] * 4) and s2["best_rho"].to_list() == pytest.approx([1.0] * 4)
    assert r2.filter(pl.col("metric") != "srp")["value"].to_list() == pytest.approx([1.0] * 10)


def test_sch_improves_on_lru_when_the_future_is_predictable():
    """Planted: a cyclic scan 0,1,2,0,1,2,... with C=2 defeats LRU (only the 2 cold-start hits: it always evicts
    the item needed next), while SCH with m=2 (look-ahead = the next token) evicts the cached item not needed
    next: after the cold start (t0, t1 hit) t2 misses, then t3 hits, t4 misses, ... -> hits at odd t in 3..39,
    2 + 19 = 21 of 40, which is Belady's optimum on a cycle."""
    E, n = 4, 40
    ex = (np.arange(n) % 3).astype(np.uint8).reshape(1, n, 1)

    def hits(policy, m):
        return lrc.cache_depth_counts(ex, np.array([0, n]), np.array([0]), E, policy, m, 2).sum()

    assert hits("lru", 1) == 2
    assert hits("sch", 2) == 21 == hits("belady", 1)
    assert hits("sch", 1) == 2  # an empty look-ahead is LRU


# ------------------------------------------------------------------------------------------------ params / CLI
def test_rho_grid_and_capacity_rules():
    assert lrc.rho_grid(4, (), 1.0).tolist() == [0.25, 0.5, 0.75, 1.0]
    assert lrc.capacities(np.array([0.5, 2.0]), 4, 16).tolist() == [32, 128]
    with pytest.raises(InputError):
        lrc.capacities(np.array([0.3]), 4)
    with pytest.raises(InputError):
        lrc.rho_grid(2, (-1.0,))


def test_cli_json_rows(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ex = random_routing(rng, 2, 8, 2, [30, 30])
    db = tmp_path / "c.duckdb"
    store = Store.open(db)
    info = write_run(store, ex, seq_lengths=[30, 30], num_experts=8, layers=(0, 2), name="cli")
    del store
    code = main(["analyze", "lrc", "--db", str(db), "--run", "cli", "--json", "--m", "4,16", "--bootstrap", "30",
                 "--rho", "1,2"])
    out = capsys.readouterr().out
    assert code == 0
    rows = json.loads(out)
    need = {"metric", "layer", "m", "rho", "value", "ci_low", "ci_high"}
    assert rows and all(need <= set(r) for r in rows)
    assert {r["metric"] for r in rows} == {"srp", "sch", "lru", "lfu", "belady"}
    assert {r["layer"] for r in rows} == {0, 2, None}
    assert all(r["rho"] is None for r in rows if r["metric"] == "srp")
    assert all(r["m"] is None for r in rows if r["metric"] in ("lru", "lfu", "belady"))
    assert len([r for r in rows if r["metric"] == "sch"]) == 2 * 3 * 2  # m × (2 layers + model) × ρ
    assert all(r["ci_low"] <= r["value"] + 1e-12 or r["value"] is None for r in rows if r["ci_low"] is not None)


def test_bad_params_are_one_line_input_errors(tmp_path):
    store = Store.open(tmp_path / "b.duckdb")
    info = write_run(store, np.zeros((1, 4, 1), np.uint8), seq_lengths=[4], num_experts=2)
    for bad in ({"metrics": ("srp", "nope")}, {"m": (0,)}, {"sch_stride": 0}, {"rho": (0.3,)}):
        with pytest.raises(InputError):
            lrc.compute(store, [info], lrc.LrcParams(**{**{"m": (2,), "bootstrap": 0}, **bad}))


def test_sch_stride_uses_every_nth_sequence(tmp_path):
    rng = np.random.default_rng(2)
    lengths = [10] * 6
    ex = random_routing(rng, 1, 6, 2, lengths)
    store = Store.open(tmp_path / "st.duckdb")
    info = write_run(store, ex, seq_lengths=lengths, num_experts=6)
    res = lrc.compute(store, [info], lrc.LrcParams(m=(4,), rho=(1.0,), bootstrap=0, sch_stride=4,
                                                   metrics=("sch", "lru"), model_level=False))["values"]
    sch = res.filter(pl.col("metric") == "sch").row(0, named=True)
    want = np.mean([brute_hits(requests(ex, 10 * i, 10 * i + 10, [0], 6), 2, "sch", 4) / 20 for i in (0, 4)])
    assert sch["n_seqs"] == 2 and sch["value"] == pytest.approx(want)
    assert res.filter(pl.col("metric") == "lru")["n_seqs"].item() == 6


# -------------------------------------------------------------------------------------------------- real models
def test_tiny_models_of_all_families_analyse(tmp_path):
    import routelens
    from routelens.tiny import build_tiny_model, byte_tokenizer

    store = Store.open(tmp_path / "m.duckdb")
    tok = byte_tokenizer()
    texts = ["the quick brown fox jumps over the lazy dog", "mixture of experts routing is local"]
    for fam in ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe"):
        model = build_tiny_model(fam, num_layers=2, num_experts=8, top_k=2, seed=0)
        run = routelens.trace(model, tok, texts, store=store, name=fam)
        res = routelens.analyses.run(store, "lrc", run.info.run_id, m=(4, 16), bootstrap=20, save=False)
        vals = res.frames["values"]
        assert vals.height > 0 and set(vals["metric"]) == {"srp", "sch", "lru", "lfu", "belady"}, fam
        assert vals.filter(pl.col("metric") != "srp")["value"].is_between(0, 1).all(), fam
        assert vals.filter(pl.col("metric") == "srp")["value"].drop_nulls().is_between(0, 1).all(), fam
