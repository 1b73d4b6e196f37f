"""The Triton kernels compile for Hopper (sm_90) and Ampere (sm_80), checked without a GPU.

Triton's interpreter, which runs the kernel tests on CPU, accepts code the GPU compiler refuses (annotated
module globals ``X: tl.constexpr = 1`` did, once); Ampere lowers the dots to other instructions than Hopper
(mma instead of wgmma) and has less shared memory. tests/triton_compile_cuda.py records the launches of a few
representative calls and compiles each down to a cubin with ptxas; it runs in subprocesses because this session
has TRITON_INTERPRET=1 set (tests/conftest.py) and triton reads it once, at import. The variants compile in
parallel, one process each: ~25 s of CPU in all on a fresh machine. Triton's cache (keyed by the kernels'
source, the options, the target and the compiler's versions; failures are never cached) makes reruns of
unchanged kernels cheap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (it has wheels for Linux only)")

import sasoftmax  # noqa: E402

SCRIPT = Path(__file__).with_name("triton_compile_cuda.py")
VARIANTS = {  # variant -> the kernels its forward and backward launch (row_extrema: sa_norm and float32 only)
    "bf16 D=128 sa_norm causal kerple_log ssmax": {"row_extrema", "fwd", "bwd_dq", "bwd_dkdv"},
    "fp32 D=64 sa mask": {"row_extrema", "fwd", "bwd_dq", "bwd_dkdv"},
    "bf16 D=64 sa_norm causal table (grad) ssmax": {"row_extrema", "fwd", "bwd_dq", "bwd_dkdv"},
    "bf16 D=64 softmax bias tensor (grad)": {"fwd", "bwd_dq", "bwd_dkdv"},
    "fp16 D=64 sa_norm causal kerple_power (grad)": {"row_extrema", "fwd", "bwd_dq", "bwd_dkdv"},
    "fp16 D=64 sa_norm table (grad), min term scattered": {"row_extrema", "fwd", "bwd_dq", "bwd_dkdv"},
    "bf16 D=128 sa_norm (tuned tiles)": {"row_extrema", "fwd", "bwd_dq", "bwd_dkdv"},
    "bf16 D=128 softmax causal (tuned tiles)": {"fwd", "bwd_dq", "bwd_dkdv"},
    "bf16 D=64 softmax (tuned tiles)": {"fwd", "bwd_dq", "bwd_dkdv"},
    "bf16 D=64 sa causal (softmax's tuned tiles)": {"fwd", "bwd_dq", "bwd_dkdv"},  # (16-bit training: split weights)
    "bf16 D=64 sa_norm causal ssmax (tuned tiles), min term scattered": {"row_extrema", "fwd", "bwd_dq", "bwd_dkdv"},
}
SHARED_BYTES = {90: 227 * 1024, 80: 163 * 1024}  # the most shared memory one block may use: Hopper, Ampere (A100)
TIMEOUT_S = 300  # a hung compile fails the test instead of hanging the suite


def compile_env() -> dict[str, str]:
    """This process's environment without TRITON_INTERPRET (the kernels must be compiled, not interpreted), with
    the sources this session imports first on PYTHONPATH."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    src = str(Path(sasoftmax.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


def compile_variant(name: str, arch: int) -> subprocess.Popen:
    env = {**compile_env(), "SASOFTMAX_COMPILE_ARCH": str(arch)}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), name], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize("arch", SHARED_BYTES, ids=lambda arch: f"sm_{arch}")
def test_kernels_compile(arch):
    processes = {name: compile_variant(name, arch) for name in VARIANTS}
    reports, table, problems = {}, [], []
    try:
        for name, process in processes.items():
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
            assert process.returncode == 0, f"{name}: the compile script failed:\n{stderr[-3000:]}"
            reports[name] = json.loads(stdout.strip().splitlines()[-1])
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    skips = {report["skip"] for report in reports.values() if "skip" in report}
    if skips:
        pytest.skip("cannot compile for NVIDIA GPUs here: " + "; ".join(sorted(skips)))
    for name, kernels in VARIANTS.items():
        results = reports[name]["variants"][name]
        for kernel in sorted(kernels - results.keys()):
            problems.append(f"{name}: {kernel} was not launched")
        for kernel, result in results.items():
            if "error" in result:
                table.append(f"  {name:45} {kernel:12} FAILED")
                problems.append(f"{name}: {kernel} does not compile:\n{result['error']}")
            else:
                table.append(f"  {name:45} {kernel:12} {result['shared']:7d} B shared")
                if result["shared"] > SHARED_BYTES[arch]:
                    problems.append(f"{name}: {kernel} needs {result['shared']} B of shared memory")
    limit = f"sm_{arch} allows {SHARED_BYTES[arch] // 1024} KiB per block"
    assert not problems, "\n".join(problems + [f"shared memory per kernel ({limit}):", *table])


