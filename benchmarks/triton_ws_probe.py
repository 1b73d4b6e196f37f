"""Does Triton's warp specialisation pay for our forward loop on this GPU? (docs/triton.md, "Warp specialisation".)

Times a probe of the forward's loop, with and without ``tl.range(..., warp_specialize=True)``, in the form that
Triton 3.6 specialises on Hopper (one loop, q, k, v and the row statistics through in-kernel tensor descriptors,
4 warps): softmax's (the running max, rescaled accumulator) and sa_norm's second pass (the row statistics known,
weights p·(x − m)·c with the per-row factors given ready-made). Non-causal, no mask, L a multiple of the tiles,
FlashAttention's benchmark layout (model dim 2048 = H·D, 16k tokens per batch). It answers whether building the
specialised path into ``fwd`` is worth it before anyone does: the probe is not the kernels, only their loop.

    PYTHONPATH=src python benchmarks/triton_ws_probe.py --out OUT_DIR      # on a GPU, ~1 minute (compiling)
    PYTHONPATH=src python benchmarks/triton_ws_probe.py --smoke            # CPU, Triton's interpreter, tiny

Writes OUT_DIR/ws-probe.md and ws-probe.json: per (normalizer, N, head dim) the probe's ms without (the faster
of 4 and 8 warps) and with warp specialisation (the faster of 2 and 3 stages; tiles as BMxBNxWARPSxSTAGES), their
ratio, whether the compiler did specialise (its TTGIR holds ``ttg.warp_specialize``), and the largest difference
between the two outputs, and for context the triton backend's whole forward of the same call without gradients
(softmax: ``fwd``; sa_norm: ``row_extrema`` then ``fwd``, of which the probe is the second). First it checks both
variants against PyTorch at a small size (the run stops if either is wrong).
"""

from __future__ import annotations

import argparse
import contextvars
import math
import sys
from pathlib import Path

import gpu_common
import torch

LOG2E = 1.4426950408889634
EPS = 1e-6
PLAIN = [(4, 3), (8, 3)]  # (warps, stages) timed without warp specialisation
SPECIALISED = [(4, 2), (4, 3)]  # and with it (Triton adds its producer warps to the 4)


def kernels():
    """The probe kernel (imported late: on CPU the interpreter must be switched on before triton is imported)."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(Q, K, V, OUT, MU, F, G, L, scale_log2e, NORM: tl.constexpr, WS: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, D: tl.constexpr):  # fmt: skip
        """One (query block, batch·head) program of the forward over (B·H·L, D) rows. NORM 0: softmax, online
        max; NORM 2: sa_norm's second pass, MU = the row max ·log₂e, F = scale·c, G = m·c per row."""
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        rows = tl.num_programs(1) * L
        q_desc = tl.make_tensor_descriptor(Q, [rows, D], [D, 1], [BLOCK_M, D])
        k_desc = tl.make_tensor_descriptor(K, [rows, D], [D, 1], [BLOCK_N, D])
        v_desc = tl.make_tensor_descriptor(V, [rows, D], [D, 1], [BLOCK_N, D])
        o_desc = tl.make_tensor_descriptor(OUT, [rows, D], [D, 1], [BLOCK_M, D])
        row0 = bh * L + start_m * BLOCK_M
        q = q_desc.load([row0, 0])
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        if NORM == 2:  # (loaded through descriptors and used as loaded: anything else stops the specialisation)
            mu = tl.make_tensor_descriptor(MU, [rows], [1], [BLOCK_M]).load([row0])
            f = tl.make_tensor_descriptor(F, [rows], [1], [BLOCK_M]).load([row0])
            g = tl.make_tensor_descriptor(G, [rows], [1], [BLOCK_M]).load([row0])
        else:
            mu = tl.full([BLOCK_M], float("-inf"), tl.float32)
            f = mu
            g = mu
        for start_n in tl.range(0, L, BLOCK_N, warp_specialize=WS):
            k = k_desc.load([bh * L + start_n, 0])
            v = v_desc.load([bh * L + start_n, 0])
            qk = tl.dot(q, k.T)
            if NORM == 2:
                p = tl.math.exp2(qk * scale_log2e - mu[:, None])
                total += tl.sum(p, 1)
                p = p * (qk * f[:, None] - g[:, None])
                acc = tl.dot(p.to(v.dtype), v, acc)
            else:
                new_mu = tl.maximum(mu, tl.max(qk, 1) * scale_log2e)
                p = tl.math.exp2(qk * scale_log2e - new_mu[:, None])
                alpha = tl.math.exp2(mu - new_mu)
                total = total * alpha + tl.sum(p, 1)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
                mu = new_mu
        o_desc.store([row0, 0], (acc / total[:, None]).to(OUT.dtype.element_ty))

    return triton, probe


