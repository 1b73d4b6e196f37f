"""torch.compile(fullgraph=True) and torch.export of sasoftmax.attention: outputs and gradients equal the
uncompiled ones; the cpu backend's fused kernels are custom operators (checked by torch.library.opcheck).

Compiling is slow on 2 cores: a few small cases, mostly with the "aot_eager" compiler backend (dynamo's full
graph capture and AOTAutograd, which is where the custom operators' fake and autograd registrations matter),
and one case through inductor.
"""

from __future__ import annotations

import pytest
import torch

import sasoftmax
from sasoftmax.attention import make_call
from sasoftmax.backends import cpu, cpu_native

needs_fused = pytest.mark.skipif(
    cpu_native.fused(torch.float64) is None, reason="the cpu backend's fused kernels cannot be built here"
)


def leaves(dtype=torch.float64, lq=9, lk=9, seed=0, head_dim=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, lq, head_dim, generator=g, dtype=dtype)
    k, v = (torch.randn(2, 2, lk, head_dim, generator=g, dtype=dtype) for _ in range(2))
    s = torch.rand(4, generator=g, dtype=dtype) + 0.3
    mask = torch.rand(lq, lk, generator=g) > 0.3
    bias = torch.randn(1, 4, lq, lk, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, s)], mask, bias


def outputs_and_grads(fn, tensors, *args):
    out = fn(*tensors, *args)
    return [out, *torch.autograd.grad(out, tensors, torch.ones_like(out))]


