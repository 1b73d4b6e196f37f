#!/usr/bin/env bash
# Build, on this machine (no GPU), the Triton cache that a GPU session's gpu_check.sh compiles first: the CUDA tests'
# kernels, the fuzz's and the kernel benchmarks', for sm_90, keyed as the GPU machines' Triton keys them (triton 3.6.0,
# Python 3.12; benchmarks/triton_prime.py says how). Run it from the repository root at a session's start when a GPU
# is lent; it builds from a snapshot of HEAD (the cache holds HEAD's kernels: commit before, change no kernel after)
# in the background's time, then:
#
#   run(command="PRIMED=.prime/cache.tar.xz SASOFTMAX_COMMIT=<HEAD> ... bash benchmarks/gpu_check.sh $OUT/r",
#       carry=[".prime"])
#
#   benchmarks/triton_prime.sh [ARCHIVE]        (default .prime/cache.tar.xz; FUZZ_SEEDS=60 of the fuzz's seeds)
#
# Needs pip's access to PyPI: triton 3.6.0 (the GPU machines' version; this machine's 3.9 is CI's) and numpy < 2.4
# (3.6's interpreter) go into side folders under /tmp, pytest-xdist with them; nothing is installed for the project.
set -eu -o pipefail

ARCHIVE=$(realpath -m "${1:-.prime/cache.tar.xz}")
FUZZ_SEEDS=${FUZZ_SEEDS:-60}
SIDE=${PRIME_SIDE:-/tmp/sasoftmax-prime}
[ -f benchmarks/triton_prime.py ] || { echo "triton_prime.sh: run it from the repository root" >&2; exit 2; }
mkdir -p "$SIDE" "$(dirname "$ARCHIVE")"
PIP=(python3 -m pip install --quiet --no-deps --disable-pip-version-check)
[ -d "$SIDE/triton36/triton" ] || "${PIP[@]}" --target "$SIDE/triton36" triton==3.6.0
[ -d "$SIDE/tools/numpy" ] || "${PIP[@]}" --target "$SIDE/tools" numpy==2.3.5 pytest-xdist execnet
ls "$SIDE"/wheel/triton-3.6.0-cp312-*.whl >/dev/null 2>&1 || python3 -m pip download --quiet --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --disable-pip-version-check -d "$SIDE/wheel" triton==3.6.0
WHEEL=$(ls "$SIDE"/wheel/triton-3.6.0-cp312-*.whl)

COMMIT=$(git rev-parse HEAD)
SNAPSHOT=$SIDE/src-$COMMIT
[ -d "$SNAPSHOT" ] || { mkdir -p "$SNAPSHOT" && git archive HEAD | tar -x -C "$SNAPSHOT"; }
cd "$SNAPSHOT"
rm -rf "$SIDE/cache-$COMMIT"
# The warm step's kernel-benchmark runs as gpu_check.sh (default sizes) gives them to benchmarks/triton_warm.py
env -u TRITON_INTERPRET SASOFTMAX_COMMIT="$COMMIT" PYTHONPATH="$SIDE/tools:$SNAPSHOT/src:$SIDE/triton36" \
    python3 benchmarks/triton_prime.py build --wheel "$WHEEL" --out "$SIDE/cache-$COMMIT" --archive "$ARCHIVE" \
    --tests tests/test_backend_triton.py tests/test_triton_kernels.py --fuzz 0 "$FUZZ_SEEDS" \
    --warm -- --eager-max-len 1024 --lengths 1024 4096 16384 --head-dims 64 128 \
    -- --modes fwd+bwd --bias none alibi kerple kerple-table fire --providers sdpa-flash2 triton:softmax \
    triton:sa_norm --lengths 4096 --head-dims 64 128 --causal yes
