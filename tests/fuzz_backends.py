"""Random differential testing of a backend against float64 eager attention: forward and every gradient.

    TRITON_INTERPRET=1 PYTHONPATH=src python tests/fuzz_backends.py --backend triton --seeds 0 300
    PYTHONPATH=src python tests/fuzz_backends.py --backend cpu --seeds 0 300 --extended --bfloat16 --broadcasts

Each seed draws one call: batch, query and kv heads (GQA), odd lengths (L = 1, S = 1, L != S), head dims (Dv != D),
normalizer, causal, a mask (random, key padding, the causal pattern as a mask), a bias (a tensor with a gradient,
ALiBi, Kerple log and power, a table, all with learnable parameters), SSMax, a scale, logits of moderate or large
magnitude, and a dtype (float32, float16; with ``--bfloat16`` bfloat16 too, on a GPU or for the cpu backend; the
triton backend needs head dims >= 16). A seed fails where

- float32: an output's max error against float64 eager exceeds 1e-4 of its largest magnitude and 2× that of eager
  in float32 (FlashAttention's rule with a relative floor: where a gradient nearly vanishes, or cancels in the
  formula itself — sa_norm's rows with one key — float32 eager misses the 1e-4 too), + 1e-6;
- 16-bit: FlashAttention's rule, the max error exceeds 2× that of plain PyTorch computing every op in that dtype,
  or 2× that of eager computing in float32 on the rounded inputs (what rounding the inputs alone costs: a sum over
  a few rows may come out of plain 16-bit math by chance closer), + its tests' absolute term (``dq_atol`` in
  flash-attention's hopper/test_flash_attn.py: twice the rounding error of adding 0.3 to the reference in the
  output's dtype, ~2 ulps of its largest entries; in a call of a few dozen entries plain PyTorch's max error may
  come out far below its typical one by chance) + 1e-5.

Failures print one line each with the call and the errors; the exit status is 1 if any seed failed. Not part of the
test suite (minutes per hundred seeds in Triton's interpreter): what it found became tests (test_backend_triton's
``test_half_precision_sharp_rows``, and ``test_fuzz_regressions``, which replays seeds through :func:`draw` and
:func:`check`: keep a seed's draws as they are, adding new ones after the others and behind a flag, as
``extended`` is). CUDA inputs where a GPU is there.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import torch

# Triton's interpreter where there is no GPU (before the backend imports triton's kernels); on a GPU the kernels
# themselves (set unconditionally, a GPU run fuzzed the interpreter: triton reads TRITON_INTERPRET when it is asked)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sasoftmax  # noqa: E402
from sasoftmax import RelativeBias  # noqa: E402
from sasoftmax.normalizers import masked_weights  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("out", "dq", "dk", "dv")
SUMMARY = ("b", "hq", "hkv", "lq", "lk", "d", "dv", "normalizer", "causal", "dtype", "mask_kind", "bias_kind", "ssmax",
           "scale", "magnitude", "layout", "eps")  # fmt: skip


def draw(
    seed: int, backend: str, magnitudes: tuple[float, ...] = (1.0, 1.0, 4.0), extended: bool = False,
    bfloat16: bool = False, broadcasts: bool = False,
) -> dict:
    """One random call (its sizes, options and tensors) for ``seed``, q scaled by one of ``magnitudes``; ``extended``
    also draws FIRE (a bias function module, split into its table and its function around a random threshold),
    q, k, v as (B, L, H, D) memory and sa_norm's ε, and ``bfloat16`` turns some calls bfloat16 (on a GPU, or for the
    cpu backend: the interpreter's bfloat16 arithmetic is wrong), ``broadcasts`` other shapes of the mask (a mask per
    head) and of a bias tensor ((B, 1, 1, S), (L, S)) and SSMax's s as a float; each drawn after the others, so that
    a seed's other draws stay as they are without them."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    hkv, groups = rng.choice([1, 2]), rng.choice([1, 2, 3])
    shape = dict(b=rng.choice([1, 2]), hq=hkv * groups, hkv=hkv, lq=rng.choice([1, 3, 5, 16, 17, 31, 33, 40]),
                 lk=rng.choice([1, 2, 7, 16, 19, 32, 37, 48]), d=rng.choice([8, 16, 24, 32, 40, 64]))  # fmt: skip
    shape["dv"] = rng.choice([shape["d"], shape["d"], 16, 8])
    if backend == "triton":  # (the kernels need head dims of 16 or more)
        shape["d"], shape["dv"] = max(shape["d"], 16), max(shape["dv"], 16)
    dtypes = [torch.float32, torch.float32, torch.float16]
    call = dict(
        shape, normalizer=rng.choice(["softmax", "sa", "sa_norm"]), causal=rng.random() < 0.4,
        dtype=rng.choice(dtypes), mask_kind=rng.choice([None, None, "random", "padding", "causal pattern"]),
        bias_kind=rng.choice([None, None, "tensor", "alibi", "kerple_log", "kerple_power", "table"]),
        ssmax=rng.random() < 0.3, scale=rng.choice([None, None, 0.3]), magnitude=rng.choice(magnitudes),
    )  # fmt: skip
    b, hq, lq, lk, d, dv = (shape[n] for n in ("b", "hq", "lq", "lk", "d", "dv"))

    def randn(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64)

    call["tensors"] = dict(q=randn(b, hq, lq, d) * call["magnitude"], k=randn(b, hkv, lk, d), v=randn(b, hkv, lk, dv),
                           grad_out=randn(b, hq, lq, dv))  # fmt: skip
    mask = None
    if call["mask_kind"] == "random":
        mask = torch.rand(b, 1, lq, lk, generator=gen) < 0.7
    elif call["mask_kind"] == "padding":
        lengths = torch.randint(0, lk + 1, (b,), generator=gen)
        mask = (torch.arange(lk)[None, :] < lengths[:, None])[:, None, None, :]
    elif call["mask_kind"] == "causal pattern":
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)[None, None]
    call["mask"] = mask
    params = {}
    if call["bias_kind"] == "tensor":
        params["bias"] = randn(1, hq, lq, lk)
    elif call["bias_kind"] == "alibi":
        params["r1"] = torch.rand(hq, generator=gen, dtype=torch.float64) * 0.5
    elif call["bias_kind"] in ("kerple_log", "kerple_power"):
        params["r1"] = torch.rand(hq, generator=gen, dtype=torch.float64) + 0.1
        params["r2"] = torch.rand(hq, generator=gen, dtype=torch.float64) * 0.9 + 0.1
    elif call["bias_kind"] == "table":
        params["table"] = randn(hq, rng.choice([1, 5, 60]))
    if call["ssmax"]:
        params["s"] = torch.rand(hq, generator=gen, dtype=torch.float64) * 0.5 + 0.2
    call["params"] = params
    call["layout"], call["eps"] = "bhld", 1e-6
    if extended:
        call["layout"], call["eps"] = rng.choice(["bhld", "blhd"]), rng.choice([1e-6, 1e-6, 1e-3, 0.1])
        if rng.random() < 0.2:
            call["bias_kind"], call["fire_len"], call["fire_seed"] = "fire", rng.randint(1, 2 * lq), seed
            params.pop("bias", None), params.pop("r1", None), params.pop("r2", None), params.pop("table", None)
    if bfloat16 and (DEVICE == "cuda" or backend == "cpu") and rng.random() < 0.3:
        call["dtype"] = torch.bfloat16
    call["ssmax_value"] = None  # (s as a float, without a gradient)
    if broadcasts:
        if call["mask_kind"] == "random" and rng.random() < 0.5:
            call["mask"], call["mask_kind"] = torch.rand(b, hq, lq, lk, generator=gen) < 0.7, "random per head"
        if "bias" in params:
            params["bias"] = rng.choice([randn(b, 1, 1, lk), randn(lq, lk), params["bias"]])
        if call["ssmax"] and rng.random() < 0.5:
            call["ssmax_value"] = rng.choice([0.3, 0.7])
            params.pop("s")
    return call


