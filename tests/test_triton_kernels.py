"""Each Triton kernel against its naive twin (tests/triton_naive.py), output by output.

The kernels run through the backend's own launchers, ``_forward`` (row_extrema, fwd) and ``_backward``
(bwd_dq, bwd_dkdv); the statistics they keep to themselves (row_extrema's μ, bwd_dq's D_i and min term) are
read from the launch arguments. float32 inputs; the twins compute in float64 from the same values. Small odd
shapes leave partial tiles (the interpreter runs 16×16 tiles); the cases cover every pair of the factors
normalizer × causal × grouped-query × mask × SSMax × bias kind (checked below) rather than their product.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (it has wheels for Linux only)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import triton_naive as naive  # noqa: E402
from kernel_capture import Capture  # noqa: E402
from sasoftmax.backends import triton as tb  # noqa: E402
from sasoftmax.backends import triton_kernels as kernels  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not CUDA and not tb.INTERPRET,
    reason="no CUDA and Triton's interpreter is off (TRITON_INTERPRET=1 must be set before triton is imported)",
)

RTOL = 1e-5
"""Largest error allowed, relative to the largest magnitude of the twin's output."""

# (B, Hq, Hkv, L, S, D, Dv): partial tiles everywhere; Dv != D and D not a power of two; L > S (under causal
# masking the first rows see no key); a single decoding query.
PLAIN = [(1, 2, 2, 19, 35, 16, 16), (1, 2, 2, 1, 37, 32, 16)]
GROUPED = [(2, 4, 2, 33, 21, 24, 16), (1, 3, 1, 17, 40, 16, 32)]


@dataclass(frozen=True)
class Case:
    norm: int
    bias: str
    causal: bool
    grouped: bool
    mask: bool
    ssmax: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return (GROUPED if self.grouped else PLAIN)[(self.norm + len(self.bias)) % 2]

    def __str__(self) -> str:
        flags = [n for n in ("causal", "grouped", "mask", "ssmax") if getattr(self, n)]
        return "-".join([("softmax", "sa", "sa_norm")[self.norm], self.bias, *flags])


# Every pair of factor levels occurs in some case (test_cases_cover_every_pair), then the rarest mixtures.
CASES = [
    Case(0, "none", True, True, False, True),
    Case(1, "none", True, False, True, False),
    Case(2, "none", False, False, False, False),
    Case(0, "tensor", False, False, False, False),
    Case(1, "tensor", False, True, False, False),
    Case(2, "tensor", True, False, True, True),
    Case(0, "alibi", False, False, True, False),
    Case(1, "alibi", True, False, False, True),
    Case(2, "alibi", False, True, True, False),
    Case(0, "kerple_log", True, False, True, False),
    Case(1, "kerple_log", False, False, True, True),
    Case(2, "kerple_log", True, True, False, False),
    Case(0, "kerple_power", False, True, True, False),
    Case(1, "kerple_power", True, True, False, True),
    Case(2, "kerple_power", True, False, True, True),
    Case(2, "tensor", True, True, True, True),
    Case(2, "kerple_log", True, True, True, True),
    Case(2, "none", True, True, False, True),
    Case(0, "table", False, True, True, False),
    Case(1, "table", True, False, False, True),
    Case(2, "table", True, True, True, True),
]


def test_cases_cover_every_pair():
    levels = {"norm": (0, 1, 2), "bias": tuple(naive.BIAS_KINDS)}
    levels.update({name: (False, True) for name in ("causal", "grouped", "mask", "ssmax")})
    for (a, la), (b, lb) in itertools.combinations(levels.items(), 2):
        seen = {(getattr(c, a), getattr(c, b)) for c in CASES}
        assert seen == set(itertools.product(la, lb)), f"no case has some pair of {a} × {b}"


