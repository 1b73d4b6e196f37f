"""The Triton backend's direct launches of compiled kernels pick what Triton's JIT launch would, checked without a GPU.

On a GPU, ``triton._launch`` hands a launch it has seen before straight to Triton's compiled kernel, keyed by what
Triton specialises on, instead of through Triton's JIT launch path (its cost per launch, in the host's time, set the
pace of training at seq 1k: docs/triton.md). tests/triton_fake_driver.py fakes an sm_90 GPU for Triton and checks
every launch of a set of calls against Triton's own; it runs in a subprocess because this session has
TRITON_INTERPRET=1 set (tests/conftest.py), which triton reads once, at import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (it has wheels for Linux only)")

from test_triton_compile import compile_env  # noqa: E402

SCRIPT = Path(__file__).with_name("triton_fake_driver.py")


def test_direct_launches_match_tritons_jit():
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], env=compile_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(report["skip"])
    assert report["specialization"] == [], "the backend's key and Triton's binder tell arguments apart differently"
    assert report["mismatches"] == [], "a direct launch took another compiled kernel or arguments than Triton's JIT"
    assert report["stand_in_launches"] == 2, "a test's stand-in for a kernel must see every launch"
    # every call runs twice: its second forward and backward find their kernels (the first ones of calls with the
    # same specialization, too); triton versions the direct path was not checked for launch through Triton's JIT
    assert report["launches"] >= 60
    if report["direct_launch"]:
        assert report["direct"] >= report["launches"] // 2
    else:
        assert report["direct"] == 0
