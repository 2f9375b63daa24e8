"""Adapters on tiny random-init models of every family: structure, and that the captured routing is the model's."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from routelens.adapters import SUPPORTED_FAMILIES, ModelAdapter, adapt, router_output, sort_by_weight
from routelens.errors import UnsupportedModelError
from routelens.tiny import BOS_ID, EOS_ID, PAD_ID, TINY_FAMILIES, build_tiny_model, byte_tokenizer


@dataclass(frozen=True)
class Expect:
    family: str
    moe: tuple[int, ...]
    dense: tuple[int, ...]
    num_experts: int
    top_k: int
    n_shared: int
    layout: str
    sorted: bool
    overrides: tuple[tuple[str, object], ...] = ()


CASES: dict[str, tuple[str, Expect]] = {
    "olmoe": ("olmoe", Expect("olmoe", (0, 1), (), 8, 2, 0, "gate_up_fused", True)),
    "qwen2_moe_sparse_step": (
        "qwen2_moe",
        Expect("qwen2_moe", (1, 3), (0, 2), 8, 2, 1, "gate_up_fused", True,
               (("num_layers", 4), ("decoder_sparse_step", 2))),
    ),
    "qwen3_moe_mlp_only": (
        "qwen3_moe",
        Expect("qwen3_moe", (0, 2), (1,), 8, 2, 0, "gate_up_fused", True,
               (("num_layers", 3), ("mlp_only_layers", [1]), ("norm_topk_prob", True))),
    ),
    "mixtral": ("mixtral", Expect("mixtral", (0, 1), (), 8, 2, 0, "gate_up_fused", True)),
    "deepseek_v2": ("deepseek_v2", Expect("deepseek_v2", (1,), (0,), 8, 2, 1, "gate_up_fused", False)),
    "deepseek_v3": (
        "deepseek_v3",
        Expect("deepseek_v3", (1, 2), (0,), 8, 3, 1, "gate_up_fused", False, (("num_layers", 3), ("top_k", 3))),
    ),
    "gpt_oss": ("gpt_oss", Expect("gpt_oss", (0, 1, 2), (), 4, 2, 0, "gpt_oss", True,
                                  (("num_layers", 3), ("num_experts", 4)))),
    "phimoe": ("phimoe", Expect("phimoe", (0, 1), (), 8, 2, 0, "gate_up_fused", False)),
    "granitemoe": ("granitemoe", Expect("generic", (0, 1), (), 8, 2, 0, "gate_up_fused", False)),
    "glm4_moe": ("glm4_moe", Expect("generic", (1,), (0,), 8, 2, 1, "gate_up_fused", False)),
    "ernie4_5_moe": ("ernie4_5_moe", Expect("generic", (0, 1), (), 8, 2, 1, "gate_up_fused", False)),
}


def _build(case: str) -> tuple[nn.Module, Expect]:
    family, expect = CASES[case]
    return build_tiny_model(family, **dict(expect.overrides)), expect


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_structure(case):
    model, x = _build(case)
    a = adapt(model)
    assert isinstance(a, ModelAdapter)
    assert a.family == x.family and a.family in SUPPORTED_FAMILIES
    assert a.architecture == type(model).__name__
    assert a.moe_layer_indices == x.moe and a.dense_layers == x.dense
    assert a.num_layers == len(x.moe) + len(x.dense) == len(a.decoder_layers)
    assert a.decoder_layers is model.model.layers
    assert (a.num_experts, a.top_k, a.n_shared_experts) == (x.num_experts, x.top_k, x.n_shared)
    assert a.experts_layout == x.layout and a.router_output_sorted == x.sorted
    for layer in a.moe_layers:
        decoder_layer = model.model.layers[layer.index]
        assert any(layer.block is child for child in decoder_layer.children())
        assert layer.router in (getattr(layer.block, "gate", None), getattr(layer.block, "router", None))
        assert layer.experts is layer.block.experts
        assert (layer.shared_experts is not None) == (x.n_shared > 0)
        assert (layer.rule is None) == (x.family == "generic")
        assert layer.experts.down_proj.shape[0] == x.num_experts
    # the base model adapts to the same layers
    base = adapt(model.model)
    assert base.moe_layer_indices == x.moe and base.architecture == type(model.model).__name__
    assert base.moe_layers[0].router is a.moe_layers[0].router


def _trace(model: nn.Module, a: ModelAdapter, ids: torch.Tensor, mask: torch.Tensor | None = None):
    """Router outputs (forward hooks) and experts inputs (forward pre-hooks) of one forward."""
    routed: dict[int, tuple] = {}
    executed: dict[int, tuple] = {}
    handles = []
    for layer in a.moe_layers:
        handles.append(layer.router.register_forward_hook(
            lambda m, args, out, i=layer.index: routed.__setitem__(i, router_output(out, a.moe_layers[0]))))
        handles.append(layer.experts.register_forward_pre_hook(
            lambda m, args, i=layer.index: executed.__setitem__(i, args)))
    try:
        with torch.no_grad():
            out = model(ids, attention_mask=mask, output_router_logits=True)
    finally:
        for h in handles:
            h.remove()
    return out, routed, executed


@pytest.mark.parametrize("case", list(CASES))
def test_captured_routing_is_the_models(case):
    model, x = _build(case)
    a = adapt(model)
    ids = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: padded rows are routed too
    out, routed, executed = _trace(model, a, ids, mask)
    assert len(out.router_logits) == len(a.moe_layers)  # one entry per sparse layer only
    for j, layer in enumerate(a.moe_layers):
        logits, w, idx = routed[layer.index]
        T = ids.numel()
        assert logits.shape == (T, a.num_experts) and w.shape == idx.shape == (T, a.top_k)
        assert idx.dtype == torch.int64
        assert torch.equal(out.router_logits[j], logits)
        _, exec_idx, exec_w = executed[layer.index]
        assert torch.equal(exec_idx, idx) and torch.equal(exec_w, w)
        if layer.rule is not None:
            rw, ri = layer.rule(logits)
            assert torch.equal(ri, idx) and torch.equal(rw, w)
        if a.router_output_sorted:
            assert torch.equal(sort_by_weight(w, idx)[1], idx)


def test_deepseek_router_output_is_not_weight_sorted():
    """Why the tracer must sort: DeepSeek's topk(sorted=False) returns ranks out of weight order."""
    model = build_tiny_model("deepseek_v3", num_experts=16, top_k=4, n_group=4, topk_group=2)
    a = adapt(model)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    _, routed, _ = _trace(model, a, ids)
    _, w, idx = routed[a.moe_layers[0].index]
    sw, si = sort_by_weight(w, idx)
    assert (sw[:, :-1] >= sw[:, 1:]).all()
    assert not torch.equal(si, idx)
    assert torch.equal(si.sort(-1).values, idx.sort(-1).values)


