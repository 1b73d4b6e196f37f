"""The cpu backend against the eager reference: outputs and gradients of q, k, v, bias, SSMax's s and a
bias function's parameters, over dtypes, causal, masks, biases, GQA, SSMax, odd sizes, Lq != Lk and
fully masked rows; relative positional biases (RelativeBias) with their parameters' gradients; on the fused C++
path, the tiled path with C++ row kernels and the plain-PyTorch path."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sasoftmax.backends.cpu as cpu
from operator_log import OperatorLog, assert_skips_function_without_grad, traced_path
from sasoftmax import RelativeBias, benchmark
from sasoftmax.attention import attention, choose_backend, make_call
from sasoftmax.backends import cpu_native

NORMALIZERS = ("softmax", "sa", "sa_norm")


@pytest.fixture(params=["fused", "tiled", "plain"])
def path(request, monkeypatch):
    """Run a test on each path: whole calls in C++ (all but bias functions and biases that need a gradient;
    see :func:`for_path`), Python tiles with the C++ row kernels (what those take), and plain PyTorch."""
    monkeypatch.setenv("SASOFTMAX_CPU_KERNELS", {"fused": "1", "tiled": "tiles", "plain": "0"}[request.param])
    return request.param


class Slopes(nn.Module):
    """A learnable ALiBi-like bias function with a window: keys further than ``window`` back are −inf."""

    def __init__(self, heads: int, window: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.slope = nn.Parameter(torch.linspace(0.1, 0.8, heads, dtype=dtype))
        self.gain = nn.Parameter(torch.tensor(0.5, dtype=dtype))
        self.window = window

    def forward(self, q_pos, k_pos):
        dist = (q_pos[:, None] - k_pos[None, :]).to(self.slope.dtype)
        bias = -self.slope.view(-1, 1, 1) * dist.abs() + self.gain * torch.sin(dist)
        return torch.where(dist > self.window, float("-inf"), bias)


def inputs(b, hq, hkv, lq, lk, d=16, dv=8, *, dtype=torch.float64, seed=0, mask=None, bias=None, ssmax=False):
    """Random leaf tensors (q, k, v, mask, bias, s, dO); ``mask``/``bias`` name a broadcast shape."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    q, k, v = rand(b, hq, lq, d), rand(b, hkv, lk, d), rand(b, hkv, lk, dv)
    m = None
    if mask == "rows":  # (L, S) with a few fully masked rows
        m = torch.rand(lq, lk, generator=g) > 0.3
        m[lq // 2] = False
    elif mask == "full":
        m = torch.rand(b, hq, lq, lk, generator=g) > 0.4
    bias_t = None
    if bias == "heads":  # (Hq, 1, S): broadcast over queries
        bias_t = rand(hq, 1, lk)
    elif bias == "full":  # (1, Hq, L, S) with −inf entries
        raw = torch.randn(1, hq, lq, lk, generator=g, dtype=torch.float64) * 2
        raw[torch.rand(raw.shape, generator=g) < 0.2] = float("-inf")
        bias_t = raw.to(dtype).requires_grad_()
    s = (torch.rand(hq, generator=g, dtype=torch.float64) + 0.3).to(dtype).requires_grad_() if ssmax else None
    grad = torch.randn(b, hq, lq, dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, m, bias_t, s, grad


def for_path(path, args):
    """On the fused path, the bias tensor without gradient: one that needs a gradient takes the tiled path."""
    if path != "fused" or args[4] is None:
        return args
    return (*args[:4], args[4].detach(), *args[5:])


def run(backend, q, k, v, m, bias, s, grad, params=(), **kw):
    """Output and gradients of every leaf that requires them (q, k, v, bias tensor, s, params)."""
    out = attention(q, k, v, mask=m, bias=bias, ssmax=s, backend=backend, **kw)
    leaves = [t for t in (q, k, v, bias, s) if isinstance(t, torch.Tensor) and t.requires_grad] + list(params)
    return [out, *torch.autograd.grad(out, leaves, grad.to(out.dtype))]


def assert_close(got, want, atol, rtol=0.0):
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all(), f"item {i} has NaN/inf"
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m, i=i: f"item {i}: {m}")


CASES = [
    # (normalizer, causal, mask, bias, ssmax, (b, hq, hkv, lq, lk))
    (n, c, m, bi, s, shape)
    for (n, c, m, bi, s), shape in zip(
        itertools.product(NORMALIZERS, (False, True), (None, "rows"), (None, "heads", "full"), (False, True)),
        itertools.cycle(
            [(2, 4, 2, 17, 17), (1, 3, 1, 37, 37), (2, 2, 2, 1, 37), (1, 4, 2, 37, 17), (1, 2, 1, 17, 129)]
        ),
    )
]


@pytest.mark.parametrize("normalizer,causal,mask,bias,ssmax,shape", CASES)
def test_float64_matches_eager(path, normalizer, causal, mask, bias, ssmax, shape):
    args = for_path(path, inputs(*shape, mask=mask, bias=bias, ssmax=ssmax, seed=len(str(shape))))
    kw = dict(normalizer=normalizer, causal=causal)
    assert_close(run("cpu", *args, **kw), run("eager", *args, **kw), atol=1e-10)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 37), (17, 1), (1, 1, 1, 1)])
