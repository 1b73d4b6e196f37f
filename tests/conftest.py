import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be switched on
    # before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite's tensors are small: intra-op threads only add overhead there, and on a shared 2-core machine they
# slow tiny models down several times. One thread also makes the harness's arithmetic reproducible run to run.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> str:
    """~150 kB of Python source (three stdlib modules): big enough for every smoke length, quick to read."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((root / name).read_text() for name in ("argparse.py", "json/decoder.py", "textwrap.py"))
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(text)
    return str(path)


@dataclass(frozen=True)
class BackendPath:
    """One backend, or one path of the cpu backend, with the device and the widest dtype it runs."""

    name: str
    backend: str
    device: str
    dtype: torch.dtype


BACKEND_PATHS = ["eager", "eager-cuda", "cpu-fused", "cpu-tiled", "cpu-plain", "triton"]


@pytest.fixture(params=BACKEND_PATHS)
def backend_path(request, monkeypatch) -> BackendPath:
    """Every backend and cpu path: eager (also on CUDA when there is a GPU), the cpu backend's fused, tiled and
    plain paths with tiny blocks (fused blocks of 2 query rows, tiles of ~2 rows), and triton (on CUDA, else in
    Triton's interpreter; float32, its widest dtype)."""
    name = request.param
    cuda = torch.cuda.is_available()
    if name == "eager-cuda" and not cuda:
        pytest.skip("no CUDA device")
    if name == "triton":
        from sasoftmax import backends

        reason = backends.unavailable("triton")
        if reason:
            pytest.skip(reason)
    if name.startswith("cpu-"):
        from sasoftmax.backends import cpu

        monkeypatch.setattr(cpu, "FUSED_ROWS", 2)
        monkeypatch.setattr(cpu, "TILE_ELEMENTS", 600)
        monkeypatch.setenv("SASOFTMAX_CPU_KERNELS", {"fused": "1", "tiled": "tiles", "plain": "0"}[name[4:]])
    device = "cuda" if name == "eager-cuda" or (name == "triton" and cuda) else "cpu"
    dtype = torch.float32 if name == "triton" else torch.float64
    return BackendPath(name, name.split("-")[0], device, dtype)
