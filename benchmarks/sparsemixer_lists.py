"""How often the streamed sparsemixer kernel's per-thread lists overflow (CPU, numpy; no GPU needed): the share of
rows, and of 8-row blocks, in which some thread holds ``N`` or more keys within the weights' window of the
smallest free pick, so that its block takes the rare second pass (``triton_stream._sm_again``), on the
benchmark's logits (Gaussian, rounded to bf16, T = 65,536, E = 256, 4 threads a row, thread s holding the
columns 32·c + 8·s + 0..7).

The window: an expert counts in a round when ``(t - x) / max(|x|, t) <= 2ε``; the kernel bounds all rounds by
``lo = t_min - |t_min|·1.01·2ε / (1 - 2ε)`` (``_sm_weights``), ε = 0.01 as PhiMoE.

Usage: python benchmarks/sparsemixer_lists.py [--T 65536] [--E 256]
Prints one line per number of free picks (k minus the forced ones) and list length N (4, 8 or 9: the lengths
``triton_stream._absorb`` has)."""
import argparse

import numpy as np
import torch

ap = argparse.ArgumentParser()
ap.add_argument("--T", type=int, default=65536)
ap.add_argument("--E", type=int, default=256)
args = ap.parse_args()
S, ROWS, JITTER2 = 4, 8, 0.02
x = torch.randn(args.T, args.E, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).float().numpy()
best = -np.sort(-x, 1)
thread = (np.arange(args.E) % (8 * S)) // 8
lists = [-np.sort(-x[:, thread == s], 1) for s in range(S)]
for free in (1, 2, 4, 8):
    t_min = best[:, free - 1]
    lo = t_min - np.abs(t_min) * (1.01 * JITTER2 / (1 - JITTER2))
    for n in (4, 8, 9):
        full = np.zeros(args.T, bool)
        for held in lists:
            full |= held[:, n - 1] >= lo
        blocks = full[: args.T // ROWS * ROWS].reshape(-1, ROWS).any(1)
        print(f"free picks {free}, lists of {n}: rows {full.mean():.5f}, blocks {blocks.mean():.5f} "
              f"({int(blocks.sum())} of {blocks.size})")
