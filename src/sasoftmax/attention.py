"""``sasoftmax.attention``: argument checking, SSMax, and dispatch to a backend."""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

from . import backends
from .backends import BACKENDS, AttentionCall, BiasFunction
from .backends.call import broadcasts_to
from .backends.relative_bias import RelativeBias
from .checks import check_choice
from .normalizers import check_eps, check_normalizer, compute_dtype

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Input dtypes of q, k and v (the math runs in float32, float64 for float64)."""


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    normalizer: str = "sa_norm",
    causal: bool = False,
    mask: Tensor | None = None,
    bias: Union[Tensor, BiasFunction, None] = None,
    scale: float | None = None,
    ssmax: Union[float, Tensor, None] = None,
    eps: float = 1e-6,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Attention with a choice of normalizer, in the layout of ``scaled_dot_product_attention``.

    Args:
        q: (B, Hq, L, D) queries.
        k: (B, Hkv, S, D) keys; Hq % Hkv == 0 is grouped-query attention (query head h reads kv head
            h // (Hq / Hkv)).
        v: (B, Hkv, S, Dv) values.
        normalizer: "softmax", "sa" (x·softmax(x)) or "sa_norm" (min-max normalised SA-Softmax).
        causal: query i may attend keys j <= i + S − L (aligned lower-right, as in FlashAttention).
        mask: bool, broadcastable to (B, Hq, L, S), True = attend.
        bias: additive float tensor broadcastable to (B, Hq, L, S) (−inf = masked), a
            :class:`sasoftmax.RelativeBias` (ALiBi, Kerple: evaluated and differentiated inside fused
            kernels; a ``table`` of the bias per distance), an object with a ``relative_bias(q_len, k_len)``
            method returning one (``positional.ALiBi``, ``Kerple``, ``FIRE``: called once per call, so gradients
            reach the module's parameters; None makes the object a bias function for that call; one that also
            has ``relative_bias_rows(q_len, k_len)``, FIRE, has a causal call split where its first rows take the
            RelativeBias and the rest the function), or a bias function ``bias(q_pos, k_pos)`` evaluated per
            tile (see :data:`sasoftmax.backends.BiasFunction`).
        scale: logit scale, default 1/√D.
        ssmax: Scalable-Softmax s: None (off), a float > 0 for every head, or a (Hq,) tensor (learnable).
            Logits become x = s_h · ln(n_i) · z with n_i the number of keys row i may attend.
        eps: ε > 0 in sa_norm's denominator M − m + ε.
        dropout_p: dropout probability on the weights (applied whenever > 0, like SDPA).
        backend: "auto", "eager", "cpu", "triton" or "sdpa" (PyTorch's SDPA; plain softmax calls only).

    Returns:
        (B, Hq, L, Dv) in q's dtype. Math runs in float32 (float64 for float64 inputs). Rows with no
        allowed key are zero and pass zero gradients.
    """
    call = make_call(q, k, v, normalizer, causal, mask, bias, scale, ssmax, eps, dropout_p)
    rows = _relative_bias_rows(call)
    if rows:
        return _split_rows(call, rows, backend)
    return backends.load(choose_backend(call, backend)).attention(call)


def _relative_bias_rows(call: AttentionCall) -> int:
    """For a causal call whose bias is a function that is a RelativeBias for its first rows only (``FIRE`` trained
    at its length once its learnt threshold moved below it), how many rows those are; 0 where the call is not
    split (the first rows would see no key, or there are no such rows)."""
    rows_of = getattr(call.bias, "relative_bias_rows", None)
    if not call.causal or rows_of is None:
        return 0
    lq, lk = call.q.shape[2], call.k.shape[2]
    rows = rows_of(lq, lk)
    if isinstance(rows, bool) or not isinstance(rows, int):
        raise TypeError(f"bias.relative_bias_rows(q_len, k_len) must return an int; got {type(rows).__name__}")
    return rows if 0 < rows < lq and lk - lq + rows > 0 else 0


def _split_rows(call: AttentionCall, rows: int, backend: str) -> Tensor:
    """``call`` as two calls along its query rows: rows 0 … ``rows`` − 1 with the keys they can see (causal), whose
    bias is a RelativeBias there, and the others with the bias function. Rows are independent in attention, so
    the outputs are the call's; the first part's positions stay those of the whole call (lower-right aligned over
    fewer keys)."""
    q, k, v, mask = call.q, call.k, call.v, call.mask
    keys = k.shape[2] - q.shape[2] + rows
    head, tail = slice(None, rows), slice(rows, None)
    common = dict(normalizer=call.normalizer, causal=True, bias=call.bias, scale=call.scale, ssmax=call.ssmax,
                  eps=call.eps, dropout_p=call.dropout_p, backend=backend)  # fmt: skip
    first = attention(q[:, :, head], k[:, :, :keys], v[:, :, :keys], mask=_mask_part(mask, head, keys), **common)
    rest = attention(q[:, :, tail], k, v, mask=_mask_part(mask, tail, None), **common)
    return torch.cat([first, rest], dim=2)


def _mask_part(mask: Tensor | None, rows: slice, keys: int | None) -> Tensor | None:
    """The part of a mask broadcastable to (B, Hq, L, S) for ``rows`` and the first ``keys`` keys (all: None),
    slicing only its axes that do not broadcast."""
    if mask is None:
        return None
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return mask[:, :, rows if mask.shape[2] > 1 else slice(None), slice(keys) if mask.shape[3] > 1 else slice(None)]


