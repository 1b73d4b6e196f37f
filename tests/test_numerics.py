"""Numerics every backend (and every path of the cpu backend) shares: sa_norm's tie rule for the gradient of
its row min and max, and NaN propagation.

Tie rule (DESIGN §1): the gradient through M_i = max(0, max_j x_ij) flows only when max_j x_ij > 0 strictly,
and then entirely to the first allowed key (lowest j) attaining the max; through m_i = min(0, min_j x_ij) only
when min_j x_ij < 0 strictly, to the first allowed key attaining the min. The reference below transcribes
that rule row by row with Python's own max/min and list.index, independently of the library.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import sasoftmax
from sasoftmax import backends
from sasoftmax.attention import make_call

NAN = float("nan")
EPS = 1e-6


def rule_reference(q, k, v, *, causal=False, mask=None, ssmax=None, eps=EPS):
    """sa_norm attention by the tie rule, one row at a time (float64 autograd)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    x_all = q @ k.repeat_interleave(hq // hkv, 1).transpose(-1, -2) / math.sqrt(d)
    rows = []
    for bi in range(b):
        for h in range(hq):
            for i in range(lq):
                keys = [j for j in range(lk) if (not causal or j <= i + lk - lq) and (mask is None or mask[i, j])]
                if not keys:
                    rows.append(torch.zeros(v.shape[-1], dtype=v.dtype))
                    continue
                x = x_all[bi, h, i, keys]
                if ssmax is not None:
                    x = x * ssmax[h] * math.log(len(keys))
                values = x.tolist()
                top, bottom = max(values), min(values)
                zero = x.new_zeros(())
                high = x[values.index(top)] if top > 0 else zero  # first key attaining the max
                low = x[values.index(bottom)] if bottom < 0 else zero  # first key attaining the min
                w = (x - low) / (high - low + eps) * torch.softmax(x, 0)
                rows.append(w @ v[bi, h // (hq // hkv), keys])
    return torch.stack(rows).view(b, hq, lq, -1)


def outputs_and_grads(fn, leaves, grad):
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, leaves, grad.to(out.dtype))]


def assert_close_relative(got, want, rtol):
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all(), f"item {i} has NaN/inf"
        err = (a.double() - b.double()).abs().max().item()
        assert err <= rtol * max(b.abs().max().item(), 1.0), (
            f"item {i}: max error {err:.3g} (scale {b.abs().max():.3g})"
        )


def check_against_rule(path, q, k, v, grad, *, causal=False, mask=None, ssmax=None):
    """Outputs and gradients of ``path`` (its device and dtype) against :func:`rule_reference` in float64."""
    dtype, device = path.dtype, path.device
    leaves = [t.detach().requires_grad_() for t in (q, k, v) + (() if ssmax is None else (ssmax,))]

    def ours(q, k, v, s=None):
        return sasoftmax.attention(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), normalizer="sa_norm",
                                   causal=causal, mask=None if mask is None else mask.to(device),
                                   ssmax=None if s is None else s.to(device, dtype), eps=EPS,
                                   backend=path.backend).cpu()  # fmt: skip

    def reference(q, k, v, s=None):
        return rule_reference(q, k, v, causal=causal, mask=mask, ssmax=s)

    got = outputs_and_grads(ours, leaves, grad)
    want = outputs_and_grads(reference, leaves, grad)
    assert_close_relative(got, want, rtol=1e-9 if dtype == torch.float64 else 2e-4)
    return want


