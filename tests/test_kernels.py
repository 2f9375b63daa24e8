"""The Triton masked-routing kernels (``routelens/kernels/triton_route.py``) on the CPU, through the Triton interpreter.

The interpreter must be switched on before any kernel is decorated and must not leak into other test files, so
``test_interpreter_suite`` re-runs this very module in a subprocess with ``TRITON_INTERPRET=1``; the tests marked
``interp`` only run there (they are skipped in the parent process). Checks:

- hand-computed one-row cases per family (force = row max + δ, disable, bias, bias·|z|, boost + renormalise);
- planted routing: a disabled planted winner hands its rows to the planted runner-up; a forced expert is in every
  row at about the top-1 weight;
- neutral tables: the kernel's selection is the model's own rule for every family; the public function returns
  ``rule(logits)`` bit for bit;
- steered, continuous logits: equal to ``reference.masked_route`` (selection exact, weights to float32 rounding);
- property test over quantised logits (many exact ties) and random valid tables: equal to a brute-force numpy
  oracle written here (ties -> lower expert index), and tie-aware equal to the reference (same multiset of
  selected scores: the CPU ``torch.topk`` orders ties by its own introselect);
- ``steer(model, spec, backend="triton")`` on tiny models gives the logits of ``backend="torch"``.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from routelens.adapters.routing import (DeepseekV2Rule, DeepseekV3Rule, GptOssRule, SoftmaxTopK,  # noqa: E402
                                        SparseMixerRule)
from routelens.errors import InputError  # noqa: E402
from routelens.steering.spec import LayerTables, RoutingGeometry, SteeringError, SteeringSpec  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
interp = pytest.mark.skipif(not INTERP, reason="runs in the TRITON_INTERPRET=1 subprocess (test_interpreter_suite)")
ROOT = Path(__file__).resolve().parent.parent


# -- the parent process ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(INTERP, reason="already inside the interpreter subprocess")
def test_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore::RuntimeWarning")
    proc = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__)), "-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider",
                           "-W", "ignore::RuntimeWarning"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)  # the whole kernel suite, interpreted: ~3 min on 2 cores
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


@pytest.mark.skipif(INTERP, reason="needs a process without the interpreter")
def test_cpu_tensors_without_interpreter_are_refused_in_one_line():
    from routelens.kernels.dispatch import router
    from routelens.kernels.triton_route import route_kernel

    rule = SoftmaxTopK(2, True)
    tables = LayerTables.neutral(8)
    tables.mask[3] = -1
    with pytest.raises(InputError, match="needs CUDA tensors"):
        route_kernel(torch.randn(4, 8), rule, tables)
    # "auto" sends CPU tensors to the reference
    w, i = router("auto")(torch.randn(4, 8), rule, tables)
    assert not (i == 3).any()


# -- helpers ---------------------------------------------------------------------------------------------------------

def _tables(E, force=(), disable=(), bias=None, bias_abs=None, boost=None, renormalize=False) -> LayerTables:
    t = LayerTables.neutral(E)
    t.mask[list(force)] = 1
    t.mask[list(disable)] = -1
    for arr, values in ((t.bias, bias), (t.bias_abs, bias_abs), (t.boost, boost)):
        for e, v in (values or {}).items():
            arr[e] = v
    t.renormalize = renormalize
    return t


def _distinct_logits(T, E, dtype, seed):
    """Rows of E distinct values, exactly representable in bf16 (ties are the property test's job)."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).float() - E / 2
    scale = torch.tensor([0.171875, 0.3125, 0.59375])[torch.randint(0, 3, (T, 1), generator=g)]
    return (steps * scale).to(dtype)


def _by_index(w, i):
    o = i.argsort(dim=1)
    return w.gather(1, o), i.gather(1, o)


RULES = {
    "softmax_renorm": lambda E: SoftmaxTopK(3, True),
    "softmax_raw_f32": lambda E: SoftmaxTopK(2, False, weights_in_logits_dtype=False),
    "deepseek_v3": lambda E: DeepseekV3Rule(3, 4, 2, True, 2.5,
                                            torch.linspace(-0.2, 0.2, E, dtype=torch.float32)),
    # groups of 8: the shape the streamed kernel (triton_grouped, impl="stream") takes
    "deepseek_v3_streamed": lambda E: DeepseekV3Rule(3, 2, 1, True, 2.5,
                                                     torch.linspace(0.1, -0.1, E, dtype=torch.float32)),
    "deepseek_v2_greedy": lambda E: DeepseekV2Rule(3, "greedy", None, None, 1.5),
    "deepseek_v2_grouped": lambda E: DeepseekV2Rule(3, "group_limited_greedy", 4, 2, 16.0),
    "gpt_oss": lambda E: GptOssRule(3),
    "sparsemixer": lambda E: SparseMixerRule(2, 0.01),
    "sparsemixer_k3": lambda E: SparseMixerRule(3, 0.1),
}
# sorted=False in the model
UNORDERED = ("deepseek_v3", "deepseek_v3_streamed", "deepseek_v2_greedy", "deepseek_v2_grouped")


def _assert_same(name, w, i, rw, ri, rtol=2e-6, atol=1e-7):
    if name in UNORDERED:
        w, i = _by_index(w, i)
        rw, ri = _by_index(rw, ri)
    assert torch.equal(i, ri), f"{name}: selection differs in rows {torch.nonzero((i != ri).any(1)).flatten()[:10]}"
    assert w.dtype == rw.dtype
    torch.testing.assert_close(w.float(), rw.float(), rtol=rtol, atol=atol)


# -- hand-computed cases -------------------------------------------------------------------------------------------

@interp
def test_softmax_force_disable_by_hand():
    from routelens.kernels.triton_route import route_kernel

    z = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    t = _tables(4, force=[0], disable=[2])
    w, i = route_kernel(z, SoftmaxTopK(2, renormalize=True), t)
    # z' = [3 + 0.01, 2, -inf, 0] -> experts 0, 1; renormalised softmax over the two
    a, b = math.exp(3.01), math.exp(2.0)
    assert i.tolist() == [[0, 1]]
    torch.testing.assert_close(w, torch.tensor([[a / (a + b), b / (a + b)]]), rtol=1e-6, atol=0)
    w, i = route_kernel(z, SoftmaxTopK(2, renormalize=False), t)
    s = a + b + math.exp(0.0)
    torch.testing.assert_close(w, torch.tensor([[a / s, b / s]]), rtol=1e-6, atol=0)


@interp
def test_bias_abs_and_boost_renormalised_by_hand():
    from routelens.kernels.triton_route import route_kernel

    z = torch.tensor([[1.0, -2.0, 0.5, 0.25]])
    # expert 1: -2 + 1 + 0.5·|-2| = 0 ; expert 3: 0.25 + 1 = 1.25 -> order 3, 0, 2, 1
    t = _tables(4, bias={1: 1.0, 3: 1.0}, bias_abs={1: 0.5}, boost={3: 3.0}, renormalize=True)
    w, i = route_kernel(z, SoftmaxTopK(3, renormalize=True), t)
    assert i.tolist() == [[3, 0, 2]]
    e = [math.exp(1.25), math.exp(1.0), math.exp(0.5)]
    p = [x / sum(e) for x in e]  # renormalised over the selected three
    boosted = [3 * p[0], p[1], p[2]]
    want = [x * (sum(p) / sum(boosted)) for x in boosted]
    torch.testing.assert_close(w, torch.tensor([want]), rtol=1e-6, atol=0)


def test_v3_mask_folded_into_the_correction_bias_by_hand():
    """The V3 kernels take the mask inside the correction bias (+inf forced, -inf disabled, the bias itself
    elsewhere); the folded row is cached per tables and buffer, and rebuilt when either changes."""
    from routelens.kernels.triton_route import _device_tables, _v3_choice_bias

    corr = torch.tensor([0.5, -0.25, 0.0, 10.0, -0.0])
    tables = _tables(5, force=[1], disable=[3])
    tab, _ = _device_tables(tables, corr.device)
    folded = _v3_choice_bias(corr, tab, tables)
    assert folded.tolist() == [0.5, float("inf"), 0.0, float("-inf"), 0.0]
    assert folded.dtype == torch.float32 and math.copysign(1.0, folded[4].item()) == -1.0  # the bias, untouched
    assert _v3_choice_bias(corr, tab, tables) is folded  # cached: no device ops on later calls
    corr.add_(1.0)  # the buffer edited in place (its version moves)
    assert _v3_choice_bias(corr, tab, tables).tolist() == [1.5, float("inf"), 1.0, float("-inf"), 1.0]
    tables.mask[0] = -1  # the tables edited: a new device table, a new fold
    tab2, _ = _device_tables(tables, corr.device)
    assert _v3_choice_bias(corr, tab2, tables).tolist() == [float("-inf"), float("inf"), 1.0, float("-inf"),
                                                                  1.0]
    other = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0])  # another layer's buffer, same tables: its own entry
    assert _v3_choice_bias(other, tab2, tables).tolist()[2] == 0.0
    assert _v3_choice_bias(corr, tab2, tables).tolist()[2] == 1.0


