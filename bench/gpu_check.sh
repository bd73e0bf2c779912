#!/usr/bin/env bash
# The GPU check of flare-rt: ONE run on a bare GPU machine, from the repository root, in at most 8 minutes.
#
#   bash bench/gpu_check.sh              # on the GPU machine (needs .gpucheck/ from bench/gpu_prepare.py)
#   bash bench/gpu_check.sh --dry-run    # anywhere: the CPU steps run, every GPU step is skipped and says so
#
# Options: --dry-run, --budget SECONDS (whole script, default 480), --threads N (default 8).
# Environment: PYTHON (default python3), OUT (results folder; default bench/results/gpucheck-<time>),
#   GPUCHECK_WORK (scratch, default /tmp/gpucheck).
#
# Steps, most important first, each under its own timeout inside the budget (a hang costs one step):
#   1 payload check  2 carried wheels installed (pip --no-index --target)  3 data: the example CT, its crop,
#   the nnU-Net model folder (carried, or rebuilt from the packaged bundle's weights), the 512x512x269 CT built
#   with nibabel+scipy, the fp32 flare-rt bundle  4 benchmark: flare-rt torch fast (cold + 2 warm), nnU-Net's
#   predictor on the GPU, flare-rt faithful (cold + warm), flare-rt fast on the CPU for the agreement
#   5 report (table per case)  6 memory-time PNG  7 CuPy vs numpy bounds  8 pytest -m "gpu or tensorrt"
#   9 bench/kernels.py (if present)  9b bench/gpu_profile.py (memory by allocation site)  9c predict.sh on the GPU (bench/predict_check.py)
#   10 final report with the RTX 5000 estimate; files into $OUT.
# $OUT gets at most 8 files (the device tool brings back 8): gpu_check.log, report.md, results.json,
# results.csv, memory.png, xp.json, pytest.log, runs.tar.gz (logs and reports of every run, no images).
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
BUDGET=480
THREADS=8
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --budget) BUDGET="$2"; shift ;;
        --threads) THREADS="$2"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

PY="${PYTHON:-python3}"
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
RESERVE=25                                   # kept for the final report and the copies into $OUT
OUT="${OUT:-bench/results/gpucheck-$(date +%Y%m%d-%H%M%S)}"
WORK="${GPUCHECK_WORK:-/tmp/gpucheck}"
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - RESERVE - $(date +%s) )); }

# step NAME MAX_SECONDS MIN_SECONDS cmd...: run cmd under min(MAX, time left); skip it when less than MIN is left.
step() {
    local name="$1" max="$2" min="$3"; shift 3
    local t; t=$(left)
    [ "$t" -gt "$max" ] && t=$max
    if [ "$t" -lt "$min" ]; then
        say "SKIPPED $name: ${t}s left in the budget, it needs at least ${min}s"
        return 99
    fi
    say "START $name (timeout ${t}s)"
    local s; s=$(date +%s)
    timeout -k 10 -s TERM "$t" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ]; then say "TIMEOUT $name after ${t}s"; else say "END $name rc=$rc ($(( $(date +%s) - s ))s)"; fi
    return "$rc"
}
gpu_step() {  # a step that needs the GPU: skipped with a clear line in a dry run
    if [ "$DRY_RUN" -eq 1 ]; then say "SKIPPED $1: needs the GPU (dry run)"; return 98; fi
    step "$@"
}

say "flare-rt GPU check: budget ${BUDGET}s, threads $THREADS, dry run $DRY_RUN, python $($PY -c 'import sys; print(sys.version.split()[0])'), OUT=$OUT"
if [ "$DRY_RUN" -eq 0 ]; then   # the GPU as the memory sampler will see it (NVML: no CUDA context)
    "$PY" -c "import sys; sys.path.insert(0, 'bench'); import gpu_memory as g; s = g.NvmlSource(0); print('GPU:', s.describe(), 'used now', round(s.used_mib()), 'MiB')" 2>&1 | tee -a "$LOG" \
        || { say "no usable GPU here (NVML above); run with --dry-run for the CPU steps"; exit 2; }
    command -v nvidia-smi > /dev/null && nvidia-smi 2>&1 | head -20 >> "$LOG"
fi

