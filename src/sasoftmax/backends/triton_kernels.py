"""Triton kernels of the fused attention (DESIGN §1–§3), after Triton's fused-attention tutorial.

Layout: q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), any strides; query head h reads kv head h // GROUPS
(grouped-query attention without copying k/v). Per-row arrays (SSMax's t, the saved statistics, dL/dt) are
contiguous (B·Hq, L) float32/int32 tensors; bwd_dq's row pairs for bwd_dkdv (4, B·Hq·L) int64. NORM: 0 softmax, 1
sa, 2 sa_norm. Query row i sits at key position i + POS0 (POS0 = S − L for a whole call: causal masking and
relative biases are aligned lower-right); it may attend key j when j < S, j <= i + POS0 (causal), the uint8 mask
is nonzero and the bias is not −inf. Masks and bias tensors are (B, Hq, L, S) views broadcast with stride 0. Every
dot accumulates in float32.

Logits, per tile: z = scale·q·kᵀ + bias, x = t_i·z (SSMax; x = z without it). BIAS: 0 none, 1 a tensor,
2 ALiBi −r1_h·d, 3 Kerple log −r1_h·ln(1 + r2_h·d), 4 Kerple power −r1_h·d^r2_h, with d = |i + POS0 − j|,
r1/r2 read per head; 5 a table, table_h[min(d, n − 1)], laid out along the call's diagonals and passed in the bias
tensor's slots (``triton._diagonal_table``: a contiguous (Hq, L + S) float32 tensor, entry i − j + S − 1 for the
pair (i, j), then a flag that the head's entries hold a −inf; S − 1 in the row-stride slot). A −inf entry masks:
the heads of a table that has one take every tile masked, as with a bias tensor.

Kernels, in launch order (sa_norm and float32 inputs walk the keys four times: extrema, forward, dq, dk/dv; the
others three):
- ``row_extrema`` (sa_norm; float32 inputs of every normalizer, for μ alone, see ``_exp_shifted``): max and
  min of x per row and the first key attaining each; saves μ = max x, and for sa_norm (MIN_AND_ARGS)
  m = min(0, min x), c = 1/(max(0, μ) − m + ε) and the argmax/argmin of the min/max gradient terms (−1 where
  the term vanishes: max x <= 0, min x >= 0 or no key).
- ``fwd``: one program per (query block, batch·head). softmax and sa keep the running max μ, ℓ = Σ e^{x−μ}
  and one accumulator (Σ e^{x−μ}·v, or Σ e^{x−μ}·x·v), rescaled when μ grows (16-bit inputs); sa_norm, and
  float32 inputs, know μ (and m) from ``row_extrema`` and accumulate with no rescaling (sa_norm:
  Σ e^{x−μ}(x − m)·v). Writes o and what the backward recomputes probabilities from (``_probs``): the
  logsumexp, or for float32 inputs (EXACT) μ and 1/ℓ.
- ``bwd_dq``: one program per (query block, batch·head): D_i = dO_i·o_i, dx per tile (DESIGN §2), dq,
  E_i = Σ_j p_ij dW_ij, and with SSMax dL/dt_i = Σ_j dx_ij z_ij. The max term −D_i c_i is added to dx at the
  argmax inside the tile (so it cancels against its neighbours in float32 before dx is rounded); the min
  term (D_i − E_i) c_i needs E, known at the end, and is added there through the key row at the argmin into
  dq; into dk and the bias gradients either by bwd_dkdv inside its tiles, or (LOW_SCATTER, long rows) here
  through the query row (atomic adds into a float32 buffer, one row per query). Writes what bwd_dkdv needs per
  row as int64 pairs of 32-bit values (``ROWS``, see SHIFT_D … ARGMIN_GLOW), so that it loads half as many.
- ``bwd_dkdv``: one program per (key block, batch·kv head), looping over its group's query heads and
  query blocks: dv = Σ wᵀdO, dk = scale·Σ (t·dx)ᵀq with the max term inside the tile (and the min term,
  or with LOW_SCATTER bwd_dq's buffer added once at the end), and the gradients of
  ALiBi/Kerple's r1, r2 (Σ t·dx·∂bias/∂r per head, one partial sum per program), of a bias tensor, or of a
  table (each tile's diagonals summed in registers, then added to dL/dtable of its (batch, head) atomically).
Loops over key (or query) blocks run in two parts: blocks needing no bounds or causal checks, then the rest.
Causal and masked calls map their programs to blocks longest work first (``_scheduled``).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NO_BIAS = tl.constexpr(0)
BIAS_TENSOR = tl.constexpr(1)
ALIBI = tl.constexpr(2)
KERPLE_LOG = tl.constexpr(3)
KERPLE_POWER = tl.constexpr(4)
TABLE = tl.constexpr(5)
# bwd_dq hands bwd_dkdv its per-row values in pairs, ROWS[pair, b·Hq·L + row] (int64, the first in the low half):
# (values used together share a pair: compiled for sm_90, (argmax, argmin) and (g_m, t) spilled 31 values per dk/dv
# iteration at D = 64 where these pairs spill 8)
SHIFT_D = tl.constexpr(0)  # (the saved shift, D_i)
LOW_C = tl.constexpr(1)  # sa_norm: (m, c)
ARGMAX_T = tl.constexpr(2)  # (argmax, t): sa_norm's argmax, SSMax's t
ARGMIN_GLOW = tl.constexpr(3)  # sa_norm: (argmin, the min-term weight g_m)


# Four element-wise functions differ between the GPU and Triton's interpreter (which has no libdevice nor PTX):
# - log2 for the Kerple biases: tl.log/tl.log2 compile to libdevice's accurate logf, ~40 instructions per element
#   (that made Kerple 2.5× the bias-free time on an H200); fast_log2f is one lg2.approx on the special-function
#   unit, like the exp2 of the probabilities (absolute error ~2^-22, far below the logits' own rounding).
# - exp for float32 inputs (``_exp_shifted``, forward and backward): libdevice's expf, within ~1 ulp, rather than
#   tl.exp, which is ex2.approx of x·log₂e and carries that product's rounding.
# - division in Kerple log's dL/dr2: `/` compiles to the IEEE division, a reciprocal, four FFMAs, a range check and
#   a slow path per element; fast_dividef is the reciprocal and a multiply (within 2 ulp, for a gradient summed
#   over the whole head).
# - the load of a table bias's entries (``_load_uncopied``): an ld.global.nc of its own, as inline PTX, because
#   Triton's pipeliner stages every tl.load in a loop that feeds a dot through shared memory, one 4-byte copy per
#   score here, which doubled the forward's shared memory (see docs/triton.md).
if triton.knobs.runtime.interpret:

    @triton.jit
    def _log2(x):
        return tl.log2(x)

    @triton.jit
    def _exp(x):
        return tl.exp(x)

    @triton.jit
    def _fast_div(x, y):
        return x / y

    @triton.jit
    def _load_uncopied(ptrs):
        return tl.load(ptrs)

else:
    from triton.language.extra import libdevice

    @triton.jit
    def _log2(x):
        return libdevice.fast_log2f(x)

    @triton.jit
    def _exp(x):
        return libdevice.exp(x)

    @triton.jit
    def _fast_div(x, y):
        return libdevice.fast_dividef(x, y)

    @triton.jit
    def _load_uncopied(ptrs):
        return tl.inline_asm_elementwise(
            "ld.global.nc.f32 $0, [$1];", "=r,l", [ptrs], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def _distance(r, c, pos0):
    """|i + pos0 − j| as float32 for row indices ``r`` and key indices ``c`` broadcastable to a tile: each vector
    converted before they broadcast, so a tile costs a subtraction per pair, not an int→float conversion (a
    quarter-rate instruction on sm_90, which made ALiBi 1.3× the bias-free time at D = 64 on an H100). Exact below
    2²⁴ positions."""
    return tl.abs((r + pos0).to(tl.float32) - c.to(tl.float32))


@triton.jit
def _table_entries(table, r, c, last_key):
    """Pointers to a table bias's entries for row indices ``r`` and key indices ``c`` broadcastable to a tile: the
    table is laid out along the call's diagonals (``triton._diagonal_table``), entry i − j + S − 1 for the pair
    (i, j), ``last_key`` = S − 1. The row part is added to the pointer and the key part widened to 64 bits before
    they broadcast: compiled for sm_90 a pair's load then addresses its row's pointer plus a constant, with no
    arithmetic of its own (an int32 offset per pair cost three integer instructions, a 64-bit pointer minus an
    int32 key four, indexing by min(|i − j|, n − 1) five)."""
    return (table + (r + last_key)) - c.to(tl.int64)


@triton.jit
def _table_masks(table, L, S):
    """Whether a head's diagonal table holds a −inf (its flag after the L + S − 1 entries): such a head takes
    every tile masked, the others take their bulk tiles unchecked, as without a bias."""
    return tl.load(table + L + S - 1) != 0


@triton.jit
def _scaled_operand(x, scale):
    """q (or k) times the scale for the q·kᵀ of a call with an additive bias and a power-of-two scale (QK_SCALED),
    and the scale the tiles then apply, 1: the product is then scale·q·kᵀ bit for bit (a power of two commutes
    with rounding) and z = scale·q·kᵀ + bias is one FFMA or FADD per score instead of a multiply and an add.
    (A float16 element below 2⁻¹¹ may lose bits as a subnormal, ~2⁻²⁵·|k| in the product.)"""
    return (x * scale).to(x.dtype), 1.0


@triton.jit
def _relative_bias(dist, r1, r2, BIAS: tl.constexpr):
    """−r1·f(d) for ALiBi (f = d), Kerple log (f = ln(1 + r2·d)) and Kerple power (f = d^r2, 0 at d = 0); the
    per-head constant folded first, so that adding the bias to a logit is one FFMA."""
    if BIAS == ALIBI:
        return dist * -r1
    elif BIAS == KERPLE_LOG:
        return _log2(1.0 + r2 * dist) * (-r1 * LN2)
    else:
        return tl.where(dist > 0, tl.exp2(r2 * _log2(tl.maximum(dist, 1.0))), 0.0) * -r1


@triton.jit
def _relative_bias_grad_parts(dz, dist, r2, BIAS: tl.constexpr):
    """Per pair, given dL/dz: the parts u1, u2 of dL/dr1 = c1·Σ u1 and dL/dr2 = c2·Σ u2 (``_relative_bias_grad_factors``
    gives c1, c2), so that a tile's sums cost a multiply-add per pair and the per-head factors one multiply per
    head. Kerple log: u1 = dz·log₂(1 + r2·d), u2 = dz·d/(1 + r2·d); power: u1 = dz·d^r2, u2 = dz·d^r2·log₂d; ALiBi:
    u1 = dz·d (u2 unused)."""
    if BIAS == ALIBI:
        return dz * dist, dz
    elif BIAS == KERPLE_LOG:
        return dz * _log2(1.0 + r2 * dist), dz * _fast_div(dist, 1.0 + r2 * dist)
    else:
        log2_d = _log2(tl.maximum(dist, 1.0))
        powered = dz * tl.where(dist > 0, tl.exp2(r2 * log2_d), 0.0)
        return powered, powered * log2_d


@triton.jit
def _relative_bias_grad_factors(r1, BIAS: tl.constexpr):
    """c1, c2 of ``_relative_bias_grad_parts`` (c2 = 0 for ALiBi, which has no r2)."""
    if BIAS == ALIBI:
        return -1.0, 0.0
    elif BIAS == KERPLE_LOG:
        return -LN2, -r1
    else:
        return -1.0, -r1 * LN2


@triton.jit
def _alibi_apart(qk, rows, c, c0, ref, pos0, scale, r1):
    """An ALiBi tile whose pairs are all allowed under causal masking (j <= i + pos0): x = scale·qk − r1·(i + pos0
    − j) as y + a_i, with y = scale·qk + r1·(j − ref) per pair and a_i = −r1·(i + pos0 − ref) per row. Returns y,
    y·log₂e and a (1-D over ``rows``); callers fold a into their per-row constants (the shift, sa_norm's m), so
    that a pair pays one instruction for the bias (y's FFMA) instead of the distance's subtraction and the bias's
    FFMA. ``ref`` is the key on the diagonal of the tile's first row, so that near the diagonal, where the
    probabilities are, y is as small and as precise as scale·qk, and a stays the same from tile to tile (the
    forward and dq fix their rows, dk/dv's tiles start on rows a multiple of BLOCK_M apart: compiled, per-row values
    that changed per tile went through shared memory each time, or spilled). ``c`` broadcastable to the tile, its
    keys ``c0`` + a loop-invariant offset: r1·(j − ref) is formed as r1·(j − c0), hoisted out of the loop, plus
    the tile's r1·(c0 − ref), so that a tile's keys cost an add each instead of a subtraction, an int→float
    conversion (quarter rate on sm_90) and a multiply (compiled for sm_90, sa_norm, fixed slopes: row_extrema,
    fwd and dq 0.4–1.3 instructions per score element fewer; dk/dv, whose keys stay, as before)."""
    y = qk * scale + ((c - c0).to(tl.float32) * r1 + (c0 - ref).to(tl.float32) * r1)
    return y, y * LOG2E, _alibi_rows(rows, ref, pos0, r1)


@triton.jit
def _alibi_rows(rows, ref, pos0, r1):
    """``_alibi_apart``'s per-row part, a_i = −r1·(i + pos0 − ref)."""
    return (rows + pos0 - ref).to(tl.float32) * -r1


@triton.constexpr_function
def _rows_apart(bias, causal, masked, norm, has_ssmax, exact):
    """Whether a loop's tiles take ``_alibi_apart``: ALiBi's bulk tiles under causal masking with 16-bit inputs
    (float32 forms x once, for ``_pin_extremes``), softmax or sa_norm (sa's p·x needs x itself), without SSMax (its
    dL/dt needs z)."""
    return bias == ALIBI and causal and not masked and norm != 1 and not has_ssmax and not exact


@triton.jit
def _exp_shifted(x, x2, shift, ok, MASKED: tl.constexpr, EXACT: tl.constexpr):
    """e^{x − shift}, 0 where ``ok`` is false (MASKED): exp2(x2 − shift·log₂e) on the special-function unit, x2 =
    x·log₂e from ``_logits`` (one FFMA per element with the multiply of x2 where there is no additive bias), or
    for float32 inputs (EXACT) libdevice's exp of x − shift, whose result does not carry the rounding of those
    products (up to |x − shift|·2⁻²⁴ relative). The forward and the backward take the same one, so the
    backward's p sum to 1 with the forward's ℓ: a mismatch there shifts every p of a row alike, and such errors
    add up in dk. The mask applies to the exponent, after the FFMA: applied to x2 before, it kept the multiply
    and the subtraction apart (one instruction per element more in masked tiles)."""
    if EXACT:
        arg = x - shift
    else:
        arg = x2 - shift * LOG2E
    if MASKED:
        arg = tl.where(ok, arg, float("-inf"))
    if EXACT:
        return _exp(arg)
    return tl.math.exp2(arg)


@triton.jit
def _probs(x, x2, shift, inv_l, ok, MASKED: tl.constexpr, EXACT: tl.constexpr):
    """p = e^{x − logsumexp} of a tile from the saved row statistics (broadcast). 16-bit inputs save the
    logsumexp itself as ``shift``; float32 inputs (EXACT) save the row max μ and 1/ℓ and get p = e^{x − μ}/ℓ,
    because a logsumexp rounded to float32 at its magnitude (~5–20 for sa with SSMax) moves every p of the row
    alike by up to several ulps, while x − μ is computed exactly near the max."""
    if EXACT:
        return _exp_shifted(x, x2, shift, ok, MASKED, EXACT) * inv_l
    return _exp_shifted(x, x2, shift, ok, MASKED, EXACT)


@triton.jit
def _row_shift(SHIFT, INV_L, stat, row_ok, EXACT: tl.constexpr):
    """The saved (shift, 1/ℓ) of rows ``stat`` for ``_probs`` (1/ℓ unused without EXACT); rows past L: +inf."""
    shift = tl.load(SHIFT + stat, mask=row_ok, other=float("inf"))
    if EXACT:
        return shift, tl.load(INV_L + stat, mask=row_ok, other=0.0)
    return shift, shift


@triton.jit
def _pair(first, second):
    """Two 32-bit values (float32 or int32) of a row as one int64, ``first`` in the low half: bwd_dkdv loads a row's
    values as 8-byte pairs (per tile and thread, each load costs an asynchronous copy, a shared-memory load and
    64-bit address arithmetic, so halving their number took ~3 of its ~25 instructions per score element)."""
    low = first.to(tl.int32, bitcast=True).to(tl.uint32, bitcast=True).to(tl.int64)
    return low | (second.to(tl.int32, bitcast=True).to(tl.int64) << 32)


@triton.jit
def _halves(pair):
    """The (low, high) int32 halves of ``_pair``'s int64 (bitcast them back to float32 where they were)."""
    return pair.to(tl.int32), (pair >> 32).to(tl.int32)


@triton.jit
def _row_pair(ROWS, pair, pairs, stat, row_ok, MASKED: tl.constexpr):
    """The halves of pair ``pair`` of ROWS for rows ``stat``: 0 for rows past L, which only masked tiles hold
    (bwd_dkdv), where their probabilities are 0; bulk tiles load without a mask."""
    if MASKED:
        return _halves(tl.load(ROWS + pair * pairs + stat, mask=row_ok, other=0))
    return _halves(tl.load(ROWS + pair * pairs + stat))


@triton.jit
def _log_allowed(rows, pos0, S, CAUSAL: tl.constexpr):
    """ln(n_i) where the keys a row may attend have a closed form (no mask, no bias that masks): all S, or with
    causal masking keys 0 … i + POS0; at least 1 (a row with no key: ln 1 = 0), as ``allowed_counts`` counts."""
    if CAUSAL:
        n = tl.minimum(tl.maximum(rows + pos0 + 1, 1), S)
    else:
        n = rows * 0 + S
    return tl.log(n.to(tl.float32))


@triton.jit
def _row_factor(
    T, stat, row_ok, h, rows, pos0, S, BLOCK_M: tl.constexpr, HAS_SSMAX: tl.constexpr, T_FROM_S: tl.constexpr,
    CAUSAL: tl.constexpr,
):  # fmt: skip
    """SSMax's t for the rows: read from the (B·Hq, L) rows at T, or with T_FROM_S computed from head h's s at
    T ((Hq,) float32) as s_h·ln(n_i); 1 without SSMax."""
    if HAS_SSMAX and T_FROM_S:
        return tl.load(T + h) * _log_allowed(rows, pos0, S, CAUSAL)
    elif HAS_SSMAX:
        return tl.load(T + stat, mask=row_ok, other=0.0)
    else:
        return tl.full([BLOCK_M], 1.0, tl.float32)


@triton.jit
def _bias_params(R1, R2, h, BIAS: tl.constexpr):
    """Head h's r1, r2 of a relative bias (0 where unused)."""
    r1 = 0.0
    r2 = 0.0
    if BIAS >= ALIBI and BIAS <= KERPLE_POWER:
        r1 = tl.load(R1 + h)
    if BIAS >= KERPLE_LOG and BIAS <= KERPLE_POWER:
        r2 = tl.load(R2 + h)
    return r1, r2


@triton.jit
def _logits(
    qk, r, c, L, S, pos0, scale, t, mask_ptr, sml, sms, bias_ptr, sbl, sbs, r1, r2,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BIAS: tl.constexpr,
    HAS_SSMAX: tl.constexpr,
):  # fmt: skip
    """z = scale·qk + bias, x = t·z and x2 = x·log₂e (the exponent's, ``_exp_shifted``) of a tile, and where the
    pair is allowed.

    ``r``/``c`` are row/key indices and ``t`` SSMax's factor, each broadcastable to the tile (so the same code
    serves (rows, keys) and (keys, rows) tiles). Without MASKED every pair is known to be allowed. Masked
    pairs get z = 0, so p·x and dx·z are 0, not NaN, there (x2 is not masked: callers mask what they exponentiate).
    Without an additive bias x2 = qk·(t·scale·log₂e), a per-row factor, so that the exponent x2 − shift·log₂e is
    one FFMA per element; computed from x it would be two (x − shift, then ·log₂e), and these loops are bound by
    their instruction count.
    """
    z = qk * scale
    ok = c < S  # in tiles without MASKED every pair is allowed; callers then ignore ok
    if MASKED:
        ok = ok & (r < L)
        if CAUSAL:
            ok = ok & (c <= r + pos0)
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + r * sml + c * sms, mask=ok, other=0) != 0)
    if BIAS == BIAS_TENSOR or (BIAS == TABLE and MASKED):  # entries that may be −inf: masked tiles only
        if BIAS == BIAS_TENSOR:
            bias = tl.load(bias_ptr + r * sbl + c * sbs, mask=ok, other=0.0).to(tl.float32)
        else:
            # (rows and keys past the ends clamped, before they broadcast: those pairs are masked, and an unmasked
            # load costs less per pair than one under the mask)
            bias = _load_uncopied(_table_entries(bias_ptr, tl.minimum(r, L - 1), tl.minimum(c, S - 1), sbl))
        dropped = bias == float("-inf")
        ok = ok & ~dropped
        z = z + tl.where(dropped, 0.0, bias)
    elif BIAS == TABLE:  # a bulk tile: its head's table holds no −inf (_table_masks)
        z = z + _load_uncopied(_table_entries(bias_ptr, r, c, sbl))
    elif BIAS != NO_BIAS:
        z = z + _relative_bias(_distance(r, c, pos0), r1, r2, BIAS)
    if MASKED:  # a NaN or inf logit of a masked pair (from k) must not reach the row through p·x or dx·z
        z = tl.where(ok, z, 0.0)
    x = z
    if HAS_SSMAX:
        x = z * t
    if BIAS == NO_BIAS:
        x2 = qk * (t * (scale * LOG2E))
    else:
        x2 = x * LOG2E
    return z, x, x2, ok


