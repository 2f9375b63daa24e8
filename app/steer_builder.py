"""The Steering page's spec building: basket rows (layer, expert, action, value) -> a ``SteeringSpec``, validated
against a routing geometry; and where the live model comes from. No Streamlit here (tested directly)."""
from __future__ import annotations

import math
from pathlib import Path

from routelens.records import RunInfo
from routelens.steering import ACTIONS, RoutingGeometry, SteeringSpec, spec_from_pairs

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "data" / "model"  # the embedded default (data/README.md)
NEEDS_VALUE = ("boost", "bias")


def spec_from_rows(rows: list[dict], *, name: str | None = None, source: dict | None = None) -> SteeringSpec:
    """One rule per (action, value, layer) group of the rows, in a stable order; raises ``SteeringError`` (one
    line) for an unknown action or a missing/extra value, as ``SteeringSpec.from_dict`` would."""
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for row in rows:
        action = str(row.get("action") or "disable")
        value = row.get("value")
        value = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
        if action not in NEEDS_VALUE:
            value = None  # disable/force take no value: a leftover number in the table is ignored
        groups.setdefault((action, value), []).append((int(row["layer"]), int(row["expert"])))
    rules = []
    for (action, value), pairs in sorted(groups.items(), key=lambda kv: (ACTIONS.index(kv[0][0])
                                                                         if kv[0][0] in ACTIONS else 99, str(kv[0][1]))):
        rules.extend(spec_from_pairs(pairs, action, value=value).rules)
    return SteeringSpec(rules=tuple(rules), name=name, source=source or {})


def geometry_of_run(run: RunInfo) -> RoutingGeometry:
    """The run's routing geometry, for checking a spec before a model is loaded (group limits unknown here)."""
    return RoutingGeometry(num_layers=run.num_layers, moe_layers=tuple(run.moe_layers), num_experts=run.num_experts,
                           top_k=run.top_k)


def model_for_run(run: RunInfo | None) -> str:
    """The run's model when it is a local folder (relative to the working directory or the repository), else the
    embedded default ``data/model``."""
    if run is not None and run.model:
        for base in (Path.cwd(), DEFAULT_MODEL.parent.parent):
            p = (base / run.model) if not Path(run.model).is_absolute() else Path(run.model)
            if (p / "config.json").is_file():
                return str(p)
    return str(DEFAULT_MODEL)
