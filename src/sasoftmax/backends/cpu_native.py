"""Build and load the fused row kernels of the cpu backend (``cpu_kernels.cpp``), or report why not.

Built once per environment and CPU kind with ``torch.utils.cpp_extension`` (cached under
``TORCH_EXTENSIONS_DIR``, see :func:`library_path`; a process that finds it built loads it without any lock)
as a plain shared library with a C ABI, called through ctypes. Two kinds of entry: row kernels over one
tile of logits (``forward``, ``backward``; the GEMMs stay in PyTorch), and whole calls without a bias function
(a RelativeBias excepted, which they evaluate and differentiate themselves) or a bias that needs a gradient in
one parallel region (``fused_forward``, ``fused_backward``), which call the BLAS gemm that torch itself uses
(float32 calls on CPUs with AVX-512 that are not Intel's: the kernels' own GEMM, see :func:`own_gemm`).
``kernels()`` returns None when there is no compiler or the build fails, and ``fused()`` also when torch's
BLAS cannot be found; the cpu backend then falls back to its tiled or plain-PyTorch path. The environment
variable ``SASOFTMAX_CPU_KERNELS`` chooses: ``1`` (default) all of them, ``tiles`` no whole calls, ``0``
plain PyTorch only.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import socket
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# No -ffast-math: its -ffinite-math-only lets the compiler drop the tests through which a NaN logit reaches the
# output (as it does in eager PyTorch), and its reassociation broke the exp's exact range reduction. What it gave
# the loops comes from these flags (FMA contraction, no errno/trap bookkeeping) and from the code itself; OpenMP
# simd reductions may reorder their sums without it. See docs/cpu_backend.md for the speed before and after.
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-fopenmp"]
if platform.machine().lower() in ("x86_64", "amd64"):
    # gcc keeps to 256-bit vectors by default even with AVX-512; 512-bit ones made the row loops ~1.4x
    # faster here. Without AVX-512 the flag changes nothing.
    _FLAGS.append("-mprefer-vector-width=512")
_MODES = {"softmax": 0, "sa": 1, "sa_norm": 2}
_RELATIVE_KINDS = {"alibi": 1, "kerple_log": 2, "kerple_power": 3, "table": 4}  # relative_bias.RELATIVE_BIAS_KINDS
_TYPES = {torch.float32: ("f32", ctypes.c_float), torch.float64: ("f64", ctypes.c_double)}


_SETTINGS = ("1", "tiles", "0")


def _setting() -> str:
    """``SASOFTMAX_CPU_KERNELS``: 1 (default) fused whole calls where possible, ``tiles`` Python tiles with the
    C++ row kernels only, 0 plain PyTorch."""
    value = os.environ.get("SASOFTMAX_CPU_KERNELS", "1")
    if value not in _SETTINGS:
        raise ValueError(f"SASOFTMAX_CPU_KERNELS must be one of {', '.join(_SETTINGS)}; got {value!r}")
    return value


def enabled() -> bool:
    """False when ``SASOFTMAX_CPU_KERNELS=0`` asks for the plain-PyTorch path."""
    return _setting() != "0"


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(library_path()))
    except Exception as err:  # no compiler, no ninja, a failed build: fall back, but say so once
        warnings.warn(f"sasoftmax: cpu kernels unavailable ({err}); using the plain-PyTorch path", stacklevel=3)
        return None


# ----------------------------------------------------------------------------------- build and cache
# A built library is found by a key of everything it depends on, and is loaded directly when it is there:
# a process that finds it takes no lock (torch.utils.cpp_extension.load takes one on every call, and a
# process killed while holding it left every later process waiting forever). A build runs under an
# advisory flock, which the kernel releases when its holder dies however it dies, in a private folder, and
# the library is renamed into place only when complete.

_LIBRARY_NAME = "sasoftmax_cpu_kernels"
BUILD_WAIT_S = 600.0
"""How long a process waits for another live process building the same library before it gives up."""


def _cpu_kind() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags (Linux), else the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags", "Features", "CPU part", "CPU implementer") and key not in fields:
            fields[key] = value.strip()
    return f"{platform.machine()} {sorted(fields.items())}"


def build_key() -> str:
    """A hash of what the library depends on: its source, the flags, the compiler asked for, torch, the
    Python ABI, the environment (``sys.prefix``) and the CPU kind."""
    parts = [
        _SOURCE.read_bytes(), " ".join(_FLAGS), os.environ.get("CXX", "c++"), torch.__version__, torch.__file__,
        sys.implementation.cache_tag or "", sysconfig.get_config_var("SOABI") or "", sys.prefix, _cpu_kind(),
    ]  # fmt: skip
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build_dir() -> Path:
    """The folder of this environment's and CPU's build: ``$TORCH_EXTENSIONS_DIR`` (default
    ``$XDG_CACHE_HOME/torch_extensions``, ``~/.cache/torch_extensions``) / ``sasoftmax-<build_key()>``."""
    # Not torch.utils.cpp_extension's own default: importing that module (and setuptools) costs ~0.3 s, which a
    # process that only loads the built library should not pay.
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                          "torch_extensions")  # fmt: skip
    return Path(root) / f"sasoftmax-{build_key()}"


def library_path() -> Path:
    """The built library, built first if it is not there yet (see the notes above)."""
    folder = build_dir()
    target = folder / f"{_LIBRARY_NAME}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with _build_lock(folder / "build.lock") as exclusive:
        if not target.is_file():  # another process may have built it while this one waited
            _build(folder, target, clean=exclusive)
    return target


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive flock on ``path`` (created if needed), waiting up to ``BUILD_WAIT_S`` for a live
    holder; the holder's pid and host are written in the file to say who builds. Yields whether the lock is
    exclusive (False where there is no flock)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): builds run in private folders, so concurrent ones only duplicate work
        yield False
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        waited, told = 0.0, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waited >= BUILD_WAIT_S:
                    raise TimeoutError(f"{path} is still held after {waited:.0f} s (by {_holder(path)})") from None
                if not told and waited >= 2:
                    print(f"sasoftmax: waiting for {_holder(path)} building the cpu kernels ({path})",
                          file=sys.stderr, flush=True)  # fmt: skip
                    told = True
                time.sleep(0.2)
                waited += 0.2
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield True
    finally:
        os.close(fd)  # releases the flock


def _holder(path: Path) -> str:
    try:
        pid_host = path.read_text().split()
        return f"process {pid_host[0]} on {pid_host[1]}"
    except (OSError, IndexError):
        return "another process"


def _build(folder: Path, target: Path, clean: bool) -> None:
    """Compile into a private folder (so torch's own build lock is never shared), then rename into place;
    ``clean`` (this process holds the build lock) first removes the folders of builders that died."""
    from torch.utils import cpp_extension

    for leftover in folder.glob("build-*") if clean else ():
        shutil.rmtree(leftover, ignore_errors=True)
    private = Path(tempfile.mkdtemp(prefix="build-", dir=folder))
    try:
        built = cpp_extension.load(
            name=_LIBRARY_NAME,
            sources=[str(_SOURCE)],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            build_directory=str(private),
            verbose=False,
        )
        os.replace(built, target)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def kernels() -> ctypes.CDLL | None:
    """The loaded library, or None if it is disabled or cannot be built here."""
    return _library() if enabled() else None


@functools.cache
def _blas() -> dict[torch.dtype, int]:
    """Addresses of the Fortran ``sgemm_``/``dgemm_`` that torch itself calls (MKL or OpenBLAS, exported by
    libtorch_cpu or by a library loaded globally), by dtype; empty if there are none."""
    candidates = [str(p) for p in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*"))] + [None]
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            found = {dtype: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                     for dtype, name in ((torch.float32, "sgemm_"), (torch.float64, "dgemm_"))}  # fmt: skip
        except (OSError, AttributeError):
            continue
        return found
    return {}


def _cpu_vendor() -> str:
    """The CPU's ``vendor_id`` (``GenuineIntel``, ``AuthenticAMD``; Linux), else an empty string."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip()
    return ""


@functools.cache
def own_gemm() -> bool:
    """Whether whole float32 calls use the kernels' own AVX-512 GEMM rather than torch's BLAS: where the library
    was built with AVX-512 and the CPU is known not to be Intel's. MKL, torch's usual BLAS, runs its AVX-512 code
    on Intel CPUs alone; on an AMD EPYC with AVX-512 its AVX2 sgemm ran the fused path's shapes at about half the
    speed of the own GEMM (docs/cpu_backend.md). Float64 calls, and calls with fewer than
    :data:`OWN_GEMM_MIN_QUERIES` queries, always use the BLAS."""
    lib = _library()
    return lib is not None and bool(lib.sa_own_gemm_f32()) and _cpu_vendor() not in ("", "GenuineIntel")


OWN_GEMM_MIN_QUERIES = 16
"""Queries per head a float32 call needs for the own GEMM (:func:`own_gemm`): it transposes each head's k and v
once per call, which a call with few queries (decoding) would not amortise; those take the BLAS."""


def _use_own_gemm(q: Tensor) -> bool:
    return q.dtype == torch.float32 and q.shape[2] >= OWN_GEMM_MIN_QUERIES and own_gemm()


def fused(dtype: torch.dtype) -> tuple[ctypes.CDLL, int] | None:
    """The kernels and the BLAS gemm for whole calls in ``dtype`` (see :func:`fused_forward`), or None
    when the kernels are disabled or unavailable or torch's BLAS cannot be found."""
    lib = kernels() if _setting() == "1" else None
    gemm = _blas().get(dtype) if lib is not None else None
    return None if gemm is None else (lib, gemm)


@torch.compiler.assume_constant_result
def fused_available(dtype: torch.dtype) -> bool:
    """Whether :func:`fused` serves ``dtype``: torch.compile runs this while tracing and keeps the answer as a
    constant (it cannot trace the build and the ctypes lookups)."""
    return fused(dtype) is not None


def _ptr(t: Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def forward(
    lib: ctypes.CDLL, raw: Tensor, limit: Tensor, t: Tensor, zmul: float, normalizer: str, eps: float
) -> tuple[Tensor, ...]:
    """Fused forward over a contiguous (rows, keys) tile, in place (raw -> unnormalised weights).

    ``limit`` (int64, rows) masks keys j >= limit; ``t`` (rows) is SSMax's factor (ones without SSMax).
    Returns the per-row statistics (4, rows) = (lse, m, c, lse_lo) (see cpu_kernels.cpp's RowStats), the output
    factor fac (rows,) and (argmin, argmax) (2, rows).
    """
    rows, keys = raw.shape
    suffix, ctype = _TYPES[raw.dtype]
    stats = torch.empty(5, rows, dtype=raw.dtype)  # RowStats' four, then fac
    args = torch.empty(2, rows, dtype=torch.long)
    getattr(lib, f"sa_forward_{suffix}")(
        _ptr(raw), ctypes.c_int64(rows), ctypes.c_int64(keys), _ptr(limit), _ptr(t), ctype(zmul),
        ctypes.c_int(_MODES[normalizer]), ctype(eps), *(_ptr(s) for s in stats), _ptr(args[0]), _ptr(args[1]),
        ctypes.c_int(torch.get_num_threads()),
    )  # fmt: skip
    return stats[:4], stats[4], args


def backward(
    lib: ctypes.CDLL,
    raw: Tensor,
    dw: Tensor,
    limit: Tensor,
    t: Tensor,
    zmul: float,
    normalizer: str,
    lse: Tensor,
    low: Tensor,
    inv: Tensor,
    lse_lo: Tensor,
    amin: Tensor,
    amax: Tensor,
    want_dsz: bool,
) -> Tensor | None:
    """Fused backward over contiguous (rows, keys) tiles, in place: raw -> u, dw -> dL/dz.

    Per-row inputs are contiguous (rows,) tensors; D_i = Σ_j w_ij dW_ij comes from the row itself (see
    cpu_kernels.cpp's backward_row). Returns Σ_j dL/dx·z per row if ``want_dsz``.
    """
    rows, keys = raw.shape
    suffix, ctype = _TYPES[raw.dtype]
    dsz = torch.empty(rows, dtype=raw.dtype) if want_dsz else None
    getattr(lib, f"sa_backward_{suffix}")(
        _ptr(raw), _ptr(dw), ctypes.c_int64(rows), ctypes.c_int64(keys), _ptr(limit), _ptr(t), ctype(zmul),
        ctypes.c_int(_MODES[normalizer]), _ptr(lse), _ptr(low), _ptr(inv), _ptr(lse_lo), _ptr(amin), _ptr(amax),
        _ptr(dsz), ctypes.c_int(torch.get_num_threads()),
    )  # fmt: skip
    return dsz


def _call_args(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, ssmax: Tensor | None, scale: float,
    eps: float, causal: bool, normalizer: str, rows: int, gemm: int, chunks: int = 1, together: int = 1,
) -> tuple:  # fmt: skip
    """The leading arguments of the fused entries: shapes, inputs, mask, bias and their strides, options."""
    b, hq, lq, d = q.shape
    _, hkv, lk, dv = v.shape
    own = int(_use_own_gemm(q))
    # int64 arrays as ctypes builds them (a foreign call takes an array by its address): torch.tensor took ~2.5 µs
    # each, a good part of a decoding step's host time
    dims = (ctypes.c_int64 * 12)(b, hq, hkv, lq, lk, d, dv, int(causal), rows, chunks, together, own)
    strides = (ctypes.c_int64 * 8)(*(s for t in (mask, bias) for s in (t.stride() if t is not None else (0,) * 4)))
    ctype = _TYPES[q.dtype][1]
    keep = (dims, strides)  # referenced by the caller until the call returns
    args = (dims, _ptr(q), _ptr(k), _ptr(v), _ptr(mask), _ptr(bias), strides, _ptr(ssmax), ctype(scale),
            ctype(eps), ctypes.c_int(_MODES[normalizer]), ctypes.c_void_p(gemm),
            ctypes.c_int(torch.get_num_threads()))  # fmt: skip
    return keep, args


Relative = tuple[str, Tensor, "Tensor | None"]
"""A relative positional bias for the fused entries: (kind of ``relative_bias.RELATIVE_BIAS_KINDS``, r1, r2 or
None), r1 and r2 contiguous (Hq,) tensors in q's dtype; for kind ``table`` r1 a contiguous (Hq, n) table."""


def _relative_args(relative: Relative | None) -> tuple:
    """The trailing (kind, r1, r2, n) arguments of the fused entries: kind 0 = no relative bias; n the width of a
    table r1 (1 for the other kinds)."""
    if relative is None:
        return ctypes.c_int(0), _ptr(None), _ptr(None), ctypes.c_int64(1)
    kind, r1, r2 = relative
    n = r1.shape[1] if kind == "table" else 1
    return ctypes.c_int(_RELATIVE_KINDS[kind]), _ptr(r1), _ptr(r2), ctypes.c_int64(n)


def fold_offsets(per_offset: Tensor, lk: int, n: int) -> Tensor:
    """A table's gradient (Hq, n) from the sums of dL/dz per offset, ``per_offset`` (Hq, L + S − 1) with entry
    j − pos_i + S − 1 for query position pos_i and key j: offset o has distance |o − (S − 1)|, which adds to entry
    min(distance, n − 1). Summed in float64, then in ``per_offset``'s dtype."""
    distance = (torch.arange(per_offset.shape[1]) - (lk - 1)).abs().clamp_max(n - 1)
    folded = torch.zeros(per_offset.shape[0], n, dtype=torch.float64)
    return folded.index_add_(1, distance, per_offset.double()).to(per_offset.dtype)


def _divisors(n: int, at_most: int) -> list[int]:
    """The divisors of ``n`` up to ``at_most`` (at least 1), largest first."""
    return [g for g in range(min(n, max(1, at_most)), 0, -1) if n % g == 0]


def fused_forward(
    fused_lib: tuple[ctypes.CDLL, int], q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None,
    ssmax: Tensor | None, scale: float, eps: float, causal: bool, normalizer: str, rows: int,
    relative: Relative | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """A whole forward in one parallel region, GEMMs included.

    q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv): contiguous, float32 or float64; ``mask`` bool and
    ``bias`` (additive, in q's dtype, no gradient) expanded to (B, Hq, L, S) (any strides), or None; ``ssmax``
    (Hq,) contiguous or None; ``rows`` query rows per block, over the query heads of a kv head that a block
    stacks; ``relative`` a relative positional bias the kernels evaluate themselves (see :data:`Relative`), added
    to ``bias`` if both are given. Returns out (B, Hq, L, Dv), stats (4, B, Hq, L) = (lse, m, c, lse_lo) and arg
    (2, B, Hq, L) =
    (argmin, argmax).
    """
    lib, gemm = fused_lib
    b, hq, lq, _ = q.shape
    # A block stacks as many query heads of a kv head as keeps a work item per thread: they share one pass over
    # k and v, which decoding (few rows) is bound by.
    together, per_head = 1, max(1, min(lq, rows))
    for g in _divisors(hq // k.shape[1], at_most=rows):
        g_rows = max(1, min(lq, rows // g))
        if b * (hq // g) * -(-lq // g_rows) >= torch.get_num_threads():
            together, per_head = g, g_rows
            break
    out = torch.zeros(b, hq, lq, v.shape[-1], dtype=q.dtype)
    stats = torch.zeros(4, b, hq, lq, dtype=q.dtype)
    arg = torch.full((2, b, hq, lq), -1, dtype=torch.long)
    _keep, args = _call_args(
        q, k, v, mask, bias, ssmax, scale, eps, causal, normalizer, per_head, gemm, together=together
    )
    getattr(lib, f"sa_fused_forward_{_TYPES[q.dtype][0]}")(
        *args, _ptr(out), *(_ptr(s) for s in stats), _ptr(arg[0]), _ptr(arg[1]),
        *_relative_args(relative),
    )  # fmt: skip
    return out, stats, arg


def fused_backward(
    fused_lib: tuple[ctypes.CDLL, int], q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None,
    ssmax: Tensor | None, scale: float, eps: float, causal: bool, normalizer: str, rows: int, grad_out: Tensor,
    stats: Tensor, arg: Tensor, want_ds: bool, relative: Relative | None = None,
    want_dr: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    """The backward of :func:`fused_forward` in one parallel region (DESIGN §2).

    ``grad_out`` (B, Hq, L, Dv) contiguous; ``stats``, ``arg`` as returned by
    the forward; ``rows`` rows per block over the query heads of a kv head. Returns dq (B, Hq, L, D), dk
    (B, Hkv, S, D), dv (B, Hkv, S, Dv), ds (Hq,) or None, and with ``want_dr`` the gradients of the relative
    bias's r1 and r2 as dr (2, Hq) (row 1 zeros for ALiBi), else None: per work item and head, reduced inside the
    kernels, then summed here in a fixed order. For a ``table`` dr is (1, Hq, n), the table's gradient: the kernels
    sum dL/dz per work item, head and offset j − pos_i, and :func:`fold_offsets` adds offsets into the entries of
    their distances.
    """
    lib, gemm = fused_lib
    b, hq, lq, _ = q.shape
    hkv, lk, threads = k.shape[1], k.shape[2], torch.get_num_threads()
    # Work items are (query heads of a kv head, as many as fit a block; chunk of their query blocks); more
    # than one chunk only to keep every thread busy.
    together = _divisors(hq // hkv, at_most=rows)[0]
    per_head = max(1, min(lq, rows // together))
    groups = hq // together
    chunks = min(-(-threads // (b * groups)), -(-lq // per_head))
    dq = torch.zeros_like(q)
    dk = torch.empty(b, groups, chunks, lk, k.shape[-1], dtype=q.dtype)  # partial sums of each item
    dv = torch.empty(b, groups, chunks, lk, v.shape[-1], dtype=q.dtype)
    ds = torch.empty(b, hq, chunks, dtype=q.dtype) if want_ds else None
    want_dr = want_dr and relative is not None
    table = want_dr and relative[0] == "table"
    dr_shape = (b, hq, chunks, lq + lk - 1) if table else (2, b, hq, chunks)
    dr = torch.empty(dr_shape, dtype=q.dtype) if want_dr else None
    _keep, args = _call_args(
        q, k, v, mask, bias, ssmax, scale, eps, causal, normalizer, per_head, gemm, chunks, together
    )
    getattr(lib, f"sa_fused_backward_{_TYPES[q.dtype][0]}")(
        *args, _ptr(grad_out), *(_ptr(s) for s in stats),
        _ptr(arg[0]), _ptr(arg[1]), _ptr(dq), _ptr(dk), _ptr(dv), _ptr(ds), *_relative_args(relative), _ptr(dr),
    )  # fmt: skip
    if groups != hkv or chunks > 1:  # sum the partials of a kv head in a fixed order
        dk, dv = (t.view(b, hkv, -1, lk, t.shape[-1]).sum(2) for t in (dk, dv))
    else:
        dk, dv = dk.squeeze(2), dv.squeeze(2)
    if table:
        dr = fold_offsets(dr.sum((0, 2)), lk, relative[1].shape[1]).unsqueeze(0)
    elif dr is not None:
        dr = dr.sum((1, 3))
    return dq, dk, dv, None if ds is None else ds.sum((0, 2)), dr
