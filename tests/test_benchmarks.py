"""The GPU benchmark scripts in their CPU smoke modes: the code paths the one GPU run takes, on tiny sizes.

Numbers measured here mean nothing; what is checked is that every provider either gives a time or
records why it could not, that ratios and FLOP counts are computed from the same run, that the result
files carry their header, and that benchmarks/gpu_check.sh hands the benchmarks valid arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_train  # noqa: E402
import triton_attention  # noqa: E402
import triton_tune  # noqa: E402

from sasoftmax import backends  # noqa: E402

# The Triton kernels run on CPU tensors only in Triton's interpreter (conftest turns it on where there is no GPU).
TRITON_ON_CPU = backends.unavailable("triton") is None and backends.load("triton").INTERPRET
TRITON = ["triton:sa_norm"] if TRITON_ON_CPU else []


def read(out: Path, prefix: str) -> tuple[str, dict]:
    return (out / f"{prefix}.md").read_text(), json.loads((out / f"{prefix}.json").read_text())


def test_kernel_benchmark_smoke(tmp_path):
    providers = ["sdpa-math", "sdpa-cudnn", "cpu:sa_norm+ssmax", *TRITON]
    argv = ["--smoke", "--out", str(tmp_path), "--providers", *providers, "--causal", "yes", "--repeats", "1"]
    assert triton_attention.main(argv + ["--bias", "none", "kerple"]) == 0
    markdown, result = read(tmp_path, "kernels")
    header, rows = result["header"], result["rows"]
    assert {"date", "device", "torch", "triton", "cuda", "commit"} <= header.keys()
    assert header["date"] in markdown and "## fwd+bwd" in markdown and "× sdpa-math" in markdown
    assert len(rows) == len(providers) * 2 * 2  # × bias (none, kerple) × mode
    by = {(r["provider"], r["bias"], r["mode"]): r for r in rows}
    base = by["sdpa-math", "none", "fwd+bwd"]
    assert base["x sdpa-math"] == 1.0
    # B = 64 tokens / N 32 = 2, H = 32 / D 16 = 2: 4·B·H·N²·D, half for causal, ×3.5 forward+backward.
    assert base["tflops"] == pytest.approx(4 * 2 * 2 * 32**2 * 16 * 0.5 * 3.5 / (base["ms"] * 1e-3) / 1e12)
    cudnn = by["sdpa-cudnn", "none", "fwd"]  # no cuDNN on a CPU: recorded, the run goes on
    assert cudnn["status"] == "error" and cudnn["ms"] is None and cudnn["note"]
    for provider in ("cpu:sa_norm+ssmax", *TRITON):
        for mode in ("fwd", "fwd+bwd"):
            row = by[provider, "none", mode]
            assert row["status"] == "ok" and row["ms"] > 0
            assert row["x sdpa-math"] == pytest.approx(row["ms"] / by["sdpa-math", "none", mode]["ms"])
    kerple = by["cpu:sa_norm+ssmax", "kerple", "fwd+bwd"]
    assert kerple["status"] == "ok"
    assert kerple["x no bias"] == pytest.approx(kerple["ms"] / by["cpu:sa_norm+ssmax", "none", "fwd+bwd"]["ms"])


def test_kernel_benchmark_in_a_models_layout(tmp_path):
    inputs = triton_attention.make_input("bnhd", (2, 3, 5, 4), torch.Generator().manual_seed(0), torch.float32, True)
    assert inputs.shape == (2, 3, 5, 4) and inputs.stride() == (60, 4, 12, 1) and inputs.requires_grad
    providers = ["sdpa-math", "cpu:sa_norm", *TRITON]
    argv = ["--smoke", "--out", str(tmp_path), "--providers", *providers, "--causal", "yes", "--repeats", "1"]
    assert triton_attention.main([*argv, "--layout", "bnhd", "--modes", "fwd+bwd"]) == 0
    _, result = read(tmp_path, "kernels")
    assert result["header"]["layout"] == "bnhd"
    assert [r["status"] for r in result["rows"]] == ["ok"] * len(providers)


def test_kernel_benchmark_rejects_unknown_providers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        triton_attention.parse_args(["--smoke", "--providers", "triton:softmaxx"])
    assert exit_info.value.code == 2
    assert "unknown provider 'triton:softmaxx'" in capsys.readouterr().err


def test_training_benchmark_smoke(tmp_path):
    rows = ["cpu:sa_norm+ssmax", "cpu:sa_norm", "cpu:sa_norm@kerple", *TRITON, "sdpa:sa_norm"]
    argv = ["--smoke", "--out", str(tmp_path), "--rows", *rows, "--warmup", "0", "--steps", "1"]
    assert gpu_train.main(argv) == 0
    markdown, result = read(tmp_path, "train")
    assert result["header"]["date"] in markdown and "× sdpa:softmax" in markdown
    by = {r["row"]: r for r in result["rows"]}
    assert list(by) == ["sdpa:softmax", *rows]  # the baseline first
    assert by["sdpa:softmax"]["x baseline"] == 1.0
    for row in ["sdpa:softmax", *rows[:-1]]:
        r = by[row]
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["batch"] == 2
        assert r["x baseline"] == pytest.approx(r["tokens_per_s"] / by["sdpa:softmax"]["tokens_per_s"])
    kerple = by["cpu:sa_norm@kerple"]
    assert kerple["x rope"] == pytest.approx(kerple["tokens_per_s"] / by["cpu:sa_norm"]["tokens_per_s"])
    refused = by["sdpa:sa_norm"]  # the sdpa backend serves softmax only: recorded, the run goes on
    assert refused["status"] == "error" and "softmax attention only" in refused["note"]


def test_training_benchmark_profile(tmp_path, monkeypatch):
    """--profile adds, per row at the first length, the operators (kernels on CUDA) with the most time per step,
    profiled after every row was timed (a profiler session must not precede a timing)."""
    argv = ["--smoke", "--out", str(tmp_path), "--rows", "cpu:sa_norm", "--warmup", "0", "--steps", "1"]
    calls = []
    train_row = gpu_train.train_row
    monkeypatch.setattr(gpu_train, "train_row", lambda *a: calls.append(a[3] if len(a) > 3 else 0) or train_row(*a))
    assert gpu_train.main([*argv, "--profile", "1", "--seqs", "16", "8"]) == 0
    assert calls == [0, 0, 0, 0, 1, 1]  # 2 rows (with the baseline) × 2 lengths timed, then 2 rows profiled
    markdown, result = read(tmp_path, "train")
    by = {(r["row"], r["seq"]): r for r in result["rows"]}
    assert "profile" not in by[("cpu:sa_norm", 8)]  # the first length only
    prof = by[("cpu:sa_norm", 16)]["profile"]
    timed = by[("cpu:sa_norm", 16)]
    assert timed["tokens_per_s"] > 0 and 0 < timed["host_ms"] <= timed["step_ms"]  # the timing stays
    assert prof["steps"] == 1 and prof["wall_ms"] > 0 and 0 < len(prof["top"]) <= gpu_train.PROFILE_TOP
    for key in ("top", "host_top", "python_top"):  # device (here: operators), host, Python functions
        times = [e["ms_per_step"] for e in prof[key]]
        assert 0 < len(times) <= gpu_train.PROFILE_TOP and times == sorted(times, reverse=True) and times[0] > 0
    assert "host: Python function (own time, cProfile)" in markdown
    assert timed["syncs"] is None  # counted on CUDA only
    assert "### Profile: cpu:sa_norm at seq 16" in markdown and f"`{prof['top'][0]['name']}`" in markdown
    calls.clear()  # --profile-seq picks the length profiled
    assert gpu_train.main([*argv, "--profile", "1", "--seqs", "16", "8", "--profile-seq", "8"]) == 0
    assert calls == [0, 0, 0, 0, 1, 1]
    by = {(r["row"], r["seq"]): r for r in read(tmp_path, "train")[1]["rows"]}
    assert "profile" in by[("cpu:sa_norm", 8)] and "profile" not in by[("cpu:sa_norm", 16)]
    with pytest.raises(SystemExit):
        gpu_train.parse_args([*argv, "--seqs", "16", "--profile-seq", "8"])


@pytest.mark.skipif(not TRITON_ON_CPU, reason="the tuning times Triton kernels (here: in the interpreter)")
@pytest.mark.skipif(backends.unavailable("triton") is not None, reason="triton is not installed")
def test_host_benchmark_smoke(tmp_path):
    """benchmarks/triton_host.py on a faked GPU (tests/triton_fake_driver.py), in a process without the interpreter."""
    from test_triton_compile import compile_env

    script = [sys.executable, str(BENCHMARKS / "triton_host.py"), "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(script, env=compile_env(), capture_output=True, text=True, timeout=300, check=False)
    if "cannot fake a GPU" in done.stderr:
        pytest.skip(done.stderr.strip()[-200:])
    assert done.returncode == 0, done.stderr[-3000:]
    markdown, result = read(tmp_path, "host")
    assert result["header"]["date"] in markdown and "faked sm_90" in markdown
    import triton_host

    assert [r["row"] for r in result["rows"]] == list(triton_host.ROWS)
    for r in result["rows"]:
        assert all(r[way] > 0 for way in triton_host.WAYS)
        assert f"| {r['row']} | {r['python']:.1f} | {r['jit']:.1f} | {r['direct']:.1f} |" in markdown


def test_tile_tuning_smoke(tmp_path, capsys):
    argv = ["--smoke", "--out", str(tmp_path), "--kernels", "fwd", "dkdv", "--causal", "yes", "--normalizers", "sa"]
    assert triton_tune.main([*argv, "--compile-workers", "2"]) == 0
    assert "; 0 failed" in capsys.readouterr().out  # compiled first, in 2 processes
    markdown, result = read(tmp_path, "tune")
    rows = result["rows"]
    assert [(r["kernel"], r["tiles"]) for r in rows] == [
        ("fwd", "16x16x4x1"), ("fwd", "32x16x4x1"), ("dkdv", "16x16x4x1"), ("dkdv", "32x16x4x1")
    ]  # the default first, then the candidates not equal to it
    assert [r["default"] for r in rows] == [True, False, True, False]
    for r in rows:
        assert r["ms"] > 0 and r["note"] == ""
    assert rows[1]["x default"] == pytest.approx(rows[1]["ms"] / rows[0]["ms"])
    assert markdown.count("**") == 4  # the fastest of each kernel in bold


@pytest.mark.skipif(not TRITON_ON_CPU, reason="the tuning times Triton kernels (here: in the interpreter)")
def test_tile_tuning_with_a_bias(tmp_path):
    argv = ["--smoke", "--out", str(tmp_path), "--kernels", "dkdv", "--causal", "yes", "--normalizers", "sa_norm"]
    assert triton_tune.main([*argv, "--bias", "kerple"]) == 0
    _, result = read(tmp_path, "tune")
    assert result["header"]["bias"] == "kerple"
    rows = result["rows"]
    assert [r["tiles"] for r in rows] == ["16x16x4x1", "32x16x4x1"] and all(r["ms"] > 0 for r in rows)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="the tuning launches Triton kernels (here: in the interpreter)")
def test_tile_tuning_compiles_each_share_of_the_candidates_untimed(tmp_path, capsys):
    argv = ["--smoke", "--out", str(tmp_path), "--kernels", "fwd", "dkdv", "--causal", "yes", "--normalizers", "sa"]
    shares = []
    for index in range(2):
        assert triton_tune.main([*argv, "--compile-only", f"{index}/2"]) == 0
        lines = capsys.readouterr().out.splitlines()
        shares.append([line.split()[-1] for line in lines if line.startswith("compiled")])
    assert shares == [["16x16x4x1", "16x16x4x1"], ["32x16x4x1", "32x16x4x1"]]  # every candidate once, in turn
    assert not list(tmp_path.iterdir())  # nothing timed, nothing written
    for bad in ("2/2", "a/2", "1"):
        with pytest.raises(SystemExit):
            triton_tune.parse_args([*argv, "--compile-only", bad])
    assert "--compile-only expects I/W" in capsys.readouterr().err


def test_tile_tuning_dry_run_and_arguments(capsys):
    assert triton_tune.main(["--dry-run"]) == 0
    assert "16 kernel groups" in capsys.readouterr().out  # 2 head dims × causal both × (fwd, extrema, dq, dkdv)
    assert triton_tune.main(["--dry-run", "--normalizers", "softmax"]) == 0
    assert "12 kernel groups" in capsys.readouterr().out  # row_extrema is sa_norm's only
    assert triton_tune.main(["--dry-run", "--candidates", "dq:64x32x4x4", "dq:64x64x4x3"]) == 0
    assert "up to 120 candidates" in capsys.readouterr().out  # dq's 2 (+ default) replace its 8: 4 × (9 + 9 + 3 + 9)
    with pytest.raises(SystemExit):
        triton_tune.parse_args(["--candidates", "dx:64x32x4x4"])
    assert "--candidates expects KERNEL:BMxBNxWARPSxSTAGES" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        triton_tune.parse_args(["--head-dims", "96", "--model-dim", "2048"])
    assert exit_info.value.code == 2 and "multiple of every head dim" in capsys.readouterr().err


def dry_gpu_check(out: Path, **limits: str) -> str:
    """benchmarks/gpu_check.sh in dry-run mode (the benchmarks only parse the GPU run's arguments and print their
    plans) with these step limits; its run.log, after asserting that it exited 0."""
    env = dict(os.environ, GPU_CHECK_DRY="1", **limits)
    proc = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), str(out)],
        cwd=BENCHMARKS.parent, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    log = (out / "run.log").read_text()
    assert proc.returncode == 0, log
    return log


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_passes_valid_arguments(tmp_path):
    """In dry-run mode the benchmarks only parse the GPU run's arguments (sizes, provider names) and exit."""
    log = dry_gpu_check(tmp_path, VERSIONS_S="0", TESTS_S="0")
    for step in ("warm", "kernels", "bias", "train", "host"):
        assert f"== {step}: exit 0" in log
    # the warm step compiles the kernels of each (head dim, causal, bias) of both runs, sasoftmax providers only
    assert log.count("triton_attention.py --out") == 4 + 2 * 5 + 2  # + the kernels and bias steps' own lines
    warm = [line for line in log.splitlines() if "--prefix warm-" in line and "triton_attention.py" in line]
    assert len(warm) == 4 + 2 * 5 and not any("sdpa" in line for line in warm)
    assert any("--prefix warm-64-yes-kerple " in line and "--lengths 256 4096 " in line for line in warm)
    # and one process per triton training row (a one-layer model, both lengths)
    train_warm = [line for line in log.splitlines() if "--prefix warm-train-" in line]
    assert len(train_warm) == sum(row.startswith("triton:") for row in gpu_train.GPU_ROWS)
    assert all("--seqs 1024 4096 --layers 1" in line for line in train_warm)
    # and one per call of the host step (its masked and decoding calls compile kernels of their own)
    import triton_host

    host_warm = [line for line in log.splitlines() if "triton_host.py --device cuda --smoke --rows" in line]
    assert len(host_warm) == len(triton_host.ROWS)
    assert "== tune: skipped (limit 0)" in log  # the tuning runs only when asked (TUNE_S > 0)
    assert "== preset: skipped (limit 0)" in log  # so does the comparison (PRESET_S > 0)
    assert "216 rows on cuda" in log and "14 rows on cuda" in log


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_times_the_grid_order_when_asked(tmp_path):
    """GRID_ORDER_S > 0: the causal rows again with SASOFTMAX_TRITON_SECTION_HEADS=0, their kernels compiled first
    (one process per head dim), into grid-order.md; skipped by default (the other test)."""
    steps = {name: "0" for name in ("VERSIONS_S", "WARM_S", "HOST_S", "KERNELS_S", "BIAS_S", "TRAIN_S", "TESTS_S")}
    log = dry_gpu_check(tmp_path, GRID_ORDER_S="60", **steps)
    for step in ("grid-order-warm", "grid-order"):
        assert f"== {step}: exit 0" in log
        assert f"== {step} (limit 60s): env SASOFTMAX_TRITON_SECTION_HEADS=0 " in log
    assert "--prefix grid-order " in log and "16 rows on cuda" in log and "causal yes" in log
    assert sum("--prefix warm-" in line for line in log.splitlines()) == 2
    assert "== kernels: skipped (limit 0)" in log


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_fuzzes_when_asked(tmp_path):
    """FUZZ_S > 0: tests/fuzz_backends.py into fuzz.log (in dry-run mode on no seeds), its last line in run.log;
    skipped by default (test_gpu_check_passes_valid_arguments)."""
    steps = {name: "0" for name in ("VERSIONS_S", "WARM_S", "HOST_S", "KERNELS_S", "BIAS_S", "TRAIN_S", "TESTS_S")}
    log = dry_gpu_check(tmp_path, FUZZ_S="60", **steps)
    assert "== fuzz: exit 0" in log and "0 of 0 seeds failed (cpu)" in log
    assert "0 of 0 seeds failed (cpu)" in (tmp_path / "fuzz.log").read_text()


