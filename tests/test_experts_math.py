"""The instrumented experts forward: same math as the model's experts, and statistics equal to brute force."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from routelens.adapters import ExpertActivationStats, adapt, install_expert_stats
from routelens.adapters.base import MoELayer
from routelens.errors import UnsupportedModelError
from routelens.tiny import build_tiny_model

MOE_FAMILIES = (
    "olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe",
    "granitemoe", "glm4_moe", "ernie4_5_moe",
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny tensors: a second intra-op thread costs more than it saves on the shared 2-core CI box.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _experts_calls(model: nn.Module, layers: tuple[MoELayer, ...], ids, mask=None) -> dict[int, tuple]:
    """Per MoE layer: the experts' positional inputs and their output, from one model forward."""
    calls: dict[int, tuple] = {}
    handles = [
        layer.experts.register_forward_hook(
            lambda m, args, out, i=layer.index: calls.__setitem__(i, (tuple(a.clone() for a in args), out.clone())))
        for layer in layers
    ]
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return calls


def _install_all(adapter, stats=None):
    stats = stats or {layer.index: ExpertActivationStats(adapter.num_experts) for layer in adapter.moe_layers}
    handles = [install_expert_stats(layer, adapter.experts_layout, stats[layer.index]) for layer in adapter.moe_layers]
    return stats, handles


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_exact_vs_eager_and_remove_restores(family):
    model = build_tiny_model(family, experts_implementation="eager")
    a = adapt(model)
    ids = _ids(2, 12, 0)
    calls = _experts_calls(model, a.moe_layers, ids)
    with torch.no_grad():
        ref_logits = model(ids).logits
    class_forwards = {layer.index: type(layer.experts).forward for layer in a.moe_layers}
    assert all("forward" not in layer.experts.__dict__ for layer in a.moe_layers)

    stats, handles = _install_all(a)
    with torch.no_grad():
        for layer in a.moe_layers:
            args, ref_out = calls[layer.index]
            assert torch.equal(layer.experts(*args), ref_out)  # bit-identical to the eager experts
        assert torch.equal(model(ids).logits, ref_logits)
    for h in handles:
        h.remove()
        h.remove()  # idempotent

    for layer in a.moe_layers:
        assert "forward" not in layer.experts.__dict__
        assert layer.experts.forward.__func__ is class_forwards[layer.index]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_close_to_default_grouped_mm(family):
    model = build_tiny_model(family)
    assert model.config._experts_implementation == "grouped_mm"
    a = adapt(model)
    ids = _ids(2, 12, 1)
    calls = _experts_calls(model, a.moe_layers, ids)
    with torch.no_grad():
        ref_logits = model(ids).logits
    _, handles = _install_all(a)
    try:
        with torch.no_grad():
            for layer in a.moe_layers:
                args, ref_out = calls[layer.index]
                torch.testing.assert_close(layer.experts(*args), ref_out, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(model(ids).logits, ref_logits, rtol=1e-5, atol=1e-5)
    finally:
        for h in handles:
            h.remove()


# ---- statistics vs brute force ---------------------------------------------------------------------------


def _expert_math_one_token(
    experts: nn.Module, layout: str, x: torch.Tensor, e: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down_proj input, down_proj output) of expert e on ONE token, written from the layout definitions."""
    if layout == "gpt_oss":
        gate_up = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]  # [2I], interleaved
        gate = gate_up[0::2].clamp(max=experts.limit)
        up = gate_up[1::2].clamp(-experts.limit, experts.limit)
        h = (up + 1) * (gate * torch.sigmoid(gate * experts.alpha))
        return h, h @ experts.down_proj[e] + experts.down_proj_bias[e]
    inter = experts.down_proj.shape[2]
    gate_up = experts.gate_up_proj[e] @ x  # [2I]: gate rows first, then up
    h = experts.act_fn(gate_up[:inter]) * gate_up[inter:]
    return h, experts.down_proj[e] @ h


def _brute_force(layer: MoELayer, layout: str, num_experts: int, forwards) -> dict[str, list]:
    """Loop over every (valid token, slot): count, and keep the first strictly-larger |value| per expert."""
    ref = {"n": [0] * num_experts}
    for which in ("in", "out"):
        ref[which] = [(0.0, -1, -1)] * num_experts  # (max, row, channel)
    row_offset = 0
    for (hidden, idx, _w), valid in forwards:
        for t in range(hidden.shape[0]):
            if not valid[t]:
                continue
            for e in idx[t].tolist():
                ref["n"][e] += 1
                h, y = _expert_math_one_token(layer.experts, layout, hidden[t], e)
                for which, v in (("in", h), ("out", y)):
                    m, c = v.abs().max(dim=0)
                    if m.item() > ref[which][e][0] or ref[which][e][1] < 0:
                        ref[which][e] = (m.item(), row_offset + t, c.item())
        row_offset += hidden.shape[0]
    return ref


def _assert_stats_match(stats: ExpertActivationStats, ref) -> None:
    got = stats.to_numpy()
    assert got["n_tokens"].tolist() == ref["n"]
    for which in ("in", "out"):
        maxima = torch.tensor([r[0] for r in ref[which]])
        torch.testing.assert_close(torch.from_numpy(got[f"max_{which}"]), maxima, rtol=1e-5, atol=1e-7)
        assert got[f"max_{which}_row"].tolist() == [r[1] for r in ref[which]], which
        assert got[f"max_{which}_channel"].tolist() == [r[2] for r in ref[which]], which


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_stats_equal_brute_force_with_padding_and_row_offsets(family):
    model = build_tiny_model(family, experts_implementation="eager")
    a = adapt(model)
    layer = a.moe_layers[-1]
    batches = []
    for seed, (b, s) in enumerate([(2, 9), (3, 5)]):
        ids = _ids(b, s, 10 + seed)
        mask = torch.ones_like(ids)
        mask[0, : s // 2] = 0  # left-padded first sequence
        batches.append((ids, mask))

    stats = ExpertActivationStats(a.num_experts)
    handle = install_expert_stats(layer, a.experts_layout, stats)
    seen = []
    try:
        row_offset = 0
        for ids, mask in batches:
            stats.row_offset = row_offset
            stats.valid_rows = mask.reshape(-1).bool()
            capture: list[tuple] = []
            h = layer.experts.register_forward_pre_hook(lambda m, args, capture=capture: capture.append(args))
            with torch.no_grad():
                model(ids, attention_mask=mask)
            h.remove()
            seen.append((capture[0], stats.valid_rows))
            row_offset += ids.numel()
    finally:
        handle.remove()

    ref = _brute_force(layer, a.experts_layout, a.num_experts, seen)
    assert sum(ref["n"]) == a.top_k * sum(int(m.sum()) for _, m in batches)  # padding excluded
    _assert_stats_match(stats, ref)


def test_stats_without_valid_rows_count_everything_and_reset():
    model = build_tiny_model("qwen3_moe", experts_implementation="eager")
    a = adapt(model)
    layer = a.moe_layers[0]
    stats = ExpertActivationStats(a.num_experts)
    ids = _ids(2, 7, 5)
    with install_expert_stats(layer, a.experts_layout, stats):
        capture = {}
        h = layer.experts.register_forward_pre_hook(lambda m, args: capture.__setitem__("args", args))
        with torch.no_grad():
            model(ids)
        h.remove()
    assert "forward" not in layer.experts.__dict__  # the context manager removed it
    ref = _brute_force(layer, a.experts_layout, a.num_experts, [(capture["args"], torch.ones(14, dtype=torch.bool))])
    _assert_stats_match(stats, ref)
    assert int(stats.n_tokens.sum()) == 14 * a.top_k
    stats.reset()
    assert int(stats.n_tokens.sum()) == 0 and (stats.max_out_row == -1).all()


def test_stats_stay_on_device_and_have_the_documented_dtypes():
    stats = ExpertActivationStats(4, device="cpu")
    assert stats.n_tokens.dtype == torch.int64 and stats.max_out.dtype == torch.float32
    assert stats.max_in_row.dtype == torch.int64 and stats.max_in_channel.dtype == torch.int64
    assert stats.row_offset == 0 and stats.valid_rows is None


def test_install_refuses_twice_and_unknown_layouts_and_restores_a_previous_instance_forward():
    model = build_tiny_model("mixtral", experts_implementation="eager")
    a = adapt(model)
    layer = a.moe_layers[0]
    stats = ExpertActivationStats(a.num_experts)
    with pytest.raises(UnsupportedModelError) as err:
        install_expert_stats(layer, "opaque", stats)
    assert "\n" not in str(err.value)

    previous = layer.experts.forward  # someone else's instance-level patch must survive us
    layer.experts.forward = previous
    handle = install_expert_stats(layer, a.experts_layout, stats)
    with pytest.raises(RuntimeError, match="already installed"):
        install_expert_stats(layer, a.experts_layout, stats)
    handle.remove()
    assert layer.experts.__dict__["forward"] is previous
    del layer.experts.forward


def test_generic_opaque_layout_when_experts_math_is_not_the_default():
    model = build_tiny_model("granitemoe")
    for layer in model.model.layers:
        layer.block_sparse_moe.experts.has_post_expert_norm = True  # math differs from act(gate) * up -> down
    a = adapt(model)
    assert a.family == "generic" and a.experts_layout == "opaque"
    with pytest.raises(UnsupportedModelError):
        install_expert_stats(a.moe_layers[0], a.experts_layout, ExpertActivationStats(a.num_experts))
