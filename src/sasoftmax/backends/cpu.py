"""Memory-efficient CPU backend: tiled forward and closed-form backward (DESIGN §2), O(N) extra memory.

Queries are processed in blocks of whole rows: a block of ``rows`` queries of every head meets all
the keys it may attend at once, so a tile of logits is (B, Hq, rows, keys), never (L, S). With whole
rows the row statistics (max μ, min m, max M, count n) are exact inside the tile, so the forward
needs two GEMMs per tile (z = q kᵀ, o = w v) and no running rescaling; ``rows`` is chosen so a tile
holds at most :data:`TILE_ELEMENTS` numbers. Causal tiles stop at the last key their last query may
see (half the work for L == S).

Per row the forward saves logsumexp, m, c = 1/(M − m + ε), argmin and argmax — O(L) numbers — and
the backward recomputes each tile's logits, applies the closed form of DESIGN §2 and adds the min/max
terms of ``sa_norm`` (one value per row each) at the saved argmin/argmax. Accumulation runs in a
fixed order, so results are deterministic. Grouped-query attention reads k/v through broadcasting,
never copying them per query head.

Calls without a bias function or a bias that needs a gradient run whole in C++ (``cpu_kernels.cpp``, the
"fused" path): one parallel region in which each thread computes blocks of :data:`FUSED_ROWS` query rows (of
the query heads of one kv head) with the BLAS gemm torch uses and the row loops in between, called through
``cpu_ops``: its custom operators where a call is traced (torch.compile and torch.export keep each as one op),
their eager twin otherwise (the same functions without the operators' dispatch and autograd glue). A
:class:`~sasoftmax.RelativeBias` (ALiBi, Kerple, a table per distance) runs there too: the kernels evaluate it
from its per-head parameters and return their gradients, reduced per head (a table's per offset, folded into its
entries by ``cpu_native.fold_offsets``). Calls with another bias function or a bias that needs
a gradient run the tiles of ``_Plan`` from Python ("tiled" path): the GEMMs in PyTorch, the elementwise work in
the C++ row loops (two passes forward, one backward) when they can be built here, else in plain PyTorch (several
passes; the same math). See docs/cpu_backend.md.

Masked entries hold a large finite negative sentinel, not −inf: exp sends it to 0 and every other
product with it is multiplied by p = 0 first, so fully masked rows give zeros and zero gradients
without NaN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..normalizers import compute_dtype
from . import cpu_native, cpu_ops
from .call import AttentionCall, BiasFunction, evaluate_bias_function, query_positions
from .relative_bias import RelativeBias

TILE_ELEMENTS = 1 << 20
"""Largest logits tile in elements (4 MiB in float32); two or three tiles are alive at once. A tile
targets 1/:data:`TILE_THREADS` of it per torch thread (with one thread 2 MiB, a core's L2 here)."""

TILE_THREADS = 2
"""Threads up to which tiles grow with the thread count: each core brings its own L2, and larger tiles
keep the split GEMMs efficient (at N = 2048 on 2 threads, 4 MiB tiles ran ~12% faster than 2 MiB)."""

FUSED_ROWS = 128
"""Query rows per block of the fused path (over the query heads of a kv head that a block stacks), where each
thread works on blocks of its own: at N = 2048 and 8192, 128 rows ran 5–10% faster than 64 and as fast as 256
(which wastes more causal work)."""

FUSED_TILE_ELEMENTS = 1 << 22
"""Most logits in a block of the fused path (16 MiB in float32); fewer rows for very long key sequences."""

MIN_ROWS = 256
"""Query rows a tile should hold at least; fewer heads go into a tile to make room (see ``_kv_chunks``)."""


def unsupported(call: AttentionCall) -> str | None:
    """Why the cpu backend cannot serve ``call`` (dropout, non-CPU tensors; under ``torch.compile`` what the
    fused path does not take), or None."""
    if call.q.device.type != "cpu":
        return f"the cpu backend needs CPU tensors; got {call.q.device}"
    if call.dropout_p > 0:
        return "the cpu backend does not implement dropout (dropout_p > 0); use backend='eager'"
    if torch.compiler.is_compiling() and not _fusable(call):
        return (
            "under torch.compile the cpu backend serves only its fused C++ path (no bias function, no bias that "
            "needs a gradient, kernels built here); use backend='eager'"
        )
    return None


def _fusable(call: AttentionCall) -> bool:
    """Whether the fused C++ path (the custom operators of ``cpu_ops``) serves ``call``: no bias function but a
    RelativeBias, no bias tensor that needs a gradient, and the kernels and torch's BLAS are there."""
    bias = call.bias
    fixed_tensor = isinstance(bias, Tensor) and not (bias.requires_grad and torch.is_grad_enabled())
    if bias is not None and not fixed_tensor and not isinstance(bias, RelativeBias):
        return False
    return cpu_native.fused_available(compute_dtype(call.q.dtype))


def attention(call: AttentionCall) -> Tensor:
    """Output (B, Hq, L, Dv) in the input dtype; differentiable in q, k, v, a bias tensor, ssmax, a RelativeBias's
    r1 and r2, and the parameters of an ``nn.Module`` bias function."""
    reason = unsupported(call)
    if reason:
        raise ValueError(reason)
    b, hq, _, lq, lk, _ = call.shape
    bias_fn = None if call.bias is None or isinstance(call.bias, Tensor) else call.bias
    bias = call.bias if isinstance(call.bias, Tensor) else None
    if isinstance(bias_fn, RelativeBias):
        params = tuple(p for p in bias_fn.parameters if p.requires_grad)
    elif isinstance(bias_fn, nn.Module):
        params = tuple(p for p in bias_fn.parameters() if p.requires_grad)
    else:
        params = ()
    if lq == 0 or lk == 0:
        # Empty query set, or no key at all (every row fully masked): zeros that keep the graph (bias parameters
        # get zero gradients).
        zero = (call.q.sum() + call.k.sum() + call.v.sum()) * 0
        zero = zero + sum((p.sum() for p in params), torch.zeros(())) * 0
        return call.q.new_zeros(b, hq, lq, call.v.shape[-1]) + zero
    if _fusable(call):
        kind, r1, r2 = _relative(call.bias)
        out, _, _ = cpu_ops.fused_attention(
            call.q, call.k, call.v, call.mask, None if bias is None else bias.detach(), call.ssmax, call.scale,
            call.eps, call.causal, call.normalizer,
            max(1, min(FUSED_ROWS, FUSED_TILE_ELEMENTS // lk)),  # rows per block, over stacked heads: not capped by L
            kind, r1, r2,
        )  # fmt: skip
        return out.to(call.q.dtype)
    return _TiledAttention.apply(call, bias_fn, call.q, call.k, call.v, bias, call.ssmax, *params)


class _Tile:
    """One query block's logits before SSMax and the normalizer, in the GEMM layout (B, Hkv, G·rows, keys).

    ``raw`` holds z / scale with masked entries (mask, and causal when there is a mask)
    set to the sentinel; a bias's −inf entries are −inf, also set to the sentinel for the plain path or
    with SSMax (``masked`` then includes them); keys after a query's causal limit may still hold logits.
    With SSMax, ``n`` (·, ·, rows, 1) counts allowed keys, None = all ``keys``; without, it is None.
    """

    def __init__(self, raw: Tensor, masked: Tensor | None, n: Tensor | None, rows: slice, keys: int):
        self.raw, self.masked, self.n, self.rows, self.keys = raw, masked, n, rows, keys


class _Plan:
    """Everything about one call that the forward and the backward share: shapes, blocks, tiles."""

    def __init__(
        self,
        call: AttentionCall,
        bias_fn: BiasFunction | None,
        bias: Tensor | None,
        ssmax: Tensor | None,
        kv: slice,
        rows: int,
    ):
        b, hq, _, lq, lk, d = call.shape
        self.g = call.groups
        self.kv, self.qh = kv, slice(kv.start * self.g, kv.stop * self.g)  # this chunk's kv and query heads
        self.hkv, self.hq, self.hq_full = kv.stop - kv.start, (kv.stop - kv.start) * self.g, hq
        self.b, self.lq, self.lk, self.d = b, lq, lk, d
        self.dtype = compute_dtype(call.q.dtype)
        self.device = call.q.device
        self.normalizer, self.causal, self.scale, self.eps = call.normalizer, call.causal, call.scale, call.eps
        self.mask = _heads(_as_4d(call.mask), self.qh)
        self.bias = _heads(_as_4d(bias), self.qh)
        self.bias_fn = bias_fn
        self.ssmax = None if ssmax is None else ssmax[self.qh]
        self.q_pos = query_positions(lq, lk, self.device)
        self.neg = -1e30  # the sentinel of masked entries (cpu_kernels.cpp: <= -1e29 is masked)
        self.rows = rows
        self.lib = cpu_native.kernels()
        self.work: dict[str, Tensor] = {}  # shared by the plans of one forward or backward; see buffer()

    def buffer(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """A reusable contiguous work tensor of ``shape``: the tiles' GEMMs write into it rather than into a
        fresh multi-MiB allocation per tile (glibc maps those anew each time, and first touching the fresh
        pages cost almost as much as the GEMM writing them)."""
        numel = 1
        for n in shape:
            numel *= n
        buf = self.work.get(name)
        if buf is None or buf.numel() < numel:
            full = max(numel, self.b * self.hq * min(self.rows, self.lq) * self.lk)
            buf = self.work[name] = torch.empty(full, dtype=self.dtype, device=self.device)
        return buf[:numel].view(shape)

    def blocks(self) -> list[tuple[slice, int]]:
        """Query blocks that can attend any key, and how many keys (a prefix) each may attend."""
        out = []
        for r0 in range(0, self.lq, self.rows):
            r1 = min(self.lq, r0 + self.rows)
            keys = min(self.lk, int(self.q_pos[r1 - 1]) + 1) if self.causal else self.lk
            if keys > 0:
                out.append((slice(r0, r1), keys))
        return out

    def q_block(self, q: Tensor, rows: slice) -> Tensor:
        """Queries of a block as (B, Hkv, G·rows, D), in the compute dtype."""
        qb = q[:, :, rows].to(self.dtype).reshape(self.b, self.hkv, self.g, -1, self.d)
        return qb.reshape(self.b, self.hkv, -1, self.d)

    def heads(self, t: Tensor) -> Tensor:
        """View a (B, Hkv, G·rows, X) tensor as (B, Hq, rows, X)."""
        return t.view(self.b, self.hq, -1, t.shape[-1])

    def groups(self, t: Tensor) -> Tensor:
        """View a (B, Hq, rows, X) tensor as (B, Hkv, G·rows, X)."""
        return t.reshape(self.b, self.hkv, -1, t.shape[-1])

    def tile(self, qb: Tensor, k: Tensor, rows: slice, keys: int, bias_fn_tile: Tensor | None = None) -> _Tile:
        """The block's logits q kᵀ (+ bias) with masked entries set to the sentinel; ``bias_fn_tile`` is the bias
        function's output for the block (every head, from :meth:`eval_bias`)."""
        raw = self.buffer("raw", (*qb.shape[:-1], keys))
        torch.bmm(qb.flatten(0, 1), k[:, :, :keys].flatten(0, 1).transpose(1, 2), out=raw.flatten(0, 1))
        rh = self.heads(raw)
        masked = None if self.mask is None else ~_slice(self.mask, rows, keys)
        if self.bias is not None or self.bias_fn is not None:
            bias_tile = _heads(bias_fn_tile, self.qh) if self.bias_fn is not None else _slice(self.bias, rows, keys)
            rh.add_(bias_tile, alpha=1 / self.scale)  # z = scale·(raw + bias/scale): one pass, not two
            if self.lib is None or self.ssmax is not None:
                # The row kernels read −inf logits as masked by themselves; the plain path and SSMax's n need it.
                neg = torch.isneginf(bias_tile)
                masked = neg if masked is None else masked | neg
        q_pos = self.q_pos[rows]
        n = None
        if masked is not None:
            if self.causal:
                masked = masked | (torch.arange(keys, device=self.device)[None, :] > q_pos[:, None])
            rh.masked_fill_(masked, self.neg)
            if self.ssmax is not None:
                n = (~masked).sum(-1, keepdim=True)
        elif self.causal and self.ssmax is not None:
            n = (q_pos + 1).clamp(0, keys)[:, None]
        return _Tile(raw, masked, n, rows, keys)

    def eval_bias(self, rows: slice, keys: int) -> Tensor:
        """The bias function on one block's (query, key) positions, checked, as a 4-D tensor of every head."""
        q_pos, k_pos = self.q_pos[rows], torch.arange(keys, device=self.device)
        return _as_4d(evaluate_bias_function(self.bias_fn, q_pos, k_pos, self.b, self.hq_full))

    def log_n(self, tile: _Tile) -> Tensor:
        """ln(max(n_i, 1)) per row, (·, ·, rows, 1)."""
        n = tile.n if tile.n is not None else torch.full((1, 1), tile.keys, device=self.device)
        return torch.log(n.clamp_min(1).to(self.dtype))

    def ssmax_t(self, tile: _Tile) -> Tensor | None:
        """SSMax's factor t_i = s_h·ln(n_i), (·, Hq, rows, 1), or None without SSMax."""
        if self.ssmax is None:
            return None
        return self.ssmax.to(self.dtype).view(1, self.hq, 1, 1) * self.log_n(tile)

    def rows_of(self, t: Tensor | None, rows: slice, fill: float = 1.0) -> Tensor:
        """A per-row quantity broadcastable to (B, Hq, rows, 1) as a contiguous (B·Hq·rows,) tensor."""
        r = rows.stop - rows.start
        if t is None:
            return torch.full((self.b * self.hq * r,), fill, dtype=self.dtype)
        return t.expand(self.b, self.hq, r, 1).reshape(-1).contiguous()

    def limits(self, tile: _Tile) -> Tensor:
        """Keys j >= limit_i are masked (causal), as a contiguous int64 (B·Hq·rows,) tensor."""
        r = tile.rows.stop - tile.rows.start
        if self.causal:
            lim = (self.q_pos[tile.rows] + 1).clamp(0, tile.keys)
        else:
            lim = torch.full((r,), tile.keys, dtype=torch.long)
        return lim.view(1, 1, r).expand(self.b, self.hq, r).reshape(-1).contiguous()

    def logits(self, tile: _Tile) -> Tensor:
        """Plain path: the final logits x (B, Hq, rows, keys), every masked entry the sentinel, in place."""
        xh = self.heads(tile.raw)
        xh.mul_(self.scale)
        t = self.ssmax_t(tile)
        if t is not None:
            xh.mul_(t)
        if tile.masked is not None:
            xh.masked_fill_(tile.masked, self.neg)  # again: t·sentinel is no sentinel
        elif self.causal:
            self.fill_causal(xh, tile, self.neg)
        return xh

    def fill_causal(self, xh: Tensor, tile: _Tile, value: float) -> None:
        """Fill keys after each query's position; only the block's last columns can be such."""
        q_pos = self.q_pos[tile.rows]
        first = max(0, int(q_pos[0]) + 1)
        if first < tile.keys:
            future = torch.arange(first, tile.keys, device=self.device)[None, :] > q_pos[:, None]
            xh[..., first : tile.keys].masked_fill_(future, value)

    def fill(self, xh: Tensor, tile: _Tile, value: float) -> None:
        if tile.masked is not None:
            xh.masked_fill_(tile.masked, value)
        elif self.causal:
            self.fill_causal(xh, tile, value)


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, call: AttentionCall, bias_fn, q, k, v, bias, ssmax, *params) -> Tensor:
        dtype = compute_dtype(q.dtype)
        plans = _plans(call, bias_fn, bias, ssmax)
        out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=dtype)
        # Per row: lse (0 for an empty row), m, c, lse_lo (lse's rounding, see cpu_kernels.cpp's RowStats); argmin,
        # argmax (−1 where sa_norm has no such term).
        stats = torch.zeros(4, *q.shape[:3], dtype=dtype)
        arg = torch.full((2, *q.shape[:3]), -1, dtype=torch.long)
        kc, vc = k.to(dtype), v.to(dtype)
        work: dict[str, Tensor] = {}
        chunks = []
        for plan in plans:
            qh, kv = plan.qh, plan.kv
            plan.work = work
            chunks.append((plan, q[:, qh], kc[:, kv], vc[:, kv], out[:, qh], stats[:, :, qh], arg[:, :, qh]))
        # Blocks outermost: a bias function is evaluated once per block for every head, then sliced per chunk.
        for rows, keys in plans[0].blocks():
            bias_fn_tile = plans[0].eval_bias(rows, keys) if bias_fn is not None else None
            for chunk in chunks:
                _forward_block(*chunk, rows, keys, bias_fn_tile)
        work.clear()  # the plans live on until the backward: do not keep the tiles with them
        ctx.plans = plans
        ctx.save_for_backward(q, k, v, bias, ssmax, out, stats, arg, *params)
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable  # closed-form and in-place: double backward raises instead of lying
    def backward(ctx: Any, grad_out: Tensor):
        q, k, v, bias, ssmax, out, stats, arg, *params = ctx.saved_tensors
        plans: list[_Plan] = ctx.plans
        need = dict(zip(("q", "k", "v", "bias", "s"), ctx.needs_input_grad[2:7]))
        # The bias function's parameters to differentiate (a RelativeBias passes both of its own, needed or not).
        wanted = [i for i, needed in enumerate(ctx.needs_input_grad[7:]) if needed]
        dtype = plans[0].dtype
        kc, vc = k.to(dtype), v.to(dtype)
        do = grad_out.to(dtype)
        dq = torch.zeros(q.shape, dtype=dtype)
        # dk, dv are accumulated transposed, (B, Hkv, D, S): the GEMM qᵀ·dz into that layout runs 10–20% faster
        # here than dzᵀ·q into (S, D).
        dk, dv = (torch.zeros(t.transpose(-1, -2).shape, dtype=dtype) for t in (k, v))
        dbias = torch.zeros(_as_4d(bias).shape, dtype=dtype) if need["bias"] else None
        ds = torch.zeros(q.shape[1], dtype=dtype) if need["s"] else None
        dparams: list[Tensor | None] = [torch.zeros_like(p) if i in wanted else None for i, p in enumerate(params)]
        work: dict[str, Tensor] = {}
        chunks = []
        for plan in plans:
            qh, kv = plan.qh, plan.kv
            plan.work = work
            # dk, dv accumulate in place (baddbmm_), which needs contiguous tensors (B = 1 gives them); else a
            # chunk gets its own.
            own = not dk[:, kv].is_contiguous()  # dk and dv alike
            dk_c, dv_c = (torch.zeros(t[:, kv].shape, dtype=dtype) if own else t[:, kv] for t in (dk, dv))
            grads = _Grads(dq[:, qh], dk_c, dv_c, _heads(dbias, qh), None if ds is None else ds[qh], own)
            views = (q[:, qh], kc[:, kv], vc[:, kv], do[:, qh], stats[:, :, qh], arg[:, :, qh])
            chunks.append((plan, *views, grads, need))
        for rows, keys in plans[0].blocks():
            bias_fn_tile = dtile = None
            if plans[0].bias_fn is not None:
                with torch.enable_grad():  # a graph from the function's parameters, if any, to its tile
                    bias_fn_tile = plans[0].eval_bias(rows, keys)
                if wanted:  # dL/d(tile), gathered from every chunk, then pulled through the function once
                    dtile = torch.zeros(bias_fn_tile.shape, dtype=dtype)
            for chunk in chunks:
                _backward_block(*chunk, rows, keys, bias_fn_tile, dtile)
            if dtile is not None:
                inputs = [params[i] for i in wanted]
                grads_p = torch.autograd.grad(bias_fn_tile, inputs, dtile.to(bias_fn_tile.dtype), allow_unused=True)
                for i, g in zip(wanted, grads_p):
                    if g is not None:
                        dparams[i] += g
        for plan, *_, grads, _ in chunks:
            if grads.own:
                dk[:, plan.kv], dv[:, plan.kv] = grads.dk, grads.dv
        # Free the tiles and the views of dkᵀ, dvᵀ, so that each transposed copy is freed once replaced.
        work.clear()
        del chunks, grads
        dk = dk.transpose(-1, -2).to(k.dtype).contiguous() if need["k"] else None
        dv = dv.transpose(-1, -2).to(v.dtype).contiguous() if need["v"] else None
        grads_in = (
            dq.to(q.dtype) if need["q"] else None,
            dk,
            dv,
            dbias.reshape(bias.shape).to(bias.dtype) if need["bias"] else None,
            ds.to(ssmax.dtype) if need["s"] else None,
        )
        return (None, None, *grads_in, *dparams)


def _relative(bias) -> tuple[str, Tensor | None, Tensor | None]:
    """A RelativeBias as the fused operators take it: (kind, r1, r2), or ("", None, None)."""
    if not isinstance(bias, RelativeBias):
        return "", None, None
    return bias.kind, bias.r1, bias.r2


class _Grads:
    """Where one chunk's backward accumulates: views of dq, dbias, ds; dkᵀ, dvᵀ (B, hkv, D, S), views of the
    whole when contiguous, else its own (``own``: copied into the whole at the end)."""

    def __init__(self, dq, dk, dv, dbias, ds, own: bool):
        self.dq, self.dk, self.dv, self.dbias, self.ds, self.own = dq, dk, dv, dbias, ds, own


def _tile_elements() -> int:
    """The tile size to aim for with the current number of torch threads (see :data:`TILE_THREADS`)."""
    return TILE_ELEMENTS * min(max(1, torch.get_num_threads()), TILE_THREADS) // TILE_THREADS


def _plans(call: AttentionCall, bias_fn: BiasFunction | None, bias: Tensor | None, ssmax: Tensor | None):
    """One plan per chunk of kv heads (:func:`_kv_chunks`), all with the same query blocks: rows sized for the
    largest chunk's tile."""
    kvs = _kv_chunks(call)
    b, _, _, lq, lk, _ = call.shape
    heads = (kvs[0].stop - kvs[0].start) * call.groups
    rows = max(1, min(lq, _tile_elements() // max(1, b * heads * lk)))
    return [_Plan(call, bias_fn, bias, ssmax, kv, rows) for kv in kvs]


def _kv_chunks(call: AttentionCall) -> list[slice]:
    """Groups of kv heads processed one after another, so that a tile of :func:`_tile_elements` holds
    at least :data:`MIN_ROWS` query rows (small tiles of many rows keep the GEMMs efficient and the
    tile in cache)."""
    b, _, hkv, lq, lk, _ = call.shape
    per = max(1, _tile_elements() // max(1, b * call.groups * lk * min(lq, MIN_ROWS)))
    return [slice(h, min(hkv, h + per)) for h in range(0, hkv, per)]


def _forward_block(plan: _Plan, q, kc, vc, out, stats, arg, rows: slice, keys: int, bias_fn_tile) -> None:
    """Forward of one query block of one chunk of heads: fills its rows of ``out`` (B, hq, L, Dv), ``stats``
    (4, B, hq, L) and ``arg``."""
    tile = plan.tile(plan.q_block(q, rows), kc, rows, keys, bias_fn_tile)
    step = _forward_native if plan.lib is not None else _forward_plain
    u, fac, row_stats, row_arg = step(plan, tile)
    o = plan.heads(torch.matmul(u, vc[:, :, :keys]))
    out[:, :, rows] = o.mul_(fac.view(plan.b, plan.hq, -1, 1))
    stats[:, :, :, rows] = row_stats.view(4, plan.b, plan.hq, -1)
    arg[:, :, :, rows] = row_arg.view(2, plan.b, plan.hq, -1)


def _backward_block(
    plan: _Plan, q, kc, vc, do, stats, arg, grads: _Grads, need, rows: slice, keys: int, bias_fn_tile, dtile
) -> None:
    """Backward of one query block of one chunk of heads (DESIGN §2), accumulating into ``grads``, and into
    ``dtile`` (the gradient of the bias function's tile, every head) when given."""
    qb = plan.q_block(q, rows)
    tile = plan.tile(qb, kc, rows, keys, None if bias_fn_tile is None else bias_fn_tile.detach())
    dob = do[:, :, rows]
    if plan.normalizer == "sa_norm":
        dob = dob * stats[2, :, :, rows].unsqueeze(-1)  # dW' = c·dW; wᵀdO = ((x − m)p)ᵀ(c·dO)
    dob = plan.groups(dob)
    dw = plan.buffer("dw", (*dob.shape[:-1], keys))
    torch.bmm(dob.flatten(0, 1), vc[:, :, :keys].flatten(0, 1).transpose(1, 2), out=dw.flatten(0, 1))
    row_stats = stats[:, :, :, rows].reshape(4, -1)
    row_arg = arg[:, :, :, rows].reshape(2, -1)
    step = _backward_native if plan.lib is not None else _backward_plain
    u, dz, dsz = step(plan, tile, dw, row_stats, row_arg, need["s"])
    if need["v"]:  # accumulate in place, transposed: dvᵀ += dOᵀ u
        dvt = grads.dv
        dvt.view(-1, *dvt.shape[2:])[:, :, :keys].baddbmm_(dob.flatten(0, 1).transpose(1, 2), u.flatten(0, 1))
    if need["s"]:
        grads.ds += (dsz.view(plan.b, plan.hq, -1, 1) * plan.log_n(tile)).sum((0, 2, 3))
    if need["q"]:
        grads.dq[:, :, rows] = plan.heads(torch.matmul(dz, kc[:, :, :keys])).mul_(plan.scale)
    if need["k"]:
        dkt = grads.dk  # dkᵀ += scale·qᵀ dz
        dkt.view(-1, *dkt.shape[2:])[:, :, :keys].baddbmm_(
            qb.flatten(0, 1).transpose(1, 2), dz.flatten(0, 1), alpha=plan.scale
        )
    if need["bias"]:
        target = _slice(grads.dbias, rows, keys)
        target += _reduce_to(plan.heads(dz), target.shape)
    if dtile is not None:
        target = _heads(dtile, plan.qh)
        target += _reduce_to(plan.heads(dz), target.shape)


def _forward_native(plan: _Plan, tile: _Tile) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused forward of one tile: (u in GEMM layout, per-row output factor, (lse, m, c, lse_lo), (argmin,
    argmax))."""
    raw = tile.raw.view(-1, tile.keys)
    t = plan.rows_of(plan.ssmax_t(tile), tile.rows)
    row_stats, fac, row_arg = cpu_native.forward(
        plan.lib, raw, plan.limits(tile), t, plan.scale, plan.normalizer, plan.eps
    )
    return tile.raw, fac, row_stats, row_arg


def _forward_plain(plan: _Plan, tile: _Tile) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The same as :func:`_forward_native` in PyTorch ops."""
    xh = plan.logits(tile)
    zero = torch.zeros((), dtype=plan.dtype)
    low, inv = zero.expand(xh.shape[:-1] + (1,)), zero.expand(xh.shape[:-1] + (1,))
    amin = amax = torch.full(xh.shape[:-1] + (1,), -1, dtype=torch.long)
    if plan.normalizer == "sa_norm":
        # m = min(0, min_J x) and M = max(0, max_J x): masked entries set to 0 change neither.
        plan.fill(xh, tile, 0.0)
        hi, hi_at = xh.max(-1, keepdim=True)
        lo, lo_at = xh.min(-1, keepdim=True)
        plan.fill(xh, tile, plan.neg)
        mu = torch.where(hi > 0, hi, xh.amax(-1, keepdim=True))
        low = lo.clamp_max(0)
        inv = 1 / (hi.clamp_min(0) - low + plan.eps)
        amin, amax = lo_at.masked_fill(lo >= 0, -1), hi_at.masked_fill(hi <= 0, -1)
    else:
        mu = xh.amax(-1, keepdim=True)
    mu = mu.masked_fill(mu <= plan.neg / 10, 0.0)  # an empty row: exp(sentinel) = 0 everywhere
    e = torch.exp(xh - mu)
    total = e.sum(-1, keepdim=True)
    if plan.normalizer == "sa_norm":
        e.mul_(xh.sub_(low))  # (x − m)·e; masked entries: finite · 0
    elif plan.normalizer == "sa":
        e.mul_(xh)
    nonempty = total != 0  # NaN (a NaN logit) counts as nonempty, so the row becomes NaN
    total = torch.where(nonempty, total, torch.ones_like(total))
    fac = torch.where(nonempty, (inv if plan.normalizer == "sa_norm" else 1) / total, 0)
    lse = torch.where(nonempty, mu + torch.log(total), 0)
    # lse_lo = 0: these ops round the logsumexp as torch does
    row_stats = torch.stack([s.expand_as(lse).reshape(-1) for s in (lse, low, inv, torch.zeros_like(lse))])
    row_arg = torch.stack([a.expand_as(lse).reshape(-1) for a in (amin, amax)])
    return plan.groups(e), fac, row_stats, row_arg


def _backward_native(plan, tile, dw, row_stats, row_arg, need_s):
    """Fused backward of one tile: (u, dL/dz, Σ_j dL/dx·z per row or None), u and dL/dz in GEMM layout."""
    stats = (s.contiguous() for s in row_stats)  # lse, m, c, lse_lo
    t = plan.rows_of(plan.ssmax_t(tile), tile.rows)
    dsz = cpu_native.backward(
        plan.lib, tile.raw.view(-1, tile.keys), dw.view(-1, tile.keys), plan.limits(tile), t, plan.scale,
        plan.normalizer, *stats, row_arg[0].contiguous(), row_arg[1].contiguous(), need_s,
    )  # fmt: skip
    return tile.raw, dw, dsz


def _backward_plain(plan, tile, dw, row_stats, row_arg, need_s):
    """The same as :func:`_backward_native` in PyTorch ops."""
    shape = (plan.b, plan.hq, -1, 1)
    lse, low, inv, _ = (s.view(shape) for s in row_stats)
    z = None
    if need_s:  # SSMax's gradient needs z (masked entries 0: their dL/dx is 0, z may be anything there)
        z = plan.heads(tile.raw) * plan.scale
        plan.fill(z, tile, 0.0)
    xh = plan.logits(tile)
    p = torch.exp(xh - lse)
    dw = plan.heads(dw)
    if plan.normalizer == "softmax":
        u = p
        d_i = torch.linalg.vecdot(u, dw).unsqueeze(-1)  # D_i = Σ_j w_ij dW_ij, as the native row loops take it
        dx = dw.sub_(d_i).mul_(p)
    else:
        u = xh.sub_(low).mul_(p) if plan.normalizer == "sa_norm" else xh.mul_(p)
        d_i = torch.linalg.vecdot(u, dw).unsqueeze(-1)  # D_i (sa_norm: u = (x − m)p and dw is c-scaled)
        e_i = torch.linalg.vecdot(p, dw).unsqueeze(-1)  # c·E_i for sa_norm (dw is c-scaled)
        u_out = u.clone()
        dx = dw.mul_(u.add_(p)).addcmul_(p, d_i, value=-1)  # dW(p + u) − D p
        if plan.normalizer == "sa_norm":
            amin, amax = (a.view(shape) for a in row_arg)
            # Separate scatters: argmin and argmax may be the same key. Rows without a term add 0.
            dx.scatter_add_(-1, amax.clamp_min(0), torch.where(amax >= 0, -d_i * inv, 0))
            dx.scatter_add_(-1, amin.clamp_min(0), torch.where(amin >= 0, d_i * inv - e_i, 0))
        u = u_out
    dsz = (dx * z).sum(-1).reshape(-1) if need_s else None
    t = plan.ssmax_t(tile)
    if t is not None:
        dx.mul_(t)
    return plan.groups(u), plan.groups(dx), dsz


def _reduce_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``t`` over the axes where ``shape`` (same rank) broadcasts (has size 1)."""
    dims = tuple(i for i, (a, b) in enumerate(zip(shape, t.shape)) if a == 1 and b != 1)
    return t.sum(dims, keepdim=True) if dims else t


def _heads(t: Tensor | None, heads: slice) -> Tensor | None:
    """The query heads ``heads`` of a 4-D tensor broadcastable over heads (unchanged if it has one)."""
    return t if t is None or t.shape[1] == 1 else t[:, heads]


def _as_4d(t: Tensor | None) -> Tensor | None:
    """View a tensor broadcastable to 4-D as 4-D (leading size-1 axes)."""
    return None if t is None else t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def _slice(t: Tensor, rows: slice, keys: int) -> Tensor:
    """The part of a 4-D broadcastable tensor that a tile (rows, first ``keys`` keys) sees."""
    return t[:, :, rows if t.shape[2] > 1 else slice(None), slice(None, keys) if t.shape[3] > 1 else slice(None)]


__all__ = ["MIN_ROWS", "TILE_ELEMENTS", "TILE_THREADS", "attention", "unsupported"]
