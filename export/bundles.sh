#!/bin/sh
# Trained model -> verified fp32 and fp16 flare-rt bundles. flare_rt/export.py does the work: each
# bundle is checked against the PyTorch network at export time, and the export fails (no file)
# when it disagrees beyond the stated tolerance.
#
#   export/bundles.sh SOURCE OUT_DIR [NAME]
#     SOURCE  an nnU-Net v2 model folder (plans.json, fold_X/checkpoint_final.pth), or a flare-rt
#             bundle: `flare-rt train` ends by writing its verified fp32 bundle, OUTPUT/model.onnx
#     writes  OUT_DIR/NAME_fp32.onnx and OUT_DIR/NAME_fp16.onnx (InstanceNorm kept in fp32)
#   FLARE_RT_IMPORT_ARGS  more `flare-rt import-nnunet` options (e.g. "--fold 0 --demo")
#   FLARE_RT_OVERWRITE    1: replace bundles already in OUT_DIR (default: refuse them, before any work)
#   FLARE_RT_PYTHON       the Python with flare-rt and its torch extra (default python3)
set -eu

usage="usage: export/bundles.sh SOURCE OUT_DIR [NAME]"
src=${1:?$usage}
out=${2:?$usage}
name=${3:-$(basename "$src" .onnx)}
python=${FLARE_RT_PYTHON:-python3}

overwrite=
if [ "${FLARE_RT_OVERWRITE:-0}" = 1 ]; then overwrite=--overwrite; fi

for precision in fp32 fp16; do  # both refused before either is made
    if [ -e "$out/${name}_$precision.onnx" ] && [ -z "$overwrite" ]; then
        echo "export/bundles.sh: $out/${name}_$precision.onnx exists; set FLARE_RT_OVERWRITE=1 to replace it" >&2
        exit 8
    fi
done

mkdir -p "$out"
for precision in fp32 fp16; do
    target="$out/${name}_$precision.onnx"
    if [ -f "$src/plans.json" ]; then
        # FLARE_RT_IMPORT_ARGS is split into words on purpose (several options).
        # shellcheck disable=SC2086
        "$python" -m flare_rt import-nnunet "$src" "$target" --precision "$precision" $overwrite ${FLARE_RT_IMPORT_ARGS:-}
    elif [ -f "$src" ]; then
        # shellcheck disable=SC2086
        "$python" -m flare_rt export "$src" "$target" --precision "$precision" $overwrite
    else
        echo "export/bundles.sh: $src is neither an nnU-Net model folder (with plans.json) nor a bundle file" >&2
        exit 2
    fi
    "$python" -m flare_rt info "$target"
done
