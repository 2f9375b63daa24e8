"""Steered vs unsteered, side by side: what ``routelens steer`` runs.

For each prompt: greedy generations without and with the spec (both traced into the store, the steered run carrying
its spec), and, when the input gives a ``reference`` continuation, its log-likelihood under both:
``LL = Σ_t log p(ref_t | prompt, ref_<t)`` over the reference tokens, ``ΔLL = LL_steered − LL_base``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..records import SequenceRecord
from ..tracer import TraceOptions, trace
from .apply import _resolve, steer
from .spec import SteeringSpec

__all__ = ["PromptComparison", "SteeringComparison", "compare", "reference_loglik"]


@dataclass
class PromptComparison:
    seq_id: int
    prompt: str
    base_text: str | None
    steered_text: str | None
    reference: str | None = None
    ll_base: float | None = None  # sum of log-probabilities of the reference tokens (nats)
    ll_steered: float | None = None
    delta_ll: float | None = None
    n_reference_tokens: int = 0
    routing_changed: float | None = None  # share of (prompt token, MoE layer) top-k sets that differ


@dataclass
class SteeringComparison:
    base_run_id: int
    steered_run_id: int
    spec: dict
    prompts: list[PromptComparison]


def reference_loglik(model, tokenizer, prompt: str, reference: str) -> tuple[float, int]:
    """``(Σ log p(reference tokens | prompt), number of reference tokens)`` in one forward, in float32."""
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    full = tokenizer(prompt + reference, add_special_tokens=True)["input_ids"]
    # the reference's tokens are those after the prompt's own tokenisation; merges across the boundary count
    # with the reference (the prompt prefix must still match, else tokenise the parts separately)
    if full[:len(p_ids)] != p_ids:
        full = p_ids + tokenizer(reference, add_special_tokens=False)["input_ids"]
    n_ref = len(full) - len(p_ids)
    if n_ref <= 0:
        return 0.0, 0
    device = next(model.parameters()).device
    ids = torch.tensor([full], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    targets = ids[0, 1:]
    token_lp = logp.gather(-1, targets[:, None])[:, 0]
    return float(token_lp[len(p_ids) - 1:].sum()), n_ref


def _routing_changed(store, base_id: int, steered_id: int) -> dict[int, float]:
    """Per sequence: share of prompt-token (layer) top-k sets that differ between the two runs."""
    rows = store.sql(
        "WITH a AS (SELECT seq_id, pos, layer, list_sort(list_transform(choices, lambda c: c >> 16)) AS e FROM "
        "routing_data WHERE run_id = ?), b AS (SELECT seq_id, pos, layer, list_sort(list_transform(choices, "
        "lambda c: c >> 16)) AS e FROM routing_data WHERE run_id = ?), t AS (SELECT seq_id, pos FROM token_data "
        "WHERE run_id = ? AND NOT generated) "
        "SELECT a.seq_id, avg(CASE WHEN a.e = b.e THEN 0.0 ELSE 1.0 END) AS changed FROM a JOIN b USING (seq_id, pos, "
        "layer) JOIN t USING (seq_id, pos) GROUP BY a.seq_id", [base_id, steered_id, base_id])
    return dict(zip(rows["seq_id"].to_list(), rows["changed"].to_list())) if rows.height else {}


def compare(model, tokenizer, records: list[SequenceRecord], spec: SteeringSpec, *, store, max_new_tokens: int = 32,
            name: str = "steer", batch_size: int = 8, model_ref: str | None = None, input_source: str = "python",
            backend: str = "auto", progress: bool = False) -> SteeringComparison:
    """Generate (greedy) for every record without and with ``spec``, trace both runs, score references."""
    from ..store import Store

    _resolve(model, spec)  # refuse a spec that does not fit this model before tracing anything
    st = store if isinstance(store, Store) else Store.open(store)
    opts = TraceOptions(batch_size=batch_size, max_new_tokens=max_new_tokens)
    base_records = copy.deepcopy(records)
    steered_records = copy.deepcopy(records)
    base = trace(model, tokenizer, base_records, store=st, name=f"{name}-base", tags=("steer", "base"), options=opts,
                 model_ref=model_ref, input_source=input_source, progress=progress)
    with steer(model, spec, backend=backend):
        steered = trace(model, tokenizer, steered_records, store=st, name=f"{name}-steered", tags=("steer", "steered"),
                        options=opts, model_ref=model_ref, input_source=input_source, progress=progress)
    changed = _routing_changed(st, base.info.run_id, steered.info.run_id)
    prompts = []
    for rec, b, s in zip(records, base_records, steered_records):
        ref = rec.meta.get("reference")
        pc = PromptComparison(rec.seq_id, rec.text, b.meta.get("generated_text"), s.meta.get("generated_text"),
                              reference=ref if isinstance(ref, str) else None,
                              routing_changed=changed.get(rec.seq_id))
        if pc.reference:
            pc.ll_base, pc.n_reference_tokens = reference_loglik(model, tokenizer, rec.text, pc.reference)
            with steer(model, spec, backend=backend):
                pc.ll_steered, _ = reference_loglik(model, tokenizer, rec.text, pc.reference)
            pc.delta_ll = pc.ll_steered - pc.ll_base
        prompts.append(pc)
    return SteeringComparison(base.info.run_id, steered.info.run_id, spec.to_dict(), prompts)
