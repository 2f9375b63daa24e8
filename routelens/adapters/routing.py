"""Each router family's routing rule, written once.

A rule maps raw router logits ``[T, E]`` to ``(weights [T, k], indices [T, k])`` and reproduces the
model's own router output bit for bit on the same device (same ops, same dtypes, same order; checked
against the real router modules in ``tests/test_routing_rules.py``).

Every rule is written in three explicit stages, because steering reuses these rules and intervenes at
the middle one:

1. **choice scores** -- the per-expert scores whose top-k picks the experts;
2. **selection** -- top-k (plus whatever group limiting the family does) on the choice scores;
3. **weights** -- the routing weights of the selected experts, as the model computes them.

``choice_bias`` (optional, ``[E]`` or ``[T, E]``, added at the stage each rule's docstring names; ``-inf``
masks an expert, a large value forces it) is the steering insertion point. With ``choice_bias=None`` the
rule is exactly the model's router.

Sources are the transformers 5.23 router classes named in each docstring
(``transformers/models/<family>/modeling_<family>.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "RoutingRule",
    "SoftmaxTopK",
    "DeepseekV3Rule",
    "DeepseekV2Rule",
    "GptOssRule",
    "SparseMixerRule",
    "sort_by_weight",
]


@runtime_checkable
class RoutingRule(Protocol):
    """``rule(logits[T,E]) -> (weights[T,k], indices[T,k] int64)``, bit-identical to the model's router."""

    k: int

    def __call__(self, logits: Tensor, *, choice_bias: Tensor | None = None) -> tuple[Tensor, Tensor]: ...


def _add_bias(scores: Tensor, choice_bias: Tensor | None) -> Tensor:
    # Skipped entirely when None: adding zeros is not a no-op for -0.0 and would cost a kernel.
    if choice_bias is None:
        return scores
    return scores + choice_bias.to(device=scores.device)


