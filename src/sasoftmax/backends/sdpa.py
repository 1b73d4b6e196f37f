"""PyTorch's ``scaled_dot_product_attention`` (SDPA) as a backend: plain softmax attention only.

It exists so that a model built on :mod:`sasoftmax.nn` (e.g. the harness GPT) can run with PyTorch's own
fused softmax kernels (FlashAttention-2, cuDNN, memory-efficient; SDPA picks one) as a baseline for
speed and memory, unchanged otherwise: ``GPTConfig(normalizer="softmax", backend="sdpa")``. It serves
softmax calls without SSMax, mask, bias or empty rows (causal with L > S), so its output is exactly
DESIGN §1's softmax attention; anything else gets a reason from ``unsupported``. ``backend="auto"``
never picks it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from .call import AttentionCall


def unsupported(call: AttentionCall) -> str | None:
    """Why SDPA cannot serve ``call`` (anything but plain softmax attention), or None if it can."""
    if call.normalizer != "softmax":
        return f"SDPA computes softmax attention only; got normalizer {call.normalizer!r}"
    if call.ssmax is not None:
        return "SSMax is not supported by SDPA"
    if call.mask is not None or call.bias is not None:
        return "masks and biases are not supported by the sdpa backend (use 'eager', 'cpu' or 'triton')"
    _, _, _, lq, lk, _ = call.shape
    if call.causal and lq > lk:
        return f"causal attention with more queries ({lq}) than keys ({lk}) leaves rows with no key"
    if lk == 0:
        return "no keys (S = 0)"
    return None


def attention(call: AttentionCall) -> Tensor:
    """Output (B, Hq, L, Dv) in the input dtype; differentiable in q, k, v."""
    _, hq, hkv, lq, lk, _ = call.shape
    k, v = call.k, call.v
    if hq != hkv:  # SDPA's enable_gqa is not served by every kernel; the repeat is what it does otherwise
        k, v = (t.repeat_interleave(call.groups, dim=1) for t in (k, v))
    # sasoftmax aligns causal masks lower-right (query i sees keys j <= i + S - L); SDPA's is_causal aligns
    # them upper-left. They agree when L == S, the fast is_causal path.
    causal = call.causal and lq == lk
    attn_mask = causal_lower_right(lq, lk) if call.causal and lq != lk else None
    return F.scaled_dot_product_attention(
        call.q, k, v, attn_mask=attn_mask, dropout_p=call.dropout_p, is_causal=causal, scale=call.scale
    )
