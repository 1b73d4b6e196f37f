#!/usr/bin/env bash
# One command for a fresh GPU machine (torch and triton installed, nothing else; the repository root as the
# working directory): versions, the Triton kernels the benchmarks and the training rows use compiled in parallel
# processes (Triton caches them on disk), the host time per attention call, the kernel benchmark (without and with
# positional biases), the GPT training benchmark (with, when asked, a profile of its rows at the first length), the
# Triton tests on CUDA (last: they must not run beside a timing) and, when asked (TUNE_S > 0), the tile tuning. Every
# step has a time limit (the whole script ends within 8 minutes with the defaults) and a failing step does not stop
# the next; a step that runs out of time is interrupted (SIGINT), so pytest still prints its summary of the failures
# so far.
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# Writes at most 15 files, flat, into OUT_DIR:
#   run.log      nvidia-smi, versions, each step's command, exit status and duration, the benchmarks' progress
#   tests.log    pytest tests/test_backend_triton.py on CUDA
#   kernels.md   kernels.json   attention kernels: ms, TFLOP/s, ratios to SDPA FlashAttention-2 / cuDNN, memory
#   bias.md      bias.json      the same with ALiBi, Kerple and FIRE biases (N = 4096 by default)
#   train.md     train.json     GPT training tokens/s and peak memory against the SDPA-softmax model, and per
#                               row the kernels taking the most device time per step (PROFILE_STEPS steps)
#   host.md      host.json      host µs per attention call: our Python, Triton's JIT launches, direct launches
#   tune.md      tune.json      (TUNE_S > 0 only) candidate tiles per kernel, timed (benchmarks/triton_tune.py)
#   grid-order.md grid-order.json  (GRID_ORDER_S > 0 only) kernels.md's causal rows with the programs in the grid's
#                               order (SASOFTMAX_TRITON_SECTION_HEADS=0) instead of the causal schedule, compiled
#                               first in WARM_WORKERS processes: the schedule's worth, against FA2 in both tables
#   fuzz.log                    (FUZZ_S > 0 only) tests/fuzz_backends.py on the triton backend on CUDA, bfloat16
#                               among its dtypes (the interpreter's tests run float16 only): each call that breaks
#                               FlashAttention's rule against float64 eager, and how many seeds ran
#   preset.log                  (PRESET_S > 0 only) `sasoftmax compare --preset gpu` on a fraction of its grid
#                               (PRESET_ARGS, default one seed of three and 200 of 1000 steps), with the time
#                               it took: the basis of an estimate of the full preset's time; and its
#                               results.json as preset-results.json
#
# Budget (environment variables; seconds):
#   GPU_CHECK_QUICK=1    fewer sizes: N 1024 4096, head dim 128, fwd+bwd only, train seq 1024, 5 timed steps;
#                        the tuning at head dim 64, causal
#   VERSIONS_S=10 WARM_S=75 KERNELS_S=75 BIAS_S=20 TRAIN_S=80 HOST_S=25 TESTS_S=195 TUNE_S=0   limits of the
#   steps (0 skips a step; 480 s in all). On an H100 (2026-11-27, c0d165b) the warm step took 63 s with the training
#   rows, kernels 66 s, bias 18 s, the training rows 112 s with one profiled step each (PROFILE_STEPS=1), the
#   versions over 5 s (torch's import) and the host step over 25 s at 100 calls × 7 batches; the tests, cold, 190 s
#   (eec5951; 198 s on an H200 at e9fd073). The
#   tuning (TUNE_S) compiles its candidates in WARM_WORKERS processes first: 96 took 48 s in all on an H200
#   GRID_ORDER_S=0       limit of the grid-order step's compiling and of its timing, each (skipped by default)
#   PROFILE_STEPS=0      profiled training steps per row (~5 s a row; the profile tables of gpu_train.py)
#   PROFILE_SEQ=         the training length profiled (default the first, 1024)
#   PRESET_S=0           limit of the compare step (skipped by default)
#   FUZZ_S=0             limit of the random differential test (skipped by default; it compiles each call's
#                        kernels, seconds each, so it gets through as many of FUZZ_SEEDS=200 seeds as the limit allows)
#   EAGER_MAX_LEN=1024   largest N of the eager (materialised) rows in the kernel table
#   TEST_WORKERS=14      pytest-xdist workers (if pytest-xdist is installed; 0 runs the tests in one process)
#   WARM_WORKERS=12      processes compiling the benchmarks' kernels at once (benchmarks/triton_warm.py), and the
#                        tuning's candidates
#   PRIMED=              a Triton cache compiled without a GPU for this commit (benchmarks/triton_prime.py build
#                        --archive, carried as .prime/): installed into $TRITON_CACHE_DIR (default ~/.triton/cache)
#                        first if this machine's Triton is the one it was built for; after the tests (and the
#                        fuzz), how many kernels Triton compiled all the same (run.log)
#   GPU_CHECK_SMOKE=1    tiny sizes on CPU: runs every step's code path anywhere (numbers meaningless)
#   GPU_CHECK_DRY=1      the benchmarks only check their arguments and print their plan (tests/test_benchmarks.py)
# Exit status: 0 when every step exited 0, else 1 (the files are written either way).
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: benchmarks/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
OUT=$1
if [ ! -f benchmarks/triton_attention.py ]; then
    echo "gpu_check.sh: run it from the repository root (benchmarks/triton_attention.py not found)" >&2
    exit 2