def test_masks_broadcast_over_keys_or_queries(path, normalizer, mask_shape):
    """Key-padding masks, masks of whole rows (size-1 key axis) and a single flag, fully masked rows included."""
    q, k, v, _, _, _, grad = inputs(2, 4, 2, 17, 37)
    m = torch.rand(mask_shape, generator=torch.Generator().manual_seed(3)) > 0.4
    want = run("eager", q, k, v, m, None, None, grad, normalizer=normalizer, causal=True)
    assert_close(run("cpu", q, k, v, m, None, None, grad, normalizer=normalizer, causal=True), want, atol=1e-10)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("causal", [False, True])
def test_many_tiles_and_bias_function(path, monkeypatch, normalizer, causal):
    """Small tiles (many query blocks, causal blocks that skip keys) and a learnable bias function."""
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 1200)  # 4 query rows per block
    for lq, lk in [(29, 29), (33, 29), (1, 29)]:
        fn = Slopes(4, window=20)
        q, k, v, m, _, s, grad = inputs(2, 4, 2, lq, lk, mask="full", ssmax=True, seed=lq)
        kw = dict(normalizer=normalizer, causal=causal)
        want = run("eager", q, k, v, m, fn, s, grad, fn.parameters(), **kw)
        got = run("cpu", q, k, v, m, fn, s, grad, fn.parameters(), **kw)
        assert_close(got, want, atol=1e-10)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("causal", [False, True])
def test_head_chunks_with_per_head_mask_and_bias(path, monkeypatch, normalizer, causal):
    """Small tiles split the kv heads into chunks; per-head masks, biases and s are sliced per chunk."""
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 3000)
    args = inputs(2, 6, 3, 37, 41, mask="full", bias="full", ssmax=True, seed=11)
    assert len(cpu._kv_chunks(make_call(*args[:3], normalizer, causal, *args[3:5], None, args[5], 1e-6, 0.0))) == 3
    kw = dict(normalizer=normalizer, causal=causal)
    assert_close(run("cpu", *args, **kw), run("eager", *args, **kw), atol=1e-10)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("causal", [False, True])
def test_fused_blocks_chunks_and_threads(monkeypatch, normalizer, causal):
    """The fused path with many small blocks on two threads: work split into query blocks of several query heads
    of a kv head (forward) and into chunks of blocks when there are fewer heads than threads (backward), GQA
    partial sums, masks, a bias without gradient (−inf entries included), SSMax."""
    monkeypatch.setattr(cpu, "FUSED_ROWS", 4)
    calls = []
    monkeypatch.setattr(cpu_native, "fused_backward", _spy(cpu_native.fused_backward, calls))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for shape in [(1, 1, 1, 37, 37), (2, 4, 2, 29, 33), (1, 8, 1, 37, 37), (1, 2, 1, 1, 29), (1, 1, 1, 33, 29)]:
            args = for_path("fused", inputs(*shape, mask="full", bias="full", ssmax=True, seed=shape[3]))
            kw = dict(normalizer=normalizer, causal=causal)
            assert_close(run("cpu", *args, **kw), run("eager", *args, **kw), atol=1e-10)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 5


@pytest.fixture(params=["own", "blas"])
def gemm(request, monkeypatch):
    """Whole float32 calls with the kernels' own AVX-512 GEMM (skipped where the library was built without
    AVX-512; forced on Intel CPUs, where it is not chosen by default) and with torch's BLAS."""
    monkeypatch.setenv("SASOFTMAX_CPU_KERNELS", "1")
    if request.param == "own":
        lib = cpu_native.kernels()
        if lib is None or not lib.sa_own_gemm_f32():
            pytest.skip("the cpu kernels have no own GEMM here (no AVX-512)")
    monkeypatch.setattr(cpu_native, "own_gemm", lambda: request.param == "own")
    return request.param


