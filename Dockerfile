# syntax=docker/dockerfile:1
# The FLARE challenge image (docs/challenge.md): `sh predict.sh` in /workspace segments every
# /workspace/inputs/*_0000.nii.gz into /workspace/outputs/<case>.nii.gz.
#
#   docker build -t teamname:latest .                          # TensorRT + CuPy, no PyTorch (default)
#   (the build fetches from PyPI and pypi.nvidia.com: TensorRT's PyPI packages download from the latter)
#   docker build --build-arg VARIANT=torch -t teamname:torch . # PyTorch as the GPU backend instead
#
# Base: CUDA 12.9 runtime. CUDA 12.x runs sm_75 (Turing, the organisers' Quadro RTX 5000) up to sm_120
# (Blackwell) on drivers >= 525 (minor-version compatibility); CUDA 13 would need driver >= 580.
# TensorRT 10.16 (docker/constraints/tensorrt.txt) supports the same range. For a bit-for-bit rebuild, pin the
# base by digest: FROM nvidia/cuda:12.9.1-runtime-ubuntu24.04@sha256:<digest from `docker pull`>.
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# Ubuntu 24.04's Python 3.12 in a virtual environment (the distribution's own Python stays untouched).
# Apt package versions are fixed by the pinned base image's release; they are not pinned one by one.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# flare-rt as a wheel, built from this checkout.
FROM base AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY flare_rt/ flare_rt/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM base
# tensorrt: TensorRT engines on CuPy buffers, no PyTorch. torch: the PyTorch CUDA backend (and CuPy).
ARG VARIANT=tensorrt
COPY docker/constraints/ /opt/flare-rt/constraints/
COPY docker/check_pins.sh /opt/flare-rt/check_pins.sh
COPY --from=wheel /dist/ /tmp/dist/
RUN case "$VARIANT" in \
        tensorrt) extras=tensorrt ;; \
        torch) extras=gpu,torch ;; \
        *) echo "VARIANT must be tensorrt or torch, got '$VARIANT'" >&2; exit 1 ;; \
    esac \
    && for wheel in /tmp/dist/flare_rt-*.whl; do \
        pip install --no-cache-dir --constraint /opt/flare-rt/constraints/common.txt \
            --constraint "/opt/flare-rt/constraints/${VARIANT}.txt" "${wheel}[${extras}]"; \
    done \
    && sh /opt/flare-rt/check_pins.sh /opt/flare-rt/constraints/common.txt "/opt/flare-rt/constraints/${VARIANT}.txt" \
    && rm -rf /tmp/dist

# Every place the image writes: the outputs mount, the cache (TensorRT engines and timing caches, CuPy's
# compiled kernels; baked by export/bake_engine.sh), matplotlib's config; no __pycache__ at run time.
ENV FLARE_RT_CACHE=/opt/flare-rt/cache \
    CUPY_CACHE_DIR=/opt/flare-rt/cache/cupy \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FLARE_RT_VARIANT=${VARIANT} \
    FLARE_RT_BACKEND=auto \
    FLARE_RT_DEVICE=auto \
    FLARE_RT_BATCH_SIZE=2 \
    FLARE_RT_ENGINE_BUILD=auto
RUN mkdir -p /workspace/inputs /workspace/outputs /opt/flare-rt/cache/engines /opt/flare-rt/cache/cupy /tmp/matplotlib
# A real CT to warm the caches with when baking (export/bake_engine.sh).
COPY examples/ts_example_ct.nii.gz /opt/flare-rt/warmup/warmup_0000.nii.gz
WORKDIR /workspace
COPY predict.sh /workspace/predict.sh
# Runs as root: the challenge bind-mounts a host folder on /workspace/outputs, and a non-root user
# cannot write into a root-owned one (tests/container/test_predict_sh.py shows predict.sh's refusal).
CMD ["sh", "predict.sh"]
