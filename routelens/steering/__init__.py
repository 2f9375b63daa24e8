"""Steering: one spec (disable / force / boost / bias experts) applied to any supported family.

``spec`` holds the typed spec, its file form and validation (numpy only: analyses and the dashboard build specs
without importing torch); ``apply`` the live-model context managers; ``experiment`` the side-by-side
steered-vs-unsteered generation behind ``routelens steer``.
"""
from .spec import (ACTIONS, LayerTables, RoutingGeometry, SteeringError, SteeringRule, SteeringSpec, SteeringTables,
                   spec_from_pairs)

_APPLY = ("STEERING_ATTR", "SteeringHandle", "active_steering", "remove_experts", "steer")


def __getattr__(name):
    if name in _APPLY:  # imports torch; only when a model is actually steered
        from . import apply

        return getattr(apply, name)
    raise AttributeError(f"module 'routelens.steering' has no attribute {name!r}")


__all__ = ["ACTIONS", "LayerTables", "RoutingGeometry", "STEERING_ATTR", "SteeringError", "SteeringHandle",
           "SteeringRule", "SteeringSpec", "SteeringTables", "active_steering", "remove_experts", "spec_from_pairs",
           "steer"]