@pytest.mark.parametrize(
    "normalizer,causal,mask,bias,ssmax,shape,dims",
    [
        ("sa_norm", False, "rows", "heads", True, (1, 4, 2, 301, 301), (20, 24)),
        ("sa_norm", True, None, "full", True, (2, 2, 1, 131, 300), (64, 40)),
        ("sa", False, "rows", "heads", True, (1, 4, 2, 301, 301), (20, 24)),
        ("softmax", True, "rows", None, True, (1, 6, 3, 70, 258), (17, 1)),
        ("sa", False, None, None, False, (1, 4, 1, 1, 333), (80, 64)),
    ],
)
def test_float32_gemms_edges(gemm, normalizer, causal, mask, bias, ssmax, shape, dims):
    """Float32 whole calls with each GEMM, by the low-precision rule (against float64 eager, at most twice float32
    eager's error): sizes off every register tile of the own GEMM (rows of 6, 16-float vectors, 64-column panels,
    256-step runs of k), head dimensions from 1 to 80, GQA, causal, masks, a bias with −inf entries, SSMax,
    decoding."""
    args = for_path("fused", inputs(*shape, d=dims[0], dv=dims[1], dtype=torch.float32, mask=mask, bias=bias,
                                    ssmax=ssmax, seed=shape[4]))  # fmt: skip
    ref_args = [a.detach().double().requires_grad_(a.requires_grad) if torch.is_tensor(a) and a.is_floating_point()
                else a for a in args]  # fmt: skip
    kw = dict(normalizer=normalizer, causal=causal)
    got, base, ref = run("cpu", *args, **kw), run("eager", *args, **kw), run("eager", *ref_args, **kw)
    assert all(g.dtype == torch.float32 for g in got)
    assert_within_twice_eager(got, base, ref, torch.float32)


@pytest.mark.parametrize("causal", [False, True])
def test_float32_gemms_blocks_chunks_and_threads(gemm, monkeypatch, causal):
    """Small blocks on two threads with each GEMM: the transposed k and v kept across a thread's blocks of a head,
    backward chunks (one kv head, two threads) and their partial dk, dv; bit-identical from run to run."""
    monkeypatch.setattr(cpu, "FUSED_ROWS", 8)
    calls = []
    monkeypatch.setattr(cpu_native, "fused_backward", _spy(cpu_native.fused_backward, calls))
    args = for_path("fused", inputs(1, 2, 1, 45, 77, d=20, dv=24, dtype=torch.float32, mask="full", ssmax=True))
    ref_args = [a.detach().double().requires_grad_(a.requires_grad) if torch.is_tensor(a) and a.is_floating_point()
                else a for a in args]  # fmt: skip
    kw = dict(normalizer="sa_norm", causal=causal)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, second = run("cpu", *args, **kw), run("cpu", *args, **kw)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert_within_twice_eager(first, run("eager", *args, **kw), run("eager", *ref_args, **kw), torch.float32)


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_float32_gemms_propagate_nan(gemm, where):
    """A NaN in q, k or v makes the same rows NaN as in eager (for v: at least the rows that attend its key)."""
    q, k, v, *_, grad = inputs(1, 4, 2, 70, 70, d=20, dv=20, dtype=torch.float32, seed=1)
    with torch.no_grad():
        {"q": q, "k": k, "v": v}[where][0, 1, 30, 3] = float("nan")
    got = attention(q, k, v, normalizer="sa_norm", causal=True, backend="cpu")
    want = attention(q, k, v, normalizer="sa_norm", causal=True, backend="eager")
    got_rows, want_rows = torch.isnan(got).any(-1), torch.isnan(want).any(-1)
    assert want_rows.any()
    if where == "v":
        assert got_rows[want_rows & (torch.arange(70) >= 30)].all()
    else:
        assert torch.equal(got_rows, want_rows)
    (dq,) = torch.autograd.grad(got, q, grad)
    assert torch.isnan(dq).any()


def test_fused_decoding_stacks_the_query_heads_of_a_kv_head(monkeypatch):
    """A decoding step (one query row) reads k and v once per kv head: forward and backward blocks stack the
    query heads of a kv head."""
    together = []
    call_args = cpu_native._call_args

    def spy(*args, **kw):
        together.append(kw.get("together", args[13] if len(args) > 13 else 1))
        return call_args(*args, **kw)

    monkeypatch.setattr(cpu_native, "_call_args", spy)
    q, k, v, m, _, s, grad = inputs(1, 8, 2, 1, 37, mask="full", ssmax=True)
    kw = dict(normalizer="sa_norm", causal=True)
    assert_close(run("cpu", q, k, v, m, None, s, grad, **kw), run("eager", q, k, v, m, None, s, grad, **kw), atol=1e-10)
    assert together == [4, 4]  # forward, backward


