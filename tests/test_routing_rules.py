"""Routing rules: hand-computed cases per rule, and bit-equality with the real transformers router modules."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.models.phimoe.modeling_phimoe import sparsemixer

from routelens.adapters import (
    DeepseekV2Rule,
    DeepseekV3Rule,
    GptOssRule,
    RoutingRule,
    SoftmaxTopK,
    SparseMixerRule,
    adapt,
    sort_by_weight,
)
from routelens.tiny import build_tiny_model

INF = float("inf")


def by_index(weights: torch.Tensor, indices: torch.Tensor) -> list[dict[int, float]]:
    """Per row {expert: weight}: order-free view of an unsorted (DeepSeek) router output."""
    return [dict(zip(i.tolist(), w.tolist(), strict=True)) for w, i in zip(weights, indices, strict=True)]


def logit(p: list[float]) -> torch.Tensor:
    """Inverse sigmoid, so sigmoid(logit(p)) == p up to rounding."""
    t = torch.tensor(p, dtype=torch.float64)
    return torch.log(t / (1 - t)).float()


# ---- hand-computed cases ------------------------------------------------------------------------------


def test_softmax_topk_by_hand():
    # probs row 0 = [.1 .2 .3 .4], row 1 = [.5 .1 .3 .1]
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 3.0, 1.0]]))
    w, i = SoftmaxTopK(2, renormalize=False)(logits)
    assert i.tolist() == [[3, 2], [0, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.3], [0.5, 0.3]]))
    w, i = SoftmaxTopK(2, renormalize=True)(logits)
    assert i.tolist() == [[3, 2], [0, 2]]
    torch.testing.assert_close(w, torch.tensor([[4 / 7, 3 / 7], [5 / 8, 3 / 8]]))


def test_softmax_topk_dtypes():
    logits = torch.randn(5, 8).bfloat16()
    w, _ = SoftmaxTopK(2, renormalize=True)(logits)
    assert w.dtype == torch.bfloat16  # OLMoE/Qwen cast back to the logits dtype
    w, _ = SoftmaxTopK(2, renormalize=True, weights_in_logits_dtype=False)(logits)
    assert w.dtype == torch.float32  # Mixtral keeps float32


def test_deepseek_v3_by_hand_bias_changes_choice_and_masks_a_group():
    # 8 experts in 2 groups {0..3} {4..7}; keep 1 group; top-2; renormalise; x2.
    bias = torch.tensor([0.0, 0, 0, 0, 0.5, 0, 0, 0])
    rule = DeepseekV3Rule(k=2, n_group=2, topk_group=1, renormalize=True, scaling=2.0, correction_bias=bias)
    scores = [
        # row 0: unbiased, group 0 wins (0.9+0.8=1.7 > 0.7+0.6=1.3) -> {0, 1}. With the bias expert 4 scores
        # 1.2 for the choice, group 1 wins (1.2+0.6=1.8), and group 0 -- holding the best expert 0 -- is masked.
        [0.9, 0.8, 0.1, 0.1, 0.7, 0.6, 0.5, 0.1],
        # row 1: group 1 wins either way; the bias swaps expert 6 (0.6) for expert 4 (0.3+0.5=0.8).
        [0.1, 0.1, 0.1, 0.1, 0.3, 0.9, 0.6, 0.1],
    ]
    w, i = rule(logit(scores))
    got = by_index(w, i)
    # weights are the UNBIASED sigmoid scores, renormalised, times the scaling
    assert got[0].keys() == {4, 5}
    assert got[0][4] == pytest.approx(2 * 0.7 / 1.3) and got[0][5] == pytest.approx(2 * 0.6 / 1.3)
    assert got[1].keys() == {5, 4}
    assert got[1][5] == pytest.approx(2 * 0.9 / 1.2) and got[1][4] == pytest.approx(2 * 0.3 / 1.2)

    unbiased = DeepseekV3Rule(2, 2, 1, True, 2.0, torch.zeros(8))
    got0 = by_index(*unbiased(logit(scores)))
    assert got0[0].keys() == {0, 1} and got0[1].keys() == {5, 6}


def test_deepseek_v3_no_renorm():
    rule = DeepseekV3Rule(k=2, n_group=1, topk_group=1, renormalize=False, scaling=2.5, correction_bias=torch.zeros(4))
    got = by_index(*rule(logit([[0.2, 0.9, 0.4, 0.5]])))[0]
    assert got.keys() == {1, 3} and got[1] == pytest.approx(2.25) and got[3] == pytest.approx(1.25)


def test_deepseek_v3_mask_applies_after_correction_bias():
    bias = torch.tensor([2.0, 0, 0, 0])
    rule = DeepseekV3Rule(k=2, n_group=1, topk_group=1, renormalize=True, scaling=1.0, correction_bias=bias)
    logits = logit([[0.5, 0.6, 0.7, 0.2]])
    masked_logits = logits.clone()
    masked_logits[:, 0] = -INF  # sigmoid -> 0, but 0 + bias 2.0 still wins the choice
    assert 0 in rule(masked_logits)[1][0].tolist()
    mask = torch.tensor([-INF, 0, 0, 0])
    _, idx = rule(logits, choice_bias=mask)
    assert sorted(idx[0].tolist()) == [1, 2]


def test_deepseek_v2_greedy_by_hand():
    rule = DeepseekV2Rule(k=2, method="greedy", n_group=None, topk_group=None, scaling=1.5)
    got = by_index(*rule(torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))))[0]
    assert got.keys() == {3, 2} and got[3] == pytest.approx(0.6) and got[2] == pytest.approx(0.45)


def test_deepseek_v2_group_limited_by_hand():
    probs = torch.tensor([[0.30, 0.10, 0.04, 0.01, 0.25, 0.20, 0.05, 0.05]])
    rule = DeepseekV2Rule(k=2, method="group_limited_greedy", n_group=2, topk_group=1, scaling=1.0)
    got = by_index(*rule(torch.log(probs)))[0]
    # group maxima 0.30 vs 0.25: only group 0 is kept, so expert 1 (0.10) beats expert 4 (0.25)
    assert got.keys() == {0, 1} and got[0] == pytest.approx(0.30) and got[1] == pytest.approx(0.10)
    greedy = by_index(*DeepseekV2Rule(2, "greedy", None, None, 1.0)(torch.log(probs)))[0]
    assert greedy.keys() == {0, 4}
    with pytest.raises(ValueError):
        DeepseekV2Rule(2, "group_limited_greedy", None, None, 1.0)


def test_gpt_oss_softmax_over_the_k_only():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, 0.5 + math.log(3.0), -1.0, 0.0]])
    w, i = GptOssRule(2)(logits)
    assert i.tolist() == [[1, 2], [1, 0]]
    e = math.e
    torch.testing.assert_close(w, torch.tensor([[e / (e + 1), 1 / (e + 1)], [0.75, 0.25]]))


def test_sparsemixer_by_hand_jitter_mask_matters():
    eps = 0.01  # drop experts whose relative gap to the round's max exceeds 2 * eps = 0.02
    logits = torch.tensor([[2.0, 1.99, 1.0, 0.0], [1.0, 0.995, 0.99, -5.0]])
    w, i = SparseMixerRule(2, jitter_eps=eps)(logits)
    assert i.tolist() == [[0, 1], [0, 1]]
    # row 0, round 0: experts 2, 3 are jitter-masked, softmax over {2.0, 1.99}; round 1: only 1.99 survives
    # (expert 0 is taken, 2 and 3 masked), so the second weight is 1 and exceeds the first.
    r0 = [1 / (1 + math.exp(-0.01)), 1.0]
    # row 1: all of 0..2 are within 2% of the max in both rounds
    a, b, c = math.exp(1.0), math.exp(0.995), math.exp(0.99)
    r1 = [a / (a + b + c), b / (b + c)]
    torch.testing.assert_close(w, torch.tensor([r0, r1]))
    # without jitter masking the weights are plain softmaxes over the remaining experts
    w_nomask, _ = SparseMixerRule(2, jitter_eps=10.0)(logits)
    assert w_nomask[0, 1] < 1.0
    ref_w, ref_i = sparsemixer(logits, jitter_eps=eps, training=False, top_k=2)
    assert torch.equal(w, ref_w) and torch.equal(i, ref_i)


def test_sort_by_weight_is_stable_and_descending():
    w = torch.tensor([[0.25, 0.5, 0.25, 0.125], [1.0, 1.0, 0.0, 3.0]])
    i = torch.tensor([[7, 3, 5, 1], [4, 2, 6, 0]])
    sw, si = sort_by_weight(w, i)
    assert sw.tolist() == [[0.5, 0.25, 0.25, 0.125], [3.0, 1.0, 1.0, 0.0]]
    assert si.tolist() == [[3, 7, 5, 1], [0, 4, 2, 6]]  # ties keep the router's order


@pytest.mark.parametrize(
    "rule",
    [
        SoftmaxTopK(2, True),
        SoftmaxTopK(2, False),
        DeepseekV3Rule(2, 2, 1, True, 2.5, torch.randn(8) * 0.1),
        DeepseekV2Rule(2, "greedy", None, None, 1.0),
        DeepseekV2Rule(2, "group_limited_greedy", 2, 1, 1.0),
        GptOssRule(2),
        SparseMixerRule(2, 0.01),
    ],
    ids=lambda r: type(r).__name__,
)
def test_choice_bias_minus_inf_masks_an_expert(rule: RoutingRule):
    assert isinstance(rule, RoutingRule)
    logits = torch.randn(16, 8)
    _, idx = rule(logits)
    banned = int(torch.mode(idx[:, 0]).values)  # the most popular first choice
    mask = torch.zeros(8)
    mask[banned] = -INF
    w, idx = rule(logits, choice_bias=mask)
    assert not (idx == banned).any()
    assert torch.isfinite(w).all()


# ---- bit-equality with the real router modules ----------------------------------------------------------

FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe")
HIDDEN = 64
E = 8


def _router_with_identity_weight(family: str, dtype: torch.dtype = torch.float32, **overrides):
    """The family's real router module with W = [I | 0], so its logits are exactly x[:, :E]."""
    model = build_tiny_model(family, **overrides).to(dtype)
    layer = adapt(model).moe_layers[0]
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :E] = torch.eye(E, dtype=dtype)
        if getattr(layer.router, "bias", None) is not None:
            layer.router.bias.zero_()
    return layer


