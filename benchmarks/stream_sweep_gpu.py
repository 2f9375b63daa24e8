"""Masked-routing kernel variants side by side on the GPU, in one run: selection against the reference, kernel GPU
time with the logits read from HBM, fraction of the measured HBM bandwidth; steered (the benchmark's spec) and
unsteered. Default variants: the rows kernel, the streamed kernel at each ``--warps``, and the streamed kernel with
2 threads a row.

Usage: python benchmarks/stream_sweep_gpu.py FAMILIES OUT.json [--E 256,..] [--k 2,8] [--T 65536]
           [--modes steered,plain] [--warps 2,..] [--variants JSON] [--dtypes bfloat16,float32]
  sparsemixer (benchmarks/results/sparsemixer_stream_gpu.json): sparsemixer OUT --warps 1 --E 256,64,16
  DeepSeek-V3 (benchmarks/results/v3_stream_gpu.json): deepseek_v3 OUT --E 256,128,64
      --variants '[{"impl": "rows"}, {"impl": "stream"}]' (and --T 32768, 8192, 4096)
  the DeepSeek routers' own logits (benchmarks/results/deepseek_fp32_gpu.json): DeepSeek-V2 and V3 compute them in
      float32 (``F.linear(hidden.float(), weight.float())`` in transformers' DeepseekV2/V3TopkRouter), so a
      steered DeepSeek layer hands the kernel 4 bytes a logit: --dtypes float32,bfloat16
(``--warps 1`` is the streamed kernel's default launch.)"""
import argparse
import itertools
import json
import sys

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".")
from steer_kernels_gpu import hbm_bandwidth, make_rule, make_tables, side_by_side  # noqa: E402

from routelens.steering.spec import LayerTables  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


ap = argparse.ArgumentParser()
ap.add_argument("families")
ap.add_argument("out")
ap.add_argument("--E", type=_ints, default=[256])
ap.add_argument("--k", type=_ints, default=[2, 8])
ap.add_argument("--T", type=int, default=65536)
ap.add_argument("--modes", default="steered,plain")
ap.add_argument("--warps", type=_ints, default=[2])
ap.add_argument("--variants", type=json.loads, default=None)
ap.add_argument("--dtypes", default="bfloat16", help="logits dtypes, comma-separated (torch names)")
args = ap.parse_args()

dev = torch.device("cuda")
hbm = hbm_bandwidth(dev)["GB_per_s"]
print("hbm GB/s", hbm)
variants = args.variants or ([dict(impl="rows")] + [dict(impl="stream", num_warps=w) for w in args.warps]
                             + [dict(impl="stream", num_warps=1, threads_per_row=2)])
out = []
for E, name in itertools.product(args.E, args.dtypes.split(",")):
    x0 = torch.randn(args.T, E, generator=torch.Generator().manual_seed(0)).to(getattr(torch, name)).to(dev)
    for family in args.families.split(","):
        for k in args.k:
            rule = make_rule(family, E, k, dev)
            for steered in [m == "steered" for m in args.modes.split(",")]:
                tables = make_tables(family, E, k) if steered else LayerTables.neutral(E)
                out += [dict(family=family, T=args.T, E=E, k=k, dtype=name, steered=steered, **r)
                        for r in side_by_side(family, rule, x0, tables, variants, hbm)]
json.dump(out, open(args.out, "w"), indent=1)
