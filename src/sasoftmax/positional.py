"""Positional encodings of the harness (DESIGN §6), as the papers and their reference code define them.

Three kinds, by what they need from the attention:

- **rotary** (:class:`RoPE`): rotates queries and keys; called as ``rope(q, k) -> (q, k)`` on the
  head-split (B, H, L, D) tensors.
- **bias functions** (:class:`ALiBi`, :class:`Kerple`, :class:`FIRE`): functions of positions only,
  ``bias(q_pos, k_pos) -> (1, H, Lt, St)``, handed to :func:`sasoftmax.attention` as ``bias=`` so fused
  backends evaluate them per tile and never hold an (H, L, S) tensor (see
  :data:`sasoftmax.backends.BiasFunction`; q_pos are lower-right aligned, so i − j is the distance).
- **score-dependent** (:class:`DAPEKerple`, :class:`DAPEV2Kerple`): read the materialised scaled scores
  A (B, H, L, S) and return the full additive bias; the attention then computes A + bias. They need the
  whole score map, so they cost O(L·S) memory whatever backend serves the call.

The normalizer's SA factor and SSMax act on the final logits, positional bias included.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends.relative_bias import RelativeBias
from .checks import check_choice

POSITIONAL: tuple[str, ...] = ("nope", "rope", "alibi", "kerple", "fire", "dape_kerple", "dapev2_kerple")
"""Names accepted by :func:`make_positional` (and ``--pos``)."""

SCORE_DEPENDENT: tuple[str, ...] = ("dape_kerple", "dapev2_kerple")
"""Encodings that read the materialised score map (see :class:`ScoreBias`)."""


def check_positional(name: object) -> str:
    """Return ``name`` if it is one of :data:`POSITIONAL`, else raise ValueError/TypeError."""
    return check_choice("pos", name, POSITIONAL)


class RoPE(nn.Module):
    """Rotary position embedding, rotate-half form (GPT-NeoX/Llama), base 10000.

    ``forward(q, k)`` takes (B, H, L, D) queries and (B, Hkv, S, D) keys; queries sit at positions
    S − L .. S − 1 (lower-right, matching causal masking), keys at 0 .. S − 1.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim <= 0 or head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim > 0; got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # (T, D/2)
        cos = torch.cat((angles.cos(), angles.cos()), -1).to(x.dtype)
        sin = torch.cat((angles.sin(), angles.sin()), -1).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), -1) * sin

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        lq, lk = q.shape[-2], k.shape[-2]
        q_pos = torch.arange(lk - lq, lk, device=q.device)
        return self.rotate(q, q_pos), self.rotate(k, torch.arange(lk, device=k.device))


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's m_h: 2^(−8h/H) for h = 1..H when H is a power of two, else the interleaving of the
    next power of two's slopes (Press et al., reference implementation)."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


class ALiBi(nn.Module):
    """Bias function −m_h·|i − j| with ALiBi's fixed slopes m_h, or learnable ones (``learnable=True``,
    initialised to the same slopes).

    The distance is absolute, as in FlashAttention's ``alibi_slopes``; under causal masking (every key
    j <= i) it equals the signed i − j of the ALiBi paper (which earlier versions of this module used).
    :meth:`relative_bias` gives the same bias as a :class:`~sasoftmax.RelativeBias`, which fused kernels
    evaluate themselves; passing the module as ``bias=`` uses it.
    """

    def __init__(self, num_heads: int, learnable: bool = False) -> None:
        super().__init__()
        slopes = torch.tensor(alibi_slopes(num_heads))
        self.learnable = learnable
        if learnable:
            self.slopes = nn.Parameter(slopes)
        else:
            self.register_buffer("slopes", slopes, persistent=False)

    def relative_bias(self, q_len: int | None = None, k_len: int | None = None) -> RelativeBias:
        """This bias as a RelativeBias ("alibi", the slopes as r1), the same for calls of any lengths."""
        return RelativeBias.alibi(self.slopes)

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """(1, H, Lt, St): :meth:`relative_bias` evaluated, the formula the kernels evaluate (float32, or float64
        with float64 parameters)."""
        return self.relative_bias()(q_pos, k_pos)


KERPLE_KINDS: tuple[str, ...] = ("log", "power")