def test_phimoe_top_k_is_two_whatever_the_config():
    a = adapt(build_tiny_model("phimoe", top_k=3))
    assert a.top_k == 2 and a.moe_layers[0].rule.k == 2


def test_deepseek_v3_rule_is_bound_to_the_layer_bias():
    model = build_tiny_model("deepseek_v3")
    layer = adapt(model).moe_layers[0]
    assert layer.rule.correction_bias is layer.router.e_score_correction_bias
    assert layer.rule.correction_bias.abs().sum() > 0  # tiny builder makes the bias matter


# ---- refusals ------------------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def test_dense_model_is_refused():
    with pytest.raises(UnsupportedModelError) as err:
        adapt(build_tiny_model("llama"))
    msg = _one_line(err)
    assert "LlamaForCausalLM has no Mixture-of-Experts layers" in msg
    assert all(f in msg for f in ("olmoe", "qwen3_moe", "deepseek_v3", "gpt_oss", "phimoe"))


def test_unmatched_moe_architecture_is_refused():
    from transformers import JetMoeConfig, JetMoeForCausalLM

    cfg = JetMoeConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, kv_channels=16, num_local_experts=4, num_experts_per_tok=2,
                       intermediate_size=128)
    with pytest.raises(UnsupportedModelError) as err:
        adapt(JetMoeForCausalLM(cfg))
    msg = _one_line(err)
    assert "no routelens adapter matches the MoE architecture JetMoeForCausalLM" in msg and "olmoe" in msg


