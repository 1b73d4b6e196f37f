"""Benchmark of the attention backends against ``scaled_dot_product_attention`` (SDPA) softmax.

For each length N, causal or not, and each implementation (SDPA softmax; every normalizer through the
``cpu`` and ``eager`` backends) it measures

- forward time (under ``torch.no_grad``) and forward+backward time: medians over ``--repeats`` runs
  after a warm-up, with the implementations interleaved in every repeat so that a busy machine slows
  them alike;
- extra peak memory of forward+backward: each case runs in a fresh Python process (Linux): after a
  warm-up run the peak resident set is reset, and the extra is the growth of the peak over the
  resident set just before a second run, with the inputs already allocated (so it counts outputs,
  gradients and every temporary, torch's or not). glibc is told to return large freed blocks at
  once (MALLOC_MMAP_THRESHOLD_), so the resident set follows the live memory.

With ``--bias alibi|kerple|fire`` every implementation gets that positional bias (the harness's ``ALiBi``,
``Kerple`` (log) or ``FIRE`` module, seeded): the sasoftmax backends as the harness passes it (a
:class:`~sasoftmax.RelativeBias`, which the cpu backend's fused kernels evaluate themselves; FIRE's is a table
of its MLP per distance, its threshold being N), SDPA as a materialised float ``attn_mask``.

Ratios are against SDPA in the same run. Results print as a Markdown table and can be written as
Markdown or JSON. ``sasoftmax bench`` and ``benchmarks/attention.py`` run it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .machine import cpu_name
from .normalizers import NORMALIZERS
from .positional import make_positional

QUICK_LENGTHS = (512, 1024, 2048)
FULL_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
BIASES = ("none", "alibi", "kerple", "fire")
BIAS_FREE = " no bias"
"""Suffix of the implementations timed without the bias by ``--bias-free``."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class Case:
    """One implementation at one size: ``impl`` is "sdpa" or "<backend>:<normalizer>" (plus :data:`BIAS_FREE` for
    a bias-free row of ``--bias-free``, whose ``bias`` is "none")."""

    impl: str
    n: int
    causal: bool
    batch: int
    heads: int
    head_dim: int
    dtype: str
    threads: int
    bias: str = "none"
    kv_heads: int | None = None  # grouped-query attention: fewer k/v heads (None: as many as query heads)
    queries: int | None = None  # query length (None: N); 1 is a decoding step against N keys