class Kerple(nn.Module):
    """Kerple (Chi et al., 2022) with r1 and r2 learnable per head, kept >= ``eps`` = 1e-2:

    - ``kind="log"`` (the SA-Softmax paper's): bias −r1_h·ln(1 + r2_h·|i − j|), r1 ~ U(0, 2), r2 ~ U(0, 1);
    - ``kind="power"``: bias −r1_h·|i − j|^r2_h, r1 ~ U(0, 1), r2 ~ U(0, 2) and r2 <= 2 (the reference
      code's a and p).

    The constraints are clamps where the parameters are used (the reference code clamps the stored values
    in place, which gives the same logits); :meth:`relative_bias` applies them too, so autograd carries
    them. Passing the module as ``bias=`` hands the backends that RelativeBias.
    """

    def __init__(self, num_heads: int, eps: float = 1e-2, kind: str = "log") -> None:
        super().__init__()
        self.kind = check_choice("kind", kind, KERPLE_KINDS)
        self.eps = eps
        if kind == "log":
            self.r1 = nn.Parameter(torch.rand(num_heads) * 2)
            self.r2 = nn.Parameter(torch.rand(num_heads))
        else:
            self.r1 = nn.Parameter(torch.rand(num_heads))
            self.r2 = nn.Parameter(torch.rand(num_heads) * 2)

    def constrained(self) -> tuple[Tensor, Tensor]:
        """r1 and r2 as used: clamped to >= eps (and r2 <= 2 for the power kind), (H,) each."""
        r2_max = 2.0 if self.kind == "power" else None
        return self.r1.clamp(min=self.eps), self.r2.clamp(min=self.eps, max=r2_max)

    def relative_bias(self, q_len: int | None = None, k_len: int | None = None) -> RelativeBias:
        """This bias as a RelativeBias ("kerple_log" or "kerple_power") of the clamped parameters, the same for
        calls of any lengths."""
        return RelativeBias(f"kerple_{self.kind}", *self.constrained())

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """(1, H, Lt, St): :meth:`relative_bias` evaluated, the formula the kernels evaluate (float32, or float64
        with float64 parameters)."""
        return self.relative_bias()(q_pos, k_pos)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class FIRE(nn.Module):
    """FIRE (Li et al., 2023): bias f_θ(ψ(i − j) / ψ(max(L, i))), ψ(x) = ln(c·|x| + 1).

    f_θ is an MLP 1 → ``width`` → H (ReLU); c (init 0.1) and the threshold L (init ``train_len``,
    learnt through a multiplier as in the reference code) are learnable.

    Where every query sits below the threshold (training at or under ``train_len``: positions up to ``train_len`` −
    1) the normaliser is ψ(L) for all of them and the bias depends on |i − j| alone: :meth:`relative_bias` then
    gives it as a :class:`~sasoftmax.RelativeBias` table (the MLP run once per distance), which fused kernels read
    and differentiate per tile; passing the module as ``bias=`` uses it. From the threshold on (extrapolation) the
    module is a bias function of (q_pos, k_pos). (A query exactly at L takes the per-pair form, whose max(L, i)
    passes half of its gradient to L, as the reference code's ``torch.max`` does.) A causal call whose first rows
    lie below the threshold and the rest at or past it (training at ``train_len`` once the learnt L has moved
    below it: one Adam step at N = 4096) runs as two calls, the table for the first rows
    (:meth:`relative_bias_rows`), the function for the others.
    """

    def __init__(self, num_heads: int, train_len: int, width: int = 32, c: float = 0.1, eps: float = 1e-6) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, num_heads))
        self.c = nn.Parameter(torch.tensor(float(c)))
        self.register_buffer("init_threshold", torch.tensor(float(train_len)))
        self.threshold_multiplier = nn.Parameter(torch.tensor(1.0))
        self.eps = eps
        self._threshold_read: tuple[tuple[int, ...], float] | None = None

    def threshold(self) -> Tensor:
        """L, the learnt threshold (a 0-d tensor)."""
        return (self.threshold_multiplier * self.init_threshold).abs()

    def threshold_value(self) -> float:
        """L as a Python float. Reading a CUDA tensor waits for the device, so the value is kept until the tensors
        it comes from change (their storage, or their in-place version counter: an optimiser step, a
        ``load_state_dict``): a training step reads it once per layer, not at every call that asks
        (:func:`read_thresholds` reads a model's layers' at once)."""
        key = self._threshold_key()
        if key is None:  # inference tensors have no version counter: read every time
            return self.threshold().item()
        if not self._threshold_kept(key):
            self._threshold_read = (key, self.threshold().item())
        return self._threshold_read[1]

    def _threshold_key(self) -> tuple[int, ...] | None:
        """What the kept value of L is valid for (storages and version counters of the tensors L comes from), or
        None for inference tensors."""
        try:
            tensors = (self.threshold_multiplier, self.init_threshold)
            return tuple(n for t in tensors for n in (t.data_ptr(), t._version))
        except RuntimeError:
            return None

    def _threshold_kept(self, key: tuple[int, ...]) -> bool:
        """Whether the value of L kept from the last read is valid for ``key`` (:meth:`_threshold_key`)."""
        return self._threshold_read is not None and self._threshold_read[0] == key

    def relative_bias(self, q_len: int, k_len: int) -> RelativeBias | None:
        """The bias of a call of ``q_len`` queries aligned lower-right to ``k_len`` keys (query positions
        k_len − q_len … k_len − 1) as a RelativeBias table over the distances 0 … max(q_len, k_len) − 1, or None
        where the last query does not lie below the threshold (:meth:`threshold_value`)."""
        if q_len < 1 or k_len < 1 or k_len - 1 >= self.threshold_value():
            return None
        return RelativeBias.table(self._table(max(q_len, k_len), self.threshold()))

    def relative_bias_rows(self, q_len: int, k_len: int) -> int:
        """How many of a call's first query rows lie below the threshold (positions k_len − q_len + i < L): a
        causal call takes :meth:`relative_bias` for them (``sasoftmax.attention`` splits it there)."""
        return max(0, min(q_len, math.ceil(self.threshold_value()) - (k_len - q_len)))

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """(1, H, Lt, St). Where every query sits below the threshold the MLP runs once per distance and the
        bias is gathered from that table (:meth:`relative_bias`'s), instead of running on every (i, j) pair
        (~``width`` hidden values each, forward and backward; 55× the attention's own time on an H200 at
        N = 4k). Costs one read of two numbers to the host per call."""
        threshold = self.threshold()
        distance = (q_pos[:, None] - k_pos[None, :]).abs()
        if len(q_pos) and len(k_pos) and not distance.is_floating_point():  # integer positions index a table
            below, longest = torch.stack([(q_pos < threshold).all().to(distance.dtype), distance.max()]).tolist()
            if below:
                return RelativeBias.table(self._table(int(longest) + 1, threshold))(q_pos, k_pos)
        return self._per_pair(q_pos, distance, threshold)

    def _normalised(self, distance: Tensor, normaliser: Tensor) -> Tensor:
        """ψ(d)/ψ(normaliser) for |i − j| in the MLP's dtype (broadcasting)."""
        return torch.log((self.c * distance).abs() + 1) / (torch.log((self.c * normaliser).abs() + 1) + self.eps)

    def _table(self, distances: int, threshold: Tensor) -> Tensor:
        """Queries below the threshold: the bias at distances 0 … ``distances`` − 1, (H, distances)."""
        grid = torch.arange(distances, device=threshold.device, dtype=self.mlp[0].weight.dtype)
        return self.mlp(self._normalised(grid, threshold).unsqueeze(-1)).T

    def _per_pair(self, q_pos: Tensor, distance: Tensor, threshold: Tensor) -> Tensor:
        """Any queries: the MLP on every (i, j) pair of |i − j| ``distance`` (Lt, St), each row normalised by
        ψ(max(L, i))."""
        dtype = self.mlp[0].weight.dtype  # float32 unless the module was converted (e.g. .double() for gradcheck)
        normaliser = torch.maximum(q_pos.to(dtype), threshold)[:, None]
        normalised = self._normalised(distance.to(dtype), normaliser)
        return self.mlp(normalised.unsqueeze(-1)).permute(2, 0, 1).unsqueeze(0)


