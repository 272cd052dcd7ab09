# interscope server image, built from a wheelhouse: the build asks no package index.
#
#   scripts/build-wheelhouse.sh --match-venv .venv             # ./wheelhouse, the versions tested
#   docker build --target cpu -t interscope:0.1.0-cpu .        # CPU-only image
#   scripts/build-wheelhouse.sh --gpu                          # ./wheelhouse-gpu
#   docker build -t interscope:0.1.0-cuda .                    # default: the CUDA (GPU) image
#
# Stages: `cpu-install` and `gpu-install` install the wheelhouse into /opt/venv; `cpu` and `gpu`
# copy only that venv onto a fresh base, so the wheels never become a layer of the image. The GPU
# stage is last so that a plain `docker build` yields it; `--target cpu` builds only the first two.
# No `# syntax=` line: that would make BuildKit pull a frontend image, which an offline build
# cannot, and the legacy builder runs this file as well.

# The wheelhouse must be for the base's Python (3.11 for ./wheelhouse built on a 3.11 host;
# install-from-wheelhouse.sh refuses a mismatch). Any Debian-like image with python3 and its
# venv module does: CI uses a debootstrapped bookworm (.ci/check-container).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# cuDNN 9 + CUDA 12.6 runtime: what onnxruntime-gpu (CUDA 12 builds on PyPI) and torch's cu126
# wheels expect. Its Python is Ubuntu 24.04's 3.12, the default of `build-wheelhouse.sh --gpu`.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-install
COPY deploy/docker/install-from-wheelhouse.sh /install-from-wheelhouse.sh
COPY wheelhouse /wheelhouse
RUN sh /install-from-wheelhouse.sh /wheelhouse

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
COPY --from=cpu-install /opt/venv /opt/venv
RUN groupadd --system --gid 10001 interscope \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin interscope \
    && mkdir -p /models \
    && chown 10001:10001 /models
# PATH in full: an imported root filesystem (docker import) has no PATH of its own to extend.
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
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
FROM ${CUDA_IMAGE} AS gpu-base
ENV DEBIAN_FRONTEND=noninteractive
# Only when the base lacks them (the default CUDA image does): then this one step needs the
# distribution's mirror. Versions are not pinned: the base tag pins the Ubuntu release, and
# Ubuntu replaces package versions with security updates, so exact pins break every rebuild.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# ---------------------------------------------------------------------------------------------
FROM gpu-base AS gpu-install
COPY deploy/docker/install-from-wheelhouse.sh /install-from-wheelhouse.sh
COPY wheelhouse-gpu /wheelhouse
RUN sh /install-from-wheelhouse.sh /wheelhouse --gpu

# ---------------------------------------------------------------------------------------------
FROM gpu-base AS gpu
COPY --from=gpu-install /opt/venv /opt/venv
RUN groupadd --system --gid 10001 interscope \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin interscope \
    && mkdir -p /models \
    && chown 10001:10001 /models
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
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
