"""Launch a Triton kernel without Triton's per-call binding: ``launch(kernel, grid, *args, **consts)``.

``kernel[grid](*args, **consts)`` costs 60-150 us of host time a call on the H100 hosts measured (Triton 3.6,
``benchmarks/results/steer_kernels_gpu.json``, ``host_overhead_us``): Triton binds every argument, builds the
specialization list and a string key over ~35 constexprs, and looks that up, each call. A steered model routes
every MoE layer of every decode step with the same constexprs, and at up to 4,096 tokens that host time is the
call's whole cost. So the first call of a configuration goes through Triton (which compiles, caches and returns
its ``CompiledKernel``), and later calls replay that compiled kernel through Triton's own runner,
``compiled[grid](*all_args)``: the current stream, the launch hooks and the C launcher are Triton's.

Our key must tell apart every pair of calls that Triton would compile apart. It is a superset of what Triton 3.x
specializes a runtime argument on (a tensor's dtype and 16-byte alignment; an int's equality to 1, divisibility
by 16 and width; floats and bools by type only), plus the constexprs and options by name, the current device and
the debug knob. Over-specializing only costs a cache entry that points at the same compiled kernel. An argument
of another type skips the cache: that call goes through Triton.

The cache lives on the kernel object, next to Triton's own, so it is per kernel and per process. Under the
interpreter (``TRITON_INTERPRET=1``) a kernel is not a ``JITFunction``, and every call goes through Triton.
"""
from __future__ import annotations

import inspect

import torch
import triton
from triton.runtime.jit import JITFunction

_CACHE_ATTR = "_routelens_launch_cache"


def _arg_key(arg):
    """What Triton could specialize ``arg`` on (or more)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):  # before int: bool is an int
        return bool, arg
    if isinstance(arg, int):
        return int, arg == 1, arg % 16 == 0, -2 ** 31 <= arg < 2 ** 31, arg < 2 ** 63
    if isinstance(arg, float):
        return float
    if arg is None:
        return None
    raise TypeError(f"no launch key for a {type(arg).__name__}")


def _debug() -> bool:
    """Triton's debug knob (it recompiles with device asserts; ``knobs`` from Triton 3.3)."""
    knobs = getattr(triton, "knobs", None)
    return bool(knobs is not None and knobs.runtime.debug)


def _tail(kernel: JITFunction, n_args: int, consts: dict) -> tuple:
    """The values of the parameters after the ``n_args`` positional ones, in signature order: the runner takes
    every parameter (constexprs too), and defaults as Triton's binder applies them."""
    params = list(inspect.signature(kernel.fn).parameters.values())[n_args:]
    return tuple(consts[p.name] if p.name in consts else p.default for p in params)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` on the host. (``triton.cdiv`` and ``triton.next_power_of_2`` became constexpr functions in
    Triton 3.9, ~2 us a host call: over half of ``route_kernel``'s own Python time before the launch.)"""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n`` <= 1), on the host."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def launch(kernel, grid: tuple, *args, **consts) -> None:
    """``kernel[grid](*args, **consts)`` (runtime arguments positional, constexprs and options by keyword), with
    repeats of a configuration replayed from the compiled kernel."""
    if not isinstance(kernel, JITFunction):
        kernel[grid](*args, **consts)
        return
    cache = kernel.__dict__.setdefault(_CACHE_ATTR, {})
    try:
        key = (torch.cuda.current_device(), _debug(), tuple(map(_arg_key, args)), tuple(consts.items()))
        hit = cache.get(key)
    except TypeError:  # an argument our key cannot describe, or an unhashable constexpr: Triton's own path
        kernel[grid](*args, **consts)
        return
    if hit is None:
        compiled = kernel[grid](*args, **consts)
        if compiled is not None and hasattr(compiled, "__getitem__"):
            cache[key] = (compiled, _tail(kernel, len(args), consts))
        return
    compiled, tail = hit
    compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *tail)
