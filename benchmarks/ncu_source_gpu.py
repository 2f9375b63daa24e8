"""Where one kernel's warps wait, instruction by instruction (Nsight Compute's source counters, GPU only): the
stream kernel of a ``profile_call_gpu.py`` configuration, profiled once (a steady call, after the compiling ones),
its SASS with per-instruction warp-stall samples written as CSV, and a summary printed: the stall reasons overall
and the instructions holding the most samples. Complements ``ncu_breakdown_gpu.py`` (which unit binds) with where
in the code the time goes (which pass, which load).

Usage: python3 benchmarks/ncu_source_gpu.py KERNEL_REGEX 'deepseek_v3 --k 8 --steered --dtype bfloat16' --out DIR
"""
import argparse
import csv
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel")
    ap.add_argument("config")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.]+", "_", args.config).strip("_")
    rep = Path("/tmp") / f"{name}.ncu-rep"
    prof = ["ncu", "-f", "-o", str(rep).removesuffix(".ncu-rep"), "-k", f"regex:{args.kernel}", "--launch-skip", "2",
            "--launch-count", "1", "--section", "SourceCounters", "--section", "WarpStateStats",
            "--section", "SpeedOfLight", "--section", "LaunchStats", "--section", "Occupancy",
            sys.executable, "benchmarks/profile_call_gpu.py", *shlex.split(args.config), "--calls", "4"]
    res = subprocess.run(prof, capture_output=True, text=True)
    if not rep.exists():
        print("ncu wrote no report:", res.stdout[-2000:], res.stderr[-2000:])
        return
    details = subprocess.run(["ncu", "-i", str(rep), "--page", "details"], capture_output=True, text=True).stdout
    print(details[-6000:])
    src = subprocess.run(["ncu", "-i", str(rep), "--page", "source", "--csv", "--print-source", "sass"],
                         capture_output=True, text=True)
    (args.out / f"{name}.sass.csv").write_text(src.stdout)
    start = src.stdout.find('"Address"')
    if start < 0:
        start = src.stdout.find('"#"')
    if start < 0:
        print("no source table:", src.stdout[:1500], src.stderr[-1500:])
        return
    rows = list(csv.DictReader(io.StringIO(src.stdout[start:])))
    key = next((k for k in rows[0] if "Warp Stall Sampling (All" in k), None)
    if key is None:
        print("columns:", list(rows[0]))
        return
    def num(v):
        try:
            return float(str(v).replace(",", ""))
        except ValueError:
            return 0.0
    total = sum(num(r[key]) for r in rows) or 1.0
    print(f"{len(rows)} SASS lines, {total:.0f} samples")
    for i, r in sorted(enumerate(rows), key=lambda ir: -num(ir[1][key]))[:args.top]:
        print(f"  #{i:5d} {100 * num(r[key]) / total:5.1f}%  {r.get('Source', '')[:90]}")


if __name__ == "__main__":
    main()
