"""Tile tuning of the Triton kernels on a GPU: candidate tiles per kernel, timed one kernel at a time.

    PYTHONPATH=src python3 benchmarks/triton_tune.py --out results           # on a GPU (~3-4 minutes)
    PYTHONPATH=src python3 benchmarks/triton_tune.py --smoke --out /tmp/s     # tiny, in the interpreter (tests)

For every (D, causal, normalizer) at one length N (FlashAttention's benchmark layout: model dim 2048, 16k
tokens, bf16), each kernel's candidate configs (BLOCK_M × BLOCK_N × warps × stages) are timed with the other
kernels at their defaults, through ``SASOFTMAX_TRITON_TILES``: ``fwd`` and ``extrema`` (sa_norm's first pass)
by the forward's time, ``dq`` and ``dkdv`` by the backward's (the same forward's graph, retained). The default
of ``sasoftmax.backends.triton._configs`` is always a candidate. A candidate that does not compile or launch
(shared memory, registers) is recorded with its error. The report gives the median ms per candidate, its ratio
to the default and the best per kernel; the best tiles go into ``_configs`` by hand once the full benchmark
(triton_attention.py) confirms them. Results are rewritten after every row into --out/<prefix>.md/.json.

Each candidate is a kernel variant Triton compiles on its first launch (seconds each, one at a time per process):
``--compile-workers W`` first launches every candidate once in W processes at a time, each a share of the plan
(``--compile-only I/W``, nothing timed or written), so that the timing run finds them in Triton's disk cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import gpu_common as common
import torch
import triton_attention

KERNELS = ("fwd", "extrema", "dq", "dkdv")
# BLOCK_M x BLOCK_N x warps x stages for 16-bit inputs on Hopper: around the defaults of every normalizer (softmax's
# 128-row tiles, sa_norm's tuned 64-row ones), Triton's fused-attention tutorial and FlashAttention-2's shapes. On an
# H200 (session 11) sa_norm's smaller tiles won by 4–15%, so smaller ones are candidates too; on an H100 (session 13)
# row_extrema's narrowest, 64×16, won, so narrower and fewer-warp ones are candidates now, and dq 128×64 at 8 warps
# won for softmax at D = 128 where 32×32 never came within 1.5× of the best. Compiled in parallel
# (--compile-workers), a candidate costs ~0.5 s.
CANDIDATES = {
    "fwd": ["128x64x4x3", "128x64x8x3", "128x128x8x3", "128x32x4x4", "64x64x4x3", "64x64x4x4", "64x128x4x3",
            "64x32x4x4"],
    "extrema": ["128x64x8x3", "64x32x4x3", "64x16x4x3", "32x32x4x3", "32x16x4x3", "128x16x4x3", "64x16x4x4",
                "64x16x2x3"],
    "dq": ["128x32x4x3", "64x32x4x3", "64x32x4x4", "64x64x4x3", "64x16x4x3", "128x64x4x3", "128x64x8x3", "128x32x8x2"],
    "dkdv": ["32x128x4x3", "64x64x4x3", "32x64x4x3", "64x128x8x3", "32x64x4x4", "64x64x4x4", "16x64x4x3",
             "32x128x8x2"],
}  # fmt: skip
SMOKE_CANDIDATES = {name: ["16x16x4x1", "32x16x4x1"] for name in KERNELS}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BIASES = ("none", "alibi", "kerple", "fire")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-tune", help="directory for <prefix>.md and <prefix>.json")
    parser.add_argument("--prefix", default="tune", help="file name stem of the results (default tune)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default cuda (cpu with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes in Triton's interpreter, to test the code")
    parser.add_argument("--length", type=int, help="N (default 4096; smoke 32)")
    parser.add_argument("--head-dims", type=int, nargs="+", help="D (default 64 128; smoke 16)")
    parser.add_argument("--model-dim", type=int, help="H·D (default 2048; smoke 32)")
    parser.add_argument("--tokens", type=int, help="B·N tokens (default 16384; smoke 64)")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--normalizers", nargs="+", default=["sa_norm"], choices=("softmax", "sa", "sa_norm"))
    parser.add_argument(
        "--bias", choices=BIASES, default="none",
        help="a positional bias in every call (as triton_attention.py's rows; r1, r2 and FIRE's MLP take gradients)",
    )  # fmt: skip
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--dtype", choices=list(DTYPES), help="default bfloat16 (smoke float32)")
    parser.add_argument("--warmup-ms", type=float, default=10, help="do_bench warm-up (ms)")
    parser.add_argument("--rep-ms", type=float, default=40, help="do_bench measuring time (ms)")
    parser.add_argument(
        "--candidates", nargs="+", metavar="KERNEL:BMxBNxWxS",
        help="these candidates instead of the built-in ones, for the kernels they name (e.g. dq:64x32x4x4)",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, time nothing")
    parser.add_argument(
        "--compile-workers", type=int, default=0, metavar="W",
        help="first compile every candidate in W processes at a time (default 0: each compiles as it is timed)",
    )  # fmt: skip
    parser.add_argument("--compile-only", metavar="I/W", help=argparse.SUPPRESS)  # one compiling process's share
    args = parser.parse_args(argv)
    if args.compile_workers < 0:
        parser.error(f"--compile-workers must be >= 0; got {args.compile_workers}")
    args.candidate_specs = {}
    for item in args.candidates or []:
        kernel, _, spec = item.partition(":")
        numbers = spec.split("x")
        if kernel not in KERNELS or len(numbers) != 4 or not all(n.isdigit() and int(n) > 0 for n in numbers):
            parser.error(f"--candidates expects KERNEL:BMxBNxWARPSxSTAGES with KERNEL in {KERNELS}; got {item!r}")
        args.candidate_specs.setdefault(kernel, []).append(spec)
    args.share = None
    if args.compile_only is not None:
        index, _, workers = args.compile_only.partition("/")
        if not (index.isdigit() and workers.isdigit() and int(index) < int(workers)):
            parser.error(f"--compile-only expects I/W with 0 <= I < W; got {args.compile_only!r}")
        args.share = (int(index), int(workers))
    smoke = args.smoke
    args.device = args.device or ("cpu" if smoke else "cuda")
    args.length = args.length or (32 if smoke else 4096)
    args.head_dims = args.head_dims or ([16] if smoke else [64, 128])
    args.model_dim = args.model_dim or (32 if smoke else 2048)
    args.tokens = args.tokens or (64 if smoke else 16384)
    args.dtype = args.dtype or ("float32" if smoke else "bfloat16")
    for d in args.head_dims:
        if args.model_dim % d:
            parser.error(f"--model-dim ({args.model_dim}) must be a multiple of every head dim (got {d})")
    if args.tokens % args.length:
        parser.error(f"--tokens ({args.tokens}) must be a multiple of --length ({args.length})")
    return args


def time_candidate(
    args, kernel: str, spec: str, q, k, v, do, normalizer: str, causal: bool, bias=None, params=()
) -> float | None:
    """Median ms of the forward (fwd, extrema) or the backward (dq, dkdv, also of ``params``) with ``kernel``'s tiles
    set to ``spec``, the other kernels' at their defaults; with ``--compile-only``, one untimed launch (None)."""
    from sasoftmax import attention

    before = os.environ.get("SASOFTMAX_TRITON_TILES")
    os.environ["SASOFTMAX_TRITON_TILES"] = f"{kernel}:{spec}"
    try:

        def forward():
            return attention(q, k, v, normalizer=normalizer, causal=causal, bias=bias, backend="triton")

        if kernel in ("fwd", "extrema"):
            with torch.no_grad():
                if args.share:
                    forward()
                    return None
                return common.median_ms(forward, args.device, args.warmup_ms, args.rep_ms)
        out = forward()
        inputs = (q, k, v, *params)
        if args.share:
            torch.autograd.grad(out, inputs, do)
            return None
        return common.median_ms(
            lambda: torch.autograd.grad(out, inputs, do, retain_graph=True), args.device, args.warmup_ms, args.rep_ms
        )
    finally:  # whatever the environment had before
        if before is None:
            os.environ.pop("SASOFTMAX_TRITON_TILES", None)
        else:
            os.environ["SASOFTMAX_TRITON_TILES"] = before


