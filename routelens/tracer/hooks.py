"""The PyTorch-hooks backend: records every forward of a model while active.

Per forward the recorder captures, without ever synchronising the device from the forward's thread:
- from a pre-hook on the base model: input ids, and from the attention mask which rows are real tokens and
  their true positions (so prefill, left/right padding and each decode step of `generate` are all handled
  the same way: position = cumulative count of attended tokens - 1);
- from a pre-hook on each MoE layer's `experts`: the executed (indices, weights), i.e. what the experts
  actually received, after any router-side bias, grouping or steering;
- optionally from a hook on each router: its raw logits (fp16);
- optionally from a hook on each decoder layer: max |residual| per token and its channel.
Device tensors are copied to the host with non_blocking copies; a CUDA event per device marks the end of the
forward, and a consumer thread waits on it, assembles a TokenBlock and hands it to the sink.

The forward's own thread does as little as it can: on a GPU every extra kernel launch or Python step in a hook
is host time the forward waits for (an eager MoE forward synchronises with the device in every layer). So the
hooks keep references and launch only what must run at that point (the residual reductions); the casts run
once per forward on the tensors stacked over the layers, and positions are derived from a host copy of the
attention mask by the consumer thread.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..adapters import ModelAdapter
from ..adapters.experts import ExpertActivationStats, install_expert_stats
from ..errors import UnsupportedModelError
from ..records import ExpertStat, TokenBlock


def _to_host(t: torch.Tensor) -> torch.Tensor:
    # On CUDA a non_blocking D2H copy lands in pinned memory and returns at once; on CPU the tensor is
    # already on the host and is fresh per forward (router outputs), so no copy is needed.
    if t.device.type == "cpu":
        return t
    return t.to("cpu", non_blocking=True)


@dataclass
class _Forward:
    """Everything captured during one forward, possibly still in flight on the device."""

    seq_ids: np.ndarray
    pos_offset: np.ndarray
    row_offset: int
    ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # host copy of the 2-D attention mask: pos and valid are derived from it
    seq_len: int = 0
    pos: torch.Tensor | None = None  # else these two come from the device
    valid: torch.Tensor | None = None
    experts: dict[int, torch.Tensor] | "_Stacked" = field(default_factory=dict)  # stacked at forward end
    weights: dict[int, torch.Tensor] | "_Stacked" = field(default_factory=dict)
    logits: dict[int, torch.Tensor] | "_Stacked" = field(default_factory=dict)
    # per decoder layer: (max, argmax, min, argmin) over channels on a GPU, (max |h|, argmax) on the CPU; folded
    # into max |h| (float32) and its channel (int32), stacked over the layers, at the end of the forward
    residual: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    res_val: "_Stacked | None" = None
    res_ch: "_Stacked | None" = None
    devices: set = field(default_factory=set)
    events: list = field(default_factory=list)

    def host_pos_valid(self) -> tuple[np.ndarray, np.ndarray]:
        """[B, S] int32 positions and bool real-token flags, on the host (call once the copies landed)."""
        if self.mask is None:
            return self.pos.numpy(), self.valid.numpy()
        m = self.mask.to(torch.int64).numpy()  # as the device path did: any mask dtype (numpy has no bfloat16)
        seq = self.seq_len
        return (np.cumsum(m, axis=-1)[:, -seq:] - 1).astype(np.int32), m[:, -seq:] != 0


@dataclass
class _Stacked:
    """Per-layer tensors of one forward stacked as [L, ...] on the host, in ascending layer order."""

    layers: tuple[int, ...]
    host: torch.Tensor | list[torch.Tensor]

    def numpy(self) -> np.ndarray:
        if isinstance(self.host, list):  # layers on several devices (device_map): stacked on the host
            return np.stack([t.numpy() for t in self.host])
        return self.host.numpy()


def _stack_to_host(per_layer: dict[int, torch.Tensor], dtype: torch.dtype | None = None) -> _Stacked:
    """The layers' tensors stacked (one kernel), cast to ``dtype`` (one more) and copied to the host (one copy)."""
    layers = tuple(sorted(per_layer))
    tensors = [per_layer[l] for l in layers]
    if len({t.device for t in tensors}) == 1:
        stacked = torch.stack(tensors)
        return _Stacked(layers, _to_host(stacked if dtype is None else stacked.to(dtype)))
    return _Stacked(layers, [_to_host(t if dtype is None else t.to(dtype)) for t in tensors])


