"""Build and load the fused row kernels of the cpu backend (``cpu_kernels.cpp``), or report why not.

Built once per machine with ``torch.utils.cpp_extension.load`` (cached under ``TORCH_EXTENSIONS_DIR``)
as a plain shared library with a C ABI, called through ctypes. ``kernels()`` returns None when there is
no compiler or the build fails; the cpu backend then runs its plain-PyTorch path. Setting the
environment variable ``SASOFTMAX_CPU_KERNELS=0`` forces the plain path.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import warnings
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
if platform.machine().lower() in ("x86_64", "amd64"):
    # gcc keeps to 256-bit vectors by default even with AVX-512; 512-bit ones made the row loops ~1.4x
    # faster here. Without AVX-512 the flag changes nothing.
    _FLAGS.append("-mprefer-vector-width=512")
_MODES = {"softmax": 0, "sa": 1, "sa_norm": 2}
_TYPES = {torch.float32: ("f32", ctypes.c_float), torch.float64: ("f64", ctypes.c_double)}


def enabled() -> bool:
    """False when ``SASOFTMAX_CPU_KERNELS=0`` asks for the plain-PyTorch path."""
    return os.environ.get("SASOFTMAX_CPU_KERNELS", "1") != "0"


@functools.cache
def _library() -> ctypes.CDLL | None:
    from torch.utils import cpp_extension

    try:
        path = cpp_extension.load(
            name="sasoftmax_cpu_kernels",
            sources=[str(_SOURCE)],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        return ctypes.CDLL(path)
    except Exception as err:  # no compiler, no ninja, a failed build: fall back, but say so once
        warnings.warn(f"sasoftmax: cpu kernels unavailable ({err}); using the plain-PyTorch path", stacklevel=3)
        return None


def kernels() -> ctypes.CDLL | None:
    """The loaded library, or None if it is disabled or cannot be built here."""
    return _library() if enabled() else None


def _ptr(t: Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def forward(
    lib: ctypes.CDLL, raw: Tensor, limit: Tensor, t: Tensor, zmul: float, normalizer: str, eps: float
) -> tuple[Tensor, ...]:
    """Fused forward over a contiguous (rows, keys) tile, in place (raw -> unnormalised weights).

    ``limit`` (int64, rows) masks keys j >= limit; ``t`` (rows) is SSMax's factor (ones without SSMax).
    Returns per-row (lse, m, c, fac, argmin, argmax); see cpu_kernels.cpp.
    """
    rows, keys = raw.shape
    suffix, ctype = _TYPES[raw.dtype]
    stats = torch.empty(4, rows, dtype=raw.dtype)
    args = torch.empty(2, rows, dtype=torch.long)
    getattr(lib, f"sa_forward_{suffix}")(
        _ptr(raw), ctypes.c_int64(rows), ctypes.c_int64(keys), _ptr(limit), _ptr(t), ctype(zmul),
        ctypes.c_int(_MODES[normalizer]), ctype(eps), _ptr(stats[0]), _ptr(stats[1]), _ptr(stats[2]),
        _ptr(stats[3]), _ptr(args[0]), _ptr(args[1]), ctypes.c_int(torch.get_num_threads()),
    )  # fmt: skip
    return (*stats.unbind(0), *args.unbind(0))


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
    delta: Tensor,
    amin: Tensor,
    amax: Tensor,
    want_dsz: bool,
) -> Tensor | None:
    """Fused backward over contiguous (rows, keys) tiles, in place: raw -> u, dw -> dL/dz.

    Per-row inputs are contiguous (rows,) tensors. Returns Σ_j dL/dx·z per row if ``want_dsz``.
    """
    rows, keys = raw.shape
    suffix, ctype = _TYPES[raw.dtype]
    dsz = torch.empty(rows, dtype=raw.dtype) if want_dsz else None
    getattr(lib, f"sa_backward_{suffix}")(
        _ptr(raw), _ptr(dw), ctypes.c_int64(rows), ctypes.c_int64(keys), _ptr(limit), _ptr(t), ctype(zmul),
        ctypes.c_int(_MODES[normalizer]), _ptr(lse), _ptr(low), _ptr(inv), _ptr(delta), _ptr(amin), _ptr(amax),
        _ptr(dsz), ctypes.c_int(torch.get_num_threads()),
    )  # fmt: skip
    return dsz
