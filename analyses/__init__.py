"""routelens.analyses: analyses over traces, one module per published method. Installed as routelens.analyses.

Each module holds pure functions over arrays or frames (formula and source in their docstrings) and an
``ANALYSIS`` entry (``registry.py``) that reads runs from the store. ``run(store, name, runs, **params)`` computes
one, stores the result (``results.py``) and returns it; ``routelens analyze NAME`` is the CLI for the same.
"""
from .registry import NAMES, get, params_from_dict, run_analysis


def run(store, name: str, runs, *, save: bool = True, **params):
    """``run_analysis`` with the parameters as keyword arguments: ``run(store, "lrc", "demo", m=(16,))``."""
    return run_analysis(store, name, runs, params, save=save)


__all__ = ["NAMES", "get", "params_from_dict", "run", "run_analysis"]
