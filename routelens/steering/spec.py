"""The steering spec: which experts to disable, force, boost or bias, in which layers, as a typed object with a
JSON/YAML file form.

File form (``SteeringSpec.load`` reads ``.json``, ``.yaml``/``.yml``)::

    {"rules": [
      {"layers": "all", "experts": [3], "action": "disable"},
      {"layers": [4, 5, 6], "experts": [12, 40], "action": "force"},
      {"layers": [10], "experts": [7], "action": "boost", "value": 2.0, "renormalize": true},
      {"layers": "10-39", "experts": [9], "action": "bias", "value": -1.5},
      {"layers": "all", "experts": [5], "action": "bias", "value": 0.022, "scale": "abs_logit"}
    ],
     "force_delta": 0.01, "name": "optional", "source": {"analysis": "contrast", ...}}

``layers`` are decoder-layer indices as in the store: a list, one int, ``"a-b"`` (inclusive) or ``"all"``
(every MoE layer). A dense layer named explicitly is an error; ``"all"`` skips dense layers.

Actions, and what they do to the family's routing rule (``routelens/adapters/routing.py``, stage names as
there; the PyTorch reference is ``routelens/kernels/reference.py``):

- ``disable``: the expert is never selected: its choice score is ``-inf`` at the selection stage (for
  DeepSeek-V3 after the correction bias, so the bias cannot bring it back). Its probability mass goes to the
  other experts as if the router never had it (SteerMoE uses ``min - δ`` instead; same selection).
- ``force``: SteerMoE's override (adobe-research/SteerMoE ``src/utils.py::steer_moe``): the expert's
  log-softmax score is set to the row max + δ (``force_delta``, 0.01), i.e. its logit to ``max(z) + δ``: it is
  selected and weighs about as much as the current top-1. For DeepSeek-V3 (sigmoid, group-limited) the
  choice score is ``+inf`` so its group is always kept; its weight stays its own sigmoid score.
- ``boost`` β (RICE-style, hyper-parameters unverified): when selected, the expert's routing weight is
  multiplied by β; with ``"renormalize": true`` the k weights are rescaled to their original sum.
- ``bias`` b: additive logit bias before the router's rule, ``z + b`` (``"scale": "abs_logit"`` gives
  ``z + b·|z|``, the conctsai λ·s·|z| form with b = λ·s). Unlike disable/force it changes weights too.

Rules combine in order: biases add, boosts multiply; force and disable on one expert is an error.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import InputError

ACTIONS = ("disable", "force", "boost", "bias")
BIAS_SCALES = ("const", "abs_logit")

__all__ = ["ACTIONS", "SteeringError", "SteeringRule", "SteeringSpec", "RoutingGeometry", "SteeringTables",
           "LayerTables"]


class SteeringError(InputError):
    """A steering spec that cannot be applied as written (one line: which rule, what is wrong)."""


@dataclass(frozen=True)
class SteeringRule:
    """One action on some experts in some layers."""

    layers: Literal["all"] | tuple[int, ...]
    experts: tuple[int, ...]
    action: str
    value: float | None = None  # boost: β; bias: b
    scale: str = "const"  # bias only: "const" (z + b) or "abs_logit" (z + b·|z|)
    renormalize: bool = False  # boost only

    def to_dict(self) -> dict:
        d: dict = {"layers": self.layers if self.layers == "all" else list(self.layers),
                   "experts": list(self.experts), "action": self.action}
        if self.value is not None:
            d["value"] = self.value
        if self.action == "bias" and self.scale != "const":
            d["scale"] = self.scale
        if self.action == "boost" and self.renormalize:
            d["renormalize"] = True
        return d


def _ints(value, what: str, where: str) -> tuple[int, ...]:
    if isinstance(value, bool):
        raise SteeringError(f"{where}: {what} must be integers, got {value!r}")
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str) and what == "layers":
        parts = value.replace(":", "-").split("-")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            lo, hi = int(parts[0]), int(parts[1])
            if lo > hi:
                raise SteeringError(f"{where}: layer range {value!r} is empty (write low-high)")
            return tuple(range(lo, hi + 1))
        raise SteeringError(f"{where}: layers must be \"all\", a list of integers or a range like \"4-8\", "
                            f"got {value!r}")
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in value):
        return tuple(value)
    raise SteeringError(f"{where}: {what} must be a non-empty list of integers, got {value!r}")


def _rule_from_dict(d: object, i: int) -> SteeringRule:
    where = f"steering rule {i + 1}"
    if not isinstance(d, dict):
        raise SteeringError(f"{where}: expected an object with layers, experts and action, got {d!r}")
    unknown = set(d) - {"layers", "experts", "action", "value", "scale", "renormalize"}
    if unknown:
        raise SteeringError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: layers, experts, action, value, "
                            "scale, renormalize)")
    for key in ("layers", "experts", "action"):
        if key not in d:
            raise SteeringError(f"{where}: missing {key!r}")
    action = d["action"]
    if action not in ACTIONS:
        raise SteeringError(f"{where}: unknown action {action!r} (expected one of {', '.join(ACTIONS)})")
    layers = "all" if d["layers"] == "all" else _ints(d["layers"], "layers", where)
    experts = _ints(d["experts"], "experts", where)
    value = d.get("value")
    if action in ("boost", "bias"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SteeringError(f"{where}: action {action!r} needs a finite numeric \"value\", got {value!r}")
        if action == "boost" and value <= 0:
            raise SteeringError(f"{where}: boost value must be > 0 (a factor on the routing weight), got {value}; "
                                "use \"disable\" to remove an expert")
        value = float(value)
    elif value is not None:
        raise SteeringError(f"{where}: action {action!r} takes no \"value\"")
    scale = d.get("scale", "const")
    if scale not in BIAS_SCALES or (scale != "const" and action != "bias"):
        raise SteeringError(f"{where}: \"scale\" is for bias rules only and must be one of {BIAS_SCALES}, got {scale!r}")
    renorm = d.get("renormalize", False)
    if not isinstance(renorm, bool) or (renorm and action != "boost"):
        raise SteeringError(f"{where}: \"renormalize\" is a true/false option of boost rules only")
    return SteeringRule(layers=layers, experts=experts, action=action, value=value, scale=scale, renormalize=renorm)


@dataclass(frozen=True)
class RoutingGeometry:
    """What validation needs to know about a model (built from an adapter, or from a stored run)."""

    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    # group-limited selection (DeepSeek-V3 / V2 group_limited_greedy): (n_group, topk_group, min enabled
    # experts for a group's score to be finite: 2 for V3's top-2 sum, 1 for V2's max)
    groups: tuple[int, int, int] | None = None

    @classmethod
    def of(cls, adapter) -> "RoutingGeometry":
        from ..adapters.routing import DeepseekV2Rule, DeepseekV3Rule

        groups = None
        rule = adapter.moe_layers[0].rule if adapter.moe_layers else None
        if isinstance(rule, DeepseekV3Rule) and rule.n_group > 1:
            groups = (rule.n_group, rule.topk_group, 2)
        elif isinstance(rule, DeepseekV2Rule) and rule.method == "group_limited_greedy":
            groups = (rule.n_group, rule.topk_group, 1)
        return cls(adapter.num_layers, adapter.moe_layer_indices, adapter.num_experts, adapter.top_k, groups)


@dataclass
class LayerTables:
    """The spec resolved for one MoE layer: per-expert tables the reference and the kernels read."""

    mask: np.ndarray  # int8 [E]: -1 disable, +1 force, 0 untouched
    bias: np.ndarray  # float32 [E]: additive logit bias
    bias_abs: np.ndarray  # float32 [E]: coefficient of |z| (conctsai form)
    boost: np.ndarray  # float32 [E]: weight factor when selected (1 = none)
    renormalize: bool  # rescale boosted weights to the original row sum

    @classmethod
    def neutral(cls, num_experts: int) -> "LayerTables":
        return cls(np.zeros(num_experts, np.int8), np.zeros(num_experts, np.float32),
                   np.zeros(num_experts, np.float32), np.ones(num_experts, np.float32), False)

    @property
    def has_bias(self) -> bool:
        return bool(self.bias.any() or self.bias_abs.any())

    @property
    def has_mask(self) -> bool:
        return bool(self.mask.any())

    @property
    def has_boost(self) -> bool:
        return bool((self.boost != 1).any())

    @property
    def is_neutral(self) -> bool:
        return not (self.has_bias or self.has_mask or self.has_boost)


@dataclass
class SteeringTables:
    """A spec resolved against one model: tables for the steered MoE layers only (others untouched)."""

    layers: dict[int, LayerTables]
    num_experts: int
    top_k: int
    force_delta: float


@dataclass(frozen=True)
class SteeringSpec:
    """An ordered list of steering rules plus options. Build one in Python, or ``SteeringSpec.load(path)``."""

    rules: tuple[SteeringRule, ...] = ()
    force_delta: float = 0.01  # SteerMoE's +0.01 over the row max
    name: str | None = None
    source: dict = field(default_factory=dict)  # provenance, e.g. the analysis result it was exported from

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: object) -> "SteeringSpec":
        if isinstance(data, list):  # a bare list of rules is accepted too
            data = {"rules": data}
        if not isinstance(data, dict) or "rules" not in data:
            raise SteeringError("steering spec: expected an object with a \"rules\" list, e.g. "
                                "{\"rules\": [{\"layers\": \"all\", \"experts\": [3], \"action\": \"disable\"}]}")
        unknown = set(data) - {"rules", "force_delta", "name", "source"}
        if unknown:
            raise SteeringError(f"steering spec: unknown key(s) {sorted(unknown)} (allowed: rules, force_delta, "
                                "name, source)")
        if not isinstance(data["rules"], list):
            raise SteeringError("steering spec: \"rules\" must be a list")
        delta = data.get("force_delta", 0.01)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (delta > 0 and math.isfinite(delta)):
            raise SteeringError(f"steering spec: force_delta must be a positive number, got {delta!r}")
        source = data.get("source") or {}
        if not isinstance(source, dict):
            raise SteeringError("steering spec: \"source\" must be an object")
        return cls(rules=tuple(_rule_from_dict(r, i) for i, r in enumerate(data["rules"])),
                   force_delta=float(delta), name=data.get("name"), source=source)

    @classmethod
    def loads(cls, text: str, fmt: str = "json") -> "SteeringSpec":
        try:
            if fmt == "yaml":
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SteeringError(f"steering spec is not valid {fmt.upper()}: {first}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SteeringSpec":
        p = Path(path)
        if not p.is_file():
            raise SteeringError(f"steering spec file {str(p)!r} does not exist")
        fmt = "yaml" if p.suffix.lower() in (".yaml", ".yml") else "json"
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SteeringError(f"steering spec file {str(p)!r} is not UTF-8 text") from None
        return cls.loads(text, fmt)

    def to_dict(self) -> dict:
        d: dict = {"rules": [r.to_dict() for r in self.rules]}
        if self.force_delta != 0.01:
            d["force_delta"] = self.force_delta
        if self.name:
            d["name"] = self.name
        if self.source:
            d["source"] = self.source
        return d

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            p.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        else:
            p.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return p

    @property
    def is_empty(self) -> bool:
        return not self.rules

    # -- validation against a model -------------------------------------------------------------

    def resolve(self, geometry: RoutingGeometry) -> SteeringTables:
        """Check every rule against the model and build the per-layer tables; one line per problem."""
        g = geometry
        E, k = g.num_experts, g.top_k
        moe = set(g.moe_layers)
        tables: dict[int, LayerTables] = {}
        for i, rule in enumerate(self.rules):
            where = f"steering rule {i + 1} ({rule.action})"
            if rule.layers == "all":
                layers = g.moe_layers
            else:
                for layer in rule.layers:
                    if not 0 <= layer < g.num_layers:
                        raise SteeringError(f"{where}: layer {layer} is out of range: this model has decoder layers "
                                            f"0..{g.num_layers - 1}")
                    if layer not in moe:
                        raise SteeringError(f"{where}: layer {layer} is dense in this model (MoE layers: "
                                            f"{_span(g.moe_layers)}); name MoE layers or use \"layers\": \"all\"")
                layers = rule.layers
            for e in rule.experts:
                if not 0 <= e < E:
                    raise SteeringError(f"{where}: expert {e} is out of range: this model has {E} experts per layer "
                                        f"(0..{E - 1})")
            for layer in layers:
                t = tables.setdefault(layer, LayerTables.neutral(E))
                for e in rule.experts:
                    if rule.action in ("disable", "force"):
                        want = -1 if rule.action == "disable" else 1
                        if t.mask[e] == -want:
                            raise SteeringError(f"steering spec: layer {layer}, expert {e} is both forced and disabled; "
                                                "keep one of the two rules")
                        t.mask[e] = want
                    elif rule.action == "boost":
                        t.boost[e] *= rule.value
                        t.renormalize = t.renormalize or rule.renormalize
                    elif rule.scale == "abs_logit":
                        t.bias_abs[e] += rule.value
                    else:
                        t.bias[e] += rule.value
        for layer, t in sorted(tables.items()):
            self._check_layer(layer, t, g)
        return SteeringTables({l: t for l, t in tables.items() if not t.is_neutral}, E, k, self.force_delta)

    @staticmethod
    def _check_layer(layer: int, t: LayerTables, g: RoutingGeometry) -> None:
        forced = np.flatnonzero(t.mask > 0).tolist()
        if len(forced) > g.top_k:
            raise SteeringError(f"steering spec: layer {layer} forces {len(forced)} experts {forced} but only "
                                f"k={g.top_k} are selected per token; force at most {g.top_k}")
        enabled = t.mask >= 0
        if int(enabled.sum()) < g.top_k:
            raise SteeringError(f"steering spec: layer {layer} disables {int((~enabled).sum())} of {g.num_experts} "
                                f"experts, leaving fewer than k={g.top_k} to select")
        if g.groups is None:
            return
        n_group, topk_group, need = g.groups
        per = g.num_experts // n_group
        if forced:
            groups = sorted({e // per for e in forced})
            if len(groups) > topk_group:
                raise SteeringError(f"steering spec: layer {layer} forces experts in {len(groups)} groups {groups} but "
                                    f"the router keeps only topk_group={topk_group} groups per token")
        counts = enabled.reshape(n_group, per).sum(axis=1)
        eligible = np.sort(counts[counts >= need])
        if len(eligible) < topk_group or int(eligible[:topk_group].sum()) < g.top_k:
            raise SteeringError(f"steering spec: layer {layer} disables so many experts that the router's "
                                f"{topk_group} kept groups may hold fewer than k={g.top_k} selectable experts")


def _span(layers: tuple[int, ...]) -> str:
    if layers and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))


def spec_from_pairs(pairs, action: str, *, value: float | None = None, name: str | None = None,
                    source: dict | None = None) -> SteeringSpec:
    """A spec applying one action to explicit (layer, expert) pairs, e.g. an analysis' top-N experts."""
    by_layer: dict[int, list[int]] = {}
    for layer, expert in pairs:
        by_layer.setdefault(int(layer), []).append(int(expert))
    rules = [_rule_from_dict({"layers": [l], "experts": sorted(set(es)), "action": action,
                              **({"value": value} if value is not None else {})}, i)
             for i, (l, es) in enumerate(sorted(by_layer.items()))]
    return SteeringSpec(rules=tuple(rules), name=name, source=source or {})

