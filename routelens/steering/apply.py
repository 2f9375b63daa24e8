"""Applying a steering spec to a live model: router-side steering (``steer``) and weight-level expert removal
(``remove_experts``), both reversible context managers.

``steer`` replaces the forward of each steered layer's router (on the instance, restored on exit). transformers
v5 routers compute ``logits = x W^T (+ b)`` and then their rule and return ``(logits, weights, indices)``; the
replacement computes the same logits (``router_logits``: bit-identical, tested per family) and then the masked
routing of those logits (``routelens.kernels``: the Triton kernel on CUDA, the PyTorch reference elsewhere)
instead of the rule, so the experts run exactly what the steered rule chose, for prefill and every decode step,
and the unsteered top-k is never computed just to be thrown away. Hooks on the router (a tracer's, nnsight's)
still fire. Layers the spec does not touch keep their own forward, so an empty spec leaves the model
bit-identical.

While a ``steer`` block is open the model carries the spec (``STEERING_ATTR``), so ``routelens.trace`` and
``routelens.recording`` store it with the run: steered and unsteered runs can be compared in the store.
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import ModelAdapter, adapt
from ..errors import UnsupportedModelError
from .spec import RoutingGeometry, SteeringSpec, SteeringTables

STEERING_ATTR = "_routelens_steering"  # on the model instance while steered: the spec as a dict

__all__ = ["STEERING_ATTR", "SteeringHandle", "steer", "remove_experts", "active_steering"]


# Routers that compute their logits in float32 whatever the model dtype (DeepseekV2/V3TopkRouter.forward).
FP32_ROUTERS = ("deepseek_v2", "deepseek_v3")


def router_logits(router: nn.Module, hidden_states: torch.Tensor, fp32: bool) -> torch.Tensor:
    """The logits a transformers v5 router computes before its rule: ``F.linear(x.reshape(-1, H), W, b)``, in
    float32 for DeepSeek (source: the ``*TopKRouter.forward`` of each family in transformers 5.23; PhiMoE's router is
    an ``nn.Linear``; gpt-oss's has a bias)."""
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    weight, bias = router.weight, getattr(router, "bias", None)
    if fp32:
        x, weight = x.type(torch.float32), weight.type(torch.float32)
    return F.linear(x, weight, bias)


def active_steering(model: nn.Module) -> dict | None:
    """The spec (dict form) of the ``steer`` blocks open on ``model``, or None. Nested blocks are listed in order."""
    specs = getattr(model, STEERING_ATTR, None)
    if not specs:
        return None
    return specs[0] if len(specs) == 1 else {"composed": list(specs)}


@dataclass
class SteeringHandle:
    """What ``steer`` yields: the resolved tables, and a count of routed tokens per steered layer."""

    spec: SteeringSpec
    tables: SteeringTables
    adapter: ModelAdapter
    backend: str
    calls: dict[int, int] = field(default_factory=dict)


def _as_spec(spec: SteeringSpec | dict | str) -> SteeringSpec:
    if isinstance(spec, SteeringSpec):
        return spec
    return SteeringSpec.from_dict(spec) if isinstance(spec, dict) else SteeringSpec.load(spec)


def _resolve(model: nn.Module, spec: SteeringSpec | dict | str) -> tuple[SteeringSpec, ModelAdapter, SteeringTables]:
    spec = _as_spec(spec)
    adapter = adapt(model)
    tables = spec.resolve(RoutingGeometry.of(adapter))
    if tables.layers and adapter.family == "generic":
        raise UnsupportedModelError(
            f"steering needs the routing rule of the model's family; {adapter.architecture} is only traced by the "
            "generic adapter (rule unknown). Supported: olmoe, qwen2_moe, qwen3_moe, mixtral, deepseek_v2, "
            "deepseek_v3, gpt_oss, phimoe")
    return spec, adapter, tables


@contextmanager
def steer(model: nn.Module, spec: SteeringSpec | dict | str, *, backend: str = "auto"):
    """Route ``model`` under ``spec`` inside the block (forwards and ``generate``); the routers' own forwards come
    back on exit.

    ``backend``: ``"auto"`` (Triton kernel on CUDA when available, PyTorch reference otherwise), ``"triton"``
    or ``"torch"``. Composes with tracing, and with an enclosing ``steer`` block: inside, the model is steered by
    the enclosing specs' rules followed by this one's (validated together), and leaving restores the enclosing
    steering.
    """
    from ..tracer.session import unwrap
    from routelens.kernels import dispatch

    base = unwrap(model)
    spec = _as_spec(spec)
    stack = list(getattr(base, STEERING_ATTR, None) or [])
    rules = tuple(r for d in stack for r in SteeringSpec.from_dict(d).rules) + spec.rules
    combined = SteeringSpec(rules=rules, force_delta=spec.force_delta, name=spec.name, source=spec.source)
    _, adapter, tables = _resolve(base, combined)
    route = dispatch.router(backend)
    handle = SteeringHandle(spec, tables, adapter, backend)
    fp32 = adapter.family in FP32_ROUTERS

    def make_forward(layer):
        layer_tables = tables.layers[layer.index]

        def forward(self, hidden_states, *args, **kwargs):
            logits = router_logits(self, hidden_states, fp32)
            weights, indices = route(logits, layer.rule, layer_tables, tables.force_delta)
            handle.calls[layer.index] = handle.calls.get(layer.index, 0) + logits.shape[0]
            return logits, weights, indices

        return forward

    saved = []  # (router, the instance forward it had: an enclosing block's, or None for the class's own)
    for layer in adapter.moe_layers:
        if layer.index in tables.layers or "forward" in layer.router.__dict__:
            saved.append((layer.router, layer.router.__dict__.get("forward")))
            if layer.index in tables.layers:
                layer.router.forward = types.MethodType(make_forward(layer), layer.router)
            else:
                del layer.router.forward
    setattr(base, STEERING_ATTR, stack + [spec.to_dict()])
    try:
        yield handle
    finally:
        for router, previous in saved:
            if previous is None:
                router.__dict__.pop("forward", None)
            else:
                router.forward = previous
        if stack:
            setattr(base, STEERING_ATTR, stack)
        elif hasattr(base, STEERING_ATTR):
            delattr(base, STEERING_ATTR)


@contextmanager
def remove_experts(model: nn.Module, pairs):
    """Zero the down projection of each ``(layer, expert)`` (Super Experts' pruning mode), restored on exit.

    The router is untouched: tokens are still routed to a removed expert and its share of the weighted sum is
    lost (no renormalisation, no substitute), as in ZunhaiSu/Super-Experts-Profilling
    ``*Evaluator._load_layer_weight``. gpt-oss's down_proj bias is zeroed too, so the expert's output is 0.
    Compare ``steer`` with a ``disable`` rule, which removes the expert at the router instead.
    """
    from ..tracer.session import unwrap

    base = unwrap(model)
    adapter = adapt(base)
    by_index = {layer.index: layer for layer in adapter.moe_layers}
    saved: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    for layer_idx, expert in pairs:
        layer = by_index.get(int(layer_idx))
        if layer is None:
            raise UnsupportedModelError(f"remove_experts: layer {layer_idx} is not an MoE layer of this model "
                                        f"(MoE layers: {list(by_index)})")
        if not 0 <= int(expert) < adapter.num_experts:
            raise UnsupportedModelError(f"remove_experts: expert {expert} is out of range (0..{adapter.num_experts - 1})")
        if adapter.experts_layout not in ("gate_up_fused", "gpt_oss"):
            raise UnsupportedModelError(f"remove_experts: the {adapter.experts_layout!r} experts layout of "
                                        f"{adapter.architecture} has no known down projection")
        params = [layer.experts.down_proj]
        if adapter.experts_layout == "gpt_oss":
            params.append(layer.experts.down_proj_bias)
        for p in params:
            saved.append((p, int(expert), p.data[int(expert)].clone()))
    try:
        with torch.no_grad():
            for p, e, _ in saved:
                p.data[e].zero_()
        yield adapter
    finally:
        with torch.no_grad():
            for p, e, old in reversed(saved):
                p.data[e].copy_(old)
