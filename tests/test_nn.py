"""sasoftmax.nn: the SSMax scale and the multi-head attention layer."""

import math

import pytest
import torch
import torch.nn.functional as F

import sasoftmax
from sasoftmax.nn import SSMAX_PAPER_INIT, MultiheadAttention, SSMaxScale


def test_ssmax_scale_inits():
    assert torch.equal(SSMaxScale(3)(), torch.full((3,), SSMAX_PAPER_INIT))
    s = SSMaxScale.for_length(2, 512)()
    torch.testing.assert_close(s * math.log(512), torch.ones(2))
    assert isinstance(SSMaxScale(2).s, torch.nn.Parameter)


@pytest.mark.parametrize("args", [(0,), (2, 0.0), (2, -1.0), (2, float("inf"))])
def test_ssmax_scale_rejects_bad_values(args):
    with pytest.raises(ValueError):
        SSMaxScale(*args)


def test_ssmax_for_length_rejects_short_lengths():
    with pytest.raises(ValueError, match="length"):
        SSMaxScale.for_length(2, 1)


@pytest.mark.parametrize("normalizer", sasoftmax.NORMALIZERS)
def test_multihead_attention_matches_the_functional_op(normalizer):
    torch.manual_seed(0)
    layer = MultiheadAttention(32, 4, 2, normalizer=normalizer, ssmax=0.5)
    x = torch.randn(2, 9, 32)
    out = layer(x, causal=True)
    q = layer.q_proj(x).view(2, 9, 4, 8).transpose(1, 2)
    k = layer.k_proj(x).view(2, 9, 2, 8).transpose(1, 2)
    v = layer.v_proj(x).view(2, 9, 2, 8).transpose(1, 2)
    o = sasoftmax.attention(q, k, v, normalizer=normalizer, causal=True, ssmax=layer.ssmax(), backend="eager")
    torch.testing.assert_close(out, layer.out_proj(o.transpose(1, 2).reshape(2, 9, 32)))
    out.sum().backward()
    assert layer.ssmax.s.grad is not None and (layer.ssmax.s.grad != 0).all()


def test_softmax_layer_equals_torch_multihead_attention():
    torch.manual_seed(0)
    ours = MultiheadAttention(16, 4, normalizer="softmax", bias=True)
    theirs = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(2, 6, 16)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    want, _ = theirs(x, x, x, attn_mask=causal, need_weights=False)
    torch.testing.assert_close(ours(x, causal=True), want, rtol=1e-5, atol=1e-6)


def test_cross_attention_and_rotary_hook():
    layer = MultiheadAttention(16, 2, normalizer="sa_norm")
    x, ctx = torch.randn(1, 3, 16), torch.randn(1, 5, 16)
    seen = {}

    def rotary(q, k):
        seen["shapes"] = (q.shape, k.shape)
        return q, k

    assert layer(x, ctx, rotary=rotary).shape == (1, 3, 16)
    assert seen["shapes"] == ((1, 2, 3, 8), (1, 2, 5, 8))


def test_dropout_only_while_training():
    layer = MultiheadAttention(16, 2, dropout=0.5).eval()
    x = torch.randn(1, 4, 16)
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


@pytest.mark.parametrize(
    "args,kwargs",
    [((15, 4), {}), ((16, 4, 3), {}), ((16, 4), {"normalizer": "relu"}), ((16, 4), {"dropout": 1.0})],
)
def test_multihead_attention_rejects_bad_config(args, kwargs):
    with pytest.raises(ValueError):
        MultiheadAttention(*args, **kwargs)


def test_layer_output_matches_sdpa_with_gqa():
    layer = MultiheadAttention(24, 6, 3, normalizer="softmax")
    x = torch.randn(2, 5, 24)
    q = layer.q_proj(x).view(2, 5, 6, 4).transpose(1, 2)
    k = layer.k_proj(x).view(2, 5, 3, 4).transpose(1, 2)
    v = layer.v_proj(x).view(2, 5, 3, 4).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(layer(x), layer.out_proj(o.transpose(1, 2).reshape(2, 5, 24)), rtol=1e-5, atol=1e-6)
