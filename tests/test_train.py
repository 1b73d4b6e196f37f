"""The trainer on the smoke preset: configs, every normalizer × encoding, SSMax, files, resume, hooks, eval."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from sasoftmax.data import VOCAB_SIZE, _is_stdlib_source, decode, encode, load_corpus, sample_batch
from sasoftmax.evaluate import evaluate, parse_lengths
from sasoftmax.normalizers import NORMALIZERS
from sasoftmax.positional import POSITIONAL
from sasoftmax.presets import PRESETS
from sasoftmax.train import RunError, learning_rate, load_model, make_config, read_checkpoint, train


def smoke(corpus_file, **kw) -> dict:
    return make_config("smoke", data=corpus_file, **kw)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(out) -> dict:
    return read_checkpoint(out)["model"]


def test_presets_and_make_config():
    assert set(PRESETS) == {"smoke", "quick", "gpu", "paper"}
    config = make_config("quick", normalizer="softmax", ssmax=0.43, pos="kerple", steps=5)
    assert config["preset"] == "quick" and config["ssmax"] == 0.43 and config["steps"] == 5
    assert config["data"] is None and config["seq_len"] == 128
    assert json.loads(json.dumps(config)) == config
    paper = make_config("paper")
    assert (paper["n_layer"], paper["n_embd"], paper["n_head"], paper["seq_len"]) == (12, 768, 12, 512)
    gpu = make_config("gpu")
    assert (gpu["n_layer"], gpu["n_embd"], gpu["seq_len"], gpu["steps"]) == (6, 384, 512, 1000)
    assert gpu["eval_lengths"] == [512, 1024, 2048, 4096]


@pytest.mark.parametrize(
    ("preset", "kwargs", "error", "match"),
    [
        ("tiny", {}, ValueError, "preset must be one of"),
        ("smoke", {"normalizer": "relu"}, ValueError, "normalizer must be one of"),
        ("smoke", {"pos": "abs"}, ValueError, "pos must be one of"),
        ("smoke", {"colour": 1}, ValueError, "unknown config keys"),
        ("smoke", {"steps": 0}, ValueError, "steps must be an int >= 1"),
        ("smoke", {"steps": 2.5}, TypeError, "steps must be an int"),
        ("smoke", {"ssmax": -1.0}, ValueError, "ssmax"),
        ("smoke", {"lr": 0.0}, ValueError, "lr must be > 0"),
        ("smoke", {"n_embd": 30, "n_head": 4}, ValueError, "multiple of n_head"),
        ("smoke", {"eval_lengths": []}, ValueError, "eval_lengths"),
        ("smoke", {"backend": "gpu"}, ValueError, "backend must be one of"),
    ],
)
def test_make_config_rejects_bad_input(preset, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_config(preset, **kwargs)


def test_learning_rate_schedule():
    config = make_config("smoke", steps=10, warmup=2, lr=1.0, min_lr=0.1)
    lrs = [learning_rate(s, config) for s in range(12)]
    assert lrs[:2] == [0.5, 1.0]
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[10] == lrs[11] == 0.1 and lrs[9] > 0.1
    longer = make_config("smoke", steps=5, decay_steps=10, warmup=2, lr=1.0, min_lr=0.1)
    assert [learning_rate(s, longer) for s in range(5)] == lrs[:5]


def test_tokenizer_and_corpora(corpus_file, tmp_path):
    assert VOCAB_SIZE == 256
    text = "def f():\n    return 'é'\n"
    tokens = encode(text)
    assert tokens.dtype == torch.int64 and decode(tokens) == text and int(tokens.max()) < 256
    corpus = load_corpus(corpus_file)
    size = Path(corpus_file).stat().st_size
    assert corpus.train.numel() + corpus.val.numel() == size and corpus.val.numel() == size - int(size * 0.9)
    assert load_corpus(corpus_file).fingerprint == corpus.fingerprint
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    for i in range(30):
        (folder / ("sub" if i % 2 else "") / f"f{i}.txt").write_text(f"file {i}\n" * 20)
    (folder / ".hidden").write_text("secret")
    split = load_corpus(str(folder))
    assert b"secret" not in bytes(split.train.tolist()) + bytes(split.val.tolist())
    assert split.val.numel() > 0 and split.train.numel() > split.val.numel()
    assert load_corpus(str(folder)).fingerprint == split.fingerprint
    (folder / "f0.txt").write_text("changed")
    assert load_corpus(str(folder)).fingerprint != split.fingerprint
    x, y = sample_batch(corpus.train, 3, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="datasets"):
        load_corpus("hf:wikitext:wikitext-2-raw-v1")


def test_stdlib_corpus_excludes_tests_and_is_deterministic():
    corpus = load_corpus(None)
    assert corpus.train.numel() > 1_000_000 and corpus.val.numel() > 10_000
    assert corpus is load_corpus(None)  # cached
    assert "standard library" in corpus.description
    keep = ["os.py", "json/decoder.py", "unittest/case.py", "test_like/helpers.py"]
    drop = ["test/test_os.py", "unittest/test/test_case.py", "idlelib/idle_test/htest.py", "lib2to3/tests/pytree.py",
            "ctypes/test_x.py", "foo_test.py", "site-packages/pkg/mod.py", "__pycache__/os.py"]
    assert all(_is_stdlib_source(Path(p)) for p in keep)
    assert not any(_is_stdlib_source(Path(p)) for p in drop)


@pytest.mark.parametrize("pos", POSITIONAL)
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_every_normalizer_and_encoding_trains(normalizer, pos, corpus_file, tmp_path):
    summary = train(smoke(corpus_file, normalizer=normalizer, pos=pos, steps=2), tmp_path / "run", progress=False)
    assert summary["step"] == 2 and math.isfinite(summary["loss"])
    assert [r["step"] for r in lines(tmp_path / "run" / "metrics.jsonl")] == [0, 1]


def test_ssmax_run_files_and_learned_scale(corpus_file, tmp_path):
    out = tmp_path / "run"
    config = smoke(corpus_file, ssmax=0.43, pos="kerple", steps=8)
    summary = train(config, out, progress=False)
    saved = json.loads((out / "config.json").read_text())
    assert saved.pop("data_fingerprint") == load_corpus(corpus_file).fingerprint and saved == config
    records = lines(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(8))
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(r) and math.isfinite(r["loss"])
    assert records[-1]["loss"] < records[0]["loss"]  # it learns
    assert summary["loss"] == records[-1]["loss"] and summary["step"] == 8
    state = read_checkpoint(out)
    assert {"model", "optimizer", "step", "rng", "config"} <= set(state) and state["step"] == 8
    model, loaded = load_model(out)
    assert loaded == config and not model.training
    scales = [b.attn.ssmax.s for b in model.blocks]
    assert all(not torch.allclose(s, torch.full_like(s, 0.43)) for s in scales)  # learnable, and learned
    assert not list(out.glob("*.tmp"))


def test_resume_after_a_kill_equals_an_uninterrupted_run(corpus_file, tmp_path):
    config = smoke(corpus_file, pos="kerple", normalizer="sa_norm", ssmax=0.43, steps=12, checkpoint_every=4)
    train(config, tmp_path / "full", progress=False)

    def kill_at_10(step, model, inputs, targets):
        if step == 10:
            raise KeyboardInterrupt
        return {"seen": int(inputs.shape[0])}

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed", progress=False, step_hook=kill_at_10, hook_every=1)
    killed = tmp_path / "killed"
    assert read_checkpoint(killed)["step"] == 8  # the kill lost at most checkpoint_every steps
    assert [r["step"] for r in lines(killed / "metrics.jsonl")] == list(range(10))
    summary = train(config, killed, resume=True, progress=False)
    assert summary["step"] == 12
    full, resumed = weights(tmp_path / "full"), weights(killed)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    losses = [r["loss"] for r in lines(tmp_path / "full" / "metrics.jsonl")]
    assert [r["loss"] for r in lines(killed / "metrics.jsonl")] == losses
    # hooks.jsonl was cut back to the checkpoint's 8 steps (the resumed run had no hook).
    assert [r["step"] for r in lines(killed / "hooks.jsonl")] == list(range(8))
    # A finished run returns at once.
    assert train(config, killed, resume=True, progress=False) == summary


def test_extending_a_run_on_its_schedule(corpus_file, tmp_path):
    base = dict(pos="rope", normalizer="sa", checkpoint_every=100)
    train(smoke(corpus_file, steps=24, **base), tmp_path / "full", progress=False)
    train(smoke(corpus_file, steps=12, decay_steps=24, **base), tmp_path / "ext", progress=False)
    with pytest.raises(RunError, match="learning-rate schedule"):
        train(smoke(corpus_file, steps=30, **base), tmp_path / "full", resume=True, progress=False)
    train(smoke(corpus_file, steps=24, decay_steps=24, **base), tmp_path / "ext", resume=True, progress=False)
    full, ext = weights(tmp_path / "full"), weights(tmp_path / "ext")
    assert all(torch.equal(full[k], ext[k]) for k in full)


def test_step_hook_sees_the_batch_and_cannot_change_training(corpus_file, tmp_path):
    config = smoke(corpus_file, pos="fire", steps=5, dropout=0.1)
    train(config, tmp_path / "plain", progress=False)
    seen = []

    def hook(step, model, inputs, targets):
        seen.append(step)
        assert inputs.shape == targets.shape == (config["batch_size"], config["seq_len"])
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        model.eval()
        _, loss = model(inputs, targets)
        loss.backward()  # its own graph; the trainer zeroes these grads
        torch.rand(100)  # and draws random numbers: training must not notice
        return {"loss": loss.item()} if step != 4 else None

    train(config, tmp_path / "hooked", progress=False, step_hook=hook, hook_every=2)
    assert seen == [0, 2, 4]
    assert [r["step"] for r in lines(tmp_path / "hooked" / "hooks.jsonl")] == [0, 2]
    plain, hooked = weights(tmp_path / "plain"), weights(tmp_path / "hooked")
    assert all(torch.equal(plain[k], hooked[k]) for k in plain)


def test_run_directory_errors_write_nothing(corpus_file, tmp_path):
    out = tmp_path / "run"
    config = smoke(corpus_file, steps=2)
    train(config, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RunError, match="already exists"):
        train(config, out, progress=False)
    with pytest.raises(RunError, match="different config"):
        train(smoke(corpus_file, steps=2, normalizer="softmax"), out, resume=True, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        train(smoke(str(tmp_path / "nope.txt"), steps=2), out, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    corrupt = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RunError, match="corrupt"):
        train(config, out, resume=True, progress=False)
    with pytest.raises(RunError, match="corrupt"):
        load_model(out)
    with pytest.raises(RunError, match="corrupt"):
        evaluate(out, [32])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == corrupt
    with pytest.raises(RunError, match="no checkpoint"):
        load_model(tmp_path / "empty")


def test_resume_without_checkpoint_starts_afresh(corpus_file, tmp_path):
    config = smoke(corpus_file, steps=2)
    train(config, tmp_path / "a", resume=True, progress=False)
    train(config, tmp_path / "b", progress=False)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_writes_eval_json_at_the_lengths(corpus_file, tmp_path):
    out = tmp_path / "run"
    train(smoke(corpus_file, pos="alibi", steps=4), out, progress=False)
    results = evaluate(out, [32, 64, 128, 256], max_tokens=1024)
    assert list(results) == ["32", "64", "128", "256"]
    assert json.loads((out / "eval.json").read_text()) == results
    for row in results.values():
        assert math.isfinite(row["loss"]) and row["ppl"] == pytest.approx(math.exp(row["loss"]))
        assert row["ppl"] < 256  # better than uniform after a few steps
    # The loss is the mean next-token cross-entropy over consecutive validation windows.
    model, _ = load_model(out)
    val = load_corpus(corpus_file).val
    windows = torch.stack([val[i * 32 : i * 32 + 33] for i in range(32)]).long()
    with torch.no_grad():
        _, loss = model(windows[:, :-1], windows[:, 1:])
    assert results["32"]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="too few for length"):
        evaluate(out, [10**7])
    assert json.loads((out / "eval.json").read_text()) == results


@pytest.mark.parametrize("text", ["", "0", "12,-3", "a,b", "64,,128", "64,64"])
def test_parse_lengths_rejects_bad_lengths(text):
    with pytest.raises(ValueError, match="lengths"):
        parse_lengths(text)


def test_parse_lengths():
    assert parse_lengths("128, 256,512") == [128, 256, 512]


def test_long_evaluation_does_not_materialise_scores_for_position_encodings(corpus_file, tmp_path, monkeypatch):
    """`auto` serves bias functions with the tiled CPU backend, without an (H, T, T) tensor."""
    out = tmp_path / "run"
    train(smoke(corpus_file, pos="kerple", ssmax=0.43, steps=2), out, progress=False)
    module = sys.modules["sasoftmax.attention"]
    chosen = []
    original = module.choose_backend
    monkeypatch.setattr(module, "choose_backend", lambda call, backend: chosen.append(original(call, backend))
                        or chosen[-1])
    evaluate(out, [256], max_tokens=256)
    assert chosen and "eager" not in chosen


def test_progress_bar_and_plain_fallback(corpus_file, tmp_path, monkeypatch, capsys):
    train(smoke(corpus_file, steps=2), tmp_path / "bar", progress=True)
    assert "2/2" in capsys.readouterr().err  # tqdm's counter
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    train(smoke(corpus_file, steps=2), tmp_path / "plain", progress=True)
    err = capsys.readouterr().err
    assert "step 0: loss" in err and "tokens/s" in err