@interp
def test_deepseek_v3_mask_after_correction_bias_by_hand():
    from routelens.kernels.triton_route import route_kernel

    # 4 experts, 2 groups of 2, keep 1 group, k = 2. Expert 3 has a huge correction bias: disabling its logit
    # would not be enough; the -inf on the choice score is. Forcing expert 0 keeps group 0.
    corr = torch.tensor([0.0, 0.0, 0.0, 10.0])
    rule = DeepseekV3Rule(2, 2, 1, True, 2.0, corr)
    z = torch.tensor([[-3.0, -1.0, 1.0, 0.5]])
    sig = [1 / (1 + math.exp(3.0)), 1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(-0.5))]
    w, i = route_kernel(z, rule, None)  # unsteered: group 1 (experts 2, 3) wins by the bias
    assert sorted(i.tolist()[0]) == [2, 3]
    w, i = route_kernel(z, rule, _tables(4, disable=[3]))
    # group scores: g0 = s0 + s1, g1 = s2 + (-inf) -> group 0 kept, both its experts chosen
    assert sorted(i.tolist()[0]) == [0, 1]
    w, i = route_kernel(z, rule, _tables(4, force=[0]))
    assert sorted(i.tolist()[0]) == [0, 1]
    got = dict(zip(i.tolist()[0], w.tolist()[0]))
    total = sig[0] + sig[1]
    assert got[0] == pytest.approx(2.0 * sig[0] / total, rel=1e-6)  # its own sigmoid, not the +inf
    assert got[1] == pytest.approx(2.0 * sig[1] / total, rel=1e-6)


@interp
def test_gpt_oss_and_v2_by_hand():
    from routelens.kernels.triton_route import route_kernel

    z = torch.tensor([[0.5, 2.0, 1.0, -1.0]])
    w, i = route_kernel(z, GptOssRule(2), _tables(4, force=[3]))
    # z' = [0.5, 2, 1, 2.01] -> 3, 1; softmax over the two selected logits only
    assert i.tolist() == [[3, 1]]
    d = math.exp(2.01) + math.exp(2.0)
    torch.testing.assert_close(w, torch.tensor([[math.exp(2.01) / d, math.exp(2.0) / d]]), rtol=1e-6, atol=0)
    # DeepSeek-V2 group-limited: groups {0,1}, {2,3}; group score = max p; keep 1; scaling 10
    w, i = route_kernel(z, DeepseekV2Rule(2, "group_limited_greedy", 2, 1, 10.0), _tables(4, disable=[1]))
    # z' = [0.5, -inf, 1, -1]: group 1 (max 1.0) beats group 0 (0.5) -> experts 2, 3
    s = math.exp(0.5) + math.exp(1.0) + math.exp(-1.0)
    assert sorted(i.tolist()[0]) == [2, 3]
    got = dict(zip(i.tolist()[0], w.tolist()[0]))
    assert got[2] == pytest.approx(10 * math.exp(1.0) / s, rel=1e-6)
    assert got[3] == pytest.approx(10 * math.exp(-1.0) / s, rel=1e-6)


@interp
def test_sparsemixer_by_hand():
    from routelens.kernels.triton_route import route_kernel

    z = torch.tensor([[2.0, 1.9, 0.0, 1.0]])
    w, i = route_kernel(z, SparseMixerRule(2, 0.05), None)  # 2ε = 0.1
    # round 0: t = 2; drop where (2 - z)/max(|z|, 2) > 0.1 -> keep {0, 1}: w0 = e^2 / (e^2 + e^1.9)
    # round 1: t = 1.9 (expert 0 masked); (1.9 - z)/max(|z|, 1.9): expert 0 -> -0.05 kept but masked (-inf)
    #          -> only expert 1 left: w1 = 1
    assert i.tolist() == [[0, 1]]
    torch.testing.assert_close(w, torch.tensor([[math.exp(2) / (math.exp(2) + math.exp(1.9)), 1.0]]), rtol=1e-6,
                               atol=0)
    w, i = route_kernel(z, SparseMixerRule(2, 0.05), _tables(4, disable=[0]))
    # z' = [-inf, 1.9, 0, 1]: round 0 picks 1 alone (1.0 is 47 % below); round 1 picks 3, 0 dropped -> alone
    assert i.tolist() == [[1, 3]]
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0]]), rtol=1e-6, atol=0)


# -- planted routing -----------------------------------------------------------------------------------------------

@interp
@pytest.mark.parametrize("name", ["softmax_renorm", "deepseek_v2_greedy", "gpt_oss", "sparsemixer"])
def test_planted_winner_disabled_and_forced(name):
    from routelens.kernels.triton_route import route_kernel

    E, T = 8, 32
    rule = RULES[name](E)
    rows = torch.arange(T)
    first, second = rows % E, (rows + 3) % E
    z = torch.full((T, E), -4.0)
    z[rows, first] = 4.0
    z[rows, second] = 3.0
    z += torch.linspace(0, 0.5, E)  # distinct lower ranks
    _, i = route_kernel(z, rule, None)
    assert torch.equal(i[:, 0], first)
    _, i = route_kernel(z, rule, _tables(E, disable=[2]))
    assert torch.equal(i[:, 0], torch.where(first == 2, second, first))
    assert not (i == 2).any()
    w, i = route_kernel(z, rule, _tables(E, force=[5]))
    assert (i == 5).any(1).all()
    if name != "sparsemixer":  # forced logit = max + δ: weight ≈ the planted winner's
        other = first != 5
        w_forced = (w * (i == 5)).sum(1)[other]
        w_first = (w * (i == first[:, None])).sum(1)[other]
        torch.testing.assert_close(w_forced, w_first * math.exp(0.01), rtol=1e-5, atol=1e-6)


# -- neutral tables: the model's own routing -----------------------------------------------------------------------

@interp
@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neutral_kernel_is_the_rule(name, dtype):
    from routelens.kernels.triton_route import masked_route_triton, route_kernel

    E = 16
    rule = RULES[name](E)
    z = _distinct_logits(48, E, dtype, seed=7)
    w, i = route_kernel(z, rule, None)
    rw, ri = rule(z)
    if dtype == torch.float32:
        _assert_same(name, w, i, rw, ri)
    elif name.startswith("sparsemixer"):
        # the rule evaluates the jitter test in bf16 arithmetic, the kernel (like the reference) in float32:
        # same argmax selection, weights may differ where the bf16 rounding flips a drop decision
        assert torch.equal(i, ri)
    elif not name.startswith("deepseek_v3"):  # V3 rounds sigmoid to bf16 in the rule; its routers run in float32
        _assert_same(name, w, i, rw, ri, rtol=8e-3, atol=1e-3)
    # the public function returns the rule's own output for neutral tables
    pw, pi = masked_route_triton(z, rule, LayerTables.neutral(E))
    assert torch.equal(pi, ri) and torch.equal(pw, rw)