def test_result_headers_name_the_triton_variables(monkeypatch):
    """A table measured with a SASOFTMAX_TRITON_* variable set (tiles, the causal schedule's sections) says so."""
    import gpu_common

    monkeypatch.setenv("SASOFTMAX_TRITON_SECTION_HEADS", "0")
    info = gpu_common.header("cpu", dtype="float32")
    assert info["SASOFTMAX_TRITON_SECTION_HEADS"] == "0"
    assert "dtype=float32, SASOFTMAX_TRITON_SECTION_HEADS=0" in gpu_common.describe(info)


def test_schedule_model(capsys):
    """benchmarks/schedule_model.py (the causal schedule's expected worth): the longest-first order never finishes
    later than the grid's in its model, and a grid of equal programs loses nothing either way."""
    import schedule_model

    schedule_model.main()
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 15
    for row in rows:
        grid, scheduled = float(row[3]), float(row[4])
        assert 1.0 <= scheduled <= grid, row
    assert schedule_model.finish([1.0] * 8, 4) == 2.0
    assert schedule_model.order(3, 2, 0) == [0, 1, 2, 0, 1, 2]
    assert schedule_model.order(3, 2, 2) == [2, 2, 1, 1, 0, 0]


@pytest.mark.skipif(not TRITON_ON_CPU, reason="runs its probe in Triton's interpreter (triton installed, no GPU)")
def test_warp_specialisation_probe_smoke(tmp_path):
    """benchmarks/triton_ws_probe.py: its probe of the forward loop equals PyTorch's softmax and sa_norm attention
    (checked inside before any timing), with and without warp specialisation, and the table carries the header."""
    import triton_ws_probe

    assert triton_ws_probe.main(["--smoke", "--out", str(tmp_path)]) == 0
    text, data = read(tmp_path, "ws-probe")
    assert [row["normalizer"] for row in data["rows"]] == ["softmax", "sa_norm"]
    assert all(row["max_diff"] == 0 and row["ratio"] > 0 and row["ours_ms"] > 0 for row in data["rows"])
    assert data["header"]["smoke"] is True and "| sa_norm | 32 | 16 |" in text


