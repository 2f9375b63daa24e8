"""The streamed DeepSeek-V3 kernel's certificate on the CPU (numpy; no GPU): how many rows, and 8-row blocks, it
leaves uncertain (to be selected again exactly) for a given sigmoid slack, and an emulation of the fast sigmoid's
error against PyTorch's at the documented extremes of ``ex2.approx``, ``rcp.approx`` and ``expf``.

A model of ``triton_grouped._v3_select``'s two tests on the benchmark's rows (``steer_kernels_gpu.make_rule``:
E = 256, 8 groups, top 4, correction bias 0.05·N(0, 1); Gaussian logits, T = 65,536), with the exact choice
scores standing in for the fast ones:
- groups: the 4th best group score must exceed the 5th by ``8·slack``;
- picks: the k-th best choice score of the kept groups must exceed the (k+1)-th key's bucket (2^8 ulps, the
  expert index in the low bits) plus ``slack``.
Unsteered; the spec's forced and disabled experts only move scores to ±inf.

Usage: python benchmarks/v3_certificate.py [--T 65536]"""
import argparse

import numpy as np
import torch

ap = argparse.ArgumentParser()
ap.add_argument("--T", type=int, default=65536)
args = ap.parse_args()
T, E, G, TG = args.T, 256, 8, 4


def slack(x, const):
    return const + np.abs(x) * 2.0 ** -21


for dtype in (torch.bfloat16, torch.float32):
    for k in (2, 8):
        corr = (torch.randn(E, generator=torch.Generator().manual_seed(E * 100 + k)) * 0.05).float()
        z = torch.randn(T, E, generator=torch.Generator().manual_seed(0)).to(dtype).float()
        c = (torch.sigmoid(z) + corr).numpy().astype(np.float32).reshape(T, G, E // G)
        top2 = -np.sort(-c, 2)[:, :, :2].sum(2)
        groups = -np.sort(-top2, 1)
        kept = np.take_along_axis(c, np.argsort(-top2, 1)[:, :TG, None], 1).reshape(T, -1)
        best = -np.sort(-kept, 1)
        ck, ck1 = best[:, k - 1], best[:, k]
        bucket = 256 * np.spacing(np.abs(ck1))
        for name, const in (("2^-16 (before)", 2.0 ** -16), ("2^-19 (now)", 2.0 ** -19)):
            fail_g = groups[:, TG - 1] - groups[:, TG] <= 8 * slack(groups[:, 0] / 2, const)
            fail_k = ck - ck1 <= bucket + slack(ck1, const)
            fail = fail_g | fail_k
            blocks = fail[: T // 8 * 8].reshape(-1, 8).any(1)
            print(f"{str(dtype)[6:]:8s} k={k} slack {name}: rows uncertain {fail.mean():.4f} (groups "
                  f"{fail_g.mean():.4f}, picks {fail_k.mean():.4f}); blocks {blocks.mean():.4f}")

# the fast sigmoid against PyTorch's, each approximation pushed to its documented error (ex2.approx and expf:
# 2 ulp, rcp.approx: 1 ulp), every float32 rounding as on the GPU
zs = np.concatenate([np.linspace(-110, 110, 2_000_001, dtype=np.float32),
                     torch.randn(2_000_000, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
                     .float().numpy()]).astype(np.float32)
p = (zs * -np.float32(1.4426950408889634)).astype(np.float32)
worst = 0.0
with np.errstate(over="ignore"):
    for ex2_err in (-2.0 ** -22, 2.0 ** -22):
        e = (np.exp2(p.astype(np.float64)) * (1 + ex2_err)).astype(np.float32)
        d = (np.float32(1) + e).astype(np.float32)
        for rcp_err in (-2.0 ** -23, 2.0 ** -23):
            fast = ((1 / d.astype(np.float64)) * (1 + rcp_err)).astype(np.float32)
            for exp_err in (-2.0 ** -22, 2.0 ** -22):
                e_pt = (np.exp(-zs.astype(np.float64)) * (1 + exp_err)).astype(np.float32)
                torch_s = (np.float32(1) / (np.float32(1) + e_pt)).astype(np.float32)
                worst = max(worst, float(np.nanmax(np.abs(fast.astype(np.float64) - torch_s))))
print(f"fast sigmoid vs PyTorch's, emulated worst case: {worst:.3g} = 2^{np.log2(worst):.2f} "
      f"(bound 7.45·2^-24 = 2^{np.log2(7.45 * 2.0 ** -24):.2f}; slack 2^-19)")
