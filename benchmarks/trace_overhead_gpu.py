"""Traced vs untraced throughput on a GPU, OLMoE-1B-7B-shaped random-init bf16 model, 16,384 tokens a forward.

Configurations, interleaved round by round so drift hits all alike (each round = N forwards; a traced round
is timed from its first forward to the store's durable commit of the whole run, so store writes count):
  untraced                      plain forwards
  routelens top-k               experts pre-hooks -> host -> background DuckDB writer
  routelens top-k + residual    (the tracer's default) plus per-layer max |residual|
  routelens top-k + logits      plus full fp16 router logits
  nnsight save top-k            nnsight trace saving the same (indices, weights) per layer, copied to host
Also: peak host memory (RSS) while tracing 1 M tokens with the default options.

Run: python benchmarks/trace_overhead_gpu.py --out DIR   (needs a CUDA GPU)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from olmoe_shape import build  # noqa: E402
from routelens.adapters import adapt  # noqa: E402
from routelens.store import Store  # noqa: E402
from routelens.tracer.driver import TraceOptions, run_meta  # noqa: E402
from routelens.tracer.hooks import RoutingRecorder  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--forwards", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--memory-tokens", type=int, default=1_000_000)
    ap.add_argument("--flush-interval", type=float, default=None, help="writer flush interval (s); default: the store's")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = build(args.layers)
    adapter = adapt(model)
    T = args.batch * args.seq
    ids = torch.randint(2, 50304, (args.batch, args.seq), device="cuda")
    mask = torch.ones_like(ids)
    tmp = Path(tempfile.mkdtemp())
    from routelens.store import WriterConfig

    wc = WriterConfig(flush_interval_s=args.flush_interval) if args.flush_interval else None
    store = Store.open(tmp / "bench.duckdb", writer_config=wc)
    seq_base = [0]

    def forwards(n):
        for _ in range(n):
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    def untraced():
        torch.cuda.synchronize()
        t = time.perf_counter()
        forwards(args.forwards)
        torch.cuda.synchronize()
        loops.setdefault("untraced", []).append(time.perf_counter() - t)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    tails = {}
    loops = {}

    def traced(logits=False, residual=False, to_store=True, key=None):
        def go():
            opts = TraceOptions(logits=logits, residual=residual)
            meta = run_meta(model, adapter, model_ref="olmoe-1b-7b-shaped", input_source="bench", name=None,
                            tags=(), options=opts)
            torch.cuda.synchronize()
            t = time.perf_counter()
            writer = store.create_run(meta)
            sink = writer.add_block if to_store else (lambda block: None)
            with writer, RoutingRecorder(model, adapter, sink, logits=logits, residual=residual) as rec:
                for _ in range(args.forwards):
                    rec.set_sequences(range(seq_base[0], seq_base[0] + args.batch))
                    seq_base[0] += args.batch
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                torch.cuda.synchronize()
                t_loop = time.perf_counter()
                rec.flush()
                writer.finish("complete")
            t_end = time.perf_counter()
            tails.setdefault(key, []).append(round(t_end - t_loop, 4))
            loops.setdefault(key, []).append(t_loop - t)
            return t_end - t
        return go

    def nnsight_save():
        import nnsight
        from nnsight import NNsight

        nm = NNsight(model)
        paths = [(l.index, "mlp" if hasattr(model.model.layers[l.index], "mlp") else None) for l in adapter.moe_layers]

        def go():
            torch.cuda.synchronize()
            t = time.perf_counter()
            kept = []
            for _ in range(args.forwards):
                with nm.trace(input_ids=ids, attention_mask=mask, use_cache=False):
                    saved = nnsight.save([nm.model.layers[i].mlp.gate.output for i, _ in paths])
                # the same tensors routelens keeps: executed indices and weights, on the host
                kept.append([(o[2].to(torch.int16).to("cpu", non_blocking=True),
                              o[1].to(torch.float16).to("cpu", non_blocking=True)) for o in saved])
            torch.cuda.synchronize()
            return time.perf_counter() - t
        return go

    configs = {
        "untraced": untraced,
        "routelens hooks only (no store)": traced(to_store=False, key="hooks only"),
        "routelens top-k": traced(key="top-k"),
        "routelens top-k + residual": traced(residual=True, key="top-k + residual"),
        "routelens top-k + logits": traced(logits=True, key="top-k + logits"),
        "nnsight save top-k": nnsight_save(),
    }
    with torch.no_grad():
        for fn in configs.values():  # warm-up: kernels, allocator, pinned host cache, DuckDB file
            fn()
        times = {k: [] for k in configs}
        for r in range(args.rounds):
            order = list(configs) if r % 2 == 0 else list(reversed(configs))
            for k in order:
                times[k].append(configs[k]())

        # peak host memory while tracing ~1 M tokens with the tracer's defaults (top-k + residual)
        n_fw = max(1, args.memory_tokens // T)
        rss0 = rss_mib()
        opts = TraceOptions()
        meta = run_meta(model, adapter, model_ref="olmoe-1b-7b-shaped", input_source="bench-memory", name="memory",
                        tags=(), options=opts)
        peak = rss0
        t0 = time.perf_counter()
        writer = store.create_run(meta)
        with writer, RoutingRecorder(model, adapter, writer.add_block) as rec:
            for i in range(n_fw):
                rec.set_sequences(range(seq_base[0], seq_base[0] + args.batch))
                seq_base[0] += args.batch
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                peak = max(peak, rss_mib())
            rec.flush()
            peak = max(peak, rss_mib())
            info = writer.finish("complete")
        mem_wall = time.perf_counter() - t0

    per_fw = {k: statistics.median(v) / args.forwards for k, v in times.items()}
    base = per_fw["untraced"]
    decisions = T * len(adapter.moe_layers) * adapter.top_k
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "shape": {"layers": args.layers, "hidden": 2048, "experts": 64, "top_k": 8, "tokens_per_forward": T},
        "forwards_per_round": args.forwards, "rounds": args.rounds,
        "ms_per_forward": {k: round(v * 1000, 2) for k, v in per_fw.items()},
        # end to end: from the run's creation to its durable commit, N forwards a run
        "throughput_vs_untraced": {k: round(base / v, 4) for k, v in per_fw.items()},
        # steady state: the forward loop alone (what a long trace converges to; the commit tail is per run)
        "steady_state_vs_untraced": {k: round(statistics.median(loops["untraced"]) / statistics.median(v), 4)
                                     for k, v in loops.items()},
        "memory_run_vs_untraced": round(base * n_fw / mem_wall, 4),
        "decisions_per_s_traced_topk": round(decisions / per_fw["routelens top-k"]),
        "memory": {"tokens": info.n_tokens, "decisions": info.n_decisions, "rss_before_mib": round(rss0),
                   "rss_peak_mib": round(peak), "rss_growth_mib": round(peak - rss0), "wall_s": round(mem_wall, 2),
                   "store_bytes": os.path.getsize(tmp / "bench.duckdb")},
        "raw_round_seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "tail_seconds_after_last_forward": tails,
    }
    (out / "trace_overhead_gpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