def make_problem(case: Case, seed: int) -> tuple[naive.Problem, torch.Tensor]:
    """float32 inputs of a case (on the kernels' device) and dO."""
    b, hq, hkv, lq, lk, d, dv = case.shape
    gen = torch.Generator().manual_seed(seed)

    def rand(*size, lo=None, hi=None):
        x = torch.rand(*size, generator=gen) * (hi - lo) + lo if lo is not None else torch.randn(*size, generator=gen)
        return x.to(DEVICE)

    q, k, v, do = rand(b, hq, lq, d), rand(b, hkv, lk, d), rand(b, hkv, lk, dv), rand(b, hq, lq, dv)
    mask = bias = r1 = r2 = t = None
    if case.mask:  # padding-like and random holes, one row with no key at all
        mask = (rand(b, hq, lq, lk, lo=0, hi=1) > 0.3).cpu()
        mask[:, :, 0, -lk // 3 :] = False
        mask[0, -1, lq // 2] = False
        mask = mask.to(DEVICE)
    kind = naive.BIAS_KINDS[case.bias]
    if kind == naive.TENSOR:
        bias = rand(b, hq, lq, lk).cpu()
        bias[rand(b, hq, lq, lk, lo=0, hi=1).cpu() < 0.15] = -math.inf
        bias = bias.to(DEVICE)
    elif kind == naive.TABLE:  # shorter than the longest distance (clamped) or not; a distance masked by −inf
        r1 = rand(hq, lk // 2 if case.norm != 1 else lq + lk).cpu()
        r1[-1, 3] = -math.inf
        r1 = r1.to(DEVICE)
    elif kind != naive.NONE:
        r1, r2 = rand(hq, lo=0.1, hi=1.0), rand(hq, lo=0.2, hi=1.5)
        r2 = None if kind == naive.ALIBI else r2
    if case.ssmax:
        t = rand(b, hq, lq, lo=0.5, hi=2.0)
    problem = naive.Problem(q, k, v, t, mask, bias, kind, r1, r2, case.norm, case.causal, d**-0.5, 1e-6, lk - lq)
    return problem, do


def on_cpu(p: naive.Problem, dtype: torch.dtype) -> naive.Problem:
    """The problem's tensors on the CPU, floating ones in ``dtype`` (the mask stays bool)."""

    def convert(x):
        return None if x is None else x.cpu() if x.dtype == torch.bool else x.cpu().to(dtype)

    return naive.Problem(**{name: convert(x) if isinstance(x, torch.Tensor) else x for name, x in p.__dict__.items()})


@dataclass
class KernelRun:
    o: torch.Tensor
    saved: tb._Saved
    extrema: dict
    dq_args: dict
    grads: tuple


def run_kernels(p: naive.Problem, do: torch.Tensor, monkeypatch) -> KernelRun:
    extrema, dq = Capture(kernels.row_extrema), Capture(kernels.bwd_dq)
    monkeypatch.setattr(kernels, "row_extrema", extrema)
    monkeypatch.setattr(kernels, "bwd_dq", dq)
    b, hq, lq, _ = p.q.shape
    opt = tb._Options(p.norm, p.causal, p.scale, p.eps, p.pos0)
    mask, bias = tb._views(p.q, p.k, p.mask, p.bias)
    o = torch.empty(b, hq, lq, p.v.shape[3], device=p.q.device, dtype=p.v.dtype)
    saved = tb._forward(p.q, p.k, p.v, o, p.t, mask, bias, p.kind, p.r1, p.r2, opt)
    grads = tb._backward(p.q, p.k, p.v, o, do, p.t, mask, bias, p.kind, p.r1, p.r2, saved, opt, p.kind != 0)
    return KernelRun(o, saved, extrema.args, dq.args, grads)


def twin_outputs(p: naive.Problem, do: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every output of the four twins, by name (the kernels' outputs go by the same names)."""
    logits = naive.logits(p)
    ext = naive.row_extrema(p, logits)
    out = {"mu": ext.mu}  # the kernels' row max: sa_norm's, and every float32 forward's first pass
    if p.norm == 2:
        out.update(low=ext.low, inv_delta=ext.inv_delta, argmax=ext.argmax, argmin=ext.argmin)
    else:
        ext = None
    f = naive.fwd(p, logits, ext)
    out.update(o=f.o, lse=f.lse)
    back = naive.bwd_dq(p, logits, ext, f, do)
    out.update(dq=back.dq, D=back.delta)
    if p.norm == 2:
        out["min term"] = back.g_low
    if p.t is not None:
        out["dL/dt"] = back.dt
    kv = naive.bwd_dkdv(p, logits, f, back, do)
    out.update(dk=kv.dk, dv=kv.dv)
    if p.kind == naive.TENSOR:
        out["dL/dbias"] = kv.dbias
    elif p.kind != naive.NONE:
        out["dL/dr1"] = kv.dr[0]
        if p.kind not in (naive.ALIBI, naive.TABLE):
            out["dL/dr2"] = kv.dr[1]
    return out


def kernel_outputs(run: KernelRun, p: naive.Problem) -> dict[str, torch.Tensor]:
    """The same outputs from the kernels, per-row statistics reshaped to (B, Hq, L)."""
    b, hq, lq, _ = p.q.shape

    def row(x):
        return x.view(b, hq, lq)

    out = {"mu": row(run.extrema["MU"])}
    if p.norm == 2:
        out.update(low=row(run.saved.low), inv_delta=row(run.saved.inv_delta))
        out.update(argmax=row(run.saved.argmax).long(), argmin=row(run.saved.argmin).long())
    dq, dk, dv, dt, bias_grads = run.grads
    shift, inv_l = run.saved.shift, run.saved.inv_l
    lse = shift if inv_l.numel() == 0 else shift - torch.log(inv_l)  # float32 saves μ and 1/ℓ
    out.update(o=run.o, lse=row(lse), dq=dq, D=row(tb.row_value(run.dq_args["ROWS"], "D")))
    if p.norm == 2:
        out["min term"] = row(tb.row_value(run.dq_args["ROWS"], "g_m"))
    if dt is not None:
        out["dL/dt"] = dt
    out.update(dk=dk, dv=dv)
    if p.kind == naive.TENSOR:
        out["dL/dbias"] = bias_grads
    elif p.kind != naive.NONE:
        out["dL/dr1"] = bias_grads[0]
        if p.kind not in (naive.ALIBI, naive.TABLE):
            out["dL/dr2"] = bias_grads[1]
    return {name: x.cpu() for name, x in out.items()}


def max_error(name: str, actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """max |actual − expected| and max |expected| over expected's finite entries (infinities must agree)."""
    actual, expected = actual.double().reshape(expected.shape), expected.double()
    assert not torch.isnan(actual).any(), f"{name}: NaN"
    finite = torch.isfinite(expected)
    assert torch.equal(actual[~finite], expected[~finite]), f"{name}: infinities differ"
    if not finite.any():
        return 0.0, 0.0
    return (actual[finite] - expected[finite]).abs().max().item(), expected[finite].abs().max().item()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernels_match_their_naive_twins(case, monkeypatch):
    """Indices exactly; values within RTOL of the float64 twin, or (where the problem is ill-conditioned: a
    causal row seeing one key x has sa_norm's dx = dW/x + ... − D/x, cancelling) within twice the error of
    the float32 twin, FlashAttention's rule. sa_norm's min term goes to dk inside the dk/dv tiles here (short
    rows); ``test_min_term_scattered_through_dq`` takes the other way."""
    check_against_twins(case, monkeypatch)


@pytest.mark.parametrize("case", [c for c in CASES if c.norm == 2], ids=str)
def test_min_term_scattered_through_dq(case, monkeypatch):
    """sa_norm's min term through bwd_dq's atomic adds into a float32 buffer (the way long rows take, forced):
    every output as the twins give it, every bias kind's gradient included."""
    monkeypatch.setenv("SASOFTMAX_TRITON_MIN_TERM", "scatter")
    check_against_twins(case, monkeypatch)


def gpu_tiles(dtype: torch.dtype, d: int, dv: int, monkeypatch, norm: int = 0) -> str:
    """The tiles a GPU launches for these head dims, dtype and normalizer, as ``SASOFTMAX_TRITON_TILES`` (one
    stage)."""
    monkeypatch.setattr(tb, "INTERPRET", False)
    configs = tb._configs(d, dv, dtype, norm=norm)
    monkeypatch.setattr(tb, "INTERPRET", True)
    return ",".join(f"{name}:{c.block_m}x{c.block_n}x{c.num_warps}x1" for name, c in configs.items())


@pytest.mark.skipif(CUDA, reason="on a GPU every test takes the GPU's tiles")
@pytest.mark.parametrize("case", [c for c in CASES if c.norm == 2], ids=str)
def test_float32_sa_norm_with_the_gpus_tiles(case, monkeypatch):
    """float32 sa_norm with the tiles a GPU takes (one tile holds whole rows here, unlike the interpreter's 16×16,
    and dk/dv's transposed products sum in another order): s at a row's extremes must not depend on how a kernel
    rounds its recomputed logit (``triton_kernels._pin_extremes``). Without the pin, a causal row seeing one key
    with x = 0.003 put 3–6e-5 relative error in dk and dv here, 2e-3 in dq on an H100."""
    _, _, _, _, _, d, dv = case.shape
    monkeypatch.setenv("SASOFTMAX_TRITON_TILES", gpu_tiles(torch.float32, d, dv, monkeypatch))
    check_against_twins(case, monkeypatch)


TUNED_TILES = {  # normalizer index -> head dim -> tiles (one stage) a GPU takes for 16-bit calls without a bias
    0: {64: "fwd:128x64x8x1,dq:64x64x4x1,dkdv:64x64x4x1", 128: "fwd:64x64x4x1,dq:128x64x8x1,dkdv:32x64x4x1"},
    1: {64: "fwd:128x64x8x1,dq:64x64x4x1,dkdv:64x64x4x1", 128: "fwd:64x64x4x1,dq:128x64x8x1,dkdv:32x64x4x1"},
    2: {64: "fwd:128x64x4x1,dq:64x32x4x1,dkdv:64x64x4x1,extrema:64x16x4x1",
        128: "fwd:64x64x4x1,dq:64x32x4x1,dkdv:32x64x4x1,extrema:64x16x4x1"},
}  # fmt: skip


@pytest.mark.skipif(CUDA, reason="on a GPU every test takes the GPU's tiles")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", [c for c in CASES if c.norm in TUNED_TILES], ids=str)
def test_the_gpus_tuned_tiles(case, head_dim, monkeypatch):
    """The tiles a GPU takes for 16-bit calls without a bias (tuned, ``triton._TUNED``: sa_norm's row_extrema
    64×16, dq 64×32, dk/dv 64×64 or 32×64; softmax's, sa's too, dq up to 128×64), on these float32 problems, every bias
    kind's too: the tiles' bounds, not the dtype, are what is checked (the interpreter's bfloat16 arithmetic is
    wrong)."""
    tiles = gpu_tiles(torch.bfloat16, head_dim, head_dim, monkeypatch, norm=case.norm)
    assert set(TUNED_TILES[case.norm][head_dim].split(",")) <= set(tiles.split(","))
    monkeypatch.setenv("SASOFTMAX_TRITON_TILES", tiles)
    check_against_twins(case, monkeypatch)


def test_min_term_switch_is_checked(monkeypatch):
    monkeypatch.setenv("SASOFTMAX_TRITON_MIN_TERM", "atomics")
    with pytest.raises(ValueError, match="SASOFTMAX_TRITON_MIN_TERM must be 'tile' or 'scatter'"):
        tb._min_term_scattered(10)


@contextlib.contextmanager
def deterministic(warn_only: bool = False):
    """``torch.use_deterministic_algorithms(True)`` for the block, then as before."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_deterministic_algorithms_keep_the_min_term_in_the_tiles(monkeypatch):
    """Under ``torch.use_deterministic_algorithms(True)`` long rows' min term stays in bwd_dkdv's tiles (a fixed
    order of summation) instead of bwd_dq's atomic adds, unless forced (the tile way against the twins: the other
    tests)."""
    monkeypatch.delenv("SASOFTMAX_TRITON_MIN_TERM", raising=False)
    assert tb._min_term_scattered(tb.MIN_TERM_SCATTER_KEYS)
    with deterministic():
        assert not tb._min_term_scattered(tb.MIN_TERM_SCATTER_KEYS)
        monkeypatch.setenv("SASOFTMAX_TRITON_MIN_TERM", "scatter")
        assert tb._min_term_scattered(10)
        monkeypatch.delenv("SASOFTMAX_TRITON_MIN_TERM")
        monkeypatch.setattr(tb, "MIN_TERM_SCATTER_KEYS", 1)  # every call would scatter
        p, do = make_problem(Case(2, "kerple_log", True, True, True, True), seed=0)
        assert run_kernels(p, do, monkeypatch).dq_args["LOW_SCATTER"] is False


@pytest.mark.parametrize("mode", ["off", "on", "warn_only"])
def test_table_gradients_alert_under_deterministic_algorithms(mode):
    """A table bias's gradient (FIRE's) is summed by atomic adds on a GPU: under
    ``torch.use_deterministic_algorithms(True)`` that raises as PyTorch's own such operators do (warns with
    ``warn_only=True``); the interpreter's adds run in order, so CPU tensors never alert."""
    cuda = torch.device("cuda", 0)
    tb._alert_not_deterministic("x", torch.device("cpu"))
    if mode == "off":
        tb._alert_not_deterministic("x", cuda)
        return
    with deterministic(warn_only=mode == "warn_only"):
        tb._alert_not_deterministic("x", torch.device("cpu"))
        if mode == "on":
            with pytest.raises(RuntimeError, match="x does not have a deterministic implementation"):
                tb._alert_not_deterministic("x", cuda)
        else:
            with pytest.warns(UserWarning, match="x does not have a deterministic implementation"):
                tb._alert_not_deterministic("x", cuda)


def test_table_gradients_ask_for_the_alert(monkeypatch):
    """The backward of a table bias with its gradient goes through ``_alert_not_deterministic`` (which alerts on
    CUDA tensors only), once per call."""
    calls = []
    monkeypatch.setattr(tb, "_alert_not_deterministic", lambda caller, device: calls.append((caller, device.type)))
    case = Case(1, "table", True, False, False, True)
    p, do = make_problem(case, seed=1)
    run_kernels(p, do, monkeypatch)
    assert calls == [("sasoftmax's Triton backward of a table bias (FIRE's: atomic adds)", DEVICE)]


def check_against_twins(case: Case, monkeypatch) -> None:
    p, do = make_problem(case, seed=CASES.index(case))
    run = run_kernels(p, do, monkeypatch)
    # row_extrema runs for sa_norm, and for float32 inputs of every normalizer (the row max before ℓ is summed)
    assert run.extrema != {} and p.q.dtype == torch.float32
    actual = kernel_outputs(run, p)
    expected = twin_outputs(on_cpu(p, torch.float64), do.double().cpu())
    plain = twin_outputs(on_cpu(p, torch.float32), do.float().cpu())
    assert actual.keys() == expected.keys()
    failures = []
    for name, want in expected.items():
        if name in ("argmax", "argmin"):
            if not torch.equal(actual[name], want):
                failures.append(f"{name}: {(actual[name] != want).sum().item()} rows differ")
            continue
        err, size = max_error(name, actual[name], want)
        plain_err, _ = max_error(name, plain[name], want)
        if err > max(RTOL * size, 2 * plain_err) + 1e-6:
            failures.append(f"{name}: error {err:.3g} ({err / size:.3g} relative; float32 twin {plain_err:.3g})")
    assert not failures, "; ".join(failures)
    if case.norm == 2:  # the min/max gradient terms occur
        assert (expected["argmax"] >= 0).any() and (expected["argmin"] >= 0).any()
    if case.causal and p.q.shape[2] > p.k.shape[2]:  # rows with no key: logsumexp +inf, zero output and dq
        assert torch.isinf(actual["lse"][:, :, 0]).all() and (actual["o"][:, :, 0] == 0).all()
        assert (actual["dq"][:, :, 0] == 0).all()


@pytest.mark.parametrize("case", [c for c in CASES if c.norm == 2 and c.ssmax], ids=str)
def test_row_pairs_hold_their_values(case, monkeypatch):
    """bwd_dq's int64 row pairs for bwd_dkdv carry each 32-bit value bit for bit (negative floats and −1 indices
    included, whose sign must not reach the other half): the saved shift, m, c, argmax, argmin and t, and D and
    the min-term weight as the twin gives them."""
    p, do = make_problem(case, seed=CASES.index(case))
    run = run_kernels(p, do, monkeypatch)
    rows, saved = run.dq_args["ROWS"], run.saved
    assert (saved.low < 0).any() and (saved.argmax < 0).any()  # the cases the low half's sign could spoil
    for name, source in (("shift", saved.shift), ("m", saved.low), ("c", saved.inv_delta), ("argmax", saved.argmax),
                         ("argmin", saved.argmin), ("t", p.t)):  # fmt: skip
        assert torch.equal(tb.row_value(rows, name), source.reshape(-1)), name
    twin = twin_outputs(on_cpu(p, torch.float64), do.double().cpu())
    for name, twin_name in (("D", "D"), ("g_m", "min term")):
        err, size = max_error(name, tb.row_value(rows, name).cpu(), twin[twin_name])
        assert err <= 1e-4 * size + 1e-6, f"{name}: error {err:.3g} of {size:.3g}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_naive_twins_match_the_eager_reference(case):
    """The twins themselves against autograd through the eager reference, float64: o and every gradient
    (SSMax's ds_h = Σ ln(n_i)·dL/dt_i; relative-bias parameters; a bias tensor)."""
    from sasoftmax import RelativeBias, attention

    p, do = make_problem(case, seed=CASES.index(case))
    p, do = on_cpu(p, torch.float64), do.double().cpu()
    hq = p.q.shape[1]
    s = torch.linspace(0.5, 1.5, hq, dtype=torch.float64) if case.ssmax else None
    if s is not None:  # t_i = s_h·ln(n_i), n_i = the keys row i may attend (at least 1)
        log_n = naive.logits(p).allowed.sum(-1).clamp_min(1).double().log()
        p = naive.Problem(**{**p.__dict__, "t": s.view(1, -1, 1) * log_n})
    leaves = [x.clone().requires_grad_() for x in (p.q, p.k, p.v)]
    bias = None
    if p.kind == naive.TENSOR:
        bias = p.bias.clone().requires_grad_()
        leaves.append(bias)
    elif p.kind != naive.NONE:
        kind = next(name for name, number in naive.BIAS_KINDS.items() if number == p.kind)
        params = [r.clone().requires_grad_() for r in (p.r1, p.r2) if r is not None]
        bias = RelativeBias(kind, *params)
        leaves += params
    if s is not None:
        leaves.append(s.clone().requires_grad_())
    o = attention(
        *leaves[:3], normalizer=("softmax", "sa", "sa_norm")[p.norm], causal=p.causal, mask=p.mask, bias=bias,
        ssmax=leaves[-1] if s is not None else None, eps=p.eps, backend="eager",
    )  # fmt: skip
    grads = torch.autograd.grad(o, leaves, do)
    twin = twin_outputs(p, do)
    names = ["o", "dq", "dk", "dv"]
    if p.kind == naive.TENSOR:
        names.append("dL/dbias")
    elif p.kind != naive.NONE:
        names += ["dL/dr1"] + (["dL/dr2"] if p.kind not in (naive.ALIBI, naive.TABLE) else [])
    expected = [twin[name] for name in names]
    if s is not None:
        names.append("ds")
        expected.append((twin["dL/dt"] * log_n).sum((0, 2)))
    got = [o, *grads]
    assert len(got) == len(expected)
    for name, actual, want in zip(names, got, expected):
        torch.testing.assert_close(actual, want, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


CLOSED_FORM = [c for c in CASES if c.ssmax and not c.mask and c.bias in ("none", "alibi", "kerple_log", "kerple_power")]


@pytest.mark.parametrize("case", CLOSED_FORM + [Case(2, "none", False, True, False, True)], ids=str)
def test_ssmax_computed_in_the_kernels(case, monkeypatch):
    """Without a mask or a bias that may mask, the kernels compute t_i = s_h·ln(n_i) from s themselves (n_i all
    keys, or with causal masking those up to i + POS0, at least 1) and reduce dL/ds per program: t as saved, o,
    every gradient and dL/ds = Σ_i ln(n_i)·dL/dt_i as the twin gives them for that t."""
    p, do = make_problem(case, seed=CASES.index(case) if case in CASES else 99)
    b, hq, lq, _ = p.q.shape
    lk = p.k.shape[2]
    rows = torch.arange(lq, device=DEVICE)
    n = (rows + p.pos0 + 1).clamp(1, lk) if p.causal else torch.full_like(rows, lk)
    s = torch.linspace(0.5, 1.5, hq, device=DEVICE)
    p = naive.Problem(**{**p.__dict__, "t": (s.view(-1, 1) * n.float().log()).expand(b, hq, lq)})
    opt = tb._Options(p.norm, p.causal, p.scale, p.eps, p.pos0)
    o = torch.empty(b, hq, lq, p.v.shape[3], device=DEVICE)
    saved = tb._forward(p.q, p.k, p.v, o, None, None, None, p.kind, p.r1, p.r2, opt, s=s)
    t_rows = saved.t_rows.view(b, hq, lq)
    dq, dk, dv, ds, bias_grads = tb._backward(
        p.q, p.k, p.v, o, do, t_rows, None, None, p.kind, p.r1, p.r2, saved, opt, p.kind != 0, ds=True
    )
    torch.testing.assert_close(t_rows, p.t, rtol=1e-6, atol=0)
    twin = twin_outputs(on_cpu(p, torch.float64), do.double().cpu())
    actual = {"o": o, "dq": dq, "dk": dk, "dv": dv, "ds": ds}
    expected = {name: twin[name] for name in ("o", "dq", "dk", "dv")}
    expected["ds"] = (twin["dL/dt"] * n.double().log().cpu()).sum((0, 2))
    if p.kind != naive.NONE:
        actual["dL/dr1"], expected["dL/dr1"] = bias_grads[0], twin["dL/dr1"]
    for name, want in expected.items():
        err, size = max_error(name, actual[name].cpu(), want)
        assert err <= 1e-4 * size + 1e-6, f"{name}: error {err:.3g} of {size:.3g}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_extrema_ties_go_to_the_first_key(causal, monkeypatch):
    """Small integers for q and k (and scale 1) make every logit exact in any summation order and give each row
    many ties, in the same tile slot and across slots and tiles: the argmax and argmin of each row are its first
    key attaining the extremum (the twin's, torch's)."""
    case = Case(2, "none", causal, True, False, False)
    p, do = make_problem(case, seed=7)
    p = naive.Problem(**{**p.__dict__, "q": (p.q * 1.5).round(), "k": (p.k * 1.5).round(), "scale": 1.0})
    run = run_kernels(p, do, monkeypatch)
    actual = kernel_outputs(run, p)
    expected = twin_outputs(on_cpu(p, torch.float64), do.double().cpu())
    assert (expected["argmax"] >= 0).any() and (expected["argmin"] >= 0).any()
    for name in ("argmax", "argmin"):
        assert torch.equal(actual[name], expected[name]), name


@triton.jit
def _schedule_probe(OUT, SECTION, HEAVY_LAST: tl.constexpr, SCHEDULED: tl.constexpr):
    """Stores the (block, head) ``_scheduled`` gives each program at the program's place in launch order."""
    block, head = kernels._scheduled(SECTION, HEAVY_LAST, SCHEDULED)
    order = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(OUT + 2 * order, block)
    tl.store(OUT + 2 * order + 1, head)


@pytest.mark.parametrize("scheduled", [True, False], ids=["scheduled", "grid-order"])
@pytest.mark.parametrize("heavy_last", [True, False], ids=["query-blocks", "key-blocks"])
@pytest.mark.parametrize("grid", [(1, 1), (4, 1), (1, 5), (3, 8), (5, 7)], ids=lambda g: "x".join(map(str, g)))
def test_causal_schedule_matches_its_twin(grid, heavy_last, scheduled):
    """Every program's (block, head) under the causal schedule, for sections of 1, 2, 3 (a shorter last one), as
    many and more heads than the grid has, as ``naive.schedule`` orders them; unscheduled, the grid's order."""
    blocks, heads = grid
    for section in (1, 2, 3, heads, 16):
        out = torch.empty(blocks * heads, 2, dtype=torch.int32, device=DEVICE)
        _schedule_probe[grid](out, section, HEAVY_LAST=heavy_last, SCHEDULED=scheduled)
        expected = naive.schedule(blocks, heads, section if scheduled else 0, heavy_last)
        assert [tuple(pair) for pair in out.tolist()] == expected, f"section {section}"


SCHEDULED_CASES = [c for c in CASES if c.causal and c.grouped]


@pytest.mark.parametrize("section", [0, 1, 3])
@pytest.mark.parametrize("case", SCHEDULED_CASES, ids=str)
def test_kernels_in_sections_of_heads(case, section, monkeypatch):
    """The kernels with the causal schedule's sections set small (``SASOFTMAX_TRITON_SECTION_HEADS``): 1, and 3,
    which leaves a shorter last section, so that every program still finds its block and head, and writes its
    partial sums (SSMax's, ALiBi/Kerple's, with sa_norm's min term scattered through dq too) to its own slot; 0,
    the grid's order. (Without the variable the interpreter's sections hold every head: the other tests.)"""
    monkeypatch.setenv(tb.SECTION_HEADS_VARIABLE, str(section))
    if case.norm == 2:
        monkeypatch.setenv("SASOFTMAX_TRITON_MIN_TERM", "scatter")
    check_against_twins(case, monkeypatch)


@pytest.mark.parametrize("per_head, section", [(1, 2**25), (2**20, 32), (3 * 2**20, 16), (50 * 2**20, 1), (2**30, 1)])
def test_sections_fit_the_l2_cache(per_head, section, monkeypatch):
    """A section takes the largest power of two of heads whose bytes fit 50 MiB of L2 (the H100's and H200's; on
    a GPU its own), at least one and at most the grid's heads; ``SASOFTMAX_TRITON_SECTION_HEADS`` overrides it
    (0: grid order), and is checked."""
    cpu = torch.device("cpu")
    monkeypatch.delenv(tb.SECTION_HEADS_VARIABLE, raising=False)
    assert tb._section_heads(per_head, 2**30, cpu) == section
    assert tb._section_heads(per_head, 12, cpu) == min(section, 12)
    for value, expected in (("0", 0), ("3", 3), ("100", 12)):
        monkeypatch.setenv(tb.SECTION_HEADS_VARIABLE, value)
        assert tb._section_heads(per_head, 12, cpu) == expected
    for bad in ("-1", "two", "1.5"):
        monkeypatch.setenv(tb.SECTION_HEADS_VARIABLE, bad)
        with pytest.raises(ValueError, match=tb.SECTION_HEADS_VARIABLE):
            tb._section_heads(per_head, 12, cpu)


@pytest.mark.parametrize("reported, section", [(40 * 2**20, 32), (None, 32), (6 * 2**20, 4)])
def test_sections_take_the_gpus_own_l2_cache(reported, section, monkeypatch):
    """On a GPU the sections fit its own L2 cache as torch reports it (an A100's 40 MiB, a small card's 6), or
    an H100's 50 MiB where torch does not report it (before 2.5)."""
    from types import SimpleNamespace

    properties = SimpleNamespace() if reported is None else SimpleNamespace(L2_cache_size=reported)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: properties)
    monkeypatch.delenv(tb.SECTION_HEADS_VARIABLE, raising=False)
    tb._l2_section.cache_clear()
    try:
        assert tb._section_heads(2**20, 2**10, torch.device("cuda", 0)) == section
    finally:
        tb._l2_section.cache_clear()
