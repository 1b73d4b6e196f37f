"""Triton kernels of the fused attention (DESIGN §2 and §3), after Triton's fused-attention tutorial.

Layout: q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), any strides; q may be float32 while
k and v are 16-bit (SSMax's rescaled q), and is cast to k's dtype on load; query head h reads kv head
h // GROUPS (grouped-query attention without copying k/v). Per-row statistics are contiguous
(B·Hq, L) float32/int32 tensors. NORM: 0 softmax, 1 sa, 2 sa_norm. Causal masking is aligned
lower-right (query i sees keys j <= i + S − L); an optional uint8 mask and an optional additive bias,
both (B, Hq, L, S) views broadcast with stride 0, remove more pairs (mask 0 or bias −inf) and shift
the logits. D_PAD/DV_PAD are the head dims rounded up to a power of two; the padding lanes are masked
on load and store. Every dot accumulates in float32.

Kernels:
- ``fwd``: one program per (query block, batch·head); streams key blocks keeping the running max μ
  (which is also the running max of x), the sum ℓ, the running min of x, the argmin/argmax, and the
  accumulators A = Σ e^{x−μ} x v and B = Σ e^{x−μ} v. Writes o and the row statistics.
- ``bwd_preprocess``: D_i = dO_i·o_i and E_i = dO_i·(B_i/ℓ_i).
- ``bwd_dkdv``: one program per (key block, batch·kv head); loops over the query heads of its group
  and over query blocks; dv = Σ w dO, dk = scale Σ dx q.
- ``bwd_dq``: one program per (query block, batch·head); dq = scale Σ dx k.
The sa_norm gradient through the row min and max (one term per row each) is added outside, in torch.
DX_FP32 keeps dx in float32 for the dk and dq products: sa_norm's dx carries 1/(M − m + ε), up to 1/ε,
beyond float16's range.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _logits(
    q, k, rows, cols, L, S, scale, mask_ptr, sml, sms, bias_ptr, sbl, sbs,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Float32 logits x = scale·q·kᵀ + bias of a (BLOCK_M, BLOCK_N) tile, and where they are allowed.

    Allowed: the pair exists, is causally visible, the mask is nonzero and the bias is not −inf.
    ``mask_ptr``/``bias_ptr`` point at this (batch, head)'s uint8 mask / bias (broadcast dims have stride
    0). x is finite everywhere (a −inf bias adds 0), so products like p·x are 0, not NaN, where masked.
    """
    ok = (rows[:, None] < L) & (cols[None, :] < S)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + (S - L))
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + rows[:, None] * sml + cols[None, :] * sms, mask=ok, other=0) != 0)
    x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows[:, None] * sbl + cols[None, :] * sbs, mask=ok, other=0.0).to(tl.float32)
        dropped = bias == float("-inf")
        ok = ok & ~dropped
        x = x + tl.where(dropped, 0.0, bias)
    return x, ok


