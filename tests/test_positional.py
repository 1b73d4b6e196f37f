"""Positional encodings (DESIGN §6): formulas, gradients, and every backend against the eager reference."""

import math

import pytest
import torch

from sasoftmax import RelativeBias, attention
from sasoftmax.backends import BACKENDS, load, unavailable
from sasoftmax.backends.call import AttentionCall
from sasoftmax.positional import (
    FIRE,
    POSITIONAL,
    ALiBi,
    DAPEKerple,
    DAPEV2Kerple,
    Kerple,
    RoPE,
    alibi_slopes,
    check_positional,
    make_positional,
    read_thresholds,
)


def positions(lq, lk):
    return torch.arange(lk - lq, lk), torch.arange(lk)


def test_alibi_slopes_power_of_two_and_interleaved():
    assert alibi_slopes(8) == pytest.approx([2.0 ** (-h) for h in range(1, 9)])
    assert alibi_slopes(4) == pytest.approx([2.0 ** (-2 * h) for h in range(1, 5)])
    # 6 heads: the 4-head slopes, then every other slope of the 8-head set.
    assert alibi_slopes(6) == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])


def test_alibi_bias_is_minus_slope_times_absolute_distance():
    q_pos, k_pos = positions(3, 5)
    bias = ALiBi(4)(q_pos, k_pos)
    assert bias.shape == (1, 4, 3, 5)
    slopes = alibi_slopes(4)
    for h in range(4):
        for i in range(3):
            for j in range(5):
                assert bias[0, h, i, j].item() == pytest.approx(-slopes[h] * abs(i + 2 - j))
    assert list(ALiBi(4).parameters()) == []
    learnable = ALiBi(4, learnable=True)
    assert [p.tolist() for p in learnable.parameters()] == [pytest.approx(slopes)]


