"""Triton backend: fused FlashAttention-style forward and backward for softmax, sa and sa_norm.

O(N) memory: no (L, S) tensor is ever materialised for the computation itself. The kernels
(``triton_kernels``) evaluate logits tile by tile — SSMax's factor t_i = s_h·ln(n_i) applied to the float32
logits, biases added inside — and save a few numbers per row for the backward (logsumexp; for sa_norm
also m, 1/(M − m + ε) and the keys where the min/max gradient terms land).

Serves CUDA tensors of dtype float16, bfloat16 or float32, head dims 16..256, any lengths (Lq != Lk,
causal aligned lower-right), bool masks and bias tensors (read through stride-0 broadcasting; a bias
tensor that requires grad gets its gradient), :class:`~sasoftmax.RelativeBias` (ALiBi, Kerple: evaluated
in the kernels, parameter gradients reduced per head there), any other bias function (evaluated one
block of query rows at a time and handed to the kernels as that block's bias: O(block·S) memory; its
``nn.Module`` parameters get gradients), grouped-query attention and SSMax. It does not serve dropout
or float64: ``unsupported`` names the reason, so ``backend="auto"`` falls back.
With ``TRITON_INTERPRET=1`` set before triton is first imported the same kernels run on CPU tensors in
Triton's interpreter (slow; used by the tests; float16/float32 only, its bfloat16 arithmetic is wrong).

Importing this module raises ImportError when triton is not installed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import warnings
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

try:
    import triton
    from triton.runtime import JITFunction
    from triton.runtime.errors import OutOfResources
except ImportError as err:  # reported by sasoftmax.backends.unavailable("triton")
    raise ImportError("triton is not installed (pip install 'sasoftmax[triton]')") from err

from ..normalizers import NORMALIZERS
from . import triton_kernels as kernels
from .call import AttentionCall, evaluate_bias_function, query_positions
from .eager_twin import eager_twin
from .relative_bias import RELATIVE_BIAS_KINDS, RelativeBias

# The kernels' BIAS_KIND (``triton_kernels``): none, a tensor, then the RelativeBias kinds in their order.
NO_BIAS, BIAS_TENSOR = 0, 1
ALIBI, KERPLE_LOG, KERPLE_POWER, TABLE = (2 + RELATIVE_BIAS_KINDS.index(name) for name in RELATIVE_BIAS_KINDS)
PARAMETRIC = (ALIBI, KERPLE_LOG, KERPLE_POWER)
"""The kinds with per-head parameters r1 (and r2 for the two Kerples), whose gradients the kernels reduce."""

# The kernels above were decorated with the interpreter iff TRITON_INTERPRET was on at import time.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 256)
BIAS_FUNCTION_BUDGET = 2**30
"""Bytes a block of query rows may take when a bias function is evaluated for it (see ``_chunk_rows``)."""


def unsupported(call: AttentionCall) -> str | None:
    """Why the Triton kernels cannot serve ``call``, or None if they can."""
    q = call.q
    if not q.is_cuda and not INTERPRET:
        return (
            f"tensors are on {q.device}; the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before triton is first imported)"
        )
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16 or float32)"
    if INTERPRET and not q.is_cuda and q.dtype == torch.bfloat16:
        return "bfloat16 is not supported by Triton's interpreter (its bfloat16 arithmetic is wrong)"
    if call.dropout_p > 0:
        return "dropout is not supported (use backend='eager')"
    lo, hi = HEAD_DIMS
    for name, dim in (("q/k", q.shape[-1]), ("v", call.v.shape[-1])):
        if not lo <= dim <= hi:
            return f"head dim of {name} is {dim}; the Triton kernels need {lo}..{hi}"
    if q.numel() == 0 or call.k.numel() == 0:
        return f"empty inputs are not supported (q {tuple(q.shape)}, k {tuple(call.k.shape)})"
    return None


def attention(call: AttentionCall) -> Tensor:
    """Output (B, Hq, L, Dv) in the input dtype; differentiable in q, k, v, SSMax's s and the bias."""
    with _device_guard(call.q):
        return _attention(call)


def _device_guard(q: Tensor) -> contextlib.AbstractContextManager:
    """q's GPU made the current one where it is not: Triton launches on the current device (its stream, its loaded
    kernels), and a model spread over GPUs in one process (transformers' ``device_map``) calls with tensors on
    another, as FlashAttention's and flash-linear-attention's entry points guard against. The backward needs none:
    autograd runs CUDA work on a thread per device, with that device current. (Compiled graphs: Inductor guards.)"""
    if q.is_cuda and not torch.compiler.is_compiling() and q.device.index != torch.cuda.current_device():
        return torch.cuda.device(q.device)
    return contextlib.nullcontext()


def _attention(call: AttentionCall) -> Tensor:
    b, hq, _, lq, lk, _ = call.shape
    bias = call.bias
    sums_over_rows = _sums_over_rows(call)
    grad = torch.is_grad_enabled() and (sums_over_rows or any(x.requires_grad for x in (call.q, call.k, call.v)))
    options = _Options(
        norm=NORMALIZERS.index(call.normalizer), causal=call.causal, scale=call.scale, eps=call.eps, pos0=lk - lq,
        residual=_residual(call, sums_over_rows) if grad else NO_RESIDUAL,
    )
    if bias is not None and not isinstance(bias, (Tensor, RelativeBias)):
        mask, _ = _views(call.q, call.k, call.mask, None)
        params = tuple(p for p in bias.parameters() if p.requires_grad) if isinstance(bias, nn.Module) else ()
        return _BiasFunctionAttention.apply(call.q, call.k, call.v, call.ssmax, bias, mask, options, *params)
    # SSMax: where n_i has a closed form the kernels compute t_i = s_h·ln(n_i) and reduce dL/ds themselves (no
    # small torch operations per call); otherwise t is counted here, (B, Hq, L).
    t = s = None
    if call.ssmax is not None and _counts_closed_form(call):
        s = call.ssmax
    elif call.ssmax is not None:
        t = ssmax_factor(call)
    kind, r1, r2 = (NO_BIAS if bias is None else BIAS_TENSOR), None, None
    if isinstance(bias, RelativeBias):
        kind, r1, r2, bias = 2 + RELATIVE_BIAS_KINDS.index(bias.kind), bias.r1, bias.r2, None
    # Traced (torch.compile, torch.export): the operator. Eager: its autograd.Function twin, the same functions
    # without the operator's dispatch and autograd glue, which cost the host more than the Triton launches; and
    # where no gradient can flow (inference, decoding) the forward function itself.
    forward = _EagerAttention.apply if grad else _forward_op
    if torch.compiler.is_compiling():
        forward = triton_forward
    o, *_ = forward(
        call.q, call.k, call.v, t, s, call.mask, bias, kind, r1, r2, options.norm, call.causal, call.scale, call.eps,
        options.pos0, options.residual,
    )  # fmt: skip
    return o


def _sums_over_rows(call: AttentionCall) -> bool:
    """Whether a gradient sums dx over whole rows: SSMax's s, or a bias that requires grad (a tensor; a
    ``RelativeBias``'s parameters; a bias function module's)."""
    bias = call.bias
    params = bias.parameters if isinstance(bias, RelativeBias) else ()
    if isinstance(bias, nn.Module):
        params = tuple(bias.parameters())
    return any(isinstance(x, Tensor) and x.requires_grad for x in (call.ssmax, bias, *params))


NO_RESIDUAL, RESIDUAL, SPLIT_WEIGHTS = 0, 1, 2
"""What a 16-bit forward that a backward follows saves for the backward's D_i = dO_i·o_i (``_residual``): nothing,
o's rounding residual (``_Saved.o_lo``), or that residual with o's product taken over split weights
(``triton_kernels._weighted``)."""


def _residual(call: AttentionCall, sums_over_rows: bool) -> int:
    """``NO_RESIDUAL``, ``RESIDUAL`` or ``SPLIT_WEIGHTS`` for a call that a backward follows (``sums_over_rows``:
    ``_sums_over_rows(call)``). D_i must be the sum
    over the float32 weights that the backward's tiles cancel against. From the rounded o, its rounding error stays
    in dx: harmless for plain softmax (FlashAttention's D), many times the true dx for sa (o grows with x) and
    sa_norm (its min and max terms multiply D by 1/(M − m + ε)) in rows one key dominates, and summed up over whole
    rows where a gradient sums dx there (SSMax's s, a bias's): o's rounding residual for those. Where the weights
    themselves are rounded for o's product, o is the sum over the rounded weights: sa's grow with x (split always),
    and a table's or a bias function's gradient sums along the diagonals of every row, where the random
    differential test (tests/fuzz_backends.py) found the residual alone 1.3–4× over the FlashAttention rule (split
    there too; sa_norm and softmax with SSMax or Kerple stayed within it, and keep their forward's cost)."""
    if call.q.dtype == torch.float32:
        return NO_RESIDUAL  # (the kernels' o is the float32 o)
    bias = call.bias
    diagonal_sums = (isinstance(bias, RelativeBias) and bias.kind == "table") or not isinstance(
        bias, (Tensor, RelativeBias, type(None))
    )
    if call.normalizer == "sa" or (diagonal_sums and sums_over_rows):
        return SPLIT_WEIGHTS
    return RESIDUAL if call.normalizer != "softmax" or sums_over_rows else NO_RESIDUAL