@triton.jit
def _tile_logits(
    qk, rows, r, c, c0, ref, L, S, pos0, scale, t, mask_ptr, sml, sms, bias_ptr, sbl, sbs, r1, r2,
    APART: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BIAS: tl.constexpr,
    HAS_SSMAX: tl.constexpr,
):  # fmt: skip
    """``_logits`` of a tile, or with APART (``_rows_apart``) ``_alibi_apart``'s: (z, x, x2, ok, a), where x and
    x2 hold x − a_i and x·log₂e − a_i·log₂e for the 1-D per-row ``a`` over ``rows`` (0 without APART; ``r`` is
    ``rows`` broadcast as the tile's rows; ``c0`` the tile's first key). APART tiles return x for z (no caller reads z
    there) and ok unused."""
    if APART:
        x, x2, a = _alibi_apart(qk, rows, c, c0, ref, pos0, scale, r1)
        z = x
        ok = x == x
    else:
        z, x, x2, ok = _logits(
            qk, r, c, L, S, pos0, scale, t, mask_ptr, sml, sms, bias_ptr, sbl, sbs, r1, r2,
            MASKED, CAUSAL, HAS_MASK, BIAS, HAS_SSMAX,
        )  # fmt: skip
        a = tl.zeros_like(rows).to(tl.float32)
    return z, x, x2, ok, a