@interp
@pytest.mark.parametrize("name", list(RULES))
def test_weights_dtype_matches_reference(name):
    from routelens.kernels.reference import masked_route
    from routelens.kernels.triton_route import masked_route_triton, weights_dtype

    rule = RULES[name](16)
    t = _tables(16, disable=[1])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        z = torch.randn(4, 16).to(dtype)
        assert rule(z)[0].dtype == weights_dtype(rule, dtype) == masked_route(z, rule, t)[0].dtype \
            == masked_route_triton(z, rule, t)[0].dtype


# -- the two selection paths: 32-bit keys (exact when the low bits are zero or the top k+1 differ above them) and
#    the 64-bit rounds that redo a block with float32 near-ties -------------------------------------------------------

def _near_tie_logits(T, E, k, seed):
    """float32 rows of distinct values where, in every other row, ranks k-1/k and 0/1 are a pair one ulp apart with
    the larger value on the HIGHER column: a key that dropped the low bits would pick the wrong one of each pair."""
    g = torch.Generator().manual_seed(seed)
    z = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).float() * 0.37 - 3.0
    for r in range(0, T, 2):
        order = torch.argsort(z[r], descending=True)
        for a, b in ((0, 1), (k - 1, k)):
            lo_col, hi_col = sorted((int(order[a]), int(order[b])))
            v = z[r, order[a]]
            z[r, lo_col] = v
            z[r, hi_col] = torch.nextafter(v, torch.tensor(float("inf")))
    return z


@interp
@pytest.mark.parametrize("name", ["softmax_renorm", "deepseek_v2_greedy", "gpt_oss", "sparsemixer"])
def test_float32_near_ties_take_the_exact_path(name):
    from routelens.kernels.reference import masked_route
    from routelens.kernels.triton_route import route_kernel

    E, k = 32, 3
    rule = RULES[name](E)
    z = _near_tie_logits(16, E, k, seed=5)
    w, i = route_kernel(z, rule, None, block_rows=2)  # blocks of a near-tie row and a plain one
    rw, ri = rule(z)
    _assert_same(name, w, i, rw, ri)
    t = _tables(E, disable=[int(z[1].argmax())], boost={0: 2.0})
    _assert_same(name, *route_kernel(z, rule, t, block_rows=4), *masked_route(z, rule, t))


@interp
@pytest.mark.parametrize("E,k", [(4, 2), (8, 8), (64, 10), (256, 8)])
def test_shapes_padding_and_more_picks_than_a_chunk_holds(E, k):
    """E below one chunk of 8 (padding), k = E, k > 8 (a chunk can be used up), the DeepSeek-V3 width."""
    from routelens.kernels.triton_route import route_kernel

    for rule, name in ((SoftmaxTopK(k, True), "softmax_renorm"), (GptOssRule(k), "gpt_oss")):
        z = _distinct_logits(8, E, torch.bfloat16, seed=E + k)
        _assert_same(name, *route_kernel(z, rule, None), *rule(z), rtol=8e-3, atol=1e-3)
        z = torch.randint(-3, 3, (8, E)).float()  # many exact ties: lower index first
        t = _tables(E, force=[E - 1], boost={0: 3.0})
        _, i = route_kernel(z, rule, t)
        want = torch.sort(-steered_keys(z, t), dim=1, stable=True).indices[:, :k]
        assert torch.equal(i, want), (E, k, i, want)


def steered_keys(z, t, delta=0.01):
    from routelens.kernels.reference import steered_scores

    return steered_scores(z, SoftmaxTopK(2, True), t, delta)[0]


@interp
def test_deepseek_groups_not_filling_a_power_of_two():
    """DeepSeek-V2 (160 experts in 8 groups of 20) takes the per-group pass; V3-like 8 x 32 the one-pass view."""
    from routelens.kernels.reference import masked_route
    from routelens.kernels.triton_route import route_kernel

    for E, rule, name in ((160, DeepseekV2Rule(6, "group_limited_greedy", 8, 3, 16.0), "deepseek_v2_grouped"),
                          (256, DeepseekV3Rule(8, 8, 4, True, 2.5, torch.linspace(-0.1, 0.1, 256)), "deepseek_v3")):
        z = _distinct_logits(16, E, torch.float32, seed=E)
        t = _tables(E, force=[3], disable=[7, 8], bias={10: 0.5})
        _assert_same(name, *route_kernel(z, rule, t), *masked_route(z, rule, t))
        _assert_same(name, *route_kernel(z, rule, None), *rule(z))


# -- steered, continuous logits: equal to the reference ------------------------------------------------------------

@interp
@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steered_matches_reference(name, dtype):
    from routelens.kernels.reference import masked_route
    from routelens.kernels.triton_route import masked_route_triton

    E = 16
    rule = RULES[name](E)
    from routelens.kernels.reference import steered_scores

    z = _distinct_logits(64, E, dtype, seed=11)
    t = _tables(E, force=[4], disable=[0, 9], bias={2: 0.7, 11: -0.3}, bias_abs={6: 0.2},
                boost={4: 0.5, 7: 2.0, 12: 1.5}, renormalize=True)
    zs = steered_scores(z, rule, t, 0.01)[0]
    tie_free = torch.tensor([len(set(r[torch.isfinite(r)].tolist())) == int(torch.isfinite(r).sum()) for r in zs])
    z = z[tie_free]  # a bias can land one expert on another's value; ties are the property test's job
    assert len(z) >= 32
    w, i = masked_route_triton(z, rule, t)
    rw, ri = masked_route(z, rule, t)
    if dtype == torch.float32:
        _assert_same(name, w, i, rw, ri)
    else:  # bf16 weights: one rounding of values that agree in float32 to ~1e-7
        _assert_same(name, w, i, rw, ri, rtol=8e-3, atol=1e-3)


# -- property test: quantised logits (ties), random tables -- vs a brute-force oracle and the reference -------------

