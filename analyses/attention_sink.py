"""Model-side measures behind ``super-experts``: attention mass on the first token (the attention sink) and
held-out perplexity, on the intact model and with experts removed (both removal modes).

Sources: Su et al., "Unveiling Super Experts in Mixture-of-Experts LLMs" (arXiv 2507.23279; repo
``ZunhaiSu/Super-Experts-Profilling``): pruning super experts destroys the attention sinks and raises WikiText-2
perplexity (algorithms.md §2.4-2.5). Differences from the reference evaluation, on purpose:

* perplexity is measured on held-out texts, each tokenised on its own the way the tokenizer does it (BOS
  included when the tokenizer adds one) and cut at ``seq_len`` tokens, rather than on 2048-token windows of
  WikiText-2 joined with ``"\\n\\n"``: the shipped model organism was trained on short ``<s> text`` items, and a
  sequence start is where sinks form;
* the attention sink is read from the eager attention probabilities through a forward hook on each decoder layer's
  ``self_attn`` (its output ``(attn_output, attn_weights)``) and reduced at once, so the ``[B, H, S, S]`` tensors of
  all layers are never held together (``output_attentions=True`` would keep every layer's).

Removal modes (``ablated``): ``"weights"`` zeroes the expert's ``down_proj`` (the paper's pruning; the router is
untouched, so tokens still go to the expert and its share of the weighted sum is lost) through
``routelens.steering.remove_experts``; ``"router"`` disables the expert at the router (it is never selected and
the other experts take its place) through ``routelens.steering.steer`` with a ``disable`` rule.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from routelens.errors import InputError, UnsupportedModelError

__all__ = ["MODES", "HeldoutBatch", "Measurement", "first_token_mass", "token_nll", "default_heldout_files",
           "heldout_texts", "encode_texts", "make_batches", "measure", "ablated", "load_model_ref", "pad_id_of"]

MODES = ("weights", "router")

# The shipped corpus' held-out splits (data/README.md), relative to the repository root.
_CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus"
_HELDOUT_FILES = ("reasoning.heldout.jsonl.gz", "parallel.heldout.jsonl.gz")


# ---------------------------------------------------------------------------------------------- pure reductions

def first_token_mass(attn: Tensor, query_valid: Tensor) -> tuple[Tensor, int]:
    """Attention mass on the first key, summed per head over the valid queries at positions >= 1.

    ``attn``: attention probabilities ``[B, H, Q, K]`` (row q = query position q, column 0 = the sequence's first
    token; right padding, so position 0 is the first real token); ``query_valid``: bool ``[B, Q]``.
    Returns ``(sums[H] float64, count)`` with ``sums[h] = Σ_{b, q>=1, valid} attn[b, h, q, 0]``; the mean over
    queries (the sink measure) is ``sums / count``, pooled over every sequence of every batch. Query 0 is left
    out because it can only attend to itself (its mass on the first token is 1 by causality).
    """
    mask = query_valid.to(torch.bool).clone()
    mask[:, 0] = False
    w = attn[..., 0].to(torch.float64)  # [B, H, Q]
    sums = (w * mask[:, None, :].to(w.dtype)).sum(dim=(0, 2))
    return sums, int(mask.sum())


def token_nll(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens.

    NLL = Σ_{b, t>=1, mask[b,t]} −log softmax(logits[b, t−1])[input_ids[b, t]] (natural log); perplexity over a
    set of batches is ``exp(Σ NLL / Σ n)``. Right padding: a position t is predicted iff ``attention_mask[b, t]``.
    """
    target = input_ids[:, 1:]
    keep = attention_mask[:, 1:].to(torch.bool)
    nll = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                      reduction="none").reshape(target.shape)
    return float(nll[keep].double().sum()), int(keep.sum())


# ------------------------------------------------------------------------------------------------ held-out text

