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


VARIANTS = ("softmax", "sa_norm", "sa", "ssmax", "ssmax_sa_norm", "softmax_to_ssmax")


def test_results_json_has_the_issue_format(smoke):
    results = json.loads((smoke / "results.json").read_text())
    runs = results["runs"]
    assert {(r["pos"], r["variant"], r["seed"]) for r in runs} == {
        (pos, v, seed) for pos in ("rope", "kerple") for v in VARIANTS for seed in (0, 1, 2)
    }
    for run in runs:
        assert run["name"] == f"{run['pos']}-{run['variant']}-s{run['seed']}"
        assert run["normalizer"] in ("softmax", "sa", "sa_norm")
        assert (run["ssmax"] is not None) == run["variant"].startswith("ssmax") or run["variant"] == "softmax_to_ssmax"
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
        assert run["parameters"] > 0 and run["tokens"] == 8 * 4 * 32 and run["device"] == "cpu"
    # The runs of one encoding share data, seed and budget: the first training losses differ only by the
    # normalizer, so they are close but (for different normalizers) not identical.
    rope = {r["variant"]: r for r in runs if r["pos"] == "rope" and r["seed"] == 0}
    assert rope["softmax"]["train"]["loss"][0] != rope["sa_norm"]["train"]["loss"][0]
    assert abs(rope["softmax"]["train"]["loss"][0] - rope["sa_norm"]["train"]["loss"][0]) < 0.5
    # The switching variant trains as softmax up to the switch (step 4 of 8), then with SSMax from s = 1/ln 32.
    switched = rope["softmax_to_ssmax"]
    assert switched["ssmax"] == pytest.approx(1 / math.log(32)) and switched["ssmax_from"] == 4
    assert switched["train"]["loss"][:4] == rope["softmax"]["train"]["loss"][:4]
    assert switched["train"]["loss"][4:] != rope["softmax"]["train"]["loss"][4:]
    needle = {(row["variant"], row["seed"]) for row in results["retrieval"]}
    assert needle == {(v, seed) for v in VARIANTS if v != "softmax_to_ssmax" for seed in (0, 1, 2)}
    assert all(sorted(map(int, row["accuracy"])) == [16, 32, 64] for row in results["retrieval"])
    # The setup a reader needs, and the statistics the report shows.
    setup = results["setup"]
    assert setup["model"]["n_layer"] == 2 and setup["tokens_per_run"] == 8 * 4 * 32
    assert len(setup["data"]["fingerprint"]) == 64 and setup["versions"]["torch"] == torch.__version__
    assert setup["machine"]["threads"] == 1 and "cores" in setup["machine"] and "commit" in setup
    cell = results["statistics"]["runs"]["rope"]["sa_norm"]["ppl@32"]
    per_seed = {str(r["seed"]): r["eval"]["32"]["ppl"] for r in runs if (r["pos"], r["variant"]) == ("rope", "sa_norm")}
    assert cell["per_seed"] == per_seed and cell["mean"] == pytest.approx(sum(per_seed.values()) / 3)
    assert cell["low"] < cell["mean"] < cell["high"]
    base = {str(r["seed"]): r["eval"]["32"]["ppl"] for r in runs if r["pos"] == "rope" and r["variant"] == "softmax"}
    assert cell["vs_softmax"]["mean"] == pytest.approx(sum(per_seed[s] - base[s] for s in base) / 3)
    verdicts = {row["verdict"] for row in results["statistics"]["claims"]}
    assert verdicts <= {"reproduced", "contradicted", "inconclusive", "not measured"}


def test_report_has_setup_tables_claims_and_plots(smoke):
    text = (smoke / "report.md").read_text()
    assert "| pos | variant | ppl@32 | ppl@64 | ppl@128 | ppl@256 |" in text
    assert "## Setup" in text and "fingerprint" in text and "commit" in text and "**Scale.**" in text
    assert "## The papers' claims beside what we measured" in text and "95% t-interval" in text
    for claim in ("larger gradients reach the attention logits", "attention does not fade",
                  "better length extrapolation", "key-information retrieval", "switching from softmax to SSMax"):
        assert claim in text
    assert "In short." in text and "## Appendix: every run" in text
    assert "not renormalised" in text  # the fade of the SA variants is defined
    # Every run appears with its seed in the appendix.
    appendix = text.split("## Appendix: every run")[1]
    assert all(f"| rope | SA-Softmax (norm) | {seed} |" in appendix for seed in (0, 1, 2))
    plots = sorted((smoke / "plots").glob("*.png"))
    assert {p.stem for p in plots} >= {"loss_curves", "ppl_vs_length", "gradient_flow", "attention_fade"}
    for plot in plots:
        assert plot.read_bytes()[:8] == PNG_MAGIC
        assert f"(plots/{plot.name})" in text


