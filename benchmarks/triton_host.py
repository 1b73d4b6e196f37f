"""Host time of a Triton-backend attention call (forward and backward), the part no GPU benchmark isolates.

    PYTHONPATH=src python3 benchmarks/triton_host.py --out results                # a CPU: a faked sm_90 GPU
    PYTHONPATH=src python3 benchmarks/triton_host.py --out results --device cuda  # a GPU (quiet: no other work)

At seq 1k the harness GPT's training steps waited for the host, not the GPU (docs/triton.md): what a call costs the
host — our Python, autograd, Triton's launches — sets the pace there. Each row times one call of the harness
GPT's attention per layer ((B, N, H, D) views, causal, tiny N: the host's cost does not depend on N) three ways:
``python`` with the kernel launches stubbed out (the backend's own Python and autograd), ``jit`` with every launch
through Triton's JIT launch path, ``direct`` as the backend launches (a compiled kernel seen before straight to its
launcher, ``triton._launch``). On a CPU Triton drives a fake GPU (tests/triton_fake_driver.py: nothing is compiled
or run, so ``jit`` and ``direct`` count Triton's Python without its C launcher and the driver's launch); on a GPU
(``--device cuda``) the launches are real and the device is synchronised between timed batches. Medians of
``--repeats`` batches of ``--calls`` calls, µs per call, with ratios to ``jit`` from the same run. Markdown + JSON
(host.md, host.json) into --out. TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # triton_fake_driver

ROWS = {  # name: (normalizer, ssmax, backward, transformers' mask)
    "softmax": ("softmax", False, True, False),
    "sa_norm": ("sa_norm", False, True, False),
    "sa_norm + SSMax": ("sa_norm", True, True, False),
    "sa_norm, a causal bool mask": ("sa_norm", False, True, True),
    "sa_norm decoding step": ("sa_norm", False, False, False),
}
WAYS = ("python", "jit", "direct")
IDENTICAL = {True: "yes", False: "**no**", None: "–"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-host", help="directory for host.md and host.json")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu: Triton drives a fake GPU")
    parser.add_argument("--calls", type=int, default=100, help="calls per timed batch")
    parser.add_argument("--repeats", type=int, default=7, help="timed batches per row and way")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="calls to time (default all)")
    parser.add_argument("--smoke", action="store_true", help="5 calls per batch, 2 batches: the code path only")
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, time nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        args.calls, args.repeats = 5, 2
    if args.calls < 1 or args.repeats < 1:
        parser.error("--calls and --repeats must be >= 1")
    return args


def layer_call(row: str, device: str, dtype: torch.dtype):
    """One layer's attention call of the harness GPT (B = 2, H = 12, N = 64, D = 64, (B, N, H, D) views,
    causal), forward and backward (a decoding step: one query over 64 keys, forward only, no grad); with a mask, the
    causal pattern as transformers passes it instead of ``causal=True``: a (B, 1, N, N) bool mask."""
    import sasoftmax

    normalizer, ssmax, backward, masked = ROWS[row]
    b, h, d = 2, 12, 64
    lq = 64 if backward else 1

    def view(n):
        return torch.randn(b, n, h, d, device=device, dtype=dtype).transpose(1, 2).requires_grad_(backward)

    q, k, v = view(lq), view(64), view(64)
    s = torch.full((h,), 0.4, device=device, requires_grad=True) if ssmax else None
    grad = torch.randn(b, lq, h, d, device=device, dtype=dtype).transpose(1, 2)
    inputs = (q, k, v) if s is None else (q, k, v, s)
    mask = torch.ones(lq, 64, device=device, dtype=torch.bool).tril(64 - lq).expand(b, 1, lq, 64) if masked else None

    def call() -> tuple[torch.Tensor, ...]:
        """The output and (with a backward) the gradients of q, k, v (and s)."""
        with torch.set_grad_enabled(backward):
            out = sasoftmax.attention(
                q, k, v, normalizer=normalizer, causal=not masked, mask=mask, ssmax=s, backend="triton"
            )
            return (out, *torch.autograd.grad(out, inputs, grad)) if backward else (out,)

    return call


@contextlib.contextmanager
def way(name: str):
    """Launches stubbed (``python``), each through Triton's JIT (``jit``), or as the backend launches them."""
    import triton

    from sasoftmax.backends import triton as backend

    def jit(name, grid, cfg, *args, **kwargs):
        device = triton.runtime.driver.active.get_current_device()
        backend._jit_launch(name, device, grid, cfg, args, kwargs)

    launch = backend._launch
    if name == "python":
        backend._launch = lambda *args, **kwargs: None
    elif name == "jit":
        backend._launch = jit
    try:
        yield
    finally:
        backend._launch = launch


def time_call(call, device: str, calls: int, repeats: int) -> float:
    """Median µs of host time per call over ``repeats`` batches (the device synchronised before each)."""
    for _ in range(10):
        call()
    batches = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        batches.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(batches)


def run(args: argparse.Namespace) -> list[dict]:
    """Time every row every way, writing the files after each row; rows' "identical": the direct launches' output
    and gradients equal the JIT launches' (meaningful on a GPU only)."""
    import gpu_common

    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = gpu_common.header(
        args.device, calls=args.calls, repeats=args.repeats, dtype=args.dtype,
        gpu="real" if args.device == "cuda" else "faked sm_90 (tests/triton_fake_driver.py)",
    )  # fmt: skip
    rows = []
    for row in args.rows:
        torch.manual_seed(0)
        call = layer_call(row, args.device, dtype)
        result = {"row": row}
        for name in WAYS:
            with way(name):
                result[name] = time_call(call, args.device, args.calls, args.repeats)
        # the direct launches must compute what Triton's own launches compute, bit for bit (a faked GPU runs
        # nothing: None)
        result["identical"] = None
        if args.device == "cuda":
            with way("jit"):
                expected = call()
            result["identical"] = all(torch.equal(a, b) for a, b in zip(call(), expected))
        rows.append(result)
        print(f"{row}: " + ", ".join(f"{name} {result[name]:.1f} µs" for name in WAYS), flush=True)
        lines = ["| call | python µs | jit µs | direct µs | direct ÷ jit | launches' share, jit | direct | direct's "
                 "results = jit's |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
        for r in rows:
            shares = [gpu_common.ratio(r[name] - r["python"], r[name]) for name in ("jit", "direct")]
            lines.append(
                f"| {r['row']} | {r['python']:.1f} | {r['jit']:.1f} | {r['direct']:.1f} | "
                f"{gpu_common.fmt(gpu_common.ratio(r['direct'], r['jit']))} | {gpu_common.fmt(shares[0])} | "
                f"{gpu_common.fmt(shares[1])} | {IDENTICAL[r['identical']]} |"
            )
        gpu_common.write_results(out, "host", "Host time of a Triton attention call", info, rows, "\n".join(lines))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        plan = f"{len(args.rows)} rows × {len(WAYS)} ways on {args.device}"
        print(f"{plan}, {args.repeats} batches of {args.calls} calls")
        return
    if args.device == "cuda":
        if not all(r["identical"] for r in run(args)):  # (True on a GPU)
            raise SystemExit("the direct launches' results differ from Triton's JIT launches' (see host.md)")
        return
    from triton_fake_driver import fake_gpu, unavailable

    reason = unavailable()
    if reason:
        raise SystemExit(f"cannot fake a GPU: {reason}")
    with fake_gpu(None):
        run(args)


if __name__ == "__main__":
    main()
