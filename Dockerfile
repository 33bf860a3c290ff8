# syntax=docker/dockerfile:1
#
# Secateur's gRPC pruning service (`secateur serve`) as a container image.
#
# Targets (docker build --target NAME; the default is the last one, `runtime`):
#   runtime  CPU, or GPU with the CUDA libraries from pip:
#              docker build -t secateur:0.1.0 .
#              docker build -t secateur:0.1.0-gpu --build-arg TF_EXTRA='[and-cuda]' .
#            (a GPU host also needs the NVIDIA driver and container toolkit;
#            `docker run --gpus all ...`; on GKE the driver is installed by the node)
#   tpu      Cloud TPU VMs / GKE TPU node pools, with tensorflow-tpu and libtpu:
#              docker build --target tpu -t secateur:0.1.0-tpu .
#            tensorflow-tpu and libtpu come from Google's libtpu release index
#            (-f https://storage.googleapis.com/libtpu-releases/index.html), which
#            must be reachable from wherever the image is built. tensorflow-tpu is
#            released separately from tensorflow and can lag behind it: if the index
#            has no tensorflow-tpu matching the project's tensorflow pin yet, the
#            build fails at that step (TF_TPU_VERSION selects another one, at your
#            own risk: tf-keras is pinned to the same minor version as tensorflow).
#
# The image runs as the unprivileged user `secateur` (uid/gid 10001). State (the
# SQLite job store and the jobs' work folders) lives in /var/lib/secateur: mount a
# volume there. Extra `secateur serve` flags go after the image name, e.g.
#   docker run -p 50051:50051 -p 9464:9464 -v secateur-state:/var/lib/secateur \
#     secateur:0.1.0 --allowed-uri-prefix gs://models --auth-token-file /run/secrets/tokens
# A repeated flag overrides the one in ENTRYPOINT (the last one wins).
#
# Authentication: the ENTRYPOINT listens on all interfaces (--host 0.0.0.0) and
# names no authentication, so the server refuses to start (exit 2) until a run
# adds one: --auth-token-file FILE (bearer tokens, e.g. a mounted secret; what
# deploy/k8s uses), mTLS (--tls-cert, --tls-key, --tls-client-ca), or
# --allow-unauthenticated where only trusted clients can reach the port (what
# deploy/docker-compose.yml uses, published on 127.0.0.1 only).
#
# Trusted packages: the image installs keras-hub and its ENTRYPOINT trusts it
# (--trust-package keras_hub), so a .keras file may name the model classes
# keras-hub registers (keras_hub>ResNetBackbone, its tasks and layers). The file
# still carries no code: only classes of that installed package are built, and
# Lambda layers, serialised functions and any other package's classes stay
# refused (docs/model_formats.md). --trust-package adds up rather than being
# overridden: to trust another package installed in a derived image, pass
# --trust-package NAME after the image name; to trust nothing but Keras' own
# classes, run with --entrypoint secateur and `serve ...` without the flag.
#
# On `docker stop` (SIGTERM) health reports NOT_SERVING for --shutdown-grace-seconds
# (default 5) before the server stops: keep docker's stop timeout above it plus 10 s.
#
# The HEALTHCHECK asks grpc.health.v1 over plaintext on 127.0.0.1:50051; with
# --port set it to SECATEUR_HEALTH_ADDR (docker run -e SECATEUR_HEALTH_ADDR=...).
# With --tls-cert it cannot connect: run with --no-healthcheck or another --health-cmd.

# -- builder: the project's wheels (secateur and secateur-client) --------------
FROM python:3.11-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Only what the wheels are built from: pyproject.toml maps pruner/ and server/,
# packaging/client/pyproject.toml client/, cli/ and proto/ into the secateur.*
# namespace (the generated protobuf modules are committed in proto/). secateur
# depends on secateur-client, which is not on PyPI: both wheels go in together.
COPY pyproject.toml README.md ./
COPY packaging/client/ packaging/client/
COPY pruner/ pruner/
COPY server/ server/
COPY client/ client/
COPY cli/ cli/
COPY proto/ proto/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . ./packaging/client

# -- venv: the project and TensorFlow (CPU, or CUDA with TF_EXTRA='[and-cuda]') --
FROM builder AS venv
# '' (CPU; uses a GPU only if CUDA libraries are present) or '[and-cuda]'.
ARG TF_EXTRA=""
# keras-hub: the one package the ENTRYPOINT trusts (--trust-package keras_hub).
RUN /opt/venv/bin/pip install /wheels/*.whl "tensorflow${TF_EXTRA}==2.21.0" \
        "keras-hub==0.32.0"

# -- venv-tpu: the project with tensorflow-tpu in place of tensorflow -----------
FROM builder AS venv-tpu
ARG TF_TPU_VERSION=2.21.0
# tensorflow-tpu provides the same `tensorflow` module as the tensorflow
# distribution, so the one pulled in by the project's dependencies is removed
# before it is installed (pip check then reports tensorflow as missing; at run
# time nothing asks for the distribution, only for the module).
RUN /opt/venv/bin/pip install /wheels/*.whl "keras-hub==0.32.0" \
    && /opt/venv/bin/pip uninstall --yes tensorflow \
    && /opt/venv/bin/pip install "tensorflow-tpu==${TF_TPU_VERSION}" \
        -f https://storage.googleapis.com/libtpu-releases/index.html

# -- runtime-base: what both runtime images share ------------------------------
FROM python:3.11-slim AS runtime-base
LABEL org.opencontainers.image.title="secateur" \
      org.opencontainers.image.description="Structured channel pruning for TensorFlow/Keras as a gRPC service" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SECATEUR_HEALTH_ADDR=127.0.0.1:50051
# /var/lib/secateur: the state dir; its models/ folder is the server's default
# allow-listed prefix. /models: a mount point for a models volume (compose).
# A fresh named volume mounted on either takes over this ownership.
RUN groupadd --system --gid 10001 secateur \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/secateur \
        --shell /usr/sbin/nologin secateur \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/secateur /var/lib/secateur/models /models
WORKDIR /home/secateur
USER 10001:10001
# gRPC (--port) and Prometheus /metrics (--metrics-port).
EXPOSE 50051 9464
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg; ch = grpc.insecure_channel(os.environ.get('SECATEUR_HEALTH_ADDR', '127.0.0.1:50051')); r = hg.HealthStub(ch).Check(h.HealthCheckRequest(service='secateur.v1.PruningService'), timeout=5); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["secateur", "serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9464", "--state-dir", "/var/lib/secateur", "--trust-package", "keras_hub"]
CMD []

# -- tpu: for Cloud TPU VMs and GKE TPU node pools -------------------------------
FROM runtime-base AS tpu
COPY --from=venv-tpu /opt/venv /opt/venv

# -- runtime (default): CPU, or GPU when built with TF_EXTRA='[and-cuda]' --------
FROM runtime-base AS runtime
COPY --from=venv /opt/venv /opt/venv
