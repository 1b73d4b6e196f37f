"""The cpu kernels' build never blocks a process: found libraries load without a lock, a builder killed with
kill -9 leaves nothing that makes others wait, a live builder is waited for only up to a limit, and a
machine without a compiler runs the plain-PyTorch path."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sasoftmax.backends import cpu_native

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("ninja") is None,
                                    reason="no C++ compiler or ninja")  # fmt: skip

LOAD = (
    "import sys, torch\n"
    "from sasoftmax.backends import cpu_native\n"
    "lib = cpu_native.kernels()\n"
    "from sasoftmax import attention\n"
    "q = torch.randn(1, 2, 8, 4)\n"
    "attention(q, q, q, normalizer='sa_norm', causal=True, backend='cpu')\n"
    "print('loaded' if lib is not None else 'fallback')\n"
)


def _env(ext_dir: Path, **extra: str) -> dict[str, str]:
    src = str(Path(cpu_native.__file__).resolve().parents[2])
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext_dir), "PYTHONPATH": src, **extra}


def _load(ext_dir: Path, timeout: float = 180, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD], env=_env(ext_dir, **extra), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_build_key_changes_with_environment_and_cpu(monkeypatch):
    key = cpu_native.build_key()
    monkeypatch.setattr(sys, "prefix", sys.prefix + "-other-venv")
    assert cpu_native.build_key() != key
    monkeypatch.undo()
    monkeypatch.setattr(cpu_native, "_cpu_kind", lambda: "another cpu")
    assert cpu_native.build_key() != key


@needs_compiler
def test_a_built_library_loads_without_any_lock(tmp_path):
    """With the library in place a process never touches the lock, even one held by a live process."""
    ext = tmp_path / "ext"
    folder = ext / cpu_native.build_dir().name
    folder.mkdir(parents=True)
    shutil.copy(cpu_native.library_path(), folder / "sasoftmax_cpu_kernels.so")
    lock = folder / "build.lock"
    lock.write_text("1 elsewhere\n")
    with open(lock) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a live holder that never lets go
        began = time.monotonic()
        result = _load(ext, timeout=60)
        took = time.monotonic() - began
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded" and took < 30


def test_a_live_builder_is_waited_for_only_up_to_a_limit(tmp_path, monkeypatch):
    """No library yet and a live holder of the lock: a clear error naming the lock file after BUILD_WAIT_S."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_native, "BUILD_WAIT_S", 0.5)
    folder = cpu_native.build_dir()
    folder.mkdir(parents=True)
    lock = folder / "build.lock"
    with open(lock, "w") as held:
        held.write(f"{os.getpid()} thishost\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(TimeoutError, match=str(lock)):
            cpu_native.library_path()


@needs_compiler
def test_kill_9_during_a_build_leaves_nothing_that_blocks(tmp_path):
    """A real kill -9 of a process building the library (holding the lock, mid-compile), plus a planted lock file
    naming a dead process and a leftover build folder: the next process builds and loads within the timeout."""
    ext = tmp_path / "ext"
    first = subprocess.Popen([sys.executable, "-c", LOAD], env=_env(ext), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(ext.glob("sasoftmax-*/build-*")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.02)
    assert first.poll() is None, "the build finished before it could be killed"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL
    (folder,) = ext.glob("sasoftmax-*")
    assert not (folder / "sasoftmax_cpu_kernels.so").exists()
    (folder / "build.lock").write_text("999999999 " + os.uname().nodename + "\n")  # a dead holder's lock file
    result = _load(ext)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded"
    assert not list(folder.glob("build-*"))  # the dead builder's folder is cleaned up


def test_without_a_compiler_the_plain_path_runs(tmp_path):
    result = _load(tmp_path / "ext", CXX="/nonexistent/c++", PATH="/nonexistent")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "fallback"
    assert "cpu kernels unavailable" in result.stderr
