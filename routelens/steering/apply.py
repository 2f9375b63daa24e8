"""Applying a steering spec to a live model: router-side steering (``steer``) and weight-level expert removal
(``remove_experts``), both reversible context managers.

``steer`` puts a forward hook on each steered layer's router. transformers v5 routers return
``(logits, weights, indices)``; the hook keeps the logits and replaces weights and indices by the masked
routing of those logits (``routelens.kernels.masked_route``: the Triton kernel on CUDA, the PyTorch reference
elsewhere), so the experts run exactly what the steered rule chose, for prefill and every decode step.
Layers the spec does not touch get no hook, so an empty spec leaves the model bit-identical.

While a ``steer`` block is open the model carries the spec (``STEERING_ATTR``), so ``routelens.trace`` and
``routelens.recording`` store it with the run: steered and unsteered runs can be compared in the store.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import ModelAdapter, adapt, router_output
from ..errors import UnsupportedModelError
from .spec import RoutingGeometry, SteeringSpec, SteeringTables

STEERING_ATTR = "_routelens_steering"  # on the model instance while steered: the spec as a dict

__all__ = ["STEERING_ATTR", "SteeringHandle", "steer", "remove_experts", "active_steering"]


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


def _resolve(model: nn.Module, spec: SteeringSpec | dict | str) -> tuple[SteeringSpec, ModelAdapter, SteeringTables]:
    if isinstance(spec, dict):
        spec = SteeringSpec.from_dict(spec)
    elif not isinstance(spec, SteeringSpec):
        spec = SteeringSpec.load(spec)
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
    """Route ``model`` under ``spec`` inside the block (forwards and ``generate``); hooks removed on exit.

    ``backend``: ``"auto"`` (Triton kernel on CUDA when available, PyTorch reference otherwise), ``"triton"``
    or ``"torch"``. Composes with tracing and with other ``steer`` blocks (hooks run in the order opened).
    """
    from ..tracer.session import unwrap
    from routelens.kernels import dispatch

    base = unwrap(model)
    spec, adapter, tables = _resolve(base, spec)
    route = dispatch.router(backend)
    handle = SteeringHandle(spec, tables, adapter, backend)
    hooks = []

    def make_hook(layer):
        layer_tables = tables.layers[layer.index]

        def hook(module, args, output):
            logits, _, _ = router_output(output, layer)
            weights, indices = route(logits, layer.rule, layer_tables, tables.force_delta)
            handle.calls[layer.index] = handle.calls.get(layer.index, 0) + logits.shape[0]
            return logits, weights, indices

        return hook

    for layer in adapter.moe_layers:
        if layer.index in tables.layers:
            hooks.append(layer.router.register_forward_hook(make_hook(layer)))
    stack = list(getattr(base, STEERING_ATTR, None) or [])
    setattr(base, STEERING_ATTR, stack + [spec.to_dict()])
    try:
        yield handle
    finally:
        for h in hooks:
            h.remove()
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
