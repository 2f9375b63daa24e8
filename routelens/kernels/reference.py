"""Masked routing in plain PyTorch: the oracle for the Triton kernels and the CPU path of steering.

``masked_route(logits, rule, tables)`` is the family's routing rule (``routelens/adapters/routing.py``,
reused, not re-written) applied to steered scores. With neutral tables it *is* ``rule(logits)``, bit for
bit. Otherwise, in float32 (``z`` = router logits ``[T, E]``, tables per expert ``e``)::

    z'  = z + bias + bias_abs * |z|                          # "bias" rules (conctsai λ·s·|z| via bias_abs)
    m   = max_e z'                                           # row max before masking (SteerMoE)
    logit-domain families (softmax, DeepSeek-V2, gpt-oss, PhiMoE sparsemixer):
        z'[disabled] = -inf ;  z'[forced] = m + δ            # SteerMoE force = log-softmax max + δ
        w, i = rule(z')
    DeepSeek-V3 (sigmoid, correction bias, group-limited top-k): the choice scores are not logits, so
        w, i = rule(z', choice_bias = -inf at disabled, +inf at forced)   # added AFTER the correction bias
    w[j] *= boost[i[j]] ;  if renormalize: w *= sum(w_before) / sum(w)   # "boost" rules (RICE-style)
    w   = w.to(dtype of rule(z))                              # the dtype the unsteered router returns

Selection and weights are those of the model's own rule on the steered scores, ties included (the rule's
``torch.topk`` breaks them). Source of the force/disable semantics: adobe-research/SteerMoE
``src/utils.py::steer_moe`` (algorithms.md §5.3); DeepSeek-V3 caveat: algorithms.md §8.4.
"""
from __future__ import annotations

import torch
from torch import Tensor

from routelens.adapters.routing import DeepseekV2Rule, DeepseekV3Rule, RoutingRule, SoftmaxTopK
from routelens.steering.spec import LayerTables

__all__ = ["masked_route", "steered_scores", "weights_dtype"]


def weights_dtype(rule: RoutingRule, logits_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``rule(logits)`` returns its weights in, for logits of ``logits_dtype`` (steered weights are cast
    back to it, so steering never changes what the experts receive)."""
    if isinstance(rule, SoftmaxTopK):
        return logits_dtype if rule.weights_in_logits_dtype else torch.float32
    if isinstance(rule, DeepseekV2Rule):
        return torch.float32  # softmax(dtype=float32) * scaling
    return logits_dtype  # V3: sigmoid(z) gathered; gpt-oss / sparsemixer: softmax in z's dtype


def _table(values, device) -> Tensor:
    return torch.as_tensor(values, device=device)


def steered_scores(logits: Tensor, rule: RoutingRule, tables: LayerTables, force_delta: float
                   ) -> tuple[Tensor, Tensor | None]:
    """``(z', choice_bias)`` to feed the rule: the float32 steered logits and, for DeepSeek-V3, the ±inf bias."""
    z = logits.float()
    if tables.has_bias:
        z = z + _table(tables.bias, z.device) + _table(tables.bias_abs, z.device) * z.abs()
    if not tables.has_mask:
        return z, None
    mask = _table(tables.mask, z.device)
    if isinstance(rule, DeepseekV3Rule):
        inf = torch.tensor(float("inf"), device=z.device)
        choice_bias = torch.where(mask > 0, inf, torch.where(mask < 0, -inf, torch.zeros((), device=z.device)))
        return z, choice_bias
    row_max = z.max(dim=-1, keepdim=True).values
    z = torch.where(mask > 0, row_max + force_delta, z)
    z = z.masked_fill(mask < 0, float("-inf"))
    return z, None


def masked_route(logits: Tensor, rule: RoutingRule, tables: LayerTables | None, force_delta: float = 0.01
                 ) -> tuple[Tensor, Tensor]:
    """``(weights [T, k], indices [T, k])`` of ``rule`` on logits steered by ``tables`` (see module docstring)."""
    if tables is None or tables.is_neutral:
        return rule(logits)
    out_dtype = weights_dtype(rule, logits.dtype)
    z, choice_bias = steered_scores(logits, rule, tables, force_delta)
    weights, indices = rule(z, choice_bias=choice_bias) if choice_bias is not None else rule(z)
    weights = weights.float()
    if tables.has_boost:
        factor = _table(tables.boost, weights.device)[indices]
        boosted = weights * factor
        if tables.renormalize:
            boosted = boosted * (weights.sum(-1, keepdim=True) / boosted.sum(-1, keepdim=True))
        weights = boosted
    return weights.to(out_dtype), indices
