"""The eager reference against DESIGN §1 written a second, independent way: explicit loops over rows."""

import math

import pytest
import torch
import torch.nn.functional as F

import sasoftmax
from sasoftmax import NORMALIZERS


def row_weights(x: list[float], normalizer: str, eps: float) -> list[float]:
    """One row's weights over its allowed keys, in plain Python floats."""
    mu = max(x)
    e = [math.exp(v - mu) for v in x]
    p = [v / sum(e) for v in e]
    if normalizer == "softmax":
        return p
    if normalizer == "sa":
        return [v * pv for v, pv in zip(x, p)]
    low, high = min(0.0, min(x)), max(0.0, max(x))
    return [(v - low) / (high - low + eps) * pv for v, pv in zip(x, p)]


def loop_attention(q, k, v, normalizer, causal=False, mask=None, bias=None, scale=None, ssmax=None, eps=1e-6):
    """DESIGN §1 query by query, key by key, in float64."""
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, hq, lq, dv, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(lq):
                keys, logits = [], []
                for j in range(lk):
                    if causal and j > i + lk - lq:
                        continue
                    if mask is not None and not bool(mask.expand(b, hq, lq, lk)[bi, h, i, j]):
                        continue
                    z = scale * float(q[bi, h, i] @ k[bi, kh, j])
                    if bias is not None:
                        bij = float(bias.expand(b, hq, lq, lk)[bi, h, i, j])
                        if bij == float("-inf"):
                            continue
                        z += bij
                    keys.append(j)
                    logits.append(z)
                if not keys:
                    continue
                if ssmax is not None:
                    t = float(ssmax[h]) * math.log(len(keys))
                    logits = [t * z for z in logits]
                for j, w in zip(keys, row_weights(logits, normalizer, eps)):
                    out[bi, h, i] += w * v[bi, kh, j].double()
    return out


def rand(*shape, dtype=torch.float64, scale=1.0):
    return torch.randn(*shape, dtype=dtype) * scale


@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize(
    "case",
    ["plain", "causal_long_keys", "causal_long_queries", "mask", "bias", "ssmax", "gqa_all"],
)
def test_eager_matches_loops(normalizer, case):
    torch.manual_seed(0)
    b, hq, hkv, lq, lk, d = 2, 4, 4, 5, 7, 8
    kwargs = {}
    if case == "causal_long_keys":
        kwargs["causal"] = True
    if case == "causal_long_queries":
        lq, lk = 7, 5
        kwargs["causal"] = True
    if case in ("mask", "gqa_all"):
        kwargs["mask"] = torch.rand(b, 1, lq, lk) > 0.3
    if case in ("bias", "gqa_all"):
        bias = rand(1, hq, lq, lk)
        bias[0, 1, 2, :3] = float("-inf")
        kwargs["bias"] = bias
    if case in ("ssmax", "gqa_all"):
        kwargs["ssmax"] = torch.tensor([0.3, 0.5, 1.0, 2.0], dtype=torch.float64)
    if case == "gqa_all":
        hkv = 2
        kwargs["causal"] = True
    q, k, v = rand(b, hq, lq, d, scale=2), rand(b, hkv, lk, d, scale=2), rand(b, hkv, lk, 3)
    got = sasoftmax.attention(q, k, v, normalizer=normalizer, backend="eager", **kwargs)
    want = loop_attention(q, k, v, normalizer, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_normalize_matches_loops(normalizer):
    torch.manual_seed(1)
    scores = rand(3, 6, 9, scale=3)
    mask = torch.rand(3, 6, 9) > 0.4
    mask[0, 0] = False  # one fully masked row
    scores[1, 2, 4] = float("-inf")
    w = sasoftmax.normalize(scores, normalizer, mask=mask, eps=1e-3)
    for idx in torch.cartesian_prod(torch.arange(3), torch.arange(6)):
        a, r = idx.tolist()
        keys = [j for j in range(9) if mask[a, r, j] and scores[a, r, j] != float("-inf")]
        want = torch.zeros(9, dtype=torch.float64)
        if keys:
            for j, wj in zip(keys, row_weights([float(scores[a, r, j]) for j in keys], normalizer, 1e-3)):
                want[j] = wj
        torch.testing.assert_close(w[a, r], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_normalize_along_other_dim(normalizer):
    scores = rand(4, 5, 6)
    torch.testing.assert_close(
        sasoftmax.normalize(scores, normalizer, dim=1),
        sasoftmax.normalize(scores.transpose(1, 2), normalizer).transpose(1, 2),
    )


def test_softmax_normalize_equals_torch_softmax():
    scores = rand(4, 7, 11, scale=5)
    torch.testing.assert_close(sasoftmax.normalize(scores, "softmax"), F.softmax(scores, -1), rtol=0, atol=1e-15)


def test_sa_norm_weights_lie_between_zero_and_softmax():
    scores = rand(50, 40, scale=4)
    p = sasoftmax.normalize(scores, "softmax")
    w = sasoftmax.normalize(scores, "sa_norm")
    assert (w >= 0).all() and (w <= p).all()