def _oracle(z: np.ndarray, name: str, rule, t: LayerTables, delta: float):
    """Per-row numpy re-implementation (float32 where the selection depends on rounding); ties -> lower index."""
    T, E = z.shape
    k = rule.k
    out_w, out_i = np.zeros((T, k)), np.zeros((T, k), dtype=np.int64)
    f32 = np.float32
    for r in range(T):
        x = z[r].astype(f32)
        x = (x + t.bias) + t.bias_abs * np.abs(x)
        if not name.startswith("deepseek_v3") and t.mask.any():
            m = x.max()
            x = np.where(t.mask > 0, f32(m) + f32(delta), x).astype(f32)
            x[t.mask < 0] = -np.inf
        xd = x.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            p = np.exp(xd - xd.max())
            p /= p.sum()

        def top(key, n):
            return sorted(range(len(key)), key=lambda e: (-key[e], e))[:n]

        def grouped(score, two):
            G, per = rule.n_group, E // rule.n_group
            gs = []
            for g in range(G):
                vals = sorted(score[g * per:(g + 1) * per], reverse=True)
                gs.append(vals[0] + vals[1] if two else vals[0])
            keep = set(top(gs, rule.topk_group))
            return np.array([score[e] if e // per in keep else -np.inf for e in range(E)])

        if name.startswith("softmax") or name == "gpt_oss":
            idx = top(x, k)
            if name == "gpt_oss":
                e = np.exp(xd[idx] - xd[idx].max())
                w = e / e.sum()
            else:
                w = p[idx] / (p[idx].sum() if rule.renormalize else 1.0)
        elif name.startswith("deepseek_v2"):
            key = grouped(x, False) if rule.method == "group_limited_greedy" else x
            idx = top(key, k)
            w = p[idx] * rule.scaling
        elif name.startswith("deepseek_v3"):
            with np.errstate(over="ignore"):
                s = (f32(1) / (f32(1) + np.exp(-x))).astype(f32)
            c = (s + rule.correction_bias.numpy().astype(f32)).astype(f32)
            c[t.mask > 0], c[t.mask < 0] = np.inf, -np.inf
            idx = top(grouped(c, True), k)
            w = s[idx].astype(np.float64)
            w = (w / (w.sum() + 1e-20) if rule.renormalize else w) * rule.scaling
        else:  # sparsemixer
            masked, idx, w = x.copy(), [], []
            for _ in range(k):
                tmax = masked.max()
                i = next(e for e in range(E) if e not in idx and masked[e] == tmax)
                with np.errstate(invalid="ignore"):
                    drop = ((tmax - x) / np.maximum(np.abs(x), tmax)).astype(f32) > f32(2 * rule.jitter_eps)
                gates = np.where(drop, -np.inf, masked).astype(np.float64)
                w.append(1.0 / np.exp(gates - tmax).sum())
                idx.append(i)
                masked[i] = -np.inf
            w = np.array(w)
        w = np.asarray(w, dtype=np.float64)
        if t.has_boost:
            b = w * t.boost[idx]
            w = b * (w.sum() / b.sum()) if t.renormalize else b
        out_w[r], out_i[r] = w, idx
    return out_w, out_i


try:
    from hypothesis import HealthCheck, assume, given, settings
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays
except ImportError:  # pragma: no cover
    given = None


if given is not None:
    @st.composite
    def steering_case(draw):
        name = draw(st.sampled_from(sorted(RULES)))
        E = 16
        T = draw(st.integers(1, 24))
        z = draw(arrays(np.int8, (T, E), elements=st.integers(-6, 6))).astype(np.float32) / 2  # many exact ties
        experts = st.lists(st.integers(0, E - 1), max_size=3, unique=True)
        force, disable = draw(experts), draw(experts)
        disable = [e for e in disable if e not in force]
        bias = {e: draw(st.sampled_from([-1.0, -0.5, 0.5, 1.0])) for e in draw(experts)}
        bias_abs = {e: draw(st.sampled_from([-0.5, 0.25])) for e in draw(experts)}
        boost = {e: draw(st.sampled_from([0.5, 2.0, 3.0])) for e in draw(experts)}
        t = _tables(E, force, disable, bias, bias_abs, boost, renormalize=draw(st.booleans()))
        rule = RULES[name](E)
        groups = None
        if name.startswith("deepseek_v3") or name == "deepseek_v2_grouped":
            groups = (rule.n_group, rule.topk_group, 2 if name.startswith("deepseek_v3") else 1)
        try:
            SteeringSpec._check_layer(0, t, RoutingGeometry(1, (0,), E, rule.k, groups))
        except SteeringError:
            assume(False)
        return name, rule, z, t

    @interp
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(steering_case())
    def test_property_ties_vs_oracle_and_reference(case):
        from routelens.kernels.reference import masked_route, steered_scores
        from routelens.kernels.triton_route import route_kernel

        name, rule, z, t = case
        logits = torch.from_numpy(z)
        w, i = route_kernel(logits, rule, t, 0.01)
        ow, oi = _oracle(z, name, rule, t, 0.01)
        assert np.array_equal(i.numpy(), oi), (name, i, oi)
        np.testing.assert_allclose(w.double().numpy(), ow, rtol=2e-6, atol=1e-7)
        # tie-aware against the reference: the same multiset of selected choice scores per row
        rw, ri = masked_route(logits, rule, t, 0.01)
        if name.startswith("sparsemixer"):  # torch.max returns the first index: exact
            assert torch.equal(i, ri)
            return
        if name in ("deepseek_v3", "deepseek_v3_streamed", "deepseek_v2_grouped"):
            return  # group ties make the kept groups themselves implementation-defined: oracle only
        zs, _ = steered_scores(logits, rule, t, 0.01)
        got = zs.gather(1, i).sort(1).values
        want = zs.gather(1, ri).sort(1).values
        assert torch.equal(got, want), (name, i, ri)
        same = (i.sort(1).values == ri.sort(1).values).all(1)
        a, b = _by_index(w[same], i[same])[0], _by_index(rw[same], ri[same])[0]
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


# -- steer() on tiny models ------------------------------------------------------------------------------------------

@interp
@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "gpt_oss", "phimoe"])
def test_steer_backend_triton_equals_torch(family):
    from routelens.steering import steer
    from routelens.tiny import build_tiny_model

    model = build_tiny_model(family, num_layers=2, num_experts=8, top_k=2, seed=0).eval()
    spec = {"rules": [{"layers": "all", "experts": [1], "action": "force"},
                      {"layers": "all", "experts": [6], "action": "disable"},
                      {"layers": "all", "experts": [2], "action": "boost", "value": 2.0},
                      {"layers": "all", "experts": [3], "action": "bias", "value": 0.5}]}
    ids = torch.randint(5, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with steer(model, spec, backend="torch"):
            ref = model(input_ids=ids).logits
        with steer(model, spec, backend="triton") as handle:
            got = model(input_ids=ids).logits
    assert handle.calls and all(n == ids.numel() for n in handle.calls.values())
    assert not torch.allclose(ref, plain)  # the spec does change the model
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


# -- the streamed kernel's rare paths ---------------------------------------------------------------------------------

STREAMED = ("softmax_renorm", "softmax_raw_f32", "deepseek_v2_greedy", "gpt_oss", "sparsemixer")


@interp
@pytest.mark.parametrize("name", STREAMED)
def test_stream_far_from_offset_sums_again(name):
    """A score 70 above a thread's first chunk, and a disabled expert 75 above the rest: the offset sums would
    over- and underflow, so the block's sums are redone against the row max (``_sum_again``). (Far enough to
    trip the guard, near enough that the reference's probabilities of the picked experts do not underflow to
    ties.)"""
    from routelens.kernels.reference import masked_route
    from routelens.kernels.triton_route import route_kernel

    E = 64
    rule = RULES[name](E)
    z = _distinct_logits(8, E, torch.bfloat16, seed=11).float()
    z[0, 40] = 70.0  # a later chunk far above thread 0's first chunk
    z[1, 2] = 75.0   # in the first chunk, disabled below
    z = z.to(torch.bfloat16)
    t = _tables(E, disable=[2], force=[5], bias={7: 0.25})
    _assert_same(name, *route_kernel(z, rule, t), *masked_route(z, rule, t), rtol=8e-3, atol=1e-6)
    t = _tables(E, disable=[2])
    _assert_same(name, *route_kernel(z, rule, t), *masked_route(z, rule, t), rtol=8e-3, atol=1e-6)


@interp
@pytest.mark.parametrize("name", STREAMED)
def test_stream_dense_tables_beyond_the_sparse_limit(name):
    """More special experts than ``SPARSE_MAX``: the per-column tables path, bf16 and float32."""
    from routelens.kernels.reference import masked_route
    from routelens.kernels.triton_route import route_kernel
    from routelens.kernels.triton_stream import SPARSE_MAX

    E = 256
    rule = RULES[name](E)
    disable = list(range(0, 2 * (SPARSE_MAX + 8), 2))
    t = _tables(E, disable=disable, force=[1], bias={e: 0.01 * (e % 7) - 0.03 for e in range(3, E, 3)})
    for dtype in (torch.bfloat16, torch.float32):
        z = _distinct_logits(8, E, dtype, seed=12)
        _assert_same(name, *route_kernel(z, rule, t), *masked_route(z, rule, t), rtol=8e-3, atol=1e-6)


@interp
@pytest.mark.parametrize("name", STREAMED)
def test_stream_biased_expert_ties_an_unbiased_one_in_its_high_bits(name):
    """bf16 logits, a bias of 1e-6 on expert 9 whose logit equals expert 3's: their 32-bit keys would tie (the bias
    only moves low bits), the exact comparison of the sparse form must rank 9 first; a bias of 0 keeps the lower
    index first."""
    from routelens.kernels.reference import masked_route
    from routelens.kernels.triton_route import route_kernel

    E = 32
    rule = RULES[name](E)
    z = _distinct_logits(4, E, torch.bfloat16, seed=13).float()
    top = z.max(1).values
    z[:, 3] = top + 1.0
    z[:, 9] = top + 1.0
    z = z.to(torch.bfloat16)
    for b in (1e-6, -1e-6, 0.0):
        t = _tables(E, bias={9: b, 20: 0.5}, disable=[30])
        w, i = route_kernel(z, rule, t)
        if b != 0.0:  # an exact tie (b = 0) is ordered by the CPU reference's introselect, unspecified
            _assert_same(name, w, i, *masked_route(z, rule, t), rtol=8e-3, atol=1e-6)
        if name not in UNORDERED:
            assert (i[:, 0] == (9 if b > 0 else 3)).all() and (i[:, 1] == (3 if b > 0 else 9)).all(), (b, i)


@interp
def test_route_kernel_impl_errors_are_one_line():
    from routelens.kernels.triton_route import route_kernel

    z = _distinct_logits(2, 16, torch.bfloat16, seed=1)
    with pytest.raises(InputError, match=r"unknown kernel impl 'fast'; expected 'auto', 'rows' or 'stream'"):
        route_kernel(z, SoftmaxTopK(2, True), None, impl="fast")
    with pytest.raises(InputError, match=r"no streamed kernel for DeepseekV3Rule with k=3"):
        route_kernel(z, RULES["deepseek_v3"](16), None, impl="stream")
    with pytest.raises(InputError, match=r"no streamed kernel for sparsemixer with 2ε = 0.5 >= 0.45"):
        route_kernel(z, SparseMixerRule(2, 0.25), None, impl="stream")
    w, i = route_kernel(z, SparseMixerRule(2, 0.25), None)  # auto: the rows kernel
    assert torch.equal(i, SparseMixerRule(2, 0.25)(z.float())[1])
    with pytest.raises(InputError, match=r"no streamed kernel for a force with δ <= 0"):
        route_kernel(z, SoftmaxTopK(2, True), _tables(16, force=[1]), force_delta=0.0, impl="stream")
    w, i = route_kernel(z, SoftmaxTopK(2, True), _tables(16, force=[1]), force_delta=0.0)  # auto: the rows kernel
    assert (i[:, 0] == 1).all()


@interp
@pytest.mark.parametrize("name", ["softmax_raw_f32", "deepseek_v2_greedy"])
@pytest.mark.parametrize("shift", [-9.0, -4.0])
def test_stream_force_value_exact_with_a_biased_expert_at_the_raw_max(name, shift):
    """float32 weights, so the force value (row max of the steered logits + δ) must be exact to the last bit:
    negative row maxima (whose order bits differ from the value's in the low bits), a biased expert whose raw
    logit is the row max while its biased one is not (the max must not come from its raw logit), and a disabled
    expert that holds the row max in other rows."""
    from routelens.kernels.reference import masked_route
    from routelens.kernels.triton_route import route_kernel

    E = 64
    rule = RULES[name](E)
    g = torch.Generator().manual_seed(14)  # distinct multiples of 1/8, all negative for shift < 0 (exact in bf16)
    z = torch.stack([torch.randperm(E, generator=g) for _ in range(16)]).float() * 0.125 + shift
    z[:8, 6] = z[:8].max(1).values + 2.0   # biased down by 3: no longer the max
    z[8:, 50] = z[8:].max(1).values + 1.0  # disabled: still the force value
    z = z.to(torch.bfloat16)
    t = _tables(E, force=[1], disable=[50, 51], bias={6: -3.0})
    _assert_same(name, *route_kernel(z, rule, t), *masked_route(z, rule, t))


@interp
@pytest.mark.parametrize("name", STREAMED)
@pytest.mark.parametrize("k8", [False, True])
def test_stream_signed_zero_ties_go_to_the_lower_expert(name, k8):
    """-0.0 and +0.0 are equal scores: tied, lower expert first (as torch.topk on CUDA). For k = 8 the streamed
    kernel's keys keep the sign of zero, so a pick of value 0 sends its block to the exact selection. Ten zeros of
    alternating sign, more than k: the k lowest of their experts, in order."""
    import dataclasses

    from routelens.kernels.triton_route import route_kernel

    E = 32
    rule = RULES[name](E)
    if k8:
        rule = dataclasses.replace(rule, k=8)
    g = torch.Generator().manual_seed(15)
    z = -1.0 - torch.stack([torch.randperm(E, generator=g) for _ in range(4)]).float() * 0.125
    zeros = [1, 3, 6, 10, 13, 17, 20, 22, 25, 29]
    z[:, zeros[0::2]] = -0.0
    z[:, zeros[1::2]] = 0.0
    z = z.to(torch.bfloat16)
    want = torch.tensor(zeros[:rule.k])
    for t in (None, _tables(E, disable=[30], bias={31: 0.5})):
        w, i = route_kernel(z, rule, t)
        if name in UNORDERED:
            i = i.sort(1).values
        assert (i == want).all(), (t is None, i)



@interp
@pytest.mark.parametrize("name", STREAMED)
@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("flip", ["SP_TABLE", "KEY_FMA", "KEEP_SIGN"])
def test_stream_choices_flipped_agree_with_the_reference(name, k, flip):
    """Each of the stream's pipe choices (``stream_choices``: the special columns through the SDROP row or a bit,
    the keys' sign masks from multiplies or a shift, -0.0 kept in the keys or not) flipped from its default, on
    distinct bf16 logits of both signs, half the rows all negative (ties:
    ``test_stream_signed_zero_ties_go_to_the_lower_expert`` runs every default): the reference's selection and
    weights, unsteered and with a sparse spec that forces, disables and biases."""
    import dataclasses

    from routelens.kernels.reference import masked_route
    from routelens.kernels.triton_route import route_kernel, stream_choices

    E = 64
    rule = dataclasses.replace(RULES[name](E), k=k)
    z = _distinct_logits(16, E, torch.bfloat16, seed=21)
    g = torch.Generator().manual_seed(22)  # rows 8-15 all negative, so that negative scores are picked
    z[8:] = (-0.125 * (1 + torch.stack([torch.randperm(E, generator=g) for _ in range(8)]).float())).to(z.dtype)
    steered = _tables(E, force=[5], disable=[2, 40, 41], bias={9: 0.25, 33: -0.5})
    for sparse, t in ((False, _tables(E)), (True, steered)):
        opts = stream_choices(rule, lossy=False, sparse=sparse, n_forced=int(sparse))  # bf16: exact keys; force=[5]
        opts[flip] = not opts[flip]
        _assert_same(name, *route_kernel(z, rule, t, impl="stream", _stream_opts=opts), *masked_route(z, rule, t),
                     rtol=8e-3, atol=1e-6)  # unsteered, the reference is the rule on the bf16 logits


@interp
@pytest.mark.parametrize("name", STREAMED)
@pytest.mark.parametrize("E", [24, 40, 60])
def test_stream_float32_runs_with_padding_columns(name, E):
    """float32 logits reach the streams as two 16-byte runs a thread (``triton_common._runs``); with E not a
    multiple of the chunk (8·S) the last chunk's padding columns, in either run, are never chosen and never summed,
    and the tables (dense for float32: here a bias on every expert) line up with the runs: the reference's
    selection and weights, with one bias and with a spec that forces, disables and biases everywhere."""
    import dataclasses

    from routelens.kernels.reference import masked_route
    from routelens.kernels.triton_route import route_kernel

    rule = dataclasses.replace(RULES[name](E), k=3)
    z = _distinct_logits(20, E, torch.float32, seed=E)
    z = z + 0.001 * torch.randn(20, E, generator=torch.Generator().manual_seed(1))  # low bits set: lossy keys
    dense = _tables(E, force=[E - 1], disable=[0, E - 2], bias={j: 0.01 * (j % 7) for j in range(E)})
    for t in (_tables(E, bias={E - 3: 0.5}), dense):
        _assert_same(name, *route_kernel(z, rule, t, impl="stream"), *masked_route(z, rule, t))


def _crowded_logits(E: int, dtype, seed: int) -> torch.Tensor:
    """24 rows for sparsemixer's weight sets (experts within 2ε = 0.02, relative, of a pick): rows 0-7 have 2-3
    near the top in each streaming thread's columns (S = 4 threads, 8 adjacent columns each, in turn); rows 8-11
    have 12 in thread 0's columns alone, more than its list holds; one sits exactly on the drop boundary of the
    top score (t·(1 - 2ε) in float32); the rest are plain. Values are multiples of 1/128 (exact in bf16 near 2)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(-256, 160, (24, E), generator=g).float() / 128
    cols = torch.arange(E)
    thread0 = cols[(cols // 8) % 4 == 0]
    for r in range(8):
        near = torch.randperm(E, generator=g)[:10]
        z[r, near] = 2.0 - torch.randint(0, 6, (10,), generator=g).float() / 128
    for r in range(8, 12):
        z[r, thread0[torch.randperm(len(thread0), generator=g)[:12]]] = 2.0 - torch.arange(12).float() / 256
    z[3, 5] = 2.0
    z[3, 6] = float(torch.tensor(2.0) * (1 - torch.tensor(0.02)))
    return z.to(dtype)


@interp
@pytest.mark.parametrize("E,k", [(64, 2), (64, 8), (256, 2), (256, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_stream_sparsemixer_crowded_weight_sets(E, k, dtype):
    """Every weight set against the reference and the rows kernel: near-ties spread over the threads (the fast
    path's extra list rounds), more than a thread's list holds (the block sums again), a forced expert whose
    round keeps the list's best keys (taken by the picking rounds without being picks), a biased expert near the
    top (a sparse-form candidate), a disabled one."""
    from routelens.kernels.reference import masked_route
    from routelens.kernels.triton_route import route_kernel

    rule = SparseMixerRule(k, 0.01)
    z = _crowded_logits(E, dtype, seed=E + k)
    hot = int(z[0].argmax())
    for t in (None, _tables(E, force=[E - 3], disable=[hot]), _tables(E, bias={hot: 1 / 128}, disable=[E - 1]),
              _tables(E, force=[1], bias={hot: -1 / 64}, boost={1: 2.0})):
        want = masked_route(z, rule, t) if t is not None else rule(z)
        got = route_kernel(z, rule, t)
        rows = route_kernel(z, rule, t, impl="rows")
        tol = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-3)
        _assert_same("sparsemixer", *got, *rows, rtol=2e-6, atol=1e-7)
        if t is not None or dtype == torch.float32:  # the rule itself runs its jitter test in bf16
            _assert_same("sparsemixer", *got, *want, **tol)


# -- the streamed DeepSeek-V3 kernel (triton_grouped): fast sigmoid, certified, exact where not ---------------------

def _grouped_check(z, rule, t, opts=None):
    """The streamed kernel against the numpy oracle (ties -> lower index) and the rows kernel: same selected set,
    weights to float32 rounding."""
    from routelens.kernels.triton_route import route_kernel

    w, i = _by_index(*route_kernel(z, rule, t, impl="stream", _stream_opts=opts))
    name = "deepseek_v3" if isinstance(rule, DeepseekV3Rule) else "deepseek_v2_grouped"
    oracle = _oracle(z.float().numpy(), name, rule, t if t is not None else LayerTables.neutral(z.shape[1]), 0.01)
    ow, oi = _by_index(*map(torch.from_numpy, oracle))
    assert torch.equal(i, oi), (i, oi)
    np.testing.assert_allclose(w.double().numpy(), ow.numpy(), rtol=8e-3 if w.dtype == torch.bfloat16 else 2e-6,
                               atol=1e-7)
    _, ri = route_kernel(z, rule, t, impl="rows")
    assert torch.equal(i.sort(1).values, ri.sort(1).values)


@interp
@pytest.mark.parametrize("E,n_group,topk_group,k", [(256, 8, 4, 8), (128, 8, 4, 2), (256, 4, 2, 4), (64, 1, 1, 8),
                                                    (64, 8, 1, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2_grouped"])
def test_grouped_stream_equals_oracle(family, E, n_group, topk_group, k, dtype):
    g = torch.Generator().manual_seed(E + k)
    rule = (DeepseekV3Rule(k, n_group, topk_group, True, 2.5, torch.randn(E, generator=g) * 0.05)
            if family == "deepseek_v3" else _v2_grouped(E, n_group, topk_group, k))
    z = (torch.randn(24, E, generator=g) * 2).to(dtype)
    _grouped_check(z, rule, None)
    per = min(E // n_group, 16)
    t = _tables(E, force=[per + 1], disable=[0, 5, per + 2], bias={3: 0.75, per + 4: -0.5}, bias_abs={7: 0.25},
                boost={per + 1: 0.5, 3: 2.0}, renormalize=True)
    _grouped_check(z, rule, t)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2_grouped"])
def test_grouped_stream_with_two_rows_a_thread(family, dtype, monkeypatch):
    """``ROWS_PER_THREAD`` = 2 (blocks of 16 rows, one table load for both of a thread's rows): the same selection
    and weights; 40 rows, so the last block is part padding."""
    launches = _launches(monkeypatch)
    E, n_group, topk_group, k = 256, 8, 4, 8
    g = torch.Generator().manual_seed(11)
    rule = (DeepseekV3Rule(k, n_group, topk_group, True, 2.5, torch.randn(E, generator=g) * 0.05)
            if family == "deepseek_v3" else _v2_grouped(E, n_group, topk_group, k))
    z = (torch.randn(40, E, generator=g) * 2).to(dtype)
    t = _tables(E, force=[17], disable=[0, 5, 18], bias={3: 0.75, 20: -0.5}, bias_abs={7: 0.25},
                boost={17: 0.5, 3: 2.0}, renormalize=True)
    for tables in (None, t):
        _grouped_check(z, rule, tables, {"ROWS_PER_THREAD": 2})
    streamed = [(grid, consts["ROWS"]) for name, grid, consts in launches if name.endswith("_stream_kernel")]
    assert streamed and all(g == (3,) and r == 16 for g, r in streamed), streamed


def _launches(monkeypatch) -> list:
    """Every kernel launch of ``triton_route`` from here on, as ``(kernel name, grid, keywords)``; each still runs."""
    from routelens.kernels import triton_route

    seen, real = [], triton_route.launch

    def recorded(kernel, grid, *args, **consts):
        seen.append((kernel.fn.__name__, grid, consts))
        real(kernel, grid, *args, **consts)
    monkeypatch.setattr(triton_route, "launch", recorded)
    return seen


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2_grouped"])
def test_grouped_stream_resident_rows_and_streamed_pass_2_agree(family, dtype, monkeypatch):
    """``RESIDENT`` (a chunk a group, at most 8 groups: the row's choice scores kept in registers for pass 2) is
    taken where it applies and only there, also when asked elsewhere (``GROUPED_RESIDENT`` on); with it on or off,
    the oracle's selection and weights."""
    from routelens.kernels import triton_route

    monkeypatch.setattr(triton_route, "GROUPED_RESIDENT", True)
    launches = _launches(monkeypatch)
    g = torch.Generator().manual_seed(21)
    for E, n_group, topk_group, k in ((256, 8, 4, 8), (64, 4, 2, 3), (256, 4, 2, 4)):
        rule = (DeepseekV3Rule(k, n_group, topk_group, True, 2.5, torch.randn(E, generator=g) * 0.05)
                if family == "deepseek_v3" else _v2_grouped(E, n_group, topk_group, k))
        z = (torch.randn(20, E, generator=g) * 2).to(dtype)
        per = E // n_group
        t = _tables(E, force=[per + 1], disable=[0, 5, per + 2], bias={3: 0.75, per + 4: -0.5}, boost={3: 2.0})
        launches.clear()
        _grouped_check(z, rule, t)
        seen = [(c["CPG"], c["RESIDENT"]) for name, _, c in launches if name.endswith("_stream_kernel")]
        assert seen and all(r == (cpg == 1) for cpg, r in seen), seen
        if seen[0][1]:
            for tables in (None, t):
                _grouped_check(z, rule, tables, {"RESIDENT": False})


@interp
def test_v3_stream_ties_of_equal_scores_are_selected_exactly():
    """Zero correction bias and logits on a coarse grid: many equal choice scores at the group and pick boundaries,
    which the certificate cannot separate, so these rows take the exact path: its tie rules (lower group, lower
    expert) against the oracle's."""
    g = torch.Generator().manual_seed(5)
    for E, n_group, topk_group, k in ((256, 8, 4, 8), (64, 8, 2, 3)):
        rule = DeepseekV3Rule(k, n_group, topk_group, False, 1.0, torch.zeros(E))
        z = torch.randint(-3, 4, (32, E), generator=g).float() / 2
        for in_place in (False, True):  # a second launch, or in the stream's programs
            _grouped_check(z, rule, None, {"IN_PLACE": in_place})
            _grouped_check(z, rule, _tables(E, disable=[1, 2], bias={4: 0.5}), {"IN_PLACE": in_place})


@interp
@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2_grouped"])
def test_grouped_stream_selects_uncertain_rows_again_in_place(family, monkeypatch):
    """Coarse float32 logits tie at the group and pick boundaries, so the certificate leaves rows uncertain; the
    stream's program selects each again with the exact rows code, writing the rest itself: the oracle's selection
    in every row (36 rows: the last block is part padding); the tied rows took the exact path, most others not."""
    counts = _exact_rows(monkeypatch)
    E, n_group, topk_group, k = 256, 8, 4, 8
    g = torch.Generator().manual_seed(3)
    rule = (DeepseekV3Rule(k, n_group, topk_group, False, 1.0, torch.zeros(E)) if family == "deepseek_v3"
            else _v2_grouped(E, n_group, topk_group, k))
    z = torch.randn(36, E, generator=g) * 2
    z[::3] = torch.randint(-3, 4, (12, E), generator=g).float() / 2  # every third row, so blocks mix both
    for tables in (None, _tables(E, force=[9], disable=[1, 2], bias={4: 0.5}, boost={9: 2.0})):
        counts.clear()
        _grouped_check(z, rule, tables)
        assert 12 <= counts[0] < 24, counts  # the tied rows, and few of the others


@interp
@pytest.mark.parametrize("redo_rows", [1, 2])
@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2_grouped"])
def test_grouped_redo_launch_split_into_programs_of_fewer_rows(family, redo_rows, monkeypatch):
    """The second-launch path (``IN_PLACE`` off), ``REDO_ROWS``: each flagged block of 8 rows redone as programs of
    1 or 2 rows (a row a warp, against the whole block in one 4-warp program): the oracle's selection (the tied
    rows of the test above), and the redo launched split."""
    from routelens.kernels import triton_route

    seen, launch = [], triton_route.launch

    def recorded(kernel, grid, *args, **consts):
        if kernel.fn.__name__.endswith("_redo_kernel"):
            seen.append((consts["BLOCK_T"], consts["SPLIT"], consts["num_warps"]))
        launch(kernel, grid, *args, **consts)
    monkeypatch.setattr(triton_route, "launch", recorded)
    E, n_group, topk_group, k = 256, 8, 4, 8
    g = torch.Generator().manual_seed(3)
    rule = (DeepseekV3Rule(k, n_group, topk_group, False, 1.0, torch.zeros(E)) if family == "deepseek_v3"
            else _v2_grouped(E, n_group, topk_group, k))
    z = torch.randn(36, E, generator=g) * 2
    z[::3] = torch.randint(-3, 4, (12, E), generator=g).float() / 2
    for tables in (None, _tables(E, force=[9], disable=[1, 2], bias={4: 0.5}, boost={9: 2.0})):
        _grouped_check(z, rule, tables, {"IN_PLACE": False, "REDO_ROWS": redo_rows})
    assert seen and all(s == (redo_rows, 8 // redo_rows, 1) for s in seen), seen


def _key_bucket(x: float, bits: int) -> int:
    b = int(np.float32(x).view(np.int32))
    return (b ^ ((b >> 31) & 0x7FFFFFFF)) >> bits


@interp
def test_v3_stream_near_ties_below_the_key_resolution_take_the_exact_path():
    """Choice scores one or two float32 ulps apart fall in one 32-bit key bucket, where the fast keys order by
    index: the lower expert (group) would win although its score is lower. The certificate must send these rows to
    the exact path. Planted at the pick boundary (experts 9 vs 10) and at the group boundary (groups 3 vs 5)."""
    E = 64
    base = torch.full((E,), -4.0)
    corr = torch.zeros(E)
    # picks: expert 0 is first; 9 and 10 (same logit) tie for the second place up to their correction biases
    base[0], base[9], base[10] = 3.0, 1.0, 1.0
    c9 = np.float32(1 / (1 + np.exp(np.float32(-1.0))))
    two_ulp = float(np.nextafter(np.nextafter(c9, np.float32(1)), np.float32(1)) - c9)
    corr[10] = two_ulp  # c10 = c9 + 2 ulp
    assert _key_bucket(c9, 6) == _key_bucket(float(np.float32(c9) + np.float32(corr[10])), 6)
    rule = DeepseekV3Rule(2, 8, 4, True, 1.0, corr)
    z = base.repeat(8, 1)
    _grouped_check(z, rule, None)
    from routelens.kernels.triton_route import route_kernel

    assert (route_kernel(z, rule, None, impl="stream")[1].sort(1).values == torch.tensor([0, 10])).all()
    # groups (8 of 8 experts, 2 kept, k = 4): groups 0 clearly, then 3 and 5 with scores 2 ulps apart (of 1.46)
    base = torch.full((E,), -6.0)
    base[0:2] = 4.0
    base[24:26] = 1.0
    base[40:42] = 1.0
    corr = torch.zeros(E)
    corr[41] = 2 * two_ulp
    g3 = np.float32(c9) + np.float32(c9)
    g5 = np.float32(c9) + np.float32(np.float32(c9) + np.float32(corr[41]))
    assert g5 > g3 and _key_bucket(g3, 3) == _key_bucket(g5, 3)
    rule = DeepseekV3Rule(4, 8, 2, True, 1.0, corr)  # picks 0, 1, 40, 41: clear of the rest
    z = base.repeat(8, 1)
    _grouped_check(z, rule, None)
    assert (route_kernel(z, rule, None, impl="stream")[1] // 8 != 3).all()  # group 5 kept, not 3


# -- the streamed DeepSeek-V2 group-limited kernel (triton_grouped): exact keys, certified where a bias cuts them ----

def _v2_grouped(E, n_group, topk_group, k, scaling=16.0):
    return DeepseekV2Rule(k, "group_limited_greedy", n_group, topk_group, scaling)


def _exact_rows(monkeypatch) -> list:
    """Spy on ``triton_route.launch``, the uncertain rows selected again in place (``GROUPED_IN_PLACE``): each
    streamed group-limited launch counts the rows it selected again exactly (its ``COUNT`` on, into a counter of
    the spy's); the counts in launch order."""
    from routelens.kernels import triton_route

    counts, real = [], triton_route.launch
    monkeypatch.setattr(triton_route, "GROUPED_IN_PLACE", {"deepseek_v3": True, "deepseek_v2": True})

    def spy(kernel, grid, *args, **consts):
        if kernel not in (triton_route._v2_stream_kernel, triton_route._v3_stream_kernel):
            return real(kernel, grid, *args, **consts)
        n = torch.zeros(1, dtype=torch.int32)
        args = list(args)
        args[kernel.arg_names.index("n_redo_ptr")] = n
        out = real(kernel, grid, *args, **{**consts, "COUNT": True})
        counts.append(int(n[0]))
        return out

    monkeypatch.setattr(triton_route, "launch", spy)
    return counts


@interp
def test_v2_grouped_stream_exact_ties_stay_in_the_stream(monkeypatch):
    """bf16 logits on a coarse grid: equal scores at the group and pick boundaries are true ties, which the exact
    keys order by index as the rule does, so no block leaves the stream; signed zeros tie too (-0.0 left out
    beside a +0.0 pick takes the exact path). The oracle breaks ties by lower group / expert."""
    counts = _exact_rows(monkeypatch)
    g = torch.Generator().manual_seed(11)
    for E, n_group, topk_group, k in ((256, 8, 4, 8), (64, 8, 2, 3)):
        rule = _v2_grouped(E, n_group, topk_group, k)
        z = (torch.randint(-3, 4, (32, E), generator=g).float() / 2).to(torch.bfloat16)
        counts.clear()
        _grouped_check(z, rule, None)
        _grouped_check(z, rule, _tables(E, force=[E - 1], disable=[1, 2]))
        assert counts == [0, 0], counts
    # signed zeros (each case in its own call: a block taking the exact path takes all of its rows there):
    # picks {0, 5 or 7}: -0.0 at 5 ties +0.0 at 7, the lower expert wins; groups 1 (-0.0) and 2 (+0.0) tie for
    # the second kept group: group 1 wins
    E = 64
    for lo, hi in ((5, 7), (9, 17)):
        z = torch.full((1, E), -2.0)
        z[0, 0], z[0, lo], z[0, hi] = 2.0, -0.0, 0.0
        for rule in (_v2_grouped(E, 8, 4, 2), _v2_grouped(E, 8, 2, 2)):
            _grouped_check(z.to(torch.bfloat16), rule, None)
            _grouped_check(z, rule, None)


@interp
def test_v2_grouped_stream_biased_scores_in_a_boundary_bucket_take_the_exact_path(monkeypatch):
    """A bias 2 float32 ulps above a bf16 tie puts the biased expert's score in its rival's key bucket, where the
    keys order by index: the lower (lower-scored) expert or group would win. Such blocks must go to the exact
    path; a bias clear of the boundary buckets must not send them. Planted at the pick boundary (experts 9 vs 10)
    and at the group boundary (groups 3 vs 5)."""
    counts = _exact_rows(monkeypatch)
    from routelens.kernels.triton_route import route_kernel

    E, ulp2 = 64, 2 * 2.0 ** -23
    z = torch.full((8, E), -4.0)
    z[:, 0], z[:, 9], z[:, 10] = 3.0, 1.0, 1.0
    z = z.to(torch.bfloat16)
    rule = _v2_grouped(E, 8, 4, 2)
    t = _tables(E, bias={10: ulp2})
    counts.clear()
    _grouped_check(z, rule, t)
    assert (route_kernel(z, rule, t, impl="stream")[1].sort(1).values == torch.tensor([0, 10])).all()
    assert counts[0] == 8, counts  # all 8 rows (alike)
    counts.clear()
    _grouped_check(z, rule, _tables(E, bias={30: ulp2}))  # biased, far below the boundary: stays in the stream
    assert counts == [0], counts
    # groups: 0 clearly, then 3 (experts 24, 25 at 1.0) and 5 (40 at 1.0, 41 at 1.0 + 2 ulp): 5 is kept
    z = torch.full((8, E), -6.0)
    z[:, 0:2], z[:, 24:26], z[:, 40:42] = 4.0, 1.0, 1.0
    z = z.to(torch.bfloat16)
    rule = _v2_grouped(E, 8, 2, 4)
    t = _tables(E, bias={41: ulp2})
    counts.clear()
    _grouped_check(z, rule, t)
    assert (route_kernel(z, rule, t, impl="stream")[1] // 8 != 3).all()
    assert counts[0] == 8, counts


@interp
def test_v2_grouped_stream_sums_rows_that_spread_far(monkeypatch):
    """Each thread's softmax sum moves its offset only when a chunk's best lies 16 above it: groups climbing from
    -60 to +60 across the row (an offset change in every group), a forced expert in the lowest group (force value
    = row max + δ), and more forced groups than kept ones (their +inf group scores tie: the exact path)."""
    E, k = 256, 8
    g = torch.Generator().manual_seed(3)
    z = torch.randn(16, E, generator=g) + torch.linspace(-60, 60, 8).repeat_interleave(E // 8)
    rule = _v2_grouped(E, 8, 4, k)
    _grouped_check(z, rule, None)
    _grouped_check(z, rule, _tables(E, force=[2], disable=[255], bias={100: 0.5}))
    _grouped_check(z.flip(1), rule, _tables(E, force=[2], boost={2: 3.0}))
    counts = _exact_rows(monkeypatch)
    _grouped_check(z, _v2_grouped(E, 8, 2, k), _tables(E, force=[3, 40, 200]))
    assert counts[0] == 16, counts  # every row: three forced groups for two places


@interp
@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2_grouped"])
def test_auto_streams_the_grouped_families_from_the_token_threshold(monkeypatch, family):
    """``auto`` takes the streamed group-limited kernel (and its redo launch) from its threshold (V3: tokens; V2:
    logits), the rows kernel below; both equal the reference."""
    from routelens.kernels import triton_route
    from routelens.kernels.reference import masked_route

    launched = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launched.append(grid)
            return self.kernel[grid]

    v3 = family == "deepseek_v3"
    kernel = "_v3_stream_kernel" if v3 else "_v2_stream_kernel"
    monkeypatch.setattr(triton_route, kernel, Spy(getattr(triton_route, kernel)))
    E = 64
    if v3:
        monkeypatch.setattr(triton_route, "V3_STREAM_MIN_TOKENS", 16)
    else:
        monkeypatch.setattr(triton_route, "V2_STREAM_MIN_LOGITS", 16 * E)
        monkeypatch.setattr(triton_route, "V2_STREAM_MIN_EXPERTS", E)
    rule = (DeepseekV3Rule(4, 8, 4, True, 2.5, torch.linspace(-0.1, 0.1, E)) if v3
            else _v2_grouped(E, 8, 4, 4))
    t = _tables(E, force=[3], disable=[9], bias={12: 0.5})
    for T, streamed in ((8, False), (16, True)):
        z = _distinct_logits(T, E, torch.bfloat16, seed=T)
        launched.clear()
        _assert_same(family, *triton_route.route_kernel(z, rule, t), *masked_route(z, rule, t),
                     rtol=8e-3, atol=1e-3)
        assert bool(launched) == streamed, (T, launched)