def default_heldout_files() -> list[Path]:
    """The shipped corpus' held-out splits, or an error naming the way out when the checkout has no data/."""
    files = [_CORPUS / name for name in _HELDOUT_FILES]
    if not all(f.exists() for f in files):
        raise InputError(f"no held-out corpus under {_CORPUS}; pass --heldout FILE (.txt, one text a line, or "
                         ".jsonl with a text field)")
    return files


def _texts_of(path: Path) -> list[str]:
    from routelens.tracer.inputs import read_inputs

    return [r.text for r in read_inputs(path)]


def heldout_texts(path: str | Path | None) -> Iterator[str]:
    """Held-out texts: those of ``path`` (.txt / .jsonl / .jsonl.gz) in file order, or by default the corpus'
    reasoning and parallel held-out splits taken alternately (first lines first), so both kinds are measured."""
    if path is not None:
        yield from _texts_of(Path(path))
        return
    streams = [iter(_texts_of(f)) for f in default_heldout_files()]
    while streams:
        for s in list(streams):
            text = next(s, None)
            if text is None:
                streams.remove(s)
            else:
                yield text


def encode_texts(tokenizer, texts: Iterable[str], *, max_tokens: int, seq_len: int) -> list[list[int]]:
    """Token ids of texts taken in order until ``max_tokens`` tokens are gathered; each text tokenised alone (with
    the tokenizer's own specials) and cut to ``seq_len`` tokens; texts under 2 tokens (nothing to predict) skipped."""
    if max_tokens < 2 or seq_len < 2:
        raise InputError(f"max_tokens and seq_len must be >= 2, got {max_tokens} and {seq_len}")
    out, total = [], 0
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])[:seq_len]
        ids = ids[: max_tokens - total]
        if len(ids) < 2:
            if total >= max_tokens - 1:
                break
            continue
        out.append(ids)
        total += len(ids)
        if total >= max_tokens:
            break
    if not out:
        raise InputError("the held-out texts gave no sequence of 2 tokens or more; pass a --heldout file with text")
    return out


@dataclass(frozen=True)
class HeldoutBatch:
    """Right-padded token ids ``[B, S]`` and their attention mask (1 = real token)."""

    input_ids: Tensor
    attention_mask: Tensor


