"""What the Triton kernels compile to, without a GPU: registers, stack (spills) and their hot loops' instructions.

    PYTHONPATH=src python3 benchmarks/triton_static.py --out results                 # the installed triton
    pip install --no-deps --target /tmp/t36 triton==3.6.0                           # the GPU machines' triton
    PYTHONPATH=/tmp/t36:src python3 benchmarks/triton_static.py --out results

Each kernel of one forward+backward (bf16, 4 query heads on 2 kv heads, N = 1024, without a bias or with each
``--bias``, learnable, the tiles of ``sasoftmax.backends.triton._configs`` or each ``--tiles`` variant through
``SASOFTMAX_TRITON_TILES``) is compiled
for ``--arch`` by the recorder of tests/triton_compile_cuda.py. ``cuobjdump -res-usage`` gives the registers and the
stack frame per thread (where spilled registers go), ``nvdisasm`` the SASS, whose innermost loops (a backward
branch) are counted per iteration: instructions, tensor-core instructions (HGMMA on Hopper, HMMA before), the
special-function unit's (MUFU: exp2, lg2, rcp), and local-memory loads and stores (LDL/STL: spilled registers
reloaded and saved every iteration). Nothing is timed: it is a proxy for sessions without a GPU (a loop bound by
its arithmetic costs about its instruction count; a spill in a loop is memory traffic every iteration), and the
toolchain decides it, so compare variants under the same triton. Markdown + JSON into --out.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # triton_compile_cuda: the recorder the compile test uses

KEY_OPS = ("HGMMA", "HMMA", "MUFU", "LDL", "STL", "SHFL")
NORMALIZERS = ("softmax", "sa", "sa_norm")
BIASES = ("none", "alibi", "kerple_log", "kerple_power")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-static", help="directory for static.md and static.json")
    parser.add_argument("--normalizers", nargs="+", default=["softmax", "sa_norm"], choices=NORMALIZERS)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--causal", choices=("yes", "no"), default="yes")
    parser.add_argument("--ssmax", action="store_true", help="with a (H,) SSMax scale")
    parser.add_argument("--bias", nargs="+", default=["none"], choices=BIASES, help="positional bias rows")
    parser.add_argument("--tiles", nargs="+", default=[""], help="SASOFTMAX_TRITON_TILES variants ('' = defaults)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability (90 Hopper, 80 Ampere)")
    return parser.parse_args(argv)


def tool(name: str) -> str:
    """A CUDA binary shipped with triton (cuobjdump, nvdisasm)."""
    import triton

    return os.path.join(os.path.dirname(triton.knobs.nvidia.ptxas.path), name)


def resources(cubin: bytes) -> dict[str, int]:
    """Registers and stack bytes per thread of a cubin's kernel (``cuobjdump -res-usage``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return {"registers": int(found.group(1)), "stack": int(found.group(2))} if found else {}


