"""The Triton backend against the eager reference (forward and gradients).

Without a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported): float32 must match eager to 1e-4 relative, float16 must
pass the FlashAttention rule. The interpreter's bfloat16 arithmetic is wrong, so bfloat16 runs on CUDA
only. On a CUDA machine every dtype is held to the FlashAttention rule: the error against a float64
reference is at most twice that of a plain PyTorch implementation computing in the same dtype (float32 with a
floor relative to the reference's magnitude, ``FLOAT32_FLOOR``).
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch

# Triton ships wheels for Linux only; elsewhere (macOS, Windows) there is nothing to run these kernels with.
pytest.importorskip("triton", reason="triton is not installed (it has wheels for Linux only)")

from fuzz_backends import plain_attention  # noqa: E402
from operator_log import OperatorLog, assert_skips_function_without_grad, traced_path  # noqa: E402
from sasoftmax import attention, backends  # noqa: E402
from sasoftmax.attention import choose_backend, make_call  # noqa: E402
from sasoftmax.backends import triton as triton_backend  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NORMALIZERS = ("softmax", "sa", "sa_norm")
needs_kernels = pytest.mark.skipif(
    not CUDA and not triton_backend.INTERPRET,
    reason="no CUDA and Triton's interpreter is off (TRITON_INTERPRET=1 must be set before triton is imported)",
)

# (B, Hq, Hkv, L, S, D, Dv): odd lengths that leave partial tiles, grouped-query attention, D not a power
# of two and Dv != D, L > S (causal rows with no key), decoding with one query.
SHAPES = [
    (1, 2, 2, 37, 37, 16, 16),
    (2, 4, 2, 17, 40, 24, 32),
    (1, 2, 1, 40, 17, 16, 16),
    (1, 4, 1, 1, 70, 32, 32),
]
MASKED_SHAPE = (2, 2, 1, 17, 40, 16, 16)  # for mask and bias tests: padding differs per batch, GQA
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def make_inputs(shape, seed=0, transposed=False):
    """float64 q, k, v and dO drawn from a seeded generator."""
    b, hq, hkv, lq, lk, d, dv = shape
    gen = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64)

    if transposed:  # (B, L, H, D) memory, as projections produce it
        q, k, v = (rand(b, n, h, e).transpose(1, 2) for n, h, e in ((lq, hq, d), (lk, hkv, d), (lk, hkv, dv)))
    else:
        q, k, v = rand(b, hq, lq, d), rand(b, hkv, lk, d), rand(b, hkv, lk, dv)
    return q, k, v, rand(b, hq, lq, dv)


def make_masks(shape, seed=0):
    """A key-padding mask (B, 1, 1, S) and a full random mask (B, Hq, L, S) with some fully masked rows."""
    b, hq, _, lq, lk, _, _ = shape
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, lk + 1, (b,), generator=gen)
    padding = (torch.arange(lk)[None, :] < lengths[:, None]).view(b, 1, 1, lk)
    full = torch.rand(b, hq, lq, lk, generator=gen) < 0.7
    full[:, :, ::5] = False
    return {"padding": padding.to(DEVICE), "dense": full.to(DEVICE)}


def make_bias(shape, seed=0):
    """An ALiBi-like (1, Hq, L, S) bias with a −inf band (keys further than 24 back) and a random
    (B, 1, L, S) one, float32."""
    b, hq, _, lq, lk, _, _ = shape
    distance = (torch.arange(lk - lq, lk)[:, None] - torch.arange(lk)[None, :]).abs().float()
    slopes = 2.0 ** -torch.arange(1, hq + 1).float()
    alibi = -slopes.view(1, hq, 1, 1) * distance
    alibi = alibi.masked_fill(distance > 24, float("-inf"))
    noise = torch.randn(b, 1, lq, lk, generator=torch.Generator().manual_seed(seed))
    return {"alibi": alibi.to(DEVICE), "random": noise.to(DEVICE)}


def run(inputs, dtype, backend, ssmax=None, params=(), **kwargs):
    """Output and gradients (q, k, v, SSMax's s if given, then ``params``: leaves a bias depends on) of
    ``attention`` in ``dtype``."""
    leaves = [t.to(DEVICE, dtype).detach().requires_grad_() for t in inputs[:3]]
    if ssmax is not None:
        ssmax = ssmax.to(DEVICE, torch.float32).detach().requires_grad_()
        leaves.append(ssmax)
    leaves += list(params)
    if backend == "plain":  # the materialised way, every op in the input dtype (bias functions too)
        out = plain_attention(*leaves[:3], ssmax=ssmax, **kwargs)
    else:
        out = attention(*leaves[:3], ssmax=ssmax, backend=backend, **kwargs)
    grads = torch.autograd.grad(out, leaves, inputs[3].to(DEVICE, dtype))
    return [out, *grads]


def assert_flash_rule(names, got, base, ref, dtype=torch.float16):
    """FlashAttention's rule per output: max error against the float64 ``ref`` ≤ 2× plain PyTorch's (``base``, every
    op in ``dtype``) + 1e-5."""
    for name, a, p, r in zip(names, got, base, ref, strict=True):
        err, err_plain = (a.double() - r).abs().max().item(), (p.double() - r).abs().max().item()
        assert err <= 2 * err_plain + 1e-5, f"{name}: error {err:.3g} > 2 × plain {dtype}'s {err_plain:.3g}"


FLOAT32_FLOOR = 1e-5
"""On CUDA, float32 results may differ from the float64 reference by this much of its largest magnitude even where
that is more than twice plain PyTorch's error: at a few ulps the order of summation decides (the GPU's tiles against
cuBLAS: sa's dk and dL/ds 1.2e-6 relative, three times plain PyTorch's, and as often under it with other seeds and
tiles in the interpreter). Real faults are far above it (float32 sa_norm's unpinned extremes: 1.7e-3)."""


def assert_matches_eager(shape, dtype, seed=0, ssmax=None, transposed=False, **kwargs):
    inputs = make_inputs(shape, seed, transposed)
    got = run(inputs, dtype, "triton", ssmax, **kwargs)
    names = ["out", "dq", "dk", "dv", "ds"]
    for name, t in zip(names, got):
        assert torch.isfinite(t).all(), f"{name} has non-finite entries"
    if dtype == torch.float32 and not CUDA:
        ref = run(inputs, dtype, "eager", ssmax, **kwargs)
        for name, a, r in zip(names, got, ref):
            err = (a - r).abs().max().item()
            assert err <= 1e-4 * r.abs().max().item() + 1e-7, f"{name}: max error {err:.3g} vs eager"
        return
    ref = run(inputs, torch.float64, "eager", ssmax, **kwargs)
    base = run(inputs, dtype, "plain", ssmax, **kwargs)
    for name, a, p, r in zip(names, got, base, ref):
        err, err_plain = (a.double() - r).abs().max().item(), (p.double() - r).abs().max().item()
        limit = 2 * err_plain + 1e-5
        if dtype == torch.float32:  # FlashAttention's rule is for 16-bit dtypes; float32 gets a floor of ~80 ulps
            limit = max(limit, FLOAT32_FLOOR * r.abs().max().item())
        assert err <= limit, f"{name} ({dtype}): error {err:.3g} > {limit:.3g} (plain PyTorch's: {err_plain:.3g})"


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}/{}-L{}-S{}-D{}/{}".format(*s))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_float32_matches_eager(normalizer, causal, shape):
    assert_matches_eager(shape, torch.float32, normalizer=normalizer, causal=causal)


