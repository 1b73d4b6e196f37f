"""Data of the harness: a byte-level tokenizer and corpora split into train/validation by file.

``load_corpus(spec)`` understands:

- ``None``: the source of the running interpreter's standard library (``sysconfig`` "stdlib" path,
  ``*.py``, test directories and test files excluded) — always there, no download;
- a path: a text file, or a directory whose files are read recursively (hidden files skipped);
- ``"hf:NAME[:CONFIG]"``: a Hugging Face hub dataset's "text" column through the ``datasets`` library, if
  it is installed and can reach the hub (or its cache). NAME must be a hub dataset id (``name`` or
  ``owner/name``): URLs, paths and names of local files are refused, and no remote code runs.

Files go to validation deterministically: sorted by the SHA-1 of their relative path, the first 5 %
(at least one) are validation. A single file is split by bytes (the last 10 % are validation). The
fingerprint is the SHA-256 of the file names and contents, so a run can tell when its data changed.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

VOCAB_SIZE = 256
"""Byte-level vocabulary: one token per byte value."""

VAL_FILE_FRACTION = 0.05
VAL_BYTE_FRACTION = 0.1
_TEST_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}


def encode(text: str) -> Tensor:
    """UTF-8 bytes of ``text`` as an int64 tensor (T,)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens: Tensor) -> str:
    """Inverse of :func:`encode` (invalid UTF-8 is replaced)."""
    return bytes(int(t) for t in tokens.reshape(-1).tolist()).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Corpus:
    """Token streams ``train`` and ``val`` (uint8 tensors, one token per byte) and a ``fingerprint``."""

    train: Tensor
    val: Tensor
    fingerprint: str
    description: str


def load_corpus(spec: str | None) -> Corpus:
    """Load (and cache in memory) the corpus ``spec``; raises ValueError with a clear message."""
    if spec is not None and not isinstance(spec, str):
        raise TypeError(f"data must be None, a path or 'hf:NAME[:CONFIG]'; got {type(spec).__name__}")
    if spec is not None and not spec.startswith("hf:"):
        path = Path(spec).expanduser().resolve()
        if not path.exists():
            raise ValueError(f"data path {spec!r} does not exist")
        files = [path] if path.is_file() else [
            p for p in sorted(path.rglob("*")) if p.is_file() and not _hidden(p.relative_to(path))
        ]
        if not files:
            raise ValueError(f"data directory {spec!r} holds no files")
        # The cache key includes every file's size and modification time, so edited data is re-read.
        signature = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        return _load_path(str(path), signature)
    return _load_cached(spec)


@functools.lru_cache(maxsize=4)
def _load_cached(spec: str | None) -> Corpus:
    if spec is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in sorted(root.rglob("*.py")) if _is_stdlib_source(p.relative_to(root))]
        return _split_files(root, files, f"Python {sysconfig.get_python_version()} standard library ({root})")
    return _load_hf(spec[3:])


@functools.lru_cache(maxsize=4)
def _load_path(path: str, signature: tuple[tuple[str, int, int], ...]) -> Corpus:
    files = [Path(name) for name, _, _ in signature]
    if len(files) > 1:
        return _split_files(Path(path), files, f"directory {path}")
    data = files[0].read_bytes()
    if len(data) < 2:
        raise ValueError(f"data file {files[0]} is too small to split into train and validation")
    cut = int(len(data) * (1 - VAL_BYTE_FRACTION))
    fingerprint = hashlib.sha256(files[0].name.encode() + b"\0" + data).hexdigest()
    return Corpus(_tokens(data[:cut]), _tokens(data[cut:]), fingerprint, f"file {files[0]}")


def _split_files(root: Path, files: list[Path], description: str) -> Corpus:
    names = [p.relative_to(root).as_posix() for p in files]
    order = sorted(range(len(files)), key=lambda i: hashlib.sha1(names[i].encode()).hexdigest())
    n_val = max(1, round(len(files) * VAL_FILE_FRACTION))
    val_ids = set(order[:n_val])
    digest = hashlib.sha256()
    train, val = [], []
    for i in sorted(range(len(files)), key=lambda i: names[i]):
        data = files[i].read_bytes()
        digest.update(names[i].encode() + b"\0" + len(data).to_bytes(8, "little") + data)
        (val if i in val_ids else train).append(data)
    return Corpus(_tokens(b"\n".join(train)), _tokens(b"\n".join(val)), digest.hexdigest(), description)


_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
_HUB_CONFIG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_hub_name(name_config: str) -> tuple[str, str | None]:
    """``"NAME[:CONFIG]"`` -> (NAME, CONFIG or None) if NAME is a Hugging Face hub dataset id (``name`` or
    ``owner/name``: letters, digits, ``_.-``) and CONFIG a config name; ValueError otherwise. URLs, paths,
    ``..`` and names of local files or folders are refused: ``datasets`` would load those instead of the hub."""
    name, _, config = name_config.partition(":")
    spec = f"hf:{name_config}"
    if not _HUB_NAME.fullmatch(name) or ".." in name or name.endswith("."):
        raise ValueError(f"data {spec!r}: NAME must be a Hugging Face hub dataset id like 'wikitext' or "
                         "'owner/name' (letters, digits, _ . -), not a URL or a path")  # fmt: skip
    if config and not _HUB_CONFIG.fullmatch(config):
        raise ValueError(f"data {spec!r}: CONFIG must be a dataset config name (letters, digits, _ . -)")
    if Path(name).exists():
        raise ValueError(f"data {spec!r}: {name!r} is a local path, which `datasets` would load instead of the hub "
                         "dataset; pass local data as --data PATH")  # fmt: skip
    return name, config or None


def _load_hf(name_config: str) -> Corpus:
    name, config = check_hub_name(name_config)
    try:
        import datasets
    except ImportError:
        raise ValueError("data 'hf:...' needs the `datasets` library: pip install datasets") from None
    try:
        # Never remote code: datasets before 4 take trust_remote_code (False refuses loading scripts); 4 runs none.
        no_code = {"trust_remote_code": False} if "trust_remote_code" in _parameters(datasets.load_dataset) else {}
        ds = datasets.load_dataset(name, config, **no_code)
    except Exception as err:  # network errors, unknown names, offline mode: all mean "cannot load"
        raise ValueError(f"could not load Hugging Face dataset {name_config!r} (offline or unknown?): {err}") from err
    split = "validation" if "validation" in ds else "test" if "test" in ds else None
    if "train" not in ds or split is None or "text" not in ds["train"].column_names:
        raise ValueError(f"dataset {name_config!r} needs 'train' and 'validation'/'test' splits with a 'text' column")
    train = "\n".join(ds["train"]["text"]).encode()
    val = "\n".join(ds[split]["text"]).encode()
    fingerprint = hashlib.sha256(f"hf:{name_config}".encode() + str(ds["train"]._fingerprint).encode()).hexdigest()
    return Corpus(_tokens(train), _tokens(val), fingerprint, f"Hugging Face dataset {name_config}")


def _parameters(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _is_stdlib_source(rel: Path) -> bool:
    parts = rel.parts
    if any(part in _TEST_DIRS or part.startswith(".") for part in parts[:-1]):
        return False
    name = parts[-1]
    return not (name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py")


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in rel.parts)


def _tokens(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def sample_batch(tokens: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``batch_size`` random windows of ``tokens``: inputs and next-token targets, both int64 (B, T)."""
    if tokens.numel() < seq_len + 1:
        raise ValueError(f"the training split has {tokens.numel()} tokens; seq_len {seq_len} needs {seq_len + 1}")
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)
    windows = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]