@triton.jit
def _load(ptr, idx, n, stride_n, offs_d, stride_d, D: tl.constexpr, D_PAD: tl.constexpr, CHECK: tl.constexpr):
    """Rows ``idx`` of a (n, D) matrix as an (len(idx), D_PAD) tile, zero outside it (bounds checked only
    where CHECK says rows may pass n, or D is padded)."""
    ptrs = ptr + idx[:, None] * stride_n + offs_d[None, :] * stride_d
    if CHECK:
        return tl.load(ptrs, mask=(idx[:, None] < n) & (offs_d[None, :] < D), other=0.0)
    if D == D_PAD:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)


@triton.jit
def _load_t(ptr, idx, n, stride_n, offs_d, stride_d, D: tl.constexpr, D_PAD: tl.constexpr, CHECK: tl.constexpr):
    """The transposed tile, (D_PAD, len(idx))."""
    ptrs = ptr + idx[None, :] * stride_n + offs_d[:, None] * stride_d
    if CHECK:
        return tl.load(ptrs, mask=(idx[None, :] < n) & (offs_d[:, None] < D), other=0.0)
    if D == D_PAD:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[:, None] < D, other=0.0)


@triton.jit
def _scheduled(SECTION, HEAVY_LAST: tl.constexpr, SCHEDULED: tl.constexpr):
    """(block, batch·head) of this program of a (blocks, batch·heads) grid. The GPU starts programs in launch order
    (axis 0 fastest) as earlier ones finish, and under causal masking (or a mask, which may lie within it) a
    block's work grows along axis 0 (query blocks: HEAVY_LAST) or shrinks (key blocks): in grid order a call
    ends on the heaviest blocks of its last heads, with most of the GPU idle. SCHEDULED (the launcher sets it for
    such calls): the longest work first, within sections of SECTION heads (the launcher sizes them to fit the L2
    cache with what a head's programs all read: k and v, or q and dO): the heaviest block of each of the
    section's heads, then the next, …, as FlashAttention 3/4 schedule causal attention; the last section holds
    the remaining heads. Otherwise the grid's order."""
    block = tl.program_id(0)
    head = tl.program_id(1)
    if SCHEDULED:
        blocks = tl.num_programs(0).to(tl.int64)  # (int64: a grid's blocks × heads may pass 2**31)
        order = head * blocks + block  # the launch order
        section = order // (SECTION * blocks)
        width = tl.minimum(SECTION, tl.num_programs(1) - section * SECTION)
        within = order - section * SECTION * blocks
        block = within // width
        head = section * SECTION + within - block * width
        if HEAVY_LAST:
            block = blocks - 1 - block
        block = block.to(tl.int32)
        head = head.to(tl.int32)
    return block, head