ROUTERS = {
    "olmoe": {},
    "olmoe_renorm": dict(norm_topk_prob=True),
    "qwen2_moe": {},
    "qwen3_moe": {},
    "qwen3_moe_renorm": dict(norm_topk_prob=True),
    "mixtral": {},
    "deepseek_v2": {},
    "deepseek_v2_group": dict(topk_method="group_limited_greedy", n_group=2, topk_group=1),
    "deepseek_v3": {},
    "deepseek_v3_k3_groups4": dict(n_group=4, topk_group=2, top_k=3, routed_scaling_factor=1.7),
    "gpt_oss": {},
    "phimoe": {},
}


@pytest.fixture(scope="module")
def routers():
    out = {}
    for name, overrides in ROUTERS.items():
        family = next(f for f in FAMILIES if name.startswith(f))
        out[name] = _router_with_identity_weight(family, **overrides)
    return out


# Few distinct values -> many exact ties inside and across experts; plus arbitrary floats.
_value = st.one_of(
    st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0]),
    st.floats(-6.0, 6.0, allow_nan=False, width=32),
)
_logits = st.integers(1, 6).flatmap(
    lambda t: st.lists(st.lists(_value, min_size=E, max_size=E), min_size=t, max_size=t)
)


def _assert_rule_matches_router(layer, logits_rows: torch.Tensor) -> None:
    x = torch.zeros(logits_rows.shape[0], HIDDEN, dtype=logits_rows.dtype)
    x[:, :E] = logits_rows
    with torch.no_grad():
        logits, w, idx = layer.router(x)
        assert torch.equal(logits.to(logits_rows.dtype), logits_rows)  # the identity weight really is exact
        rw, ri = layer.rule(logits)
    assert torch.equal(ri, idx), (ri, idx)
    assert rw.dtype == w.dtype
    assert torch.equal(rw, w), (rw, w)


