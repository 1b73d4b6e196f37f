"""GPU training throughput of the harness GPT: tokens/s and peak memory per attention, against SDPA softmax.

    PYTHONPATH=src python3 benchmarks/gpu_train.py --out results                 # the GPU run
    PYTHONPATH=src python3 benchmarks/gpu_train.py --smoke --out /tmp/smoke      # tiny, on CPU (tests)

The model is the harness's GPT (``sasoftmax.models.gpt``; 12 layers × 768, 12 heads, byte vocabulary, RoPE
unless a row says otherwise) trained as ``sasoftmax train`` does: bf16 autocast on CUDA, AdamW with the
harness's parameter groups, gradient clipping at 1.0. Each step is one batch of --tokens tokens (B = tokens
/ seq, random tokens: throughput does not depend on the data). Per row and sequence length: --warmup
steps, then --steps timed steps (CUDA synchronised around each); it reports the median step's tokens/s,
the median time the host took to issue a step (until the step's Python returns: close to the step's time,
the host sets the pace), on CUDA how many times one more step waited for the device in an operation that
PyTorch knows to synchronise (``torch.cuda.set_sync_debug_mode``: a host read of a device value), the peak
memory allocated during the timed steps (all of it, and the part above the model and optimizer state held
before them), the loss after the last step (a NaN shows a broken kernel), and
the ratio of tokens/s to the baseline row (default ``sdpa:softmax``: the same model with PyTorch's
``scaled_dot_product_attention``, via sasoftmax's ``sdpa`` backend) and, for a row with another positional
encoding, to the same row with RoPE.

Rows (``--rows``) are ``<backend>:<normalizer>[+ssmax][@<pos>]``: backend sdpa/triton/eager/cpu,
normalizer softmax/sa/sa_norm, ``+ssmax`` a learnable SSMax scale (s = 0.43), ``@pos`` a positional
encoding of the harness (default rope; e.g. ``@kerple``). A row that fails (out of memory, a call the
backend does not serve) is recorded with its error and the run goes on. Results are rewritten after every
row into --out/<prefix>.md and --out/<prefix>.json. ``--profile STEPS`` adds, per row at the first length (or
``--profile-seq``),
tables of where a row's time goes: the kernels with the most device time per step and the host entries (operators,
CUDA runtime and driver calls) with the most CPU time per step (torch.profiler), and the Python functions with the
most own time per step (cProfile, as many steps again); those rows are profiled after every row is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import gpu_common as common
import torch

GPU_ROWS = [
    "sdpa:softmax", "triton:softmax", "triton:sa_norm", "triton:sa_norm+ssmax",
    "triton:softmax@kerple", "triton:sa_norm@kerple", "triton:sa_norm@fire",
]  # fmt: skip
CPU_ROWS = ["sdpa:softmax", "eager:sa_norm", "cpu:sa_norm+ssmax", "cpu:sa_norm@kerple", "triton:sa_norm"]
SSMAX_INIT = 0.43


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-train", help="directory for <prefix>.md and <prefix>.json")
    parser.add_argument("--prefix", default="train", help="file name stem of the results (default train)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default cuda (cpu with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on CPU, to test the code path")
    parser.add_argument("--rows", nargs="+", help=f"default on CUDA: {' '.join(GPU_ROWS)}")
    parser.add_argument("--baseline", default="sdpa:softmax", help="the row tokens/s are divided by")
    parser.add_argument("--seqs", type=int, nargs="+", help="sequence lengths (default 1024 4096; smoke 16)")
    parser.add_argument("--tokens", type=int, help="tokens per step, B·seq (default 16384; smoke 32)")
    parser.add_argument("--layers", type=int, help="default 12 (smoke 2)")
    parser.add_argument("--width", type=int, help="n_embd (default 768; smoke 32)")
    parser.add_argument("--heads", type=int, help="default 12 (smoke 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3; smoke 1)")
    parser.add_argument("--steps", type=int, help="timed steps (default 10; smoke 2)")
    parser.add_argument(
        "--amp", choices=("bf16", "none"), help="autocast dtype (default bf16; none on CPU, where Triton's interpreter "
        "refuses bfloat16)"
    )  # fmt: skip
    parser.add_argument(
        "--profile", type=int, default=0, metavar="STEPS", help="after the timed steps, at one length, profile "
        "STEPS more with torch.profiler: the kernels taking the most device time per step go into a second table"
    )  # fmt: skip
    parser.add_argument(
        "--profile-seq", type=int, metavar="SEQ", help="the length whose rows --profile profiles (default the first)"
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, train nothing")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.device = args.device or ("cpu" if smoke else "cuda")
    args.rows = args.rows or (CPU_ROWS if args.device == "cpu" else GPU_ROWS)
    args.seqs = args.seqs or ([16] if smoke else [1024, 4096])
    args.tokens = args.tokens or (32 if smoke else 16384)
    args.layers = args.layers or (2 if smoke else 12)
    args.width = args.width or (32 if smoke else 768)
    args.heads = args.heads or (2 if smoke else 12)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    args.steps = args.steps or (2 if smoke else 10)
    args.amp = args.amp or ("none" if args.device == "cpu" else "bf16")
    if args.profile < 0:
        parser.error("--profile must be >= 0")
    args.profile_seq = args.profile_seq or args.seqs[0]
    if args.profile_seq not in args.seqs:
        parser.error(f"--profile-seq must be one of --seqs {args.seqs}; got {args.profile_seq}")
    for name in ("seqs", "tokens", "layers", "width", "heads", "steps"):
        value = getattr(args, name)
        if any(x <= 0 for x in (value if isinstance(value, list) else [value])):
            parser.error(f"--{name} must be positive")
    if args.width % args.heads:
        parser.error(f"--width ({args.width}) must be a multiple of --heads ({args.heads})")
    for row in args.rows + [args.baseline]:
        try:
            parse_row(row)
        except ValueError as err:
            parser.error(str(err))
    return args


def parse_row(row: str) -> tuple[str, str, bool, str]:
    """ "triton:sa_norm+ssmax@kerple" -> ("triton", "sa_norm", True, "kerple"); ValueError otherwise."""
    from sasoftmax import BACKENDS, NORMALIZERS
    from sasoftmax.positional import POSITIONAL

    spec, _, pos = row.partition("@")
    backend, _, rest = spec.partition(":")
    normalizer, plus, extra = rest.partition("+")
    pos = pos or "rope"
    if backend not in BACKENDS or normalizer not in NORMALIZERS or (plus and extra != "ssmax") or pos not in POSITIONAL:
        raise ValueError(
            f"unknown row {row!r}: expected <backend>:<normalizer>[+ssmax][@<pos>] with backend in {BACKENDS}, "
            f"normalizer in {NORMALIZERS}, pos in {POSITIONAL}"
        )
    return backend, normalizer, bool(plus), pos


def train_row(args: argparse.Namespace, row: str, seq: int, profile_steps: int = 0) -> dict:
    """Build the model of ``row``, train it --warmup + --steps steps at ``seq``; the row's measurements. With
    ``profile_steps``, the --warmup steps and then that many under the profiler instead of the timed steps (its
    "profile")."""
    from sasoftmax.data import VOCAB_SIZE
    from sasoftmax.models.gpt import GPT, GPTConfig
    from sasoftmax.train import make_optimizer

    backend, normalizer, ssmax, pos = parse_row(row)
    device = args.device
    batch = max(1, args.tokens // seq)
    result = {"row": row, "seq": seq, "batch": batch, "tokens_per_s": None, "step_ms": None, "host_ms": None,
              "syncs": None, "peak_gib": None, "extra_gib": None, "loss": None, "status": "ok", "note": ""}  # fmt: skip
    try:
        torch.manual_seed(0)
        config = GPTConfig(
            vocab_size=VOCAB_SIZE, block_size=seq, n_layer=args.layers, n_embd=args.width, n_head=args.heads,
            normalizer=normalizer, ssmax=SSMAX_INIT if ssmax else None, pos=pos, backend=backend,
        )  # fmt: skip
        model = GPT(config).to(device)
        optimizer = make_optimizer(model, {"lr": 3e-4, "weight_decay": 0.1})
        tokens = torch.randint(0, VOCAB_SIZE, (batch, seq + 1), device=device)
        x, y = tokens[:, :-1], tokens[:, 1:]
        amp = torch.autocast(device, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()
        params = list(model.parameters())

        def step() -> torch.Tensor:
            with amp:
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        model.train()
        for _ in range(args.warmup):
            step()
        if profile_steps:
            result["profile"] = profile(step, profile_steps, device)
            return result
        common.synchronize(device)
        before = torch.cuda.memory_allocated() if device == "cuda" else 0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, issued = [], []
        for _ in range(args.steps):
            start = time.perf_counter()
            loss = step()
            issued.append(time.perf_counter() - start)
            common.synchronize(device)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        # host ms: until step() returns, i.e. the CPU's time to issue the step. The GPU runs behind it, so host ms
        # close to step ms says the host sets the pace (or something in the step waits for the device).
        result.update(tokens_per_s=batch * seq / median, step_ms=median * 1e3, loss=float(loss),
                      host_ms=statistics.median(issued) * 1e3)  # fmt: skip
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated()
            result.update(peak_gib=peak / 2**30, extra_gib=(peak - before) / 2**30, syncs=count_syncs(step))
        if not math.isfinite(result["loss"]):
            result.update(status="error", note="the loss is not finite")
    except Exception as err:  # noqa: BLE001 - a failing row is a result, never the end of the run
        result.update(status="error", note=common.error_text(err))
    return result  # the caller frees the model's memory once this frame is gone


def count_syncs(step) -> int:
    """How many operations of one call of ``step`` waited for the device in a way PyTorch reports
    (``torch.cuda.set_sync_debug_mode``: ``.item()``, a host copy, ``nonzero``…; not Triton's launches)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


PROFILE_TOP = 12


def profile(step, steps: int, device: str) -> dict:
    """``steps`` calls of ``step`` under torch.profiler: the wall time and device-busy time per step, and the
    kernels (or on CPU the operators) with the most self time per step: where a row's extra time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    common.synchronize(device)
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        common.synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    if device == "cuda":
        events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        self_us = {e.key: e.self_device_time_total for e in events}
    else:
        events = list(prof.key_averages())
        self_us = {e.key: e.self_cpu_time_total for e in events}
    calls = {e.key: e.count for e in events}
    busy_ms = None
    if device == "cuda":  # the kernels' own entries: an operator's self device time counts its kernels again
        from torch.autograd import DeviceType

        busy_ms = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3 / steps
    top = sorted(self_us, key=self_us.get, reverse=True)[:PROFILE_TOP]
    host = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:PROFILE_TOP]
    return {
        "steps": steps, "wall_ms": wall_ms, "device_busy_ms": busy_ms,
        "top": [{"name": k, "ms_per_step": self_us[k] / 1e3 / steps, "calls_per_step": calls[k] / steps}
                for k in top],
        "host_top": [{"name": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                      "calls_per_step": e.count / steps} for e in host],
        "python_top": python_profile(step, steps, device),
    }  # fmt: skip


def python_profile(step, steps: int, device: str) -> list[dict]:
    """``steps`` calls of ``step`` under cProfile: the functions with the most own time per step (a C function's
    own time includes any wait inside it, e.g. a launch blocked by a full queue)."""
    import pstats

    profiler = cProfile.Profile()
    common.synchronize(device)
    profiler.enable()
    for _ in range(steps):
        step()
    common.synchronize(device)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (primitive calls, calls, own s, cumulative s, …)}
    top = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:PROFILE_TOP]
    return [
        {"name": f"{Path(file).name}:{line}({name})", "ms_per_step": own * 1e3 / steps, "calls_per_step": calls / steps}
        for (file, line, name), (_, calls, own, *_) in top
    ]


def profile_tables(results: list[dict]) -> str:
    """Three tables per profiled row: the kernels with the most device time per step, the host entries and the
    Python functions with the most CPU time per step."""
    parts = []
    for r in results:
        prof = r.get("profile")
        if not prof:
            continue
        busy = "" if prof["device_busy_ms"] is None else f", device busy {prof['device_busy_ms']:.1f} ms"
        parts.append(
            f"\n### Profile: {r['row']} at seq {r['seq']} ({prof['steps']} steps; {prof['wall_ms']:.1f} ms per step "
            f"under the profiler{busy})"
        )
        for title, key in (("kernel / operator", "top"), ("host: operator or call (self CPU)", "host_top"),
                           ("host: Python function (own time, cProfile)", "python_top")):  # fmt: skip
            parts += ["", f"| {title} | ms per step | calls per step |", "| --- | ---: | ---: |"]
            for e in prof.get(key, []):
                name = e["name"].replace("|", "/")
                name = name if len(name) <= 90 else name[:89] + "…"
                parts.append(f"| `{name}` | {e['ms_per_step']:.2f} | {e['calls_per_step']:g} |")
    return "\n".join(parts)


def add_ratios(results: list[dict], baseline: str) -> None:
    """× the baseline row of the same length (tokens/s and peak memory), and × the same row with RoPE."""
    index = {(r["row"], r["seq"]): r for r in results}
    for r in results:
        base = index.get((baseline, r["seq"]), {})
        r["x baseline"] = common.ratio(r["tokens_per_s"], base.get("tokens_per_s"))
        r["memory x baseline"] = common.ratio(r["peak_gib"], base.get("peak_gib"))
        spec, _, pos = r["row"].partition("@")
        rope = index.get((spec, r["seq"]), {}) if pos and pos != "rope" else {}
        r["x rope"] = common.ratio(r["tokens_per_s"], rope.get("tokens_per_s"))


def table(results: list[dict], baseline: str) -> str:
    lines = [
        f"| seq | B | row | tokens/s | × {baseline} | × same with rope | step ms | host ms | syncs | peak GiB | "
        f"× {baseline} | extra GiB | loss | note |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        note = r["note"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"
        tps = "–" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
        lines.append(
            f"| {r['seq']} | {r['batch']} | {r['row']} | {tps} | {common.fmt(r['x baseline'])} | "
            f"{common.fmt(r['x rope'])} | {common.fmt(r['step_ms'], 1)} | {common.fmt(r.get('host_ms'), 1)} | "
            f"{'–' if r.get('syncs') is None else r['syncs']} | {common.fmt(r['peak_gib'])} | "
            f"{common.fmt(r['memory x baseline'])} | {common.fmt(r['extra_gib'])} | {common.fmt(r['loss'], 3)} | "
            f"{note.replace('|', '/')} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_train.py: no CUDA GPU here (torch.cuda.is_available() is False); use --smoke")
    info = common.header(
        args.device, model=f"{args.layers}x{args.width}, {args.heads} heads", tokens_per_step=args.tokens,
        amp=args.amp, warmup=args.warmup, steps=args.steps, timing="median step, wall clock, CUDA synchronised",
        profile_steps=args.profile,
    )  # fmt: skip
    out = Path(args.out)
    rows = list(dict.fromkeys([args.baseline] + args.rows))  # the baseline first
    results: list[dict] = []

    def write() -> None:
        add_ratios(results, args.baseline)
        tables = table(results, args.baseline) + "\n" + profile_tables(results)
        common.write_results(out, args.prefix, "GPT training throughput", info, results, tables)

    for seq in args.seqs:
        for row in rows:
            results.append(train_row(args, row, seq))
            gc.collect()
            common.release(args.device)
            r = results[-1]
            done = f"{r['tokens_per_s']:.0f} tokens/s" if r["status"] == "ok" else f"{r['status']}: {r['note']}"
            print(f"seq={seq} {row}: {done}", flush=True)
            write()
    # Profiled after every row is timed, so that no profiler session precedes a timing: on the H200 the seq-1k
    # rows timed after profiled ones ran 20-66% slower than an unprofiled run of older code (suspected, not
    # established, to be the profiler's after-effects).
    for r in [r for r in results if args.profile and r["seq"] == args.profile_seq]:
        r["profile"] = train_row(args, r["row"], r["seq"], args.profile).get("profile")
        gc.collect()
        common.release(args.device)
        write()
    print(f"\nwrote {out / (args.prefix + '.md')} and {out / (args.prefix + '.json')}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        rows = list(dict.fromkeys([args.baseline] + args.rows))
        print(
            f"dry run: {len(rows) * len(args.seqs)} rows on {args.device}: seqs {args.seqs}, rows {rows}, "
            f"{args.warmup} + {args.steps} steps of {args.tokens} tokens; nothing trained"
        )
        return 0
    return common.run_rows("gpu_train.py", run, args)


if __name__ == "__main__":
    sys.exit(main())
