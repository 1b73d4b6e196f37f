"""Compile the Triton kernels for an NVIDIA GPU ahead of time, without one: run by tests/test_triton_compile.py.

Triton's interpreter accepts code that its GPU compiler refuses (e.g. annotated module globals
``X: tl.constexpr = 1``), so the interpreter tests alone miss such errors. This script replaces each kernel of
``sasoftmax.backends.triton_kernels`` by a recorder, runs the backend's forward and backward on CPU tensors
as if they were CUDA ones (the recorders launch nothing, so the tensors' contents do not matter), and compiles
every recorded launch — its argument types, constexprs, warps and stages — with ``triton.compile`` for
``GPUTarget("cuda", ARCH, 32)``, down to a cubin (ptxas included). ARCH is the compute capability as a number,
``$SASOFTMAX_COMPILE_ARCH`` (default 90: Hopper; 80: Ampere).

Usage: ``python tests/triton_compile_cuda.py [VARIANT ...]`` (all variants without names; see ``variants()``),
with TRITON_INTERPRET unset (the kernels must be JIT functions, not interpreted ones). Prints one JSON object:
``{"skip": reason}`` where triton's NVIDIA backend or ptxas is missing, else ``{"variants": {variant: {kernel:
{"shared": bytes} or {"error": message}}}}``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from unittest import mock

import torch

KERNELS = ("row_extrema", "fwd", "bwd_dq", "bwd_dkdv")
QUERY_HEADS, KV_HEADS = 4, 2
"""The heads of every recorded call (grouped-query attention)."""
ARCH = int(os.environ.get("SASOFTMAX_COMPILE_ARCH", "90"))  # compute capability 9.0 (Hopper) unless set


def unavailable() -> str | None:
    """Why this machine cannot compile for NVIDIA GPUs, or None: what a faked GPU needs, and ptxas."""
    from triton_fake_driver import unavailable as no_fake_gpu

    reason = no_fake_gpu()
    if reason:
        return reason
    import triton

    ptxas = triton.knobs.nvidia.ptxas.path
    if not ptxas or not os.access(ptxas, os.X_OK):
        return f"ptxas is not available ({ptxas!r})"
    return None


def specialised_source(kernel, target, args: tuple, kwargs: dict):
    """The source and options a launch of ``kernel`` with these arguments compiles, specialised as Triton's own
    launcher specialises it (integers equal to 1 become constants; pointers and integers divisible by 16 are
    marked so, which lets loads along a unit stride vectorise): its binder and argument packing, with ``target``'s
    backend in place of the current device's."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, types, constants, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, types, constants, attrs), options.__dict__


class Recorder:
    """Stands in for a kernel: ``recorder[grid](*args, **kwargs)`` compiles that launch for ARCH instead (and keeps
    the compiled kernel under "compiled" with ``keep``: benchmarks/triton_static.py reads its PTX and cubin)."""

    def __init__(self, kernel, results: dict, keep: bool = False):
        self.kernel, self.results, self.keep = kernel, results, keep

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            import triton
            from triton.backends.compiler import GPUTarget

            name = self.kernel.__name__
            try:
                source, options = specialised_source(self.kernel, GPUTarget("cuda", ARCH, 32), args, kwargs)
                compiled = triton.compile(source, target=GPUTarget("cuda", ARCH, 32), options=options)
                self.results[name] = {"shared": compiled.metadata.shared}
                if self.keep:
                    named = {self.kernel.arg_names[path[0]]: value for path, value in source.constants.items()}
                    self.results[name].update(compiled=compiled, options=options, constants=named)
            except Exception as err:  # reported per kernel by the test
                chain = [err]  # Triton wraps the error inside a kernel's callees: report the innermost one too
                while chain[-1].__cause__ is not None and len(chain) < 10:
                    chain.append(chain[-1].__cause__)
                lines = [line for e in chain[:1] + chain[1:][-1:] for line in traceback.format_exception_only(e)]
                self.results[name] = {"error": "".join(lines).strip()[-3000:]}

        return launch


