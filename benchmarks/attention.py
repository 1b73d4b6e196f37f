"""Time and peak memory of the attention backends against SDPA softmax (see ``sasoftmax.benchmark``).

Run ``python benchmarks/attention.py`` (--quick: N = 512, 1024, 2048) or, for N = 512 … 16384 with
the table saved, ``python benchmarks/attention.py --full --markdown table.md --json results.json``.
"""

from __future__ import annotations

import argparse
import sys

from sasoftmax import benchmark


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchmark.add_arguments(parser)
    return benchmark.run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