@dataclass
class Row:
    impl: str
    n: int
    causal: bool
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    extra_mib: float | None = None
    fwd_ratio: float | None = None
    fwd_bwd_ratio: float | None = None
    memory_ratio: float | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser``."""
    parser.add_argument("--lengths", type=int, nargs="+", help=f"sequence lengths N (default {QUICK_LENGTHS})")
    parser.add_argument("--full", action="store_true", help=f"lengths {FULL_LENGTHS} (the default is --quick)")
    parser.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS}, minutes on 2 cores (default)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, help="k/v heads for grouped-query attention (default: --heads)")
    parser.add_argument(
        "--queries", type=int, help="query length against N keys (default N; 1 times a decoding step)"
    )
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--normalizers", nargs="+", choices=NORMALIZERS, default=list(NORMALIZERS))
    parser.add_argument("--backends", nargs="+", choices=("cpu", "eager"), default=["cpu", "eager"])
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument(
        "--bias",
        choices=BIASES,
        default="none",
        help="a positional bias: alibi (-slope_h·|i - j|), kerple (-r1_h·ln(1 + r2_h·|i - j|)) or fire (an MLP "
        "of the distance); the sasoftmax backends get each as a RelativeBias (fire's a table per distance), "
        "evaluated inside the cpu backend's fused kernels, with gradients for the "
        "bias's parameters; SDPA a float attn_mask (H, N, N) built before the timing (an input, so not in its "
        "extra memory)",
    )
    parser.add_argument(
        "--bias-free",
        action="store_true",
        help="with --bias: also time each cpu implementation without the bias (rows named '<impl> no bias'), "
        "interleaved in the same run, to give the bias's cost as a ratio",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: time.perf_counter; cpu: CPU time of this process (time.process_time), steadier with 1 "
        "thread on a busy machine, where other processes take turns on the cores",
    )
    parser.add_argument(
        "--eager-max-length",
        type=int,
        default=4096,
        help="skip the eager backend above this N (it holds several N×N tensors: ~5 GiB at 4096, B=1, H=8)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-time", action="store_true", help="skip the timing")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); returns an exit code."""
    lengths = args.lengths or (FULL_LENGTHS if args.full else QUICK_LENGTHS)
    if any(n <= 0 for n in lengths) or args.repeats <= 0 or args.threads <= 0:
        raise ValueError("lengths, --repeats and --threads must be positive")
    for name in ("batch", "heads", "head_dim"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive; got {getattr(args, name)}")
    if args.kv_heads is not None and not (0 < args.kv_heads <= args.heads and args.heads % args.kv_heads == 0):
        raise ValueError(f"--kv-heads must divide --heads ({args.heads}); got {args.kv_heads}")
    if args.queries is not None and args.queries <= 0:
        raise ValueError(f"--queries must be positive; got {args.queries}")
    torch.set_num_threads(args.threads)
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    groups = [(n, causal, _cases(args, n, causal)) for n in lengths for causal in causals]
    print(_settings_line(args, lengths, groups), flush=True)
    work = sum((0 if args.no_time else 1) + (0 if args.no_memory else len(cases)) for _, _, cases in groups)
    progress = _Progress(work)
    rows: list[Row] = []
    try:
        for n, causal, cases in groups:
            results = {c.impl: Row(c.impl, n, causal) for c in cases}
            if not args.no_time:
                progress.describe(f"N={n}{' causal' if causal else ''}: timing {len(cases)} implementations")
                for impl, (fwd, both) in time_cases(cases, args.repeats, args.clock).items():
                    results[impl].fwd_ms, results[impl].fwd_bwd_ms = fwd, both
                progress.step()
            if not args.no_memory:
                for case in cases:
                    progress.describe(f"N={n}{' causal' if causal else ''}: memory of {case.impl}")
                    results[case.impl].extra_mib = peak_memory(case)
                    progress.step()
            base = results["sdpa"]
            for row in results.values():
                row.fwd_ratio = _ratio(row.fwd_ms, base.fwd_ms)
                row.fwd_bwd_ratio = _ratio(row.fwd_bwd_ms, base.fwd_bwd_ms)
                row.memory_ratio = _ratio(row.extra_mib, base.extra_mib)
            rows.extend(results.values())
            progress.write(markdown_table(list(results.values())))
    finally:
        progress.close()
    info = machine_info(args)
    table = markdown_table(rows)
    print("\n" + _describe(info) + "\n\n" + table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(_describe(info) + "\n\n" + table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": [asdict(r) for r in rows]}, f, indent=2)
    return 0


def _cases(args: argparse.Namespace, n: int, causal: bool) -> list:
    """SDPA first, then every backend × normalizer (eager only up to --eager-max-length), and with --bias-free the
    cpu calls again without the bias, timed in the same run."""
    cases = [_case(args, "sdpa", n, causal)] + [
        _case(args, f"{backend}:{normalizer}", n, causal)
        for backend in args.backends
        for normalizer in args.normalizers
        if backend != "eager" or n <= args.eager_max_length
    ]
    if args.bias_free and args.bias != "none":
        cases += [replace(c, impl=c.impl + BIAS_FREE, bias="none") for c in cases[1:] if c.impl.startswith("cpu:")]
    return cases


def _settings_line(args: argparse.Namespace, lengths, groups) -> str:
    """What the benchmark is about to measure, printed before it starts."""
    impls = sorted({case.impl for _, _, cases in groups for case in cases})
    what = " and ".join(w for w, skip in (("time", args.no_time), ("peak memory", args.no_memory)) if not skip)
    return (
        f"bench: {what or 'nothing'} of {', '.join(impls)} at N = {', '.join(map(str, lengths))} "
        f"(causal: {args.causal}); B={args.batch}, H={args.heads}"
        + (f", Hkv={args.kv_heads}" if args.kv_heads else "")
        + (f", L={args.queries}" if args.queries else "")
        + f", D={args.head_dim}, {args.dtype}"
        + (f", {args.bias} bias" if args.bias != "none" else "")
        + f"; {args.repeats} timed repeats ({args.clock} clock), {args.threads} torch threads; eager above N = "
        f"{args.eager_max_length} skipped; {len(groups)} (N, causal) groups"
    )


class _Progress:
    """A tqdm bar with ETA on stderr (plain lines without tqdm); tables go through :meth:`write`."""

    def __init__(self, total: int) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc="bench", unit="step", dynamic_ncols=True,
                            bar_format="{desc}: {n}/{total} |{bar}| {elapsed} elapsed, ETA {remaining} {postfix}")

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        else:
            print(f"bench: {text}", file=sys.stderr, flush=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _case(args: argparse.Namespace, impl: str, n: int, causal: bool) -> Case:
    return Case(
        impl, n, causal, args.batch, args.heads, args.head_dim, args.dtype, args.threads, args.bias, args.kv_heads,
        args.queries,
    )  # fmt: skip


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def make_inputs(case: Case, requires_grad: bool) -> tuple[torch.Tensor, ...]:
    """q (B, H, L, D), k, v (B, Hkv, N, D) and an output gradient, seeded."""
    g = torch.Generator().manual_seed(0)
    lq, hkv = case.queries or case.n, case.kv_heads or case.heads
    dtype = DTYPES[case.dtype]
    q, grad = (torch.randn(case.batch, case.heads, lq, case.head_dim, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(case.batch, hkv, case.n, case.head_dim, generator=g).to(dtype) for _ in range(2))
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, grad


def positional_bias(case: Case) -> nn.Module | None:
    """The positional module ``case.bias`` names, seeded, with the harness's initialisation (None for "none").
    Kerple's and FIRE's parameters require grad, as in training; ALiBi's slopes are fixed. Parameters are float32
    (float64 for float64 inputs)."""
    if case.bias == "none":
        return None
    torch.manual_seed(0)
    module = make_positional(case.bias, case.heads, case.head_dim, train_len=case.n)
    return module.double() if case.dtype == "float64" else module


def operation(case: Case) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The attention call that ``case.impl`` names (with ``case.bias``, materialised here for SDPA)."""
    module = positional_bias(case)
    if case.impl == "sdpa":
        bias = None if module is None else (lambda q_pos, k_pos: module(q_pos, k_pos).detach()[0])
        gqa = case.kv_heads not in (None, case.heads)
        lq = case.queries or case.n
        if bias is None and lq == case.n:
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=gqa)
        # SDPA's is_causal aligns queries to the first keys; sasoftmax's causal aligns them to the last ones
        # (query i is at position i + N − L), so other query lengths and biases get an explicit mask.
        q_pos, k_pos = torch.arange(lq) + case.n - lq, torch.arange(case.n)
        allowed = k_pos[None, :] <= q_pos[:, None] if case.causal else torch.ones(lq, case.n, dtype=torch.bool)
        mask: torch.Tensor | None = None
        if bias is not None:
            mask = bias(q_pos, k_pos).to(DTYPES[case.dtype]).masked_fill(~allowed, float("-inf"))
        elif not allowed.all():
            mask = allowed
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    backend, normalizer = case.impl.removesuffix(BIAS_FREE).split(":")
    # The module itself as bias=: attention() takes ALiBi's and Kerple's RelativeBias from it at every call.
    return lambda q, k, v: attention(q, k, v, normalizer=normalizer, causal=case.causal, bias=module, backend=backend)


def time_cases(cases: list[Case], repeats: int, clock: str = "wall") -> dict[str, tuple[float, float]]:
    """Median forward and forward+backward milliseconds per implementation, interleaved per repeat."""
    now = time.perf_counter if clock == "wall" else time.process_time
    setups = []
    for case in cases:
        q, k, v, grad = make_inputs(case, requires_grad=True)
        setups.append((case.impl, operation(case), q, k, v, grad))
    samples: dict[str, tuple[list[float], list[float]]] = {impl: ([], []) for impl, *_ in setups}
    for rep in range(repeats + 1):  # the first round warms up (and builds the cpu kernels)
        for impl, op, q, k, v, grad in setups:
            start = now()
            with torch.no_grad():
                op(q, k, v)
            mid = now()
            op(q, k, v).backward(grad)
            end = now()
            q.grad = k.grad = v.grad = None
            if rep:
                samples[impl][0].append((mid - start) * 1e3)
                samples[impl][1].append((end - mid) * 1e3)
    return {impl: (statistics.median(f), statistics.median(b)) for impl, (f, b) in samples.items()}


def peak_memory(case: Case) -> float | None:
    """Extra peak memory (MiB) of one forward+backward of ``case``, measured in a fresh process."""
    code = "import sys; from sasoftmax.benchmark import _memory_child; _memory_child(sys.argv[1])"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # large blocks are mmapped and unmapped on free
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(asdict(case))], capture_output=True, text=True, check=False, env=env
    )
    if proc.returncode != 0:
        print(f"memory of {case.impl} at N={case.n} failed: {proc.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return float(proc.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _memory_child(spec: str) -> None:
    """Print the extra peak resident memory (MiB) of one forward+backward of the case in ``spec``.

    A warm-up run at full size first (thread pools, library workspaces), then the peak is reset
    (/proc/self/clear_refs) and the second run's peak over the resident set before it is reported.
    The parent sets MALLOC_MMAP_THRESHOLD_ so that freed blocks leave the resident set at once.
    """
    case = Case(**json.loads(spec))
    torch.set_num_threads(case.threads)
    op = operation(case)
    q, k, v, grad = make_inputs(case, requires_grad=True)
    op(q, k, v).backward(grad)
    q.grad = k.grad = v.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current one
    before = _status_kib("VmRSS")
    op(q, k, v).backward(grad)
    print(max(0, _status_kib("VmHWM") - before) / 1024)


def machine_info(args: argparse.Namespace) -> dict[str, object]:
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "batch": args.batch,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "queries": args.queries,
        "head_dim": args.head_dim,
        "dtype": args.dtype,
        "bias": args.bias,
        "repeats": args.repeats,
        "clock": args.clock,
    }


def _describe(info: dict[str, object]) -> str:
    return (
        f"{info['date']}; {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, "
        f"load average {info['load_average_1min']} at the end; torch {info['torch']}; "
        f"B={info['batch']}, H={info['heads']}"
        + (f", Hkv={info['kv_heads']}" if info["kv_heads"] else "")
        + (f", L={info['queries']}" if info["queries"] else "")
        + f", D={info['head_dim']}, {info['dtype']}"
        + (f", {info['bias']} bias" if info["bias"] != "none" else "")
        + "; "
        f"medians of {info['repeats']} runs ({info['clock']} clock); ratios against SDPA softmax in the same run."
    )


def markdown_table(rows: list[Row]) -> str:
    """The results as a Markdown table."""

    def fmt(x: float | None, digits: int = 1) -> str:
        return "–" if x is None else f"{x:.{digits}f}"

    lines = [
        "| N | causal | implementation | fwd ms | × SDPA | fwd+bwd ms | × SDPA | extra peak MiB | × SDPA |",
        "| ---: | :---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.n} | {'yes' if r.causal else 'no'} | {r.impl} | {fmt(r.fwd_ms)} | {fmt(r.fwd_ratio, 2)} | "
            f"{fmt(r.fwd_bwd_ms)} | {fmt(r.fwd_bwd_ratio, 2)} | {fmt(r.extra_mib)} | {fmt(r.memory_ratio, 2)} |"
        )
    return "\n".join(lines)
