"""Per-layer balance figures the Overview page shows when the run has no ``stats`` analysis result yet.

Pure numpy over small arrays: the load counts come aggregated from DuckDB (``queries.expert_load``), the router
probabilities from one layer's logits at a time. When ``routelens analyze stats`` has been run, the page shows that
result instead (it is the reference implementation; these are the same textbook formulas).
"""
from __future__ import annotations

import numpy as np

__all__ = ["load_balance", "router_probabilities", "router_entropy", "lb_value"]


def load_balance(counts: np.ndarray, top_k: int) -> dict[str, np.ndarray]:
    """Balance of expert load per layer from ``counts[L, E]`` (tokens whose executed top-k holds expert e).

    - ``f[l, e] = counts[l, e] / (k · N_l)``: the fraction of the layer's decisions going to e (sums to 1), the
      ``f_i`` of the Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4–5).
    - ``cv = std(f) / mean(f)`` (population std): 0 for a perfectly even load.
    - ``max_over_mean = max(f) / mean(f) = E · max(f)``: how much busier the busiest expert is than an even share.
    - ``load_entropy = −Σ_e f ln f / ln E`` (0·ln 0 = 0): 1 for an even load, 0 when one expert takes everything.
    Layers without tokens give NaN.
    """
    counts = np.asarray(counts, np.float64)
    L, E = counts.shape
    total = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = counts / total
        mean = f.mean(axis=1)
        cv = f.std(axis=1) / mean
        mom = f.max(axis=1) / mean
        plogp = np.where(f > 0, f * np.log(np.where(f > 0, f, 1.0)), 0.0)
        ent = -plogp.sum(axis=1) / np.log(E) if E > 1 else np.zeros(L)
    empty = total[:, 0] == 0
    for arr in (cv, mom, ent):
        arr[empty] = np.nan
    return {"f": f, "cv": cv, "max_over_mean": mom, "load_entropy": ent,
            "n_tokens": (total[:, 0] / top_k)}


def router_probabilities(logits: np.ndarray, family: str) -> np.ndarray:
    """Router distribution over all experts from raw logits ``[N, E]``: softmax for softmax routers; for
    DeepSeek-V3 (sigmoid scores) the sigmoids normalised to sum 1, so that entropy is defined the same way."""
    z = np.asarray(logits, np.float32)
    if family == "deepseek_v3":
        s = 1.0 / (1.0 + np.exp(-z))
        return s / s.sum(axis=1, keepdims=True)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def router_entropy(p: np.ndarray) -> float:
    """Mean per-token router entropy ``mean_t(−Σ_e p_te ln p_te)`` in nats (0·ln 0 = 0)."""
    p = np.asarray(p, np.float64)
    if p.shape[0] == 0:
        return float("nan")
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return float(-plogp.sum(axis=1).mean())


def lb_value(f: np.ndarray, p: np.ndarray) -> float:
    """Switch/Mixtral load-balancing value ``E · Σ_i f_i · P_i`` with ``f_i`` the fraction of decisions routed to
    i (sums to 1) and ``P_i`` the mean router probability of i over tokens (Fedus et al. 2021, eq. 4; transformers
    ``load_balancing_loss_func`` before its coefficient). 1 when both are uniform."""
    f = np.asarray(f, np.float64)
    P = np.asarray(p, np.float64).mean(axis=0)
    return float(f.shape[0] * (f * P).sum())
