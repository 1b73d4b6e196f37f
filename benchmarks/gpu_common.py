"""What the GPU benchmarks (triton_attention.py, gpu_train.py) share: the run header, timing, peak memory,
error text and writing results.

Scripts in this folder import it as ``gpu_common`` (Python puts the script's folder first on sys.path);
the tests add the folder to sys.path. Every result file is written atomically (a temporary file renamed
over the old one), so a run killed by ``timeout`` leaves the last complete table, never half a file.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def use_interpreter_on_cpu(device: str) -> None:
    """On CPU, run Triton kernels in Triton's interpreter (must happen before triton is first imported)."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


def cpu_name() -> str:
    from sasoftmax.machine import cpu_name as name  # (imported late: the scripts set up triton first)

    return name()


def git_commit() -> str:
    """$SASOFTMAX_COMMIT when set (a copied working tree may carry a stale .git), else the checkout's commit (with
    "+changes" when tracked files differ), else "unknown"."""
    from sasoftmax.machine import git_commit as checkout_commit

    return os.environ.get("SASOFTMAX_COMMIT") or checkout_commit(REPO) or "unknown"


def header(device: str, **settings: object) -> dict[str, object]:
    """Date (UTC), device name, library versions, git commit, the run's ``settings``, and the environment's
    ``SASOFTMAX_TRITON_*`` variables (tiles, the min term's way, the causal schedule's sections) where set."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
        free, total = torch.cuda.mem_get_info()
        memory = f"{total / 2**30:.0f} GiB"
    else:
        name, memory = cpu_name(), None
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": name,
        "device_memory": memory,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "python": platform.python_version(),
        "commit": git_commit(),
        **settings,
        **{name: value for name, value in os.environ.items() if name.startswith("SASOFTMAX_TRITON_")},
    }


def describe(info: dict[str, object]) -> str:
    """The header as Markdown lines."""
    lines = [
        f"- date: {info['date']}; device: {info['device']}"
        + (f" ({info['device_memory']})" if info.get("device_memory") else ""),
        f"- torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, "
        f"Python {info['python']}; commit {info['commit']}",
    ]
    settings = {k: v for k, v in info.items() if k not in {"date", "device", "device_memory", "torch", "triton",
                                                           "cuda", "cudnn", "python", "commit"}}  # fmt: skip
    if settings:
        lines.append("- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return "\n".join(lines)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(
    fn: Callable[[], object], device: str, warmup_ms: float = 25, rep_ms: float = 100, repeats: int = 3
) -> float:
    """Median milliseconds of one call of ``fn``, after one untimed call (compilation, autotuning).

    CUDA: ``triton.testing.do_bench`` (L2 flushed between calls, CUDA-event timing, median), unless one
    call takes over 50 ms (the eager backend at large N): then the median of ``repeats`` synchronised
    calls, which keeps slow rows to a few calls. CPU: wall clock, median of ``repeats`` calls.
    """

    def timed() -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return (time.perf_counter() - start) * 1e3

    fn()
    first = timed()
    if device == "cuda" and first <= 50:
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return statistics.median([first] + [timed() for _ in range(max(repeats, 1) - 1)])


def free_memory(device: str) -> int | None:
    """Bytes the CUDA allocator could still get (free on the card + cached by torch), None on CPU."""
    if device != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def extra_peak_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory (MiB) one call of ``fn`` allocates beyond what is allocated before it (the inputs).

    CUDA only (torch.cuda.max_memory_allocated, reset before the call); None on CPU.
    """
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def error_text(err: BaseException, limit: int = 160) -> str:
    """One line naming the error (OOM said plainly), at most ``limit`` characters."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "out of memory"
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_rows(script: str, run: Callable, args) -> int:
    """Run a benchmark's ``run(args)`` (which writes its files after every row): 0, or 1 with one line on stderr
    when it stops early, e.g. on a CUDA context broken by an earlier row."""
    use_interpreter_on_cpu(args.device)
    try:
        run(args)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        print(f"{script}: stopped: {error_text(err, 300)} (the rows measured so far are written)", file=sys.stderr)
        return 1
    return 0


def release(device: str) -> None:
    """Give cached blocks back after a provider, so the next one starts from the same free memory."""
    if device == "cuda":
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except RuntimeError:  # a broken CUDA context (e.g. an illegal address): the next row records it
            pass


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out: Path, prefix: str, title: str, info: dict, rows: list[dict], tables: str) -> None:
    """``out/prefix.md`` (title, header, tables) and ``out/prefix.json`` ({"header", "rows"})."""
    write_atomic(out / f"{prefix}.md", f"# {title}\n\n{describe(info)}\n\n{tables}\n")
    write_atomic(out / f"{prefix}.json", json.dumps({"header": info, "rows": rows}, indent=1) + "\n")


def fmt(x: float | None, digits: int = 2) -> str:
    """A number for a Markdown cell; "–" for None."""
    return "–" if x is None else f"{x:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def run_processes(commands: Sequence[Sequence[str]], workers: int, env: dict | None = None) -> list[int]:
    """Run ``commands`` in ``workers`` processes at a time (in ``env``, default this one's), their output discarded (a
    failing one's command and the tail of its stderr printed); their exit statuses. On KeyboardInterrupt (a caller's
    time limit sends SIGINT) no further process starts, the running ones are killed, and the interrupt propagates:
    none outlives the caller."""
    running: list[subprocess.Popen] = []
    lock, stopping = threading.Lock(), threading.Event()

    def run(command: Sequence[str]) -> int:
        with lock:  # no process starts once the interrupt has stopped the rest
            if stopping.is_set():
                return 1
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
            running.append(process)
        _, err = process.communicate()
        if process.returncode and not stopping.is_set():
            print(f"failed ({process.returncode}): {' '.join(command[2:])}\n{err[-2000:]}", flush=True)
        return process.returncode

    pool = ThreadPoolExecutor(workers)
    try:
        codes = list(pool.map(run, commands))
    except KeyboardInterrupt:
        with lock:
            stopping.set()
            for process in running:
                process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return codes