@triton.jit
def _key_blocks(start_m, L, S, pos0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(full_end, end): key blocks [0, full_end) need no bounds or causal checks for any row of the query
    block; [full_end, end) may. ``end`` is one past the last key any row of the block may attend."""
    if CAUSAL:
        end = tl.maximum(tl.minimum(S, (start_m + 1) * BLOCK_M + pos0), 0)
        first_row_sees = tl.minimum(start_m * BLOCK_M + pos0 + 1, S)  # keys [0, this) visible to every row
        full_end = tl.maximum(first_row_sees, 0) // BLOCK_N * BLOCK_N
    else:
        end = S
        full_end = S // BLOCK_N * BLOCK_N
    return full_end, end


@triton.jit
def _visited_keys(
    start_m, L, S, pos0, MASK_CAUSAL, bias_base, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, ALL_MASKED: tl.constexpr, BIAS: tl.constexpr,
):  # fmt: skip
    """``_key_blocks`` of a query block as the row kernels walk it: every block masked where a mask or bias tensor
    may mask anywhere (ALL_MASKED) or the head's table holds a −inf (``_table_masks``); and where a call without
    causal masking has a mask that lies within the causal pattern (MASK_CAUSAL, one int32 the launcher computes on
    the device: transformers folds causality into its masks), the causal end: the key blocks past it hold no
    allowed pair, so the call skips them as a causal one."""
    full_end, end = _key_blocks(start_m, L, S, pos0, BLOCK_M, BLOCK_N, CAUSAL)
    if HAS_MASK and not CAUSAL:
        end = tl.where(tl.load(MASK_CAUSAL) != 0, _key_blocks(start_m, L, S, pos0, BLOCK_M, BLOCK_N, True)[1], end)
    if ALL_MASKED:
        full_end = 0
    elif BIAS == TABLE:
        full_end = tl.where(_table_masks(bias_base, L, S), 0, full_end)
    return full_end, end


@triton.jit
def _pin_extremes(x, cols, arg_hi, arg_lo, hi, low):
    """float32 sa_norm: x at the row's argmax and argmin keys replaced by the max and min ``row_extrema`` saved.

    Each kernel recomputes x, and may round it differently (q·kᵀ summed in another order, a multiply-add
    contracted in one kernel and not in another). sa_norm divides by the row's range, c = 1/(M⁺ − m + ε), so a
    difference δ at the extremes becomes δ·c in s there, and in dx up to δ·c/(1 − s) where s ≈ 1 (a causal row
    seeing one small logit): a rounding difference of ~10⁻⁷ gave 2·10⁻³ relative error in dq on an H100 (float32,
    against the float32 twin's 10⁻⁵). Pinned, s is exactly 0 at the argmin and (M − m)·c at the argmax in every
    kernel, as in the materialised computation. (−1 indices: no pin.)"""
    x = tl.where(cols == arg_hi, hi, x)
    return tl.where(cols == arg_lo, low, x)


@triton.jit
def _weighted(acc, w, v, W_LO: tl.constexpr, PRECISION: tl.constexpr):
    """acc + w·v for a float32 tile of weights w, rounded to v's dtype for the product; with W_LO plus the product of
    what that rounding dropped (w − w rounded, itself rounded: w to ~2⁻²² in all). sa's weights p·x grow with x, and
    the backward's D_i = Σ_j w_ij·dW_ij (bwd_dq) must be the sum over the float32 w its tiles cancel against: over
    the rounded w, D was off by ~2⁻¹¹·|x|·|dW| in float16, in a row one key dominates many times its true dx."""
    rounded = w.to(v.dtype)
    acc = tl.dot(rounded, v, acc, input_precision=PRECISION)
    if W_LO:
        acc = tl.dot((w - rounded.to(tl.float32)).to(v.dtype), v, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _fwd_tiles(
    q, acc, mu, total, lo, hi, k_base, v_base, skn, skd, svn, svd,
    rows, offs_n, offs_d, offs_dv, t, low, inv_delta, arg_hi, arg_lo, L, S, pos0, scale,
    mask_base, sml, sms, bias_base, sbl, sbs, r1, r2,
    NORM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BIAS: tl.constexpr,
    HAS_SSMAX: tl.constexpr, W_LO: tl.constexpr, PRECISION: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
):  # fmt: skip
    """sa_norm's weights are w = p·(x − m)·c, c = ``inv_delta`` = 1/(M − m + ε), each in [0, 1] before it is rounded
    to v's dtype for the product, as plain PyTorch rounds them: a row with one key then gets w = 1 exactly (o = v),
    where the unnormalised p·(x − m), rounded and scaled by c after the loop, was an ulp of o off. The same
    instruction count: x·c − m·c is one FFMA, as x − m was one FADD (or folded into q·kᵀ's scaling)."""
    ref = tl.min(rows, 0) + pos0  # (for _alibi_apart: the key on the block's first row's diagonal)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt = _load_t(k_base, cols, S, skn, offs_d, skd, D, D_PAD, MASKED)
        v = _load(v_base, cols, S, svn, offs_dv, svd, DV, DV_PAD, MASKED)
        qk = tl.dot(q, kt, input_precision=PRECISION)
        _, x, x2, ok, a = _tile_logits(  # (a: see _alibi_apart, folded into the per-row constants)
            qk, rows, rows[:, None], cols[None, :], start_n, ref, L, S, pos0, scale, t[:, None], mask_base, sml, sms,
            bias_base, sbl, sbs, r1, r2, _rows_apart(BIAS, CAUSAL, MASKED, NORM, HAS_SSMAX, EXACT), MASKED,
            CAUSAL, HAS_MASK, BIAS, HAS_SSMAX,
        )  # fmt: skip
        if NORM == 2 or EXACT:  # μ is the row's final max (from row_extrema): no rescaling
            if NORM == 2 and EXACT:
                x = _pin_extremes(x, cols[None, :], arg_hi[:, None], arg_lo[:, None], mu[:, None], low[:, None])
            p = _exp_shifted(x, x2, (mu - a)[:, None], ok, MASKED, EXACT)
            total += tl.sum(p, 1)
            if NORM == 2 and not MASKED and BIAS == NO_BIAS and not EXACT:
                # (x − m)·c as one FFMA off q·kᵀ with per-row factors (x itself is not needed here; with SSMax it
                # would cost a second multiply per element)
                p = p * (qk * (t * scale * inv_delta)[:, None] - (low * inv_delta)[:, None])
            elif NORM == 2 and EXACT:  # (x − m exactly 0 at the argmin, where _pin_extremes set x = m)
                p = p * ((x - low[:, None]) * inv_delta[:, None])
            elif NORM == 2:
                p = p * (x * inv_delta[:, None] - ((low - a) * inv_delta)[:, None])
            elif NORM == 1:
                p = p * x
            acc = _weighted(acc, p, v, W_LO, PRECISION)
        else:
            # (masked before: the row max needs x masked anyway, and so compiled the loop is shorter)
            x_hi = tl.where(ok, x, float("-inf")) if MASKED else x
            x2_hi = tl.where(ok, x2, float("-inf")) if MASKED else x2
            new_mu = tl.maximum(mu, tl.max(x_hi, 1) + a)
            # A row with no allowed key so far has μ = −inf; shift it by 0 so no inf − inf appears.
            shift = tl.where(new_mu == float("-inf"), 0.0, new_mu)
            alpha = _exp_shifted(mu, mu * LOG2E, shift, mu, False, EXACT)
            p = _exp_shifted(x_hi, x2_hi, (shift - a)[:, None], ok, False, EXACT)
            total = total * alpha + tl.sum(p, 1)
            if NORM == 1:  # x is finite where masked (z of a −inf bias is 0), so p·x is 0 there
                p = p * x
            acc = _weighted(acc * alpha[:, None], p, v, W_LO, PRECISION)
            mu = new_mu
    return acc, mu, total


@triton.jit
def _extrema_tiles(
    q, hi_x, lo_x, hi_at, lo_at, lo, hi, k_base, skn, skd, rows, offs_n, offs_d, t, L, S, pos0, scale,
    mask_base, sml, sms, bias_base, sbl, sbs, r1, r2, a, ref,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BIAS: tl.constexpr,
    HAS_SSMAX: tl.constexpr, MIN_AND_ARGS: tl.constexpr, APART: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    """Running extrema per slot of the (rows, keys) tile, not per row: slot (i, j) keeps the max (and min) of
    x_i over the keys j, j + BLOCK_N, … and, in hi_at/lo_at, the start of the tile that first attained it (a tile
    replaces it only if strictly beyond, so ties keep the earlier key). No reduction across threads per tile:
    ``row_extrema`` reduces the slots once at the end. APART: the slots keep x − a_i (``_alibi_apart``, with the
    row's a_i and key ``ref``), which ``row_extrema`` adds back per row."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt = _load_t(k_base, cols, S, skn, offs_d, skd, D, D_PAD, MASKED)
        qk = tl.dot(q, kt, input_precision=PRECISION)
        _, x, _, ok, _ = _tile_logits(
            qk, rows, rows[:, None], cols[None, :], start_n, ref, L, S, pos0, scale, t[:, None], mask_base, sml, sms,
            bias_base, sbl, sbs, r1, r2, APART and not MASKED, MASKED, CAUSAL, HAS_MASK, BIAS, HAS_SSMAX,
        )  # fmt: skip
        if APART and MASKED:  # (masked tiles form x whole)
            x = x - a[:, None]
        x_hi = tl.where(ok, x, float("-inf")) if MASKED else x
        if MIN_AND_ARGS:
            x_lo = tl.where(ok, x, float("inf")) if MASKED else x
            up = x_hi > hi_x
            down = x_lo < lo_x
            hi_x = tl.where(up, x_hi, hi_x)
            lo_x = tl.where(down, x_lo, lo_x)
            hi_at = tl.where(up, start_n, hi_at)
            lo_at = tl.where(down, start_n, lo_at)
        else:
            hi_x = tl.maximum(hi_x, x_hi)
    return hi_x, lo_x, hi_at, lo_at


@triton.jit
def row_extrema(
    Q, K, T, MU, LOW, INV_DELTA, ARGMIN, ARGMAX, R1, R2,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd,
    MASK, smb, smh, sml, sms, MASK_CAUSAL, BIAS, sbb, sbh, sbl, sbs,
    H, GROUPS, L, S, pos0, scale, eps, SECTION, SCHEDULED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_SSMAX: tl.constexpr,
    T_FROM_S: tl.constexpr, ALL_MASKED: tl.constexpr, MIN_AND_ARGS: tl.constexpr, PRECISION: tl.constexpr,
    RAW_QK: tl.constexpr, QK_SCALED: tl.constexpr, EXACT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    start_m, bh = _scheduled(SECTION, True, SCHEDULED)
    bh = bh.to(tl.int64)  # offsets can pass 2**31
    b = bh // H
    h = bh % H
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    stat = bh * L + rows
    row_ok = rows < L
    q = _load(Q + b * sqb + h * sqh, rows, L, sqn, offs_d, sqd, D, D_PAD, True)
    t = _row_factor(T, stat, row_ok, h, rows, pos0, S, BLOCK_M, HAS_SSMAX, T_FROM_S, CAUSAL)
    r1, r2 = _bias_params(R1, R2, h, BIAS_KIND)
    k_base = K + b * skb + (h // GROUPS) * skh
    mask_base = MASK + b * smb + h * smh
    bias_base = BIAS + b * sbb + h * sbh
    hi_x = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)  # per slot (see _extrema_tiles)
    lo_x = tl.full([BLOCK_M, BLOCK_N], float("inf"), tl.float32)
    hi_at = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    lo_at = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    full_end, end = _visited_keys(
        start_m, L, S, pos0, MASK_CAUSAL, bias_base, BLOCK_M, BLOCK_N, CAUSAL, HAS_MASK, ALL_MASKED, BIAS_KIND
    )
    # RAW_QK: x = (scale·t_i)·q·kᵀ with a power-of-two scale, so scale·t_i is exact and x's extrema are those of
    # q·kᵀ times it (t_i >= 0), bit for bit as the other kernels round x: found on q·kᵀ, scaled after
    tile_scale = scale
    if RAW_QK:
        tile_scale = 1.0
    elif QK_SCALED:
        q, tile_scale = _scaled_operand(q, scale)
    # ALiBi under causal masking: the slots keep x − a_i, the bulk tiles one add per pair (_alibi_apart)
    APART: tl.constexpr = _rows_apart(BIAS_KIND, CAUSAL, False, 2, HAS_SSMAX, EXACT)
    ref = start_m * BLOCK_M + pos0
    a = tl.zeros([BLOCK_M], tl.float32)
    if APART:
        a = _alibi_rows(rows, ref, pos0, r1)
    hi_x, lo_x, hi_at, lo_at = _extrema_tiles(
        q, hi_x, lo_x, hi_at, lo_at, 0, full_end, k_base, skn, skd, rows, offs_n, offs_d, t, L, S, pos0, tile_scale,
        mask_base, sml, sms, bias_base, sbl, sbs, r1, r2, a, ref, False, CAUSAL, HAS_MASK, BIAS_KIND,
        HAS_SSMAX and not RAW_QK, MIN_AND_ARGS, APART, PRECISION, BLOCK_N, D, D_PAD,
    )  # fmt: skip
    hi_x, lo_x, hi_at, lo_at = _extrema_tiles(
        q, hi_x, lo_x, hi_at, lo_at, full_end, end, k_base, skn, skd, rows, offs_n, offs_d, t, L, S, pos0,
        tile_scale, mask_base, sml, sms, bias_base, sbl, sbs, r1, r2, a, ref, True, CAUSAL, HAS_MASK, BIAS_KIND,
        HAS_SSMAX and not RAW_QK, MIN_AND_ARGS, APART, PRECISION, BLOCK_N, D, D_PAD,
    )  # fmt: skip
    # The slots' extrema reduced per row; the first key attaining each (the documented tie rule) is the least
    # key among the slots that hold the row's extremum.
    slot_hi, hi_x = hi_x, tl.max(hi_x, 1)
    if MIN_AND_ARGS:
        slot_lo, lo_x = lo_x, tl.min(lo_x, 1)
        arg_hi = tl.min(tl.where(slot_hi == hi_x[:, None], hi_at + offs_n[None, :], S), 1)
        arg_lo = tl.min(tl.where(slot_lo == lo_x[:, None], lo_at + offs_n[None, :], S), 1)
    if RAW_QK and HAS_SSMAX:  # (t = s·ln n >= 0: s > 0 is checked where it enters)
        factor = scale * t
        keys = hi_x != float("-inf")  # rows with no key keep ∓inf (∞·0 would be NaN, as t = 0 there)
        hi_scaled = tl.where(keys, hi_x, 0.0) * factor
        lo_scaled = tl.where(keys, lo_x, 0.0) * factor
        hi_x = tl.where(keys, hi_scaled, float("-inf"))
        lo_x = tl.where(keys, lo_scaled, float("inf"))
    elif RAW_QK:
        hi_x = hi_x * scale
        lo_x = lo_x * scale
    if APART:  # the slots kept x − a_i (∓inf, no key, stays)
        hi_x += a
        lo_x += a
    tl.store(MU + stat, hi_x, mask=row_ok)
    if MIN_AND_ARGS:
        m = tl.minimum(lo_x, 0.0)  # +inf (no key) -> 0
        delta = tl.maximum(hi_x, 0.0) - m + eps  # μ = −inf (no key) -> 0
        tl.store(LOW + stat, m, mask=row_ok)
        tl.store(INV_DELTA + stat, 1.0 / delta, mask=row_ok)
        tl.store(ARGMAX + stat, tl.where(hi_x > 0, arg_hi, -1), mask=row_ok)
        tl.store(ARGMIN + stat, tl.where(lo_x < 0, arg_lo, -1), mask=row_ok)


@triton.jit
def fwd(
    Q, K, V, OUT, OUT_LO, SHIFT, INV_L, T, T_ROWS, MU, LOW, INV_DELTA, ARGMAX, ARGMIN, R1, R2,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    MASK, smb, smh, sml, sms, MASK_CAUSAL, BIAS, sbb, sbh, sbl, sbs,
    H, GROUPS, L, S, pos0, scale, SECTION, SCHEDULED: tl.constexpr,
    NORM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BIAS_KIND: tl.constexpr,
    HAS_SSMAX: tl.constexpr, T_FROM_S: tl.constexpr, ALL_MASKED: tl.constexpr, QK_SCALED: tl.constexpr,
    O_LO: tl.constexpr, W_LO: tl.constexpr, PRECISION: tl.constexpr, EXACT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
):  # fmt: skip
    """o ((B, Hq, L, Dv) by its strides) and the row statistics the backward reads. With O_LO also o's rounding
    residual, (o − o rounded) in o's dtype, into OUT_LO (contiguous (B·Hq, L, Dv)): see bwd_dq's D_i."""
    start_m, bh = _scheduled(SECTION, True, SCHEDULED)
    bh = bh.to(tl.int64)  # offsets can pass 2**31
    b = bh // H
    h = bh % H
    hk = h // GROUPS
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    stat = bh * L + rows
    row_ok = rows < L
    q = _load(Q + b * sqb + h * sqh, rows, L, sqn, offs_d, sqd, D, D_PAD, True)
    t = _row_factor(T, stat, row_ok, h, rows, pos0, S, BLOCK_M, HAS_SSMAX, T_FROM_S, CAUSAL)
    if HAS_SSMAX and T_FROM_S:  # for the backward, which reads t per row
        tl.store(T_ROWS + stat, t, mask=row_ok)
    r1, r2 = _bias_params(R1, R2, h, BIAS_KIND)
    if NORM == 2 or EXACT:
        mu = tl.load(MU + stat, mask=row_ok, other=float("-inf"))
        low = mu
        inv_delta = mu
        if NORM == 2:
            low = tl.load(LOW + stat, mask=row_ok, other=0.0)
            inv_delta = tl.load(INV_DELTA + stat, mask=row_ok, other=0.0)
        # Rows with no key: exp(x − μ) must be 0, not exp(x + inf).
        mu = tl.where(mu == float("-inf"), float("inf"), mu)
    else:
        mu = tl.full([BLOCK_M], float("-inf"), tl.float32)
        low = mu
        inv_delta = mu
    arg_hi = rows  # (unused unless float32 sa_norm)
    arg_lo = rows
    if NORM == 2 and EXACT:
        arg_hi = tl.load(ARGMAX + stat, mask=row_ok, other=-1)
        arg_lo = tl.load(ARGMIN + stat, mask=row_ok, other=-1)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_base = MASK + b * smb + h * smh
    bias_base = BIAS + b * sbb + h * sbh
    full_end, end = _visited_keys(
        start_m, L, S, pos0, MASK_CAUSAL, bias_base, BLOCK_M, BLOCK_N, CAUSAL, HAS_MASK, ALL_MASKED, BIAS_KIND
    )
    tile_scale = scale
    if QK_SCALED:
        q, tile_scale = _scaled_operand(q, scale)
    acc, mu, total = _fwd_tiles(
        q, acc, mu, total, 0, full_end, k_base, v_base, skn, skd, svn, svd, rows, offs_n, offs_d, offs_dv, t, low,
        inv_delta, arg_hi, arg_lo, L, S, pos0, tile_scale, mask_base, sml, sms, bias_base, sbl, sbs, r1, r2,
        NORM, False, CAUSAL, HAS_MASK, BIAS_KIND, HAS_SSMAX, W_LO, PRECISION, EXACT, BLOCK_N, D, D_PAD, DV, DV_PAD,
    )  # fmt: skip
    acc, mu, total = _fwd_tiles(
        q, acc, mu, total, full_end, end, k_base, v_base, skn, skd, svn, svd, rows, offs_n, offs_d, offs_dv, t,
        low, inv_delta, arg_hi, arg_lo, L, S, pos0, tile_scale, mask_base, sml, sms, bias_base, sbl, sbs, r1, r2,
        NORM, True, CAUSAL, HAS_MASK, BIAS_KIND, HAS_SSMAX, W_LO, PRECISION, EXACT, BLOCK_N, D, D_PAD, DV, DV_PAD,
    )  # fmt: skip
    has_keys = total > 0
    safe_total = tl.where(has_keys, total, 1.0)
    scale_out = 1.0 / safe_total
    # The backward's shift (see _probs): +inf for a row with no key, so that recomputed probabilities are 0.
    if EXACT:
        tl.store(SHIFT + stat, tl.where(has_keys, mu, float("inf")), mask=row_ok)
        tl.store(INV_L + stat, 1.0 / safe_total, mask=row_ok)
    else:
        tl.store(SHIFT + stat, tl.where(has_keys, mu + tl.log(safe_total), float("inf")), mask=row_ok)
    o_ptr = OUT + b * sob + h * soh + rows[:, None] * son + offs_dv[None, :] * sod
    out = acc * scale_out[:, None]
    rounded = out.to(OUT.dtype.element_ty)
    in_o = row_ok[:, None] & (offs_dv[None, :] < DV)
    tl.store(o_ptr, rounded, mask=in_o)
    if O_LO:
        residual = (out - rounded.to(tl.float32)).to(OUT.dtype.element_ty)
        tl.store(OUT_LO + stat[:, None] * DV + offs_dv[None, :], residual, mask=in_o)


@triton.jit
def _dx(x, p, dw, d_o, low, inv_delta, NORM: tl.constexpr, X_APART: tl.constexpr):
    """Weights w and dL/dx of DESIGN §2 for a tile, without the min/max terms; row statistics broadcast.

    sa_norm's s = (x − m)·c: where x is the product scale·qk (·t), the compiler fuses the subtraction into it;
    where x was computed apart from that product (X_APART: masked tiles zero it, an additive bias adds to it),
    s is the one FFMA x·c + (−m·c), −m·c formed per row (|m·c| <= 1, as m <= 0 <= M, so its rounding costs s at
    most 2⁻²⁴). (Compiled for sm_90 at D = 64 the masked dk/dv loop went from 37.8 to 34.7 instructions
    per element; in the bulk the per-row −m·c would cost more than it saves.)"""
    if NORM == 0:
        w = p
        dx = p * (dw - d_o)
    elif NORM == 1:
        w = x * p
        dx = p * (dw * (1.0 + x) - d_o)
    else:
        if X_APART:
            s = x * inv_delta + (-low * inv_delta)
        else:
            s = (x - low) * inv_delta
        w = s * p
        dx = p * (dw * (inv_delta + s) - d_o)
    return w, dx


@triton.jit
def _dq_tiles(
    q, do, dq, e_sum, r_sum, lo, hi, k_base, v_base, skn, skd, svn, svd, rows, offs_n, offs_d, offs_dv,
    t, shift, inv_l, d_o, low, inv_delta, cs_qk, cs_one, arg_hi, arg_lo, g_hi, L, S, pos0, scale,
    mask_base, sml, sms, bias_base, sbl, sbs, r1, r2,
    NORM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BIAS: tl.constexpr,
    HAS_SSMAX: tl.constexpr, DX_FP32: tl.constexpr, PRECISION: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
):  # fmt: skip
    ref = tl.min(rows, 0) + pos0  # (for _alibi_apart: the key on the block's first row's diagonal)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt = _load_t(k_base, cols, S, skn, offs_d, skd, D, D_PAD, MASKED)
        vt = _load_t(v_base, cols, S, svn, offs_dv, svd, DV, DV_PAD, MASKED)
        qk = tl.dot(q, kt, input_precision=PRECISION)
        z, x, x2, ok, a = _tile_logits(  # (a: see _alibi_apart, folded into the per-row constants)
            qk, rows, rows[:, None], cols[None, :], start_n, ref, L, S, pos0, scale, t[:, None], mask_base, sml, sms,
            bias_base, sbl, sbs, r1, r2, _rows_apart(BIAS, CAUSAL, MASKED, NORM, HAS_SSMAX, EXACT), MASKED,
            CAUSAL, HAS_MASK, BIAS, HAS_SSMAX,
        )  # fmt: skip
        if NORM == 2 and EXACT:  # (shift is μ, the row max, for float32)
            x = _pin_extremes(x, cols[None, :], arg_hi[:, None], arg_lo[:, None], shift[:, None], low[:, None])
        # (masked inside, before exp: a masked logit may lie far above the row's logsumexp)
        p = _probs(x, x2, (shift - a)[:, None], inv_l[:, None], ok, MASKED, EXACT)
        dw = tl.dot(do, vt, input_precision=PRECISION)
        if NORM == 2 and not MASKED and BIAS == NO_BIAS and not EXACT:
            # dx's c + s = c·(1 + x − m) as one FFMA off q·kᵀ (x = qk·scale·t) with per-row factors, which this
            # program's fixed rows compute once: one instruction per element less than from x (dq needs no w)
            dx = p * (dw * (qk * cs_qk[:, None] + cs_one[:, None]) - d_o[:, None])
        else:
            _, dx = _dx(
                x, p, dw, d_o[:, None], (low - a)[:, None], inv_delta[:, None], NORM,
                (MASKED or BIAS != NO_BIAS) and not EXACT,
            )  # fmt: skip
        if NORM == 2:
            e_sum += tl.sum(p * dw, 1)
            # (compared as offsets within the tile: with cols the compiler widened the compare to 64 bits; and
            # selecting dx + g rather than adding a selected g or 0: at D = 128 the latter compiled to integer
            # selects and dx's trip through shared memory to the product, 415 against 283 instructions per
            # iteration on sm_90)
            dx = tl.where(offs_n[None, :] == (arg_hi - start_n)[:, None], dx + g_hi[:, None], dx)
        if HAS_SSMAX and not MASKED and BIAS == NO_BIAS:  # z = scale·qk: scaled once per row by bwd_dq
            r_sum += tl.sum(dx * qk, 1)
        elif HAS_SSMAX:
            r_sum += tl.sum(dx * z, 1)
        if DX_FP32:
            dq += tl.dot(dx, tl.trans(kt).to(tl.float32), input_precision=PRECISION)
        else:
            dq += tl.dot(dx.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    return dq, e_sum, r_sum


@triton.jit
def bwd_dq(
    Q, K, V, OUT, OUT_LO, DO, DQ, SHIFT, INV_L, T, LOW, INV_DELTA, ARGMIN, ARGMAX, ROWS, DT, DK_LOW, R1, R2, DR,
    DBIAS, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sob, soh, son, sdob, sdoh, sdon, sdqb, sdqh, sdqn,
    MASK, smb, smh, sml, sms, MASK_CAUSAL, BIAS, sbb, sbh, sbl, sbs,
    H, GROUPS, L, S, pos0, scale, SECTION, SCHEDULED: tl.constexpr,
    NORM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BIAS_KIND: tl.constexpr,
    BIAS_GRAD: tl.constexpr, HAS_SSMAX: tl.constexpr, DS_PARTIALS: tl.constexpr, LOW_SCATTER: tl.constexpr,
    ALL_MASKED: tl.constexpr, QK_SCALED: tl.constexpr, O_LO: tl.constexpr, DX_FP32: tl.constexpr,
    PRECISION: tl.constexpr, EXACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
):  # fmt: skip
    """dq ((B, Hq, L, D), q's dtype), D_i, the min term (D_i − E_i)·c_i and dL/dt_i.

    D_i = Σ_j w_ij·dW_ij = dO_i·o_i, from o as the forward rounded it, plus with O_LO the forward's rounding residual
    (OUT_LO): then D_i is the float32 o's, the one the tiles' w·dW cancel against. From the rounded o alone, its
    rounding error (~2⁻¹¹·|dO|·|o| in float16) stays in dx, where for sa (o ~ x·v) and for sa_norm's min/max terms
    (·c) it can be many times the true dx, and it adds up coherently in dL/ds and the bias parameters' sums.

    o, dO and dq by their (batch, head, row) strides, each row contiguous (the layout the caller's tensors
    have: SDPA's (B, L, H, D) order takes no copy). sa_norm with LOW_SCATTER: the min term's part of dk/scale is added
    into DK_LOW (zeroed, contiguous (B, Hkv, S, D) float32) and, with BIAS_GRAD, its part of a table's gradient
    into DBIAS (as in bwd_dkdv), of ALiBi/Kerple's dL/dr1, dL/dr2 stored to
    DR[(query block · B·Hq + b·Hq + h) · 2 + i]; without, bwd_dkdv adds the term inside its tiles. ROWS: the
    (4, B·Hq·L) int64 row pairs bwd_dkdv reads (SHIFT_D … ARGMIN_GLOW; those its flags need).
    """
    start_m, bh = _scheduled(SECTION, True, SCHEDULED)
    bh = bh.to(tl.int64)  # offsets can pass 2**31
    b = bh // H
    h = bh % H
    hk = h // GROUPS
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    stat = bh * L + rows
    row_ok = rows < L
    q = _load(Q + b * sqb + h * sqh, rows, L, sqn, offs_d, sqd, D, D_PAD, True)
    do = _load(DO + b * sdob + h * sdoh, rows, L, sdon, offs_dv, 1, DV, DV_PAD, True)
    o = _load(OUT + b * sob + h * soh, rows, L, son, offs_dv, 1, DV, DV_PAD, True).to(tl.float32)
    if O_LO:
        o += _load(OUT_LO + bh * L * DV, rows, L, DV, offs_dv, 1, DV, DV_PAD, True).to(tl.float32)
    d_o = tl.sum(do.to(tl.float32) * o, 1)
    shift, inv_l = _row_shift(SHIFT, INV_L, stat, row_ok, EXACT)
    pairs = tl.num_programs(1).to(tl.int64) * L  # B·Hq·L, the stride of ROWS' pairs
    tl.store(ROWS + SHIFT_D * pairs + stat, _pair(shift, d_o), mask=row_ok)
    t = _row_factor(T, stat, row_ok, h, rows, pos0, S, BLOCK_M, HAS_SSMAX, False, CAUSAL)
    r1, r2 = _bias_params(R1, R2, h, BIAS_KIND)
    if NORM == 2:
        low = tl.load(LOW + stat, mask=row_ok, other=0.0)
        inv_delta = tl.load(INV_DELTA + stat, mask=row_ok, other=0.0)
        arg_hi = tl.load(ARGMAX + stat, mask=row_ok, other=-1)
        g_hi = -d_o * inv_delta
        cs_qk = t * scale * inv_delta
        cs_one = inv_delta * (1.0 - low)
    else:
        low = d_o
        inv_delta = d_o
        arg_hi = rows
        g_hi = d_o
        cs_qk = d_o
        cs_one = d_o
    arg_lo = rows  # (read before the tiles for float32 sa_norm only, which pins x there: _pin_extremes)
    if NORM == 2 and EXACT:
        arg_lo = tl.load(ARGMIN + stat, mask=row_ok, other=-1)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_base = MASK + b * smb + h * smh
    bias_base = BIAS + b * sbb + h * sbh
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    e_sum = tl.zeros([BLOCK_M], tl.float32)
    r_sum = tl.zeros([BLOCK_M], tl.float32)
    full_end, end = _visited_keys(
        start_m, L, S, pos0, MASK_CAUSAL, bias_base, BLOCK_M, BLOCK_N, CAUSAL, HAS_MASK, ALL_MASKED, BIAS_KIND
    )
    tile_scale = scale
    if QK_SCALED:  # (q itself is read again below where it is needed)
        q, tile_scale = _scaled_operand(q, scale)
    dq, e_sum, r_sum = _dq_tiles(
        q, do, dq, e_sum, r_sum, 0, full_end, k_base, v_base, skn, skd, svn, svd, rows, offs_n, offs_d, offs_dv,
        t, shift, inv_l, d_o, low, inv_delta, cs_qk, cs_one, arg_hi, arg_lo, g_hi, L, S, pos0, tile_scale, mask_base,
        sml, sms, bias_base, sbl, sbs, r1, r2, NORM, False, CAUSAL, HAS_MASK, BIAS_KIND, HAS_SSMAX, DX_FP32,
        PRECISION, EXACT, BLOCK_N, D, D_PAD, DV, DV_PAD,
    )  # fmt: skip
    if BIAS_KIND == NO_BIAS:  # the full tiles summed dx·(q·kᵀ) into dL/dt, for dx·z
        r_sum *= scale
    dq, e_sum, r_sum = _dq_tiles(
        q, do, dq, e_sum, r_sum, full_end, end, k_base, v_base, skn, skd, svn, svd, rows, offs_n, offs_d,
        offs_dv, t, shift, inv_l, d_o, low, inv_delta, cs_qk, cs_one, arg_hi, arg_lo, g_hi, L, S, pos0, tile_scale,
        mask_base, sml, sms, bias_base, sbl, sbs, r1, r2, NORM, True, CAUSAL, HAS_MASK, BIAS_KIND, HAS_SSMAX,
        DX_FP32, PRECISION, EXACT, BLOCK_N, D, D_PAD, DV, DV_PAD,
    )  # fmt: skip
    if NORM == 2:
        # The min term g = (D − E)·c at the argmin, known only now that E is: through the key row there into dq,
        # through z there into dL/dt; into that key's dk and the bias gradients either by bwd_dkdv inside its
        # tiles (from ROWS' (argmin, g_m)) or, LOW_SCATTER, below through this query row (DK_LOW, which bwd_dkdv
        # adds once). Unlike the max term it need not meet the tile's dx before that is rounded: there w = 0 and
        # p is the row's smallest.
        if not EXACT:  # (float32 read it before the tiles)
            arg_lo = tl.load(ARGMIN + stat, mask=row_ok, other=-1)
        has_lo = arg_lo >= 0
        at_lo = tl.maximum(arg_lo, 0)
        g_lo = tl.where(has_lo, (d_o - e_sum) * inv_delta, 0.0)
        tl.store(ROWS + LOW_C * pairs + stat, _pair(low, inv_delta), mask=row_ok)
        tl.store(ROWS + ARGMIN_GLOW * pairs + stat, _pair(arg_lo, g_lo), mask=row_ok)
        k_lo = _load(k_base, at_lo, S, skn, offs_d, skd, D, D_PAD, True)
        dq += tl.where(has_lo[:, None], g_lo[:, None] * k_lo.to(tl.float32), 0.0)
        if HAS_SSMAX:  # x = t·z is the row min m there, so z = m / t (t != 0 wherever the term exists)
            r_sum += g_lo * low / tl.where(t != 0, t, 1.0)
    if NORM == 2 or HAS_SSMAX:  # (argmax, t): the argmax unused without sa_norm, t (1) without SSMax
        tl.store(ROWS + ARGMAX_T * pairs + stat, _pair(arg_hi, t), mask=row_ok)
    if HAS_SSMAX and DS_PARTIALS:  # dL/ds_h = Σ_i dL/dt_i·ln(n_i): this program's part
        part = tl.sum(tl.where(row_ok, r_sum * _log_allowed(rows, pos0, S, CAUSAL), 0.0), 0)
        tl.store(DT + start_m * tl.num_programs(1) + bh, part)
    elif HAS_SSMAX:
        tl.store(DT + stat, r_sum, mask=row_ok)
    if HAS_SSMAX:
        dq *= (t * scale)[:, None]
    else:
        dq *= scale
    dq_ptr = DQ + b * sdqb + h * sdqh + rows[:, None] * sdqn + offs_d[None, :]
    tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    if NORM == 2 and LOW_SCATTER:  # after dq's store, which frees its registers
        if QK_SCALED:
            q = _load(Q + b * sqb + h * sqh, rows, L, sqn, offs_d, sqd, D, D_PAD, True)
        dz_lo = g_lo * t  # dL/dz at the argmin
        dk_lo = DK_LOW + (b * (H // GROUPS) + hk) * S * D + at_lo[:, None] * D + offs_d[None, :]
        on_lo = has_lo[:, None] & (offs_d[None, :] < D)
        tl.atomic_add(dk_lo, dz_lo[:, None] * q.to(tl.float32), mask=on_lo, sem="relaxed")
        if BIAS_GRAD and BIAS_KIND == TABLE:
            tl.atomic_add(DBIAS + bh * sbh + rows + sbl - at_lo, dz_lo, mask=has_lo, sem="relaxed")
        elif BIAS_GRAD and BIAS_KIND >= ALIBI:  # a bias tensor's: added after bwd_dkdv, which writes its tiles
            u1, u2 = _relative_bias_grad_parts(dz_lo, _distance(rows, at_lo, pos0), r2, BIAS_KIND)
            c1, c2 = _relative_bias_grad_factors(r1, BIAS_KIND)
            slot = (start_m * tl.num_programs(1) + bh) * 2
            tl.store(DR + slot, tl.sum(u1, 0) * c1)  # (tensor first: c1 may be a constexpr)
            tl.store(DR + slot + 1, tl.sum(u2, 0) * c2)


@triton.jit
def _table_grad(dz, start_m, start_n, last_key, n, dtable, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add a (keys, rows) tile of dL/dz to dL/dtable, ``dtable`` one (batch, head)'s diagonal table of ``n``
    entries (``_table_entries``): each diagonal of the tile (one i − j) is summed in registers, then 2·BLOCK_N
    atomic adds, not one per pair.

    rolled[k, r] = dz[(r − k) mod BLOCK_N, r] puts in row k the diagonal r − c = k (where r >= k) and the
    diagonal r − c = k − BLOCK_N (where r < k); that needs BLOCK_M <= BLOCK_N.
    """
    tl.static_assert(BLOCK_M <= BLOCK_N, "a table bias's dk/dv tiles need BLOCK_M <= BLOCK_N")
    k = tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_M)[None, :]
    rolled = tl.gather(dz, (r - k[:, None] + BLOCK_N) % BLOCK_N, 0)
    below = tl.sum(tl.where(r < k[:, None], rolled, 0.0), 1)
    on = tl.sum(rolled, 1) - below
    at_on = start_m - start_n + last_key + k  # the entry of the tile's diagonal r − c = k; (partial tiles:
    at_below = at_on - BLOCK_N  # entries past the table's ends get only masked pairs' zeros, not added)
    tl.atomic_add(dtable + at_on, on, mask=(k < BLOCK_M) & (at_on >= 0) & (at_on < n), sem="relaxed")
    tl.atomic_add(dtable + at_below, below, mask=(k > 0) & (at_below >= 0) & (at_below < n), sem="relaxed")


@triton.jit
def _dkdv_tiles(
    k, v, dk, dv, dr1, dr2, lo, hi, jump_at, jump_to, q_base, do_base, sdon, stat_base, sqn, sqd, start_n, cols,
    offs_m, offs_d, offs_dv, ROWS, pairs, INV_L, L, S, pos0, scale,
    mask_base, sml, sms, bias_base, sbl, sbs, dbias_base, r1, r2,
    NORM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr, HAS_SSMAX: tl.constexpr, LOW_SCATTER: tl.constexpr, DX_FP32: tl.constexpr,
    PRECISION: tl.constexpr, EXACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
):  # fmt: skip
    """One query head's contribution to a key block, in transposed (keys, rows) tiles: the query blocks from lo to
    hi, those from jump_at on moved to jump_to (the masked loop's last, partial block: see bwd_dkdv)."""
    for i in range(lo, hi, BLOCK_M):
        start_m = i
        if MASKED:
            start_m = tl.where(i < jump_at, i, i - jump_at + jump_to)
        rows = start_m + offs_m
        row_ok = rows < L
        stat = stat_base + rows
        qt = _load_t(q_base, rows, L, sqn, offs_d, sqd, D, D_PAD, MASKED)
        do = _load(do_base, rows, L, sdon, offs_dv, 1, DV, DV_PAD, MASKED)
        shift, d_o = _row_pair(ROWS, SHIFT_D, pairs, stat, row_ok, MASKED)
        shift = shift.to(tl.float32, bitcast=True)
        d_o = d_o.to(tl.float32, bitcast=True)
        inv_l = shift
        if EXACT and MASKED:
            inv_l = tl.load(INV_L + stat, mask=row_ok, other=0.0)
        elif EXACT:
            inv_l = tl.load(INV_L + stat)
        t = tl.full([BLOCK_M], 1.0, tl.float32)
        arg_hi = tl.full([BLOCK_M], 0, tl.int32)
        if HAS_SSMAX or (NORM == 2 and EXACT):
            arg_hi, t_bits = _row_pair(ROWS, ARGMAX_T, pairs, stat, row_ok, MASKED)
            if HAS_SSMAX:
                t = t_bits.to(tl.float32, bitcast=True)
        qk = tl.dot(k, qt, input_precision=PRECISION)
        _, x, x2, ok, a = _tile_logits(  # (a: see _alibi_apart, folded into the per-row constants)
            qk, rows, rows[None, :], cols[:, None], start_n, start_m + pos0, L, S, pos0, scale, t[None, :], mask_base,
            sml, sms, bias_base, sbl, sbs, r1, r2, _rows_apart(BIAS, CAUSAL, MASKED, NORM, HAS_SSMAX, EXACT),
            MASKED, CAUSAL, HAS_MASK, BIAS, HAS_SSMAX,
        )  # fmt: skip
        if NORM == 2 and EXACT:  # (shift is μ, the row max, for float32; the pairs the terms below read too)
            low, inv_delta = _row_pair(ROWS, LOW_C, pairs, stat, row_ok, MASKED)
            arg_lo, g_lo = _row_pair(ROWS, ARGMIN_GLOW, pairs, stat, row_ok, MASKED)
            x = _pin_extremes(
                x, cols[:, None], arg_hi[None, :], arg_lo[None, :], shift[None, :],
                low.to(tl.float32, bitcast=True)[None, :],
            )  # fmt: skip
        p = _probs(x, x2, (shift - a)[None, :], inv_l[None, :], ok, MASKED, EXACT)
        dw = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if NORM == 2:
            if not EXACT:
                low, inv_delta = _row_pair(ROWS, LOW_C, pairs, stat, row_ok, MASKED)
            low = low.to(tl.float32, bitcast=True)
            inv_delta = inv_delta.to(tl.float32, bitcast=True)
            if HAS_SSMAX and not MASKED and BIAS == NO_BIAS and not EXACT:
                # s = (x − m)·c with x = scale·qk·t as one FFMA off q·kᵀ with per-row factors (from x it takes
                # two more multiplies per element; without SSMax the per-row factors cost more than they save)
                s = qk * (t * scale * inv_delta)[None, :] + (-low * inv_delta)[None, :]
                w = s * p
                dx = p * (dw * (inv_delta[None, :] + s) - d_o[None, :])
            else:
                w, dx = _dx(
                    x, p, dw, d_o[None, :], (low - a)[None, :], inv_delta[None, :], NORM,
                    (MASKED or BIAS != NO_BIAS) and not EXACT,
                )  # fmt: skip
            # (rows past L read argmax = argmin = 0, but their terms are 0 too: d_o, c and g_lo read 0)
            if not HAS_SSMAX and not EXACT:
                arg_hi, _ = _row_pair(ROWS, ARGMAX_T, pairs, stat, row_ok, MASKED)
            g_hi = (-d_o * inv_delta)[None, :]
            if LOW_SCATTER:  # the min term reaches dk through DK_LOW (bwd_dq); dx + g selected, as in bwd_dq
                dx = tl.where(cols[:, None] == arg_hi[None, :], dx + g_hi, dx)
            else:  # both terms, in one chain of selects
                if not EXACT:
                    arg_lo, g_lo = _row_pair(ROWS, ARGMIN_GLOW, pairs, stat, row_ok, MASKED)
                g_lo = g_lo.to(tl.float32, bitcast=True)
                at_lo = tl.where(cols[:, None] == arg_lo[None, :], g_lo[None, :], 0.0)
                dx += tl.where(cols[:, None] == arg_hi[None, :], g_hi, at_lo)
        else:
            w, dx = _dx(x, p, dw, d_o[None, :], d_o, d_o, NORM, False)
        if HAS_SSMAX:
            dx = dx * t[None, :]  # dL/dz
        if BIAS_GRAD:  # before the products, so that the bias's per-pair values die before they run
            dz = tl.where(ok, dx, 0.0) if MASKED else dx
            if BIAS == BIAS_TENSOR:
                db_ptr = dbias_base + rows[None, :] * S + cols[:, None]
                tl.store(db_ptr, dz, mask=(rows[None, :] < L) & (cols[:, None] < S))
            elif BIAS == TABLE:
                _table_grad(dz, start_m, start_n, sbl, L + S - 1, dbias_base, BLOCK_M, BLOCK_N)
            else:
                u1, u2 = _relative_bias_grad_parts(dz, _distance(rows[None, :], cols[:, None], pos0), r2, BIAS)
                # summed over the tile's rows (within threads and lanes), per key: over its keys would cross warps
                dr1 += tl.sum(u1, 1)
                if BIAS != ALIBI:
                    dr2 += tl.sum(u2, 1)
        dv += tl.dot(w.to(do.dtype), do, input_precision=PRECISION)
        if DX_FP32:
            dk += tl.dot(dx, tl.trans(qt).to(tl.float32), input_precision=PRECISION)
        else:
            dk += tl.dot(dx.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
    return dk, dv, dr1, dr2


@triton.jit
def bwd_dkdv(
    Q, K, V, DO, DK, DV_OUT, ROWS, INV_L, DK_LOW, R1, R2, DR, DBIAS,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    MASK, smb, smh, sml, sms, MASK_CAUSAL, BIAS, sbb, sbh, sbl, sbs,
    H, GROUPS, L, S, pos0, scale, SECTION, SCHEDULED: tl.constexpr,
    NORM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BIAS_KIND: tl.constexpr,
    BIAS_GRAD: tl.constexpr, HAS_SSMAX: tl.constexpr, LOW_SCATTER: tl.constexpr, ALL_MASKED: tl.constexpr,
    DX_FP32: tl.constexpr, PRECISION: tl.constexpr, EXACT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
):  # fmt: skip
    """dk, dv ((B, Hkv, S, D/Dv), k's dtype) and dO ((B, Hq, L, Dv)) by their (batch, head, row) strides, each
    row contiguous; the per-row values from bwd_dq's ROWS (and 1/ℓ from INV_L for float32 inputs).

    Relative biases: DR[(key block · B·Hq + b·Hq + h) · 2 + i] = this program's part of dL/dr_i of head h.
    A bias tensor: DBIAS, contiguous (B, Hq, L, S) float32, gets dL/dbias = t·dx; a table: DBIAS, zeroed (B, Hq,
    L + S) float32, gets dL/dtable along the diagonals (atomic adds; the last entry of a row is left alone).
    """
    key_block, bhk = _scheduled(SECTION, False, SCHEDULED)
    start_n = key_block * BLOCK_N
    bhk = bhk.to(tl.int64)
    hkv = H // GROUPS
    b = bhk // hkv
    hk = bhk % hkv
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    k = _load(K + b * skb + hk * skh, cols, S, skn, offs_d, skd, D, D_PAD, True)
    v = _load(V + b * svb + hk * svh, cols, S, svn, offs_dv, svd, DV, DV_PAD, True)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    # Causal: query i sees key j iff i >= j − pos0. Query blocks before `lo` see nothing of this key block;
    # from `full` on, every row sees every key of it (if the key block lies inside S).
    lo = start_n * 0  # int32 scalars, so that the branches below assign one type
    full = start_n * 0
    causal_lo = tl.maximum(start_n - pos0, 0) // BLOCK_M * BLOCK_M
    if CAUSAL:
        lo = causal_lo
        full = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - pos0, 0), L)
        full = (full + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        full = tl.maximum(full, lo)
    elif HAS_MASK:  # a mask within the causal pattern skips the query blocks a causal call would (_visited_keys)
        lo = tl.where(tl.load(MASK_CAUSAL) != 0, causal_lo, lo)
    if ALL_MASKED:
        full = start_n * 0 + L
    if start_n + BLOCK_N > S:  # the last, partial key block
        full = start_n * 0 + L
    full = tl.minimum(full, L)
    pairs = tl.num_programs(1).to(tl.int64) * GROUPS * L  # B·Hq·L, the stride of ROWS' pairs
    for g in range(GROUPS):
        h = hk * GROUPS + g
        bh = b * H + h
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        r1, r2 = _bias_params(R1, R2, h, BIAS_KIND)
        dr1 = tl.zeros([BLOCK_N], tl.float32)  # per key of the block; summed when the head is done
        dr2 = tl.zeros([BLOCK_N], tl.float32)
        mask_base = MASK + b * smb + h * smh
        bias_base = BIAS + b * sbb + h * sbh
        dbias_base = DBIAS + bh * (sbh if BIAS_KIND == TABLE else L * S)
        full_h = full
        if BIAS_KIND == TABLE:
            full_h = tl.where(_table_masks(bias_base, L, S), L, full)
        # The bulk loop takes the whole query blocks from `full_h` on; a last, partial one (rows past L) joins the
        # masked loop, after its blocks [lo, full_h): so bulk tiles load rows without bounds checks, and masked
        # tiles, whose probabilities are 0 past L, can read 0 for every row value there.
        whole = tl.maximum(full_h, L // BLOCK_M * BLOCK_M)
        tail = tl.cdiv(L - whole, BLOCK_M) * BLOCK_M
        dk, dv, dr1, dr2 = _dkdv_tiles(
            k, v, dk, dv, dr1, dr2, lo, full_h + tail, full_h, whole, q_base, do_base, sdon, bh * L, sqn, sqd, start_n,
            cols, offs_m, offs_d, offs_dv, ROWS, pairs, INV_L, L, S, pos0, scale,
            mask_base, sml, sms, bias_base, sbl, sbs, dbias_base, r1, r2,
            NORM, True, CAUSAL, HAS_MASK, BIAS_KIND, BIAS_GRAD, HAS_SSMAX, LOW_SCATTER, DX_FP32, PRECISION, EXACT,
            BLOCK_M, BLOCK_N, D, D_PAD, DV, DV_PAD,
        )  # fmt: skip
        dk, dv, dr1, dr2 = _dkdv_tiles(
            k, v, dk, dv, dr1, dr2, full_h, whole, whole, whole, q_base, do_base, sdon, bh * L, sqn, sqd, start_n,
            cols, offs_m, offs_d, offs_dv, ROWS, pairs, INV_L, L, S, pos0, scale,
            mask_base, sml, sms, bias_base, sbl, sbs, dbias_base, r1, r2,
            NORM, False, CAUSAL, HAS_MASK, BIAS_KIND, BIAS_GRAD, HAS_SSMAX, LOW_SCATTER, DX_FP32, PRECISION, EXACT,
            BLOCK_M, BLOCK_N, D, D_PAD, DV, DV_PAD,
        )  # fmt: skip
        if BIAS_GRAD and BIAS_KIND >= ALIBI and BIAS_KIND <= KERPLE_POWER:
            slot = (key_block.to(tl.int64) * tl.num_programs(1) * GROUPS + bhk * GROUPS + g) * 2
            c1, c2 = _relative_bias_grad_factors(r1, BIAS_KIND)
            tl.store(DR + slot, tl.sum(dr1, 0) * c1)  # (tensor first: c1 may be a constexpr)
            tl.store(DR + slot + 1, tl.sum(dr2, 0) * c2)
    in_k = (cols[:, None] < S) & (offs_d[None, :] < D)
    if NORM == 2 and LOW_SCATTER:  # the min terms, added into DK_LOW (contiguous) by bwd_dq
        dk += tl.load(DK_LOW + bhk * S * D + cols[:, None] * D + offs_d[None, :], mask=in_k, other=0.0)
    dk_ptr = DK + b * sdkb + hk * sdkh + cols[:, None] * sdkn + offs_d[None, :]
    tl.store(dk_ptr, (dk * scale).to(DK.dtype.element_ty), mask=in_k)
    dv_ptr = DV_OUT + b * sdvb + hk * sdvh + cols[:, None] * sdvn + offs_dv[None, :]
    tl.store(dv_ptr, dv.to(DV_OUT.dtype.element_ty), mask=(cols[:, None] < S) & (offs_dv[None, :] < DV))


# Triton keys a compiled kernel on disk by a hash of its source and its callees' (``JITFunction.cache_key``, computed
# on its first launch in a process), and that hash takes in the module constants a callee reads only if the callee's
# own hash was computed before (triton 3.6–3.9: ``DependenciesFinder._update_hash`` merges the callee's globals before
# it hashes the callee). So a kernel's key depended on which kernel a process launched first (sa_norm's row_extrema
# before fwd, or softmax's fwd alone), and another process, or another run, compiled it again under another key.
# Hashed here in definition order, callees first (each function calls only ones defined above it;
# tests/test_triton_compile.py checks that the keys are those of a fixpoint), every kernel's key is the same in
# every process: ~60 ms at import, what the first launches would take anyway.
if not triton.knobs.runtime.interpret:
    for _function in list(globals().values()):
        if isinstance(_function, getattr(triton.runtime.jit, "JITCallable", triton.runtime.JITFunction)):
            _function.cache_key  # noqa: B018 (computed and kept by Triton)
    del _function