def _counts_closed_form(call: AttentionCall) -> bool:
    """Whether the keys each row may attend are all S, or with causal masking keys 0 … i + POS0 (no mask, no bias
    that may mask: a bias tensor's or a table's −inf entries)."""
    bias = call.bias
    return call.mask is None and not isinstance(bias, Tensor) and not (
        isinstance(bias, RelativeBias) and bias.kind == "table"
    )


def ssmax_factor(call: AttentionCall) -> Tensor:
    """t_i = s_h · ln(n_i), float32 (B, Hq, L); n_i = keys row i may attend (>= 1)."""
    b, hq, _, lq, _, _ = call.shape
    log_n = torch.log(allowed_counts(call).clamp_min(1).float())
    return (call.ssmax.float().view(1, -1, 1) * log_n.reshape((1,) * (3 - log_n.dim()) + log_n.shape)).expand(b, hq, lq)


def allowed_counts(call: AttentionCall) -> Tensor:
    """n_i, the number of keys each row may attend (mask ∧ causal ∧ bias tensor or table != −inf), broadcastable
    to (B, Hq, L).

    Without a bias tensor it needs no memory beyond the mask's own: a mask without a query axis is counted by a
    prefix sum, and so are a table's −inf entries when there is no mask (with one, the table's (Hq, L, S) entries
    are looked up).
    """
    _, _, _, lq, lk, _ = call.shape
    device = call.q.device
    last = query_positions(lq, lk, device)  # causal: row i sees keys 0..last_i
    mask = call.mask
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if isinstance(call.bias, Tensor):
        bias = call.bias.reshape((1,) * (4 - call.bias.dim()) + tuple(call.bias.shape))
        return _count_allowed(bias, mask, last if call.causal else None)
    if isinstance(call.bias, RelativeBias) and call.bias.kind == "table":
        dropped = torch.isneginf(call.bias.r1)  # (Hq, n): distances that mask
        if mask is not None:
            index = (last[:, None] - torch.arange(lk, device=device)[None, :]).abs().clamp_max(dropped.shape[1] - 1)
            return _count_allowed(torch.where(dropped[:, index], -math.inf, 0.0), mask, last if call.causal else None)
        # Keys 0..end_i − 1 of row i have the offsets last_i − end_i + 1 .. last_i (offset = last_i − j), a run of
        # the offsets 1 − L .. S − 1 that a call has: its −inf entries are a difference of prefix sums.
        end = (last + 1).clamp(0, lk) if call.causal else torch.full_like(last, lk)
        offsets = torch.arange(1 - lq, lk, device=device)  # offset u sits at u + L − 1
        flags = dropped[:, offsets.abs().clamp_max(dropped.shape[1] - 1)]
        prefix = torch.nn.functional.pad(flags.cumsum(-1), (1, 0))  # prefix[:, m] = −inf among the first m
        masked = prefix[:, last + lq] - prefix[:, last - end + lq]
        return (end - masked).unsqueeze(0)
    if mask is None:
        return (last + 1).clamp(0, lk) if call.causal else torch.full(last.shape, lk, device=device)
    if not call.causal:
        return mask.sum(-1)
    if mask.shape[-2] == 1:
        # Zero-padded prefix sums: prefix[..., j + 1] = allowed keys among 0..j.
        prefix = torch.nn.functional.pad(mask[..., 0, :].cumsum(-1), (1, 0))
        return prefix[..., (last + 1).clamp(0, lk)]
    seen = torch.arange(lk, device=device)[None, :] <= last[:, None]
    return (mask & seen).sum(-1)


def _count_allowed(bias: Tensor, mask: Tensor | None, last: Tensor | None) -> Tensor:
    """Keys per row where the bias is not −inf, the mask allows (any nonzero) and, given the last key each row
    sees (causal), j <= last_i; ``bias`` and ``mask`` broadcastable to (B, Hq, rows, S)."""
    allowed = ~torch.isneginf(bias)
    if mask is not None:
        allowed = allowed & (mask != 0)
    if last is not None:
        allowed = allowed & (torch.arange(bias.shape[-1], device=bias.device)[None, :] <= last[:, None])
    return allowed.sum(-1)


@dataclass(frozen=True)
class _Options:
    """The call's constants: NORM index, causal, scale, ε, POS0, the key position of query row 0, and what the forward
    saves for the backward's D_i (``residual``: ``NO_RESIDUAL``, ``RESIDUAL``, ``SPLIT_WEIGHTS``)."""

    norm: int
    causal: bool
    scale: float
    eps: float
    pos0: int
    residual: int = 0


@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def launch(self) -> dict[str, int]:
        # enable_fp_fusion: the kernels are written for multiply-adds fused into FFMAs (their exponents, dx), which
        # triton up to 3.9 does by default and 3.10 will not (it warns: TRITON_DEFAULT_FP_FUSION)
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "num_warps": self.num_warps,
                "num_stages": self.num_stages, "enable_fp_fusion": True}  # fmt: skip


def _configs(d: int, dv: int, dtype: torch.dtype, kind: int = NO_BIAS, norm: int = 0) -> dict[str, _Config]:
    """Tiles per kernel (``extrema`` is sa_norm's row_extrema pass). 16×16 in the interpreter (many partial
    blocks, fast enough). On a GPU, tiles for Hopper after Triton's fused-attention tutorial and
    FlashAttention-2 (forward: 128 query rows; dq: 128 rows × 32 keys; dk/dv: 32 rows × 128 keys, 64 × 128 at 8
    warps with a Kerple bias (``kind``) at head dims up to 64 for sa, 32 × 64 with a table; the forward at 2 stages with
    a bias tensor at head dims up to 64), smaller for wide heads and float32 (which stages twice the bytes);
    softmax (``norm`` 0) and sa_norm (``norm`` 2), bias-free or with ALiBi or Kerple (or a table, but for dk/dv),
    take the tiles timed fastest on an H100 or H200 (``_TUNED``), bias-free sa (``norm`` 1) softmax's.
    ``SASOFTMAX_TRITON_TILES=fwd:BMxBNxWxS,dq:...`` (names fwd, extrema, dq, dkdv) overrides them, in the
    interpreter too; benchmarks/triton_tune.py times candidates that way."""
    return dict(_tiles(d, dv, dtype, kind, norm, os.environ.get("SASOFTMAX_TRITON_TILES", ""), INTERPRET))


