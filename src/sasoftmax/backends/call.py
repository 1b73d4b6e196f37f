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


def query_positions(lq: int, lk: int, device: torch.device) -> Tensor:
    """Positions of L queries among S keys, aligned lower-right: i + S − L."""
    return torch.arange(lk - lq, lk, device=device)
