"""Model adapters: where each MoE family keeps its routers and experts, and how it routes.

``adapt(model)`` is the entry point; ``routing`` holds every family's routing rule, ``experts`` the
instrumented experts forward used for Super-Experts profiling.
"""
from .base import EXPERTS_LAYOUTS, ModelAdapter, MoELayer, router_output
from .experts import ExpertActivationStats, ExpertStatsHandle, install_expert_stats
from .registry import FAMILIES, SUPPORTED_FAMILIES, FamilySpec, adapt
from .routing import (
    DeepseekV2Rule,
    DeepseekV3Rule,
    GptOssRule,
    RoutingRule,
    SoftmaxTopK,
    SparseMixerRule,
    sort_by_weight,
)

__all__ = [
    "EXPERTS_LAYOUTS",
    "FAMILIES",
    "SUPPORTED_FAMILIES",
    "DeepseekV2Rule",
    "DeepseekV3Rule",
    "ExpertActivationStats",
    "ExpertStatsHandle",
    "FamilySpec",
    "GptOssRule",
    "ModelAdapter",
    "MoELayer",
    "RoutingRule",
    "SoftmaxTopK",
    "SparseMixerRule",
    "adapt",
    "install_expert_stats",
    "router_output",
    "sort_by_weight",
]
