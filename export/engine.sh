#!/bin/sh
# Bundle -> TensorRT engine and timing cache for a named GPU, built on that GPU (an engine runs only
# on the GPU model and TensorRT version it was built with). `flare-rt build-engine` does the work and
# refuses when this machine's GPU is not GPU_NAME.
#
#   export/engine.sh BUNDLE GPU_NAME [BATCH] [OUT_DIR]
#     BUNDLE    the fp16 bundle (export/bundles.sh)
#     GPU_NAME  part of the card's name, e.g. "RTX 5000"
#     BATCH     tiles per network call, as `segment --batch-size` (default 2, the image's)
#     OUT_DIR   also copy the engine and timing cache there (default: only the cache folder,
#               $FLARE_RT_CACHE/engines, where `segment` finds them)
#   FLARE_RT_PYTHON  the Python with flare-rt[tensorrt] (default python3)
set -eu

usage="usage: export/engine.sh BUNDLE GPU_NAME [BATCH] [OUT_DIR]"
bundle=${1:?$usage}
gpu=${2:?$usage}
batch=${3:-2}
out=${4:-}
python=${FLARE_RT_PYTHON:-python3}

report=$("$python" -m flare_rt build-engine "$bundle" --gpu "$gpu" --batch-size "$batch")
printf '%s\n' "$report"
if [ -n "$out" ]; then
    mkdir -p "$out"
    engine=$(printf '%s\n' "$report" | sed -n 's/^engine  *//p')
    timing=$(printf '%s\n' "$report" | sed -n 's/^timing  *//p')
    cp "$engine" "$timing" "$out/"
    echo "copied $(basename "$engine") and $(basename "$timing") to $out"
fi
