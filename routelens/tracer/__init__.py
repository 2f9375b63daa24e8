"""Tracer: records which experts each MoE layer executed, per token, into the store."""
from .driver import TraceOptions, trace
from .hooks import RoutingRecorder
from .inputs import read_inputs
from .session import Recording, recording

__all__ = ["TraceOptions", "trace", "RoutingRecorder", "read_inputs", "Recording", "recording"]
