"""`sasoftmax compare` and `sasoftmax report` on the smoke preset: results format, report, plots, resuming."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sasoftmax.analysis.gradient_flow import GradientFlowHook
from sasoftmax.cli import main
from sasoftmax.experiments.compare import plan, run_config, run_name
from sasoftmax.train import read_checkpoint, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("compare") / "smoke"
    assert main(["compare", "--preset", "smoke", "--out", str(out), "--data", str(corpus_file), "--no-progress"]) == 0
    return out


def test_results_json_has_the_issue_format(smoke):
    results = json.loads((smoke / "results.json").read_text())
    runs = results["runs"]
    assert {(r["pos"], r["variant"]) for r in runs} == {
        (pos, v) for pos in ("rope", "kerple") for v in ("softmax", "sa_norm", "sa", "ssmax", "ssmax_sa_norm")
    }
    for run in runs:
        assert run["seed"] == 0 and run["name"] == f"{run['pos']}-{run['variant']}-s0"
        assert run["normalizer"] in ("softmax", "sa", "sa_norm")
        assert (run["ssmax"] is not None) == run["variant"].startswith("ssmax")
        assert sorted(map(int, run["eval"])) == [32, 64, 128, 256]  # training length up to 8x
        for row in run["eval"].values():
            assert math.isfinite(row["loss"]) and row["ppl"] == pytest.approx(math.exp(row["loss"]))
        flow, fade = run["analysis"]["gradient_flow"], run["analysis"]["fade"]
        assert flow["steps"] == [0, 2, 4, 6]
        assert all(len(layers) == 2 for layers in flow["logit_grad_rms"])
        assert flow["mean_logit_grad_rms"] > 0
        assert fade["lengths"] == [16, 32, 64, 128, 256]
        assert all(math.isfinite(v) for v in fade["max_weight"] + fade["entropy"])
        assert run["train"]["step"][-1] == 7 and len(run["train"]["loss"]) == 8
    # The runs of one encoding share data, seed and budget: the first training losses differ only by the
    # normalizer, so they are close but (for different normalizers) not identical.
    rope = {r["variant"]: r for r in runs if r["pos"] == "rope"}
    assert rope["softmax"]["train"]["loss"][0] != rope["sa_norm"]["train"]["loss"][0]
    assert abs(rope["softmax"]["train"]["loss"][0] - rope["sa_norm"]["train"]["loss"][0]) < 0.5
    needle = {row["variant"]: row for row in results["retrieval"]}
    assert set(needle) == set(rope)
    assert all(sorted(map(int, row["accuracy"])) == [16, 32, 64] for row in needle.values())


def test_report_has_tables_claims_and_plots(smoke):
    text = (smoke / "report.md").read_text()
    assert "| pos | variant | ppl@32 | ppl@64 | ppl@128 | ppl@256 |" in text
    assert "## The papers' claims beside what we measured" in text
    for claim in ("larger gradients reach the attention logits", "attention does not fade",
                  "better length extrapolation", "key-information retrieval"):
        assert claim in text
    assert "reproduced" in text and "In short." in text
    plots = sorted((smoke / "plots").glob("*.png"))
    assert {p.stem for p in plots} >= {"loss_curves", "ppl_vs_length", "gradient_flow", "attention_fade"}
    for plot in plots:
        assert plot.read_bytes()[:8] == PNG_MAGIC
        assert f"(plots/{plot.name})" in text


def test_report_regenerates_from_results_json(smoke, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(smoke / "results.json", copy / "results.json")  # nothing else: no runs, no checkpoints
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.md").read_text() == (smoke / "report.md").read_text()
    assert len(list((copy / "plots").glob("*.png"))) == 5


def test_interrupted_compare_resumes_and_reuses_finished_runs(smoke, corpus_file, tmp_path):
    out = tmp_path / "resumed"
    args = ["compare", "--preset", "smoke", "--out", str(out), "--data", str(corpus_file), "--pos", "rope",
            "--normalizers", "softmax,ssmax", "--no-retrieval", "--no-progress"]
    settings = plan("smoke", pos=["rope"], variants=["softmax", "ssmax"], data=str(corpus_file), retrieval=False)
    assert settings["seeds"] == [0]
    # Simulate a compare killed in its first run after the checkpoint of step 4: write its claim file, then
    # train that run as compare does and interrupt it at step 6.
    out.mkdir()
    (out / "compare.json").write_text(json.dumps(settings))
    run_dir = out / "runs" / run_name("rope", "softmax", 0)
    hook = GradientFlowHook(settings["gradient_threshold"])

    def interrupting_hook(step, model, x, y):
        if step == 6:
            raise KeyboardInterrupt
        return hook(step, model, x, y)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as compare's smoke preset does: same threads, bit-identical arithmetic
    try:
        with pytest.raises(KeyboardInterrupt):
            train(run_config(settings, "rope", "softmax", 0), run_dir, progress=False, step_hook=interrupting_hook,
                  hook_every=settings["hook_every"])
    finally:
        torch.set_num_threads(threads)
    assert read_checkpoint(run_dir)["step"] == 4 and not (run_dir / "analysis.json").exists()

    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["rope-softmax-s0", "rope-ssmax-s0"]
    resumed = results["runs"][0]
    assert resumed["train"]["step"] == list(range(8)) and resumed["analysis"]["gradient_flow"]["steps"] == [0, 2, 4, 6]
    # The resumed run ends with the same weights, metrics and analysis as the uninterrupted one of the smoke grid.
    ours = read_checkpoint(run_dir)["model"]
    reference = read_checkpoint(smoke / "runs" / "rope-softmax-s0")["model"]
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    full = {r["name"]: r for r in json.loads((smoke / "results.json").read_text())["runs"]}["rope-softmax-s0"]
    assert resumed["eval"] == full["eval"] and resumed["train"] == full["train"]

    # Running again retrains nothing: run directories are untouched.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()} == stamps


def test_killed_compare_process_resumes_without_retraining(corpus_file, tmp_path):
    out = tmp_path / "killed"
    args = ["compare", "--preset", "smoke", "--out", str(out), "--data", str(corpus_file), "--pos", "rope",
            "--normalizers", "softmax,sa_norm,ssmax", "--no-retrieval", "--no-progress"]
    first = out / "runs" / "rope-softmax-s0" / "analysis.json"
    process = subprocess.Popen([sys.executable, "-m", "sasoftmax", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not first.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert first.exists()
    stamps = {p: p.stat().st_mtime_ns for p in first.parent.iterdir()}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in first.parent.iterdir()} == stamps  # the finished run was reused
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["rope-softmax-s0", "rope-sa_norm-s0", "rope-ssmax-s0"]
    assert all(r["train"]["step"] == list(range(8)) for r in results["runs"])


def test_report_without_matplotlib_still_writes_the_tables(smoke, tmp_path, monkeypatch, capsys):
    from sasoftmax import report

    def missing():
        raise ImportError("plots need matplotlib: pip install 'sasoftmax[harness]'")

    monkeypatch.setattr(report, "_pyplot", missing)
    shutil.copy(smoke / "results.json", tmp_path / "results.json")
    paths = report.write_report(tmp_path)
    assert paths == [tmp_path / "report.md"]
    text = paths[0].read_text()
    assert "No plots: plots need matplotlib" in text and "| pos | variant | ppl@32" in text
    assert "matplotlib" in capsys.readouterr().err


def test_parallel_jobs_give_the_same_runs(smoke, corpus_file, tmp_path):
    out = tmp_path / "parallel"
    assert main(["compare", "--preset", "smoke", "--out", str(out), "--data", str(corpus_file), "--pos", "kerple",
                 "--normalizers", "softmax,sa_norm", "--jobs", "2", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    sequential = {r["name"]: r for r in json.loads((smoke / "results.json").read_text())["runs"]}
    assert [r["name"] for r in results["runs"]] == ["kerple-softmax-s0", "kerple-sa_norm-s0"]  # grid order
    for run in results["runs"]:
        assert run["eval"] == sequential[run["name"]]["eval"]  # one thread per task in both: same arithmetic
    assert [row["variant"] for row in results["retrieval"]] == ["softmax", "sa_norm"]


@pytest.mark.parametrize("extra,message", [
    (["--normalizers", "softmax,bogus"], "unknown --normalizers"),
    (["--pos", "rope,nowhere"], "unknown --pos"),
    (["--normalizers", "softmax,softmax"], "must not repeat"),
    (["--steps", "0"], "steps"),
    (["--seeds", "0,x"], "--seeds"),
    (["--seeds", "1,1"], "distinct"),
    (["--jobs", "0"], "jobs"),
])
def test_compare_rejects_bad_input(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["compare", "--preset", "smoke", "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_compare_refuses_foreign_or_different_directories(smoke, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["compare", "--preset", "smoke", "--out", str(foreign)]) == 2
    assert "not a comparison directory" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    before = (smoke / "compare.json").read_text()
    assert main(["compare", "--preset", "smoke", "--out", str(smoke), "--seeds", "1", "--no-progress"]) == 2
    assert "different settings" in capsys.readouterr().err
    assert (smoke / "compare.json").read_text() == before


def test_report_rejects_a_directory_without_results(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "results.json does not exist" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