def test_fused_calls_without_gradients_skip_autograd(monkeypatch):
    """Inference and decoding run the fused forward without autograd's Function, which cost a decoding step ~10 of
    its ~60 µs; the output is the Function's."""
    from sasoftmax.backends import cpu_ops

    assert_skips_function_without_grad(monkeypatch, cpu_ops, "_EagerFused", "cpu", *inputs(1, 4, 2, 1, 37)[:3])


def _spy(fn, calls):
    def spy(*args, **kw):
        calls.append(args)
        return fn(*args, **kw)

    return spy


def test_tiles_never_hold_the_score_matrix(monkeypatch):
    """With a small tile budget no logits tile is as large as one head's (L, S) scores, on either path."""
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 4 * 129 * 8)
    monkeypatch.setattr(cpu, "FUSED_TILE_ELEMENTS", 4 * 129)
    sizes = []
    tile = cpu._Plan.tile

    def spy(self, *a, **kw):
        out = tile(self, *a, **kw)
        sizes.append(out.raw.numel())
        return out

    monkeypatch.setattr(cpu._Plan, "tile", spy)
    fused_calls = []
    monkeypatch.setattr(cpu_native, "fused_forward", _spy(cpu_native.fused_forward, fused_calls))
    q, k, v, *_ = inputs(1, 4, 4, 129, 129)
    attention(q, k, v, causal=True, backend="cpu").sum().backward()  # fused: a thread's block is rows x S
    rows = fused_calls[0][-1]
    assert rows * 129 <= 4 * 129 < 129 * 129
    bias = torch.zeros(129, requires_grad=True)  # a bias that needs a gradient takes the tiled path
    attention(q, k, v, causal=True, bias=bias, backend="cpu").sum().backward()
    assert sizes and max(sizes) <= 4 * 129 * 8 < 129 * 129


def assert_within_twice_eager(got, base, ref, dtype):
    """The low-precision rule: every output's error against the float64 reference ``ref`` is at most twice that of
    eager in the same dtype (``base``), plus a small allowance; and finite."""
    allowance = 1e-5 if dtype == torch.float32 else 1e-3
    for i, (g, b, r) in enumerate(zip(got, base, ref)):
        assert torch.isfinite(g).all(), f"item {i} has NaN/inf"
        err, base_err = (g.double() - r).abs().max().item(), (b.double() - r).abs().max().item()
        bound = 2 * base_err + allowance * max(1.0, r.abs().max().item())
        assert err <= bound, f"item {i}: error {err} > 2 x eager's {base_err} + allowance"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalizer,causal", [("sa_norm", True), ("sa_norm", False), ("sa", False), ("softmax", True)])
def test_low_precision_within_twice_eager_error(path, dtype, normalizer, causal):
    """FlashAttention's rule: error against a float64 reference at most 2x the eager backend's (plus a
    rounding allowance relative to the size of the values, for entries where eager is exact by luck)."""
    args = inputs(1, 4, 2, 129, 129, d=32, dv=32, dtype=dtype, mask="rows", bias="heads", ssmax=True, seed=3)
    args = for_path(path, args)
    ref_args = [a.detach().double().requires_grad_(a.requires_grad) if torch.is_tensor(a) and a.is_floating_point()
                else a for a in args]  # fmt: skip
    kw = dict(normalizer=normalizer, causal=causal)
    ref = run("eager", *ref_args, **kw)
    got, base = run("cpu", *args, **kw), run("eager", *args, **kw)
    assert got[0].dtype == dtype
    assert_within_twice_eager(got, base, ref, dtype)


@pytest.mark.parametrize(
    "normalizer,causal,shape",
    [
        ("sa_norm", True, (1, 2, 1, 1025, 1025)),
        ("sa", False, (1, 2, 2, 1, 1025)),
        ("softmax", True, (1, 2, 1, 37, 1025)),
    ],
)
def test_long_odd_sizes(normalizer, causal, shape):
    args = inputs(*shape, d=16, dv=16, dtype=torch.float32, ssmax=True, seed=5)
    kw = dict(normalizer=normalizer, causal=causal)
    assert_close(run("cpu", *args, **kw), run("eager", *args, **kw), atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_fully_masked_rows_are_zero_without_nan(path, normalizer):
    q, k, v, _, _, s, grad = inputs(1, 2, 1, 9, 6, ssmax=True)
    mask = torch.ones(9, 6, dtype=torch.bool)
    mask[2] = False
    bias = torch.zeros(1, 2, 9, 6, dtype=torch.float64)
    bias[0, 1, 5] = float("-inf")  # row 5 of head 1 masked by the bias
    # causal with L > S: the first three queries see no key at all
    out, dq, dk, dv, ds = run("cpu", q, k, v, mask, bias, s, grad, normalizer=normalizer, causal=True)
    want = run("eager", q, k, v, mask, bias, s, grad, normalizer=normalizer, causal=True)
    assert_close([out, dq, dk, dv, ds], want, atol=1e-10)
    for rows in (out[:, :, :3], out[:, :, 2], out[0, 1, 5], dq[:, :, :3], dq[0, 1, 5]):
        assert (rows == 0).all()


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_huge_logits(path, normalizer):
    q, k, v, *_, grad = inputs(1, 2, 2, 17, 17, dtype=torch.float32)
    kw = dict(normalizer=normalizer, scale=300.0, causal=True)
    got = run("cpu", q, k, v, None, None, None, grad, **kw)
    want = run("eager", q.double(), k.double(), v.double(), None, None, None, grad, **kw)
    assert all(torch.isfinite(g).all() for g in got)
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-4, rtol=1e-4)