@pytest.mark.parametrize(
    "backend,compiler",
    [
        pytest.param("cpu", "inductor", marks=needs_fused),
        ("eager", "aot_eager"),
    ],
)
def test_fullgraph_compile_equals_uncompiled(backend, compiler):
    tensors, mask, bias = leaves()

    def fn(q, k, v, s, mask, bias):
        return sasoftmax.attention(q, k, v, normalizer="sa_norm", causal=True, mask=mask, bias=bias, ssmax=s,
                                   backend=backend)  # fmt: skip

    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    want = outputs_and_grads(fn, tensors, mask, bias)
    got = outputs_and_grads(compiled, tensors, mask, bias)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_fullgraph_compile_of_the_sdpa_backend():
    """The fourth backend (plain softmax through PyTorch's SDPA) compiles whole too."""
    tensors, *_ = leaves(torch.float64)

    def fn(q, k, v, s):
        return sasoftmax.attention(q, k, v, normalizer="softmax", causal=True, backend="sdpa") * s.sum()

    want = outputs_and_grads(fn, tensors)
    got = outputs_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), tensors)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_fullgraph_compile_of_the_triton_kernels():
    """The Triton kernels are custom operators too (run here by Triton's interpreter on CPU tensors): with a
    mask (with and without causal masking), a bias tensor, SSMax and RelativeBias forms (ALiBi; a table with
    SSMax), compiled outputs and gradients (the operators) equal the uncompiled ones (their autograd.Function
    twin)."""
    from sasoftmax.backends import triton as triton_backend

    if not triton_backend.INTERPRET and not torch.cuda.is_available():
        pytest.skip("no CUDA and Triton's interpreter is off")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors, mask, bias = leaves(torch.float32, head_dim=16)
    tensors = [t.detach().to(device).requires_grad_() for t in tensors]
    mask, bias = mask.to(device), bias.to(device)
    r1 = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device, requires_grad=True)
    table = torch.linspace(0.5, -1.0, 4 * 5, device=device).view(4, 5).requires_grad_()

    def fn(q, k, v, s, r1, table, mask, bias):
        out = sasoftmax.attention(q, k, v, normalizer="sa_norm", causal=True, mask=mask, bias=bias, ssmax=s,
                                  backend="triton")  # fmt: skip
        out = out + sasoftmax.attention(q, k, v, bias=sasoftmax.RelativeBias.alibi(r1), backend="triton")
        # not causal, masked: the forward operator also hands the backward whether the mask lies within causality
        out = out + sasoftmax.attention(q, k, v, mask=mask, backend="triton")
        table_bias = sasoftmax.RelativeBias.table(table)
        return out + sasoftmax.attention(q, k, v, bias=table_bias, ssmax=s, causal=True, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    want = outputs_and_grads(fn, [*tensors, r1, table], mask, bias)
    got = outputs_and_grads(compiled, [*tensors, r1, table], mask, bias)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@needs_fused
def test_compiled_auto_backend_takes_the_custom_operator():
    tensors, *_ = leaves(torch.float32)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def fn(q, k, v, s):
        return sasoftmax.attention(q, k, v, normalizer="sa", ssmax=s)

    got = outputs_and_grads(torch.compile(fn, fullgraph=True, backend=capture), tensors)
    want = outputs_and_grads(fn, tensors)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert "sasoftmax.cpu_fused_forward" in graphs[0].code


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_func_grad_through_the_fused_paths(backend):
    """torch.func.grad takes the fused kernels' eager path (their autograd.Function twin), as it takes eager's ops."""
    from sasoftmax import backends

    if backends.unavailable(backend):
        pytest.skip(backends.unavailable(backend))
    dtype = torch.float64 if backend == "cpu" else torch.float32
    (q, k, v, s), *_ = leaves(dtype, head_dim=16)
    q, k, v, s = (t.detach() for t in (q, k, v, s))

    weights = torch.randn(*q.shape[:3], v.shape[-1], generator=torch.Generator().manual_seed(1), dtype=dtype)

    def loss(q, s, backend):
        kv = (k.to(q.dtype), v.to(q.dtype))
        out = sasoftmax.attention(q, *kv, normalizer="sa_norm", causal=True, ssmax=s, backend=backend)
        return (out * weights.to(out.dtype)).sum()

    got = torch.func.grad(loss, argnums=(0, 1))(q, s, backend)
    want = torch.func.grad(loss, argnums=(0, 1))(q.double(), s.double(), "eager")
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
def test_export_holds_the_triton_operator(strict):
    """A traced call takes the Triton operator (an eager one its autograd.Function twin, with equal outputs)."""
    from sasoftmax.backends import triton as triton_backend

    if not triton_backend.INTERPRET and not torch.cuda.is_available():
        pytest.skip("no CUDA and Triton's interpreter is off")

    class Layer(torch.nn.Module):
        def forward(self, q, k, v):
            return sasoftmax.attention(q, k, v, normalizer="sa_norm", causal=True, backend="triton")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    (q, k, v, _), *_ = leaves(torch.float32, head_dim=16)
    q, k, v = (t.detach().to(device) for t in (q, k, v))
    program = torch.export.export(Layer(), (q, k, v), strict=strict)
    assert "sasoftmax.triton_forward" in str(program.graph)
    torch.testing.assert_close(program.module()(q, k, v), Layer()(q, k, v), atol=0, rtol=0)


@needs_fused
def test_export_holds_the_custom_operator():
    class Layer(torch.nn.Module):
        def forward(self, q, k, v):
            return sasoftmax.attention(q, k, v, normalizer="sa_norm", causal=True, backend="cpu")

    (q, k, v, _), *_ = leaves(torch.float32)
    q, k, v = (t.detach() for t in (q, k, v))
    program = torch.export.export(Layer(), (q, k, v))
    assert "sasoftmax.cpu_fused_forward" in str(program.graph)
    torch.testing.assert_close(program.module()(q, k, v), Layer()(q, k, v), atol=0, rtol=0)


@needs_fused
@pytest.mark.parametrize("with_options", [False, True])
def test_custom_operators_pass_opcheck(with_options):
    """Without and with mask, bias, SSMax and a RelativeBias table (whose gradient has the table's shape)."""
    (q, k, v, s), mask, bias = leaves(lq=5, lk=7)
    args = (q, k, v, mask if with_options else None, bias if with_options else None, s if with_options else None)
    table = torch.randn(4, 3, dtype=q.dtype, requires_grad=True)
    relative = ("table", table, None) if with_options else ("", None, None)
    options = (0.3, 1e-6, with_options, "sa_norm", 4, *relative)  # scale, eps, causal, normalizer, rows, relative
    torch.library.opcheck(torch.ops.sasoftmax.cpu_fused_forward.default, (*args, *options))


def test_under_compile_the_cpu_backend_declines_what_only_its_tiled_path_serves(monkeypatch):
    q = torch.randn(1, 2, 5, 8)
    with_function = make_call(q, q, q, "sa", False, None, lambda qp, kp: torch.zeros(()), None, None, 1e-6, 0.0)
    plain = make_call(q, q, q, "sa", False, None, None, None, None, 1e-6, 0.0)
    assert cpu.unsupported(with_function) is None  # eagerly, the tiled path serves it
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert "torch.compile" in cpu.unsupported(with_function)
    assert cpu.unsupported(plain) is None or cpu_native.fused(torch.float32) is None
