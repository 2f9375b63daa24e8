"""lrc speed benchmark: SRP + SCH over 1 M tokens × 16 layers × top-8 of 64, and moe-lrc's own code side by side.

    .venv/bin/python benchmarks/lrc_speed.py --moe-lrc /tmp/moe-lrc [--store PATH] [--tokens 1048576]
        [--ref-srp-seqs 256] [--ref-sch-seqs 4] [--ref-model-seqs 2] [--skip-full]

Data: 16 MoE layers × top-8 of E=64, 512-token sequences (one moe-lrc sample each). Per (sequence, layer) the
routing is a sticky process: score_e = base_e + 2.0·[e was chosen for the previous token] + Gumbel noise, top-8
of the scores, where base_e = a per-(sequence, layer) N(0, 1) "topic" preference plus N(0, 0.5²). The store is
reused when ``--store`` names an existing one (run name ``lrc-bench``).

Full run (the goal: ≤ 60 s on the 2-core CPU): the whole ``lrc`` analysis in a fresh subprocess (load from DuckDB
+ all m + the default ρ grid + per layer + model level + bootstrap B=1000), once for SRP+SCH and once with the
LRU/LFU/Belady baselines too, with wall time, CPU time and peak RSS (ru_maxrss of the child). Numba's compiled
kernels are cached on disk, so a first subprocess warms the cache and is reported separately.

Side by side: moe-lrc's reference functions are loaded at run time from the checkout given by ``--moe-lrc``
(``src/30_srp_calc.py::seg_stat``, ``src/31_srp_refine.py::refine``, ``src/41_sch_calc.py::stat``,
``src/50_chr_calc.py::stat``; a stub ``misc`` module supplies their config), run on a subset of the same routing,
and routelens' ``lrc`` runs on the very same subset (a store holding just those sequences), in the same process
and run. The point estimates are compared (moe-lrc computes in float32, so agreement is to ~1e-6); the
intervals differ only through the random resamples (torch vs numpy generators).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
from numba import njit, prange

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from routelens.records import RunMeta, SequenceRecord, TokenBlock  # noqa: E402
from routelens.store import Store  # noqa: E402

L, K, E, T = 16, 8, 64, 512
SEG_LENS = [4, 16, 64, 256]
RUN = "lrc-bench"


@njit(parallel=True, cache=True)
def sticky_routing(n_seq, seq_len, n_layers, n_experts, k, stick, topic, seed):  # pragma: no cover - compiled
    out = np.empty((n_layers, n_seq * seq_len, k), np.uint8)
    for job in prange(n_seq * n_layers):
        s, l = job // n_layers, job % n_layers
        np.random.seed(seed + job)
        base = np.empty(n_experts)
        for e in range(n_experts):
            base[e] = np.random.randn() * topic + 0.5 * np.random.randn()
        prev = np.zeros(n_experts)
        sc = np.empty(n_experts)
        for t in range(seq_len):
            for e in range(n_experts):
                sc[e] = base[e] + stick * prev[e] - np.log(-np.log(np.random.random() + 1e-300) + 1e-300)
            idx = np.argsort(-sc)[:k]
            prev[:] = 0.0
            for r in range(k):
                out[l, s * seq_len + t, r] = idx[r]
                prev[idx[r]] = 1.0
    return out


def write_store(path: Path, experts: np.ndarray, name: str = RUN):
    n_tok = experts.shape[1]
    n_seq = n_tok // T
    meta = RunMeta(model="bench/sticky", architecture="Synthetic", family="qwen3_moe", config_hash="0",
                   num_experts=E, top_k=K, moe_layers=tuple(range(L)), num_layers=L, dtype="float32",
                   transformers_version="-", torch_version="-", routelens_version="-", input_source="synthetic",
                   name=name)
    store = Store.open(path)
    writer = store.create_run(meta)
    with writer:
        writer.add_sequences([SequenceRecord(seq_id=i, text=f"s{i}", n_tokens=T) for i in range(n_seq)])
        per = 64 * T
        for a in range(0, n_tok, per):
            b = min(n_tok, a + per)
            seq = np.repeat(np.arange(a // T, b // T, dtype=np.int64), T)
            pos = np.tile(np.arange(T, dtype=np.int32), (b - a) // T)
            writer.add_block(TokenBlock(seq_id=seq, pos=pos, token_id=np.zeros(b - a, np.int32),
                                        layers=tuple(range(L)), experts=experts[:, a:b].astype(np.uint16),
                                        weights=np.full((L, b - a, K), 1 / K, np.float32)))
        writer.finish("complete")
    return store


CHILD = """
import json, resource, sys, time
t0 = time.perf_counter(); c0 = time.process_time()
import routelens.analyses as A
from routelens.store import Store
store = Store.open(sys.argv[1], create=False)
t1 = time.perf_counter()
metrics = tuple(sys.argv[2].split(","))
res = A.run(store, "lrc", sys.argv[3], metrics=metrics, save=False)
t2 = time.perf_counter()
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": t2 - t1, "wall_with_imports_s": t2 - t0, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "peak_rss_mib": ru.ru_maxrss / 1024, "rows": res.frames["values"].height}))
"""


def timed_child(store_path, metrics, run=RUN):
    out = subprocess.run([sys.executable, "-c", CHILD, str(store_path), ",".join(metrics), run], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ moe-lrc, side by side
def load_moe_lrc(repo: Path, model_key: str, n_layers: int):
    import pandas as pd

    misc = types.ModuleType("misc")
    cfg = {"seg_lengths": SEG_LENS, "num_bootstrap": 1000, "ci_confidence": 0.95}
    misc.get_global_config = cfg.get
    misc.model_config = pd.DataFrame({"num_layers": [n_layers], "num_experts": [E], "top_k": [K], "type": ["causal"]},
                                     index=pd.Index([model_key], name="key"))
    misc.print_log = lambda *a, **k: None
    misc.stable_hash = lambda s: int.from_bytes(hashlib.sha256(s.encode()).digest()[:4], "little")
    misc.get_model_keys = lambda from_arg=False: [model_key]
    misc.get_model_key = lambda: model_key
    sys.modules["misc"] = misc
    mods = {}
    for stem in ("30_srp_calc", "31_srp_refine", "41_sch_calc", "50_chr_calc"):
        spec = importlib.util.spec_from_file_location(f"moe_lrc_{stem}", repo / "src" / f"{stem}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # its process pool pickles functions by module name
        spec.loader.exec_module(mod)
        mods[stem] = mod
    return mods


def ref_srp(mods, experts: np.ndarray, n_seq: int, workdir: Path, model_key: str):
    """moe-lrc SRP (seg_stat + refine) on the first n_seq sequences: rank files with the top-k as highest ranks."""
    import pandas as pd
    import torch
    from safetensors.torch import save_file

    rank_dir, srp_dir, pq_dir = workdir / "rank", workdir / "srp", workdir / "srp_pq"
    for d in (rank_dir, srp_dir, pq_dir):
        d.mkdir(parents=True, exist_ok=True)
    for l in range(L):
        ex = experts[l, :n_seq * T].reshape(n_seq, T, K).astype(np.int64)
        rank = np.zeros((n_seq, T, E), np.int16)
        np.put_along_axis(rank, ex, (E - 1 - np.arange(K, dtype=np.int16))[None, None, :], axis=-1)
        save_file({"bench": torch.from_numpy(rank)}, rank_dir / f"{model_key}_{l:02d}.safetensors")
    t0 = time.perf_counter()
    mods["30_srp_calc"].seg_stat(1000, rank_dir, srp_dir, model_key)
    mods["31_srp_refine"].refine(0.95, srp_dir, pq_dir, model_key)
    seconds = time.perf_counter() - t0
    return seconds, pd.read_parquet(pq_dir / f"{model_key}_lg.parquet"), pd.read_parquet(pq_dir / f"{model_key}_mg.parquet")


def ref_cache(mods, experts: np.ndarray, n_seq: int, model_seqs: int):
    """moe-lrc SCH (41 stat) and LRU/LFU/Belady (50 stat), per layer on n_seq and model level on model_seqs."""
    import torch

    rng = torch.manual_seed(0)
    sch, chr_ = mods["41_sch_calc"], mods["50_chr_calc"]
    tk = [torch.from_numpy(experts[l, :n_seq * T].reshape(n_seq, T, K).astype(np.int64)) for l in range(L)]
    out = {"layer": {}, "model": {}}
    t0 = time.perf_counter()
    for l in range(L):
        out["layer"][l] = (sch.stat(tk[l], E, SEG_LENS, 1000, 975, 25, rng).numpy(),
                           chr_.stat(tk[l], E, 1000, 975, 25, rng).numpy())
    t_layer = time.perf_counter() - t0
    cat = torch.cat([tk[l][:model_seqs] + l * E for l in range(L)], dim=-1)
    t0 = time.perf_counter()
    out["model"][None] = (sch.stat(cat, E * L, SEG_LENS, 1000, 975, 25, rng).numpy(),
                          chr_.stat(cat, E * L, 1000, 975, 25, rng).numpy())
    t_model = time.perf_counter() - t0
    return t_layer, t_model, out


def ours_on(experts: np.ndarray, n_seq: int, workdir: Path, name: str, metrics, model_level=True):
    import routelens.analyses as A

    store = write_store(workdir / f"{name}.duckdb", np.ascontiguousarray(experts[:, :n_seq * T]), name=name)
    t0 = time.perf_counter()
    res = A.run(store, "lrc", name, metrics=tuple(metrics), model_level=model_level, save=False)
    return time.perf_counter() - t0, res.frames["values"]


def compare(args, experts, workdir: Path):
    import polars as pl

    mods = load_moe_lrc(Path(args.moe_lrc), "bench", L)
    report = {}
    # SRP
    t_ref, lg, mg = ref_srp(mods, experts, args.ref_srp_seqs, workdir, "bench")
    t_our, ours = ours_on(experts, args.ref_srp_seqs, workdir, "srpsub", ["srp"])
    diffs = []
    for _, r in lg.iterrows():
        o = ours.filter((pl.col("layer") == int(r.layer_idx)) & (pl.col("m") == int(r.seg_len))).row(0, named=True)
        diffs += [abs(o["value"] - r.best_f1), abs(o["best_rho"] - r.best_m), abs(o["act_r"] - r.act_r)]
    for _, r in mg.iterrows():
        o = ours.filter(pl.col("layer").is_null() & (pl.col("m") == int(r.seg_len))).row(0, named=True)
        diffs += [abs(o["value"] - r.best_f1), abs(o["best_rho"] - r.best_m), abs(o["act_r"] - r.act_r)]
    report["srp"] = {"sequences": args.ref_srp_seqs, "moe_lrc_s": t_ref, "routelens_s": t_our,
                     "speedup": t_ref / t_our, "compared_values": len(diffs), "max_abs_diff": float(max(diffs))}
    # SCH + baselines, per layer on ref_sch_seqs, model level on ref_model_seqs
    t_layer, t_model, ref = ref_cache(mods, experts, args.ref_sch_seqs, args.ref_model_seqs)
    t_our_layer, ours_l = ours_on(experts, args.ref_sch_seqs, workdir, "schsub", ["sch", "lru", "lfu", "belady"],
                                  model_level=False)
    t_our_model, ours_m = ours_on(experts, args.ref_model_seqs, workdir, "schmod", ["sch", "lru", "lfu", "belady"])
    ours_m = ours_m.filter(pl.col("scope") == "model")
    diffs, n_cmp = [], 0
    for scope, frame, refd in (("layer", ours_l, ref["layer"]), ("model", ours_m, ref["model"])):
        for layer, (sch_arr, chr_arr) in refd.items():
            sub = frame.filter(pl.col("layer") == layer) if layer is not None else frame
            for row in sub.iter_rows(named=True):
                c = row["capacity"] - 1
                if row["metric"] == "sch":
                    want = sch_arr[SEG_LENS.index(row["m"]), 1, c]
                else:
                    want = chr_arr[("lru", "lfu", "belady").index(row["metric"]), 1, c]
                diffs.append(abs(row["value"] - float(want)))
    report["sch_and_baselines_per_layer"] = {
        "sequences": args.ref_sch_seqs, "layers": L, "moe_lrc_s": t_layer, "routelens_s": t_our_layer,
        "speedup": t_layer / t_our_layer}
    report["sch_and_baselines_model_level"] = {
        "sequences": args.ref_model_seqs, "moe_lrc_s": t_model,
        "routelens_s_incl_per_layer": t_our_model, "speedup_lower_bound": t_model / t_our_model}
    report["cache_compared_values"] = len(diffs)
    report["cache_max_abs_diff"] = float(max(diffs))
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--moe-lrc", help="checkout of github.com/ljcleo/moe-lrc (its src/ is loaded at run time)")
    ap.add_argument("--store", default=None, help="store to build or reuse (default: a temporary file)")
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--ref-srp-seqs", type=int, default=256, help="sequences for the SRP side-by-side (>128: "
                    "moe-lrc stops doubling m at the sample count)")
    ap.add_argument("--ref-sch-seqs", type=int, default=4)
    ap.add_argument("--ref-model-seqs", type=int, default=1)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="timed SRP+SCH processes (the median is reported)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lrc_speed"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lrc_bench_"))
    store_path = Path(args.store) if args.store else tmp / "bench.duckdb"
    n_seq = args.tokens // T
    t0 = time.perf_counter()
    if store_path.exists():  # the same routing, read back (regenerating it costs a minute)
        from routelens.analyses.routing_arrays import load_routing
        st = Store.open(store_path, create=False)
        experts = load_routing(st, st.run(RUN).info).experts
        del st
    else:
        experts = sticky_routing(n_seq, T, L, E, K, 2.0, 1.0, 12345)
    gen_s = time.perf_counter() - t0
    if not store_path.exists():
        t0 = time.perf_counter()
        write_store(store_path, experts)
        print(f"store written in {time.perf_counter() - t0:.1f} s", flush=True)
    result = {"tokens": n_seq * T, "layers": L, "top_k": K, "experts": E, "seq_len": T, "cpu_count": os.cpu_count(),
              "generate_s": gen_s, "loadavg_start": os.getloadavg()}
    if not args.skip_full:
        result["warmup_srp_sch"] = timed_child(store_path, ["srp", "sch"])
        reps = []
        for _ in range(args.repeats):
            x = timed_child(store_path, ["srp", "sch"])
            x["loadavg_1min_after"] = os.getloadavg()[0]
            reps.append(x)
            print("SRP+SCH:", x, flush=True)
        result["srp_sch_repeats"] = reps
        result["full_srp_sch"] = sorted(reps, key=lambda r: r["wall_s"])[len(reps) // 2]  # the median by wall
        result["full_all_metrics"] = timed_child(store_path, ["srp", "sch", "lru", "lfu", "belady"])
        print("all:", result["full_all_metrics"], flush=True)
    if args.moe_lrc:
        result["side_by_side"] = compare(args, experts, tmp)
        print(json.dumps(result["side_by_side"], indent=1), flush=True)
    result["loadavg_end"] = os.getloadavg()
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    Path(args.out + ".md").write_text(render(result))
    print(render(result))


def render(r) -> str:
    lines = ["# lrc speed (SRP + SCH, moe-lrc definitions)", "",
             f"Routing: {r['tokens']:,} tokens × {r['layers']} layers × top-{r['top_k']} of {r['experts']} "
             f"({r['seq_len']}-token sequences, sticky synthetic routing); machine: {r['cpu_count']} CPU cores, "
             f"load average at start {r['loadavg_start'][0]:.1f} (shared box). Generated by "
             "`benchmarks/lrc_speed.py`.", ""]
    if "full_srp_sch" in r:
        lines += ["| analysis (fresh process, load + all m + ρ grid + layers + model + B=1000) | wall s | CPU s | "
                  "peak RSS MiB | 1-min load after |", "|---|---|---|---|---|"]
        items = [("warmup_srp_sch", "SRP+SCH, first process (numba cache warm-up)")]
        items += [(("srp_sch_repeats", i), f"SRP+SCH, run {i + 1}") for i in range(len(r.get("srp_sch_repeats", [])))]
        items += [("full_srp_sch", "**SRP+SCH, median of the runs**"), ("full_all_metrics", "SRP+SCH+LRU+LFU+Belady")]
        for key, label in items:
            x = r[key[0]][key[1]] if isinstance(key, tuple) else r[key]
            load = f"{x['loadavg_1min_after']:.1f}" if "loadavg_1min_after" in x else "-"
            lines.append(f"| {label} | {x['wall_s']:.1f} | {x['cpu_s']:.1f} | {x['peak_rss_mib']:.0f} | {load} |")
        ok = r["full_srp_sch"]["wall_s"] <= 60
        lines += ["", f"Goal, SRP+SCH in ≤ 60 s wall: **{'met' if ok else 'NOT met'}** "
                  f"(median {r['full_srp_sch']['wall_s']:.0f} s wall, {r['full_srp_sch']['cpu_s']:.0f} CPU s on the "
                  f"shared box; load average {r['loadavg_start'][0]:.1f} at the start, {r['loadavg_end'][0]:.1f} at "
                  "the end). Peak RSS includes `load_routing` (DuckDB buffers) and the numba/polars runtime. "
                  "CPU s above wall s is the two cores working at once; the other load on the box takes the rest.",
                  ""]
    if "side_by_side" in r:
        s = r["side_by_side"]
        lines += ["Side by side with moe-lrc's own code (same routing subset, same run):", "",
                  "| part | sequences | moe-lrc s | routelens s | ratio |", "|---|---|---|---|---|",
                  f"| SRP (seg_stat + refine vs lrc srp, all m, 16 layers + model) | {s['srp']['sequences']} | "
                  f"{s['srp']['moe_lrc_s']:.2f} | {s['srp']['routelens_s']:.2f} | {s['srp']['speedup']:.1f}× |"]
        a = s["sch_and_baselines_per_layer"]
        lines.append(f"| SCH (4 m) + LRU/LFU/Belady, 16 layers | {a['sequences']} | {a['moe_lrc_s']:.2f} | "
                     f"{a['routelens_s']:.2f} | {a['speedup']:.0f}× |")
        b = s["sch_and_baselines_model_level"]
        lines.append(f"| same, model level (routelens time includes its per-layer pass too) | {b['sequences']} | "
                     f"{b['moe_lrc_s']:.2f} | {b['routelens_s_incl_per_layer']:.2f} | ≥{b['speedup_lower_bound']:.0f}× |")
        lines += ["", f"Agreement: SRP {s['srp']['compared_values']} values (best F1, best_m, act_r), max |diff| "
                  f"{s['srp']['max_abs_diff']:.2e}; SCH/LRU/LFU/Belady {s['cache_compared_values']} hit rates, max "
                  f"|diff| {s['cache_max_abs_diff']:.2e} (moe-lrc computes in float32).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