# 1. payload: what travelled must fit into 64 MiB, and .gpucheck/ must match its manifest
step payload 60 5 "$PY" bench/gpu_prepare.py --check-payload || { say "payload check failed: stop"; exit 2; }
MODEL_NAME=$("$PY" -c "import json; print(json.load(open('.gpucheck/manifest.json'))['model']['name'])")
CKPT_MODE=$("$PY" -c "import json; print(json.load(open('.gpucheck/manifest.json'))['model']['checkpoint'])")
FOLD=$("$PY" -c "import json; print(json.load(open('.gpucheck/manifest.json'))['model']['fold'])")

# 2. the carried wheels (nibabel, nnU-Net v2 and what it imports that the machine lacks)
SITE="$WORK/site"
if "$PY" -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))"; then
    step wheels 90 10 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .gpucheck/wheels/*.whl || { say "wheel install failed: stop"; exit 2; }
    export PYTHONPATH="$PWD:$SITE"
else
    say "SKIPPED wheels: they are built for CPython 3.12 (this is $($PY -c 'import sys; print(sys.version.split()[0])')); using the installed packages"
fi

# 3. data: example CT + crop, model folder, ts269 (nibabel + scipy), fp32 bundle
export FLARE_RT_DATA="$WORK/data" FLARE_RT_MODELS="$WORK/models"
CACHE="$WORK/cache"
MODEL="$FLARE_RT_MODELS/$MODEL_NAME"
mkdir -p "$FLARE_RT_MODELS" "$CACHE"
step data 60 5 "$PY" bench/cases.py data "$FLARE_RT_DATA" || { say "data step failed: stop"; exit 2; }
if [ "$CKPT_MODE" = "carried" ]; then
    rm -rf "$MODEL" && cp -r ".gpucheck/model/$MODEL_NAME" "$MODEL"
else
    step model-folder 150 20 "$PY" bench/nnunet_folder.py flare_rt/models/ts_demo_small_fp16.onnx \
        ".gpucheck/model/$MODEL_NAME" "$MODEL" --fold "$FOLD" || { say "model folder rebuild failed: stop"; exit 2; }
    # (the fp32 bundle made next from this folder holds the same weights as the packaged fp16 bundle)
fi
BENCH_ARGS=(--cases ts269 --threads "$THREADS" --cache "$CACHE" --model-dir "$MODEL" --fold "$FOLD")
PACKAGED=flare_rt/models/ts_demo_small_fp16.onnx
if step prepare 180 20 "$PY" bench/run.py "${BENCH_ARGS[@]}" --systems fast --prepare-only; then
    BUNDLE="$CACHE/${MODEL_NAME}_fold${FOLD}_fp32.onnx"
else  # the ONNX export failed there: both systems run the packaged bundle's weights instead
    [ -f "$CACHE/ts269_ct.nii.gz" ] || { say "the 512x512x269 CT was not built: stop"; exit 2; }
    say "the fp32 bundle could not be made here: falling back to $PACKAGED, nnU-Net's folder rebuilt from its weights"
    step model-folder 150 20 "$PY" bench/nnunet_folder.py "$PACKAGED" ".gpucheck/model/$MODEL_NAME" "$MODEL" \
        --fold "$FOLD" || { say "model folder rebuild failed: stop"; exit 2; }
    BUNDLE="$PACKAGED"
fi

# 4. the benchmark (each run its own process; --budget makes run.py skip what cannot fit; SIGTERM still writes)
BENCH_OUT="$WORK/bench"
rm -rf "$BENCH_OUT"
BENCH_BUDGET=$(( $(left) - 190 ))            # leave time for the report, the bounds, the GPU tests, profile, predict.sh
[ "$BENCH_BUDGET" -gt 300 ] && BENCH_BUDGET=300
if [ "$DRY_RUN" -eq 1 ]; then
    say "SKIPPED GPU systems (cuda_torch_fast, cuda_nnunet, cuda_torch_faithful): dry run; the CPU fast path runs alone"
    SYSTEMS=(--systems fast --repeats 1)
    RUN_TIMEOUT=$BENCH_BUDGET                # a CPU-only machine is slow: the run may use the whole budget
else
    # by system, most important first: the budget cuts the last ones, not the warm runs of the first
    SYSTEMS=(--systems cuda_torch_fast,cuda_nnunet,cuda_torch_faithful,fast --order system --repeats 2
             --repeats-for cuda_torch_fast=3 --repeats-for cuda_nnunet=1 --repeats-for fast=1)
    RUN_TIMEOUT=200                          # a hang guard: nnU-Net's single-threaded export alone is ~85 s
fi
step benchmark $((BENCH_BUDGET + 60)) 60 "$PY" bench/run.py "${BENCH_ARGS[@]}" "${SYSTEMS[@]}" --bundle "$BUNDLE" \
    --timeout "$RUN_TIMEOUT" --budget "$BENCH_BUDGET" --out "$BENCH_OUT"
RESULTS=$(ls -t "$BENCH_OUT"/*.json 2>/dev/null | head -1)
if [ -n "$RESULTS" ]; then
    cp "$RESULTS" "$OUT/results.json"; cp "${RESULTS%.json}.csv" "$OUT/results.csv" 2>/dev/null
    say "results: $RESULTS"
else
    say "the benchmark wrote no results"
fi

# 5-6. the table so far, and the memory-time curves (from the JSON)
[ -n "$RESULTS" ] && step report 30 5 "$PY" bench/gpu_report.py "$RESULTS" --out "$OUT/report.md"
[ -n "$RESULTS" ] && { step plot 45 5 "$PY" bench/plot_memory.py "$RESULTS" "$OUT/memory.png" \
    || say "no memory plot (see above; a dry run has no GPU traces)"; }

# 7. CuPy vs numpy on the normalised, resampled ts269
gpu_step xp-bounds 90 20 "$PY" bench/xp_agreement.py "$CACHE/ts269_ct.nii.gz" --bundle "$BUNDLE" \
    --case ts269 --out "$OUT/xp.json"

# 8. the suite's GPU tests (TensorRT ones skip there); collection errors of CPU-only modules do not stop it
# (the whole output in pytest.log, its last lines in the log; exit code 5 = no test carries those markers)
step pytest 150 30 bash -c '"$0" -m pytest -m "gpu or tensorrt" -rs -q -p no:cacheprovider \
    --continue-on-collection-errors tests/test_gpu_runtime.py tests/kernels/test_kernels_gpu.py \
    tests/trt/test_trt_gpu.py tests/bench/test_bench_gpu_device.py > "$1/pytest.log" 2>&1; rc=$?; \
    tail -25 "$1/pytest.log"; exit $rc' "$PY" "$OUT"

# 9. the kernel benchmark, when another engineer's bench/kernels.py is there
if [ -f bench/kernels.py ]; then
    gpu_step kernels 60 15 "$PY" bench/kernels.py
else
    say "SKIPPED kernels: bench/kernels.py is not in this tree"
fi

# 9b. where the memory goes: flare-rt's configuration and single changes of it, each in a fresh process (the table
# in the log, the JSON in runs.tar.gz)
if [ -f "$CACHE/ts269_ct.nii.gz" ]; then
    mkdir -p "$BENCH_OUT/profile"
    gpu_step profile 100 40 "$PY" bench/gpu_profile.py "$CACHE/ts269_ct.nii.gz" --bundle "$BUNDLE" --variants \
        --only default,cuda-graph,channels-last --timeout 45 --json "$BENCH_OUT/profile/profile.json"
fi

# 9c. the challenge entry point on the GPU, outside Docker (no Docker engine there): predict.sh in folder mode
# with the torch backend, two real cases and a corrupt one (bench/predict_check.py)
gpu_step predict-sh 100 30 "$PY" bench/predict_check.py "$FLARE_RT_DATA" "$WORK/predict" --backend torch \
    --device cuda --timeout 90

# 10. final report: tables, agreement, CuPy bounds, RTX 5000 estimate; the run logs packed
if [ -n "$RESULTS" ]; then
    XP=(); [ -f "$OUT/xp.json" ] && XP=(--xp "$OUT/xp.json")
    RESERVE=0 step final-report 20 3 "$PY" bench/gpu_report.py "$RESULTS" "${XP[@]}" --estimate --out "$OUT/report.md"
    (cd "$BENCH_OUT" && tar czf - --exclude='*.nii.gz' --exclude='cache*' -- */ 2>/dev/null) > "$OUT/runs.tar.gz"
fi
say "done in $(( $(date +%s) - T0 ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
