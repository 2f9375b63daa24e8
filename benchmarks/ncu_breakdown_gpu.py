"""Where a masked-routing call's time goes, kernel by kernel (Nsight Compute, GPU only): every kernel of the last
``route_kernel`` call of ``profile_call_gpu.py`` for each configuration, with its duration, executed instructions,
occupancy, and the sub-units behind the L1/TEX and SM throughputs (ncu's ``breakdown:``), so a fix aims at the unit
that binds (a launch's latency, L1 wavefronts, a pipe) rather than at instruction counts.

Usage: python3 benchmarks/ncu_breakdown_gpu.py 'deepseek_v3 --k 8 --steered --dtype float32' ['...' ...]
           [--out DIR] [--top 8]
  (a configuration takes ``profile_call_gpu.py``'s arguments, its stream options quoted for shlex:
   "deepseek_v3 --k 8 --opts '{\"IN_PLACE\": true}'")
Prints per configuration and kernel: duration (µs), instructions, warps active, and the busiest sub-metrics of
each breakdown; ``--out`` keeps ncu's raw CSV per configuration."""
import argparse
import csv
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

METRICS = ["gpu__time_duration.sum", "smsp__inst_executed.sum", "sm__warps_active.avg.pct_of_peak_sustained_active",
           "launch__grid_size", "launch__registers_per_thread", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
           "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum", "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
           "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum", "smsp__inst_executed_op_shfl.sum",
           "breakdown:l1tex__throughput.avg.pct_of_peak_sustained_active",
           "breakdown:sm__throughput.avg.pct_of_peak_sustained_active",
           "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
           "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active"]


def profile(config: str, calls: int, out: Path | None) -> list[dict]:
    """ncu over every kernel of the run (a few calls, the first ones compile); the rows of the last call."""
    cmd = ["ncu", "--csv", "--page", "raw", "--metrics", ",".join(METRICS), sys.executable,
           "benchmarks/profile_call_gpu.py", *shlex.split(config), "--calls", str(calls)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    text = res.stdout
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        # a plain file name (the device hands back only those): options' quotes and braces go
        (out / (re.sub(r"[^A-Za-z0-9_.]+", "_", config).strip("_") + ".csv")).write_text(text + res.stderr[-4000:])
    start = text.find('"ID"')
    if start < 0:
        print("ncu gave no table:", res.stderr[-2000:], text[-2000:])
        return []
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    rows = [r for r in rows if r.get("ID", "").isdigit()]  # the second line holds units
    names = [r["Kernel Name"] for r in rows]
    for period in range(1, len(names) // 2 + 1):  # the steady calls repeat the same launches
        if names[-period:] == names[-2 * period:-period]:
            return rows[-period:]
    return rows


def summary(row: dict, top: int) -> str:
    name = row["Kernel Name"][:40]
    def num(key):
        try:
            return float(row.get(key, "nan").replace(",", ""))
        except ValueError:
            return float("nan")
    head = (f"  {name:40s} {num('gpu__time_duration.sum') / 1e3:8.2f} us  inst {num('smsp__inst_executed.sum'):.3g}"
            f"  grid {num('launch__grid_size'):.0f} regs {num('launch__registers_per_thread'):.0f}"
            f"  warps {num('sm__warps_active.avg.pct_of_peak_sustained_active'):.1f}%"
            f"  dram {num('dram__throughput.avg.pct_of_peak_sustained_elapsed'):.1f}%"
            f"  xu {num('sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active'):.1f}%"
            f"  lsu {num('sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active'):.1f}%\n"
            f"    ld req {num('l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum'):.3g}"
            f" sectors {num('l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum'):.3g}"
            f" smem wf {num('l1tex__data_pipe_lsu_wavefronts_mem_shared.sum'):.3g}"
            f" shfl {num('smsp__inst_executed_op_shfl.sum'):.3g}")
    parts = [head]
    for unit in ("l1tex__", "sm__"):
        subs = []
        for key, val in row.items():
            if key.startswith(unit) and "pct_of_peak" in key and key not in (
                    "sm__warps_active.avg.pct_of_peak_sustained_active",):
                try:
                    subs.append((float(val.replace(",", "")), key))
                except ValueError:
                    pass
        subs.sort(reverse=True)
        parts.append("    " + unit + ": " + ", ".join(f"{k.split('.')[0]} {v:.1f}" for v, k in subs[:top]))
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    for config in args.configs:
        print(config, flush=True)
        for row in profile(config, args.calls, args.out):
            print(summary(row, args.top), flush=True)


if __name__ == "__main__":
    main()
