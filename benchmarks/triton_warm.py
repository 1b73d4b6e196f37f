"""Compile the Triton kernels that runs of ``triton_attention.py`` and ``gpu_train.py`` will launch, in parallel
processes, before they run.

Triton compiles a kernel variant on its first launch, one at a time per process, and caches it on disk; a cold
H100 (2026-11-26) ran out of the benchmarks' time limits compiling. This runs ``triton_attention.py`` with the
given arguments split into one process per (head dim, causal, bias), each on tiny problems that launch the same
compiled variants (same head dim, dtype, flags and tiles; lengths divisible by 16 like the real ones; N = 256 and,
where the given lengths reach sa_norm's scattered min term, ``MIN_TERM_SCATTER_KEYS`` keys), and discards their
timings. Only the sasoftmax providers are run. With ``--train-seqs``, each triton row of the training benchmark
(``gpu_train.GPU_ROWS``, or ``--train-rows``) also trains one step of a one-layer model at those lengths in a
process of its own (the same kernel variants as the 12-layer model's); with ``--host``, each call of
``triton_host.py`` in a process of its own. Nothing here measures anything.

    PYTHONPATH=src python3 benchmarks/triton_warm.py --workers 12 --train-seqs 1024 4096 \
        -- --head-dims 64 128 -- --bias kerple --causal yes

(each ``--`` starts the arguments of one benchmark run, as ``triton_attention.py`` takes them).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import gpu_common as common
import gpu_train
import triton_attention


def commands(bench: argparse.Namespace, out: str) -> list[list[str]]:
    """One triton_attention.py command line per (head dim, causal, bias) of the benchmark's arguments."""
    from sasoftmax.backends.triton import MIN_TERM_SCATTER_KEYS

    providers = [p for p in bench.providers if not p.startswith(("sdpa", "flash-attn", "eager"))]
    if not providers:
        return []
    lengths = ["256"] + ([str(MIN_TERM_SCATTER_KEYS)] if max(bench.lengths) >= MIN_TERM_SCATTER_KEYS else [])
    causals = {"both": ("yes", "no"), "yes": ("yes",), "no": ("no",)}[bench.causal]
    script = str(Path(__file__).with_name("triton_attention.py"))
    return [
        [sys.executable, script, "--out", out, "--prefix", f"warm-{d}-{causal}-{bias}", "--lengths", *lengths,
         "--tokens", "256", "--model-dim", str(bench.model_dim), "--head-dims", str(d), "--causal", causal,
         "--bias", bias, "--modes", "fwd+bwd", "--providers", *providers, "--dtype", bench.dtype, "--no-memory",
         "--device", bench.device,
         "--warmup-ms", "1", "--rep-ms", "1"]
        for d, causal, bias in itertools.product(bench.head_dims, causals, bench.bias)
    ]  # fmt: skip


def train_commands(rows: list[str], seqs: list[int], out: str) -> list[list[str]]:
    """One gpu_train.py command line per triton row: a one-layer model, one step per length (its own baseline, so
    that no SDPA row runs)."""
    script = str(Path(__file__).with_name("gpu_train.py"))
    return [
        [sys.executable, script, "--out", out, "--prefix", f"warm-train-{index}", "--rows", row, "--baseline", row,
         "--seqs", *map(str, seqs), "--layers", "1", "--warmup", "1", "--steps", "1"]
        for index, row in enumerate(rows) if row.startswith("triton:")
    ]  # fmt: skip


def host_commands(device: str, out: str) -> list[list[str]]:
    """One triton_host.py command line per row (its smoke size: every way runs a few calls)."""
    import triton_host

    script = str(Path(__file__).with_name("triton_host.py"))
    return [[sys.executable, script, "--device", device, "--smoke", "--rows", row, "--out", f"{out}/host-{index}"]
            for index, row in enumerate(triton_host.ROWS)]  # fmt: skip


def plan(argv: list[str], out: str) -> tuple[argparse.Namespace, list[tuple[str, ...]]]:
    """This script's own arguments, and its command lines (writing into ``out``), from ``argv``."""
    groups: list[list[str]] = [[]]  # its own arguments, then one list per benchmark run, each after a "--"
    for word in argv:
        if word == "--":
            groups.append([])
        else:
            groups[-1].append(word)
    own, runs = groups[0], groups[1:] or [[]]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=12, help="processes at a time (default 12)")
    parser.add_argument("--train-seqs", type=int, nargs="+", default=[], help="training lengths to compile for")
    parser.add_argument("--train-rows", nargs="+", default=gpu_train.GPU_ROWS, help="training rows (default: all)")
    parser.add_argument("--host", choices=("cuda", "cpu"), help="also triton_host.py's calls, on this device")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(own)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1; got {args.workers}")
    benches = [triton_attention.parse_args(run) for run in runs]
    for row in args.train_rows:
        try:
            gpu_train.parse_row(row)
        except ValueError as err:
            parser.error(str(err))
    # the training rows first: each compiles several lengths' kernels one after another, the longest jobs
    todo = [tuple(c) for c in train_commands(args.train_rows, args.train_seqs, out)] if args.train_seqs else []
    todo += [tuple(c) for c in host_commands(args.host, out)] if args.host else []
    todo += list(dict.fromkeys(tuple(c) for bench in benches for c in commands(bench, out)))
    return args, todo


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory(prefix="triton-warm-") as out:
        args, todo = plan(argv, out)
        if args.dry_run:
            print("\n".join(" ".join(c) for c in todo))
            return 0
        start = time.perf_counter()
        try:
            codes = common.run_processes(todo, args.workers)
        except KeyboardInterrupt:  # the caller's time limit (SIGINT): no compiling process outlives it
            print(f"interrupted after {time.perf_counter() - start:.0f} s; the compiling processes stopped", flush=True)
            return 130
        failed = sum(map(bool, codes))
        print(f"compiled the kernels of {len(todo)} groups in {time.perf_counter() - start:.0f} s; {failed} failed")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
