"""Steering: one spec (disable / force / boost / bias experts) applied to any supported family.

``spec`` holds the typed spec, its file form and validation; ``apply`` the live-model context managers;
``experiment`` the side-by-side steered-vs-unsteered generation behind ``routelens steer``.
"""
from .apply import STEERING_ATTR, SteeringHandle, active_steering, remove_experts, steer
from .spec import (ACTIONS, LayerTables, RoutingGeometry, SteeringError, SteeringRule, SteeringSpec, SteeringTables,
                   spec_from_pairs)

__all__ = ["ACTIONS", "LayerTables", "RoutingGeometry", "STEERING_ATTR", "SteeringError", "SteeringHandle",
           "SteeringRule", "SteeringSpec", "SteeringTables", "active_steering", "remove_experts", "spec_from_pairs",
           "steer"]
