"""The streamed kernel's two code-generation choices, side by side in one run on the GPU (T=65,536, E=256, bf16,
cold L2): the default (per k and family, as ``route_kernel`` picks) against each choice flipped.

- ``VALS``: the picked experts' scores decoded from their exact keys (True) or gathered from the logits (False);
- ``KEEP_SIGN``: the stream skips the add that turns -0.0 into +0.0 in the keys (True: a pick of value 0 sends
  its block to the exact selection) or keeps it (False).

Usage: python benchmarks/stream_variants_gpu.py OUT.json"""
import json
import sys

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".")
from steer_kernels_gpu import cold_inputs, compare, graph_time_cold_ms, hbm_bandwidth, make_rule, make_tables  # noqa: E402

from routelens.kernels.reference import weights_dtype  # noqa: E402
from routelens.kernels.triton_route import route_kernel  # noqa: E402
from routelens.steering.spec import LayerTables  # noqa: E402

dev = torch.device("cuda")
hbm = hbm_bandwidth(dev)["GB_per_s"]
T, E = 65536, 256
x0 = torch.randn(T, E, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(dev)
xs = cold_inputs(x0)
out = {"hbm_GB_per_s": hbm, "T": T, "E": E, "rows": []}
for family in ("softmax_topk", "deepseek_v2_greedy", "gpt_oss"):
    for k in (2, 8):
        rule = make_rule(family, E, k, dev)
        default = dict(VALS=k <= 4, KEEP_SIGN=k > 4 and family != "gpt_oss")  # route_kernel's choice (bf16)
        for steered in (True, False):
            tables = make_tables(family, E, k) if steered else LayerTables.neutral(E)
            w_size = torch.empty(0, dtype=weights_dtype(rule, torch.bfloat16)).element_size()
            nbytes = T * E * 2 + 9 * E * 4 + T * k * (w_size + 8)
            for name, opts in (("default", default), ("VALS flipped", dict(default, VALS=not default["VALS"])),
                               ("KEEP_SIGN flipped", dict(default, KEEP_SIGN=not default["KEEP_SIGN"]))):
                fn = lambda z, r, t, o=opts: route_kernel(z, r, t, impl="stream", _stream_opts=o)  # noqa: E731
                chk = compare(family, rule, x0, tables, fn)
                ms = graph_time_cold_ms(lambda xi, o=opts: route_kernel(xi, rule, tables, impl="stream",
                                                                         _stream_opts=o), xs)
                r = dict(family=family, k=k, steered=steered, variant=name, **opts, us=round(ms * 1e3, 2),
                         frac_hbm=round(nbytes / (ms / 1e3) / 1e9 / hbm, 3), rows_set_equal=chk["rows_set_equal"],
                         rows_selection_equal=chk["rows_selection_equal"], w_err=chk["weights_max_abs_err"])
                out["rows"].append(r)
                print(r, flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
