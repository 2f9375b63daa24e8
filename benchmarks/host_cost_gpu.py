"""Host cost of a masked-routing call, versions of the kernels side by side in one run on the GPU (interleaved).

For each family (k = 8, the benchmark's steered spec):
  host_us      CPU microseconds per ``masked_route_triton`` call at T = 1, E = 64 (no synchronisation: the GPU
               queue absorbs the launches, so this is the Python and launch path alone, as in a decode step)
  wall_us      wall microseconds per call, back to back, at T = 4,096, E = 128, synchronised at the end: where
               both the kernel and the eager reference are host-bound (``steer_kernels_gpu.py``'s grid)
  speedup      the eager PyTorch reference's wall time over the kernel's at that size
Versions are packages holding ``triton_route.py`` (see ``kernels_ab_gpu.py``: ``kernels`` or a ``git show`` copy).

Usage: python benchmarks/host_cost_gpu.py '[["base", "out.khead"], ["cur", "kernels"]]' [--families ..] [--out F]
"""
import argparse
import importlib
import json
import sys

import torch
import triton

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".")
from steer_kernels_gpu import FAMILIES, make_rule, make_tables, per_call_us  # noqa: E402

from routelens.kernels.reference import masked_route  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("versions", help="JSON list of [label, package]")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    versions = [(label, importlib.import_module(pkg + ".triton_route")) for label, pkg in json.loads(args.versions)]
    dev, k = torch.device("cuda"), 8
    g = torch.Generator().manual_seed(0)
    rows = []
    for family in args.families.split(","):
        small = dict(rule=make_rule(family, 64, k, dev), tables=make_tables(family, 64, k),
                     x=torch.randn(1, 64, generator=g).to(torch.bfloat16).to(dev))
        big = dict(rule=make_rule(family, 128, k, dev), tables=make_tables(family, 128, k),
                   x=torch.randn(4096, 128, generator=g).to(torch.bfloat16).to(dev))
        fns = {"reference": lambda c: masked_route(c["x"], c["rule"], c["tables"])}
        for label, mod in versions:
            fns[label] = lambda c, mod=mod: mod.masked_route_triton(c["x"], c["rule"], c["tables"])
        host = {name: [] for name in fns}
        wall = {name: [] for name in fns}
        for _ in range(args.repeats):  # interleaved, so that drift on the host hits every version alike
            for name, fn in fns.items():
                host[name].append(per_call_us(lambda: fn(small), 2000, sync=False))
                wall[name].append(per_call_us(lambda: fn(big), 300, sync=True))
        row = {"family": family, "k": k, "host_us_T1_E64": {n: round(min(v), 2) for n, v in host.items()},
               "wall_us_T4096_E128": {n: round(min(v), 2) for n, v in wall.items()}}
        row["speedup_T4096_E128"] = {n: round(min(wall["reference"]) / min(wall[n]), 2) for n, _ in versions}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                       "triton": triton.__version__,
                       "versions": json.loads(args.versions), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