@pytest.mark.skipif(not TRITON_ON_CPU, reason="runs its probe in Triton's interpreter (triton installed, no GPU)")
def test_warp_specialisation_probe_stops_when_wrong(tmp_path, monkeypatch, capsys):
    """A probe that does not compute attention times nothing and writes nothing."""
    import triton_ws_probe

    monkeypatch.setattr(triton_ws_probe, "reference", lambda q, *args: torch.zeros(q.shape))
    assert triton_ws_probe.main(["--smoke", "--out", str(tmp_path)]) == 1
    assert "the probe is wrong" in capsys.readouterr().err
    assert not (tmp_path / "ws-probe.md").exists()


@pytest.mark.skipif(not TRITON_ON_CPU, reason="runs its probe in Triton's interpreter (triton installed, no GPU)")
def test_warp_specialisation_probe_records_a_failing_configuration(tmp_path, monkeypatch):
    """A configuration that fails (a compile error, too little shared memory) is a line of the table, and the other
    configurations are still timed."""
    import triton_ws_probe

    launch = triton_ws_probe.launch

    def failing(triton, probe, inputs, norm, ws, warps, stages, *blocks):
        if ws and stages == 3:
            raise RuntimeError("out of resource: shared memory")
        return launch(triton, probe, inputs, norm, ws, warps, stages, *blocks)

    monkeypatch.setattr(triton_ws_probe, "launch", failing)
    assert triton_ws_probe.main(["--smoke", "--out", str(tmp_path)]) == 0
    text, data = read(tmp_path, "ws-probe")
    assert all(row["ws_config"] == "16x16x4x2" and len(row["errors"]) == 1 for row in data["rows"])
    assert "with 16x16x4x3: RuntimeError: out of resource" in text
