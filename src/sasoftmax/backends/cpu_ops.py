"""The fused C++ calls of the cpu backend as PyTorch custom operators (``torch.library``).

``sasoftmax::cpu_fused_forward`` and ``sasoftmax::cpu_fused_backward`` wrap :func:`cpu_native.fused_forward`
and :func:`cpu_native.fused_backward`; each has a fake (meta) implementation, and the forward has its autograd
formula registered, which calls the backward operator. So ``torch.compile`` (also with ``fullgraph=True``) and
``torch.export`` see one opaque operator per direction instead of tracing into ctypes. Eager calls take
:func:`fused_attention`'s twin of the two (``eager_twin``: the same functions and formula without the operators'
dispatch and autograd glue). The backward has no derivative of its own: a double backward raises.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..normalizers import compute_dtype
from . import cpu_native
from .eager_twin import eager_twin


def _as_4d(t: Tensor) -> Tensor:
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def _native_arguments(q, k, v, mask, bias, ssmax):
    """q, k, v contiguous in the compute dtype; mask and bias expanded to (B, Hq, L, S) (stride-0 views, nothing
    copied; bias in the compute dtype); ssmax contiguous in the compute dtype; and the library."""
    dtype = compute_dtype(q.dtype)
    lib = cpu_native.fused(dtype)
    if lib is None:  # sasoftmax's cpu backend only calls these operators when the library is there
        raise RuntimeError("sasoftmax's fused cpu kernels are unavailable here (see cpu_native.fused)")
    b, hq, lq, _ = q.shape
    full = (b, hq, lq, k.shape[2])
    mask = None if mask is None else _as_4d(mask).expand(full)
    bias = None if bias is None else _as_4d(bias.to(dtype)).expand(full)
    ssmax = None if ssmax is None else ssmax.to(dtype).contiguous()
    qc, kc, vc = (t.to(dtype).contiguous() for t in (q, k, v))
    return lib, qc, kc, vc, mask, bias, ssmax


def _fused_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    bias: Tensor | None,
    ssmax: Tensor | None,
    scale: float,
    eps: float,
    causal: bool,
    normalizer: str,
    rows: int,
    rel_kind: str,
    r1: Tensor | None,
    r2: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A whole attention forward on the fused path.

    q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) of one float dtype; ``mask`` (bool) and ``bias``
    (additive, no gradient) broadcastable to (B, Hq, L, S) with at most 4 dims, or None; ``ssmax`` (Hq,) or None;
    ``rows`` query rows per block; ``rel_kind`` a kind of ``RELATIVE_BIAS_KINDS`` (or "" for none) with its (Hq,)
    parameters ``r1``, ``r2`` (for ``table`` r1 (Hq, n) and r2 None), evaluated by the kernels. Returns out
    (B, Hq, L, Dv), stats (4, B, Hq, L) = (lse, m, c, lse_lo), both in the compute dtype, and arg (2, B, Hq, L)
    int64 = (argmin, argmax) of sa_norm's min/max terms (−1: none).
    """
    lib, qc, kc, vc, mask, bias, ssmax = _native_arguments(q, k, v, mask, bias, ssmax)
    relative = _relative(rel_kind, r1, r2, qc.dtype)
    return cpu_native.fused_forward(
        lib, qc, kc, vc, mask, bias, ssmax, scale, eps, causal, normalizer, rows, relative=relative
    )


fused_forward = torch.library.custom_op("sasoftmax::cpu_fused_forward", _fused_forward, mutates_args=(),
                                        device_types="cpu")  # fmt: skip


def _relative(kind: str, r1: Tensor | None, r2: Tensor | None, dtype: torch.dtype) -> cpu_native.Relative | None:
    """(kind, r1, r2) in the compute dtype as the native entries take it, or None for kind ""."""
    if not kind:
        return None
    r1, r2 = (None if t is None else t.detach().to(dtype).contiguous() for t in (r1, r2))
    return kind, r1, r2


@fused_forward.register_fake
def _fused_forward_fake(q, k, v, mask, bias, ssmax, scale, eps, causal, normalizer, rows, rel_kind, r1, r2):
    dtype = compute_dtype(q.dtype)
    b, hq, lq, _ = q.shape
    out = q.new_empty((b, hq, lq, v.shape[-1]), dtype=dtype)
    return out, q.new_empty((4, b, hq, lq), dtype=dtype), q.new_empty((2, b, hq, lq), dtype=torch.long)


