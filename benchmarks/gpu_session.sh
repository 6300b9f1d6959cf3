#!/usr/bin/env bash
# Everything that needs a GPU, in one call. Usage:
#   bash benchmarks/gpu_session.sh quick [--dry-run]   # < 8 min from a bare checkout (the device tool's budget)
#   bash benchmarks/gpu_session.sh full|build-test|bench [--dry-run]   # the long sessions (build, all GPU tests
#                                                      # and compute-sanitizer, every benchmark)
# quick: build the CUDA extension for sm_90a only (ninja, MAX_JOBS=16) while the static kernel report compiles
# beside it; a correctness smoke of every backend and feature against float64 (autotuning limited to one tile,
# Triton shards compiling in parallel); the headline benchmarks (dense 2k/8k, padded 50%, embedding mix) with
# their peers, autotuning over the first two tiles of each class. Each phase runs under its own time limit,
# cut further so that the phases stay inside QUICK_BUDGET_S (default 440 s); a phase that runs out is
# recorded and the next one starts. --dry-run prints the plan with each phase's limit and exits.
# Results go to $OUT (the device tool's return folder) or benchmarks/results/session/: session.json and
# session.md (environment, phase timings, smoke, tables, static figures), static_report.json and
# session.tar.gz (every log and intermediate file). The device machine has no network: the package is
# installed without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
phase=${1:-quick}
dry_run=0
[ "${2:-}" = --dry-run ] && dry_run=1
case "$phase" in
    quick | full | all | build-test | bench) ;;
    *)
        echo "gpu_session.sh: unknown phase '$phase' (quick, full, build-test, bench; add --dry-run for the plan)" >&2
        exit 2
        ;;
esac
[ "$phase" = all ] && phase=full
if [ $# -gt 2 ] || { [ $# -eq 2 ] && [ "$dry_run" = 0 ]; }; then
    echo "gpu_session.sh: unexpected arguments after '$phase': ${*:2} (only --dry-run)" >&2
    exit 2
fi
out=${OUT:-benchmarks/results/session}
work=$(mktemp -d)
budget_total=${QUICK_BUDGET_S:-440} # + <= 35 s of summary and packing: under 8 minutes
started=$SECONDS
export PYTHONUNBUFFERED=1

planned=0 # --dry-run: the seconds the sequential phases before this one may take

step() { # step NAME LIMIT_S COMMAND...: run under min(LIMIT, what is left of the session's budget), log it
    local name=$1 limit=$2
    shift 2
    local elapsed=$((SECONDS - started))
    [ "$dry_run" = 1 ] && elapsed=$planned
    local left=$((budget_total - elapsed))
    [ "$phase" != quick ] && left=$limit
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$dry_run" = 1 ]; then
        printf '%-20s %4d s  %s\n' "$name" "$limit" "$*"
        [ -z "${PARALLEL:-}" ] && planned=$((planned + limit))
        return 0
    fi
    if [ "$limit" -lt 5 ]; then
        printf '%s\t124\t0\t%s\n' "$name" "$limit" >>"$work/phases.tsv"
        echo "== $name: skipped, the session's time is spent"
        return 124
    fi
    local start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >"$work/$name.log" 2>&1
    local status=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$limit" >>"$work/phases.tsv"
    echo "== $name: exit $status in $((SECONDS - start)) s (limit $limit s)"
    tail -n 3 "$work/$name.log"
    return $status
}

smoke_shards() { # the smoke's processes, in parallel: 4 Triton shards, the Triton Ampere path on Hopper, CUDA
    local pids=() status=0
    for shard in 0 1 2 3; do
        python3 benchmarks/gpu_smoke.py --backends triton --shard "$shard/4" --json "$work/smoke_triton_$shard.json" &
        pids+=($!)
    done
    LLM2VEC_FAST_TRITON_PATH=ampere python3 benchmarks/gpu_smoke.py --backends triton --shard 0/4 \
        --json "$work/smoke_triton_ampere.json" &
    pids+=($!)
    python3 benchmarks/gpu_smoke.py --backends cuda --json "$work/smoke_cuda.json" &
    pids+=($!)
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    return $status
}

if [ "$dry_run" = 0 ]; then
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv >"$work/nvidia-smi.csv" 2>&1
fi

if [ "$phase" = quick ]; then
    build=(env TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 LLM2VEC_FAST_BUILD_CUDA=1
        python3 -m pip install --no-build-isolation --no-deps --no-cache-dir -e .)
    report=(python3 benchmarks/kernel_report.py --arch sm_90a --json --jobs 6)
    if [ "$dry_run" = 1 ]; then
        PARALLEL=1 step static-report 150 "${report[@]}" "(beside the build)"
    else
        (step static-report 150 sh -c "$(printf '%q ' "${report[@]}") >$work/static_report.json") &
        report_pid=$!
    fi
    # Without the extension the Triton path still needs the package installed: then install it without CUDA.
    step build 150 "${build[@]}" || [ "$dry_run" = 1 ] ||
        step install-triton-only 40 env LLM2VEC_FAST_BUILD_CUDA=0 "${build[@]:4}"
    export LLM2VEC_FAST_AUTOTUNE=1 work
    export -f smoke_shards
    step smoke 100 bash -c smoke_shards
    [ "$dry_run" = 0 ] && wait "$report_pid"
    static=()
    [ -s "$work/static_report.json" ] && static=(--static-report "$work/static_report.json")
    export LLM2VEC_FAST_AUTOTUNE=2
    bench=(python3 benchmarks/bench_attention.py --out "$work" --rep 60 "${static[@]}")
    step bench-dense 80 "${bench[@]}" --table dense --no-flex
    step bench-padded 70 "${bench[@]}" --table padded
    step bench-mix 60 "${bench[@]}" --table mix --modes fwd
    unset LLM2VEC_FAST_AUTOTUNE
fi
if [ "$phase" = build-test ] || [ "$phase" = full ]; then
    step build 900 env LLM2VEC_FAST_BUILD_CUDA=1 MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps -e .
    step gpu-tests 1500 python3 -m pytest -m gpu -q -x -p no:cacheprovider --durations=20
    step cpu-tests 900 python3 -m pytest -m "not gpu" -q -n 8 -p no:cacheprovider
fi
if [ "$phase" = bench ] || [ "$phase" = full ]; then
    step bench-attention 1500 python3 benchmarks/bench_attention.py --out "$work"
    step bench-encode 900 python3 benchmarks/bench_encode.py --layers 8
    step bench-train 900 python3 benchmarks/bench_train.py --layers 8
fi
if [ "$dry_run" = 1 ]; then
    rmdir "$work"
    echo "at most $planned s of phases (budget $budget_total s for quick) + <= 35 s of summary and packing"
    exit 0
fi

cp benchmarks/results/*.json benchmarks/results/*.md "$work/" 2>/dev/null
timeout 30 python3 benchmarks/reporting.py session "$work" "$out" >"$work/summary.log" 2>&1 || cat "$work/summary.log"
[ -s "$work/static_report.json" ] && cp "$work/static_report.json" "$out/"
tar -czf "$out/session.tar.gz" -C "$work" .
[ -s "$out/session.md" ] && cat "$out/session.md"
rm -rf "$work"
echo "gpu_session.sh $phase: $((SECONDS - started)) s in all"
