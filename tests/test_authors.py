"""Agreement with the SA-Softmax authors' training code (the ``USE_SA_SOFTMAX`` branch of the Megatron
transformer in HKUDS/SepLLM, Training-SepLLM/megatron/model/transformer.py) where both define the same function.

Their denominator is (M + 2·b_d) − m with b_d = ``SA_Denominator_Bias`` (default 1e-10), so ``eps = 2·b_d``
reproduces it: for causal self-attention (L = S, no padding), ``SA_Numerator_Bias`` = 0, an additive positional
bias or none, and the math in float32/float64 (their ``.half()`` cast of the weights left out). Where the two
differ is listed in docs/DESIGN.md ("Reproducing the authors' code"); ``authors_sa_norm`` below is a
transcription of their formula, written here from its math.
"""

from __future__ import annotations

import math

import pytest
import torch

import sasoftmax

DENOMINATOR_BIAS = 1e-10  # their SA_Denominator_Bias default


def authors_sa_norm(q, k, v, bias=None, denominator_bias=DENOMINATOR_BIAS, numerator_bias=0.0):
    """Their weights for causal self-attention, (B, H, L, L) scores, H query heads = kv heads.

    Scores s = q kᵀ/√D (+ bias); the softmax sees the causal mask as a fill of −10000 (Megatron's mask
    function); min and max are taken over tril(s) (masked entries 0), clamped at 0 with torch.minimum/maximum,
    b_d added to the max before and after the clamp; the weights are tril'ed again.
    """
    lq, lk = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    future = torch.ones(lq, lk, dtype=torch.bool).triu(1)  # top-left aligned, as torch.tril
    p = torch.softmax(s.masked_fill(future, -10000.0), -1)
    lower = torch.tril(s)
    low = torch.minimum(lower.min(-1, keepdim=True)[0], torch.zeros(1, dtype=s.dtype))
    high = torch.maximum(lower.max(-1, keepdim=True)[0] + denominator_bias, torch.zeros(1, dtype=s.dtype))
    high = high + denominator_bias
    w = torch.tril(p * ((s - low + numerator_bias) / (high - low)))
    return w @ v


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "alibi"])
def test_causal_self_attention_equals_the_authors_code(backend_path, with_bias):
    g = torch.Generator().manual_seed(3)
    b, h, n, d = 2, 2, 12, 16
    q, k, v, grad = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(4))
    bias = None
    if with_bias:  # ALiBi, which their code adds to the scores before the SA factor
        slopes = torch.tensor([0.5, 0.25], dtype=torch.float64).view(h, 1, 1)
        dist = torch.arange(n)[:, None] - torch.arange(n)[None, :]
        bias = -slopes * dist.clamp_min(0).double()
    leaves = [t.requires_grad_() for t in (q, k, v)]
    dtype, device = backend_path.dtype, backend_path.device

    want_out = authors_sa_norm(*leaves, bias=bias)
    want = [want_out, *torch.autograd.grad(want_out, leaves, grad)]
    got_out = sasoftmax.attention(*(t.to(device, dtype) for t in leaves), normalizer="sa_norm", causal=True,
                                  bias=None if bias is None else bias.to(device, dtype), eps=2 * DENOMINATOR_BIAS,
                                  backend=backend_path.backend)  # fmt: skip
    got = [got_out, *torch.autograd.grad(got_out, leaves, grad.to(device, dtype))]
    rtol = 1e-9 if dtype == torch.float64 else 2e-4
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = (a.double() - w).abs().max().item()
        assert err <= rtol * w.abs().max().item(), f"{name}: max error {err:.3g} against the authors' formula"


def test_the_default_eps_differs_from_the_authors_by_its_size():
    """With the default eps = 1e-6 (not 2·b_d) the outputs differ, by about eps/(M − m) relative: the agreement
    above needs eps = 2·b_d."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g, dtype=torch.float64) for _ in range(3))
    theirs = authors_sa_norm(q, k, v)
    ours = sasoftmax.attention(q, k, v, normalizer="sa_norm", causal=True, backend="eager")
    err = (ours - theirs).abs().max().item()
    assert 1e-9 < err < 1e-5
