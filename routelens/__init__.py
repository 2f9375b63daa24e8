"""routelens: trace, analyze and steer the routing of Mixture-of-Experts language models.

Data route: model -> adapters (where the MoE blocks are, each family's routing rule) -> tracer (hooks)
-> store (DuckDB) -> analyses -> app (dashboard).
"""
__version__ = "0.1.0"

from .errors import RoutelensError  # noqa: E402


def __getattr__(name):
    # Lazy: `import routelens` stays cheap (no torch/transformers) for the CLI's --help and the dashboard.
    if name in ("trace", "TraceOptions", "recording"):
        from . import tracer

        return getattr(tracer, name)
    if name in ("Store",):
        from . import store

        return getattr(store, name)
    if name in ("adapt",):
        from . import adapters

        return adapters.adapt
    if name in ("load_model",):
        from .loading import load_model

        return load_model
    raise AttributeError(f"module 'routelens' has no attribute {name!r}")


__all__ = ["trace", "TraceOptions", "recording", "Store", "adapt", "load_model", "RoutelensError", "__version__"]
