"""One registry of model families, one small explicit entry per family, and ``adapt(model)``.

Each entry says, for one ``config.model_type`` of transformers 5.23, where the MoE block lives, how to read
E, k, the dense layers and the shared experts from the config, and which routing rule the router applies.
``adapt`` then checks the entry against the model's actual modules, so a transformers refactor shows up as
one clear error instead of silently wrong routing.

Models of any other type whose MoE blocks follow the v5 contract (a ``gate``/``router`` child returning
``(logits, weights, indices)`` plus a fused ``experts`` child taking ``(hidden, indices, weights)``) get
the ``generic`` adapter, found by structure rather than class name.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import UnsupportedModelError
from .base import ModelAdapter, MoELayer
from .routing import DeepseekV2Rule, DeepseekV3Rule, GptOssRule, RoutingRule, SoftmaxTopK, SparseMixerRule

Config = Any  # a transformers PretrainedConfig; attributes differ per family


@dataclass(frozen=True)
class FamilySpec:
    """How to adapt one model family. Every callable reads the model config (and the router, for rules)."""

    family: str
    model_types: tuple[str, ...]  # config.model_type values handled by this entry
    block_attr: str  # decoder layer attribute holding the MoE block
    router_attr: str  # MoE block attribute holding the router
    shared_attr: str | None  # MoE block attribute holding the shared expert(s), if the family has them
    experts_layout: str
    router_output_sorted: bool
    num_experts: Callable[[Config], int]
    top_k: Callable[[Config], int]
    is_moe_layer: Callable[[Config, int], bool]
    n_shared_experts: Callable[[Config], int]
    make_rule: Callable[[Config, nn.Module], RoutingRule]


def _every_layer(config: Config, index: int) -> bool:
    return True


def _qwen_is_moe_layer(config: Config, index: int) -> bool:
    # Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer.__init__
    return (
        index not in config.mlp_only_layers
        and config.num_experts > 0
        and (index + 1) % config.decoder_sparse_step == 0
    )


def _deepseek_is_moe_layer(config: Config, index: int) -> bool:
    # DeepseekV2DecoderLayer / DeepseekV3DecoderLayer.__init__: the first k layers keep a dense MLP
    return index >= config.first_k_dense_replace


OLMOE = FamilySpec(
    family="olmoe",
    model_types=("olmoe",),
    block_attr="mlp",
    router_attr="gate",
    shared_attr=None,
    experts_layout="gate_up_fused",
    router_output_sorted=True,
    num_experts=lambda c: c.num_experts,
    top_k=lambda c: c.num_experts_per_tok,
    is_moe_layer=_every_layer,
    n_shared_experts=lambda c: 0,
    make_rule=lambda c, router: SoftmaxTopK(c.num_experts_per_tok, renormalize=bool(c.norm_topk_prob)),
)

QWEN2_MOE = FamilySpec(
    family="qwen2_moe",
    model_types=("qwen2_moe",),
    block_attr="mlp",
    router_attr="gate",
    shared_attr="shared_expert",  # one sigmoid-gated shared expert (block.shared_expert_gate)
    experts_layout="gate_up_fused",
    router_output_sorted=True,
    num_experts=lambda c: c.num_experts,
    top_k=lambda c: c.num_experts_per_tok,
    is_moe_layer=_qwen_is_moe_layer,
    n_shared_experts=lambda c: 1,
    make_rule=lambda c, router: SoftmaxTopK(c.num_experts_per_tok, renormalize=bool(c.norm_topk_prob)),
)

QWEN3_MOE = FamilySpec(
    family="qwen3_moe",
    model_types=("qwen3_moe",),
    block_attr="mlp",
    router_attr="gate",
    shared_attr=None,
    experts_layout="gate_up_fused",
    router_output_sorted=True,
    num_experts=lambda c: c.num_experts,
    top_k=lambda c: c.num_experts_per_tok,
    is_moe_layer=_qwen_is_moe_layer,
    n_shared_experts=lambda c: 0,
    make_rule=lambda c, router: SoftmaxTopK(c.num_experts_per_tok, renormalize=bool(c.norm_topk_prob)),
)

MIXTRAL = FamilySpec(
    family="mixtral",
    model_types=("mixtral",),
    block_attr="mlp",
    router_attr="gate",
    shared_attr=None,
    experts_layout="gate_up_fused",
    router_output_sorted=True,
    num_experts=lambda c: c.num_local_experts,
    top_k=lambda c: c.num_experts_per_tok,
    is_moe_layer=_every_layer,
    n_shared_experts=lambda c: 0,
    # MixtralTopKRouter always renormalises and leaves the weights in float32
    make_rule=lambda c, router: SoftmaxTopK(c.num_experts_per_tok, renormalize=True, weights_in_logits_dtype=False),
)

DEEPSEEK_V2 = FamilySpec(
    family="deepseek_v2",
    model_types=("deepseek_v2",),
    block_attr="mlp",
    router_attr="gate",
    shared_attr="shared_experts",
    experts_layout="gate_up_fused",
    router_output_sorted=False,  # topk(sorted=False)
    num_experts=lambda c: c.n_routed_experts,
    top_k=lambda c: c.num_experts_per_tok,
    is_moe_layer=_deepseek_is_moe_layer,
    n_shared_experts=lambda c: c.n_shared_experts or 0,
    make_rule=lambda c, router: DeepseekV2Rule(
        c.num_experts_per_tok, c.topk_method, c.n_group, c.topk_group, c.routed_scaling_factor
    ),
)

DEEPSEEK_V3 = FamilySpec(
    family="deepseek_v3",
    model_types=("deepseek_v3",),
    block_attr="mlp",
    router_attr="gate",
    shared_attr="shared_experts",
    experts_layout="gate_up_fused",
    router_output_sorted=False,  # topk(sorted=False)
    num_experts=lambda c: c.n_routed_experts,
    top_k=lambda c: c.num_experts_per_tok,
    is_moe_layer=_deepseek_is_moe_layer,
    n_shared_experts=lambda c: c.n_shared_experts or 0,
    make_rule=lambda c, router: DeepseekV3Rule(
        c.num_experts_per_tok,
        c.n_group,
        c.topk_group,
        bool(c.norm_topk_prob),
        c.routed_scaling_factor,
        router.e_score_correction_bias,  # the buffer itself, so the rule sees this layer's bias
    ),
)

GPT_OSS = FamilySpec(
    family="gpt_oss",
    model_types=("gpt_oss",),
    block_attr="mlp",  # GptOssMLP returns (hidden, router_scores), not a tensor
    router_attr="router",
    shared_attr=None,
    experts_layout="gpt_oss",
    router_output_sorted=True,
    num_experts=lambda c: c.num_local_experts,
    top_k=lambda c: c.num_experts_per_tok,
    is_moe_layer=_every_layer,
    n_shared_experts=lambda c: 0,
    make_rule=lambda c, router: GptOssRule(c.num_experts_per_tok),
)

PHIMOE = FamilySpec(
    family="phimoe",
    model_types=("phimoe",),
    block_attr="mlp",
    router_attr="router",
    shared_attr=None,
    experts_layout="gate_up_fused",
    router_output_sorted=False,  # each round's weight is normalised over a different set
    num_experts=lambda c: c.num_local_experts,
    # sparsemixer hard-codes two rounds and ignores config.num_experts_per_tok: the router returns k = 2
    top_k=lambda c: 2,
    is_moe_layer=_every_layer,
    n_shared_experts=lambda c: 0,
    make_rule=lambda c, router: SparseMixerRule(2, jitter_eps=c.router_jitter_noise),
)

FAMILIES: tuple[FamilySpec, ...] = (OLMOE, QWEN2_MOE, QWEN3_MOE, MIXTRAL, DEEPSEEK_V2, DEEPSEEK_V3, GPT_OSS, PHIMOE)
_BY_MODEL_TYPE: dict[str, FamilySpec] = {mt: spec for spec in FAMILIES for mt in spec.model_types}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(spec.family for spec in FAMILIES) + ("generic",)

# Known MoE architectures that break the v5 contract, with the reason given to the user.
_REFUSED: dict[str, str] = {
    "llama4": "its router returns (scores, logits) and its experts run densely on router-scaled inputs of every "
    "token, so there is no (indices, weights) experts call to capture",
    "llama4_text": "its router returns (scores, logits) and its experts run densely on router-scaled inputs of "
    "every token, so there is no (indices, weights) experts call to capture",
}

_SUPPORTED_LINE = (
    "supported: olmoe, qwen2_moe, qwen3_moe, mixtral, deepseek_v2, deepseek_v3, gpt_oss, phimoe, and other v5 "
    "MoE models whose blocks have a gate/router returning (logits, weights, indices) and fused experts"
)


def _model_config(model: nn.Module) -> Config:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers model (no .config); pass a PreTrainedModel, "
            "e.g. AutoModelForCausalLM.from_pretrained(...)"
        )
    return config


def _decoder_layers(model: nn.Module, config: Config) -> nn.ModuleList:
    """The decoder-layer list: ``base_model.layers``, else the one ModuleList of ``num_hidden_layers`` blocks."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    n = getattr(config, "num_hidden_layers", None)
    candidates = [m for m in base.children() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(candidates) == 1:
        return candidates[0]
    raise UnsupportedModelError(
        f"cannot find the decoder layers of {type(model).__name__} (no .layers list); {_SUPPORTED_LINE}"
    )


def _looks_moe(model: nn.Module, config: Config) -> bool:
    """A config with several experts per layer, or any module named like an experts container."""
    for attr in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 1:
            return True
    return any(name.rsplit(".", 1)[-1] in ("experts", "block_sparse_moe") for name, _ in model.named_modules())


def _no_adapter(model: nn.Module, config: Config) -> UnsupportedModelError:
    name = type(model).__name__
    if _looks_moe(model, config):
        return UnsupportedModelError(
            f"no routelens adapter matches the MoE architecture {name} (model_type {config.model_type!r}): its "
            f"MoE blocks do not follow the transformers v5 router/experts contract; {_SUPPORTED_LINE}"
        )
    return UnsupportedModelError(
        f"{name} has no Mixture-of-Experts layers, so there is no routing to trace; "
        f"use an MoE model ({_SUPPORTED_LINE})"
    )


def _mismatch(config: Config, detail: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"the {config.model_type} model does not have the layout routelens expects from transformers 5.23 "
        f"({detail}); check the installed transformers version or report it"
    )


def _adapt_family(model: nn.Module, config: Config, spec: FamilySpec, layers: nn.ModuleList) -> ModelAdapter:
    num_experts = spec.num_experts(config)
    top_k = spec.top_k(config)
    moe: list[MoELayer] = []
    dense: list[int] = []
    for index, layer in enumerate(layers):
        block = getattr(layer, spec.block_attr, None)
        router = getattr(block, spec.router_attr, None) if block is not None else None
        experts = getattr(block, "experts", None) if block is not None else None
        found = router is not None and experts is not None
        if found != spec.is_moe_layer(config, index):
            where = f"layer {index}.{spec.block_attr}"
            expected = "an MoE block" if not found else "a dense MLP"
            raise _mismatch(config, f"the config says {where} is {expected}, the model disagrees")
        if not found:
            dense.append(index)
            continue
        if getattr(experts, "num_experts", num_experts) != num_experts:
            raise _mismatch(config, f"layer {index} has {experts.num_experts} experts, the config says {num_experts}")
        shared = getattr(block, spec.shared_attr) if spec.shared_attr else None
        moe.append(MoELayer(index, block, router, experts, shared, spec.make_rule(config, router)))
    if not moe:
        raise _no_adapter(model, config)
    return ModelAdapter(
        family=spec.family,
        architecture=type(model).__name__,
        num_experts=num_experts,
        top_k=top_k,
        num_layers=len(layers),
        moe_layers=tuple(moe),
        dense_layers=tuple(dense),
        n_shared_experts=spec.n_shared_experts(config),
        decoder_layers=layers,
        experts_layout=spec.experts_layout,
        router_output_sorted=spec.router_output_sorted,
    )


# ---- generic adapter: found by structure ------------------------------------------------------------------


def _takes_routing(experts: nn.Module) -> bool:
    """``experts.forward(hidden, indices, weights)``: at least three positional parameters (v5 contract)."""
    try:
        params = inspect.signature(type(experts).forward).parameters.values()  # follows functools.wraps
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 4 or any(p.kind is p.VAR_POSITIONAL for p in params)  # self + 3


def _is_fused_experts(experts: nn.Module) -> bool:
    up = getattr(experts, "gate_up_proj", None)
    if up is None:
        up = getattr(experts, "up_proj", None)
    down = getattr(experts, "down_proj", None)
    return (
        isinstance(up, nn.Parameter) and up.dim() == 3 and isinstance(down, nn.Parameter) and down.dim() == 3
        and _takes_routing(experts)
    )


def _generic_layout(experts: nn.Module) -> str:
    """``gate_up_fused`` only when the experts math is provably the default v5 one, else ``opaque``."""
    from transformers.integrations.moe import _default_apply_gate  # the v5 default act(gate) * up

    standard = (
        getattr(experts, "has_gate", False)
        and getattr(experts, "is_concatenated", False)
        and not getattr(experts, "is_transposed", True)
        and not getattr(experts, "has_bias", True)
        and not getattr(experts, "has_post_expert_norm", True)
        and getattr(type(experts), "_apply_gate", None) is _default_apply_gate
        and isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter)
        and hasattr(experts, "act_fn")
    )
    return "gate_up_fused" if standard else "opaque"


