"""End-to-end steering overhead on a GPU: OLMoE-1B-7B-shaped random-init bf16 model (16 layers, 64 experts, top-8).

Configurations, measured side by side in one process and interleaved round by round so drift hits all alike:
  unsteered                   no hooks
  steer triton (full spec)    every MoE layer: force 1 + disable 4 + boost 2 (x1.5, renormalised) experts
  steer torch  (full spec)    the same spec through the eager PyTorch reference
  steer triton (no-op spec)   every MoE layer: bias 1e-30 on one expert -- the hook and kernel run, routing unchanged
  steer torch  (no-op spec)
The full spec changes which experts run (a forced expert receives every token), so its time includes that change
of expert load; the no-op spec isolates the cost of the steering path itself.

Prefill: 8 x 2048 = 16,384 tokens a forward (use_cache=False), ms per forward = median over rounds.
Decode: batch 1, 8, 64; a 32-token prompt is prefilled (untimed), then ``steps`` single-token steps with the KV
cache are timed; ms per step = median over rounds.
Also: the steered logits of the triton and torch backends on one prefill batch (they must agree).

Run: python benchmarks/steer_overhead_gpu.py --out DIR   (needs a CUDA GPU; imports no duckdb/polars/nnsight)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a bare checkout (the GPU machine): routelens

from olmoe_shape import build  # noqa: E402
from routelens.steering import steer  # noqa: E402


FULL_SPEC = {"rules": [{"layers": "all", "experts": [5], "action": "force"},
                       {"layers": "all", "experts": [10, 20, 30, 40], "action": "disable"},
                       {"layers": "all", "experts": [1, 2], "action": "boost", "value": 1.5, "renormalize": True}],
             "name": "bench-full"}
NOOP_SPEC = {"rules": [{"layers": "all", "experts": [0], "action": "bias", "value": 1e-30}], "name": "bench-noop"}
CONFIGS = {"unsteered": None,
           "steer triton (full spec)": (FULL_SPEC, "triton"), "steer torch (full spec)": (FULL_SPEC, "torch"),
           "steer triton (no-op spec)": (NOOP_SPEC, "triton"), "steer torch (no-op spec)": (NOOP_SPEC, "torch")}


def run_in(model, config, fn):
    if config is None:
        return fn()
    spec, backend = config
    with steer(model, spec, backend=backend):
        return fn()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--forwards", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--decode-batches", default="1,8,64")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--decode-rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cpu (+ TRITON_INTERPRET=1 and a small --hidden): a smoke run")
    ap.add_argument("--hidden", type=int, default=2048)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers
    import triton

    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    model = build(args.layers, args.device, args.hidden)
    T = args.batch * args.seq
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(2, 50304, (args.batch, args.seq), generator=g).to(device)

    def prefill():
        sync()
        t = time.perf_counter()
        for _ in range(args.forwards):
            model(input_ids=ids, use_cache=False)
        sync()
        return (time.perf_counter() - t) / args.forwards

    def decode(batch):
        prompt = torch.randint(2, 50304, (batch, 32), generator=g).to(device)

        def go():
            o = model(input_ids=prompt, use_cache=True)
            past, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
            sync()
            t = time.perf_counter()
            for _ in range(args.steps):
                o = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
            sync()
            return (time.perf_counter() - t) / args.steps
        return go

    res = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__,
           "shape": {"layers": args.layers, "hidden": args.hidden, "experts": 64, "top_k": 8, "tokens_per_forward": T},
           "experts_implementation": getattr(model.config, "_experts_implementation", None),
           "specs": {"full": FULL_SPEC, "noop": NOOP_SPEC}}
    with torch.no_grad():
        # agreement of the two backends on one batch (and that the full spec changes the output at all)
        small = ids[:2, :512]
        plain = model(input_ids=small, use_cache=False).logits.float()
        tri = run_in(model, CONFIGS["steer triton (full spec)"], lambda: model(input_ids=small, use_cache=False).logits.float())
        ref = run_in(model, CONFIGS["steer torch (full spec)"], lambda: model(input_ids=small, use_cache=False).logits.float())
        res["backend_agreement"] = {
            "max_abs_logit_diff_triton_vs_torch": float((tri - ref).abs().max()),
            "argmax_agreement_triton_vs_torch": float((tri.argmax(-1) == ref.argmax(-1)).float().mean()),
            "max_abs_logit_change_by_spec": float((ref - plain).abs().max())}
        print(res["backend_agreement"], flush=True)
        del plain, tri, ref

        for name, cfg in CONFIGS.items():  # warm-up: kernels compiled, allocator settled
            run_in(model, cfg, lambda: model(input_ids=ids, use_cache=False))
        times = {k: [] for k in CONFIGS}
        for r in range(args.rounds):
            order = list(CONFIGS) if r % 2 == 0 else list(reversed(CONFIGS))
            for name in order:
                times[name].append(run_in(model, CONFIGS[name], prefill))
            print({k: round(v[-1] * 1e3, 2) for k, v in times.items()}, flush=True)
        base = statistics.median(times["unsteered"])
        res["prefill"] = {
            "tokens": T, "forwards_per_round": args.forwards, "rounds": args.rounds,
            "ms_per_forward": {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()},
            "ratio_vs_unsteered": {k: round(statistics.median(v) / base, 4) for k, v in times.items()},
            "raw_ms": {k: [round(x * 1e3, 3) for x in v] for k, v in times.items()}}
        print(res["prefill"], flush=True)

        res["decode"] = {}
        for batch in [int(b) for b in args.decode_batches.split(",")]:
            go = decode(batch)
            for name, cfg in CONFIGS.items():
                run_in(model, cfg, go)  # warm-up at this batch size
            dt = {k: [] for k in CONFIGS}
            for r in range(args.decode_rounds):
                order = list(CONFIGS) if r % 2 == 0 else list(reversed(CONFIGS))
                for name in order:
                    dt[name].append(run_in(model, CONFIGS[name], go))
            b0 = statistics.median(dt["unsteered"])
            res["decode"][f"batch_{batch}"] = {
                "ms_per_step": {k: round(statistics.median(v) * 1e3, 3) for k, v in dt.items()},
                "ratio_vs_unsteered": {k: round(statistics.median(v) / b0, 4) for k, v in dt.items()},
                "raw_ms": {k: [round(x * 1e3, 3) for x in v] for k, v in dt.items()}}
            print(batch, res["decode"][f"batch_{batch}"]["ms_per_step"], flush=True)

    (out / "steer_overhead_gpu.json").write_text(json.dumps(res, indent=2))
    (out / "steer_overhead_gpu.md").write_text(markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    p = res["prefill"]
    lines = [f"# Steering overhead, OLMoE-1B-7B-shaped random-init bf16 model ({res['device']})", "",
             f"torch {res['torch']}, triton {res['triton']}, transformers {res['transformers']}; "
             f"{res['shape']['layers']} layers, 64 experts, top-8. Full spec: force 1 + disable 4 + boost 2 experts "
             "in every MoE layer; no-op spec: a 1e-30 bias (hook + kernel run, routing unchanged).", "",
             f"## Prefill, {p['tokens']} tokens a forward (median of {p['rounds']} rounds x {p['forwards_per_round']})",
             "", "| configuration | ms / forward | vs unsteered |", "|---|---:|---:|"]
    for k, v in p["ms_per_forward"].items():
        lines.append(f"| {k} | {v:.2f} | x{p['ratio_vs_unsteered'][k]:.4f} |")
    lines += ["", "## Decode steps (KV cache, one token per sequence a step)", "",
              "| batch | configuration | ms / step | vs unsteered |", "|---:|---|---:|---:|"]
    for b, d in res["decode"].items():
        for k, v in d["ms_per_step"].items():
            lines.append(f"| {b.split('_')[1]} | {k} | {v:.3f} | x{d['ratio_vs_unsteered'][k]:.4f} |")
    a = res["backend_agreement"]
    lines += ["", f"Backends agree: max |Δlogit| triton vs torch = {a['max_abs_logit_diff_triton_vs_torch']:.3g} "
                  f"(argmax agreement {a['argmax_agreement_triton_vs_torch']:.4f}); the full spec moves logits by up to "
                  f"{a['max_abs_logit_change_by_spec']:.3g}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
