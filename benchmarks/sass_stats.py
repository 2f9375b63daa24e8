"""The kernels one ``route_kernel`` call launches, compiled for sm_90 on a machine without a GPU (Triton's bundled
ptxas and cuobjdump), with their registers, shared memory and static SASS instruction mix: a first look at a kernel
change before any device time is spent (the streamed kernels are fully unrolled, so static counts track the
executed instructions of a block's common path; timings still need the GPU).

Usage: python benchmarks/sass_stats.py FAMILY K steered|plain [DTYPE] [--package routelens.kernels] [--E 256]
           [--opts JSON] [--dump DIR]
  e.g. the kernels at a revision side by side: copy them as in kernels_ab_gpu.py, then --package out.khead
Prints one JSON line per kernel: [name, "REGS smem SHARED", instructions, {opcode: count} (the 14 commonest)].

It compiles with whichever Triton is imported. The GPU machine runs Triton 3.6.0 (``steer_kernels_gpu.json``), and
3.6 lays some tensors out differently from this checkout's 3.9 (its coalescing orders tied dimensions from the
first: the old ``[2, ROWS, S, 4]`` float32 chunks went through shuffles there and not here). To read the SASS the
GPU runs: ``pip download --no-deps triton==3.6.0`` and ``pip install --no-deps --target /tmp/tri36site`` the wheel,
then ``PYTHONPATH=/tmp/tri36site python benchmarks/sass_stats.py ...``."""
import argparse
import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from steer_kernels_gpu import FAMILIES, make_rule, make_tables  # noqa: E402

from routelens.steering.spec import LayerTables  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
OPTIONS = {"num_warps", "num_stages", "enable_fp_fusion", "num_ctas", "maxnreg"}
POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
           torch.int64: "*i64"}


def _sass(kernel, args, consts, dump: Path | None = None) -> list:
    """Compile ``kernel`` as ``launch(kernel, grid, *args, **consts)`` would (tensors and multiples of 16 specialised
    as 16-divisible, as Triton does for aligned arguments) and read its SASS."""
    params = inspect.signature(kernel.fn).parameters
    names = list(params)
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, a) in enumerate(zip(names, args)):
        if isinstance(a, torch.Tensor):
            signature[name] = POINTER[a.dtype]
        elif isinstance(a, bool):
            signature[name] = "i1"
        elif isinstance(a, int):
            signature[name] = "i32"
        else:
            signature[name] = "fp32"
        if isinstance(a, torch.Tensor) or (type(a) is int and a % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name in names[len(args):]:
        signature[name] = "constexpr"
        constexprs[name] = consts.get(name, params[name].default)
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={k: v for k, v in consts.items() if k in OPTIONS})
    cubin = Path(f"/tmp/routelens_{kernel.fn.__name__}.cubin")
    cubin.write_bytes(compiled.asm["cubin"])
    sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    if dump is not None:  # the stages, to read where instructions come from (layouts in ttgir, SASS per line)
        dump.mkdir(parents=True, exist_ok=True)
        for stage in ("ttir", "ttgir", "ptx"):
            (dump / f"{kernel.fn.__name__}.{stage}").write_text(compiled.asm[stage])
        (dump / f"{kernel.fn.__name__}.sass").write_text(sass)
    usage = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    ops: dict[str, int] = {}
    for line in sass.splitlines():
        if re.match(r"\s+/\*[0-9a-f]{4}\*/", line):
            words = line.split("*/", 1)[1].split()
            op = (words[1] if words[0].startswith("@") else words[0]).split(".")[0]
            ops[op] = ops.get(op, 0) + 1
    regs, smem = re.search(r"REG:(\d+)", usage).group(1), re.search(r"SHARED:(\d+)", usage).group(1)
    regs = f"{regs} smem {smem}"
    return [kernel.fn.__name__, regs, sum(ops.values()), dict(sorted(ops.items(), key=lambda kv: -kv[1])[:14])]


ap = argparse.ArgumentParser()
ap.add_argument("family", choices=FAMILIES)
ap.add_argument("k", type=int)
ap.add_argument("mode", choices=("steered", "plain"))
ap.add_argument("dtype", nargs="?", default="bfloat16")
ap.add_argument("--package", default="routelens.kernels")
ap.add_argument("--E", type=int, default=256)
ap.add_argument("--T", type=int, default=65536)
ap.add_argument("--opts", type=json.loads, default=None, help='route_kernel\'s _stream_opts, e.g. {"maxnreg": 64}')
ap.add_argument("--dump", type=Path, default=None, help="also write each kernel's ttir, ttgir, ptx and SASS here")
args = ap.parse_args()
route = importlib.import_module(args.package + ".triton_route")
launched = []
route.launch = lambda kernel, grid, *a, **c: launched.append(_sass(kernel, a, c, args.dump))
route._INTERPRET = True  # past the CUDA-tensor check; the kernels compile as for the GPU (precise paths)
route._PRECISE = True
rule = make_rule(args.family, args.E, args.k, "cpu")
tables = make_tables(args.family, args.E, args.k) if args.mode == "steered" else LayerTables.neutral(args.E)
route.route_kernel(torch.zeros(args.T, args.E, dtype=getattr(torch, args.dtype)), rule, tables, impl="auto",
                   _stream_opts=args.opts)
for row in launched:
    print(json.dumps(row))
