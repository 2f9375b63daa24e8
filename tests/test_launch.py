"""``routelens/kernels/launch.py``: replaying compiled kernels must never reuse one that Triton would have compiled apart.

On the CPU: the launch key refines Triton's own specialization of runtime arguments (checked against Triton's
specializer, not a copy of its rules), and the replayed argument tail is the signature's constexprs with their
defaults. On a CUDA device (run on the GPU machine; skipped in CI): a replayed launch gives what a fresh one gives,
across the argument properties Triton specializes on (a length of 1, lengths off a multiple of 16, misaligned
pointers), for a small kernel and for every routing family through ``route_kernel``.
"""
from __future__ import annotations

import itertools
import os

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from routelens.kernels.launch import _CACHE_ATTR, _arg_key, _tail, launch  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(INTERP, reason="the interpreter has no compiled kernels to replay")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@triton.jit
def _add_kernel(x_ptr, y_ptr, n, scale, ADD: tl.constexpr, BLOCK: tl.constexpr = 64, TWICE: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    y = x * scale + ADD
    if TWICE:
        y = y + ADD
    tl.store(y_ptr + offs, y, mask=ok)


def _tritons_spec(arg):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    return native_specialize_impl(BaseBackend, arg, False, True, True)[0]


def test_the_key_refines_tritons_specialization():
    """Two arguments with one launch key never get two different specializations from Triton."""
    base = torch.zeros(96, dtype=torch.float32)
    half = torch.zeros(96, dtype=torch.bfloat16)
    pool = ([base, base[1:], base[2:], base[4:], base[8:], half, half[1:], half[8:], torch.zeros(4, dtype=torch.int64)]
            + [0, 1, 2, 15, 16, 17, 32, 48, 4096, 65536, 65537, -1, -16, 2 ** 31 - 16, 2 ** 31, 2 ** 31 + 16,
               -2 ** 31, -2 ** 31 - 1, -2 ** 31 - 16, 2 ** 63 - 16, 2 ** 63, 2 ** 64 - 16]
            + [0.0, 1.0, 16.0, -2.5, True, False, None])
    seen = {}
    for arg in pool:
        key = _arg_key(arg)
        spec = _tritons_spec(arg)
        assert seen.setdefault(key, spec) == spec, (arg, key, spec, seen[key])
    for other in ("a string", (1, 2), torch.float32):
        with pytest.raises(TypeError):
            _arg_key(other)


def test_the_key_tells_apart_what_triton_tells_apart_in_both_directions():
    """A sanity floor for the refinement test: it would pass for a key that never repeats, so check the key is
    not finer than needed where Triton does not care (equal keys for equally specialized ints and floats)."""
    assert _arg_key(32) == _arg_key(4096) and _arg_key(17) == _arg_key(65537)
    assert _arg_key(0.5) == _arg_key(3.0)
    assert _arg_key(1) != _arg_key(17) != _arg_key(16)


def test_the_tail_is_the_constexprs_in_signature_order_with_defaults():
    assert _tail(_add_kernel, 4, {"ADD": 3, "TWICE": True, "num_warps": 2}) == (3, 64, True)
    assert _tail(_add_kernel, 4, {"ADD": 1.5, "BLOCK": 128}) == (1.5, 128, False)


@cuda
def test_replayed_launches_of_a_small_kernel_match_fresh_ones():
    dev = torch.device("cuda")
    _add_kernel.__dict__.pop(_CACHE_ATTR, None)
    src = torch.arange(200, dtype=torch.float32, device=dev)
    # lengths 1 (a constant to Triton), 16 (divisible), 17 (not); pointers aligned and off by 1 and 2 elements
    for n, off, add, twice in itertools.product((1, 16, 17, 64, 130), (0, 1, 2, 4), (1, 2), (False, True)):
        for _ in range(2):  # the first call of a configuration goes through Triton, the second is replayed
            x = src[off:off + n]
            y = torch.full((n + 3,), -7.0, device=dev)[3:]
            launch(_add_kernel, (triton.cdiv(n, 64),), x, y, n, 0.5, ADD=add, TWICE=twice, num_warps=1)
            torch.testing.assert_close(y, x * 0.5 + add * (2 if twice else 1), rtol=0, atol=0)
    assert len(_add_kernel.__dict__[_CACHE_ATTR]) > 1


@cuda
@pytest.mark.parametrize("family", ["softmax", "v2", "v2_grouped", "v3", "gpt_oss", "sparsemixer"])
def test_replayed_route_kernels_match_the_reference(family):
    from routelens.adapters.routing import (DeepseekV2Rule, DeepseekV3Rule, GptOssRule, SoftmaxTopK,
                                            SparseMixerRule)
    from routelens.kernels.reference import masked_route
    from routelens.kernels.triton_route import route_kernel
    from routelens.steering.spec import LayerTables

    dev, E, k = torch.device("cuda"), 64, 4
    rule = {"softmax": SoftmaxTopK(k=k, renormalize=False),
            "v2": DeepseekV2Rule(k=k, method="greedy", n_group=1, topk_group=1, scaling=1.0),
            "v2_grouped": DeepseekV2Rule(k=k, method="group_limited_greedy", n_group=8, topk_group=4, scaling=16.0),
            "v3": DeepseekV3Rule(k=k, n_group=8, topk_group=4, scaling=2.5, renormalize=True,
                                 correction_bias=torch.randn(E, device=dev) * 0.1),
            "gpt_oss": GptOssRule(k=k), "sparsemixer": SparseMixerRule(k=2, jitter_eps=0.01)}[family]
    tables = LayerTables.neutral(E)
    tables.mask[[3, 9]] = -1
    tables.mask[5] = 1
    tables.bias[[7, 20]] = (0.75, -0.5)
    g = torch.Generator(device="cpu").manual_seed(0)
    flat = torch.randn(70 * E + 8, generator=g).to(dev)
    # bf16 over the specializations (T = 1, T off a multiple of 16, a misaligned row start); one float32 case
    for dtype, T, off in [(torch.bfloat16, T, off) for T in (1, 17, 64) for off in (0, 1)] + [(torch.float32, 64, 0)]:
        logits = flat.to(dtype)[off:off + T * E].view(T, E)
        want_w, want_i = masked_route(logits, rule, tables)
        for impl in ("rows", "stream"):
            for _ in range(2):
                try:
                    w, i = route_kernel(logits, rule, tables, impl=impl)
                except Exception as err:  # a family/shape without a streamed kernel says so in one line
                    assert impl == "stream" and "no streamed kernel" in str(err), err
                    break
                assert torch.equal(i.sort(1).values, want_i.sort(1).values), (dtype, T, off, impl)
                torch.testing.assert_close(w.float().gather(1, i.argsort(1)), want_w.float().gather(
                    1, want_i.argsort(1)), rtol=1e-2, atol=1e-3)
