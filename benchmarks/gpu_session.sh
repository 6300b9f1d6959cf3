#!/usr/bin/env bash
# Everything that needs a GPU, in one call: build the CUDA extension, run the GPU tests (compute-sanitizer
# included), run the benchmarks. Usage:  bash benchmarks/gpu_session.sh [build-test|bench|all]
# Logs and results go to $OUT (the device tool's return folder) or benchmarks/results/session/, packed
# as session.tar.gz plus a short summary.md; benchmark tables also land in benchmarks/results/.
# The device machine has no network: the package is installed without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:-all}
out=${OUT:-benchmarks/results/session}
logs=$(mktemp -d)
mkdir -p "$out"
summary="$out/summary.md"
export PYTHONUNBUFFERED=1

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record the exit status and duration
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$logs/$name.log" 2>&1
    local status=$?
    echo "| $name | $status | $((SECONDS - start)) s | $(tail -n 1 "$logs/$name.log" | cut -c1-160) |" >>"$summary"
    tail -n 5 "$logs/$name.log"
    return $status
}

{
    echo "# GPU session $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    echo
    echo "| step | exit | time | last line |"
    echo "|---|---|---|---|"
} >"$summary"

if [ "$phase" = build-test ] || [ "$phase" = all ]; then
    step build 900 env LLM2VEC_FAST_BUILD_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e .
    ls -l llm2vec_fast/_cuda*.so >>"$summary" 2>&1
    step gpu-tests 1500 python3 -m pytest -m gpu -q -x -p no:cacheprovider --durations=20
    step cpu-tests 900 python3 -m pytest -m "not gpu" -q -n 8 -p no:cacheprovider
fi
if [ "$phase" = bench ] || [ "$phase" = all ]; then
    step bench-attention 1500 python3 benchmarks/bench_attention.py
    step bench-encode 900 python3 benchmarks/bench_encode.py --layers 8
    step bench-train 900 python3 benchmarks/bench_train.py --layers 8
fi

cp benchmarks/results/*.json benchmarks/results/*.md "$logs/" 2>/dev/null
tar -czf "$out/session.tar.gz" -C "$logs" .
cat "$summary"