@pytest.mark.parametrize("name", list(ROUTERS))
# database=None: no .hypothesis/ folder in the repo; derandomize: the same examples on every run and in CI
@settings(max_examples=30, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_logits)
def test_rule_equals_router_module(routers, name, rows):
    _assert_rule_matches_router(routers[name], torch.tensor(rows, dtype=torch.float32))


@pytest.mark.parametrize("name", list(ROUTERS))
def test_rule_equals_router_module_all_tied(routers, name):
    # every logit equal: pure tie-breaking
    _assert_rule_matches_router(routers[name], torch.zeros(3, E))
    _assert_rule_matches_router(routers[name], torch.ones(3, E))


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "phimoe"])
def test_rule_equals_router_module_bfloat16(family):
    overrides = dict(norm_topk_prob=True) if family == "qwen3_moe" else {}
    layer = _router_with_identity_weight(family, torch.bfloat16, **overrides)
    gen = torch.Generator().manual_seed(1)
    _assert_rule_matches_router(layer, torch.randn(32, E, generator=gen).bfloat16())


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_rule_equals_router_on_random_weights(family):
    """Same check with the model's own random router weights and realistic hidden states."""
    layer = adapt(build_tiny_model(family)).moe_layers[0]
    x = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, w, idx = layer.router(x)
        rw, ri = layer.rule(logits)
    assert torch.equal(rw, w) and torch.equal(ri, idx)