fi
mkdir -p "$OUT" || exit 2
LOG=$OUT/run.log
: >"$LOG"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
QUICK=${GPU_CHECK_QUICK:-0}
VERSIONS_S=${VERSIONS_S:-10}
WARM_S=${WARM_S:-75}
TESTS_S=${TESTS_S:-195}
KERNELS_S=${KERNELS_S:-75}
EAGER_MAX_LEN=${EAGER_MAX_LEN:-1024}
BIAS_S=${BIAS_S:-20}
TRAIN_S=${TRAIN_S:-80}
HOST_S=${HOST_S:-25}
TUNE_S=${TUNE_S:-0}
GRID_ORDER_S=${GRID_ORDER_S:-0}
PRESET_S=${PRESET_S:-0}
FUZZ_S=${FUZZ_S:-0}
FUZZ_SEEDS=${FUZZ_SEEDS:-200}
PRESET_ARGS=${PRESET_ARGS:---seeds 0 --steps 200}
PROFILE_STEPS=${PROFILE_STEPS:-0}
PROFILE_SEQ=${PROFILE_SEQ:-}
TEST_WORKERS=${TEST_WORKERS:-14}
WARM_WORKERS=${WARM_WORKERS:-12}
FAILED=0

# step NAME LIMIT_S OUTPUT_FILE COMMAND...: run COMMAND under `timeout`, appending its output to OUTPUT_FILE.
step() {
    local name=$1 limit=$2 output=$3
    shift 3
    if [ "$limit" -le 0 ]; then
        echo "== $name: skipped (limit 0)" | tee -a "$LOG"
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS rc
    timeout -s INT -k 10 "$limit" "$@" >>"$output" 2>&1
    rc=$?
    [ "$rc" -eq 124 ] && echo "   (timed out; what it wrote so far is kept)" | tee -a "$LOG"
    echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || FAILED=1
}

