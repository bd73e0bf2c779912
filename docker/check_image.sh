#!/bin/sh
# Run the challenge image as the organisers do, and check what it did: every case written, predict.sh's
# exit status, the time from launch to exit, and what the container wrote into its own filesystem
# (`docker diff`): nothing outside the outputs mount, and nothing in the cache either when the image is
# baked (a cache write means an engine or kernel was built at run time, which every run pays for).
#
#   docker/check_image.sh IMAGE INPUTS
#     IMAGE    the image to hand in (e.g. teamname:latest, after export/bake_engine.sh)
#     INPUTS   a folder of <case>_0000.nii.gz, mounted as /workspace/inputs (the challenge runs one case
#              per container: one case in INPUTS gives that case's time and memory as it would score)
#   CHECK_GPU    the GPU (default 0: `--gpus device=0`, as the organisers run); "none" runs without one
#   CHECK_OUTPUTS  the folder mounted as /workspace/outputs (default: a new temporary folder, kept)
#   DOCKER       the docker command (default docker)
#   NVIDIA_SMI   the nvidia-smi command (default nvidia-smi)
#
# With a GPU, its memory is sampled as the challenge samples it while the container runs: whole-device
# used = total - free (MiB), one query, then sleep 0.1 s; reported as the maximum and AUC = sum * 0.1 MiB*s.
#
# Exit 0: predict.sh exited 0, every case has its output, the container wrote nothing. Exit 1: one of
# those failed (each is reported). Exit 2: usage.
set -eu

usage="usage: docker/check_image.sh IMAGE INPUTS"
if [ "$#" -ne 2 ]; then
    echo "$usage" >&2
    exit 2
fi
image=$1
inputs=$2
docker=${DOCKER:-docker}
gpu=${CHECK_GPU:-0}
if [ ! -d "$inputs" ]; then
    echo "check_image.sh: $inputs is not a folder of <case>_0000.nii.gz" >&2
    exit 2
fi
inputs=$(cd "$inputs" && pwd)
outputs=${CHECK_OUTPUTS:-$(mktemp -d "${TMPDIR:-/tmp}/flare-rt-check.XXXXXX")}
mkdir -p "$outputs"
outputs=$(cd "$outputs" && pwd)
name="flare-rt-check-$$"
smi=${NVIDIA_SMI:-nvidia-smi}
samples="$outputs.gpu-samples"
sampler=""

cleanup() {
    [ -z "$sampler" ] || kill "$sampler" 2>/dev/null || true
    rm -f "$samples"
    "$docker" rm -f "$name" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' HUP INT PIPE TERM  # (through the EXIT trap: the container is removed)

if [ "$gpu" = none ]; then
    set -- --name "$name"
else
    set -- --gpus "device=$gpu" --name "$name"
fi
echo "check: $image on $inputs -> $outputs (GPU $gpu)"

now() {  # seconds since the epoch, with nanoseconds where date has %N
    t=$(date +%s.%N)
    case "$t" in *N*) date +%s ;; *) echo "$t" ;; esac
}

if [ "$gpu" != none ]; then
    if command -v "$smi" >/dev/null 2>&1; then
        : >"$samples"
        while "$smi" --query-gpu=memory.total,memory.free --format=csv,noheader,nounits -i "$gpu" >>"$samples"; do
            sleep 0.1
        done 2>/dev/null &
        sampler=$!
    else
        echo "check: no $smi here: GPU memory not sampled" >&2
    fi
fi
start=$(now)
status=0
# The organisers' command, with a name instead of --rm so that the container can be inspected after.
"$docker" container run "$@" -v "$inputs":/workspace/inputs -v "$outputs":/workspace/outputs "$image" \
    /bin/bash -c "sh predict.sh" || status=$?
end=$(now)
if [ -n "$sampler" ]; then
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    sampler=""
fi

failed=0
echo "check: predict.sh exited $status after $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')s" \
    "(launch to exit)"
[ "$status" -eq 0 ] || failed=1
if [ -f "$samples" ]; then
    awk -F', *' -v gpu="$gpu" '
        NF == 2 && $1 + 0 > 0 { used = $1 - $2; if (used > max) max = used; sum += used; n++ }
        END {
            if (!n) { print "check: GPU memory: no sample taken"; exit }
            printf "check: GPU %s memory (whole device, total - free, sampled every 0.1 s): ", gpu
            printf "max %d MiB, AUC %.0f MiB*s (%d samples)\n", max, sum * 0.1, n
        }' "$samples"
fi

cases=0
missing=""
for f in "$inputs"/*_0000.nii.gz; do
    [ -e "$f" ] || continue
    cases=$((cases + 1))
    case_name=${f##*/}
    case_name=${case_name%_0000.nii.gz}
    [ -s "$outputs/$case_name.nii.gz" ] || missing="$missing $case_name"
done
if [ -n "$missing" ]; then
    echo "check: no output for:$missing" >&2
    failed=1
fi
echo "check: $cases case(s) in $inputs"

# docker diff: "A|C|D /path" for each change to the container's own filesystem (mounts are not in it).
# /opt and /opt/flare-rt show as changed when something below them was written.
changes=$("$docker" diff "$name") || {
    echo "check: docker diff $name failed" >&2
    exit 1
}
cache=$(printf '%s\n' "$changes" | grep -E '^[ACD] /opt/flare-rt/cache(/|$)' || true)
elsewhere=$(printf '%s\n' "$changes" | grep -v -E '^([ACD] (/opt|/opt/flare-rt|/opt/flare-rt/cache(/.*)?))?$' || true)
if [ -n "$cache" ]; then
    echo "check: the run wrote into the image's cache (not baked for this GPU: export/bake_engine.sh):" >&2
    echo "$cache" | sed 's/^/  /' >&2
    failed=1
fi
if [ -n "$elsewhere" ]; then
    echo "check: the run wrote outside /workspace/outputs:" >&2
    echo "$elsewhere" | sed 's/^/  /' >&2
    failed=1
fi
[ -n "$cache$elsewhere" ] || echo "check: nothing written in the container's filesystem"
if [ "$failed" -ne 0 ]; then
    echo "check: FAILED" >&2
    exit 1
fi
echo "check: passed"