def sass_of(cubin: bytes) -> str:
    """The cubin's SASS listing (``nvdisasm -c``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool("nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout


def innermost_loops(sass: str) -> list[dict[str, int]]:
    """Per innermost loop of an ``nvdisasm`` listing (a label reached by a later branch, holding no other such
    loop; a few-instruction trap loop excluded): instructions per iteration and the counts of KEY_OPS."""
    labels, instructions, loops = {}, [], []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        code = re.match(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if code:
            instructions.append(code.group(1))
    for end, text in enumerate(instructions):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if target and labels.get(target.group(1), end + 1) <= end:
            loops.append((labels[target.group(1)], end))
    counted = []
    for start, end in loops:
        if end - start < 8 or any(start < s and e < end for s, e in loops if (s, e) != (start, end)):
            continue  # a trap, or an outer loop
        ops = collections.Counter(
            re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in instructions[start : end + 1]
        )
        counted.append({"instructions": end - start + 1, **{op: ops[op] for op in KEY_OPS}})
    return counted


def relative_bias(name: str, heads: int):
    """The ``RelativeBias`` of a bias row (learnable r1, r2: their gradients are part of the backward), or None."""
    import torch

    from sasoftmax import RelativeBias

    if name == "none":
        return None
    r1 = torch.full((heads,), 0.5, requires_grad=True)
    if name == "alibi":
        return RelativeBias.alibi(r1)
    return RelativeBias(name, r1, torch.full((heads,), 0.3, requires_grad=True))


def analyse(normalizer: str, head_dim: int, causal: bool, ssmax: bool, tiles: str, arch: int, bias: str) -> dict:
    """Compile one call's kernels and read what they became; {kernel: facts}."""
    import torch

    os.environ["SASOFTMAX_COMPILE_ARCH"] = str(arch)
    import triton_compile_cuda as compile_cuda  # reads SASOFTMAX_COMPILE_ARCH at import

    os.environ["SASOFTMAX_TRITON_TILES"] = tiles
    scale = torch.full((compile_cuda.QUERY_HEADS,), 0.5, requires_grad=True) if ssmax else None
    try:
        recorded = compile_cuda.record(
            torch.bfloat16, head_dim, normalizer, causal, ssmax=scale, length=1024, keep=True,
            bias=relative_bias(bias, compile_cuda.QUERY_HEADS),
        )
    finally:
        os.environ.pop("SASOFTMAX_TRITON_TILES", None)
    facts = {}
    for name, result in recorded.items():
        if "error" in result:
            facts[name] = {"error": result["error"][-300:]}
            continue
        compiled, warps, constants = result["compiled"], result["options"]["num_warps"], result["constants"]
        tile = constants["BLOCK_M"] * constants["BLOCK_N"]
        loops = innermost_loops(sass_of(compiled.asm["cubin"]))
        for loop in loops:  # what one score element costs a thread: the loop's work spread over the tile
            loop["per_element"] = round(loop["instructions"] * 32 * warps / tile, 1)
        facts[name] = {
            "tile": f"{constants['BLOCK_M']}x{constants['BLOCK_N']}", "warps": warps,
            "stages": result["options"]["num_stages"], "shared": result["shared"], **resources(compiled.asm["cubin"]),
            "loops": loops,
        }  # fmt: skip
    return facts


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import triton

    rows = []
    for normalizer in args.normalizers:
        for head_dim in args.head_dims:
            for bias in args.bias:
                for tiles in args.tiles:
                    facts = analyse(normalizer, head_dim, args.causal == "yes", args.ssmax, tiles, args.arch, bias)
                    for kernel, fact in sorted(facts.items()):
                        rows.append({"normalizer": normalizer, "D": head_dim, "bias": bias,
                                     "tiles": tiles or "default", "kernel": kernel, **fact})  # fmt: skip
                        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"triton {triton.__version__}, sm_{args.arch}, bf16, causal {args.causal}, SSMax {args.ssmax}; "
              "per innermost loop, per iteration: instructions (per score element and thread) / HGMMA+HMMA / MUFU / "
              "LDL+STL (spilled registers)")  # fmt: skip
    lines = [header, "", "| normalizer | D | bias | tiles | kernel | tile | warps | registers | stack B | loops |",
             "| --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in rows:
        loops = "; ".join(f"{x['instructions']} ({x['per_element']}) / {x['HGMMA'] + x['HMMA']} / {x['MUFU']} / "
                          f"{x['LDL'] + x['STL']}" for x in r.get("loops", []))  # fmt: skip
        lines.append(f"| {r['normalizer']} | {r['D']} | {r['bias']} | {r['tiles']} | {r['kernel']} | "
                     f"{r.get('tile', '')} | {r.get('warps', '')} | {r.get('registers', r.get('error', ''))} | "
                     f"{r.get('stack', '')} | {loops} |")  # fmt: skip
    (out / "static.md").write_text("\n".join(lines) + "\n")
    (out / "static.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