def row_statistics(q: torch.Tensor, k: torch.Tensor, heads: int, scale: float) -> tuple[torch.Tensor, ...]:
    """sa_norm's per-row inputs of the probe for (B·H·L, D) q and k: (max x·log₂e, scale·c, m·c), x = scale·q·kᵀ,
    one head at a time (an (L, L) float32 matrix, not (B·H, L, L))."""
    mu, f, g = (torch.empty(q.shape[0], device=q.device) for _ in range(3))
    length = q.shape[0] // heads
    for h in range(heads):
        part = slice(h * length, (h + 1) * length)
        x = (q[part].float() @ k[part].float().T) * scale
        high, low = x.amax(1), x.amin(1).clamp(max=0)
        c = 1 / (high.clamp(min=0) - low + EPS)
        mu[part], f[part], g[part] = high * LOG2E, scale * c, low * c
    return mu, f, g


def reference(q, k, v, heads: int, scale: float, norm: int) -> torch.Tensor:
    """softmax (norm 0) or sa_norm (2) attention per head, float32, materialised (the library's weights)."""
    import sasoftmax

    out = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    length = q.shape[0] // heads
    for h in range(heads):
        part = slice(h * length, (h + 1) * length)
        x = (q[part].float() @ k[part].float().T) * scale
        out[part] = sasoftmax.normalize(x, sasoftmax.NORMALIZERS[norm], eps=EPS) @ v[part].float()
    return out


