#!/bin/sh
# Run the challenge image as the organisers do, and check what it did: every case written, predict.sh's
# exit status, the time from launch to exit, and what the container wrote into its own filesystem
# (`docker diff`): nothing outside the outputs mount, and nothing in the cache either when the image is
# baked (a cache write means an engine or kernel was built at run time, which every run pays for).
#
#   docker/check_image.sh IMAGE INPUTS
#     IMAGE    the image to hand in (e.g. teamname:latest, after export/bake_engine.sh)
#     INPUTS   a folder of <case>_0000.nii.gz, mounted as /workspace/inputs
#   CHECK_GPU    the GPU (default 0: `--gpus device=0`, as the organisers run); "none" runs without one
#   CHECK_OUTPUTS  the folder mounted as /workspace/outputs (default: a new temporary folder, kept)
#   DOCKER       the docker command (default docker)
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

cleanup() {
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
start=$(date +%s)
status=0
# The organisers' command, with a name instead of --rm so that the container can be inspected after.
"$docker" container run "$@" -v "$inputs":/workspace/inputs -v "$outputs":/workspace/outputs "$image" \
    /bin/bash -c "sh predict.sh" || status=$?
seconds=$(($(date +%s) - start))

failed=0
echo "check: predict.sh exited $status after ${seconds}s (launch to exit, whole seconds)"
[ "$status" -eq 0 ] || failed=1

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
"$docker" diff "$name" >"$outputs.diff" || {
    echo "check: docker diff $name failed" >&2
    exit 1
}
cache=$(grep -E '^[ACD] /opt/flare-rt/cache(/|$)' "$outputs.diff" || true)
elsewhere=$(grep -v -E '^[ACD] (/opt|/opt/flare-rt|/opt/flare-rt/cache(/.*)?)$' "$outputs.diff" || true)
rm -f "$outputs.diff"
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
