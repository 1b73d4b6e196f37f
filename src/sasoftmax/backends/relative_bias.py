"""Relative positional biases given by a few numbers per head, which fused kernels evaluate themselves.

A :class:`RelativeBias` is passed as ``bias=`` to :func:`sasoftmax.attention` (or produced by the
``relative_bias()`` method of the harness's ``ALiBi`` and ``Kerple`` modules). Fused backends compute it
per tile from the distance d = |i − j| between query position i (aligned lower-right: query i of L sits
at position i + S − L) and key position j, and differentiate it with respect to its per-head
parameters inside their backward, reducing over (B, L, S) per head; no (H, L, S) tensor is held.
Backends that do not know the form call it like any bias function (it is one), so every backend
computes the same logits.

| kind | bias_hij | parameters |
| --- | --- | --- |
| ``alibi`` | −r1_h · d | r1 = slopes m_h |
| ``kerple_log`` | −r1_h · ln(1 + r2_h · d) | r1, r2 |
| ``kerple_power`` | −r1_h · d^r2_h | r1, r2 |
| ``table`` | r1[h, min(d, n − 1)] | r1, an (Hq, n) table |

d uses the absolute distance, as FlashAttention's ``alibi_slopes`` do; under causal masking (every
key j ≤ i) it equals i − j. Parameters are float tensors of shape (Hq,), the table (Hq, n); they may require
grad (learnable ALiBi slopes, Kerple's r1 and r2, a table computed by a module such as FIRE's MLP, whose
gradient the backward reduces per head and distance). The forms do not clamp: Kerple's positivity constraint
(r ≥ 1e-2) is applied by the module that builds the spec, so autograd carries the clamp.

A ``table`` serves any bias of the distance alone: FIRE below its threshold (``positional.FIRE.relative_bias``),
or a learnt per-distance bias; distances past its last entry take that entry (as T5's last bucket does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

RELATIVE_BIAS_KINDS: tuple[str, ...] = ("alibi", "kerple_log", "kerple_power", "table")


@dataclass(frozen=True, eq=False)
class RelativeBias:
    """A bias f_h(|i − j|) of one of :data:`RELATIVE_BIAS_KINDS`; ``r1``/``r2`` are (Hq,) float tensors, or ``r1``
    an (Hq, n) table of the bias at distances 0 … n − 1 (kind ``table``).

    Calling it as ``bias(q_pos, k_pos)`` returns the (1, Hq, Lt, St) bias of those positions (the
    :data:`sasoftmax.backends.BiasFunction` contract), differentiable in ``r1`` and ``r2``.
    """

    kind: str
    r1: Tensor
    r2: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in RELATIVE_BIAS_KINDS:
            raise ValueError(f"RelativeBias kind must be one of {RELATIVE_BIAS_KINDS}; got {self.kind!r}")
        needs_r2 = self.kind not in ("alibi", "table")
        for name, t in (("r1", self.r1), ("r2", self.r2)):
            table = self.kind == "table" and name == "r1"
            what = "an (Hq, n) float tensor (n >= 1)" if table else "a (Hq,) float tensor"
            if t is None and (name == "r1" or needs_r2):
                raise TypeError(f"RelativeBias({self.kind!r}) needs {name}, {what}")
            if t is None:
                continue
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != (2 if table else 1):
                got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(f"RelativeBias {name} must be {what}; got {got}")
            if table and t.shape[1] == 0:
                raise ValueError(f"RelativeBias('table') needs at least one distance; got r1 of shape {tuple(t.shape)}")
        if not needs_r2 and self.r2 is not None:
            raise TypeError(f"RelativeBias({self.kind!r}) takes r1 only; got r2")
        if self.r2 is not None and (self.r2.shape != self.r1.shape or self.r2.device != self.r1.device):
            raise ValueError(
                f"RelativeBias r1 and r2 must have one shape and device; got {tuple(self.r1.shape)} on "
                f"{self.r1.device} and {tuple(self.r2.shape)} on {self.r2.device}"
            )

    @classmethod
    def alibi(cls, slopes: Tensor) -> RelativeBias:
        """ALiBi, −m_h·|i − j|, with ``slopes`` m (fixed, or a learnable parameter)."""
        return cls("alibi", slopes)

    @classmethod
    def kerple_log(cls, r1: Tensor, r2: Tensor) -> RelativeBias:
        """Kerple's logarithmic form, −r1_h·ln(1 + r2_h·|i − j|)."""
        return cls("kerple_log", r1, r2)

    @classmethod
    def kerple_power(cls, r1: Tensor, r2: Tensor) -> RelativeBias:
        """Kerple's power form, −r1_h·|i − j|^r2_h."""
        return cls("kerple_power", r1, r2)

    @classmethod
    def table(cls, values: Tensor) -> RelativeBias:
        """values[h, min(|i − j|, n − 1)] from an (Hq, n) tensor (learnable, or computed, e.g. by FIRE's MLP)."""
        return cls("table", values)

    @property
    def heads(self) -> int:
        return self.r1.shape[0]

    @property
    def parameters(self) -> tuple[Tensor, ...]:
        """(r1,) or (r1, r2): the tensors a backend returns gradients for."""
        return (self.r1,) if self.r2 is None else (self.r1, self.r2)

    def __call__(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """(1, Hq, Lt, St): the bias at query positions ``q_pos`` and key positions ``k_pos``, in float32
        (float64 when the parameters are float64, so that gradcheck can hold it)."""
        dtype = torch.promote_types(self.r1.dtype, torch.float32)
        distance = (q_pos[:, None] - k_pos[None, :]).abs()
        if self.kind == "table":
            last = self.r1.shape[1] - 1
            return self.r1.to(dtype)[:, distance.clamp_max(last).long()].unsqueeze(0)
        distance = distance.to(dtype)
        r1 = self.r1.to(dtype)[None, :, None, None]
        if self.kind == "alibi":
            return -r1 * distance
        r2 = self.r2.to(dtype)[None, :, None, None]
        if self.kind == "kerple_log":
            return -r1 * torch.log1p(r2 * distance)
        # d^r2 with 0^r2 = 0 for r2 > 0; written as exp(r2·ln d) so that its r2-gradient at d = 0 is 0, not NaN.
        log_d = torch.log(distance.clamp_min(1.0))
        powered = torch.where(distance > 0, torch.exp(r2 * log_d), torch.zeros_like(distance))
        return -r1 * powered


__all__ = ["RELATIVE_BIAS_KINDS", "RelativeBias"]
