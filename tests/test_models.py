"""The GPT decoder: every normalizer × positional encoding, causality, backends, gradients, config checks."""

import pytest
import torch

from sasoftmax.backends import eager
from sasoftmax.models import GPT, GPTConfig, set_backend
from sasoftmax.nn import MultiheadAttention
from sasoftmax.normalizers import NORMALIZERS
from sasoftmax.positional import POSITIONAL


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{"n_layer": 2, "n_embd": 16, "n_head": 2, "block_size": 8, "pos_width": 8, **kw}))


@pytest.mark.parametrize("pos", POSITIONAL)
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_every_normalizer_and_encoding_trains_its_parameters(normalizer, pos):
    model = tiny(normalizer=normalizer, pos=pos, ssmax=0.43)
    idx = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    logits, loss = model(idx, idx.roll(-1, 1))
    assert logits.shape == (2, 8, 256) and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    logits, loss = model(idx)
    assert loss is None


@pytest.mark.parametrize("pos", POSITIONAL)
def test_causal_no_information_from_the_future(pos):
    model = tiny(pos=pos, normalizer="sa_norm", ssmax=0.43).eval()
    idx = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 256
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-4)


@pytest.mark.parametrize("pos", ["nope", "alibi", "kerple", "fire", "dapev2_kerple"])
def test_backends_agree_with_eager(pos):
    model = tiny(pos=pos, normalizer="sa_norm", ssmax=0.43).eval()
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))  # 3x the training length
    with torch.no_grad():
        set_backend(model, "eager")
        ref, _ = model(idx)
        set_backend(model, "auto")
        got, _ = model(idx)
    assert torch.allclose(got, ref, atol=1e-4)


def test_set_backend_is_read_at_every_forward_and_record_sees_the_maps():
    model = tiny(pos="kerple", normalizer="sa")
    attns = [m for m in model.modules() if isinstance(m, MultiheadAttention)]
    assert len(attns) == 2 and all(m is b.attn for m, b in zip(attns, model.blocks))
    assert all(isinstance(b.attn.q_proj, torch.nn.Linear) and isinstance(b.attn.k_proj, torch.nn.Linear)
               for b in model.blocks)
    set_backend(model, "eager")
    assert all(m.backend == "eager" for m in attns)
    idx = torch.randint(0, 256, (1, 8))
    with eager.record() as calls:
        _, loss = model(idx, idx)
        loss.backward()
    assert len(calls) == 2
    assert calls[0]["logits"].shape == (1, 2, 8, 8) and calls[0]["logits"].grad is not None
    with pytest.raises(ValueError, match="no sasoftmax attention"):
        set_backend(torch.nn.Linear(2, 2), "eager")


def test_grouped_query_attention_and_tied_embeddings():
    model = tiny(n_head=4, n_kv_head=2, pos="dape_kerple")
    assert model.blocks[0].attn.k_proj.out_features == 8
    assert model.lm_head.weight is model.wte.weight
    idx = torch.randint(0, 256, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)


def test_dropout_only_in_training():
    model = tiny(dropout=0.5)
    idx = torch.randint(0, 256, (1, 8))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(idx)[0], model(idx)[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_embd": 10, "n_head": 4}, "multiple of n_head"),
        ({"n_head": 4, "n_kv_head": 3}, "multiple of n_kv_head"),
        ({"n_layer": 0}, "n_layer must be a positive int"),
        ({"normalizer": "sparsemax"}, "normalizer must be one of"),
        ({"pos": "learned"}, "pos must be one of"),
        ({"n_embd": 6, "n_head": 2, "pos": "rope"}, "even head size"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_forward_rejects_bad_input():
    with pytest.raises(ValueError, match="idx must be an int64 tensor"):
        tiny()(torch.zeros(1, 4))


def test_fire_thresholds_read_once_per_forward(monkeypatch):
    """A GPT with FIRE reads every layer's learnt threshold to the host in one transfer per forward after they
    change (an optimiser step), not once per layer: on a GPU each read waits for the device."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_embd=32, n_head=2, pos="fire", block_size=16, backend="eager"))
    idx = torch.randint(0, 256, (2, 16))
    model(idx)
    with torch.no_grad():  # as an optimiser's step moves every layer's threshold
        for block in model.blocks:
            block.attn.pos.threshold_multiplier.mul_(1.01)
    reads = []
    tolist, item = torch.Tensor.tolist, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(("tolist", self.numel())) or tolist(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(("item", 1)) or item(self))
    model(idx)
    assert reads == [("tolist", 3)]
    assert [block.attn.pos.threshold_value() for block in model.blocks] == [pytest.approx(16.16)] * 3