def test_deterministic(path):
    """Bit-identical results and gradients from two runs on two threads (dynamic scheduling included)."""
    args = for_path(path, inputs(2, 4, 2, 129, 129, dtype=torch.float32, mask="rows", bias="heads", ssmax=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = run("cpu", *args, normalizer="sa_norm", causal=True)
        second = run("cpu", *args, normalizer="sa_norm", causal=True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_no_grad_and_partial_grads():
    q, k, v, *_ = inputs(1, 2, 1, 17, 17)
    with torch.no_grad():
        out = attention(q, k, v, backend="cpu")
    torch.testing.assert_close(out, attention(q, k, v, backend="eager").detach(), atol=1e-12, rtol=0)
    k_fixed = k.detach()
    (dq,) = torch.autograd.grad(attention(q, k_fixed, v, backend="cpu").sum(), [q])
    (dq_ref,) = torch.autograd.grad(attention(q, k_fixed, v, backend="eager").sum(), [q])
    torch.testing.assert_close(dq, dq_ref, atol=1e-10, rtol=0)


def test_empty_inputs():
    q, k, v, *_ = inputs(1, 2, 2, 0, 5)
    assert attention(q, k, v, backend="cpu").shape == (1, 2, 0, 8)
    q, k, v, *_ = inputs(1, 2, 2, 4, 0)
    out = attention(q, k, v, backend="cpu")
    assert out.shape == (1, 2, 4, 8) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()
    for rb in (relative_bias("kerple_log", 2), relative_bias("table", 2)):
        for lq, lk in [(0, 5), (4, 0)]:
            q, k, v, *_ = inputs(1, 2, 2, lq, lk)
            grads = torch.autograd.grad(attention(q, k, v, bias=rb, backend="cpu").sum(), rb.parameters)
            assert all((g == 0).all() and g.shape == p.shape for g, p in zip(grads, rb.parameters))


@pytest.mark.parametrize("path", ["eager", "operator"])
def test_fused_backward_launches_nothing_for_the_row_statistics(path, monkeypatch):
    """The fused forward's saved statistics get no gradients: autograd makes no zeros for them, and a backward
    from the output alone runs only our operator (traced calls' path) or, besides the kernels' call, only
    allocations (the dq accumulator's zeros among them), views and its small argument tensors (eager)."""
    monkeypatch.setenv("SASOFTMAX_CPU_KERNELS", "1")
    if path == "operator":
        traced_path(monkeypatch)
    q, k, v = (t.detach().float().requires_grad_() for t in inputs(1, 4, 2, 33, 33)[:3])
    out = attention(q, k, v, normalizer="sa_norm", causal=True, backend="cpu")
    do = torch.randn_like(out)
    with OperatorLog() as log:
        out.backward(do)
    if path == "operator":
        assert log.names == ["sasoftmax.cpu_fused_backward.default"]
    else:
        allowed = ("aten.empty", "aten.new_empty", "aten.lift_fresh", "aten.unbind", "aten.select", "aten.squeeze")
        assert [n for n in log.names if not n.startswith(allowed)] == ["aten.zeros_like.default"], log.names


def test_dropout_is_refused_and_auto_falls_back():
    q, k, v, *_ = inputs(1, 2, 2, 5, 5)
    call = make_call(q, k, v, "sa_norm", False, None, None, None, None, 1e-6, 0.1)
    assert "dropout" in cpu.unsupported(call)
    assert choose_backend(call, "auto") == "eager"
    with pytest.raises(ValueError, match="dropout"):
        attention(q, k, v, dropout_p=0.1, backend="cpu")


def test_auto_picks_cpu_for_cpu_tensors():
    q, k, v, *_ = inputs(1, 2, 2, 5, 5)
    call = make_call(q, k, v, "sa_norm", True, None, None, None, 0.5, 1e-6, 0.0)
    assert choose_backend(call, "auto") == "cpu"


def test_bad_bias_function_output():
    q, k, v, *_ = inputs(1, 2, 2, 5, 5)
    with pytest.raises(ValueError, match="bias function"):
        attention(q, k, v, bias=lambda qp, kp: torch.zeros(3, 5, 5, dtype=torch.float64), backend="cpu")
    with pytest.raises(TypeError, match="bias function"):
        attention(q, k, v, bias=lambda qp, kp: qp[:, None] - kp[None, :], backend="cpu")


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
def test_native_kernels_build_here():
    """On a machine with a compiler the C++ paths are the ones that run (the plain path is tested above)."""
    assert cpu_native.kernels() is not None
    assert cpu_native.fused(torch.float32) is not None and cpu_native.fused(torch.float64) is not None


def test_benchmark_runs_and_writes_tables(tmp_path, capsys):
    """The benchmark end to end at a tiny size: timing, one fresh-process memory measurement, outputs."""
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    md, js = tmp_path / "table.md", tmp_path / "table.json"
    args = parser.parse_args(
        ["--lengths", "64", "--heads", "2", "--repeats", "1", "--normalizers", "sa_norm", "--backends", "cpu"]
        + ["--causal", "yes", "--markdown", str(md), "--json", str(js)]
    )
    assert benchmark.run(args) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["sdpa", "cpu:sa_norm"]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["extra_mib"] is not None for r in rows)
    assert "cpu:sa_norm" in md.read_text() and "cpu:sa_norm" in capsys.readouterr().out


def test_bad_kernel_setting(monkeypatch):
    monkeypatch.setenv("SASOFTMAX_CPU_KERNELS", "yes")
    q, k, v, *_ = inputs(1, 2, 2, 5, 7)
    with pytest.raises(ValueError, match="SASOFTMAX_CPU_KERNELS"):
        attention(q, k, v, backend="cpu")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "bias,kv_heads,queries",
    [("alibi", None, None), ("none", 2, 5), ("alibi", 1, 1), ("none", None, 1), ("kerple", 2, 5), ("fire", None, 7)],
)
def test_benchmark_sdpa_and_sasoftmax_compute_the_same(causal, bias, kv_heads, queries):
    """The benchmark's SDPA call (materialised positional bias, explicit lower-right causal mask for other query
    lengths, GQA) and its sasoftmax call (the positional module) compute the same attention."""
    cases = [benchmark.Case(impl, 37, causal, 1, 4, 16, "float64", 1, bias, kv_heads, queries)
             for impl in ("sdpa", "cpu:softmax")]  # fmt: skip
    q, k, v, _ = benchmark.make_inputs(cases[0], requires_grad=False)
    assert q.shape[2] == (queries or 37) and k.shape[1] == (kv_heads or 4)
    want, got = (benchmark.operation(case)(q, k, v) for case in cases)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    if bias != "none":
        no_bias = benchmark.Case("sdpa", 37, causal, 1, 4, 16, "float64", 1, "none", kv_heads, queries)
        assert not torch.allclose(got, benchmark.operation(no_bias)(q, k, v))


@pytest.mark.parametrize("path", ["eager", "operator"])
def test_double_backward_raises(path, monkeypatch):
    if path == "operator":
        traced_path(monkeypatch)
    q, k, v, *_ = inputs(1, 2, 2, 5, 7)
    out = attention(q, k, v, backend="cpu")
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)  # first-order gradients still flow
    with pytest.raises(RuntimeError):
        (gq.square().sum() + q.sum()).backward()  # never a silently missing second-order part


