"""The sdpa backend (PyTorch's scaled_dot_product_attention for plain softmax calls) against eager."""

from __future__ import annotations

import pytest
import torch

from sasoftmax import attention
from sasoftmax.attention import choose_backend, make_call
from sasoftmax.backends import sdpa
from sasoftmax.models.gpt import GPT, GPTConfig


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    "hq, hkv, lq, lk, causal",
    [(2, 2, 9, 9, False), (2, 2, 9, 9, True), (4, 2, 5, 11, True), (4, 1, 7, 7, True), (2, 2, 6, 3, False)],
)
def test_matches_eager_softmax_with_gradients(hq, hkv, lq, lk, causal):
    q, k, v = rand(2, hq, lq, 8, seed=0), rand(2, hkv, lk, 8, seed=1), rand(2, hkv, lk, 8, seed=2)
    grad = rand(2, hq, lq, 8, seed=3)
    results = []
    for backend in ("sdpa", "eager"):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention(*inputs, normalizer="softmax", causal=causal, scale=0.3, backend=backend)
        results.append((out, *torch.autograd.grad(out, inputs, grad)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"normalizer": "sa_norm"}, "softmax attention only"),
        ({"normalizer": "softmax", "ssmax": 0.5}, "SSMax"),
        ({"normalizer": "softmax", "mask": torch.ones(4, 4, dtype=torch.bool)}, "masks and biases"),
        ({"normalizer": "softmax", "bias": lambda i, j: (i[:, None] - j[None, :]).float()}, "masks and biases"),
    ],
)
def test_refuses_what_is_not_plain_softmax(kwargs, reason):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=reason):
        attention(q, q, q, backend="sdpa", **kwargs)


def test_refuses_causal_rows_without_keys_and_auto_never_picks_it():
    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 3, 8)
    call = make_call(q, k, k, "softmax", True, None, None, None, None, 1e-6, 0.0)
    assert "more queries" in sdpa.unsupported(call)
    call = make_call(q, q, q, "softmax", False, None, None, None, None, 1e-6, 0.0)
    assert sdpa.unsupported(call) is None
    assert choose_backend(call, "auto") != "sdpa"


def test_gpt_with_the_sdpa_backend_matches_eager_softmax():
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for backend in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(normalizer="softmax", backend=backend)).double()
        losses.append(model(idx, idx)[1])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-10)
