"""The `sasoftmax` command line: train/eval end to end, delegation, and every bad input (exit 2, nothing written)."""

import json
import math
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from sasoftmax import cli
from sasoftmax.train import read_checkpoint


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    argv = ["train", "--preset", "smoke", "--normalizer", "sa_norm", "--ssmax", "0.43", "--pos", "kerple",
            "--steps", "4", "--data", corpus_file, "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    return out


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def test_train_and_eval(run_dir, capsys):
    assert {"config.json", "metrics.jsonl", "checkpoint.pt"} <= set(snapshot(run_dir))
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["normalizer"], config["ssmax"], config["pos"], config["steps"]) == ("sa_norm", 0.43, "kerple", 4)
    capsys.readouterr()
    assert cli.main(["eval", str(run_dir), "--lengths", "32,64,128,256", "--max-tokens", "512"]) == 0
    table = capsys.readouterr().out
    results = json.loads((run_dir / "eval.json").read_text())
    assert list(results) == ["32", "64", "128", "256"]
    assert all(length in table for length in results) and "ppl" in table
    assert cli.main(["eval", str(run_dir), "--max-tokens", "256"]) == 0  # the preset's lengths L, 2L, 4L
    assert list(json.loads((run_dir / "eval.json").read_text())) == ["32", "64", "128"]


