"""Naive twins of the Triton kernels (``sasoftmax.backends.triton_kernels``), in the style of
flash-linear-attention's ``naive.py``: each function states one kernel's contract in plain PyTorch, with the
(B, Hq, L, S) scores materialised, written from the kernels' docstrings and DESIGN §1–§3, not from their code.

Conventions (the kernels' module docstring): q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv); query head h
reads kv head h // (Hq / Hkv). Query row i sits at key position i + pos0 (pos0 = S − L for a whole call) and may
attend key j when j <= i + pos0 (causal), the mask allows it and the bias is not −inf. Logits z = scale·q·kᵀ +
bias, x = t_i·z with SSMax (x = z without). Bias kinds: 0 none, 1 a tensor, 2 ALiBi −r1_h·d, 3 Kerple log
−r1_h·ln(1 + r2_h·d), 4 Kerple power −r1_h·d^r2_h (0 at d = 0), 5 a table r1[h, min(d, n − 1)] of an (Hq, n)
r1, with d = |i + pos0 − j|; a −inf entry of a bias tensor or a table masks its pairs. NORM: 0 softmax, 1 sa,
2 sa_norm. Per-row results are (B, Hq, L) here (the kernels store them as (B·Hq, L)).

The twins compute in the dtype of their inputs: pass float64 tensors for a reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

NONE, TENSOR, ALIBI, KERPLE_LOG, KERPLE_POWER, TABLE = range(6)
BIAS_KINDS = {"none": NONE, "tensor": TENSOR, "alibi": ALIBI, "kerple_log": KERPLE_LOG, "kerple_power": KERPLE_POWER,
              "table": TABLE}  # fmt: skip


@dataclass(frozen=True)
class Problem:
    """One kernel call's inputs. ``mask``: bool (B, Hq, L, S) or None; ``bias``: (B, Hq, L, S) for kind 1;
    ``r1``/``r2``: (Hq,) for kinds 2–4, ``r1`` (Hq, n) for kind 5; ``t``: SSMax's factor (B, Hq, L) or None."""

    q: Tensor
    k: Tensor
    v: Tensor
    t: Tensor | None
    mask: Tensor | None
    bias: Tensor | None
    kind: int
    r1: Tensor | None
    r2: Tensor | None
    norm: int
    causal: bool
    scale: float
    eps: float
    pos0: int


@dataclass(frozen=True)
class Logits:
    """z and x (B, Hq, L, S), z = x = 0 at pairs that are not allowed; ``allowed`` bool (B, Hq, L, S)."""

    z: Tensor
    x: Tensor
    allowed: Tensor


