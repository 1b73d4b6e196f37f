"""What the causal schedule (``triton_kernels._scheduled``) should be worth: a model, not a measurement.

    python3 benchmarks/schedule_model.py

A GPU starts a grid's programs in launch order as earlier ones finish. Under causal masking a query block's work
grows with its index, so the order decides how idle the GPU is at the end of a call. This lists programs the way
the kernels order them — the grid's order (axis 0 fastest) or the schedule's (sections of heads, in each the
heaviest block of every head first) — and hands each to the slot that frees first (``slots`` = SMs × programs per
SM), each costing a constant plus its key tiles. It prints the time to finish ÷ the ideal (the work ÷ the slots).
It leaves out everything else (lone programs run faster than a full SM's, memory): a real GPU gains less.
"""

from __future__ import annotations

import heapq

SMS = 132  # H100 SXM, H200
LAUNCH_COST = 2.0  # a program's fixed cost, in key tiles


def finish(costs: list[float], slots: int) -> float:
    """When the last of ``costs`` ends, each started in order on the slot free first."""
    free = [0.0] * slots
    for cost in costs:
        heapq.heappush(free, heapq.heappop(free) + cost)
    return max(free)


def order(blocks: int, heads: int, section: int) -> list[int]:
    """Query block of each program in launch order: the grid's (``section`` 0) or the causal schedule's."""
    if section == 0:
        return [block for _ in range(heads) for block in range(blocks)]
    result = []
    for first in range(0, heads, section):
        width = min(section, heads - first)
        result += [blocks - 1 - rank for rank in range(blocks) for _ in range(width)]
    return result


def ratio(n: int, heads: int, block_m: int, block_n: int, slots: int, section: int) -> float:
    """Time to finish ÷ the ideal, for a causal call of ``heads`` (batch·heads) rows of length ``n``."""
    blocks = -(-n // block_m)
    costs = [LAUNCH_COST + -(-(block + 1) * block_m // block_n) for block in order(blocks, heads, section)]
    return finish(costs, slots) / (sum(costs) / slots)


def main() -> None:
    shapes = [  # name, N, B·H, heads per L2 section (50 MiB ÷ k and v per head, a power of two), tile
        ("benchmark N=4k D=64 fwd", 4096, 128, 32, 128, 64),
        ("benchmark N=16k D=64 fwd", 16384, 32, 8, 128, 64),
        ("benchmark N=16k D=128 fwd", 16384, 16, 4, 64, 64),
        ("GPT seq 4k fwd (sa_norm)", 4096, 48, 32, 128, 64),
        ("GPT seq 4k dq (sa_norm)", 4096, 48, 32, 64, 32),
    ]
    print("| call | programs per SM | grid order | schedule |")
    print("| --- | ---: | ---: | ---: |")
    for name, n, heads, section, block_m, block_n in shapes:
        for per_sm in (1, 2, 3):
            grid, scheduled = (ratio(n, heads, block_m, block_n, SMS * per_sm, s) for s in (0, section))
            print(f"| {name} | {per_sm} | {grid:.3f} | {scheduled:.3f} |")


if __name__ == "__main__":
    main()
