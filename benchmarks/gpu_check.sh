#!/usr/bin/env bash
# Issue 13 GPU figures for LP-SAM in one command (about 6-8 minutes on one H100/H200):
#   bash benchmarks/gpu_check.sh            # from the repository root, on a CUDA machine
# Prints (and appends to ${LOG:-benchmarks/gpu_check.log}):
#   1. the CUDA tests of the bf16 / torch.compile predictor path (tests marked gpu),
#   2. ViT-B @256 and @1024 forward, bf16, old path beside new path: img/s, peak MiB,
#      GFLOP/image (FlopCounterMode), TFLOP/s, MFU vs the dense bf16 peak, new/old,
#   3. the new path with torch.compile @256,
#   4. precompute-masks --masker lpsam end to end vs the bare model rate (prefetch off / on).
# Each step has its own time limit so that one slow step cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOG=${LOG:-benchmarks/gpu_check.log}
run() {
    local limit=$1; shift
    echo "\$ $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
}
echo "# gpu_check $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null)" | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
run 75 "$PY" -m pytest tests/test_lpsam_fast_predict.py -q -m gpu -p no:cacheprovider
run 110 "$PY" benchmarks/bench_lpsam.py --device cuda --mode forward --spec vit_b --sizes 256 --batch-sizes 32 128 --dtypes bf16 --repeats 3 --iters 5 --time-budget 70
run 80 "$PY" benchmarks/bench_lpsam.py --device cuda --mode forward --spec vit_b --sizes 1024 --batch-sizes 8 --dtypes bf16 --repeats 3 --iters 3 --time-budget 70
run 100 "$PY" benchmarks/bench_lpsam.py --device cuda --mode forward --spec vit_b --sizes 256 --batch-sizes 128 --dtypes bf16 --paths new --compile --repeats 3 --iters 5 --time-budget 80
run 140 "$PY" benchmarks/bench_lpsam.py --device cuda --mode precompute --spec vit_b --sizes 256 --batch-sizes 64 --dtypes bf16 --images 4096 --runs 0:0 0:4 8:0 --repeats 3 --iters 5