def make_batches(seqs: list[list[int]], *, batch_size: int, pad_id: int = 0) -> list[HeldoutBatch]:
    """Right-padded batches (position 0 stays each sequence's first token) of at most ``batch_size`` sequences.

    Sequences are taken shortest first (stable) and a batch is closed early when the next sequence would make its
    padded size exceed twice its real tokens, so padding costs at most as much compute as the text itself
    (perplexity and the sink measure are pooled sums, so the order does not change them).
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    groups: list[list[list[int]]] = []
    real = 0
    for s in sorted(seqs, key=len):
        g = groups[-1] if groups else None
        if g is None or len(g) >= batch_size or (len(g) + 1) * len(s) > 2 * (real + len(s)):
            groups.append([s])
            real = len(s)
        else:
            g.append(s)
            real += len(s)
    batches = []
    for chunk in groups:
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[j, :len(s)] = 1
        batches.append(HeldoutBatch(ids, mask))
    return batches


# ------------------------------------------------------------------------------------------------ measuring

@dataclass
class Measurement:
    """Perplexity and attention-sink sums of one pass over the held-out batches."""

    nll_sum: float = 0.0
    n_predicted: int = 0
    sink_sum: dict[int, np.ndarray] = field(default_factory=dict)  # decoder layer -> float64 [H]
    sink_count: dict[int, int] = field(default_factory=dict)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.n_predicted) if self.n_predicted else float("nan")

    def sink_mass(self, layer: int) -> np.ndarray:
        """Mean attention probability on the first token per head (queries at positions >= 1, pooled)."""
        c = self.sink_count.get(layer, 0)
        return self.sink_sum[layer] / c if c else np.full_like(self.sink_sum[layer], np.nan)


def _decoder_layers(model: nn.Module):
    from routelens.adapters import adapt
    from routelens.tracer.session import unwrap

    return adapt(unwrap(model)).decoder_layers


@contextmanager
def _eager_attention(model: nn.Module):
    """Eager attention inside the block (the only implementation that materialises the probabilities)."""
    from routelens.tracer.session import unwrap

    base = unwrap(model)
    previous = getattr(base.config, "_attn_implementation", None)
    if previous == "eager":
        yield
        return
    if not hasattr(base, "set_attn_implementation"):
        raise UnsupportedModelError(f"{type(base).__name__} cannot switch to eager attention; the attention sink "
                                    "needs attention probabilities")
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(previous)


def measure(model: nn.Module, batches: list[HeldoutBatch], *, attention: bool = True) -> Measurement:
    """One pass of ``model`` over ``batches`` under eager attention: summed NLL (``token_nll``) and, when
    ``attention``, the first-token attention sums per decoder layer and head (``first_token_mass``). The model's
    attention implementation is restored afterwards. Sliding-window layers (gpt-oss) see the first token only from
    queries inside the window; the others add 0 to the pooled mean."""
    device = next(model.parameters()).device
    result = Measurement()
    current: dict[str, Tensor] = {}
    hooks = []

    def make_hook(i: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise UnsupportedModelError(f"decoder layer {i}'s attention returned no probabilities under eager "
                                            "attention; the attention sink cannot be measured for this model")
            sums, count = first_token_mass(weights.detach(), current["valid"].to(weights.device))
            prev = result.sink_sum.get(i)
            result.sink_sum[i] = sums.cpu().numpy() + (0.0 if prev is None else prev)
            result.sink_count[i] = result.sink_count.get(i, 0) + count

        return hook

    # eager for every pass, measured or not: sdpa and eager differ in the last bits (in bfloat16 by ~1e-3 in
    # perplexity), which would leak into the before/after deltas
    with _eager_attention(model), torch.no_grad():
        if attention:
            for i, layer in enumerate(_decoder_layers(model)):
                attn = getattr(layer, "self_attn", None)
                if attn is None:
                    raise UnsupportedModelError(f"decoder layer {i} has no self_attn module; the attention sink "
                                                "cannot be measured for this model (use --stats-only)")
                hooks.append(attn.register_forward_hook(make_hook(i)))
        try:
            for b in batches:
                ids, mask = b.input_ids.to(device), b.attention_mask.to(device)
                current["valid"] = mask.to(torch.bool)
                out = model(input_ids=ids, attention_mask=mask, use_cache=False)
                nll, n = token_nll(out.logits, ids, mask)
                result.nll_sum += nll
                result.n_predicted += n
        finally:
            for h in hooks:
                h.remove()
    return result


@contextmanager
def ablated(model: nn.Module, pairs: list[tuple[int, int]], mode: str):
    """Remove the ``(layer, expert)`` pairs inside the block: ``"weights"`` (down_proj zeroed, router untouched)
    or ``"router"`` (disabled at the router, re-routed); see the module docstring. Restored on exit."""
    from routelens.steering import remove_experts, spec_from_pairs, steer

    if mode == "weights":
        with remove_experts(model, pairs):
            yield
    elif mode == "router":
        with steer(model, spec_from_pairs(pairs, "disable", name="super-experts ablation")):
            yield
    else:
        raise InputError(f"unknown removal mode {mode!r}; use one of {', '.join(MODES)}")


def load_model_ref(ref: str, *, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer) for ``tiny:FAMILY`` (the random-init tiny model the CLI traces) or a local folder."""
    if ref.startswith("tiny:"):
        from routelens.tiny import build_tiny_model, byte_tokenizer

        model = build_tiny_model(ref.split(":", 1)[1])
        return (model.to(device) if device else model), byte_tokenizer()
    from routelens.loading import load_model

    return load_model(ref, dtype=dtype, device=device)


def pad_id_of(tokenizer) -> int:
    """A pad id for batching (masked out, so any valid id works)."""
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    return 0