def test_kerple_power_formula_and_clamps():
    torch.manual_seed(0)
    kerple = Kerple(3, kind="power")
    assert ((kerple.r1 >= 0) & (kerple.r1 <= 1)).all() and ((kerple.r2 >= 0) & (kerple.r2 <= 2)).all()
    with torch.no_grad():
        kerple.r1.copy_(torch.tensor([0.5, 1e-4, 1.5]))
        kerple.r2.copy_(torch.tensor([0.7, 2.5, 1e-5]))
    bias = kerple(*positions(3, 5))
    r1, r2 = [0.5, 1e-2, 1.5], [0.7, 2.0, 1e-2]
    for h in range(3):
        for i in range(3):
            for j in range(5):
                expected = -r1[h] * abs(i + 2 - j) ** r2[h]
                assert bias[0, h, i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    bias.sum().backward()
    assert torch.isfinite(kerple.r2.grad).all() and kerple.r2.grad[0] != 0
    assert kerple.r1.grad[1] == 0 and kerple.r2.grad[1] == 0  # clamped: no gradient outside [eps, 2]
    with pytest.raises(ValueError, match="kind must be one of"):
        Kerple(2, kind="exp")


RELATIVE_MODULES = {
    "alibi": lambda: ALiBi(4),
    "alibi_learnable": lambda: ALiBi(4, learnable=True),
    "kerple_log": lambda: Kerple(4),
    "kerple_power": lambda: Kerple(4, kind="power"),
    "fire": lambda: FIRE(4, train_len=16, width=8),
}


@pytest.mark.parametrize("name", sorted(RELATIVE_MODULES))
def test_relative_bias_spec_equals_the_module(name):
    """A module's RelativeBias gives the bias of its forward, and the same gradients to its parameters (through the
    clamps: one head's r1 below the floor gets none), at Lq != Lk with queries on both sides of some keys."""
    torch.manual_seed(0)
    module = RELATIVE_MODULES[name]()
    if isinstance(module, Kerple):
        with torch.no_grad():
            module.r1[1] = 1e-4
    spec = module.relative_bias(7, 11)
    assert isinstance(spec, RelativeBias) and spec.heads == 4
    q_pos, k_pos = torch.arange(4, 11), torch.arange(11)  # 7 queries aligned lower-right to 11 keys
    want = module(q_pos, k_pos)
    got = spec(q_pos, k_pos)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    weights = torch.randn(want.shape)
    params = list(module.parameters())
    if params:
        grads_want = torch.autograd.grad((want * weights).sum(), params)
        grads_got = torch.autograd.grad((module.relative_bias(7, 11)(q_pos, k_pos) * weights).sum(), params)
        for a, b in zip(grads_got, grads_want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        if isinstance(module, Kerple):
            assert grads_got[0][1] == 0


def test_attention_takes_modules_with_a_relative_bias():
    """bias=module passes the module's RelativeBias (what fused kernels evaluate), with gradients reaching the
    module's parameters; a relative_bias(q_len, k_len) that returns something else is a TypeError."""
    torch.manual_seed(0)
    kerple = Kerple(2)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    out = attention(q, k, v, bias=kerple, causal=True, backend="cpu")
    want = attention(q, k, v, bias=kerple.relative_bias(5, 5), causal=True, backend="eager")
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert kerple.r1.grad is not None and kerple.r1.grad.abs().sum() > 0

    class Bad(torch.nn.Module):
        def relative_bias(self, q_len, k_len):
            return torch.zeros(2)

    with pytest.raises(TypeError, match="relative_bias"):
        attention(q, k, v, bias=Bad())


def test_kerple_formula_clamp_and_gradients():
    torch.manual_seed(0)
    kerple = Kerple(3)
    assert ((kerple.r1 >= 0) & (kerple.r1 <= 2)).all() and ((kerple.r2 >= 0) & (kerple.r2 <= 1)).all()
    with torch.no_grad():
        kerple.r1.copy_(torch.tensor([0.5, 1e-4, 1.5]))
        kerple.r2.copy_(torch.tensor([0.2, 0.7, 1e-5]))
    q_pos, k_pos = positions(4, 4)
    bias = kerple(q_pos, k_pos)
    r1, r2 = [0.5, 1e-2, 1.5], [0.2, 0.7, 1e-2]
    for h in range(3):
        for i in range(4):
            for j in range(4):
                expected = -r1[h] * math.log(1 + r2[h] * abs(i - j))
                assert bias[0, h, i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    bias.sum().backward()
    assert kerple.r1.grad[0] != 0 and kerple.r2.grad[0] != 0
    assert kerple.r1.grad[1] == 0  # clamped at 1e-2: no gradient below the floor


def test_fire_formula_and_gradients():
    torch.manual_seed(0)
    fire = FIRE(2, train_len=4, width=8)
    q_pos, k_pos = positions(6, 6)
    bias = fire(q_pos, k_pos)
    assert bias.shape == (1, 2, 6, 6)
    c, threshold = 0.1, 4.0
    for i in range(6):
        for j in range(6):
            x = math.log(c * abs(i - j) + 1) / (math.log(c * max(threshold, i) + 1) + 1e-6)
            expected = fire.mlp(torch.tensor([[x]]))[0]
            assert torch.allclose(bias[0, :, i, j], expected, atol=1e-6)
    bias.square().sum().backward()
    for name, p in fire.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert fire.c.grad != 0 and fire.threshold_multiplier.grad != 0


@pytest.mark.parametrize("lq, lk", [(6, 6), (3, 9), (9, 5)])
def test_fire_table_below_the_threshold_equals_the_per_pair_form(lq, lk):
    """Queries below the threshold take the table over distances: same values and gradients (c, the
    threshold multiplier, the MLP) as the MLP on every pair. Positions in any order, Lq != Lk."""
    torch.manual_seed(1)
    fire = FIRE(3, train_len=16, width=8)
    q_pos = torch.randperm(lq) + 2
    k_pos = torch.randperm(lk)
    threshold = (fire.threshold_multiplier * fire.init_threshold).abs()
    weights = torch.randn(1, 3, lq, lk)
    results = []
    distance = (q_pos[:, None] - k_pos[None, :]).abs()
    for evaluate in (lambda: fire(q_pos, k_pos), lambda: fire._per_pair(q_pos, distance, threshold)):
        fire.zero_grad()
        bias = evaluate()
        (bias * weights).sum().backward(retain_graph=True)
        results.append((bias.detach(), {n: p.grad.clone() for n, p in fire.named_parameters()}))
    (table, table_grads), (pairs, pair_grads) = results
    torch.testing.assert_close(table, pairs, rtol=1e-6, atol=1e-6)
    for name in pair_grads:
        torch.testing.assert_close(table_grads[name], pair_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fire_rows_beyond_the_threshold_take_the_per_pair_form(monkeypatch):
    fire = FIRE(2, train_len=4, width=8)
    monkeypatch.setattr(fire, "_table", lambda *args: pytest.fail("the table serves rows < threshold only"))
    q_pos, k_pos = positions(6, 6)  # rows 5 > 4
    assert fire(q_pos, k_pos).shape == (1, 2, 6, 6)
    assert fire(q_pos[:5], k_pos).shape == (1, 2, 5, 6)  # a row at the threshold: max(L, i) halves L's gradient
    assert fire.relative_bias(6, 6) is None and fire.relative_bias(2, 5) is None  # the last query sits at 5, 4
    monkeypatch.undo()
    assert fire.relative_bias(2, 4) is not None


def test_attention_passes_fire_as_a_table_up_to_its_threshold_and_as_a_function_beyond(monkeypatch):
    """bias=FIRE: calls whose queries all sit below the threshold get its RelativeBias table (no call of
    the module as a bias function), longer ones the module itself; both equal the module's own bias."""
    torch.manual_seed(0)
    fire = FIRE(2, train_len=8, width=8)
    for lq, lk, table in ((5, 8, True), (8, 8, True), (4, 9, False)):
        q, k, v = torch.randn(1, 2, lq, 8), torch.randn(1, 2, lk, 8), torch.randn(1, 2, lk, 8)
        want = attention(q, k, v, bias=lambda qp, kp: fire(qp, kp), causal=True, backend="eager")
        with monkeypatch.context() as patch:
            if table:
                patch.setattr(FIRE, "forward", lambda *args: pytest.fail("a table call evaluated FIRE per pair"))
            got = attention(q, k, v, bias=fire, causal=True, backend="eager")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("lq, lk", [(12, 12), (5, 12), (12, 15), (16, 9)])
def test_attention_splits_a_causal_fire_call_at_its_threshold(backend, lq, lk, monkeypatch):
    """FIRE trained at its length once its learnt threshold moved below it (L = 9.6 here): the causal call's rows
    below L take the table, the others the bias function, which is evaluated for those rows only; outputs and
    gradients (q, k, v and every FIRE parameter) equal attention with the module's bias materialised."""
    torch.manual_seed(0)
    fire = FIRE(2, train_len=12, width=8).double()
    with torch.no_grad():
        fire.threshold_multiplier.fill_(0.8)
    q = torch.randn(1, 2, lq, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, lk, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    leaves = [q, k, v, *fire.parameters()]
    q_pos, k_pos = positions(lq, lk)
    want = attention(q, k, v, bias=fire(q_pos, k_pos), causal=True, normalizer="sa_norm", backend="eager")
    grads_want = torch.autograd.grad(want.square().sum(), leaves)
    rows = fire.relative_bias_rows(lq, lk)
    assert rows == max(0, min(lq, 10 - (lk - lq)))
    evaluated = []
    per_pair = FIRE._per_pair
    monkeypatch.setattr(FIRE, "_per_pair", lambda self, qp, *a: evaluated.append(qp) or per_pair(self, qp, *a))
    got = attention(q, k, v, bias=fire, causal=True, normalizer="sa_norm", backend=backend)
    grads_got = torch.autograd.grad(got.square().sum(), leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b)
    assert all(bool((qp >= 9.6).all()) for qp in evaluated), "rows below L took the per-pair form"
    assert bool(evaluated) == (rows < lq)  # (16, 9): every query lies below L, the whole call takes the table


def test_fire_reads_its_threshold_once_until_it_changes(monkeypatch):
    """threshold_value() reads L to the host (a device sync on CUDA) only after the parameter changed in place (an
    optimiser step) or was replaced, not at every call."""
    fire = FIRE(2, train_len=8, width=4)
    reads = []
    threshold = FIRE.threshold
    monkeypatch.setattr(FIRE, "threshold", lambda self: reads.append(1) or threshold(self))
    assert fire.threshold_value() == 8.0 and fire.relative_bias_rows(8, 8) == 8
    assert len(reads) == 1
    with torch.no_grad():  # as an optimiser's step changes it
        fire.threshold_multiplier.mul_(0.5)
    assert fire.threshold_value() == 4.0 and len(reads) == 2
    fire.load_state_dict({**fire.state_dict(), "threshold_multiplier": torch.tensor(0.75)})
    assert fire.threshold_value() == 6.0 and fire.relative_bias_rows(8, 8) == 6


def test_fire_thresholds_read_together(monkeypatch):
    """read_thresholds() reads the thresholds of several FIRE modules in one transfer (one device wait on a GPU,
    not one per module), only those that changed; threshold_value() then reads nothing."""
    fires = [FIRE(2, train_len=8, width=4) for _ in range(3)]
    transfers, reads = [], []
    tolist, threshold = torch.Tensor.tolist, FIRE.threshold
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: transfers.append(self.numel()) or tolist(self))
    read_thresholds(fires)
    assert transfers == [3]
    monkeypatch.setattr(FIRE, "threshold", lambda self: reads.append(1) or threshold(self))
    assert [fire.threshold_value() for fire in fires] == [8.0, 8.0, 8.0] and reads == []
    with torch.no_grad():  # as an optimiser's step changes one of them
        fires[1].threshold_multiplier.mul_(0.5)
    read_thresholds(fires)
    assert transfers == [3, 1] and fires[1].threshold_value() == 4.0 and fires[1].relative_bias_rows(8, 8) == 4
    read_thresholds(fires)  # nothing changed: nothing read
    assert transfers == [3, 1] and len(reads) == 1


def test_rope_depends_only_on_relative_position_and_aligns_lower_right():
    torch.manual_seed(0)
    rope = RoPE(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i, j):
        qi = rope.rotate(q, torch.tensor([i]))
        kj = rope.rotate(k, torch.tensor([j]))
        return (qi * kj).sum().item()

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)
    # Norms are preserved (a rotation) and the first pair of dims rotates by angle = position.
    x = torch.randn(1, 1, 3, 8)
    assert torch.allclose(rope.rotate(x, torch.arange(3)).norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    e = torch.zeros(1, 1, 1, 8)
    e[..., 0] = 1
    rotated = rope.rotate(e, torch.tensor([2]))
    assert rotated[0, 0, 0, 0].item() == pytest.approx(math.cos(2)) and rotated[0, 0, 0, 4].item() == pytest.approx(
        math.sin(2)
    )
    # Two queries among five keys sit at positions 3 and 4.
    qs, ks = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 5, 8)
    rq, rk = rope(qs, ks)
    assert torch.equal(rq, rope.rotate(qs, torch.tensor([3, 4])))
    assert torch.equal(rk, rope.rotate(ks, torch.arange(5)))


def test_dape_kerple_is_kerple_plus_mlp_over_scores_and_bias():
    torch.manual_seed(0)
    dape = DAPEKerple(2, width=8)
    scores = torch.randn(3, 2, 4, 4)
    kerple = dape.kerple(*positions(4, 4))
    out = dape(scores)
    for b in range(3):
        for i in range(4):
            for j in range(4):
                features = torch.cat((scores[b, :, i, j], kerple[0, :, i, j]))
                assert torch.allclose(out[b, :, i, j], kerple[0, :, i, j] + dape.mlp(features), atol=1e-6)


def test_dapev2_sees_no_future_scores_but_its_neighbours():
    torch.manual_seed(0)
    dape = DAPEV2Kerple(2, width=8)
    scores = torch.randn(1, 2, 5, 5)
    out = dape(scores)
    future = scores.clone()
    future[..., torch.ones(5, 5, dtype=torch.bool).triu(1)] = 100.0
    past = torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.equal(dape(future)[..., past], out[..., past])
    # The 1×3 kernels (two layers) reach two keys back: entry (4, 4) depends on (4, 2), not on (4, 1).
    near, far = scores.clone(), scores.clone()
    near[0, 0, 4, 2] += 1.0
    far[0, 0, 4, 1] += 1.0
    assert not torch.allclose(dape(near)[0, :, 4, 4], out[0, :, 4, 4])
    assert torch.equal(dape(far)[0, :, 4, 4], out[0, :, 4, 4])
    # Lower-right alignment: 2 queries among 5 keys see keys up to 3 and 4.
    two = dape(scores[:, :, 3:])
    shifted = scores[:, :, 3:].clone()
    shifted[0, :, 0, 4] = 100.0  # the future of the first query
    assert torch.equal(dape(shifted)[0, :, 0, :4], two[0, :, 0, :4])


def test_make_positional_names():
    assert make_positional("nope", 2, 8, 16) is None
    for name in POSITIONAL[1:]:
        assert make_positional(name, 2, 8, 16) is not None
    with pytest.raises(ValueError, match="pos must be one of"):
        check_positional("learned")
    with pytest.raises(TypeError, match="pos must be a str"):
        check_positional(3)


def serving_backends(call: AttentionCall) -> list[str]:
    return [b for b in BACKENDS if b != "eager" and unavailable(b) is None and load(b).unsupported(call) is None]


@pytest.mark.parametrize("name", ["alibi", "kerple", "fire"])
@pytest.mark.parametrize("normalizer", ["softmax", "sa_norm"])
def test_bias_functions_on_every_backend_match_eager(name, normalizer):
    torch.manual_seed(0)
    heads, lq, lk, d = 2, 5, 7, 8
    module = make_positional(name, heads, d, 6, width=8)
    q = torch.randn(2, heads, lq, d, requires_grad=True)
    k = torch.randn(2, heads, lk, d, requires_grad=True)
    v = torch.randn(2, heads, lk, d, requires_grad=True)
    kwargs = dict(normalizer=normalizer, causal=True, ssmax=0.5)
    # Reference: the eager backend with the materialised bias tensor.
    ref = attention(q, k, v, bias=module(*positions(lq, lk)), backend="eager", **kwargs)
    ref.square().sum().backward()
    ref_grads = [t.grad.clone() for t in (q, k, v)] + [p.grad.clone() for p in module.parameters()]
    call = AttentionCall(q, k, v, normalizer, True, None, module, 1 / math.sqrt(d), torch.full((heads,), 0.5), 1e-6, 0)
    for backend in ["eager"] + serving_backends(call):
        for t in list((q, k, v)) + list(module.parameters()):
            t.grad = None
        out = attention(q, k, v, bias=module, backend=backend, **kwargs)
        assert torch.allclose(out, ref, atol=1e-5), backend
        out.square().sum().backward()
        grads = [t.grad for t in (q, k, v)] + [p.grad for p in module.parameters()]
        for got, want in zip(grads, ref_grads):
            assert got is not None and torch.allclose(got, want, atol=1e-4), backend