def test_cli_resume_12_then_24_equals_24(corpus_file, tmp_path):
    common = ["train", "--preset", "smoke", "--pos", "rope", "--normalizer", "sa", "--data", corpus_file,
              "--no-progress", "--checkpoint-every", "5", "--threads", "1"]
    assert cli.main(common + ["--steps", "24", "--out", str(tmp_path / "full")]) == 0
    assert cli.main(common + ["--steps", "12", "--decay-steps", "24", "--out", str(tmp_path / "part")]) == 0
    assert read_checkpoint(tmp_path / "part")["step"] == 12
    assert cli.main(common + ["--steps", "24", "--resume", "--out", str(tmp_path / "part")]) == 0
    full, part = read_checkpoint(tmp_path / "full")["model"], read_checkpoint(tmp_path / "part")["model"]
    assert all(torch.equal(full[k], part[k]) for k in full)
    full_lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    part_lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in full_lines] == [json.loads(x)["loss"] for x in part_lines]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "huge"], "invalid choice"),
        (["--normalizer", "relu"], "invalid choice"),
        (["--pos", "abs"], "invalid choice"),
        (["--steps", "0"], "steps must be an int >= 1"),
        (["--steps", "x"], "invalid int value"),
        (["--ssmax", "-1"], "ssmax"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--data", "/nonexistent/corpus.txt"], "does not exist"),
        (["--data", "hf:wikitext:wikitext-2-raw-v1"], "datasets"),
    ],
)
def test_train_bad_input_exits_2_and_writes_nothing(args, message, corpus_file, tmp_path, capsys):
    out = tmp_path / "new"
    argv = ["train", "--data", corpus_file, "--steps", "2", "--out", str(out), "--no-progress"] + args
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_run_directory_errors_exit_2_and_overwrite_nothing(run_dir, corpus_file, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = snapshot(run)
    base = ["train", "--preset", "smoke", "--normalizer", "sa_norm", "--ssmax", "0.43", "--pos", "kerple",
            "--steps", "4", "--data", corpus_file, "--out", str(run), "--no-progress"]
    assert cli.main(base) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main(base[:4] + ["softmax"] + base[5:] + ["--resume"]) == 2
    assert "different config" in capsys.readouterr().err
    assert snapshot(run) == before
    assert cli.main(base + ["--resume"]) == 0  # same config: the run is finished, nothing to do
    assert snapshot(run) == before
    for lengths in ("0", "a,b", "", "32,32", "-64"):
        assert cli.main(["eval", str(run), "--lengths", lengths]) == 2
        assert "lengths" in capsys.readouterr().err
    assert cli.main(["eval", str(run), "--lengths", "100000000"]) == 2
    assert "too few" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert snapshot(run) == before
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    (run / "eval.json").write_text("{}")
    corrupt = snapshot(run)
    assert cli.main(["eval", str(run), "--lengths", "32"]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert cli.main(base + ["--resume"]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert snapshot(run) == corrupt


def test_delegated_subcommands(monkeypatch, capsys):
    fake = types.ModuleType("sasoftmax_fake_report")
    fake.add_arguments = lambda parser: parser.add_argument("folder")
    fake.run = lambda args: print(f"report of {args.folder}") or 0
    monkeypatch.setitem(sys.modules, "sasoftmax_fake_report", fake)
    monkeypatch.setattr(cli, "DELEGATED", {"report": ("sasoftmax_fake_report", "fake")})
    assert cli.main(["report", "somewhere"]) == 0
    assert "report of somewhere" in capsys.readouterr().out
    assert cli.main(["report", "somewhere", "--size", "3"]) == 2  # unknown options are argparse errors
    assert cli.main(["train", "--steps", "2"]) == 2  # --out is required: argparse's exit code


def test_entry_points():
    result = subprocess.run([sys.executable, "-m", "sasoftmax", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout and "eval" in result.stdout
    # The console script that `pip install` puts beside the interpreter.
    script = Path(sys.executable).parent / "sasoftmax"
    script = str(script) if script.exists() else shutil.which("sasoftmax")
    assert script, "the sasoftmax console script is not installed"
    result = subprocess.run([script, "eval", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--lengths" in result.stdout


def test_unusable_data_exits_2_and_writes_nothing(tmp_path, capsys):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("print('hi')\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    for data, message in ((tiny, "seq_len 32 needs more"), (empty, "holds no files")):
        out = tmp_path / "out"
        assert cli.main(["train", "--data", str(data), "--out", str(out), "--no-progress"]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_version_and_help_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("sasoftmax ")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default smoke)", "(default sa_norm)", "(default rope)", "default off"):
        assert default in text


def test_ssmax_messages_agree(corpus_file, tmp_path, capsys):
    messages = []
    for value in ("-1", "0", "inf"):
        assert cli.main(["train", "--data", corpus_file, f"--ssmax={value}", "--out", str(tmp_path / "x")]) == 2
        messages.append(capsys.readouterr().err.split("; got")[0])
    assert len(set(messages)) == 1 and "finite float > 0" in messages[0]
    assert cli.main(["train", "--data", corpus_file, "--ssmax-from", "2", "--out", str(tmp_path / "x")]) == 2
    assert "ssmax_from needs ssmax" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_report_on_a_training_run_says_what_to_do(run_dir, capsys):
    assert cli.main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "is a training run" in err and f"sasoftmax eval {run_dir}" in err and "--out NEW_DIR" in err


def test_switching_to_ssmax_trains_softmax_first(corpus_file, tmp_path):
    """--ssmax-from K: steps before K are exactly the softmax run's (s untouched), SSMax acts from K on."""
    from sasoftmax.nn import SSMaxScale
    from sasoftmax.train import load_model

    common = ["train", "--preset", "smoke", "--normalizer", "softmax", "--pos", "alibi", "--data", corpus_file,
              "--steps", "8", "--checkpoint-every", "4", "--threads", "1", "--no-progress"]
    assert cli.main(common + ["--out", str(tmp_path / "softmax")]) == 0
    s0 = 1 / math.log(32)
    assert cli.main(common + ["--ssmax", str(s0), "--ssmax-from", "4", "--steps", "4", "--decay-steps", "8",
                              "--out", str(tmp_path / "switch")]) == 0
    half, _ = load_model(tmp_path / "switch")  # stopped at the switch: SSMax still off, s as initialised
    scales = [m for m in half.modules() if isinstance(m, SSMaxScale)]
    assert scales and all(not m.enabled for m in scales)
    assert all(torch.equal(m.s, torch.full_like(m.s, s0)) for m in scales)
    assert cli.main(common + ["--ssmax", str(s0), "--ssmax-from", "4", "--resume",
                              "--out", str(tmp_path / "switch")]) == 0

    def losses(name):
        return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert losses("switch")[:4] == losses("softmax")[:4]
    assert losses("switch")[4:] != losses("softmax")[4:]
    full, _ = load_model(tmp_path / "switch")
    scales = [m for m in full.modules() if isinstance(m, SSMaxScale)]
    assert all(m.enabled for m in scales) and not all(torch.equal(m.s, torch.full_like(m.s, s0)) for m in scales)


def test_bench_prints_its_settings_first(capsys):
    assert cli.main(["bench", "--lengths", "32", "--repeats", "1", "--causal", "yes", "--backends", "cpu",
                     "--normalizers", "sa_norm", "--no-memory", "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("bench: time of cpu:sa_norm, sdpa at N = 32") and "1 timed repeats" in out[0]
    assert any("| 32 | yes | cpu:sa_norm |" in line for line in out)