@needs_kernels
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_half_precision_flash_rule(normalizer, causal, dtype):
    assert_matches_eager(SHAPES[1], dtype, normalizer=normalizer, causal=causal)


@needs_kernels
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_ssmax_including_its_gradient(normalizer, causal):
    ssmax = torch.tensor([0.3, 0.5, 0.8, 1.2], dtype=torch.float64)
    assert_matches_eager((1, 4, 2, 20, 33, 16, 16), torch.float32, ssmax=ssmax, normalizer=normalizer, causal=causal)


@needs_kernels
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_ssmax_rows_with_one_key_or_none(normalizer, monkeypatch):
    """Causal with L > S: rows that see no key and a row that sees one (n = 1, so t = s·ln n = 0). With a
    power-of-two scale (D = 16) sa_norm's row_extrema scales the extrema of q·kᵀ by scale·t after: rows with no
    key must keep −inf as their max there (∞·0 is NaN, which the outputs would hide: such rows are all masked)."""
    from kernel_capture import Capture
    from sasoftmax.backends import triton_kernels

    extrema = Capture(triton_kernels.row_extrema)
    monkeypatch.setattr(triton_kernels, "row_extrema", extrema)
    ssmax = torch.tensor([0.3, 0.5, 0.8, 1.2], dtype=torch.float64)
    assert_matches_eager((1, 4, 2, 37, 21, 16, 16), torch.float32, ssmax=ssmax, normalizer=normalizer, causal=True)
    mu = extrema.args["MU"].view(4, 37)
    assert torch.isneginf(mu[:, :16]).all() and torch.isfinite(mu[:, 16:]).all()


