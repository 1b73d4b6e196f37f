"""GPU benchmark: the Triton kernels (softmax, sa, sa_norm) against PyTorch SDPA and flash-attn.

    python benchmarks/triton_attention.py [--out bench-triton] [--batch 4] [--heads 16] [--head-dim 64]
                                          [--max-len 16384] [--dtypes float16 bfloat16] [--metrics tflops ms]

For forward and forward+backward, causal and not, each dtype and metric it writes a table (CSV) and a
plot (PNG) into --out through ``triton.testing.perf_report`` and prints the table. Sequence lengths
N = 1024, 2048, ... up to --max-len (Lq = Lk = N). TFLOP/s counts the two attention matmuls,
4·B·H·N²·D (half of it when causal), and 2.5× that for the backward, the convention of FlashAttention
and Triton's fused-attention tutorial, so SA-Softmax's extra elementwise work shows up as lower TFLOP/s.
SDPA and flash-attn (when installed) compute plain softmax attention: they are the speed to aim for.

Needs a CUDA GPU and triton; without them it exits with a message and measures nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

NORMALIZERS = ("softmax", "sa", "sa_norm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-triton", help="directory for the CSV tables and PNG plots")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=16384)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16"])
    parser.add_argument("--metrics", nargs="+", default=["tflops", "ms"], choices=["tflops", "ms"])
    return parser.parse_args(argv)


def flash_attn_func() -> Callable | None:
    try:
        from flash_attn import flash_attn_func as fn
    except ImportError:
        return None
    return fn


def providers() -> list[str]:
    names = [f"triton-{n}" for n in NORMALIZERS] + ["sdpa"]
    return names + (["flash-attn"] if flash_attn_func() is not None else [])


def make_step(provider: str, q, k, v, causal: bool, mode: str) -> Callable[[], None]:
    """A closure running one forward (mode "fwd") or forward+backward ("fwd+bwd") of ``provider``."""
    from sasoftmax import attention

    inputs = (q, k, v)
    if provider.startswith("triton-"):
        normalizer = provider.removeprefix("triton-")

        def forward():
            return attention(q, k, v, normalizer=normalizer, causal=causal, backend="triton")

    elif provider == "sdpa":

        def forward():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    elif provider == "flash-attn":
        fn = flash_attn_func()
        inputs = tuple(t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))

        def forward():
            return fn(*inputs, causal=causal)  # layout (B, N, H, D)

    else:
        raise ValueError(f"unknown provider {provider!r}")
    if mode == "fwd":

        def step():
            with torch.no_grad():
                forward()

        return step
    grad = torch.randn_like(forward())

    def step():
        torch.autograd.grad(forward(), inputs, grad)  # no accumulation into .grad

    return step


def benchmarks(args: argparse.Namespace):
    import triton.testing

    lengths = []
    n = 1024
    while n <= args.max_len:
        lengths.append(n)
        n *= 2
    names = providers()
    configs = [
        triton.testing.Benchmark(
            x_names=["N"],
            x_vals=lengths,
            line_arg="provider",
            line_vals=names,
            line_names=names,
            ylabel="TFLOP/s" if metric == "tflops" else "ms",
            plot_name=f"attention-{mode}-{'causal' if causal else 'full'}-{dtype}-{metric}",
            args={"mode": mode, "causal": causal, "dtype": dtype, "metric": metric},
        )
        for mode in ("fwd", "fwd+bwd")
        for causal in (False, True)
        for dtype in args.dtypes
        for metric in args.metrics
    ]

    @triton.testing.perf_report(configs)
    def bench(N, provider, mode, causal, dtype, metric):
        gen = torch.Generator(device="cuda").manual_seed(0)
        shape = (args.batch, args.heads, N, args.head_dim)
        q, k, v = (
            torch.randn(shape, generator=gen, device="cuda", dtype=getattr(torch, dtype)).requires_grad_()
            for _ in range(3)
        )
        ms = triton.testing.do_bench(make_step(provider, q, k, v, causal, mode))
        if metric == "ms":
            return ms
        flops = 4 * args.batch * args.heads * N * N * args.head_dim * (0.5 if causal else 1.0)
        if mode == "fwd+bwd":
            flops *= 3.5
        return flops * 1e-12 / (ms * 1e-3)

    return bench


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "benchmarks/triton_attention.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was "
            "measured. Run it on a machine with an NVIDIA GPU and `pip install -e '.[triton,harness]'`.",
            file=sys.stderr,
        )
        return 2
    try:  # triton.testing.perf_report tabulates with pandas and plots with matplotlib
        import matplotlib  # noqa: F401
        import pandas  # noqa: F401
        import triton  # noqa: F401
    except ImportError as err:
        print(f"benchmarks/triton_attention.py needs triton, pandas and matplotlib: {err}", file=sys.stderr)
        return 2
    benchmarks(args).run(save_path=args.out, print_data=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
