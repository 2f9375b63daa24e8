"""Streamed vs rows masked-routing kernels at T=65,536, E=256 on the GPU: correctness against the reference and
cold-L2 time per variant, steered (the benchmark's spec) and unsteered.

Usage: python benchmarks/stream_sweep_gpu.py FAMILIES OUT.json [WARPS [steered,plain [E,E,...]]]
(E defaults to 256; WARPS 1 is the kernel's default launch)"""
import json
import sys

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".")
from steer_kernels_gpu import (cold_inputs, compare, graph_time_cold_ms, hbm_bandwidth, make_rule,  # noqa: E402
                               make_tables)

from routelens.kernels.reference import weights_dtype  # noqa: E402
from routelens.kernels.triton_route import route_kernel  # noqa: E402
from routelens.steering.spec import LayerTables  # noqa: E402

dev = torch.device("cuda")
hbm = hbm_bandwidth(dev)["GB_per_s"]
print("hbm GB/s", hbm)
T = 65536
out = []
fams = sys.argv[1].split(",")
warps_sweep = [int(w) for w in (sys.argv[3].split(",") if len(sys.argv) > 3 else ["2"])]
for family, E in [(f, int(e)) for e in (sys.argv[5] if len(sys.argv) > 5 else "256").split(",") for f in fams]:
    x0 = torch.randn(T, E, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(dev)
    xs = cold_inputs(x0)
    for k in (2, 8):
        rule = make_rule(family, E, k, dev)
        for steered in [m == "steered" for m in (sys.argv[4] if len(sys.argv) > 4 else "steered,plain").split(",")]:
            tables = make_tables(family, E, k) if steered else LayerTables.neutral(E)
            w_size = torch.empty(0, dtype=weights_dtype(rule, torch.bfloat16)).element_size()
            nbytes = T * E * 2 + 9 * E * 4 + T * k * (w_size + 8)
            vs = [dict(impl="rows")] + [dict(impl="stream", num_warps=w) for w in warps_sweep] + [
                dict(impl="stream", num_warps=1, threads_per_row=2)]
            for v in vs:
                try:
                    chk = compare(family, rule, x0, tables, lambda z, r, t: route_kernel(z, r, t, **v))
                    ms = graph_time_cold_ms(lambda xi: route_kernel(xi, rule, tables, **v), xs)
                except Exception as e:  # noqa: BLE001 - a sweep reports every variant
                    print(family, k, steered, v, "ERR", str(e)[:400], flush=True)
                    continue
                r = dict(family=family, E=E, k=k, steered=steered, **v, us=round(ms * 1e3, 2),
                         frac_hbm=round(nbytes / (ms / 1e3) / 1e9 / hbm, 3),
                         set_equal=chk["rows_set_equal"] == T, sel_equal=chk["rows_selection_equal"],
                         w_err=chk["weights_max_abs_err"])
                out.append(r)
                print(r, flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
