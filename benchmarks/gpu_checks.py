"""Correctness checks that need a GPU (run on the device machine, not in CI):

1. every family's tiny model traced on CUDA records the same routing as on the CPU (indices equal except where
   the two devices' float sums differ at a near-tie, weights close);
2. a model spread by accelerate over cuda:0 and the CPU (device_map) traces, and records the same routing as the
   model on one device: the tracer copes with layers living on different devices.
Writes gpu_checks.json to --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from routelens.store import Store  # noqa: E402
from routelens.tiny import build_tiny_model, byte_tokenizer  # noqa: E402
from routelens.tracer import TraceOptions, trace  # noqa: E402

FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe",
            "granitemoe"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Der schnelle braune Fuchs.", "快速的棕色狐狸", "ok"] * 4


def routing_arrays(run):
    # arrow, not polars: the GPU machine has no polars and routing() is already ordered by seq, pos, layer, rank
    r = run.routing(as_="arrow")
    return r.column("expert").to_numpy(), r.column("weight").to_numpy()


def compare(a, b):
    ea, wa = a
    eb, wb = b
    return {"decisions": int(ea.size), "index_agreement": float((ea == eb).mean()),
            "max_weight_diff": float(np.abs(wa - wb).max())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    tok = byte_tokenizer()
    tmp = Path(tempfile.mkdtemp())
    store = Store.open(tmp / "checks.duckdb")
    res = {"device": torch.cuda.get_device_name(0), "families": {}}
    for fam in FAMILIES:
        try:
            model = build_tiny_model(fam, num_layers=4).float()
            cpu = routing_arrays(trace(model, tok, TEXTS, store=store,
                                       options=TraceOptions(batch_size=4, logits=True)))
            gpu_model = copy.deepcopy(model).cuda()
            gpu = routing_arrays(trace(gpu_model, tok, TEXTS, store=store,
                                       options=TraceOptions(batch_size=4, logits=True, expert_stats=True)))
            res["families"][fam] = compare(cpu, gpu)
        except Exception as exc:  # a family failing here is a finding to report, not a reason to stop
            res["families"][fam] = {"error": f"{type(exc).__name__}: {exc}"}
        print(fam, res["families"][fam], flush=True)

    from accelerate import dispatch_model

    model = build_tiny_model("olmoe", num_layers=4).float()
    whole = routing_arrays(trace(copy.deepcopy(model).cuda(), tok, TEXTS, store=store,
                                 options=TraceOptions(batch_size=4)))
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    split = dispatch_model(model, device_map=device_map)
    spread = routing_arrays(trace(split, tok, TEXTS, store=store, options=TraceOptions(batch_size=4)))
    res["device_map_cuda0_cpu_vs_cuda"] = compare(whole, spread)
    print("device_map", res["device_map_cuda0_cpu_vs_cuda"], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_checks.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