def choose_backend(call: AttentionCall, backend: str) -> str:
    """The backend that serves ``call``: ``backend`` itself, checked, or the fastest one for "auto"."""
    check_choice("backend", backend, ("auto",) + BACKENDS)
    if backend == "auto":
        preference = ("triton", "eager") if call.q.is_cuda else ("cpu", "eager")
        for name in preference:
            if backends.unavailable(name) is None and backends.load(name).unsupported(call) is None:
                return name
        raise AssertionError("the eager backend serves every call")  # pragma: no cover
    reason = backends.unavailable(backend) or backends.load(backend).unsupported(call)
    if reason:
        raise ValueError(f"backend={backend!r} cannot serve this call: {reason}")
    return backend


def make_call(q, k, v, normalizer, causal, mask, bias, scale, ssmax, eps, dropout_p) -> AttentionCall:
    """Validate the arguments of :func:`attention` and bundle them; raises ValueError/TypeError."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be a floating tensor of float16, bfloat16, float32 or float64; got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, length, head_dim); got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device; got q {q.device}, k {k.device}, v {v.device}")
    b, hq, lq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch size of k and v must equal q's {b}; got k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[-1] != d:
        raise ValueError(f"head_dim of k must equal q's {d}; got {k.shape[-1]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads; got k {k.shape[1]}, v {v.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length; got k {k.shape[2]}, v {v.shape[2]}")
    hkv, lk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv}) (grouped-query attention)")
    check_normalizer(normalizer)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool; got {type(causal).__name__}")
    full = (b, hq, lq, lk)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor (True = attend); got {got}. Pass additive masks as bias=")
        check_broadcast("mask", mask, full, q.device)
    if bias is not None and not isinstance(bias, (Tensor, RelativeBias)) and hasattr(bias, "relative_bias"):
        # A module that knows its RelativeBias (positional.ALiBi, Kerple, FIRE): the form fused kernels evaluate.
        spec = bias.relative_bias(lq, lk)
        if spec is not None and not isinstance(spec, RelativeBias):
            got = type(spec).__name__
            raise TypeError(f"bias.relative_bias(q_len, k_len) must return a sasoftmax.RelativeBias or None; got {got}")
        bias = bias if spec is None else spec
    if bias is not None:
        if isinstance(bias, Tensor):
            if not bias.is_floating_point():
                raise TypeError(f"bias must be a floating tensor (additive; use mask= for bool); got {bias.dtype}")
            check_broadcast("bias", bias, full, q.device)
        elif isinstance(bias, RelativeBias):
            if bias.heads != hq:
                raise ValueError(f"bias (RelativeBias) must have one value per query head ({hq}); got {bias.heads}")
            if bias.r1.device != q.device:
                raise ValueError(f"bias (RelativeBias) must be on q's device {q.device}; got {bias.r1.device}")
        elif not callable(bias):
            raise TypeError(f"bias must be a float tensor or a function (q_pos, k_pos); got {type(bias).__name__}")
    dtype = compute_dtype(q.dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float > 0 or None; got {type(scale).__name__}")
    else:
        # Outside the normal range of the compute dtype, scale (or 1/scale, which fused kernels use) is inf or 0.
        finfo = torch.finfo(dtype)
        if not finfo.tiny <= scale <= finfo.max:
            raise ValueError(
                f"scale must be a finite float > 0 within [{finfo.tiny:.3g}, {finfo.max:.3g}] ({dtype}); got {scale}"
            )
    ssmax = ssmax_tensor(ssmax, hq, q.device, dtype)
    eps = check_eps(eps, dtype)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1); got {type(dropout_p).__name__}")
    if not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
    return AttentionCall(q, k, v, normalizer, causal, mask, bias, float(scale), ssmax, eps, float(dropout_p))


def check_broadcast(name: str, t: Tensor, full: tuple[int, ...], device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}; got {t.device}")
    if not broadcasts_to(t.shape, full):
        raise ValueError(f"{name} of shape {tuple(t.shape)} is not broadcastable to (B, Hq, L, S) = {full}")


def ssmax_tensor(
    ssmax: Union[float, Tensor, None], heads: int, device: torch.device, dtype: torch.dtype
) -> Tensor | None:
    """SSMax's s as a (heads,) tensor (a float becomes one of the compute ``dtype``), or None.

    Values must be finite and > 0. Those of a tensor are checked on CPU outside ``torch.compile`` only: the
    check reads the values, which for a CUDA tensor would wait for the GPU at every call (and a compiled graph
    cannot branch on them). There a NaN s gives NaN outputs.
    """
    if ssmax is None:
        return None
    if isinstance(ssmax, Tensor):
        if not ssmax.is_floating_point():
            raise TypeError(f"ssmax tensor must be floating; got {ssmax.dtype}")
        if ssmax.shape != (heads,):
            raise ValueError(f"ssmax tensor must have shape (Hq,) = ({heads},); got {tuple(ssmax.shape)}")
        if ssmax.device != device:
            raise ValueError(f"ssmax must be on q's device {device}; got {ssmax.device}")
        if ssmax.device.type == "cpu" and not torch.compiler.is_compiling():
            values = ssmax.detach()
            if not bool(((values > 0) & torch.isfinite(values)).all()):
                raise ValueError(f"ssmax tensor values must be finite and > 0; got {values.tolist()}")
        return ssmax
    if isinstance(ssmax, bool) or not isinstance(ssmax, (int, float)):
        raise TypeError(f"ssmax must be None, a float > 0 or a (Hq,) tensor; got {type(ssmax).__name__}")
    if not (0 < ssmax < float("inf")):
        raise ValueError(f"ssmax must be a finite float > 0; got {ssmax}")
    return torch.full((heads,), float(ssmax), device=device, dtype=dtype)
