"""One masked-routing configuration called a few times, for a profiler to wrap (Nsight Compute):

    ncu --kernel-name regex:_v3_stream --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section InstructionStats --section WarpStateStats \
        python3 benchmarks/profile_call_gpu.py deepseek_v3 --k 8 --steered --dtype float32

The family, k, E and T as in ``steer_kernels_gpu.py`` (its rules and the benchmark's spec); the logits are fresh
Gaussians of ``--dtype``; ``--opts``: ``route_kernel``'s ``_stream_opts`` (e.g. '{"IN_PLACE": true}')."""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from steer_kernels_gpu import FAMILIES, make_rule, make_tables  # noqa: E402

from routelens.kernels.triton_route import route_kernel  # noqa: E402
from routelens.steering.spec import LayerTables  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("family", choices=FAMILIES)
ap.add_argument("--k", type=int, default=8)
ap.add_argument("--E", type=int, default=256)
ap.add_argument("--T", type=int, default=65536)
ap.add_argument("--steered", action="store_true")
ap.add_argument("--dtype", default="bfloat16")
ap.add_argument("--impl", default="auto")
ap.add_argument("--calls", type=int, default=4)
ap.add_argument("--opts", type=json.loads, default=None)
args = ap.parse_args()
dev = torch.device("cuda")
rule = make_rule(args.family, args.E, args.k, dev)
tables = make_tables(args.family, args.E, args.k) if args.steered else LayerTables.neutral(args.E)
x = torch.randn(args.T, args.E, generator=torch.Generator().manual_seed(0)).to(getattr(torch, args.dtype)).to(dev)
for _ in range(args.calls):
    route_kernel(x, rule, tables, impl=args.impl, _stream_opts=args.opts)
torch.cuda.synchronize()
print("done", args)
