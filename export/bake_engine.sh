#!/bin/sh
# Bake the TensorRT engine for this machine's GPU into the challenge image, and save the image.
# Engines are specific to the GPU model and TensorRT version, and the challenge starts a fresh
# container for every case: an engine built at start-up would be built (minutes) on every run.
# So: run the image once on the target card, build the engine into its cache folder, warm CuPy's
# kernel cache on a real CT with that engine (which also proves the engine loads), commit the
# container as the image to hand in, and save it.
#
#   export/bake_engine.sh IMAGE [TAG] [TARFILE]
#     IMAGE    the image built from the Dockerfile (e.g. teamname:unbaked)
#     TAG      the baked image (default teamname:latest)
#     TARFILE  the file to hand in (default teamname.tar.gz; `docker save -o`, as the challenge asks)
#   BAKE_GPU             the GPU to bake on (default 0: `--gpus device=0`, as the organisers run)
#   FLARE_RT_BATCH_SIZE  the batch the engine is built for; must equal the image's (default 2)
#   DOCKER               the docker command (default docker)
set -eu

usage="usage: export/bake_engine.sh IMAGE [TAG] [TARFILE]"
image=${1:?$usage}
tag=${2:-teamname:latest}
tar=${3:-teamname.tar.gz}
gpu=${BAKE_GPU:-0}
batch=${FLARE_RT_BATCH_SIZE:-2}
docker=${DOCKER:-docker}
name="flare-rt-bake-$$"

cleanup() {
    "$docker" rm -f "$name" >/dev/null 2>&1 || true
}
trap cleanup EXIT

echo "bake: building the engine for GPU $gpu in $image (batch $batch)"
# The single quotes are intended: the script runs inside the container.
# shellcheck disable=SC2016
"$docker" run --gpus "device=$gpu" --name "$name" -e FLARE_RT_BATCH_SIZE="$batch" "$image" /bin/sh -c '
    set -e
    python3 -m flare_rt build-engine --batch-size "$FLARE_RT_BATCH_SIZE"
    FLARE_RT_INPUTS=/opt/flare-rt/warmup FLARE_RT_OUTPUTS=/tmp/warmup-out FLARE_RT_BACKEND=tensorrt \
        FLARE_RT_DEVICE=cuda FLARE_RT_ENGINE_BUILD=never sh /workspace/predict.sh
    rm -rf /tmp/warmup-out'
echo "bake: committing $name as $tag"
"$docker" commit --change 'CMD ["sh", "predict.sh"]' --change 'WORKDIR /workspace' "$name" "$tag"
echo "bake: saving $tag to $tar"
"$docker" save "$tag" -o "$tar"
echo "bake: done: $tar ($(du -h "$tar" | cut -f1))"