def variants() -> dict[str, dict]:
    """Representative calls: (B, Hq, Hkv, L, S) = (1, 4, 2, 300, 300), grouped-query attention."""
    from sasoftmax import RelativeBias

    heads = QUERY_HEADS
    r1, r2 = torch.rand(heads, requires_grad=True), torch.rand(heads, requires_grad=True)
    return {
        "bf16 D=128 sa_norm causal kerple_log ssmax": dict(
            dtype=torch.bfloat16, d=128, normalizer="sa_norm", causal=True, bias=RelativeBias.kerple_log(r1, r2),
            ssmax=torch.full((heads,), 0.5, requires_grad=True),
        ),
        "fp32 D=64 sa mask": dict(
            dtype=torch.float32, d=64, normalizer="sa", causal=False, mask=torch.rand(1, 1, 300, 300) < 0.5
        ),
        "bf16 D=64 sa_norm causal table (grad) ssmax": dict(
            dtype=torch.bfloat16, d=64, normalizer="sa_norm", causal=True,
            bias=RelativeBias.table(torch.randn(heads, 300, requires_grad=True)), ssmax=torch.full((heads,), 0.5),
        ),
        "bf16 D=64 softmax bias tensor (grad)": dict(
            dtype=torch.bfloat16, d=64, normalizer="softmax", causal=True,
            bias=torch.randn(1, heads, 300, 300, requires_grad=True),
        ),
        "fp16 D=64 sa_norm causal kerple_power (grad)": dict(
            dtype=torch.float16, d=64, normalizer="sa_norm", causal=True, bias=RelativeBias.kerple_power(r1, r2),
        ),
        "fp16 D=64 sa_norm table (grad), min term scattered": dict(
            dtype=torch.float16, d=64, normalizer="sa_norm", causal=False,
            bias=RelativeBias.table(torch.randn(heads, 300, requires_grad=True)), min_term="scatter",
        ),
        "bf16 D=128 sa_norm (tuned tiles)": dict(dtype=torch.bfloat16, d=128, normalizer="sa_norm", causal=False),
        "bf16 D=128 softmax causal (tuned tiles)": dict(dtype=torch.bfloat16, d=128, normalizer="softmax", causal=True),
        "bf16 D=64 softmax (tuned tiles)": dict(dtype=torch.bfloat16, d=64, normalizer="softmax", causal=False),
        "bf16 D=64 sa causal (softmax's tuned tiles)": dict(dtype=torch.bfloat16, d=64, normalizer="sa", causal=True),
        "bf16 D=64 sa_norm causal ssmax (tuned tiles), min term scattered": dict(
            dtype=torch.bfloat16, d=64, normalizer="sa_norm", causal=True, ssmax=torch.full((heads,), 0.5),
            min_term="scatter",
        ),
    }  # fmt: skip


def record(
    dtype, d, normalizer, causal, bias=None, ssmax=None, mask=None, length=300, keep=False, min_term=None
) -> dict:
    """Compile every kernel launch of one forward and backward; {kernel: result} (see Recorder for ``keep``).
    ``min_term``: sa_norm's way for its min term, "tile" or "scatter" (``SASOFTMAX_TRITON_MIN_TERM``), else by
    length."""
    from triton.runtime.driver import driver

    from sasoftmax.attention import make_call
    from sasoftmax.backends import triton as backend
    from sasoftmax.backends import triton_kernels as kernels
    from triton_fake_driver import FakeDriver

    results: dict = {}
    originals = {name: getattr(kernels, name) for name in KERNELS}
    backend.INTERPRET = False  # the GPU tiles and code paths
    forced = {} if min_term is None else {"SASOFTMAX_TRITON_MIN_TERM": min_term}
    active = driver._active
    driver.set_active(FakeDriver())  # the backend asks Triton's driver for the current device
    try:
        for name, kernel in originals.items():
            setattr(kernels, name, Recorder(kernel, results, keep))
        q = torch.randn(1, QUERY_HEADS, length, d, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(1, KV_HEADS, length, d, dtype=dtype, requires_grad=True) for _ in range(2))
        call = make_call(q, k, v, normalizer, causal, mask, bias, None, ssmax, 1e-6, 0.0)
        with mock.patch.dict(os.environ, forced):
            backend.attention(call).sum().backward()
    finally:
        driver._active = active
        for name, kernel in originals.items():
            setattr(kernels, name, kernel)
    return results


def main(names: list[str]) -> None:
    """Compile the variants named (all without names) and print the JSON report."""
    reason = unavailable()
    if reason:
        print(json.dumps({"skip": reason}))
        return
    specs = variants()
    unknown = set(names) - set(specs)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {sorted(specs)}")
    report = {name: record(**specs[name]) for name in names or specs}
    print(json.dumps({"variants": report}))


if __name__ == "__main__":
    main(sys.argv[1:])
