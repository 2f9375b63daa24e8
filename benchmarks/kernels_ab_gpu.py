"""Two (or more) versions of the masked-routing kernels side by side in one run on the GPU (T = 65,536, bf16 logits
or ``--dtype``, cold L2, kernel GPU time, interleaved repeats): e.g. the kernels at a git revision against the
working tree's.

A version is a package holding ``triton_route.py`` and its siblings: ``routelens.kernels`` (the working tree), or a copy of
an older revision made with ``git show``:

    mkdir -p out/khead && for f in routelens/kernels/*.py; do git show HEAD:$f > out/khead/$(basename $f); done
    (revisions before the kernels moved into routelens/: ``kernels/*.py``)

Usage: python benchmarks/kernels_ab_gpu.py '[["base", "out.khead", {}], ["cur", "routelens.kernels", {}]]'
           [--families softmax_topk,..] [--k 2,8] [--modes steered,plain] [--E 256] [--dtype bfloat16]
  (the third entry of a version: ``_stream_opts`` for ``route_kernel``, e.g. {"SP_TABLE": false})
  benchmarks/results/table_layout_ab_gpu.jsonl: a0d3caf against the per-thread table loads (0e7becd), steered,
      softmax_topk/deepseek_v2_greedy/gpt_oss/sparsemixer k 2,8, then deepseek_v3 k 2,8 plain and steered (taken
      with this script's first form, which counted fractions of a fixed 3,000 GB/s)
Prints one JSON line per family, k and mode: each version's µs, fraction of HBM, (sets equal, rows in the
reference's order, max |Δw|), and its time over the first version's.
"""
import argparse
import importlib
import json
import sys

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".")
from steer_kernels_gpu import (cold_inputs, compare, graph_time_cold_ms, hbm_bandwidth, make_rule,  # noqa: E402
                               make_tables, routed_bytes)

from routelens.steering.spec import LayerTables  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("versions", help='JSON list of [label, package, stream options]')
ap.add_argument("--families", default="softmax_topk,deepseek_v2_greedy,gpt_oss,sparsemixer")
ap.add_argument("--k", default="2,8")
ap.add_argument("--modes", default="steered")
ap.add_argument("--E", type=int, default=256)
ap.add_argument("--dtype", default="bfloat16", help="the logits' dtype (DeepSeek's routers: float32)")
args = ap.parse_args()

versions = [(label, importlib.import_module(pkg + ".triton_route"), opts)
            for label, pkg, opts in json.loads(args.versions)]
dev = torch.device("cuda")
hbm = hbm_bandwidth(dev)["GB_per_s"]
T, E = 65536, args.E
x0 = torch.randn(T, E, generator=torch.Generator().manual_seed(0)).to(getattr(torch, args.dtype)).to(dev)
xs = cold_inputs(x0)
for family in args.families.split(","):
    for k in (int(x) for x in args.k.split(",")):
        rule = make_rule(family, E, k, dev)
        nbytes = routed_bytes(rule, T, E, k, x0.dtype)
        for mode in args.modes.split(","):
            runs = []
            for label, mod, opts in versions:
                # tables of its own for each version: route_kernel caches its device tables on the object, and
                # versions pack them differently
                tables = make_tables(family, E, k) if mode == "steered" else LayerTables.neutral(E)

                def fn(z, r, t, mod=mod, opts=opts):
                    return mod.route_kernel(z, r, t, impl="auto", _stream_opts=opts or None)
                chk = compare(family, rule, x0, tables, fn)
                runs.append((label, fn, (chk["rows_set_equal"] == T, chk["rows_selection_equal"],
                                         chk["weights_max_abs_err"]), [], tables))
            for _ in range(3):  # interleaved, so that drift in clocks or neighbours hits every version alike
                for _, fn, _, times, tables in runs:
                    times.append(graph_time_cold_ms(lambda xi, fn=fn, tables=tables: fn(xi, rule, tables), xs))
            row = dict(family=family, k=k, mode=mode, dtype=args.dtype, hbm_GB_per_s=hbm)
            for label, _, ok, times, _ in runs:
                us = min(times) * 1e3
                row[label] = dict(us=round(us, 2), frac=round(nbytes / (us / 1e6) / 1e9 / hbm, 3), ok=ok)
            for label, *_ in runs[1:]:
                row[f"{label}/{runs[0][0]}"] = round(row[label]["us"] / row[runs[0][0]]["us"], 3)
            print(json.dumps(row), flush=True)