@pytest.mark.parametrize("causal", [False, True])
def test_all_equal_logits_have_no_min_max_gradient(backend_path, causal):
    """q = 0: every logit is 0, so M = m = 0 with no min/max term; dL/dx = p·dW·c only (c = 1/ε)."""
    g = torch.Generator().manual_seed(0)
    q = torch.zeros(1, 2, 6, 16, dtype=torch.float64)
    k, v = (torch.randn(1, 1, 6, 16, generator=g, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(1, 2, 6, 16, generator=g, dtype=torch.float64)
    want = check_against_rule(backend_path, q, k, v, grad, causal=causal)
    # The rule's gradient at x ≡ 0 is p·dW/ε: large, and the same on every backend.
    assert want[1].abs().max() > 1e4


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("ssmax", [False, True])
def test_duplicated_keys_tie_for_the_min_and_max(backend_path, causal, masked, ssmax):
    """Keys repeated at positions 10, 64, 100 (the row max) and 5, 63, 129 (the row min), with integer-valued
    inputs so that the tied logits are bit-identical whatever the summation order; a mask hides the first copy
    of each from some rows, so the gradient must go to the first *allowed* copy."""
    g = torch.Generator().manual_seed(1)
    lq, lk, d = 8, 130, 16
    q = torch.randint(1, 3, (1, 2, lq, d), generator=g).double()
    k = torch.randint(-1, 2, (1, 1, lk, d), generator=g).double()
    top = 2 * torch.randint(1, 3, (d,), generator=g).double()  # q·top = 2 q·t > q·k for every random k
    k[0, 0, [10, 64, 100]] = top
    k[0, 0, [5, 63, 129]] = -top
    v = torch.randn(1, 1, lk, 16, generator=g, dtype=torch.float64)
    grad = torch.randn(1, 2, lq, 16, generator=g, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.ones(lq, lk, dtype=torch.bool)
        mask[::2, 10] = mask[::2, 5] = False
        mask[::4, 64] = mask[::4, 63] = False
    s = torch.tensor([0.5, 0.8], dtype=torch.float64) if ssmax else None
    check_against_rule(backend_path, q, k, v, grad, causal=causal, mask=mask, ssmax=s)


def test_eager_tie_rule_at_the_formula_level():
    """normalize(): the min/max gradient goes to the first tied key, and none flows at max = 0 or min = 0."""
    x = torch.tensor([[1.0, 3.0, 3.0, -2.0, -2.0], [0.0, 0.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
    x.requires_grad_()
    weights = torch.arange(1.0, 6.0, dtype=torch.float64)
    (sasoftmax.normalize(x, "sa_norm") * weights).sum().backward()
    want = torch.zeros_like(x)
    for r, row in enumerate(x.detach()):
        xr = row.clone().requires_grad_()
        values = row.tolist()
        hi = xr[values.index(max(values))] if max(values) > 0 else xr.new_zeros(())
        lo = xr[values.index(min(values))] if min(values) < 0 else xr.new_zeros(())
        ((xr - lo) / (hi - lo + EPS) * torch.softmax(xr, 0) * weights).sum().backward()
        want[r] = xr.grad
    torch.testing.assert_close(x.grad, want, atol=1e-12, rtol=1e-12)


# --- NaN propagation -------------------------------------------------------------------------------------------


class NanBias(nn.Module):
    """A bias function with a NaN at (query position 3, key 2)."""

    def forward(self, q_pos, k_pos):
        out = (q_pos[:, None] - k_pos[None, :]).double() * -0.1
        return torch.where((q_pos[:, None] == 3) & (k_pos[None, :] == 2), NAN, out)


def nan_case(where: str, dtype: torch.dtype, device: str = "cpu"):
    """(q, k, v, kwargs) with one NaN placed by ``where``, B = 1, Hq = 4, Hkv = 2, L = S = 6, causal."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 6, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 6, 16, generator=g, dtype=torch.float64) for _ in range(2))
    kwargs = {}
    if where == "q":
        q[0, 1, 3, 5] = NAN  # one row
    elif where == "k":
        k[0, 1, 2, 5] = NAN  # key 2 of kv head 1: rows >= 2 of query heads 2 and 3
    elif where == "v":
        v[0, 1, 2, 5] = NAN
    elif where == "bias":
        bias = torch.zeros(4, 6, 6, dtype=torch.float64)
        bias[2, 3, 2] = NAN
        kwargs["bias"] = bias.to(device, dtype)
    elif where == "bias function":
        kwargs["bias"] = NanBias()
    q, k, v = (t.to(device, dtype).requires_grad_() for t in (q, k, v))
    return q, k, v, kwargs


@pytest.mark.parametrize("where", ["q", "k", "v", "bias", "bias function"])
@pytest.mark.parametrize("normalizer", ["softmax", "sa_norm"])
def test_nan_propagates_like_eager(backend_path, where, normalizer):
    path = backend_path
    q, k, v, kwargs = nan_case(where, path.dtype, path.device)
    args = dict(normalizer=normalizer, causal=True, **kwargs)
    got = sasoftmax.attention(q, k, v, backend=path.backend, **args)
    want = sasoftmax.attention(q, k, v, backend="eager", **args)
    nan_rows = torch.isnan(want).any(-1)
    assert nan_rows.any()
    if where == "v":  # 0·NaN: whether a row that does not attend key 2 sees it depends on the GEMM; those that do must
        attends = torch.isnan(want).any(-1) & (torch.arange(6, device=path.device) >= 2)
        assert torch.isnan(got).any(-1)[attends].all()
    else:
        assert torch.equal(torch.isnan(got).any(-1), nan_rows), "NaN rows differ from eager's"
        torch.testing.assert_close(got[~nan_rows], want[~nan_rows], atol=2e-5, rtol=2e-5)
    if where == "q":
        assert nan_rows.nonzero().tolist() == [[0, 1, 3]]
    (dq,) = torch.autograd.grad(got.sum(), q)
    assert torch.isnan(dq).any()


def test_nan_in_an_ssmax_tensor_propagates(backend_path):
    """Validation refuses a non-finite s on CPU; below it (and on CUDA, where values are not checked) every
    backend turns a NaN s into NaN rows of that head."""
    path = backend_path
    q, k, v, _ = nan_case("none", path.dtype, path.device)
    s = torch.full((4,), 0.5, dtype=path.dtype, device=path.device)
    call = make_call(q, k, v, "sa_norm", True, None, None, None, s, EPS, 0.0)
    bad = s.clone()
    bad[2] = NAN
    if path.device == "cpu":
        with pytest.raises(ValueError, match="ssmax"):
            sasoftmax.attention(q, k, v, ssmax=bad, backend=path.backend)
    out = backends.load(path.backend).attention(dataclasses.replace(call, ssmax=bad))
    nan_rows = torch.isnan(out).any(-1)
    assert nan_rows[0, 2].all() and not nan_rows[0, [0, 1, 3]].any()
