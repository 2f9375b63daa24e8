"""Instrumented experts forward for Super-Experts profiling under transformers v5 fused experts.

v5 stores all experts of a layer as 3-D parameters and has no per-expert ``down_proj`` module to hook, so
``install_expert_stats`` swaps the experts module's ``forward`` (on the instance) for an eager loop that
reproduces the layout's math op for op -- bit-identical to ``experts_implementation="eager"`` -- and on
the way records, per expert, how many tokens it got and the extremes of its ``down_proj`` input and output.

Statistics (one MoE layer, accumulated over forwards, kept on the experts' device; no host sync of their
own -- the eager loop already syncs once per forward to find the hit experts, as HF's eager code does):

* ``n_tokens[e]``: routed (token, expert) pairs, padding rows excluded;
* ``max_out[e]``: max |down_proj output| over routed tokens and all channels, BEFORE the routing weight
  (gpt-oss: including ``down_proj_bias``), with its global token row and channel;
* ``max_in[e]``: max |down_proj input| = max |act(gate) * up|, with its row and channel.

Rows are global: ``row_offset + local row`` where local row indexes the flattened ``[B*S]`` tokens of the
forward. Rows/channels are -1 while an expert has no routed valid token. Unlike the Super Experts
reference code (which hooks ``down_proj`` and reads ``output[0]``, i.e. only the first routed token), the
max runs over all routed tokens.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .base import MoELayer

__all__ = ["ExpertActivationStats", "ExpertStatsHandle", "install_expert_stats"]

_MARK = "_routelens_expert_stats"


class ExpertActivationStats:
    """Device-resident accumulators for one MoE layer (see the module docstring for the definitions)."""

    def __init__(self, num_experts: int, device: torch.device | str = "cpu") -> None:
        self.num_experts = num_experts
        self.device = torch.device(device)
        self.row_offset: int = 0  # set by the tracer before each forward
        self.valid_rows: Tensor | None = None  # bool [T] for the next forward; None = every row counts
        self.reset()

    def reset(self) -> None:
        e, dev = self.num_experts, self.device
        self.n_tokens = torch.zeros(e, dtype=torch.int64, device=dev)
        self.max_out = torch.zeros(e, dtype=torch.float32, device=dev)
        self.max_out_row = torch.full((e,), -1, dtype=torch.int64, device=dev)
        self.max_out_channel = torch.full((e,), -1, dtype=torch.int64, device=dev)
        self.max_in = torch.zeros(e, dtype=torch.float32, device=dev)
        self.max_in_row = torch.full((e,), -1, dtype=torch.int64, device=dev)
        self.max_in_channel = torch.full((e,), -1, dtype=torch.int64, device=dev)

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Copy every accumulator to the host (one sync), keyed by field name."""
        names = ("n_tokens", "max_out", "max_out_row", "max_out_channel", "max_in", "max_in_row", "max_in_channel")
        return {name: getattr(self, name).cpu().numpy() for name in names}

    # -- called by the instrumented forward ------------------------------------------------------------------

    def _count(self, top_k_index: Tensor) -> None:
        """n_tokens += routed pairs per expert, over valid rows; sentinel ids (== E) are dropped."""
        idx = top_k_index if self.valid_rows is None else top_k_index[self.valid_rows.to(top_k_index.device)]
        counts = torch.bincount(idx.reshape(-1), minlength=self.num_experts + 1)[: self.num_experts]
        self.n_tokens += counts.to(self.device)

    def _expert_max(self, values: Tensor, token_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(max |values| over valid rows, global row, channel) of one expert's ``[n, C]`` activations.

        Invalid rows are set to -1 so they never win (|x| >= 0); if no row is valid the max is -1.
        """
        a = values.detach().abs()
        if self.valid_rows is not None:
            valid = self.valid_rows.to(token_idx.device)[token_idx]
            a = a.masked_fill(~valid[:, None], -1)
        m, flat = a.reshape(-1).max(dim=0)
        channels = a.shape[1]
        return m.float(), token_idx[flat // channels] + self.row_offset, flat % channels

    def _merge(self, which: str, experts: list[int], found: list[tuple[Tensor, Tensor, Tensor]]) -> None:
        """Fold this forward's per-expert maxima into the running ones (strictly larger wins: first row stays)."""
        if not experts:
            return
        ids = torch.tensor(experts, dtype=torch.int64, device=self.device)
        m = torch.stack([f[0] for f in found]).to(self.device)
        row = torch.stack([f[1] for f in found]).to(self.device)
        ch = torch.stack([f[2] for f in found]).to(self.device)
        best = getattr(self, f"max_{which}")
        best_row = getattr(self, f"max_{which}_row")
        best_ch = getattr(self, f"max_{which}_channel")
        # An expert seen for the first time takes its max even if it is 0, so its row/channel get set.
        take = (m > best[ids]) | ((best_row[ids] < 0) & (m >= 0))
        best[ids] = torch.where(take, m, best[ids])
        best_row[ids] = torch.where(take, row, best_row[ids])
        best_ch[ids] = torch.where(take, ch, best_ch[ids])


def _hit_experts(top_k_index: Tensor, num_experts: int) -> tuple[Tensor, list[int]]:
    """HF eager's expert mask ``[E+1, k, T]`` and the ascending ids of the experts that got a token."""
    with torch.no_grad():
        # num_classes = E + 1 like the v5 eager code: index E is the expert-parallel sentinel, skipped below
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    return expert_mask, [e for e in expert_hit[:, 0].tolist() if e != num_experts]


def _gate_up_fused_forward(
    self: nn.Module, stats: ExpertActivationStats, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """Standard v5 experts (OLMoE, Qwen, Mixtral, PhiMoE, DeepSeek, ...), op for op as ``OlmoeExperts.forward``::

        gate, up = linear(x, gate_up_proj[e]).chunk(2, -1);  h = act_fn(gate) * up;  y = linear(h, down_proj[e])
        out[token] += y * w[token, slot]        (index_add_ in ascending expert order)
    """
    final_hidden_states = torch.zeros_like(hidden_states)
    expert_mask, hit = _hit_experts(top_k_index, self.num_experts)
    stats._count(top_k_index)
    found_in, found_out = [], []
    for expert_idx in hit:
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate, up = nn.functional.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
        down_in = self.act_fn(gate) * up
        down_out = nn.functional.linear(down_in, self.down_proj[expert_idx])
        found_in.append(stats._expert_max(down_in, token_idx))
        found_out.append(stats._expert_max(down_out, token_idx))
        current_hidden_states = down_out * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    stats._merge("in", hit, found_in)
    stats._merge("out", hit, found_out)
    return final_hidden_states


def _gpt_oss_forward(
    self: nn.Module, stats: ExpertActivationStats, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """gpt-oss experts, op for op as ``GptOssExperts.forward`` (transposed weights, biases, interleaved)::

        gate_up = x @ gate_up_proj[e] + gate_up_proj_bias[e]
        gate, up = gate_up[..., ::2].clamp(max=limit), gate_up[..., 1::2].clamp(-limit, limit)
        h = (up + 1) * gate * sigmoid(gate * alpha);  y = h @ down_proj[e] + down_proj_bias[e]
        out[token] += y * w[token, slot]
    """
    next_states = torch.zeros_like(hidden_states, dtype=hidden_states.dtype, device=hidden_states.device)
    expert_mask, hit = _hit_experts(top_k_index, self.num_experts)
    stats._count(top_k_index)
    found_in, found_out = [], []
    for expert_idx in hit:
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate_up = current_state @ self.gate_up_proj[expert_idx] + self.gate_up_proj_bias[expert_idx]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        down_in = (up + 1) * glu
        down_out = down_in @ self.down_proj[expert_idx] + self.down_proj_bias[expert_idx]
        found_in.append(stats._expert_max(down_in, token_idx))
        found_out.append(stats._expert_max(down_out, token_idx))
        weighted_output = down_out * top_k_weights[token_idx, top_k_pos, None]
        next_states.index_add_(0, token_idx, weighted_output.to(hidden_states.dtype))
    stats._merge("in", hit, found_in)
    stats._merge("out", hit, found_out)
    return next_states


_FORWARDS = {"gate_up_fused": _gate_up_fused_forward, "gpt_oss": _gpt_oss_forward}


@dataclass
class ExpertStatsHandle:
    """Undo for ``install_expert_stats``; also a context manager."""

    experts: nn.Module
    _had_instance_forward: bool
    _previous: object
    _removed: bool = False

    def remove(self) -> None:
        """Restore the experts module's forward exactly as it was (idempotent)."""
        if self._removed:
            return
        if self._had_instance_forward:
            self.experts.forward = self._previous
        else:
            del self.experts.forward  # falls back to the class's (experts_implementation-dispatching) forward
        delattr(self.experts, _MARK)
        self._removed = True

    def __enter__(self) -> ExpertStatsHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def install_expert_stats(layer: MoELayer, layout: str, stats: ExpertActivationStats) -> ExpertStatsHandle:
    """Replace ``layer.experts.forward`` on the instance by the instrumented eager forward of ``layout``.

    Forward pre-hooks on the experts module still fire (they run before ``forward``). The model's
    ``experts_implementation`` is bypassed for this module while installed; ``handle.remove()`` restores it.
    """
    if layout not in _FORWARDS:
        raise UnsupportedModelError(
            f"expert activation statistics are not available for the {layout!r} experts layout of layer "
            f"{layer.index} ({type(layer.experts).__name__}); profile a model of a supported family instead"
        )
    experts = layer.experts
    if hasattr(experts, _MARK):
        raise RuntimeError(f"expert statistics are already installed on layer {layer.index}; remove that handle first")
    body = _FORWARDS[layout]

    def forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return body(self, stats, hidden_states, top_k_index, top_k_weights)

    had_instance_forward = "forward" in experts.__dict__
    previous = experts.__dict__.get("forward")
    experts.forward = types.MethodType(forward, experts)
    setattr(experts, _MARK, stats)
    return ExpertStatsHandle(experts, had_instance_forward, previous)
