#!/usr/bin/env bash
# GPU verification of the multi-scale deformable attention operator, in one command:
# build the compiled op, run the GPU tests of it and of the Triton op, benchmark both beside the
# PyTorch path (and the `deformops` package from PyPI when it is installed; never installed here),
# and leave every log and number under $OUT.
#
# usage: OUT=/some/dir bash scripts/gpu_check.sh
# env:   OUT               where results go (default outputs/gpu_check)
#        PYTHON            interpreter (default python)
#        BUILD_TIMEOUT     seconds for the build (default 240)
#        TEST_TIMEOUT      seconds for the tests (default 360: the Triton kernels autotune and compile)
#        BENCH_TIMEOUT     seconds for the operator benchmark (default 300)
#        BENCH_MODEL=1     also run the COCO-scale model benchmark (cascade vs v3.0.4; minutes)
#
# Every step runs even when an earlier one failed (one GPU session should bring back as much as
# it can); the exit status is non-zero if any step failed, and $OUT/summary.txt lists each step's
# status and duration. Files written:
#   env.txt            GPU, driver, torch / CUDA versions
#   build.log          `python ops/setup.py build_ext --inplace` for the visible GPU's architecture
#   ptxas.txt          registers / spills per kernel instantiation (nvcc --resource-usage)
#   tests.log, junit.xml   tests/test_ops_cuda.py, tests/test_ops_triton_gpu.py, tests/test_compile.py,
#                      tests/test_ops.py
#   triton_autotune.txt    the launch configuration Triton's autotuner chose per kernel and key
#   bench_op.jsonl     `scripts/benchmark.py op --impl all --dtype all --shape all`, one JSON per line:
#                      impl cuda | triton | pytorch | deformops (fwd, fwd+bwd, peak memory, rel_err)
#   bench_model.jsonl  (BENCH_MODEL=1) `scripts/benchmark.py model ... --compare cascade v3.0.4`
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python}
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"
failed=0

# step NAME TIMEOUT COMMAND...: runs COMMAND under a timeout, appends "NAME rc=.. seconds=.." to the summary.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS rc
    echo "== $name (limit ${limit}s): $*" >&2
    timeout --signal=TERM --kill-after=10 "$limit" "$@"
    rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$summary" >&2
    [[ $rc -eq 0 ]] || failed=1
    return 0
}

# --- environment ------------------------------------------------------------------------------
{
    nvidia-smi || echo "nvidia-smi unavailable"
    "$python" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "capability", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory_GiB", round(p.total_memory / 2 ** 30, 1))
EOF
    command -v nvcc && nvcc --version
} > "$OUT/env.txt" 2>&1

# Build for the GPU that is actually there (torch would otherwise build for every visible one).
if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
    TORCH_CUDA_ARCH_LIST=$("$python" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')" 2>/dev/null)
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [[ -z ${CUDA_HOME:-} && -x /usr/local/cuda/bin/nvcc ]]; then
    export CUDA_HOME=/usr/local/cuda
fi

# --- 1. build -----------------------------------------------------------------------------------
step build "${BUILD_TIMEOUT:-240}" "$python" ops/setup.py build_ext --inplace > "$OUT/build.log" 2>&1

# Registers and spills per kernel (the backward's occupancy is what tuning would look at).
arch=${TORCH_CUDA_ARCH_LIST%%;*}
arch=${arch//./}
arch=${arch%%+*}
nvcc_bin=${CUDA_HOME:+$CUDA_HOME/bin/}nvcc
step ptxas 120 "$nvcc_bin" -c ops/src/msda_kernels.cu -o "$OUT/msda_kernels.o" -O3 -std=c++17 -I ops/src \
    -gencode "arch=compute_${arch},code=sm_${arch}" --resource-usage > "$OUT/ptxas.txt" 2>&1
rm -f "$OUT/msda_kernels.o"

# --- 2. tests -----------------------------------------------------------------------------------
# MSDA_JIT=0: if the build above failed, say so in the tests instead of rebuilding for minutes.
# TRITON_INTERPRET unset: the GPU tests need the compiled Triton kernels (the interpreted ones
# are what tests/test_ops_triton.py runs on CPU in every CI run).
MSDA_JIT=0 step tests "${TEST_TIMEOUT:-360}" env -u TRITON_INTERPRET "$python" -m pytest tests/test_ops_cuda.py \
    tests/test_guidance_controls.py::test_random_ranking_on_cuda_draws_from_a_cuda_generator_reproducibly \
    tests/test_ops_triton_gpu.py tests/test_compile.py tests/test_ops.py -q -rs --durations=25 \
    --junitxml="$OUT/junit.xml" > "$OUT/tests.log" 2>&1

# --- 3. operator benchmark ----------------------------------------------------------------------
# TRITON_PRINT_AUTOTUNING=1 makes Triton print each autotuning result (to stdout: kept apart from the JSON).
MSDA_JIT=0 TRITON_PRINT_AUTOTUNING=1 step bench_op "${BENCH_TIMEOUT:-300}" env -u TRITON_INTERPRET "$python" \
    scripts/benchmark.py op --impl all --dtype all --shape all > "$OUT/bench_op.raw" 2> "$OUT/bench_op.err"
grep '^{' "$OUT/bench_op.raw" > "$OUT/bench_op.jsonl"
grep -v '^{' "$OUT/bench_op.raw" > "$OUT/triton_autotune.txt"
rm -f "$OUT/bench_op.raw"

# --- 4. model benchmark at COCO scale (optional) ------------------------------------------------
if [[ ${BENCH_MODEL:-0} == 1 ]]; then
    MSDA_JIT=0 step bench_model "${BENCH_MODEL_TIMEOUT:-300}" "$python" scripts/benchmark.py model \
        --config configs/minitrain_r18.yaml --image_size 800 1333 --no-use_ms_detr --no-use_aux_ffn \
        --num_queries_one2many 1500 --compare cascade v3.0.4 > "$OUT/bench_model.jsonl" 2> "$OUT/bench_model.err"
fi

MSDA_JIT=0 step bench_infer "${BENCH_INFER_TIMEOUT:-120}" "$python" scripts/benchmark.py infer --config configs/minitrain_r18.yaml --compare cascade v3.0.4 --dtypes fp32 bf16 --batch_sizes 1 8 > "$OUT/bench_infer.jsonl" 2> "$OUT/bench_infer.err"

cat "$summary" >&2
exit $failed
