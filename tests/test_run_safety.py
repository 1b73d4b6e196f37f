"""Runs are never lost or corrupted: one writer per folder, signals save a checkpoint, checkpoints are verified,
diverged runs stop, failed commands leave folders as they were, temporaries never follow planted symlinks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sasoftmax import cli
from sasoftmax.files import LOCK_NAME, FolderInUse, folder_lock, temporary
from sasoftmax.models import GPT
from sasoftmax.signals import Interrupted
from sasoftmax.train import RunError, make_config, read_checkpoint, train

SRC = str(Path(cli.__file__).resolve().parents[1])


def smoke(corpus_file, **kw) -> dict:
    return make_config("smoke", data=corpus_file, **kw)


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = read_checkpoint(a)["model"], read_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_folder_lock_refuses_a_second_writer_and_ignores_dead_ones(tmp_path):
    folder = tmp_path / "run"
    with folder_lock(folder):
        pid, host = (folder / LOCK_NAME).read_text().split()
        assert int(pid) == os.getpid() and host
        with pytest.raises(FolderInUse, match=f"in use by process {os.getpid()}.*{LOCK_NAME}"):
            with folder_lock(folder):
                pass
    assert not (folder / LOCK_NAME).exists() and folder.is_dir()
    (folder / LOCK_NAME).write_text(f"999999999 {os.uname().nodename}\n")  # left by a process that died
    with folder_lock(folder):
        assert (folder / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    with pytest.raises(RuntimeError), folder_lock(tmp_path / "new" / "deeper"):  # a failure removes what it made
        raise RuntimeError
    assert not (tmp_path / "new").exists()


def test_a_temporary_left_by_a_killed_write_is_no_obstacle(corpus_file, tmp_path):
    """``kill -9`` between a temporary's creation and its rename (CI caught a compare killed inside the first
    write_json of a run) leaves ``.config.json.<random>.tmp``: the run still starts (or resumes) there, and the
    next holder of the folder removes it. A file of the user's that merely looks alike is still refused."""
    out = tmp_path / "run"
    out.mkdir()
    left = temporary(out, "config.json")
    config = smoke(corpus_file, steps=2)
    train(config, out, resume=True, progress=False)
    assert not left.exists() and (out / "config.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / ".notes.tmp").write_text("mine")
    with pytest.raises(RunError, match="not a run directory"):
        train(config, other, resume=True, progress=False)
    assert (other / ".notes.tmp").read_text() == "mine"


@pytest.mark.skipif(sys.platform == "win32", reason="flock locks (POSIX)")
def test_a_writer_refused_before_the_holder_wrote_its_pid_still_names_it(tmp_path):
    """The holder writes its pid just after taking the lock: a process refused in between waits for it (up to a
    second) instead of naming "another process" (two writers started together hit this window)."""
    import fcntl
    import threading

    folder = tmp_path / "run"
    folder.mkdir()
    lock = folder / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, still empty
    writer = threading.Timer(0.2, lambda: os.write(fd, b"4242 somehost\n"))
    writer.start()
    try:
        with pytest.raises(FolderInUse, match="in use by process 4242 on somehost"), folder_lock(folder):
            pass
    finally:
        writer.join()
        os.close(fd)


def test_sigint_saves_a_checkpoint_and_resume_is_bit_exact(corpus_file, tmp_path):
    config = smoke(corpus_file, pos="kerple", normalizer="sa_norm", steps=12, checkpoint_every=100)
    train(config, tmp_path / "full", progress=False)

    def ctrl_c_at_5(step, model, inputs, targets):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step: the step finishes, then the run stops

    out = tmp_path / "stopped"
    before = signal.getsignal(signal.SIGINT)  # (Python's default handler, or SIG_IGN where the runner ignores SIGINT)
    with pytest.raises(Interrupted, match="SIGINT at step 6.*checkpoint") as stop:
        train(config, out, progress=False, step_hook=ctrl_c_at_5, hook_every=1)
    assert stop.value.exit_code == 130
    assert read_checkpoint(out)["step"] == 6 and metric_steps(out) == list(range(6))
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    train(config, out, resume=True, progress=False)
    assert same_weights(tmp_path / "full", out)
    full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in full] == [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text()
                                                     .splitlines()]  # fmt: skip