def test_llama4_is_refused_with_the_reason():
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = Llama4TextConfig(vocab_size=512, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           num_local_experts=4, num_experts_per_tok=1, moe_layers=[1],
                           layer_types=["chunked_attention", "full_attention"])
    with pytest.raises(UnsupportedModelError) as err:
        adapt(Llama4ForCausalLM(cfg))
    msg = _one_line(err)
    assert "Llama4ForCausalLM" in msg and "not supported" in msg and "(scores, logits)" in msg


def test_non_transformers_module_is_refused():
    with pytest.raises(UnsupportedModelError) as err:
        adapt(nn.Linear(4, 4))
    assert "not a transformers model" in _one_line(err)


def test_config_and_modules_disagree_is_one_line():
    model = build_tiny_model("deepseek_v3")
    model.config.first_k_dense_replace = 0  # as if transformers had changed where the dense layers are
    with pytest.raises(UnsupportedModelError) as err:
        adapt(model)
    assert "layer 0.mlp" in _one_line(err)


def test_router_output_rejects_a_non_triple():
    layer = adapt(build_tiny_model("olmoe")).moe_layers[0]
    t = torch.zeros(2, 8)
    assert router_output((t, t, t), layer)[0] is t
    with pytest.raises(UnsupportedModelError) as err:
        router_output((t, t), layer)
    assert "returned a 2-tuple" in _one_line(err)


# ---- tiny models and the byte tokenizer ----------------------------------------------------------------


def test_build_tiny_model_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_tiny_model("qwen3_moe", seed=3)
    b = build_tiny_model("qwen3_moe", seed=3)
    c = build_tiny_model("qwen3_moe", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    pa, pb, pc = (m.model.layers[0].mlp.experts.down_proj for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert not a.training
    with pytest.raises(UnsupportedModelError, match="unknown tiny family"):
        build_tiny_model("nope")
    assert set(TINY_FAMILIES) >= {f for f, _ in CASES.values()} | {"llama"}


def test_tiny_special_ids_fit_the_vocab():
    model = build_tiny_model("olmoe")
    cfg = model.config
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert max(PAD_ID, BOS_ID, EOS_ID) < cfg.vocab_size == 512


TEXTS = ["hello world", "你好，世界", "مرحبا بالعالم", "emoji 🙂 and\ttabs\nnewlines", "  two  spaces "]


def test_byte_tokenizer_round_trips_utf8():
    tok = byte_tokenizer()
    assert tok.pad_token == "<pad>" and tok.pad_token_id == PAD_ID
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS_ID, EOS_ID)
    assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [259, 260]
    assert len(tok) == 261
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids[0] == BOS_ID and ids[1:] == list(text.encode("utf-8"))  # id == byte value
        assert max(ids) < 512
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("x<think>y</think>")["input_ids"] == [BOS_ID, ord("x"), 259, ord("y"), 260]
    assert byte_tokenizer(add_bos=False)("ab")["input_ids"] == [97, 98]
    batch = tok(TEXTS[:2], padding=True, return_tensors="pt")
    assert (batch["input_ids"][batch["attention_mask"] == 0] == PAD_ID).all()


def test_save_and_load_from_a_local_path(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = build_tiny_model("deepseek_v3"), byte_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    la, lb = adapt(model).moe_layers[0], adapt(loaded).moe_layers[0]
    assert torch.equal(la.rule.correction_bias, lb.rule.correction_bias)  # the buffer is saved
    batch = tok2(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], tok(TEXTS, padding=True, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert tok2.decode(batch["input_ids"][1], skip_special_tokens=True) == TEXTS[1]
