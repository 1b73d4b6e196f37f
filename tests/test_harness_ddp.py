"""Data-parallel training: `torchrun --nproc_per_node 2` (gloo on CPU) matches one process with the same batch."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from sasoftmax.train import make_config, read_checkpoint, train


def test_torchrun_two_processes_match_one(tmp_path):
    root = Path(sysconfig.get_paths()["stdlib"])
    data = tmp_path / "corpus.txt"
    data.write_text((root / "textwrap.py").read_text() + (root / "argparse.py").read_text())
    args = dict(normalizer="sa_norm", ssmax=0.43, pos="kerple", steps=4, grad_accum=2, data=str(data))
    train(make_config("smoke", **args), tmp_path / "one", progress=False)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "sasoftmax", "train", "--preset", "smoke", "--normalizer", "sa_norm", "--ssmax", "0.43",
        "--pos", "kerple", "--steps", "4", "--grad-accum", "2", "--data", str(data),
        "--out", str(tmp_path / "two"), "--no-progress",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-5)
    a, b = read_checkpoint(tmp_path / "one")["model"], read_checkpoint(tmp_path / "two")["model"]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert read_checkpoint(tmp_path / "two")["world_size"] == 2 and read_checkpoint(tmp_path / "one")["world_size"] == 1


GLOO_THREADS = (
    "def gloo_threads():\n"
    "    # gloo's native threads (named pt_gloo_runloop, gloo_tcp_loop); None where there is no /proc\n"
    "    if not os.path.isdir('/proc/self/task'):\n"
    "        return None\n"
    "    names = [open(f'/proc/self/task/{t}/comm').read() for t in os.listdir('/proc/self/task')]\n"
    "    return sum('gloo' in name for name in names)\n"
)


def test_torchrun_splits_each_batch_between_the_ranks(tmp_path):
    """Through the Python API under torchrun: each rank sees batch_size / 2 rows, and the run still matches.

    train() also leaves no gloo worker thread behind: one left running until the interpreter shuts down can
    abort the process (SIGABRT, "terminate called without an active exception") when it frees a finished
    collective's tensors then."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = tmp_path / "corpus.txt"
    data.write_text((root / "textwrap.py").read_text() + (root / "argparse.py").read_text())
    script = tmp_path / "run.py"
    script.write_text(
        "import json, os, sys\n"
        "from sasoftmax.train import make_config, train\n"
        + GLOO_THREADS
        + f"config = make_config('smoke', pos='alibi', normalizer='sa', steps=3, data={str(data)!r})\n"
        "hook = lambda step, model, x, y: {'rows': x.shape[0], 'gloo_threads': gloo_threads()}\n"
        "train(config, sys.argv[1], progress=False, step_hook=hook, hook_every=1)\n"
        "with open(sys.argv[1] + '.threads' + os.environ['RANK'], 'w') as f:\n"
        "    json.dump(gloo_threads(), f)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(tmp_path / "two")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    hooks = [json.loads(line) for line in (tmp_path / "two" / "hooks.jsonl").read_text().splitlines()]
    assert [h["rows"] for h in hooks] == [2, 2, 2]  # smoke's batch of 4, halved
    during = [h["gloo_threads"] for h in hooks]
    after = [json.loads((tmp_path / f"two.threads{rank}").read_text()) for rank in (0, 1)]
    if during[0] is not None:
        assert all(n > 0 for n in during)  # the check sees gloo's threads while the group exists
        assert after == [0, 0]
    train(make_config("smoke", pos="alibi", normalizer="sa", steps=3, data=str(data)), tmp_path / "one",
          progress=False)
    a, b = read_checkpoint(tmp_path / "one")["model"], read_checkpoint(tmp_path / "two")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_compare_under_torchrun(tmp_path):
    """`torchrun -m sasoftmax compare`: both ranks train every run (one of them switches to SSMax midway, so s has
    no gradient at first), rank 0 evaluates and writes the report, the needle models are split between the ranks."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = tmp_path / "corpus.txt"
    data.write_text((root / "textwrap.py").read_text() + (root / "argparse.py").read_text())
    out = tmp_path / "cmp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "sasoftmax", "compare", "--preset", "smoke", "--pos", "alibi",
        "--normalizers", "softmax,softmax_to_ssmax", "--seeds", "0,1", "--data", str(data), "--out", str(out),
        "--no-progress",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == [
        "alibi-softmax-s0", "alibi-softmax_to_ssmax-s0", "alibi-softmax-s1", "alibi-softmax_to_ssmax-s1"]
    assert [(r["variant"], r["seed"]) for r in results["retrieval"]] == [("softmax", 0), ("softmax", 1)]
    assert results["setup"]["machine"]["world_size"] == 2
    for run in results["runs"]:
        assert read_checkpoint(out / "runs" / run["name"])["world_size"] == 2
    switched = results["runs"][1]
    assert switched["train"]["loss"][:4] == pytest.approx(results["runs"][0]["train"]["loss"][:4], rel=1e-6)
    assert (out / "report.md").is_file() and result.stdout.count("training runs") == 1  # rank 0 alone
