"""sasoftmax.attention on the eager backend: gradients, SDPA equality, dtypes, edge cases, properties."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sasoftmax
from sasoftmax import NORMALIZERS

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def qkv(b=2, hq=4, hkv=2, lq=5, lk=7, d=8, dv=None, dtype=torch.float64, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, dv or d))
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad) for s in shapes]


# --- float64 gradcheck -------------------------------------------------------------------------------------------

GRAD_CASES = {
    "plain": {},
    "mask": {"mask": "mask"},
    "bias": {"bias": "bias"},
    "ssmax": {"ssmax": "ssmax"},
    "gqa_causal_long_keys": {"causal": True},
    "causal_long_queries": {"causal": True, "lq": 7, "lk": 5},
    "everything": {"mask": "mask", "bias": "bias", "ssmax": "ssmax", "causal": True},
}


@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradcheck_float64(normalizer, case):
    spec = dict(GRAD_CASES[case])
    lq, lk = spec.pop("lq", 5), spec.pop("lk", 7)
    q, k, v = qkv(b=1, hq=4, hkv=2, lq=lq, lk=lk, d=4)
    inputs = [q, k, v]
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(1, 4, lq, lk, generator=g) > 0.3) if "mask" in spec else None
    names = []
    if "bias" in spec:
        bias = torch.randn(1, 4, lq, lk, generator=g, dtype=torch.float64)
        bias[..., 0, 1] = float("-inf")  # −inf entries are masked, and get no gradient
        inputs.append(bias.requires_grad_())
        names.append("bias")
    if "ssmax" in spec:
        inputs.append(torch.tensor([0.4, 0.7, 1.1, 1.6], dtype=torch.float64, requires_grad=True))
        names.append("ssmax")

    def f(q, k, v, *extra):
        kw = dict(zip(names, extra))
        return sasoftmax.attention(
            q, k, v, normalizer=normalizer, mask=mask, causal=spec.get("causal", False), backend="eager", **kw
        )

    assert torch.autograd.gradcheck(f, inputs, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_gradcheck_normalize(normalizer):
    scores = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 6) > 0.3
    assert torch.autograd.gradcheck(lambda s: sasoftmax.normalize(s, normalizer, mask=mask), (scores,))


def test_gradient_flows_through_min_and_max():
    # One row, two keys: the analytic derivative of sa_norm's weight includes the min/max terms.
    x = torch.tensor([[2.0, -1.0]], dtype=torch.float64, requires_grad=True)
    w = sasoftmax.normalize(x, "sa_norm", eps=1e-300)  # 1e-300 vanishes against x0 − x1 = 3
    w[0, 0].backward()
    p = torch.softmax(x.detach(), -1)
    # w0 = (x0 − x1)/(x0 − x1) · p0 = p0  ⇒  dw0/dx = dp0/dx (the min/max terms cancel the factor's own)
    want = torch.stack([p[0, 0] * (1 - p[0, 0]), -p[0, 0] * p[0, 1]])
    torch.testing.assert_close(x.grad[0], want)


# --- softmax equals scaled_dot_product_attention -----------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["plain", "causal", "gqa", "gqa_causal", "bool_mask", "float_mask", "scale", "dv_differs"]
)
def test_softmax_equals_sdpa(case):
    torch.manual_seed(0)
    hkv = 2 if "gqa" in case else 4
    q, k, v = qkv(b=2, hq=4, hkv=hkv, lq=9, lk=9, d=16, dv=24 if case == "dv_differs" else 16, dtype=torch.float32)
    ours, theirs = {}, {"enable_gqa": hkv != 4}
    if "causal" in case:
        ours["causal"] = theirs["is_causal"] = True
    if case == "bool_mask":
        m = torch.rand(2, 1, 9, 9) > 0.3
        m[..., 0] = True  # SDPA gives NaN on fully masked rows; ours gives 0, compared separately
        ours["mask"] = theirs["attn_mask"] = m
    if case == "float_mask":
        ours["bias"] = theirs["attn_mask"] = torch.randn(1, 4, 9, 9)
    if case == "scale":
        ours["scale"] = theirs["scale"] = 0.37
    out = sasoftmax.attention(q, k, v, normalizer="softmax", backend="eager", **ours)
    ref = F.scaled_dot_product_attention(q, k, v, **theirs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_causal_with_fewer_queries_equals_kv_cache_decoding():
    # The last L queries of a causal pass over S tokens are what a KV cache computes: lower-right alignment.
    q, k, v = qkv(lq=7, lk=7, dtype=torch.float32, grad=False)
    full = sasoftmax.attention(q, k, v, causal=True)
    tail = sasoftmax.attention(q[:, :, -3:], k, v, causal=True)
    torch.testing.assert_close(tail, full[:, :, -3:])


# --- dtypes, masked rows, extreme values, empty inputs -----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_low_precision_follows_flash_attention_rule(dtype, normalizer):
    """Error vs a float64 reference is at most ~2× that of the same math done plainly in ``dtype``."""
    q, k, v = qkv(b=2, hq=4, hkv=4, lq=33, lk=33, d=32, dtype=dtype, grad=False)
    out = sasoftmax.attention(q, k, v, normalizer=normalizer, causal=True)
    assert out.dtype == dtype
    ref = sasoftmax.attention(q.double(), k.double(), v.double(), normalizer=normalizer, causal=True)
    mask = torch.ones(33, 33, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2)) * 32**-0.5  # the plain implementation, entirely in dtype
    plain = sasoftmax.normalize(scores.masked_fill(~mask, float("-inf")), normalizer).to(dtype) @ v
    err = (out.double() - ref).abs().max()
    plain_err = (plain.double() - ref).abs().max()
    assert err <= 2 * plain_err + 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_fully_masked_rows_are_zero_with_zero_gradients(dtype, normalizer):
    q, k, v = qkv(lq=4, lk=6, dtype=dtype)
    mask = torch.ones(2, 4, 4, 6, dtype=torch.bool)
    mask[:, :, 1] = False  # row 1 of every head sees nothing
    bias = torch.zeros(1, 1, 4, 6)
    bias[..., 2, :] = float("-inf")  # row 2 is masked by the bias
    out = sasoftmax.attention(q, k, v, normalizer=normalizer, mask=mask, bias=bias, ssmax=0.5)
    assert torch.isfinite(out).all()
    assert (out[:, :, 1:3] == 0).all()
    gq, = torch.autograd.grad(out.float().sum(), q)
    assert torch.isfinite(gq).all() and (gq[:, :, 1:3] == 0).all()


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_keys_masked_everywhere_get_zero_gradients(normalizer):
    q, k, v = qkv()
    mask = torch.ones(1, 1, 1, 7, dtype=torch.bool)
    mask[..., [0, 4]] = False
    out = sasoftmax.attention(q, k, v, normalizer=normalizer, mask=mask)
    gk, gv = torch.autograd.grad(out.sum(), (k, v))
    assert (gk[:, :, [0, 4]] == 0).all() and (gv[:, :, [0, 4]] == 0).all()
    assert (gk[:, :, 1] != 0).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("magnitude", [0.0, 1e3, 1e4])
def test_extreme_logits_never_give_nan(dtype, normalizer, magnitude):
    """No NaN, and finite wherever the exact result fits the dtype.

    Two exact results do not fit float16: raw sa's output grows with the logits (x·p·v), and at all-zero
    logits sa_norm's gradient is O(1/eps) = 1e6.
    """
    q, k, v = qkv(dtype=torch.float32, grad=False)
    q, k, v = (q * magnitude).to(dtype).requires_grad_(), k.to(dtype).requires_grad_(), v.to(dtype)
    out = sasoftmax.attention(q, k, v, normalizer=normalizer, causal=True, ssmax=2.0)
    grads = torch.autograd.grad(out.float().sum(), (q, k))
    exact = [q.detach().double().requires_grad_(), k.detach().double().requires_grad_()]
    exact_out = sasoftmax.attention(*exact, v.double(), normalizer=normalizer, causal=True, ssmax=2.0)
    exact_grads = torch.autograd.grad(exact_out.sum(), exact)
    limit = torch.finfo(dtype).max
    for got, want in zip((out, *grads), (exact_out, *exact_grads)):
        assert not torch.isnan(got).any()
        fits = want.abs() < limit / 2
        assert torch.isfinite(got[fits]).all()


def test_all_zero_logits_give_the_mean_or_zero():
    q = torch.zeros(1, 1, 3, 4)
    k, v = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    mean = v.mean(2, keepdim=True).expand(1, 1, 3, 4)
    torch.testing.assert_close(sasoftmax.attention(q, k, v, normalizer="softmax"), mean)
    # sa and sa_norm weigh every key by x = 0, which the SA factor turns into weight 0.
    assert (sasoftmax.attention(q, k, v, normalizer="sa") == 0).all()
    assert (sasoftmax.attention(q, k, v, normalizer="sa_norm") == 0).all()


@pytest.mark.parametrize("lq,lk", [(0, 5), (3, 0), (0, 0)])
def test_empty_sequences(lq, lk):
    q, k, v = qkv(lq=lq, lk=lk, dtype=torch.float32)
    out = sasoftmax.attention(q, k, v, causal=True)
    assert out.shape == (2, 4, lq, 8) and (out == 0).all()
    out.sum().backward()
    assert q.grad is not None and (q.grad == 0).all()


def test_dropout_drops_weights_like_torch():
    q, k, v = qkv(dtype=torch.float32, grad=False)
    torch.manual_seed(5)
    out = sasoftmax.attention(q, k, v, dropout_p=0.5, backend="eager")
    torch.manual_seed(5)
    from sasoftmax.attention import make_call
    from sasoftmax.backends.eager import attention_weights

    call = make_call(q, k, v, "sa_norm", False, None, None, None, None, 1e-6, 0.0)
    w = F.dropout(attention_weights(call), 0.5)
    want = (w.view(2, 2, 2, 5, 7) @ v.unsqueeze(2)).view(2, 4, 5, 8)
    torch.testing.assert_close(out, want)
    assert not torch.allclose(out, sasoftmax.attention(q, k, v))


def test_ssmax_gets_gradients_and_is_ln_n_scaling():
    q, k, v = qkv(dtype=torch.float64)
    s = torch.full((4,), 0.8, dtype=torch.float64, requires_grad=True)
    out = sasoftmax.attention(q, k, v, normalizer="softmax", ssmax=s)
    (gs,) = torch.autograd.grad(out.sum(), s)
    assert (gs != 0).all()
    # Without a mask n = S for every row: SSMax equals a scale multiplied by s·ln(S).
    plain = sasoftmax.attention(q, k, v, normalizer="softmax", scale=0.8 * torch.log(torch.tensor(7.0)).item() / 8**0.5)
    torch.testing.assert_close(out, plain)


def test_auto_backend_serves_cpu_tensors():
    q, k, v = qkv(dtype=torch.float32, grad=False)
    torch.testing.assert_close(sasoftmax.attention(q, k, v), sasoftmax.attention(q, k, v, backend="eager"))


# --- properties ---------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    groups=st.integers(1, 3),
    lq=st.integers(1, 9),
    lk=st.integers(1, 9),
    d=st.integers(1, 8),
    magnitude=st.sampled_from([1e-3, 1.0, 30.0, 1e3]),
    normalizer=st.sampled_from(NORMALIZERS),
    causal=st.booleans(),
    ssmax=st.sampled_from([None, 0.3, 2.0]),
    keep=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_properties(b, hkv, groups, lq, lk, d, magnitude, normalizer, causal, ssmax, keep, seed):
    g = torch.Generator().manual_seed(seed)
    hq = hkv * groups
    q = (torch.randn(b, hq, lq, d, generator=g) * magnitude).requires_grad_()
    k = torch.randn(b, hkv, lk, d, generator=g).requires_grad_()
    v = torch.randn(b, hkv, lk, d, generator=g).requires_grad_()
    key_mask = torch.rand(b, 1, 1, lk, generator=g) < keep
    out = sasoftmax.attention(q, k, v, normalizer=normalizer, causal=causal, mask=key_mask, ssmax=ssmax)
    assert torch.isfinite(out).all()
    gq, gk, gv = torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k, v))
    assert all(torch.isfinite(t).all() for t in (gq, gk, gv))
    dropped = ~key_mask[:, 0, 0]  # (b, lk): keys no query may attend
    assert (gk.transpose(1, 2)[dropped] == 0).all() and (gv.transpose(1, 2)[dropped] == 0).all()

    scores = torch.randn(b, hq, lq, lk, generator=g) * magnitude
    p = sasoftmax.normalize(scores, "softmax", mask=key_mask)
    w = sasoftmax.normalize(scores, "sa_norm", mask=key_mask)
    assert (w >= 0).all() and (w <= p + 1e-7).all()


def test_every_backend_name_loads_its_own_module():
    from sasoftmax import backends

    for name in backends.BACKENDS:
        if backends.unavailable(name) is None:
            assert backends.load(name).__name__ == f"sasoftmax.backends.{name}"
