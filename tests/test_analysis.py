"""The analyses of sasoftmax.analysis: gradient flow, attention fade and needle retrieval."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sasoftmax.analysis.fade import attention_fade, row_stats
from sasoftmax.analysis.gradient_flow import GradientFlowHook, attention_modules, measure, summarize
from sasoftmax.analysis.retrieval import NeedleTask, needle_accuracy, run_needle, train_needle
from sasoftmax.models import GPT, GPTConfig


def tiny_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    config = {"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_embd": 16, "n_head": 2, "pos": "rope", **kw}
    return GPT(GPTConfig(**config))


def batch(b: int = 2, t: int = 12, vocab: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab, (b, t + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


# ------------------------------------------------------------------------------------------ gradient flow


@pytest.mark.parametrize("normalizer,ssmax", [("softmax", None), ("sa_norm", None), ("softmax", 0.43)])
def test_gradient_flow_matches_autograd_on_another_backend(normalizer, ssmax):
    model = tiny_gpt(normalizer=normalizer, ssmax=ssmax, backend="cpu")
    x, y = batch()
    result = measure(model, x, y, threshold=1e-6)
    assert len(result["layers"]) == 2
    # q/k weight gradients of the mean loss, computed independently on the model's own backend.
    model.eval()
    _, loss = model(x, y)
    loss.backward()
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for layer, module in zip(result["layers"], attention_modules(model)):
        assert layer["q_grad_norm"] == pytest.approx(float(module.q_proj.weight.grad.norm()), rel=1e-4)
        assert layer["k_grad_norm"] == pytest.approx(float(module.k_proj.weight.grad.norm()), rel=1e-4)
        assert 0 < layer["logit_grad_rms"] < math.inf
        assert 0 <= layer["vanish_frac"] <= 1


def test_gradient_flow_logit_gradient_is_per_token_and_thresholded():
    model = tiny_gpt()
    x, y = batch(b=2)
    one = measure(model, x, y)
    # Doubling the batch with the same rows leaves per-token logit gradients (and their RMS) unchanged.
    two = measure(model, torch.cat([x, x]), torch.cat([y, y]))
    for a, b in zip(one["layers"], two["layers"]):
        assert b["logit_grad_rms"] == pytest.approx(a["logit_grad_rms"], rel=1e-4)
        assert b["q_grad_norm"] == pytest.approx(a["q_grad_norm"], rel=1e-4)
    huge = measure(model, x, y, threshold=1e9)
    tiny = measure(model, x, y, threshold=1e-30)
    mid = measure(model, x, y, threshold=one["layers"][0]["logit_grad_rms"])
    assert all(layer["vanish_frac"] == 1.0 for layer in huge["layers"])
    assert tiny["layers"][0]["vanish_frac"] <= mid["layers"][0]["vanish_frac"] <= 1.0
    assert 0 < mid["layers"][0]["vanish_frac"] < 1


def test_gradient_flow_hook_leaves_model_and_rng_untouched():
    model = tiny_gpt(dropout=0.1)
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rng = torch.get_rng_state()
    x, y = batch()
    result = GradientFlowHook(1e-5)(0, model, x, y)
    assert result["threshold"] == 1e-5
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    assert all(m.backend == "auto" for m in attention_modules(model))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_gradient_flow_hook_max_rows_measures_the_first_rows():
    model = tiny_gpt()
    x, y = batch(b=4)
    assert GradientFlowHook(max_rows=2)(0, model, x, y) == measure(model, x[:2], y[:2])
    with pytest.raises(ValueError, match="max_rows"):
        GradientFlowHook(max_rows=0)


@pytest.mark.parametrize("threshold", [0, -1.0, float("inf"), float("nan"), "1e-6", True])
def test_gradient_flow_hook_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        GradientFlowHook(threshold)


def test_gradient_flow_needs_attention_layers():
    with pytest.raises(ValueError, match="MultiheadAttention"):
        measure(nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))


def test_summarize_turns_records_into_series():
    def rec(step, values):
        return {"step": step, "layers": [{"logit_grad_rms": v, "vanish_frac": v / 10, "q_grad_norm": 2 * v,
                                          "k_grad_norm": 3 * v} for v in values], "threshold": 1e-6}

    s = summarize([rec(5, [3.0, 4.0]), rec(0, [1.0, 2.0])])  # out of order on purpose
    assert s["steps"] == [0, 5]
    assert s["logit_grad_rms"] == [[1.0, 2.0], [3.0, 4.0]]
    assert s["mean_logit_grad_rms"] == pytest.approx(2.5)
    assert s["mean_k_grad_norm"] == pytest.approx(7.5)
    assert s["threshold"] == 1e-6
    assert summarize([])["mean_vanish_frac"] is None


# ------------------------------------------------------------------------------------------ attention fade


def test_row_stats_by_hand():
    w = torch.tensor([[0.5, 0.25, 0.25, 9.0], [0.0, 0.0, 0.0, 0.0], [-0.2, 0.6, 0.2, 0.0]])
    allowed = torch.tensor([[True, True, True, False], [False, False, False, False], [True, True, True, True]])
    top, entropy = row_stats(w, allowed)
    assert top.tolist() == pytest.approx([0.5, 0.0, 0.6])
    expected0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    p = [0.2, 0.6, 0.2]  # |w| renormalised; the zero entry contributes nothing
    expected2 = -sum(v * math.log(v) for v in p)
    assert entropy.tolist() == pytest.approx([expected0, 0.0, expected2], rel=1e-6)
    assert torch.isfinite(entropy).all()


@pytest.mark.parametrize("ssmax", [None, 0.43])
def test_fade_of_uniform_attention_is_one_over_n(ssmax):
    # Zero queries give zero logits: softmax (with or without SSMax) attends uniformly.
    model = tiny_gpt(normalizer="softmax", ssmax=ssmax, pos="nope")
    for module in attention_modules(model):
        nn.init.zeros_(module.q_proj.weight)
    tokens = torch.randint(0, 64, (500,), generator=torch.Generator().manual_seed(0))
    lengths = [4, 16, 64]
    fade = attention_fade(model, tokens, lengths, samples=3)
    assert fade["lengths"] == lengths
    assert fade["max_weight"] == pytest.approx([1 / n for n in lengths], rel=1e-5)
    assert fade["entropy"] == pytest.approx([math.log(n) for n in lengths], rel=1e-5)
    assert fade["uniform_entropy"] == pytest.approx([math.log(n) for n in lengths])
    assert len(fade["layers"]["max_weight"][0]) == 2


def test_fade_of_peaked_model_and_sa_norm_zero_rows():
    model = tiny_gpt(normalizer="sa_norm", pos="nope")
    for module in attention_modules(model):
        nn.init.zeros_(module.q_proj.weight)  # all logits 0: sa_norm weights are all 0, no NaN
    tokens = torch.arange(200) % 64
    fade = attention_fade(model, tokens, [8, 32])
    assert fade["max_weight"] == [0.0, 0.0] and fade["entropy"] == [0.0, 0.0]
    # A model with large q weights attends more sharply than uniform.
    model = tiny_gpt(normalizer="softmax", pos="nope")
    for module in attention_modules(model):
        module.q_proj.weight.data.mul_(200.0)
    fade = attention_fade(model, tokens, [32])
    assert fade["max_weight"][0] > 2 / 32
    assert fade["entropy"][0] < math.log(32)


def test_fade_restores_backend_and_mode():
    model = tiny_gpt(backend="cpu")
    model.train()
    attention_fade(model, torch.arange(100) % 64, [8])
    assert model.training and all(m.backend == "cpu" for m in attention_modules(model))


@pytest.mark.parametrize("lengths,tokens,samples,match", [
    ([], 100, 2, "lengths"), ([0, 4], 100, 2, "lengths"), ([200], 100, 2, "need at least"), ([8], 100, 0, "samples"),
])
def test_fade_rejects_bad_input(lengths, tokens, samples, match):
    with pytest.raises(ValueError, match=match):
        attention_fade(tiny_gpt(), torch.arange(tokens) % 64, lengths, samples=samples)


# ------------------------------------------------------------------------------------------ needle retrieval


def test_needle_batches():
    task = NeedleTask()
    idx, target = task.batch(64, 40, torch.Generator().manual_seed(3))
    assert idx.shape == (64, 40) and target.shape == (64,)
    assert int(idx.max()) < task.vocab_size <= 256
    query_key = idx[:, -1] - task.query0
    assert ((0 <= query_key) & (query_key < task.num_keys)).all()
    items = (idx[:, :-1] >= task.item0) & (idx[:, :-1] < task.query0)
    keys = torch.where(items, (idx[:, :-1] - task.item0) // task.num_values, -1)
    values = (idx[:, :-1] - task.item0) % task.num_values
    needle = keys == query_key[:, None]
    assert (needle.sum(1) == 1).all()  # exactly one item with the queried key
    assert torch.equal(values[needle], target)
    assert items.sum() > needle.sum()  # distractors are there
    again, _ = task.batch(64, 40, torch.Generator().manual_seed(3))
    assert torch.equal(idx, again)
    plain, _ = NeedleTask(distractor_rate=0.0).batch(8, 40, torch.Generator())
    assert ((plain[:, :-1] >= task.item0).sum(1) == 1).all()  # no distractors: the needle is the only item


@pytest.mark.parametrize("kwargs,match", [
    ({"num_keys": 1}, "num_keys"), ({"distractor_rate": 1.5}, "distractor_rate"), ({"num_values": 200}, "256"),
])
def test_needle_task_rejects_bad_layout(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeedleTask(**kwargs)


def test_needle_batch_rejects_bad_sizes():
    with pytest.raises(ValueError, match="length"):
        NeedleTask().batch(2, 1, torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        NeedleTask().batch(0, 8, torch.Generator())


class Oracle(nn.Module):
    """Reads the answer straight off the input: accuracy must be 1."""

    def __init__(self, task: NeedleTask) -> None:
        super().__init__()
        self.task = task

    def forward(self, idx):
        t = self.task
        key = idx[:, -1] - t.query0
        body = idx[:, :-1]
        is_needle = (body >= t.item0) & (body < t.query0) & ((body - t.item0) // t.num_values == key[:, None])
        value = ((body - t.item0) % t.num_values)[is_needle]
        logits = torch.zeros(idx.shape[0], idx.shape[1], t.vocab_size)
        logits[torch.arange(idx.shape[0]), -1, t.item0 + value] = 1.0
        return logits, None


def test_needle_accuracy_of_oracle_and_constant_models():
    task = NeedleTask()
    assert needle_accuracy(Oracle(task), task, [8, 64], samples=100) == {"8": 1.0, "64": 1.0}

    class Constant(nn.Module):
        def forward(self, idx):
            return torch.zeros(idx.shape[0], idx.shape[1], task.vocab_size), None

    acc = needle_accuracy(Constant(), task, [16], samples=2000)["16"]
    assert abs(acc - 1 / task.num_values) < 0.03  # argmax of all-equal scores is value 0


def test_needle_training_learns_the_task():
    task = NeedleTask()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=task.vocab_size, block_size=8, n_layer=1, n_embd=32, n_head=2, pos="nope",
                          normalizer="softmax"))
    result = run_needle(model, task, train_length=8, eval_lengths=[8, 16], steps=100, batch_size=32, samples=128,
                        lr=1e-2)
    assert result["final_loss"] < 0.5 * result["uniform_loss"]
    assert result["accuracy"]["8"] > 0.6 > result["chance"]
    with pytest.raises(ValueError, match="steps"):
        train_needle(model, task, length=8, steps=0)
