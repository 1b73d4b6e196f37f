"""GPU benchmark of attention kernels: sasoftmax's Triton kernels against PyTorch SDPA and flash-attn, one run.

    PYTHONPATH=src python3 benchmarks/triton_attention.py --out results            # the full GPU run
    PYTHONPATH=src python3 benchmarks/triton_attention.py --smoke --out /tmp/smoke  # tiny, on CPU (tests)

Layout of FlashAttention's benchmarks: model dim H·D = --model-dim (2048), --tokens (16384) tokens per
batch, so B = tokens / N and H = model-dim / D; Lq = Lk = N, bf16 by default. q, k, v and the output's
gradient are contiguous (B, H, N, D) tensors, or with ``--layout bnhd`` (B, H, N, D) views of (B, N, H, D)
ones, the layout a model's head split gives (the harness GPT's, ``sasoftmax.nn``'s). For every (N, D, causal,
bias, mode) and provider it reports the median ms (``triton.testing.do_bench``), TFLOP/s in the
FlashAttention convention (4·B·H·N²·D, half of it when causal, ×3.5 for forward+backward; SA-Softmax's
extra work shows as lower TFLOP/s), the ratio of its time to each baseline of the same run (by default
SDPA pinned to FlashAttention-2 and to cuDNN, both without bias), the ratio to the same provider without
bias, and its extra peak memory (``torch.cuda.max_memory_allocated`` over what is allocated before the
call, i.e. the inputs; reset before every provider) with its ratio to the first baseline's.

Providers (``--providers``):

- ``sdpa-flash2``, ``sdpa-cudnn``, ``sdpa-efficient``, ``sdpa-math``: ``F.scaled_dot_product_attention``
  pinned with ``torch.nn.attention.sdpa_kernel`` to FLASH_ATTENTION (FlashAttention-2), CUDNN_ATTENTION,
  EFFICIENT_ATTENTION or MATH. A backend that refuses a shape is recorded with its reason.
- ``flash-attn``: ``flash_attn.flash_attn_func`` when the package is importable (ALiBi via alibi_slopes).
- ``<backend>:<normalizer>`` and ``<backend>:<normalizer>+ssmax``: ``sasoftmax.attention`` with
  backend eager/cpu/triton, normalizer softmax/sa/sa_norm; +ssmax adds a learnable (H,) SSMax scale
  (requires grad, so forward+backward computes ds).

``--bias`` adds rows with a positional bias per provider (``none`` is the plain row): ``alibi``
(``RelativeBias.alibi``, fixed slopes), ``kerple`` (``RelativeBias.kerple_log``, r1 and r2 require grad),
``kerple-table`` (the same Kerple handed over as a table per distance, see ``KerpleTable``) and ``fire``
(``sasoftmax.positional.FIRE`` with its threshold at N, so that every query lies below it, as in training: it hands
the kernels a ``RelativeBias.table`` of its MLP per distance; its parameters require grad). SDPA gets the same bias
as a materialised float ``attn_mask`` (1, H, N, N) in the input dtype, built before the timing and without gradient,
causal folded in as −inf, where it takes at most a quarter of the free memory; flash-attn takes ALiBi only. The
eager backend materialises several (B, H, N, N) float32 tensors: it runs only where an estimate of its memory fits
(else the row says why).

A provider that fails (out of memory, a shape it refuses, an unsupported call) is recorded with the error
and the run goes on. Results are rewritten after every row into --out/<prefix>.md (Markdown tables with a
header: date, device, versions, commit) and --out/<prefix>.json, so a run cut short by a timeout keeps
what it measured.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gpu_common as common
import torch
import torch.nn.functional as F

SDPA_BACKENDS = {"sdpa-flash2": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}  # fmt: skip
GPU_PROVIDERS = [
    "sdpa-flash2", "sdpa-cudnn", "sdpa-efficient", "flash-attn",
    "triton:softmax", "triton:sa", "triton:sa_norm", "triton:sa_norm+ssmax", "eager:sa_norm",
]  # fmt: skip
CPU_PROVIDERS = ["sdpa-math", "sdpa-flash2", "eager:softmax", "eager:sa_norm", "cpu:sa_norm+ssmax", "triton:sa_norm"]
BIASES = ("none", "alibi", "kerple", "kerple-table", "fire")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
EAGER_BYTES_PER_SCORE = {"fwd": 16, "fwd+bwd": 44}
"""Peak bytes the eager backend holds per (b, h, i, j) score: float32 logits, weights and their saved
intermediates (sa_norm forward+backward measured at ~41 on CPU), used to skip sizes that cannot fit."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-triton", help="directory for <prefix>.md and <prefix>.json")
    parser.add_argument("--prefix", default="kernels", help="file name stem of the results (default kernels)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default cuda (cpu with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, to test the code path")
    parser.add_argument("--lengths", type=int, nargs="+", help="N (default 1024 4096 16384; smoke 32)")
    parser.add_argument("--head-dims", type=int, nargs="+", help="D (default 64 128; smoke 16)")
    parser.add_argument("--model-dim", type=int, help="H·D (default 2048; smoke 32)")
    parser.add_argument("--tokens", type=int, help="B·N tokens per batch (default 16384; smoke 64)")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--providers", nargs="+", help=f"default on CUDA: {' '.join(GPU_PROVIDERS)}")
    parser.add_argument("--baselines", nargs="+", help="ratio columns (default sdpa-flash2 sdpa-cudnn; cpu sdpa-math)")
    parser.add_argument("--bias", nargs="+", choices=BIASES, default=["none"], help="bias rows (default none)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bfloat16 (float32 on CPU)")
    parser.add_argument("--eager-max-len", type=int, default=4096, help="no eager rows above this N")
    parser.add_argument("--warmup-ms", type=float, default=20, help="do_bench warm-up (ms)")
    parser.add_argument("--rep-ms", type=float, default=60, help="do_bench measuring time (ms)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row on CPU (median)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--layout", choices=("bhnd", "bnhd"), default="bhnd",
        help="q, k, v, dO contiguous as (B, H, N, D) (default) or views of (B, N, H, D) tensors, as in a model",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, measure nothing")
    args = parser.parse_args(argv)
    cpu = args.smoke or args.device == "cpu"
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.lengths = args.lengths or ([32] if args.smoke else [1024, 4096, 16384])
    args.head_dims = args.head_dims or ([16] if args.smoke else [64, 128])
    args.model_dim = args.model_dim or (32 if args.smoke else 2048)
    args.tokens = args.tokens or (64 if args.smoke else 16384)
    args.providers = args.providers or (CPU_PROVIDERS if cpu else GPU_PROVIDERS)
    args.baselines = args.baselines or (["sdpa-math"] if cpu else ["sdpa-flash2", "sdpa-cudnn"])
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    for name in ("lengths", "head_dims"):
        if any(x <= 0 for x in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for d in args.head_dims:
        if args.model_dim % d:
            parser.error(f"--model-dim ({args.model_dim}) must be a multiple of every head dim; got {d}")
    for p in args.providers:
        if p not in SDPA_BACKENDS and p != "flash-attn":
            try:
                parse_sasoftmax(p)
            except ValueError as err:
                parser.error(str(err))
    return args


def parse_sasoftmax(provider: str) -> tuple[str, str, bool]:
    """ "triton:sa_norm+ssmax" -> ("triton", "sa_norm", True); ValueError for anything else."""
    from sasoftmax import BACKENDS, NORMALIZERS

    backend, _, rest = provider.partition(":")
    normalizer, plus, extra = rest.partition("+")
    if backend not in BACKENDS or normalizer not in NORMALIZERS or (plus and extra != "ssmax"):
        raise ValueError(
            f"unknown provider {provider!r}: expected one of {sorted(SDPA_BACKENDS)}, flash-attn, or "
            f"<backend>:<normalizer>[+ssmax] with backend in {BACKENDS} and normalizer in {NORMALIZERS}"
        )
    return backend, normalizer, bool(plus)


def flash_attn_func() -> Callable | None:
    try:
        from flash_attn import flash_attn_func as fn
    except ImportError:
        return None
    return fn


@dataclass
class Shape:
    n: int
    batch: int
    heads: int
    head_dim: int
    causal: bool
    dtype: torch.dtype
    device: str

    def flops(self, mode: str) -> float:
        """FlashAttention's count: 4·B·H·N²·D, half when causal, ×3.5 for forward+backward."""
        flops = 4.0 * self.batch * self.heads * self.n**2 * self.head_dim * (0.5 if self.causal else 1.0)
        return flops * (3.5 if mode == "fwd+bwd" else 1.0)

    @property
    def scores(self) -> int:
        return self.batch * self.heads * self.n**2


class Skip(Exception):
    """A provider that is not run at this size, with the reason (recorded as "skipped")."""


class KerpleTable:
    """Kerple log handed to the kernels as a ``RelativeBias.table`` of its values per distance, computed per call
    from r1 and r2 (whose gradients flow back through the table in torch): a cached load per score element
    instead of the in-kernel logarithm, which shares the special-function unit with the exponentials."""

    def __init__(self, r1: torch.Tensor, r2: torch.Tensor) -> None:
        from sasoftmax import RelativeBias

        self.formula = RelativeBias.kerple_log(r1, r2)

    def relative_bias(self, q_len: int, k_len: int):
        from sasoftmax import RelativeBias

        distances = torch.arange(max(q_len, k_len), device=self.formula.r1.device)
        return RelativeBias.table(self.formula(distances, distances[:1])[0, :, :, 0])  # queries 0.. against key 0

    def __call__(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return self.formula(q_pos, k_pos)


class Biases:
    """The positional biases of one (N, heads) shape: sasoftmax's form, its trainable parameters, and
    SDPA's materialised mask (built on first use, causal folded in)."""

    def __init__(self, shape: Shape, seed: int = 0) -> None:
        from sasoftmax import RelativeBias
        from sasoftmax.positional import FIRE, alibi_slopes

        self.shape = shape
        gen = torch.Generator().manual_seed(seed)
        dev = shape.device
        self.slopes = torch.tensor(alibi_slopes(shape.heads), device=dev)
        r1 = (torch.rand(shape.heads, generator=gen) * 2).clamp_min(1e-2).to(dev).requires_grad_()
        r2 = torch.rand(shape.heads, generator=gen).clamp_min(1e-2).to(dev).requires_grad_()
        self.fire = FIRE(shape.heads, train_len=shape.n).to(dev)
        self.forms: dict[str, object] = {
            "alibi": RelativeBias.alibi(self.slopes),
            "kerple": RelativeBias.kerple_log(r1, r2),
            "kerple-table": KerpleTable(r1, r2),
            "fire": self.fire,
        }
        self.parameters = {"alibi": [], "kerple": [r1, r2], "kerple-table": [r1, r2],
                           "fire": list(self.fire.parameters())}  # fmt: skip
        self.masks: dict[str, torch.Tensor] = {}

    def sdpa_mask(self, name: str) -> torch.Tensor:
        """(1, H, N, N) float mask in the input dtype: the bias, −inf above the diagonal when causal."""
        if name not in self.masks:
            s = self.shape
            size = s.heads * s.n * s.n * torch.finfo(s.dtype).bits // 8
            free = common.free_memory(s.device)
            if free is not None and size > free / 4:
                raise Skip(f"SDPA's bias mask needs {size / 2**30:.1f} GiB, over a quarter of the free memory")
            pos = torch.arange(s.n, device=s.device)
            with torch.no_grad():
                bias = self.forms[name](pos, pos).to(s.dtype)
                if s.causal:
                    bias = bias.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
            self.masks = {name: bias.reshape(1, s.heads, s.n, s.n).contiguous()}  # one at a time
        return self.masks[name]


def make_forward(provider: str, bias: str, shape: Shape, qkv, biases: Biases) -> tuple[Callable, list]:
    """(forward closure, extra tensors whose gradients forward+backward computes) for one provider."""
    q, k, v = qkv
    if provider in SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        pinned = getattr(SDPBackend, SDPA_BACKENDS[provider])
        mask = None if bias == "none" else biases.sdpa_mask(bias)
        causal = shape.causal and mask is None

        def forward():
            with sdpa_kernel(pinned):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

        return forward, []
    if provider == "flash-attn":
        fn = flash_attn_func()
        if fn is None:
            raise Skip("flash-attn is not installed")
        if bias not in ("none", "alibi"):
            raise Skip("flash-attn takes ALiBi only")
        slopes = biases.slopes.float() if bias == "alibi" else None
        # flash-attn's layout is (B, N, H, D); the transposes are views, their gradients flow back to q, k, v.
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

        def forward():
            return fn(qt, kt, vt, causal=shape.causal, alibi_slopes=slopes).transpose(1, 2)

        return forward, []
    from sasoftmax import attention
    from sasoftmax.nn import SSMAX_PAPER_INIT

    backend, normalizer, with_ssmax = parse_sasoftmax(provider)
    ssmax = None
    if with_ssmax:
        ssmax = torch.full((shape.heads,), SSMAX_PAPER_INIT, device=shape.device, requires_grad=True)
    form = None if bias == "none" else biases.forms[bias]

    def forward():
        return attention(q, k, v, normalizer=normalizer, causal=shape.causal, bias=form, ssmax=ssmax, backend=backend)

    extra = ([ssmax] if ssmax is not None else []) + ([] if bias == "none" else biases.parameters[bias])
    return forward, extra


def make_step(forward: Callable, mode: str, inputs: list, grad_out: torch.Tensor) -> Callable[[], None]:
    """One forward (under no_grad) or forward+backward (gradients of ``inputs``, not accumulated)."""
    if mode == "fwd":

        def step():
            with torch.no_grad():
                forward()

        return step

    def step():
        torch.autograd.grad(forward(), inputs, grad_out, allow_unused=True)

    return step


def measure(args, provider: str, bias: str, mode: str, shape: Shape, qkv, grad_out, biases) -> dict:
    """One row: ms, TFLOP/s and extra peak memory, or the reason it was skipped or failed."""
    row = {
        "n": shape.n, "batch": shape.batch, "heads": shape.heads, "head_dim": shape.head_dim,
        "causal": shape.causal, "mode": mode, "bias": bias, "provider": provider,
        "ms": None, "tflops": None, "extra_mib": None, "status": "ok", "note": "",
    }  # fmt: skip
    if provider.startswith("eager:") and shape.n > args.eager_max_len:
        return {**row, "status": "skipped", "note": f"N > --eager-max-len {args.eager_max_len}"}
    try:
        if provider.startswith("eager:"):
            need, free = shape.scores * EAGER_BYTES_PER_SCORE[mode], common.free_memory(shape.device)
            if free is not None and need > 0.85 * free:
                raise Skip(f"eager would need ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")
        forward, extra = make_forward(provider, bias, shape, qkv, biases)
        step = make_step(forward, mode, list(qkv) + extra, grad_out)
        ms = common.median_ms(step, shape.device, args.warmup_ms, args.rep_ms, args.repeats)
        row["ms"] = ms
        row["tflops"] = shape.flops(mode) / (ms * 1e-3) / 1e12
        if not args.no_memory:
            row["extra_mib"] = common.extra_peak_mib(step, shape.device)
    except Skip as why:
        row.update(status="skipped", note=str(why))
    except Exception as err:  # noqa: BLE001 - any failure of one provider is a result, never the end of the run
        row.update(status="error", note=common.error_text(err))
    finally:
        gc.collect()
        common.release(shape.device)
    return row


def add_ratios(rows: list[dict], baselines: list[str]) -> None:
    """× each baseline (its bias-free row of the same N, D, causal, mode), × the same provider without bias,
    and memory × the first baseline's."""

    def key(r: dict, **change) -> tuple:
        r = {**r, **change}
        return (r["n"], r["head_dim"], r["causal"], r["mode"], r["bias"], r["provider"])

    index = {key(r): r for r in rows}
    for r in rows:
        for b in baselines:
            base = index.get(key(r, bias="none", provider=b), {})
            r[f"x {b}"] = common.ratio(r["ms"], base.get("ms"))
        plain = index.get(key(r, bias="none"), {})
        r["x no bias"] = common.ratio(r["ms"], plain.get("ms")) if r["bias"] != "none" else None
        first = index.get(key(r, bias="none", provider=baselines[0]), {}) if baselines else {}
        r["memory x " + (baselines[0] if baselines else "")] = common.ratio(r["extra_mib"], first.get("extra_mib"))


def tables(rows: list[dict], baselines: list[str]) -> str:
    """Per mode, one Markdown table of every row; then, for forward+backward without bias, each provider's
    time ÷ each baseline and extra memory ÷ the first baseline's, as (N, D, causal) × provider grids."""
    out = []
    mem_col = "memory x " + (baselines[0] if baselines else "")
    for mode in MODES:
        mode_rows = [r for r in rows if r["mode"] == mode]
        if not mode_rows:
            continue
        ratio_heads = "".join(f" × {b} |" for b in baselines)
        out += [
            f"## {mode}\n",
            f"| N | B×H | D | causal | provider | bias | ms | TFLOP/s |{ratio_heads} × no bias | extra MiB | "
            f"mem × {baselines[0] if baselines else '–'} | note |",
            "| ---: | ---: | ---: | :---: | --- | --- | ---: | ---: |" + " ---: |" * (len(baselines) + 3) + " --- |",
        ]
        for r in mode_rows:
            ratios = "".join(f" {common.fmt(r[f'x {b}'])} |" for b in baselines)
            note = r["note"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"
            out.append(
                f"| {r['n']} | {r['batch']}×{r['heads']} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} | "
                f"{r['provider']} | {r['bias']} | {common.fmt(r['ms'], 3)} | {common.fmt(r['tflops'], 1)} |{ratios} "
                f"{common.fmt(r['x no bias'])} | {common.fmt(r['extra_mib'], 0)} | {common.fmt(r[mem_col])} | "
                f"{note.replace('|', '/')} |"
            )
        out.append("")
    grid_rows = [r for r in rows if r["mode"] == "fwd+bwd" and r["bias"] == "none"]
    providers = list(dict.fromkeys(r["provider"] for r in grid_rows))
    shapes = list(dict.fromkeys((r["n"], r["head_dim"], r["causal"]) for r in grid_rows))
    grids = [(f"fwd+bwd time ÷ {b}", f"x {b}") for b in baselines]
    grids += [(f"fwd+bwd extra memory ÷ {baselines[0]}", mem_col)] if baselines else []
    for title, column in grids if shapes else []:
        cells = {(r["n"], r["head_dim"], r["causal"], r["provider"]): r[column] for r in grid_rows}
        out += [
            f"## {title} (no bias)\n",
            "| N | D | causal | " + " | ".join(providers) + " |",
            "| ---: | ---: | :---: |" + " ---: |" * len(providers),
        ]
        for n, d, c in shapes:
            vals = " | ".join(common.fmt(cells.get((n, d, c, p))) for p in providers)
            out.append(f"| {n} | {d} | {'yes' if c else 'no'} | {vals} |")
        out.append("")
    return "\n".join(out)


def make_input(layout: str, shape: tuple[int, int, int, int], gen: torch.Generator, dtype, grad: bool = False):
    """A standard normal (B, H, N, D) tensor, contiguous ("bhnd") or a transposed view of a (B, N, H, D) one ("bnhd"),
    whose gradient flows to a leaf when ``grad``."""
    b, h, n, d = shape
    base_shape = shape if layout == "bhnd" else (b, n, h, d)
    base = torch.randn(base_shape, generator=gen, device=gen.device, dtype=dtype).requires_grad_(grad)
    return base if layout == "bhnd" else base.transpose(1, 2)


def run(args: argparse.Namespace) -> list[dict]:
    """Measure every row, rewriting the results after each; returns the rows."""
    device, dtype = args.device, DTYPES[args.dtype]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("triton_attention.py: no CUDA GPU here (torch.cuda.is_available() is False); use --smoke")
    info = common.header(
        device, dtype=args.dtype, model_dim=args.model_dim, tokens=args.tokens,
        timing="triton.testing.do_bench median" if device == "cuda" else f"wall clock median of {args.repeats}",
        flash_attn="installed" if flash_attn_func() is not None else "not installed", layout=args.layout,
    )  # fmt: skip
    out = Path(args.out)
    rows: list[dict] = []
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]

    def report(row: dict) -> None:
        done = f"{row['ms']:.3f} ms" if row["ms"] is not None else f"{row['status']}: {row['note']}"
        print(f"N={row['n']} D={row['head_dim']} causal={row['causal']} {row['mode']} {row['provider']} "
              f"bias={row['bias']}: {done}", flush=True)  # fmt: skip

    def save() -> None:
        add_ratios(rows, args.baselines)
        title = "Attention kernels: time, TFLOP/s and extra memory"
        common.write_results(out, args.prefix, title, info, rows, tables(rows, args.baselines))

    # fwd+bwd first: it is what the targets are about, and it compiles the forward kernels the fwd rows reuse,
    # so a run cut short by its time limit loses the least important rows.
    for mode in sorted(args.modes, key=lambda m: m != "fwd+bwd"):
        for n in args.lengths:
            for d in args.head_dims:
                heads, batch = args.model_dim // d, max(1, args.tokens // n)
                gen = torch.Generator(device=device).manual_seed(0)
                qkv = [make_input(args.layout, (batch, heads, n, d), gen, dtype, grad=True) for _ in range(3)]
                grad_out = make_input(args.layout, (batch, heads, n, d), gen, dtype)
                for causal in causals:
                    shape = Shape(n, batch, heads, d, causal, dtype, device)
                    biases = Biases(shape)
                    for bias in args.bias:
                        for provider in args.providers:
                            rows.append(measure(args, provider, bias, mode, shape, qkv, grad_out, biases))
                            report(rows[-1])
                            save()
                    del biases
                del qkv, grad_out
                gc.collect()
                common.release(device)
    print(f"\nwrote {out / (args.prefix + '.md')} and {out / (args.prefix + '.json')}")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        causals = 1 if args.causal != "both" else 2
        count = (
            len(args.lengths) * len(args.head_dims) * causals * len(args.bias) * len(args.modes) * len(args.providers)
        )
        print(
            f"dry run: {count} rows on {args.device}: N {args.lengths}, D {args.head_dims}, causal {args.causal}, "
            f"modes {args.modes}, bias {args.bias}, providers {args.providers}; nothing measured"
        )
        return 0
    return common.run_rows("triton_attention.py", run, args)


if __name__ == "__main__":
    sys.exit(main())
