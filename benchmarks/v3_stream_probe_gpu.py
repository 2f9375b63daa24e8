"""Kernel variants side by side on the GPU at T tokens (env T, default 65,536), cold L2: time, fraction of HBM,
selection vs the reference (used for DeepSeek-V3, benchmarks/results/v3_stream_gpu.json). Usage:
[T=N] python benchmarks/v3_stream_probe_gpu.py FAMILIES '[{"impl": "rows"}, {"impl": "stream"}]' OUT.json E,E,.. k,k
"""
import json, sys
import torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
from steer_kernels_gpu import cold_inputs, compare, graph_time_cold_ms, hbm_bandwidth, make_rule, make_tables
from routelens.kernels.reference import weights_dtype
from routelens.kernels.triton_route import route_kernel
from routelens.steering.spec import LayerTables
dev = torch.device("cuda")
hbm = hbm_bandwidth(dev)["GB_per_s"]
print("hbm GB/s", hbm, flush=True)
import os; T = int(os.environ.get("T", 65536))
out = []
variants = json.loads(sys.argv[2])
for E in [int(e) for e in sys.argv[4].split(',')]:
    x0 = torch.randn(T, E, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(dev)
    xs = cold_inputs(x0)
    for family in sys.argv[1].split(","):
        for k in [int(q) for q in sys.argv[5].split(",")]:
            rule = make_rule(family, E, k, dev)
            for steered in (True, False):
                tables = make_tables(family, E, k) if steered else LayerTables.neutral(E)
                w_size = torch.empty(0, dtype=weights_dtype(rule, torch.bfloat16)).element_size()
                nbytes = T * E * 2 + 9 * E * 4 + T * k * (w_size + 8)
                for v in variants:
                    try:
                        chk = compare(family, rule, x0, tables, lambda z, r, t: route_kernel(z, r, t, **v))
                        ms = graph_time_cold_ms(lambda xi: route_kernel(xi, rule, tables, **v), xs)
                    except Exception as e:  # noqa: BLE001
                        print(family, k, steered, v, "ERR", str(e)[:300], flush=True)
                        continue
                    r = dict(family=family, E=E, k=k, steered=steered, v=str(v), us=round(ms * 1e3, 2),
                             frac=round(nbytes / (ms / 1e3) / 1e9 / hbm, 3),
                             set_eq=chk["rows_set_equal"] == T, sel_eq=chk["rows_selection_equal"],
                             w_err=chk["weights_max_abs_err"])
                    out.append(r)
                    print(r, flush=True)

json.dump(out, open(sys.argv[3], 'w'), indent=1)