# Tiles timed fastest by benchmarks/triton_tune.py (N = 4096, bf16, causal and not; the forward's or backward's time
# with one kernel's tiles changed ÷ with the tiles before), 16-bit inputs, by head dim.
# sa_norm without a bias, on an H200 (2026-11-26, docs/gpu/2026-11-26-H200-15c93a2/tune*.md): fwd at D = 128 64×64 at
# 4 warps 0.95–0.98 (at D = 64 no candidate beat 128×64 in both causal and not); dq 64×32 at 4 warps 0.95–0.96
# (D = 64) and 0.86–0.88 (D = 128); dk/dv 64×64 at 4 warps 0.95–0.96 (D = 64), 32×64 at 4 warps 0.88–0.91
# (D = 128). On an H100 (2026-11-27, docs/gpu/2026-11-27-H100-c0d165b/tune*.md): row_extrema 64×16 at 4 warps 0.83
# of 64×32 (non-causal, D = 64; 128×64 at 8 warps before that: 64×32 was 0.85–0.91 of it on the H200); with a Kerple
# bias, causal, the same tiles won against the Kerple defaults (row_extrema 64×16 0.76 / 0.84 at D = 64 / 128, dq
# 64×32 0.97 / 0.86, dk/dv 0.92 / 0.92, fwd 64×64 0.98 / 0.97).
_SA_NORM_TUNED = {
    64: {"extrema": _Config(64, 16, 4, 3), "dq": _Config(64, 32, 4, 3), "dkdv": _Config(64, 64, 4, 3)},
    128: {"extrema": _Config(64, 16, 4, 3), "fwd": _Config(64, 64, 4, 3), "dq": _Config(64, 32, 4, 3),
          "dkdv": _Config(32, 64, 4, 3)},  # fmt: skip
}
# softmax without a bias, on an H100 (2026-11-27, docs/gpu/2026-11-27-H100-c0d165b/tune-softmax.md; causal / not):
# D = 64: fwd 128×64 at 8 warps 0.93 / 0.86, dq 64×64 at 4 warps 0.94 / 0.97, dk/dv 64×64 at 4 warps 0.84 / 0.96;
# D = 128: fwd 64×64 at 4 warps 0.91 / 1.01, dq 128×64 at 8 warps 0.77 / 0.78, dk/dv 32×64 at 4 warps 0.90 / 0.84.
_SOFTMAX_TUNED = {
    64: {"fwd": _Config(128, 64, 8, 3), "dq": _Config(64, 64, 4, 3), "dkdv": _Config(64, 64, 4, 3)},
    128: {"fwd": _Config(64, 64, 4, 3), "dq": _Config(128, 64, 8, 3), "dkdv": _Config(32, 64, 4, 3)},
}
_TIMED = {0: _SOFTMAX_TUNED, 2: _SA_NORM_TUNED}  # normalizer index -> its tuned tiles
_TUNED = {
    **{(norm, kind): tuned for norm, tuned in _TIMED.items() for kind in (NO_BIAS, ALIBI, KERPLE_LOG, KERPLE_POWER)},
    **{(norm, TABLE): {d: {name: c for name, c in tiles.items() if name != "dkdv"} for d, tiles in tuned.items()}
       for norm, tuned in _TIMED.items()},
    (1, NO_BIAS): _SOFTMAX_TUNED,
}  # fmt: skip
"""Tuned tiles by (normalizer index, bias kind), then head dim (up to 64, up to 128). sa without a bias takes
softmax's (its loops are softmax's with a multiply or two per score element; not timed): compiled for sm_90 at
D = 64, sa's own tiles spill in three of its loops (dk/dv 16 and 4 values per iteration, the forward's masked loop
22) and softmax's in none, at −5…+8% of the instructions per score element; at D = 128 dq counts 25% fewer. A
per-head bias (ALiBi,
Kerple) takes its normalizer's bias-free tiles: with Kerple, sa_norm's won against the Kerple defaults in every
kernel (above); softmax's with either bias and sa_norm's with ALiBi were not timed (compiled for sm_90, softmax with
Kerple on its tuned tiles spills nothing in its loops; per score element it counts 3–10% more instructions than on
the tiles before, but 18% fewer in dq at D = 128). A table (FIRE's) takes them too but for dk/dv, whose diagonal
sums keep their own tiles (not timed: the bias-free call it is measured against got faster, and the table's kernels
differ from it by one load per score element)."""


@functools.lru_cache(maxsize=256)
def _tiles(
    d: int, dv: int, dtype: torch.dtype, kind: int, norm: int, override: str, interpret: bool
) -> tuple[tuple[str, _Config], ...]:
    """``_configs`` as (name, config) pairs, cached per call signature, ``SASOFTMAX_TRITON_TILES`` value and
    ``interpret`` (INTERPRET: the tests switch it) (a call asks twice, forward and backward; building them cost a
    few µs of the host's time per layer and step)."""
    widest = max(d, dv)
    wide = dtype == torch.float32
    if interpret:
        tile = _Config(16, 16, 4, 1)
        configs = {"fwd": tile, "dq": tile, "dkdv": tile}
    elif widest <= 64 and not wide:
        configs = {"fwd": _Config(128, 64, 4, 3), "dq": _Config(128, 32, 4, 3), "dkdv": _Config(32, 128, 4, 3)}
    elif widest <= 128 and not wide:
        configs = {"fwd": _Config(128, 64, 8, 3), "dq": _Config(128, 32, 8, 2), "dkdv": _Config(32, 128, 8, 2)}
    elif widest <= 128:
        configs = {"fwd": _Config(64, 32, 4, 2), "dq": _Config(64, 32, 4, 2), "dkdv": _Config(32, 64, 4, 2)}
    else:
        configs = {"fwd": _Config(64, 32, 4, 2), "dq": _Config(64, 16, 4, 2), "dkdv": _Config(16, 64, 4, 2)}
    if kind in (KERPLE_LOG, KERPLE_POWER) and widest <= 64 and not wide and not interpret:
        # dk/dv with a Kerple bias and its r1, r2 gradients holds the bias's per-pair values besides dk, dv, k, v:
        # 32×128 at 4 warps spilled 212–348 values per iteration (sm_90, sa_norm, D = 64), 64×128 at 8 warps
        # 8–62, in 10–15% fewer instructions (compiled, not timed; ALiBi and bias-free calls spill ≤ 6 and keep
        # the default, which counts fewer there). Only sa keeps this: softmax and sa_norm take _TUNED.
        configs["dkdv"] = _Config(64, 128, 8, 2)
    if kind == BIAS_TENSOR and widest <= 64 and not wide and not interpret:
        # the forward stages the bias tensor's (rows × keys) float32 tile with k and v: at 3 stages it needed 128 KiB
        # of shared memory, one program per SM where registers allow two; 2 stages take 80 KiB (sm_90, not timed)
        configs["fwd"] = _Config(128, 64, 4, 2)
    if kind == TABLE and widest <= 128 and not wide and not interpret:
        # a table's gradient sums each tile's diagonals through a gather across the tile: 32 rows × 64 keys at 4
        # warps counted 44 / 50 instructions per score element at D = 64 / 128 (sm_90, sa_norm, bulk loop)
        # against the default's 54 / 60 (compiled, not timed)
        configs["dkdv"] = _Config(32, 64, 4, 3 if widest <= 64 else 2)
    # row_extrema keeps four running values per tile slot (see triton_kernels._extrema_tiles): the forward's 128×64
    # tile at 4 warps (head dims up to 64) would spill them; at 8 warps it holds them (compiled for sm_90: no
    # spills, fewer instructions per score element than 128×16, 64×32 or 128×32 tiles).
    configs["extrema"] = _Config(128, 64, 8, 3) if widest <= 128 and not wide and not interpret else configs["fwd"]
    if (norm, kind) in _TUNED and not wide and not interpret:
        configs.update(_TUNED[norm, kind].get(64 if widest <= 64 else 128 if widest <= 128 else 0, {}))
    for part in filter(None, override.split(",")):
        name, _, spec = part.partition(":")
        numbers = spec.split("x")
        if name not in configs or len(numbers) != 4 or not all(n.isdigit() and int(n) > 0 for n in numbers):
            raise ValueError(
                f"SASOFTMAX_TRITON_TILES: expected comma-separated NAME:BMxBNxWARPSxSTAGES with NAME in "
                f"{sorted(configs)} and positive integers; got {part!r}"
            )
        configs[name] = _Config(*(int(n) for n in numbers))
    return tuple(configs.items())


SECTION_HEADS_VARIABLE = "SASOFTMAX_TRITON_SECTION_HEADS"
"""Environment variable: heads per section of the causal schedule (``triton_kernels._scheduled``) for every kernel,
0 for grid order; unset, sized to the GPU's L2 cache (``_section_heads``). For benchmarks and tests."""


def _section_heads(per_head: int, heads: int, device: torch.device) -> int:
    """How many of a grid's ``heads`` (batch·heads) with ``per_head`` bytes each (what each of a head's programs
    reads: its k and v, or q and dO) a section of the causal schedule takes (``triton_kernels._scheduled``): the
    largest power of two whose bytes fit the GPU's L2 cache, as FlashAttention's LPT scheduler sizes its sections,
    so that the programs running at a time find them there; at least 1, at most ``heads`` (one section).
    ``SASOFTMAX_TRITON_SECTION_HEADS`` overrides it."""
    override = os.environ.get(SECTION_HEADS_VARIABLE, "")
    if override:
        if not override.isdigit():
            raise ValueError(f"{SECTION_HEADS_VARIABLE}: expected an integer >= 0 (0: grid order); got {override!r}")
        return min(int(override), heads)
    return min(_l2_section(per_head, device.index if device.type == "cuda" else None), heads)


L2_BYTES = 50 * 2**20
"""An H100's or H200's L2 cache: the size ``_section_heads`` assumes where the tensors are not on a GPU (the
interpreter, the compile tests) or torch does not report it (before 2.5)."""