@triton.jit
def _load_rows(ptr, rows, n_rows, stride_n, stride_d, offs_d, d):
    """Load a (len(rows), len(offs_d)) tile, zero outside the tensor."""
    mask = (rows[:, None] < n_rows) & (offs_d[None, :] < d)
    return tl.load(ptr + rows[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _key_end(start_m, L, S, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last key any query of the block may attend."""
    if CAUSAL:
        return tl.maximum(tl.minimum(S, (start_m + 1) * BLOCK_M + S - L), 0)
    return S


@triton.jit
def fwd(
    Q, K, V, OUT, LSE, LOW, HIGH, INV_DELTA, ARGMIN, ARGMAX, BN,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    MASK, smb, smh, sml, sms, BIAS, sbb, sbh, sbl, sbs,
    H, GROUPS, L, S, D, DV, scale, eps,
    NORM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # offsets can pass 2**31
    b = bh // H
    h = bh % H
    hk = h // GROUPS
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = _load_rows(Q + b * sqb + h * sqh, rows, L, sqn, sqd, offs_d, D).to(K.dtype.element_ty)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_base = MASK + b * smb + h * smh
    bias_base = BIAS + b * sbb + h * sbh

    mu = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of x
    low = tl.full([BLOCK_M], float("inf"), tl.float32)  # running min of x
    arg_hi = tl.zeros([BLOCK_M], tl.int32)
    arg_lo = tl.zeros([BLOCK_M], tl.int32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc_b = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    acc_a = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    for start_n in range(0, _key_end(start_m, L, S, BLOCK_M, CAUSAL), BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, S, skn, skd, offs_d, D)
        v = _load_rows(v_base, cols, S, svn, svd, offs_dv, DV)
        x, ok = _logits(
            q, k, rows, cols, L, S, scale, mask_base, sml, sms, bias_base, sbl, sbs,
            CAUSAL, HAS_MASK, HAS_BIAS, PRECISION,
        )  # fmt: skip
        x_hi = tl.where(ok, x, float("-inf"))
        block_hi = tl.max(x_hi, 1)
        block_arg_hi = tl.argmax(x_hi, 1).to(tl.int32) + start_n
        arg_hi = tl.where(block_hi > mu, block_arg_hi, arg_hi)
        new_mu = tl.maximum(mu, block_hi)
        if NORM == 2:
            x_lo = tl.where(ok, x, float("inf"))
            block_lo = tl.min(x_lo, 1)
            block_arg_lo = tl.argmin(x_lo, 1).to(tl.int32) + start_n
            arg_lo = tl.where(block_lo < low, block_arg_lo, arg_lo)
            low = tl.minimum(low, block_lo)
        # A row with no allowed key so far has μ = −inf; shift it by 0 so no inf − inf appears.
        shift = tl.where(new_mu == float("-inf"), 0.0, new_mu)
        alpha = tl.exp(mu - shift)
        p = tl.exp(x_hi - shift[:, None])
        total = total * alpha + tl.sum(p, 1)
        acc_b = acc_b * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        if NORM != 0:
            # x is finite everywhere (masked lanes hold their raw logit or 0), so p·x is 0 there.
            acc_a = acc_a * alpha[:, None] + tl.dot((p * x).to(v.dtype), v, input_precision=PRECISION)
        mu = new_mu

    has_keys = total > 0
    safe_total = tl.where(has_keys, total, 1.0)
    row_mask = rows < L
    stat = bh * L + rows
    tl.store(LSE + stat, tl.where(has_keys, mu + tl.log(safe_total), float("inf")), mask=row_mask)
    if NORM == 0:
        out = acc_b / safe_total[:, None]
    elif NORM == 1:
        out = acc_a / safe_total[:, None]
    else:
        m = tl.minimum(low, 0.0)  # +inf (no key) -> 0
        big_m = tl.maximum(mu, 0.0)  # -inf (no key) -> 0
        delta = big_m - m + eps
        inv_delta = tl.where(delta > 0, 1.0 / delta, 0.0)
        out = (acc_a - m[:, None] * acc_b) * (inv_delta / safe_total)[:, None]
        tl.store(LOW + stat, m, mask=row_mask)
        tl.store(HIGH + stat, big_m, mask=row_mask)
        tl.store(INV_DELTA + stat, inv_delta, mask=row_mask)
        tl.store(ARGMIN + stat, arg_lo, mask=row_mask)
        tl.store(ARGMAX + stat, arg_hi, mask=row_mask)
        bn_ptr = BN + stat[:, None] * DV + offs_dv[None, :]
        tl.store(bn_ptr, acc_b / safe_total[:, None], mask=row_mask[:, None] & (offs_dv[None, :] < DV))
    o_ptr = OUT + b * sob + h * soh + rows[:, None] * son + offs_dv[None, :] * sod
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=row_mask[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def bwd_preprocess(
    OUT, DO, BN, DELTA, EXTRA, L, DV,
    NORM: tl.constexpr, BLOCK_M: tl.constexpr, DV_PAD: tl.constexpr,
):  # fmt: skip
    """D_i = dO_i·o_i and (sa_norm) E_i = dO_i·(B_i/ℓ_i); o, dO, B/ℓ contiguous (B·Hq, L, Dv)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1).to(tl.int64)  # offsets can pass 2**31
    offs = tl.arange(0, DV_PAD)
    base = bh * L * DV
    do = _load_rows(DO + base, rows, L, DV, 1, offs, DV).to(tl.float32)
    o = _load_rows(OUT + base, rows, L, DV, 1, offs, DV).to(tl.float32)
    tl.store(DELTA + bh * L + rows, tl.sum(do * o, 1), mask=rows < L)
    if NORM == 2:
        bn = _load_rows(BN + base, rows, L, DV, 1, offs, DV)
        tl.store(EXTRA + bh * L + rows, tl.sum(do * bn, 1), mask=rows < L)


@triton.jit
def _weights_and_dx(x, ok, lse, low, inv_delta, d_o, dw, NORM: tl.constexpr):
    """Weights w and dL/dx of DESIGN §2 for a (BLOCK_M, BLOCK_N) tile (the min/max terms excluded)."""
    # Masking before exp: a masked logit may lie far above the row's logsumexp.
    p = tl.exp(tl.where(ok, x - lse[:, None], float("-inf")))
    if NORM == 0:
        w = p
        dx = p * (dw - d_o[:, None])
    elif NORM == 1:
        w = x * p
        dx = p * (dw * (1.0 + x) - d_o[:, None])
    else:
        s = (x - low[:, None]) * inv_delta[:, None]
        w = s * p
        dx = p * (dw * (inv_delta[:, None] + s) - d_o[:, None])
    return w, dx


@triton.jit
def _row_stats(LSE, LOW, INV_DELTA, DELTA, stat, row_mask, NORM: tl.constexpr):
    lse = tl.load(LSE + stat, mask=row_mask, other=float("inf"))
    d_o = tl.load(DELTA + stat, mask=row_mask, other=0.0)
    if NORM == 2:
        low = tl.load(LOW + stat, mask=row_mask, other=0.0)
        inv_delta = tl.load(INV_DELTA + stat, mask=row_mask, other=0.0)
    else:
        low = d_o
        inv_delta = d_o
    return lse, low, inv_delta, d_o


@triton.jit
def bwd_dkdv(
    Q, K, V, DO, DK, DV_OUT, LSE, LOW, INV_DELTA, DELTA,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    MASK, smb, smh, sml, sms, BIAS, sbb, sbh, sbl, sbs,
    H, GROUPS, L, S, D, DV, scale,
    NORM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    DX_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
):  # fmt: skip
    """dK, dV (float32, contiguous (B, Hkv, S, D/Dv)); dO is contiguous (B, Hq, L, Dv)."""
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1).to(tl.int64)
    hkv = H // GROUPS
    b = bhk // hkv
    hk = bhk % hkv
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    k = _load_rows(K + b * skb + hk * skh, cols, S, skn, skd, offs_d, D)
    v = _load_rows(V + b * svb + hk * svh, cols, S, svn, svd, offs_dv, DV)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    # Causal: query i sees key j iff i >= j − (S − L); earlier query blocks contribute nothing.
    lo = 0
    if CAUSAL:
        lo = tl.maximum(start_n - (S - L), 0) // BLOCK_M * BLOCK_M
    for g in range(GROUPS):
        h = hk * GROUPS + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + (b * H + h) * L * DV
        for start_m in range(lo, L, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_mask = rows < L
            q = _load_rows(q_base, rows, L, sqn, sqd, offs_d, D).to(K.dtype.element_ty)
            do = _load_rows(do_base, rows, L, DV, 1, offs_dv, DV)
            lse, low, inv_delta, d_o = _row_stats(LSE, LOW, INV_DELTA, DELTA, (b * H + h) * L + rows, row_mask, NORM)
            x, ok = _logits(
                q, k, rows, cols, L, S, scale, MASK + b * smb + h * smh, sml, sms,
                BIAS + b * sbb + h * sbh, sbl, sbs, CAUSAL, HAS_MASK, HAS_BIAS, PRECISION,
            )  # fmt: skip
            dw = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            w, dx = _weights_and_dx(x, ok, lse, low, inv_delta, d_o, dw, NORM)
            dv += tl.dot(tl.trans(w).to(do.dtype), do, input_precision=PRECISION)
            if DX_FP32:
                dk += tl.dot(tl.trans(dx), q.to(tl.float32), input_precision=PRECISION)
            else:
                dk += tl.dot(tl.trans(dx).to(q.dtype), q, input_precision=PRECISION)
    out = bhk * S * D + cols[:, None] * D + offs_d[None, :]
    tl.store(DK + out, dk * scale, mask=(cols[:, None] < S) & (offs_d[None, :] < D))
    out_v = bhk * S * DV + cols[:, None] * DV + offs_dv[None, :]
    tl.store(DV_OUT + out_v, dv, mask=(cols[:, None] < S) & (offs_dv[None, :] < DV))


@triton.jit
def bwd_dq(
    Q, K, V, DO, DQ, LSE, LOW, INV_DELTA, DELTA,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    MASK, smb, smh, sml, sms, BIAS, sbb, sbh, sbl, sbs,
    H, GROUPS, L, S, D, DV, scale,
    NORM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    DX_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
):  # fmt: skip
    """dQ (float32, contiguous (B, Hq, L, D)); dO is contiguous (B, Hq, L, Dv)."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # offsets can pass 2**31
    b = bh // H
    h = bh % H
    hk = h // GROUPS
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < L
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = _load_rows(Q + b * sqb + h * sqh, rows, L, sqn, sqd, offs_d, D).to(K.dtype.element_ty)
    do = _load_rows(DO + bh * L * DV, rows, L, DV, 1, offs_dv, DV)
    lse, low, inv_delta, d_o = _row_stats(LSE, LOW, INV_DELTA, DELTA, bh * L + rows, row_mask, NORM)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_base = MASK + b * smb + h * smh
    bias_base = BIAS + b * sbb + h * sbh
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start_n in range(0, _key_end(start_m, L, S, BLOCK_M, CAUSAL), BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, S, skn, skd, offs_d, D)
        v = _load_rows(v_base, cols, S, svn, svd, offs_dv, DV)
        x, ok = _logits(
            q, k, rows, cols, L, S, scale, mask_base, sml, sms, bias_base, sbl, sbs,
            CAUSAL, HAS_MASK, HAS_BIAS, PRECISION,
        )  # fmt: skip
        dw = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        _, dx = _weights_and_dx(x, ok, lse, low, inv_delta, d_o, dw, NORM)
        if DX_FP32:
            dq += tl.dot(dx, k.to(tl.float32), input_precision=PRECISION)
        else:
            dq += tl.dot(dx.to(k.dtype), k, input_precision=PRECISION)
    out = bh * L * D + rows[:, None] * D + offs_d[None, :]
    tl.store(DQ + out, dq * scale, mask=row_mask[:, None] & (offs_d[None, :] < D))
