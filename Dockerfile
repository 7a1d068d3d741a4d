# syntax=docker/dockerfile:1
#
# WISP, CPU image: one image for every service (wisp-cli serve drafter|verifier|scheduler|
# estimator) and for `wisp-cli models prepare`. Published as ghcr.io/wisp-serving/wisp:<version>
# (deploy/k8s overlays map the logical image name `wisp` to it with an `images:` stanza).
#
#   docker build -t ghcr.io/wisp-serving/wisp:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/wisp-serving/wisp:0.1.0 --push .
#
# The GPU variant is Dockerfile.cuda.

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------------------------
# build: a virtual environment with torch (CPU wheel) and the project, compiled with a toolchain
# that stays out of the runtime image (some dependencies have no wheel on every platform).
FROM python:${PYTHON_VERSION}-slim AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the CPU-only index (~200 MB instead of the multi-GB CUDA build); the
# project's `torch==2.13.0` pin is then already satisfied by 2.13.0+cpu.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
# Dependencies next, from pyproject.toml alone, so editing the code does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# Then the project itself (what .dockerignore lets through).
COPY . .
RUN pip install --no-deps . \
 && wisp-cli --help > /dev/null

# ---------------------------------------------------------------------------------------------
# runtime: python slim + the venv, non-root, read-only-root friendly.
FROM python:${PYTHON_VERSION}-slim AS runtime

LABEL org.opencontainers.image.title="wisp" \
      org.opencontainers.image.description="WISP: distributed speculative LLM serving (CPU)" \
      org.opencontainers.image.source="https://github.com/wisp-serving/wisp" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/wisp \
    HF_HOME=/home/wisp/.cache/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    WISP_MODEL_CACHE=/models \
    WISP_HTTP_PORT=9090

# uid/gid 10001: matches runAsUser/runAsGroup/fsGroup in deploy/k8s.
RUN groupadd --system --gid 10001 wisp \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/wisp --create-home \
      --shell /usr/sbin/nologin wisp \
 && mkdir -p /models /home/wisp/.cache \
 && chown -R 10001:10001 /models /home/wisp

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/wisp

# Model cache (`wisp-cli models prepare` writes here); mount a volume in production.
VOLUME ["/models"]
# /healthz, /readyz and Prometheus /metrics of every service; 8000: the OpenAI-compatible API
# (`serve gateway`, and a drafter's own API on loopback).
EXPOSE 9090 8000

ENTRYPOINT ["wisp-cli"]
CMD ["--help"]