def _per_query_head(kv: Tensor, hq: int) -> Tensor:
    """k or v (B, Hkv, S, ·) repeated to (B, Hq, S, ·): query head h reads kv head h // groups."""
    return kv.repeat_interleave(hq // kv.shape[1], dim=1)


def _sum_over_groups(grad: Tensor, hkv: int) -> Tensor:
    """A per-query-head gradient (B, Hq, S, ·) summed into its kv head (B, Hkv, S, ·)."""
    b, hq, s, d = grad.shape
    return grad.view(b, hkv, hq // hkv, s, d).sum(2)


def distances(lq: int, lk: int, pos0: int, like: Tensor) -> Tensor:
    """d_ij = |i + pos0 − j|, (L, S) in ``like``'s dtype."""
    rows = torch.arange(lq, device=like.device)[:, None] + pos0
    return (rows - torch.arange(lk, device=like.device)[None, :]).abs().to(like.dtype)


def table_index(p: Problem) -> Tensor:
    """min(d_ij, n − 1), the table entry of each pair, (L, S) int64."""
    d = distances(p.q.shape[2], p.k.shape[2], p.pos0, p.q)
    return d.long().clamp_max(p.r1.shape[1] - 1)


def relative_bias_and_partials(p: Problem) -> tuple[Tensor, Tensor, Tensor]:
    """A relative bias (1, Hq, L, S) and its partial derivatives ∂bias/∂r1, ∂bias/∂r2 (same shape)."""
    lq, lk = p.q.shape[2], p.k.shape[2]
    d = distances(lq, lk, p.pos0, p.q)
    r1 = p.r1.to(p.q.dtype).view(1, -1, 1, 1)
    r2 = (p.r2 if p.r2 is not None else torch.zeros_like(p.r1)).to(p.q.dtype).view(1, -1, 1, 1)
    if p.kind == ALIBI:
        f, df = d.expand_as(r1 * d), torch.zeros_like(r1 * d)
    elif p.kind == KERPLE_LOG:
        f, df = torch.log1p(r2 * d), d / (1 + r2 * d)
    elif p.kind == KERPLE_POWER:
        f = torch.where(d > 0, d.clamp_min(1) ** r2, 0.0)
        df = f * torch.log(d.clamp_min(1))
    else:
        raise ValueError(f"bias kind {p.kind} is not a relative bias")
    return -r1 * f, -f, -r1 * df


def logits(p: Problem) -> Logits:
    """z = scale·q·kᵀ + bias and x = t·z over the full (L, S) grid, and where each pair is allowed."""
    b, hq, lq, _ = p.q.shape
    lk = p.k.shape[2]
    z = p.scale * p.q @ _per_query_head(p.k, hq).transpose(-1, -2)
    allowed = torch.ones(b, hq, lq, lk, dtype=torch.bool, device=z.device)
    if p.causal:
        allowed &= torch.arange(lk, device=z.device)[None, :] <= torch.arange(lq, device=z.device)[:, None] + p.pos0
    if p.mask is not None:
        allowed &= p.mask
    if p.kind in (TENSOR, TABLE):
        bias = p.bias if p.kind == TENSOR else p.r1[:, table_index(p)].unsqueeze(0)
        allowed &= ~torch.isneginf(bias)
        z = z + torch.where(torch.isneginf(bias), 0.0, bias.to(z.dtype))
    elif p.kind != NONE:
        z = z + relative_bias_and_partials(p)[0]
    z = torch.where(allowed, z, 0.0)
    x = z if p.t is None else p.t.to(z.dtype)[..., None] * z
    return Logits(z, x, allowed)


@dataclass(frozen=True)
class Extrema:
    """``row_extrema``'s outputs, (B, Hq, L) each: μ = max x (−inf without a key), m = min(0, min x),
    c = 1/(max(0, μ) − m + ε), argmax (first key attaining max x, −1 unless max x > 0) and argmin (first key
    attaining min x, −1 unless min x < 0)."""

    mu: Tensor
    low: Tensor
    inv_delta: Tensor
    argmax: Tensor
    argmin: Tensor


def row_extrema(p: Problem, s: Logits) -> Extrema:
    """The twin of ``triton_kernels.row_extrema``."""
    hi = s.x.masked_fill(~s.allowed, -math.inf)
    lo = s.x.masked_fill(~s.allowed, math.inf)
    mu, min_x = hi.amax(-1), lo.amin(-1)
    low = min_x.clamp(max=0.0)  # +inf (no key) -> 0
    inv_delta = 1.0 / (mu.clamp(min=0.0) - low + p.eps)
    argmax = torch.where(mu > 0, hi.argmax(-1), -1)  # argmax/argmin return the first index of a tie
    argmin = torch.where(min_x < 0, lo.argmin(-1), -1)
    return Extrema(mu, low, inv_delta, argmax, argmin)


@dataclass(frozen=True)
class Forward:
    """``fwd``'s outputs: o (B, Hq, L, Dv) and logsumexp (B, Hq, L; +inf for a row with no key), with the
    probabilities p and weights w (B, Hq, L, S) the backward twins use."""

    o: Tensor
    lse: Tensor
    p: Tensor
    w: Tensor


def fwd(p: Problem, s: Logits, ext: Extrema | None) -> Forward:
    """The twin of ``triton_kernels.fwd`` (``ext`` from :func:`row_extrema` for sa_norm)."""
    masked = s.x.masked_fill(~s.allowed, -math.inf)
    lse = torch.logsumexp(masked, -1)
    has_keys = s.allowed.any(-1)
    lse = torch.where(has_keys, lse, math.inf)
    probs = torch.where(s.allowed, torch.exp(masked - lse[..., None]), 0.0)
    if p.norm == 0:
        w = probs
    elif p.norm == 1:
        w = s.x * probs
    else:
        w = (s.x - ext.low[..., None]) * ext.inv_delta[..., None] * probs
    o = w @ _per_query_head(p.v, p.q.shape[1]).to(w.dtype)
    return Forward(o, lse, probs, w)


@dataclass(frozen=True)
class BackwardDq:
    """``bwd_dq``'s outputs: dq (B, Hq, L, D); D_i = dO_i·o_i and the min term g_m = (D_i − E_i)·c_i
    (0 where argmin = −1; sa_norm only), (B, Hq, L); dL/dt_i = Σ_j dx_ij z_ij (SSMax only, else None).
    ``dx`` (B, Hq, L, S) is dL/dx with both min/max terms, for :func:`bwd_dkdv`."""

    dq: Tensor
    delta: Tensor
    g_low: Tensor | None
    dt: Tensor | None
    dx: Tensor


def bwd_dq(p: Problem, s: Logits, ext: Extrema | None, f: Forward, do: Tensor) -> BackwardDq:
    """The twin of ``triton_kernels.bwd_dq``: dx by DESIGN §2, then dq = scale·Σ_j t_i·dx_ij·k_j."""
    hq = p.q.shape[1]
    v = _per_query_head(p.v, hq).to(do.dtype)
    delta = (do * f.o).sum(-1)
    dw = do @ v.transpose(-1, -2)
    d = delta[..., None]
    g_low = None
    if p.norm == 0:
        dx = f.p * (dw - d)
    elif p.norm == 1:
        dx = f.p * (dw * (1 + s.x) - d)
    else:
        c = ext.inv_delta[..., None]
        dx = f.p * (dw * (c + (s.x - ext.low[..., None]) * c) - d)
        e = (f.p * dw).sum(-1)
        g_low = torch.where(ext.argmin >= 0, (delta - e) * ext.inv_delta, 0.0)
        g_high = torch.where(ext.argmax >= 0, -delta * ext.inv_delta, 0.0)
        dx = dx.scatter_add(-1, ext.argmax.clamp_min(0)[..., None], g_high[..., None])
        dx = dx.scatter_add(-1, ext.argmin.clamp_min(0)[..., None], g_low[..., None])
    t = torch.ones_like(delta) if p.t is None else p.t.to(dx.dtype)
    dq = p.scale * (t[..., None] * dx) @ _per_query_head(p.k, hq).to(dx.dtype)
    dt = None if p.t is None else (dx * s.z).sum(-1)
    return BackwardDq(dq, delta, g_low, dt, dx)


@dataclass(frozen=True)
class BackwardDkdv:
    """``bwd_dkdv``'s outputs: dk (B, Hkv, S, D), dv (B, Hkv, S, Dv) summed over each kv head's query heads,
    and the bias gradient: dL/dbias = t·dx (B, Hq, L, S; 0 where not allowed) for a bias tensor, or
    (dL/dr1, dL/dr2), (Hq,) each, for a relative bias (dL/dr2 = 0 for ALiBi), or (dL/dtable, None) for a table
    (dL/dbias summed per head over the pairs reading each entry); None without a bias."""

    dk: Tensor
    dv: Tensor
    dbias: Tensor | None
    dr: tuple[Tensor, Tensor] | None


def bwd_dkdv(p: Problem, s: Logits, f: Forward, back: BackwardDq, do: Tensor) -> BackwardDkdv:
    """The twin of ``triton_kernels.bwd_dkdv``: dv = Σ_i w_ijᵀ dO_i, dk = scale·Σ_i (t_i·dx_ij)ᵀ q_i."""
    hkv = p.k.shape[1]
    dz = back.dx if p.t is None else back.dx * p.t.to(back.dx.dtype)[..., None]
    dz = torch.where(s.allowed, dz, 0.0)
    dv = _sum_over_groups(f.w.transpose(-1, -2) @ do, hkv)
    dk = _sum_over_groups(p.scale * dz.transpose(-1, -2) @ p.q.to(dz.dtype), hkv)
    dbias = dr = None
    if p.kind == TENSOR:
        dbias = dz
    elif p.kind == TABLE:
        hq, n = p.r1.shape
        index = table_index(p).flatten().expand(hq, -1)
        dr = (torch.zeros(hq, n, dtype=dz.dtype).scatter_add(1, index, dz.sum(0).flatten(1)), None)
    elif p.kind != NONE:
        _, d_r1, d_r2 = relative_bias_and_partials(p)
        dr = ((dz * d_r1).sum((0, 2, 3)), (dz * d_r2).sum((0, 2, 3)))
    return BackwardDkdv(dk, dv, dbias, dr)


def schedule(blocks: int, heads: int, section: int, heavy_last: bool) -> list[tuple[int, int]]:
    """The (block, head) each program of a (blocks, heads) grid works on, in launch order (axis 0 fastest), under
    the causal schedule (``triton_kernels._scheduled``): heads in sections of ``section`` (the last one holds the
    rest), and within a section the heaviest block of every head first (the last block with ``heavy_last``, else
    the first), then the next; ``section`` 0: the grid's order."""
    if section == 0:
        return [(block, head) for head in range(heads) for block in range(blocks)]
    order = []
    for first in range(0, heads, section):
        for rank in range(blocks):
            block = blocks - 1 - rank if heavy_last else rank
            order += [(block, head) for head in range(first, min(first + section, heads))]
    return order
