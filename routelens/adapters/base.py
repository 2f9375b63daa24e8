"""What an adapter tells the rest of routelens about a model: where its MoE layers are and how they route."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .routing import RoutingRule

# Expert weight layouts the instrumented experts forward (``adapters/experts.py``) reproduces.
#   gate_up_fused: gate_up_proj [E, 2I, H] (gate rows first, then up), down_proj [E, H, I];
#                  h = act(gate) * up, out = h @ down_proj[e].T  (OLMoE, Qwen, Mixtral, PhiMoE, DeepSeek...)
#   gpt_oss:       gate_up_proj [E, H, 2I] interleaved (gate = [..., ::2], up = [..., 1::2]) + bias,
#                  down_proj [E, I, H] + bias, clamped swiglu
#   opaque:        fused experts with some other math (generic adapter only): routing is captured, but the
#                  expert activation statistics are refused.
EXPERTS_LAYOUTS = ("gate_up_fused", "gpt_oss", "opaque")


@dataclass(frozen=True)
class MoELayer:
    """One decoder layer's MoE block and the parts of it routelens hooks.

    In transformers v5 the router is called as ``router(hidden[T,H]) -> (logits[T,E], weights[T,k],
    indices[T,k])`` and the experts as ``experts(hidden[T,H], indices, weights) -> [T,H]``; a forward hook on
    ``router`` and a forward pre-hook on ``experts`` see those tensors.
    """

    index: int  # decoder layer index
    block: nn.Module  # the MoE block, e.g. layers[i].mlp
    router: nn.Module  # block.gate or block.router
    experts: nn.Module  # the fused experts module
    shared_experts: nn.Module | None  # always-on expert(s) added to the routed output, if any
    rule: RoutingRule | None  # the family's routing rule bound to this layer's parameters; None for generic


@dataclass(frozen=True)
class ModelAdapter:
    """How routelens sees one model. Build it with ``adapt(model)`` after the model is placed on its device."""

    family: str  # "olmoe", "qwen2_moe", ..., or "generic"
    architecture: str  # class name of the model that was adapted, e.g. "OlmoeForCausalLM"
    num_experts: int  # routed experts per MoE layer (E)
    top_k: int  # experts per token, = width of the router's weights/indices outputs
    num_layers: int  # decoder layers, dense ones included
    moe_layers: tuple[MoELayer, ...]  # ascending decoder-layer index
    dense_layers: tuple[int, ...]  # decoder layers without an MoE block
    n_shared_experts: int  # always-on shared experts per MoE layer (0 if none)
    decoder_layers: nn.ModuleList  # hook their outputs for the residual stream
    experts_layout: str  # one of EXPERTS_LAYOUTS
    router_output_sorted: bool  # router returns rank 0 = largest weight (False: use routing.sort_by_weight)

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        """Decoder-layer index of every MoE layer, ascending."""
        return tuple(layer.index for layer in self.moe_layers)


def router_output(output: object, layer: MoELayer) -> tuple[Tensor, Tensor, Tensor]:
    """Unpack a router forward hook's ``output`` into ``(logits, weights, indices)``, or raise one line.

    The generic adapter recognises MoE blocks by structure; this is where a router that breaks the v5
    contract (returns something other than a 3-tuple of tensors) is caught, at the first forward.
    """
    if isinstance(output, tuple) and len(output) == 3 and all(isinstance(t, Tensor) for t in output):
        return output  # type: ignore[return-value]
    got = f"a {len(output)}-tuple" if isinstance(output, tuple) else type(output).__name__
    raise UnsupportedModelError(
        f"the router of layer {layer.index} ({type(layer.router).__name__}) returned {got}, not the transformers v5 "
        "(logits, weights, indices) triple; this architecture is not supported, use transformers>=5.15 or report it"
    )