# ---- Relative positional biases (RelativeBias: ALiBi, Kerple log and power, a table per distance), evaluated
# inside the fused path ----

RELATIVE_KINDS = ("alibi", "kerple_log", "kerple_power", "table")


def relative_bias(kind, heads, *, seed=0, dtype=torch.float64, grad=(True, True), width=4):
    """A RelativeBias of ``kind`` with random parameters in the range the harness keeps them in; r1 and r2 leaves
    that require grad as ``grad`` says. A ``table`` is (heads, width) of values around 0, FIRE's range."""
    g = torch.Generator().manual_seed(seed)
    if kind == "table":
        return RelativeBias.table(torch.randn(heads, width, generator=g, dtype=torch.float64).to(dtype)
                                  .requires_grad_(grad[0]))  # fmt: skip
    r1 = (torch.rand(heads, generator=g, dtype=torch.float64) * 1.5 + 0.05).to(dtype).requires_grad_(grad[0])
    if kind == "alibi":
        return RelativeBias(kind, r1)
    r2 = (torch.rand(heads, generator=g, dtype=torch.float64) * 1.5 + 0.05).to(dtype).requires_grad_(grad[1])
    return RelativeBias(kind, r1, r2)


def run_relative(backend, q, k, v, m, rb, s, grad, **kw):
    """Output and gradients of q, k, v, s (when given) and the RelativeBias's parameters that require grad."""
    return run(backend, q, k, v, m, rb, s, grad, [p for p in rb.parameters if p.requires_grad], **kw)