def launch(triton, probe, inputs: dict, norm: int, ws: bool, warps: int, stages: int, block_m: int, block_n: int):
    """Run the probe once; (output, the compiled kernel or None in the interpreter)."""
    q, heads, length, scale = inputs["q"], inputs["heads"], inputs["length"], inputs["scale"]
    out = torch.empty_like(q)
    compiled = probe[(length // block_m, heads)](
        q, inputs["k"], inputs["v"], out, *inputs["stats"], length, scale * LOG2E, NORM=norm, WS=ws, BLOCK_M=block_m,
        BLOCK_N=block_n, D=q.shape[1], num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, compiled


def time_both(triton, probe, inputs: dict, norm: int, device: str, block_m: int, block_n: int) -> dict:
    """The probe's row: the fastest configuration without and with warp specialisation, and their outputs'
    largest difference."""
    q = inputs["q"]
    row = dict(normalizer=("softmax", "", "sa_norm")[norm], n=inputs["length"], d=q.shape[1], heads=inputs["heads"])
    outs, errors = {}, []
    for ws, configs in ((False, PLAIN), (True, SPECIALISED)):
        best = (None, "–", None, None)
        for warps, stages in configs:
            def run(ws=ws, warps=warps, stages=stages):
                return launch(triton, probe, inputs, norm, ws, warps, stages, block_m, block_n)

            config = f"{block_m}x{block_n}x{warps}x{stages}"
            try:  # (a configuration that does not compile or fit is a result, not the end of the run)
                out, compiled = run()
                ms = gpu_common.median_ms(run, device)
            except Exception as err:  # noqa: BLE001
                errors.append(f"{'with' if ws else 'without'} {config}: {gpu_common.error_text(err)}")
                continue
            if best[0] is None or ms < best[0]:
                applied = None if compiled is None else "ttg.warp_specialize" in compiled.asm["ttgir"]
                best = (ms, config, applied, out)
        key = "ws" if ws else "plain"
        row[f"{key}_ms"], row[f"{key}_config"], row[f"{key}_applied"], outs[key] = best
    row["ratio"] = gpu_common.ratio(row["ws_ms"], row["plain_ms"])
    row["max_diff"] = None
    if outs["ws"] is not None and outs["plain"] is not None:
        row["max_diff"] = (outs["ws"].float() - outs["plain"].float()).abs().max().item()
    row["errors"] = errors
    row["ours_ms"] = gpu_common.median_ms(lambda: backend_forward(inputs, row["normalizer"]), device)
    return row


def backend_forward(inputs: dict, normalizer: str) -> torch.Tensor:
    """The triton backend's whole forward of the same call, without gradients (softmax: its ``fwd``; sa_norm:
    ``row_extrema`` and ``fwd``), the heads as one batch's."""
    import sasoftmax

    q, k, v = (inputs[n].view(1, inputs["heads"], inputs["length"], -1) for n in "qkv")
    with torch.no_grad():
        return sasoftmax.attention(q, k, v, normalizer=normalizer, backend="triton")


def make_inputs(length: int, d: int, heads: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(heads * length, d, generator=gen, device=device, dtype=dtype) for _ in range(3))
    scale = d**-0.5
    return dict(q=q, k=k, v=v, heads=heads, length=length, scale=scale, stats=row_statistics(q, k, heads, scale))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for ws-probe.md and ws-probe.json")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny sizes (a code check)")
    args = parser.parse_args(argv)
    # (in a copy of the context: the allocator that in-kernel descriptors need, set below, stays the probe's)
    return contextvars.copy_context().run(probe_all, args)


def probe_all(args: argparse.Namespace) -> int:
    """Check the probe against PyTorch, then time it for every size of ``args``; the exit status."""
    device = "cpu" if args.smoke else "cuda"
    gpu_common.use_interpreter_on_cpu(device)
    triton, probe = kernels()
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device=device, dtype=torch.int8))
    # (the interpreter's bfloat16 arithmetic is wrong: float16 there)
    dtype, block_m, block_n = (torch.float16, 16, 16) if args.smoke else (torch.bfloat16, 128, 64)
    lengths, head_dims = ([32], [16]) if args.smoke else (args.lengths, args.head_dims)
    for norm in (0, 2):  # correct first, at a small size
        inputs = make_inputs(2 * block_m, head_dims[0], 2, dtype, device)
        want = reference(inputs["q"], inputs["k"], inputs["v"], 2, inputs["scale"], norm)
        for ws in (False, True):
            got = launch(triton, probe, inputs, norm, ws, 4, 2, block_m, block_n)[0].float()
            err = (got - want).abs().max().item()
            if err > 0.05 * max(1.0, want.abs().max().item()):  # (16-bit weights; a wrong loop is off by O(1))
                print(f"the probe is wrong (normalizer {norm}, ws={ws}): max error {err:.3g}", file=sys.stderr)
                return 1
    rows = []
    for d in head_dims:
        for length in lengths:
            heads = 2 if args.smoke else max(1, 16384 // length) * max(1, 2048 // d)  # (B·H)
            inputs = make_inputs(length, d, heads, dtype, device)
            for norm in (0, 2):
                rows.append(time_both(triton, probe, inputs, norm, device, block_m, block_n))
                print(rows[-1], flush=True)
    table = [
        "| normalizer | N | D | without: ms (tiles) | with: ms (tiles) | specialised | with ÷ without | max diff | "
        "the backend's forward ms |",
        "| --- | ---: | ---: | ---: | ---: | :---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        applied = {None: "–", True: "yes", False: "no"}[r["ws_applied"]]
        table.append(
            f"| {r['normalizer']} | {r['n']} | {r['d']} | {gpu_common.fmt(r['plain_ms'], 3)} ({r['plain_config']}) | "
            f"{gpu_common.fmt(r['ws_ms'], 3)} ({r['ws_config']}) | {applied} | {gpu_common.fmt(r['ratio'])} | "
            f"{gpu_common.fmt(r['max_diff'], 3)} | {gpu_common.fmt(r['ours_ms'], 3)} |"
        )
    table += [f"- {r['normalizer']}, N = {r['n']}, D = {r['d']}: {e}" for r in rows for e in r["errors"]]
    if args.out is not None:
        info = gpu_common.header(device, dtype=str(dtype).removeprefix("torch."), smoke=args.smoke)
        gpu_common.write_results(args.out, "ws-probe", "Warp specialisation probe (forward loop)", info, rows,
                                 "\n".join(table))  # fmt: skip
    print("\n".join(table))
    return 0 if all(r["max_diff"] is not None and math.isfinite(r["max_diff"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