def _find_moe_block(layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    """A direct child of the decoder layer with a ``gate``/``router`` child and a fused ``experts`` child."""
    for block in layer.children():
        children = dict(block.named_children())
        router = children.get("gate", children.get("router"))
        experts = children.get("experts")
        if router is not None and experts is not None and _is_fused_experts(experts):
            return block, router, experts
    return None


_SHARED_NAMES = ("shared_experts", "shared_expert", "shared_mlp")


def _shared_of(block: nn.Module, layer: nn.Module) -> nn.Module | None:
    """Shared expert(s): inside the block (DeepSeek-like, Qwen2, HunYuan) or beside it (GraniteMoeShared)."""
    for parent in (block, layer):
        children = dict(parent.named_children())
        for name in _SHARED_NAMES:
            if children.get(name) is not None:
                return children[name]
    return None


def _adapt_generic(model: nn.Module, config: Config, layers: nn.ModuleList) -> ModelAdapter:
    moe: list[MoELayer] = []
    dense: list[int] = []
    for index, layer in enumerate(layers):
        found = _find_moe_block(layer)
        if found is None:
            dense.append(index)
            continue
        block, router, experts = found
        moe.append(MoELayer(index, block, router, experts, _shared_of(block, layer), rule=None))
    if not moe:
        raise _no_adapter(model, config)

    def per_layer(read: Callable[[MoELayer], int | None], what: str) -> int:
        values = {read(layer) for layer in moe}
        if len(values) != 1 or None in values:
            raise _mismatch(config, f"{what} differs between MoE layers or cannot be read: {sorted(map(str, values))}")
        return values.pop()

    num_experts = per_layer(
        lambda layer: getattr(layer.experts, "num_experts", layer.experts.down_proj.shape[0]), "expert count"
    )
    top_k = per_layer(
        lambda layer: getattr(layer.router, "top_k", getattr(config, "num_experts_per_tok", None)), "experts per token"
    )
    layouts = {_generic_layout(layer.experts) for layer in moe}
    n_shared = 0
    if any(layer.shared_experts is not None for layer in moe):
        n_shared = next(
            (v for a in ("n_shared_experts", "moe_num_shared_experts", "num_shared_experts")
             if isinstance(v := getattr(config, a, None), int) and v > 0),
            1,
        )
    return ModelAdapter(
        family="generic",
        architecture=type(model).__name__,
        num_experts=num_experts,
        top_k=top_k,
        num_layers=len(layers),
        moe_layers=tuple(moe),
        dense_layers=tuple(dense),
        n_shared_experts=n_shared,
        decoder_layers=layers,
        experts_layout=layouts.pop() if len(layouts) == 1 else "opaque",
        router_output_sorted=False,  # unknown: the tracer sorts (stable, so a sorted router is unchanged)
    )


def adapt(model: nn.Module) -> ModelAdapter:
    """Describe ``model``'s MoE layers for routelens; accepts ``*ForCausalLM`` or the base model.

    Raises ``UnsupportedModelError`` (one line) for a model without MoE layers or an MoE architecture that
    no adapter matches. Call it after moving the model to its device/dtype: rules bind router buffers.
    """
    config = _model_config(model)
    model_type = config.model_type
    if model_type in _REFUSED:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model_type!r}) is not supported: {_REFUSED[model_type]}; "
            f"{_SUPPORTED_LINE}"
        )
    layers = _decoder_layers(model, config)
    spec = _BY_MODEL_TYPE.get(model_type)
    if spec is not None:
        return _adapt_family(model, config, spec, layers)
    return _adapt_generic(model, config, layers)