RELATIVE_CASES = [
    # (kind, normalizer, causal, mask, ssmax, shape, width): a table's width alternates between 3 (shorter than
    # every case's longest distance: clamped) and L + S (longer); the other kinds have none.
    (kind, n, c, m, s, shape, (3 if i % 2 else shape[3] + shape[4]) if kind == "table" else None)
    for i, ((kind, n, c, m), (s, shape)) in enumerate(zip(
        itertools.product(RELATIVE_KINDS, NORMALIZERS, (False, True), (None, "rows")),
        itertools.cycle(
            [(True, (2, 4, 2, 17, 17)), (False, (1, 3, 1, 37, 37)), (True, (2, 2, 2, 1, 37)),
             (False, (1, 4, 2, 37, 17)), (True, (1, 2, 1, 17, 129))]
        ),
    ))
]  # fmt: skip


@pytest.mark.parametrize("kind,normalizer,causal,mask,ssmax,shape,width", RELATIVE_CASES)
def test_relative_bias_matches_eager(path, kind, normalizer, causal, mask, ssmax, shape, width):
    """Forward and the gradients of q, k, v, s, r1 and r2 (a table) against the eager backend, which evaluates the
    same RelativeBias as a bias function: causal or not, GQA, masks with fully masked rows, SSMax, odd lengths and
    Lq != Lk (queries aligned lower-right; with L > S some queries sit before the first key), tables shorter and
    longer than the longest distance."""
    q, k, v, m, _, s, grad = inputs(*shape, mask=mask, ssmax=ssmax, seed=len(str(shape)))
    rb = relative_bias(kind, shape[1], seed=shape[3], width=width)
    kw = dict(normalizer=normalizer, causal=causal)
    want = run_relative("eager", q, k, v, m, rb, s, grad, **kw)
    assert_close(run_relative("cpu", q, k, v, m, rb, s, grad, **kw), want, atol=1e-10)


@pytest.mark.parametrize("kind", ["kerple_log", "table"])
def test_relative_bias_runs_fused_without_a_bias_tensor(monkeypatch, kind):
    """The fused path takes a RelativeBias whole: it never evaluates the bias as a function (no (H, L, S) or tile
    tensor of it), and its backward is asked for r1/r2 (the table's) gradients only when they are needed."""

    def refuse(self, q_pos, k_pos):
        raise AssertionError("the fused path evaluated the RelativeBias as a bias function")

    monkeypatch.setattr(RelativeBias, "__call__", refuse)
    calls = []
    monkeypatch.setattr(cpu_native, "fused_backward", _spy_kw(cpu_native.fused_backward, calls))
    q, k, v, *_ = inputs(1, 4, 2, 33, 33)
    for grads, want in [((True, True), True), ((False, True), kind != "table"), ((False, False), False)]:
        rb = relative_bias(kind, 4, grad=grads, width=9)
        out = attention(q, k, v, bias=rb, causal=True, backend="cpu")
        leaves = [q] + [p for p in rb.parameters if p.requires_grad]
        got = torch.autograd.grad(out.sum(), leaves)
        assert calls[-1]["want_dr"] is want and calls[-1]["relative"][0] == kind
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in got)
        assert all(g.shape == p.shape and g.dtype == p.dtype for g, p in zip(got, leaves))


def _spy_kw(fn, calls):
    def spy(*args, **kw):
        calls.append(kw)
        return fn(*args, **kw)

    return spy