def read_thresholds(modules: Iterable[FIRE]) -> None:
    """Read the thresholds L of several :class:`FIRE` modules (a model's layers') to the host in one transfer per
    device, for their :meth:`FIRE.threshold_value`: on a GPU each read waits for the device, and a training step
    of a model with a FIRE per layer waited once per layer (after every optimiser step L changes), holding the host
    back from queueing the next layers' work. Modules whose kept value is still valid, and calls under
    ``torch.compile`` (which cannot read device values while tracing), are left alone."""
    if torch.compiler.is_compiling():
        return
    stale: dict[torch.device, list[tuple[FIRE, tuple[int, ...]]]] = {}
    for module in modules:
        key = module._threshold_key()
        if key is not None and not module._threshold_kept(key):
            stale.setdefault(module.init_threshold.device, []).append((module, key))
    for found in stale.values():
        values = torch.stack([module.threshold().detach().double() for module, _ in found]).tolist()
        for (module, key), value in zip(found, values):
            module._threshold_read = (key, value)


class ScoreBias(nn.Module):
    """Base of the score-dependent encodings: ``forward(scores) -> bias``.

    ``scores`` are the scaled scores A = q·kᵀ/√D of shape (B, H, L, S) (queries lower-right aligned);
    the result is the full additive bias (B, H, L, S) such that the logits are A + bias. Future entries
    (j > i) of the result are arbitrary: the caller masks them causally.
    """

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.kerple = Kerple(num_heads)

    def kerple_bias(self, scores: Tensor) -> Tensor:
        lq, lk = scores.shape[-2:]
        return self.kerple(torch.arange(lk - lq, lk, device=scores.device), torch.arange(lk, device=scores.device))


