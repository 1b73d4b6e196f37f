"""Build and load the fused row kernels of the cpu backend (``cpu_kernels.cpp``), or report why not.

Built once per machine with ``torch.utils.cpp_extension.load`` (cached under ``TORCH_EXTENSIONS_DIR``)
as a plain shared library with a C ABI, called through ctypes. Two kinds of entry: row kernels over one
tile of logits (``forward``, ``backward``; the GEMMs stay in PyTorch), and whole calls without a bias function
or a bias that needs a gradient in one parallel region (``fused_forward``, ``fused_backward``), which call the
BLAS gemm that torch itself uses.
``kernels()`` returns None when there is no compiler or the build fails, and ``fused()`` also when torch's
BLAS cannot be found; the cpu backend then falls back to its tiled or plain-PyTorch path. The environment
variable ``SASOFTMAX_CPU_KERNELS`` chooses: ``1`` (default) all of them, ``tiles`` no whole calls, ``0``
plain PyTorch only.
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


def _call_args(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, ssmax: Tensor | None, scale: float,
    eps: float, causal: bool, normalizer: str, rows: int, gemm: int, chunks: int = 1, together: int = 1,
) -> tuple:  # fmt: skip
    """The leading arguments of the fused entries: shapes, inputs, mask, bias and their strides, options."""
    b, hq, lq, d = q.shape
    _, hkv, lk, dv = v.shape
    dims = torch.tensor([b, hq, hkv, lq, lk, d, dv, int(causal), rows, chunks, together], dtype=torch.long)
    strides = torch.tensor([s for t in (mask, bias) for s in (t.stride() if t is not None else (0,) * 4)])
    ctype = _TYPES[q.dtype][1]
    keep = (dims, strides)  # referenced by the caller until the call returns
    args = (_ptr(dims), _ptr(q), _ptr(k), _ptr(v), _ptr(mask), _ptr(bias), _ptr(strides), _ptr(ssmax), ctype(scale),
            ctype(eps), ctypes.c_int(_MODES[normalizer]), ctypes.c_void_p(gemm),
            ctypes.c_int(torch.get_num_threads()))  # fmt: skip
    return keep, args


def _divisors(n: int, at_most: int) -> list[int]:
    """The divisors of ``n`` up to ``at_most`` (at least 1), largest first."""
    return [g for g in range(min(n, max(1, at_most)), 0, -1) if n % g == 0]


def fused_forward(
    fused_lib: tuple[ctypes.CDLL, int], q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None,
    ssmax: Tensor | None, scale: float, eps: float, causal: bool, normalizer: str, rows: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """A whole forward in one parallel region, GEMMs included.

    q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv): contiguous, float32 or float64; ``mask`` bool and
    ``bias`` (additive, in q's dtype, no gradient) expanded to (B, Hq, L, S) (any strides), or None; ``ssmax``
    (Hq,) contiguous or None; ``rows`` query rows per block, over the query heads of a kv head that a block
    stacks. Returns out (B, Hq, L, Dv), stats (3, B, Hq, L) = (lse, m, c) and arg (2, B, Hq, L) =
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
    stats = torch.zeros(3, b, hq, lq, dtype=q.dtype)
    arg = torch.full((2, b, hq, lq), -1, dtype=torch.long)
    _keep, args = _call_args(
        q, k, v, mask, bias, ssmax, scale, eps, causal, normalizer, per_head, gemm, together=together
    )
    getattr(lib, f"sa_fused_forward_{_TYPES[q.dtype][0]}")(
        *args, _ptr(out), _ptr(stats[0]), _ptr(stats[1]), _ptr(stats[2]), _ptr(arg[0]), _ptr(arg[1])
    )
    return out, stats, arg


def fused_backward(
    fused_lib: tuple[ctypes.CDLL, int], q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None,
    ssmax: Tensor | None, scale: float, eps: float, causal: bool, normalizer: str, rows: int, grad_out: Tensor,
    delta: Tensor, stats: Tensor, arg: Tensor, want_ds: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    """The backward of :func:`fused_forward` in one parallel region (DESIGN §2).

    ``grad_out`` (B, Hq, L, Dv) and ``delta`` = Σ dO·o (B, Hq, L) contiguous; ``stats``, ``arg`` as returned by
    the forward; ``rows`` rows per block over the query heads of a kv head. Returns dq (B, Hq, L, D), dk
    (B, Hkv, S, D), dv (B, Hkv, S, Dv) and ds (Hq,) or None.
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
    _keep, args = _call_args(
        q, k, v, mask, bias, ssmax, scale, eps, causal, normalizer, per_head, gemm, chunks, together
    )
    getattr(lib, f"sa_fused_backward_{_TYPES[q.dtype][0]}")(
        *args, _ptr(grad_out), _ptr(delta), _ptr(stats[0]), _ptr(stats[1]), _ptr(stats[2]), _ptr(arg[0]),
        _ptr(arg[1]), _ptr(dq), _ptr(dk), _ptr(dv), _ptr(ds),
    )  # fmt: skip
    if groups != hkv or chunks > 1:  # sum the partials of a kv head in a fixed order
        dk, dv = (t.view(b, hkv, -1, lk, t.shape[-1]).sum(2) for t in (dk, dv))
    else:
        dk, dv = dk.squeeze(2), dv.squeeze(2)
    return dq, dk, dv, None if ds is None else ds.sum((0, 2))