@pytest.mark.parametrize("kind", RELATIVE_KINDS)
def test_relative_bias_fused_blocks_chunks_and_threads(monkeypatch, kind):
    """Many small blocks on two threads: the r1/r2 gradients (a table's per offset) are summed per work item and
    head, then over items in a fixed order (chunks of a head's blocks, stacked query heads of a kv head), and come
    out bit-identical from two runs; with a mask and SSMax, and batch > 1; tables shorter and longer than the
    longest distance."""
    monkeypatch.setattr(cpu, "FUSED_ROWS", 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for shape, width in [((1, 1, 1, 37, 37), 5), ((2, 4, 2, 29, 33), 40), ((1, 8, 1, 37, 37), 2),
                             ((1, 2, 1, 1, 29), 1)]:  # fmt: skip
            q, k, v, m, _, s, grad = inputs(*shape, mask="full", ssmax=True, seed=shape[3])
            rb = relative_bias(kind, shape[1], seed=shape[1], width=width)
            kw = dict(normalizer="sa_norm", causal=True)
            got = run_relative("cpu", q, k, v, m, rb, s, grad, **kw)
            assert_close(got, run_relative("eager", q, k, v, m, rb, s, grad, **kw), atol=1e-10)
            again = run_relative("cpu", q, k, v, m, rb, s, grad, **kw)
            assert all(torch.equal(a, b) for a, b in zip(got, again))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_relative_bias_table_with_minus_inf_entries(path, normalizer):
    """A table whose last entries are −inf (a window: keys further than 4 back are masked) gives eager's output and
    gradients; the −inf entries get zero gradients, with a mask that leaves rows fully masked, SSMax, L != S."""
    q, k, v, m, _, s, grad = inputs(1, 4, 2, 19, 23, mask="rows", ssmax=True, seed=5)
    table = torch.randn(4, 7, dtype=torch.float64)
    table[:, 5:] = float("-inf")
    rb = RelativeBias.table(table.requires_grad_())
    kw = dict(normalizer=normalizer, causal=True)
    want = run_relative("eager", q, k, v, m, rb, s, grad, **kw)
    got = run_relative("cpu", q, k, v, m, rb, s, grad, **kw)
    assert (got[-1][:, 5:] == 0).all()
    assert_close(got, want, atol=1e-10)


@pytest.mark.parametrize("kind", RELATIVE_KINDS)
@pytest.mark.parametrize("normalizer,causal", [("sa_norm", True), ("sa", False), ("softmax", True)])
def test_relative_bias_parameters_gradcheck(path, kind, normalizer, causal):
    """float64 gradcheck of r1 and r2 (a table of 4 distances, the longest 8) through the cpu backend (finite
    differences against its closed-form backward), with GQA, a mask, SSMax and Lq != Lk."""
    q, k, v, m, _, _, _ = inputs(1, 4, 2, 7, 9, mask="rows", seed=2)
    q, k, v = q.detach(), k.detach(), v.detach()
    rb = relative_bias(kind, 4, seed=1)
    s = torch.tensor([0.6, 0.9, 1.1, 0.8], dtype=torch.float64)

    def f(*params):
        spec = RelativeBias(kind, *params)
        return attention(q, k, v, mask=m, bias=spec, ssmax=s, normalizer=normalizer, causal=causal, backend="cpu")

    assert torch.autograd.gradcheck(f, rb.parameters, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["kerple_log", "table"])
def test_relative_bias_low_precision_within_twice_eager_error(path, dtype, kind):
    """FlashAttention's rule with a Kerple bias or a table of 64 distances (float32 parameters): errors of the
    output and of the q, k, v, r1, r2 (table) gradients against a float64 reference at most 2x the eager backend's,
    plus a rounding allowance."""
    args = inputs(1, 4, 2, 129, 129, d=32, dv=32, dtype=dtype, mask="rows", ssmax=True, seed=3)
    rb = relative_bias(kind, 4, dtype=torch.float32, width=64)
    ref_rb = RelativeBias(kind, *(p.detach().double().requires_grad_() for p in rb.parameters))
    ref_args = [a.detach().double().requires_grad_(a.requires_grad) if torch.is_tensor(a) and a.is_floating_point()
                else a for a in args]  # fmt: skip
    kw = dict(normalizer="sa_norm", causal=True)
    ref = run_relative("eager", *ref_args[:4], ref_rb, *ref_args[5:], **kw)
    got, base = (run_relative(b, *args[:4], rb, *args[5:], **kw) for b in ("cpu", "eager"))
    assert_within_twice_eager(got, base, ref, dtype)


def test_fuzz_tool_runs(capsys):
    """tests/fuzz_backends.py (random calls against float64 eager; it found test_backend_triton's float16 sharp-row
    cases) keeps working: a few of its extended calls on the cpu backend, each within its rules."""
    import fuzz_backends

    assert fuzz_backends.main(["--backend", "cpu", "--seeds", "0", "6", "--extended"]) == 0
    assert "0 of 6 seeds failed (cpu)" in capsys.readouterr().out


def test_fuzz_tool_leaves_a_gpu_to_its_kernels():
    """tests/fuzz_backends.py turns Triton's interpreter on only where there is no GPU: on one (here faked:
    ``torch.cuda.is_available`` returns True) it must not, or gpu_check.sh's fuzz step would test the interpreter."""
    code = (
        "import os, sys, torch; torch.cuda.is_available = lambda: True; os.environ.pop('TRITON_INTERPRET', None); "
        f"sys.path.insert(0, {str(Path(__file__).parent)!r}); import fuzz_backends; "
        "print(fuzz_backends.DEVICE, os.environ.get('TRITON_INTERPRET'))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["cuda", "None"]