def default_spec(kernel: str, d: int, dtype: torch.dtype, normalizer: str, bias: str = "none") -> str:
    from sasoftmax import NORMALIZERS
    from sasoftmax.backends import triton as backend

    kinds = {"none": backend.NO_BIAS, "alibi": backend.ALIBI, "kerple": backend.KERPLE_LOG, "fire": backend.TABLE}
    c = backend._configs(d, d, dtype, kinds[bias], NORMALIZERS.index(normalizer))[kernel]
    return f"{c.block_m}x{c.block_n}x{c.num_warps}x{c.num_stages}"


def table(rows: list[dict]) -> str:
    lines = [
        "| D | causal | normalizer | kernel | tiles (BM×BN×warps×stages) | ms | × default | note |",
        "| ---: | :---: | --- | --- | --- | ---: | ---: | --- |",
    ]
    best = {}
    for r in rows:
        group = (r["d"], r["causal"], r["normalizer"], r["kernel"])
        if r["ms"] is not None and (group not in best or r["ms"] < best[group]["ms"]):
            best[group] = r
    for r in rows:
        group = (r["d"], r["causal"], r["normalizer"], r["kernel"])
        tiles = f"**{r['tiles']}**" if best.get(group) is r else r["tiles"]
        note = ("default; " if r["default"] else "") + r["note"].replace("|", "/")
        lines.append(
            f"| {r['d']} | {'yes' if r['causal'] else 'no'} | {r['normalizer']} | {r['kernel']} | {tiles} | "
            f"{common.fmt(r['ms'], 3)} | {common.fmt(r['x default'])} | {note.strip('; ')} |"
        )
    return "Fastest tiles per kernel in bold.\n\n" + "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("triton_tune.py: no CUDA GPU here (torch.cuda.is_available() is False); use --smoke")
    dtype = DTYPES[args.dtype]
    batch = args.tokens // args.length
    info = common.header(
        args.device, N=args.length, batch=batch, model_dim=args.model_dim, dtype=args.dtype, bias=args.bias,
        timing="triton.testing.do_bench median" if args.device == "cuda" else "wall clock (interpreter)",
    )  # fmt: skip
    out = Path(args.out)
    rows: list[dict] = []
    gen = torch.Generator(device=args.device).manual_seed(0)
    inputs = {}
    launched = 0  # candidates in plan order, for --compile-only's share
    for d, causal, normalizer, kernel, candidates in plan(args):
        if d not in inputs:
            inputs.clear()  # one head dim's tensors at a time (the plan alternates them)
            shape = (batch, args.model_dim // d, args.length, d)
            inputs[d] = [torch.randn(shape, generator=gen, device=args.device).to(dtype) for _ in range(4)]
            for t in inputs[d][:3]:
                t.requires_grad_()
        q, k, v, do = inputs[d]
        bias, params = None, []
        if args.bias != "none":  # the bias and its parameters (r1, r2, FIRE's MLP), fresh for each kernel's group
            shape = triton_attention.Shape(args.length, batch, args.model_dim // d, d, causal, dtype, args.device)
            biases = triton_attention.Biases(shape)
            bias, params = biases.forms[args.bias], biases.parameters[args.bias]
        default = default_spec(kernel, d, dtype, normalizer, args.bias)
        group = []
        for spec in dict.fromkeys([default] + candidates):
            launched += 1
            if args.share and (launched - 1) % args.share[1] != args.share[0]:
                continue
            row = {"d": d, "causal": causal, "normalizer": normalizer, "kernel": kernel, "tiles": spec,
                   "default": spec == default, "ms": None, "x default": None, "note": ""}  # fmt: skip
            try:
                row["ms"] = time_candidate(args, kernel, spec, q, k, v, do, normalizer, causal, bias, params)
            except Exception as err:  # noqa: BLE001 - a candidate that does not fit is a result
                row["note"] = common.error_text(err)
            common.release(args.device)
            if args.share:
                print(f"compiled D={d} causal={causal} {normalizer} {kernel} {spec} {row['note']}", flush=True)
                continue
            group.append(row)
            rows.append(row)
            for r in group:
                r["x default"] = common.ratio(r["ms"], group[0]["ms"])
            print(f"D={d} causal={causal} {normalizer} {kernel} {spec}: {common.fmt(row['ms'], 3)} ms {row['note']}",
                  flush=True)  # fmt: skip
            common.write_results(out, args.prefix, "Triton tile tuning", info, rows, table(rows))
    if not args.share:
        print(f"\nwrote {out / (args.prefix + '.md')} and {out / (args.prefix + '.json')}")
    return rows


def compile_all(args: argparse.Namespace, argv: list[str]) -> None:
    """Launch every candidate of the plan once, in ``--compile-workers`` processes at a time (each this script with
    ``--compile-only I/W``), so that Triton's disk cache holds them before anything is timed. A failing process
    is reported and the timing goes on (it compiles what is missing itself). SIGINT (gpu_check.sh's time limit)
    stops every process."""
    workers = args.compile_workers
    base = [sys.executable, str(Path(__file__).resolve()), *argv, "--compile-workers", "0"]
    start = time.perf_counter()
    codes = common.run_processes([[*base, "--compile-only", f"{index}/{workers}"] for index in range(workers)], workers)
    print(f"compiled the candidates in {workers} processes in {time.perf_counter() - start:.0f} s; "
          f"{sum(map(bool, codes))} failed", flush=True)  # fmt: skip


def plan(args: argparse.Namespace) -> list[tuple]:
    """(D, causal, normalizer, kernel, candidates) in the order they are timed; ``run`` puts the kernel's default
    tiles before the candidates (the dry run imports no sasoftmax, so it counts one more per group)."""
    candidates = {**(SMOKE_CANDIDATES if args.smoke else CANDIDATES), **args.candidate_specs}
    causal_values = {"both": (True, False), "yes": (True,), "no": (False,)}[args.causal]
    return [  # causal first: what training runs, in case a time limit cuts the run short
        (d, causal, normalizer, kernel, candidates[kernel])
        for causal in causal_values
        for d in args.head_dims
        for normalizer in args.normalizers
        for kernel in args.kernels
        if kernel != "extrema" or normalizer == "sa_norm"  # only sa_norm runs row_extrema
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        groups = plan(args)
        print(
            f"dry run: {len(groups)} kernel groups, up to {sum(len(g[-1]) + 1 for g in groups)} candidates on "
            f"{args.device}: N={args.length}, D {args.head_dims}, {args.normalizers}, {args.kernels}, bias "
            f"{args.bias}; nothing timed"
        )
        return 0
    if args.compile_workers and not args.share:
        compile_all(args, sys.argv[1:] if argv is None else argv)
    return common.run_rows("triton_tune.py", run, args)


if __name__ == "__main__":
    sys.exit(main())
