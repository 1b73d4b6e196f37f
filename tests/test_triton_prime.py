"""benchmarks/triton_prime.py: a Triton cache compiled without a GPU is found again where it is installed."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (it has wheels for Linux only)")

from test_triton_compile import compile_env  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import triton_prime  # noqa: E402

ONE_TEST = "test_float32_matches_eager and softmax-full-B1-H2/2"


def prime(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(BENCHMARKS / "triton_prime.py"), *args]
    return subprocess.run(command, env=compile_env(), capture_output=True, text=True, timeout=600, check=False)


def test_wheel_key_swaps_in_the_wheels_libtriton(tmp_path):
    """The key of another build of the same Triton: libtriton.so's hash replaced, its Python sources checked."""
    import triton
    from triton.runtime.cache import triton_key

    here = Path(triton.__file__).parent
    theirs = b"another build of libtriton.so"
    wheel = tmp_path / "triton.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("triton/_C/libtriton.so", theirs)
        archive.write(here / "runtime" / "cache.py", "triton/runtime/cache.py")
    key, lib = triton_prime.wheel_key(wheel)
    ours = hashlib.sha256((here / "_C" / "libtriton.so").read_bytes()).hexdigest()
    assert lib == hashlib.sha256(theirs).hexdigest() != ours
    assert key == triton_key().replace(ours, lib) != triton_key()

    with zipfile.ZipFile(wheel, "w") as archive:  # another version's sources
        archive.writestr("triton/_C/libtriton.so", theirs)
        archive.writestr("triton/runtime/cache.py", "# not this triton\n")
    with pytest.raises(SystemExit, match="differs"):
        triton_prime.wheel_key(wheel)


def test_a_primed_cache_is_found_where_it_is_installed(tmp_path):
    """Build (one test's kernels, compiled for sm_90 under the faked GPU, the test run in the interpreter), pack,
    install elsewhere (group files pointed at their new place, IR left out), and run the same test against the
    installed cache: Triton compiles nothing."""
    built, installed, archive = tmp_path / "built", tmp_path / "installed", tmp_path / "cache.tar.xz"
    done = prime("build", "--out", str(built), "--tests", "tests/test_backend_triton.py", "--select", ONE_TEST,
                 "--workers", "1", "--archive", str(archive))  # fmt: skip
    if "cannot fake a GPU" in done.stderr:  # (no NVIDIA backend or ptxas in this triton)
        pytest.skip(done.stderr.strip()[-200:])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "1 passed" in done.stdout, done.stdout[-2000:]  # the test's checks held on the interpreted kernels
    manifest = json.loads((built / triton_prime.MANIFEST).read_text())
    assert len(manifest["entries"]) >= 2  # (forward and backward kernels at least)

    done = prime("install", str(archive), "--to", str(installed))
    assert done.returncode == 0 and "installed" in done.stdout, done.stdout + done.stderr[-2000:]
    group = next(installed.glob("*/__grp__*.json"))
    paths = json.loads(group.read_text())["child_paths"].values()
    assert paths and all(Path(p).parent == group.parent and Path(p).is_file() for p in paths)

    done = prime("build", "--out", str(installed), "--tests", "tests/test_backend_triton.py", "--select", ONE_TEST,
                 "--workers", "1")  # fmt: skip
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert "\n0 kernels compiled" in done.stdout
    counts = json.loads(prime("misses", "--to", str(installed)).stdout)
    assert counts == {"installed": len(manifest["entries"]), "compiled_here": 0, "built_here": 0}


def foreign_archive(folder: Path) -> Path:
    """A primed cache's archive built for another Triton than this one (no kernels in it)."""
    import tarfile

    archive = folder / "cache.tar.xz"
    manifest = {"identity": {"triton": "0.0.0", "triton_key": "x", "ptxas": "y", "env": {}}, "entries": []}
    (folder / triton_prime.MANIFEST).write_text(json.dumps(manifest))
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(folder / triton_prime.MANIFEST, arcname=triton_prime.MANIFEST)
    return archive


def test_install_refuses_another_triton(tmp_path):
    """A cache built for another Triton is not installed (and that is said)."""
    done = prime("install", str(foreign_archive(tmp_path)), "--to", str(tmp_path / "cache"))
    assert done.returncode == 0 and "nothing installed" in done.stdout, done.stdout + done.stderr[-2000:]
    assert not (tmp_path / "cache" / triton_prime.MANIFEST).exists()


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_installs_a_primed_cache_first(tmp_path):
    """PRIMED: gpu_check.sh installs the archive into $TRITON_CACHE_DIR before any step and counts, after the tests,
    the kernels Triton compiled all the same."""
    from test_benchmarks import dry_gpu_check

    cache = tmp_path / "cache"
    limits = {name: "0" for name in ("VERSIONS_S", "WARM_S", "HOST_S", "KERNELS_S", "BIAS_S", "TRAIN_S", "TESTS_S")}
    log = dry_gpu_check(tmp_path / "out", PRIMED=str(foreign_archive(tmp_path)), TRITON_CACHE_DIR=str(cache),
                        **limits)  # fmt: skip
    assert "== prime: exit 0" in log and "nothing installed" in log
    assert log.index("== prime: exit 0") < log.index("== warm: skipped")
    assert '"compiled_here": 0' in log and log.index('"compiled_here"') > log.index("== tests: skipped")
