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
from steer_kernels_gpu import hbm_bandwidth, make_rule, make_tables, side_by_side  # noqa: E402

from routelens.steering.spec import LayerTables  # noqa: E402

dev = torch.device("cuda")
hbm = hbm_bandwidth(dev)["GB_per_s"]
T, E = 65536, 256
x0 = torch.randn(T, E, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(dev)
out = {"hbm_GB_per_s": hbm, "T": T, "E": E, "rows": []}
for family in ("softmax_topk", "deepseek_v2_greedy", "gpt_oss"):
    for k in (2, 8):
        rule = make_rule(family, E, k, dev)
        default = dict(VALS=k <= 4, KEEP_SIGN=k > 4 and family != "gpt_oss")  # route_kernel's choice (bf16)
        named = (("default", default), ("VALS flipped", dict(default, VALS=not default["VALS"])),
                 ("KEEP_SIGN flipped", dict(default, KEEP_SIGN=not default["KEEP_SIGN"])))
        for steered in (True, False):
            tables = make_tables(family, E, k) if steered else LayerTables.neutral(E)
            results = side_by_side(family, rule, x0, tables, [dict(impl="stream", _stream_opts=o) for _, o in named],
                                   hbm)
            out["rows"] += [dict(family=family, k=k, steered=steered, name=name, **r)
                            for (name, _), r in zip(named, results)]
json.dump(out, open(sys.argv[1], "w"), indent=1)