def _start_train(corpus_file: str, out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "sasoftmax", "train", "--data", corpus_file, "--out", str(out), "--no-progress",
               "--threads", "1", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition(), process.stderr.read() if process.poll() is not None else "timed out"


def test_second_writer_is_refused_and_sigterm_saves_a_checkpoint(corpus_file, tmp_path, capsys):
    """A real second process: train, train --resume, eval and compare on its folder exit 2 naming the holder;
    SIGTERM stops it with 143 after saving a checkpoint, from which a resume ends bit-exact."""
    out = tmp_path / "run"
    common = ["--steps", "3000", "--decay-steps", "3000", "--checkpoint-every", "1000"]
    process = _start_train(corpus_file, out, *common)
    try:
        _wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0, process)
        base = ["train", "--data", corpus_file, "--out", str(out), "--no-progress", *common]
        assert cli.main(base + ["--resume"]) == 2
        assert f"in use by process {process.pid}" in capsys.readouterr().err
        assert cli.main(base) == 2  # not empty
        capsys.readouterr()
        assert cli.main(["eval", str(out), "--lengths", "32"]) == 2
        assert f"in use by process {process.pid}" in capsys.readouterr().err
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, err
    assert "SIGTERM" in err and "checkpoint" in err and "--resume" in err
    step = read_checkpoint(out)["step"]
    assert 0 < step < 3000 and metric_steps(out) == list(range(step))
    assert not (out / LOCK_NAME).exists()
    # The same run, uninterrupted, to `step + 3` in-process: the resumed one matches it bit for bit.
    config = smoke(corpus_file, steps=step + 3, decay_steps=3000, checkpoint_every=1000)
    train(config, tmp_path / "full", progress=False)
    train(config, out, resume=True, progress=False)
    assert same_weights(tmp_path / "full", out)


def test_two_concurrent_writers_one_wins(corpus_file, tmp_path):
    """Two processes started together on one new folder: one trains, the other exits 2 naming it; the winner,
    stopped with SIGTERM, leaves one whole run (its checkpoint covers exactly its metrics lines)."""
    out = tmp_path / "run"
    processes = [_start_train(corpus_file, out, "--steps", "100000", "--resume") for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in processes) and time.monotonic() < deadline:
            time.sleep(0.05)
        (loser,) = [p for p in processes if p.poll() is not None]
        (winner,) = [p for p in processes if p is not loser]
        assert loser.returncode == 2
        assert f"in use by process {winner.pid}" in loser.stderr.read()
        _wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0, winner)
        winner.send_signal(signal.SIGTERM)
        assert winner.wait(timeout=120) == 143
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    step = read_checkpoint(out)["step"]
    assert step > 0 and metric_steps(out) == list(range(step))


