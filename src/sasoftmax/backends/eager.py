"""Materialised reference backend: builds the (B, Hq, L, S) logits and applies DESIGN §1 literally.

O(L·S) memory. It serves every request (dropout, any mask, bias tensors and bias functions) and is
the backend every other one is tested against.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from ..normalizers import compute_dtype, masked_weights
from .call import AttentionCall, evaluate_bias_function, query_positions


def unsupported(call: AttentionCall) -> str | None:
    """The eager backend serves every valid call."""
    return None


def logits_and_allowed(call: AttentionCall) -> tuple[Tensor, Tensor]:
    """Final logits x (SSMax applied, masked entries 0) and the allowed-key mask, both (B, Hq, L, S).

    Math runs in the compute dtype (float32, or float64 for float64 inputs).
    """
    b, hq, hkv, lq, lk, d = call.shape
    dtype = compute_dtype(call.q.dtype)
    device = call.q.device
    q = call.q.to(dtype).reshape(b, hkv, call.groups, lq, d)
    k = call.k.to(dtype).unsqueeze(2)
    # Broadcasting over the group axis serves grouped-query attention without copying k per query head.
    z = (torch.matmul(q, k.transpose(-1, -2)) * call.scale).reshape(b, hq, lq, lk)
    allowed = torch.ones((1, 1, lq, lk), dtype=torch.bool, device=device)
    if call.causal:
        q_pos = query_positions(lq, lk, device)
        allowed = allowed & (torch.arange(lk, device=device)[None, :] <= q_pos[:, None])
    if call.mask is not None:
        allowed = allowed & call.mask
    if call.bias is not None:
        bias = call.bias
        if callable(bias) and not isinstance(bias, Tensor):
            bias = evaluate_bias_function(bias, query_positions(lq, lk, device), torch.arange(lk, device=device), b, hq)
        bias = bias.to(dtype)
        allowed = allowed & ~torch.isneginf(bias)
        z = z + torch.where(torch.isneginf(bias), torch.zeros((), dtype=dtype, device=device), bias)
    allowed = allowed.expand(b, hq, lq, lk)
    if call.ssmax is not None:
        n = allowed.sum(-1, keepdim=True).clamp_min(1).to(dtype)
        z = z * (call.ssmax.to(dtype).view(1, hq, 1, 1) * torch.log(n))
    return z, allowed


_recorders: list[list[dict[str, Tensor]]] = []


@contextmanager
def record() -> Iterator[list[dict[str, Tensor]]]:
    """Record what every eager call inside the block computes, for analysis (gradient flow, fade).

    Yields a list that gets one dict per call: ``logits`` (x, (B, Hq, L, S), masked entries 0; when
    grad is enabled it retains its gradient, so ``logits.grad`` is dL/dx after backward), ``weights``
    (w before dropout) and ``allowed`` (bool). Holds every tensor until the block ends: for analysis
    on small inputs, not for training.
    """
    calls: list[dict[str, Tensor]] = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


def attention_weights(call: AttentionCall) -> Tensor:
    """The weights w of DESIGN §1, shape (B, Hq, L, S), in the compute dtype (before dropout)."""
    x, allowed = logits_and_allowed(call)
    w = masked_weights(x, allowed, call.normalizer, call.eps)
    if _recorders:
        if x.requires_grad:
            x.retain_grad()
        for calls in _recorders:
            calls.append({"logits": x, "weights": w, "allowed": allowed})
    return w


def attention(call: AttentionCall) -> Tensor:
    """Output (B, Hq, L, Dv) in the input dtype."""
    b, hq, hkv, lq, lk, _ = call.shape
    dtype = compute_dtype(call.q.dtype)
    dv = call.v.shape[-1]
    if lk == 0:
        # No key at all: every row is fully masked. Keep the graph so q, k, v get (zero) gradients.
        zero = (call.q.sum() + call.k.sum() + call.v.sum()) * 0
        return (call.q.new_zeros(b, hq, lq, dv) + zero).to(call.q.dtype)
    w = attention_weights(call)
    if call.dropout_p > 0:
        w = F.dropout(w, call.dropout_p)
    v = call.v.to(dtype).unsqueeze(2)
    out = torch.matmul(w.reshape(b, hkv, call.groups, lq, lk), v)
    return out.reshape(b, hq, lq, dv).to(call.q.dtype)