def test_static_report_reads_registers_and_loops(tmp_path):
    """benchmarks/triton_static.py (what the kernels compile to, for sessions without a GPU): every kernel of a
    softmax call with SSMax, without a bias and with Kerple's, gets its registers and its tile loops, whose
    iterations hold the tensor-core instructions, and with Kerple a logarithm per score element more."""
    reason = _compile_unavailable()
    if reason:
        pytest.skip(reason)
    script = Path(__file__).parents[1] / "benchmarks" / "triton_static.py"
    args = ["--out", str(tmp_path), "--normalizers", "softmax", "--head-dims", "64", "--ssmax"]
    args += ["--bias", "none", "kerple_log"]
    run = subprocess.run(
        [sys.executable, str(script), *args], env=compile_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "static.json").read_text())["rows"]
    found = {(row["bias"], row["kernel"]): row for row in rows}
    assert set(found) == {(bias, k) for bias in ("none", "kerple_log") for k in ("fwd", "bwd_dq", "bwd_dkdv")}
    for row in rows:
        assert row["registers"] > 0 and row["tile"] and row["loops"], row
        assert all(loop["HGMMA"] > 0 and loop["MUFU"] > 0 for loop in row["loops"]), row  # sm_90: wgmma, exp2

    def mufu_per_element(row):  # (the loops' tiles and warps are the row's)
        return [loop["MUFU"] / loop["instructions"] * loop["per_element"] for loop in row["loops"]]

    for kernel in ("fwd", "bwd_dq"):  # exp2 per element (and the forward's per row), with Kerple a lg2 too
        plain, kerple = mufu_per_element(found["none", kernel]), mufu_per_element(found["kerple_log", kernel])
        assert len(plain) == len(kerple)
        assert all(b - a == pytest.approx(1.0, abs=0.1) for a, b in zip(plain, kerple)), (plain, kerple)


def _compile_unavailable() -> str | None:
    """Why this machine cannot compile for NVIDIA GPUs (the compile script's own check, run without the
    interpreter), or None."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); import triton_compile_cuda as t; print(t.unavailable() or '')"
    run = subprocess.run(
        [sys.executable, "-c", code, str(SCRIPT.parent)], env=compile_env(), capture_output=True, text=True
    )
    return run.stdout.strip() or None


KEYS_SCRIPT = """
import json
from triton.runtime import jit
from sasoftmax.backends import triton_kernels as kernels

functions = {name: f for name, f in vars(kernels).items() if isinstance(f, jit.JITCallable)}
at_import = {name: f.hash for name, f in functions.items()}  # (what the module computed: None if nothing)
for _ in range(len(functions)):  # rehashed, last defined first, until nothing changes: every callee's globals in
    before = {name: f.cache_key for name, f in functions.items()}
    for f in functions.values():
        f.hash = None
    for f in reversed(list(functions.values())):
        f.cache_key
    if {name: f.cache_key for name, f in functions.items()} == before:
        break
print(json.dumps({"functions": len(functions), "differ": sorted(n for n in functions if at_import[n] != before[n])}))
"""


def test_kernel_cache_keys_do_not_depend_on_the_launch_order():
    """Triton's on-disk key of a kernel takes in its callees' module constants only where their hashes were computed
    first (triton_kernels' last lines): the kernels' keys as the module leaves them must be those of a fixpoint, so
    that no process, whichever kernel it launches first, compiles a kernel again under another key."""
    done = subprocess.run([sys.executable, "-c", KEYS_SCRIPT], env=compile_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["functions"] > 30 and result["differ"] == []