@functools.lru_cache(maxsize=256)
def _l2_section(per_head: int, device_index: int | None) -> int:
    """``_section_heads`` without an override, cached per size and device."""
    l2 = L2_BYTES
    if device_index is not None:
        l2 = getattr(torch.cuda.get_device_properties(device_index), "L2_cache_size", 0) or L2_BYTES
    return 1 << (max(l2 // max(per_head, 1), 1).bit_length() - 1)


def _query_block_section(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, opt: _Options) -> int:
    """Heads per section for the kernels over query blocks (row_extrema, fwd, bwd_dq): the causal schedule for
    causal calls and masked ones (a mask may lie within the causal pattern), each head's programs all reading its k
    and v (a group's heads share theirs); 0, the grid's order, for the others. The call takes the schedule iff
    this is not 0 (bwd_dkdv then too, ``_backward``)."""
    if not opt.causal and mask is None:
        return 0
    kv_bytes = k.shape[2] * (k.shape[3] + v.shape[3]) * k.element_size() * k.shape[1] // q.shape[1]
    return _section_heads(kv_bytes, q.shape[0] * q.shape[1], q.device)


def _query_bytes(q: Tensor, dv: int) -> int:
    """Bytes per query head that every program of bwd_dkdv's key blocks reads: q, dO and the row pairs."""
    return q.shape[2] * ((q.shape[3] + dv) * q.element_size() + 8 * len(ROW_PAIRS))


_STAGES_THAT_FIT: dict[tuple[str, int, _Config], int] = {}
"""Pipeline stages that fit the GPU's shared memory, per (kernel, device, configuration) that needed fewer."""

_TRITON_VERSION = tuple(int(n) for n in re.findall(r"\d+", triton.__version__)[:2])
DIRECT_LAUNCH: bool = (3, 6) <= _TRITON_VERSION <= (3, 9)
"""Whether ``_launch`` may hand launches to Triton's compiled kernels itself: it relies on Triton's internals (its
specialisation rules, the compiled kernel's launcher and its arguments), checked for triton 3.6–3.9 only
(tests/triton_fake_driver.py); other versions launch every kernel through Triton's JIT."""

_COMPILED: dict[tuple, tuple[object, tuple]] = {}
"""Triton's compiled kernels on GPUs and the values of their constexpr parameters, by ``_launch``'s key: a launch
Triton compiled before goes straight to the compiled kernel's own launcher."""


def _launch(name: str, grid: tuple[int, ...], cfg: _Config, *args, **kwargs) -> None:
    """``kernels.<name>[grid](*args, **kwargs)`` with ``cfg``'s tiles, warps and stages (fewer stages where the GPU's
    shared memory cannot hold them, see ``_jit_launch``).

    On a GPU, from the second launch of a kernel with the same specialization on, without Triton's JIT launch path:
    its binder specialises every argument (~50 here) and keys its cache at each launch, ~26 µs of the host's time per
    launch on a development CPU (triton 3.6 and 3.9, benchmarks/triton_host.py on a faked GPU), against ~13 for this
    key and the compiled kernel's launcher. A call's forward and backward launch 3–4 kernels, and at seq 1k the
    harness GPT's training steps waited for the host (docs/triton.md, "Host time per call"). The key holds what
    Triton specialises on (``_specialized``) and the constexprs; the arguments reach the compiled kernel's launcher
    as Triton's own launch passes them."""
    if INTERPRET:
        _jit_launch(name, -1, grid, cfg, args, kwargs)
        return
    driver = triton.runtime.driver.active
    device = driver.get_current_device()
    kernel = getattr(kernels, name)
    if not DIRECT_LAUNCH or not isinstance(kernel, JITFunction):
        # (a stand-in for a kernel, as tests put in place to watch its launches, must see every launch)
        _jit_launch(name, device, grid, cfg, args, kwargs)
        return
    key = (name, device, cfg, *kwargs.items(), *map(_specialized, args))
    found = _COMPILED.get(key)
    if found is None:
        compiled = _jit_launch(name, device, grid, cfg, args, kwargs)
        if hasattr(compiled, "function") and not hasattr(compiled, "result"):  # not an asynchronous compilation
            # Triton's launch passes every parameter, the constexprs too (its launcher skips them): those after
            # the positional arguments are in the key, so the same for every launch that finds this entry.
            named = {**kwargs, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}
            _COMPILED[key] = compiled, tuple(named[param.name] for param in kernel.params[len(args) :])
        return
    compiled, constexprs = found
    values = (*args, *constexprs)
    stream = driver.get_current_stream(device)
    hooks = triton.knobs.runtime
    enter = hooks.launch_enter_hook
    metadata = None if enter is None else compiled.launch_metadata(grid, stream, *values)
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], grid_1, grid_2, stream, compiled.function, compiled.packed_metadata, metadata, enter,
                 hooks.launch_exit_hook, *values)  # fmt: skip


def _specialized(arg) -> object:
    """What Triton's launcher specialises a kernel argument on (triton 3.6–3.9, checked against its binder by
    tests/triton_fake_driver.py): a tensor's dtype and whether its address is 16-byte aligned; an integer's value
    where it is 1 (then a constant), else whether it is divisible by 16 and its type (i32, i64 or u64 by range);
    the type of anything else (floats are not specialised, None is a constant)."""
    kind = type(arg)  # (compared before isinstance: most arguments are integers, and this runs ~50 times a launch)
    if kind is int:
        return 1 if arg == 1 else (arg & 15 == 0, -(2**31) <= arg < 2**31, arg < 2**63)
    if kind is Tensor or isinstance(arg, Tensor):
        return arg.dtype, arg.data_ptr() & 15 == 0
    return kind


def _jit_launch(name: str, device: int, grid: tuple[int, ...], cfg: _Config, args: tuple, kwargs: dict):
    """Launch ``kernels.<name>`` through Triton's JIT (compiling on a first launch), returning its compiled kernel;
    with fewer pipeline stages where the GPU's shared memory cannot hold ``cfg``'s: the tiles are tuned for Hopper
    (228 KiB per SM); Ampere has 164, consumer cards ~100. The pipelining depth is all that is given up (tiles, and
    so the grid, stay); the number that fits is remembered per ``device`` (the current one; -1 in the interpreter).
    Triton raises OutOfResources when it loads the compiled kernel, before running it."""
    key = (name, device, cfg)
    stages = _STAGES_THAT_FIT.get(key, cfg.num_stages)
    while True:
        try:
            compiled = getattr(kernels, name)[grid](*args, **kwargs, **replace(cfg, num_stages=stages).launch())
            break
        except OutOfResources as err:
            if stages == 1 or err.name != "shared memory":
                raise
            stages -= 1
    if stages != cfg.num_stages:
        _STAGES_THAT_FIT[key] = stages
    return compiled


