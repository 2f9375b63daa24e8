"""Steering: the spec (file form, validation), the masked-routing reference's guarantees per family (property-tested
on random logits with ties), and steer()/remove_experts() on real tiny models of every family."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routelens.adapters import adapt
from routelens.adapters.routing import DeepseekV2Rule, DeepseekV3Rule, GptOssRule, SoftmaxTopK, SparseMixerRule
from routelens.kernels.reference import masked_route
from routelens.steering import (LayerTables, RoutingGeometry, SteeringError, SteeringSpec, active_steering,
                                remove_experts, spec_from_pairs, steer)
from routelens.store import Store
from routelens.tiny import build_tiny_model, byte_tokenizer
from routelens.tracer import TraceOptions, trace

FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe"]
GEOM = RoutingGeometry(num_layers=6, moe_layers=(1, 2, 3, 4, 5), num_experts=16, top_k=2)

ISSUE_EXAMPLE = {"rules": [
    {"layers": "all", "experts": [3], "action": "disable"},
    {"layers": [4, 5], "experts": [12, 14], "action": "force"},
    {"layers": [2], "experts": [7], "action": "boost", "value": 2.0},
    {"layers": "all", "experts": [9], "action": "bias", "value": -1.5},
]}


# -- the spec ---------------------------------------------------------------------------------------------------


def test_issue_example_resolves_to_tables():
    tables = SteeringSpec.from_dict(ISSUE_EXAMPLE).resolve(GEOM)
    assert sorted(tables.layers) == [1, 2, 3, 4, 5]
    t4 = tables.layers[4]
    assert t4.mask[3] == -1 and t4.mask[12] == 1 and t4.mask[14] == 1 and t4.bias[9] == -1.5
    assert tables.layers[2].boost[7] == 2.0 and tables.layers[4].boost[7] == 1.0
    assert tables.layers[1].mask[12] == 0


def test_file_forms_round_trip(tmp_path):
    spec = SteeringSpec.from_dict(ISSUE_EXAMPLE)
    for name in ("s.json", "s.yaml"):
        path = spec.save(tmp_path / name)
        again = SteeringSpec.load(path)
        assert again == spec
    (tmp_path / "range.json").write_text(json.dumps({"rules": [{"layers": "2-4", "experts": 1, "action": "disable"}]}))
    assert SteeringSpec.load(tmp_path / "range.json").rules[0].layers == (2, 3, 4)


@pytest.mark.parametrize("rules, message", [
    ([{"layers": [9], "experts": [1], "action": "disable"}], "layer 9 is out of range"),
    ([{"layers": [0], "experts": [1], "action": "disable"}], "layer 0 is dense"),
    ([{"layers": "all", "experts": [16], "action": "disable"}], "expert 16 is out of range"),
    ([{"layers": [1], "experts": [2], "action": "force"}, {"layers": "all", "experts": [2], "action": "disable"}],
     "layer 1, expert 2 is both forced and disabled"),
    ([{"layers": [3], "experts": [1, 2, 5], "action": "force"}], "layer 3 forces 3 experts [1, 2, 5] but only k=2"),
    ([{"layers": [1], "experts": [1], "action": "zap"}], "unknown action 'zap'"),
    ([{"layers": [1], "experts": [1], "action": "boost"}], "needs a finite numeric \"value\""),
    ([{"layers": [1], "experts": [1], "action": "boost", "value": 0}], "boost value must be > 0"),
    ([{"layers": [1], "experts": [], "action": "disable"}], "experts must be a non-empty list"),
    ([{"layers": [1], "experts": list(range(15)), "action": "disable"}], "leaving fewer than k=2"),
    ([{"layers": [1], "action": "disable"}], "missing 'experts'"),
])
def test_validation_messages_are_one_line(rules, message):
    with pytest.raises(SteeringError) as err:
        SteeringSpec.from_dict({"rules": rules}).resolve(GEOM)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_malformed_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{rules: [")
    with pytest.raises(SteeringError, match="not valid JSON"):
        SteeringSpec.load(bad)
    with pytest.raises(SteeringError, match="does not exist"):
        SteeringSpec.load(tmp_path / "missing.json")
    bad.write_text(json.dumps({"rulez": []}))
    with pytest.raises(SteeringError, match="\"rules\""):
        SteeringSpec.load(bad)


def test_group_limited_routers_check_groups():
    geom = RoutingGeometry(num_layers=2, moe_layers=(1,), num_experts=16, top_k=2, groups=(4, 1, 2))
    with pytest.raises(SteeringError, match="forces experts in 2 groups"):
        SteeringSpec.from_dict({"rules": [{"layers": [1], "experts": [0, 5], "action": "force"}]}).resolve(geom)
    # keep only one enabled expert per group: no group has the two finite scores its group score needs
    off = [e for e in range(16) if e % 4 != 0]
    with pytest.raises(SteeringError, match="kept groups"):
        SteeringSpec.from_dict({"rules": [{"layers": [1], "experts": off, "action": "disable"}]}).resolve(geom)


def test_spec_from_pairs_groups_by_layer():
    spec = spec_from_pairs([(2, 5), (1, 3), (2, 4)], "disable", name="x")
    assert [r.to_dict() for r in spec.rules] == [
        {"layers": [1], "experts": [3], "action": "disable"}, {"layers": [2], "experts": [4, 5], "action": "disable"}]


# -- the reference's guarantees, per family -------------------------------------------------------------------------


def _rules(E: int, k: int):
    g = torch.Generator().manual_seed(E * 31 + k)
    return {
        "softmax_renorm": SoftmaxTopK(k, renormalize=True),
        "softmax_raw": SoftmaxTopK(k, renormalize=False),
        "mixtral": SoftmaxTopK(k, renormalize=True, weights_in_logits_dtype=False),
        "deepseek_v3": DeepseekV3Rule(k, n_group=4, topk_group=2, renormalize=True, scaling=2.5,
                                      correction_bias=torch.randn(E, generator=g) * 0.1),
        "deepseek_v2_greedy": DeepseekV2Rule(k, "greedy", None, None, scaling=1.0),
        "deepseek_v2_group": DeepseekV2Rule(k, "group_limited_greedy", 4, 2, scaling=1.0),
        "gpt_oss": GptOssRule(k),
        "phimoe": SparseMixerRule(k, jitter_eps=0.01),
    }


NORMALISED = {"softmax_renorm": 1.0, "mixtral": 1.0, "deepseek_v3": 2.5, "gpt_oss": 1.0}


@st.composite
def _case(draw):
    E, k = draw(st.sampled_from([(8, 2), (16, 2), (16, 4)]))
    T = draw(st.integers(1, 12))
    levels = draw(st.sampled_from([3, 8, 1000]))  # few levels = many exact ties
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    logits = torch.tensor(rng.integers(0, levels, size=(T, E)) / levels * 4 - 2, dtype=torch.float32)
    per = E // 4
    # a valid table: up to 2 disabled, forced experts (<= k) within the first two groups, boost and bias
    experts = rng.permutation(E)
    n_dis = int(rng.integers(0, 3))
    disabled = experts[:n_dis]
    candidates = [e for e in range(2 * per) if e not in disabled]
    forced = rng.choice(candidates, size=int(rng.integers(0, k + 1)), replace=False)
    t = LayerTables.neutral(E)
    t.mask[disabled] = -1
    t.mask[forced] = 1
    if draw(st.booleans()):
        t.boost[rng.integers(0, E)] = float(rng.uniform(0.5, 3))
        t.renormalize = draw(st.booleans())
    if draw(st.booleans()):
        t.bias[rng.integers(0, E)] = float(rng.normal())
    return E, k, logits, t, draw(st.sampled_from([torch.float32, torch.bfloat16]))


@settings(max_examples=120, deadline=None)
@given(_case())
def test_disabled_never_forced_always_weights_normalised(case):
    E, k, logits, tables, dtype = case
    logits = logits.to(dtype)
    for name, rule in _rules(E, k).items():
        w, idx = masked_route(logits, rule, tables)
        sel = idx.tolist()
        for row in sel:
            assert len(set(row)) == k, name
            assert not set(row) & set(np.flatnonzero(tables.mask < 0).tolist()), (name, row)
            assert set(np.flatnonzero(tables.mask > 0).tolist()) <= set(row), (name, row)
        assert torch.isfinite(w.float()).all(), name
        if name in NORMALISED and (not tables.has_boost or tables.renormalize):
            want = NORMALISED[name]
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
            assert torch.allclose(w.float().sum(-1), torch.full((w.shape[0],), want), atol=tol * want), name


@settings(max_examples=60, deadline=None)
@given(_case())
def test_neutral_tables_are_the_rule_bit_for_bit(case):
    E, k, logits, _, dtype = case
    logits = logits.to(dtype)
    for name, rule in _rules(E, k).items():
        w0, i0 = rule(logits)
        w1, i1 = masked_route(logits, rule, LayerTables.neutral(E))
        assert torch.equal(i0, i1) and torch.equal(w0, w1) and w0.dtype == w1.dtype, name


def test_force_is_steermoe_override_by_hand():
    # SteerMoE (src/utils.py::steer_moe): s = log_softmax(z); s[forced] = max(s) + 0.01; softmax -> top-k -> renorm.
    z = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    t = LayerTables.neutral(4)
    t.mask[3] = 1
    w, idx = masked_route(z, SoftmaxTopK(2, renormalize=True), t)
    s = torch.log_softmax(z, -1)[0]
    s[3] = s.max() + 0.01
    p = torch.softmax(s, -1)
    # expert 3 (score max+δ) and expert 0 (max) are chosen; renormalised weights p3/(p3+p0), p0/(p3+p0)
    assert idx[0].tolist() == [3, 0]
    assert torch.allclose(w[0], torch.stack([p[3], p[0]]) / (p[3] + p[0]))
    assert abs(float(w[0, 0]) - float(np.exp(0.01) / (1 + np.exp(0.01)))) < 1e-6  # e^δ/(1+e^δ), by hand


def test_bias_and_boost_by_hand():
    z = torch.tensor([[1.0, 0.0, 0.5]])
    t = LayerTables.neutral(3)
    t.bias[0] = -2.0  # z' = [-1, 0, 0.5]: top-2 = experts 2, 1
    t.boost[1] = 3.0
    w, idx = masked_route(z, SoftmaxTopK(2, renormalize=True), t)
    p2, p1 = np.exp(0.5), np.exp(0.0)
    assert idx[0].tolist() == [2, 1]
    np.testing.assert_allclose(w[0].numpy(), [p2 / (p1 + p2), 3 * p1 / (p1 + p2)], rtol=1e-6)
    t.renormalize = True  # rescaled back to the original sum 1: [p2, 3 p1] / (p2 + 3 p1)
    w, _ = masked_route(z, SoftmaxTopK(2, renormalize=True), t)
    np.testing.assert_allclose(w[0].numpy(), [p2 / (p2 + 3 * p1), 3 * p1 / (p2 + 3 * p1)], rtol=1e-6)
    t = LayerTables.neutral(3)
    t.bias_abs[1] = 2.0  # conctsai z + λ·s·|z| with z_1 = 0: no change; on expert 0: 1 + 2·1 = 3
    t.bias_abs[0] = 2.0
    _, idx = masked_route(z, GptOssRule(1), t)
    assert idx[0].tolist() == [0]


def test_deepseek_v3_disable_beats_correction_bias():
    # the correction bias alone would pick expert 0 (bias 10); a disable must hold after the bias
    rule = DeepseekV3Rule(1, n_group=1, topk_group=1, renormalize=False, scaling=1.0,
                          correction_bias=torch.tensor([10.0, 0.0, 0.0, 0.0]))
    z = torch.tensor([[-5.0, 1.0, 0.0, 0.0]])
    assert rule(z)[1].item() == 0
    t = LayerTables.neutral(4)
    t.mask[0] = -1
    w, idx = masked_route(z, rule, t)
    assert idx.item() == 1 and abs(w.item() - torch.sigmoid(torch.tensor(1.0)).item()) < 1e-7


# -- on models -----------------------------------------------------------------------------------------------------


def _executed(model, adapter, fn):
    got = {}
    hooks = [l.experts.register_forward_pre_hook(
        lambda m, a, kw, li=l.index: got.__setitem__(li, (a[1] if len(a) > 1 else next(iter(kw.values()))).clone()),
        with_kwargs=True) for l in adapter.moe_layers]
    try:
        out = fn()
    finally:
        for h in hooks:
            h.remove()
    return out, got


@pytest.mark.parametrize("family", FAMILIES)
def test_steer_on_every_family(family):
    model = build_tiny_model(family)
    adapter = adapt(model)
    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
        with steer(model, {"rules": []}):
            assert torch.equal(model(ids).logits, base)  # empty spec: bit-identical
        spec = {"rules": [{"layers": "all", "experts": [0], "action": "disable"},
                          {"layers": "all", "experts": [1], "action": "force"}]}
        with steer(model, spec, backend="torch") as handle:
            out, got = _executed(model, adapter, lambda: model(ids).logits)
        assert active_steering(model) is None
        for layer, idx in got.items():
            assert not (idx == 0).any() and (idx == 1).any(-1).all(), (family, layer)
        assert not torch.equal(out, base)
        assert sum(handle.calls.values()) == 20 * len(adapter.moe_layers)
        assert torch.equal(model(ids).logits, base)  # hooks removed
        # generate works under steering, every decode step re-routed
        with steer(model, spec):
            _, got = _executed(model, adapter, lambda: model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False))
        assert all(not (idx == 0).any() for idx in got.values())


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_remove_experts_is_weights_only_and_reversible(family):
    model = build_tiny_model(family)
    adapter = adapt(model)
    layer = adapter.moe_layers[0]
    ids = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(2))
    before = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        base, got0 = _executed(model, adapter, lambda: model(ids).logits)
        expert = int(got0[layer.index][0, 0])
        with remove_experts(model, [(layer.index, expert)]):
            assert not layer.experts.down_proj[expert].any()
            out, got1 = _executed(model, adapter, lambda: model(ids).logits)
        # the router is untouched: the first MoE layer routes exactly as before, yet the output changes
        assert torch.equal(got0[layer.index], got1[layer.index])
        assert not torch.equal(out, base)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_traced_steered_run_records_its_spec(tmp_path):
    model, tok = build_tiny_model("qwen3_moe"), byte_tokenizer()
    store = Store.open(tmp_path / "s.duckdb")
    spec = SteeringSpec.from_dict({"rules": [{"layers": "all", "experts": [2], "action": "disable"}], "name": "no-e2"})
    base = trace(model, tok, ["hello world", "routing"], store=store, name="base")
    with steer(model, spec):
        steered = trace(model, tok, ["hello world", "routing"], store=store, name="steered",
                        options=TraceOptions(max_new_tokens=3))
    assert base.info.steering is None
    assert store.run("steered").info.steering == spec.to_dict()
    n = store.sql("SELECT count(*) AS n FROM routing WHERE run_id = ? AND expert = 2", [steered.info.run_id])["n"][0]
    assert n == 0
    assert store.sql("SELECT count(*) AS n FROM routing WHERE run_id = ? AND expert = 2", [base.info.run_id])["n"][0] > 0


def test_generic_family_refused_clearly():
    model = build_tiny_model("granitemoe")
    with pytest.raises(Exception, match="generic adapter"):
        with steer(model, {"rules": [{"layers": "all", "experts": [0], "action": "disable"}]}):
            pass


@pytest.mark.parametrize("family", FAMILIES)
def test_steered_router_computes_the_routers_own_logits(family):
    # steer() replaces the router's forward; the logits it returns must be the router's own, bit for bit
    from routelens.steering.apply import FP32_ROUTERS, router_logits

    model = build_tiny_model(family)
    adapter = adapt(model)
    # 2-D, as every MoE block hands it to its router (gpt-oss's router does not reshape by itself)
    h = torch.randn(10, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for layer in adapter.moe_layers:
        own = layer.router(h)[0]
        assert torch.equal(router_logits(layer.router, h, adapter.family in FP32_ROUTERS), own), family


def test_nested_steer_blocks_compose_and_unwind():
    model = build_tiny_model("olmoe")
    adapter = adapt(model)
    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = model(ids).logits
        with steer(model, {"rules": [{"layers": "all", "experts": [0], "action": "disable"}]}):
            outer = model(ids).logits
            with steer(model, {"rules": [{"layers": "all", "experts": [1], "action": "disable"}]}):
                _, got = _executed(model, adapter, lambda: model(ids).logits)
                assert active_steering(model)["composed"][1]["rules"][0]["experts"] == [1]
            assert all(not ((idx == 0) | (idx == 1)).any() for idx in got.values())  # both rules hold inside
            assert torch.equal(model(ids).logits, outer)  # leaving restores the enclosing steering
            with pytest.raises(SteeringError, match="both forced and disabled"):
                with steer(model, {"rules": [{"layers": "all", "experts": [0], "action": "force"}]}):
                    pass
            assert torch.equal(model(ids).logits, outer)
        assert torch.equal(model(ids).logits, base)
        assert all("forward" not in l.router.__dict__ for l in adapter.moe_layers)
