"""Pick the masked-routing implementation: the Triton kernel on CUDA tensors, the PyTorch reference elsewhere.

Both have the signature of ``reference.masked_route(logits, rule, tables, force_delta) -> (weights, indices)``.
"""
from __future__ import annotations

from .reference import masked_route

BACKENDS = ("auto", "torch", "triton")


def router(backend: str = "auto"):
    """The masked-routing function for ``backend`` (see BACKENDS)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown steering backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return masked_route
    try:
        from .triton_route import masked_route_triton, triton_available
    except ImportError:
        if backend == "triton":
            raise
        return masked_route
    if backend == "triton":
        return masked_route_triton

    def auto(logits, rule, tables, force_delta=0.01):
        if logits.is_cuda and triton_available():
            return masked_route_triton(logits, rule, tables, force_delta)
        return masked_route(logits, rule, tables, force_delta)

    return auto
