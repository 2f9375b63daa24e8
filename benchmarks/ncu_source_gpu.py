"""Where one kernel's warps wait, instruction by instruction (Nsight Compute's source counters, GPU only): the
stream kernel of a ``profile_call_gpu.py`` configuration, profiled once (a steady call, after the compiling ones),
its SASS with per-instruction warp-stall samples written as CSV, and a summary printed: the stall reasons overall
and the instructions holding the most samples. Complements ``ncu_breakdown_gpu.py`` (which unit binds) with where
in the code the time goes (which pass, which load).

Usage: python3 benchmarks/ncu_source_gpu.py KERNEL_REGEX 'deepseek_v3 --k 8 --steered --dtype bfloat16' --out DIR
       python3 benchmarks/ncu_source_gpu.py --csv DIR/NAME.sass.csv   (again, from the CSV, on any machine)
benchmarks/results/grouped_ncu_source_gpu.txt: DeepSeek-V3 (bf16, float32) and V2 grouped (bf16), k = 8 steered,
  the kernels of 6329141 on an H200.
"""
import argparse
import collections
import csv
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path


def _num(v) -> float:
    try:
        return float(str(v).replace(",", ""))
    except ValueError:
        return 0.0


def _opcode(source: str) -> str:
    words = source.split()
    return (words[1] if words and words[0].startswith("@") and len(words) > 1 else words[0] if words else "")


def summarize(text: str, top: int, window: int) -> None:
    """The stall reasons overall, then per window of ``window`` SASS lines (in program order, so the passes show
    as runs of windows: their loads and MUFU ops are counted) its share of the samples, executed instructions a
    block and top reasons; then the ``top`` instructions by samples."""
    start = text.find('"Address"')
    if start < 0:
        print("no source table:", text[:1500])
        return
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    key = next((k for k in rows[0] if "Warp Stall Sampling (All" in k), None)
    if key is None:
        print("columns:", list(rows[0]))
        return
    stalls = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
    total = sum(_num(r[key]) for r in rows) or 1.0
    blocks = max(_num(rows[0]["Instructions Executed"]), 1.0)  # the first instruction runs once a block
    overall = collections.Counter({k: sum(_num(r[k]) for r in rows) for k in stalls})
    print(f"{len(rows)} SASS lines, {total:.0f} samples, {sum(_num(r['Instructions Executed']) for r in rows):.4g}"
          " warp instructions executed")
    print("stalls:", ", ".join(f"{k[6:]} {100 * v / total:.1f}%" for k, v in overall.most_common(8)))
    for a in range(0, len(rows), window):
        seg = rows[a:a + window]
        ops = collections.Counter(_opcode(r["Source"]).split(".")[0] for r in seg)
        why = collections.Counter({k: sum(_num(r[k]) for r in seg) for k in stalls})
        print(f"  lines {a:5d}+ {100 * sum(_num(r[key]) for r in seg) / total:5.1f}%"
              f"  exec/block {sum(_num(r['Instructions Executed']) for r in seg) / blocks:6.1f}"
              f"  LDG {ops['LDG']:2d} MUFU {ops['MUFU']:2d} | "
              + ", ".join(f"{k[6:]} {100 * v / total:.1f}" for k, v in why.most_common(3)))
    for i, r in sorted(enumerate(rows), key=lambda ir: -_num(ir[1][key]))[:top]:
        print(f"  #{i:5d} {100 * _num(r[key]) / total:5.1f}%  {r.get('Source', '').strip()[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel", nargs="?")
    ap.add_argument("config", nargs="?")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--csv", type=Path, help="summarise a source CSV this script wrote (no GPU needed)")
    args = ap.parse_args()
    if args.csv is not None:
        summarize(args.csv.read_text(), args.top, args.window)
        return
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
    (args.out / f"{name}.details.txt").write_text(details)
    print(details[:3000])
    src = subprocess.run(["ncu", "-i", str(rep), "--page", "source", "--csv", "--print-source", "sass"],
                         capture_output=True, text=True)
    (args.out / f"{name}.sass.csv").write_text(src.stdout)
    summarize(src.stdout, args.top, args.window)


if __name__ == "__main__":
    main()