@needs_kernels
@pytest.mark.parametrize("kind", ["padding", "dense"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_bool_masks(normalizer, causal, kind):
    mask = make_masks(MASKED_SHAPE, seed=1)[kind]
    assert_matches_eager(MASKED_SHAPE, torch.float32, normalizer=normalizer, causal=causal, mask=mask)


def causal_padding_mask(lq, lk, lengths):
    """Causality folded into a key-padding mask, as transformers builds them: (len(lengths), 1, L, S) bool on
    DEVICE."""
    causal = torch.arange(lk)[None, :] <= torch.arange(lk - lq, lk)[:, None]
    padding = torch.arange(lk)[None, :] < torch.tensor(lengths)[:, None]
    return (causal[None] & padding[:, None, :]).unsqueeze(1).to(DEVICE)


@needs_kernels
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_mask_within_the_causal_pattern(normalizer, monkeypatch):
    """A mask that lies within the causal pattern, passed without causal=True (transformers' way): the launcher
    says so to the kernels (MASK_CAUSAL), which skip the tiles a causal call would; outputs match eager."""
    from kernel_capture import Capture
    from sasoftmax.backends import triton_kernels

    fwd = Capture(triton_kernels.fwd)
    monkeypatch.setattr(triton_kernels, "fwd", fwd)
    shape = (2, 2, 1, 29, 40, 16, 16)
    mask = causal_padding_mask(29, 40, [40, 23])
    assert_matches_eager(shape, torch.float32, normalizer=normalizer, causal=False, mask=mask)
    assert fwd.args["MASK_CAUSAL"].item() == 1
    assert_matches_eager(MASKED_SHAPE, torch.float32, normalizer=normalizer, causal=False,
                         mask=make_masks(MASKED_SHAPE, seed=1)["dense"])  # fmt: skip
    assert fwd.args["MASK_CAUSAL"].item() == 0


@needs_kernels
def test_mask_within_the_causal_pattern_skips_tiles(monkeypatch):
    """The skipped tiles are not read. With 16×16 tiles and L = S = 40, rows 0–15 see keys 0–15 only: NaN values at
    keys 16–39 (which rows 16–39 attend, and turn NaN) must leave rows 0–15's output and dq finite, and a NaN dO at
    rows 0–15 must leave dk, dv of keys 16–39 finite; without the skipping, p = 0 times a NaN reaches them."""
    monkeypatch.setenv("SASOFTMAX_TRITON_TILES", ",".join(f"{k}:16x16x4x1" for k in ("fwd", "extrema", "dq", "dkdv")))
    mask = causal_padding_mask(40, 40, [40])
    for poisoned in ("v", "do"):
        q, k, v, do = (t.float().to(DEVICE) for t in make_inputs((1, 2, 2, 40, 40, 16, 16), seed=3))
        if poisoned == "v":
            v[:, :, 16:] = float("nan")
        else:
            do[:, :, :16] = float("nan")
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = attention(q, k, v, mask=mask, normalizer="sa_norm", backend="triton")
        dq, dk, dv = torch.autograd.grad(out, [q, k, v], do)
        if poisoned == "v":
            assert torch.isfinite(out[:, :, :16]).all() and torch.isfinite(dq[:, :, :16]).all()
        else:
            assert torch.isfinite(dk[:, :, 16:]).all() and torch.isfinite(dv[:, :, 16:]).all()


@needs_kernels
@pytest.mark.parametrize("kind", ["alibi", "random"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_bias_tensors(normalizer, causal, kind):
    bias = make_bias(MASKED_SHAPE, seed=4)[kind]
    assert_matches_eager(MASKED_SHAPE, torch.float32, normalizer=normalizer, causal=causal, bias=bias)


@needs_kernels
@pytest.mark.parametrize("kind", ["padding", "dense"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_ssmax_counts_masked_keys(causal, kind):
    """n_i counts the keys left by mask ∧ causal (a prefix sum for padding masks)."""
    shape = (2, 4, 2, 20, 33, 16, 16)
    ssmax = torch.tensor([0.3, 0.5, 0.8, 1.2], dtype=torch.float64)
    mask = make_masks(shape, seed=2)[kind]
    assert_matches_eager(shape, torch.float32, ssmax=ssmax, normalizer="sa_norm", causal=causal, mask=mask)


@needs_kernels
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
def test_half_precision_ssmax_rows_with_one_key(dtype):
    """Causal SSMax: row 0 has n = 1, so t = 0 and x ≡ 0; sa_norm's dx there is ~1/ε, beyond float16's
    range, yet every gradient must stay finite and match eager (which computes in float32)."""
    inputs = make_inputs((1, 2, 2, 20, 20, 16, 16), seed=7)
    ssmax = torch.tensor([0.5, 0.8], dtype=torch.float64)
    got = run(inputs, dtype, "triton", ssmax, normalizer="sa_norm", causal=True)
    ref = run(inputs, dtype, "eager", ssmax, normalizer="sa_norm", causal=True)
    for name, a, r in zip(["out", "dq", "dk", "dv", "ds"], got, ref):
        assert torch.isfinite(a).all(), f"{name} has non-finite entries"
        torch.testing.assert_close(a.float(), r.float(), rtol=0.02, atol=0.02 * r.abs().max().item())


# GPU tiles are rarely square (forward 128×64, dq 128×32, dk/dv 32×128; tuned tables may pick others):
# SASOFTMAX_TRITON_TILES sets the interpreter's tiles too, scaled down.
NON_SQUARE_TILES = {
    "tall": "fwd:32x16x4x1,extrema:16x32x4x1,dq:32x16x4x1,dkdv:16x32x4x1",
    "wide": "fwd:16x32x4x1,extrema:32x16x4x1,dq:16x32x4x1,dkdv:32x16x4x1",
}


@needs_kernels
@pytest.mark.parametrize("tiles", NON_SQUARE_TILES)
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_non_square_tiles(normalizer, tiles, monkeypatch):
    """Block bounds of causal rows, the two-part loops and partial blocks with BLOCK_M != BLOCK_N, with a
    RelativeBias, SSMax and a padding mask (L < S, and L > S with rows that see no key)."""
    from sasoftmax import RelativeBias

    monkeypatch.setenv("SASOFTMAX_TRITON_TILES", NON_SQUARE_TILES[tiles])
    ssmax = torch.tensor([0.3, 0.5, 0.8, 1.2], dtype=torch.float64)
    for shape, causal in (((2, 4, 2, 45, 70, 16, 16), False), ((2, 4, 2, 45, 70, 16, 16), True),
                          ((1, 4, 1, 70, 37, 16, 16), True)):  # fmt: skip
        r1 = torch.linspace(0.2, 0.8, 4, device=DEVICE)
        bias = RelativeBias.kerple_log(r1, r1.flip(0))
        mask = make_masks(shape, seed=5)["padding"]
        assert_matches_eager(
            shape, torch.float32, ssmax=ssmax, normalizer=normalizer, causal=causal, mask=mask, bias=bias
        )


class SmallSharedMemory:
    """Stands in for a kernel on a GPU whose shared memory holds at most ``fits`` pipeline stages: Triton raises
    OutOfResources for more (when it loads the compiled kernel, before running it)."""

    def __init__(self, kernel, fits, resource="shared memory"):
        self.kernel, self.fits, self.resource, self.tried = kernel, fits, resource, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime.errors import OutOfResources

            self.tried.append(kwargs["num_stages"])
            if kwargs["num_stages"] > self.fits:
                raise OutOfResources(1000 * kwargs["num_stages"], 1000 * self.fits, self.resource)
            return self.kernel[grid](*args, **kwargs)

        return launch


@needs_kernels
def test_fewer_stages_where_shared_memory_is_short(monkeypatch):
    """Tiles tuned for Hopper launch with fewer pipeline stages on a card with less shared memory, same result;
    the stages that fit are remembered; other missing resources (threads) are errors."""
    from sasoftmax.backends import triton_kernels

    monkeypatch.setenv("SASOFTMAX_TRITON_TILES", "fwd:16x16x4x3")
    monkeypatch.setattr(triton_backend, "_STAGES_THAT_FIT", {})
    inputs = make_inputs(SHAPES[0], seed=2)
    expected = run(inputs, torch.float32, "triton", normalizer="sa", causal=True)
    fake = SmallSharedMemory(triton_kernels.fwd, fits=1)
    monkeypatch.setattr(triton_kernels, "fwd", fake)
    for _ in range(2):
        got = run(inputs, torch.float32, "triton", normalizer="sa", causal=True)
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert fake.tried == [3, 2, 1, 1]  # the second call starts from what fitted
    assert list(triton_backend._STAGES_THAT_FIT.values()) == [1]
    monkeypatch.setattr(triton_kernels, "fwd", SmallSharedMemory(fake.kernel, fits=3, resource="threads"))
    monkeypatch.setattr(triton_backend, "_STAGES_THAT_FIT", {})
    monkeypatch.setenv("SASOFTMAX_TRITON_TILES", "fwd:16x16x4x4")
    with pytest.raises(Exception, match="out of resource: threads"):
        run(inputs, torch.float32, "triton", normalizer="sa", causal=True)


@pytest.mark.parametrize("spec", ["fwd:32x16x4", "fdw:32x16x4x1", "dq:32x0x4x1", "dq=32x16x4x1"])
def test_tile_override_is_checked(spec, monkeypatch):
    monkeypatch.setenv("SASOFTMAX_TRITON_TILES", spec)
    with pytest.raises(ValueError, match="SASOFTMAX_TRITON_TILES"):
        triton_backend._configs(64, 64, torch.float16)


@needs_kernels
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_strided_inputs(normalizer):
    assert_matches_eager(SHAPES[1], torch.float32, transposed=True, normalizer=normalizer, causal=True)


@needs_kernels
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["all-positive", "all-negative"])
def test_sa_norm_rows_of_one_sign(sign):
    """All logits > 0 (m = 0: only the max term) or < 0 (M = 0: only the min term)."""
    q, k, v, do = make_inputs(SHAPES[0], seed=3)
    inputs = (q.abs(), sign * k.abs(), v, do)
    got = run(inputs, torch.float32, "triton", normalizer="sa_norm", causal=True)
    ref = run(inputs, torch.float32, "eager", normalizer="sa_norm", causal=True)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_logits_and_rows_without_keys_stay_finite(dtype):
    """Logits ~1e3 and causal rows with no key (L > S): finite, those rows and their gradients zero."""
    q, k, v, do = make_inputs((1, 2, 1, 40, 17, 16, 16), seed=5)
    inputs = (q * 30, k * 30, v, do)
    for normalizer in NORMALIZERS:
        out, dq, dk, dv = run(inputs, dtype, "triton", normalizer=normalizer, causal=True)
        for t in (out, dq, dk, dv):
            assert torch.isfinite(t).all()
        empty = slice(0, 40 - 17)
        assert (out[:, :, empty] == 0).all() and (dq[:, :, empty] == 0).all()
        ref = run(inputs, dtype, "eager", normalizer=normalizer, causal=True)[0].float()
        torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("path", ["eager", "operator"])
def test_double_backward_raises(path, monkeypatch):
    if path == "operator":
        traced_path(monkeypatch)
    q, k, v, _ = make_inputs(SHAPES[3])
    q, k, v = (t.float().to(DEVICE).requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, backend="triton")
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)  # first-order gradients still flow
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        (dq.square().sum() + q.sum()).backward()  # never a silently missing second-order part


@needs_kernels
@pytest.mark.parametrize("ssmax", [False, True], ids=["plain", "ssmax"])
@pytest.mark.parametrize("path", ["eager", "operator"])
def test_backward_launches_nothing_for_the_row_statistics(path, ssmax, monkeypatch):
    """The forward's saved row statistics get no gradients: autograd makes no tensors of zeros for them (six fills
    per layer and step before), and a backward from the output alone runs only our operator (traced calls' path) or,
    besides the kernels, only allocations, views and with SSMax the sum of dL/ds's partials (eager), SSMax included
    (no mask: the kernels compute t and reduce dL/ds themselves)."""
    if path == "operator":
        traced_path(monkeypatch)
    q, k, v, do = make_inputs(SHAPES[1])
    q, k, v = (t.float().to(DEVICE).requires_grad_() for t in (q, k, v))
    s = torch.full((q.shape[1],), 0.7, device=DEVICE, requires_grad=True) if ssmax else None
    out = attention(q, k, v, backend="triton", normalizer="sa_norm", causal=True, ssmax=s)
    do = do.float().to(DEVICE)
    if path == "eager":  # the kernels' launches left out: the interpreter copies tensors in and out around them
        monkeypatch.setattr(triton_backend, "_launch", lambda *args, **kwargs: None)
    with OperatorLog() as log:
        out.backward(do)
    if path == "operator":
        assert log.names == ["sasoftmax.triton_backward.default"]
    else:
        launched = {name for name in log.names if not name.startswith(("aten.empty", "aten.new_empty", "aten.view"))}
        assert launched == ({"aten.sum.dim_IntList"} if ssmax else set()), log.names
    assert not ssmax or s.grad is not None


@needs_kernels
def test_masks_are_checked_against_the_causal_pattern_once(monkeypatch):
    """Whether a mask lies within the causal pattern (transformers' masks; four small kernels) is found once per
    call, in the forward, which saves the flag for the backward (the operators' path hands it over the same way:
    the operator's log shows no more than itself, ``test_compile`` runs it)."""
    q, k, v, do = make_inputs((2, 2, 1, 29, 40, 16, 16))
    q, k, v = (t.float().to(DEVICE).requires_grad_() for t in (q, k, v))
    mask = causal_padding_mask(29, 40, [40, 23])
    with OperatorLog() as forward:
        out = attention(q, k, v, backend="triton", normalizer="sa_norm", mask=mask)
    monkeypatch.setattr(triton_backend, "_launch", lambda *args, **kwargs: None)
    with OperatorLog() as backward:
        out.backward(do.float().to(DEVICE))
    assert "aten.triu.default" in forward.names
    assert not any(name.startswith(("aten.triu", "aten.any")) for name in backward.names), backward.names


def supported_call(**kwargs):
    q, k, v, _ = make_inputs(SHAPES[1])
    args = {"normalizer": "sa_norm", "causal": True, "mask": None, "bias": None, "scale": None, "ssmax": None}
    args.update({"eps": 1e-6, "dropout_p": 0.0})
    args.update(kwargs)
    dtype = args.pop("dtype", torch.float32)
    return make_call(q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype), **args)


def unsupported_calls():
    """Calls the kernels cannot serve, each with a phrase its reason must contain."""
    yield supported_call(dropout_p=0.1), "dropout"
    yield supported_call(dtype=torch.float64), "float64"
    for d in (8, 300):
        q = torch.randn(1, 2, 5, d, device=DEVICE)
        yield make_call(q, q, q, "sa_norm", False, None, None, None, None, 1e-6, 0.0), f"is {d}"
    q = torch.randn(1, 2, 0, 16, device=DEVICE)
    yield make_call(q, q, q, "sa_norm", False, None, None, None, None, 1e-6, 0.0), "empty"


@pytest.mark.parametrize("case", range(5))
def test_unsupported_calls_fall_back_or_raise(case):
    call, phrase = list(unsupported_calls())[case]
    reason = triton_backend.unsupported(call)
    assert reason is not None and phrase in reason
    chosen = choose_backend(call, "auto")
    assert chosen != "triton" and backends.load(chosen).unsupported(call) is None
    with pytest.raises(ValueError, match="backend='triton' cannot serve"):
        choose_backend(call, "triton")


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_backend, "INTERPRET", False)
    call = make_call(*(torch.randn(1, 2, 5, 16) for _ in range(3)), "sa", False, None, None, None, None, 1e-6, 0.0)
    assert "CUDA" in triton_backend.unsupported(call)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        choose_backend(call, "triton")
    assert choose_backend(call, "auto") != "triton"


@pytest.mark.skipif(not CUDA, reason="auto prefers triton only for CUDA tensors")
def test_auto_prefers_triton_on_cuda():
    assert choose_backend(supported_call(), "auto") == "triton"


class _ClaimsCuda(torch.Tensor):
    """A CPU tensor that reports is_cuda, so the preference for triton is checked without a GPU."""

    @property
    def is_cuda(self) -> bool:
        return True


@needs_kernels
def test_auto_preference_for_cuda_tensors_without_a_gpu():
    call = supported_call()
    cuda_like = make_call(
        call.q.as_subclass(_ClaimsCuda), call.k, call.v, "sa_norm", True, None, None, None, None, 1e-6, 0.0
    )
    assert choose_backend(cuda_like, "auto") == "triton"
    with_dropout = make_call(
        call.q.as_subclass(_ClaimsCuda), call.k, call.v, "sa_norm", True, None, None, None, None, 1e-6, 0.1
    )
    assert choose_backend(with_dropout, "auto") == "eager"


class _OnSecondGpu(_ClaimsCuda):
    """A CPU tensor that reports living on cuda:1."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 1)


@pytest.mark.parametrize("current", [0, 1])
def test_calls_run_with_their_tensors_gpu_current(monkeypatch, current):
    """Triton launches on the current device: a call whose tensors live on another GPU makes theirs current for the
    call (a model spread over GPUs in one process), and leaves it alone where it already is (no GPU needed: the
    decision is checked, with the current device stubbed)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    q = torch.zeros(1, 1, 1, 16).as_subclass(_OnSecondGpu)
    guard = triton_backend._device_guard(q)
    if current == 1:
        assert isinstance(guard, contextlib.nullcontext)
    else:
        assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(triton_backend._device_guard(torch.zeros(1)), contextlib.nullcontext)  # CPU tensors: none


@needs_kernels
def test_supported_call_is_served():
    call = supported_call(ssmax=0.5, mask=make_masks(SHAPES[1])["padding"])
    assert triton_backend.unsupported(call) is None
    assert choose_backend(call, "triton") == "triton"
    bias = make_bias(SHAPES[1])["alibi"].requires_grad_()
    with torch.no_grad():  # a learnable bias is fine when no gradient is wanted
        assert triton_backend.unsupported(supported_call(bias=bias)) is None


def test_without_triton_the_backend_is_unavailable(monkeypatch):
    for name in ("sasoftmax.backends.triton", "sasoftmax.backends.triton_kernels"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delattr(backends, "triton", raising=False)  # else `from . import triton` finds it there
    monkeypatch.setattr(backends, "_loaded", {})  # backends imported once are remembered
    monkeypatch.setattr(backends, "_reasons", {})
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    reason = backends.unavailable("triton")
    assert reason is not None and "triton is not installed" in reason
    q = torch.randn(1, 2, 5, 16)
    call = make_call(q, q, q, "sa", False, None, None, None, None, 1e-6, 0.0)
    assert choose_backend(call, "auto") != "triton"
    with pytest.raises(ValueError, match="triton is not installed"):
        choose_backend(call, "triton")


# Biases: RelativeBias forms evaluated in the kernels (a table too, and FIRE up to its threshold, which is one),
# bias tensors that need a gradient, and bias functions (FIRE beyond its threshold) evaluated one block of query
# rows at a time. Gradients are checked for q, k, v, SSMax's s and every bias parameter against the eager backend
# given the same bias as a function.
BIAS_KINDS = ["alibi", "kerple_log", "kerple_power", "table", "tensor", "fire", "function"]
BIAS_CASES = {
    "gqa": ((2, 4, 2, 20, 33, 16, 16), {}),
    "ssmax-mask": ((2, 4, 2, 20, 33, 16, 24), {"ssmax": True, "mask": "padding"}),
    "rows-without-keys": ((1, 2, 1, 40, 17, 16, 16), {"ssmax": True}),
}


def make_bias_spec(kind, shape, seed=0):
    """The bias object for ``attention`` and the leaves whose gradients are checked (float32, on DEVICE)."""
    from sasoftmax import RelativeBias
    from sasoftmax.positional import FIRE

    _, hq, _, lq, lk, _, _ = shape
    gen = torch.Generator().manual_seed(seed)
    if kind in ("alibi", "kerple_log", "kerple_power"):
        r1 = (torch.rand(hq, generator=gen) + 0.1).to(DEVICE).requires_grad_()
        if kind == "alibi":
            return RelativeBias.alibi(r1), [r1]
        r2 = (torch.rand(hq, generator=gen) + 0.1).to(DEVICE).requires_grad_()
        return RelativeBias(kind, r1, r2), [r1, r2]
    if kind == "table":  # shorter than the longest distance: the last entry serves the rest; one masks
        table = torch.randn(hq, max(lq, lk) // 2, generator=gen)
        table[0, 2] = float("-inf")
        table = table.to(DEVICE).requires_grad_()
        return RelativeBias.table(table), [table]
    if kind == "tensor":
        bias = torch.randn(1, hq, lq, lk, generator=gen)
        bias[..., ::7, ::3] = float("-inf")
        bias = bias.to(DEVICE).requires_grad_()
        return bias, [bias]
    torch.manual_seed(seed)
    # "fire": every query at or below the threshold (a table); "function": the last ones beyond it
    fire = FIRE(hq, train_len=lk if kind == "fire" else lk // 2).to(DEVICE)
    return fire, list(fire.parameters())


def run_with_bias(inputs, backend, bias, leaves, ssmax=None, **kwargs):
    q, k, v = (t.to(DEVICE, torch.float32).detach().requires_grad_() for t in inputs[:3])
    extra = [] if ssmax is None else [ssmax]
    out = attention(q, k, v, bias=bias, ssmax=ssmax, backend=backend, **kwargs)
    grads = torch.autograd.grad(out, [q, k, v, *extra, *leaves], inputs[3].to(DEVICE, torch.float32))
    return [out, *grads]


@needs_kernels
@pytest.mark.parametrize("case", list(BIAS_CASES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", BIAS_KINDS)
def test_biases_and_their_gradients(kind, causal, case, monkeypatch):
    # A tiny budget makes a bias function take several blocks of 16 query rows.
    monkeypatch.setattr(triton_backend, "BIAS_FUNCTION_BUDGET", 1)
    shape, options = BIAS_CASES[case]
    inputs = make_inputs(shape, seed=11)
    bias, leaves = make_bias_spec(kind, shape, seed=12)
    reference = bias
    if kind in ("fire", "function"):  # the table, or the module called per block of rows
        assert (bias.relative_bias(shape[3], shape[4]) is None) == (kind == "function")
        # causal "function" calls are split: the rows below FIRE's threshold take its table, the others the
        # function; eager gets the module's forward, a plain function, unsplit
        assert (bias.relative_bias_rows(shape[3], shape[4]) < shape[3]) == (kind == "function")
        reference = bias.forward
    ssmax = None
    if "ssmax" in options:
        ssmax = torch.tensor([0.3, 0.5, 0.8, 1.2][: shape[1]], device=DEVICE).requires_grad_()
    mask = make_masks(shape, seed=13)[options["mask"]] if "mask" in options else None
    kwargs = {"normalizer": "sa_norm", "causal": causal, "mask": mask, "ssmax": ssmax}
    got = run_with_bias(inputs, "triton", bias, leaves, **kwargs)
    ref = run_with_bias(inputs, "eager", reference, leaves, **kwargs)
    names = ["out", "dq", "dk", "dv"] + (["ds"] if ssmax is not None else [])
    names += [f"d{kind}[{i}]" for i in range(len(leaves))]
    for name, a, r in zip(names, got, ref):
        assert torch.isfinite(a).all(), f"{name} has non-finite entries"
        err = (a - r).abs().max().item()
        assert err <= 2e-4 * r.abs().max().item() + 1e-5, f"{name}: max error {err:.3g} vs eager"


@needs_kernels
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_relative_bias_in_half_precision(normalizer):
    """float16 with Kerple and SSMax inside the kernels: the FlashAttention rule against float64 eager.
    (Not causal: its first row has one key, t = 0 and sa_norm's 1/ε overflows the float16 baseline.)"""
    from sasoftmax import RelativeBias

    shape = (1, 4, 2, 37, 37, 16, 16)
    inputs = make_inputs(shape, seed=21)
    r1, r2 = torch.tensor([0.5, 1.0, 1.5, 0.2]), torch.tensor([0.3, 0.6, 0.9, 0.1])
    ssmax = torch.tensor([0.3, 0.5, 0.8, 1.2], dtype=torch.float64)
    kwargs = {"normalizer": normalizer, "causal": False}

    def bias_in(dtype):
        return RelativeBias.kerple_log(r1.to(DEVICE, dtype), r2.to(DEVICE, dtype))

    got = run(inputs, torch.float16, "triton", ssmax, bias=bias_in(torch.float32), **kwargs)
    ref = run(inputs, torch.float64, "eager", ssmax, bias=bias_in(torch.float64), **kwargs)
    base = run(inputs, torch.float16, "plain", ssmax, bias=bias_in(torch.float32), **kwargs)
    assert_flash_rule(["out", "dq", "dk", "dv", "ds"], got, base, ref)


# Rows that one key dominates, or that have one key only (padding, causal row 0): there dx is small against the
# terms that cancel in it (dW·x against D for sa, dW·c against D·c for sa_norm's max term), so D_i = dO_i·o_i must
# be the sum over the weights the backward's tiles use (o's rounding residual, sa's split weights: bwd_dq, _weighted).
SHARP_ROWS = {
    "one-key": dict(shape=(1, 2, 1, 24, 1, 32, 16), q_times=4.0, mask=None, bias=None, ssmax=False),
    "padding-two-keys": dict(shape=(2, 2, 1, 17, 2, 32, 32), q_times=1.0, mask="padding", bias=None, ssmax=False),
    "padding-kerple-ssmax": dict(shape=(1, 3, 1, 5, 16, 64, 16), q_times=4.0, mask="padding", bias="kerple",
                                 ssmax=True),
    "causal-ssmax": dict(shape=(1, 2, 1, 31, 48, 40, 40), q_times=1.0, mask=None, bias="kerple", ssmax=True,
                         causal=True),
}


@needs_kernels
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize("case", SHARP_ROWS, ids=str)
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_half_precision_sharp_rows(normalizer, case, dtype):
    """16-bit where rows have one key or one dominant key (logits up to ~±30), with Kerple's parameters and SSMax's
    s summing dx over whole rows: the FlashAttention rule against float64 eager, every gradient."""
    from sasoftmax import RelativeBias

    spec = SHARP_ROWS[case]
    shape = spec["shape"]
    q, k, v, do = make_inputs(shape, seed=23)
    inputs = (q * spec["q_times"], k, v, do)
    hq = shape[1]
    kwargs = {"normalizer": normalizer, "causal": spec.get("causal", False)}
    if spec["mask"]:
        kwargs["mask"] = make_masks(shape, seed=3)[spec["mask"]]
    ssmax = torch.linspace(0.3, 0.7, hq, dtype=torch.float64) if spec["ssmax"] else None
    r1, r2 = torch.linspace(0.2, 1.5, hq, dtype=torch.float64), torch.linspace(0.1, 0.9, hq, dtype=torch.float64)

    def outputs(backend, dtype):
        """o and the gradients of q, k, v (and s, r1, r2) in ``dtype`` (Kerple's parameters in float32 but for
        the float64 reference, as a model keeps them)."""
        params = [t.to(DEVICE, torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
                  for t in ((r1, r2) if spec["bias"] == "kerple" else ())]  # fmt: skip
        bias = RelativeBias.kerple_power(*params) if params else None
        return run(inputs, dtype, backend, ssmax, bias=bias, params=params, **kwargs)

    got, ref, base = outputs("triton", dtype), outputs("eager", torch.float64), outputs("plain", dtype)
    names = ["out", "dq", "dk", "dv"] + ["ds"] * spec["ssmax"] + ["dr1", "dr2"] * (spec["bias"] == "kerple")
    assert_flash_rule(names, got, base, ref, dtype)


# Calls tests/fuzz_backends.py drew that broke the FlashAttention rule in float16, each by a cause since mended: seed,
# its --extended and --magnitudes, and what failed before. (The fuzz's draws are kept stable for these.)
FUZZ_REGRESSIONS = {
    20050: (False, (1.0, 1.0, 4.0)),  # sa, Kerple + SSMax: ds 1.3× the limit (D from the rounded o)
    20055: (False, (1.0, 1.0, 4.0)),  # sa, table + SSMax + padding: ds 9×, dL/dtable 9× (the same)
    20097: (False, (1.0, 1.0, 4.0)),  # sa_norm, Kerple + padding: dq, dk, dr1, dr2 2–7× (D; weights unnormalised)
    20222: (False, (1.0, 1.0, 4.0)),  # sa_norm, the causal pattern as a mask: dq, dk 5× (the same)
    100172: (True, (0.01, 1.0, 4.0)),  # sa_norm, FIRE: dL/d(its MLP's first weight) 2.4× (o over rounded weights)
    100176: (True, (0.01, 1.0, 4.0)),  # softmax, FIRE: dL/dc 2× (the same)
}


@needs_kernels
@pytest.mark.parametrize("seed", FUZZ_REGRESSIONS)
def test_fuzz_regressions(seed):
    """Random calls that broke the FlashAttention rule in float16 (tests/fuzz_backends.py: every gradient against
    float64 eager, within twice plain float16's error or float32 eager's on the rounded inputs, plus the rule's
    absolute term) now hold it. (Each still fails with the kernels before session 15, but 100172, which broke it at
    an intermediate commit of that session.)"""
    import fuzz_backends

    extended, magnitudes = FUZZ_REGRESSIONS[seed]
    call = fuzz_backends.draw(seed, "triton", magnitudes, extended)
    assert call["dtype"] == torch.float16
    assert fuzz_backends.check(call, "triton") == []


@needs_kernels
@pytest.mark.parametrize("ssmax", [False, True], ids=["plain", "ssmax"])
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_half_precision_forward_saves_its_float32_output(normalizer, ssmax):
    """A 16-bit forward that a backward follows saves o's rounding residual o_lo (``_Saved.o_lo``) where the
    backward's D_i needs it (``triton._residual``: sa, sa_norm; softmax where a gradient sums over rows, SSMax's s
    here), so that o + o_lo is the float32 o; for sa, whose weights are split too (``triton_kernels._weighted``),
    within twice float32 eager's error of the float64 attention of the same float16 inputs (~2⁻²⁰ of its largest
    value; with the GPU's tiles, one 64-key tile, 1.24× float32 eager's error in the interpreter: the bound was
    2⁻²⁰ before, which those tiles missed by 2%; the rounded weights alone: ~2⁻¹¹·|x|)."""
    shape = (1, 2, 1, 19, 23, 16, 16)
    q, k, v, _ = (t.to(DEVICE, torch.float16) for t in make_inputs(shape, seed=24))
    q = q * 4  # logits up to ~±15: sa's weights p·x reach ~10
    s = torch.tensor([0.4, 0.6], device=DEVICE) if ssmax else None
    s_leaf = None if s is None else s.clone().requires_grad_()
    call = make_call(q.requires_grad_(), k, v, normalizer, False, None, None, 0.25, s_leaf, 1e-6, 0.0)
    want_residual = {"sa": triton_backend.SPLIT_WEIGHTS, "sa_norm": triton_backend.RESIDUAL}.get(
        normalizer, triton_backend.RESIDUAL if ssmax else triton_backend.NO_RESIDUAL
    )
    assert triton_backend._residual(call, triton_backend._sums_over_rows(call)) == want_residual
    float32 = make_call(q.float(), k.float(), v.float(), normalizer, False, None, None, 0.25, s, 1e-6, 0.0)
    assert triton_backend._residual(float32, triton_backend._sums_over_rows(float32)) == triton_backend.NO_RESIDUAL
    norm = NORMALIZERS.index(normalizer)
    q = q.detach()
    for residual in (triton_backend.NO_RESIDUAL, want_residual):
        o, *_, o_lo = triton_backend._forward_op(
            q, k, v, None, s, None, None, 0, None, None, norm, False, 0.25, 1e-6, 0, residual
        )
        assert o_lo.shape == ((2, 19, 16) if residual else (0,))
    if normalizer == "sa":  # o + o_lo as exact as a float32 attention: FlashAttention's rule against float32 eager
        want, plain = (attention(*(t.to(dtype) for t in (q, k, v)), normalizer="sa", scale=0.25, backend="eager",
                                 ssmax=None if s is None else s.to(dtype)) for dtype in (torch.float64, torch.float32))
        got = o.double() + o_lo.double().view(1, 2, 19, 16)
        err, limit = (got - want).abs().max().item(), 2 * (plain.double() - want).abs().max().item()
        assert err <= limit, f"o + o_lo: error {err:.3g} > {limit:.3g} (o alone: {(o.double() - want).abs().max():.3g})"


@needs_kernels
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_causal_alibi_in_half_precision(normalizer):
    """float16, causal, ALiBi with L != S: the bulk tiles fold the bias's row part into their per-row constants
    (``triton_kernels._alibi_apart``: float32 inputs and sa keep x whole); the FlashAttention rule against
    float64 eager."""
    from sasoftmax import RelativeBias

    shape = (1, 4, 2, 37, 53, 16, 16)
    inputs = make_inputs(shape, seed=22)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    kwargs = {"normalizer": normalizer, "causal": True}

    def bias_in(dtype):
        return RelativeBias.alibi(slopes.to(DEVICE, dtype))

    got = run(inputs, torch.float16, "triton", bias=bias_in(torch.float32), **kwargs)
    ref = run(inputs, torch.float64, "eager", bias=bias_in(torch.float64), **kwargs)
    base = run(inputs, torch.float16, "plain", bias=bias_in(torch.float32), **kwargs)
    assert_flash_rule(["out", "dq", "dk", "dv"], got, base, ref)


@needs_kernels
def test_calls_without_gradients_skip_autograd(monkeypatch):
    """Inference and decoding run the forward without autograd's Function (on a faked GPU a decoding step's host
    time went 71–72 → 55–56 µs); the output is the Function's."""
    q, k, v, _ = (t.float().to(DEVICE) for t in make_inputs((1, 4, 2, 1, 37, 16, 16), seed=25))
    assert_skips_function_without_grad(monkeypatch, triton_backend, "_EagerAttention", "triton", q, k, v)


@needs_kernels
def test_layouts_need_no_copies():
    """o comes in (B, L, H, D) memory order, as SDPA's CUDA kernels return it, so a model's
    o.transpose(1, 2).reshape(B, L, H·D) is a view; q, k, v that are (B, L, H, D) views get their gradients in
    that order (the views' backward then copies nothing), and dO in that order is read as it is."""
    b, lq, hq, hkv, d = 2, 19, 4, 2, 16
    base = [torch.randn(b, lq, h, d, device=DEVICE, requires_grad=True) for h in (hq, hkv, hkv)]
    q, k, v = (t.transpose(1, 2) for t in base)
    out = attention(q, k, v, normalizer="sa_norm", causal=True, backend="triton")
    assert out.transpose(1, 2).is_contiguous()
    flat = out.transpose(1, 2).reshape(b, lq, hq * d)
    assert flat.data_ptr() == out.data_ptr()  # a view
    grads = torch.autograd.grad(out, [q, k, v], torch.randn_like(out))
    for g, x in zip(grads, (q, k, v)):
        assert g.stride() == x.stride()


@needs_kernels
def test_bias_tensor_without_gradient_is_not_differentiated():
    """A bias tensor that needs no gradient costs no (B, Hq, L, S) gradient buffer and gets None."""
    shape = (1, 2, 2, 20, 20, 16, 16)
    q, k, v, do = (t.float().to(DEVICE).requires_grad_() for t in make_inputs(shape))
    bias = make_bias(shape)["alibi"][:, :2, :20, :20]
    out = attention(q, k, v, bias=bias, normalizer="sa_norm", causal=True, backend="triton")
    out.backward(do)
    assert bias.grad is None and q.grad is not None


@pytest.mark.skipif(not CUDA, reason="GPU tiles (64–128 rows) need long sequences; too slow for the interpreter")
@pytest.mark.parametrize("shape", [(1, 4, 2, 700, 700, 64, 64), (1, 2, 1, 333, 1000, 128, 128)], ids=["N700", "L333"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_long_sequences_on_gpu_tiles(normalizer, causal, dtype, shape):
    """Whole tiles without bounds checks and the diagonal tiles of the GPU configurations."""
    assert_matches_eager(shape, dtype, normalizer=normalizer, causal=causal)


@needs_kernels
def test_table_gradient_with_non_square_tiles(monkeypatch):
    """A table's gradient sums each dk/dv tile's diagonals (tl.gather skews the tile): right with BLOCK_M < BLOCK_N
    too; BLOCK_M > BLOCK_N, which that skew cannot serve, is refused naming the variable that set it."""
    shape = (1, 4, 2, 45, 70, 16, 16)
    inputs = make_inputs(shape, seed=31)
    bias, leaves = make_bias_spec("table", shape, seed=32)
    kwargs = {"normalizer": "sa_norm", "causal": True}
    monkeypatch.setenv("SASOFTMAX_TRITON_TILES", NON_SQUARE_TILES["tall"])  # dk/dv 16 rows x 32 keys
    got = run_with_bias(inputs, "triton", bias, leaves, **kwargs)
    ref = run_with_bias(inputs, "eager", bias, leaves, **kwargs)
    for name, a, r in zip(["out", "dq", "dk", "dv", "dtable"], got, ref):
        err = (a - r).abs().max().item()
        assert err <= 2e-4 * r.abs().max().item() + 1e-5, f"{name}: max error {err:.3g} vs eager"
    monkeypatch.setenv("SASOFTMAX_TRITON_TILES", NON_SQUARE_TILES["wide"])  # dk/dv 32 rows x 16 keys
    with pytest.raises(ValueError, match="SASOFTMAX_TRITON_TILES.*BLOCK_M <= BLOCK_N"):
        run_with_bias(inputs, "triton", bias, leaves, **kwargs)
