"""Tiny random-init models of every supported family, and a byte-level tokenizer, built offline.

For tests, demos and smoke runs: nothing is downloaded. Recipe from ``reference/environment.md`` §2:
vocab 512, hidden 64, 4 heads (2 KV heads); special token ids below the vocab size; gpt-oss
``layer_types`` as long as ``num_hidden_layers``; DeepSeek/GLM first layer dense.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .errors import UnsupportedModelError

__all__ = ["TINY_FAMILIES", "PAD_ID", "BOS_ID", "EOS_ID", "build_tiny_model", "byte_tokenizer"]

# Byte tokens take ids 0..255; the specials follow.
PAD_ID, BOS_ID, EOS_ID, THINK_ID, END_THINK_ID = 256, 257, 258, 259, 260
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<think>", "</think>")

_COMMON: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)

_DEEPSEEK_ATTENTION: dict[str, Any] = dict(
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4
)


# Each entry: (config class name, model class name, family-specific config for (layers L, experts E, top-k K)).
def _olmoe(L: int, E: int, K: int) -> dict[str, Any]:
    return dict(num_experts=E, num_experts_per_tok=K)


def _qwen2_moe(L: int, E: int, K: int) -> dict[str, Any]:
    return dict(num_experts=E, num_experts_per_tok=K, moe_intermediate_size=32, shared_expert_intermediate_size=64)


def _qwen3_moe(L: int, E: int, K: int) -> dict[str, Any]:
    return dict(num_experts=E, num_experts_per_tok=K, moe_intermediate_size=32, head_dim=16)


def _mixtral(L: int, E: int, K: int) -> dict[str, Any]:
    return dict(num_local_experts=E, num_experts_per_tok=K)


def _deepseek_v2(L: int, E: int, K: int) -> dict[str, Any]:
    return dict(
        n_routed_experts=E, num_experts_per_tok=K, n_shared_experts=1, moe_intermediate_size=32,
        first_k_dense_replace=1, **_DEEPSEEK_ATTENTION,
    )


def _deepseek_v3(L: int, E: int, K: int) -> dict[str, Any]:
    # n_group > 1 so group limiting matters; topk_group * E / n_group must be >= K
    return dict(
        n_routed_experts=E, num_experts_per_tok=K, n_shared_experts=1, moe_intermediate_size=32,
        first_k_dense_replace=1, n_group=2, topk_group=1, **_DEEPSEEK_ATTENTION,
    )


def _gpt_oss(L: int, E: int, K: int) -> dict[str, Any]:
    # config validation requires len(layer_types) == num_hidden_layers
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)]
    return dict(
        num_local_experts=E, num_experts_per_tok=K, head_dim=16, sliding_window=32, layer_types=layer_types,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},  # no YaRN warning at this size
    )


def _phimoe(L: int, E: int, K: int) -> dict[str, Any]:
    return dict(num_local_experts=E, num_experts_per_tok=K)


def _granitemoe(L: int, E: int, K: int) -> dict[str, Any]:
    return dict(num_local_experts=E, num_experts_per_tok=K)


def _glm4_moe(L: int, E: int, K: int) -> dict[str, Any]:
    return dict(
        n_routed_experts=E, num_experts_per_tok=K, n_shared_experts=1, moe_intermediate_size=32,
        first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=16,
    )


def _ernie4_5_moe(L: int, E: int, K: int) -> dict[str, Any]:
    return dict(
        moe_num_experts=E, moe_k=K, moe_intermediate_size=32, moe_num_shared_experts=1,
        moe_layer_start_index=0, moe_layer_end_index=L - 1, head_dim=16,
    )


def _llama(L: int, E: int, K: int) -> dict[str, Any]:
    return {}  # dense control model: no experts


_SPECS: dict[str, tuple[str, str, Callable[[int, int, int], dict[str, Any]]]] = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", _olmoe),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", _qwen2_moe),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", _qwen3_moe),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", _mixtral),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", _deepseek_v2),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", _deepseek_v3),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", _gpt_oss),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", _phimoe),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", _granitemoe),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", _glm4_moe),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", _ernie4_5_moe),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _llama),
}

TINY_FAMILIES: tuple[str, ...] = tuple(_SPECS)


def build_tiny_model(
    family: str,
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_experts: int = 8,
    top_k: int = 2,
    **config_overrides: Any,
) -> Any:
    """A random-init ``*ForCausalLM`` of ``family`` (see ``TINY_FAMILIES``) in eval mode, float32, on CPU.

    ``config_overrides`` go straight to the config class (e.g. ``norm_topk_prob=True``,
    ``experts_implementation="eager"``, ``mlp_only_layers=[0]``). Deterministic in ``seed``; the caller's
    global RNG state is left untouched. DeepSeek-V3 gets a non-zero random ``e_score_correction_bias`` so
    that the bias changes routing, as in the real checkpoints.
    """
    if family not in _SPECS:
        raise UnsupportedModelError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    import transformers

    config_name, model_name, family_config = _SPECS[family]
    kwargs = {**_COMMON, "num_hidden_layers": num_layers, **family_config(num_layers, num_experts, top_k)}
    kwargs.update(config_overrides)
    config = getattr(transformers, config_name)(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
        if family == "deepseek_v3":
            with torch.no_grad():
                for layer in model.model.layers:
                    router = getattr(layer.mlp, "gate", None)
                    if router is not None:
                        # sigmoid scores of a tiny random model sit near 0.5 +- 0.05: a bias of this size
                        # reorders experts without swamping the scores
                        router.e_score_correction_bias.copy_(0.05 * torch.randn(router.e_score_correction_bias.shape))
    return model.eval()


def byte_tokenizer(*, add_bos: bool = True) -> Any:
    """A byte-level ``PreTrainedTokenizerFast`` built offline: ids 0..255 are the bytes, then the specials.

    Specials: ``<pad>`` 256, ``<s>`` 257, ``</s>`` 258, ``<think>`` 259, ``</think>`` 260 (all < 512, the tiny
    vocab). Every UTF-8 text round-trips through ``decode(encode(text), skip_special_tokens=True)``.
    ``add_bos`` prepends ``<s>`` to every sequence.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_to_char = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins, unordered
    # Order them by byte value so token id == byte value (GPT-2's bytes_to_unicode mapping).
    chars = _bytes_to_unicode()
    assert set(chars) == set(byte_to_char)
    vocab = {ch: i for i, ch in enumerate(chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<think>", "</think>"],
        model_max_length=512,
    )


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character map, as a list indexed by byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    mapping: dict[int, int] = {b: b for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = 256 + n
            n += 1
    return [chr(mapping[b]) for b in range(256)]