def _fused_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    bias: Tensor | None,
    ssmax: Tensor | None,
    scale: float,
    eps: float,
    causal: bool,
    normalizer: str,
    rows: int,
    grad_out: Tensor,
    out: Tensor,
    stats: Tensor,
    arg: Tensor,
    want_ds: bool,
    rel_kind: str,
    r1: Tensor | None,
    r2: Tensor | None,
    want_dr: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward of :func:`fused_forward` (DESIGN §2) from its outputs ``out``, ``stats``, ``arg`` and dL/d
    ``out``. Returns dq, dk, dv in the dtypes of q, k, v, ds (Hq,) in ssmax's dtype (empty unless ``want_ds``)
    and dr (2, Hq) = the gradients of the relative bias's r1 and r2 in r1's dtype, for a ``table`` dr (1, Hq, n) =
    the table's gradient (empty unless ``want_dr``)."""
    lib, qc, kc, vc, mask, bias, ssmax_c = _native_arguments(q, k, v, mask, bias, ssmax)
    do = grad_out.to(out.dtype).contiguous()
    options = (mask, bias, ssmax_c, scale, eps, causal, normalizer, rows)
    relative = _relative(rel_kind, r1, r2, qc.dtype)
    dq, dk, dv, ds, dr = cpu_native.fused_backward(
        lib, qc, kc, vc, *options, do, stats, arg, want_ds, relative=relative, want_dr=want_dr
    )
    ds = ds.to(ssmax.dtype) if want_ds else q.new_empty((0,))
    dr = dr.to(r1.dtype) if want_dr and dr is not None else q.new_empty((0,))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds, dr


fused_backward = torch.library.custom_op("sasoftmax::cpu_fused_backward", _fused_backward, mutates_args=(),
                                         device_types="cpu")  # fmt: skip


@fused_backward.register_fake
def _fused_backward_fake(q, k, v, mask, bias, ssmax, scale, eps, causal, normalizer, rows, grad_out, out, stats,
                         arg, want_ds, rel_kind, r1, r2, want_dr):  # fmt: skip
    ds = ssmax.new_empty(ssmax.shape) if want_ds else q.new_empty((0,))
    dr = r1.new_empty((1, *r1.shape) if rel_kind == "table" else (2, r1.shape[0])) if want_dr else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), ds, dr


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, mask, bias, ssmax, scale, eps, causal, normalizer, rows, rel_kind, r1, r2 = inputs
    out, stats, arg = output
    ctx.save_for_backward(q, k, v, mask, bias, ssmax, out, stats, arg, r1, r2)
    # stats and arg are for the backward only: no gradient flows to them, and none is made of zeros for them.
    ctx.mark_non_differentiable(stats, arg)
    ctx.set_materialize_grads(False)
    ctx.options = (scale, eps, causal, normalizer, rows)
    ctx.rel_kind = rel_kind


def _gradients(ctx: Any, grad_out: Tensor | None, backward) -> tuple:
    """The gradients of the forward's 14 inputs, from ``backward`` (the operator, or ``_fused_backward`` itself)."""
    q, k, v, mask, bias, ssmax, out, stats, arg, r1, r2 = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    need = ctx.needs_input_grad
    want_ds, want_dr = bool(need[5]), bool(need[12] or need[13])
    dq, dk, dv, ds, dr = backward(
        q, k, v, mask, bias, ssmax, *ctx.options, grad_out, out, stats, arg, want_ds, ctx.rel_kind, r1, r2, want_dr
    )
    dr1 = dr[0] if want_dr and need[12] else None
    dr2 = dr[1] if want_dr and need[13] and r2 is not None else None
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None,
            ds if want_ds else None, None, None, None, None, None, None, dr1, dr2)  # fmt: skip


def _backward(ctx: Any, grad_out: Tensor | None, _grad_stats, _grad_arg) -> tuple:
    return _gradients(ctx, grad_out, torch.ops.sasoftmax.cpu_fused_backward)


fused_forward.register_autograd(_backward, setup_context=_setup_context)
_EagerFused = eager_twin("CpuFusedAttention", _fused_forward, _fused_backward, _setup_context, _gradients)


def fused_attention(*inputs) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`fused_forward`'s arguments and outputs, differentiable: the operator where the call is traced
    (torch.compile, torch.export), its eager twin otherwise, and where no gradient can flow (grad mode off or no
    input that requires grad: inference, a decoding step) the forward itself, without autograd's Function (~10 µs
    of a decoding step's ~60 on a development CPU)."""
    if torch.compiler.is_compiling():
        return fused_forward(*inputs)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs):
        return _EagerFused.apply(*inputs)
    return _fused_forward(*inputs)
