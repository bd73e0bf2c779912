#!/bin/sh
# FLARE challenge entry point (POSIX sh; the organisers run `sh predict.sh` in the image's WORKDIR):
# every $FLARE_RT_INPUTS/*_0000.nii.gz -> $FLARE_RT_OUTPUTS/<case>.nii.gz (uint8 labels on the input's
# grid), in one flare-rt process (model and engine loaded once). A case that fails is logged and
# skipped; the others are still written. Exit status: 0 all cases written, 1 some failed (listed),
# otherwise flare-rt's error codes, which this script's own checks share: 2 no input case (bad input),
# 3 model, 4 no usable backend, 6 bad option, 7 out of memory, 8 outputs not writable.
#
# Environment (defaults as in the image):
#   FLARE_RT_INPUTS=/workspace/inputs  FLARE_RT_OUTPUTS=/workspace/outputs
#   FLARE_RT_BACKEND=auto  FLARE_RT_DEVICE=auto  FLARE_RT_BATCH_SIZE=2
#   FLARE_RT_CACHE (engines, kernels)  FLARE_RT_ENGINE_BUILD=auto|never|force  FLARE_RT_MODEL (bundle)
#   FLARE_RT_ARGS (more `flare-rt segment` options)  FLARE_RT_PYTHON=python3
set -u

inputs=${FLARE_RT_INPUTS:-/workspace/inputs}
outputs=${FLARE_RT_OUTPUTS:-/workspace/outputs}
python=${FLARE_RT_PYTHON:-python3}
backend=${FLARE_RT_BACKEND:-auto}
device=${FLARE_RT_DEVICE:-auto}
batch=${FLARE_RT_BATCH_SIZE:-2}

say() {
    printf '%s predict.sh: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2
}

set -- "$inputs"/*_0000.nii.gz
if [ ! -e "$1" ]; then
    say "no *_0000.nii.gz case in $inputs"
    exit 2
fi
cases=$#

if ! mkdir -p "$outputs" 2>/dev/null || ! (: > "$outputs/.predict-write-test.$$") 2>/dev/null; then
    say "cannot write into $outputs as uid $(id -u); run the container as root or make $outputs writable"
    exit 8
fi
rm -f "$outputs/.predict-write-test.$$"

say "$cases case(s) in $inputs -> $outputs; backend $backend, device $device, batch $batch," \
    "variant ${FLARE_RT_VARIANT:-source}, cache ${FLARE_RT_CACHE:-~/.cache/flare-rt}, engine build ${FLARE_RT_ENGINE_BUILD:-auto}"
if command -v nvidia-smi >/dev/null 2>&1; then
    say "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1)"
fi

# FLARE_RT_ARGS is split into words on purpose (several options).
# shellcheck disable=SC2086
"$python" -m flare_rt segment "$inputs" "$outputs" \
    --backend "$backend" --device "$device" --batch-size "$batch" ${FLARE_RT_ARGS:-}
status=$?

written=$(find "$outputs" -maxdepth 1 -name '*.nii.gz' ! -name '.*' | wc -l)
case $status in
    0) say "done: all $cases case(s) segmented ($written label file(s) in $outputs)" ;;
    1) say "done with failures: see the list above ($written label file(s) in $outputs)" ;;
    *) say "flare-rt stopped with exit status $status ($written label file(s) in $outputs)" ;;
esac
exit "$status"
