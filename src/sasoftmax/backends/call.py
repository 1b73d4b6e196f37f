"""The validated arguments of one attention call, as every backend receives them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

BiasFunction = Callable[[Tensor, Tensor], Tensor]
"""``bias(q_pos, k_pos) -> Tensor`` broadcastable to (B, Hq, len(q_pos), len(k_pos)).

``q_pos`` (int64, shape (Lt,)) and ``k_pos`` (int64, shape (St,)) are positions in the key sequence:
query i of L sits at position i + S − L (aligned lower-right, like causal masking), key j at j, so
``q_pos[:, None] - k_pos[None, :]`` is the relative distance. Fused backends call it once per tile, so
no (H, L, S) tensor is ever held. If the callable is an ``nn.Module``, gradients reach its parameters on
every backend; −inf entries count as masked.
"""


@dataclass(frozen=True)
class AttentionCall:
    """Arguments of :func:`sasoftmax.attention` after validation.

    Shapes: q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), Hq % Hkv == 0. ``mask`` is bool and
    ``bias`` a float tensor, both broadcastable to (B, Hq, L, S) and not expanded, or ``bias`` is a
    :data:`BiasFunction`. ``ssmax`` is None or a floating tensor of shape (Hq,) holding s_h.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    normalizer: str
    causal: bool
    mask: Tensor | None
    bias: Union[Tensor, BiasFunction, None]
    scale: float
    ssmax: Tensor | None
    eps: float
    dropout_p: float

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        """(B, Hq, Hkv, L, S, D)."""
        b, hq, lq, d = self.q.shape
        return b, hq, self.k.shape[1], lq, self.k.shape[2], d

    @property
    def groups(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.q.shape[1] // self.k.shape[1]


def broadcasts_to(shape: torch.Size | tuple[int, ...], full: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` (at most 4-D) broadcasts to exactly ``full`` = (B, Hq, L, S): each of its
    trailing sizes 1 or the same. (``torch.broadcast_shapes`` says the same at ~18 µs of the host's time a call.)"""
    return len(shape) <= 4 and all(n == 1 or n == f for n, f in zip(reversed(shape), reversed(full)))


def evaluate_bias_function(fn: BiasFunction, q_pos: Tensor, k_pos: Tensor, batch: int, heads: int) -> Tensor:
    """``fn(q_pos, k_pos)``, checked to be a floating tensor broadcastable to (B, Hq, Lt, St)."""
    out = fn(q_pos, k_pos)
    if not isinstance(out, Tensor) or not out.is_floating_point():
        raise TypeError(f"bias function must return a floating tensor; got {type(out).__name__}")
    if out.device != q_pos.device:
        raise ValueError(f"bias function must return a tensor on q's device {q_pos.device}; got {out.device}")
    full = (batch, heads, len(q_pos), len(k_pos))
    if not broadcasts_to(out.shape, full):
        raise ValueError(
            f"bias function must return a tensor broadcastable to (B, Hq, Lt, St) = {full} for "
            f"{len(q_pos)} query and {len(k_pos)} key positions; got {tuple(out.shape)}"
        )
    return out


def query_positions(lq: int, lk: int, device: torch.device) -> Tensor:
    """Positions of L queries among S keys, aligned lower-right: i + S − L."""
    return torch.arange(lk - lq, lk, device=device)
