"""Every bad input raises ValueError or TypeError whose message names the argument."""

import pytest
import torch

import sasoftmax
import sasoftmax.nn


def good(**over):
    args = {
        "q": torch.randn(2, 4, 5, 8),
        "k": torch.randn(2, 2, 7, 8),
        "v": torch.randn(2, 2, 7, 6),
    }
    args.update(over)
    return args


CASES = [
    # (name, overrides, error, words the message must contain)
    ("q not a tensor", {"q": [[1.0]]}, TypeError, ["q", "Tensor"]),
    ("wrong rank", {"q": torch.randn(4, 5, 8)}, ValueError, ["q", "4-D"]),
    ("wrong rank k", {"k": torch.randn(2, 2, 7, 8, 1)}, ValueError, ["k", "4-D"]),
    ("head dim mismatch", {"k": torch.randn(2, 2, 7, 9)}, ValueError, ["head_dim"]),
    ("heads not a multiple", {"k": torch.randn(2, 3, 7, 8), "v": torch.randn(2, 3, 7, 6)}, ValueError, ["multiple"]),
    ("kv length mismatch", {"v": torch.randn(2, 2, 6, 6)}, ValueError, ["length"]),
    ("kv heads mismatch", {"v": torch.randn(2, 1, 7, 6)}, ValueError, ["heads"]),
    ("batch mismatch", {"k": torch.randn(3, 2, 7, 8)}, ValueError, ["batch"]),
    ("dtype mismatch", {"k": torch.randn(2, 2, 7, 8, dtype=torch.float64)}, TypeError, ["dtype"]),
    ("integer inputs", {"q": torch.ones(2, 4, 5, 8, dtype=torch.long)}, TypeError, ["q", "floating"]),
    ("device mismatch", {"k": torch.randn(2, 2, 7, 8, device="meta")}, ValueError, ["device"]),
    ("unknown normalizer", {"normalizer": "sparsemax"}, ValueError, ["normalizer", "sa_norm"]),
    ("normalizer not a str", {"normalizer": 3}, TypeError, ["normalizer"]),
    ("unknown backend", {"backend": "cuda"}, ValueError, ["backend", "eager"]),
    ("backend not a str", {"backend": None}, TypeError, ["backend"]),
    ("float mask", {"mask": torch.ones(5, 7)}, TypeError, ["mask", "bool", "bias="]),
    ("mask not broadcastable", {"mask": torch.ones(5, 6, dtype=torch.bool)}, ValueError, ["mask", "broadcastable"]),
    ("mask of rank 5", {"mask": torch.ones(1, 2, 4, 5, 7, dtype=torch.bool)}, ValueError, ["mask", "broadcastable"]),
    ("mask on another device", {"mask": torch.ones(5, 7, dtype=torch.bool, device="meta")}, ValueError, ["mask"]),
    ("bool bias", {"bias": torch.ones(5, 7, dtype=torch.bool)}, TypeError, ["bias", "mask="]),
    ("int bias", {"bias": torch.ones(5, 7, dtype=torch.int32)}, TypeError, ["bias"]),
    ("bias not broadcastable", {"bias": torch.ones(3, 5, 7)}, ValueError, ["bias", "broadcastable"]),
    ("bias neither tensor nor function", {"bias": 1.5}, TypeError, ["bias"]),
    ("negative eps", {"eps": -1e-6}, ValueError, ["eps"]),
    ("eps not a number", {"eps": "small"}, TypeError, ["eps"]),
    ("dropout 1", {"dropout_p": 1.0}, ValueError, ["dropout_p"]),
    ("dropout negative", {"dropout_p": -0.1}, ValueError, ["dropout_p"]),
    ("dropout not a number", {"dropout_p": None}, TypeError, ["dropout_p"]),
    ("ssmax zero", {"ssmax": 0.0}, ValueError, ["ssmax"]),
    ("ssmax negative", {"ssmax": -0.4}, ValueError, ["ssmax"]),
    ("ssmax wrong shape", {"ssmax": torch.ones(2)}, ValueError, ["ssmax", "(Hq,)"]),
    ("ssmax integer tensor", {"ssmax": torch.ones(4, dtype=torch.long)}, TypeError, ["ssmax"]),
    ("ssmax a string", {"ssmax": "0.4"}, TypeError, ["ssmax"]),
    ("scale zero", {"scale": 0.0}, ValueError, ["scale"]),
    ("scale negative", {"scale": -1.0}, ValueError, ["scale"]),
    ("scale a string", {"scale": "1"}, TypeError, ["scale"]),
    ("causal not a bool", {"causal": 1}, TypeError, ["causal"]),
    ("eps zero", {"eps": 0.0}, ValueError, ["eps", "> 0"]),
    ("eps that float32 flushes", {"eps": 1e-40}, ValueError, ["eps", "float32"]),
    ("eps infinite", {"eps": float("inf")}, ValueError, ["eps"]),
    ("scale that overflows float32", {"scale": 1e300}, ValueError, ["scale", "float32"]),
    ("scale whose inverse overflows", {"scale": 1e-40}, ValueError, ["scale"]),
    ("float8 inputs", {n: t.to(torch.float8_e4m3fn) for n, t in good().items()}, TypeError, ["q", "float8"]),
    ("ssmax tensor negative", {"ssmax": torch.tensor([0.5, -0.1, 0.5, 0.5])}, ValueError, ["ssmax", "> 0"]),
    ("ssmax tensor zero", {"ssmax": torch.tensor([0.5, 0.0, 0.5, 0.5])}, ValueError, ["ssmax", "> 0"]),
    ("ssmax tensor NaN", {"ssmax": torch.tensor([0.5, float("nan"), 0.5, 0.5])}, ValueError, ["ssmax", "finite"]),
    ("ssmax tensor inf", {"ssmax": torch.tensor([0.5, float("inf"), 0.5, 0.5])}, ValueError, ["ssmax", "finite"]),
]


