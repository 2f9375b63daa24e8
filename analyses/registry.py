"""The analyses by name: what each computes, its parameters, and running one over stored runs.

Every analysis module defines ``ANALYSIS = Analysis(...)``: a parameters dataclass (its fields, with defaults and
``metadata={"help": ...}``, become the CLI options of ``routelens analyze NAME``), a ``compute(store, runs, params)``
returning ``{part: polars.DataFrame}`` and the name of the part printed by the CLI (``--json`` prints its rows).
``run_analysis`` computes, stores the result (``analyses/results.py``) and returns it.
"""
from __future__ import annotations

import dataclasses
import importlib
import time
import types
import typing
from dataclasses import dataclass
from typing import Callable

from routelens.errors import InputError

from .results import Result, ResultInfo, load_result, save_result

__all__ = ["Analysis", "NAMES", "get", "run_analysis", "params_from_dict"]

# CLI name -> module in routelens.analyses
_MODULES = {
    "lrc": "lrc",
    "super-experts": "super_experts",
    "crosslingual": "crosslingual",
    "npmi": "npmi",
    "contrast": "contrast",
    "stats": "stats",
}
NAMES = tuple(_MODULES)


@dataclass(frozen=True)
class Analysis:
    name: str  # CLI name
    summary: str  # one line for --help
    params: type  # a dataclass; every field has a default
    compute: Callable  # (store, runs: list[RunInfo], params) -> dict[str, polars.DataFrame]
    primary: str  # the part the CLI prints
    min_runs: int = 1
    max_runs: int = 1


def get(name: str) -> Analysis:
    if name not in _MODULES:
        raise InputError(f"unknown analysis {name!r}; available: {', '.join(NAMES)}")
    module = importlib.import_module(f"routelens.analyses.{_MODULES[name]}")
    return module.ANALYSIS


def _coerce(value, hint, name: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is tuple:
        item = args[0] if args else str
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(v, item, name) for v in value)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint in (int, float, str):
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return hint(value)
    except (TypeError, ValueError):
        raise InputError(f"parameter {name}: expected {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value


def params_from_dict(analysis: Analysis, values: dict | None):
    """The analysis' parameters dataclass from a dict (unknown keys refused; strings coerced like the CLI)."""
    values = dict(values or {})
    hints = typing.get_type_hints(analysis.params)
    names = {f.name for f in dataclasses.fields(analysis.params)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"{analysis.name}: unknown parameter(s) {unknown}; parameters: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], k) for k, v in values.items()}
    try:
        return analysis.params(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{analysis.name}: {exc}") from None


def run_analysis(store, name: str, runs, params=None, *, save: bool = True) -> Result:
    """Compute analysis ``name`` over ``runs`` (RunInfo, RunHandle, run id or name), store it unless ``save`` is
    False, and return the Result (``result.frames[part]`` are polars DataFrames)."""
    from routelens.store import Store

    analysis = get(name)
    store = store if isinstance(store, Store) else Store.open(store, create=False)
    infos = _run_infos(store, runs)
    if not analysis.min_runs <= len(infos) <= analysis.max_runs:
        want = (str(analysis.min_runs) if analysis.min_runs == analysis.max_runs
                else f"{analysis.min_runs} to {analysis.max_runs}")
        raise InputError(f"{name} takes {want} run(s) (--run, repeatable), got {len(infos)}")
    for info in infos:
        if info.status != "complete":
            raise InputError(f"run {info.run_id} is incomplete (its tracer did not finish); re-trace it with "
                             "`routelens trace` before analysing it")
    if not dataclasses.is_dataclass(params):
        params = params_from_dict(analysis, params)
    t0 = time.perf_counter()
    frames = analysis.compute(store, infos, params)
    seconds = time.perf_counter() - t0
    pdict = dataclasses.asdict(params)
    if save:
        info = save_result(store, name, infos, pdict, frames, seconds=seconds)
        return Result(info, frames)
    return Result(ResultInfo(-1, name, tuple(i.run_id for i in infos), pdict, tuple(frames), None, seconds), frames)


def stored(store, name: str, runs, params: dict | None = None) -> Result | None:
    """The newest stored result of ``name`` over ``runs``, or None (the dashboard reads results this way)."""
    return load_result(store, name, _run_infos(store, runs), params)


def _run_infos(store, runs) -> list:
    """RunInfo of each of ``runs`` (RunInfo, RunHandle, run id, name or uuid; one or a list)."""
    infos = []
    for r in runs if isinstance(runs, (list, tuple)) else [runs]:
        info = getattr(r, "info", r)
        infos.append(info if hasattr(info, "run_id") else store.run(r).info)
    return infos
