"""The streamed kernel's code-generation choices, side by side in one run on the GPU (T=65,536, E=256, bf16,
cold L2): the default (per k and family, as ``route_kernel`` picks: ``triton_route.stream_choices``) against each
chosen one flipped.

- ``VALS``: the picked experts' scores decoded from their exact keys (True) or gathered from the logits (False);
- ``KEEP_SIGN``: the stream skips the add that turns -0.0 into +0.0 in the keys (True: a pick of value 0 sends
  its block to the exact selection) or keeps it (False);
- ``SP_TABLE``: the sparse form's special columns leave the stream through a table row added per logit (True) or
  a bit test and select per logit (False);
- ``KEY_FMA``: the keys' sign masks from two integer multiplies (True) or a shift and logic ops (False).

Usage: python benchmarks/stream_variants_gpu.py OUT.json [--choices VALS,KEEP_SIGN] [--families F,..]
           [--k 2,8] [--modes steered,plain]
  benchmarks/results/stream_variants_gpu.json: the defaults (VALS and KEEP_SIGN; softmax_topk, deepseek_v2_greedy,
      gpt_oss; k 2 and 8; steered and plain)
  benchmarks/results/stream_pipes_gpu.json: --choices SP_TABLE,KEY_FMA --families softmax_topk,deepseek_v2_greedy,
      gpt_oss,sparsemixer --k 2,4,8 (steered; KEY_FMA also plain; softmax_topk then summed its row)
  benchmarks/results/stream_renorm_gpu.json: --choices SP_TABLE,KEY_FMA,KEEP_SIGN --families softmax_topk --k 2,4,8
  benchmarks/results/stream_keep_gpu.json: --choices KEEP_SIGN --families gpt_oss,sparsemixer --k 2,4,8 (measured
      when KEEP_SIGN was off for them: its "flipped" rows are today's steered k <= 4 defaults)
  benchmarks/results/stream_sums_gpu.json: --choices "" --families softmax_topk_norenorm,deepseek_v2_greedy --k 2,4,8
(--modes steered,plain for the last three)"""
import argparse
import json
import sys

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".")
from steer_kernels_gpu import hbm_bandwidth, make_rule, make_tables, side_by_side  # noqa: E402

from routelens.kernels.triton_route import stream_choices  # noqa: E402
from routelens.steering.spec import LayerTables  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--choices", default="VALS,KEEP_SIGN")
ap.add_argument("--families", default="softmax_topk,deepseek_v2_greedy,gpt_oss")
ap.add_argument("--k", default="2,8")
ap.add_argument("--modes", default="steered,plain")
args = ap.parse_args()

dev = torch.device("cuda")
hbm = hbm_bandwidth(dev)["GB_per_s"]
T, E = 65536, 256
x0 = torch.randn(T, E, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(dev)
out = {"hbm_GB_per_s": hbm, "T": T, "E": E, "rows": []}
for family in args.families.split(","):
    for k in (int(x) for x in args.k.split(",")):
        rule = make_rule(family, E, k, dev)
        for steered in [m == "steered" for m in args.modes.split(",")]:
            default = stream_choices(rule, lossy=False, sparse=steered)  # bf16 logits: exact keys; the sparse form
            named = [("default", default)] + [(f"{c} flipped", dict(default, **{c: not default[c]}))
                                              for c in args.choices.split(",") if c]
            tables = make_tables(family, E, k) if steered else LayerTables.neutral(E)
            results = side_by_side(family, rule, x0, tables, [dict(impl="stream", _stream_opts=o) for _, o in named],
                                   hbm)
            out["rows"] += [dict(family=family, k=k, steered=steered, name=name, **r)
                            for (name, _), r in zip(named, results)]
json.dump(out, open(args.out, "w"), indent=1)