def test_a_garbled_checkpoint_is_refused_and_kept(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    train(smoke(corpus_file, steps=4, decay_steps=8), out, progress=False)
    path = out / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    before = snapshot(out)
    with pytest.raises(RunError, match="checkpoint.pt is corrupt"):
        read_checkpoint(out)
    argv = ["train", "--data", corpus_file, "--steps", "8", "--decay-steps", "8", "--out", str(out), "--no-progress",
            "--resume"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "corrupt" in capsys.readouterr().err
    assert snapshot(out) == before


def test_a_checkpoint_with_odd_entries_is_refused(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    train(smoke(corpus_file, steps=2), out, progress=False)
    good = torch.load(out / "checkpoint.pt", weights_only=True)
    for field, value in (("step", "7"), ("step", -1), ("rng", {}), ("summary", None), ("optimizer", [])):
        torch.save({**good, field: value}, out / "checkpoint.pt")
        assert cli.main(["train", "--data", corpus_file, "--steps", "2", "--out", str(out), "--resume",
                         "--no-progress"]) == 2  # fmt: skip
        assert f"its {field}" in capsys.readouterr().err
        assert cli.main(["eval", str(out)]) == 2
        assert f"its {field}" in capsys.readouterr().err


def test_a_diverged_run_stops_keeping_its_last_good_checkpoint(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", corpus_file, "--lr", "1e6", "--steps", "40", "--checkpoint-every", "1", "--out",
            str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "diverged at step" in err and "last good checkpoint" in err and err.count("\n") == 1
    state = read_checkpoint(out)  # finite weights, else this raises
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(state["step"]))  # strict JSON, no NaN
    assert all("NaN" not in line and "Infinity" not in line for line in lines)


def test_a_train_failing_at_its_first_step_leaves_nothing(corpus_file, tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    out = tmp_path / "run"
    monkeypatch.setattr(GPT, "forward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        train(smoke(corpus_file, steps=4), out, progress=False)
    assert not out.exists()
    monkeypatch.undo()
    # A failing resume (extending the run) leaves its files as they were: config.json is not rewritten.
    train(smoke(corpus_file, steps=4, decay_steps=8), out, progress=False)
    before = snapshot(out)
    monkeypatch.setattr(GPT, "forward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        train(smoke(corpus_file, steps=8, decay_steps=8), out, resume=True, progress=False)
    assert snapshot(out) == before


def test_out_of_memory_is_one_line_and_exit_2(corpus_file, tmp_path, monkeypatch, capsys):
    def oom(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(GPT, "forward", oom)
    out = tmp_path / "run"
    assert cli.main(["train", "--data", corpus_file, "--batch-size", "4096", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "--batch-size" in err and err.count("\n") == 1
    assert not out.exists()


def test_planted_symlinks_are_never_written_through(corpus_file, tmp_path):
    out = tmp_path / "run"
    config = smoke(corpus_file, steps=4, decay_steps=8, checkpoint_every=2)
    train(config, out, progress=False)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("checkpoint.pt.tmp", "metrics.jsonl.tmp", ".checkpoint.pt.tmp", "config.json.tmp"):
        (out / name).symlink_to(victim)
    train(smoke(corpus_file, steps=8, decay_steps=8, checkpoint_every=2), out, resume=True, progress=False)
    assert victim.read_text() == "precious"
    assert read_checkpoint(out)["step"] == 8
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]  # no temporaries left


# ------------------------------------------------------------------------------------------ compare


def _children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (Linux /proc), zombies excluded."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_compare(corpus_file: str, out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "sasoftmax", "compare", "--preset", "smoke", "--out", str(out), "--data",
               corpus_file, "--pos", "rope", "--normalizers", "softmax,sa_norm", "--no-retrieval", "--jobs", "2",
               "--no-progress", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC}
    # SIGINT as a terminal delivers it, even where the runner ignores it (a background job of a script: the child
    # would inherit SIG_IGN, and Python then installs no KeyboardInterrupt)
    return subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def _both_training(out: Path) -> bool:
    metrics = [out / "runs" / f"rope-{v}-s0" / "metrics.jsonl" for v in ("softmax", "sa_norm")]
    return all(m.exists() and m.stat().st_size > 0 for m in metrics)


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


@needs_proc
@pytest.mark.parametrize("how", ["kill -9", "SIGINT", "SIGTERM"])
def test_compare_workers_end_with_their_parent(corpus_file, tmp_path, how):
    out = tmp_path / "cmp"
    process = _start_compare(corpus_file, out, "--steps", "5000")
    workers: set[int] = set()
    try:
        _wait_for(lambda: _both_training(out), process)
        workers = _children(process.pid)
        assert workers
        sig = {"kill -9": signal.SIGKILL, "SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}[how]
        process.send_signal(sig)
        process.wait(timeout=120)
        deadline = time.monotonic() + 60
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], f"workers outlived their parent ({how})"
        if how != "kill -9":
            assert process.returncode == 128 + sig
            assert "rerun the same command to resume" in process.stderr.read()
        # Every worker saved its run when it was stopped, so a rerun continues from there.
        for variant in ("softmax", "sa_norm"):
            assert read_checkpoint(out / "runs" / f"rope-{variant}-s0")["step"] > 0
    finally:
        for pid in [process.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@needs_proc
def test_a_failing_compare_task_stops_the_other_workers(corpus_file, tmp_path):
    """A task that fails (a corrupt analysis.json) ends the compare at once with exit 2, workers included."""
    from sasoftmax.experiments.compare import plan

    out = tmp_path / "cmp"
    settings = plan("smoke", pos=["rope"], variants=["softmax", "sa_norm"], steps=5000, data=corpus_file,
                    retrieval=False)  # fmt: skip
    out.mkdir()
    (out / "compare.json").write_text(json.dumps(settings))
    (out / "runs" / "rope-sa_norm-s0").mkdir(parents=True)
    (out / "runs" / "rope-sa_norm-s0" / "analysis.json").write_text("[]")
    process = _start_compare(corpus_file, out, "--steps", "5000")
    began = time.monotonic()
    _, err = process.communicate(timeout=180)
    assert process.returncode == 2, err
    assert "analysis.json is corrupt" in err and err.count("\n") == 1
    assert time.monotonic() - began < 120  # the other run (5000 steps) was not trained to the end
    assert not _children(process.pid)


def test_failed_compare_leaves_no_files(corpus_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--preset", "smoke", "--out", str(out), "--pos", "rope", "--normalizers", "softmax",
            "--no-retrieval", "--no-progress"]  # fmt: skip
    assert cli.main(args + ["--data", str(tmp_path / "nonexistent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main(args + ["--data", corpus_file]) == 0  # the corrected command runs
    full = (out / "results.json").read_bytes()
    # A rerun that fails on one corrupt run file keeps the complete results.json.
    (out / "runs" / "rope-softmax-s0" / "analysis.json").write_text("{not json")
    assert cli.main(args + ["--data", corpus_file]) == 2
    assert "analysis.json is corrupt" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == full
    (out / "compare.json").write_text("[]")
    assert cli.main(args + ["--data", corpus_file]) == 2
    assert "compare.json is corrupt" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ input checks


@pytest.mark.parametrize("spec", ["hf:https://example.com/data.csv", "hf:../secret", "hf:/etc/passwd", "hf:a/b/c",
                                  "hf:", "hf:name:../x", "hf:owner/name:cfg;rm"])  # fmt: skip
def test_hf_data_takes_only_hub_dataset_names(spec, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", spec, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "hub dataset id" in err or "config name" in err
    assert not out.exists()


def test_hf_data_refuses_names_of_local_folders(tmp_path, monkeypatch, capsys):
    from sasoftmax.data import check_hub_name

    assert check_hub_name("wikitext:wikitext-2-raw-v1") == ("wikitext", "wikitext-2-raw-v1")
    assert check_hub_name("owner/some.name") == ("owner/some.name", None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wikitext").mkdir()
    with pytest.raises(ValueError, match="local path"):
        check_hub_name("wikitext")


@pytest.mark.parametrize("option", ["--batch", "--heads", "--head-dim"])
def test_bench_rejects_non_positive_sizes(option, capsys):
    assert cli.main(["bench", "--lengths", "8", option, "0", "--no-memory", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert option in err and err.count("\n") == 1


def test_odd_run_files_are_one_line_errors_naming_the_file(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    train(smoke(corpus_file, steps=2), out, progress=False)
    (out / "config.json").write_text("[]")
    assert cli.main(["train", "--data", corpus_file, "--steps", "2", "--out", str(out), "--resume"]) == 2
    assert "config.json is corrupt" in capsys.readouterr().err
    results = tmp_path / "cmp"
    results.mkdir()
    (results / "results.json").write_text(json.dumps({"settings": {}, "runs": [{"name": "x"}]}))
    assert cli.main(["report", str(results)]) == 2
    err = capsys.readouterr().err
    assert "results.json is not usable" in err and err.count("\n") == 1
    from sasoftmax.analysis.gradient_flow import read_hooks

    (out / "hooks.jsonl").write_text("{\n")
    with pytest.raises(ValueError, match="hooks.jsonl is corrupt"):
        read_hooks(out / "hooks.jsonl")


def test_a_checkpoint_is_never_replaced_by_non_finite_weights(corpus_file, tmp_path):
    from sasoftmax.train import NonFiniteError, _save_checkpoint, make_optimizer, model_config

    out = tmp_path / "run"
    config = smoke(corpus_file, steps=2)
    train(config, out, progress=False)
    before = snapshot(out)
    model = GPT(model_config(config))
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteError, match="not replaced"):
        _save_checkpoint(out, model, make_optimizer(model, config), torch.Generator(), 3, config, "x", {}, 1)
    assert snapshot(out) == before


def test_hook_results_are_strict_json_lines(corpus_file, tmp_path):
    out = tmp_path / "run"
    train(smoke(corpus_file, steps=2), out, progress=False, hook_every=1,
          step_hook=lambda step, *_: {"x": float("nan"), "y": [1.0, float("inf")]})  # fmt: skip
    rows = [json.loads(line) for line in (out / "hooks.jsonl").read_text().splitlines()]
    assert rows == [{"step": 0, "x": None, "y": [1.0, None]}, {"step": 1, "x": None, "y": [1.0, None]}]