# The result headers name the commit: $SASOFTMAX_COMMIT when set (a copied working tree may carry a stale or no
# .git), else git's HEAD.
COMMIT=${SASOFTMAX_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export SASOFTMAX_COMMIT=$COMMIT
{
    echo "# gpu_check.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC'), quick=$QUICK"
    echo "commit: $COMMIT"
    git status --short --untracked-files=no 2>/dev/null | head -20
    nvidia-smi 2>&1 || echo "nvidia-smi failed"
} >>"$LOG"
step versions "$VERSIONS_S" "$LOG" "$PY" -c "
import torch, platform
print('python', platform.python_version(), 'torch', torch.__version__, 'CUDA', torch.version.cuda,
      'cuDNN', torch.backends.cudnn.version())
print('GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')
for name in ('triton', 'flash_attn', 'pandas', 'matplotlib', 'tqdm', 'pytest', 'xdist', 'hypothesis'):
    try:
        module = __import__(name)
        print(name, getattr(module, '__version__', 'installed'))
    except ImportError:
        print(name, 'not installed')
"

# A cache compiled without a GPU (see PRIMED above): what Triton would compile here first, found instead
PRIMED=${PRIMED:-}
if [ -n "$PRIMED" ]; then
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
    step prime 30 "$LOG" "$PY" benchmarks/triton_prime.py install "$PRIMED" --to "$TRITON_CACHE_DIR"
fi

BIAS_PROVIDERS=(sdpa-flash2 triton:softmax triton:sa_norm)  # the targets: each bias against the same call without
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    KERNEL_SIZES=(--smoke --providers sdpa-math sdpa-cudnn eager:sa_norm --causal yes)
    BIAS_SIZES=(--smoke --causal yes)
    BIAS_PROVIDERS=(sdpa-math cpu:sa_norm cpu:sa_norm+ssmax)
    TRAIN_SIZES=(--smoke --rows sdpa:softmax cpu:sa_norm)
    TRAIN_WARM=()  # (the smoke rows run on CPU: nothing to compile; nor do the host step's on a faked GPU)
    TUNE_SIZES=(--smoke --kernels fwd --causal yes)
    GRID_ORDER_SIZES=(--smoke --causal yes --providers sdpa-math cpu:sa_norm)
    HOST=(env -u TRITON_INTERPRET "$PY" benchmarks/triton_host.py --smoke)  # Triton drives a faked GPU
    FUZZ=(--backend cpu --seeds 0 2)
    PRESET=smoke
elif [ "$QUICK" = 1 ]; then
    KERNEL_SIZES=(--lengths 1024 4096 --head-dims 128 --modes fwd+bwd)
    BIAS_SIZES=(--lengths 4096 --head-dims 128 --causal yes)
    TRAIN_SIZES=(--seqs 1024 --steps 5 --warmup 2)
    TRAIN_WARM=(--train-seqs 1024 --host cuda)
    TUNE_SIZES=(--head-dims 64 --causal yes)  # the harness GPT's head dim
    GRID_ORDER_SIZES=(--lengths 4096 --head-dims 128 --causal yes --modes fwd+bwd)
    PRESET=gpu
else
    KERNEL_SIZES=(--lengths 1024 4096 16384 --head-dims 64 128)
    BIAS_SIZES=(--lengths 4096 --head-dims 64 128 --causal yes)
    TRAIN_SIZES=(--seqs 1024 4096)
    TRAIN_WARM=(--train-seqs 1024 4096 --host cuda)
    TUNE_SIZES=()
    GRID_ORDER_SIZES=(--lengths 4096 16384 --head-dims 64 128 --causal yes --modes fwd+bwd)
    PRESET=gpu
fi
[ "${GPU_CHECK_SMOKE:-0}" = 1 ] || HOST=("$PY" benchmarks/triton_host.py --device cuda --calls 50 --repeats 5)
[ "${GPU_CHECK_SMOKE:-0}" = 1 ] || FUZZ=(--backend triton --seeds 0 "$FUZZ_SEEDS" --extended --bfloat16)
DRY=()
[ "${GPU_CHECK_DRY:-0}" = 1 ] && DRY=(--dry-run)
[ "${GPU_CHECK_DRY:-0}" = 1 ] && FUZZ=(--backend cpu --seeds 0 0)
BIAS_ARGS=(--modes fwd+bwd --bias none alibi kerple kerple-table fire --providers "${BIAS_PROVIDERS[@]}"
    "${BIAS_SIZES[@]}")
# The benchmarks' Triton kernels compiled in parallel processes first, into Triton's cache (tests compile their own)
step warm "$WARM_S" "$LOG" "$PY" benchmarks/triton_warm.py --workers "$WARM_WORKERS" ${DRY[@]+"${DRY[@]}"} \
    ${TRAIN_WARM[@]+"${TRAIN_WARM[@]}"} \
    -- --eager-max-len "$EAGER_MAX_LEN" "${KERNEL_SIZES[@]}" -- "${BIAS_ARGS[@]}"

# Host time per call first (its calls' kernels compiled above, --host): it also checks that the direct
# launches (triton._launch) compute what Triton's own launches do, bit for bit, before anything is timed with them
step host "$HOST_S" "$LOG" "${HOST[@]}" --out "$OUT" ${DRY[@]+"${DRY[@]}"}
step kernels "$KERNELS_S" "$LOG" "$PY" benchmarks/triton_attention.py --out "$OUT" --prefix kernels \
    --eager-max-len "$EAGER_MAX_LEN" "${KERNEL_SIZES[@]}" ${DRY[@]+"${DRY[@]}"}
# The causal schedule's worth: the causal rows again with the programs in the grid's order (other kernels: compiled
# first). Only where asked (GRID_ORDER_S > 0).
GRID_ORDER_ARGS=(--providers sdpa-flash2 triton:softmax triton:sa_norm triton:sa_norm+ssmax --no-memory
    "${GRID_ORDER_SIZES[@]}")
[ "${GPU_CHECK_SMOKE:-0}" = 1 ] && GRID_ORDER_ARGS=(--no-memory "${GRID_ORDER_SIZES[@]}")
step grid-order-warm "$GRID_ORDER_S" "$LOG" env SASOFTMAX_TRITON_SECTION_HEADS=0 "$PY" benchmarks/triton_warm.py \
    --workers "$WARM_WORKERS" ${DRY[@]+"${DRY[@]}"} -- "${GRID_ORDER_ARGS[@]}"
step grid-order "$GRID_ORDER_S" "$LOG" env SASOFTMAX_TRITON_SECTION_HEADS=0 "$PY" benchmarks/triton_attention.py \
    --out "$OUT" --prefix grid-order "${GRID_ORDER_ARGS[@]}" ${DRY[@]+"${DRY[@]}"}
step bias "$BIAS_S" "$LOG" "$PY" benchmarks/triton_attention.py --out "$OUT" --prefix bias "${BIAS_ARGS[@]}" \
    ${DRY[@]+"${DRY[@]}"}
step train "$TRAIN_S" "$LOG" "$PY" benchmarks/gpu_train.py --out "$OUT" --prefix train "${TRAIN_SIZES[@]}" \
    --profile "$PROFILE_STEPS" ${PROFILE_SEQ:+--profile-seq "$PROFILE_SEQ"} ${DRY[@]+"${DRY[@]}"}
# The tests after the timings: their 14 processes compile (cold, ~270 s on an H200) and must not share the machine
# with a benchmark. No -x: one run has to show every failing test, not the first.
XDIST=()
if [ "$TEST_WORKERS" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n "$TEST_WORKERS")
fi
step tests "$TESTS_S" "$OUT/tests.log" "$PY" -m pytest tests/test_backend_triton.py tests/test_triton_kernels.py \
    -rfE --tb=short \
    -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"}
[ -f "$OUT/tests.log" ] && tail -n 3 "$OUT/tests.log" | sed 's/^/   /' | tee -a "$LOG"
[ -n "$PRIMED" ] && "$PY" benchmarks/triton_prime.py misses --to "$TRITON_CACHE_DIR" 2>&1 | sed 's/^/   /' | tee -a "$LOG"
step fuzz "$FUZZ_S" "$OUT/fuzz.log" "$PY" tests/fuzz_backends.py "${FUZZ[@]}"
[ -f "$OUT/fuzz.log" ] && tail -n 1 "$OUT/fuzz.log" | sed 's/^/   /' | tee -a "$LOG"
[ -n "$PRIMED" ] && [ "$FUZZ_S" -gt 0 ] && "$PY" benchmarks/triton_prime.py misses --to "$TRITON_CACHE_DIR" 2>&1 |
    sed 's/^/   (after the fuzz) /' | tee -a "$LOG"
step tune "$TUNE_S" "$LOG" "$PY" benchmarks/triton_tune.py --out "$OUT" --prefix tune --compile-workers "$WARM_WORKERS" \
    ${TUNE_SIZES[@]+"${TUNE_SIZES[@]}"} ${DRY[@]+"${DRY[@]}"}

# The comparison's own folder (checkpoints, plots) stays out of OUT: its log and results.json are what count.
PRESET_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-preset.XXXXXX")
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
    step preset "$PRESET_S" "$LOG" "$PY" -m sasoftmax compare --help
else
    # shellcheck disable=SC2086  # PRESET_ARGS is a list of words
    step preset "$PRESET_S" "$OUT/preset.log" "$PY" -m sasoftmax compare --preset "$PRESET" --out "$PRESET_DIR/runs" \
        $PRESET_ARGS
    [ -f "$PRESET_DIR/runs/results.json" ] && cp "$PRESET_DIR/runs/results.json" "$OUT/preset-results.json"
fi
rm -rf "$PRESET_DIR"

rm -f "$OUT"/*.tmp
echo "== done after ${SECONDS}s; files: $(cd "$OUT" && ls | tr '\n' ' ')" | tee -a "$LOG"
exit "$FAILED"