def test_verdicts_follow_the_paired_intervals(smoke, tmp_path):
    """Shift the numbers of results.json: a consistent change across seeds turns into reproduced or contradicted."""
    from sasoftmax import report

    results = json.loads((smoke / "results.json").read_text())
    for run in results["runs"]:
        if run["pos"] == "rope" and run["variant"] == "sa_norm":  # SA-Softmax 20% worse at the training length
            run["eval"]["32"]["ppl"] = 1.2 * next(
                r["eval"]["32"]["ppl"] for r in results["runs"]
                if (r["pos"], r["variant"], r["seed"]) == ("rope", "softmax", run["seed"]))
        if run["pos"] == "kerple" and run["variant"] == "ssmax":  # SSMax's loss 0.1 lower, seed by seed
            base = next(r for r in results["runs"] if (r["pos"], r["variant"], r["seed"]) == ("kerple", "softmax",
                                                                                              run["seed"]))
            run["train"]["loss"] = [loss - 0.1 - 0.01 * run["seed"] for loss in base["train"]["loss"]]
    rows = {(row["claim"], row.get("pos")): row for row in report.claims(results)}
    assert rows[("lower perplexity", "rope")]["verdict"] == "contradicted"
    assert rows[("lower perplexity", "rope")]["difference"]["relative"] == pytest.approx(0.2)
    assert rows[("faster loss reduction in pretraining", "kerple")]["verdict"] == "reproduced"
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = report.markdown(results, [])
    assert "**Contradicted here:** SA-Softmax: lower perplexity (rope)" in text
    assert "SA-Softmax (norm) with rope is 20% *worse* than softmax at the training length" in text


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
            "--normalizers", "softmax,ssmax", "--seeds", "0", "--no-retrieval", "--no-progress"]
    settings = plan("smoke", pos=["rope"], variants=["softmax", "ssmax"], seeds=[0], data=str(corpus_file),
                    retrieval=False)
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
            "--normalizers", "softmax,sa_norm,ssmax", "--seeds", "0", "--no-retrieval", "--no-progress"]
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
                 "--normalizers", "softmax,sa_norm,softmax_to_ssmax", "--seeds", "1", "--jobs", "2",
                 "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    sequential = {r["name"]: r for r in json.loads((smoke / "results.json").read_text())["runs"]}
    names = ["kerple-softmax-s1", "kerple-sa_norm-s1", "kerple-softmax_to_ssmax-s1"]
    assert [r["name"] for r in results["runs"]] == names  # grid order
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


def test_tasks_go_to_the_gpu_when_there_is_one(monkeypatch, capsys):
    """Every task (in this process or in a --jobs worker) computes on the current CUDA device, so several
    workers share one GPU; without CUDA on the CPU. (No GPU here: CUDA's answers are faked.)"""
    from sasoftmax.experiments import compare as compare_module

    assert compare_module._device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert compare_module._device() == torch.device("cuda", 0)
    settings = plan("gpu")
    tasks = compare_module._tasks(settings, Path("unused"))
    compare_module._TaskProgress(True, tasks, 6, 2).close()
    err = capsys.readouterr().err
    assert "126 training runs + 15 needle models = 141 tasks, 6 at a time, on cuda" in err


def test_presets_train_three_seeds_and_the_gpu_grid():
    from sasoftmax.experiments.compare import RESOURCES, SETTINGS

    assert all(len(SETTINGS[name]["seeds"]) >= 3 for name in SETTINGS)
    gpu = plan("gpu")
    assert gpu["pos"] == ["nope", "rope", "alibi", "kerple", "fire", "dape_kerple", "dapev2_kerple"]
    assert gpu["eval_lengths"] == [512, 1024, 2048, 4096] and gpu["switch_step"] == 500
    config = run_config(gpu, "dapev2_kerple", "softmax_to_ssmax", 2)
    assert (config["n_layer"], config["n_embd"], config["seq_len"], config["steps"]) == (6, 384, 512, 1000)
    assert config["ssmax"] == pytest.approx(1 / math.log(512)) and config["ssmax_from"] == 500
    assert RESOURCES["gpu"]["jobs"] > 1


def test_parallel_workers_start_runs_of_different_encodings_together():
    from sasoftmax.experiments.compare import _schedule, _tasks

    settings = plan("gpu")
    order = [name for name, _ in _schedule(_tasks(settings, Path("unused")))]
    first = order[:6]  # what six workers train at once
    assert len({name.split("-")[0] for name in first}) == 6
    assert sum(name.startswith("dape") for name in first) <= 2
    assert sorted(order) == sorted(name for name, _ in _tasks(settings, Path("unused")))
