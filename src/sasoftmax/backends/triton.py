"""Triton backend: fused FlashAttention-style forward and backward for softmax, sa and sa_norm.

O(N) memory: no (L, S) tensor is ever materialised. The forward streams key blocks with the two
accumulators of DESIGN §3 and saves per-row statistics (logsumexp, clamped min m and max M, 1/(M − m + ε),
argmin, argmax, B/ℓ); the backward recomputes the weights tile by tile with the closed-form gradient of
DESIGN §2 and adds sa_norm's min/max terms (one per row each) in an O(N·D) torch step.

Serves CUDA tensors of dtype float16, bfloat16 or float32, head dims 16..256, any lengths (Lq != Lk,
causal aligned lower-right), bool masks and additive bias tensors that need no gradient (both read
tile by tile through stride-0 broadcasting, never expanded in memory), grouped-query attention and
SSMax (a rescaling of q, without bias). It does not serve bias functions, bias tensors that require
grad, SSMax with a bias, dropout or float64: ``unsupported`` names the reason, so ``backend="auto"``
falls back.
With ``TRITON_INTERPRET=1`` set before triton is first imported the same kernels run on CPU tensors
in Triton's interpreter (slow; used by the tests).

Importing this module raises ImportError when triton is not installed.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

try:
    import triton
except ImportError as err:  # reported by sasoftmax.backends.unavailable("triton")
    raise ImportError("triton is not installed (pip install 'sasoftmax[triton]')") from err

from ..normalizers import NORMALIZERS
from . import triton_kernels as kernels
from .call import AttentionCall, query_positions

# The kernels above were decorated with the interpreter iff TRITON_INTERPRET was on at import time.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 256)


def unsupported(call: AttentionCall) -> str | None:
    """Why the Triton kernels cannot serve ``call``, or None if they can."""
    q = call.q
    if not q.is_cuda and not INTERPRET:
        return (
            f"tensors are on {q.device}; the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before triton is first imported)"
        )
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16 or float32)"
    if call.bias is not None:
        fallback = "(use backend='eager' or 'cpu')"
        if not isinstance(call.bias, Tensor):
            return f"bias functions are not supported {fallback}"
        if call.bias.requires_grad and torch.is_grad_enabled():
            return f"a bias tensor that requires grad is not supported {fallback}"
        if call.ssmax is not None:
            return f"SSMax together with an additive bias is not supported {fallback}"
    if call.dropout_p > 0:
        return "dropout is not supported (use backend='eager')"
    lo, hi = HEAD_DIMS
    for name, dim in (("q/k", q.shape[-1]), ("v", call.v.shape[-1])):
        if not lo <= dim <= hi:
            return f"head dim of {name} is {dim}; the Triton kernels need {lo}..{hi}"
    if q.numel() == 0 or call.k.numel() == 0:
        return f"empty inputs are not supported (q {tuple(q.shape)}, k {tuple(call.k.shape)})"
    return None


def attention(call: AttentionCall) -> Tensor:
    """Output (B, Hq, L, Dv) in the input dtype; differentiable in q, k, v (and SSMax's s)."""
    q = call.q
    if call.ssmax is not None:
        # SSMax without bias is a per-row rescaling of q; autograd carries ds_h and dq through it. q stays
        # float32: the gradient wrt t·q may exceed float16's range where t = 0 (rows with one key).
        q = q.float() * ssmax_factor(call)
    b, hq, _, lq, lk, _ = call.shape
    # Stride-0 views of the full (B, Hq, L, S) shape: nothing is copied.
    mask = None if call.mask is None else call.mask.expand(b, hq, lq, lk).view(torch.uint8)
    bias = None if call.bias is None else call.bias.detach().expand(b, hq, lq, lk)
    return _FusedAttention.apply(q, call.k, call.v, mask, bias, call.normalizer, call.causal, call.scale, call.eps)


def ssmax_factor(call: AttentionCall) -> Tensor:
    """t_i = s_h · ln(n_i), float32, broadcastable to (B, Hq, L, 1); n_i = keys row i may attend (>= 1)."""
    log_n = torch.log(allowed_counts(call).clamp_min(1).float()).unsqueeze(-1)
    return call.ssmax.float().view(1, -1, 1, 1) * log_n


def allowed_counts(call: AttentionCall) -> Tensor:
    """n_i, the number of keys each row may attend (mask ∧ causal), broadcastable to (B, Hq, L).

    Needs no memory beyond the mask's own: a mask without a query axis is counted by a cumulative sum.
    """
    _, _, _, lq, lk, _ = call.shape
    device = call.q.device
    last = query_positions(lq, lk, device)  # causal: row i sees keys 0..last_i
    if call.mask is None:
        return (last + 1).clamp(0, lk) if call.causal else torch.full((lq,), lk, device=device)
    mask = call.mask.reshape((1,) * (4 - call.mask.dim()) + tuple(call.mask.shape))
    if not call.causal:
        return mask.sum(-1)
    if mask.shape[-2] == 1:
        # Zero-padded prefix sums: prefix[..., j + 1] = allowed keys among 0..j.
        prefix = torch.nn.functional.pad(mask[..., 0, :].cumsum(-1), (1, 0))
        return prefix[..., (last + 1).clamp(0, lk)]
    seen = torch.arange(lk, device=device)[None, :] <= last[:, None]
    return (mask & seen).sum(-1)


def _launch_config(d: int, dv: int) -> dict[str, int]:
    """Tile sizes. Small tiles in the interpreter (many partial blocks, fast enough); on a GPU smaller
    key tiles for large head dims to stay within registers and shared memory (not tuned on hardware)."""
    if INTERPRET:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    widest = max(d, dv)
    if widest <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    if widest <= 128:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def _pad(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask: Tensor | None, bias: Tensor | None, normalizer, causal, scale, eps):
        b, hq, lq, d = q.shape
        lk, dv = k.shape[2], v.shape[3]
        norm = NORMALIZERS.index(normalizer)
        rows = torch.empty(b * hq, lq, device=q.device, dtype=torch.float32)
        lse = torch.empty_like(rows)
        if normalizer == "sa_norm":
            low, high, inv_delta = torch.empty_like(rows), torch.empty_like(rows), torch.empty_like(rows)
            argmin, argmax = torch.empty_like(rows, dtype=torch.int32), torch.empty_like(rows, dtype=torch.int32)
            bn = torch.empty(b * hq, lq, dv, device=q.device, dtype=torch.float32)
        else:  # not written by the kernel
            low = high = inv_delta = bn = rows
            argmin = argmax = torch.empty(0, device=q.device, dtype=torch.int32)
        o = torch.empty(b, hq, lq, dv, device=q.device, dtype=v.dtype)
        cfg = _launch_config(d, dv)
        grid = (triton.cdiv(lq, cfg["BLOCK_M"]), b * hq)
        kernels.fwd[grid](
            q, k, v, o, lse, low, high, inv_delta, argmin, argmax, bn,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            *_broadcast_args(mask, q), *_broadcast_args(bias, q),
            hq, hq // k.shape[1], lq, lk, d, dv, scale, eps,
            NORM=norm, CAUSAL=causal, HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
            PRECISION=_precision(k),
            D_PAD=_pad(d), DV_PAD=_pad(dv), **cfg,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse, low, high, inv_delta, argmin, argmax, bn)
        ctx.mask, ctx.bias = mask, bias  # views of the caller's tensors, needing no gradient
        ctx.normalizer, ctx.causal, ctx.scale = normalizer, causal, scale
        return o

    @staticmethod
    @once_differentiable  # the kernels are opaque to autograd: double backward raises instead of lying
    def backward(ctx, grad_out: Tensor):
        q, k, v, o, lse, low, high, inv_delta, argmin, argmax, bn = ctx.saved_tensors
        b, hq, lq, d = q.shape
        hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
        norm = NORMALIZERS.index(ctx.normalizer)
        do = grad_out.to(v.dtype).contiguous()
        cfg = _launch_config(d, dv)
        consts = {"NORM": norm, "D_PAD": _pad(d), "DV_PAD": _pad(dv), **cfg}
        delta, extra = torch.empty_like(lse), torch.empty_like(lse)
        kernels.bwd_preprocess[(triton.cdiv(lq, cfg["BLOCK_M"]), b * hq)](
            o, do, bn, delta, extra, lq, dv,
            NORM=norm, BLOCK_M=cfg["BLOCK_M"], DV_PAD=_pad(dv),
        )  # fmt: skip
        dq = torch.empty(b, hq, lq, d, device=q.device, dtype=torch.float32)
        dk = torch.empty(b, hkv, lk, d, device=q.device, dtype=torch.float32)
        dv_ = torch.empty(b, hkv, lk, dv, device=q.device, dtype=torch.float32)
        shared = (*_strides(q), *_strides(k), *_strides(v))
        shared += (*_broadcast_args(ctx.mask, q), *_broadcast_args(ctx.bias, q))
        shared += (hq, hq // hkv, lq, lk, d, dv, ctx.scale)
        flags = {"CAUSAL": ctx.causal, "HAS_MASK": ctx.mask is not None, "HAS_BIAS": ctx.bias is not None}
        flags.update(PRECISION=_precision(k), **consts)
        flags["DX_FP32"] = ctx.normalizer == "sa_norm" and k.dtype == torch.float16
        kernels.bwd_dkdv[(triton.cdiv(lk, cfg["BLOCK_N"]), b * hkv)](
            q, k, v, do, dk, dv_, lse, low, inv_delta, delta, *shared, **flags
        )
        kernels.bwd_dq[(triton.cdiv(lq, cfg["BLOCK_M"]), b * hq)](
            q, k, v, do, dq, lse, low, inv_delta, delta, *shared, **flags
        )
        if ctx.normalizer == "sa_norm":
            _add_min_max_terms(q, k, dq, dk, delta, extra, low, high, inv_delta, argmin, argmax, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv_.to(v.dtype), None, None, None, None, None, None


def _broadcast_args(t: Tensor | None, placeholder: Tensor) -> tuple:
    """Pointer and (B, Hq, L, S) strides of a mask or bias view; any tensor and zero strides for None."""
    if t is None:
        return (placeholder, 0, 0, 0, 0)
    return (t, *t.stride())


def _precision(k: Tensor) -> str | None:
    # float32 inputs get exact float32 products (no TF32), as the eager reference computes them;
    # None keeps the platform default (TF32 for the float32 dx products of 16-bit inputs).
    return "ieee" if k.dtype == torch.float32 else None


def _add_min_max_terms(q, k, dq, dk, delta, extra, low, high, inv_delta, argmin, argmax, scale: float) -> None:
    """Add sa_norm's gradient through M_i and m_i (DESIGN §2) to dq and dk, in place.

    dL/dx gets g_M = −D_i c_i at (i, argmax_i) if M_i > 0 and g_m = (D_i − E_i) c_i at (i, argmin_i) if
    m_i < 0; x_ij = scale · q_i·k_j turns each into a dq_i and a dk_j term. Query heads of one kv group are
    laid out side by side (B, Hkv, G·L) so k is gathered and dk scattered without copying k per head.
    """
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    rows = (b, hkv, hq // hkv * lq)
    q_rows = q.float().reshape(*rows, d)
    k32 = k.float()
    dq_rows = dq.view(*rows, d)
    g_high = torch.where(high > 0, -delta * inv_delta, 0.0)
    g_low = torch.where(low < 0, (delta - extra) * inv_delta, 0.0)
    for g, index in ((g_high, argmax), (g_low, argmin)):
        g = (scale * g).view(*rows, 1)
        index = index.long().view(*rows, 1).expand(*rows, d)
        dq_rows += g * torch.gather(k32, 2, index)
        dk.scatter_add_(2, index, g * q_rows)


__all__ = ["INTERPRET", "attention", "ssmax_factor", "unsupported"]
