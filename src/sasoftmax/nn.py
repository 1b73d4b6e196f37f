"""Modules for people who write their own models: a learnable SSMax scale and a multi-head attention
layer with a choice of normalizer."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .attention import attention
from .backends import BACKENDS, BiasFunction
from .backends.relative_bias import RelativeBias
from .checks import check_choice
from .normalizers import check_eps, check_normalizer

SSMAX_PAPER_INIT = 0.43
"""The s of the SSMax paper's worked example (arXiv 2501.19399)."""


class SSMaxScale(nn.Module):
    """The learnable per-head s of Scalable-Softmax: logits become s_h · ln(n) · z.

    Two initialisations are common: a constant (the paper's example uses s = 0.43, the default here),
    or ``SSMaxScale.for_length(heads, L)``, which sets s = 1 / ln(L) so that s·ln(n) = 1 at the training
    length L and the model starts out as plain softmax attention there.

    ``enabled`` (default True) switches SSMax off without removing s: a layer whose scale is disabled
    attends with plain softmax logits and s gets no gradient. A run that trains with softmax first and
    switches to SSMax later (:func:`set_ssmax_enabled`) keeps one set of parameters throughout.
    """

    def __init__(self, num_heads: int, init: float = SSMAX_PAPER_INIT) -> None:
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive int; got {num_heads!r}")
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not 0 < init < float("inf"):
            raise ValueError(f"init must be a finite float > 0; got {init!r}")
        self.s = nn.Parameter(torch.full((num_heads,), float(init)))
        self.enabled = True

    @classmethod
    def for_length(cls, num_heads: int, length: int) -> SSMaxScale:
        """s = 1/ln(length): SSMax equals softmax for rows that attend ``length`` keys."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 2:
            raise ValueError(f"length must be an int >= 2; got {length!r}")
        return cls(num_heads, 1.0 / math.log(length))

    def forward(self) -> Tensor:
        """s, shape (num_heads,)."""
        return self.s

    def extra_repr(self) -> str:
        return f"num_heads={self.s.numel()}, enabled={self.enabled}"


def set_ssmax_enabled(model: nn.Module, enabled: bool) -> int:
    """Switch every :class:`SSMaxScale` of ``model`` on or off; returns how many there are."""
    scales = [m for m in model.modules() if isinstance(m, SSMaxScale)]
    for scale in scales:
        scale.enabled = bool(enabled)
    return len(scales)


RotaryFn = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]


class MultiheadAttention(nn.Module):
    """Multi-head (or grouped-query) self/cross attention with a choice of normalizer.

    Args:
        embed_dim: model width E.
        num_heads: query heads H; head_dim = E // H.
        num_kv_heads: key/value heads (default H); H % num_kv_heads == 0.
        normalizer: "softmax", "sa" or "sa_norm".
        ssmax: None (off), or the initial s of a learnable per-head :class:`SSMaxScale`.
        dropout: dropout on the attention weights while training.
        bias: whether the projections have biases.
        backend: passed to :func:`sasoftmax.attention`.

    Input (B, L, E); output (B, L, E).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        normalizer: str = "sa_norm",
        ssmax: float | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        eps: float = 1e-6,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout must be a float in [0, 1); got {type(dropout).__name__}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool; got {type(bias).__name__}")
        check_eps(eps)
        check_choice("backend", backend, ("auto",) + BACKENDS)
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.normalizer = check_normalizer(normalizer)
        self.dropout, self.eps, self.backend = dropout, eps, backend
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.ssmax = None if ssmax is None else SSMaxScale(num_heads, ssmax)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        causal: bool = False,
        mask: Tensor | None = None,
        bias: Tensor | RelativeBias | BiasFunction | None = None,
        rotary: RotaryFn | None = None,
    ) -> Tensor:
        """Attend from ``x`` (B, L, E) to ``context`` (B, S, E; default ``x``).

        ``mask``/``bias`` as in :func:`sasoftmax.attention` (a RelativeBias, or a module with a
        ``relative_bias()`` method such as ``positional.Kerple``, runs inside the fused kernels);
        ``rotary(q, k) -> (q, k)`` is applied to the head-split (B, H, L, head_dim) queries and keys before
        attention (e.g. RoPE).
        """
        q, k, v = self.project(x, context)
        if rotary is not None:
            q, k = rotary(q, k)
        return self.attend(q, k, v, causal=causal, mask=mask, bias=bias)

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Head-split projections: q (B, H, L, head_dim) from ``x``; k, v (B, Hkv, S, head_dim) from
        ``context`` (default ``x``)."""
        context = x if context is None else context
        embed_dim = self.q_proj.in_features
        for name, t in (("x", x), ("context", context)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
            if t.dim() != 3 or t.shape[-1] != embed_dim:
                raise ValueError(f"{name} must have shape (batch, length, {embed_dim}); got {tuple(t.shape)}")
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"context must have x's batch size {x.shape[0]}; got {context.shape[0]}")
        b, lq, _ = x.shape
        lk = context.shape[1]
        q = self.q_proj(x).view(b, lq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(context).view(b, lk, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(b, lk, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        mask: Tensor | None = None,
        bias: Tensor | RelativeBias | BiasFunction | None = None,
    ) -> Tensor:
        """Attention with this layer's normalizer, SSMax and dropout, then the output projection: (B, L, E)."""
        out = attention(
            q, k, v,
            normalizer=self.normalizer,
            causal=causal,
            mask=mask,
            bias=bias,
            ssmax=None if self.ssmax is None or not self.ssmax.enabled else self.ssmax(),
            eps=self.eps,
            dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend,
        )
        b, _, lq, _ = q.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, -1))