@dataclass(frozen=True)
class SoftmaxTopK:
    """Softmax, then top-k, then (optionally) renormalise the k probabilities.

    Formula::

        p   = softmax(float32(z))                      # choice scores (ranked like z)
        w,i = topk(p, k)                               # sorted, descending
        w   = w / sum(w)          if renormalize
        w   = w.to(z.dtype)       if weights_in_logits_dtype

    Source: ``OlmoeTopKRouter``, ``Qwen2MoeTopKRouter``, ``Qwen3MoeTopKRouter`` (renormalize iff
    ``config.norm_topk_prob``; weights cast back to the logits dtype) and ``MixtralTopKRouter`` (always
    renormalises; weights stay float32: ``weights_in_logits_dtype=False``).

    ``choice_bias`` is added to the raw logits before the softmax (SteerMoE-style), so a masked expert's
    probability mass is spread over the others exactly as if the router never had it.
    """

    k: int
    renormalize: bool
    weights_in_logits_dtype: bool = True

    def choice_scores(self, logits: Tensor, choice_bias: Tensor | None = None) -> Tensor:
        """Stage 1: ``softmax(float32(logits + choice_bias))``."""
        return torch.nn.functional.softmax(_add_bias(logits, choice_bias), dtype=torch.float, dim=-1)

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """Stage 2: ``topk(probs, k)``, sorted descending. Returns ``(top probs, indices)``."""
        return torch.topk(probs, self.k, dim=-1)

    def weights(self, top_probs: Tensor, logits_dtype: torch.dtype) -> Tensor:
        """Stage 3: renormalise (in float32) and cast like the model does."""
        if self.renormalize:
            top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
        if self.weights_in_logits_dtype:
            top_probs = top_probs.to(logits_dtype)
        return top_probs

    def __call__(self, logits: Tensor, *, choice_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        top, idx = self.select(self.choice_scores(logits, choice_bias))
        return self.weights(top, logits.dtype), idx


@dataclass(frozen=True)
class DeepseekV3Rule:
    """Sigmoid scores, bias-corrected group-limited top-k, unbiased weights (DeepSeek-V3/R1, GLM-4.5).

    Formula (G = n_group groups of E/G experts)::

        s      = sigmoid(z)                                    # z is float32 in the model
        c      = s + e_score_correction_bias                   # choice scores
        g      = sum(top2(c within each group))                # [T, G]
        keep   = topk(g, topk_group, sorted=False)             # groups kept; the others get c = -inf
        i      = topk(c_masked, k, sorted=False).indices       # NOT sorted by weight
        w      = s.gather(i)                                   # unbiased scores
        w      = w / (sum(w) + 1e-20)   if renormalize         # config.norm_topk_prob
        w      = w * routed_scaling_factor

    Source: ``DeepseekV3TopkRouter.forward`` (identical in ``Glm4MoeTopkRouter``).

    ``choice_bias`` is added to ``c`` AFTER the correction bias and BEFORE group scoring: masking the raw
    logit is not enough (sigmoid = 0, yet the correction bias could still pick the expert).

    ``correction_bias`` is the router's ``e_score_correction_bias`` buffer itself (bound by the adapter);
    re-run ``adapt(model)`` after moving the model to another device or dtype.
    """

    k: int
    n_group: int
    topk_group: int
    renormalize: bool
    scaling: float
    correction_bias: Tensor = field(compare=False, repr=False)

    def scores(self, logits: Tensor) -> Tensor:
        """The unbiased per-expert scores ``sigmoid(z)``; the weights are gathered from these."""
        return logits.sigmoid()

    def choice_scores(self, scores: Tensor, choice_bias: Tensor | None = None) -> Tensor:
        """Stage 1: ``sigmoid(z) + e_score_correction_bias (+ choice_bias)``."""
        return _add_bias(scores + self.correction_bias.to(scores.device), choice_bias)

    def select(self, choice: Tensor) -> Tensor:
        """Stage 2: keep the ``topk_group`` best groups (group score = sum of its top-2), top-k inside."""
        num_experts = choice.shape[-1]
        per_group = num_experts // self.n_group
        group_scores = choice.view(-1, self.n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, self.n_group, per_group).reshape(-1, num_experts)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        return torch.topk(choice, k=self.k, dim=-1, sorted=False)[1]

    def weights(self, scores: Tensor, indices: Tensor) -> Tensor:
        """Stage 3: unbiased sigmoid at the chosen experts, renormalised (+1e-20), times the scaling."""
        w = scores.gather(1, indices)
        if self.renormalize:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.scaling

    def __call__(self, logits: Tensor, *, choice_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        scores = self.scores(logits)
        idx = self.select(self.choice_scores(scores, choice_bias))
        return self.weights(scores, idx), idx


@dataclass(frozen=True)
class DeepseekV2Rule:
    """Softmax, greedy or group-limited top-k, scaled weights (DeepSeek-V2 / V2-Lite).

    Formula::

        p    = softmax(float32(z))                             # choice scores
        greedy:                w, i = topk(p, k, sorted=False)
        group_limited_greedy:  g = max(p within each group); keep topk(g, topk_group, sorted=False)
                               groups; p = 0 elsewhere (0.0, not -inf); w, i = topk(p, k, sorted=False)
        w    = w * routed_scaling_factor                       # no renormalisation in V2

    Source: ``DeepseekV2TopkRouter.forward``. ``choice_bias`` is added to the logits before the softmax.
    """

    k: int
    method: Literal["greedy", "group_limited_greedy"]
    n_group: int | None
    topk_group: int | None
    scaling: float

    def __post_init__(self) -> None:
        if self.method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"DeepseekV2Rule: unknown topk_method {self.method!r}")
        if self.method == "group_limited_greedy" and not (self.n_group and self.topk_group):
            raise ValueError("DeepseekV2Rule: group_limited_greedy needs n_group and topk_group")

    def choice_scores(self, logits: Tensor, choice_bias: Tensor | None = None) -> Tensor:
        """Stage 1: ``softmax(float32(logits + choice_bias))``."""
        return _add_bias(logits, choice_bias).softmax(dim=-1, dtype=torch.float32)

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """Stage 2: greedy or group-limited top-k (unsorted). Returns ``(top probs, indices)``."""
        if self.method == "group_limited_greedy":
            num_experts = probs.shape[-1]
            per_group = num_experts // self.n_group
            group_scores = probs.view(-1, self.n_group, per_group).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores)
            group_mask.scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(-1, self.n_group, per_group).reshape(-1, num_experts)
            probs = probs.masked_fill(~score_mask.bool(), 0.0)
        return torch.topk(probs, k=self.k, dim=-1, sorted=False)

    def weights(self, top_probs: Tensor) -> Tensor:
        """Stage 3: ``w * routed_scaling_factor``."""
        return top_probs * self.scaling

    def __call__(self, logits: Tensor, *, choice_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        top, idx = self.select(self.choice_scores(logits, choice_bias))
        return self.weights(top), idx


@dataclass(frozen=True)
class GptOssRule:
    """Top-k on the raw logits, then softmax over the k selected logits (gpt-oss).

    Formula::

        z    = x W^T + b                                   # the router has a bias; z includes it
        v, i = topk(z, k)                                  # sorted, descending
        w    = softmax(v)                                  # in z's dtype, over the k only

    Source: ``GptOssTopKRouter.forward``. ``choice_bias`` is added to ``z``; since the softmax runs over
    the selected k only, a boosted expert's weight depends on the other selected logits.
    """

    k: int

    def choice_scores(self, logits: Tensor, choice_bias: Tensor | None = None) -> Tensor:
        """Stage 1: the logits themselves (plus ``choice_bias``)."""
        return _add_bias(logits, choice_bias)

    def select(self, choice: Tensor) -> tuple[Tensor, Tensor]:
        """Stage 2: ``topk(z, k)``, sorted. Returns ``(top logits, indices)``."""
        return torch.topk(choice, self.k, dim=-1)

    def weights(self, top_logits: Tensor) -> Tensor:
        """Stage 3: ``softmax`` over the k selected logits, in their dtype."""
        return torch.nn.functional.softmax(top_logits, dim=1, dtype=top_logits.dtype)

    def __call__(self, logits: Tensor, *, choice_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        top, idx = self.select(self.choice_scores(logits, choice_bias))
        return self.weights(top), idx


@dataclass(frozen=True)
class SparseMixerRule:
    """PhiMoE's sparsemixer in eval mode: k rounds of "argmax, weight = softmax over a jitter-masked set".

    Formula, for round j = 0..k-1 (``z`` = logits, ``m_j`` = z with the j experts already chosen set to
    -inf; ``m_0 = z``)::

        t_j   = max(m_j);  i_j = argmax(m_j)                    # selection
        drop  = (t_j - z) / max(|z|, t_j) > 2 * jitter_eps      # sparsity mask, against the ORIGINAL z
        w_j   = softmax(m_j with drop -> -inf)[i_j]             # weight

    Source: ``transformers.models.phimoe.modeling_phimoe.sparsemixer(..., training=False)``, which only
    implements k = 2 (it ignores ``top_k``); this rule generalises the same recursion and equals it for
    k = 2. Note each round's weight is normalised over a different set, so ``w_1`` can exceed ``w_0``:
    the router output is not sorted by weight.

    ``choice_bias`` is added to ``z`` before everything (both the argmax and the jitter mask see it).
    """

    k: int
    jitter_eps: float

    def choice_scores(self, logits: Tensor, choice_bias: Tensor | None = None) -> Tensor:
        """Stage 1: the logits themselves (plus ``choice_bias``)."""
        return _add_bias(logits, choice_bias)

    def __call__(self, logits: Tensor, *, choice_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        scores = self.choice_scores(logits, choice_bias)
        weights: list[Tensor] = []
        chosen: list[Tensor] = []
        masked_scores = scores
        for _ in range(self.k):
            # Stage 2 (selection): the argmax of the still-available scores.
            with torch.no_grad():
                threshold, max_ind = masked_scores.max(dim=-1, keepdim=True)
                factor = scores.abs().clamp(min=threshold)
                drop = ((threshold - scores) / factor) > (2 * self.jitter_eps)
            # Stage 3 (weight): softmax over the jitter-masked remaining experts, read at the chosen one.
            gates = torch.softmax(masked_scores.masked_fill(drop, float("-inf")), dim=-1)
            weights.append(gates.gather(dim=-1, index=max_ind))
            chosen.append(max_ind)
            masked_scores = torch.scatter(masked_scores, -1, max_ind, float("-inf"))
        return torch.concat(weights, dim=-1), torch.concat(chosen, dim=-1)


def sort_by_weight(weights: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Reorder each row so rank 0 has the largest weight (stable: ties keep the router's order).

    The tracer stores rank 0 = largest weight; DeepSeek (``topk(sorted=False)``) and PhiMoE (per-round
    normalisation) routers do not return that order themselves.
    """
    order = torch.argsort(weights, dim=-1, descending=True, stable=True)
    return weights.gather(-1, order), indices.gather(-1, order)