class DAPEKerple(ScoreBias):
    """DAPE (Zheng et al., 2024) over Kerple: logits A + B + MLP([A; B]), B the Kerple bias.

    The MLP (2H → ``width`` → H, LeakyReLU) mixes heads at every (i, j) independently, so future
    scores cannot leak into allowed entries.
    """

    def __init__(self, num_heads: int, width: int = 32) -> None:
        super().__init__(num_heads)
        self.mlp = nn.Sequential(nn.Linear(2 * num_heads, width), nn.LeakyReLU(), nn.Linear(width, num_heads))

    def forward(self, scores: Tensor) -> Tensor:
        kerple = self.kerple_bias(scores).to(scores.dtype).expand_as(scores)
        mixed = self.mlp(torch.cat((scores, kerple), 1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return kerple + mixed


class DAPEV2Kerple(ScoreBias):
    """DAPEV2 (Zheng et al., 2024) over Kerple, the SA-Softmax paper's headline setting:
    logits A + B + Conv(tril([A; B])).

    Conv is Conv2d(2H → ``width``, (1, 3), padding (0, 1)) → LeakyReLU → Conv2d(``width`` → H, (1, 3),
    padding (0, 1)) along the key axis. Future entries are zeroed before the convolution: a 1×3 kernel
    would otherwise let key j + 1 reach entry (i, j).
    """

    def __init__(self, num_heads: int, width: int = 32) -> None:
        super().__init__(num_heads)
        self.conv1 = nn.Conv2d(2 * num_heads, width, (1, 3), padding=(0, 1))
        self.conv2 = nn.Conv2d(width, num_heads, (1, 3), padding=(0, 1))

    def forward(self, scores: Tensor) -> Tensor:
        lq, lk = scores.shape[-2:]
        kerple = self.kerple_bias(scores).to(scores.dtype).expand_as(scores)
        past = torch.ones(lq, lk, dtype=torch.bool, device=scores.device).tril(lk - lq)
        stacked = torch.cat((scores, kerple), 1).masked_fill(~past, 0.0)
        return kerple + self.conv2(F.leaky_relu(self.conv1(stacked)))


def make_positional(name: str, num_heads: int, head_dim: int, train_len: int, width: int = 32) -> nn.Module | None:
    """The module for positional encoding ``name`` (None for NoPE).

    ``train_len`` initialises FIRE's threshold; ``width`` is the hidden width of FIRE's MLP and of the
    DAPE networks.
    """
    check_positional(name)
    if name == "nope":
        return None
    if name == "rope":
        return RoPE(head_dim)
    if name == "alibi":
        return ALiBi(num_heads)
    if name == "kerple":
        return Kerple(num_heads)
    if name == "fire":
        return FIRE(num_heads, train_len, width)
    if name == "dape_kerple":
        return DAPEKerple(num_heads, width)
    return DAPEV2Kerple(num_heads, width)