def _abs_max(mx: torch.Tensor, imx: torch.Tensor, mn: torch.Tensor, imn: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """max |h| (float32) and its channel (int32), exactly as ``h.abs().max(-1)`` gives them, from ``h.max(-1)`` and
    ``h.min(-1)``: two reads of h instead of abs's read, write and re-read. torch returns the first index of
    equal extremes, so where |min| equals max the channel is the lower of the two; NaN propagates as in abs()."""
    neg = mn.neg()
    take_min = neg > mx
    first = torch.where(neg == mx, torch.minimum(imx, imn), imx)
    ch = torch.where(take_min, imn, first).to(torch.int32)
    val = torch.where(take_min, neg, mx).abs().float()  # abs: +0.0 where the max was -0.0, as abs() gives
    return val, ch


def _fold(parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |h|, channel) as float32 / int32 from what the residual hook kept (see there)."""
    if len(parts) == 4:
        return _abs_max(*parts)
    val, ch = parts
    return val.float(), ch.to(torch.int32)


def _residual_to_host(per_layer: dict[int, tuple[torch.Tensor, ...]]) -> tuple[_Stacked, _Stacked]:
    layers = tuple(sorted(per_layer))
    parts = [per_layer[l] for l in layers]
    if len({(p[0].device, len(p)) for p in parts}) == 1:
        val, ch = _fold(tuple(torch.stack([p[i] for p in parts]) for i in range(len(parts[0]))))
        return _Stacked(layers, _to_host(val)), _Stacked(layers, _to_host(ch))
    folded = [_fold(p) for p in parts]
    return _Stacked(layers, [_to_host(v) for v, _ in folded]), _Stacked(layers, [_to_host(c) for _, c in folded])


def _router_logits(output, num_experts: int) -> torch.Tensor | None:
    """The [T, E] logits in a router's output. The v5 contract puts them first; generic routers of some
    transformers versions order their outputs differently, so fall back to the one float [T, E] tensor."""
    outs = output if isinstance(output, tuple) else (output,)
    candidates = [t for t in outs if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2
                  and t.shape[-1] == num_experts]
    if outs and isinstance(outs[0], torch.Tensor) and any(outs[0] is c for c in candidates):
        return outs[0]
    return candidates[0] if len(candidates) == 1 else None


def _find_base_model(model: torch.nn.Module, decoder_layers: torch.nn.Module) -> torch.nn.Module:
    """The module that owns the decoder layers: its forward sees input_ids/attention_mask of every call,
    whether the user calls the CausalLM, the base model, or `generate`."""
    for module in model.modules():
        for child in module.children():
            if child is decoder_layers:
                return module
    return model


class RoutingRecorder:
    """Context manager recording routing of every forward of `model` into `sink(TokenBlock)`.

    The driver says which sequence each batch row is with `set_sequences` before a forward (or a
    `generate` call); rows not announced get fresh sequence ids, so plain `model(ids)` calls also work.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        adapter: ModelAdapter,
        sink: Callable[[TokenBlock], None],
        *,
        logits: bool = False,
        residual: bool = True,
        expert_stats: bool = False,
    ):
        self.model = model
        self.adapter = adapter
        self.sink = sink
        self.want_logits = logits
        self.want_residual = residual
        self.want_expert_stats = expert_stats
        self.layers = tuple(layer.index for layer in adapter.moe_layers)
        self._base = _find_base_model(model, adapter.decoder_layers)
        self._handles: list = []
        self._stats: dict[int, ExpertActivationStats] = {}
        self._seq_ids: np.ndarray | None = None
        self._pos_offset: np.ndarray | None = None
        self._next_seq = 0
        self._rows_seen = 0
        self._current: _Forward | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self.yield_s = 0.005
        self._draining = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # global row id -> (seq, pos) for the expert-stats argmax rows; filled by the consumer thread
        self._row_map: list[tuple[int, np.ndarray, np.ndarray]] = []

    # ----------------------------------------------------------------------------------------------- driver API
    def set_sequences(self, seq_ids: Sequence[int], pos_offset: Sequence[int] | None = None) -> None:
        self._seq_ids = np.asarray(seq_ids, dtype=np.int64)
        self._pos_offset = (
            np.zeros(len(seq_ids), dtype=np.int64) if pos_offset is None else np.asarray(pos_offset, dtype=np.int64)
        )

    def flush(self) -> None:
        """Block until every recorded forward has been handed to the sink."""
        self._draining = True  # the caller waits: no forward to yield the GIL to
        try:
            self._queue.join()
        finally:
            self._draining = False
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    # ----------------------------------------------------------------------------------------------- hooks
    def _pre_model(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if ids is None:
            embeds = kwargs.get("inputs_embeds")
            batch, seq = embeds.shape[:2]
            ids_t = torch.full((batch, seq), -1, dtype=torch.int64, device=embeds.device)
        else:
            batch, seq = ids.shape
            ids_t = ids.detach()
        device = ids_t.device
        if self._seq_ids is not None and len(self._seq_ids) == batch:
            seq_ids, pos_offset = self._seq_ids, self._pos_offset
        else:  # an un-announced forward: give it new sequence ids
            seq_ids = np.arange(self._next_seq, self._next_seq + batch, dtype=np.int64)
            pos_offset = np.zeros(batch, dtype=np.int64)
            self._next_seq += batch
        fwd = _Forward(seq_ids=seq_ids, pos_offset=pos_offset, row_offset=self._rows_seen)
        fwd.ids = ids_t.clone() if device.type == "cpu" else _to_host(ids_t)
        fwd.devices.add(device)
        self._rows_seen += batch * seq
        self._current = fwd
        if mask is not None and mask.dim() == 2 and not self._stats:
            # the common case: one copy of the mask; the consumer derives positions from it
            fwd.mask = mask.detach().clone() if mask.device.type == "cpu" else _to_host(mask.detach())
            fwd.devices.add(mask.device)  # its copy is ordered by that device's end-of-forward event
            fwd.seq_len = seq
            return
        if mask is not None and mask.dim() == 2:
            m = mask.detach().to(torch.int64)
            pos = m.cumsum(-1)[:, -seq:] - 1
            valid = m[:, -seq:] != 0
        else:
            # No mask (transformers' generate drops an all-ones mask at decode steps): positions come from
            # position_ids, else cache_position, else the cache's length; never from a call count.
            position_ids = kwargs.get("position_ids")
            cache_position = kwargs.get("cache_position")
            if position_ids is not None and position_ids.dim() <= 2 and position_ids.shape[-1] == seq:
                pos = position_ids.detach().to(torch.int64).reshape(-1, seq).expand(batch, seq)
            else:
                if cache_position is not None:
                    start = cache_position.reshape(-1)[:1].to(torch.int64)
                else:
                    cache = kwargs.get("past_key_values")
                    start = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
                pos = (torch.arange(seq, device=device) + start).expand(batch, seq)
            valid = torch.ones(batch, seq, dtype=torch.bool, device=device)
        fwd.pos = _to_host(pos.to(torch.int32))
        fwd.valid = _to_host(valid)
        for stats in self._stats.values():
            stats.row_offset = fwd.row_offset
            stats.valid_rows = valid.reshape(-1)

    def _make_experts_hook(self, layer: int, sort: bool):
        def hook(module, args, kwargs):
            fwd = self._current
            if fwd is None:
                return
            idx = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            w = args[2] if len(args) > 2 else kwargs.get("top_k_weights", kwargs.get("routing_weights"))
            if sort:  # routers with topk(sorted=False): store rank 0 = largest weight
                w, order = w.sort(dim=-1, descending=True, stable=True)
                idx = idx.gather(-1, order)
            # references only: cast to int16 / float16 once per forward, on all layers stacked
            fwd.experts[layer] = idx.detach()
            fwd.weights[layer] = w.detach()
            fwd.devices.add(idx.device)

        return hook

    def _make_router_hook(self, layer: int):
        num_experts = self.adapter.num_experts

        def hook(module, args, output):
            fwd = self._current
            if fwd is None:
                return
            logits = _router_logits(output, num_experts)
            if logits is None:
                raise UnsupportedModelError(
                    f"the router of layer {layer} ({type(module).__name__}) returns no [tokens, {num_experts}] "
                    "logits in this transformers version; trace without --logits"
                )
            fwd.logits[layer] = logits.detach().to(torch.float16)

        return hook

    def _make_residual_hook(self, layer: int):
        def hook(module, args, output):
            fwd = self._current
            if fwd is None:
                return
            h = (output[0] if isinstance(output, tuple) else output).detach()
            # Reduced now (h changes after this layer), cast once per forward on all layers stacked. On a GPU,
            # max and min (two reads of h, folded into max |h| and its channel at forward end) instead of abs()
            # and max (read, write and re-read of a [tokens, hidden] temporary); on the CPU abs().max() is faster.
            if h.device.type == "cpu":
                fwd.residual[layer] = tuple(h.abs().max(dim=-1))
            else:
                fwd.residual[layer] = (*h.max(dim=-1), *h.min(dim=-1))
            fwd.devices.add(h.device)

        return hook

    def _post_model(self, module, args, kwargs, output):
        fwd, self._current = self._current, None
        if fwd is None:
            return
        # One stacked device->host copy per kind instead of one per layer: less host work for the consumer,
        # which shares the GIL with the thread launching the next forward.
        if fwd.experts:
            fwd.experts = _stack_to_host(fwd.experts, torch.int16)
            fwd.weights = _stack_to_host(fwd.weights, torch.float16)
        if fwd.logits:
            fwd.logits = _stack_to_host(fwd.logits)
        if fwd.residual:
            fwd.res_val, fwd.res_ch = _residual_to_host(fwd.residual)
            fwd.residual = {}
        for dev in fwd.devices:
            if dev.type == "cuda":
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(dev))
                fwd.events.append(ev)
        self._queue.put(fwd)

    # ----------------------------------------------------------------------------------------------- consumer
    def _consume(self):
        while True:
            fwd = self._queue.get()
            try:
                if fwd is None:
                    return
                if self._error is None:
                    for ev in fwd.events:
                        ev.synchronize()
                    if fwd.events and not self._draining:
                        # The main thread wakes at the same moment (the next forward syncs on this one's end) and
                        # must launch the next kernels now; host work here would hold the GIL and starve the GPU.
                        time.sleep(self.yield_s)
                    block = self._assemble(fwd)
                    if block is not None:
                        self.sink(block)
            except BaseException as exc:  # surfaced to the driver at the next flush()
                self._error = exc
            finally:
                self._queue.task_done()

    def _assemble(self, fwd: _Forward) -> TokenBlock | None:
        pos_all, valid = fwd.host_pos_valid()
        batch, seq = valid.shape
        valid = valid.reshape(-1)
        pos_all = pos_all.reshape(-1)
        rows = np.flatnonzero(valid)
        b = rows // seq
        seq_id = fwd.seq_ids[b]
        pos = pos_all[rows].astype(np.int64) + fwd.pos_offset[b]
        if self.want_expert_stats:
            all_rows = np.arange(batch * seq)
            row_pos = pos_all.astype(np.int64) + fwd.pos_offset[all_rows // seq]
            row_seq = np.where(valid, fwd.seq_ids[all_rows // seq], -1)
            self._row_map.append((fwd.row_offset, row_seq, row_pos))
        if rows.size == 0 or not fwd.experts:
            return None
        every = rows.size == valid.size  # no padding: views, no copies

        def take(stacked: _Stacked, flat_tail: int) -> np.ndarray:
            arr = stacked.numpy()
            arr = arr.reshape(arr.shape[0], batch * seq, *arr.shape[flat_tail:])
            return arr if every else arr[:, rows]

        layers = fwd.experts.layers
        experts = take(fwd.experts, 2).view(np.uint16)
        weights = take(fwd.weights, 2)
        logits = take(fwd.logits, 2) if fwd.logits else None
        res_layers, res_val, res_ch = (), None, None
        if fwd.res_val is not None:
            res_layers = fwd.res_val.layers
            res_val, res_ch = take(fwd.res_val, 3), take(fwd.res_ch, 3)
        return TokenBlock(
            seq_id=seq_id,
            pos=pos.astype(np.int32),
            token_id=fwd.ids.numpy().reshape(-1)[rows].astype(np.int32),
            layers=layers,
            experts=experts,
            weights=weights,
            logits=logits,
            residual_layers=res_layers,
            residual_max=res_val,
            residual_channel=res_ch,
        )

    # ----------------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "RoutingRecorder":
        self._handles.append(self._base.register_forward_pre_hook(self._pre_model, with_kwargs=True))
        self._handles.append(self._base.register_forward_hook(self._post_model, with_kwargs=True))
        sort = not self.adapter.router_output_sorted
        for layer in self.adapter.moe_layers:
            self._handles.append(
                layer.experts.register_forward_pre_hook(self._make_experts_hook(layer.index, sort), with_kwargs=True)
            )
            if self.want_logits:
                self._handles.append(layer.router.register_forward_hook(self._make_router_hook(layer.index)))
            if self.want_expert_stats:
                device = layer.experts.down_proj.device
                stats = ExpertActivationStats(self.adapter.num_experts, device)
                self._stats[layer.index] = stats
                self._handles.append(install_expert_stats(layer, self.adapter.experts_layout, stats))
        if self.want_residual:
            for i, dec in enumerate(self.adapter.decoder_layers):
                self._handles.append(dec.register_forward_hook(self._make_residual_hook(i)))
        self._thread = threading.Thread(target=self._consume, name="routelens-recorder", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc[0] is None:
            err, self._error = self._error, None
            raise err

    # ----------------------------------------------------------------------------------------------- expert stats
    def expert_stats(self) -> list[ExpertStat]:
        """Per (layer, expert) activation extremes, with argmax rows mapped back to (seq, pos)."""
        self.flush()
        if not self._stats:
            return []
        offsets = np.array([o for o, _, _ in self._row_map], dtype=np.int64)
        order = np.argsort(offsets)
        offsets = offsets[order]
        seqs = [self._row_map[i][1] for i in order]
        poss = [self._row_map[i][2] for i in order]

        def locate(row: int) -> tuple[int, int]:
            if row < 0 or offsets.size == 0:
                return -1, -1
            j = int(np.searchsorted(offsets, row, side="right") - 1)
            local = row - offsets[j]
            if local >= seqs[j].shape[0]:
                return -1, -1
            return int(seqs[j][local]), int(poss[j][local])

        out: list[ExpertStat] = []
        for layer, st in sorted(self._stats.items()):
            cols = {
                name: getattr(st, name).detach().cpu().numpy()
                for name in ("n_tokens", "max_out", "max_out_row", "max_out_channel", "max_in", "max_in_row", "max_in_channel")
            }
            for e in range(self.adapter.num_experts):
                if cols["n_tokens"][e] == 0:
                    continue
                os_, op = locate(int(cols["max_out_row"][e]))
                is_, ip = locate(int(cols["max_in_row"][e]))
                out.append(
                    ExpertStat(
                        layer=layer, expert=e, n_tokens=int(cols["n_tokens"][e]),
                        max_out=float(cols["max_out"][e]), max_out_seq=os_, max_out_pos=op,
                        max_out_channel=int(cols["max_out_channel"][e]),
                        max_in=float(cols["max_in"][e]), max_in_seq=is_, max_in_pos=ip,
                        max_in_channel=int(cols["max_in_channel"][e]),
                    )
                )
        return out
