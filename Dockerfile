# syntax=docker/dockerfile:1
#
# interscope server image.
#
#   docker build -t interscope:0.1.0-cuda .                 # default: the CUDA (GPU) image
#   docker build --target cpu -t interscope:0.1.0-cpu .    # CPU-only image (overlays/cpu)
#
# Stages: `builder` turns the repository into a wheel (so the runtime holds an installed package,
# never a source tree); `cpu` and `gpu` install that wheel with the server extra. The GPU stage is
# last so that a plain `docker build` yields it.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
# cuDNN 9 + CUDA 12.6 runtime: what onnxruntime-gpu 1.20+ (CUDA 12 builds on PyPI) and torch's
# cu126 wheels expect. Ubuntu 24.04 rather than 22.04 because 22.04 ships Python 3.10 only and we
# develop and test on 3.11+.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
RUN pip install --no-cache-dir "build==1.2.2.post1"
COPY pyproject.toml README.md ./
COPY client ./client
COPY service ./service
# Pure-Python wheel (py3-none-any): built once here, installed by both runtime stages.
RUN python -m build --wheel --outdir /wheels

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
ARG TORCH_SPEC="torch>=2.6,<2.10"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=builder /wheels /wheels
# CPU torch from PyTorch's CPU index first (the PyPI default wheel drags in ~3 GB of CUDA
# libraries); then the wheel with the server extra, whose torch requirement is already satisfied.
# Versions are bounded, not exact (DL3013): torch by the TORCH_SPEC range, the rest by the
# wheel's own requirement ranges in pyproject.toml, which is where the project pins them.
# hadolint ignore=DL3013
RUN pip install --index-url https://download.pytorch.org/whl/cpu "${TORCH_SPEC}" \
    && pip install "$(ls /wheels/interscope-*.whl)[server]" \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 interscope \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin interscope \
    && mkdir -p /models \
    && chown 10001:10001 /models
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    INTERSCOPE_HOST=0.0.0.0 \
    INTERSCOPE_PORT=50051 \
    INTERSCOPE_METRICS_PORT=9090 \
    INTERSCOPE_MODEL_REPOSITORY=/models \
    INTERSCOPE_DEVICE=cpu \
    INTERSCOPE_GRACE_SECONDS=20 \
    INTERSCOPE_LOG_LEVEL=INFO
VOLUME ["/models"]
EXPOSE 50051 9090
USER 10001:10001
WORKDIR /tmp
# The gRPC health protocol, not a TCP connect: SERVING only once the models have loaded.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["sh", "-c", "interscope health --address 127.0.0.1:${INTERSCOPE_PORT}"]
ENTRYPOINT ["interscope"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
ARG TORCH_SPEC="torch>=2.6,<2.10"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
ARG ONNXRUNTIME_GPU_SPEC="onnxruntime-gpu>=1.20,<2"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# Versions are not pinned: the base image tag pins the Ubuntu release, and Ubuntu replaces
# package versions with security updates, so exact pins would break every rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
COPY --from=builder /wheels /wheels
# 1. a CUDA build of torch from PyTorch's index (PyPI's default torch would do too on x86_64,
#    but the explicit index pins the CUDA minor version to the base image's);
# 2. the wheel with the server extra (torch already satisfied, so it stays the CUDA build);
# 3. swap onnxruntime for onnxruntime-gpu: both install the same `onnxruntime` module, so they
#    cannot share one environment, and the server extra names the CPU one.
# Versions are bounded by the ARG ranges and the wheel's requirements, as in the cpu stage.
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}" \
    && pip install "$(ls /wheels/interscope-*.whl)[server]" \
    && pip uninstall -y onnxruntime \
    && pip install "${ONNXRUNTIME_GPU_SPEC}" \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 interscope \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin interscope \
    && mkdir -p /models \
    && chown 10001:10001 /models
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    INTERSCOPE_HOST=0.0.0.0 \
    INTERSCOPE_PORT=50051 \
    INTERSCOPE_METRICS_PORT=9090 \
    INTERSCOPE_MODEL_REPOSITORY=/models \
    INTERSCOPE_DEVICE=auto \
    INTERSCOPE_GRACE_SECONDS=20 \
    INTERSCOPE_LOG_LEVEL=INFO
VOLUME ["/models"]
EXPOSE 50051 9090
USER 10001:10001
WORKDIR /tmp
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["sh", "-c", "interscope health --address 127.0.0.1:${INTERSCOPE_PORT}"]
ENTRYPOINT ["interscope"]
CMD ["serve"]
