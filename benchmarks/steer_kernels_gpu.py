"""Masked-routing kernels vs the eager PyTorch reference on a GPU: speed, effective bandwidth, full-size correctness.

Sections of the JSON written to ``--out``:
  hbm           measured device-copy bandwidth (bytes read + written / time) of a 1 GiB copy: the yardstick
  ties          what CUDA ``torch.topk`` (sorted and unsorted) and ``torch.max`` return on exact ties, against the
                kernels' rule "the lower expert index first"
  correctness   every family at full size (T = 65,536), steered (force + disable + bias + boost) and neutral
                (kernel run with empty tables vs the model's own rule), continuous and quantised (tied) logits
  grid          T x E x k x family: ms per call of ``masked_route`` (eager, as steering calls it) and of
                ``masked_route_triton``; speed-up; kernel effective bandwidth = (logits + tables read, weights +
                int64 indices written) / time, and its fraction of ``hbm``
  block_sweep   rows-per-program / warps variants at the largest size (kernel only)

Timing: CUDA events around ``reps`` back-to-back calls after warm-up (so per-call launch overhead counts, as it
does in a model), median of 5 repeats. Logits are bf16 (OLMoE/Qwen routers), tables from a validated spec.

Run: python benchmarks/steer_kernels_gpu.py --out DIR [--smoke]   (--smoke: tiny sizes, runs under TRITON_INTERPRET=1)
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a bare checkout (the GPU machine): routelens

from routelens.adapters.routing import (DeepseekV2Rule, DeepseekV3Rule, GptOssRule, SoftmaxTopK,  # noqa: E402
                                        SparseMixerRule)
from routelens.kernels.reference import masked_route  # noqa: E402
from routelens.kernels.triton_route import (_streams, launch_config, masked_route_triton,  # noqa: E402
                                            route_kernel, weights_dtype)
from routelens.kernels.triton_stream import stream_config  # noqa: E402
from routelens.steering.spec import RoutingGeometry, SteeringSpec  # noqa: E402

FAMILIES = ("softmax_topk", "softmax_topk_norenorm", "deepseek_v3", "deepseek_v2_greedy", "deepseek_v2_grouped",
            "gpt_oss", "sparsemixer")


def groups_for(E: int, k: int) -> tuple[int, int]:
    """(n_group, topk_group) like DeepSeek-V3 (8 groups, 4 kept) where that fits, always able to hold k experts."""
    n_group = 8 if E >= 64 else max(2, E // 2)
    per = E // n_group
    return n_group, min(n_group, max(n_group // 2, math.ceil(k / per)))


def make_rule(family: str, E: int, k: int, device) -> object:
    n_group, topk_group = groups_for(E, k)
    if family == "softmax_topk":  # Qwen3-MoE, Mixtral (norm_topk_prob)
        return SoftmaxTopK(k, renormalize=True)
    if family == "softmax_topk_norenorm":  # OLMoE, Qwen2-MoE: the weights keep the whole row's softmax sum
        return SoftmaxTopK(k, renormalize=False)
    if family == "deepseek_v3":
        g = torch.Generator().manual_seed(E * 100 + k)
        bias = (torch.randn(E, generator=g) * 0.05).to(device)
        return DeepseekV3Rule(k, n_group, topk_group, True, 2.5, bias)
    if family == "deepseek_v2_greedy":
        return DeepseekV2Rule(k, "greedy", None, None, 1.0)
    if family == "deepseek_v2_grouped":
        return DeepseekV2Rule(k, "group_limited_greedy", n_group, topk_group, 16.0)
    if family == "gpt_oss":
        return GptOssRule(k)
    if family == "sparsemixer":
        return SparseMixerRule(k, 0.01)
    raise ValueError(family)


def make_tables(family: str, E: int, k: int, *, renormalize: bool = True):
    """A validated spec touching force, disable, bias and boost, resolved to one layer's tables."""
    groups = None
    if family in ("deepseek_v3", "deepseek_v2_grouped"):
        n_group, topk_group = groups_for(E, k)
        groups = (n_group, topk_group, 2 if family == "deepseek_v3" else 1)
    geometry = RoutingGeometry(1, (0,), E, k, groups)
    n_disable = 0 if E - k < 2 else max(1, min(E // 8, E - k - 1))
    disabled = list(range(E - 1, E - 1 - 2 * n_disable, -2))[:n_disable]
    rules = [{"layers": "all", "experts": [0], "action": "force"},
             {"layers": "all", "experts": [1, 2], "action": "boost", "value": 1.5, "renormalize": renormalize},
             {"layers": "all", "experts": [3], "action": "bias", "value": 0.25}]
    if disabled:
        rules.append({"layers": "all", "experts": disabled, "action": "disable"})
    return SteeringSpec.from_dict({"rules": rules}).resolve(geometry).layers[0]


def time_ms(fn, reps: int, repeats: int = 5) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / reps)
    return statistics.median(out)


def graph_time_ms(fn, reps: int = 20, repeats: int = 5) -> float:
    """GPU time per call with the host out of the way: ``reps`` calls captured in one CUDA graph, replayed.

    Back-to-back eager launches of a ~10 us kernel measure the ~80 us Python launch path instead; a graph replays
    the captured kernels with no host work between them, so this is the kernel's own time on the device."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return time_ms(graph.replay, reps=1, repeats=repeats) / reps


def cold_inputs(x: torch.Tensor, l2_bytes: int = 50 << 20) -> list[torch.Tensor]:
    """Copies of ``x`` totalling over 3x the L2 cache (H100: 50 MB): cycling through them, every call reads its
    logits from HBM, as a router's fresh output would be, instead of from the L2 the previous call filled."""
    n = max(1, -(-3 * l2_bytes // max(1, x.numel() * x.element_size())))
    return [x] + [x.clone() for _ in range(min(n, 64) - 1)]


def graph_time_cold_ms(call, xs: list[torch.Tensor], reps: int = 24) -> float:
    """``graph_time_ms`` of ``call(x)`` with ``x`` cycling through ``xs`` (see ``cold_inputs``)."""
    state = {"i": 0}

    def fn():
        call(xs[state["i"] % len(xs)])
        state["i"] += 1

    reps = max(reps, len(xs))
    return graph_time_ms(fn, reps=reps)


def routed_bytes(rule, T: int, E: int, k: int, dtype: torch.dtype) -> int:
    """Bytes one routing call must move: the logits and nine E-wide float32 table rows read (a nominal count of the
    packed [10, E] table's rows, the same in every stored result; under 0.01 % of the logits at T = 65,536), the
    weights and int64 indices written (the numerator of every "fraction of HBM" here)."""
    w_size = torch.empty(0, dtype=weights_dtype(rule, dtype)).element_size()
    return T * E * torch.empty(0, dtype=dtype).element_size() + 9 * E * 4 + T * k * (w_size + 8)


def side_by_side(family: str, rule, x0: torch.Tensor, tables, variants: list[dict], hbm_gbps: float) -> list[dict]:
    """Each variant (``route_kernel`` keywords) in one run: its selection and weights against the reference on
    ``x0``, its kernel GPU time with the logits read from HBM (``graph_time_cold_ms``), its fraction of HBM."""
    T, E = x0.shape
    xs = cold_inputs(x0)
    nbytes = routed_bytes(rule, T, E, rule.k, x0.dtype)
    out = []
    for v in variants:
        try:
            chk = compare(family, rule, x0, tables, lambda z, r, t: route_kernel(z, r, t, **v))
            ms = graph_time_cold_ms(lambda xi: route_kernel(xi, rule, tables, **v), xs)
        except Exception as exc:  # noqa: BLE001 - a sweep reports every variant
            out.append(dict(variant=v, error=str(exc)[:400]))
        else:
            out.append(dict(variant=v, us=round(ms * 1e3, 2), frac_hbm=round(nbytes / (ms / 1e3) / 1e9 / hbm_gbps, 3),
                            set_equal=chk["rows_set_equal"] == T, sel_equal=chk["rows_selection_equal"],
                            w_err=chk["weights_max_abs_err"]))
        print(family, E, rule.k, out[-1], flush=True)
    return out


def hbm_bandwidth(device) -> dict:
    n = 1 << 29  # 1 GiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=10)
    gbps = 2 * src.numel() * 2 / (ms / 1e3) / 1e9
    del src, dst
    return {"bytes_per_copy": 2 * n * 2, "ms": round(ms, 4), "GB_per_s": round(gbps, 1)}


def tie_probe(device, Es=(8, 64, 128, 256), ks=(2, 8), T=4096) -> dict:
    """How CUDA breaks exact ties: compare to 'lower index first' (values descending, then index ascending)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    out = {}
    for E in Es:
        for k in ks:
            x = torch.randint(0, 4, (T, E), generator=g).float().to(device)
            order = torch.sort(-x * 4 * E + torch.arange(E, device=device), dim=1, stable=True).indices
            expect = order[:, :k]
            _, i_sorted = torch.topk(x, k)
            _, i_unsorted = torch.topk(x, k, sorted=False)
            mx = x.max(dim=-1).indices
            order_hi = torch.sort(-x * 4 * E - torch.arange(E, device=device), dim=1, stable=True).indices
            out[f"E{E}_k{k}"] = {
                "topk_sorted_rows_equal_highest_first": float((i_sorted == order_hi[:, :k]).all(1).float().mean()),
                "topk_sorted_rows_equal_lowest_first": float((i_sorted == expect).all(1).float().mean()),
                "topk_unsorted_sets_equal_lowest_first": float(
                    (i_unsorted.sort(1).values == expect.sort(1).values).all(1).float().mean()),
                "max_indices_equal_first": float((mx == order[:, 0]).float().mean()),
            }
    return out


def _by_index(w, i):
    o = i.argsort(dim=1)
    return w.gather(1, o), i.gather(1, o)


def compare(family, rule, logits, tables, kernel_fn) -> dict:
    """Kernel vs reference: rows with identical selection (positions; sets for DeepSeek), weight error by index."""
    ref_w, ref_i = masked_route(logits, rule, tables) if tables is not None else rule(logits)
    w, i = kernel_fn(logits, rule, tables)
    unordered = family.startswith("deepseek")
    if unordered:
        ref_w, ref_i = _by_index(ref_w, ref_i)
        w, i = _by_index(w, i)
    same = (i == ref_i).all(1)
    same_set = (i.sort(1).values == ref_i.sort(1).values).all(1)
    w_match, rw_match = _by_index(w[same_set], i[same_set])[0].float(), _by_index(ref_w[same_set], ref_i[same_set])[0].float()
    err = (w_match - rw_match).abs()
    return {"rows": int(logits.shape[0]), "rows_selection_equal": int(same.sum()),
            "rows_set_equal": int(same_set.sum()), "dtype_equal": w.dtype == ref_w.dtype,
            "weights_bit_equal_frac": float((w_match == rw_match).float().mean()) if len(err) else None,
            "weights_max_abs_err": float(err.max()) if len(err) else None}


def correctness(device, T: int, Es=(64, 256), k: int = 8, families=FAMILIES) -> dict:
    out = {}
    g = torch.Generator(device="cpu").manual_seed(2)
    for family in families:
        for E in Es:
            rule = make_rule(family, E, k, device)
            tables = make_tables(family, E, k)
            for dtype in (torch.bfloat16, torch.float32):
                cont = (torch.randn(T, E, generator=g) * 2).to(dtype).to(device)
                tied = (torch.randint(-8, 8, (T, E), generator=g).float() / 4).to(dtype).to(device)
                key = f"{family}/E{E}/k{k}/{str(dtype).split('.')[-1]}"
                out[key] = {
                    "steered": compare(family, rule, cont, tables, masked_route_triton),
                    "steered_tied_logits": compare(family, rule, tied, tables, masked_route_triton),
                    # the kernel itself with empty tables vs the model's own rule (the public function short-cuts)
                    "neutral_kernel": compare(family, rule, cont, None, route_kernel),
                    "neutral_kernel_tied_logits": compare(family, rule, tied, None, route_kernel),
                }
                print(key, {k2: (v["rows_selection_equal"], v["rows_set_equal"], v["weights_max_abs_err"])
                            for k2, v in out[key].items()}, flush=True)
    return out


def grid(device, Ts, Es, ks, hbm_gbps: float, families=FAMILIES) -> list[dict]:
    rows = []
    g = torch.Generator(device="cpu").manual_seed(3)
    for family in families:
        for E in Es:
            for k in ks:
                if k > E:
                    continue
                rule = make_rule(family, E, k, device)
                tables = make_tables(family, E, k)
                for T in Ts:
                    x = torch.randn(T, E, generator=g).to(torch.bfloat16).to(device)
                    reps = 200 if T <= 64 else (50 if T <= 4096 else 20)
                    ref_ms = time_ms(lambda: masked_route(x, rule, tables), reps)
                    ker_ms = time_ms(lambda: masked_route_triton(x, rule, tables), reps)
                    nbytes = routed_bytes(rule, T, E, k, x.dtype)
                    try:  # the kernel's device time (CUDA graph replay, logits read from HBM): the bandwidth
                        gpu_ms = graph_time_cold_ms(lambda xi: route_kernel(xi, rule, tables), cold_inputs(x))
                    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
                        gpu_ms, err = float("nan"), str(exc)[:200]
                    else:
                        err = None
                    bw = nbytes / (gpu_ms / 1e3) / 1e9
                    rows.append({"family": family, "T": T, "E": E, "k": k, "reference_ms": round(ref_ms, 5),
                                 "kernel_ms": round(ker_ms, 5), "speedup": round(ref_ms / ker_ms, 2),
                                 "kernel_gpu_ms": round(gpu_ms, 5), "bytes": nbytes, "kernel_GB_per_s": round(bw, 1),
                                 "frac_of_hbm": round(bw / hbm_gbps, 3), **({"graph_error": err} if err else {})})
                    print(rows[-1], flush=True)
    return rows


def per_call_us(fn, n: int, sync: bool, warm: int = 50) -> float:
    """Microseconds per call of ``n`` back-to-back calls after ``warm``; ``sync``: wait for the GPU before stopping
    the clock (wall time), else the CPU time of issuing them (the GPU queue absorbs the launches)."""
    import time

    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if sync:
        torch.cuda.synchronize()
    us = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return us


def host_overhead(device, E: int = 64, k: int = 8, T: int = 1, n: int = 2000) -> dict:
    """CPU microseconds per call (no synchronisation; the GPU queue absorbs the launches) of each layer of the call."""
    from routelens.kernels.triton_route import _device_tables

    rule, tables = make_rule("softmax_topk", E, k, device), make_tables("softmax_topk", E, k)
    x = torch.randn(T, E, device=device).to(torch.bfloat16)
    parts = {"masked_route_triton": lambda: masked_route_triton(x, rule, tables),
             "route_kernel": lambda: route_kernel(x, rule, tables),
             "device_tables (cached)": lambda: _device_tables(tables, x.device),
             "tables.is_neutral": lambda: tables.is_neutral,
             "torch.empty x2": lambda: (torch.empty((T, k), dtype=torch.bfloat16, device=device),
                                        torch.empty((T, k), dtype=torch.int64, device=device)),
             "rule(logits) (unsteered router's own top-k)": lambda: rule(x),
             "masked_route (eager reference)": lambda: masked_route(x, rule, tables)}
    out = {name: round(per_call_us(fn, n, sync=False), 2) for name, fn in parts.items()}
    print("host overhead us", out, flush=True)
    return out


def block_sweep(device, T: int, E: int, hbm_gbps: float) -> list[dict]:
    """Rows per program x warps at the largest size, every family, k = 2 and 8 (kernel GPU time, cold L2)."""
    rows = []
    xs = cold_inputs(torch.randn(T, E).to(torch.bfloat16).to(device))
    for family in FAMILIES:
        for k in (2, 8):
            rule = make_rule(family, E, k, device)
            tables = make_tables(family, E, k)
            nbytes = routed_bytes(rule, T, E, k, torch.bfloat16)
            variants = [dict(impl="rows", block_rows=b, num_warps=w) for b, w in ((2, 1), (4, 1), (8, 2))]
            if isinstance(rule, DeepseekV3Rule) and _streams(rule, E):
                variants.append(dict(impl="stream"))
            elif _streams(rule, E):
                variants += [dict(impl="stream", threads_per_row=s, num_warps=w) for s, w in ((4, 1), (4, 2), (2, 1))]
            for v in variants:
                try:
                    ms = graph_time_cold_ms(lambda xi: route_kernel(xi, rule, tables, **v), xs)
                except Exception as exc:  # e.g. out of registers / shared memory for a variant
                    rows.append({"family": family, "k": k, **v, "error": str(exc)[:200]})
                    continue
                rows.append({"family": family, "k": k, **v,
                             "ms": round(ms, 5), "frac_of_hbm": round(nbytes / (ms / 1e3) / 1e9 / hbm_gbps, 3)})
                print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, no timing (CPU interpreter check)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma list (grid and correctness)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    families = tuple(f for f in args.families.split(",") if f)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        ap.error(f"unknown families {unknown}; expected some of {', '.join(FAMILIES)}")
    if args.smoke:
        device = torch.device("cpu")
        res = {"correctness": correctness(device, T=24, Es=(16,), k=4)}
        (out / "steer_kernels_smoke.json").write_text(json.dumps(res, indent=2))
        return
    device = torch.device("cuda")
    import triton

    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "default_launch_config_E256_T65536": launch_config(256, 65536),
           "stream_config_E256_T65536 (E_PAD, S, rows, warps)": stream_config(256, 65536)}
    res["hbm"] = hbm_bandwidth(device)
    print(res, flush=True)
    sections = {"host_overhead_us": lambda: host_overhead(device),
                "ties": lambda: tie_probe(device),
                "grid": lambda: grid(device, (1, 64, 4096, 65536), (8, 64, 128, 256), (2, 8), res["hbm"]["GB_per_s"],
                                     families),
                "correctness": lambda: correctness(device, T=65536, families=families),
                "block_sweep": lambda: block_sweep(device, 65536, 256, res["hbm"]["GB_per_s"])}
    for name, fn in sections.items():
        if name not in skip:
            res[name] = fn()
            (out / "steer_kernels_gpu.json").write_text(json.dumps(res, indent=2))  # partial results survive a timeout
    (out / "steer_kernels_gpu.md").write_text(markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    lines = [f"# Masked-routing kernels vs eager PyTorch ({res['device']}, torch {res['torch']}, "
             f"triton {res['triton']})", "",
             f"Measured HBM bandwidth (1 GiB device copy, read + write): **{res['hbm']['GB_per_s']} GB/s**.", ""]
    if "grid" in res:
        lines += ["## Speed (bf16 logits, steered tables)", "",
                  "eager ms / kernel ms: wall time per call of back-to-back calls as a user's forward makes them "
                  "(host launch cost included): the speed-up. kernel GPU ms: the kernel's own device time (calls "
                  "captured in a CUDA graph and replayed, no host work between them, the logits cycling through "
                  "copies totalling over 3x the L2 so every call reads them from HBM): the bandwidth, bytes read "
                  "(logits + tables) + written (weights + indices) over that time.", "",
                  "| family | T | E | k | eager ms | kernel ms | speed-up | kernel GPU ms | kernel GB/s | of HBM |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["grid"]:
            lines.append(f"| {r['family']} | {r['T']} | {r['E']} | {r['k']} | {r['reference_ms']:.4f} | "
                         f"{r['kernel_ms']:.4f} | {r['speedup']:.2f}x | {r.get('kernel_gpu_ms', float('nan')):.4f} | "
                         f"{r['kernel_GB_per_s']:.0f} | {r['frac_of_hbm']:.0%} |")
        big = [r for r in res["grid"] if r["T"] >= 4096]
        lines += ["", f"T >= 4096: min speed-up {min(r['speedup'] for r in big):.2f}x over {len(big)} configurations; "
                      f"T = 65536, E = 256: fraction of HBM "
                      f"{', '.join(str(r['frac_of_hbm']) for r in res['grid'] if r['T'] == 65536 and r['E'] == 256)}.", ""]
    if "correctness" in res:
        lines += ["## Full-size correctness vs the reference on the GPU (rows with equal selection / rows)", "",
                  "| family / E / k / dtype | steered | steered, tied logits | neutral kernel vs rule | "
                  "neutral, tied | max |Δw| steered |", "|---|---|---|---|---|---:|"]
        for key, v in res["correctness"].items():
            cells = [f"{c['rows_selection_equal']}/{c['rows']} (sets {c['rows_set_equal']})" for c in v.values()]
            lines.append(f"| {key} | " + " | ".join(cells) + f" | {v['steered']['weights_max_abs_err']:.2e} |")
        lines.append("")
    if "ties" in res:
        lines += ["## CUDA tie-breaking (fraction of rows equal to 'lower index first'; quantised logits)", "",
                  "| E, k | topk sorted | topk sorted, higher index first | topk unsorted (sets) | max |",
                  "|---|---:|---:|---:|---:|"]
        for key, v in res["ties"].items():
            lines.append(f"| {key} | {v['topk_sorted_rows_equal_lowest_first']:.4f} | "
                         f"{v.get('topk_sorted_rows_equal_highest_first', float('nan')):.4f} | "
                         f"{v['topk_unsorted_sets_equal_lowest_first']:.4f} | {v['max_indices_equal_first']:.4f} |")
        lines.append("")
    if "host_overhead_us" in res:
        lines += ["## Host (CPU) microseconds per call, T = 1, E = 64, k = 8 (no synchronisation)", "",
                  "| part | us |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in res["host_overhead_us"].items()] + [""]
    if "block_sweep" in res:
        lines += ["## Launch variants at T = 65536, E = 256 (kernel GPU time, cold L2)", "",
                  "`rows`: `triton_route` (rows per program); `stream`: `triton_stream` (threads per row).", "",
                  "| family | k | kernel | rows per program / threads per row | warps | ms | of HBM |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for r in res["block_sweep"]:
            if "ms" in r:
                shape = r.get("block_rows", r.get("threads_per_row"))
                lines.append(f"| {r['family']} | {r['k']} | {r.get('impl', 'rows')} | {shape} | {r['num_warps']} | "
                             f"{r['ms']:.4f} | {r['frac_of_hbm']:.0%} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
