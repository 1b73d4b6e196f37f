"""The Triton backend's GPU launch path on a CPU: a stand-in driver and compiled kernels that record their launches.

Run by tests/test_triton_launch.py (``python tests/triton_fake_driver.py``, TRITON_INTERPRET unset: the kernels must
be JIT functions) and imported by benchmarks/triton_host.py. :func:`fake_gpu` makes Triton believe it drives an sm_90
GPU: its JIT launch path runs as on one (the binder specialising every argument, its cache keyed), but a
"compiled" kernel is a :class:`FakeKernel` that records what its launcher was handed. The backend's tensors stay on
the CPU (``backend.unsupported`` is bypassed, ``backend.INTERPRET`` off: the GPU's tiles and code paths).

:func:`main` checks ``triton._launch``'s own path to the compiled kernels against Triton's: every launch of a set of
calls (dtypes, head dims, GQA, masks, biases, SSMax, lengths 1..320, inputs misaligned for 16-byte loads) is
launched again through Triton's JIT, which must pick the same compiled kernel and hand its launcher the same
arguments; and the backend's key of an argument (``_specialized``) must tell apart exactly the values Triton's
binder does. Prints one JSON object: ``{"skip": reason}`` where triton's NVIDIA backend is missing, else
``{"launches": n, "direct": n, "mismatches": [...], "direct_launch": bool, "specialization": [...]}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass

import torch


def unavailable() -> str | None:
    """Why this machine cannot fake a GPU for Triton, or None."""
    if os.environ.get("TRITON_INTERPRET"):
        return "TRITON_INTERPRET is set: the kernels would be interpreted, not compiled"
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as err:
        return f"triton's NVIDIA backend is not available ({err})"
    return None


@dataclass
class Launch:
    kernel: object
    grid: tuple
    stream: object
    values: tuple


class FakeKernel:
    """A compiled kernel as Triton's launch path uses it; ``run`` records each launch into ``launches`` (a list, or
    None: not recorded)."""

    def __init__(self, key: str, launches: list | None):
        self.key, self.launches = key, launches
        self.function, self.packed_metadata = object(), object()

    def launch_metadata(self, grid, stream, *values):
        return None

    def run(self, grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter, leave, *values):
        assert function is self.function and packed_metadata is self.packed_metadata
        if self.launches is not None:
            self.launches.append(Launch(self, (grid_0, grid_1, grid_2), stream, values))


class FakeDriver:
    """Device 0, stream 0 of an sm_90 GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def fake_gpu(launches: list | None):
    """Within: Triton drives a :class:`FakeDriver`, compiles to :class:`FakeKernel` (recording into ``launches``), and
    the Triton backend serves CPU tensors with its GPU paths. Restores all of it after."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from sasoftmax.backends import triton as backend

    def fake_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = FakeKernel(key, launches)
        self.device_caches[device][0][key] = kernel
        return kernel

    saved = (JITFunction._do_compile, backend.INTERPRET, backend.unsupported, driver._active)
    driver.set_active(FakeDriver())
    JITFunction._do_compile = fake_compile
    backend.INTERPRET, backend.unsupported = False, lambda call: None
    try:
        yield
    finally:
        JITFunction._do_compile, backend.INTERPRET, backend.unsupported, driver._active = saved  # (None: unset)
        backend._COMPILED.clear()


def calls() -> dict[str, dict]:
    """Named calls (keyword arguments of ``sasoftmax.attention`` with the tensors' makers): each runs forward and
    backward twice, so that the second launches find their compiled kernels."""
    from sasoftmax import RelativeBias

    def qkv(dtype, d=64, lq=300, lk=300, hq=4, hkv=2, b=1, misaligned=False):
        def make(h, n):
            if misaligned:  # the strides of a dense tensor, its first element one past a 16-byte boundary
                return torch.randn(b * h * n * d + 1, dtype=dtype)[1:].view(b, h, n, d).requires_grad_()
            return torch.randn(b, h, n, d, dtype=dtype, requires_grad=True)

        return make(hq, lq), make(hkv, lk), make(hkv, lk)

    r = torch.rand(4, requires_grad=True)
    return {
        "bf16 sa_norm causal": dict(inputs=lambda: qkv(torch.bfloat16), normalizer="sa_norm", causal=True),
        "bf16 sa_norm L=S=320": dict(inputs=lambda: qkv(torch.bfloat16, lq=320, lk=320), normalizer="sa_norm"),
        "bf16 softmax": dict(inputs=lambda: qkv(torch.bfloat16), normalizer="softmax"),
        "bf16 softmax misaligned": dict(inputs=lambda: qkv(torch.bfloat16, misaligned=True), normalizer="softmax"),
        "fp16 sa decoding step": dict(inputs=lambda: qkv(torch.float16, lq=1, lk=257, hq=2, hkv=1), normalizer="sa"),
        "fp32 sa_norm D=128 mask": dict(
            inputs=lambda: qkv(torch.float32, d=128), normalizer="sa_norm", mask=torch.rand(300, 300) < 0.7
        ),
        "bf16 sa_norm kerple ssmax": dict(
            inputs=lambda: qkv(torch.bfloat16), normalizer="sa_norm", causal=True,
            bias=RelativeBias.kerple_log(r, r), ssmax=torch.full((4,), 0.5, requires_grad=True),
        ),
        "bf16 sa_norm bias tensor": dict(
            inputs=lambda: qkv(torch.bfloat16), normalizer="sa_norm", bias=torch.randn(1, 4, 300, 300)
        ),
        "bf16 softmax table": dict(
            inputs=lambda: qkv(torch.bfloat16), normalizer="softmax", causal=True,
            bias=RelativeBias.table(torch.randn(4, 300, requires_grad=True)),
        ),
    }  # fmt: skip


def run_call(spec: dict) -> None:
    import sasoftmax

    q, k, v = spec["inputs"]()
    options = {name: value for name, value in spec.items() if name != "inputs"}
    out = sasoftmax.attention(q, k, v, backend="triton", **options)
    out.backward(torch.ones_like(out))


def check_launches() -> tuple[int, int, list[str]]:
    """Every launch of :func:`calls` (each call twice) again through Triton's JIT; (launches, launches that took the
    backend's direct path, mismatches)."""
    from sasoftmax.backends import triton as backend
    from sasoftmax.backends import triton_kernels as kernels

    launches: list[Launch] = []
    mismatches: list[str] = []
    counts = {"launches": 0, "jit": 0}
    launch, jit_launch = backend._launch, backend._jit_launch

    def counted_jit_launch(*args):
        counts["jit"] += 1
        return jit_launch(*args)

    def checked(name, grid, cfg, *args, **kwargs):
        launches.clear()
        launch(name, grid, cfg, *args, **kwargs)
        ours = launches[-1]
        counts["launches"] += 1
        launches.clear()
        stages = backend._STAGES_THAT_FIT.get((name, 0, cfg), cfg.num_stages)
        getattr(kernels, name)[grid](*args, **kwargs, **backend.replace(cfg, num_stages=stages).launch())
        theirs = launches[-1]
        same_values = len(ours.values) == len(theirs.values) and all(
            a is b for a, b in zip(ours.values, theirs.values)
        )
        if ours.kernel is not theirs.kernel or ours.grid != theirs.grid or not same_values:
            mismatches.append(f"{name}: ours {ours.kernel.key[:200]} / Triton's {theirs.kernel.key[:200]}")

    backend._launch, backend._jit_launch = checked, counted_jit_launch
    try:
        with fake_gpu(launches):
            for spec in calls().values():
                torch.manual_seed(0)
                run_call(spec)
                run_call(spec)
    finally:
        backend._launch, backend._jit_launch = launch, jit_launch
    return counts["launches"], counts["launches"] - counts["jit"], mismatches


class CountingStandIn:
    """Stands in for a kernel as tests do to watch its launches (tests/kernel_capture.py): counts them, launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def check_stand_ins() -> int:
    """Launches that a stand-in for the forward kernel saw over two equal calls (each one's: the direct path is
    for Triton's own kernels; on an H100 it had bypassed the tests' stand-ins from a call's second launch on)."""
    from sasoftmax.backends import triton_kernels as kernels

    fwd = kernels.fwd
    kernels.fwd = stand_in = CountingStandIn(fwd)
    try:
        with fake_gpu(None):
            spec = calls()["bf16 softmax"]
            run_call(spec)
            run_call(spec)
    finally:
        kernels.fwd = fwd
    return stand_in.launches


def check_specialization() -> list[str]:
    """Pairs of arguments that the backend's key (``_specialized``) and Triton's binder tell apart differently."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from sasoftmax.backends.triton import _specialized

    @triton.jit
    def probe(x, CONST: tl.constexpr):
        pass

    binder = create_function_from_signature(probe.signature, probe.params, make_backend(GPUTarget("cuda", 90, 32)))
    base = torch.empty(64)
    values = [0, 1, 2, 15, 16, 48, -1, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, 2**32, -(2**31), -(2**31) - 1,
              -(2**31) - 16, 2**63 - 16, 2**63 - 1, 2**63, True, False, 1.0, 0.5, None, base, base[1:], base[4:],
              base.half(), base.half()[8:], base.half()[3:], torch.empty(0), torch.empty(0, dtype=torch.int32),
              base.to(torch.bfloat16), base.int(), base.long()[1:]]  # fmt: skip
    theirs = [binder(value, CONST=0)[1][0] for value in values]
    ours = [_specialized(value) for value in values]
    wrong = []
    for i in range(len(values)):
        for j in range(i):
            if (ours[i] == ours[j]) != (theirs[i] == theirs[j]):
                wrong.append(f"{values[i]!r:.40} vs {values[j]!r:.40}: Triton {theirs[i]} / {theirs[j]}")
    return wrong


def main() -> None:
    reason = unavailable()
    if reason:
        print(json.dumps({"skip": reason}))
        return
    from sasoftmax.backends.triton import DIRECT_LAUNCH

    launches, direct, mismatches = check_launches()
    report = {"launches": launches, "direct": direct, "mismatches": mismatches, "direct_launch": DIRECT_LAUNCH}
    report["specialization"] = check_specialization()
    report["stand_in_launches"] = check_stand_ins()
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