def fire(call: dict, dtype: torch.dtype):
    """The call's FIRE module, its parameters drawn from its seed, in ``dtype``."""
    from sasoftmax.positional import FIRE

    with torch.random.fork_rng(devices=[]):  # (the global generator as it was, after)
        torch.manual_seed(call["fire_seed"])
        module = FIRE(call["hq"], call["fire_len"], width=8)
    return module.to(DEVICE, dtype)


def plain_attention(q, k, v, *, normalizer, causal, ssmax=None, mask=None, bias=None, eps=1e-6, scale=None):
    """Materialised attention with every op in q's dtype (FlashAttention's baseline; test_backend_triton's too):
    ``bias`` a tensor or a function of (query positions, key positions), either taken in q's dtype."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    lq, lk = q.shape[2], k.shape[2]
    x = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lk - lq, lk, device=q.device)[:, None]
    if mask is not None:
        allowed = allowed & mask.to(q.device)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            bias = bias(torch.arange(lk - lq, lk, device=q.device), torch.arange(lk, device=q.device))
        bias = bias.to(q.dtype)
        allowed = allowed & ~torch.isneginf(bias)
        x = x + bias.masked_fill(torch.isneginf(bias), 0)
    allowed = allowed.expand_as(x)
    if ssmax is not None:
        n = allowed.sum(-1, keepdim=True).clamp_min(1).to(q.dtype)
        x = x * (ssmax.to(q.dtype).view(1, -1, 1, 1) * torch.log(n))
    return masked_weights(x, allowed, normalizer, eps) @ v


def run(call: dict, backend: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """o and the gradients of q, k, v and every parameter by name, for ``backend`` ("plain": every op in
    ``dtype``)."""
    tensors = call["tensors"]
    if call["layout"] == "blhd":  # leaves in (B, L, H, D) memory, passed as (B, H, L, D) views
        bases = [tensors[n].transpose(1, 2).to(DEVICE, dtype).requires_grad_() for n in "qkv"]
        q, k, v = (t.transpose(1, 2) for t in bases)
    else:
        bases = [tensors[n].to(DEVICE, dtype).requires_grad_() for n in "qkv"]
        q, k, v = bases
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # parameters stay float32, as in models
    params = {n: t.to(DEVICE, param_dtype).requires_grad_() for n, t in call["params"].items()}
    kind = call["bias_kind"]
    bias = params.get("bias")
    if kind == "alibi":
        bias = RelativeBias.alibi(params["r1"])
    elif kind in ("kerple_log", "kerple_power"):
        bias = getattr(RelativeBias, kind)(params["r1"], params["r2"])
    elif kind == "table":
        bias = RelativeBias.table(params["table"])
    elif kind == "fire":
        bias = fire(call, param_dtype)
        params = dict(bias.named_parameters())
    mask = None if call["mask"] is None else call["mask"].to(DEVICE)
    s = params.get("s")
    if backend == "plain" and call["ssmax_value"] is not None:
        s = torch.full((call["hq"],), call["ssmax_value"], device=DEVICE, dtype=param_dtype)
    elif call["ssmax_value"] is not None:
        s = call["ssmax_value"]
    if backend == "plain":
        out = plain_attention(q, k, v, normalizer=call["normalizer"], causal=call["causal"], ssmax=s, mask=mask,
                              bias=bias, eps=call["eps"], scale=call["scale"])  # fmt: skip
    else:
        out = sasoftmax.attention(
            q, k, v, normalizer=call["normalizer"], causal=call["causal"], mask=mask, bias=bias, scale=call["scale"],
            ssmax=s, eps=call["eps"], backend=backend,
        )  # fmt: skip
    leaves = [*bases, *params.values()]
    grads = torch.autograd.grad(out, leaves, tensors["grad_out"].to(DEVICE, out.dtype), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    if call["layout"] == "blhd":
        grads[:3] = [g.transpose(1, 2) for g in grads[:3]]
    return dict(zip([*NAMES, *(f"d{n}" for n in params)], [out, *grads]))


def check(call: dict, backend: str) -> list[str]:
    """What fails for ``call`` (empty: nothing)."""
    dtype = call["dtype"]
    got, ref = run(call, backend, dtype), run(call, "eager", torch.float64)
    baselines = [run(call, "eager", dtype)]  # (in float32 for 16-bit inputs)
    if dtype != torch.float32:
        baselines.append(run(call, "plain", dtype))
    failures = []
    for name, want in ref.items():
        if not torch.isfinite(got[name]).all():
            failures.append(f"{name}: non-finite")
            continue
        err = (got[name].double() - want).abs().max().item()
        base_err = max((base[name].double() - want).abs().max().item() for base in baselines)
        if dtype == torch.float32:
            limit = max(1e-4 * want.abs().max().item(), 2 * base_err) + 1e-6
        else:
            rounded = want.to(got[name].dtype)
            atol = 2 * (rounded + 0.3 - 0.3 - rounded).abs().max().item()  # (float32 for parameters: ~nothing)
            limit = 2 * base_err + atol + 1e-5
        if err > limit:
            failures.append(f"{name}: error {err:.3g} > {limit:.3g}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("triton", "cpu"), default="triton")
    parser.add_argument("--seeds", nargs=2, type=int, default=(0, 100), metavar=("FIRST", "COUNT"))
    parser.add_argument("--extended", action="store_true", help="FIRE, (B, L, H, D) inputs and ε too")
    parser.add_argument("--bfloat16", action="store_true", help="some calls in bfloat16 (a GPU, or --backend cpu)")
    parser.add_argument("--broadcasts", action="store_true", help="masks per head, bias tensors broadcast, s a float")
    parser.add_argument("--magnitudes", nargs="+", type=float, default=[1.0, 1.0, 4.0],
                        help="factors q is scaled by, one drawn per call (tiny ones flatten sa_norm's rows: c large)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        failed, checked = _fuzz(args)
    finally:
        torch.set_num_threads(threads)
    print(f"{failed} of {checked} seeds failed ({args.backend})", flush=True)
    return 1 if failed else 0


def _fuzz(args: argparse.Namespace) -> tuple[int, int]:
    """Check the seeds of ``args``, printing each failure: (failed, checked). Interrupted (SIGINT: gpu_check.sh's time
    limit), it counts the seeds it got through."""
    failed = checked = 0
    try:
        for seed in range(args.seeds[0], args.seeds[0] + args.seeds[1]):
            failed += _fuzz_one(seed, args)
            checked += 1
    except KeyboardInterrupt:
        print(f"interrupted during seed {args.seeds[0] + checked}", flush=True)
    return failed, checked


def _fuzz_one(seed: int, args: argparse.Namespace) -> int:
    """1 if ``seed`` fails (printed), else 0."""
    call = draw(seed, args.backend, tuple(args.magnitudes), args.extended, args.bfloat16, args.broadcasts)
    try:
        failures = check(call, args.backend)
    except Exception as error:  # noqa: BLE001 (a raise is a finding too: reported, the run goes on)
        failures = [f"raised {type(error).__name__}: {error}"]
    if failures:
        print(f"seed {seed} {({n: call[n] for n in SUMMARY})}: {'; '.join(failures)}", flush=True)
    return int(bool(failures))


if __name__ == "__main__":
    sys.exit(main())