@pytest.mark.parametrize("name,over,error,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(name, over, error, words):
    args = good(**over)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error) as info:
        sasoftmax.attention(q, k, v, **args)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_bias_function_returning_wrong_shape_is_named():
    args = good()
    with pytest.raises(ValueError, match="bias function"):
        sasoftmax.attention(**args, bias=lambda qp, kp: torch.zeros(3, 3), backend="eager")


@pytest.mark.parametrize(
    "kwargs,error,word",
    [
        ({"normalizer": "nope"}, ValueError, "normalizer"),
        ({"mask": torch.ones(3, 4)}, TypeError, "mask"),
        ({"mask": torch.ones(2, 2, dtype=torch.bool)}, ValueError, "mask"),
        ({"dim": 5}, ValueError, "dim"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"eps": 0.0}, ValueError, "eps"),
    ],
)
def test_normalize_bad_input(kwargs, error, word):
    with pytest.raises(error, match=word):
        sasoftmax.normalize(torch.randn(3, 4), **kwargs)


def test_normalize_rejects_integer_scores():
    with pytest.raises(TypeError, match="scores"):
        sasoftmax.normalize(torch.ones(3, 4, dtype=torch.long))


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_bias_function_on_another_device_is_named(backend):
    args = good()
    with pytest.raises(ValueError, match="bias function .* device"):
        sasoftmax.attention(**args, bias=lambda qp, kp: torch.zeros(5, 7, device="meta"), backend=backend)


def test_float_ssmax_keeps_float64():
    """A float s is not rounded to float32 for float64 inputs: it equals the same s as a float64 tensor."""
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64) for _ in range(3))
    s = 0.1 + 1e-12  # differs from its float32 rounding
    for backend in ("eager", "cpu"):
        from_float = sasoftmax.attention(q, k, v, ssmax=s, backend=backend)
        from_tensor = sasoftmax.attention(q, k, v, ssmax=torch.full((2,), s, dtype=torch.float64), backend=backend)
        assert torch.equal(from_float, from_tensor)
        rounded = sasoftmax.attention(q, k, v, ssmax=torch.full((2,), s).double(), backend=backend)
        assert not torch.equal(from_float, rounded)


@pytest.mark.parametrize(
    "args,kwargs,error,words",
    [
        (("32", 4), {}, TypeError, ["embed_dim", "int"]),
        ((32.0, 4), {}, TypeError, ["embed_dim", "int"]),
        ((32, 4.0), {}, TypeError, ["num_heads"]),
        ((32, 4, "2"), {}, TypeError, ["num_kv_heads"]),
        ((32, 4), {"dropout": "0.1"}, TypeError, ["dropout"]),
        ((32, 4), {"bias": 1}, TypeError, ["bias"]),
        ((32, 4), {"eps": 0.0}, ValueError, ["eps"]),
        ((32, 4), {"backend": "gpu"}, ValueError, ["backend"]),
    ],
)
def test_multihead_attention_arguments(args, kwargs, error, words):
    with pytest.raises(error) as info:
        sasoftmax.nn.MultiheadAttention(*args, **kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "x,context,words",
    [
        (torch.randn(5, 32), None, ["x", "(batch, length, 32)"]),
        (torch.randn(2, 5, 16), None, ["x", "(batch, length, 32)"]),
        (torch.randn(2, 5, 32), torch.randn(2, 7, 16), ["context", "32"]),
        (torch.randn(2, 5, 32), torch.randn(3, 7, 32), ["context", "batch"]),
    ],
)
def test_multihead_attention_input_shapes(x, context, words):
    layer = sasoftmax.nn.MultiheadAttention(32, 4)
    with pytest.raises(ValueError) as info:
        layer(x, context)
    for word in words:
        assert word in str(info.value)
