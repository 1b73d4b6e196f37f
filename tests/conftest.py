import os
import sysconfig
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