def _pad(dim: int) -> int:
    """The power of two from 16 up that holds ``dim`` (a tile's width for a head dim)."""
    return max(16, 1 << (dim - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ (triton.cdiv, a constexpr function since triton 3.5, cost ~4 µs a call of the host's time)."""
    return -(-a // b)


def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _contiguous_rows(t: Tensor) -> bool:
    """Whether each row (the last dimension) of t is contiguous, as the kernels' vector-wide loads and stores need."""
    return t.stride(-1) == 1 or t.shape[-1] == 1


def _row_strides(t: Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, N, D) tensor the backward kernels read or write row by row."""
    assert _contiguous_rows(t), f"rows must be contiguous; strides {t.stride()}"
    return t.stride(0), t.stride(1), t.stride(2)


def _output(q: Tensor, dv: int, dtype: torch.dtype) -> Tensor:
    """An empty o (B, Hq, L, Dv) in (B, L, Hq, Dv) memory order, as PyTorch's CUDA SDPA kernels return theirs: a
    model's o.transpose(1, 2).reshape(B, L, Hq·Dv) is then a view, and the gradient it hands back comes in the
    same order, which the backward reads as it is. (On an H100 the harness GPT made 11 more copies per layer and
    step than with SDPA; the layouts of o and of dq, dk, dv account for four of them, traced on CPU.)"""
    b, hq, lq, _ = q.shape
    return q.new_empty((b, lq, hq, dv), dtype=dtype).transpose(1, 2)


def _gradient_like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An empty gradient of x in x's memory order where x is dense with contiguous rows (so the autograd views
    between x and its source take it without a copy), else contiguous."""
    if _contiguous_rows(x):
        return torch.empty_like(x, dtype=dtype)  # (preserve_format: x's strides where x is dense)
    return torch.empty(x.shape, device=x.device, dtype=dtype or x.dtype)


def _rows_contiguous(t: Tensor) -> Tensor:
    """t itself where its rows are contiguous, else a contiguous copy."""
    return t if _contiguous_rows(t) else t.contiguous()


def _broadcast_args(t: Tensor | None, placeholder: Tensor) -> tuple:
    """Pointer and (B, Hq, L, S) strides of a mask or bias view; any tensor and zero strides for None."""
    if t is None:
        return (placeholder, 0, 0, 0, 0)
    return (t, *t.stride())


def _power_of_two(scale: float) -> bool:
    """Whether multiplying by ``scale`` is exact in floating point (a positive power of two, as 1/√D is for D = 16,
    64, 256): ``row_extrema`` then finds the extrema of q·kᵀ and scales them after."""
    return scale > 0 and math.frexp(scale)[0] == 0.5


def _qk_scaled(kind: int, scale: float) -> bool:
    """Whether ``row_extrema``, ``fwd`` and ``bwd_dq`` take q times the scale into q·kᵀ (``QK_SCALED``): with an
    ALiBi or Kerple bias and a power-of-two scale, where that saves a multiply per score (sm_90, D = 64, bulk loops:
    ~1 instruction per score element in each of the three). Not for tables (their bulk loops gain as much, but the
    forward's masked loop then spills ~120 values per iteration: the diagonal tiles, and every tile of a head
    whose table holds a −inf), nor ``bwd_dkdv`` (k scaled in registers cost it more than the multiply)."""
    return kind in PARAMETRIC and _power_of_two(scale)


def _exact(q: Tensor) -> bool:
    """float32 inputs: the backward recomputes probabilities from μ and 1/ℓ (``triton_kernels._probs``)."""
    return q.dtype == torch.float32


def _precision(k: Tensor) -> str | None:
    # float32 inputs get exact float32 products (no TF32), as the eager reference computes them;
    # None keeps the platform default (TF32 for the float32 dx products of float16 sa_norm).
    return "ieee" if k.dtype == torch.float32 else None


def _common_args(
    q, k, t, mask, mask_causal, bias, kind, r1, r2, opt: _Options, none: Tensor
) -> tuple[tuple, tuple, dict]:
    """What every kernel takes: (t, r1, r2) as contiguous float32 tensors (``none`` where absent); the mask's and
    bias's pointers and strides (a table's in the bias slots: see ``triton_kernels``), the forward's
    ``_mask_within_causal`` flag, then H, GROUPS, L, S, POS0 and the scale; and the constexpr flags."""
    t_arg = none if t is None else t.contiguous()
    b, hq, lq, d = q.shape
    if kind == TABLE:
        table = _diagonal_table(r1, lq, k.shape[2], opt.pos0)
        bias_args = (table, 0, table.stride(0), k.shape[2] - 1, 1)
        r1 = None
    else:
        bias_args = _broadcast_args(bias, q)
    r1_arg = none if r1 is None else r1.float().contiguous()
    r2_arg = none if r2 is None else r2.float().contiguous()
    views = (*_broadcast_args(mask, q), mask_causal, *bias_args, hq, hq // k.shape[1], lq, k.shape[2])
    flags = {"CAUSAL": opt.causal, "HAS_MASK": mask is not None, "BIAS_KIND": kind, "HAS_SSMAX": t is not None}
    all_masked = mask is not None or kind == BIAS_TENSOR  # a bias tensor's −inf entries mask (a table's: per head)
    flags.update(ALL_MASKED=all_masked, PRECISION=_precision(k), D=d, D_PAD=_pad(d))
    return (t_arg, r1_arg, r2_arg), (*views, opt.pos0, opt.scale), flags


def _mask_within_causal(mask: Tensor, pos0: int) -> Tensor:
    """(1,) int32 on the mask's device, 1 where no query i may attend a key j > i + pos0 (the mask lies within the
    causal pattern: transformers folds causality into its masks), so that the kernels skip the tiles a causal call
    would (``triton_kernels._visited_keys``). ``mask`` is the kernels' (B, Hq, L, S) view; its broadcast axes
    are read once, not expanded. No host sync; four small kernels, once per call: the forward saves the flag for
    the backward (``_Saved.mask_causal``)."""
    *_, lq, lk = mask.shape
    if mask.stride(-2) == 0 and lq > 1:  # one row of keys for every query (key padding) cannot lie within it
        return torch.zeros(1, device=mask.device, dtype=torch.int32)
    index = tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride()[:2])
    return mask[index].triu(pos0 + 1).any().logical_not().int().reshape(1)


def _diagonal_index(n: int, lq: int, lk: int, pos0: int, device: torch.device) -> Tensor:
    """The table index min(|i + pos0 − j|, n − 1) of each diagonal i − j + S − 1 of a call, (L + S − 1,) int64."""
    return (torch.arange(lq + lk - 1, device=device) + (pos0 - lk + 1)).abs().clamp_max(n - 1)


def _diagonal_table(table: Tensor, lq: int, lk: int, pos0: int) -> Tensor:
    """A table bias (Hq, n) as the kernels read it: P (Hq, L + S) float32 with one entry per diagonal of the call,
    P[h, i − j + S − 1] = table[h, min(|i + pos0 − j|, n − 1)] (so that the kernels index it without an absolute
    value or a clamp per pair), and P[h, L + S − 1] = 1 where head h's entries hold a −inf (its tiles then all
    take the masked path: ``triton_kernels._table_masks``), else 0."""
    entries = table.detach().float()[:, _diagonal_index(table.shape[1], lq, lk, pos0, table.device)]
    return torch.cat([entries, torch.isneginf(entries).any(1, keepdim=True).float()], 1)


@dataclass
class _Saved:
    """Per-row statistics of a forward, (B·Hq, L) each (empty placeholders where a normalizer or dtype needs
    none). The backward recomputes p = e^{x − shift}·inv_l: shift is the logsumexp and inv_l empty for 16-bit
    inputs; for float32 inputs shift is the row max μ and inv_l = 1/ℓ (see ``triton_kernels._probs``).
    ``t_rows``: SSMax's t where the kernels computed it from s. ``mask_causal``: ``_mask_within_causal``'s (1,)
    int32 flag for a masked call without causal masking (empty otherwise), computed once for both directions.
    ``o_lo``: (B·Hq, L, Dv) in o's dtype, o's rounding residual where ``_Options.residual`` asks for one (empty
    otherwise): the backward's D_i = dO_i·o_i must be the float32 o's (``triton_kernels.bwd_dq``).
    """

    shift: Tensor
    inv_l: Tensor
    low: Tensor
    inv_delta: Tensor
    argmin: Tensor
    argmax: Tensor
    t_rows: Tensor
    mask_causal: Tensor
    o_lo: Tensor


def _forward(q, k, v, o, t, mask, bias, kind, r1, r2, opt: _Options, s: Tensor | None = None) -> _Saved:
    """Run the forward kernels, writing o (B, Hq, L, Dv) in place; returns the saved row statistics.

    ``t``: (B, Hq, L) float32 or None; or ``s``, SSMax's (Hq,) scale, where the kernels compute t themselves
    (``_counts_closed_form``) and save it as ``t_rows``; ``mask``: uint8 (B, Hq, L, S) view or None; ``bias``:
    (B, Hq, L, S) view (kind BIAS_TENSOR) or None; ``r1``/``r2``: (Hq,) float32 (PARAMETRIC kinds) or None;
    ``r1`` an (Hq, n) table (kind TABLE).
    """
    b, hq, lq, d = q.shape
    dv = v.shape[3]
    exact, sa_norm = _exact(q), opt.norm == 2

    def per_row(needed: bool, dtype: torch.dtype = torch.float32) -> Tensor:
        """(B·Hq, L), or an empty placeholder where not ``needed``: a distinct tensor either way (operator outputs
        must not alias each other)."""
        return torch.empty((b * hq, lq) if needed else (0,), device=q.device, dtype=dtype)

    masked = mask is not None and not opt.causal  # (a mask may lie within the causal pattern: transformers')
    mask_causal = _mask_within_causal(mask, opt.pos0) if masked else per_row(False, torch.int32)
    residual = opt.residual != NO_RESIDUAL and not exact  # (float32: the kernels' o is the float32 o)
    o_lo = o.new_empty((b * hq, lq, dv) if residual else (0,))
    saved = _Saved(per_row(True), per_row(exact), per_row(sa_norm), per_row(sa_norm), per_row(sa_norm, torch.int32),
                   per_row(sa_norm, torch.int32), per_row(s is not None), mask_causal, o_lo)  # fmt: skip
    none = per_row(False)  # where a kernel's pointer argument has nothing to point to
    configs = _configs(d, dv, q.dtype, kind, opt.norm)
    factor = t if s is None else s.float()
    (t_arg, r1_arg, r2_arg), common, flags = _common_args(
        q, k, factor, mask, mask_causal, bias, kind, r1, r2, opt, none
    )
    flags.update(T_FROM_S=s is not None, QK_SCALED=_qk_scaled(kind, opt.scale))
    section = _query_block_section(q, k, v, mask, opt)  # (the causal schedule: triton_kernels._scheduled)
    flags.update(SCHEDULED=section > 0)
    mu = none
    if sa_norm or exact:
        # sa_norm needs the row's max and min before its weights are known. float32 inputs of every normalizer
        # take the max first too, so that ℓ is summed without rescaling, as torch.softmax sums it: the
        # backward's p are divided by this ℓ, and its rounding moves all p of a row alike (~5 ulps online).
        # sa_norm's min and argmin/argmax too (MIN_AND_ARGS).
        mu = per_row(True)
        cfg = configs["extrema"]
        _launch(
            "row_extrema", (_cdiv(lq, cfg.block_m), b * hq), cfg,
            q, k, t_arg, mu, saved.low, saved.inv_delta, saved.argmin, saved.argmax, r1_arg, r2_arg,
            *_strides(q), *_strides(k), *common, opt.eps, section, MIN_AND_ARGS=sa_norm,
            RAW_QK=kind == NO_BIAS and (factor is None or opt.norm == 2) and _power_of_two(opt.scale), EXACT=exact,
            **flags,
        )  # fmt: skip
    cfg = configs["fwd"]
    _launch(
        "fwd", (_cdiv(lq, cfg.block_m), b * hq), cfg,
        q, k, v, o, saved.o_lo, saved.shift, saved.inv_l, t_arg, saved.t_rows, mu, saved.low, saved.inv_delta,
        saved.argmax, saved.argmin, r1_arg, r2_arg,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *common, section,
        NORM=opt.norm, EXACT=exact, O_LO=residual, W_LO=residual and opt.residual == SPLIT_WEIGHTS, DV=dv,
        DV_PAD=_pad(dv), **flags,
    )  # fmt: skip
    return saved


def _backward(
    q,
    k,
    v,
    o,
    do,
    t,
    mask,
    bias,
    kind,
    r1,
    r2,
    saved: _Saved,
    opt: _Options,
    bias_grad: bool,
    kv_grad_dtype: torch.dtype | None = None,
    ds: bool = False,
):
    """dq, dk, dv (in the inputs' dtypes, or dk/dv in ``kv_grad_dtype``), dL/dt ((B, Hq, L) float32 or None;
    with ``ds``, where t = s·ln(n) has ``_counts_closed_form``, dL/ds (Hq,) float32) and the bias gradient:
    dL/dbias (B, Hq, L, S) float32 for a bias tensor, (dL/dr1, dL/dr2) per head for PARAMETRIC kinds,
    (dL/dtable,) (Hq, n) for a table, None without ``bias_grad``. o and do (B, Hq, L, Dv) with contiguous rows;
    dq, dk, dv in the memory order of q, k, v (``_gradient_like``)."""
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    configs = _configs(d, dv, q.dtype, kind, opt.norm)
    none = torch.empty(0, device=q.device, dtype=torch.float32)
    rows = torch.empty(len(ROW_PAIRS), b * hq * lq, device=q.device, dtype=torch.int64)  # bwd_dq -> bwd_dkdv
    query_blocks = _cdiv(lq, configs["dq"].block_m)
    # dL/dt per row, or with ``ds`` one partial Σ_i dL/dt_i·ln(n_i) per dq program
    dt = none
    if t is not None:
        dt = torch.empty((query_blocks, b * hq) if ds else (b * hq, lq), device=q.device, dtype=torch.float32)
    dq = _gradient_like(q)
    dk = _gradient_like(k, kv_grad_dtype)
    dv_ = _gradient_like(v, kv_grad_dtype)
    (t_arg, r1_arg, r2_arg), common, flags = _common_args(
        q, k, t, mask, saved.mask_causal, bias, kind, r1, r2, opt, none
    )
    inputs = (*_strides(q), *_strides(k), *_strides(v))
    # sa_norm's dx carries 1/(M − m + ε), up to 1/ε, beyond float16's range: its products run in float32.
    flags.update(NORM=opt.norm, DX_FP32=opt.norm == 2 and k.dtype == torch.float16, DV=dv, DV_PAD=_pad(dv))
    scatter = opt.norm == 2 and _min_term_scattered(lk)
    flags.update(EXACT=_exact(q), BIAS_GRAD=bias_grad, LOW_SCATTER=scatter)
    cfg_dq, cfg = configs["dq"], configs["dkdv"]
    if kind == TABLE and cfg.block_m > cfg.block_n:
        raise ValueError(f"SASOFTMAX_TRITON_TILES: a table bias needs dkdv tiles with BLOCK_M <= BLOCK_N; got {cfg}")
    key_blocks = _cdiv(lk, cfg.block_n)
    # Scattered, bwd_dq adds the min terms' part of dk into dk_low, which bwd_dkdv adds to its own (float32, zeroed).
    dk_low = torch.zeros(b, hkv, lk, d, device=q.device, dtype=torch.float32) if scatter else none
    # ALiBi/Kerple's dL/dr1, dL/dr2: one partial sum per dk/dv program and head, and, scattered, one per dq program
    # (its min terms) after them.
    parametric = bias_grad and kind in PARAMETRIC
    partials = key_blocks + (query_blocks if scatter else 0)
    dr = torch.empty(partials, b, hq, 2, device=q.device, dtype=torch.float32) if parametric else none
    # zeros: the kernel writes only the tiles causal masking leaves visible, and adds into a table's gradient
    dbias = none
    if bias_grad and kind == BIAS_TENSOR:
        dbias = torch.zeros(b, hq, lq, lk, device=q.device, dtype=torch.float32)
    elif bias_grad and kind == TABLE:  # along the diagonals (_diagonal_table), folded onto the table below
        _alert_not_deterministic("sasoftmax's Triton backward of a table bias (FIRE's: atomic adds)", q.device)
        dbias = torch.zeros(b, hq, lq + lk, device=q.device, dtype=torch.float32)
    kv_section = _query_block_section(q, k, v, mask, opt)  # (the causal schedule, as in _forward)
    q_section = _section_heads(_query_bytes(q, dv) * (hq // hkv), b * hkv, q.device) if kv_section else 0
    flags.update(SCHEDULED=kv_section > 0)
    _launch(
        "bwd_dq", (query_blocks, b * hq), cfg_dq,
        q, k, v, o, saved.o_lo, do, dq, saved.shift, saved.inv_l, t_arg, saved.low, saved.inv_delta, saved.argmin,
        saved.argmax, rows, dt, dk_low, r1_arg, r2_arg, dr[key_blocks:] if parametric and scatter else none, dbias,
        *inputs, *_row_strides(o), *_row_strides(do), *_row_strides(dq), *common, kv_section, DS_PARTIALS=ds,
        QK_SCALED=_qk_scaled(kind, opt.scale), O_LO=saved.o_lo.dim() == 3, **flags,
    )  # fmt: skip
    _launch(
        "bwd_dkdv", (key_blocks, b * hkv), cfg,
        q, k, v, do, dk, dv_, rows, saved.inv_l, dk_low, r1_arg, r2_arg, dr, dbias, *inputs, *_row_strides(do),
        *_row_strides(dk), *_row_strides(dv_), *common, q_section, **flags,
    )  # fmt: skip
    bias_grads = None
    if bias_grad:
        if kind == BIAS_TENSOR:
            if scatter:  # the min terms' dL/dz, one per row at its argmin (bwd_dkdv wrote its tiles whole)
                g_low = row_value(rows, "g_m")
                dz_low = g_low if t is None else g_low * t.reshape(-1)
                dbias.view(b * hq * lq, lk).scatter_add_(
                    1, saved.argmin.view(-1, 1).clamp_min(0).long(), dz_low.view(-1, 1)
                )
            bias_grads = dbias
        elif kind == TABLE:
            index = _diagonal_index(r1.shape[1], lq, lk, opt.pos0, q.device)
            folded = torch.zeros(hq, r1.shape[1], device=q.device, dtype=torch.float32)
            bias_grads = (folded.index_add_(1, index, dbias.sum(0)[:, :-1]),)
        else:
            bias_grads = tuple(g.clone() for g in dr.sum((0, 1)).unbind(-1))
    if t is not None:
        dt = dt.view(-1, b, hq).sum((0, 1)) if ds else dt.view(b, hq, lq)
    return dq, dk, dv_, (dt if t is not None else None), bias_grads


ROW_PAIRS = (("shift", "D"), ("m", "c"), ("argmax", "t"), ("argmin", "g_m"))
"""What ``bwd_dq`` writes per row for ``bwd_dkdv``: ``rows[i]`` (B·Hq·L int64) holds pair i, two 32-bit values, the
first in the low half (triton_kernels.SHIFT_D … ARGMIN_GLOW): D_i = dO_i·o_i, sa_norm's m, c, argmax, argmin and
min-term weight g_m = (D_i − E_i)·c, SSMax's t; those the call's flags need."""


def row_value(rows: Tensor, name: str) -> Tensor:
    """One value of ``ROW_PAIRS`` for every row, (B·Hq·L,), as float32 (int32 for argmax/argmin); the halves of
    an int64 lie low first on the little-endian machines CUDA and the interpreter run on."""
    pair = next(i for i, names in enumerate(ROW_PAIRS) if name in names)
    dtype = torch.int32 if name.startswith("arg") else torch.float32
    return rows[pair].view(dtype)[ROW_PAIRS[pair].index(name) :: 2]


MIN_TERM_SCATTER_KEYS = 4096
"""From this many keys on, sa_norm's min term reaches dk through ``bwd_dq`` (``LOW_SCATTER``, see
``triton_kernels``): it costs a (B, Hkv, S, D) float32 buffer's fill and read and L·D atomic adds per head, O(N),
against ~4 instructions per score element of the dk/dv loop, O(N²); an estimate puts the break-even near 4k keys
(docs/triton.md). ``SASOFTMAX_TRITON_MIN_TERM=tile|scatter`` forces either (to measure, and in the tests)."""


def _min_term_scattered(keys: int) -> bool:
    """Whether sa_norm's min term goes to dk through bwd_dq's atomics (see MIN_TERM_SCATTER_KEYS): never under
    ``torch.use_deterministic_algorithms(True)`` unless forced (float32 atomic adds arrive in no fixed order, so dk's
    last bits would vary from run to run; the tile way sums in a fixed order), as FlashAttention's backward takes
    its deterministic way there."""
    forced = os.environ.get("SASOFTMAX_TRITON_MIN_TERM", "")
    if forced not in ("", "tile", "scatter"):
        raise ValueError(f"SASOFTMAX_TRITON_MIN_TERM must be 'tile' or 'scatter' (or unset); got {forced!r}")
    if forced:
        return forced == "scatter"
    return keys >= MIN_TERM_SCATTER_KEYS and not torch.are_deterministic_algorithms_enabled()


def _alert_not_deterministic(caller: str, device: torch.device) -> None:
    """What PyTorch's own operators do under ``torch.use_deterministic_algorithms(True)`` where they have no
    deterministic way: raise (or with ``warn_only=True`` warn). On CUDA only: the interpreter adds in order."""
    if device.type != "cuda" or not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        f"{caller} does not have a deterministic implementation, but you set "
        "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this operation, or "
        "you can use the 'warn_only=True' option, if that's acceptable for your application."
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
        return
    raise RuntimeError(message)


def _reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a (B, Hq, L, S) gradient over the axes ``like`` (broadcastable to it) broadcasts along."""
    shape = (1,) * (4 - like.dim()) + tuple(like.shape)
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if dims:  # (sum over an empty tuple of dims would sum everything)
        grad = grad.sum(dims, keepdim=True)
    return grad.view(like.shape).to(like.dtype)


# The kernels as PyTorch custom operators: torch.compile (fullgraph too) and torch.export see one opaque operator
# per direction, with fake (meta) implementations for tracing and the forward's autograd formula calling the
# backward operator (which has none: a double backward raises). Eager calls take ``_EagerAttention``, which runs
# the same two functions (``_forward_op``, ``_backward_op``) and the same autograd formula (``_gradients``).
def _forward_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    t: Tensor | None,
    s: Tensor | None,
    mask: Tensor | None,
    bias: Tensor | None,
    kind: int,
    r1: Tensor | None,
    r2: Tensor | None,
    norm: int,
    causal: bool,
    scale: float,
    eps: float,
    pos0: int,
    residual: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One forward. ``t`` (B, Hq, L) SSMax factors, or ``s`` (Hq,) SSMax's scale where the kernels may compute
    t themselves (``_counts_closed_form``), or neither; ``mask`` bool and ``bias`` (kind BIAS_TENSOR)
    broadcastable to (B, Hq, L, S); PARAMETRIC kinds read ``r1``, ``r2`` (Hq,), a TABLE ``r1`` (Hq, n);
    ``residual``: what a 16-bit forward saves for the backward (``_residual``). Returns o (B, Hq, L, Dv;
    ``_output``'s memory order) and the saved row statistics of ``_Saved``: shift, 1/ℓ, m, 1/δ (float32), argmin,
    argmax (int32) and t (float32, with ``s``), each (B·Hq, L) (empty where the normalizer, dtype or SSMax needs
    none), whether the mask lies within the causal pattern (``_mask_within_causal``) and o's rounding residual
    (``_Saved.o_lo``)."""
    o = _output(q, v.shape[3], v.dtype)
    opt = _Options(norm, causal, scale, eps, pos0, residual)
    saved = _forward(q, k, v, o, t, *_views(q, k, mask, bias), kind, r1, r2, opt, s=s)
    return (o, saved.shift, saved.inv_l, saved.low, saved.inv_delta, saved.argmin, saved.argmax, saved.t_rows,
            saved.mask_causal, saved.o_lo)  # fmt: skip


triton_forward = torch.library.custom_op("sasoftmax::triton_forward", _forward_op, mutates_args=())


@triton_forward.register_fake
def _(q, k, v, t, s, mask, bias, kind, r1, r2, norm, causal, scale, eps, pos0, residual):
    b, hq, lq, _ = q.shape
    rows = (b * hq, lq) if norm == 2 else (0,)
    o = _output(q, v.shape[3], v.dtype)
    shift = q.new_empty((b * hq, lq), dtype=torch.float32)
    inv_l = q.new_empty((b * hq, lq) if _exact(q) else (0,), dtype=torch.float32)
    stats = [q.new_empty(rows, dtype=dtype) for dtype in (torch.float32, torch.float32, torch.int32, torch.int32)]
    t_rows = q.new_empty((b * hq, lq) if s is not None else (0,), dtype=torch.float32)
    mask_causal = q.new_empty((1,) if mask is not None and not causal else (0,), dtype=torch.int32)
    o_lo = q.new_empty((b * hq, lq, v.shape[3]) if residual and not _exact(q) else (0,), dtype=v.dtype)
    return o, shift, inv_l, *stats, t_rows, mask_causal, o_lo


def _backward_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    t: Tensor | None,
    s: Tensor | None,
    mask: Tensor | None,
    bias: Tensor | None,
    kind: int,
    r1: Tensor | None,
    r2: Tensor | None,
    norm: int,
    causal: bool,
    scale: float,
    eps: float,
    pos0: int,
    o: Tensor,
    grad_out: Tensor,
    shift: Tensor,
    inv_l: Tensor,
    low: Tensor,
    inv_delta: Tensor,
    argmin: Tensor,
    argmax: Tensor,
    t_rows: Tensor,
    mask_causal: Tensor,
    o_lo: Tensor,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward of :func:`triton_forward`: dq, dk, dv (the inputs' dtypes), dL/dt (t's shape) or dL/ds
    (s's shape and dtype), dL/dbias
    (bias's shape) and dL/dr1, dL/dr2 ((Hq,) in their dtypes); empty tensors for what does not exist or (bias
    gradients) was not asked for with ``bias_grad``."""
    opt = _Options(norm, causal, scale, eps, pos0)
    do = _rows_contiguous(grad_out.to(v.dtype))
    saved = _Saved(shift, inv_l, low, inv_delta, argmin, argmax, t_rows, mask_causal, o_lo)
    if s is not None:
        t = t_rows.view(q.shape[0], q.shape[1], q.shape[2])
    dq, dk, dv, dt, bias_grads = _backward(
        q, k, v, o, do, t, *_views(q, k, mask, bias), kind, r1, r2, saved, opt, bias_grad, ds=s is not None
    )
    if s is not None:
        dt = dt.to(s.dtype)

    def empty() -> Tensor:  # a fresh one each time: operator outputs must not alias each other
        return q.new_empty((0,), dtype=torch.float32)

    dbias, dr1, dr2 = empty(), empty(), empty()
    if bias_grad and kind == BIAS_TENSOR:
        dbias = _reduce_to(bias_grads, bias)
    elif bias_grad:
        dr1 = bias_grads[0].to(r1.dtype)
        if kind in (KERPLE_LOG, KERPLE_POWER):
            dr2 = bias_grads[1].to(r2.dtype)
    return dq, dk, dv, (dt if dt is not None else empty()), dbias, dr1, dr2


triton_backward = torch.library.custom_op("sasoftmax::triton_backward", _backward_op, mutates_args=())


@triton_backward.register_fake
def _(q, k, v, t, s, mask, bias, kind, r1, r2, norm, causal, scale, eps, pos0, o, grad_out, shift, inv_l, low,
      inv_delta, argmin, argmax, t_rows, mask_causal, o_lo, bias_grad):  # fmt: skip
    def empty():
        return q.new_empty((0,), dtype=torch.float32)

    if s is not None:
        dt = torch.empty_like(s)
    else:
        dt = q.new_empty(t.shape, dtype=torch.float32) if t is not None else empty()
    dbias = torch.empty_like(bias) if bias_grad and kind == BIAS_TENSOR else empty()
    dr1 = torch.empty_like(r1) if bias_grad and kind > BIAS_TENSOR else empty()
    dr2 = torch.empty_like(r2) if bias_grad and kind in (KERPLE_LOG, KERPLE_POWER) else empty()
    return _gradient_like(q), _gradient_like(k), _gradient_like(v), dt, dbias, dr1, dr2


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, t, s, mask, bias, kind, r1, r2, *options, _residual = inputs
    ctx.save_for_backward(q, k, v, t, s, mask, bias, r1, r2, *output)
    # The row statistics are for the backward only: no gradient flows to them, and none is made of zeros for them
    # (six fills per backward otherwise).
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.kind, ctx.options = kind, options


def _gradients(ctx, grad_out: Tensor | None, backward) -> tuple:
    """The gradients of the forward's 16 inputs, from ``backward`` (the operator, or ``_backward_op`` itself)."""
    q, k, v, t, s, mask, bias, r1, r2, o, *stats = ctx.saved_tensors
    kind, need = ctx.kind, ctx.needs_input_grad
    bias_grad = (kind == BIAS_TENSOR and need[6]) or (kind > BIAS_TENSOR and (need[8] or need[9]))
    if grad_out is None:
        grad_out = torch.zeros_like(o)
    dq, dk, dv, dt, dbias, dr1, dr2 = backward(
        q, k, v, t, s, mask, bias, kind, r1, r2, *ctx.options, o, grad_out, *stats, bias_grad
    )
    return (dq, dk, dv, dt if t is not None else None, dt if s is not None else None, None,
            dbias if kind == BIAS_TENSOR and bias_grad else None, None,
            dr1 if kind > BIAS_TENSOR and bias_grad else None,
            dr2 if kind in (KERPLE_LOG, KERPLE_POWER) and bias_grad else None,
            None, None, None, None, None, None)  # fmt: skip


def _backward_formula(ctx, grad_out: Tensor | None, *_unused_stat_grads) -> tuple:
    return _gradients(ctx, grad_out, torch.ops.sasoftmax.triton_backward)


triton_forward.register_autograd(_backward_formula, setup_context=_setup_context)


# Eager calls: the same functions and formula without the operators' dispatch and autograd glue. Through the
# operators the harness GPT at seq 1k was host-bound on an H200 machine (2026-11-26: a step's host time equalled its
# 64 ms with the device busy 46–49 ms of them; the SDPA model's host took 41 ms), and under torch.profiler the
# forward operator's autograd node took 0.6–0.9 ms of CPU time of its own per layer and backward, the backward
# operator 0.6 ms (all driver launches of a step: 2.5 ms). On a development CPU, launches stubbed out, a sa_norm
# call's forward and backward took 222 µs through the operators, 107 µs through this.
_EagerAttention = eager_twin("TritonAttention", _forward_op, _backward_op, _setup_context, _gradients)


def _views(q: Tensor, k: Tensor, mask: Tensor | None, bias: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The mask as a uint8 and the bias as a (B, Hq, L, S) view: stride 0 where they broadcast, nothing copied."""
    b, hq, lq, _ = q.shape
    full = (b, hq, lq, k.shape[2])
    mask = None if mask is None else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(full)
    bias = None if bias is None else bias.detach().reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(full)
    return (None if mask is None else mask.view(torch.uint8)), bias


def _chunk_rows(call_shape: tuple[int, ...], lk: int) -> int:
    """Query rows per block for a bias function: its (B·Hq, rows, S) float32 values, the kernels' bias
    gradient of that size and the function's own intermediates (FIRE's per-pair MLP holds ~32 values per pair)
    fit ``BIAS_FUNCTION_BUDGET``. Whole 128-row tiles where the budget allows (each block is a kernel call
    over all S keys: a block of a few rows leaves the GPU's tiles and SMs mostly idle), else multiples of 16."""
    b, hq = call_shape
    per_row = lk * 4 * (2 * b * hq + 64)
    rows = BIAS_FUNCTION_BUDGET // per_row
    return rows // 128 * 128 if rows >= 128 else max(16, rows // 16 * 16)


class _BiasFunctionAttention(torch.autograd.Function):
    """A bias function evaluated for one block of query rows at a time, each block one kernel call with
    that block's bias tensor (forward), re-evaluated with grad in the backward to reach the function's
    parameters. Memory O(rows·S) for the block, O(L) for the rest."""

    @staticmethod
    def forward(ctx, q, k, v, ssmax, fn, mask, opt: _Options, *params):
        b, hq, lq, _ = q.shape
        lk = k.shape[2]
        o = _output(q, v.shape[3], v.dtype)
        step = _chunk_rows((b, hq), lk)
        chunks, saved = [], []
        for start in range(0, lq, step):
            rows = slice(start, min(start + step, lq))
            with torch.no_grad():
                bias = _block_bias(fn, q, k, rows, opt)
                t = _block_factor(ssmax, mask, bias, rows, opt, q, k)
            chunk_opt = _block_options(opt, rows)
            mask_rows = None if mask is None else mask[:, :, rows]
            block = (q[:, :, rows], k, v, o[:, :, rows], t, mask_rows, bias, BIAS_TENSOR, None, None, chunk_opt)
            saved.append(_forward(*block))
            chunks.append(rows)
        ctx.save_for_backward(q, k, v, o, ssmax)
        ctx.fn, ctx.mask, ctx.opt, ctx.chunks, ctx.stats, ctx.params = fn, mask, opt, chunks, saved, params
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, o, ssmax = ctx.saved_tensors
        opt, mask, params = ctx.opt, ctx.mask, ctx.params
        do = _rows_contiguous(grad_out.to(v.dtype))
        dq = _gradient_like(q)
        dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
        ds = None if ssmax is None else torch.zeros(ssmax.shape, device=q.device, dtype=torch.float32)
        dparams = [torch.zeros_like(p) for p in params]
        for rows, saved in zip(ctx.chunks, ctx.stats):
            with torch.enable_grad():
                bias = _block_bias(ctx.fn, q, k, rows, opt, detach=False)
            with torch.no_grad():
                t, log_n = _block_factor(ssmax, mask, bias, rows, opt, q, k, with_log_n=True)
            mask_rows = None if mask is None else mask[:, :, rows]
            dq_c, dk_c, dv_c, dt, dbias = _backward(
                q[:, :, rows], k, v, o[:, :, rows], do[:, :, rows], t, mask_rows,
                bias.detach(), BIAS_TENSOR, None, None, saved, _block_options(opt, rows), bias_grad=bool(params),
                kv_grad_dtype=torch.float32,  # blocks' dk, dv summed in float32
            )  # fmt: skip
            dq[:, :, rows] = dq_c
            dk += dk_c
            dv += dv_c
            if ds is not None:
                ds += (dt * log_n).sum((0, 2))
            if params:
                for acc, g in zip(dparams, torch.autograd.grad(bias, params, dbias, allow_unused=True)):
                    if g is not None:
                        acc += g
        return (dq, dk.to(k.dtype), dv.to(v.dtype), None if ds is None else ds.to(ssmax.dtype), None, None, None,
                *dparams)  # fmt: skip


def _block_options(opt: _Options, rows: slice) -> _Options:
    """The options of a block of query rows starting at ``rows.start``: its row 0 sits at POS0 + start."""
    return replace(opt, pos0=opt.pos0 + rows.start)


def _block_bias(fn, q: Tensor, k: Tensor, rows: slice, opt: _Options, detach: bool = True) -> Tensor:
    """The bias function's (B, Hq, rows, S) values (an expanded view) for a block of query rows."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    q_pos = query_positions(lq, lk, q.device)[rows]
    bias = evaluate_bias_function(fn, q_pos, torch.arange(lk, device=q.device), b, hq)
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    return (bias.detach() if detach else bias).expand(b, hq, len(q_pos), lk)


def _block_factor(ssmax, mask, bias, rows, opt, q, k, with_log_n=False):
    """SSMax's t (B, Hq, rows) for a block (None without SSMax), and ln(n_i) if asked."""
    if ssmax is None:
        return (None, None) if with_log_n else None
    b, hq, lq, _ = q.shape
    last = query_positions(lq, k.shape[2], q.device)[rows] if opt.causal else None
    counts = _count_allowed(bias, None if mask is None else mask[:, :, rows], last)
    log_n = torch.log(counts.clamp_min(1).float())
    t = ssmax.detach().float().view(1, hq, 1) * log_n
    return (t, log_n) if with_log_n else t


__all__ = ["INTERPRET", "allowed_counts", "attention", "ssmax_factor", "unsupported"]
